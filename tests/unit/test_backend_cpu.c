/* backend ops against naive float64 references on random inputs of odd sizes.
 * Each check body takes the backend, so the same claim can be run against any backend:
 * inputs go up through upload_f32/to_device, results come back through download_f32, and every
 * output buffer is poisoned with NaN first so an element the op forgets to write fails. */
#include "resafe/backend.h"
#include "test.h"

#include <string.h>

/* fp32 accumulation against a float64 reference: errors grow like sqrt(k) * 2^-24 * |terms|;
 * 1e-5 relative to the row's magnitude is generous for k <= a few hundred. */
#define TOL_F32 1e-5

typedef struct {
    const rs_backend *be;
    rs_rng rng;
} ctx;

static ctx make_ctx(const rs_backend *be, unsigned salt) {
    ctx c = {.be = be};
    rs_rng_seed(&c.rng, rs_test_seed() * 1000003ull + salt);
    return c;
}

static int rand_int(ctx *c, int lo, int hi) { return lo + (int)(rs_rng_next(&c->rng) % (uint64_t)(hi - lo + 1)); }

static float *rand_host(ctx *c, size_t n, float scale) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = scale * rs_rng_normal(&c->rng);
    return x;
}

/* device buffer of n values of dtype, filled from host fp32 */
static void *up(ctx *c, const float *host, size_t n, rs_dtype dtype) {
    void *d = c->be->alloc((n ? n : 1) * rs_dtype_size(dtype));
    c->be->upload_f32(d, dtype, host, n);
    return d;
}

/* device buffer of n values of dtype, every value NaN */
static void *poisoned(ctx *c, size_t n, rs_dtype dtype) {
    float *nan = malloc((n ? n : 1) * sizeof *nan);
    for (size_t i = 0; i < n; i++) nan[i] = NAN;
    void *d = up(c, nan, n, dtype);
    free(nan);
    return d;
}

static float *down(ctx *c, const void *dev, size_t n, rs_dtype dtype) {
    float *h = malloc((n ? n : 1) * sizeof *h);
    c->be->synchronize();
    c->be->download_f32(h, dev, dtype, n);
    return h;
}

static int32_t *up_i32(ctx *c, const int32_t *host, size_t n) {
    int32_t *d = c->be->alloc((n ? n : 1) * sizeof *d);
    c->be->to_device(d, host, n * sizeof *d);
    return d;
}

/* max |got - want| / (1 + |want|) over n values; NaN anywhere gives +inf */
static double max_rel_err(const float *got, const double *want, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]) / (1.0 + fabs(want[i]));
        if (!(e <= worst)) worst = isnan(e) ? INFINITY : e;
    }
    return worst;
}

/* ---------------------------------------------------------------- references */

static double ref_activation(double g, rs_activation act) {
    if (act == RS_ACT_SILU) return g / (1.0 + exp(-g));
    if (act == RS_ACT_GELU_TANH) return 0.5 * g * (1.0 + tanh(sqrt(2.0 / M_PI) * (g + 0.044715 * g * g * g)));
    return 0.5 * g * (1.0 + erf(g / sqrt(2.0)));
}

/* ---------------------------------------------------------------- checks */

static void check_linear(const rs_backend *be, double tol) {
    ctx c = make_ctx(be, 1);
    for (int trial = 0; trial < 6; trial++) {
        int n = rand_int(&c, 1, 13), k = rand_int(&c, 1, 77), m = rand_int(&c, 1, 41);
        int use_bias = trial % 2, accumulate = trial % 3 == 2;
        float *x = rand_host(&c, (size_t)n * k, 1), *w = rand_host(&c, (size_t)m * k, 1);
        float *bias = rand_host(&c, m, 1), *prev = rand_host(&c, (size_t)n * m, 1);
        void *dx = up(&c, x, (size_t)n * k, be->act_dtype), *dw = up(&c, w, (size_t)m * k, be->weight_dtype);
        void *db = up(&c, bias, m, be->weight_dtype);
        void *dout = accumulate ? up(&c, prev, (size_t)n * m, be->act_dtype) : poisoned(&c, (size_t)n * m, be->act_dtype);
        be->linear_fwd(dout, dx, dw, use_bias ? db : NULL, n, k, m, accumulate ? 1.0f : 0.0f);
        float *got = down(&c, dout, (size_t)n * m, be->act_dtype);
        double *want = malloc((size_t)n * m * sizeof *want), *scale = malloc((size_t)n * m * sizeof *scale);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < m; j++) {
                double s = use_bias ? bias[j] : 0, mag = 0;
                for (int l = 0; l < k; l++) {
                    s += (double)x[i * k + l] * w[j * k + l];
                    mag += fabs((double)x[i * k + l] * w[j * k + l]);
                }
                want[i * m + j] = s + (accumulate ? prev[i * m + j] : 0);
                scale[i * m + j] = mag;
            }
        for (size_t i = 0; i < (size_t)n * m; i++) {
            double e = fabs(got[i] - want[i]) / (1.0 + scale[i]);
            CHECK(e <= tol, "n=%d k=%d m=%d bias=%d acc=%d: out[%zu] = %g, want %g", n, k, m, use_bias,
                  accumulate, i, got[i], want[i]);
            if (!(e <= tol)) break;
        }
        free(x), free(w), free(bias), free(prev), free(got), free(want), free(scale);
        be->free(dx), be->free(dw), be->free(db), be->free(dout);
    }
}

