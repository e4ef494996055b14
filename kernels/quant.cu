/* quant: quantized linears on the GPU (quant.h formats, packing of src/quant_pack.c).
 *
 * The dequantize-then-cuBLAS path: the packed weight is dequantized into a bf16 scratch matrix
 * (plus one kernel for the sparse critical entries) and multiplied by cuBLAS. It serves large M
 * (prefill, training: compute bound), the input gradient, and the formats the fused kernel of
 * qgemm.cu does not take. Semantics equal rs_dequantize_row: base value by format, outlier
 * columns replaced, divided by input_scale, critical entries replaced. */
#include "resafe/cuda_common.h"

extern "C" {
#include "resafe/quant.h"
}

__constant__ float c_codebook[2][16]; /* NF4, FP4 */

static int g_codebook_ready = 0;

static void upload_codebooks(void) {
    if (g_codebook_ready) return;
    float cb[2][16];
    for (int i = 0; i < 16; i++) cb[0][i] = rs_nf4_codebook[i], cb[1][i] = rs_fp4_codebook[i];
    CUDA_CHECK(cudaMemcpyToSymbol(c_codebook, cb, sizeof cb));
    g_codebook_ready = 1;
}

struct qview {
    const uint8_t *packed;
    const float *scales, *zeros, *input_scale;
    const int32_t *outlier_cols;
    const uint16_t *outlier_vals;
    int rows, cols, bits, gs, n_groups, format, n_out;
    size_t row_bytes;
};

__device__ __forceinline__ unsigned code_at(const uint8_t *row, int c, int bits) {
    size_t bit = (size_t)c * (size_t)bits;
    unsigned v = row[bit >> 3] >> (bit & 7);
    if ((bit & 7) + (unsigned)bits > 8) v |= (unsigned)row[(bit >> 3) + 1] << (8 - (bit & 7));
    return v & ((1u << bits) - 1u);
}

__global__ void qdequant_kernel(bf16 *w, qview q) {
    size_t n = (size_t)q.rows * (size_t)q.cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(i / (size_t)q.cols), c = (int)(i % (size_t)q.cols);
        unsigned code = code_at(q.packed + (size_t)r * q.row_bytes, c, q.bits);
        int g = c / q.gs;
        const float *sc = q.scales + (size_t)r * q.n_groups;
        float v;
        if (q.format == RS_QFMT_INT) {
            float off = q.zeros ? q.zeros[(size_t)r * q.n_groups + g] : (float)(1 << (q.bits - 1));
            v = ((float)code - off) * sc[g];
        } else if (q.format == RS_QFMT_NF4 || q.format == RS_QFMT_FP4) {
            v = c_codebook[q.format == RS_QFMT_NF4 ? 0 : 1][code & 15] * sc[g];
        } else {
            v = ((float)code - 128.0f) * sc[0];
        }
        if (q.n_out > 0) { /* outlier columns ascending: binary search */
            int lo = 0, hi = q.n_out - 1;
            while (lo <= hi) {
                int mid = (lo + hi) >> 1, oc = q.outlier_cols[mid];
                if (oc == c) {
                    v = __half2float(
                        __ushort_as_half(q.outlier_vals[(size_t)r * q.n_out + mid]));
                    break;
                }
                if (oc < c) lo = mid + 1;
                else hi = mid - 1;
            }
        }
        if (q.input_scale) v = v / q.input_scale[c];
        w[i] = __float2bfloat16(v);
    }
}

__global__ void qcritical_kernel(bf16 *w, const int64_t *row_ptr, const int32_t *cols,
                                 const uint16_t *vals, int rows, int n_cols) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x)
        for (int64_t k = row_ptr[r]; k < row_ptr[r + 1]; k++)
            w[(size_t)r * n_cols + cols[k]] = __float2bfloat16(__half2float(__ushort_as_half(vals[k])));
}

static void add_critical(cudaStream_t s, bf16 *w, const rs_qweight *q) {
    if (q->crit_row_ptr && q->n_critical > 0) {
        qcritical_kernel<<<rs_cuda_blocks((size_t)q->rows, RS_CUDA_THREADS), RS_CUDA_THREADS, 0,
                           s>>>(w, q->crit_row_ptr, q->crit_cols, q->crit_vals, q->rows, q->cols);
        CUDA_CHECK_LAUNCH(s, "qcritical_kernel");
    }
}

/* The generic path below (one element per thread, outlier columns by binary search) serves
 * LLM.int8 weights; the other formats take qgemm.cu's span-per-thread dequantizer. */
extern "C" void rs_cuda_qdequantize(cudaStream_t s, bf16 *w, const rs_qweight *q) {
    if (rs_cuda_qdequant_fast(s, w, q) == 0) {
        add_critical(s, w, q);
        return;
    }
    upload_codebooks();
    qview v;
    v.packed = q->packed;
    v.scales = q->scales;
    v.zeros = q->zeros;
    v.input_scale = q->input_scale;
    v.outlier_cols = q->outlier_cols;
    v.outlier_vals = q->outlier_vals;
    v.rows = q->rows;
    v.cols = q->cols;
    v.bits = q->spec.bits;
    v.gs = q->group_size;
    v.n_groups = q->n_groups;
    v.format = (int)q->spec.format;
    v.n_out = q->n_outlier_cols;
    v.row_bytes = rs_qpack_row_bytes(q->cols, q->spec.bits);
    size_t n = (size_t)q->rows * (size_t)q->cols;
    qdequant_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(w, v);
    CUDA_CHECK_LAUNCH(s, "qdequant_kernel");
    add_critical(s, w, q);
}
