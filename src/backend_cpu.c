/* backend_cpu: the reference implementation of the op table (include/resafe/backend.h).
 * fp32 activations and weights, plain loops, OpenMP over independent rows. Every op here is
 * the specification the CUDA backend is checked against, so clarity wins over speed; only
 * linear_fwd (where all the time goes) is blocked, and only as far as clarity allows. */
#include "resafe/backend.h"
#include "resafe/quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Threads only pay off above some work: a fork/join costs microseconds, and on a loaded
 * machine far more, which would dominate the tiny ops of a decode step. */
#define PARALLEL(work) ((work) >= 32768)

/* ---------------------------------------------------------------- memory */

/* Every block carries its size in a 64-byte header (the accounting of backend.h's peak_bytes);
 * the caller's pointer stays 64-byte aligned. */
#define CPU_HEADER 64
static size_t g_cpu_live, g_cpu_peak;

static void *cpu_alloc(size_t bytes) {
    size_t rounded = rs_align64(bytes ? bytes : 1);
    RS_CHECK(rounded <= SIZE_MAX - CPU_HEADER, "cannot allocate %zu bytes", bytes);
    char *p = aligned_alloc(64, rounded + CPU_HEADER);
    RS_CHECK(p, "out of memory allocating %zu bytes", bytes);
    memcpy(p, &rounded, sizeof rounded);
    g_cpu_live += rounded;
    if (g_cpu_live > g_cpu_peak) g_cpu_peak = g_cpu_live;
    return p + CPU_HEADER;
}

static void cpu_free(void *p) {
    if (!p) return;
    char *base = (char *)p - CPU_HEADER;
    size_t rounded;
    memcpy(&rounded, base, sizeof rounded);
    g_cpu_live -= rounded;
    free(base);
}

static size_t cpu_peak_bytes(void) { return g_cpu_peak; }
static size_t cpu_live_bytes(void) { return g_cpu_live; }
static size_t cpu_workspace_bytes(void) { return 0; }
static void cpu_copy(void *dst, const void *src, size_t bytes) { memmove(dst, src, bytes); }
static void cpu_synchronize(void) {}

/* Host memory is device memory here: all three transfers are copies. */
static void cpu_to_device(void *dst, const void *src, size_t bytes) { cpu_copy(dst, src, bytes); }
static void cpu_to_host(void *dst, const void *src, size_t bytes) { cpu_copy(dst, src, bytes); }

static void cpu_upload_f32(void *dst, rs_dtype dst_dtype, const float *src, size_t n) {
    switch (dst_dtype) {
    case RS_F32: memcpy(dst, src, n * sizeof(float)); return;
    case RS_BF16:
        for (size_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = rs_f32_to_bf16(src[i]);
        return;
    case RS_F16:
        for (size_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = rs_f32_to_f16(src[i]);
        return;
    default: RS_DIE("cpu upload_f32: unsupported destination dtype %s", rs_dtype_name(dst_dtype));
    }
}

static void cpu_download_f32(float *dst, const void *src, rs_dtype src_dtype, size_t n) {
    RS_CHECK(rs_convert_to_f32(dst, src, src_dtype, n) == 0,
             "cpu download_f32: unsupported source dtype %s", rs_dtype_name(src_dtype));
}

/* ---------------------------------------------------------------- elementwise and row ops */

static void cpu_embedding_fwd(void *out_, const void *table_, const int32_t *ids, int n, int dim,
                              float scale) {
    float *out = out_;
    const float *table = table_;
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * dim))
    for (int i = 0; i < n; i++)
        for (int j = 0; j < dim; j++) out[(size_t)i * dim + j] = table[(size_t)ids[i] * dim + j] * scale;
}

/* y = x / sqrt(mean(x^2) + eps) * w   (Gemma: * (1 + w)), as transformers' RMSNorm. */
static void cpu_rmsnorm_fwd(void *out_, float *rstd, const void *x_, const void *w_, int n, int dim,
                            float eps, int add_one) {
    float *out = out_;
    const float *x = x_, *w = w_;
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * dim))
    for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * dim;
        double sum_sq = 0;
        for (int j = 0; j < dim; j++) sum_sq += (double)xi[j] * xi[j];
        float r = 1.0f / sqrtf((float)(sum_sq / dim) + eps);
        if (rstd) rstd[i] = r;
        for (int j = 0; j < dim; j++) out[(size_t)i * dim + j] = xi[j] * r * (add_one ? 1.0f + w[j] : w[j]);
    }
}

/* HF rotate_half layout: (x[i], x[i + half]) rotate by angle pos * inv_freq[i]. The angle is
 * formed in fp32 as transformers does (inv_freq @ position_ids in fp32). direction -1 rotates
 * by the opposite angle with the same cos/sin values: the exact inverse, which is also the
 * adjoint (a rotation is orthogonal), i.e. rope's backward. */
static void rope_rotate(float *x, const int32_t *pos, const float *inv_freq, int n_tok,
                        int n_heads, int head_dim, float direction) {
    int half = head_dim / 2;
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n_tok * n_heads * head_dim))
    for (int t = 0; t < n_tok; t++) {
        if (pos[t] < 0) continue;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                float angle = (float)pos[t] * inv_freq[i];
                float c = cosf(angle), s = direction * sinf(angle);
                float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}

static void cpu_rope_fwd(void *x, const int32_t *pos, const float *inv_freq, int n_tok,
                         int n_heads, int head_dim) {
    rope_rotate(x, pos, inv_freq, n_tok, n_heads, head_dim, 1.0f);
}

