/* gptq: GPTQ quantization of one linear (Frantar et al. 2023, "GPTQ: Accurate Post-Training
 * Quantization for Generative Pre-trained Transformers", Algorithm 1).
 *
 * With H = 2 X^T X (the factor 2 and any scale cancel below, so the raw sum is used) plus
 * damp * mean(diag H) * I, columns are quantized one at a time in order; the error of column i,
 * e = (w_i - q_i) / U_ii with U the upper Cholesky factor of H^-1 (H^-1 = U^T U), is spread
 * onto the columns not yet quantized, w_k -= e U_ik (eq. 3 with the Cholesky reformulation of
 * section 4, step 3). Lazy batches: inside a block of gptq_block columns the update touches
 * only the block; the rest of the matrix gets the block's accumulated update at once
 * (W[:, i2:] -= E U[i1:i2, i2:]). Dead inputs (H_ii = 0) get H_ii = 1 and weight 0.
 *
 * act-order (the "desc_act" heuristic of the GPTQ repository): columns go in order of
 * decreasing diag(H) (ties: lower index first), and codes are written back at the original
 * column positions. Groups stay contiguous along the input dimension (the format requires it),
 * so with act-order the grids are "static": every group's scale/zero is fitted up front from
 * the original weights. Without act-order a group's grid is fitted when its first column is
 * reached, from the weights updated so far, as in the paper.
 * Protected entries (mask) are left out of the grids, their value is the fp16 original, and
 * their (usually small) error w - fp16(w_orig) is propagated like any other.
 * All Hessian / Cholesky / update arithmetic is double. */
#include "qmeth_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A = L L^T in place (lower triangle; the upper is zeroed). -1 when not positive definite. */
static int cholesky_lower(double *A, int n) {
    for (int j = 0; j < n; j++) {
        double d = A[(size_t)j * n + j];
        for (int k = 0; k < j; k++) d -= A[(size_t)j * n + k] * A[(size_t)j * n + k];
        if (!(d > 0)) return -1;
        d = sqrt(d);
        A[(size_t)j * n + j] = d;
#pragma omp parallel for schedule(static)
        for (int i = j + 1; i < n; i++) {
            double s = A[(size_t)i * n + j];
            for (int k = 0; k < j; k++) s -= A[(size_t)i * n + k] * A[(size_t)j * n + k];
            A[(size_t)i * n + j] = s / d;
        }
        for (int i = 0; i < j; i++) A[(size_t)i * n + j] = 0;
    }
    return 0;
}

/* U upper with H^-1 = U^T U, from H (n x n, SPD): L = chol(H), Linv = L^-1, H^-1 = Linv^T Linv,
 * then U = chol(H^-1)^T. */
static int hinv_upper(const double *H, int n, double *U) {
    double *L = rs_malloc((size_t)n * n * sizeof *L), *Li = rs_calloc((size_t)n * n, sizeof *Li);
    memcpy(L, H, (size_t)n * n * sizeof *L);
    int rc = cholesky_lower(L, n);
#pragma omp parallel for schedule(dynamic, 8) if (rc == 0)
    for (int c = 0; c < n; c++) /* forward substitution, column c of L^-1 */
        for (int i = c; i < n; i++) {
            double s = i == c ? 1.0 : 0.0;
            for (int k = c; k < i; k++) s -= L[(size_t)i * n + k] * Li[(size_t)k * n + c];
            Li[(size_t)i * n + c] = s / L[(size_t)i * n + i];
        }
#pragma omp parallel for schedule(dynamic, 8) if (rc == 0)
    for (int i = 0; i < n; i++) /* H^-1 = Li^T Li (into L) */
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int k = i > j ? i : j; k < n; k++)
                s += Li[(size_t)k * n + i] * Li[(size_t)k * n + j];
            L[(size_t)i * n + j] = s;
        }
    if (rc == 0) rc = cholesky_lower(L, n);
    for (int i = 0; rc == 0 && i < n; i++)
        for (int j = 0; j < n; j++) U[(size_t)i * n + j] = j >= i ? L[(size_t)j * n + i] : 0;
    free(L), free(Li);
    return rc == 0 ? 0 : RS_FAIL("GPTQ: the damped Hessian is not positive definite");
}

/* Column order: identity, or decreasing diag(H), ties by lower index (stable). */
static int by_diag_desc(const void *a, const void *b, void *arg) {
    const double *diag = arg;
    int i = *(const int *)a, j = *(const int *)b;
    if (diag[i] != diag[j]) return diag[i] > diag[j] ? -1 : 1;
    return i - j;
}

