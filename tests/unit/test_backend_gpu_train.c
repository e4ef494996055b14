/* CUDA training ops (backward, log-probabilities, LoRA, optimizer, scores, fake quantization,
 * dropout) against the CPU reference on random inputs, as test_backend_gpu.c does for the forward
 * ops: inputs rounded to bf16 first so both backends see the same values, outputs poisoned with
 * NaN (an element the kernel forgets fails), skip without a device, fail under RESAFE_TEST_GPU=1
 * when there is none.
 *
 * Tolerances: u = 2^-24 (fp32), bf16 outputs rounded once (relative 2^-8; rtol 2^-7 = twice that,
 * BF16_RTOL). A sum of L terms differs between any two fp32 summation orders (or fp32 against
 * double) by at most L u sum|terms| per side, so "4 (L + 4) u mag" bounds it with mag = sum|terms|.
 * LoRA's GEMMs round A, B and the rank-r intermediates to bf16 (kernels/lora.cu): 2^-9 per operand,
 * bounded by 2^-7 or 2^-6 of the magnitude sums. Each test states its own. */
#include "resafe/backend.h"
#include "resafe/core.h"
#include "test.h"
#include "gpu_test_buffers.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BF16_RTOL (1.0 / 128.0)  /* 2^-7 = twice bf16's unit roundoff */
#define F32_U (1.0 / 16777216.0) /* 2^-24 */
#define SUM_TOL(len, mag) (4.0 * ((double)(len) + 4.0) * F32_U * (mag))

/* ---------------------------------------------------------------- harness (as test_backend_gpu.c) */

static int gpu_run_required(void) {
    const char *s = getenv("RESAFE_TEST_GPU");
    return s && strcmp(s, "1") == 0;
}

static int backends_ready(const rs_backend *cpu, const rs_backend *gpu) {
    const char *missing = !gpu ? "no CUDA device" : !cpu ? "no CPU reference backend" : NULL;
    if (!missing) return 1;
    if (gpu_run_required())
        CHECK(0, "RESAFE_TEST_GPU=1 but %s (built without CUDA, or no GPU visible)", missing);
    else
        printf("skip: %s\n", missing);
    return 0;
}

#define GPU_TEST_SETUP(salt)                                                                       \
    const rs_backend *cpu = rs_backend_cpu(), *gpu = rs_backend_cuda();                            \
    if (!backends_ready(cpu, gpu)) return;                                                         \
    const rs_backend *bes[2] = {cpu, gpu};                                                         \
    (void)bes;                                                                                     \
    rs_rng rng;                                                                                    \
    rs_rng_seed(&rng, rs_test_seed() * 0x9e3779b97f4a7c15ull + (salt));                            \
    rs_rng *r = &rng

static uint8_t *random_mask(rs_rng *r, size_t n) {
    uint8_t *m = rs_malloc(n ? n : 1);
    for (size_t i = 0; i < n; i++) m[i] = rs_rng_uniform(r) < 0.5f;
    return m;
}

static int32_t *random_ids(rs_rng *r, size_t n, int hi) {
    int32_t *ids = rs_malloc((n ? n : 1) * sizeof(int32_t));
    for (size_t i = 0; i < n; i++) ids[i] = (int32_t)(rs_rng_next(r) % (uint64_t)hi);
    return ids;
}

/* act (bf16 on cuda), weight and fp32 buffers of a backend */
#define ACT(be) ((be)->act_dtype)
#define WT(be) ((be)->weight_dtype)

static size_t compare(const char *what, const float *got, const float *want, size_t n,
                      double rtol, double atol, const double *atol_i) {
    size_t bad = 0;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double tol = rtol * fabs(want[i]) + atol + (atol_i ? atol_i[i] : 0.0);
        double err = fabs((double)got[i] - (double)want[i]);
        if (err <= tol) continue;
        if (bad < 5)
            fprintf(stderr, "%s: [%zu] cuda %.9g, cpu %.9g, error %.3g > tolerance %.3g\n", what, i,
                    got[i], want[i], err, tol);
        if (!(err <= worst)) worst = err;
        bad++;
    }
    CHECK(bad == 0, "%s: %zu of %zu values out of tolerance (worst error %.3g)", what, bad, n,
          worst);
    return bad;
}

static double *zeros_d(size_t n) { return rs_calloc(n ? n : 1, sizeof(double)); }

static double max_abs(const float *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs(x[i]) > m ? fabs(x[i]) : m;
    return m;
}

/* ---------------------------------------------------------------- embedding */

/* Same fp32 products on both sides; only the order of a repeated id's adds differs (the GPU sums
 * an id's rows first, then adds them to the table): SUM_TOL over the row's terms. */
TEST(test_cuda_embedding_bwd_matches_cpu) {
    GPU_TEST_SETUP(101);
    const int n = 300, dim = 129, vocab = 40;
    const float scale = 1.5f;
    float *dout = random_bf16(r, (size_t)n * dim, 0.0f, 1.0f);
    float *table0 = random_bf16(r, (size_t)vocab * dim, 0.0f, 1.0f);
    int32_t *ids = random_ids(r, n, vocab);
    float *res[2];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *dd = upload(be, ACT(be), dout, (size_t)n * dim);
        float *dt = upload(be, RS_F32, table0, (size_t)vocab * dim);
        void *id = upload_bytes(be, ids, n * sizeof(int32_t));
        be->embedding_bwd(dt, dd, id, n, dim, scale);
        res[s] = download(be, dt, RS_F32, (size_t)vocab * dim);
        be->free(dd), be->free(dt), be->free(id);
    }
    double *tol = zeros_d((size_t)vocab * dim);
    for (int v = 0; v < vocab; v++)
        for (int d = 0; d < dim; d++) {
            double mag = fabs(table0[(size_t)v * dim + d]);
            for (int i = 0; i < n; i++)
                if (ids[i] == v) mag += fabs(scale * dout[(size_t)i * dim + d]);
            tol[(size_t)v * dim + d] = SUM_TOL(n, mag);
        }
    compare("embedding_bwd", res[1], res[0], (size_t)vocab * dim, 0.0, 0.0, tol);
    free(dout), free(table0), free(ids), free(tol), free(res[0]), free(res[1]);
}

/* ---------------------------------------------------------------- rmsnorm */

/* dx_j = r g_j dy_j - x_j r^3/dim sum_l dy_l g_l x_l: the sum is fp32 on the GPU, double on the
 * CPU (SUM_TOL of dim terms, carried by x_j r^3/dim); then one bf16 rounding (rtol). dw: a sum of
 * n fp32 terms against double, plus the accumulated start value. */
static void check_rmsnorm_bwd(const rs_backend *const bes[2], rs_rng *r, int n, int dim,
                              int add_one, float beta) {
    size_t nd = (size_t)n * dim;
    float *x = random_bf16(r, nd, 0.0f, 1.0f), *dy = random_bf16(r, nd, 0.0f, 1.0f);
    float *w = random_bf16(r, dim, add_one ? 0.0f : 1.0f, 0.2f);
    float *dx0 = random_bf16(r, nd, 0.0f, 1.0f), *dw0 = random_bf16(r, dim, 0.0f, 1.0f);
    float *rstd = rs_malloc(n * sizeof(float));
    for (int i = 0; i < n; i++) {
        double ss = 0;
        for (int j = 0; j < dim; j++) ss += (double)x[(size_t)i * dim + j] * x[(size_t)i * dim + j];
        rstd[i] = (float)(1.0 / sqrt(ss / dim + 1e-6));
    }
    float *dx[2], *dw[2];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *xd = upload(be, ACT(be), x, nd), *dyd = upload(be, ACT(be), dy, nd);
        void *wd = upload(be, WT(be), w, dim);
        void *dxd = beta != 0 ? upload(be, ACT(be), dx0, nd) : upload_nan(be, ACT(be), nd);
        float *dwd = upload(be, RS_F32, dw0, dim), *rd = upload(be, RS_F32, rstd, n);
        be->rmsnorm_bwd(dxd, dwd, dyd, xd, wd, rd, n, dim, add_one, beta);
        dx[s] = download(be, dxd, ACT(be), nd);
        dw[s] = download(be, dwd, RS_F32, dim);
        be->free(xd), be->free(dyd), be->free(wd), be->free(dxd), be->free(dwd), be->free(rd);
    }
    double *tol_dx = zeros_d(nd), *tol_dw = zeros_d(dim);
    for (int i = 0; i < n; i++) {
        double rr = rstd[i], S = 0;
        for (int j = 0; j < dim; j++) {
            size_t e = (size_t)i * dim + j;
            S += fabs((double)dy[e] * (w[j] + add_one) * x[e]);
        }
        for (int j = 0; j < dim; j++) {
            size_t e = (size_t)i * dim + j;
            double g = w[j] + add_one;
            tol_dx[e] = SUM_TOL(dim, fabs(rr * g * dy[e]) + fabs(x[e]) * rr * rr * rr / dim * S) +
                        fabs(beta * dx0[e]) / 256.0;
            tol_dw[j] += fabs((double)dy[e] * x[e] * rr);
        }
    }
    for (int j = 0; j < dim; j++) tol_dw[j] = SUM_TOL(n, tol_dw[j] + fabs(dw0[j]));
    char what[96];
    snprintf(what, sizeof what, "rmsnorm_bwd dx n=%d dim=%d add_one=%d beta=%g", n, dim, add_one,
             beta);
    compare(what, dx[1], dx[0], nd, BF16_RTOL, 0.0, tol_dx);
    snprintf(what, sizeof what, "rmsnorm_bwd dw n=%d dim=%d", n, dim);
    compare(what, dw[1], dw[0], dim, 0.0, 0.0, tol_dw);
    free(x), free(dy), free(w), free(dx0), free(dw0), free(rstd), free(tol_dx), free(tol_dw);
    for (int s = 0; s < 2; s++) free(dx[s]), free(dw[s]);
}

