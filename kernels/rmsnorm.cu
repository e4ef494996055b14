/* rmsnorm: out = x / rms(x) * w (or * (1 + w), Gemma), fp32 statistics, one rounding at the end. */
#include "resafe/cuda_common.h"

#define RMSNORM_THREADS 256

/* Sum of v over the block; every thread gets the result. scratch holds one float per warp. */
__device__ float rmsnorm_block_sum(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = rs_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    v = rs_warp_sum(v);
    return v;
}

/* One block per row. rstd = 1 / sqrt(mean(x^2) + eps) with an IEEE sqrt and divide (not rsqrtf),
 * as the CPU reference computes it. w == NULL means a weight of ones. */
__global__ void rmsnorm_fwd_kernel(bf16 *out, float *rstd, const bf16 *x, const bf16 *w, int dim,
                                   float eps, int add_one) {
    __shared__ float scratch[32];
    const bf16 *xr = x + (size_t)blockIdx.x * (size_t)dim;
    bf16 *outr = out + (size_t)blockIdx.x * (size_t)dim;
    float sum_sq = 0.0f;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float xv = __bfloat162float(xr[d]);
        sum_sq += xv * xv;
    }
    sum_sq = rmsnorm_block_sum(sum_sq, scratch);
    float r = 1.0f / sqrtf(sum_sq / (float)dim + eps);
    if (rstd && threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float wv = w ? __bfloat162float(w[d]) : 1.0f;
        if (add_one) wv += 1.0f;
        outr[d] = __float2bfloat16(__bfloat162float(xr[d]) * r * wv);
    }
}

void rs_cuda_rmsnorm_fwd(cudaStream_t s, bf16 *out, float *rstd, const bf16 *x, const bf16 *w,
                         int n, int dim, float eps, int add_one) {
    if (n <= 0 || dim <= 0) return;
    rmsnorm_fwd_kernel<<<n, RMSNORM_THREADS, 0, s>>>(out, rstd, x, w, dim, eps, add_one);
    CUDA_CHECK_LAUNCH(s, "rmsnorm_fwd_kernel");
}
