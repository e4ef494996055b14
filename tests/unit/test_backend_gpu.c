/* CUDA backend against the CPU reference: each forward op on random inputs, several shapes (odd
 * sizes, GQA, padding, a KV cache longer than the queries). Outputs are poisoned with NaN before
 * the op, so an element the kernel forgets to write fails.
 *
 * Without a CUDA device (or a CPU build) every test prints "skip: ..." and passes at once, so the
 * default `make test` is unaffected. Under RESAFE_TEST_GPU=1 (`make test-gpu`) a missing device
 * or reference backend is a failure: a GPU run that checked nothing must not look green.
 *
 * Tolerances. Inputs are rounded to bf16 on the host first, so both backends see identical
 * values. The CPU computes in fp32 and keeps fp32 outputs; the CUDA backend computes in fp32 and
 * rounds each output once to bf16 (8 significant bits: relative error <= u = 2^-8). The other
 * differences are fp32 summation order and transcendental ulps (delta below). Since
 * |bf16(y_gpu) - y_cpu| <= u |y_gpu| + delta <= u |y_cpu| + (1 + u) delta, every tolerance is
 * rtol |cpu| + atol_i with rtol = 2^-7 (twice u: the rounding plus room for any delta up to
 * 2^-8 relative, which covers every op's fp32 differences except long sums) and, where a sum
 * can be long (linear, attention), an op-specific absolute term bounding delta. */
#include "resafe/backend.h"
#include "resafe/core.h"
#include "test.h"
#include "gpu_test_buffers.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BF16_RTOL (1.0f / 128.0f) /* 2^-7 = twice bf16's unit roundoff 2^-8 */
#define F32_U (1.0 / 16777216.0)  /* 2^-24, fp32 unit roundoff */

/* ---------------------------------------------------------------- backends and buffers */

static int gpu_run_required(void) {
    const char *s = getenv("RESAFE_TEST_GPU");
    return s && strcmp(s, "1") == 0;
}

/* 1 when the test can run; else prints a skip (or fails under RESAFE_TEST_GPU=1) and gives 0. */
static int backends_ready(const rs_backend *cpu, const rs_backend *gpu, int need_cpu) {
    const char *missing = !gpu ? "no CUDA device" : need_cpu && !cpu ? "no CPU reference backend"
                                                                     : NULL;
    if (!missing) return 1;
    if (gpu_run_required())
        CHECK(0, "RESAFE_TEST_GPU=1 but %s (built without CUDA, or no GPU visible)", missing);
    else
        printf("skip: %s\n", missing);
    return 0;
}

#define GPU_TEST_SETUP(need_cpu)                                                                   \
    const rs_backend *cpu = rs_backend_cpu(), *gpu = rs_backend_cuda();                            \
    if (!backends_ready(cpu, gpu, need_cpu)) return;                                               \
    (void)cpu

static void seeded_rng(rs_rng *r, uint64_t salt) {
    rs_rng_seed(r, rs_test_seed() * 0x9e3779b97f4a7c15ull + salt);
}

/* |got - want| <= rtol |want| + atol + atol_i[i] (atol_i may be NULL), NaN failing. Prints the
 * first few offenders and counts all of them as one CHECK failure. */
static void compare(const char *what, const float *got, const float *want, size_t n, double rtol,
                    double atol, const double *atol_i) {
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
}

/* ---------------------------------------------------------------- memory and conversions */

TEST(test_cuda_upload_download_round_to_nearest_even_like_the_host) {
    GPU_TEST_SETUP(0);
    rs_rng r;
    seeded_rng(&r, 1);
    size_t n = ((size_t)1 << 21) + 12345; /* more than one staging chunk */
    float *x = rs_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = 3.0f * rs_rng_normal(&r);
    x[0] = NAN, x[1] = INFINITY, x[2] = -INFINITY, x[3] = 0.0f, x[4] = -0.0f;
    x[5] = 1.0f + 1.0f / 256; /* a tie: rounds to even (1.0) */
    const rs_dtype types[] = {RS_F32, RS_BF16, RS_F16};
    for (int ti = 0; ti < 3; ti++) {
        rs_dtype t = types[ti];
        void *d = upload(gpu, t, x, n);
        float *back = download(gpu, d, t, n);
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) {
            float want = t == RS_F32    ? x[i]
                         : t == RS_BF16 ? round_bf16(x[i])
                                        : rs_f16_to_f32(rs_f32_to_f16(x[i]));
            int same = isnan(want) ? isnan(back[i]) : memcmp(&want, &back[i], sizeof want) == 0;
            if (!same && bad++ < 5)
                fprintf(stderr, "%s [%zu]: %.9g -> %.9g, host rounding gives %.9g\n",
                        rs_dtype_name(t), i, x[i], back[i], want);
        }
        CHECK(bad == 0, "%s: %zu of %zu values differ from the host conversion", rs_dtype_name(t),
              bad, n);
        free(back);
        gpu->free(d);
    }
    free(x);
}

