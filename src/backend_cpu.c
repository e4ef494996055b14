/* backend_cpu: the reference implementation of the op table (include/resafe/backend.h).
 * fp32 activations and weights, plain loops, OpenMP over independent rows. Every op here is
 * the specification the CUDA backend is checked against, so clarity wins over speed; only
 * linear_fwd (where all the time goes) is blocked, and only as far as clarity allows. */
#include "resafe/backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Threads only pay off above some work: a fork/join costs microseconds, and on a loaded
 * machine far more, which would dominate the tiny ops of a decode step. */
#define PARALLEL(work) ((work) >= 32768)

/* ---------------------------------------------------------------- memory */

static void *cpu_alloc(size_t bytes) {
    void *p = aligned_alloc(64, rs_align64(bytes ? bytes : 1));
    RS_CHECK(p, "out of memory allocating %zu bytes", bytes);
    return p;
}

static void cpu_free(void *p) { free(p); }
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
 * formed in fp32 as transformers does (inv_freq @ position_ids in fp32). */
static void cpu_rope_fwd(void *x_, const int32_t *pos, const float *inv_freq, int n_tok,
                         int n_heads, int head_dim) {
    float *x = x_;
    int half = head_dim / 2;
#pragma omp parallel for schedule(static) if (PARALLEL((size_t)n_tok * n_heads * head_dim))
    for (int t = 0; t < n_tok; t++) {
        if (pos[t] < 0) continue;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                float angle = (float)pos[t] * inv_freq[i];
                float c = cosf(angle), s = sinf(angle);
                float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
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

/* ---------------------------------------------------------------- the table */

static const rs_backend g_cpu = {
    .name = "cpu",
    .act_dtype = RS_F32,
    .weight_dtype = RS_F32,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .to_device = cpu_to_device,
    .to_host = cpu_to_host,
    .copy = cpu_copy,
    .synchronize = cpu_synchronize,
    .upload_f32 = cpu_upload_f32,
    .download_f32 = cpu_download_f32,
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
};

const rs_backend *rs_backend_cpu(void) { return &g_cpu; }