static float activation(float g, rs_activation act) {
    switch (act) {
    case RS_ACT_SILU: return g / (1.0f + expf(-g));
    case RS_ACT_GELU_TANH: /* gelu_pytorch_tanh */
        return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    case RS_ACT_GELU: return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    }
    return NAN;
}

static void cpu_glu_fwd(void *out_, const void *gate_, const void *up_, size_t n, rs_activation act) {
    float *out = out_;
    const float *gate = gate_, *up = up_;
#pragma omp parallel for schedule(static) if (PARALLEL(n))
    for (size_t i = 0; i < n; i++) out[i] = activation(gate[i], act) * up[i];
}

static void cpu_add_inplace(void *x_, const void *y_, size_t n) {
    float *x = x_;
    const float *y = y_;
#pragma omp parallel for schedule(static) if (PARALLEL(n))
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

/* splitmix64's output function: z = seed + (i+1) * golden gamma, then the two xor-multiply
 * rounds. A pure function of (seed, i), so no mask is stored between forward and backward. */
static uint64_t splitmix64_at(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void cpu_dropout(void *out_, const void *x_, size_t n, float p, uint64_t seed) {
    float *out = out_;
    const float *x = x_;
    float keep_scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (PARALLEL(n))
    for (size_t i = 0; i < n; i++) {
        float u = (float)(splitmix64_at(seed, i) >> 40) * (1.0f / 16777216.0f);
        out[i] = u >= p ? x[i] * keep_scale : 0.0f;
    }
}

static void cpu_scatter_rows(void *dst, const void *src, const int32_t *dst_rows, int n, int dim) {
    size_t row = (size_t)dim * sizeof(float);
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * dim))
    for (int i = 0; i < n; i++)
        memcpy((char *)dst + (size_t)dst_rows[i] * row, (const char *)src + (size_t)i * row, row);
}

static void cpu_gather_rows(void *dst, const void *src, const int32_t *src_rows, int n, int dim) {
    size_t row = (size_t)dim * sizeof(float);
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * dim))
    for (int i = 0; i < n; i++)
        memcpy((char *)dst + (size_t)i * row, (const char *)src + (size_t)src_rows[i] * row, row);
}

static void cpu_act_to_f32(float *out, const void *x, size_t n) { memcpy(out, x, n * sizeof(float)); }

static void cpu_argmax_rows(int32_t *ids, const void *x_, int rows, int dim) {
    const float *x = x_;
    for (int r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * dim;
        int32_t best = 0;
        for (int i = 1; i < dim; i++)
            if (row[i] > row[best]) best = i;
        ids[r] = best;
    }
}

/* ---------------------------------------------------------------- linear */

/* Dot product with LANES independent partial sums, so the compiler can vectorise it without
 * -ffast-math (each lane is its own sum: no reassociation needed). */
#define LANES 16
#define ROWS 4 /* rows of x that share each streamed row of W */

/* y[r] = x[r] . w for ROWS rows of x (stride k): W's row is read once for the whole block. */
static void dot_rows(float y[ROWS], const float *x, const float *w, int k) {
    float acc[ROWS][LANES] = {{0}};
    int i = 0;
    for (; i + LANES <= k; i += LANES)
        for (int r = 0; r < ROWS; r++) {
            const float *xr = x + (size_t)r * k + i;
#pragma omp simd
            for (int l = 0; l < LANES; l++) acc[r][l] += xr[l] * w[i + l];
        }
    for (int r = 0; r < ROWS; r++) {
        float s = 0;
        for (int l = 0; l < LANES; l++) s += acc[r][l];
        for (int j = i; j < k; j++) s += x[(size_t)r * k + j] * w[j];
        y[r] = s;
    }
}

static float dot(const float *x, const float *w, int k) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= k; i += LANES)
#pragma omp simd
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l] * w[i + l];
    float s = 0;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < k; i++) s += x[i] * w[i];
    return s;
}

/* out[n, m] = beta * out + x[n, k] W[m, k]^T + bias. Blocks of ROWS rows of x against one row
 * of W at a time; threads split the (row block, output column) pairs. */
static void cpu_linear_fwd(void *out_, const void *x_, const void *w_, const void *bias_, int n,
                           int k, int m, float beta) {
    float *out = out_;
    const float *x = x_, *w = w_, *bias = bias_;
    int n_blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for collapse(2) schedule(dynamic, 16) if (PARALLEL((size_t)n * k * m))
    for (int blk = 0; blk < n_blocks; blk++)
        for (int j = 0; j < m; j++) {
            int r0 = blk * ROWS, rows = n - r0 < ROWS ? n - r0 : ROWS;
            const float *wj = w + (size_t)j * k;
            float y[ROWS];
            if (rows == ROWS)
                dot_rows(y, x + (size_t)r0 * k, wj, k);
            else
                for (int r = 0; r < rows; r++) y[r] = dot(x + (size_t)(r0 + r) * k, wj, k);
            for (int r = 0; r < rows; r++) {
                float *o = out + (size_t)(r0 + r) * m + j;
                float v = y[r] + (bias ? bias[j] : 0.0f);
                *o = beta != 0.0f ? beta * *o + v : v; /* beta = 0 never reads out (may be NaN) */
            }
        }
}

/* ---------------------------------------------------------------- attention */

/* One query row: softmax(scale * q.k_j) over keys j = 0..p of its sequence, times v.
 * Two passes (max, then weights) so no score buffer is needed. */
