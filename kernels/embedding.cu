/* embedding: token ids -> rows of the (bf16) embedding table, times a scale (Gemma: sqrt(dim)). */
#include "resafe/cuda_common.h"

/* out[i, d] = table[ids[i], d] * scale. The product is taken in fp32 and rounded once, so
 * scale = 1 copies the row exactly. A negative id (not a token) gives a zero row. The table's
 * row count is not passed: ids are trusted to be < vocab (the tokenizer made them). */
__global__ void embedding_fwd_kernel(bf16 *out, const bf16 *table, const int32_t *ids, int n,
                                     int dim, float scale) {
    size_t total = (size_t)n * (size_t)dim;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t i = idx / (size_t)dim, d = idx % (size_t)dim;
        int32_t id = ids[i];
        float v = id < 0 ? 0.0f : __bfloat162float(table[(size_t)id * (size_t)dim + d]) * scale;
        out[idx] = __float2bfloat16(v);
    }
}

void rs_cuda_embedding_fwd(cudaStream_t s, bf16 *out, const bf16 *table, const int32_t *ids, int n,
                           int dim, float scale) {
    if (n <= 0 || dim <= 0) return;
    size_t total = (size_t)n * (size_t)dim;
    embedding_fwd_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        out, table, ids, n, dim, scale);
    CUDA_CHECK_LAUNCH(s, "embedding_fwd_kernel");
}
