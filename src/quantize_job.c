/* quantize_job: one whole quantization of a model directory, shared by `resafe quantize` and the
 * quantize stage of `resafe train`: load (fp32, CPU), optional SNIP protection masks, calibration
 * data, rs_quantize_model, then the quantized directory (or its dequantized export) with
 * resafe_manifest.json, written to a temporary directory and renamed. */
#include <cJSON.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "resafe/checkpoint.h"
#include "resafe/quant_io.h"
#include "resafe/quant_methods.h"
#include "resafe/sha256.h"
#include "resafe/tokenizer.h"

void rs_quantize_job_default(rs_quantize_job *j) {
    memset(j, 0, sizeof *j);
    rs_quant_opts_default(&j->q);
    j->q.spec.bits = 4;
    j->q.spec.group_size = 128;
    j->calib_column = "prompt";
    j->protect_column = "prompt+target";
    j->calib_max = 128;
    j->protect_max = 64;
    j->export_dtype = "bf16";
    rs_qtrain_opts *t = &j->train;
    t->prompt_key = "prompt", t->response_key = "response";
    t->chat_template = "auto", t->backend = "cpu";
    t->epochs = 1, t->batch_size = 8;
    t->rank = 64, t->alpha = 16.0f, t->targets = "all", t->merge = "refit";
}

int rs_quantize_job_set_method(rs_quantize_job *j, const char *m, int bits_given,
                               int group_given) {
    rs_qspec *s = &j->q.spec;
    j->method_name = m;
    j->train.kind = RS_QTRAIN_NONE;
    if (!strcmp(m, "qat")) { /* LLM-QAT: RTN's grid, groups of 128 by default like rtn's */
        s->format = RS_QFMT_INT;
        j->q.method = RS_QMETHOD_RTN;
        j->train.kind = RS_QTRAIN_QAT;
        if (!(j->train.lr > 0)) j->train.lr = 2e-5; /* LLM-QAT's learning rate */
        return 0;
    }
    if (!strcmp(m, "qlora")) { /* QLoRA: NF4 base, blocks of 64; with --bits RTN's grid */
        s->format = bits_given ? RS_QFMT_INT : RS_QFMT_NF4;
        j->q.method = RS_QMETHOD_RTN;
        j->train.kind = RS_QTRAIN_QLORA;
        if (!bits_given) s->bits = 4;
        if (!bits_given && !group_given) s->group_size = 64;
        if (!(j->train.lr > 0)) j->train.lr = 2e-4; /* the QLoRA paper's for 7B models */
        return 0;
    }
    if (!strcmp(m, "rtn") || !strcmp(m, "awq") || !strcmp(m, "gptq")) {
        s->format = RS_QFMT_INT;
        j->q.method = !strcmp(m, "rtn")   ? RS_QMETHOD_RTN
                      : !strcmp(m, "awq") ? RS_QMETHOD_AWQ
                                          : RS_QMETHOD_GPTQ;
        return 0;
    }
    j->q.method = RS_QMETHOD_RTN;
    if (!strcmp(m, "nf4") || !strcmp(m, "fp4")) {
        s->format = !strcmp(m, "nf4") ? RS_QFMT_NF4 : RS_QFMT_FP4;
        if (!bits_given) s->bits = 4;
        if (!group_given) s->group_size = 64;
        return 0;
    }
    if (!strcmp(m, "int8")) {
        s->format = RS_QFMT_INT8_OUTLIER;
        if (!bits_given) s->bits = 8;
        if (!group_given) s->group_size = 0;
        s->symmetric = 1;
        return 0;
    }
    return -1;
}

int rs_quantize_job_check(const rs_quantize_job *j, int bits_given, int group_given) {
    const char *m = j->method_name;
    const rs_qtrain_opts *t = &j->train;
    if (t->kind == RS_QTRAIN_NONE) return 0;
    if (!j->calib)
        return RS_FAIL("--method %s needs --calib FILE (JSONL of {\"%s\": ..., \"%s\": ...})", m,
                       t->prompt_key, t->response_key);
    if (j->q.protect_tau > 0.0f) return RS_FAIL("--method %s: --protect-tau does not apply", m);
    if (j->export_kind) return RS_FAIL("--method %s: --export does not apply", m);
    if (t->kind == RS_QTRAIN_QLORA && !bits_given && (group_given || j->q.spec.symmetric))
        return RS_FAIL("--method qlora: without --bits the base is NF4 (absmax blocks of 64): "
                       "--group and --sym need --bits (an integer base on RTN's grid)");
    if (t->kind == RS_QTRAIN_QLORA && strcmp(t->merge, "refit") && strcmp(t->merge, "grid") &&
        strcmp(t->merge, "adapter"))
        return RS_FAIL("--merge: '%s' is not refit, grid or adapter", t->merge);
    return 0;
}

