/* attention_gemm: causal GQA attention forward and backward for prefill and training shapes
 * (many queries) on tensor cores: the score matrices go through cuBLAS strided-batched GEMMs
 * (bf16 in, fp32 accumulation) and a row kernel does the masked softmax and its backward.
 *
 * Same contract as attention.cu / attention_bwd.cu (backend.h): q [B, Tq, H, D], k, v
 * [B, Tk, Hkv, D], q_pos[b*Tq + t] the query's position (-1: padding, zero output row), query
 * at position p sees keys 0..min(p, Tk - 1); head h reads kv head h / (H / Hkv).
 *
 * Per sequence b and chunk of kv heads (all query heads of those kv heads):
 *   forward   S = scale Q K^T (fp32), P = softmax over the keys the query sees (bf16, 0 past
 *             them), O = P V.
 *   backward  S and P recomputed, dV = sum_g P_g^T dO_g, dP = dO V^T, dS = P (dP - rowsum(P dP))
 *             scale, dQ = dS K, dK = sum_g dS_g^T Q_g (dK, dV accumulated in fp32 over the
 *             GQA group, written to bf16 once).
 * K and V are first copied per kv head into a contiguous buffer with every key row no query of
 * the sequence sees set to zero, so garbage there (an unwritten KV cache row, NaN) never reaches
 * a GEMM (0 x NaN would). P rounded to bf16 before P V and dS before dQ, dK, as FlashAttention
 * does. The score memory is O(chunk x Tq x Tk): the chunk is sized to a fixed budget.
 * Deterministic: cuBLAS GEMMs of fixed shapes and plain row kernels, no atomics. */
#include "resafe/cuda_common.h"

#define AG_BUDGET ((size_t)256 << 20) /* score bytes per chunk (S, dP fp32 + P bf16) */
#define AG_ROW_THREADS 128

static size_t align256(size_t b) { return (b + 255) & ~(size_t)255; }

/* bytes of the per-element score state: forward S fp32 + P bf16; backward also dP fp32 */
static size_t elem_bytes(int backward) { return backward ? 10 : 6; }

/* kv heads per chunk: as many as fit the budget (at least one) */
static int chunk_heads(int Tq, int Tk, int group, int Hkv, int backward) {
    size_t per_head = (size_t)group * Tq * Tk * elem_bytes(backward);
    size_t n = per_head ? AG_BUDGET / per_head : (size_t)Hkv;
    if (n < 1) n = 1;
    if (n > (size_t)Hkv) n = (size_t)Hkv;
    return (int)n;
}

/* Whether the GEMM path takes a call: enough queries to use tensor cores, keys not far beyond
 * them (a prefill into a long cache would score mostly unused rows), head_dim a multiple of 8
 * (16-byte aligned rows for the bf16 GEMMs), one head's scores not beyond a sane size. */
extern "C" int rs_cuda_attention_gemm_fits(int Tq, int Tk, int n_heads, int n_kv_heads,
                                           int head_dim) {
    if (Tq < 16 || Tk > 4 * Tq || head_dim % 8 != 0 || n_kv_heads <= 0) return 0;
    size_t one = (size_t)(n_heads / n_kv_heads) * Tq * Tk * elem_bytes(1);
    return one <= ((size_t)1 << 30);
}

typedef struct {
    int32_t *last;      /* [B] the last key any query of the sequence sees (-1: none) */
    bf16 *kc, *vc;      /* [Hkv, Tk, D] zero past last */
    float *s;           /* [chunk x group, Tq, Tk] scores, then P (fp32) in backward */
    float *dp;          /* [chunk x group, Tq, Tk] backward only */
    bf16 *p;            /* [chunk x group, Tq, Tk] P, then dS (bf16) */
    float *dk, *dv;     /* [chunk, Tk, D] backward only */
} ag_scratch;

static size_t scratch_layout(int B, int Tq, int Tk, int H, int Hkv, int D, int backward,
                             ag_scratch *w, void *base) {
    int group = H / Hkv, ch = chunk_heads(Tq, Tk, group, Hkv, backward);
    size_t sc = (size_t)ch * group * Tq * Tk, kv = (size_t)Hkv * Tk * D;
    size_t sizes[7] = {align256((size_t)B * 4), align256(kv * 2), align256(kv * 2),
                       align256(sc * 4), backward ? align256(sc * 4) : 0, align256(sc * 2),
                       backward ? align256((size_t)ch * Tk * D * 4) : 0};
    size_t total = 0, off[8];
    for (int i = 0; i < 7; i++) off[i] = total, total += sizes[i];
    off[7] = total, total += backward ? sizes[6] : 0; /* dv after dk */
    if (w && base) {
        char *c = (char *)base;
        w->last = (int32_t *)(c + off[0]);
        w->kc = (bf16 *)(c + off[1]);
        w->vc = (bf16 *)(c + off[2]);
        w->s = (float *)(c + off[3]);
        w->dp = backward ? (float *)(c + off[4]) : NULL;
        w->p = (bf16 *)(c + off[5]);
        w->dk = backward ? (float *)(c + off[6]) : NULL;
        w->dv = backward ? (float *)(c + off[7]) : NULL;
    }
    return total;
}

