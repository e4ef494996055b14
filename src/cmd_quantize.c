/* resafe quantize: a model directory into a quantized model directory (or its dequantized HF
 * export), through rs_quantize_model (RTN, AWQ, GPTQ; NF4/FP4/INT8 are RTN formats), with
 * optional SNIP critical-weight protection. Written to a temporary directory and renamed. */
#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "resafe/cli.h"
#include "resafe/quant_io.h"
#include "resafe/quant_methods.h"
#include "resafe/sha256.h"
#include "resafe/tokenizer.h"

static const char *g_usage =
    "usage: resafe quantize --model DIR --method M --out DIR [options]\n"
    "  --model DIR            Hugging Face model directory (fp32/fp16/bf16 safetensors)\n"
    "  --method M             rtn | awq | gptq (grouped integer), nf4 | fp4 (bitsandbytes\n"
    "                         codebooks, absmax blocks of 64), int8 (per-row int8 + fp16\n"
    "                         outlier columns)\n"
    "  --bits N               2, 3, 4 or 8 for rtn/awq/gptq (default 4)\n"
    "  --group G              32, 64, 128 or 0 = whole row (default 128)\n"
    "  --sym                  symmetric codes (no zero points)\n"
    "  --threshold X          int8: |w| above X makes its column an outlier (default 6)\n"
    "  --calib FILE           calibration prompts (.txt, .csv, .jsonl); needed by awq, gptq\n"
    "  --calib-column C       CSV/JSONL column (default prompt)\n"
    "  --calib-max N          at most N calibration texts (default 128)\n"
    "  --max-seq-len N        calibration sequences cut to N tokens (default 512)\n"
    "  --act-order            gptq: columns in order of decreasing Hessian diagonal\n"
    "  --protect-tau T        keep the top T fraction of SNIP scores in fp16 (default 0 = off)\n"
    "  --protect-data FILE    safety calibration set for the scores (CSV/JSONL)\n"
    "  --protect-column C     its column (default prompt+target)\n"
    "  --protect-max N        at most N items (default 64)\n"
    "  --seed S               default 0\n"
    "  --out DIR              output directory (must not exist)\n"
    "  --export dequant       write a plain HF directory of W_eff = dequant(Q) instead\n"
    "  --export-dtype T       bf16 (default), f16 or f32 for --export dequant\n"
    "  -v, --verbose          debug log\n";

typedef struct {
    const char *model, *out, *calib, *calib_column, *protect_data, *protect_column, *method_name;
    const char *export_kind, *export_dtype;
    int calib_max, protect_max, verbose;
    rs_quant_opts q;
} options;

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "resafe quantize: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n%s", g_usage);
    return 2;
}

/* --method into the spec's format and the driver's method. */
static int set_method(options *o, int bits_given, int group_given) {
    const char *m = o->method_name;
    rs_qspec *s = &o->q.spec;
    if (!strcmp(m, "rtn") || !strcmp(m, "awq") || !strcmp(m, "gptq")) {
        s->format = RS_QFMT_INT;
        o->q.method = !strcmp(m, "rtn")   ? RS_QMETHOD_RTN
                      : !strcmp(m, "awq") ? RS_QMETHOD_AWQ
                                          : RS_QMETHOD_GPTQ;
        return 0;
    }
    o->q.method = RS_QMETHOD_RTN;
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
    return usage_error("--method: '%s' is not rtn, awq, gptq, nf4, fp4 or int8", m);
}

