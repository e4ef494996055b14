/* awq: activation-aware weight quantization of one linear (Lin et al. 2024, "AWQ:
 * Activation-aware Weight Quantization for LLM Compression and Acceleration", section 3.2).
 *
 * Scale search (eq. 4-5): per input channel s = mean|x|^alpha, normalised by sqrt(max s * min s)
 * (and kept >= 1e-4) as the authors' implementation does, for alpha = k / awq_grid, k = 0 ..
 * awq_grid - 1 (alpha = 0 is plain round-to-nearest); the alpha kept minimises the output error
 * ||Q(W diag(s)) diag(s)^-1 X - W X||^2 = sum_r d_r H d_r^T with H = X^T X of the calibration
 * inputs. The scales stay per linear (rs_qweight.input_scale): q, k, v (and gate, up) could
 * share one scale folded into the preceding norm, but our format applies it per weight, so
 * each linear gets its own best (never worse than a shared one on the calibration data).
 * Clip search (section "auto_clip" of the authors' code): each output row's group range is
 * shrunk by ratios 1, 0.95, ..., 0.55 and the ratio with the smallest error of that row-group's
 * output contribution (d_g H_gg d_g^T, the group's own inputs) is kept.
 * Protected entries (mask) are left out of every grid and keep their fp16 original value. */
#include "qmeth_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define AWQ_CLIP_STEPS 10 /* ratios 1 - k/20, k = 0..9 */

typedef struct {
    int rows, cols, gs, ng, bits, sym;
    const float *w;
    const uint8_t *mask;
    const rs_calib_stats *st;
} awq_ctx;

static int group_len(const awq_ctx *c, int g) {
    return c->cols - g * c->gs < c->gs ? c->cols - g * c->gs : c->gs;
}

/* Quantize row r, group g of W diag(s) with the clip ratio; the effective weights (divided back
 * by s; protected entries their fp16 original) into wq, the grid into *grid, codes into codes. */
static void quant_row_group(const awq_ctx *c, const float *s, int r, int g, double clip, float *wq,
                            rs_qgrid *grid, uint8_t *codes) {
    int j0 = g * c->gs, n = group_len(c, g);
    double x[256], *xs = n <= 256 ? x : rs_malloc((size_t)n * sizeof *xs);
    const uint8_t *mk = c->mask ? c->mask + (size_t)r * c->cols + j0 : NULL;
    for (int k = 0; k < n; k++) xs[k] = (double)c->w[(size_t)r * c->cols + j0 + k] * s[j0 + k];
    rs_qgrid gr = rs_qgrid_fit(xs, mk, n, c->bits, c->sym, clip);
    for (int k = 0; k < n; k++) {
        size_t at = (size_t)r * c->cols + j0 + k;
        int code = rs_qgrid_code(&gr, xs[k]);
        if (codes) codes[at] = (uint8_t)code;
        wq[at] = mk && mk[k] ? rs_f16_to_f32(rs_f32_to_f16(c->w[at]))
                             : rs_qgrid_value(&gr, code) / s[j0 + k];
    }
    if (grid) *grid = gr;
    if (xs != x) free(xs);
}

static void quant_all(const awq_ctx *c, const float *s, const double *clip, float *wq,
                      rs_qgrid *grids, uint8_t *codes) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < c->rows; r++)
        for (int g = 0; g < c->ng; g++)
            quant_row_group(c, s, r, g, clip ? clip[(size_t)r * c->ng + g] : 1.0, wq,
                            grids ? &grids[(size_t)r * c->ng + g] : NULL, codes);
}

static void scales_for(const awq_ctx *c, double alpha, float *s) {
    double mx = 0, mn = INFINITY;
    for (int j = 0; j < c->cols; j++) {
        double v = pow(c->st->mean_abs[j], alpha);
        if (v < 1e-4) v = 1e-4;
        s[j] = (float)v;
        mx = fmax(mx, v), mn = fmin(mn, v);
    }
    double norm = sqrt(mx * mn);
    for (int j = 0; j < c->cols; j++) s[j] = (float)fmax(s[j] / norm, 1e-4);
}