static void check_rmsnorm(const rs_backend *be, double tol) {
    ctx c = make_ctx(be, 2);
    for (int add_one = 0; add_one <= 1; add_one++) {
        int n = rand_int(&c, 1, 9), dim = rand_int(&c, 1, 131);
        float eps = 1e-5f;
        float *x = rand_host(&c, (size_t)n * dim, 3), *w = rand_host(&c, dim, 1);
        void *dx = up(&c, x, (size_t)n * dim, be->act_dtype), *dw = up(&c, w, dim, be->weight_dtype);
        void *dout = poisoned(&c, (size_t)n * dim, be->act_dtype);
        float *drstd = poisoned(&c, n, RS_F32);
        be->rmsnorm_fwd(dout, drstd, dx, dw, n, dim, eps, add_one);
        float *got = down(&c, dout, (size_t)n * dim, be->act_dtype), *rstd = down(&c, drstd, n, RS_F32);
        double *want = malloc((size_t)n * dim * sizeof *want), *want_rstd = malloc(n * sizeof *want_rstd);
        for (int i = 0; i < n; i++) {
            double ss = 0;
            for (int j = 0; j < dim; j++) ss += (double)x[i * dim + j] * x[i * dim + j];
            want_rstd[i] = 1.0 / sqrt(ss / dim + eps);
            for (int j = 0; j < dim; j++)
                want[i * dim + j] = x[i * dim + j] * want_rstd[i] * (add_one ? 1.0 + w[j] : (double)w[j]);
        }
        double e = max_rel_err(got, want, (size_t)n * dim), er = max_rel_err(rstd, want_rstd, n);
        CHECK(e <= tol, "rmsnorm n=%d dim=%d add_one=%d: max rel err %g", n, dim, add_one, e);
        CHECK(er <= tol, "rmsnorm rstd n=%d dim=%d: max rel err %g", n, dim, er);
        free(x), free(w), free(got), free(rstd), free(want), free(want_rstd);
        be->free(dx), be->free(dw), be->free(dout), be->free(drstd);
    }
}

static void check_embedding(const rs_backend *be, double tol) {
    ctx c = make_ctx(be, 3);
    int vocab = rand_int(&c, 2, 37), dim = rand_int(&c, 1, 29), n = rand_int(&c, 1, 17);
    float scale = 1.0f + (float)rand_int(&c, 0, 7) * 0.37f;
    float *table = rand_host(&c, (size_t)vocab * dim, 1);
    int32_t *ids = malloc(n * sizeof *ids);
    for (int i = 0; i < n; i++) ids[i] = rand_int(&c, 0, vocab - 1);
    void *dt = up(&c, table, (size_t)vocab * dim, be->weight_dtype), *dout = poisoned(&c, (size_t)n * dim, be->act_dtype);
    int32_t *dids = up_i32(&c, ids, n);
    be->embedding_fwd(dout, dt, dids, n, dim, scale);
    float *got = down(&c, dout, (size_t)n * dim, be->act_dtype);
    double *want = malloc((size_t)n * dim * sizeof *want);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < dim; j++) want[i * dim + j] = (double)table[ids[i] * dim + j] * scale;
    double e = max_rel_err(got, want, (size_t)n * dim);
    CHECK(e <= tol, "embedding vocab=%d dim=%d n=%d: max rel err %g", vocab, dim, n, e);
    free(table), free(ids), free(got), free(want);
    be->free(dt), be->free(dout), be->free(dids);
}

