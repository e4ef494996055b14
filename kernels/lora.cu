/* lora: the low-rank adapter's forward and backward (y += scale x A^T B^T), the elementwise-mode
 * merge (w + scale mask (B A)) and its gradient. A [r, k] and B [m, r] are fp32 trainable
 * parameters; x, y and the frozen w are bf16.
 *
 * Precision of the GEMMs: cuBLAS's GemmEx needs both inputs of one type, and an fp32 copy of the
 * activations would cost n x k x 4 bytes per call, so A, B and the rank-r intermediates (x A^T,
 * dy B) are rounded to bf16 in the op scratch and every GEMM runs on bf16 tensor cores with fp32
 * accumulation (what torch autocast does with an fp32 adapter). The masters, xa and the
 * gradients dA, dB stay fp32; dA and dB accumulate (GEMM beta = 1).
 *
 * The merge and the masked gradient are plain kernels rather than GEMMs: the product B A is m x k
 * (a full weight), which would need an fp32 scratch of the weight's size, while r is small. */
#include "resafe/cuda_common.h"

static size_t align256(size_t b) { return (b + 255) & ~(size_t)255; }

/* The scratch of one LoRA call, carved in this order. */
typedef struct {
    bf16 *A, *B;   /* [r, k], [m, r] */
    bf16 *xa;      /* [n, r] */
    float *dyB;    /* [n, r] (also xa when the caller passes none) */
    bf16 *dyB_bf;  /* [n, r] */
} lora_scratch;

size_t rs_cuda_lora_scratch_bytes(int n, int k, int m, int r) {
    size_t nr = (size_t)n * r;
    return align256((size_t)r * k * 2) + align256((size_t)m * r * 2) + align256(nr * 2) +
           align256(nr * 4) + align256(nr * 2);
}

static lora_scratch carve(void *scratch, int n, int k, int m, int r) {
    char *p = (char *)scratch;
    size_t nr = (size_t)n * r;
    lora_scratch s;
    s.A = (bf16 *)p, p += align256((size_t)r * k * 2);
    s.B = (bf16 *)p, p += align256((size_t)m * r * 2);
    s.xa = (bf16 *)p, p += align256(nr * 2);
    s.dyB = (float *)p, p += align256(nr * 4);
    s.dyB_bf = (bf16 *)p;
    return s;
}

static void to_bf16(cudaStream_t s, bf16 *dst, const float *src, size_t n) {
    rs_cuda_convert_from_f32(s, dst, RS_BF16, src, n);
}

/* xa[n, r] = x A^T (fp32 out); y[n, m] = beta y + scale bf16(xa) B^T (one rounding of y; beta 0:
 * y not read). */
void rs_cuda_lora_fwd(cudaStream_t s, cublasHandle_t h, bf16 *y, float *xa, const bf16 *x,
                      const float *A, const float *B, int n, int k, int m, int r, float scale,
                      float beta, void *scratch) {
    if (n <= 0 || m <= 0) return;
    if (r <= 0 || k <= 0) {
        rs_cuda_scale_bf16(s, y, (size_t)n * m, beta);
        return;
    }
    lora_scratch w = carve(scratch, n, k, m, r);
    float *xa_out = xa ? xa : w.dyB;
    to_bf16(s, w.A, A, (size_t)r * k);
    to_bf16(s, w.B, B, (size_t)m * r);
    rs_cuda_gemm_rm(h, CUBLAS_OP_N, CUBLAS_OP_T, n, r, k, 1.0f, x, CUDA_R_16BF, k, w.A,
                    CUDA_R_16BF, k, 0.0f, xa_out, CUDA_R_32F, r);
    to_bf16(s, w.xa, xa_out, (size_t)n * r);
    rs_cuda_gemm_rm(h, CUBLAS_OP_N, CUBLAS_OP_T, n, m, r, scale, w.xa, CUDA_R_16BF, r, w.B,
                    CUDA_R_16BF, r, beta, y, CUDA_R_16BF, m);
}

