/* linear: y[n, m] = x[n, k] W[m, k]^T (+ bias[m]) (+ beta * y), bf16 in and out, fp32 compute,
 * through cuBLAS (tensor cores). */
#include "resafe/cuda_common.h"

/* out[i, j] = beta * out[i, j] + bias[j] (out not read when beta = 0; bias NULL adds 0).
 * Prepares out so that the GEMM can run with beta = 1 and the bias joins the GEMM's fp32 sum
 * before its one rounding to bf16. */
__global__ void linear_bias_kernel(bf16 *out, const bf16 *bias, int n, int m, float beta) {
    size_t total = (size_t)n * (size_t)m;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        float b = bias ? __bfloat162float(bias[idx % (size_t)m]) : 0.0f;
        out[idx] = __float2bfloat16(beta != 0.0f ? beta * __bfloat162float(out[idx]) + b : b);
    }
}

/* Row-major y = x W^T is, read column-major, y^T (m x n) = W (k x m)^T x^T (k x n): one GEMM with
 * op(A) = T on W (lda = k), op(B) = N on x (ldb = k), C = y (ldc = m). beta = 0 means out is not
 * read (BLAS semantics), so it may hold garbage or NaN. With a bias and beta != 0 the old out
 * and the bias are summed and rounded once before the GEMM (one extra bf16 rounding, rare). */
void rs_cuda_linear_fwd(cudaStream_t s, cublasHandle_t h, bf16 *out, const bf16 *x, const bf16 *w,
                        const bf16 *bias, int n, int k, int m, float beta) {
    if (n <= 0 || m <= 0) return;
    float gemm_beta = beta;
    if (bias || k <= 0) {
        size_t total = (size_t)n * (size_t)m;
        linear_bias_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
            out, bias, n, m, beta);
        CUDA_CHECK_LAUNCH(s, "linear_bias_kernel");
        gemm_beta = 1.0f;
    }
    if (k <= 0) return; /* empty sum: out = beta * out + bias is already there */
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w, CUDA_R_16BF, k, x,
                              CUDA_R_16BF, k, &gemm_beta, out, CUDA_R_16BF, m, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
}

/* ---------------------------------------------------------------- backward */
size_t rs_cuda_linear_bwd_scratch_bytes(int n, int m) {
    return rs_cuda_column_sum_scratch_bytes(n, m);
}

/* From out[n, m] = x[n, k] W[m, k]^T + b:
 *   dx[n, k] = beta dx + dout[n, m] W[m, k]      bf16 out, fp32 compute (beta = 0: not read)
 *   dw[m, k] += dout^T[m, n] x[n, k]             bf16 in, fp32 out accumulated (GEMM beta 1)
 *   dbias[m] += column sums of dout              deterministic two-pass reduction
 * An empty inner dimension (m = 0 for dx) leaves dx = beta dx without a GEMM. */
void rs_cuda_linear_bwd(cudaStream_t s, cublasHandle_t h, bf16 *dx, float *dw, float *dbias,
                        const bf16 *dout, const bf16 *x, const bf16 *w, int n, int k, int m,
                        float beta, void *scratch) {
    if (n <= 0) return;
    if (dx && k > 0) {
        if (m <= 0)
            rs_cuda_scale_bf16(s, dx, (size_t)n * (size_t)k, beta);
        else
            rs_cuda_gemm_rm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, k, m, 1.0f, dout, CUDA_R_16BF, m, w,
                            CUDA_R_16BF, k, beta, dx, CUDA_R_16BF, k);
    }
    if (dw && k > 0 && m > 0)
        rs_cuda_gemm_rm(h, CUBLAS_OP_T, CUBLAS_OP_N, m, k, n, 1.0f, dout, CUDA_R_16BF, m, x,
                        CUDA_R_16BF, k, 1.0f, dw, CUDA_R_32F, k);
    if (dbias && m > 0) rs_cuda_column_sums(s, dbias, dout, NULL, NULL, n, m, scratch);
}