static void attend_one(float *out, const float *q, const float *k, const float *v, int p,
                       size_t kv_stride, int head_dim, float scale) {
    float max_score = -INFINITY;
    for (int j = 0; j <= p; j++) {
        float s = scale * dot(q, k + (size_t)j * kv_stride, head_dim);
        if (s > max_score) max_score = s;
    }
    for (int d = 0; d < head_dim; d++) out[d] = 0.0f;
    float sum = 0.0f;
    for (int j = 0; j <= p; j++) {
        float e = expf(scale * dot(q, k + (size_t)j * kv_stride, head_dim) - max_score);
        const float *vj = v + (size_t)j * kv_stride;
        sum += e;
        for (int d = 0; d < head_dim; d++) out[d] += e * vj[d];
    }
    for (int d = 0; d < head_dim; d++) out[d] /= sum;
}

static void cpu_attention_fwd(void *out_, const void *q_, const void *k_, const void *v_,
                              const int32_t *q_pos, int B, int Tq, int Tk, int n_heads,
                              int n_kv_heads, int head_dim, float scale) {
    float *out = out_;
    const float *q = q_, *k = k_, *v = v_;
    int group = n_heads / n_kv_heads; /* query heads sharing one kv head (GQA) */
    size_t kv_stride = (size_t)n_kv_heads * head_dim;
#pragma omp parallel for collapse(3) schedule(dynamic, 4) if (PARALLEL((size_t)B * Tq * n_heads * head_dim * Tk))
    for (int b = 0; b < B; b++)
        for (int t = 0; t < Tq; t++)
            for (int h = 0; h < n_heads; h++) {
                size_t row = (((size_t)b * Tq + t) * n_heads + h) * head_dim;
                int p = q_pos[b * Tq + t];
                RS_CHECK(p < Tk, "attention: query position %d outside the %d keys", p, Tk);
                if (p < 0) {
                    memset(out + row, 0, (size_t)head_dim * sizeof(float));
                    continue;
                }
                size_t kv_off = (size_t)b * Tk * kv_stride + (size_t)(h / group) * head_dim;
                attend_one(out + row, q + row, k + kv_off, v + kv_off, p, kv_stride, head_dim,
                           scale);
            }
}

/* ---------------------------------------------------------------- backward: helpers */

/* y += a * x over n values (vectorisable: no reassociation involved). */
static void axpy(float *y, float a, const float *x, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* The activation-gradient convention: beta = 0 overwrites (never reads dst, which may be NaN),
 * otherwise dst = beta * dst + v. */
static void store_beta(float *dst, float v, float beta) { *dst = beta != 0.0f ? beta * *dst + v : v; }

/* Prepare a row that gradient terms are then added into: 0 for beta = 0, beta * row otherwise. */
static void start_row_beta(float *row, int n, float beta) {
    if (beta == 0.0f)
        memset(row, 0, (size_t)n * sizeof *row);
    else if (beta != 1.0f)
        for (int i = 0; i < n; i++) row[i] *= beta;
}

/* ---------------------------------------------------------------- backward: row ops */

/* Repeated ids add up, so rows of dtable are not independent: one thread walks the tokens and
 * each token's row update is vectorised. */
static void cpu_embedding_bwd(float *dtable, const void *dout_, const int32_t *ids, int n, int dim,
                              float scale) {
    const float *dout = dout_;
    for (int i = 0; i < n; i++)
        if (ids[i] >= 0) axpy(dtable + (size_t)ids[i] * dim, scale, dout + (size_t)i * dim, dim);
}

/* g_j: the norm's weight, or 1 + weight (Gemma) */
static float norm_gain(const float *w, int j, int add_one) { return add_one ? 1.0f + w[j] : w[j]; }

/* One row of y_j = x_j r g_j, r = (mean(x^2) + eps)^-1/2, so dr/dx_j = -r^3 x_j / dim:
 *   dx_j = r g_j dy_j - x_j r^3 / dim * sum_l dy_l g_l x_l */
static void rmsnorm_bwd_row(float *dx, const float *dy, const float *x, const float *w, float r,
                            int dim, int add_one, float beta) {
    double dot_dy_g_x = 0;
    for (int j = 0; j < dim; j++) dot_dy_g_x += (double)dy[j] * norm_gain(w, j, add_one) * x[j];
    float coef = (float)(dot_dy_g_x * r * r * r / dim);
    for (int j = 0; j < dim; j++) store_beta(&dx[j], r * norm_gain(w, j, add_one) * dy[j] - coef * x[j], beta);
}

/* dg_j = sum_rows dy_j x_j r, and d(1 + w) = dw, so add_one changes nothing here. */
static void cpu_rmsnorm_bwd(void *dx_, float *dw, const void *dout_, const void *x_, const void *w_,
                            const float *rstd, int n, int dim, int add_one, float beta) {
    float *dx = dx_;
    const float *dout = dout_, *x = x_, *w = w_;
    if (dx) {
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * dim))
        for (int i = 0; i < n; i++)
            rmsnorm_bwd_row(dx + (size_t)i * dim, dout + (size_t)i * dim, x + (size_t)i * dim, w,
                            rstd[i], dim, add_one, beta);
    }
    if (dw) {
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * dim))
        for (int j = 0; j < dim; j++) {
            double s = 0;
            for (int i = 0; i < n; i++)
                s += (double)dout[(size_t)i * dim + j] * x[(size_t)i * dim + j] * rstd[i];
            dw[j] += (float)s;
        }
    }
}

static void cpu_rope_bwd(void *dx, const int32_t *pos, const float *inv_freq, int n_tok,
                         int n_heads, int head_dim) {
    rope_rotate(dx, pos, inv_freq, n_tok, n_heads, head_dim, -1.0f);
}