static void check_rope(const rs_backend *be, double tol) {
    ctx c = make_ctx(be, 4);
    int n_tok = rand_int(&c, 1, 11), n_heads = rand_int(&c, 1, 5), half = rand_int(&c, 1, 9);
    int head_dim = 2 * half;
    size_t n = (size_t)n_tok * n_heads * head_dim;
    float *x = rand_host(&c, n, 1), *inv_freq = malloc(half * sizeof *inv_freq);
    for (int i = 0; i < half; i++) inv_freq[i] = powf(10000.0f, -2.0f * i / head_dim);
    int32_t *pos = malloc(n_tok * sizeof *pos);
    for (int t = 0; t < n_tok; t++) pos[t] = rand_int(&c, 0, 3) == 0 ? -1 : rand_int(&c, 0, 60);
    void *dx = up(&c, x, n, be->act_dtype);
    float *dfreq = up(&c, inv_freq, half, RS_F32);
    int32_t *dpos = up_i32(&c, pos, n_tok);
    be->rope_fwd(dx, dpos, dfreq, n_tok, n_heads, head_dim);
    float *got = down(&c, dx, n, be->act_dtype);
    double *want = malloc(n * sizeof *want);
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < n_heads; h++) {
            const float *v = x + ((size_t)t * n_heads + h) * head_dim;
            double *o = want + ((size_t)t * n_heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                if (pos[t] < 0) { /* padded: untouched */
                    o[i] = v[i], o[i + half] = v[i + half];
                    continue;
                }
                double a = (double)pos[t] * inv_freq[i];
                o[i] = v[i] * cos(a) - v[i + half] * sin(a);
                o[i + half] = v[i + half] * cos(a) + v[i] * sin(a);
            }
        }
    double e = max_rel_err(got, want, n);
    CHECK(e <= tol, "rope n_tok=%d heads=%d head_dim=%d: max rel err %g", n_tok, n_heads, head_dim, e);
    free(x), free(inv_freq), free(pos), free(got), free(want);
    be->free(dx), be->free(dfreq), be->free(dpos);
}

static void ref_attention(double *out, const float *q, const float *k, const float *v,
                          const int32_t *q_pos, int B, int Tq, int Tk, int n_heads, int n_kv,
                          int hd, double scale) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < Tq; t++)
            for (int h = 0; h < n_heads; h++) {
                double *o = out + (((size_t)b * Tq + t) * n_heads + h) * hd;
                const float *qr = q + (((size_t)b * Tq + t) * n_heads + h) * hd;
                int p = q_pos[b * Tq + t], g = h / (n_heads / n_kv);
                for (int d = 0; d < hd; d++) o[d] = 0;
                if (p < 0) continue;
                double *s = malloc((p + 1) * sizeof *s), mx = -INFINITY, sum = 0;
                for (int j = 0; j <= p; j++) {
                    const float *kr = k + (((size_t)b * Tk + j) * n_kv + g) * hd;
                    s[j] = 0;
                    for (int d = 0; d < hd; d++) s[j] += (double)qr[d] * kr[d];
                    s[j] *= scale;
                    mx = s[j] > mx ? s[j] : mx;
                }
                for (int j = 0; j <= p; j++) sum += (s[j] = exp(s[j] - mx));
                for (int j = 0; j <= p; j++) {
                    const float *vr = v + (((size_t)b * Tk + j) * n_kv + g) * hd;
                    for (int d = 0; d < hd; d++) o[d] += s[j] / sum * vr[d];
                }
                free(s);
            }
}

/* Sequences of a batch with different query blocks: a random start position (keys before it
 * play the KV cache), a random number of real queries, the rest of the block padded (-1).
 * Keys past the last real position of each sequence are NaN: reading one poisons the output. */