TEST(test_cuda_copies_and_act_to_f32_are_exact) {
    GPU_TEST_SETUP(0);
    rs_rng r;
    seeded_rng(&r, 2);
    size_t n = 100003;
    float *x = random_bf16(&r, n, 0.0f, 10.0f);
    void *a = upload(gpu, gpu->act_dtype, x, n);
    void *b = gpu->alloc(n * rs_dtype_size(gpu->act_dtype));
    gpu->copy(b, a, n * rs_dtype_size(gpu->act_dtype));
    float *f = upload_nan(gpu, RS_F32, n);
    gpu->act_to_f32(f, b, n);
    float *got = rs_malloc(n * sizeof(float));
    gpu->to_host(got, f, n * sizeof(float));
    compare("copy then act_to_f32", got, x, n, 0.0, 0.0, NULL);

    uint8_t *bytes = rs_malloc(4097), *back = rs_malloc(4097);
    for (int i = 0; i < 4097; i++) bytes[i] = (uint8_t)rs_rng_next(&r);
    void *d = upload_bytes(gpu, bytes, 4097);
    gpu->to_host(back, d, 4097);
    CHECK(memcmp(bytes, back, 4097) == 0, "to_device then to_host changed the bytes");
    gpu->synchronize();
    free(bytes), free(back), free(got), free(x);
    gpu->free(a), gpu->free(b), gpu->free(f), gpu->free(d);
}

/* ---------------------------------------------------------------- embedding */

static void check_embedding(const rs_backend *cpu, const rs_backend *gpu, rs_rng *r, int n,
                            int dim, int vocab, float scale) {
    float *table = random_bf16(r, (size_t)vocab * dim, 0.0f, 1.0f);
    int32_t *ids = rs_malloc(n * sizeof(int32_t));
    for (int i = 0; i < n; i++) ids[i] = (int32_t)(rs_rng_next(r) % (uint64_t)vocab);
    ids[n - 1] = vocab - 1;
    float *want, *got;
    const rs_backend *bes[2] = {cpu, gpu};
    float **outs[2] = {&want, &got};
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *t = upload(be, be->weight_dtype, table, (size_t)vocab * dim);
        void *id = upload_bytes(be, ids, n * sizeof(int32_t));
        void *out = upload_nan(be, be->act_dtype, (size_t)n * dim);
        be->embedding_fwd(out, t, id, n, dim, scale);
        *outs[s] = download(be, out, be->act_dtype, (size_t)n * dim);
        be->free(t), be->free(id), be->free(out);
    }
    char what[96];
    snprintf(what, sizeof what, "embedding n=%d dim=%d scale=%g", n, dim, scale);
    /* scale 1: a copy, exact; else the same fp32 product, rounded once to bf16 (<= 2^-8) */
    compare(what, got, want, (size_t)n * dim, scale == 1.0f ? 0.0 : BF16_RTOL, 0.0, NULL);
    free(table), free(ids), free(want), free(got);
}

TEST(test_cuda_embedding_matches_cpu) {
    GPU_TEST_SETUP(1);
    rs_rng r;
    seeded_rng(&r, 3);
    check_embedding(cpu, gpu, &r, 1, 64, 10, 1.0f);
    check_embedding(cpu, gpu, &r, 7, 33, 50, 1.0f);
    check_embedding(cpu, gpu, &r, 19, 257, 100, sqrtf(257.0f));
}

/* ---------------------------------------------------------------- rmsnorm */

/* out = x * rstd * w: rstd comes from a sum of dim positive terms (fp32 on the GPU: relative
 * error <= dim 2^-24, 2.4e-4 at dim 4096; double on the CPU), the rest is two products; inside
 * rtol's 2^-8 of room. rstd itself is fp32: (dim + 4) 2^-24 relative, doubled. */