typedef struct {
    int rows, cols, gs, ng, bits, sym, act_order;
    int *perm; /* [cols] quantization order -> original column */
    double *W; /* [rows, cols] in quantization order, updated as it goes */
    double *U; /* [cols, cols] upper Cholesky of H^-1 (permuted) */
    const uint8_t *mask;
    const float *w_orig;
    rs_qgrid *grid; /* [rows, ng] */
    uint8_t *codes; /* [rows, cols] original order */
} gptq_state;

/* Fit group g's grid of every row from the columns at quantization positions pos[0..n). */
static void fit_group(gptq_state *s, int g, const double *src, int ld, const int *pos, int n) {
    double *x = rs_malloc((size_t)n * sizeof *x);
    uint8_t *mk = rs_malloc((size_t)n);
    for (int r = 0; r < s->rows; r++) {
        for (int k = 0; k < n; k++) {
            x[k] = src[(size_t)r * ld + pos[k]];
            mk[k] = s->mask ? s->mask[(size_t)r * s->cols + g * s->gs + k] : 0;
        }
        s->grid[(size_t)r * s->ng + g] = rs_qgrid_fit(x, mk, n, s->bits, s->sym, 1.0);
    }
    free(x), free(mk);
}

/* No act-order: group g starts at column i (inside the lazy batch [i1, i2)); its grid is
 * fitted from the weights with every update so far, so the batch's pending update of the
 * columns past i2 (-E[:, i1..i) U[i1..i), c]) is applied on the fly. */
static void fit_group_at_start(gptq_state *s, int g, int i1, int i, int i2, const double *E,
                               int ldE) {
    int n = s->cols - g * s->gs < s->gs ? s->cols - g * s->gs : s->gs, cols = s->cols;
    double *cur = rs_malloc((size_t)s->rows * n * sizeof *cur);
    int *pos = rs_malloc((size_t)n * sizeof *pos);
    for (int k = 0; k < n; k++) pos[k] = k;
    for (int r = 0; r < s->rows; r++)
        for (int k = 0; k < n; k++) {
            int c = i + k;
            double v = s->W[(size_t)r * cols + c];
            for (int p = i1; c >= i2 && p < i; p++)
                v -= E[(size_t)r * ldE + (p - i1)] * s->U[(size_t)p * cols + c];
            cur[(size_t)r * n + k] = v;
        }
    fit_group(s, g, cur, n, pos, n);
    free(cur), free(pos);
}

/* Quantize column i (quantization order) of every row; returns the errors e[r]. */
static void quantize_column(gptq_state *s, int i1, int i, int i2, double *E, int ldE) {
    int j = s->perm[i], g = j / s->gs, n = s->cols;
    double *err = E + (i - i1);
    if (!s->act_order && j % s->gs == 0) fit_group_at_start(s, g, i1, i, i2, E, ldE);
    double d = s->U[(size_t)i * n + i];
#pragma omp parallel for schedule(static)
    for (int r = 0; r < s->rows; r++) {
        const rs_qgrid *gr = &s->grid[(size_t)r * s->ng + g];
        double w = s->W[(size_t)r * n + i], q;
        if (s->mask && s->mask[(size_t)r * n + j]) {
            q = rs_f16_to_f32(rs_f32_to_f16(s->w_orig[(size_t)r * n + j]));
            s->codes[(size_t)r * n + j] = (uint8_t)rs_qgrid_code(gr, q);
        } else {
            int c = rs_qgrid_code(gr, w);
            s->codes[(size_t)r * n + j] = (uint8_t)c;
            q = rs_qgrid_value(gr, c);
        }
        double e = (w - q) / d;
        err[(size_t)r * ldE] = e;
        for (int k = i + 1; k < i2; k++) s->W[(size_t)r * n + k] -= e * s->U[(size_t)i * n + k];
    }
}

static void run_blocks(gptq_state *s, int block) {
    int n = s->cols;
    double *E = rs_malloc((size_t)s->rows * block * sizeof *E);
    for (int i1 = 0; i1 < n; i1 += block) {
        int i2 = i1 + block < n ? i1 + block : n;
        for (int i = i1; i < i2; i++) quantize_column(s, i1, i, i2, E, block);
#pragma omp parallel for schedule(static)
        for (int r = 0; r < s->rows; r++) /* lazy batch: W[:, i2:] -= E U[i1:i2, i2:] */
            for (int i = i1; i < i2; i++) {
                double e = E[(size_t)r * block + (i - i1)];
                for (int k = i2; k < n; k++) s->W[(size_t)r * n + k] -= e * s->U[(size_t)i * n + k];
            }
    }
    free(E);
}

