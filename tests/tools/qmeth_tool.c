/* qmeth_tool: drives the calibrated quantizers for the Python tests (tests/py/test_qmeth.py).
 *
 *   qmeth_tool calib FILE COLUMN MAX
 *       prints each loaded text (and target) as one JSON object per line.
 *   qmeth_tool model MODEL_DIR OUT_DIR rtn|awq|gptq BITS GROUP [--calib FILE] [--max-seq N]
 *                    [--act-order] [--no-clip] [--sym] [--protect FILE --tau T [--chat KIND]]
 *       quantizes every targeted linear; OUT_DIR gets deq.f32 (the dequantized weights in global
 *       order, layer-major then q,k,v,o,gate,up,down, each [rows, cols]), and with protection
 *       scores.f32 and mask.u8 (same order), and summary.json (rel_error, bytes).
 *   qmeth_tool gptq W.f32 H.f64 ROWS COLS BITS GROUP ACT_ORDER BLOCK DAMP SYM OUT_DIR
 *       GPTQ of one matrix with a given H = sum x x^T: OUT_DIR/codes.u8, scales.f32, zeros.f32,
 *       deq.f32. */
#include "resafe/quant_methods.h"
#include "resafe/tokenizer.h"

#include "../../src/qmeth_internal.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int write_bin(const char *dir, const char *name, const void *p, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "ab");
    if (!f || fwrite(p, 1, n, f) != n) return RS_FAIL("%s: cannot write", path);
    fclose(f);
    return 0;
}

static int cmd_calib(int argc, char **argv) {
    if (argc < 5) return RS_FAIL("usage: calib FILE COLUMN MAX");
    rs_calib_set c;
    RS_TRY(rs_calib_load(argv[2], argv[3], atoi(argv[4]), &c));
    for (int i = 0; i < c.n; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "text", c.texts[i]);
        if (c.targets) cJSON_AddStringToObject(o, "target", c.targets[i]);
        char *s = cJSON_PrintUnformatted(o);
        printf("%s\n", s);
        free(s);
        cJSON_Delete(o);
    }
    rs_calib_free(&c);
    return 0;
}

typedef struct {
    const char *calib, *protect;
    float tau;
    rs_chat_kind chat;
} model_args;

static int parse_model_args(int argc, char **argv, rs_quant_opts *o, model_args *a) {
    rs_quant_opts_default(o);
    memset(a, 0, sizeof *a);
    const char *meth = argv[4];
    o->method = !strcmp(meth, "awq")    ? RS_QMETHOD_AWQ
                : !strcmp(meth, "gptq") ? RS_QMETHOD_GPTQ
                                        : RS_QMETHOD_RTN;
    o->spec.bits = atoi(argv[5]);
    o->spec.group_size = atoi(argv[6]);
    for (int i = 7; i < argc; i++) {
        if (!strcmp(argv[i], "--calib") && i + 1 < argc)
            a->calib = argv[++i];
        else if (!strcmp(argv[i], "--max-seq") && i + 1 < argc)
            o->max_seq_len = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--act-order"))
            o->gptq_act_order = 1;
        else if (!strcmp(argv[i], "--no-clip"))
            o->awq_clip = 0;
        else if (!strcmp(argv[i], "--sym"))
            o->spec.symmetric = 1;
        else if (!strcmp(argv[i], "--protect") && i + 1 < argc)
            a->protect = argv[++i];
        else if (!strcmp(argv[i], "--chat") && i + 1 < argc)
            RS_TRY(rs_chat_kind_from_name(argv[++i], &a->chat));
        else if (!strcmp(argv[i], "--tau") && i + 1 < argc)
            o->protect_tau = a->tau = (float)atof(argv[++i]);
        else
            return RS_FAIL("unknown argument %s", argv[i]);
    }
    return 0;
}

static int write_model_outputs(const char *out, const rs_quant_result *r) {
    cJSON *o = cJSON_CreateObject(), *rel = cJSON_AddArrayToObject(o, "rel_error");
    cJSON *ncrit = cJSON_AddArrayToObject(o, "n_critical");
    for (int i = 0; i < r->n; i++) {
        size_t n = (size_t)r->w[i].rows * r->w[i].cols;
        float *deq = rs_malloc(n * sizeof *deq);
        int rc = rs_dequantize(&r->w[i], deq);
        if (rc == 0) rc = write_bin(out, "deq.f32", deq, n * sizeof *deq);
        free(deq);
        RS_TRY(rc);
        cJSON_AddItemToArray(rel, cJSON_CreateNumber(r->rel_error[i]));
        cJSON_AddItemToArray(ncrit, cJSON_CreateNumber((double)r->w[i].n_critical));
    }
    cJSON_AddNumberToObject(o, "bytes", (double)r->bytes);
    cJSON_AddNumberToObject(o, "critical_bytes", (double)r->critical_bytes);
    cJSON_AddNumberToObject(o, "dense_bytes", (double)r->dense_bytes);
    char *s = cJSON_Print(o);
    int rc = write_bin(out, "summary.json", s, strlen(s));
    free(s);
    cJSON_Delete(o);
    return rc;
}