static int parse_value(options *o, const char *flag, const char *v, int *bits_given,
                       int *group_given) {
    long n;
    float f;
    if (!strcmp(flag, "--model"))
        o->model = v;
    else if (!strcmp(flag, "--out"))
        o->out = v;
    else if (!strcmp(flag, "--method"))
        o->method_name = v;
    else if (!strcmp(flag, "--calib"))
        o->calib = v;
    else if (!strcmp(flag, "--calib-column"))
        o->calib_column = v;
    else if (!strcmp(flag, "--protect-data"))
        o->protect_data = v;
    else if (!strcmp(flag, "--protect-column"))
        o->protect_column = v;
    else if (!strcmp(flag, "--export"))
        o->export_kind = v;
    else if (!strcmp(flag, "--export-dtype"))
        o->export_dtype = v;
    else if (!strcmp(flag, "--bits")) {
        if (rs_parse_long(v, 1, 16, &n)) return usage_error("--bits: '%s' is not 2, 3, 4 or 8", v);
        o->q.spec.bits = (int)n, *bits_given = 1;
    } else if (!strcmp(flag, "--group")) {
        if (rs_parse_long(v, 0, 1 << 20, &n)) return usage_error("--group: '%s' is not an integer", v);
        o->q.spec.group_size = (int)n, *group_given = 1;
    } else if (!strcmp(flag, "--threshold")) {
        if (rs_parse_float(v, 0.0f, 1e30f, &f)) return usage_error("--threshold: '%s' is not >= 0", v);
        o->q.spec.outlier_threshold = f;
    } else if (!strcmp(flag, "--calib-max") || !strcmp(flag, "--protect-max")) {
        if (rs_parse_long(v, 1, 1 << 24, &n)) return usage_error("%s needs an integer >= 1", flag);
        *(flag[2] == 'c' ? &o->calib_max : &o->protect_max) = (int)n;
    } else if (!strcmp(flag, "--max-seq-len")) {
        if (rs_parse_long(v, 2, 1 << 20, &n)) return usage_error("--max-seq-len: '%s' is not >= 2", v);
        o->q.max_seq_len = (int)n;
    } else if (!strcmp(flag, "--protect-tau")) {
        if (rs_parse_float(v, 0.0f, 1.0f, &f))
            return usage_error("--protect-tau: '%s' is not in [0, 1]", v);
        o->q.protect_tau = f;
    } else if (!strcmp(flag, "--seed")) {
        if (rs_parse_long(v, 0, INT32_MAX, &n))
            return usage_error("--seed: '%s' is not an integer >= 0", v);
        o->q.seed = (uint64_t)n;
    } else
        return usage_error("unknown option '%s'", flag);
    return 0;
}

static int check_options(options *o) {
    if (!o->model || !o->out || !o->method_name)
        return usage_error("%s", "--model, --method and --out are required");
    if ((o->q.method == RS_QMETHOD_AWQ || o->q.method == RS_QMETHOD_GPTQ) && !o->calib)
        return usage_error("--method %s needs --calib FILE", o->method_name);
    if (o->q.protect_tau > 0.0f && !o->protect_data)
        return usage_error("%s", "--protect-tau needs --protect-data FILE");
    if (o->export_kind && strcmp(o->export_kind, "dequant"))
        return usage_error("--export: '%s' (only 'dequant')", o->export_kind);
    if (strcmp(o->export_dtype, "bf16") && strcmp(o->export_dtype, "f16") &&
        strcmp(o->export_dtype, "f32"))
        return usage_error("--export-dtype: '%s' is not bf16, f16 or f32", o->export_dtype);
    if (rs_qspec_check(&o->q.spec) != 0) {
        fprintf(stderr, "resafe quantize: %s\n%s", rs_last_error(), g_usage);
        return 2;
    }
    return 0;
}

static int parse_args(options *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    rs_quant_opts_default(&o->q);
    o->q.spec.bits = 4;
    o->q.spec.group_size = 128;
    o->calib_column = "prompt";
    o->protect_column = "prompt+target";
    o->calib_max = 128;
    o->protect_max = 64;
    o->export_dtype = "bf16";
    int bits_given = 0, group_given = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(g_usage, stdout);
            return -1;
        }
        if (!strcmp(a, "-v") || !strcmp(a, "--verbose"))
            o->verbose = 1;
        else if (!strcmp(a, "--sym"))
            o->q.spec.symmetric = 1;
        else if (!strcmp(a, "--act-order"))
            o->q.gptq_act_order = 1;
        else if (strncmp(a, "--", 2) || i + 1 >= argc)
            return usage_error(
                strncmp(a, "--", 2) ? "unexpected argument '%s'" : "%s needs a value", a);
        else {
            int rc = parse_value(o, a, argv[++i], &bits_given, &group_given);
            if (rc) return rc;
        }
    }
    if (!o->method_name) return usage_error("%s", "--method is required");
    int rc = set_method(o, bits_given, group_given);
    return rc ? rc : check_options(o);
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

