/* cuda_common: what the kernels/ files share. Error-check macros, bf16 types, launch helpers,
 * warp reductions, and the host-side launchers each kernels/<op>.cu offers to backend_cuda.cu.
 *
 * Only CUDA translation units include this (C++ as compiled by nvcc). Launchers take the stream
 * (and the cuBLAS handle where needed) explicitly: the one piece of global state, the backend
 * context, lives in backend_cuda.cu. Buffers are device pointers; activations and frozen weights
 * are bf16, fp32 buffers are float. */
#ifndef RESAFE_CUDA_COMMON_H
#define RESAFE_CUDA_COMMON_H

#ifndef __CUDACC__
#error "resafe/cuda_common.h is for CUDA sources (kernels/*.cu) only"
#endif

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

extern "C" {
#include "resafe/backend.h"
#include "resafe/core.h"
}

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf16x2;

/* ---------------------------------------------------------------- error checks
 * A failing CUDA or cuBLAS call is not recoverable for the run: print where and why, exit 1.
 * Kernel faults surface at the next synchronising call; set RESAFE_CUDA_SYNC=1 to synchronise
 * after every launch so the failing kernel is the one named. */
#define CUDA_CHECK(call)                                                                           \
    do {                                                                                           \
        cudaError_t err_ = (call);                                                                 \
        if (err_ != cudaSuccess)                                                                   \
            rs_die_at(__FILE__, __LINE__, "CUDA call %s failed: %s (%s)", #call,                   \
                      cudaGetErrorString(err_), cudaGetErrorName(err_));                           \
    } while (0)

#define CUBLAS_CHECK(call)                                                                         \
    do {                                                                                           \
        cublasStatus_t st_ = (call);                                                               \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                                          \
            rs_die_at(__FILE__, __LINE__, "cuBLAS call %s failed: %s (%s)", #call,                 \
                      cublasGetStatusString(st_), cublasGetStatusName(st_));                       \
    } while (0)

/* After every kernel launch: launch errors now, execution errors too when RESAFE_CUDA_SYNC=1. */
void rs_cuda_check_launch(cudaStream_t stream, const char *kernel, const char *file, int line);
#define CUDA_CHECK_LAUNCH(stream, kernel) rs_cuda_check_launch(stream, kernel, __FILE__, __LINE__)

/* ---------------------------------------------------------------- launch helpers */
#define RS_CUDA_THREADS 256
/* Blocks for a grid-stride loop over n items: enough to fill any current GPU, never 0. */
static inline unsigned rs_cuda_blocks(size_t n, int threads) {
    size_t b = (n + (size_t)threads - 1) / (size_t)threads;
    if (b < 1) b = 1;
    if (b > 65536) b = 65536;
    return (unsigned)b;
}

__device__ __forceinline__ float rs_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float rs_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* ---------------------------------------------------------------- launchers, one file each */
/* embedding.cu */
void rs_cuda_embedding_fwd(cudaStream_t s, bf16 *out, const bf16 *table, const int32_t *ids, int n,
                           int dim, float scale);
/* rmsnorm.cu */
void rs_cuda_rmsnorm_fwd(cudaStream_t s, bf16 *out, float *rstd, const bf16 *x, const bf16 *w,
                         int n, int dim, float eps, int add_one);
/* rope.cu */
void rs_cuda_rope_fwd(cudaStream_t s, bf16 *x, const int32_t *pos, const float *inv_freq,
                      int n_tok, int n_heads, int head_dim);
/* attention.cu */
void rs_cuda_attention_fwd(cudaStream_t s, bf16 *out, const bf16 *q, const bf16 *k, const bf16 *v,
                           const int32_t *q_pos, int B, int Tq, int Tk, int n_heads,
                           int n_kv_heads, int head_dim, float scale);
/* glu.cu */
void rs_cuda_glu_fwd(cudaStream_t s, bf16 *out, const bf16 *gate, const bf16 *up, size_t n,
                     rs_activation act);
/* linear.cu */
void rs_cuda_linear_fwd(cudaStream_t s, cublasHandle_t h, bf16 *out, const bf16 *x, const bf16 *w,
                        const bf16 *bias, int n, int k, int m, float beta);
/* elementwise.cu */
void rs_cuda_add_inplace(cudaStream_t s, bf16 *x, const bf16 *y, size_t n);
void rs_cuda_scatter_rows(cudaStream_t s, bf16 *dst, const bf16 *src, const int32_t *dst_rows,
                          int n, int dim);
void rs_cuda_gather_rows(cudaStream_t s, bf16 *dst, const bf16 *src, const int32_t *src_rows,
                         int n, int dim);
/* dst (dtype dst_dtype: F32, BF16 or F16) = src (fp32), n elements, round to nearest even. */
void rs_cuda_convert_from_f32(cudaStream_t s, void *dst, rs_dtype dst_dtype, const float *src,
                              size_t n);
/* dst (fp32) = src (dtype src_dtype: F32, BF16 or F16), n elements, exact. */
void rs_cuda_convert_to_f32(cudaStream_t s, float *dst, const void *src, rs_dtype src_dtype,
                            size_t n);

#endif