extern "C" size_t rs_cuda_attention_gemm_scratch_bytes(int B, int Tq, int Tk, int n_heads,
                                                       int n_kv_heads, int head_dim,
                                                       int backward) {
    return scratch_layout(B, Tq, Tk, n_heads, n_kv_heads, head_dim, backward, NULL, NULL);
}

__device__ __forceinline__ int ag_last_key(int32_t p, int Tk) { return p < 0 ? -1 : min(p, Tk - 1); }

/* last[b] = max over the sequence's queries of their last key; one block per sequence */
__global__ void ag_last_kernel(int32_t *last, const int32_t *q_pos, int Tq, int Tk) {
    __shared__ int red[32];
    int m = -1;
    for (int t = threadIdx.x; t < Tq; t += blockDim.x)
        m = max(m, ag_last_key(q_pos[(size_t)blockIdx.x * Tq + t], Tk));
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) m = max(m, red[w]);
        last[blockIdx.x] = max(m, red[0]);
    }
}

/* kc[hk, j, :] = k[b, j, hk, :] for j <= last[b], else 0 (same for v); 8 bf16 per thread */
__global__ void ag_gather_kv_kernel(bf16 *kc, bf16 *vc, const bf16 *k, const bf16 *v,
                                    const int32_t *last, int b, int Tk, int Hkv, int D) {
    const int vec = D / 8;
    const size_t n = (size_t)Hkv * Tk * vec;
    const int lim = last[b];
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(i % vec), j = (int)(i / vec % Tk), hk = (int)(i / ((size_t)vec * Tk));
        uint4 kk = make_uint4(0, 0, 0, 0), vv = kk;
        if (j <= lim) {
            size_t src = (((size_t)b * Tk + j) * Hkv + hk) * (size_t)vec + c;
            kk = ((const uint4 *)k)[src];
            vv = ((const uint4 *)v)[src];
        }
        ((uint4 *)kc)[i] = kk;
        ((uint4 *)vc)[i] = vv;
    }
}

/* One block per score row r = (local head lh, query i): the keys j <= last key of the query.
 * Forward: P = softmax(S) as bf16 (0 past the last key). keep_f32: P also over S in fp32.
 * Rows of padded queries: all zeros. */
__global__ void ag_softmax_kernel(bf16 *p, float *s, const int32_t *q_pos, int b, int Tq, int Tk,
                                  int keep_f32) {
    __shared__ float red[32];
    const size_t r = blockIdx.x;
    const int i = (int)(r % Tq);
    const int last = ag_last_key(q_pos[(size_t)b * Tq + i], Tk);
    float *srow = s + r * Tk;
    bf16 *prow = p + r * Tk;
    float m = -INFINITY;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, srow[j]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) m = fmaxf(m, red[w]);
    __syncthreads();
    float l = 0.0f;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) l += expf(srow[j] - m);
    l = rs_block_sum(l, red);
    const float inv = last >= 0 ? 1.0f / l : 0.0f;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) {
        float pj = j <= last ? expf(srow[j] - m) * inv : 0.0f;
        prow[j] = __float2bfloat16(pj);
        if (keep_f32) srow[j] = pj;
    }
}

/* Backward row kernel: P (fp32, in s) and dP: dS = scale P (dP - sum_j P dP) into p as bf16. */
__global__ void ag_dsoftmax_kernel(bf16 *ds, const float *pf, const float *dp,
                                   const int32_t *q_pos, int b, int Tq, int Tk, float scale) {
    __shared__ float red[32];
    const size_t r = blockIdx.x;
    const int i = (int)(r % Tq);
    const int last = ag_last_key(q_pos[(size_t)b * Tq + i], Tk);
    const float *prow = pf + r * Tk, *dprow = dp + r * Tk;
    float d = 0.0f;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) d += prow[j] * dprow[j];
    d = rs_block_sum(d, red);
    bf16 *out = ds + r * Tk;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        out[j] = __float2bfloat16(j <= last ? scale * prow[j] * (dprow[j] - d) : 0.0f);
}

/* dk[b, j, hk0 + c, :] = bf16(acc[c, j, :]) for the chunk's kv heads */
__global__ void ag_store_kv_grad_kernel(bf16 *dst, const float *acc, int b, int Tk, int Hkv,
                                        int hk0, int ch, int D) {
    const size_t n = (size_t)ch * Tk * D;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int d = (int)(i % D), j = (int)(i / D % Tk), c = (int)(i / ((size_t)D * Tk));
        dst[(((size_t)b * Tk + j) * Hkv + hk0 + c) * (size_t)D + d] = __float2bfloat16(acc[i]);
    }
}