/* ---------------------------------------------------------------- manifest */

static int is_source_file(const char *name) {
    size_t n = strlen(name);
    const char *ends[] = {".safetensors", ".safetensors.index.json", ".json", ".model", ".jinja"};
    for (size_t i = 0; i < sizeof ends / sizeof *ends; i++) {
        size_t e = strlen(ends[i]);
        if (n > e && !strcmp(name + n - e, ends[i])) return 1;
    }
    return 0;
}

/* sha256 of every weight, config and tokenizer file of dir, sorted by name. */
static int hash_dir(const char *dir, cJSON *files) {
    struct dirent **list;
    int n = scandir(dir, &list, NULL, alphasort);
    if (n < 0) return RS_FAIL("%s: cannot list the directory", dir);
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (rc == 0 && is_source_file(list[i]->d_name)) {
            char *path = rs_path_join(dir, list[i]->d_name), hex[65];
            rc = rs_sha256_file(path, hex);
            if (rc == 0) cJSON_AddStringToObject(files, list[i]->d_name, hex);
            free(path);
        }
        free(list[i]);
    }
    free(list);
    return rc;
}

static cJSON *data_entry(const char *file, const char *column, int max) {
    cJSON *o = cJSON_CreateObject();
    char hex[65];
    cJSON_AddStringToObject(o, "file", file);
    cJSON_AddStringToObject(o, "column", column);
    cJSON_AddNumberToObject(o, "max_items", max);
    if (rs_sha256_file(file, hex) == 0) cJSON_AddStringToObject(o, "sha256", hex);
    return o;
}

static int write_manifest(const rs_quantize_job *o, const char *dir, const rs_quant_result *r,
                          void (*extra_fn)(void *, void *), void *user) {
    cJSON *m = cJSON_CreateObject(), *src = cJSON_AddObjectToObject(m, "source");
    char name[64];
    cJSON_AddStringToObject(m, "resafe_version", RS_VERSION);
    cJSON_AddStringToObject(src, "model_dir", o->model);
    int rc = hash_dir(o->model, cJSON_AddObjectToObject(src, "sha256"));
    cJSON_AddStringToObject(m, "method", o->method_name);
    cJSON_AddStringToObject(m, "quantization", rs_qspec_name(&o->q.spec, name, sizeof name));
    cJSON_AddNumberToObject(m, "bits", o->q.spec.bits);
    cJSON_AddNumberToObject(m, "group_size", o->q.spec.group_size);
    cJSON_AddBoolToObject(m, "symmetric", o->q.spec.symmetric != 0);
    cJSON_AddStringToObject(m, "packing", RS_QPACKING_NAME);
    cJSON_AddNumberToObject(m, "packing_version", RS_QPACK_VERSION);
    cJSON_AddStringToObject(m, "export", o->export_kind ? "dequant" : "quantized");
    cJSON_AddItemToObject(m, "calibration",
                          !o->calib ? cJSON_CreateNull()
                          : o->train.kind != RS_QTRAIN_NONE
                              ? rs_qtrain_calib_entry(o)
                              : data_entry(o->calib, o->calib_column, o->calib_max));
    cJSON_AddNumberToObject(m, "protect_tau", o->q.protect_tau);
    cJSON_AddItemToObject(m, "protect_data",
                          o->protect_data
                              ? data_entry(o->protect_data, o->protect_column, o->protect_max)
                              : cJSON_CreateNull());
    cJSON *sz = cJSON_AddObjectToObject(m, "bytes");
    cJSON_AddNumberToObject(sz, "quantized", (double)r->bytes);
    cJSON_AddNumberToObject(sz, "critical", (double)r->critical_bytes);
    cJSON_AddNumberToObject(sz, "dense_fp16", (double)r->dense_bytes);
    if (o->train.kind != RS_QTRAIN_NONE)
        cJSON_AddItemToObject(m, "training", rs_qtrain_manifest(o));
    if (extra_fn) extra_fn(m, user);
    char *text = cJSON_Print(m);
    cJSON_Delete(m);
    char *path = rs_path_join(dir, "resafe_manifest.json");
    if (rc == 0) rc = rs_write_file_atomic(path, text, strlen(text));
    free(path);
    cJSON_free(text);
    return rc;
}