/* d act(g) / dg, for the three activations of `activation`. */
static float activation_grad(float g, rs_activation act) {
    switch (act) {
    case RS_ACT_SILU: { /* silu = g sigma(g): sigma (1 + g (1 - sigma)) */
        float sigma = 1.0f / (1.0f + expf(-g));
        return sigma * (1.0f + g * (1.0f - sigma));
    }
    case RS_ACT_GELU_TANH: { /* 0.5 (1 + tanh u) + 0.5 g (1 - tanh^2 u) du/dg */
        const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
        float t = tanhf(c * (g + 0.044715f * g * g * g));
        return 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * g * g);
    }
    case RS_ACT_GELU: /* Phi(g) + g phi(g) */
        return 0.5f * (1.0f + erff(g * 0.7071067811865476f)) + g * 0.3989422804014327f * expf(-0.5f * g * g);
    }
    return NAN;
}

static void cpu_glu_bwd(void *dgate_, void *dup_, const void *dout_, const void *gate_,
                        const void *up_, size_t n, rs_activation act) {
    float *dgate = dgate_, *dup = dup_;
    const float *dout = dout_, *gate = gate_, *up = up_;
#pragma omp parallel for schedule(static) if (PARALLEL(n))
    for (size_t i = 0; i < n; i++) {
        if (dgate) dgate[i] = dout[i] * up[i] * activation_grad(gate[i], act);
        if (dup) dup[i] = dout[i] * activation(gate[i], act);
    }
}

/* ---------------------------------------------------------------- backward: linear */

/* dx[i, :] = beta dx[i, :] + sum_j dout[i, j] W[j, :]: rows of W added in, one row of dx per
 * thread at a time. */
static void linear_bwd_dx(float *dx, const float *dout, const float *w, int n, int k, int m,
                          float beta) {
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * k * m))
    for (int i = 0; i < n; i++) {
        float *dxi = dx + (size_t)i * k;
        start_row_beta(dxi, k, beta);
        for (int j = 0; j < m; j++) axpy(dxi, dout[(size_t)i * m + j], w + (size_t)j * k, k);
    }
}

/* dw[j, :] += sum_i dout[i, j] x[i, :]: each thread owns rows of dw, so no two write one value. */
static void linear_bwd_dw(float *dw, const float *dout, const float *x, int n, int k, int m) {
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * k * m))
    for (int j = 0; j < m; j++)
        for (int i = 0; i < n; i++) axpy(dw + (size_t)j * k, dout[(size_t)i * m + j], x + (size_t)i * k, k);
}

static void cpu_linear_bwd(void *dx, float *dw, float *dbias, const void *dout_, const void *x,
                           const void *w, int n, int k, int m, float beta) {
    const float *dout = dout_;
    if (dx) linear_bwd_dx(dx, dout, w, n, k, m, beta);
    if (dw) linear_bwd_dw(dw, dout, x, n, k, m);
    if (dbias)
        for (int j = 0; j < m; j++) {
            double s = 0;
            for (int i = 0; i < n; i++) s += dout[(size_t)i * m + j];
            dbias[j] += (float)s;
        }
}

/* ---------------------------------------------------------------- backward: attention */

/* Gradients of one query row, recomputing its probabilities (as FlashAttention's backward):
 *   P_j = softmax_j(scale q.k_j), dP_j = dout.v_j, dS_j = P_j (dP_j - sum_l P_l dP_l),
 *   dq = scale sum_j dS_j k_j,  dk_j += scale dS_j q,  dv_j += P_j dout.
 * prob and dprob are scratch rows of at least p + 1 values. dq may be NULL, dk and dv too. */
static void attend_one_bwd(float *dq, float *dk, float *dv, float *prob, float *dprob,
                           const float *dout, const float *q, const float *k, const float *v, int p,
                           size_t kv_stride, int head_dim, float scale) {
    float max_score = -INFINITY;
    for (int j = 0; j <= p; j++) {
        prob[j] = scale * dot(q, k + (size_t)j * kv_stride, head_dim);
        if (prob[j] > max_score) max_score = prob[j];
    }
    double sum = 0, sum_p_dp = 0;
    for (int j = 0; j <= p; j++) sum += (prob[j] = expf(prob[j] - max_score));
    for (int j = 0; j <= p; j++) {
        prob[j] = (float)(prob[j] / sum);
        dprob[j] = dot(dout, v + (size_t)j * kv_stride, head_dim);
        sum_p_dp += (double)prob[j] * dprob[j];
    }
    if (dq) memset(dq, 0, (size_t)head_dim * sizeof *dq);
    for (int j = 0; j <= p; j++) {
        float ds = prob[j] * (dprob[j] - (float)sum_p_dp);
        if (dq) axpy(dq, scale * ds, k + (size_t)j * kv_stride, head_dim);
        if (dk) axpy(dk + (size_t)j * kv_stride, scale * ds, q, head_dim);
        if (dv) axpy(dv + (size_t)j * kv_stride, prob[j], dout, head_dim);
    }
}

/* zero rows 0..Tk-1 of one kv head of one sequence (a strided slice of dk or dv) */
static void zero_kv_slice(float *x, int Tk, size_t kv_stride, int head_dim) {
    if (!x) return;
    for (int j = 0; j < Tk; j++) memset(x + (size_t)j * kv_stride, 0, (size_t)head_dim * sizeof *x);
}

/* Threads split (sequence, kv head) pairs: all the queries that add into one slice of dk/dv
 * (every query of the sequence, every head of the group) run on the same thread. */