static void check_attention(const rs_backend *be, double tol, int gqa) {
    ctx c = make_ctx(be, 5 + gqa);
    int n_kv = rand_int(&c, 1, 3), group = gqa ? rand_int(&c, 2, 4) : 1, n_heads = n_kv * group;
    int B = rand_int(&c, 1, 4), Tq = rand_int(&c, 1, 7), hd = rand_int(&c, 1, 19);
    int Tk = Tq + rand_int(&c, 0, 9);
    size_t nq = (size_t)B * Tq * n_heads * hd, nk = (size_t)B * Tk * n_kv * hd;
    float *q = rand_host(&c, nq, 1), *k = rand_host(&c, nk, 1), *v = rand_host(&c, nk, 1);
    int32_t *q_pos = malloc((size_t)B * Tq * sizeof *q_pos);
    int n_padded = 0;
    for (int b = 0; b < B; b++) {
        int n_real = rand_int(&c, b == 0 ? 1 : 0, Tq), start = rand_int(&c, 0, Tk - n_real), last = -1;
        for (int t = 0; t < Tq; t++) {
            q_pos[b * Tq + t] = t < n_real ? start + t : -1;
            if (t < n_real) last = start + t;
            n_padded += t >= n_real;
        }
        for (int j = last + 1; j < Tk; j++)
            for (int d = 0; d < n_kv * hd; d++)
                k[((size_t)b * Tk + j) * n_kv * hd + d] = v[((size_t)b * Tk + j) * n_kv * hd + d] = NAN;
    }
    void *dq = up(&c, q, nq, be->act_dtype), *dk = up(&c, k, nk, be->act_dtype), *dv = up(&c, v, nk, be->act_dtype);
    void *dout = poisoned(&c, nq, be->act_dtype);
    int32_t *dpos = up_i32(&c, q_pos, (size_t)B * Tq);
    double scale = 1.0 / sqrt(hd) * (1 + 0.1 * rand_int(&c, 0, 5));
    be->attention_fwd(dout, dq, dk, dv, dpos, B, Tq, Tk, n_heads, n_kv, hd, (float)scale);
    float *got = down(&c, dout, nq, be->act_dtype);
    double *want = malloc(nq * sizeof *want);
    ref_attention(want, q, k, v, q_pos, B, Tq, Tk, n_heads, n_kv, hd, scale);
    double e = max_rel_err(got, want, nq);
    CHECK(e <= tol, "attention B=%d Tq=%d Tk=%d heads=%d kv=%d hd=%d (%d padded): max rel err %g", B,
          Tq, Tk, n_heads, n_kv, hd, n_padded, e);
    free(q), free(k), free(v), free(q_pos), free(got), free(want);
    be->free(dq), be->free(dk), be->free(dv), be->free(dout), be->free(dpos);
}

static void check_glu(const rs_backend *be, double tol) {
    ctx c = make_ctx(be, 7);
    rs_activation acts[] = {RS_ACT_SILU, RS_ACT_GELU_TANH, RS_ACT_GELU};
    for (int a = 0; a < 3; a++) {
        size_t n = (size_t)rand_int(&c, 1, 301);
        float *g = rand_host(&c, n, 3), *u = rand_host(&c, n, 1);
        void *dg = up(&c, g, n, be->act_dtype), *du = up(&c, u, n, be->act_dtype);
        void *dout = poisoned(&c, n, be->act_dtype);
        be->glu_fwd(dout, dg, du, n, acts[a]);
        float *got = down(&c, dout, n, be->act_dtype);
        double *want = malloc(n * sizeof *want);
        for (size_t i = 0; i < n; i++) want[i] = ref_activation(g[i], acts[a]) * u[i];
        double e = max_rel_err(got, want, n);
        CHECK(e <= tol, "glu act=%d n=%zu: max rel err %g", acts[a], n, e);
        free(g), free(u), free(got), free(want);
        be->free(dg), be->free(du), be->free(dout);
    }
}

static void check_add_and_convert(const rs_backend *be, double tol) {
    ctx c = make_ctx(be, 8);
    size_t n = (size_t)rand_int(&c, 1, 517);
    float *x = rand_host(&c, n, 1), *y = rand_host(&c, n, 1);
    void *dx = up(&c, x, n, be->act_dtype), *dy = up(&c, y, n, be->act_dtype);
    be->add_inplace(dx, dy, n);
    float *f32 = poisoned(&c, n, RS_F32);
    be->act_to_f32(f32, dx, n);
    float *got = down(&c, f32, n, RS_F32);
    double *want = malloc(n * sizeof *want);
    for (size_t i = 0; i < n; i++) want[i] = (double)x[i] + y[i];
    double e = max_rel_err(got, want, n);
    CHECK(e <= tol, "add_inplace + act_to_f32 n=%zu: max rel err %g", n, e);
    free(x), free(y), free(got), free(want);
    be->free(dx), be->free(dy), be->free(f32);
}