TEST(test_cuda_rmsnorm_bwd_matches_cpu) {
    GPU_TEST_SETUP(102);
    check_rmsnorm_bwd(bes, r, 1, 64, 0, 0.0f);
    check_rmsnorm_bwd(bes, r, 7, 127, 1, 1.0f);
    check_rmsnorm_bwd(bes, r, 300, 1000, 0, 1.0f); /* 3 column chunks */
}

/* ---------------------------------------------------------------- linear */

/* dx: an fp32 sum of m products (SUM_TOL), one bf16 rounding (rtol), and 2^-8 |beta dx0| for
 * cuBLAS's beta path (see test_backend_gpu.c's linear). dw, dbias: fp32 sums of n terms
 * accumulated onto the start value. */
static void check_linear_bwd(const rs_backend *const bes[2], rs_rng *r, int n, int k, int m,
                             float beta, int with_bias) {
    size_t nk = (size_t)n * k, mk = (size_t)m * k, nm = (size_t)n * m;
    float *x = random_bf16(r, nk, 0.0f, 1.0f), *w = random_bf16(r, mk, 0.0f, 1.0f / sqrtf(k));
    float *dout = random_bf16(r, nm, 0.0f, 1.0f), *dx0 = random_bf16(r, nk, 0.0f, 1.0f);
    float *dw0 = random_bf16(r, mk, 0.0f, 1.0f), *db0 = random_bf16(r, m, 0.0f, 1.0f);
    float *dx[2], *dw[2], *db[2];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *xd = upload(be, ACT(be), x, nk), *wd = upload(be, WT(be), w, mk);
        void *dod = upload(be, ACT(be), dout, nm);
        void *dxd = beta != 0 ? upload(be, ACT(be), dx0, nk) : upload_nan(be, ACT(be), nk);
        float *dwd = upload(be, RS_F32, dw0, mk), *dbd = upload(be, RS_F32, db0, m);
        be->linear_bwd(dxd, dwd, with_bias ? dbd : NULL, dod, xd, wd, n, k, m, beta);
        dx[s] = download(be, dxd, ACT(be), nk);
        dw[s] = download(be, dwd, RS_F32, mk);
        db[s] = download(be, dbd, RS_F32, m);
        be->free(xd), be->free(wd), be->free(dod), be->free(dxd), be->free(dwd), be->free(dbd);
    }
    double *tol_dx = zeros_d(nk), *tol_dw = zeros_d(mk), *tol_db = zeros_d(m);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < m; j++) {
            double g = dout[(size_t)i * m + j];
            for (int l = 0; l < k; l++) {
                tol_dx[(size_t)i * k + l] += fabs(g * w[(size_t)j * k + l]);
                tol_dw[(size_t)j * k + l] += fabs(g * x[(size_t)i * k + l]);
            }
            tol_db[j] += fabs(g);
        }
    /* with beta != 0, cuBLAS rounds the product to bf16 before adding beta * C (seen on an H100,
     * 2026-11-23): one more 2^-8 of sum|dout w| */
    for (size_t e = 0; e < nk; e++)
        tol_dx[e] = SUM_TOL(m, tol_dx[e]) + (beta != 0 ? (tol_dx[e] + fabs(beta * dx0[e])) / 256.0 : 0);
    for (size_t e = 0; e < mk; e++) tol_dw[e] = SUM_TOL(n, tol_dw[e] + fabs(dw0[e]));
    for (int j = 0; j < m; j++) tol_db[j] = SUM_TOL(n, tol_db[j] + fabs(db0[j]));
    char what[96];
    snprintf(what, sizeof what, "linear_bwd dx n=%d k=%d m=%d beta=%g", n, k, m, beta);
    compare(what, dx[1], dx[0], nk, BF16_RTOL, 0.0, tol_dx);
    snprintf(what, sizeof what, "linear_bwd dw n=%d k=%d m=%d", n, k, m);
    compare(what, dw[1], dw[0], mk, 0.0, 0.0, tol_dw);
    snprintf(what, sizeof what, "linear_bwd dbias n=%d m=%d (bias %d)", n, m, with_bias);
    compare(what, db[1], db[0], m, 0.0, 0.0, tol_db);
    free(x), free(w), free(dout), free(dx0), free(dw0), free(db0);
    free(tol_dx), free(tol_dw), free(tol_db);
    for (int s = 0; s < 2; s++) free(dx[s]), free(dw[s]), free(db[s]);
}

TEST(test_cuda_linear_bwd_matches_cpu) {
    GPU_TEST_SETUP(103);
    check_linear_bwd(bes, r, 1, 64, 64, 0.0f, 1);
    check_linear_bwd(bes, r, 7, 33, 65, 1.0f, 1);
    check_linear_bwd(bes, r, 300, 129, 96, 0.0f, 1); /* 3 bias column chunks */
    check_linear_bwd(bes, r, 64, 256, 17, 1.0f, 0);
}

/* ---------------------------------------------------------------- rope */

/* The inverse rotation with the forward's fp32 angle: as test_backend_gpu.c's rope tolerance,
 * (|angle| u + 8 u) (|x1| + |x2|) times 4, plus the bf16 rounding. Padded tokens bit-exact. */
TEST(test_cuda_rope_bwd_matches_cpu) {
    GPU_TEST_SETUP(104);
    const int n_tok = 13, n_heads = 3, head_dim = 128, half = head_dim / 2;
    size_t nx = (size_t)n_tok * n_heads * head_dim;
    float *x = random_bf16(r, nx, 0.0f, 1.0f), *inv_freq = rs_malloc(half * sizeof(float));
    for (int i = 0; i < half; i++) inv_freq[i] = (float)pow(500000.0, -2.0 * i / head_dim);
    int32_t *pos = random_ids(r, n_tok, 4096);
    pos[n_tok - 1] = -1;
    float *res[2];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *xd = upload(be, ACT(be), x, nx), *pd = upload_bytes(be, pos, n_tok * sizeof(int32_t));
        void *fd = upload_bytes(be, inv_freq, half * sizeof(float));
        be->rope_bwd(xd, pd, fd, n_tok, n_heads, head_dim);
        res[s] = download(be, xd, ACT(be), nx);
        be->free(xd), be->free(pd), be->free(fd);
    }
    double *tol = zeros_d(nx);
    for (size_t e = 0; e < nx; e++) {
        size_t row = e / head_dim, i0 = (e % head_dim) % half;
        int32_t p = pos[row / n_heads];
        double angle = p < 0 ? 0.0 : fabs((double)p * inv_freq[i0]);
        tol[e] = 4.0 * (angle + 8.0) * F32_U *
                 (fabs(x[row * head_dim + i0]) + fabs(x[row * head_dim + i0 + half]));
        if (p < 0)
            CHECK(memcmp(&res[1][e], &x[e], sizeof(float)) == 0, "rope_bwd: padded token changed");
    }
    compare("rope_bwd", res[1], res[0], nx, BF16_RTOL, 0.0, tol);
    free(x), free(inv_freq), free(pos), free(tol), free(res[0]), free(res[1]);
}

/* ---------------------------------------------------------------- attention */

/* fp32 recomputation of the probabilities and of the sums over keys, queries and heads differs
 * between the sides by ~(Tk + D) u relative to the largest terms (< 1e-4 here); 1e-3 of the
 * tensor's largest value bounds that with room, far below a wrong term's O(max). Plus the bf16
 * rounding (rtol). Padded queries' dq and never-attended keys' dk, dv: exactly 0. */
/* The GEMM path (mode "gemm", where kernels/attention_gemm.cu takes the shape) and the flash
 * path (mode "flash", kernels/attention_flash.cu: >= 16 queries, head_dim 64 or 128; its P is
 * normalised by the sum of the bf16-rounded forward weights, a common factor within 1 +- u)
 * round P to bf16 before dV = P^T dO and dS to bf16 before dQ = dS K and dK = dS^T Q, as
 * FlashAttention's backward does: each term is off by at most u_bf16 = 2^-8 relative, so the
 * outputs by
 *   dq: u sum_j |dS_ij| |k_j|,  dk: u sum_(i,h) |dS_ij| |q_i|,  dv: u sum_(i,h) P_ij |dout_i|,
 * computed here in double from the inputs (dS includes the scale); 2x that is added.
 * o_rounded (mode flash-saved): Dsum_i = dout_i . O_i from the forward's bf16 output. With
 * round-to-nearest (2^-9 = u/2 relative), its entries are off by at most u sum_j P_ij |v_j|
 * (the forward's bf16 P, in the weighted sum and in its normaliser) plus u/2 |O| (the store),
 * 1.5 u sum_j P_ij |v_j| in all; delta_i = u sum_e |dout_ie| sum_j P_ij |v_je| and the 2x
 * added below cover that. Each dS_ij moves by scale P_ij delta_i: dq by scale
 * sum_j P_ij delta_i |k_j|, dk by scale sum P_ij delta_i |q_i|. */