static int write_manifest(const options *o, const char *dir, const rs_quant_result *r) {
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
                          o->calib ? data_entry(o->calib, o->calib_column, o->calib_max)
                                   : cJSON_CreateNull());
    cJSON_AddNumberToObject(m, "protect_tau", o->q.protect_tau);
    cJSON_AddItemToObject(m, "protect_data",
                          o->protect_data
                              ? data_entry(o->protect_data, o->protect_column, o->protect_max)
                              : cJSON_CreateNull());
    cJSON *sz = cJSON_AddObjectToObject(m, "bytes");
    cJSON_AddNumberToObject(sz, "quantized", (double)r->bytes);
    cJSON_AddNumberToObject(sz, "critical", (double)r->critical_bytes);
    cJSON_AddNumberToObject(sz, "dense_fp16", (double)r->dense_bytes);
    char *text = cJSON_Print(m);
    cJSON_Delete(m);
    char *path = rs_path_join(dir, "resafe_manifest.json");
    if (rc == 0) rc = rs_write_file_atomic(path, text, strlen(text));
    free(path);
    cJSON_free(text);
    return rc;
}

/* ---------------------------------------------------------------- the run */

static int fail(void) {
    fflush(stdout);
    fprintf(stderr, "resafe: error: %s\n", rs_last_error());
    return 1;
}

static void size_report(const options *o, const rs_quant_result *r) {
    char name[64];
    double mib = 1048576.0;
    printf("quantized %s (%s): %d linears\n", rs_qspec_name(&o->q.spec, name, sizeof name),
           o->method_name, r->n);
    printf("  quantized bytes   %zu (%.2f MiB; fp16 dense %.2f MiB, ratio %.3f)\n", r->bytes,
           r->bytes / mib, r->dense_bytes / mib,
           r->dense_bytes ? (double)r->bytes / r->dense_bytes : 0.0);
    printf("  critical side     %zu bytes (%.2f%% of the quantized bytes, tau %g)\n",
           r->critical_bytes, r->bytes ? 100.0 * r->critical_bytes / r->bytes : 0.0,
           o->q.protect_tau);
}

/* Masks from the safety data when --protect-tau > 0 (NULL otherwise). */
static int protection(const options *o, rs_model *m, const rs_tokenizer *tok, uint8_t ***masks) {
    *masks = NULL;
    if (!(o->q.protect_tau > 0.0f)) return 0;
    rs_calib_set data;
    if (rs_calib_load(o->protect_data, o->protect_column, o->protect_max, &data) != 0) return -1;
    *masks = rs_calloc((size_t)m->cfg.n_layers * RS_N_LINEARS, sizeof **masks);
    int rc = rs_protect_masks(m, tok, &data, o->q.protect_tau, o->q.max_seq_len, *masks);
    rs_calib_free(&data);
    return rc;
}

static int write_output(const options *o, const rs_model *m, const rs_quant_result *r) {
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
        rc = o->export_kind ? rs_qmodel_write_dequant(o->model, tmp, &m->cfg, qw, dt)
                            : rs_qmodel_write(o->model, tmp, &m->cfg, qw, o->method_name);
    if (rc == 0) rc = write_manifest(o, tmp, r);
    if (rc == 0 && rename(tmp, o->out) != 0)
        rc = RS_FAIL("%s: cannot rename %s into place", o->out, tmp);
    if (rc != 0) rs_warn("partial output left in %s", tmp);
    free(qw);
    free(tmp);
    return rc;
}

static int run(const options *o) {
    rs_model m;
    if (rs_model_load(o->model, rs_backend_cpu(), &m) != 0) return fail();
    if (m.n_qweights) {
        rs_model_free(&m);
        RS_FAIL("%s: is already quantized", o->model);
        return fail();
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
    if (rc == 0) rc = write_output(o, &m, &res);
    if (rc == 0) size_report(o, &res);
    if (rc == 0) printf("wrote %s%s\n", o->out, o->export_kind ? " (dequantized export)" : "");
    int n = m.cfg.n_layers * RS_N_LINEARS;
    if (masks)
        for (int j = 0; j < n; j++)
            free(masks[j]);
    free(masks);
    if (o->calib) rs_calib_free(&calib);
    if (res.w) rs_quant_result_free(&res);
    if (tok) rs_tokenizer_free(tok);
    rs_model_free(&m);
    return rc == 0 ? 0 : fail();
}

int cmd_quantize(int argc, char **argv) {
    options o;
    int rc = parse_args(&o, argc, argv);
    if (rc != 0) return rc < 0 ? 0 : rc;
    if (o.verbose) rs_set_log_level(RS_LOG_DEBUG);
    return run(&o);
}