/* scatter then gather with a random permutation of rows is the identity on the rows touched */
static void check_scatter_gather(const rs_backend *be) {
    ctx c = make_ctx(be, 9);
    int rows = rand_int(&c, 1, 23), n = rand_int(&c, 1, rows), dim = rand_int(&c, 1, 33);
    int32_t *perm = malloc(rows * sizeof *perm);
    for (int i = 0; i < rows; i++) perm[i] = i;
    for (int i = rows - 1; i > 0; i--) {
        int j = rand_int(&c, 0, i), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    float *src = rand_host(&c, (size_t)n * dim, 1);
    void *dsrc = up(&c, src, (size_t)n * dim, be->act_dtype), *dtab = poisoned(&c, (size_t)rows * dim, be->act_dtype);
    void *dback = poisoned(&c, (size_t)n * dim, be->act_dtype);
    int32_t *dperm = up_i32(&c, perm, rows);
    be->scatter_rows(dtab, dsrc, dperm, n, dim);
    be->gather_rows(dback, dtab, dperm, n, dim);
    float *tab = down(&c, dtab, (size_t)rows * dim, be->act_dtype), *back = down(&c, dback, (size_t)n * dim, be->act_dtype);
    int bad = 0, untouched_nan = 1;
    for (int i = 0; i < n; i++)
        for (int d = 0; d < dim; d++) {
            bad += back[i * dim + d] != src[i * dim + d];
            bad += tab[perm[i] * dim + d] != src[i * dim + d];
        }
    for (int i = n; i < rows; i++) /* rows not named by dst_rows stay as they were */
        for (int d = 0; d < dim; d++) untouched_nan &= isnan(tab[perm[i] * dim + d]);
    CHECK(bad == 0, "scatter/gather rows=%d n=%d dim=%d: %d values differ", rows, n, dim, bad);
    CHECK(untouched_nan, "scatter_rows wrote rows it was not given");
    free(perm), free(src), free(tab), free(back);
    be->free(dsrc), be->free(dtab), be->free(dback), be->free(dperm);
}

/* ---------------------------------------------------------------- the cpu backend */

TEST(test_backend_cpu_linear_matches_f64_reference_with_bias_and_accumulate) { check_linear(rs_backend_cpu(), TOL_F32); }
TEST(test_backend_cpu_rmsnorm_matches_f64_reference_plain_and_add_one) { check_rmsnorm(rs_backend_cpu(), TOL_F32); }
TEST(test_backend_cpu_embedding_matches_scaled_table_rows) { check_embedding(rs_backend_cpu(), TOL_F32); }
TEST(test_backend_cpu_rope_rotates_half_pairs_and_skips_padding) { check_rope(rs_backend_cpu(), TOL_F32); }
TEST(test_backend_cpu_attention_matches_f64_with_padding) { check_attention(rs_backend_cpu(), TOL_F32, 0); }
TEST(test_backend_cpu_attention_matches_f64_with_padding_and_gqa) { check_attention(rs_backend_cpu(), TOL_F32, 1); }
TEST(test_backend_cpu_glu_matches_f64_for_silu_and_gelus) { check_glu(rs_backend_cpu(), TOL_F32); }
TEST(test_backend_cpu_add_inplace_and_act_to_f32) { check_add_and_convert(rs_backend_cpu(), TOL_F32); }
TEST(test_backend_cpu_scatter_then_gather_rows_round_trips) { check_scatter_gather(rs_backend_cpu()); }

TEST(test_backend_cpu_upload_download_bf16_f16_round_to_nearest) {
    const rs_backend *be = rs_backend_cpu();
    ctx c = make_ctx(be, 10);
    size_t n = 257;
    float *x = rand_host(&c, n, 10);
    rs_dtype types[] = {RS_F32, RS_BF16, RS_F16};
    for (int t = 0; t < 3; t++) {
        void *d = up(&c, x, n, types[t]);
        float *got = down(&c, d, n, types[t]);
        int bad = 0;
        for (size_t i = 0; i < n; i++) {
            float want = types[t] == RS_F32 ? x[i]
                         : types[t] == RS_BF16 ? rs_bf16_to_f32(rs_f32_to_bf16(x[i]))
                                               : rs_f16_to_f32(rs_f32_to_f16(x[i]));
            bad += got[i] != want;
        }
        CHECK(bad == 0, "%s: %d values differ after upload/download", rs_dtype_name(types[t]), bad);
        free(got);
        be->free(d);
    }
    free(x);
}

/* A transformer-sized product (all code paths of the blocking at once: full row blocks, a
 * ragged last block, k not a multiple of the lane count) checked on sampled entries, with the
 * throughput printed. The bar, 0.1 GFLOP/s, only catches a pathological rewrite: the
 * measured value on an unloaded core is tens of GFLOP/s. */
TEST(test_backend_cpu_linear_large_is_correct_and_reports_throughput) {
    const rs_backend *be = rs_backend_cpu();
    ctx c = make_ctx(be, 11);
    int n = 66, k = 515, m = 512;
    float *x = rand_host(&c, (size_t)n * k, 1), *w = rand_host(&c, (size_t)m * k, 1);
    float *out = malloc((size_t)n * m * sizeof *out);
    double t0 = rs_now();
    int reps = 0;
    while (rs_now() - t0 < 0.2 || reps < 2) {
        be->linear_fwd(out, x, w, NULL, n, k, m, 0.0f);
        reps++;
    }
    double gflops = 2.0 * n * k * m * reps / (rs_now() - t0) / 1e9;
    fprintf(stderr, "cpu linear_fwd %dx%dx%d: %.2f GFLOP/s\n", n, k, m, gflops);
    for (int s = 0; s < 200; s++) {
        int i = rand_int(&c, 0, n - 1), j = rand_int(&c, 0, m - 1);
        double want = 0, mag = 0;
        for (int l = 0; l < k; l++) {
            want += (double)x[(size_t)i * k + l] * w[(size_t)j * k + l];
            mag += fabs((double)x[(size_t)i * k + l] * w[(size_t)j * k + l]);
        }
        CHECK(fabs(out[(size_t)i * m + j] - want) <= TOL_F32 * (1 + mag), "out[%d,%d] = %g, want %g",
              i, j, out[(size_t)i * m + j], want);
    }
    CHECK(gflops >= 0.1, "linear_fwd at %.3f GFLOP/s", gflops);
    free(x), free(w), free(out);
}

/* ---------------------------------------------------------------- training ops
 * The full checks against PyTorch are in tests/py/test_ops_grad.py; these are the claims that
 * are easiest to state bit for bit in C. */

/* Masked entries of p, m and v keep their exact bits over several steps (a frozen entry with a
 * moment history must not drift); unmasked ones follow the formula of backend.h in double. */
static void check_adamw_mask(const rs_backend *be) {
    ctx c = make_ctx(be, 12);
    size_t n = (size_t)rand_int(&c, 1, 999);
    float *p = rand_host(&c, n, 1), *m = rand_host(&c, n, 0.1f), *v = rand_host(&c, n, 0.1f);
    uint8_t *mask = malloc(n);
    for (size_t i = 0; i < n; i++) v[i] = fabsf(v[i]), mask[i] = rand_int(&c, 0, 2) != 0;
    float *dp = up(&c, p, n, RS_F32), *dm = up(&c, m, n, RS_F32), *dv = up(&c, v, n, RS_F32);
    uint8_t *dmask = be->alloc(n);
    be->to_device(dmask, mask, n);
    double *want_p = malloc(n * sizeof *want_p);
    for (size_t i = 0; i < n; i++) want_p[i] = p[i];
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.1f, gscale = 0.5f;
    double wm[1000], wv[1000];
    for (size_t i = 0; i < n; i++) wm[i] = m[i], wv[i] = v[i];
    for (int step = 1; step <= 3; step++) {
        float *g = rand_host(&c, n, 1), *dg = up(&c, g, n, RS_F32);
        be->adamw(dp, dg, dm, dv, dmask, n, lr, b1, b2, eps, wd, step, gscale);
        for (size_t i = 0; i < n; i++) {
            if (!mask[i]) continue;
            double gi = (double)g[i] * gscale;
            wm[i] = b1 * wm[i] + (1 - (double)b1) * gi;
            wv[i] = b2 * wv[i] + (1 - (double)b2) * gi * gi;
            double m_hat = wm[i] / (1 - pow(b1, step)), v_hat = wv[i] / (1 - pow(b2, step));
            want_p[i] -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * want_p[i]);
        }
        free(g), be->free(dg);
    }
    float *got_p = down(&c, dp, n, RS_F32), *got_m = down(&c, dm, n, RS_F32), *got_v = down(&c, dv, n, RS_F32);
    int changed = 0;
    double err2 = 0, update2 = 0;
    for (size_t i = 0; i < n; i++) {
        if (!mask[i]) {
            changed += memcmp(&got_p[i], &p[i], 4) != 0 || memcmp(&got_m[i], &m[i], 4) != 0 ||
                       memcmp(&got_v[i], &v[i], 4) != 0;
            continue;
        }
        /* compare the update (about lr per step), not p, whose own rounding would hide it */
        double got_update = (double)got_p[i] - p[i], want_update = want_p[i] - p[i];
        err2 += (got_update - want_update) * (got_update - want_update);
        update2 += want_update * want_update;
    }
    double rel = sqrt(err2 / (update2 > 0 ? update2 : 1));
    CHECK(changed == 0, "adamw n=%zu: %d masked entries changed", n, changed);
    CHECK(rel <= 1e-4, "adamw n=%zu: update off by %g relative (norm)", n, rel);
    free(p), free(m), free(v), free(mask), free(want_p), free(got_p), free(got_m), free(got_v);
    be->free(dp), be->free(dm), be->free(dv), be->free(dmask);
}

