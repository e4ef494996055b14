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

/* d += a b on tensor cores: mma.sync m16n8k16, bf16 in, fp32 accumulate (sm_80+); lane 4 g + t
 * holds A (a0: row g, k 2t..2t+1; a1: row g + 8; a2, a3: k + 8), B (b0: k 2t..2t+1, column g;
 * b1: k + 8) and D (d0, d1: row g, columns 2t, 2t + 1; d2, d3: row g + 8). */
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* cp.async (sm_80+): a 16-byte global -> shared copy that does not wait for its data; commit
 * closes a group of copies, wait<N> waits until at most N groups are in flight. */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(gmem) : "memory");
}
/* "memory" clobbers: the compiler must not move shared-memory accesses across a copy, a commit
 * or a wait (other threads' copies are seen after the wait and the barrier that follows it). */
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Block-wide sum for blocks of whole warps (at most 1024 threads); every thread gets the result.
 * scratch holds 32 values. Ends with a barrier, so scratch may be reused right after. */
template <typename T> __device__ __forceinline__ T rs_block_sum(T v, T *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : (T)0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    return v;
}

/* Eight bf16 at p (16-byte aligned) as floats, and back with round-to-nearest-even (the same
 * rounding as __float2bfloat16): the vector body of the bandwidth-bound row and elementwise
 * kernels. rs_cuda_aligned16: a pointer such a body may use (NULL counts as aligned). */
__device__ __forceinline__ void rs_load8(float (&f)[8], const bf16 *p) {
    const uint4 u = *(const uint4 *)p;
    const bf16x2 *h = (const bf16x2 *)&u;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 t = __bfloat1622float2(h[j]);
        f[2 * j] = t.x, f[2 * j + 1] = t.y;
    }
}

__device__ __forceinline__ void rs_store8(bf16 *p, const float (&f)[8]) {
    uint4 u;
    bf16x2 *h = (bf16x2 *)&u;
#pragma unroll
    for (int j = 0; j < 4; j++) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
    *(uint4 *)p = u;
}

static inline int rs_cuda_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* The GLU activations in fp32 with the accurate expf/tanhf/erff, as the CPU reference:
 *   silu(g) = g / (1 + exp(-g))
 *   gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))   (Hendrycks & Gimpel 2016)
 *   gelu(g) = 0.5 g (1 + erf(g / sqrt(2))) */