static void check_rmsnorm(const rs_backend *cpu, const rs_backend *gpu, rs_rng *r, int n, int dim,
                          float eps, int add_one, int with_rstd) {
    size_t nd = (size_t)n * dim;
    float *x = random_bf16(r, nd, 0.0f, 1.0f);
    for (int d = 0; d < dim; d++) x[d] = round_bf16(x[d] * 50.0f); /* one row of large scale */
    float *w = random_bf16(r, dim, add_one ? 0.0f : 1.0f, 0.2f);
    float *want, *got, *rstd_want = nan_array(n), *rstd_got = nan_array(n);
    const rs_backend *bes[2] = {cpu, gpu};
    float **outs[2] = {&want, &got};
    float *rstds[2] = {rstd_want, rstd_got};
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *xd = upload(be, be->act_dtype, x, nd), *wd = upload(be, be->weight_dtype, w, dim);
        void *out = upload_nan(be, be->act_dtype, nd);
        float *rstd = with_rstd ? upload_nan(be, RS_F32, n) : NULL;
        be->rmsnorm_fwd(out, rstd, xd, wd, n, dim, eps, add_one);
        *outs[s] = download(be, out, be->act_dtype, nd);
        if (rstd) be->to_host(rstds[s], rstd, n * sizeof(float));
        be->free(xd), be->free(wd), be->free(out), be->free(rstd);
    }
    char what[96];
    snprintf(what, sizeof what, "rmsnorm n=%d dim=%d add_one=%d", n, dim, add_one);
    compare(what, got, want, nd, BF16_RTOL, 1e-6, NULL);
    if (with_rstd) {
        snprintf(what, sizeof what, "rmsnorm rstd n=%d dim=%d", n, dim);
        compare(what, rstd_got, rstd_want, n, 2.0 * (dim + 4) * F32_U, 0.0, NULL);
    }
    free(x), free(w), free(want), free(got), free(rstd_want), free(rstd_got);
}

TEST(test_cuda_rmsnorm_matches_cpu) {
    GPU_TEST_SETUP(1);
    rs_rng r;
    seeded_rng(&r, 4);
    check_rmsnorm(cpu, gpu, &r, 1, 64, 1e-5f, 0, 1);
    check_rmsnorm(cpu, gpu, &r, 5, 127, 1e-6f, 0, 0);
    check_rmsnorm(cpu, gpu, &r, 17, 1000, 1e-6f, 1, 1);
    check_rmsnorm(cpu, gpu, &r, 3, 4096, 1e-5f, 0, 1);
}

/* ---------------------------------------------------------------- linear */

typedef struct {
    int n, k, m, bias;
    float beta;
} linear_case;

/* Per element: the fp32 sums of k products differ by at most (k-1) u sum|x w| on each side for
 * any summation order (tensor cores may truncate: 2u per add), so 4 k u * absmag covers both,
 * absmag = sum|x w| + |bias| + |beta out0|. With a bias and beta != 0 the CUDA backend rounds
 * beta out0 + bias to bf16 before the GEMM: one more 2^-8 (|bias| + |beta out0|). And with
 * beta != 0 cuBLAS rounds the product to bf16 before adding beta * C (seen on an H100,
 * 2026-11-23: linear and linear_bwd with beta = 1 both exceeded the one-rounding bound by the size
 * of a bf16 rounding of sum|x w|): 2^-8 sum|x w| more. */
static double *linear_tolerances(const linear_case *c, const float *x, const float *w,
                                 const float *bias, const float *out0) {
    double *tol = rs_malloc((size_t)c->n * c->m * sizeof(double));
    for (int i = 0; i < c->n; i++)
        for (int j = 0; j < c->m; j++) {
            double mag = 0;
            for (int p = 0; p < c->k; p++)
                mag += fabs((double)x[(size_t)i * c->k + p] * w[(size_t)j * c->k + p]);
            double extra = (bias ? fabs(bias[j]) : 0) + fabs(c->beta * out0[(size_t)i * c->m + j]);
            mag += extra;
            tol[(size_t)i * c->m + j] =
                4.0 * (c->k + 2) * F32_U * mag + (bias && c->beta != 0 ? extra / 256.0 : 0) +
                (c->beta != 0 ? (mag - extra) / 256.0 : 0);
        }
    return tol;
}

static void check_linear(const rs_backend *cpu, const rs_backend *gpu, rs_rng *r,
                         const linear_case *c) {
    size_t nk = (size_t)c->n * c->k, mk = (size_t)c->m * c->k, nm = (size_t)c->n * c->m;
    float *x = random_bf16(r, nk, 0.0f, 1.0f);
    float *w = random_bf16(r, mk, 0.0f, 1.0f / sqrtf((float)c->k));
    float *bias = c->bias ? random_bf16(r, c->m, 0.0f, 1.0f) : NULL;
    float *out0 = random_bf16(r, nm, 0.0f, 1.0f);
    float *want, *got;
    const rs_backend *bes[2] = {cpu, gpu};
    float **outs[2] = {&want, &got};
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *xd = upload(be, be->act_dtype, x, nk), *wd = upload(be, be->weight_dtype, w, mk);
        void *bd = bias ? upload(be, be->weight_dtype, bias, c->m) : NULL;
        /* beta = 0: out must not be read, so it starts as NaN */
        void *out = c->beta != 0 ? upload(be, be->act_dtype, out0, nm)
                                 : upload_nan(be, be->act_dtype, nm);
        be->linear_fwd(out, xd, wd, bd, c->n, c->k, c->m, c->beta);
        *outs[s] = download(be, out, be->act_dtype, nm);
        be->free(xd), be->free(wd), be->free(bd), be->free(out);
    }
    double *tol = linear_tolerances(c, x, w, bias, out0);
    char what[96];
    snprintf(what, sizeof what, "linear n=%d k=%d m=%d bias=%d beta=%g", c->n, c->k, c->m,
             c->bias, c->beta);
    compare(what, got, want, nm, BF16_RTOL, 0.0, tol);
    free(x), free(w), free(bias), free(out0), free(want), free(got), free(tol);
}