/* zero_f32 writes exactly n values: the one after them stays NaN. */
static void check_zero_f32(const rs_backend *be) {
    ctx c = make_ctx(be, 13);
    size_t n = (size_t)rand_int(&c, 1, 70000);
    float *d = poisoned(&c, n + 1, RS_F32);
    be->zero_f32(d, n);
    float *got = down(&c, d, n + 1, RS_F32);
    size_t nonzero = 0;
    for (size_t i = 0; i < n; i++) nonzero += got[i] != 0.0f || signbit(got[i]);
    CHECK(nonzero == 0, "zero_f32 n=%zu: %zu values not +0", n, nonzero);
    CHECK(isnan(got[n]), "zero_f32 n=%zu wrote past the end", n);
    free(got);
    be->free(d);
}

/* clamp_f32 against a double reference (values inside, below and above random boxes, empty
 * boxes lo == hi, infinite bounds); the value after the n stays NaN. */
static void check_clamp_f32(const rs_backend *be) {
    ctx c = make_ctx(be, 14);
    size_t n = (size_t)rand_int(&c, 1, 70000);
    float *x = rand_host(&c, n + 1, 1.0f), *lo = rand_host(&c, n, 0.5f), *hi = malloc(n * 4);
    for (size_t i = 0; i < n; i++) {
        int kind = rand_int(&c, 0, 9);
        hi[i] = kind == 0 ? lo[i] : lo[i] + fabsf(rs_rng_normal(&c.rng));
        if (kind == 1) lo[i] = -INFINITY;
        if (kind == 2) hi[i] = INFINITY;
    }
    float *dx = up(&c, x, n, RS_F32), *dlo = up(&c, lo, n, RS_F32), *dhi = up(&c, hi, n, RS_F32);
    float *dpad = poisoned(&c, n + 1, RS_F32);
    be->copy(dpad, dx, n * sizeof(float));
    be->clamp_f32(dpad, dlo, dhi, n);
    float *got = down(&c, dpad, n + 1, RS_F32);
    size_t wrong = 0, below = 0, above = 0;
    for (size_t i = 0; i < n; i++) {
        double want = (double)x[i] < lo[i] ? lo[i] : (double)x[i] > hi[i] ? hi[i] : x[i];
        wrong += (double)got[i] != want;
        below += x[i] < lo[i], above += x[i] > hi[i];
    }
    CHECK(wrong == 0, "clamp_f32 n=%zu: %zu values off", n, wrong);
    CHECK(n < 100 || (below > 0 && above > 0), "clamp_f32: no value outside its box (%zu, %zu)",
          below, above);
    CHECK(isnan(got[n]), "clamp_f32 n=%zu wrote past the end", n);
    free(x), free(lo), free(hi), free(got);
    be->free(dx), be->free(dlo), be->free(dhi), be->free(dpad);
}