__device__ __forceinline__ float rs_cuda_activation(float g, rs_activation act) {
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

/* Row-major GEMM C[M, N] = alpha op(A)[M, K] op(B)[K, N] + beta C through cublasGemmEx with fp32
 * compute. lda, ldb, ldc are row strides of the matrices as stored; op N uses the matrix as
 * stored, op T its transpose. Read column-major, row-major C is C^T = op(B)^T op(A)^T, which is
 * cuBLAS's GEMM with the operands swapped and the same op flags. beta = 0 does not read C. */
static inline void rs_cuda_gemm_rm(cublasHandle_t h, cublasOperation_t op_a,
                                   cublasOperation_t op_b, int M, int N, int K, float alpha,
                                   const void *A, cudaDataType_t type_a, int lda, const void *B,
                                   cudaDataType_t type_b, int ldb, float beta, void *C,
                                   cudaDataType_t type_c, int ldc) {
    CUBLAS_CHECK(cublasGemmEx(h, op_b, op_a, N, M, K, &alpha, B, type_b, ldb, A, type_a, lda, &beta,
                              C, type_c, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
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
void rs_cuda_rope_bwd(cudaStream_t s, bf16 *dx, const int32_t *pos, const float *inv_freq,
                      int n_tok, int n_heads, int head_dim);
/* attention.cu */
void rs_cuda_attention_fwd(cudaStream_t s, bf16 *out, const bf16 *q, const bf16 *k, const bf16 *v,
                           const int32_t *q_pos, int B, int Tq, int Tk, int n_heads,
                           int n_kv_heads, int head_dim, float scale);
/* glu.cu */
void rs_cuda_glu_fwd(cudaStream_t s, bf16 *out, const bf16 *gate, const bf16 *up, size_t n,
                     rs_activation act);
/* quant.cu: w[rows, cols] (bf16) = the quantized weight's effective matrix (rs_dequantize_row's
 * semantics); q is a backend-resident rs_qweight (device arrays). */
struct rs_qweight;
extern "C" void rs_cuda_qdequantize(cudaStream_t s, bf16 *w, const struct rs_qweight *q);
/* qgemm.cu: the fused dequant-matmul for few rows of x (kernels/qgemm.cuh says how) and the fast
 * dequantizer quant.cu uses where the format allows. tune_nt / tune_splits: 0 = heuristics. */
extern "C" int rs_cuda_qmm_supported(const struct rs_qweight *q);
extern "C" size_t rs_cuda_qmm_workspace_bytes(const struct rs_qweight *q, const void *x, int M,
                                              int tune_nt, int tune_splits);
extern "C" void rs_cuda_qmm(cudaStream_t s, bf16 *out, const bf16 *x, const struct rs_qweight *q,
                            const bf16 *bias, int M, float beta, void *ws, int *counters,
                            int n_counters, int tune_nt, int tune_splits);
extern "C" int rs_cuda_qdequant_fast(cudaStream_t s, bf16 *w, const struct rs_qweight *q);
/* linear.cu */
void rs_cuda_linear_fwd(cudaStream_t s, cublasHandle_t h, bf16 *out, const bf16 *x, const bf16 *w,
                        const bf16 *bias, int n, int k, int m, float beta);
/* ---- training (backward, LoRA, optimizer). Launchers that need temporary device memory take
 * `scratch`, at least the bytes their *_scratch_bytes function names (the backend's one op
 * scratch buffer, 256-byte aligned). */
/* backward.cu: embedding, rmsnorm, glu backward, bf16 scaling, column sums */
/* Deterministic (no atomics); waits for the stream (the ids are grouped on the host). */
size_t rs_cuda_embedding_bwd_scratch_bytes(int n);
void rs_cuda_embedding_bwd(cudaStream_t s, float *dtable, const bf16 *dout, const int32_t *ids,
                           int n, int dim, float scale, void *scratch);
size_t rs_cuda_column_sum_scratch_bytes(int n, int dim);
/* acc[j] += sum_i a[i, j] (* b[i, j] if b) (* row_scale[i] if row_scale), deterministic order. */
void rs_cuda_column_sums(cudaStream_t s, float *acc, const bf16 *a, const bf16 *b,
                         const float *row_scale, int n, int dim, void *scratch);
size_t rs_cuda_rmsnorm_bwd_scratch_bytes(int n, int dim);
void rs_cuda_rmsnorm_bwd(cudaStream_t s, bf16 *dx, float *dw, const bf16 *dout, const bf16 *x,
                         const bf16 *w, const float *rstd, int n, int dim, int add_one, float beta,
                         void *scratch);
void rs_cuda_glu_bwd(cudaStream_t s, bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate,
                     const bf16 *up, size_t n, rs_activation act);
/* x = beta * x (beta = 0 writes zeros without reading x) */
void rs_cuda_scale_bf16(cudaStream_t s, bf16 *x, size_t n, float beta);
/* linear.cu */
size_t rs_cuda_linear_bwd_scratch_bytes(int n, int m);
void rs_cuda_linear_bwd(cudaStream_t s, cublasHandle_t h, bf16 *dx, float *dw, float *dbias,
                        const bf16 *dout, const bf16 *x, const bf16 *w, int n, int k, int m,
                        float beta, void *scratch);
/* attention_bwd.cu */
size_t rs_cuda_attention_bwd_scratch_bytes(int B, int Tq, int n_heads);
void rs_cuda_attention_bwd(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout,
                           const bf16 *q, const bf16 *k, const bf16 *v, const int32_t *q_pos,
                           int B, int Tq, int Tk, int n_heads, int n_kv_heads, int head_dim,
                           float scale, void *scratch);
/* attention_gemm.cu: the tensor-core path for many queries (prefill, training); fits says whether
 * a shape takes it; scratch of the bytes named (backward = 1 for the backward's). */
extern "C" int rs_cuda_attention_gemm_fits(int Tq, int Tk, int n_heads, int n_kv_heads,
                                           int head_dim);
extern "C" size_t rs_cuda_attention_gemm_scratch_bytes(int B, int Tq, int Tk, int n_heads,
                                                       int n_kv_heads, int head_dim, int backward);
extern "C" void rs_cuda_attention_gemm_fwd(cudaStream_t s, cublasHandle_t h, bf16 *out,
                                           const bf16 *q, const bf16 *k, const bf16 *v,
                                           const int32_t *q_pos, int B, int Tq, int Tk, int H,
                                           int Hkv, int D, float scale, void *scratch);
extern "C" void rs_cuda_attention_gemm_bwd(cudaStream_t s, cublasHandle_t h, bf16 *dq, bf16 *dk,
                                           bf16 *dv, const bf16 *dout, const bf16 *q,
                                           const bf16 *k, const bf16 *v, const int32_t *q_pos,
                                           int B, int Tq, int Tk, int H, int Hkv, int D,
                                           float scale, void *scratch);
/* attention_flash.cu: FlashAttention-2 forward and backward on tensor cores (the default where
 * it fits: head_dim 64 or 128, at least 16 queries); the forward also writes each row's
 * log-sum-exp [B, H, Tq] where lse is not NULL, and the backward takes that and the output
 * (out, lse) or recomputes them (both NULL); its scratch holds lse and Dsum per query row. */
extern "C" int rs_cuda_attention_flash_fits(int Tq, int Tk, int n_heads, int n_kv_heads,
                                            int head_dim);
extern "C" void rs_cuda_attention_flash_fwd(cudaStream_t s, bf16 *out, float *lse, const bf16 *q,
                                            const bf16 *k, const bf16 *v, const int32_t *q_pos,
                                            int B, int Tq, int Tk, int n_heads, int n_kv_heads,
                                            int head_dim, float scale);
extern "C" size_t rs_cuda_attention_flash_bwd_scratch_bytes(int B, int Tq, int n_heads);
extern "C" void rs_cuda_attention_flash_bwd(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv,
                                            const bf16 *dout, const bf16 *q, const bf16 *k,
                                            const bf16 *v, const bf16 *out, const float *lse,
                                            const int32_t *q_pos, int B, int Tq, int Tk,
                                            int n_heads, int n_kv_heads, int head_dim, float scale,
                                            void *scratch);
/* logprob.cu */
void rs_cuda_logprob_fwd(cudaStream_t s, float *logp, float *lse, const bf16 *logits,
                         const int32_t *targets, int n, int vocab);
void rs_cuda_logprob_bwd(cudaStream_t s, bf16 *dlogits, const float *dlogp, const bf16 *logits,
                         const float *lse, const int32_t *targets, int n, int vocab);
/* lora.cu */
size_t rs_cuda_lora_scratch_bytes(int n, int k, int m, int r);
void rs_cuda_lora_fwd(cudaStream_t s, cublasHandle_t h, bf16 *y, float *xa, const bf16 *x,
                      const float *A, const float *B, int n, int k, int m, int r, float scale,
                      float beta, void *scratch);
size_t rs_cuda_lora_group_scratch_bytes(int n, int k, int r, const rs_lora_group *g);
void rs_cuda_lora_fwd_group(cudaStream_t s, cublasHandle_t h, bf16 *const *y, const bf16 *x,
                            const rs_lora_group *g, int n, int k, int r, float scale, float beta,
                            void *scratch);
void rs_cuda_lora_bwd_group(cudaStream_t s, cublasHandle_t h, bf16 *dx, const bf16 *const *dy,
                            const bf16 *x, const rs_lora_group *g, int n, int k, int r,
                            float scale, float beta, void *scratch);
void rs_cuda_lora_bwd(cudaStream_t s, cublasHandle_t h, bf16 *dx, float *dA, float *dB,
                      const bf16 *dy, const bf16 *x, const float *xa, const float *A,
                      const float *B, int n, int k, int m, int r, float scale, float beta,
                      void *scratch);
void rs_cuda_lora_merge(cudaStream_t s, bf16 *w_eff, const bf16 *w, const float *A,
                        const float *B, const uint8_t *mask, int m, int k, int r, float scale);
void rs_cuda_lora_masked_grad(cudaStream_t s, float *dA, float *dB, const float *dw,
                              const uint8_t *mask, const float *A, const float *B, int m, int k,
                              int r, float scale);
/* optim.cu: adamw, sum_squares, snip, zero, fake quantization, dropout */
void rs_cuda_adamw(cudaStream_t s, float *p, const float *g, float *m, float *v,
                   const uint8_t *mask, size_t n, float lr, float beta1, float beta2, float eps,
                   float weight_decay, int step, float grad_scale);
size_t rs_cuda_sum_squares_scratch_bytes(void);
/* The sum into *out (host); waits for the stream. */
void rs_cuda_sum_squares(cudaStream_t s, double *out, const float *x, const uint8_t *mask,
                         size_t n, void *scratch);
void rs_cuda_snip_accumulate(cudaStream_t s, float *score, const bf16 *w, const float *dw,
                             size_t n, float weight);
void rs_cuda_zero_f32(cudaStream_t s, float *x, size_t n);
void rs_cuda_clamp_f32(cudaStream_t s, float *x, const float *lo, const float *hi, size_t n);
void rs_cuda_fake_quant_rows(cudaStream_t s, bf16 *w_q, const float *w, int rows, int cols,
                             int bits, int symmetric);
void rs_cuda_fake_quant_groups(cudaStream_t s, bf16 *x, size_t n_groups, int group, int bits,
                               int symmetric);
void rs_cuda_dropout(cudaStream_t s, bf16 *out, const bf16 *x, size_t n, float p, uint64_t seed);

/* elementwise.cu */
void rs_cuda_add_inplace(cudaStream_t s, bf16 *x, const bf16 *y, size_t n);
void rs_cuda_scatter_rows(cudaStream_t s, bf16 *dst, const bf16 *src, const int32_t *dst_rows,
                          int n, int dim);
void rs_cuda_argmax_rows(cudaStream_t s, int32_t *ids, const bf16 *x, int rows, int dim);
void rs_cuda_gather_rows(cudaStream_t s, bf16 *dst, const bf16 *src, const int32_t *src_rows,
                         int n, int dim);
/* dst (dtype dst_dtype: F32, BF16 or F16) = src (fp32), n elements, round to nearest even. */
void rs_cuda_convert_from_f32(cudaStream_t s, void *dst, rs_dtype dst_dtype, const float *src,
                              size_t n);
/* dst (fp32) = src (dtype src_dtype: F32, BF16 or F16), n elements, exact. */
void rs_cuda_convert_to_f32(cudaStream_t s, float *dst, const void *src, rs_dtype src_dtype,
                            size_t n);

#endif
