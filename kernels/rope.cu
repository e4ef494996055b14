/* rope: rotary position embedding in place, Hugging Face rotate_half layout; the backward is the
 * inverse rotation (a rotation's adjoint) by the same kernel. */
#include "resafe/cuda_common.h"

/* One thread per (token, i < head_dim/2): the angle pos * inv_freq[i] in fp32 with the accurate
 * sincosf (no fast math: angles reach thousands of radians), computed once and applied to the
 * pair (x[i], x[i + half]) of every head (it does not depend on the head; the first form, one
 * thread per (token, head, i) with 64-bit divisions, ran at a third of the memory bandwidth).
 * inverse: the angle's negative (sin negated), the backward. Padded tokens (pos < 0) are left
 * untouched. */
__global__ void rope_kernel(bf16 *x, const int32_t *pos, const float *inv_freq, int n_tok,
                            int n_heads, int head_dim, int inverse) {
    const int half = head_dim / 2;
    const size_t total = (size_t)n_tok * (size_t)half;
    const size_t tok_stride = (size_t)n_heads * (size_t)head_dim;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t tok = idx / (size_t)half;
        const int i = (int)(idx - tok * (size_t)half);
        const int32_t p = pos[tok];
        if (p < 0) continue;
        const float angle = (float)p * inv_freq[i];
        float sn, cs;
        sincosf(angle, &sn, &cs);
        if (inverse) sn = -sn;
        bf16 *xr = x + tok * tok_stride;
#pragma unroll 4
        for (int h = 0; h < n_heads; h++, xr += head_dim) {
            const float x1 = __bfloat162float(xr[i]), x2 = __bfloat162float(xr[i + half]);
            xr[i] = __float2bfloat16(x1 * cs - x2 * sn);
            xr[i + half] = __float2bfloat16(x2 * cs + x1 * sn);
        }
    }
}

static void rope_launch(cudaStream_t s, bf16 *x, const int32_t *pos, const float *inv_freq,
                        int n_tok, int n_heads, int head_dim, int inverse) {
    RS_CHECK(head_dim % 2 == 0, "rope%s: head_dim %d must be even", inverse ? "_bwd" : "",
             head_dim);
    if (n_tok <= 0 || n_heads <= 0 || head_dim <= 0) return;
    const size_t total = (size_t)n_tok * (size_t)(head_dim / 2);
    rope_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        x, pos, inv_freq, n_tok, n_heads, head_dim, inverse);
    CUDA_CHECK_LAUNCH(s, "rope_kernel");
}

void rs_cuda_rope_fwd(cudaStream_t s, bf16 *x, const int32_t *pos, const float *inv_freq,
                      int n_tok, int n_heads, int head_dim) {
    rope_launch(s, x, pos, inv_freq, n_tok, n_heads, head_dim, 0);
}

void rs_cuda_rope_bwd(cudaStream_t s, bf16 *dx, const int32_t *pos, const float *inv_freq,
                      int n_tok, int n_heads, int head_dim) {
    rope_launch(s, dx, pos, inv_freq, n_tok, n_heads, head_dim, 1);
}