/* Row-major strided-batched GEMM C_i[M, N] = alpha op(A_i) op(B_i) + beta C_i (as
 * rs_cuda_gemm_rm, batch i at A + i sa, B + i sb, C + i sc elements). */
static void gemm_rm_batched(cublasHandle_t h, cublasOperation_t op_a, cublasOperation_t op_b,
                            int M, int N, int K, float alpha, const void *A, cudaDataType_t ta,
                            int lda, long long sa, const void *B, cudaDataType_t tb, int ldb,
                            long long sb, float beta, void *C, cudaDataType_t tc, int ldc,
                            long long sc, int batch) {
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, op_b, op_a, N, M, K, &alpha, B, tb, ldb, sb, A, ta,
                                            lda, sa, &beta, C, tc, ldc, sc, batch,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

typedef struct {
    cudaStream_t s;
    cublasHandle_t h;
    int B, Tq, Tk, H, Hkv, D, group;
    float scale;
} ag_shape;

static void prepare(const ag_shape *a, ag_scratch *w, const bf16 *k, const bf16 *v,
                    const int32_t *q_pos, int b) {
    if (b == 0) {
        ag_last_kernel<<<a->B, 256, 0, a->s>>>(w->last, q_pos, a->Tq, a->Tk);
        CUDA_CHECK_LAUNCH(a->s, "ag_last_kernel");
    }
    size_t n = (size_t)a->Hkv * a->Tk * (a->D / 8);
    ag_gather_kv_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, a->s>>>(
        w->kc, w->vc, k, v, w->last, b, a->Tk, a->Hkv, a->D);
    CUDA_CHECK_LAUNCH(a->s, "ag_gather_kv_kernel");
}

/* S[g] (local heads c*group + g of the chunk) = scale Q K^T for kv heads hk0..hk0+ch-1 */
static void scores(const ag_shape *a, const ag_scratch *w, const bf16 *q, int b, int hk0,
                   int ch) {
    const size_t qrow = (size_t)a->H * a->D, sc = (size_t)a->Tq * a->Tk;
    for (int g = 0; g < a->group; g++) {
        const bf16 *qb = q + (size_t)b * a->Tq * qrow + ((size_t)hk0 * a->group + g) * a->D;
        gemm_rm_batched(a->h, CUBLAS_OP_N, CUBLAS_OP_T, a->Tq, a->Tk, a->D, a->scale, qb,
                        CUDA_R_16BF, (int)qrow, (long long)a->group * a->D,
                        w->kc + (size_t)hk0 * a->Tk * a->D, CUDA_R_16BF, a->D,
                        (long long)a->Tk * a->D, 0.0f, w->s + g * sc, CUDA_R_32F, a->Tk,
                        (long long)(a->group * sc), ch);
    }
}

extern "C" void rs_cuda_attention_gemm_fwd(cudaStream_t s, cublasHandle_t h, bf16 *out,
                                           const bf16 *q, const bf16 *k, const bf16 *v,
                                           const int32_t *q_pos, int B, int Tq, int Tk, int H,
                                           int Hkv, int D, float scale, void *scratch) {
    ag_shape a = {s, h, B, Tq, Tk, H, Hkv, D, H / Hkv, scale};
    ag_scratch w;
    scratch_layout(B, Tq, Tk, H, Hkv, D, 0, &w, scratch);
    const int ch_max = chunk_heads(Tq, Tk, a.group, Hkv, 0);
    const size_t qrow = (size_t)H * D, sc = (size_t)Tq * Tk;
    for (int b = 0; b < B; b++) {
        prepare(&a, &w, k, v, q_pos, b);
        for (int hk0 = 0; hk0 < Hkv; hk0 += ch_max) {
            int ch = Hkv - hk0 < ch_max ? Hkv - hk0 : ch_max;
            scores(&a, &w, q, b, hk0, ch);
            ag_softmax_kernel<<<(unsigned)(ch * a.group * Tq), AG_ROW_THREADS, 0, s>>>(
                w.p, w.s, q_pos, b, Tq, Tk, 0);
            CUDA_CHECK_LAUNCH(s, "ag_softmax_kernel");
            for (int g = 0; g < a.group; g++) {
                bf16 *ob = out + (size_t)b * Tq * qrow + ((size_t)hk0 * a.group + g) * D;
                gemm_rm_batched(h, CUBLAS_OP_N, CUBLAS_OP_N, Tq, D, Tk, 1.0f, w.p + g * sc,
                                CUDA_R_16BF, Tk, (long long)(a.group * sc),
                                w.vc + (size_t)hk0 * Tk * D, CUDA_R_16BF, D, (long long)Tk * D,
                                0.0f, ob, CUDA_R_16BF, (int)qrow, (long long)a.group * D, ch);
            }
        }
    }
}

extern "C" void rs_cuda_attention_gemm_bwd(cudaStream_t s, cublasHandle_t h, bf16 *dq, bf16 *dk,
                                           bf16 *dv, const bf16 *dout, const bf16 *q,
                                           const bf16 *k, const bf16 *v, const int32_t *q_pos,
                                           int B, int Tq, int Tk, int H, int Hkv, int D,
                                           float scale, void *scratch) {
    ag_shape a = {s, h, B, Tq, Tk, H, Hkv, D, H / Hkv, scale};
    ag_scratch w;
    scratch_layout(B, Tq, Tk, H, Hkv, D, 1, &w, scratch);
    const int ch_max = chunk_heads(Tq, Tk, a.group, Hkv, 1);
    const size_t qrow = (size_t)H * D, sc = (size_t)Tq * Tk;
    for (int b = 0; b < B; b++) {
        prepare(&a, &w, k, v, q_pos, b);
        for (int hk0 = 0; hk0 < Hkv; hk0 += ch_max) {
            int ch = Hkv - hk0 < ch_max ? Hkv - hk0 : ch_max;
            unsigned rows = (unsigned)(ch * a.group * Tq);
            scores(&a, &w, q, b, hk0, ch);
            ag_softmax_kernel<<<rows, AG_ROW_THREADS, 0, s>>>(w.p, w.s, q_pos, b, Tq, Tk, 1);
            CUDA_CHECK_LAUNCH(s, "ag_softmax_kernel");
            const bf16 *kc = w.kc + (size_t)hk0 * Tk * D, *vc = w.vc + (size_t)hk0 * Tk * D;
            for (int g = 0; g < a.group; g++) {
                size_t off = (size_t)b * Tq * qrow + ((size_t)hk0 * a.group + g) * D;
                /* dV += P^T dO */
                gemm_rm_batched(h, CUBLAS_OP_T, CUBLAS_OP_N, Tk, D, Tq, 1.0f, w.p + g * sc,
                                CUDA_R_16BF, Tk, (long long)(a.group * sc), dout + off,
                                CUDA_R_16BF, (int)qrow, (long long)a.group * D, g ? 1.0f : 0.0f,
                                w.dv, CUDA_R_32F, D, (long long)Tk * D, ch);
                /* dP = dO V^T */
                gemm_rm_batched(h, CUBLAS_OP_N, CUBLAS_OP_T, Tq, Tk, D, 1.0f, dout + off,
                                CUDA_R_16BF, (int)qrow, (long long)a.group * D, vc, CUDA_R_16BF,
                                D, (long long)Tk * D, 0.0f, w.dp + g * sc, CUDA_R_32F, Tk,
                                (long long)(a.group * sc), ch);
            }
            ag_dsoftmax_kernel<<<rows, AG_ROW_THREADS, 0, s>>>(w.p, w.s, w.dp, q_pos, b, Tq, Tk,
                                                               scale);
            CUDA_CHECK_LAUNCH(s, "ag_dsoftmax_kernel");
            for (int g = 0; g < a.group; g++) {
                size_t off = (size_t)b * Tq * qrow + ((size_t)hk0 * a.group + g) * D;
                /* dQ = dS K */
                gemm_rm_batched(h, CUBLAS_OP_N, CUBLAS_OP_N, Tq, D, Tk, 1.0f, w.p + g * sc,
                                CUDA_R_16BF, Tk, (long long)(a.group * sc), kc, CUDA_R_16BF, D,
                                (long long)Tk * D, 0.0f, dq + off, CUDA_R_16BF, (int)qrow,
                                (long long)a.group * D, ch);
                /* dK += dS^T Q */
                gemm_rm_batched(h, CUBLAS_OP_T, CUBLAS_OP_N, Tk, D, Tq, 1.0f, w.p + g * sc,
                                CUDA_R_16BF, Tk, (long long)(a.group * sc), q + off, CUDA_R_16BF,
                                (int)qrow, (long long)a.group * D, g ? 1.0f : 0.0f, w.dk,
                                CUDA_R_32F, D, (long long)Tk * D, ch);
            }
            size_t n = (size_t)ch * Tk * D;
            ag_store_kv_grad_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
                dk, w.dk, b, Tk, Hkv, hk0, ch, D);
            CUDA_CHECK_LAUNCH(s, "ag_store_kv_grad_kernel");
            ag_store_kv_grad_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
                dv, w.dv, b, Tk, Hkv, hk0, ch, D);
            CUDA_CHECK_LAUNCH(s, "ag_store_kv_grad_kernel");
        }
    }
}