static void gemm_rounding_tolerances(const float *q, const float *k, const float *v,
                                     const float *dout, const int32_t *q_pos, int B, int Tq,
                                     int Tk, int H, int Hkv, int D, float scale, int o_rounded,
                                     double *tq, double *tk, double *tv) {
    int group = H / Hkv;
    double *p = rs_malloc((size_t)Tk * sizeof(double)), *dp = rs_malloc((size_t)Tk * sizeof(double));
    const double u2 = 2.0 / 256.0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < Tq; t++)
            for (int h = 0; h < H; h++) {
                int pos = q_pos[b * Tq + t], last = pos < 0 ? -1 : (pos < Tk ? pos : Tk - 1);
                if (last < 0) continue;
                int hk = h / group;
                const float *qr = q + (((size_t)b * Tq + t) * H + h) * D;
                const float *dr = dout + (((size_t)b * Tq + t) * H + h) * D;
                double m = -INFINITY, l = 0, dsum = 0;
                for (int j = 0; j <= last; j++) {
                    const float *kr = k + (((size_t)b * Tk + j) * Hkv + hk) * D;
                    const float *vr = v + (((size_t)b * Tk + j) * Hkv + hk) * D;
                    double s = 0, d = 0;
                    for (int e = 0; e < D; e++) s += (double)qr[e] * kr[e], d += (double)dr[e] * vr[e];
                    p[j] = s * scale, dp[j] = d;
                    if (p[j] > m) m = p[j];
                }
                for (int j = 0; j <= last; j++) p[j] = exp(p[j] - m), l += p[j];
                for (int j = 0; j <= last; j++) p[j] /= l, dsum += p[j] * dp[j];
                double delta = 0; /* o_rounded: the bound on Dsum's error, above */
                for (int e = 0; e < D && o_rounded; e++) {
                    double pv = 0;
                    for (int j = 0; j <= last; j++)
                        pv += p[j] * fabs(v[(((size_t)b * Tk + j) * Hkv + hk) * D + e]);
                    delta += u2 / 2 * fabs(dr[e]) * pv;
                }
                for (int j = 0; j <= last; j++) {
                    double ds = fabs(scale * p[j] * (dp[j] - dsum));
                    double dd = 2.0 * scale * p[j] * delta; /* Dsum's share, 2x */
                    size_t kj = (((size_t)b * Tk + j) * Hkv + hk) * D;
                    size_t qi = (((size_t)b * Tq + t) * H + h) * D;
                    for (int e = 0; e < D; e++) {
                        tq[qi + e] += (u2 * ds + dd) * fabs(k[kj + e]);
                        tk[kj + e] += (u2 * ds + dd) * fabs(qr[e]);
                        tv[kj + e] += u2 * p[j] * fabs(dr[e]);
                    }
                }
            }
    free(p), free(dp);
}

/* setenv(name, value) or unsetenv(name) when value is NULL; returns the former value (a copy to
 * give back to env_restore) */
static char *env_swap(const char *name, const char *value) {
    const char *old = getenv(name);
    char *saved = old ? strdup(old) : NULL;
    if (value)
        setenv(name, value, 1);
    else
        unsetenv(name);
    return saved;
}

static void env_restore(const char *name, char *saved) {
    if (saved)
        setenv(name, saved, 1);
    else
        unsetenv(name);
    free(saved);
}

/* mode: RESAFE_CUDA_ATTENTION's value for the GPU side (flash: with dK and dV in two launches,
 * RESAFE_CUDA_FLASH_DKV=0), or flash-dkv (the default flash kernels: dK and dV in one launch),
 * or flash-saved (attention_fwd_lse, then attention_bwd_saved on its output and log-sum-exp, the
 * training default: Dsum from the bf16 output; that output must equal attention_fwd's bit for
 * bit) */
static void check_attention_bwd(const rs_backend *const bes[2], rs_rng *r, int B, int Tq, int Tk,
                                int H, int Hkv, int D, const char *mode) {
    const int dkv = strcmp(mode, "flash-dkv") == 0, saved = strcmp(mode, "flash-saved") == 0;
    float scale = 1.0f / sqrtf((float)D);
    size_t nq = (size_t)B * Tq * H * D, nkv = (size_t)B * Tk * Hkv * D;
    float *q = random_bf16(r, nq, 0.0f, 1.0f), *k = random_bf16(r, nkv, 0.0f, 1.0f);
    float *v = random_bf16(r, nkv, 0.0f, 1.0f), *dout = random_bf16(r, nq, 0.0f, 1.0f);
    int32_t *q_pos = rs_malloc((size_t)B * Tq * sizeof(int32_t));
    int *key_len = rs_malloc(B * sizeof(int));
    for (int b = 0; b < B; b++) { /* the last Tq - pad queries end at key L - 1 */
        int pad = b % 2 ? Tq / 3 : 0, n_valid = Tq - pad;
        int L = n_valid + (int)(rs_rng_next(r) % (uint64_t)(Tk - n_valid + 1));
        key_len[b] = L;
        for (int t = 0; t < Tq; t++) q_pos[b * Tq + t] = t < n_valid ? L - n_valid + t : -1;
    }
    float *k_gpu = rs_malloc(nkv * sizeof(float)), *v_gpu = rs_malloc(nkv * sizeof(float));
    for (size_t e = 0; e < nkv; e++) { /* rows no query sees: 0 on the CPU, NaN on the GPU */
        int b = (int)(e / ((size_t)Tk * Hkv * D)), j = (int)(e / ((size_t)Hkv * D) % Tk);
        int unused = j >= key_len[b];
        k_gpu[e] = unused ? NAN : k[e], v_gpu[e] = unused ? NAN : v[e];
        if (unused) k[e] = v[e] = 0.0f;
    }
    float *g[2][3];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *qd = upload(be, ACT(be), q, nq), *dod = upload(be, ACT(be), dout, nq);
        void *kd = upload(be, ACT(be), s ? k_gpu : k, nkv), *vd = upload(be, ACT(be), s ? v_gpu : v, nkv);
        void *pd = upload_bytes(be, q_pos, (size_t)B * Tq * sizeof(int32_t));
        void *dq = upload_nan(be, ACT(be), nq), *dk = upload_nan(be, ACT(be), nkv);
        void *dv = upload_nan(be, ACT(be), nkv);
        char *e_att = env_swap("RESAFE_CUDA_ATTENTION", !s ? NULL : dkv || saved ? "flash" : mode);
        char *e_dkv = env_swap("RESAFE_CUDA_FLASH_DKV", s && !dkv && !saved ? "0" : NULL);
        char *e_sav = env_swap("RESAFE_CUDA_FLASH_SAVED", NULL);
        if (s && saved) {
            CHECK(be->attention_fwd_lse && be->attention_bwd_saved, "saved-attention ops missing");
            void *od = upload_nan(be, ACT(be), nq), *od2 = upload_nan(be, ACT(be), nq);
            float *ld = upload_nan(be, RS_F32, (size_t)B * H * Tq);
            be->attention_fwd_lse(od, ld, qd, kd, vd, pd, B, Tq, Tk, H, Hkv, D, scale);
            be->attention_fwd(od2, qd, kd, vd, pd, B, Tq, Tk, H, Hkv, D, scale);
            be->attention_bwd_saved(dq, dk, dv, dod, qd, kd, vd, od, ld, pd, B, Tq, Tk, H, Hkv, D,
                                    scale);
            float *o1 = download(be, od, ACT(be), nq), *o2 = download(be, od2, ACT(be), nq);
            CHECK(memcmp(o1, o2, nq * sizeof(float)) == 0,
                  "attention_fwd_lse's output differs from attention_fwd's");
            free(o1), free(o2), be->free(od), be->free(od2), be->free(ld);
        } else {
            be->attention_bwd(dq, dk, dv, dod, qd, kd, vd, pd, B, Tq, Tk, H, Hkv, D, scale);
        }
        env_restore("RESAFE_CUDA_FLASH_SAVED", e_sav);
        env_restore("RESAFE_CUDA_FLASH_DKV", e_dkv);
        env_restore("RESAFE_CUDA_ATTENTION", e_att);
        g[s][0] = download(be, dq, ACT(be), nq);
        g[s][1] = download(be, dk, ACT(be), nkv);
        g[s][2] = download(be, dv, ACT(be), nkv);
        be->free(qd), be->free(dod), be->free(kd), be->free(vd), be->free(pd);
        be->free(dq), be->free(dk), be->free(dv);
    }
    const char *names[3] = {"dq", "dk", "dv"};
    size_t sizes[3] = {nq, nkv, nkv};
    double *tol[3] = {zeros_d(nq), zeros_d(nkv), zeros_d(nkv)};
    if (strcmp(mode, "gemm") == 0 || strcmp(mode, "flash") == 0 || dkv || saved)
        gemm_rounding_tolerances(q, k, v, dout, q_pos, B, Tq, Tk, H, Hkv, D, scale, saved, tol[0],
                                 tol[1], tol[2]);
    for (int o = 0; o < 3; o++) {
        char what[160];
        snprintf(what, sizeof what, "attention_bwd (%s) %s B=%d Tq=%d Tk=%d heads=%d/%d D=%d",
                 mode, names[o], B, Tq, Tk, H, Hkv, D);
        compare(what, g[1][o], g[0][o], sizes[o], BF16_RTOL, 1e-3 * max_abs(g[0][o], sizes[o]),
                tol[o]);
        free(tol[o]);
    }
    for (size_t e = 0; e < nq; e++)
        if (q_pos[e / ((size_t)H * D)] < 0) CHECK(g[1][0][e] == 0.0f, "padded query: dq not 0");
    for (size_t e = 0; e < nkv; e++)
        if (k[e] == 0.0f && isnan(k_gpu[e]))
            CHECK(g[1][1][e] == 0.0f && g[1][2][e] == 0.0f, "unattended key: dk, dv not 0");
    free(q), free(k), free(v), free(dout), free(q_pos), free(key_len), free(k_gpu), free(v_gpu);
    for (int s = 0; s < 2; s++)
        for (int o = 0; o < 3; o++) free(g[s][o]);
}

