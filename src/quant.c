/* quant: RTN quantization into the formats of quant.h, and dequantization.
 *
 * Every formula is evaluated in fp32, one IEEE operation at a time (no FMA contraction: -std=c11
 * turns it off), with rintf (round half to even, the default rounding mode) as the rounding, so
 * an independent numpy implementation of the same formula reproduces the result bit for bit:
 *
 *   INT asymmetric, qmax = 2^bits - 1, over the unprotected entries of a group:
 *       lo = min(0, min w), hi = max(0, max w), scale = (hi - lo) / qmax (1 if that is 0),
 *       zero = clamp(rint(-lo / scale), 0, qmax),  q = clamp(rint(w / scale) + zero, 0, qmax),
 *       w' = (q - zero) * scale
 *   INT symmetric, qs = 2^(bits-1) - 1:
 *       scale = max|w| / qs (1 if 0),  q = clamp(rint(w / scale), -qs, qs), stored q + 2^(bits-1),
 *       w' = (code - 2^(bits-1)) * scale
 *   NF4 / FP4 (bitsandbytes), blocks of 64 entries of a row:
 *       absmax = max|w|, x = w * (1 / absmax) (0 when absmax is 0),
 *       q = the codebook index nearest to x (the lowest index on a tie), w' = codebook[q] * absmax
 *   INT8 with outliers: a column is an outlier if any unprotected |w| > threshold; outlier
 *       columns are stored in fp16; the rest per row: scale = absmax / 127, q = clamp(rint(w /
 *       scale), -127, 127), stored q + 128.
 * With an AWQ input_scale s, W * diag(s) is quantized and w' is divided by s[col] afterwards;
 * protected (critical) entries are finally replaced by their fp16 originals. */
#include "resafe/quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* bitsandbytes' published codebooks (csrc/kernels.cu, dDequantizeNF4 / dDequantizeFP4Tree). */
const float rs_nf4_codebook[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};
/* FP4 e2m1 as bitsandbytes stores it: bit 3 the sign, the low three bits a magnitude. */
const float rs_fp4_codebook[16] = {
    0.0f,  5.208333333e-03f,  0.66666667f,  1.0f,  0.33333333f,  0.5f,  0.16666667f,  0.25f,
    -0.0f, -5.208333333e-03f, -0.66666667f, -1.0f, -0.33333333f, -0.5f, -0.16666667f, -0.25f,
};

#define INT8_DEFAULT_THRESHOLD 6.0f

const char *rs_qspec_name(const rs_qspec *s, char *buf, size_t n) {
    switch (s->format) {
    case RS_QFMT_NF4: snprintf(buf, n, "nf4-b64"); break;
    case RS_QFMT_FP4: snprintf(buf, n, "fp4-b64"); break;
    case RS_QFMT_INT8_OUTLIER: snprintf(buf, n, "int8-outlier%g", rs_qspec_threshold(s)); break;
    default:
        if (s->group_size > 0)
            snprintf(buf, n, "int%d-g%d-%s", s->bits, s->group_size, s->symmetric ? "sym" : "asym");
        else
            snprintf(buf, n, "int%d-row-%s", s->bits, s->symmetric ? "sym" : "asym");
    }
    return buf;
}

float rs_qspec_threshold(const rs_qspec *s) {
    return s->outlier_threshold > 0.0f ? s->outlier_threshold : INT8_DEFAULT_THRESHOLD;
}

int rs_qspec_check(const rs_qspec *s) {
    switch (s->format) {
    case RS_QFMT_INT:
        if (s->bits != 2 && s->bits != 3 && s->bits != 4 && s->bits != 8)
            return RS_FAIL("quantization: %d bits is not supported (2, 3, 4 or 8)", s->bits);
        if (s->group_size != 0 && s->group_size != 32 && s->group_size != 64 &&
            s->group_size != 128)
            return RS_FAIL("quantization: group size %d is not supported (32, 64, 128, or 0 = row)",
                           s->group_size);
        return 0;
    case RS_QFMT_NF4:
    case RS_QFMT_FP4:
        if (s->bits != 4)
            return RS_FAIL("quantization: nf4/fp4 are 4-bit formats, not %d", s->bits);
        if (s->group_size != 64 && s->group_size != 0)
            return RS_FAIL("quantization: nf4/fp4 use absmax blocks of 64, not %d", s->group_size);
        return 0;
    case RS_QFMT_INT8_OUTLIER:
        if (s->bits != 8) return RS_FAIL("quantization: int8 is an 8-bit format, not %d", s->bits);
        if (!isfinite(s->outlier_threshold))
            return RS_FAIL("quantization: outlier threshold must be finite");
        return 0;
    }
    return RS_FAIL("quantization: unknown format %d", (int)s->format);
}