TEST(test_cuda_linear_matches_cpu) {
    GPU_TEST_SETUP(1);
    rs_rng r;
    seeded_rng(&r, 5);
    const linear_case cases[] = {
        {1, 64, 64, 0, 0.0f},   {7, 33, 65, 1, 0.0f},  {33, 129, 257, 0, 1.0f},
        {64, 256, 96, 1, 1.0f}, {5, 1000, 17, 1, 0.0f}, {128, 512, 384, 0, 0.0f},
        {3, 2, 5, 0, 1.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_linear(cpu, gpu, &r, &cases[i]);
}

/* ---------------------------------------------------------------- rope */

/* The angle pos * inv_freq is one fp32 product (a side computing it in double differs by
 * <= |angle| u); sin/cos differ by a few ulps (<= 2^-22 each). Each output is x1 cos -+ x2 sin,
 * so the absolute difference is <= (|angle| 2^-24 + 2^-21)(|x1| + |x2|); tolerance 4x that. */
static void check_rope(const rs_backend *cpu, const rs_backend *gpu, rs_rng *r, int n_tok,
                       int n_heads, int head_dim, float theta) {
    int half = head_dim / 2;
    size_t nx = (size_t)n_tok * n_heads * head_dim;
    float *x = random_bf16(r, nx, 0.0f, 1.0f);
    float *inv_freq = rs_malloc(half * sizeof(float));
    for (int i = 0; i < half; i++) inv_freq[i] = (float)pow(theta, -2.0 * i / head_dim);
    int32_t *pos = rs_malloc(n_tok * sizeof(int32_t));
    for (int t = 0; t < n_tok; t++) pos[t] = (int32_t)(rs_rng_next(r) % 4096);
    pos[0] = 0;
    if (n_tok > 2) pos[n_tok - 1] = -1, pos[1] = 4095;
    float *want, *got;
    const rs_backend *bes[2] = {cpu, gpu};
    float **outs[2] = {&want, &got};
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *xd = upload(be, be->act_dtype, x, nx);
        void *pd = upload_bytes(be, pos, n_tok * sizeof(int32_t));
        void *fd = upload_bytes(be, inv_freq, half * sizeof(float));
        be->rope_fwd(xd, pd, fd, n_tok, n_heads, head_dim);
        *outs[s] = download(be, xd, be->act_dtype, nx);
        be->free(xd), be->free(pd), be->free(fd);
    }
    double *tol = rs_malloc(nx * sizeof(double));
    for (size_t e = 0; e < nx; e++) {
        size_t row = e / head_dim, i = e % head_dim, i0 = i % half;
        int32_t p = pos[row / n_heads];
        double angle = p < 0 ? 0.0 : fabs((double)p * inv_freq[i0]);
        double mag = fabs(x[row * head_dim + i0]) + fabs(x[row * head_dim + i0 + half]);
        tol[e] = 4.0 * (angle * F32_U + 2.0 * F32_U * 4.0) * mag;
        if (p < 0) { /* padded token: untouched, bit for bit */
            CHECK(memcmp(&got[e], &x[e], sizeof(float)) == 0,
                  "rope: padded token %zu changed: %g -> %g", row / n_heads, x[e], got[e]);
        }
    }
    char what[96];
    snprintf(what, sizeof what, "rope n_tok=%d n_heads=%d head_dim=%d", n_tok, n_heads, head_dim);
    compare(what, got, want, nx, BF16_RTOL, 0.0, tol);
    free(x), free(inv_freq), free(pos), free(want), free(got), free(tol);
}

TEST(test_cuda_rope_matches_cpu) {
    GPU_TEST_SETUP(1);
    rs_rng r;
    seeded_rng(&r, 6);
    check_rope(cpu, gpu, &r, 1, 1, 2, 10000.0f);
    check_rope(cpu, gpu, &r, 9, 4, 64, 10000.0f);
    check_rope(cpu, gpu, &r, 13, 3, 128, 500000.0f);
    check_rope(cpu, gpu, &r, 5, 7, 96, 1000000.0f);
}

/* ---------------------------------------------------------------- attention */

typedef struct {
    int B, Tq, Tk, n_heads, n_kv_heads, head_dim, pad;
    float scale; /* 0: 1/sqrt(head_dim) */
} attention_case;

/* Positions for one batch: sequence b has L_b valid keys (rows 0..L_b-1) and its valid queries
 * are the last ones of those positions. With pad, even sequences end with Tq/3 padded queries,
 * odd ones start with Tq/4 (left padding), and with Tq = 1 every third sequence is all padding
 * (a finished sequence in a decode batch). Returns L_b per sequence in key_len. */
static int32_t *attention_positions(const attention_case *c, rs_rng *r, int *key_len) {
    int32_t *q_pos = rs_malloc((size_t)c->B * c->Tq * sizeof(int32_t));
    for (int b = 0; b < c->B; b++) {
        int lp = 0, tp = 0;
        if (c->pad) {
            if (b % 2 == 0) tp = c->Tq / 3;
            else lp = c->Tq / 4;
            if (c->Tq == 1 && b % 3 == 2) lp = 1;
        }
        int n_valid = c->Tq - lp - tp;
        int L = n_valid + (int)(rs_rng_next(r) % (uint64_t)(c->Tk - n_valid + 1));
        if (b == 0) L = c->Tk; /* one sequence uses the whole cache */
        if (n_valid == 0) L = 0;
        key_len[b] = L;
        for (int t = 0; t < c->Tq; t++)
            q_pos[b * c->Tq + t] = t < lp || t >= c->Tq - tp ? -1 : L - n_valid + (t - lp);
    }
    return q_pos;
}

/* Per output element of a valid query: a score s = scale q.k is an fp32 dot product, off by at
 * most D u scale sum|q k| on each side; perturbing the scores by <= delta moves the softmax
 * weights by a factor within exp(+-delta) and the output, a convex combination of v rows, by
 * <= 2 delta max|v|. Both sides: 4 D u smax max|v|, with smax = scale max_j sum_d |q_d k_jd|.
 * exp ulps and the normaliser's sum of Tk terms add (Tk + 4) u each side. Tolerance 2x. */
static double *attention_tolerances(const attention_case *c, const float *q, const float *k,
                                    const float *v, const int32_t *q_pos) {
    int D = c->head_dim, group = c->n_heads / c->n_kv_heads;
    size_t n_out = (size_t)c->B * c->Tq * c->n_heads * D;
    double *tol = rs_calloc(n_out, sizeof(double));
    for (int b = 0; b < c->B; b++)
        for (int t = 0; t < c->Tq; t++)
            for (int h = 0; h < c->n_heads; h++) {
                int p = q_pos[b * c->Tq + t], hk = h / group;
                const float *qr = q + (((size_t)b * c->Tq + t) * c->n_heads + h) * D;
                double smax = 0, vmax = 0;
                for (int j = 0; j <= p; j++) {
                    size_t kv = (((size_t)b * c->Tk + j) * c->n_kv_heads + hk) * D;
                    double s = 0;
                    for (int d = 0; d < D; d++) {
                        s += fabs((double)qr[d] * k[kv + d]);
                        if (fabs(v[kv + d]) > vmax) vmax = fabs(v[kv + d]);
                    }
                    if (s > smax) smax = s;
                }
                double t_row = 2.0 * (4.0 * D * F32_U * c->scale * smax +
                                      2.0 * (c->Tk + 4) * F32_U) * vmax;
                for (int d = 0; d < D; d++)
                    tol[(((size_t)b * c->Tq + t) * c->n_heads + h) * D + d] = t_row;
            }
    return tol;
}

/* The two sides get the same q, k, v except the cache rows no query may attend (j >= L_b): zero
 * on the CPU, NaN on the GPU, so a kernel reading past a query's position fails. */
static void run_attention(const rs_backend *be, const attention_case *c, const float *q,
                          const float *k, const float *v, const int32_t *q_pos, float **out) {
    size_t nq = (size_t)c->B * c->Tq * c->n_heads * c->head_dim;
    size_t nkv = (size_t)c->B * c->Tk * c->n_kv_heads * c->head_dim;
    void *qd = upload(be, be->act_dtype, q, nq), *kd = upload(be, be->act_dtype, k, nkv);
    void *vd = upload(be, be->act_dtype, v, nkv);
    void *pd = upload_bytes(be, q_pos, (size_t)c->B * c->Tq * sizeof(int32_t));
    void *od = upload_nan(be, be->act_dtype, nq);
    be->attention_fwd(od, qd, kd, vd, pd, c->B, c->Tq, c->Tk, c->n_heads, c->n_kv_heads,
                      c->head_dim, c->scale);
    *out = download(be, od, be->act_dtype, nq);
    be->free(qd), be->free(kd), be->free(vd), be->free(pd), be->free(od);
}

/* mode: the value of RESAFE_CUDA_ATTENTION for the GPU side ("fused": the online-softmax
 * kernel; "gemm": the tensor-core path where the shape takes it, see rs_cuda_attention_gemm_fits
 * in kernels/attention_gemm.cu: Tq >= 16, Tk <= 4 Tq, head_dim % 8 == 0; "flash":
 * kernels/attention_flash.cu where it fits: Tq >= 16, head_dim 64 or 128). Both tensor-core
 * paths round the probabilities to bf16 before P V (as FlashAttention does): each weight is off
 * by at most u_bf16 = 2^-8 relative, the output by u_bf16 sum_j P_j |v_j| <= u_bf16 max|v|; 2x
 * that is added to the tolerance in those modes. */
static void check_attention(const rs_backend *cpu, const rs_backend *gpu, rs_rng *r,
                            attention_case c, const char *mode) {
    if (c.scale == 0.0f) c.scale = 1.0f / sqrtf((float)c.head_dim);
    int D = c.head_dim, key_len[64];
    REQUIRE(c.B <= 64 && c.Tq <= c.Tk, "bad test case");
    size_t nq = (size_t)c.B * c.Tq * c.n_heads * D, nkv = (size_t)c.B * c.Tk * c.n_kv_heads * D;
    float *q = random_bf16(r, nq, 0.0f, 1.0f), *k = random_bf16(r, nkv, 0.0f, 1.0f);
    float *v = random_bf16(r, nkv, 0.0f, 1.0f);
    int32_t *q_pos = attention_positions(&c, r, key_len);
    float *k_gpu = rs_malloc(nkv * sizeof(float)), *v_gpu = rs_malloc(nkv * sizeof(float));
    for (int b = 0; b < c.B; b++)
        for (int j = 0; j < c.Tk; j++)
            for (size_t e = 0; e < (size_t)c.n_kv_heads * D; e++) {
                size_t i = ((size_t)b * c.Tk + j) * c.n_kv_heads * D + e;
                int unused = j >= key_len[b];
                k_gpu[i] = unused ? NAN : k[i], v_gpu[i] = unused ? NAN : v[i];
                if (unused) k[i] = v[i] = 0.0f;
            }
    float *want, *got;
    run_attention(cpu, &c, q, k, v, q_pos, &want);
    setenv("RESAFE_CUDA_ATTENTION", mode, 1);
    run_attention(gpu, &c, q, k_gpu, v_gpu, q_pos, &got);
    unsetenv("RESAFE_CUDA_ATTENTION");
    double *tol = attention_tolerances(&c, q, k, v, q_pos);
    if (strcmp(mode, "gemm") == 0 || strcmp(mode, "flash") == 0) {
        double vmax = 0;
        for (size_t i = 0; i < nkv; i++) vmax = fabs(v[i]) > vmax ? fabs(v[i]) : vmax;
        for (size_t i = 0; i < nq; i++) tol[i] += 2.0 * vmax / 256.0;
    }
    char what[160];
    snprintf(what, sizeof what, "attention (%s) B=%d Tq=%d Tk=%d heads=%d/%d D=%d pad=%d", mode,
             c.B, c.Tq, c.Tk, c.n_heads, c.n_kv_heads, D, c.pad);
    compare(what, got, want, nq, BF16_RTOL, 0.0, tol);
    for (int row = 0; row < c.B * c.Tq; row++)
        if (q_pos[row] < 0)
            for (size_t e = 0; e < (size_t)c.n_heads * D; e++)
                CHECK(got[(size_t)row * c.n_heads * D + e] == 0.0f,
                      "%s: padded query %d not zero", what, row);
    free(q), free(k), free(v), free(k_gpu), free(v_gpu), free(q_pos), free(want), free(got),
        free(tol);
}

/* argmax_rows on the GPU (bf16 rows) equals the CPU op on the same (bf16-exact) values: the
 * first index of the maximum. Rows with a repeated maximum (ties at random places), a NaN at
 * index 0 (the host loop's answer is 0) and NaNs elsewhere, a constant row, odd widths. */
TEST(test_cuda_argmax_rows_matches_cpu) {
    GPU_TEST_SETUP(1);
    rs_rng r;
    seeded_rng(&r, 11);
    const int dims[4] = {1, 37, 1000, 32001};
    for (int di = 0; di < 4; di++) {
        int dim = dims[di], rows = 9;
        size_t n = (size_t)rows * dim;
        float *x = random_bf16(&r, n, 0.0f, 2.0f);
        for (int row = 0; row < rows && dim > 2; row++) {
            float *xr = x + (size_t)row * dim;
            int a = (int)(rs_rng_next(&r) % (uint64_t)dim), b = (int)(rs_rng_next(&r) % (uint64_t)dim);
            if (row % 3 == 0) xr[a] = xr[b] = 50.0f; /* a tie between two places */
            if (row == 1) xr[0] = NAN;
            if (row == 2) xr[b] = NAN;
            if (row == 4)
                for (int i = 0; i < dim; i++) xr[i] = 1.5f;
        }
        int32_t want[9], got[9];
        for (int i = 0; i < rows; i++) got[i] = -7;
        void *xc = upload(cpu, cpu->act_dtype, x, n), *xg = upload(gpu, gpu->act_dtype, x, n);
        void *ic = cpu->alloc(sizeof want), *ig = upload_bytes(gpu, got, sizeof got);
        cpu->argmax_rows(ic, xc, rows, dim);
        gpu->argmax_rows(ig, xg, rows, dim);
        cpu->to_host(want, ic, sizeof want);
        gpu->to_host(got, ig, sizeof got);
        for (int i = 0; i < rows; i++)
            CHECK(got[i] == want[i], "argmax_rows dim %d row %d: cuda %d, cpu %d", dim, i, got[i],
                  want[i]);
        cpu->free(xc), cpu->free(ic), gpu->free(xg), gpu->free(ig), free(x);
    }
}

TEST(test_cuda_attention_matches_cpu) {
    GPU_TEST_SETUP(1);
    rs_rng r;
    seeded_rng(&r, 7);
    const attention_case cases[] = {
        {1, 1, 1, 1, 1, 64, 0, 0.0f},     /* one key */
        {2, 5, 5, 4, 4, 64, 0, 0.0f},     /* prefill, multi-head */
        {3, 1, 37, 8, 2, 128, 1, 0.0f},   /* decode step, GQA 4, one finished sequence */
        {4, 1, 300, 32, 8, 128, 0, 0.0f}, /* decode against a long cache, 10 key tiles */
        {2, 7, 40, 6, 2, 80, 1, 0.0f},    /* chunked prefill Tk > Tq, odd pair count */
        {2, 33, 33, 4, 1, 256, 1, 0.0f},  /* MQA, head_dim 256, left/right padding */
        {1, 17, 70, 2, 1, 32, 0, 0.5f},   /* head_dim 32, sharp softmax (scale 0.5) */
        {2, 64, 100, 3, 3, 96, 1, 0.0f},  /* several query blocks and key tiles */
        {3, 128, 128, 8, 2, 128, 1, 0.0f}, /* training shape, GQA 4 (the GEMM path's case) */
        {2, 50, 61, 4, 4, 64, 1, 0.0f},   /* odd Tq, Tk */
        {2, 200, 260, 4, 2, 128, 1, 0.0f}, /* 4 query blocks, 5 key tiles of the flash kernel */
        {1, 16, 300, 4, 4, 128, 0, 0.0f}, /* a chunk of prefill into a long cache */
        {2, 77, 77, 6, 2, 64, 1, 0.3f},   /* GQA 3, head_dim 64, a sharper softmax */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        check_attention(cpu, gpu, &r, cases[i], "fused");
        check_attention(cpu, gpu, &r, cases[i], "gemm");
        check_attention(cpu, gpu, &r, cases[i], "flash");
    }
}

/* ---------------------------------------------------------------- glu, add, rows */

/* act(g) u with fp32 exp/tanh/erf (a few ulps apart between libraries): where act is small
 * against g (g very negative) the 1 + tanh / 1 + erf cancellation leaves an absolute error of a
 * few ulps of 1 times |g u| / 2, hence 2^-20 |g u| on top of the bf16 rounding. */
static void check_glu(const rs_backend *cpu, const rs_backend *gpu, rs_rng *r, size_t n,
                      rs_activation act) {
    float *g = random_bf16(r, n, 0.0f, 3.0f), *u = random_bf16(r, n, 0.0f, 1.0f);
    float *want, *got;
    const rs_backend *bes[2] = {cpu, gpu};
    float **outs[2] = {&want, &got};
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        void *gd = upload(be, be->act_dtype, g, n), *ud = upload(be, be->act_dtype, u, n);
        void *out = upload_nan(be, be->act_dtype, n);
        be->glu_fwd(out, gd, ud, n, act);
        *outs[s] = download(be, out, be->act_dtype, n);
        be->free(gd), be->free(ud), be->free(out);
    }
    double *tol = rs_malloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) tol[i] = fabs((double)g[i] * u[i]) / 1048576.0 + 1e-30;
    char what[64];
    snprintf(what, sizeof what, "glu n=%zu act=%d", n, (int)act);
    compare(what, got, want, n, BF16_RTOL, 0.0, tol);
    free(g), free(u), free(want), free(got), free(tol);
}