TEST(test_cuda_attention_bwd_matches_cpu) {
    GPU_TEST_SETUP(105);
    const char *modes[5] = {"fused", "gemm", "flash", "flash-dkv", "flash-saved"};
    for (int m = 0; m < 5; m++) {
        check_attention_bwd(bes, r, 1, 1, 1, 1, 1, 64, modes[m]);    /* one key */
        check_attention_bwd(bes, r, 2, 9, 9, 4, 4, 64, modes[m]);    /* prefill, padding */
        check_attention_bwd(bes, r, 2, 7, 40, 8, 2, 128, modes[m]);  /* GQA 4, Tk > Tq */
        check_attention_bwd(bes, r, 3, 33, 50, 4, 1, 256, modes[m]); /* MQA, head_dim 256 */
        check_attention_bwd(bes, r, 2, 17, 17, 6, 3, 80, modes[m]);  /* head_dim 80 */
        check_attention_bwd(bes, r, 3, 96, 96, 8, 2, 128, modes[m]); /* training shape, GQA */
        check_attention_bwd(bes, r, 2, 41, 53, 4, 4, 64, modes[m]);  /* odd Tq, Tk */
        check_attention_bwd(bes, r, 2, 130, 150, 4, 2, 128, modes[m]); /* 3 query, 3 key tiles */
        check_attention_bwd(bes, r, 1, 70, 200, 2, 1, 64, modes[m]); /* prefill into a cache */
    }
}

/* ---------------------------------------------------------------- glu */

/* Same formulas with fp32 exp/tanh/erf a few ulps apart; where 1 + tanh or 1 + erf cancels the
 * absolute error is a few ulps of 1 times the factors around it (|g|^3 through the tanh's
 * argument): 2^-20 |dout| (|up| + 1)(1 + |g|^3) covers both outputs; plus bf16 rounding. */
TEST(test_cuda_glu_bwd_matches_cpu) {
    GPU_TEST_SETUP(106);
    const rs_activation acts[3] = {RS_ACT_SILU, RS_ACT_GELU_TANH, RS_ACT_GELU};
    const size_t n = 10007;
    for (int a = 0; a < 3; a++) {
        float *g = random_bf16(r, n, 0.0f, 3.0f), *u = random_bf16(r, n, 0.0f, 1.0f);
        float *d = random_bf16(r, n, 0.0f, 1.0f);
        float *dg[2], *du[2];
        for (int s = 0; s < 2; s++) {
            const rs_backend *be = bes[s];
            void *gd = upload(be, ACT(be), g, n), *ud = upload(be, ACT(be), u, n);
            void *dd = upload(be, ACT(be), d, n);
            void *dgd = upload_nan(be, ACT(be), n), *dud = upload_nan(be, ACT(be), n);
            be->glu_bwd(dgd, dud, dd, gd, ud, n, acts[a]);
            dg[s] = download(be, dgd, ACT(be), n);
            du[s] = download(be, dud, ACT(be), n);
            be->free(gd), be->free(ud), be->free(dd), be->free(dgd), be->free(dud);
        }
        double *tol = zeros_d(n);
        for (size_t i = 0; i < n; i++)
            tol[i] = fabs(d[i]) * (fabs(u[i]) + 1.0) * (1.0 + pow(fabs(g[i]), 3)) / 1048576.0;
        char what[64];
        snprintf(what, sizeof what, "glu_bwd dgate act=%d", a);
        compare(what, dg[1], dg[0], n, BF16_RTOL, 0.0, tol);
        snprintf(what, sizeof what, "glu_bwd dup act=%d", a);
        compare(what, du[1], du[0], n, BF16_RTOL, 0.0, tol);
        free(g), free(u), free(d), free(tol);
        for (int s = 0; s < 2; s++) free(dg[s]), free(du[s]);
    }
}

/* ---------------------------------------------------------------- log-probabilities */

/* lse: the sum of vocab exp terms is fp32 on the GPU, double on the CPU, exp a few ulps apart:
 * log's absolute error <= 4 (vocab + 8) u, plus 4 u |lse| for the final add. logp adds the same
 * to an exact logit. dlogits (both sides given the CPU's lse): |dlogp| p (4 u |z| + 4 u |lse|)
 * from exp's argument, plus bf16 rounding. Rows with target -1: logp 0 and dlogits 0 exactly. */
static void check_logprob(const rs_backend *const bes[2], rs_rng *r, int n, int vocab) {
    size_t nv = (size_t)n * vocab;
    float *z = random_bf16(r, nv, 0.0f, 3.0f), *dlogp = random_bf16(r, n, 0.0f, 1.0f);
    int32_t *t = random_ids(r, n, vocab);
    t[0] = -1;
    if (n > 2) t[n - 1] = vocab - 1;
    float *lp[2], *lse[2], *dz[2];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *zd = upload(be, ACT(be), z, nv), *td = upload_bytes(be, t, n * sizeof(int32_t));
        float *lpd = upload_nan(be, RS_F32, n), *lsed = upload_nan(be, RS_F32, n);
        float *dlpd = upload(be, RS_F32, dlogp, n);
        void *dzd = upload_nan(be, ACT(be), nv);
        be->logprob_fwd(lpd, lsed, zd, td, n, vocab);
        lp[s] = download(be, lpd, RS_F32, n);
        lse[s] = download(be, lsed, RS_F32, n);
        float *lse_ref = upload(be, RS_F32, lse[0], n); /* the CPU's lse for both */
        be->logprob_bwd(dzd, dlpd, zd, lse_ref, td, n, vocab);
        dz[s] = download(be, dzd, ACT(be), nv);
        be->free(zd), be->free(td), be->free(lpd), be->free(lsed), be->free(dlpd), be->free(dzd);
        be->free(lse_ref);
    }
    double *tol = zeros_d(n), *tol_dz = zeros_d(nv);
    for (int i = 0; i < n; i++) {
        tol[i] = 4.0 * (vocab + 8) * F32_U + 4.0 * F32_U * fabs(lse[0][i]);
        for (int j = 0; j < vocab; j++) {
            size_t e = (size_t)i * vocab + j;
            double p = exp((double)z[e] - lse[0][i]);
            tol_dz[e] = fabs(dlogp[i]) * p * 4.0 * F32_U * (fabs(z[e]) + fabs(lse[0][i]) + 4.0);
        }
    }
    char what[64];
    snprintf(what, sizeof what, "logprob_fwd lse n=%d vocab=%d", n, vocab);
    compare(what, lse[1], lse[0], n, 0.0, 0.0, tol);
    snprintf(what, sizeof what, "logprob_fwd logp n=%d vocab=%d", n, vocab);
    compare(what, lp[1], lp[0], n, 0.0, 0.0, tol);
    CHECK(lp[1][0] == 0.0f, "logp of a row without target is %g, not 0", lp[1][0]);
    snprintf(what, sizeof what, "logprob_bwd n=%d vocab=%d", n, vocab);
    compare(what, dz[1], dz[0], nv, BF16_RTOL, 0.0, tol_dz);
    for (int j = 0; j < vocab; j++) CHECK(dz[1][j] == 0.0f, "dlogits of a row without target");
    free(z), free(dlogp), free(t), free(tol), free(tol_dz);
    for (int s = 0; s < 2; s++) free(lp[s]), free(lse[s]), free(dz[s]);
}