/* ---------------------------------------------------------------- the run */

/* Masks from the safety data when protect_tau > 0 (NULL otherwise). */
static int protection(const rs_quantize_job *o, rs_model *m, const rs_tokenizer *tok,
                      uint8_t ***masks) {
    *masks = NULL;
    if (!(o->q.protect_tau > 0.0f)) return 0;
    rs_calib_set data;
    if (rs_calib_load(o->protect_data, o->protect_column, o->protect_max, &data) != 0) return -1;
    *masks = rs_calloc((size_t)m->cfg.n_layers * RS_N_LINEARS, sizeof **masks);
    int rc = rs_protect_masks(m, tok, &data, o->q.protect_tau, o->q.max_seq_len, *masks);
    rs_calib_free(&data);
    return rc;
}

int rs_quantize_job_write(const rs_quantize_job *o, const char *tensor_dir, const rs_model *m,
                          const rs_quant_result *r, void (*extra_fn)(void *, void *), void *user,
                          const char *const *extra_files) {
    if (rs_path_exists(o->out)) return RS_FAIL("%s: already exists (choose a new --out)", o->out);
    size_t n = strlen(o->out) + 32;
    char *tmp = rs_malloc(n);
    snprintf(tmp, n, "%s.tmp.%ld", o->out, (long)getpid());
    int rc = rs_mkdir_p(tmp);
    const rs_qweight **qw = rs_malloc((size_t)r->n * sizeof *qw);
    for (int j = 0; j < r->n; j++)
        qw[j] = &r->w[j];
    rs_dtype dt = !strcmp(o->export_dtype, "f32")   ? RS_F32
                  : !strcmp(o->export_dtype, "f16") ? RS_F16
                                                    : RS_BF16;
    if (rc == 0)
        rc = o->export_kind ? rs_qmodel_write_dequant(tensor_dir, tmp, &m->cfg, qw, dt)
                            : rs_qmodel_write(tensor_dir, tmp, &m->cfg, qw, o->method_name);
    for (int i = 0; rc == 0 && extra_files && extra_files[i]; i += 2)
        rc = rs_copy_file_into(extra_files[i], tmp, extra_files[i + 1]);
    if (rc == 0) rc = write_manifest(o, tmp, r, extra_fn, user);
    if (rc == 0 && rename(tmp, o->out) != 0)
        rc = RS_FAIL("%s: cannot rename %s into place", o->out, tmp);
    if (rc != 0) rs_remove_tree(tmp); /* an interrupted write leaves nothing that looks done */
    free(qw);
    free(tmp);
    return rc;
}

static void free_masks(uint8_t **masks, int n) {
    if (masks)
        for (int j = 0; j < n; j++)
            free(masks[j]);
    free(masks);
}

int rs_quantize_job_run(const rs_quantize_job *o, rs_quant_sizes *sizes) {
    if (o->train.kind == RS_QTRAIN_QAT) return rs_qat_job_run(o, sizes);
    if (o->train.kind == RS_QTRAIN_QLORA) return rs_qlora_job_run(o, sizes);
    rs_model m;
    RS_TRY(rs_model_load(o->model, rs_backend_cpu(), &m));
    if (m.n_qweights) {
        rs_model_free(&m);
        return RS_FAIL("%s: is already quantized", o->model);
    }
    int need_tok = o->calib || o->q.protect_tau > 0.0f;
    rs_tokenizer *tok = need_tok ? rs_tokenizer_load(o->model) : NULL;
    rs_calib_set calib = {0};
    uint8_t **masks = NULL;
    rs_quant_result res = {0};
    int rc = need_tok && !tok ? -1 : 0;
    if (rc == 0 && o->calib) rc = rs_calib_load(o->calib, o->calib_column, o->calib_max, &calib);
    if (rc == 0) rc = protection(o, &m, tok, &masks);
    if (rc == 0) rc = rs_quantize_model(&m, tok, o->calib ? &calib : NULL, masks, &o->q, &res);
    if (rc == 0) rc = rs_quantize_job_write(o, o->model, &m, &res, NULL, NULL, NULL);
    if (rc == 0 && sizes)
        *sizes = (rs_quant_sizes){res.n, res.bytes, res.critical_bytes, res.dense_bytes};
    free_masks(masks, m.cfg.n_layers * RS_N_LINEARS);
    if (o->calib) rs_calib_free(&calib);
    if (res.w) rs_quant_result_free(&res);
    if (tok) rs_tokenizer_free(tok);
    rs_model_free(&m);
    return rc;
}