/* dyB = dy B [n, r]; dx = beta dx + scale dyB A; dA += scale dyB^T x; dB += scale dy^T xa. */
void rs_cuda_lora_bwd(cudaStream_t s, cublasHandle_t h, bf16 *dx, float *dA, float *dB,
                      const bf16 *dy, const bf16 *x, const float *xa, const float *A,
                      const float *B, int n, int k, int m, int r, float scale, float beta,
                      void *scratch) {
    if (n <= 0 || r <= 0 || k <= 0 || m <= 0) {
        if (dx && n > 0 && k > 0) rs_cuda_scale_bf16(s, dx, (size_t)n * k, beta);
        return;
    }
    lora_scratch w = carve(scratch, n, k, m, r);
    if (dx || dA) {
        to_bf16(s, w.B, B, (size_t)m * r);
        rs_cuda_gemm_rm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, r, m, 1.0f, dy, CUDA_R_16BF, m, w.B,
                        CUDA_R_16BF, r, 0.0f, w.dyB, CUDA_R_32F, r);
        to_bf16(s, w.dyB_bf, w.dyB, (size_t)n * r);
    }
    if (dx) {
        to_bf16(s, w.A, A, (size_t)r * k);
        rs_cuda_gemm_rm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, k, r, scale, w.dyB_bf, CUDA_R_16BF, r, w.A,
                        CUDA_R_16BF, k, beta, dx, CUDA_R_16BF, k);
    }
    if (dA)
        rs_cuda_gemm_rm(h, CUBLAS_OP_T, CUBLAS_OP_N, r, k, n, scale, w.dyB_bf, CUDA_R_16BF, r, x,
                        CUDA_R_16BF, k, 1.0f, dA, CUDA_R_32F, k);
    if (dB) {
        to_bf16(s, w.xa, xa, (size_t)n * r);
        rs_cuda_gemm_rm(h, CUBLAS_OP_T, CUBLAS_OP_N, m, r, n, scale, dy, CUDA_R_16BF, m, w.xa,
                        CUDA_R_16BF, r, 1.0f, dB, CUDA_R_32F, r);
    }
}

/* ---------------------------------------------------------------- groups
 * The adapters of projections that read one x (q/k/v, gate/up), batched where the rank-r
 * products share an operand: x [A_1; ..; A_c]^T is one GEMM with N = c r (instead of c GEMMs
 * with N = r: 32 output tiles each on 132 SMs), so are dx = [dyB_1 .. dyB_c] [A_1; ..; A_c]
 * (K = c r, one pass over dx) and [dA_1; ..; dA_c] = [dyB_1 .. dyB_c]^T x. The roundings are
 * the single op's (A, B, xa, dy B to bf16; fp32 accumulation). */
typedef struct {
    bf16 *A;      /* [c r, k] */
    bf16 *B;      /* [max m, r], one adapter's at a time */
    float *cat;   /* [n, c r]: x A^T, then dy B */
    bf16 *cat_bf; /* [n, c r] */
    bf16 *xa;     /* [n, r], one adapter's at a time */
    float *dA;    /* [c r, k] */
} lora_group_scratch;

static int group_max_m(const rs_lora_group *g) {
    int max_m = 0;
    for (int i = 0; i < g->count; i++) max_m = g->m[i] > max_m ? g->m[i] : max_m;
    return max_m;
}

size_t rs_cuda_lora_group_scratch_bytes(int n, int k, int r, const rs_lora_group *g) {
    const size_t cr = (size_t)g->count * r;
    return align256(cr * k * 2) + align256((size_t)group_max_m(g) * r * 2) +
           align256((size_t)n * cr * 4) + align256((size_t)n * cr * 2) +
           align256((size_t)n * r * 2) + align256(cr * k * 4);
}

static lora_group_scratch carve_group(void *scratch, int n, int k, int r, const rs_lora_group *g) {
    const size_t cr = (size_t)g->count * r;
    char *p = (char *)scratch;
    lora_group_scratch w;
    w.A = (bf16 *)p, p += align256(cr * k * 2);
    w.B = (bf16 *)p, p += align256((size_t)group_max_m(g) * r * 2);
    w.cat = (float *)p, p += align256((size_t)n * cr * 4);
    w.cat_bf = (bf16 *)p, p += align256((size_t)n * cr * 2);
    w.xa = (bf16 *)p, p += align256((size_t)n * r * 2);
    w.dA = (float *)p;
    return w;
}