TEST(test_cuda_logprob_fwd_bwd_match_cpu) {
    GPU_TEST_SETUP(107);
    check_logprob(bes, r, 1, 1);
    check_logprob(bes, r, 5, 1000);
    check_logprob(bes, r, 17, 32003);
}

/* ---------------------------------------------------------------- LoRA */

typedef struct {
    int n, k, m, r;
    float scale, beta;
} lora_case;

/* fwd: xa = x A^T with A rounded to bf16 (2^-9 relative per product) and fp32 sums: 2^-8 of
 * sum|x A|. y = beta y0 + scale bf16(xa) bf16(B)^T: operands off by 2^-9 each (2^-7 of
 * scale sum_a |B xa|, doubled) plus xa's own error (scale sum_a |B| tol_xa); 2^-8 |beta y0| for
 * cuBLAS's beta path; bf16 store. beta 0: y starts as NaN on both sides (it must not be read). */
static void lora_fwd_tols(const float *x, const float *A, const float *B, const float *xa_ref,
                          int n, int k, int m, int r, float scale, double *tol_xa,
                          double *tol_y) {
    for (int i = 0; i < n; i++)
        for (int a = 0; a < r; a++) {
            double s = 0;
            for (int l = 0; l < k; l++)
                s += fabs((double)x[(size_t)i * k + l] * A[(size_t)a * k + l]);
            tol_xa[(size_t)i * r + a] += s / 256.0;
        }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < m; j++) {
            double mag = 0;
            for (int a = 0; a < r; a++)
                mag += fabs(B[(size_t)j * r + a]) *
                       (fabs(xa_ref[(size_t)i * r + a]) / 128.0 + tol_xa[(size_t)i * r + a]);
            tol_y[(size_t)i * m + j] += scale * mag;
        }
}

static void check_lora_fwd(const rs_backend *const bes[2], rs_rng *r, const lora_case *c) {
    size_t nk = (size_t)c->n * c->k, nm = (size_t)c->n * c->m, nr = (size_t)c->n * c->r;
    float *x = random_bf16(r, nk, 0.0f, 1.0f), *y0 = random_bf16(r, nm, 0.0f, 1.0f);
    float *A = random_bf16(r, (size_t)c->r * c->k, 0.0f, 1.0f / sqrtf(c->k));
    float *B = random_bf16(r, (size_t)c->m * c->r, 0.0f, 1.0f / sqrtf(c->r));
    float *y[2], *xa[2];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *xd = upload(be, ACT(be), x, nk);
        void *yd = c->beta == 0.0f ? upload_nan(be, ACT(be), nm) : upload(be, ACT(be), y0, nm);
        float *Ad = upload(be, RS_F32, A, (size_t)c->r * c->k);
        float *Bd = upload(be, RS_F32, B, (size_t)c->m * c->r), *xad = upload_nan(be, RS_F32, nr);
        be->lora_fwd(yd, xad, xd, Ad, Bd, c->n, c->k, c->m, c->r, c->scale, c->beta);
        y[s] = download(be, yd, ACT(be), nm);
        xa[s] = download(be, xad, RS_F32, nr);
        be->free(xd), be->free(yd), be->free(Ad), be->free(Bd), be->free(xad);
    }
    double *tol_xa = zeros_d(nr), *tol_y = zeros_d(nm);
    lora_fwd_tols(x, A, B, xa[0], c->n, c->k, c->m, c->r, c->scale, tol_xa, tol_y);
    for (size_t e = 0; e < nm; e++) tol_y[e] += fabs(c->beta * y0[e]) / 256.0;
    char what[96];
    snprintf(what, sizeof what, "lora_fwd xa n=%d k=%d m=%d r=%d", c->n, c->k, c->m, c->r);
    compare(what, xa[1], xa[0], nr, 0.0, 0.0, tol_xa);
    snprintf(what, sizeof what, "lora_fwd y n=%d k=%d m=%d r=%d", c->n, c->k, c->m, c->r);
    compare(what, y[1], y[0], nm, BF16_RTOL, 0.0, tol_y);
    free(x), free(y0), free(A), free(B), free(tol_xa), free(tol_y);
    for (int s = 0; s < 2; s++) free(y[s]), free(xa[s]);
}

/* bwd: dyB = dy B (B rounded: 2^-8 of S = sum|dy B|, then rounded to bf16). dx = beta dx0 +
 * scale dyB A: 2^-6 of scale sum_a |A| S_a (both operands' errors, doubled), 2^-8 |beta dx0|,
 * bf16 store. dA += scale dyB^T x: 2^-6 of scale sum_i |x| S. dB += scale dy^T bf16(xa):
 * 2^-7 of scale sum_i |dy xa|. fp32 start values of dA, dB: + 4 u |start|. */
static void lora_bwd_tols(const float *x, const float *dy, const float *xa, const float *A,
                          const float *B, int n, int k, int m, int r, float scale, double *tol_dx,
                          double *tol_dA, double *tol_dB) {
    for (int i = 0; i < n; i++)
        for (int a = 0; a < r; a++) {
            double s_ia = 0;
            for (int j = 0; j < m; j++)
                s_ia += fabs((double)dy[(size_t)i * m + j] * B[(size_t)j * r + a]);
            for (int l = 0; l < k; l++) {
                tol_dx[(size_t)i * k + l] += scale * fabs(A[(size_t)a * k + l]) * s_ia / 64.0;
                tol_dA[(size_t)a * k + l] += scale * fabs(x[(size_t)i * k + l]) * s_ia / 64.0;
            }
            for (int j = 0; j < m; j++)
                tol_dB[(size_t)j * r + a] +=
                    scale * fabs((double)dy[(size_t)i * m + j] * xa[(size_t)i * r + a]) / 128.0;
        }
}

static void check_lora_bwd(const rs_backend *const bes[2], rs_rng *r, const lora_case *c) {
    size_t nk = (size_t)c->n * c->k, nm = (size_t)c->n * c->m, nr = (size_t)c->n * c->r;
    size_t rk = (size_t)c->r * c->k, mr = (size_t)c->m * c->r;
    float *x = random_bf16(r, nk, 0.0f, 1.0f), *dy = random_bf16(r, nm, 0.0f, 1.0f);
    float *dx0 = random_bf16(r, nk, 0.0f, 1.0f), *xa = random_bf16(r, nr, 0.0f, 1.0f);
    float *A = random_bf16(r, rk, 0.0f, 1.0f / sqrtf(c->k)), *B = random_bf16(r, mr, 0.0f, 1.0f);
    float *dA0 = random_bf16(r, rk, 0.0f, 1.0f), *dB0 = random_bf16(r, mr, 0.0f, 1.0f);
    float *dx[2], *dA[2], *dB[2];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *xd = upload(be, ACT(be), x, nk), *dyd = upload(be, ACT(be), dy, nm);
        void *dxd = c->beta != 0 ? upload(be, ACT(be), dx0, nk) : upload_nan(be, ACT(be), nk);
        float *xad = upload(be, RS_F32, xa, nr), *Ad = upload(be, RS_F32, A, rk);
        float *Bd = upload(be, RS_F32, B, mr), *dAd = upload(be, RS_F32, dA0, rk);
        float *dBd = upload(be, RS_F32, dB0, mr);
        be->lora_bwd(dxd, dAd, dBd, dyd, xd, xad, Ad, Bd, c->n, c->k, c->m, c->r, c->scale,
                     c->beta);
        dx[s] = download(be, dxd, ACT(be), nk);
        dA[s] = download(be, dAd, RS_F32, rk);
        dB[s] = download(be, dBd, RS_F32, mr);
        be->free(xd), be->free(dyd), be->free(dxd), be->free(xad), be->free(Ad), be->free(Bd);
        be->free(dAd), be->free(dBd);
    }
    double *tol_dx = zeros_d(nk), *tol_dA = zeros_d(rk), *tol_dB = zeros_d(mr);
    lora_bwd_tols(x, dy, xa, A, B, c->n, c->k, c->m, c->r, c->scale, tol_dx, tol_dA, tol_dB);
    for (size_t e = 0; e < nk; e++) tol_dx[e] += fabs(c->beta * dx0[e]) / 256.0;
    for (size_t e = 0; e < rk; e++) tol_dA[e] += 4.0 * F32_U * fabs(dA0[e]);
    for (size_t e = 0; e < mr; e++) tol_dB[e] += 4.0 * F32_U * fabs(dB0[e]);
    char what[96];
    snprintf(what, sizeof what, "lora_bwd dx n=%d k=%d m=%d r=%d beta=%g", c->n, c->k, c->m, c->r,
             c->beta);
    compare(what, dx[1], dx[0], nk, BF16_RTOL, 0.0, tol_dx);
    snprintf(what, sizeof what, "lora_bwd dA n=%d k=%d m=%d r=%d", c->n, c->k, c->m, c->r);
    compare(what, dA[1], dA[0], rk, 0.0, 0.0, tol_dA);
    snprintf(what, sizeof what, "lora_bwd dB n=%d k=%d m=%d r=%d", c->n, c->k, c->m, c->r);
    compare(what, dB[1], dB[0], mr, 0.0, 0.0, tol_dB);
    free(x), free(dy), free(dx0), free(xa), free(A), free(B), free(dA0), free(dB0);
    free(tol_dx), free(tol_dA), free(tol_dB);
    for (int s = 0; s < 2; s++) free(dx[s]), free(dA[s]), free(dB[s]);
}