/* The best alpha's scales into best_s. */
static void search_scales(const awq_ctx *c, int grid, float *best_s, float *wq) {
    float *s = rs_malloc((size_t)c->cols * sizeof *s);
    double best = INFINITY;
    for (int k = 0; k < (grid > 0 ? grid : 1); k++) {
        scales_for(c, (double)k / (grid > 0 ? grid : 1), s);
        quant_all(c, s, NULL, wq, NULL, NULL);
        double err = rs_output_err2(wq, c->w, c->rows, c->st);
        if (err < best) best = err, memcpy(best_s, s, (size_t)c->cols * sizeof *s);
    }
    free(s);
}

/* d_g H_gg d_g^T for row r, group g (d = wq - w over the group's columns). */
static double group_err(const awq_ctx *c, const float *wq, int r, int g) {
    int j0 = g * c->gs, n = group_len(c, g), in = c->cols;
    double e = 0;
    for (int a = 0; a < n; a++) {
        double da = (double)wq[(size_t)r * in + j0 + a] - c->w[(size_t)r * in + j0 + a], row = 0;
        for (int b = 0; b < n; b++)
            row += c->st->H[(size_t)(j0 + a) * in + j0 + b] *
                   ((double)wq[(size_t)r * in + j0 + b] - c->w[(size_t)r * in + j0 + b]);
        e += da * row;
    }
    return e;
}

static void search_clip(const awq_ctx *c, const float *s, float *wq, double *clip) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < c->rows; r++)
        for (int g = 0; g < c->ng; g++) {
            double best = INFINITY, best_ratio = 1.0;
            for (int k = 0; k < AWQ_CLIP_STEPS; k++) {
                double ratio = 1.0 - k / 20.0;
                quant_row_group(c, s, r, g, ratio, wq, NULL, NULL);
                double e = group_err(c, wq, r, g);
                if (e < best) best = e, best_ratio = ratio;
            }
            clip[(size_t)r * c->ng + g] = best_ratio;
        }
}

int rs_awq_linear(const float *w, int rows, int cols, const rs_calib_stats *st, const uint8_t *mask,
                  const rs_quant_opts *o, rs_qweight *out) {
    const rs_qspec *sp = &o->spec;
    if (sp->format != RS_QFMT_INT) return RS_FAIL("AWQ: only the integer formats are supported");
    if (st->in != cols)
        return RS_FAIL("AWQ: calibration inputs have %d features, weight %d", st->in, cols);
    awq_ctx c = {.rows = rows,
                 .cols = cols,
                 .bits = sp->bits,
                 .sym = sp->symmetric,
                 .w = w,
                 .mask = mask,
                 .st = st};
    c.gs = sp->group_size > 0 && sp->group_size < cols ? sp->group_size : cols;
    c.ng = (cols + c.gs - 1) / c.gs;
    float *s = rs_malloc((size_t)cols * sizeof *s),
          *wq = rs_malloc((size_t)rows * cols * sizeof *wq);
    double *clip = NULL;
    search_scales(&c, o->awq_grid, s, wq);
    if (o->awq_clip) {
        clip = rs_malloc((size_t)rows * c.ng * sizeof *clip);
        search_clip(&c, s, wq, clip);
    }
    rs_qgrid *grids = rs_malloc((size_t)rows * c.ng * sizeof *grids);
    uint8_t *codes = rs_malloc((size_t)rows * cols);
    quant_all(&c, s, clip, wq, grids, codes);
    float *sc = rs_malloc((size_t)rows * c.ng * sizeof *sc),
          *zr = rs_malloc((size_t)rows * c.ng * sizeof *zr);
    for (size_t k = 0; k < (size_t)rows * c.ng; k++) sc[k] = grids[k].scale, zr[k] = grids[k].zero;
    int rc = rs_qweight_assemble(sp, rows, cols, codes, sc, c.sym ? NULL : zr, s, mask, w, out);
    free(s), free(wq), free(clip), free(grids), free(codes), free(sc), free(zr);
    return rc;
}