static void cpu_attention_bwd(void *dq_, void *dk_, void *dv_, const void *dout_, const void *q_,
                              const void *k_, const void *v_, const int32_t *q_pos, int B, int Tq,
                              int Tk, int n_heads, int n_kv_heads, int head_dim, float scale) {
    float *dq = dq_, *dk = dk_, *dv = dv_;
    const float *dout = dout_, *q = q_, *k = k_, *v = v_;
    int group = n_heads / n_kv_heads;
    size_t kv_stride = (size_t)n_kv_heads * head_dim;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) if (PARALLEL((size_t)B * Tq * n_heads * head_dim * Tk))
    for (int b = 0; b < B; b++)
        for (int g = 0; g < n_kv_heads; g++) {
            size_t kv_off = (size_t)b * Tk * kv_stride + (size_t)g * head_dim;
            float *scratch = rs_malloc(2 * (size_t)(Tk ? Tk : 1) * sizeof *scratch);
            zero_kv_slice(dk ? dk + kv_off : NULL, Tk, kv_stride, head_dim);
            zero_kv_slice(dv ? dv + kv_off : NULL, Tk, kv_stride, head_dim);
            for (int t = 0; t < Tq; t++)
                for (int h = g * group; h < (g + 1) * group; h++) {
                    size_t row = (((size_t)b * Tq + t) * n_heads + h) * head_dim;
                    int p = q_pos[b * Tq + t];
                    RS_CHECK(p < Tk, "attention_bwd: query position %d outside the %d keys", p, Tk);
                    if (p < 0) {
                        if (dq) memset(dq + row, 0, (size_t)head_dim * sizeof *dq);
                        continue;
                    }
                    attend_one_bwd(dq ? dq + row : NULL, dk ? dk + kv_off : NULL,
                                   dv ? dv + kv_off : NULL, scratch, scratch + Tk, dout + row,
                                   q + row, k + kv_off, v + kv_off, p, kv_stride, head_dim, scale);
                }
            free(scratch);
        }
}

/* ---------------------------------------------------------------- log-probabilities */

static float logsumexp_row(const float *x, int n) {
    float max = -INFINITY;
    for (int j = 0; j < n; j++) max = x[j] > max ? x[j] : max;
    double sum = 0;
    for (int j = 0; j < n; j++) sum += expf(x[j] - max);
    return max + (float)log(sum);
}

static void cpu_logprob_fwd(float *logp, float *lse, const void *logits_, const int32_t *targets,
                            int n, int vocab) {
    const float *logits = logits_;
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * vocab))
    for (int i = 0; i < n; i++) {
        const float *row = logits + (size_t)i * vocab;
        RS_CHECK(targets[i] < vocab, "logprob: target %d outside the vocabulary of %d", targets[i], vocab);
        float l = logsumexp_row(row, vocab);
        if (lse) lse[i] = l;
        if (logp) logp[i] = targets[i] >= 0 ? row[targets[i]] - l : 0.0f;
    }
}

/* d log_softmax(z)_t / dz_j = onehot_t(j) - softmax(z)_j, softmax from the saved lse. */
static void cpu_logprob_bwd(void *dlogits_, const float *dlogp, const void *logits_,
                            const float *lse, const int32_t *targets, int n, int vocab) {
    float *dlogits = dlogits_;
    const float *logits = logits_;
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * vocab))
    for (int i = 0; i < n; i++) {
        float *d = dlogits + (size_t)i * vocab;
        const float *row = logits + (size_t)i * vocab;
        if (targets[i] < 0) {
            memset(d, 0, (size_t)vocab * sizeof *d);
            continue;
        }
        for (int j = 0; j < vocab; j++) d[j] = -dlogp[i] * expf(row[j] - lse[i]);
        d[targets[i]] += dlogp[i];
    }
}

/* ---------------------------------------------------------------- LoRA */

/* y[i, :] = beta y[i, :] + scale * B xa[i, :] with xa[i, :] = A x[i, :] (A [r, k], B [m, r]). */
static void cpu_lora_fwd(void *y_, float *xa, const void *x_, const float *A, const float *B, int n,
                         int k, int m, int r, float scale, float beta) {
    float *y = y_;
    const float *x = x_;
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * r * (k + m)))
    for (int i = 0; i < n; i++) {
        float *xai = xa + (size_t)i * r;
        for (int a = 0; a < r; a++) xai[a] = dot(x + (size_t)i * k, A + (size_t)a * k, k);
        start_row_beta(y + (size_t)i * m, m, beta);
        for (int j = 0; j < m; j++) y[(size_t)i * m + j] += scale * dot(B + (size_t)j * r, xai, r);
    }
}

/* dyB[i, :] = dy[i, :] B  ([n, r]): the gradient flowing into xa, before the scale. */
static float *lora_dy_times_b(const float *dy, const float *B, int n, int m, int r) {
    size_t count = (size_t)n * r;
    float *dyB = rs_calloc(count ? count : 1, sizeof *dyB);
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * m * r))
    for (int i = 0; i < n; i++)
        for (int j = 0; j < m; j++) axpy(dyB + (size_t)i * r, dy[(size_t)i * m + j], B + (size_t)j * r, r);
    return dyB;
}

static void cpu_lora_bwd(void *dx_, float *dA, float *dB, const void *dy_, const void *x_,
                         const float *xa, const float *A, const float *B, int n, int k, int m, int r,
                         float scale, float beta) {
    float *dx = dx_;
    const float *dy = dy_, *x = x_;
    float *dyB = lora_dy_times_b(dy, B, n, m, r);
    if (dx) {
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * k * r))
        for (int i = 0; i < n; i++) {
            float *dxi = dx + (size_t)i * k;
            start_row_beta(dxi, k, beta);
            for (int a = 0; a < r; a++) axpy(dxi, scale * dyB[(size_t)i * r + a], A + (size_t)a * k, k);
        }
    }
    if (dA) { /* dA[a, :] += scale sum_i dyB[i, a] x[i, :] */
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * k * r))
        for (int a = 0; a < r; a++)
            for (int i = 0; i < n; i++)
                axpy(dA + (size_t)a * k, scale * dyB[(size_t)i * r + a], x + (size_t)i * k, k);
    }
    if (dB) { /* dB[j, :] += scale sum_i dy[i, j] xa[i, :] */
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n * m * r))
        for (int j = 0; j < m; j++)
            for (int i = 0; i < n; i++)
                axpy(dB + (size_t)j * r, scale * dy[(size_t)i * m + j], xa + (size_t)i * r, r);
    }
    free(dyB);
}

