/* logprob: token log-probabilities from bf16 logits and their gradient, one row at a time in
 * fp32 (no fp32 copy of the logits is made). Per row i with z = logits[i, :]:
 *   lse = max + log(sum_j exp(z_j - max)),  logp = z[target] - lse   (target < 0: logp = 0)
 *   dz_j = dlogp (onehot_target(j) - exp(z_j - lse))                  (target < 0: row of 0)
 * A target >= vocab (a caller bug; the CPU backend dies on it) gives logp = NaN, so it cannot
 * pass unnoticed. */
#include "resafe/cuda_common.h"

#define LOGPROB_THREADS 512

__device__ __forceinline__ float block_max(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = rs_warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : -INFINITY;
    v = rs_warp_max(v);
    __syncthreads();
    return v;
}

/* One block per row: the max, then the fp32 sum of exp(z - max), each a block reduction. */
__global__ void logprob_fwd_kernel(float *logp, float *lse, const bf16 *logits,
                                   const int32_t *targets, int vocab) {
    __shared__ float scratch[32];
    const bf16 *z = logits + (size_t)blockIdx.x * (size_t)vocab;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, __bfloat162float(z[j]));
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(__bfloat162float(z[j]) - mx);
    sum = rs_block_sum(sum, scratch);
    if (threadIdx.x != 0) return;
    const float l = mx + logf(sum);
    const int32_t t = targets[blockIdx.x];
    if (lse) lse[blockIdx.x] = l;
    if (logp) logp[blockIdx.x] = t < 0 ? 0.0f : t < vocab ? __bfloat162float(z[t]) - l : NAN;
}

void rs_cuda_logprob_fwd(cudaStream_t s, float *logp, float *lse, const bf16 *logits,
                         const int32_t *targets, int n, int vocab) {
    if (n <= 0 || (!logp && !lse)) return;
    RS_CHECK(vocab > 0, "logprob: empty vocabulary");
    logprob_fwd_kernel<<<n, LOGPROB_THREADS, 0, s>>>(logp, lse, logits, targets, vocab);
    CUDA_CHECK_LAUNCH(s, "logprob_fwd_kernel");
}

/* Elementwise over [n, vocab]: the target's entry is dlogp (1 - p) in one expression, so it is
 * rounded to bf16 once. */
__global__ void logprob_bwd_kernel(bf16 *dlogits, const float *dlogp, const bf16 *logits,
                                   const float *lse, const int32_t *targets, int n, int vocab) {
    const size_t total = (size_t)n * (size_t)vocab;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t i = idx / (size_t)vocab;
        const int j = (int)(idx % (size_t)vocab);
        const int32_t t = targets[i];
        float d = 0.0f;
        if (t >= 0) {
            const float p = expf(__bfloat162float(logits[idx]) - lse[i]);
            d = j == t ? dlogp[i] * (1.0f - p) : -dlogp[i] * p;
        }
        dlogits[idx] = __float2bfloat16(d);
    }
}

void rs_cuda_logprob_bwd(cudaStream_t s, bf16 *dlogits, const float *dlogp, const bf16 *logits,
                         const float *lse, const int32_t *targets, int n, int vocab) {
    if (n <= 0 || vocab <= 0) return;
    size_t total = (size_t)n * (size_t)vocab;
    logprob_bwd_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        dlogits, dlogp, logits, lse, targets, n, vocab);
    CUDA_CHECK_LAUNCH(s, "logprob_bwd_kernel");
}