/* Fill the derived geometry of an empty weight. */
int rs_qweight_init(rs_qweight *q, const rs_qspec *spec, int rows, int cols) {
    memset(q, 0, sizeof *q);
    if (rs_qspec_check(spec) != 0) return -1;
    if (rows <= 0 || cols <= 0)
        return RS_FAIL("quantization: bad weight shape [%d, %d]", rows, cols);
    q->spec = *spec;
    q->rows = rows;
    q->cols = cols;
    if (spec->format == RS_QFMT_NF4 || spec->format == RS_QFMT_FP4) {
        q->spec.group_size = 64;
        q->group_size = 64;
    } else if (spec->format == RS_QFMT_INT8_OUTLIER) {
        q->spec.group_size = 0;
        q->spec.symmetric = 1;
        q->group_size = cols;
    } else {
        q->group_size = spec->group_size ? spec->group_size : cols;
    }
    q->n_groups = (cols + q->group_size - 1) / q->group_size;
    q->packed_bytes = (size_t)rows * rs_qpack_row_bytes(cols, q->spec.bits);
    return 0;
}

static int has_zeros(const rs_qspec *s) { return s->format == RS_QFMT_INT && !s->symmetric; }

static void alloc_arrays(rs_qweight *q) {
    size_t ng = (size_t)q->rows * (size_t)q->n_groups;
    q->packed = rs_calloc(q->packed_bytes, 1);
    q->scales = rs_calloc(ng, sizeof *q->scales);
    if (has_zeros(&q->spec)) q->zeros = rs_calloc(ng, sizeof *q->zeros);
}

/* ---- one group's parameters and codes */

static int is_kept(const uint8_t *protect_row, const uint8_t *outlier, int c) {
    return !(protect_row && protect_row[c]) && !(outlier && outlier[c]);
}

static void int_group(const float *w, const uint8_t *prot, int c0, int c1, const rs_qspec *s,
                      uint8_t *codes, float *scale_out, float *zero_out) {
    int bits = s->bits;
    if (s->symmetric) {
        float qs = (float)((1 << (bits - 1)) - 1), off = (float)(1 << (bits - 1)), amax = 0.0f;
        for (int c = c0; c < c1; c++)
            if (is_kept(prot, NULL, c)) amax = fmaxf(amax, fabsf(w[c]));
        float scale = amax / qs;
        if (scale == 0.0f) scale = 1.0f;
        for (int c = c0; c < c1; c++) {
            float v = rintf(w[c] / scale);
            v = fminf(fmaxf(v, -qs), qs);
            codes[c] = (uint8_t)(v + off);
        }
        *scale_out = scale;
        return;
    }
    float qmax = (float)((1 << bits) - 1), lo = 0.0f, hi = 0.0f;
    for (int c = c0; c < c1; c++)
        if (is_kept(prot, NULL, c)) {
            lo = fminf(lo, w[c]);
            hi = fmaxf(hi, w[c]);
        }
    float scale = (hi - lo) / qmax;
    if (scale == 0.0f) scale = 1.0f;
    float zero = fminf(fmaxf(rintf(-lo / scale), 0.0f), qmax);
    for (int c = c0; c < c1; c++) {
        float v = rintf(w[c] / scale) + zero;
        codes[c] = (uint8_t)fminf(fmaxf(v, 0.0f), qmax);
    }
    *scale_out = scale;
    *zero_out = zero;
}

static uint8_t nearest_code(const float *cb, float x) {
    int best = 0;
    float bd = fabsf(x - cb[0]);
    for (int i = 1; i < 16; i++) {
        float d = fabsf(x - cb[i]);
        if (d < bd) {
            bd = d;
            best = i;
        }
    }
    return (uint8_t)best;
}

static void codebook_block(const float *w, const uint8_t *prot, int c0, int c1, const float *cb,
                           uint8_t *codes, float *absmax_out) {
    float amax = 0.0f;
    for (int c = c0; c < c1; c++)
        if (is_kept(prot, NULL, c)) amax = fmaxf(amax, fabsf(w[c]));
    float inv = amax > 0.0f ? 1.0f / amax : 0.0f;
    for (int c = c0; c < c1; c++)
        codes[c] = nearest_code(cb, w[c] * inv);
    *absmax_out = amax;
}