/* The group ops as their single ops in turn (the first input gradient with beta, the rest
 * accumulated). */
static void cpu_lora_fwd_group(void *const *y, const void *x, const rs_lora_group *g, int n, int k,
                               int r, float scale, float beta) {
    for (int i = 0; i < g->count; i++)
        cpu_lora_fwd(y[i], g->xa[i], x, g->A[i], g->B[i], n, k, g->m[i], r, scale, beta);
}

static void cpu_lora_bwd_group(void *dx, const void *const *dy, const void *x,
                               const rs_lora_group *g, int n, int k, int r, float scale,
                               float beta) {
    for (int i = 0; i < g->count; i++)
        cpu_lora_bwd(dx, g->dA[i], g->dB[i], dy[i], x, g->xa[i], g->A[i], g->B[i], n, k, g->m[i],
                     r, scale, i == 0 ? beta : 1.0f);
}

/* One row of B A (B [m, r], A [r, k]) into ba[k]. */
static void lora_product_row(float *ba, const float *A, const float *B, int j, int k, int r) {
    memset(ba, 0, (size_t)k * sizeof *ba);
    for (int a = 0; a < r; a++) axpy(ba, B[(size_t)j * r + a], A + (size_t)a * k, k);
}

/* Row by row through a per-thread buffer, so w_eff may also be w (merge in place). */
static void cpu_lora_merge(void *w_eff_, const void *w_, const float *A, const float *B,
                           const uint8_t *mask, int m, int k, int r, float scale) {
    float *w_eff = w_eff_;
    const float *w = w_;
#pragma omp parallel if (PARALLEL((size_t)m * k * r))
    {
        float *ba = rs_malloc((size_t)(k ? k : 1) * sizeof *ba);
#pragma omp for schedule(static)
        for (int j = 0; j < m; j++) {
            lora_product_row(ba, A, B, j, k, r);
            for (int l = 0; l < k; l++) {
                size_t i = (size_t)j * k + l;
                w_eff[i] = w[i] + (!mask || mask[i] ? scale * ba[l] : 0.0f);
            }
        }
        free(ba);
    }
}

/* (mask ⊙ dw)[i]: masked-out entries are selected away, not multiplied by 0, so a non-finite
 * gradient outside the mask cannot leak in. */
static float masked(const float *dw, const uint8_t *mask, size_t i) {
    return !mask || mask[i] ? dw[i] : 0.0f;
}

/* G = scale (mask ⊙ dw) is never formed: dB[j, a] += G[j, :] . A[a, :] row by row, and
 * dA[a, :] += sum_j B[j, a] G[j, :]. */
static void cpu_lora_masked_grad(float *dA, float *dB, const float *dw, const uint8_t *mask,
                                 const float *A, const float *B, int m, int k, int r, float scale) {
    if (dB) {
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)m * k * r))
        for (int j = 0; j < m; j++)
            for (int a = 0; a < r; a++) {
                double s = 0;
                for (int l = 0; l < k; l++) s += masked(dw, mask, (size_t)j * k + l) * A[(size_t)a * k + l];
                dB[(size_t)j * r + a] += scale * (float)s;
            }
    }
    if (dA) {
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)m * k * r))
        for (int a = 0; a < r; a++) {
            float *dAa = dA + (size_t)a * k;
            for (int j = 0; j < m; j++) {
                float coef = scale * B[(size_t)j * r + a];
                for (int l = 0; l < k; l++) dAa[l] += coef * masked(dw, mask, (size_t)j * k + l);
            }
        }
    }
}

/* ---------------------------------------------------------------- optimizer and scores */

/* AdamW (Loshchilov & Hutter 2019) in the form of torch.optim.AdamW: decoupled decay, bias
 * corrections 1 - beta^step formed once in double. */
static void cpu_adamw(float *p, const float *g, float *m, float *v, const uint8_t *mask, size_t n,
                      float lr, float beta1, float beta2, float eps, float weight_decay, int step,
                      float grad_scale) {
    RS_CHECK(step >= 1, "adamw: step %d (steps count from 1)", step);
    float bias1 = (float)(1.0 - pow(beta1, step)), bias2 = (float)(1.0 - pow(beta2, step));
#pragma omp parallel for schedule(static) if (PARALLEL(n))
    for (size_t i = 0; i < n; i++) {
        if (mask && !mask[i]) continue;
        float gi = g[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0f - beta1) * gi;
        v[i] = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        float m_hat = m[i] / bias1, v_hat = v[i] / bias2;
        p[i] -= lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p[i]);
    }
}

/* Partial sums over fixed chunks, added in order: the result does not depend on the thread
 * count, so a resumed run clips its gradients bit-identically. */
