/* glu: gated linear unit of the MLP, out = act(gate) * up (SwiGLU: silu; GeGLU: gelu). */
#include "resafe/cuda_common.h"

/* fp32 activations with the accurate expf/tanhf/erff, matching the CPU reference's formulas:
 *   silu(g) = g / (1 + exp(-g))
 *   gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))   (Hendrycks & Gimpel 2016)
 *   gelu(g) = 0.5 g (1 + erf(g / sqrt(2))) */
__device__ __forceinline__ float glu_activation(float g, rs_activation act) {
    switch (act) {
    case RS_ACT_GELU_TANH:
        return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    case RS_ACT_GELU:
        return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    case RS_ACT_SILU:
    default:
        return g / (1.0f + expf(-g));
    }
}

__global__ void glu_fwd_kernel(bf16 *out, const bf16 *gate, const bf16 *up, size_t n,
                               rs_activation act) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]);
        out[i] = __float2bfloat16(glu_activation(g, act) * u);
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
