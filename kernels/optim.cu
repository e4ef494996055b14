/* optim: the fp32 optimizer and score ops (AdamW, gradient norm, SNIP scores, zeroing), QAT fake
 * quantization, and the counter-based dropout. Elementwise grid-stride loops except the two
 * reductions: sum_squares (deterministic) and fake_quant_rows (a block per row). */
#include "resafe/cuda_common.h"

#include <math.h>

#define GRID_STRIDE(i, n)                                                                          \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n);                        \
         i += (size_t)gridDim.x * blockDim.x)

/* ---------------------------------------------------------------- AdamW */
/* torch.optim.AdamW's update (Loshchilov & Hutter 2019); bias corrections formed on the host in
 * double as the CPU reference. mask[i] == 0: p, m, v untouched (not even rewritten). */
__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, const uint8_t *mask,
                             size_t n, float lr, float beta1, float beta2, float eps,
                             float weight_decay, float bias1, float bias2, float grad_scale) {
    GRID_STRIDE(i, n) {
        if (mask && !mask[i]) continue;
        float gi = g[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi, v[i] = vi;
        float m_hat = mi / bias1, v_hat = vi / bias2;
        p[i] -= lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p[i]);
    }
}

void rs_cuda_adamw(cudaStream_t s, float *p, const float *g, float *m, float *v,
                   const uint8_t *mask, size_t n, float lr, float beta1, float beta2, float eps,
                   float weight_decay, int step, float grad_scale) {
    RS_CHECK(step >= 1, "adamw: step %d (steps count from 1)", step);
    if (n == 0) return;
    float bias1 = (float)(1.0 - pow(beta1, step)), bias2 = (float)(1.0 - pow(beta2, step));
    adamw_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        p, g, m, v, mask, n, lr, beta1, beta2, eps, weight_decay, bias1, bias2, grad_scale);
    CUDA_CHECK_LAUNCH(s, "adamw_kernel");
}

/* ---------------------------------------------------------------- sum of squares
 * Deterministic for a given n on any GPU: SUMSQ_BLOCKS fixed blocks, block b owning the b-th
 * contiguous range; each thread sums its strided elements in order in double, the block and then
 * the final single block reduce by fixed shuffle trees. Same n, same bits, run after run (what a
 * resumed run needs to clip identically). */
#define SUMSQ_BLOCKS 1024
#define SUMSQ_THREADS 256

size_t rs_cuda_sum_squares_scratch_bytes(void) { return (SUMSQ_BLOCKS + 1) * sizeof(double); }