#define SUM_CHUNK 4096
static void cpu_sum_squares(double *out, const float *x, const uint8_t *mask, size_t n) {
    size_t n_chunks = (n + SUM_CHUNK - 1) / SUM_CHUNK;
    double *partial = rs_calloc(n_chunks ? n_chunks : 1, sizeof *partial);
#pragma omp parallel for schedule(static) if (PARALLEL(n))
    for (size_t c = 0; c < n_chunks; c++) {
        size_t end = (c + 1) * SUM_CHUNK < n ? (c + 1) * SUM_CHUNK : n;
        double s = 0;
        for (size_t i = c * SUM_CHUNK; i < end; i++)
            if (!mask || mask[i]) s += (double)x[i] * x[i];
        partial[c] = s;
    }
    double total = 0;
    for (size_t c = 0; c < n_chunks; c++) total += partial[c];
    free(partial);
    *out = total;
}

static void cpu_snip_accumulate(float *score, const void *w_, const float *dw, size_t n, float weight) {
    const float *w = w_;
#pragma omp parallel for schedule(static) if (PARALLEL(n))
    for (size_t i = 0; i < n; i++) score[i] += weight * fabsf(w[i] * dw[i]);
}

static void cpu_zero_f32(float *x, size_t n) { memset(x, 0, n * sizeof *x); }

static void cpu_clamp_f32(float *x, const float *lo, const float *hi, size_t n) {
#pragma omp parallel for schedule(static) if (PARALLEL(n))
    for (size_t i = 0; i < n; i++) x[i] = x[i] < lo[i] ? lo[i] : x[i] > hi[i] ? hi[i] : x[i];
}

/* One row onto its grid. Asymmetric rounds w/scale and then adds the integer zero point (the
 * GPTQ/AutoGPTQ order; round(w/scale + zero) would break ties differently). A constant row
 * (including all zeros) is copied: scale would be 0, or q*scale off by an ulp. */
static void fake_quant_row(float *out, const float *w, int cols, int bits, int symmetric) {
    float lo = INFINITY, hi = -INFINITY;
    for (int l = 0; l < cols; l++) lo = w[l] < lo ? w[l] : lo, hi = w[l] > hi ? w[l] : hi;
    if (lo == hi) {
        if (out != w) memcpy(out, w, (size_t)cols * sizeof *out);
        return;
    }
    if (symmetric) {
        float q_max = (float)((1 << (bits - 1)) - 1), amax = fmaxf(-lo, hi), scale = amax / q_max;
        for (int l = 0; l < cols; l++) out[l] = fminf(fmaxf(rintf(w[l] / scale), -q_max), q_max) * scale;
    } else {
        float q_max = (float)((1 << bits) - 1), scale = (hi - lo) / q_max, zero = rintf(-lo / scale);
        for (int l = 0; l < cols; l++)
            out[l] = (fminf(fmaxf(rintf(w[l] / scale) + zero, 0.0f), q_max) - zero) * scale;
    }
}

/* One row of a QAT weight onto RTN's INT grid (quant.c int_group, the formula the export
 * stores), so dequant(export) is the forward's weight: the range holds zero ([min(0, min w),
 * max(0, max w)]), a zero scale is 1, and the zero point is clamped to [0, qmax]. Unlike
 * fake_quant_row, a constant row is not special: it lands on the grid like the export's. */
static void rtn_grid_row(float *out, const float *w, int cols, int bits, int symmetric) {
    if (symmetric) {
        float qs = (float)((1 << (bits - 1)) - 1), amax = 0.0f;
        for (int l = 0; l < cols; l++)
            amax = fmaxf(amax, fabsf(w[l]));
        float scale = amax / qs;
        if (scale == 0.0f) scale = 1.0f;
        for (int l = 0; l < cols; l++)
            out[l] = fminf(fmaxf(rintf(w[l] / scale), -qs), qs) * scale;
        return;
    }
    float qmax = (float)((1 << bits) - 1), lo = 0.0f, hi = 0.0f;
    for (int l = 0; l < cols; l++)
        lo = fminf(lo, w[l]), hi = fmaxf(hi, w[l]);
    float scale = (hi - lo) / qmax;
    if (scale == 0.0f) scale = 1.0f;
    float zero = fminf(fmaxf(rintf(-lo / scale), 0.0f), qmax);
    for (int l = 0; l < cols; l++)
        out[l] = (fminf(fmaxf(rintf(w[l] / scale) + zero, 0.0f), qmax) - zero) * scale;
}

/* rintf rounds half to even under the default rounding mode, which we never change. */
static void cpu_fake_quant_rows(void *w_q, const float *w, int rows, int cols, int bits, int symmetric) {
    RS_CHECK(bits >= 2 && bits <= 8, "fake_quant_rows: %d bits (allowed 2..8)", bits);
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)rows * cols))
    for (int i = 0; i < rows; i++)
        rtn_grid_row((float *)w_q + (size_t)i * cols, w + (size_t)i * cols, cols, bits, symmetric);
}

/* fake_quant_row works in place (every value is read before it is written). */
static void cpu_fake_quant_groups(void *x, size_t n_groups, int group, int bits, int symmetric) {
    RS_CHECK(bits >= 2 && bits <= 8, "fake_quant_groups: %d bits (allowed 2..8)", bits);
    RS_CHECK(group > 0, "fake_quant_groups: group of %d values", group);
    float *v = x;
#pragma omp parallel for schedule(static) if (PARALLEL(n_groups * (size_t)group))
    for (size_t i = 0; i < n_groups; i++)
        fake_quant_row(v + i * group, v + i * group, group, bits, symmetric);
}

static void cpu_cast_f32_to_weight(void *dst, const float *src, size_t n) {
    if (dst != src) memmove(dst, src, n * sizeof *src);
}

/* ---------------------------------------------------------------- quantized linears */

/* The reference: dequantize the whole weight (rs_dequantize_row, the one definition of the
 * formats) into fp32 and run the dense op on it. */
