/* merge_fold: one quantized linear Q0 plus an adapter's delta [out, in] (double) into a new
 * quantized linear, per merge mode (README "resafe merge" states each rule; the tests re-implement
 * them in numpy). Every rule works on W' = fp32(dequant(Q0) + delta), evaluated in the formats'
 * own fp32 arithmetic (quant.c), so an independent implementation reproduces the codes.
 *   grid   codes re-rounded onto Q0's scales and zeros (int: clamp(rint(t / s) + z), or
 *          clamp(rint(t / s + z)) for fractional zeros (an exact merge's); symmetric:
 *          clamp(rint(t / s), -qs, qs) + 2^(bits-1); nf4/fp4: the nearest code of t / absmax;
 *          int8: the row's absmax scale), t = W' (times input_scale when AWQ); outlier columns
 *          and critical entries take fp16(W')
 *   refit  rs_quantize_rtn of W' with Q0's spec, AWQ input_scale and critical positions
 *   exact  the delta's mean c over each group of each row folded into the zero points:
 *          z' = z - c / s (symmetric formats become asymmetric with z = 2^(bits-1) - c / s),
 *          and the spec says float_zeros;
 *          critical entries take fp16(value + c). INT formats without input_scale only. */
#include "merge_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void copy_qweight(const rs_qweight *src, rs_qweight *dst) {
    rs_backend_cpu()->qweight_upload(dst, src); /* the cpu backend's upload is a deep copy */
}

static uint8_t nearest_code(const float *cb, float x) {
    int best = 0;
    float bd = fabsf(x - cb[0]);
    for (int i = 1; i < 16; i++) {
        float d = fabsf(x - cb[i]);
        if (d < bd) bd = d, best = i;
    }
    return (uint8_t)best;
}

/* The code of target t on group parameters (scale s, zero z) of format spec. */
static uint8_t grid_code(const rs_qspec *spec, float t, float s, float z) {
    switch (spec->format) {
    case RS_QFMT_INT:
        if (spec->symmetric) {
            float qs = (float)((1 << (spec->bits - 1)) - 1);
            float v = fminf(fmaxf(rintf(t / s), -qs), qs);
            return (uint8_t)(v + (float)(1 << (spec->bits - 1)));
        } else {
            float qmax = (float)((1 << spec->bits) - 1);
            float v = spec->float_zeros ? rintf(t / s + z) : rintf(t / s) + z;
            return (uint8_t)fminf(fmaxf(v, 0.0f), qmax);
        }
    case RS_QFMT_NF4:
    case RS_QFMT_FP4: {
        float inv = s > 0.0f ? 1.0f / s : 0.0f;
        return nearest_code(spec->format == RS_QFMT_NF4 ? rs_nf4_codebook : rs_fp4_codebook,
                            t * inv);
    }
    case RS_QFMT_INT8_OUTLIER:
        return (uint8_t)(fminf(fmaxf(rintf(t / s), -127.0f), 127.0f) + 128.0f);
    }
    return 0;
}

/* W' = fp32(dequant(Q0) + delta), all rows. */
static float *target_weight(const rs_qweight *q0, const double *delta) {
    size_t n = (size_t)q0->rows * q0->cols;
    float *w = rs_malloc(n * sizeof *w);
    rs_dequantize(q0, w);
    for (size_t i = 0; i < n; i++) w[i] = (float)((double)w[i] + delta[i]);
    return w;
}

static void set_critical(rs_qweight *q, const float *w) {
    if (!q->crit_row_ptr) return;
    for (int r = 0; r < q->rows; r++)
        for (int64_t k = q->crit_row_ptr[r]; k < q->crit_row_ptr[r + 1]; k++)
            q->crit_vals[k] = rs_f32_to_f16(w[(size_t)r * q->cols + q->crit_cols[k]]);
}

static int fold_grid(const rs_qweight *q0, const double *delta, rs_qweight *out) {
    copy_qweight(q0, out);
    float *w = target_weight(q0, delta);
    int cols = out->cols, gs = out->group_size;
    size_t rb = rs_qpack_row_bytes(cols, out->spec.bits);
    uint8_t *codes = rs_malloc((size_t)cols), *is_out = rs_calloc((size_t)cols, 1);
    for (int j = 0; j < out->n_outlier_cols; j++) is_out[out->outlier_cols[j]] = 1;
    for (int r = 0; r < out->rows; r++) {
        const float *wr = w + (size_t)r * cols;
        rs_qunpack_row(codes, out->packed + (size_t)r * rb, cols, out->spec.bits);
        const float *sc = out->scales + (size_t)r * out->n_groups;
        const float *zr = out->zeros ? out->zeros + (size_t)r * out->n_groups : NULL;
        for (int c = 0; c < cols; c++) {
            if (is_out[c]) continue;
            float t = out->input_scale ? wr[c] * out->input_scale[c] : wr[c];
            codes[c] = grid_code(&out->spec, t, sc[c / gs], zr ? zr[c / gs] : 0.0f);
        }
        rs_qpack_row(out->packed + (size_t)r * rb, codes, cols, out->spec.bits);
        for (int j = 0; j < out->n_outlier_cols; j++)
            out->outlier_vals[(size_t)r * out->n_outlier_cols + j] =
                rs_f32_to_f16(wr[out->outlier_cols[j]]);
    }
    set_critical(out, w);
    free(codes), free(is_out), free(w);
    return 0;
}