static void int8_row(const float *w, const uint8_t *prot, const uint8_t *outlier, int cols,
                     uint8_t *codes, float *scale_out) {
    float amax = 0.0f;
    for (int c = 0; c < cols; c++)
        if (is_kept(prot, outlier, c)) amax = fmaxf(amax, fabsf(w[c]));
    float scale = amax / 127.0f;
    if (scale == 0.0f) scale = 1.0f;
    for (int c = 0; c < cols; c++) {
        float v = outlier[c] ? 0.0f : fminf(fmaxf(rintf(w[c] / scale), -127.0f), 127.0f);
        codes[c] = (uint8_t)(v + 128.0f);
    }
    *scale_out = scale;
}

/* ---- RTN */

static int check_finite(const float *w, int rows, int cols, const float *input_scale) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            if (!isfinite(w[(size_t)r * cols + c]))
                return RS_FAIL("quantization: weight is %s at row %d, column %d",
                               isnan(w[(size_t)r * cols + c]) ? "NaN" : "infinite", r, c);
    if (input_scale)
        for (int c = 0; c < cols; c++)
            if (!isfinite(input_scale[c]) || !(input_scale[c] > 0.0f))
                return RS_FAIL("quantization: input_scale[%d] = %g is not a positive finite number",
                               c, input_scale[c]);
    return 0;
}

/* A group whose range overflows fp32 cannot be represented (scale = inf). */
static int check_group_range(int r, int g, float scale) {
    if (isfinite(scale)) return 0;
    return RS_FAIL("quantization: the values of row %d, group %d span more than fp32 can scale", r,
                   g);
}

static void find_outlier_cols(rs_qweight *q, const float *w, const uint8_t *protect,
                              uint8_t *is_out) {
    float thr = rs_qspec_threshold(&q->spec);
    for (int r = 0; r < q->rows; r++)
        for (int c = 0; c < q->cols; c++) {
            size_t i = (size_t)r * q->cols + c;
            if (!(protect && protect[i]) && fabsf(w[i]) > thr) is_out[c] = 1;
        }
    for (int c = 0; c < q->cols; c++)
        q->n_outlier_cols += is_out[c];
    if (!q->n_outlier_cols) return;
    q->outlier_cols = rs_malloc((size_t)q->n_outlier_cols * sizeof *q->outlier_cols);
    q->outlier_vals = rs_malloc((size_t)q->rows * q->n_outlier_cols * sizeof *q->outlier_vals);
    int j = 0;
    for (int c = 0; c < q->cols; c++)
        if (is_out[c]) q->outlier_cols[j++] = c;
    for (int r = 0; r < q->rows; r++)
        for (j = 0; j < q->n_outlier_cols; j++)
            q->outlier_vals[(size_t)r * q->n_outlier_cols + j] =
                rs_f32_to_f16(w[(size_t)r * q->cols + q->outlier_cols[j]]);
}

static void build_critical(rs_qweight *q, const float *w_orig, const uint8_t *protect) {
    size_t n = (size_t)q->rows * q->cols;
    int64_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += protect[i] != 0;
    q->n_critical = count;
    q->crit_row_ptr = rs_malloc((size_t)(q->rows + 1) * sizeof *q->crit_row_ptr);
    q->crit_cols = rs_malloc((size_t)(count ? count : 1) * sizeof *q->crit_cols);
    q->crit_vals = rs_malloc((size_t)(count ? count : 1) * sizeof *q->crit_vals);
    int64_t k = 0;
    for (int r = 0; r < q->rows; r++) {
        q->crit_row_ptr[r] = k;
        for (int c = 0; c < q->cols; c++) {
            size_t i = (size_t)r * q->cols + c;
            if (!protect[i]) continue;
            q->crit_cols[k] = c;
            q->crit_vals[k++] = rs_f32_to_f16(w_orig[i]);
        }
    }
    q->crit_row_ptr[q->rows] = k;
}

/* One row: its groups' codes, scales and zeros, packed. Returns the first group whose range
 * cannot be scaled (see check_group_range), or -1. */