static float *dequantize_all(const rs_qweight *w) {
    float *dense = rs_malloc((size_t)w->rows * w->cols * sizeof *dense);
#pragma omp parallel if (PARALLEL((size_t)w->rows * w->cols * 64))
    {
        uint8_t *codes = rs_malloc((size_t)w->cols);
#pragma omp for schedule(static)
        for (int r = 0; r < w->rows; r++) rs_dequantize_row(w, r, codes, dense + (size_t)r * w->cols);
        free(codes);
    }
    return dense;
}

static void cpu_qmatmul(void *out, const void *x, const rs_qweight *w, const void *bias, int n,
                        float beta) {
    float *dense = dequantize_all(w);
    cpu_linear_fwd(out, x, dense, bias, n, w->cols, w->rows, beta);
    free(dense);
}

static void cpu_qmatmul_t(void *dx, const void *dout, const rs_qweight *w, int n, float beta) {
    float *dense = dequantize_all(w);
    linear_bwd_dx(dx, dout, dense, n, w->cols, w->rows, beta);
    free(dense);
}

static void *dup_array(const void *src, size_t bytes) {
    if (!src) return NULL;
    void *d = rs_malloc(bytes ? bytes : 1);
    memcpy(d, src, bytes);
    return d;
}

/* Host memory is the cpu backend's memory: upload is a deep copy. */
static int cpu_qweight_upload(rs_qweight *dst, const rs_qweight *h) {
    size_t ng = (size_t)h->rows * h->n_groups;
    *dst = *h;
    dst->packed = dup_array(h->packed, h->packed_bytes);
    dst->scales = dup_array(h->scales, ng * sizeof(float));
    dst->zeros = dup_array(h->zeros, ng * sizeof(float));
    dst->input_scale = dup_array(h->input_scale, (size_t)h->cols * sizeof(float));
    dst->outlier_cols = dup_array(h->outlier_cols, (size_t)h->n_outlier_cols * sizeof(int32_t));
    dst->outlier_vals =
        dup_array(h->outlier_vals, (size_t)h->rows * h->n_outlier_cols * sizeof(uint16_t));
    dst->crit_row_ptr = dup_array(h->crit_row_ptr, (size_t)(h->rows + 1) * sizeof(int64_t));
    dst->crit_cols = dup_array(h->crit_cols, (size_t)h->n_critical * sizeof(int32_t));
    dst->crit_vals = dup_array(h->crit_vals, (size_t)h->n_critical * sizeof(uint16_t));
    return 0;
}

static void cpu_qweight_free(rs_qweight *w) { rs_qweight_free(w); }

static void cpu_qdequantize(void *w, const rs_qweight *q) {
    float *dense = dequantize_all(q);
    memcpy(w, dense, (size_t)q->rows * q->cols * sizeof *dense);
    free(dense);
}

/* ---------------------------------------------------------------- the table */

static const rs_backend g_cpu = {
    .name = "cpu",
    .act_dtype = RS_F32,
    .weight_dtype = RS_F32,
    .free_rows = 0,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .to_device = cpu_to_device,
    .to_host = cpu_to_host,
    .copy = cpu_copy,
    .synchronize = cpu_synchronize,
    .upload_f32 = cpu_upload_f32,
    .download_f32 = cpu_download_f32,
    .peak_bytes = cpu_peak_bytes,
    .live_bytes = cpu_live_bytes,
    .workspace_bytes = cpu_workspace_bytes,
    .mem_info = NULL,
    .embedding_fwd = cpu_embedding_fwd,
    .rmsnorm_fwd = cpu_rmsnorm_fwd,
    .linear_fwd = cpu_linear_fwd,
    .rope_fwd = cpu_rope_fwd,
    .attention_fwd = cpu_attention_fwd,
    .glu_fwd = cpu_glu_fwd,
    .add_inplace = cpu_add_inplace,
    .dropout = cpu_dropout,
    .scatter_rows = cpu_scatter_rows,
    .gather_rows = cpu_gather_rows,
    .act_to_f32 = cpu_act_to_f32,
    .argmax_rows = cpu_argmax_rows,
    .embedding_bwd = cpu_embedding_bwd,
    .rmsnorm_bwd = cpu_rmsnorm_bwd,
    .linear_bwd = cpu_linear_bwd,
    .rope_bwd = cpu_rope_bwd,
    .attention_bwd = cpu_attention_bwd,
    .glu_bwd = cpu_glu_bwd,
    .logprob_fwd = cpu_logprob_fwd,
    .logprob_bwd = cpu_logprob_bwd,
    .lora_fwd = cpu_lora_fwd,
    .lora_bwd = cpu_lora_bwd,
    .lora_fwd_group = cpu_lora_fwd_group,
    .lora_bwd_group = cpu_lora_bwd_group,
    .lora_merge = cpu_lora_merge,
    .lora_masked_grad = cpu_lora_masked_grad,
    .adamw = cpu_adamw,
    .sum_squares = cpu_sum_squares,
    .snip_accumulate = cpu_snip_accumulate,
    .zero_f32 = cpu_zero_f32,
    .clamp_f32 = cpu_clamp_f32,
    .fake_quant_rows = cpu_fake_quant_rows,
    .cast_f32_to_weight = cpu_cast_f32_to_weight,
    .fake_quant_groups = cpu_fake_quant_groups,
    .qmatmul = cpu_qmatmul,
    .qmatmul_t = cpu_qmatmul_t,
    .qweight_upload = cpu_qweight_upload,
    .qweight_free = cpu_qweight_free,
    .qdequantize = cpu_qdequantize,
};

const rs_backend *rs_backend_cpu(void) { return &g_cpu; }