/* Damped, permuted Hessian and permuted weights; dead inputs zeroed. */
static void prepare(gptq_state *s, const float *w, const rs_calib_stats *st, double damp_frac,
                    double *Hp) {
    int n = s->cols;
    double *H = rs_malloc((size_t)n * n * sizeof *H), mean = 0;
    memcpy(H, st->H, (size_t)n * n * sizeof *H);
    for (int i = 0; i < n; i++) {
        if (H[(size_t)i * n + i] == 0) H[(size_t)i * n + i] = 1; /* dead input */
        mean += H[(size_t)i * n + i] / n;
    }
    for (int i = 0; i < n; i++) H[(size_t)i * n + i] += damp_frac * mean;
    double *diag = rs_malloc((size_t)n * sizeof *diag);
    for (int i = 0; i < n; i++) {
        diag[i] = H[(size_t)i * n + i];
        s->perm[i] = i;
    }
    if (s->act_order) qsort_r(s->perm, (size_t)n, sizeof *s->perm, by_diag_desc, diag);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < n; k++) Hp[(size_t)i * n + k] = H[(size_t)s->perm[i] * n + s->perm[k]];
    for (int r = 0; r < s->rows; r++)
        for (int i = 0; i < n; i++) {
            int j = s->perm[i];
            s->W[(size_t)r * n + i] = st->H[(size_t)j * n + j] == 0 ? 0.0 : w[(size_t)r * n + j];
        }
    free(H), free(diag);
}

/* act-order: every group's grid from the original weights (static groups; dead inputs 0). */
static void fit_static_groups(gptq_state *s, const float *w, const rs_calib_stats *st) {
    int n = s->cols;
    double *wd = rs_malloc((size_t)s->rows * n * sizeof *wd);
    int *pos = rs_malloc((size_t)s->gs * sizeof *pos);
    for (size_t k = 0; k < (size_t)s->rows * n; k++)
        wd[k] = st->H[(k % n) * n + k % n] == 0 ? 0.0 : w[k];
    for (int g = 0; g < s->ng; g++) {
        int len = n - g * s->gs < s->gs ? n - g * s->gs : s->gs;
        for (int k = 0; k < len; k++) pos[k] = g * s->gs + k;
        fit_group(s, g, wd, n, pos, len);
    }
    free(wd), free(pos);
}

int rs_gptq_linear(const float *w, int rows, int cols, const rs_calib_stats *st,
                   const uint8_t *mask, const rs_quant_opts *o, rs_qweight *out) {
    const rs_qspec *sp = &o->spec;
    if (sp->format != RS_QFMT_INT) return RS_FAIL("GPTQ: only the integer formats are supported");
    if (st->in != cols)
        return RS_FAIL("GPTQ: calibration inputs have %d features, weight %d", st->in, cols);
    gptq_state s = {.rows = rows,
                    .cols = cols,
                    .bits = sp->bits,
                    .sym = sp->symmetric,
                    .act_order = o->gptq_act_order,
                    .mask = mask,
                    .w_orig = w};
    s.gs = sp->group_size > 0 && sp->group_size < cols ? sp->group_size : cols;
    s.ng = (cols + s.gs - 1) / s.gs;
    s.perm = rs_malloc((size_t)cols * sizeof *s.perm);
    s.W = rs_malloc((size_t)rows * cols * sizeof *s.W);
    s.U = rs_malloc((size_t)cols * cols * sizeof *s.U);
    s.grid = rs_calloc((size_t)rows * s.ng, sizeof *s.grid);
    s.codes = rs_calloc((size_t)rows * cols, 1);
    double *Hp = rs_malloc((size_t)cols * cols * sizeof *Hp);
    prepare(&s, w, st, o->gptq_damp, Hp);
    int rc = hinv_upper(Hp, cols, s.U);
    free(Hp);
    if (rc == 0) {
        if (s.act_order) fit_static_groups(&s, w, st);
        run_blocks(&s, o->gptq_block > 0 ? o->gptq_block : 128);
        float *sc = rs_malloc((size_t)rows * s.ng * sizeof *sc),
              *zr = rs_malloc((size_t)rows * s.ng * sizeof *zr);
        for (size_t k = 0; k < (size_t)rows * s.ng; k++)
            sc[k] = s.grid[k].scale, zr[k] = s.grid[k].zero;
        rc =
            rs_qweight_assemble(sp, rows, cols, s.codes, sc, s.sym ? NULL : zr, NULL, mask, w, out);
        free(sc), free(zr);
    }
    free(s.perm), free(s.W), free(s.U), free(s.grid), free(s.codes);
    return rc;
}