TEST(test_backend_cpu_adamw_leaves_masked_entries_bit_identical) { check_adamw_mask(rs_backend_cpu()); }
TEST(test_backend_cpu_zero_f32_zeroes_exactly_n_values) { check_zero_f32(rs_backend_cpu()); }
TEST(test_backend_cpu_clamp_f32_matches_a_double_reference) { check_clamp_f32(rs_backend_cpu()); }

/* The backward ops of one DPO step of a 2-layer dim-128 model (2 preference pairs = 4
 * sequences of 128 tokens, 4 heads of 32, MLP 384, vocab 4096): input gradients of every
 * linear (the frozen weights' dx) and of attention, best of 3 runs, printed. The bar, 5 s, only
 * catches a pathological rewrite (or a sanitizer build gone quadratic): the measured time on
 * one unloaded core is well under 100 ms. */
enum { STEP_B = 4, STEP_T = 128, STEP_N = STEP_B * STEP_T, STEP_DIM = 128, STEP_HEADS = 4, STEP_HD = 32,
       STEP_HIDDEN = 384, STEP_VOCAB = 4096, STEP_LAYERS = 2 };

typedef struct {
    float *x, *dout, *w, *dx, *q, *k, *v, *dq, *dk, *dv;
    int32_t q_pos[STEP_N];
} step_buffers;