void rs_cuda_lora_fwd_group(cudaStream_t s, cublasHandle_t h, bf16 *const *y, const bf16 *x,
                            const rs_lora_group *g, int n, int k, int r, float scale, float beta,
                            void *scratch) {
    if (n <= 0 || g->count <= 0) return;
    if (r <= 0 || k <= 0) {
        for (int i = 0; i < g->count; i++)
            if (g->m[i] > 0) rs_cuda_scale_bf16(s, y[i], (size_t)n * g->m[i], beta);
        return;
    }
    lora_group_scratch w = carve_group(scratch, n, k, r, g);
    const int cr = g->count * r;
    for (int i = 0; i < g->count; i++)
        to_bf16(s, w.A + (size_t)i * r * k, g->A[i], (size_t)r * k);
    rs_cuda_gemm_rm(h, CUBLAS_OP_N, CUBLAS_OP_T, n, cr, k, 1.0f, x, CUDA_R_16BF, k, w.A,
                    CUDA_R_16BF, k, 0.0f, w.cat, CUDA_R_32F, cr);
    to_bf16(s, w.cat_bf, w.cat, (size_t)n * cr);
    for (int i = 0; i < g->count; i++) {
        if (g->xa[i]) /* the saved x A^T of adapter i: columns i r .. of the product */
            CUDA_CHECK(cudaMemcpy2DAsync(g->xa[i], (size_t)r * 4, w.cat + (size_t)i * r,
                                         (size_t)cr * 4, (size_t)r * 4, (size_t)n,
                                         cudaMemcpyDeviceToDevice, s));
        if (g->m[i] <= 0) continue;
        to_bf16(s, w.B, g->B[i], (size_t)g->m[i] * r);
        rs_cuda_gemm_rm(h, CUBLAS_OP_N, CUBLAS_OP_T, n, g->m[i], r, scale,
                        w.cat_bf + (size_t)i * r, CUDA_R_16BF, cr, w.B, CUDA_R_16BF, r, beta,
                        y[i], CUDA_R_16BF, g->m[i]);
    }
}

void rs_cuda_lora_bwd_group(cudaStream_t s, cublasHandle_t h, bf16 *dx, const bf16 *const *dy,
                            const bf16 *x, const rs_lora_group *g, int n, int k, int r,
                            float scale, float beta, void *scratch) {
    if (n <= 0 || g->count <= 0) return;
    if (r <= 0 || k <= 0) {
        if (dx && k > 0) rs_cuda_scale_bf16(s, dx, (size_t)n * k, beta);
        return;
    }
    lora_group_scratch w = carve_group(scratch, n, k, r, g);
    const int cr = g->count * r;
    /* [dy_1 B_1 .. dy_c B_c] (fp32, then bf16) */
    for (int i = 0; i < g->count; i++) {
        if (g->m[i] <= 0) {
            CUDA_CHECK(cudaMemset2DAsync(w.cat + (size_t)i * r, (size_t)cr * 4, 0,
                                         (size_t)r * 4, (size_t)n, s));
            continue;
        }
        to_bf16(s, w.B, g->B[i], (size_t)g->m[i] * r);
        rs_cuda_gemm_rm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, r, g->m[i], 1.0f, dy[i], CUDA_R_16BF,
                        g->m[i], w.B, CUDA_R_16BF, r, 0.0f, w.cat + (size_t)i * r, CUDA_R_32F,
                        cr);
    }
    to_bf16(s, w.cat_bf, w.cat, (size_t)n * cr);
    for (int i = 0; i < g->count; i++)
        to_bf16(s, w.A + (size_t)i * r * k, g->A[i], (size_t)r * k);
    if (dx)
        rs_cuda_gemm_rm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, k, cr, scale, w.cat_bf, CUDA_R_16BF, cr,
                        w.A, CUDA_R_16BF, k, beta, dx, CUDA_R_16BF, k);
    /* [dA_1; ..; dA_c] = scale [dyB ..]^T x, added to each adapter's dA */
    rs_cuda_gemm_rm(h, CUBLAS_OP_T, CUBLAS_OP_N, cr, k, n, scale, w.cat_bf, CUDA_R_16BF, cr, x,
                    CUDA_R_16BF, k, 0.0f, w.dA, CUDA_R_32F, k);
    const float one = 1.0f;
    for (int i = 0; i < g->count; i++) {
        if (g->dA[i])
            CUBLAS_CHECK(cublasSaxpy(h, r * k, &one, w.dA + (size_t)i * r * k, 1, g->dA[i], 1));
        if (!g->dB[i] || g->m[i] <= 0) continue;
        to_bf16(s, w.xa, g->xa[i], (size_t)n * r);
        rs_cuda_gemm_rm(h, CUBLAS_OP_T, CUBLAS_OP_N, g->m[i], r, n, scale, dy[i], CUDA_R_16BF,
                        g->m[i], w.xa, CUDA_R_16BF, r, 1.0f, g->dB[i], CUDA_R_32F, r);
    }
}