/* The group ops on the GPU, batched (the default, RESAFE_CUDA_LORA_GROUP=1: x [A_1; ..]^T,
 * [dyB ..] [A; ..] and [dyB ..]^T x as one GEMM each) or as the single ops in turn (=0),
 * against the CPU's single ops in turn: each output's tolerance is the single op's (above), dx's
 * the sum of the members' (one bf16 store of the sum; the start value's term once). Output widths
 * differ (GQA k/v); beta 0 on NaN-poisoned y / dx; dx NULL (the first layer) leaves dA, dB as
 * with it. */
static void check_lora_group(const rs_backend *const bes[2], rs_rng *r, int n, int k, int rank,
                             int count, const int *m, float scale, float beta, int with_dx,
                             int batched) {
    size_t nk = (size_t)n * k, nr = (size_t)n * rank, rk = (size_t)rank * k;
    float *x = random_bf16(r, nk, 0.0f, 1.0f), *dx0 = random_bf16(r, nk, 0.0f, 1.0f);
    float *A[RS_LORA_GROUP_MAX], *B[RS_LORA_GROUP_MAX], *y0[RS_LORA_GROUP_MAX];
    float *dy[RS_LORA_GROUP_MAX], *xa[RS_LORA_GROUP_MAX], *dA0[RS_LORA_GROUP_MAX];
    float *dB0[RS_LORA_GROUP_MAX];
    for (int i = 0; i < count; i++) {
        size_t nm = (size_t)n * m[i], mr = (size_t)m[i] * rank;
        A[i] = random_bf16(r, rk, 0.0f, 1.0f / sqrtf(k));
        B[i] = random_bf16(r, mr, 0.0f, 1.0f / sqrtf(rank));
        y0[i] = random_bf16(r, nm, 0.0f, 1.0f), dy[i] = random_bf16(r, nm, 0.0f, 1.0f);
        xa[i] = random_bf16(r, nr, 0.0f, 1.0f), dA0[i] = random_bf16(r, rk, 0.0f, 1.0f);
        dB0[i] = random_bf16(r, mr, 0.0f, 1.0f);
    }
    float *y[2][RS_LORA_GROUP_MAX], *xo[2][RS_LORA_GROUP_MAX], *dx[2] = {NULL, NULL};
    float *dA[2][RS_LORA_GROUP_MAX], *dB[2][RS_LORA_GROUP_MAX];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        rs_lora_group g = {.count = count};
        void *yd[RS_LORA_GROUP_MAX], *dyd[RS_LORA_GROUP_MAX];
        float *xa_in[RS_LORA_GROUP_MAX];
        void *xd = upload(be, ACT(be), x, nk);
        for (int i = 0; i < count; i++) {
            size_t nm = (size_t)n * m[i], mr = (size_t)m[i] * rank;
            g.m[i] = m[i];
            g.A[i] = upload(be, RS_F32, A[i], rk), g.B[i] = upload(be, RS_F32, B[i], mr);
            yd[i] = beta == 0.0f ? upload_nan(be, ACT(be), nm) : upload(be, ACT(be), y0[i], nm);
            g.xa[i] = upload_nan(be, RS_F32, nr);
            dyd[i] = upload(be, ACT(be), dy[i], nm);
            xa_in[i] = upload(be, RS_F32, xa[i], nr);
            g.dA[i] = upload(be, RS_F32, dA0[i], rk), g.dB[i] = upload(be, RS_F32, dB0[i], mr);
        }
        if (s == 1) setenv("RESAFE_CUDA_LORA_GROUP", batched ? "1" : "0", 1);
        be->lora_fwd_group(yd, xd, &g, n, k, rank, scale, beta);
        for (int i = 0; i < count; i++) {
            y[s][i] = download(be, yd[i], ACT(be), (size_t)n * m[i]);
            xo[s][i] = download(be, g.xa[i], RS_F32, nr);
            be->free(g.xa[i]);
            g.xa[i] = xa_in[i]; /* the backward reads the given xa */
        }
        void *dxd = !with_dx ? NULL
                    : beta != 0.0f ? upload(be, ACT(be), dx0, nk)
                                   : upload_nan(be, ACT(be), nk);
        be->lora_bwd_group(dxd, (const void *const *)dyd, xd, &g, n, k, rank, scale, beta);
        unsetenv("RESAFE_CUDA_LORA_GROUP");
        if (dxd) dx[s] = download(be, dxd, ACT(be), nk), be->free(dxd);
        for (int i = 0; i < count; i++) {
            dA[s][i] = download(be, g.dA[i], RS_F32, rk);
            dB[s][i] = download(be, g.dB[i], RS_F32, (size_t)m[i] * rank);
            be->free((void *)g.A[i]), be->free((void *)g.B[i]), be->free(yd[i]);
            be->free(dyd[i]), be->free(xa_in[i]), be->free(g.dA[i]), be->free(g.dB[i]);
        }
        be->free(xd);
    }
    double *tol_dx = zeros_d(nk);
    char what[128];
    for (int i = 0; i < count; i++) {
        size_t nm = (size_t)n * m[i], mr = (size_t)m[i] * rank;
        double *tol_xa = zeros_d(nr), *tol_y = zeros_d(nm), *tol_dA = zeros_d(rk);
        double *tol_dB = zeros_d(mr);
        lora_fwd_tols(x, A[i], B[i], xo[0][i], n, k, m[i], rank, scale, tol_xa, tol_y);
        for (size_t e = 0; e < nm; e++) tol_y[e] += fabs(beta * y0[i][e]) / 256.0;
        lora_bwd_tols(x, dy[i], xa[i], A[i], B[i], n, k, m[i], rank, scale, tol_dx, tol_dA,
                      tol_dB);
        for (size_t e = 0; e < rk; e++) tol_dA[e] += 4.0 * F32_U * fabs(dA0[i][e]);
        for (size_t e = 0; e < mr; e++) tol_dB[e] += 4.0 * F32_U * fabs(dB0[i][e]);
        snprintf(what, sizeof what, "lora group%s %d/%d n=%d k=%d m=%d r=%d beta=%g: xa",
                 batched ? " (batched)" : "", i, count, n, k, m[i], rank, beta);
        compare(what, xo[1][i], xo[0][i], nr, 0.0, 0.0, tol_xa);
        snprintf(what, sizeof what, "lora group%s %d/%d n=%d k=%d m=%d r=%d beta=%g: y",
                 batched ? " (batched)" : "", i, count, n, k, m[i], rank, beta);
        compare(what, y[1][i], y[0][i], nm, BF16_RTOL, 0.0, tol_y);
        snprintf(what, sizeof what, "lora group%s %d/%d n=%d k=%d m=%d r=%d: dA",
                 batched ? " (batched)" : "", i, count, n, k, m[i], rank);
        compare(what, dA[1][i], dA[0][i], rk, 0.0, 0.0, tol_dA);
        snprintf(what, sizeof what, "lora group%s %d/%d n=%d k=%d m=%d r=%d: dB",
                 batched ? " (batched)" : "", i, count, n, k, m[i], rank);
        compare(what, dB[1][i], dB[0][i], mr, 0.0, 0.0, tol_dB);
        free(tol_xa), free(tol_y), free(tol_dA), free(tol_dB);
    }
    if (with_dx) {
        for (size_t e = 0; e < nk; e++) tol_dx[e] += fabs(beta * dx0[e]) / 256.0;
        snprintf(what, sizeof what, "lora group%s of %d n=%d k=%d r=%d beta=%g: dx",
                 batched ? " (batched)" : "", count, n, k, rank, beta);
        compare(what, dx[1], dx[0], nk, BF16_RTOL, 0.0, tol_dx);
    }
    free(tol_dx), free(x), free(dx0), free(dx[0]), free(dx[1]);
    for (int i = 0; i < count; i++) {
        free(A[i]), free(B[i]), free(y0[i]), free(dy[i]), free(xa[i]), free(dA0[i]), free(dB0[i]);
        for (int s = 0; s < 2; s++) free(y[s][i]), free(xo[s][i]), free(dA[s][i]), free(dB[s][i]);
    }
}

