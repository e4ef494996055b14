/* quant_tool: quantize one matrix with rs_quantize_rtn and report everything, for the Python
 * reference tests (tests/py/test_quant.py).
 *
 *   quant_tool IN.safetensors OUT.safetensors
 *
 * IN: "w" F32 [rows, cols]; optional "protect" U8 [rows, cols], "input_scale" F32 [cols],
 * "x" F32 [n, cols] and "dout" F32 [n, rows] (for qmatmul / qmatmul_t on the cpu backend);
 * __metadata__: format (int, nf4, fp4, int8), bits, group, sym, threshold.
 * OUT: codes U8 [rows, cols] (rs_qweight_unpack), packed U8, scales, zeros, dequant F32,
 * outlier_cols I32, crit_row_ptr I64, crit_cols I32, crit_vals F32, y = x dequant^T,
 * dx = dout dequant. Also checks that packing the unpacked codes gives the packed bytes back and
 * that the result passes rs_qweight_check. */
#include "resafe/backend.h"
#include "resafe/quant.h"
#include "resafe/safetensors.h"

#include <stdlib.h>
#include <string.h>

static const char *meta(const rs_st_set *s, const char *key, const char *dflt) {
    for (int i = 0; i < s->n_meta; i++)
        if (strcmp(s->meta_keys[i], key) == 0) return s->meta_values[i];
    return dflt;
}

static void *copy_tensor(const rs_st_set *s, const char *name, rs_dtype dtype, int64_t *shape) {
    const rs_st_tensor *t = rs_st_find(s, name);
    if (!t) return NULL;
    RS_CHECK(t->dtype == dtype, "tensor %s: dtype %s", name, rs_dtype_name(t->dtype));
    void *d = rs_malloc(t->nbytes ? t->nbytes : 1);
    memcpy(d, t->data, t->nbytes);
    if (shape) memcpy(shape, t->shape, 2 * sizeof *shape);
    return d;
}

int main(int argc, char **argv) {
    RS_CHECK(argc == 3, "usage: quant_tool IN.safetensors OUT.safetensors");
    rs_st_set in;
    if (rs_st_open(argv[1], &in) != 0) rs_die_last();
    int64_t ws[2], xs[2] = {0, 0};
    float *w = copy_tensor(&in, "w", RS_F32, ws);
    RS_CHECK(w != NULL, "IN needs tensor w");
    uint8_t *protect = copy_tensor(&in, "protect", RS_U8, NULL);
    float *input_scale = copy_tensor(&in, "input_scale", RS_F32, NULL);
    float *x = copy_tensor(&in, "x", RS_F32, xs);
    float *dout = copy_tensor(&in, "dout", RS_F32, NULL);
    const char *fmt = meta(&in, "format", "int");
    rs_qspec spec = {0};
    spec.format = !strcmp(fmt, "nf4")    ? RS_QFMT_NF4
                  : !strcmp(fmt, "fp4")  ? RS_QFMT_FP4
                  : !strcmp(fmt, "int8") ? RS_QFMT_INT8_OUTLIER
                                         : RS_QFMT_INT;
    spec.bits = atoi(meta(&in, "bits", "4"));
    spec.group_size = atoi(meta(&in, "group", "128"));
    spec.symmetric = atoi(meta(&in, "sym", "0"));
    spec.outlier_threshold = (float)atof(meta(&in, "threshold", "0"));
    int rows = (int)ws[0], cols = (int)ws[1];
    rs_qweight q;
    if (rs_quantize_rtn(w, rows, cols, &spec, protect, input_scale, &q) != 0) rs_die_last();
    if (rs_qweight_check(&q, "rtn result") != 0) rs_die_last();

    size_t n = (size_t)rows * cols, ng = (size_t)rows * q.n_groups;
    uint8_t *codes = rs_malloc(n), *repacked = rs_malloc(q.packed_bytes);
    rs_qweight_unpack(&q, codes);
    size_t rb = rs_qpack_row_bytes(cols, q.spec.bits);
    for (int r = 0; r < rows; r++)
        rs_qpack_row(repacked + r * rb, codes + (size_t)r * cols, cols, q.spec.bits);
    RS_CHECK(memcmp(repacked, q.packed, q.packed_bytes) == 0, "pack(unpack(packed)) != packed");
    float *deq = rs_malloc(n * sizeof *deq);
    rs_dequantize(&q, deq);

    rs_st_write_tensor t[16];
    int k = 0;
    t[k++] = (rs_st_write_tensor){"codes", RS_U8, 2, {rows, cols}, codes};
    t[k++] = (rs_st_write_tensor){"packed", RS_U8, 2, {rows, (int64_t)rb}, q.packed};
    t[k++] = (rs_st_write_tensor){"scales", RS_F32, 2, {rows, q.n_groups}, q.scales};
    t[k++] = (rs_st_write_tensor){"dequant", RS_F32, 2, {rows, cols}, deq};
    if (q.zeros) t[k++] = (rs_st_write_tensor){"zeros", RS_F32, 2, {rows, q.n_groups}, q.zeros};
    int32_t none = 0;
    t[k++] = (rs_st_write_tensor){
        "outlier_cols", RS_I32, 1, {q.n_outlier_cols}, q.n_outlier_cols ? q.outlier_cols : &none};
    float *cv = NULL;
    if (q.crit_row_ptr) {
        cv = rs_malloc((size_t)(q.n_critical ? q.n_critical : 1) * sizeof *cv);
        for (int64_t i = 0; i < q.n_critical; i++)
            cv[i] = rs_f16_to_f32(q.crit_vals[i]);
        t[k++] = (rs_st_write_tensor){"crit_row_ptr", RS_I64, 1, {rows + 1}, q.crit_row_ptr};
        t[k++] = (rs_st_write_tensor){"crit_cols", RS_I32, 1, {q.n_critical}, q.crit_cols};
        t[k++] = (rs_st_write_tensor){"crit_vals", RS_F32, 1, {q.n_critical}, cv};
    }
    float *y = NULL, *dx = NULL;
    if (x) {
        const rs_backend *be = rs_backend_cpu();
        rs_qweight dq;
        if (be->qweight_upload(&dq, &q) != 0) rs_die_last();
        int nt = (int)xs[0];
        y = rs_malloc((size_t)nt * rows * sizeof *y);
        be->qmatmul(y, x, &dq, NULL, nt, 0.0f);
        t[k++] = (rs_st_write_tensor){"y", RS_F32, 2, {nt, rows}, y};
        if (dout) {
            dx = rs_malloc((size_t)nt * cols * sizeof *dx);
            be->qmatmul_t(dx, dout, &dq, nt, 0.0f);
            t[k++] = (rs_st_write_tensor){"dx", RS_F32, 2, {nt, cols}, dx};
        }
        be->qweight_free(&dq);
    }
    if (rs_st_write(argv[2], t, k, NULL, NULL, 0) != 0) rs_die_last();
    printf("bytes %zu critical %zu\n", rs_qweight_bytes(&q), rs_qweight_critical_bytes(&q));
    (void)ng;
    free(codes), free(repacked), free(deq), free(cv), free(y), free(dx);
    free(w), free(protect), free(input_scale), free(x), free(dout);
    rs_qweight_free(&q);
    rs_st_close(&in);
    return 0;
}
