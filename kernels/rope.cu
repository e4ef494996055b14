/* rope: rotary position embedding in place, Hugging Face rotate_half layout. */
#include "resafe/cuda_common.h"

/* One thread per (token, head, i < head_dim/2): rotates the pair (x[i], x[i + half]) by the
 * angle pos * inv_freq[i], computed in fp32 with the accurate sincosf (no fast math: angles reach
 * thousands of radians). Padded tokens (pos < 0) are left untouched. */
__global__ void rope_fwd_kernel(bf16 *x, const int32_t *pos, const float *inv_freq, int n_tok,
                                int n_heads, int head_dim) {
    int half = head_dim / 2;
    size_t total = (size_t)n_tok * (size_t)n_heads * (size_t)half;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t i = idx % (size_t)half, row = idx / (size_t)half; /* row = token * n_heads + head */
        int32_t p = pos[row / (size_t)n_heads];
        if (p < 0) continue;
        float angle = (float)p * inv_freq[i];
        float sn, cs;
        sincosf(angle, &sn, &cs);
        bf16 *xr = x + row * (size_t)head_dim;
        float x1 = __bfloat162float(xr[i]), x2 = __bfloat162float(xr[i + half]);
        xr[i] = __float2bfloat16(x1 * cs - x2 * sn);
        xr[i + half] = __float2bfloat16(x2 * cs + x1 * sn);
    }
}

void rs_cuda_rope_fwd(cudaStream_t s, bf16 *x, const int32_t *pos, const float *inv_freq,
                      int n_tok, int n_heads, int head_dim) {
    RS_CHECK(head_dim % 2 == 0, "rope: head_dim %d must be even", head_dim);
    if (n_tok <= 0 || n_heads <= 0 || head_dim <= 0) return;
    size_t total = (size_t)n_tok * (size_t)n_heads * (size_t)(head_dim / 2);
    rope_fwd_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        x, pos, inv_freq, n_tok, n_heads, head_dim);
    CUDA_CHECK_LAUNCH(s, "rope_fwd_kernel");
}