static int protect(rs_model *m, const rs_tokenizer *tok, const model_args *a, int max_seq,
                   const char *out, uint8_t **masks) {
    rs_calib_set d;
    RS_TRY(rs_calib_load(a->protect, "prompt+target", 0, &d));
    float *sc;
    size_t n;
    int rc = rs_protect_scores(m, tok, &d, a->chat, max_seq, &sc, &n);
    if (rc == 0) rc = write_bin(out, "scores.f32", sc, n * sizeof *sc);
    if (rc == 0) free(sc);
    if (rc == 0) rc = rs_protect_masks_chat(m, tok, &d, a->chat, a->tau, max_seq, masks);
    rs_calib_free(&d);
    return rc;
}

static int cmd_model(int argc, char **argv) {
    if (argc < 7) return RS_FAIL("usage: model MODEL_DIR OUT_DIR METHOD BITS GROUP [options]");
    rs_quant_opts o;
    model_args a;
    RS_TRY(parse_model_args(argc, argv, &o, &a));
    char tpath[4096];
    snprintf(tpath, sizeof tpath, "%s/tokenizer.json", argv[2]);
    rs_tokenizer *tok = rs_tokenizer_load(tpath);
    if (!tok) return -1;
    rs_model m;
    RS_TRY(rs_model_load(argv[2], rs_backend_by_name("cpu"), &m));
    int n = m.cfg.n_layers * 7, rc = 0;
    uint8_t **masks = NULL;
    if (a.protect) {
        masks = rs_calloc((size_t)n, sizeof *masks);
        rc = protect(&m, tok, &a, o.max_seq_len, argv[3], masks);
    }
    rs_calib_set calib = {0};
    if (rc == 0 && a.calib) rc = rs_calib_load(a.calib, "text", 0, &calib);
    rs_quant_result r;
    if (rc == 0) rc = rs_quantize_model(&m, tok, a.calib ? &calib : NULL, masks, &o, &r);
    for (int i = 0; masks && rc == 0 && i < n; i++)
        rc = write_bin(argv[3], "mask.u8", masks[i], (size_t)r.w[i].rows * r.w[i].cols);
    if (rc == 0) rc = write_model_outputs(argv[3], &r);
    if (rc == 0) rs_quant_result_free(&r);
    for (int i = 0; masks && i < n; i++) free(masks[i]);
    free(masks);
    if (a.calib) rs_calib_free(&calib);
    rs_model_free(&m);
    rs_tokenizer_free(tok);
    return rc;
}

static int cmd_gptq(int argc, char **argv) {
    if (argc < 13)
        return RS_FAIL("usage: gptq W.f32 H.f64 ROWS COLS BITS GROUP ACT BLOCK DAMP SYM OUT");
    int rows = atoi(argv[4]), cols = atoi(argv[5]);
    char *wd, *hd;
    size_t wn, hn;
    RS_TRY(rs_read_file(argv[2], &wd, &wn));
    RS_TRY(rs_read_file(argv[3], &hd, &hn));
    if (wn != (size_t)rows * cols * 4 || hn != (size_t)cols * cols * 8)
        return RS_FAIL("gptq: sizes");
    rs_quant_opts o;
    rs_quant_opts_default(&o);
    o.method = RS_QMETHOD_GPTQ;
    o.spec.bits = atoi(argv[6]), o.spec.group_size = atoi(argv[7]);
    o.gptq_act_order = atoi(argv[8]), o.gptq_block = atoi(argv[9]);
    o.gptq_damp = (float)atof(argv[10]), o.spec.symmetric = atoi(argv[11]);
    rs_calib_stats st = {.in = cols, .n_tokens = 1, .H = (double *)(void *)hd, .mean_abs = NULL};
    rs_qweight q;
    RS_TRY(rs_gptq_linear((const float *)(void *)wd, rows, cols, &st, NULL, &o, &q));
    uint8_t *codes = rs_malloc((size_t)rows * cols);
    float *deq = rs_malloc((size_t)rows * cols * sizeof *deq);
    rs_qweight_unpack(&q, codes);
    int rc = rs_dequantize(&q, deq);
    const char *out = argv[12];
    size_t ng = (size_t)rows * q.n_groups;
    if (rc == 0) rc = write_bin(out, "codes.u8", codes, (size_t)rows * cols);
    if (rc == 0) rc = write_bin(out, "scales.f32", q.scales, ng * 4);
    if (rc == 0 && q.zeros) rc = write_bin(out, "zeros.f32", q.zeros, ng * 4);
    if (rc == 0) rc = write_bin(out, "deq.f32", deq, (size_t)rows * cols * 4);
    free(codes), free(deq), free(wd), free(hd);
    rs_qweight_free(&q);
    return rc;
}

int main(int argc, char **argv) {
    int rc = -1;
    if (argc >= 2 && !strcmp(argv[1], "calib"))
        rc = cmd_calib(argc, argv);
    else if (argc >= 2 && !strcmp(argv[1], "model"))
        rc = cmd_model(argc, argv);
    else if (argc >= 2 && !strcmp(argv[1], "gptq"))
        rc = cmd_gptq(argc, argv);
    else
        RS_FAIL("usage: qmeth_tool calib|model|gptq ...");
    if (rc != 0) rs_die_last();
    return 0;
}