TEST(test_cuda_lora_fwd_bwd_match_cpu) {
    GPU_TEST_SETUP(108);
    const lora_case cases[] = {
        {1, 64, 64, 4, 2.0f, 0.0f},
        {7, 33, 65, 8, 0.5f, 1.0f},
        {96, 256, 160, 16, 1.0f, 1.0f},
        {33, 129, 17, 1, 4.0f, 0.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        check_lora_fwd(bes, r, &cases[i]);
        check_lora_bwd(bes, r, &cases[i]);
    }
}

TEST(test_cuda_lora_group_matches_cpu) {
    GPU_TEST_SETUP(115);
    const int qkv[3] = {96, 32, 32}, gate_up[2] = {200, 200}, odd[3] = {17, 1, 65};
    const char *env = getenv("RESAFE_CUDA_LORA_GROUP");
    char *saved = env ? strdup(env) : NULL;
    for (int batched = 1; batched >= 0; batched--) {
        check_lora_group(bes, r, 40, 96, 8, 3, qkv, 2.0f, 0.0f, 1, batched);
        check_lora_group(bes, r, 33, 130, 16, 2, gate_up, 0.5f, 1.0f, 1, batched);
        check_lora_group(bes, r, 7, 37, 4, 3, odd, 1.0f, 0.0f, 0, batched);
        check_lora_group(bes, r, 5, 64, 1, 1, odd, 4.0f, 0.5f, 1, batched);
    }
    if (saved) setenv("RESAFE_CUDA_LORA_GROUP", saved, 1);
    free(saved);
}

/* merge: the same fp32 rank sum on both sides (FMA contraction aside: r u scale sum|B A|, x4),
 * one bf16 rounding; masked-out entries are w, bit for bit; in place (w_eff = w) the same.
 * masked_grad: fp32 sums of k (dB, double on the CPU) or m (dA) terms onto the start values;
 * NaN in dw where the mask is 0 must not leak. */
static void check_lora_merge_and_masked_grad(const rs_backend *const bes[2], rs_rng *r, int m,
                                             int k, int rank, float scale, int with_mask) {
    size_t mk = (size_t)m * k, rk = (size_t)rank * k, mr = (size_t)m * rank;
    float *w = random_bf16(r, mk, 0.0f, 0.05f), *A = random_bf16(r, rk, 0.0f, 0.1f);
    float *B = random_bf16(r, mr, 0.0f, 0.1f), *dw = random_bf16(r, mk, 0.0f, 1.0f);
    float *dA0 = random_bf16(r, rk, 0.0f, 1.0f), *dB0 = random_bf16(r, mr, 0.0f, 1.0f);
    uint8_t *mask = with_mask ? random_mask(r, mk) : NULL;
    if (mask)
        for (size_t e = 0; e < mk; e++)
            if (!mask[e]) dw[e] = NAN;
    float *we[2], *wi[2], *dA[2], *dB[2];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *wd = upload(be, WT(be), w, mk), *wed = upload_nan(be, WT(be), mk);
        void *win = upload(be, WT(be), w, mk);
        float *Ad = upload(be, RS_F32, A, rk), *Bd = upload(be, RS_F32, B, mr);
        float *dwd = upload(be, RS_F32, dw, mk), *dAd = upload(be, RS_F32, dA0, rk);
        float *dBd = upload(be, RS_F32, dB0, mr);
        void *md = mask ? upload_bytes(be, mask, mk) : NULL;
        be->lora_merge(wed, wd, Ad, Bd, md, m, k, rank, scale);
        be->lora_merge(win, win, Ad, Bd, md, m, k, rank, scale);
        be->lora_masked_grad(dAd, dBd, dwd, md, Ad, Bd, m, k, rank, scale);
        we[s] = download(be, wed, WT(be), mk);
        wi[s] = download(be, win, WT(be), mk);
        dA[s] = download(be, dAd, RS_F32, rk);
        dB[s] = download(be, dBd, RS_F32, mr);
        be->free(wd), be->free(wed), be->free(win), be->free(Ad), be->free(Bd), be->free(dwd);
        be->free(dAd), be->free(dBd), be->free(md);
    }
    double *tol_w = zeros_d(mk), *tol_dA = zeros_d(rk), *tol_dB = zeros_d(mr);
    for (int j = 0; j < m; j++)
        for (int l = 0; l < k; l++) {
            size_t e = (size_t)j * k + l;
            int on = !mask || mask[e];
            double g = on ? dw[e] : 0.0;
            for (int a = 0; a < rank; a++) {
                double ba = fabs((double)B[(size_t)j * rank + a] * A[(size_t)a * k + l]);
                tol_w[e] += ba;
                tol_dA[(size_t)a * k + l] += fabs(scale * B[(size_t)j * rank + a] * g);
                tol_dB[(size_t)j * rank + a] += fabs(scale * g * A[(size_t)a * k + l]);
            }
            tol_w[e] = 4.0 * (rank + 4) * F32_U * scale * tol_w[e];
            if (!on)
                CHECK(memcmp(&we[1][e], &w[e], 4) == 0 && memcmp(&wi[1][e], &w[e], 4) == 0,
                      "lora_merge changed a masked-out weight");
        }
    for (size_t e = 0; e < rk; e++) tol_dA[e] = SUM_TOL(m, tol_dA[e] + fabs(dA0[e]));
    for (size_t e = 0; e < mr; e++) tol_dB[e] = SUM_TOL(k, tol_dB[e] + fabs(dB0[e]));
    char what[96];
    snprintf(what, sizeof what, "lora_merge m=%d k=%d r=%d mask=%d", m, k, rank, with_mask);
    compare(what, we[1], we[0], mk, BF16_RTOL, 0.0, tol_w);
    snprintf(what, sizeof what, "lora_merge in place m=%d k=%d r=%d", m, k, rank);
    compare(what, wi[1], wi[0], mk, BF16_RTOL, 0.0, tol_w);
    snprintf(what, sizeof what, "lora_masked_grad dA m=%d k=%d r=%d mask=%d", m, k, rank, with_mask);
    compare(what, dA[1], dA[0], rk, 0.0, 0.0, tol_dA);
    snprintf(what, sizeof what, "lora_masked_grad dB m=%d k=%d r=%d mask=%d", m, k, rank, with_mask);
    compare(what, dB[1], dB[0], mr, 0.0, 0.0, tol_dB);
    free(w), free(A), free(B), free(dw), free(dA0), free(dB0), free(mask);
    free(tol_w), free(tol_dA), free(tol_dB);
    for (int s = 0; s < 2; s++) free(we[s]), free(wi[s]), free(dA[s]), free(dB[s]);
}

TEST(test_cuda_lora_merge_and_masked_grad_match_cpu) {
    GPU_TEST_SETUP(109);
    check_lora_merge_and_masked_grad(bes, r, 1, 64, 4, 2.0f, 1);
    check_lora_merge_and_masked_grad(bes, r, 65, 33, 8, 0.5f, 0);
    check_lora_merge_and_masked_grad(bes, r, 160, 300, 16, 1.0f, 1);
}

/* ---------------------------------------------------------------- optimizer and scores */

/* Same fp32 expressions (FMA contraction aside, a few ulps): 16 u of each quantity's terms.
 * Masked-out entries: p, m, v bit-exact unchanged. */
TEST(test_cuda_adamw_matches_cpu_and_skips_masked_entries) {
    GPU_TEST_SETUP(110);
    const size_t n = 100003;
    const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.01f, gs = 0.5f;
    float *p0 = random_bf16(r, n, 0.0f, 1.0f), *g = random_bf16(r, n, 0.0f, 1.0f);
    float *m0 = random_bf16(r, n, 0.0f, 0.1f), *v0 = random_bf16(r, n, 0.0f, 0.1f);
    for (size_t i = 0; i < n; i++) v0[i] = fabsf(v0[i]);
    uint8_t *mask = random_mask(r, n);
    for (int step = 1; step <= 7; step += 6) {
        float *res[2][3];
        for (int s = 0; s < 2; s++) {
            const rs_backend *be = bes[s];
            float *pd = upload(be, RS_F32, p0, n), *gd = upload(be, RS_F32, g, n);
            float *md = upload(be, RS_F32, m0, n), *vd = upload(be, RS_F32, v0, n);
            void *mk = upload_bytes(be, mask, n);
            be->adamw(pd, gd, md, vd, mk, n, lr, b1, b2, eps, wd, step, gs);
            res[s][0] = download(be, pd, RS_F32, n);
            res[s][1] = download(be, md, RS_F32, n);
            res[s][2] = download(be, vd, RS_F32, n);
            be->free(pd), be->free(gd), be->free(md), be->free(vd), be->free(mk);
        }
        double *tp = zeros_d(n), *tm = zeros_d(n), *tv = zeros_d(n);
        size_t changed = 0;
        for (size_t i = 0; i < n; i++) {
            double gi = (double)g[i] * gs;
            tm[i] = 16 * F32_U * (fabs(b1 * m0[i]) + fabs((1 - b1) * gi));
            tv[i] = 16 * F32_U * (fabs(b2 * v0[i]) + fabs((1 - b2) * gi * gi));
            double ratio = fabs(res[0][1][i] / (1 - pow(b1, step))) /
                           (sqrt(res[0][2][i] / (1 - pow(b2, step))) + eps);
            tp[i] = 16 * F32_U * (fabs(p0[i]) + lr * (ratio + wd * fabs(p0[i])));
            if (!mask[i])
                changed += memcmp(&res[1][0][i], &p0[i], 4) || memcmp(&res[1][1][i], &m0[i], 4) ||
                           memcmp(&res[1][2][i], &v0[i], 4);
        }
        CHECK(changed == 0, "adamw step %d: %zu masked-out entries changed", step, changed);
        compare("adamw p", res[1][0], res[0][0], n, 0.0, 0.0, tp);
        compare("adamw m", res[1][1], res[0][1], n, 0.0, 0.0, tm);
        compare("adamw v", res[1][2], res[0][2], n, 0.0, 0.0, tv);
        free(tp), free(tm), free(tv);
        for (int s = 0; s < 2; s++)
            for (int o = 0; o < 3; o++) free(res[s][o]);
    }
    free(p0), free(g), free(m0), free(v0), free(mask);
}

