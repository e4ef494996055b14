/* glu: gated linear unit of the MLP, out = act(gate) * up (SwiGLU: silu; GeGLU: gelu). */
#include "resafe/cuda_common.h"

/* rs_cuda_activation (cuda_common.h) is shared with glu_bwd (backward.cu). Work items: the first
 * nv are groups of 8 elements (16-byte loads and stores; nv = 0 where a pointer is not 16-byte
 * aligned), then the n - 8 nv elements of the tail one by one; the same per-element arithmetic
 * and rounding either way. */
__global__ void glu_fwd_kernel(bf16 *out, const bf16 *gate, const bf16 *up, size_t n, size_t nv,
                               rs_activation act) {
    const size_t items = nv + (n - 8 * nv);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < items;
         i += (size_t)gridDim.x * blockDim.x) {
        if (i < nv) {
            float g[8], u[8];
            rs_load8(g, gate + 8 * i), rs_load8(u, up + 8 * i);
#pragma unroll
            for (int j = 0; j < 8; j++) g[j] = rs_cuda_activation(g[j], act) * u[j];
            rs_store8(out + 8 * i, g);
            continue;
        }
        const size_t e = 8 * nv + (i - nv);
        float g = __bfloat162float(gate[e]), u = __bfloat162float(up[e]);
        out[e] = __float2bfloat16(rs_cuda_activation(g, act) * u);
    }
}

void rs_cuda_glu_fwd(cudaStream_t s, bf16 *out, const bf16 *gate, const bf16 *up, size_t n,
                     rs_activation act) {
    RS_CHECK(act == RS_ACT_SILU || act == RS_ACT_GELU_TANH || act == RS_ACT_GELU,
             "glu: unknown activation %d", (int)act);
    if (n == 0) return;
    const size_t nv =
        rs_cuda_aligned16(out) && rs_cuda_aligned16(gate) && rs_cuda_aligned16(up) ? n / 8 : 0;
    glu_fwd_kernel<<<rs_cuda_blocks(nv + (n - 8 * nv), RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        out, gate, up, n, nv, act);
    CUDA_CHECK_LAUNCH(s, "glu_fwd_kernel");
}
