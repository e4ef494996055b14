/* glu: gated linear unit of the MLP, out = act(gate) * up (SwiGLU: silu; GeGLU: gelu). */
#include "resafe/cuda_common.h"

/* rs_cuda_activation (cuda_common.h) is shared with glu_bwd (backward.cu). */
__global__ void glu_fwd_kernel(bf16 *out, const bf16 *gate, const bf16 *up, size_t n,
                               rs_activation act) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]);
        out[i] = __float2bfloat16(rs_cuda_activation(g, act) * u);
    }
}

void rs_cuda_glu_fwd(cudaStream_t s, bf16 *out, const bf16 *gate, const bf16 *up, size_t n,
                     rs_activation act) {
    RS_CHECK(act == RS_ACT_SILU || act == RS_ACT_GELU_TANH || act == RS_ACT_GELU,
             "glu: unknown activation %d", (int)act);
    if (n == 0) return;
    glu_fwd_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(out, gate, up, n,
                                                                                   act);
    CUDA_CHECK_LAUNCH(s, "glu_fwd_kernel");
}