static int quantize_row(rs_qweight *q, int r, const float *w, const uint8_t *protect,
                        const uint8_t *is_out, uint8_t *codes) {
    int cols = q->cols, gs = q->group_size;
    const float *wr = w + (size_t)r * cols;
    const uint8_t *pr = protect ? protect + (size_t)r * cols : NULL;
    float *sc = q->scales + (size_t)r * q->n_groups;
    float *zr = q->zeros ? q->zeros + (size_t)r * q->n_groups : NULL;
    for (int g = 0; g < q->n_groups; g++) {
        int c0 = g * gs, c1 = c0 + gs < cols ? c0 + gs : cols;
        float zero = 0.0f;
        switch (q->spec.format) {
        case RS_QFMT_INT: int_group(wr, pr, c0, c1, &q->spec, codes, &sc[g], &zero); break;
        case RS_QFMT_NF4: codebook_block(wr, pr, c0, c1, rs_nf4_codebook, codes, &sc[g]); break;
        case RS_QFMT_FP4: codebook_block(wr, pr, c0, c1, rs_fp4_codebook, codes, &sc[g]); break;
        case RS_QFMT_INT8_OUTLIER: int8_row(wr, pr, is_out, cols, codes, &sc[g]); break;
        }
        if (zr) zr[g] = zero;
        if (!isfinite(sc[g])) return g;
    }
    rs_qpack_row(q->packed + (size_t)r * rs_qpack_row_bytes(cols, q->spec.bits), codes, cols,
                 q->spec.bits);
    return -1;
}

/* Rows are independent, so they run in parallel; the error names the first bad row whatever the
 * thread count, as the serial loop did. */
static int quantize_rows(rs_qweight *q, const float *w, const uint8_t *protect,
                         const uint8_t *is_out) {
    int bad_row = q->rows, bad_group = 0;
#pragma omp parallel
    {
        uint8_t *codes = rs_malloc((size_t)q->cols);
#pragma omp for schedule(static)
        for (int r = 0; r < q->rows; r++) {
            int g = quantize_row(q, r, w, protect, is_out, codes);
            if (g >= 0) {
#pragma omp critical(rs_quant_bad_row)
                if (r < bad_row) bad_row = r, bad_group = g;
            }
        }
        free(codes);
    }
    return bad_row < q->rows ? check_group_range(bad_row, bad_group, INFINITY) : 0;
}

int rs_quantize_rtn(const float *w, int rows, int cols, const rs_qspec *spec,
                    const uint8_t *protect, const float *input_scale, rs_qweight *out) {
    if (rs_qweight_init(out, spec, rows, cols) != 0) return -1;
    if (check_finite(w, rows, cols, input_scale) != 0) return -1;
    const float *src = w;
    float *scaled = NULL;
    if (input_scale) {
        scaled = rs_malloc((size_t)rows * cols * sizeof *scaled);
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                scaled[(size_t)r * cols + c] = w[(size_t)r * cols + c] * input_scale[c];
        if (check_finite(scaled, rows, cols, NULL) != 0) {
            free(scaled);
            return rs_fail_context("weight times input_scale");
        }
        src = scaled;
        out->input_scale = rs_malloc((size_t)cols * sizeof *out->input_scale);
        memcpy(out->input_scale, input_scale, (size_t)cols * sizeof *input_scale);
    }
    alloc_arrays(out);
    uint8_t *is_out = NULL;
    if (spec->format == RS_QFMT_INT8_OUTLIER) {
        is_out = rs_calloc((size_t)cols, 1);
        find_outlier_cols(out, src, protect, is_out);
    }
    int rc = quantize_rows(out, src, protect, is_out);
    if (rc == 0 && protect) build_critical(out, w, protect);
    free(is_out);
    free(scaled);
    if (rc != 0) rs_qweight_free(out);
    return rc;
}

int rs_qweight_from_codes(const rs_qspec *spec, int rows, int cols, const uint8_t *codes,
                          const float *scales, const float *zeros, rs_qweight *out) {
    if (rs_qweight_init(out, spec, rows, cols) != 0) return -1;
    if (has_zeros(&out->spec) && !zeros)
        return RS_FAIL("quantization: asymmetric codes need zero points");
    uint8_t maxcode = (uint8_t)((1u << out->spec.bits) - 1u);
    for (size_t i = 0; i < (size_t)rows * cols; i++)
        if (codes[i] > maxcode)
            return RS_FAIL("quantization: code %u at row %zu, column %zu exceeds %u for %d bits",
                           codes[i], i / (size_t)cols, i % (size_t)cols, maxcode, out->spec.bits);
    alloc_arrays(out);
    size_t ng = (size_t)rows * out->n_groups;
    memcpy(out->scales, scales, ng * sizeof *scales);
    if (out->zeros) memcpy(out->zeros, zeros, ng * sizeof *zeros);
    size_t rb = rs_qpack_row_bytes(cols, out->spec.bits);
    for (int r = 0; r < rows; r++)
        rs_qpack_row(out->packed + (size_t)r * rb, codes + (size_t)r * cols, cols, out->spec.bits);
    return 0;
}