__global__ void sum_squares_partial_kernel(double *partial, const float *x, const uint8_t *mask,
                                           size_t n) {
    __shared__ double scratch[32];
    const size_t chunk = (n + SUMSQ_BLOCKS - 1) / SUMSQ_BLOCKS;
    const size_t i0 = blockIdx.x * chunk, i1 = min(n, i0 + chunk);
    double sum = 0.0;
    for (size_t i = i0 + threadIdx.x; i < i1; i += blockDim.x)
        if (!mask || mask[i]) sum += (double)x[i] * (double)x[i];
    sum = rs_block_sum(sum, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

__global__ void sum_squares_finish_kernel(double *out, const double *partial) {
    __shared__ double scratch[32];
    double v = partial[threadIdx.x]; /* blockDim.x == SUMSQ_BLOCKS */
    v = rs_block_sum(v, scratch);
    if (threadIdx.x == 0) *out = v;
}

void rs_cuda_sum_squares(cudaStream_t s, double *out, const float *x, const uint8_t *mask,
                         size_t n, void *scratch) {
    if (n == 0) {
        *out = 0.0;
        return;
    }
    double *partial = (double *)scratch, *total = partial + SUMSQ_BLOCKS;
    sum_squares_partial_kernel<<<SUMSQ_BLOCKS, SUMSQ_THREADS, 0, s>>>(partial, x, mask, n);
    CUDA_CHECK_LAUNCH(s, "sum_squares_partial_kernel");
    sum_squares_finish_kernel<<<1, SUMSQ_BLOCKS, 0, s>>>(total, partial);
    CUDA_CHECK_LAUNCH(s, "sum_squares_finish_kernel");
    CUDA_CHECK(cudaMemcpyAsync(out, total, sizeof(double), cudaMemcpyDeviceToHost, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
}

/* ---------------------------------------------------------------- SNIP, zero */
__global__ void snip_accumulate_kernel(float *score, const bf16 *w, const float *dw, size_t n,
                                       float weight) {
    GRID_STRIDE(i, n) score[i] += weight * fabsf(__bfloat162float(w[i]) * dw[i]);
}

void rs_cuda_snip_accumulate(cudaStream_t s, float *score, const bf16 *w, const float *dw,
                             size_t n, float weight) {
    if (n == 0) return;
    snip_accumulate_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        score, w, dw, n, weight);
    CUDA_CHECK_LAUNCH(s, "snip_accumulate_kernel");
}

void rs_cuda_zero_f32(cudaStream_t s, float *x, size_t n) {
    if (n == 0) return;
    CUDA_CHECK(cudaMemsetAsync(x, 0, n * sizeof(float), s));
}

/* ---------------------------------------------------------------- clamp (box constraints) */
__global__ void clamp_kernel(float *x, const float *lo, const float *hi, size_t n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        x[i] = v < lo[i] ? lo[i] : v > hi[i] ? hi[i] : v;
    }
}

void rs_cuda_clamp_f32(cudaStream_t s, float *x, const float *lo, const float *hi, size_t n) {
    if (n == 0) return;
    clamp_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(x, lo, hi, n);
    CUDA_CHECK_LAUNCH(s, "clamp_kernel");
}

/* ---------------------------------------------------------------- fake quantization */
/* One block per row (a QAT weight's row, or one group of it): min and max by block reductions,
 * then each value onto RTN's INT grid (quant.c int_group, what the export stores) with the CPU
 * reference's exact fp32 expressions (IEEE divide, rintf = round half to even), rounded to bf16
 * once on the store. The range holds zero (lo, hi start at 0), a zero scale is 1, the zero point
 * is clamped to [0, qmax]. */
__global__ void fake_quant_rows_kernel(bf16 *w_q, const float *w, int cols, int bits,
                                       int symmetric) {
    __shared__ float scratch[32];
    const float *row = w + (size_t)blockIdx.x * (size_t)cols;
    bf16 *out = w_q + (size_t)blockIdx.x * (size_t)cols;
    float lo = 0.0f, hi = 0.0f;
    for (int l = threadIdx.x; l < cols; l += blockDim.x)
        lo = fminf(lo, row[l]), hi = fmaxf(hi, row[l]);
    /* min as -max(-x): one reduction helper; negation is exact */
    hi = rs_warp_max(hi);
    lo = -rs_warp_max(-lo);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    if (lane == 0) scratch[warp] = hi;
    __syncthreads();
    hi = rs_warp_max(lane < n_warps ? scratch[lane] : -INFINITY);
    __syncthreads();
    if (lane == 0) scratch[warp] = -lo;
    __syncthreads();
    lo = -rs_warp_max(lane < n_warps ? scratch[lane] : -INFINITY);
    if (symmetric) {
        /* lo <= 0 <= hi: max(-lo, hi) is max |w| (CPU: the max of fabsf) */
        const float qs = (float)((1 << (bits - 1)) - 1);
        float scale = fmaxf(-lo, hi) / qs;
        if (scale == 0.0f) scale = 1.0f;
        for (int l = threadIdx.x; l < cols; l += blockDim.x)
            out[l] = __float2bfloat16(fminf(fmaxf(rintf(row[l] / scale), -qs), qs) * scale);
    } else {
        const float qmax = (float)((1 << bits) - 1);
        float scale = (hi - lo) / qmax;
        if (scale == 0.0f) scale = 1.0f;
        const float zero = fminf(fmaxf(rintf(-lo / scale), 0.0f), qmax);
        for (int l = threadIdx.x; l < cols; l += blockDim.x)
            out[l] = __float2bfloat16(
                (fminf(fmaxf(rintf(row[l] / scale) + zero, 0.0f), qmax) - zero) * scale);
    }
}

void rs_cuda_fake_quant_rows(cudaStream_t s, bf16 *w_q, const float *w, int rows, int cols,
                             int bits, int symmetric) {
    RS_CHECK(bits >= 2 && bits <= 8, "fake_quant_rows: %d bits (allowed 2..8)", bits);
    if (rows <= 0 || cols <= 0) return;
    fake_quant_rows_kernel<<<rows, RS_CUDA_THREADS, 0, s>>>(w_q, w, cols, bits, symmetric);
    CUDA_CHECK_LAUNCH(s, "fake_quant_rows_kernel");
}

/* Activation / KV fake quantization in place: one warp per group (groups are a token's row or
 * one head of it: a few dozen to a few thousand values), min and max by warp shuffles, then the
 * reference's fp32 expressions on the bf16 values, rounded to bf16 once. Blocks hold whole
 * warps, so a warp past the last group leaves as a whole. */
__global__ void fake_quant_groups_kernel(bf16 *x, size_t n_groups, int group, int bits,
                                         int symmetric) {
    const size_t g = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (g >= n_groups) return;
    bf16 *row = x + g * (size_t)group;
    float lo = INFINITY, hi = -INFINITY;
    for (int l = lane; l < group; l += 32) {
        float v = __bfloat162float(row[l]);
        lo = fminf(lo, v), hi = fmaxf(hi, v);
    }
    hi = rs_warp_max(hi);
    lo = -rs_warp_max(-lo);
    if (lo == hi) return; /* constant: unchanged */
    if (symmetric) {
        const float q_max = (float)((1 << (bits - 1)) - 1), scale = fmaxf(-lo, hi) / q_max;
        for (int l = lane; l < group; l += 32)
            row[l] = __float2bfloat16(
                fminf(fmaxf(rintf(__bfloat162float(row[l]) / scale), -q_max), q_max) * scale);
    } else {
        const float q_max = (float)((1 << bits) - 1), scale = (hi - lo) / q_max;
        const float zero = rintf(-lo / scale);
        for (int l = lane; l < group; l += 32)
            row[l] = __float2bfloat16(
                (fminf(fmaxf(rintf(__bfloat162float(row[l]) / scale) + zero, 0.0f), q_max) -
                 zero) * scale);
    }
}

void rs_cuda_fake_quant_groups(cudaStream_t s, bf16 *x, size_t n_groups, int group, int bits,
                               int symmetric) {
    RS_CHECK(bits >= 2 && bits <= 8, "fake_quant_groups: %d bits (allowed 2..8)", bits);
    RS_CHECK(group > 0, "fake_quant_groups: group of %d values", group);
    if (n_groups == 0) return;
    const int warps_per_block = RS_CUDA_THREADS / 32;
    size_t blocks = (n_groups + warps_per_block - 1) / warps_per_block;
    fake_quant_groups_kernel<<<(unsigned)blocks, RS_CUDA_THREADS, 0, s>>>(x, n_groups, group, bits,
                                                                          symmetric);
    CUDA_CHECK_LAUNCH(s, "fake_quant_groups_kernel");
}

/* ---------------------------------------------------------------- dropout */
/* splitmix64's output for counter i (backend.h): a pure function of (seed, i), identical to the
 * CPU backend's, so both keep the same elements. */
__device__ __forceinline__ uint64_t splitmix64_at(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* out may equal x: each element reads and writes only itself. */
__global__ void dropout_kernel(bf16 *out, const bf16 *x, size_t n, float p, float keep_scale,
                               uint64_t seed) {
    GRID_STRIDE(i, n) {
        float u = (float)(splitmix64_at(seed, i) >> 40) * (1.0f / 16777216.0f);
        out[i] = __float2bfloat16(u >= p ? __bfloat162float(x[i]) * keep_scale : 0.0f);
    }
}

void rs_cuda_dropout(cudaStream_t s, bf16 *out, const bf16 *x, size_t n, float p, uint64_t seed) {
    RS_CHECK(p >= 0.0f && p < 1.0f, "dropout: p = %g outside [0, 1)", p);
    if (n == 0) return;
    float keep_scale = 1.0f / (1.0f - p);
    dropout_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(out, x, n, p,
                                                                                   keep_scale, seed);
    CUDA_CHECK_LAUNCH(s, "dropout_kernel");
}