/* seconds spent in linear_bwd (layers, then lm_head) and attention_bwd for one step */
static void time_backward_step(const rs_backend *be, step_buffers *s, double t[3]) {
    static const struct { int k, m; } shapes[] = {{STEP_DIM, STEP_DIM}, {STEP_DIM, STEP_DIM}, {STEP_DIM, STEP_DIM},
                                                  {STEP_DIM, STEP_DIM}, {STEP_DIM, STEP_HIDDEN},
                                                  {STEP_DIM, STEP_HIDDEN}, {STEP_HIDDEN, STEP_DIM}};
    double t0;
    t[0] = t[1] = t[2] = 0;
    for (int layer = 0; layer < STEP_LAYERS; layer++) {
        t0 = rs_now();
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
            be->linear_bwd(s->dx, NULL, NULL, s->dout, s->x, s->w, STEP_N, shapes[i].k, shapes[i].m, 0.0f);
        t[0] += rs_now() - t0;
        t0 = rs_now();
        be->attention_bwd(s->dq, s->dk, s->dv, s->dout, s->q, s->k, s->v, s->q_pos, STEP_B, STEP_T, STEP_T,
                          STEP_HEADS, STEP_HEADS, STEP_HD, 1.0f / sqrtf(STEP_HD));
        t[2] += rs_now() - t0;
    }
    t0 = rs_now();
    be->linear_bwd(s->dx, NULL, NULL, s->dout, s->x, s->w, STEP_N, STEP_DIM, STEP_VOCAB, 0.0f);
    t[1] = rs_now() - t0;
}

TEST(test_backend_cpu_backward_of_a_dim_128_dpo_step_is_fast) {
    const rs_backend *be = rs_backend_cpu();
    ctx c = make_ctx(be, 14);
    size_t n_act = (size_t)STEP_N * STEP_DIM;
    step_buffers s = {.x = rand_host(&c, (size_t)STEP_N * STEP_HIDDEN, 1),
                      .dout = rand_host(&c, (size_t)STEP_N * STEP_VOCAB, 1),
                      .w = rand_host(&c, (size_t)STEP_VOCAB * STEP_DIM, 0.1f),
                      .dx = rand_host(&c, (size_t)STEP_N * STEP_HIDDEN, 1),
                      .q = rand_host(&c, n_act, 1), .k = rand_host(&c, n_act, 1), .v = rand_host(&c, n_act, 1),
                      .dq = rand_host(&c, n_act, 1), .dk = rand_host(&c, n_act, 1), .dv = rand_host(&c, n_act, 1)};
    for (int i = 0; i < STEP_N; i++) s.q_pos[i] = i % STEP_T;
    double best[3] = {INFINITY, INFINITY, INFINITY}, t[3];
    for (int rep = 0; rep < 3; rep++) {
        time_backward_step(be, &s, t);
        for (int i = 0; i < 3; i++) best[i] = t[i] < best[i] ? t[i] : best[i];
    }
    fprintf(stderr, "cpu backward of a dim-128 DPO step: linear_bwd %.1f ms (+ lm_head %.1f ms), attention_bwd %.1f ms\n",
            1e3 * best[0], 1e3 * best[1], 1e3 * best[2]);
    CHECK(best[0] + best[1] + best[2] < 5.0, "backward ops took %.2f s", best[0] + best[1] + best[2]);
    CHECK(isfinite(s.dx[0]) && isfinite(s.dq[0]) && isfinite(s.dk[0]) && isfinite(s.dv[0]), "non-finite gradients");
    free(s.x), free(s.dout), free(s.w), free(s.dx), free(s.q), free(s.k), free(s.v), free(s.dq), free(s.dk), free(s.dv);
}