/* Double sums of positive fp32 squares in different orders: the error is at most 2^-53 times
 * the longest chain of adds (CPU: 4096 per chunk + 733 chunks; GPU: ~12 per thread + two trees
 * of depth 10), ~6e-13 relative; 1e-10 allowed. Two GPU runs: the same bits. */
TEST(test_cuda_sum_squares_matches_cpu_and_is_deterministic) {
    GPU_TEST_SETUP(111);
    const size_t sizes[] = {1, 5, 4097, 3000017};
    for (int si = 0; si < 4; si++) {
        size_t n = sizes[si];
        float *x = random_bf16(r, n, 0.0f, 2.0f);
        uint8_t *mask = random_mask(r, n);
        for (int with_mask = 0; with_mask < 2; with_mask++) {
            double out[2], again = NAN;
            for (int s = 0; s < 2; s++) {
                const rs_backend *be = bes[s];
                float *xd = upload(be, RS_F32, x, n);
                void *md = with_mask ? upload_bytes(be, mask, n) : NULL;
                out[s] = NAN;
                be->sum_squares(&out[s], xd, md, n);
                if (s == 1) {
                    again = NAN;
                    be->sum_squares(&again, xd, md, n);
                    CHECK(memcmp(&again, &out[1], sizeof again) == 0,
                          "sum_squares n=%zu: two runs differ (%.17g, %.17g)", n, out[1], again);
                }
                be->free(xd), be->free(md);
            }
            CHECK(fabs(out[1] - out[0]) <= 1e-10 * out[0] + 1e-300,
                  "sum_squares n=%zu mask=%d: cuda %.17g, cpu %.17g", n, with_mask, out[1], out[0]);
        }
        free(x), free(mask);
    }
}

/* score += weight |w dw|: the same fp32 products (FMA aside): 4 u of the terms. zero_f32: every
 * value 0 after NaN poisoning. */
TEST(test_cuda_snip_accumulate_and_zero_match_cpu) {
    GPU_TEST_SETUP(112);
    const size_t n = 70001;
    float *w = random_bf16(r, n, 0.0f, 1.0f), *dw = random_bf16(r, n, 0.0f, 1.0f);
    float *s0 = random_bf16(r, n, 1.0f, 0.1f), *res[2];
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *wd = upload(be, WT(be), w, n);
        float *dwd = upload(be, RS_F32, dw, n), *sd = upload(be, RS_F32, s0, n);
        be->snip_accumulate(sd, wd, dwd, n, 0.25f);
        res[s] = download(be, sd, RS_F32, n);
        be->free(wd), be->free(dwd), be->free(sd);
    }
    double *tol = zeros_d(n);
    for (size_t i = 0; i < n; i++) tol[i] = 4 * F32_U * (fabs(s0[i]) + 0.25 * fabs(w[i] * dw[i]));
    compare("snip_accumulate", res[1], res[0], n, 0.0, 0.0, tol);
    float *z = upload_nan(gpu, RS_F32, n);
    gpu->zero_f32(z, n);
    float *zh = download(gpu, z, RS_F32, n);
    size_t nonzero = 0;
    for (size_t i = 0; i < n; i++) nonzero += zh[i] != 0.0f;
    CHECK(nonzero == 0, "zero_f32 left %zu values", nonzero);
    gpu->free(z);
    free(w), free(dw), free(s0), free(res[0]), free(res[1]), free(tol), free(zh);
}

/* clamp_f32: the CPU's values bit for bit (boxes around, below and above the values, some
 * empty). */
TEST(test_cuda_clamp_f32_matches_cpu) {
    GPU_TEST_SETUP(117);
    const size_t n = 70001;
    float *x = random_bf16(r, n, 0.0f, 1.0f), *lo = random_bf16(r, n, 0.0f, 0.5f);
    float *hi = random_bf16(r, n, 0.0f, 0.5f), *res[2];
    for (size_t i = 0; i < n; i++) hi[i] = i % 7 == 0 ? lo[i] : lo[i] + fabsf(hi[i]);
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        float *xd = upload(be, RS_F32, x, n), *lod = upload(be, RS_F32, lo, n);
        float *hid = upload(be, RS_F32, hi, n);
        be->clamp_f32(xd, lod, hid, n);
        res[s] = download(be, xd, RS_F32, n);
        be->free(xd), be->free(lod), be->free(hid);
    }
    CHECK(memcmp(res[0], res[1], n * sizeof(float)) == 0, "clamp_f32: cuda differs from cpu");
    free(x), free(lo), free(hi), free(res[0]), free(res[1]);
}

/* The CPU's fp32 expressions exactly (IEEE divide, rintf); the GPU stores bf16, so its output must
 * equal the CPU's value rounded to bf16, bit for bit. Rows: random, constant, all zero, one sign;
 * whole rows and the [rows * cols / G, G] views of QAT groups (G = 32, 128). */
TEST(test_cuda_fake_quant_rows_matches_cpu_rounded_to_bf16) {
    GPU_TEST_SETUP(113);
    const int rows = 9, cols = 1024;
    size_t n = (size_t)rows * cols;
    float *w = rs_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) w[i] = 0.05f * rs_rng_normal(r);
    for (int l = 0; l < cols; l++) {
        w[(size_t)1 * cols + l] = 0.125f, w[(size_t)2 * cols + l] = 0.0f;
        w[(size_t)3 * cols + l] = fabsf(w[(size_t)3 * cols + l]) + 0.01f;
        w[(size_t)4 * cols + l] = -fabsf(w[(size_t)4 * cols + l]);
    }
    const int groups[] = {cols, 32, 128};
    for (int k = 0; k < 3; k++)
        for (int bits = 2; bits <= 8; bits += 2)
            for (int sym = 0; sym < 2; sym++) {
                int g = groups[k], views = (int)(n / (size_t)g);
                float *want = rs_malloc(n * sizeof(float));
                cpu->fake_quant_rows(want, w, views, g, bits, sym);
                float *wd = upload(gpu, RS_F32, w, n);
                void *qd = upload_nan(gpu, WT(gpu), n);
                gpu->fake_quant_rows(qd, wd, views, g, bits, sym);
                float *got = download(gpu, qd, WT(gpu), n);
                size_t bad = 0;
                for (size_t i = 0; i < n; i++) {
                    float wb = round_bf16(want[i]);
                    if (memcmp(&wb, &got[i], 4) != 0 && bad++ < 5)
                        fprintf(stderr,
                                "fake_quant g=%d bits=%d sym=%d [%zu]: cuda %.9g, cpu %.9g\n", g,
                                bits, sym, i, got[i], want[i]);
                }
                CHECK(bad == 0, "fake_quant_rows group=%d bits=%d symmetric=%d: %zu values differ",
                      g, bits, sym, bad);
                gpu->free(wd), gpu->free(qd);
                free(want), free(got);
            }
    free(w);
}

/* The same counter-based stream: the same elements dropped (x has no zeros, so a zero output
 * means dropped), kept ones x / (1 - p) rounded once to bf16; in place (out = x) the same. */
TEST(test_cuda_dropout_matches_cpu) {
    GPU_TEST_SETUP(114);
    const size_t n = 100003;
    float *x = random_bf16(r, n, 0.0f, 1.0f);
    for (size_t i = 0; i < n; i++)
        if (x[i] == 0.0f) x[i] = 1.0f;
    const float ps[] = {0.0f, 0.1f, 0.5f};
    for (int pi = 0; pi < 3; pi++) {
        uint64_t seed = rs_rng_next(r);
        float *res[2], *inplace = NULL;
        for (int s = 0; s < 2; s++) {
            const rs_backend *be = bes[s];
            void *xd = upload(be, ACT(be), x, n), *od = upload_nan(be, ACT(be), n);
            be->dropout(od, xd, n, ps[pi], seed);
            res[s] = download(be, od, ACT(be), n);
            if (s == 1) {
                be->dropout(xd, xd, n, ps[pi], seed);
                inplace = download(be, xd, ACT(be), n);
            }
            be->free(xd), be->free(od);
        }
        size_t mismatch = 0;
        for (size_t i = 0; i < n; i++) mismatch += (res[0][i] == 0.0f) != (res[1][i] == 0.0f);
        CHECK(mismatch == 0, "dropout p=%g: %zu elements kept on one side only", ps[pi], mismatch);
        compare("dropout", res[1], res[0], n, BF16_RTOL, 0.0, NULL);
        compare("dropout in place", inplace, res[1], n, 0.0, 0.0, NULL);
        free(res[0]), free(res[1]), free(inplace);
    }
    free(x);
}