static int fold_refit(const rs_qweight *q0, const double *delta, rs_qweight *out) {
    float *w = target_weight(q0, delta);
    uint8_t *protect = NULL;
    if (q0->crit_row_ptr) {
        protect = rs_calloc((size_t)q0->rows * q0->cols, 1);
        for (int r = 0; r < q0->rows; r++)
            for (int64_t k = q0->crit_row_ptr[r]; k < q0->crit_row_ptr[r + 1]; k++)
                protect[(size_t)r * q0->cols + q0->crit_cols[k]] = 1;
    }
    int rc = rs_quantize_rtn(w, q0->rows, q0->cols, &q0->spec, protect, q0->input_scale, out);
    free(protect), free(w);
    return rc;
}

int rs_merge_exact_supported(const rs_qweight *q, const char *label) {
    char name[64];
    if (q->spec.format != RS_QFMT_INT)
        return RS_FAIL("merge exact needs a grouped INT format; %s is %s", label,
                       rs_qspec_name(&q->spec, name, sizeof name));
    if (q->input_scale)
        return RS_FAIL("merge exact needs a grouped INT format without AWQ input scales (%s has "
                       "them: a constant in W is not constant in W diag(s))", label);
    return 0;
}

static int fold_exact(const rs_qweight *q0, const double *delta, rs_qweight *out) {
    copy_qweight(q0, out);
    int cols = out->cols, gs = out->group_size, ng = out->n_groups;
    if (!out->zeros) { /* symmetric: w = (q - 2^(bits-1)) s becomes (q - z) s */
        out->zeros = rs_malloc((size_t)out->rows * ng * sizeof *out->zeros);
        for (size_t i = 0; i < (size_t)out->rows * ng; i++)
            out->zeros[i] = (float)(1 << (out->spec.bits - 1));
        out->spec.symmetric = 0;
    }
    out->spec.float_zeros = 1;
    double *c = rs_malloc((size_t)ng * sizeof *c);
    for (int r = 0; r < out->rows; r++) {
        const double *d = delta + (size_t)r * cols;
        for (int g = 0; g < ng; g++) {
            int c0 = g * gs, c1 = c0 + gs < cols ? c0 + gs : cols;
            double s = 0.0;
            for (int k = c0; k < c1; k++) s += d[k];
            c[g] = s / (c1 - c0);
            size_t i = (size_t)r * ng + g;
            if (out->scales[i] == 0.0f) {
                free(c);
                return RS_FAIL("merge exact: row %d, group %d has scale 0 (nothing to fold into)",
                               r, g);
            }
            out->zeros[i] = (float)((double)out->zeros[i] - c[g] / (double)out->scales[i]);
        }
        if (out->crit_row_ptr)
            for (int64_t k = out->crit_row_ptr[r]; k < out->crit_row_ptr[r + 1]; k++)
                out->crit_vals[k] = rs_f32_to_f16(
                    (float)((double)rs_f16_to_f32(out->crit_vals[k]) + c[out->crit_cols[k] / gs]));
    }
    free(c);
    return 0;
}

int rs_merge_fold(rs_merge_mode mode, const rs_qweight *q0, const double *delta, rs_qweight *out) {
    memset(out, 0, sizeof *out);
    switch (mode) {
    case RS_MERGE_GRID: return fold_grid(q0, delta, out);
    case RS_MERGE_REFIT: return fold_refit(q0, delta, out);
    case RS_MERGE_EXACT: return fold_exact(q0, delta, out);
    default:
        return RS_FAIL("merge: mode %s folds nothing into the weights",
                       rs_merge_mode_name(mode));
    }
}

/* Sums over one linear: ||delta||^2, <realized, delta>, ||realized - delta||^2, codes changed. */
void rs_merge_accumulate(const rs_qweight *q0, const rs_qweight *q1, const double *delta,
                         rs_merge_sums *s) {
    int cols = q0->cols;
    float *w0 = rs_malloc((size_t)cols * sizeof *w0), *w1 = rs_malloc((size_t)cols * sizeof *w1);
    uint8_t *c0 = rs_malloc((size_t)cols), *c1 = rs_malloc((size_t)cols);
    for (int r = 0; r < q0->rows; r++) {
        rs_dequantize_row(q0, r, c0, w0);
        rs_dequantize_row(q1, r, c1, w1);
        const double *d = delta + (size_t)r * cols;
        for (int c = 0; c < cols; c++) {
            double real = (double)w1[c] - (double)w0[c];
            s->dd += d[c] * d[c];
            s->rd += real * d[c];
            s->ee += (real - d[c]) * (real - d[c]);
            s->codes_changed += c0[c] != c1[c];
        }
    }
    free(w0), free(w1), free(c0), free(c1);
}