/* ---- dequantization */

/* Row r of the effective weight into out[cols]; codes is a scratch of cols bytes. */
void rs_dequantize_row(const rs_qweight *q, int r, uint8_t *codes, float *out) {
    int cols = q->cols, gs = q->group_size, bits = q->spec.bits;
    rs_qunpack_row(codes, q->packed + (size_t)r * rs_qpack_row_bytes(cols, bits), cols, bits);
    const float *sc = q->scales + (size_t)r * q->n_groups;
    const float *zr = q->zeros ? q->zeros + (size_t)r * q->n_groups : NULL;
    const float *cb = q->spec.format == RS_QFMT_NF4 ? rs_nf4_codebook : rs_fp4_codebook;
    float off = (float)(1 << (bits - 1));
    for (int c = 0; c < cols; c++) {
        int g = c / gs;
        switch (q->spec.format) {
        case RS_QFMT_INT:
            out[c] = zr ? ((float)codes[c] - zr[g]) * sc[g] : ((float)codes[c] - off) * sc[g];
            break;
        case RS_QFMT_NF4:
        case RS_QFMT_FP4: out[c] = cb[codes[c] & 15] * sc[g]; break;
        case RS_QFMT_INT8_OUTLIER: out[c] = ((float)codes[c] - 128.0f) * sc[0]; break;
        }
    }
    for (int j = 0; j < q->n_outlier_cols; j++)
        out[q->outlier_cols[j]] = rs_f16_to_f32(q->outlier_vals[(size_t)r * q->n_outlier_cols + j]);
    if (q->input_scale)
        for (int c = 0; c < cols; c++)
            out[c] = out[c] / q->input_scale[c];
    if (q->crit_row_ptr)
        for (int64_t k = q->crit_row_ptr[r]; k < q->crit_row_ptr[r + 1]; k++)
            out[q->crit_cols[k]] = rs_f16_to_f32(q->crit_vals[k]);
}

int rs_dequantize(const rs_qweight *q, float *w) {
    uint8_t *codes = rs_malloc((size_t)q->cols);
    for (int r = 0; r < q->rows; r++)
        rs_dequantize_row(q, r, codes, w + (size_t)r * q->cols);
    free(codes);
    return 0;
}

void rs_qweight_unpack(const rs_qweight *q, uint8_t *codes) {
    size_t rb = rs_qpack_row_bytes(q->cols, q->spec.bits);
    for (int r = 0; r < q->rows; r++)
        rs_qunpack_row(codes + (size_t)r * q->cols, q->packed + (size_t)r * rb, q->cols,
                       q->spec.bits);
}

void rs_qweight_free(rs_qweight *q) {
    if (!q) return;
    free(q->packed);
    free(q->scales);
    free(q->zeros);
    free(q->input_scale);
    free(q->outlier_cols);
    free(q->outlier_vals);
    free(q->crit_row_ptr);
    free(q->crit_cols);
    free(q->crit_vals);
    memset(q, 0, sizeof *q);
}

size_t rs_qweight_critical_bytes(const rs_qweight *q) {
    if (!q->crit_row_ptr) return 0;
    return (size_t)(q->rows + 1) * sizeof(int64_t) +
           (size_t)q->n_critical * (sizeof(int32_t) + sizeof(uint16_t));
}

size_t rs_qweight_bytes(const rs_qweight *q) {
    size_t ng = (size_t)q->rows * q->n_groups, b = q->packed_bytes + ng * sizeof(float);
    if (q->zeros) b += ng * sizeof(float);
    if (q->input_scale) b += (size_t)q->cols * sizeof(float);
    b += (size_t)q->n_outlier_cols * (sizeof(int32_t) + (size_t)q->rows * sizeof(uint16_t));
    return b + rs_qweight_critical_bytes(q);
}