TEST(test_cuda_glu_matches_cpu) {
    GPU_TEST_SETUP(1);
    rs_rng r;
    seeded_rng(&r, 8);
    const rs_activation acts[] = {RS_ACT_SILU, RS_ACT_GELU_TANH, RS_ACT_GELU};
    for (int a = 0; a < 3; a++) {
        check_glu(cpu, gpu, &r, 1, acts[a]);
        check_glu(cpu, gpu, &r, 1001, acts[a]);
        check_glu(cpu, gpu, &r, 65539, acts[a]);
    }
}

/* The same fp32 sum on both sides, rounded once to bf16 on the GPU: <= 2^-8 relative. */
TEST(test_cuda_add_inplace_matches_cpu) {
    GPU_TEST_SETUP(1);
    rs_rng r;
    seeded_rng(&r, 9);
    const size_t sizes[] = {1, 777, 100003};
    for (int si = 0; si < 3; si++) {
        size_t n = sizes[si];
        float *x = random_bf16(&r, n, 0.0f, 1.0f), *y = random_bf16(&r, n, 0.0f, 1.0f);
        y[0] = -x[0]; /* exact cancellation gives exactly 0 */
        float *want, *got;
        const rs_backend *bes[2] = {cpu, gpu};
        float **outs[2] = {&want, &got};
        for (int s = 0; s < 2; s++) {
            const rs_backend *be = bes[s];
            void *xd = upload(be, be->act_dtype, x, n), *yd = upload(be, be->act_dtype, y, n);
            be->add_inplace(xd, yd, n);
            *outs[s] = download(be, xd, be->act_dtype, n);
            be->free(xd), be->free(yd);
        }
        compare("add_inplace", got, want, n, BF16_RTOL, 0.0, NULL);
        free(x), free(y), free(want), free(got);
    }
}

