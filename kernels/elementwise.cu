/* elementwise: residual add, row gather/scatter (KV cache writes, batch compaction), and dtype
 * conversions between fp32 and the bf16/f16 storage types. */
#include "resafe/cuda_common.h"

#define GRID_STRIDE(i, n)                                                                          \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n);                        \
         i += (size_t)gridDim.x * blockDim.x)

/* ---------------------------------------------------------------- add */
__global__ void add_inplace_kernel(bf16 *x, const bf16 *y, size_t n) {
    GRID_STRIDE(i, n) x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(y[i]));
}

void rs_cuda_add_inplace(cudaStream_t s, bf16 *x, const bf16 *y, size_t n) {
    if (n == 0) return;
    add_inplace_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(x, y, n);
    CUDA_CHECK_LAUNCH(s, "add_inplace_kernel");
}

/* ---------------------------------------------------------------- rows
 * Plain 2-byte copies, no arithmetic: results are bit-exact. A negative row index (a padded
 * token) writes nothing (scatter) or a zero row (gather). Row indices are trusted to be inside
 * the buffers; the op table passes no row counts to check them against. */
__global__ void scatter_rows_kernel(bf16 *dst, const bf16 *src, const int32_t *dst_rows, int n,
                                    int dim) {
    size_t total = (size_t)n * (size_t)dim;
    GRID_STRIDE(idx, total) {
        size_t i = idx / (size_t)dim, d = idx % (size_t)dim;
        int32_t r = dst_rows[i];
        if (r >= 0) dst[(size_t)r * (size_t)dim + d] = src[idx];
    }
}

__global__ void gather_rows_kernel(bf16 *dst, const bf16 *src, const int32_t *src_rows, int n,
                                   int dim) {
    size_t total = (size_t)n * (size_t)dim;
    GRID_STRIDE(idx, total) {
        size_t i = idx / (size_t)dim, d = idx % (size_t)dim;
        int32_t r = src_rows[i];
        dst[idx] = r >= 0 ? src[(size_t)r * (size_t)dim + d] : __float2bfloat16(0.0f);
    }
}

void rs_cuda_scatter_rows(cudaStream_t s, bf16 *dst, const bf16 *src, const int32_t *dst_rows,
                          int n, int dim) {
    if (n <= 0 || dim <= 0) return;
    size_t total = (size_t)n * (size_t)dim;
    scatter_rows_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        dst, src, dst_rows, n, dim);
    CUDA_CHECK_LAUNCH(s, "scatter_rows_kernel");
}

void rs_cuda_gather_rows(cudaStream_t s, bf16 *dst, const bf16 *src, const int32_t *src_rows,
                         int n, int dim) {
    if (n <= 0 || dim <= 0) return;
    size_t total = (size_t)n * (size_t)dim;
    gather_rows_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        dst, src, src_rows, n, dim);
    CUDA_CHECK_LAUNCH(s, "gather_rows_kernel");
}

/* One block per row. Every thread starts from index 0 (as the host loop does) and keeps the
 * first of its indices with a strictly larger value (a strided scan visits them in increasing
 * order); the block then keeps the larger value and, on equal values, the smaller index. NaN
 * never compares larger, so the result is the host loop's: the first index of the maximum, and
 * 0 when row[0] is NaN. */
#define ARGMAX_THREADS 256
__global__ void argmax_rows_kernel(int32_t *ids, const bf16 *x, int dim) {
    __shared__ float sv[ARGMAX_THREADS];
    __shared__ int si[ARGMAX_THREADS];
    const bf16 *row = x + (size_t)blockIdx.x * dim;
    float best = __bfloat162float(row[0]);
    int besti = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = __bfloat162float(row[i]);
        if (v > best) best = v, besti = i;
    }
    sv[threadIdx.x] = best, si[threadIdx.x] = besti;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) {
            float v = sv[threadIdx.x + o];
            int vi = si[threadIdx.x + o];
            float b = sv[threadIdx.x];
            int bi = si[threadIdx.x];
            if (v > b || (v == b && vi < bi)) sv[threadIdx.x] = v, si[threadIdx.x] = vi;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) ids[blockIdx.x] = si[0];
}

void rs_cuda_argmax_rows(cudaStream_t s, int32_t *ids, const bf16 *x, int rows, int dim) {
    if (rows <= 0 || dim <= 0) return;
    argmax_rows_kernel<<<rows, ARGMAX_THREADS, 0, s>>>(ids, x, dim);
    CUDA_CHECK_LAUNCH(s, "argmax_rows_kernel");
}

/* ---------------------------------------------------------------- conversions
 * To bf16/f16: round to nearest even (NaN stays NaN), as rs_f32_to_bf16 on the host. */
__global__ void f32_to_bf16_kernel(bf16 *dst, const float *src, size_t n) {
    GRID_STRIDE(i, n) dst[i] = __float2bfloat16_rn(src[i]);
}
__global__ void f32_to_f16_kernel(__half *dst, const float *src, size_t n) {
    GRID_STRIDE(i, n) dst[i] = __float2half_rn(src[i]);
}
__global__ void bf16_to_f32_kernel(float *dst, const bf16 *src, size_t n) {
    GRID_STRIDE(i, n) dst[i] = __bfloat162float(src[i]);
}
__global__ void f16_to_f32_kernel(float *dst, const __half *src, size_t n) {
    GRID_STRIDE(i, n) dst[i] = __half2float(src[i]);
}

void rs_cuda_convert_from_f32(cudaStream_t s, void *dst, rs_dtype dst_dtype, const float *src,
                              size_t n) {
    if (n == 0) return;
    unsigned blocks = rs_cuda_blocks(n, RS_CUDA_THREADS);
    switch (dst_dtype) {
    case RS_F32:
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, s));
        return;
    case RS_BF16:
        f32_to_bf16_kernel<<<blocks, RS_CUDA_THREADS, 0, s>>>((bf16 *)dst, src, n);
        break;
    case RS_F16:
        f32_to_f16_kernel<<<blocks, RS_CUDA_THREADS, 0, s>>>((__half *)dst, src, n);
        break;
    default:
        RS_DIE("cuda backend: cannot convert fp32 to %s on the device", rs_dtype_name(dst_dtype));
    }
    CUDA_CHECK_LAUNCH(s, "f32_to_*_kernel");
}

void rs_cuda_convert_to_f32(cudaStream_t s, float *dst, const void *src, rs_dtype src_dtype,
                            size_t n) {
    if (n == 0) return;
    unsigned blocks = rs_cuda_blocks(n, RS_CUDA_THREADS);
    switch (src_dtype) {
    case RS_F32:
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, s));
        return;
    case RS_BF16:
        bf16_to_f32_kernel<<<blocks, RS_CUDA_THREADS, 0, s>>>(dst, (const bf16 *)src, n);
        break;
    case RS_F16:
        f16_to_f32_kernel<<<blocks, RS_CUDA_THREADS, 0, s>>>(dst, (const __half *)src, n);
        break;
    default:
        RS_DIE("cuda backend: cannot convert %s to fp32 on the device", rs_dtype_name(src_dtype));
    }
    CUDA_CHECK_LAUNCH(s, "*_to_f32_kernel");
}
