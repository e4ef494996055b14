/* quant_train: what the two training quantization methods (qat_method.c, qlora.c) share: the
 * in-memory run config of their fine-tuning, the "training" object of the output's manifest,
 * editing that manifest afterwards, and the checks made before any training starts. */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/checkpoint.h"
#include "resafe/quant_io.h"
#include "resafe/quant_methods.h"
#include "resafe/safetensors.h"
#include "resafe/sha256.h"

static int set_str(rs_config *c, const char *s, const char *k, const char *v) {
    if (rs_config_set(c, s, k, v) != 0) return rs_fail_context("[%s] %s", s, k);
    return 0;
}

static int set_num(rs_config *c, const char *s, const char *k, double v) {
    char buf[64];
    snprintf(buf, sizeof buf, "%.17g", v);
    return set_str(c, s, k, buf);
}

rs_config *rs_qtrain_config(const rs_quantize_job *j, const char *model_dir, const char *out_dir) {
    const rs_qtrain_opts *t = &j->train;
    rs_config *c = rs_config_new();
    int rc = set_str(c, "model", "path", model_dir);
    if (rc == 0) rc = set_str(c, "model", "backend", t->backend);
    if (rc == 0) rc = set_str(c, "model", "chat_template", t->chat_template);
    if (rc == 0 && t->threads > 0) rc = set_num(c, "model", "threads", t->threads);
    if (rc == 0) rc = set_str(c, "run", "out_dir", out_dir);
    if (rc == 0) rc = set_num(c, "run", "seed", (double)j->q.seed);
    if (rc == 0) rc = set_num(c, "run", "checkpoint_every", 0);
    if (rc == 0) rc = set_str(c, "sft", "data_file", j->calib);
    if (rc == 0) rc = set_str(c, "sft", "prompt_key", t->prompt_key);
    if (rc == 0) rc = set_str(c, "sft", "response_key", t->response_key);
    if (rc == 0) rc = set_num(c, "sft", "lr", t->lr);
    if (rc == 0) rc = set_str(c, "sft", "schedule", "cosine");
    if (rc == 0) rc = set_num(c, "sft", "epochs", t->epochs);
    if (rc == 0) rc = set_num(c, "sft", "max_steps", t->steps);
    if (rc == 0) rc = set_num(c, "sft", "batch_size", t->batch_size);
    if (rc == 0) rc = set_num(c, "sft", "micro_batch_size", t->micro_batch_size);
    if (rc == 0) rc = set_num(c, "sft", "max_seq_len", j->q.max_seq_len);
    if (rc == 0) rc = set_num(c, "sft", "grad_clip", 1.0);
    if (rc == 0) rc = set_num(c, "sft", "weight_decay", 0.0);
    if (rc != 0) {
        rs_config_free(c);
        return NULL;
    }
    return c;
}

void *rs_qtrain_calib_entry(const rs_quantize_job *j) {
    cJSON *c = cJSON_CreateObject();
    char hex[65];
    cJSON_AddStringToObject(c, "file", j->calib);
    cJSON_AddStringToObject(c, "prompt_key", j->train.prompt_key);
    cJSON_AddStringToObject(c, "response_key", j->train.response_key);
    if (rs_sha256_file(j->calib, hex) == 0) cJSON_AddStringToObject(c, "sha256", hex);
    return c;
}

void *rs_qtrain_manifest(const rs_quantize_job *j) {
    const rs_qtrain_opts *t = &j->train;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "kind", t->kind == RS_QTRAIN_QAT ? "qat" : "qlora");
    cJSON_AddStringToObject(o, "prompt_key", t->prompt_key);
    cJSON_AddStringToObject(o, "response_key", t->response_key);
    cJSON_AddStringToObject(o, "chat_template", t->chat_template);
    cJSON_AddNumberToObject(o, "steps", t->steps);
    cJSON_AddNumberToObject(o, "epochs", t->epochs);
    cJSON_AddNumberToObject(o, "lr", t->lr);
    cJSON_AddNumberToObject(o, "batch_size", t->batch_size);
    cJSON_AddNumberToObject(o, "micro_batch_size", t->micro_batch_size);
    cJSON_AddNumberToObject(o, "max_seq_len", j->q.max_seq_len);
    cJSON_AddNumberToObject(o, "seed", (double)j->q.seed);
    cJSON_AddStringToObject(o, "schedule", "cosine");
    if (t->kind == RS_QTRAIN_QAT) {
        cJSON_AddStringToObject(o, "grid",
                                j->q.spec.group_size ? "per group, as rs fake_quant_rows"
                                                     : "per row, as rs fake_quant_rows");
        cJSON_AddNumberToObject(o, "group_size", j->q.spec.group_size);
        cJSON_AddNumberToObject(o, "act_bits", t->act_bits);
        cJSON_AddNumberToObject(o, "kv_bits", t->kv_bits);
    } else {
        cJSON_AddNumberToObject(o, "rank", t->rank);
        cJSON_AddNumberToObject(o, "alpha", t->alpha);
        cJSON_AddStringToObject(o, "targets", t->targets);
        cJSON_AddStringToObject(o, "merge", t->merge);
    }
    return o;
}

int rs_json_file_edit(const char *path, void (*fn)(void *json, void *user), void *user) {
    char *text = NULL;
    size_t size;
    int rc = rs_read_file(path, &text, &size);
    cJSON *m = rc == 0 ? cJSON_ParseWithLength(text, size) : NULL;
    if (rc == 0 && !cJSON_IsObject(m)) rc = RS_FAIL("%s: not a JSON object", path);
    if (rc == 0) {
        fn(m, user);
        char *out = cJSON_Print(m);
        rc = rs_write_file_atomic(path, out, strlen(out));
        cJSON_free(out);
    }
    cJSON_Delete(m);
    free(text);
    return rc;
}

/* Before the training: every check that would otherwise fail only after it. */
int rs_qtrain_precheck(const rs_quantize_job *j) {
    if (rs_path_exists(j->out)) return RS_FAIL("%s: already exists (choose a new --out)", j->out);
    const char *keep = j->train.save_trained;
    if (keep && rs_path_exists(keep))
        return RS_FAIL("%s: already exists (choose a new --save-trained)", keep);
    if (!rs_path_is_dir(j->model)) return RS_FAIL("%s: not a model directory", j->model);
    if (!rs_path_exists(j->calib)) return RS_FAIL("%s: calibration file not found", j->calib);
    rs_st_set set;
    RS_TRY(rs_st_open(j->model, &set));
    int quantized = rs_qconfig_of(&set) != NULL;
    rs_st_close(&set);
    if (quantized) return RS_FAIL("%s: is already quantized", j->model);
    return 0;
}