/* Row copies: bit-exact. scatter writes distinct rows (a permutation prefix) and leaves the
 * others as they were; gather may read a row several times. */
static void check_rows(const rs_backend *cpu, const rs_backend *gpu, rs_rng *r, int n, int n_dst,
                       int dim) {
    float *src = random_bf16(r, (size_t)n_dst * dim, 0.0f, 1.0f);
    float *dst0 = random_bf16(r, (size_t)n_dst * dim, 0.0f, 1.0f);
    int32_t *perm = rs_malloc(n_dst * sizeof(int32_t)), *rows = rs_malloc(n * sizeof(int32_t));
    for (int i = 0; i < n_dst; i++) perm[i] = i;
    for (int i = n_dst - 1; i > 0; i--) {
        int j = (int)(rs_rng_next(r) % (uint64_t)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    for (int i = 0; i < n; i++) rows[i] = (int32_t)(rs_rng_next(r) % (uint64_t)n_dst);
    float *res[2][2];
    const rs_backend *bes[2] = {cpu, gpu};
    for (int s = 0; s < 2; s++) {
        const rs_backend *be = bes[s];
        size_t n_elems = (size_t)n_dst * dim;
        void *sd = upload(be, be->act_dtype, src, n_elems);
        void *dd = upload(be, be->act_dtype, dst0, n_elems);
        void *pd = upload_bytes(be, perm, n * sizeof(int32_t));
        void *rd = upload_bytes(be, rows, n * sizeof(int32_t));
        void *gd = upload_nan(be, be->act_dtype, (size_t)n * dim);
        be->scatter_rows(dd, sd, pd, n, dim);
        be->gather_rows(gd, sd, rd, n, dim);
        res[s][0] = download(be, dd, be->act_dtype, n_elems);
        res[s][1] = download(be, gd, be->act_dtype, (size_t)n * dim);
        be->free(sd), be->free(dd), be->free(pd), be->free(rd), be->free(gd);
    }
    char what[64];
    snprintf(what, sizeof what, "scatter_rows n=%d dim=%d", n, dim);
    compare(what, res[1][0], res[0][0], (size_t)n_dst * dim, 0.0, 0.0, NULL);
    snprintf(what, sizeof what, "gather_rows n=%d dim=%d", n, dim);
    compare(what, res[1][1], res[0][1], (size_t)n * dim, 0.0, 0.0, NULL);
    free(src), free(dst0), free(perm), free(rows);
    for (int s = 0; s < 2; s++) free(res[s][0]), free(res[s][1]);
}

TEST(test_cuda_scatter_and_gather_rows_match_cpu) {
    GPU_TEST_SETUP(1);
    rs_rng r;
    seeded_rng(&r, 10);
    check_rows(cpu, gpu, &r, 1, 1, 64);
    check_rows(cpu, gpu, &r, 5, 40, 33);
    check_rows(cpu, gpu, &r, 64, 64, 1024);
}