/* ---------------------------------------------------------------- elementwise mode */
/* w_eff[j, l] = w[j, l] + scale (B A)[j, l] where mask allows; (B A)[j, l] summed over the rank
 * in order in fp32, as the CPU reference. Each element reads only its own w, so w_eff may be w.
 * A masked-out entry is w unchanged, bit for bit. */
__global__ void lora_merge_kernel(bf16 *w_eff, const bf16 *w, const float *A, const float *B,
                                  const uint8_t *mask, int m, int k, int r, float scale) {
    const size_t total = (size_t)m * (size_t)k;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        if (mask && !mask[idx]) {
            w_eff[idx] = w[idx];
            continue;
        }
        const size_t j = idx / (size_t)k, l = idx % (size_t)k;
        float ba = 0.0f;
        for (int a = 0; a < r; a++) ba += B[j * (size_t)r + a] * A[(size_t)a * k + l];
        w_eff[idx] = __float2bfloat16(__bfloat162float(w[idx]) + scale * ba);
    }
}

void rs_cuda_lora_merge(cudaStream_t s, bf16 *w_eff, const bf16 *w, const float *A,
                        const float *B, const uint8_t *mask, int m, int k, int r, float scale) {
    if (m <= 0 || k <= 0) return;
    size_t total = (size_t)m * (size_t)k;
    lora_merge_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        w_eff, w, A, B, mask, m, k, r, scale);
    CUDA_CHECK_LAUNCH(s, "lora_merge_kernel");
}

/* G = scale (mask ⊙ dw); masked-out entries are selected away (a non-finite dw there cannot
 * leak in). */
__device__ __forceinline__ float masked(const float *dw, const uint8_t *mask, size_t i) {
    return !mask || mask[i] ? dw[i] : 0.0f;
}

/* dB[j, a] += scale G[j, :] . A[a, :]: one block per row j, a block sum per rank index. */
__global__ void lora_masked_grad_db_kernel(float *dB, const float *dw, const uint8_t *mask,
                                           const float *A, int k, int r, float scale) {
    __shared__ float scratch[32];
    const size_t j = blockIdx.x;
    for (int a = 0; a < r; a++) {
        float sum = 0.0f;
        for (int l = threadIdx.x; l < k; l += blockDim.x)
            sum += masked(dw, mask, j * (size_t)k + l) * A[(size_t)a * k + l];
        sum = rs_block_sum(sum, scratch);
        if (threadIdx.x == 0) dB[j * (size_t)r + a] += scale * sum;
    }
}

/* dA[a, l] += sum_j scale B[j, a] G[j, l]: one thread per (a, l), rows j in order (coalesced
 * over l across the warp; B[j, a] is one broadcast load). */
__global__ void lora_masked_grad_da_kernel(float *dA, const float *dw, const uint8_t *mask,
                                           const float *B, int m, int k, int r, float scale) {
    const size_t total = (size_t)r * (size_t)k;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t a = idx / (size_t)k, l = idx % (size_t)k;
        float acc = dA[idx];
        for (int j = 0; j < m; j++)
            acc += scale * B[(size_t)j * r + a] * masked(dw, mask, (size_t)j * k + l);
        dA[idx] = acc;
    }
}

void rs_cuda_lora_masked_grad(cudaStream_t s, float *dA, float *dB, const float *dw,
                              const uint8_t *mask, const float *A, const float *B, int m, int k,
                              int r, float scale) {
    if (m <= 0 || k <= 0 || r <= 0) return;
    if (dB) {
        lora_masked_grad_db_kernel<<<m, RS_CUDA_THREADS, 0, s>>>(dB, dw, mask, A, k, r, scale);
        CUDA_CHECK_LAUNCH(s, "lora_masked_grad_db_kernel");
    }
    if (dA) {
        size_t total = (size_t)r * (size_t)k;
        lora_masked_grad_da_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0,
                                     s>>>(dA, dw, mask, B, m, k, r, scale);
        CUDA_CHECK_LAUNCH(s, "lora_masked_grad_da_kernel");
    }
}
