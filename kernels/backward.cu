/* backward: the training gradients of the row and elementwise ops (embedding, rmsnorm, glu;
 * rope's is the inverse rotation in rope.cu), and the column sums they and linear_bwd share (dw
 * of a norm, dbias of a linear). bf16 activation gradients rounded once on the store; fp32
 * parameter gradients accumulated. */
#include "resafe/cuda_common.h"

#define GRID_STRIDE(i, n)                                                                          \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n);                        \
         i += (size_t)gridDim.x * blockDim.x)

/* ---------------------------------------------------------------- embedding */
/* dtable[ids[i], d] += scale * dout[i, d]. Repeated ids add into one row; to write the same bits
 * every run (full-parameter SFT resumes and repeats bit-identically) there are no atomics: the
 * host groups the tokens by id (the n ids downloaded, one stream sync per call, sorted by (id,
 * token)), then one thread per (id, column) sums its tokens' rows in token order and adds the
 * sum to the table once. A negative id (padding) adds nothing. */
__global__ void embedding_bwd_kernel(float *dtable, const bf16 *dout, const int32_t *order,
                                     const int32_t *group_start, const int32_t *group_id,
                                     int n_groups, int dim, float scale) {
    size_t total = (size_t)n_groups * (size_t)dim;
    GRID_STRIDE(idx, total) {
        size_t g = idx / (size_t)dim, d = idx % (size_t)dim;
        float sum = 0.0f;
        for (int k = group_start[g]; k < group_start[g + 1]; k++)
            sum += scale * __bfloat162float(dout[(size_t)order[k] * (size_t)dim + d]);
        dtable[(size_t)group_id[g] * (size_t)dim + d] += sum;
    }
}

size_t rs_cuda_embedding_bwd_scratch_bytes(int n) {
    return n > 0 ? (3 * (size_t)n + 1) * sizeof(int32_t) : 0;
}

static int compare_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Into pack: order[n_real] (token indices by (id, token)), group_start[n_groups + 1],
 * group_id[n_groups]; returns n_groups and the packed length. */
static int group_tokens_by_id(const int32_t *ids, int n, int32_t *pack, size_t *pack_len) {
    uint64_t *keys = (uint64_t *)rs_malloc(((size_t)n + 1) * sizeof *keys);
    int n_real = 0;
    for (int i = 0; i < n; i++)
        if (ids[i] >= 0) keys[n_real++] = ((uint64_t)(uint32_t)ids[i] << 32) | (uint32_t)i;
    qsort(keys, (size_t)n_real, sizeof *keys, compare_u64);
    int n_groups = 0;
    for (int k = 0; k < n_real; k++)
        n_groups += k == 0 || (keys[k] >> 32) != (keys[k - 1] >> 32);
    int32_t *order = pack, *start = pack + n_real, *gid = start + n_groups + 1;
    int g = 0;
    for (int k = 0; k < n_real; k++) {
        order[k] = (int32_t)(keys[k] & 0xffffffffu);
        if (k == 0 || (keys[k] >> 32) != (keys[k - 1] >> 32)) {
            start[g] = k;
            gid[g++] = (int32_t)(keys[k] >> 32);
        }
    }
    start[n_groups] = n_real;
    free(keys);
    *pack_len = (size_t)n_real + 2 * (size_t)n_groups + 1;
    return n_groups;
}

void rs_cuda_embedding_bwd(cudaStream_t s, float *dtable, const bf16 *dout, const int32_t *ids,
                           int n, int dim, float scale, void *scratch) {
    if (n <= 0 || dim <= 0) return;
    int32_t *host = (int32_t *)rs_malloc((4 * (size_t)n + 1) * sizeof(int32_t));
    CUDA_CHECK(cudaMemcpyAsync(host, ids, (size_t)n * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
    int32_t *pack = host + n;
    size_t pack_len;
    int n_groups = group_tokens_by_id(host, n, pack, &pack_len);
    if (n_groups > 0) {
        int32_t *dev = (int32_t *)scratch;
        int n_real = (int)(pack_len - 2 * (size_t)n_groups - 1);
        CUDA_CHECK(cudaMemcpyAsync(dev, pack, pack_len * sizeof(int32_t), cudaMemcpyHostToDevice, s));
        size_t total = (size_t)n_groups * (size_t)dim;
        embedding_bwd_kernel<<<rs_cuda_blocks(total, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
            dtable, dout, dev, dev + n_real, dev + n_real + n_groups + 1, n_groups, dim, scale);
        CUDA_CHECK_LAUNCH(s, "embedding_bwd_kernel");
        CUDA_CHECK(cudaStreamSynchronize(s)); /* the host pack is freed below */
    }
    free(host);
}

/* ---------------------------------------------------------------- column sums
 * acc[j] += sum_i a[i, j] b[i, j] row_scale[i] (b, row_scale optional). Deterministic: pass 1
 * gives chunk c of COL_CHUNK_ROWS rows to blockIdx.y = c, one thread per column summing its rows
 * in order (coalesced across the warp) into partial[c, j]; pass 2 adds the chunks in order. */
#define COL_CHUNK_ROWS 128

static int column_chunks(int n) { return (n + COL_CHUNK_ROWS - 1) / COL_CHUNK_ROWS; }

size_t rs_cuda_column_sum_scratch_bytes(int n, int dim) {
    if (n <= 0 || dim <= 0) return 0;
    return (size_t)column_chunks(n) * (size_t)dim * sizeof(float);
}

__global__ void column_partial_kernel(float *partial, const bf16 *a, const bf16 *b,
                                      const float *row_scale, int n, int dim) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    int i0 = blockIdx.y * COL_CHUNK_ROWS, i1 = min(n, i0 + COL_CHUNK_ROWS);
    float sum = 0.0f;
    for (int i = i0; i < i1; i++) {
        size_t e = (size_t)i * (size_t)dim + j;
        float v = __bfloat162float(a[e]);
        if (b) v *= __bfloat162float(b[e]);
        if (row_scale) v *= row_scale[i];
        sum += v;
    }
    partial[(size_t)blockIdx.y * (size_t)dim + j] = sum;
}

__global__ void column_finish_kernel(float *acc, const float *partial, int chunks, int dim) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    float sum = 0.0f;
    for (int c = 0; c < chunks; c++) sum += partial[(size_t)c * (size_t)dim + j];
    acc[j] += sum;
}

void rs_cuda_column_sums(cudaStream_t s, float *acc, const bf16 *a, const bf16 *b,
                         const float *row_scale, int n, int dim, void *scratch) {
    if (n <= 0 || dim <= 0) return;
    int chunks = column_chunks(n);
    RS_CHECK(chunks <= 65535, "column sums: %d rows are too many", n);
    float *partial = (float *)scratch;
    dim3 grid((unsigned)((dim + RS_CUDA_THREADS - 1) / RS_CUDA_THREADS), (unsigned)chunks);
    column_partial_kernel<<<grid, RS_CUDA_THREADS, 0, s>>>(partial, a, b, row_scale, n, dim);
    CUDA_CHECK_LAUNCH(s, "column_partial_kernel");
    column_finish_kernel<<<grid.x, RS_CUDA_THREADS, 0, s>>>(acc, partial, chunks, dim);
    CUDA_CHECK_LAUNCH(s, "column_finish_kernel");
}

/* ---------------------------------------------------------------- bf16 scaling */
__global__ void scale_bf16_kernel(bf16 *x, size_t n, float beta) {
    GRID_STRIDE(i, n) x[i] = __float2bfloat16(beta != 0.0f ? beta * __bfloat162float(x[i]) : 0.0f);
}

void rs_cuda_scale_bf16(cudaStream_t s, bf16 *x, size_t n, float beta) {
    if (n == 0 || beta == 1.0f) return;
    scale_bf16_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(x, n, beta);
    CUDA_CHECK_LAUNCH(s, "scale_bf16_kernel");
}

/* ---------------------------------------------------------------- rmsnorm */
/* One block per row of y_j = x_j r g_j, r = (mean(x^2) + eps)^-1/2 (saved by the forward):
 *   dx_j = r g_j dy_j - x_j r^3 / dim * sum_l dy_l g_l x_l,   dx = beta dx + that.
 * VEC: 16-byte loads and stores of 8 elements (as rmsnorm_fwd_kernel's). */
template <bool VEC>
__global__ void rmsnorm_bwd_dx_kernel(bf16 *dx, const bf16 *dout, const bf16 *x, const bf16 *w,
                                      const float *rstd, int dim, int add_one, float beta) {
    __shared__ float scratch[32];
    const size_t row = (size_t)blockIdx.x * (size_t)dim;
    const float r = rstd[blockIdx.x], one = add_one ? 1.0f : 0.0f;
    float dot = 0.0f;
    if constexpr (VEC) {
        for (int j = 8 * threadIdx.x; j < dim; j += 8 * blockDim.x) {
            float dy[8], xv[8], g[8];
            rs_load8(dy, dout + row + j), rs_load8(xv, x + row + j);
            if (w) rs_load8(g, w + j);
#pragma unroll
            for (int e = 0; e < 8; e++) dot += dy[e] * ((w ? g[e] : 1.0f) + one) * xv[e];
        }
    } else {
        for (int j = threadIdx.x; j < dim; j += blockDim.x) {
            float g = (w ? __bfloat162float(w[j]) : 1.0f) + one;
            dot += __bfloat162float(dout[row + j]) * g * __bfloat162float(x[row + j]);
        }
    }
    dot = rs_block_sum(dot, scratch);
    const float coef = dot * r * r * r / (float)dim;
    if constexpr (VEC) {
        for (int j = 8 * threadIdx.x; j < dim; j += 8 * blockDim.x) {
            float dy[8], xv[8], g[8], old[8];
            rs_load8(dy, dout + row + j), rs_load8(xv, x + row + j);
            if (w) rs_load8(g, w + j);
            if (beta != 0.0f) rs_load8(old, dx + row + j);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float v = r * ((w ? g[e] : 1.0f) + one) * dy[e] - coef * xv[e];
                if (beta != 0.0f) v += beta * old[e];
                dy[e] = v;
            }
            rs_store8(dx + row + j, dy);
        }
    } else {
        for (int j = threadIdx.x; j < dim; j += blockDim.x) {
            float g = (w ? __bfloat162float(w[j]) : 1.0f) + one;
            float v = r * g * __bfloat162float(dout[row + j]) - coef * __bfloat162float(x[row + j]);
            if (beta != 0.0f) v += beta * __bfloat162float(dx[row + j]);
            dx[row + j] = __float2bfloat16(v);
        }
    }
}

size_t rs_cuda_rmsnorm_bwd_scratch_bytes(int n, int dim) {
    return rs_cuda_column_sum_scratch_bytes(n, dim);
}

/* dw_j += sum_rows dy_j x_j r (d(1 + w) = dw: add_one changes nothing there). */
void rs_cuda_rmsnorm_bwd(cudaStream_t s, bf16 *dx, float *dw, const bf16 *dout, const bf16 *x,
                         const bf16 *w, const float *rstd, int n, int dim, int add_one, float beta,
                         void *scratch) {
    if (n <= 0 || dim <= 0) return;
    if (dx) {
        if (dim % 8 == 0 && rs_cuda_aligned16(dx) && rs_cuda_aligned16(dout) &&
            rs_cuda_aligned16(x) && rs_cuda_aligned16(w))
            rmsnorm_bwd_dx_kernel<true><<<n, 256, 0, s>>>(dx, dout, x, w, rstd, dim, add_one, beta);
        else
            rmsnorm_bwd_dx_kernel<false><<<n, 256, 0, s>>>(dx, dout, x, w, rstd, dim, add_one,
                                                           beta);
        CUDA_CHECK_LAUNCH(s, "rmsnorm_bwd_dx_kernel");
    }
    if (dw) rs_cuda_column_sums(s, dw, dout, x, rstd, n, dim, scratch);
}

/* ---------------------------------------------------------------- glu */
/* d act(g) / dg for the activations of rs_cuda_activation (formulas as the CPU reference). */
__device__ __forceinline__ float activation_grad(float g, rs_activation act) {
    switch (act) {
    case RS_ACT_GELU_TANH: { /* 0.5 (1 + tanh u) + 0.5 g (1 - tanh^2 u) du/dg */
        const float c = 0.7978845608028654f;
        float t = tanhf(c * (g + 0.044715f * g * g * g));
        return 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * g * g);
    }
    case RS_ACT_GELU: /* Phi(g) + g phi(g) */
        return 0.5f * (1.0f + erff(g * 0.7071067811865476f)) +
               g * 0.3989422804014327f * expf(-0.5f * g * g);
    case RS_ACT_SILU:
    default: { /* sigma (1 + g (1 - sigma)) */
        float sigma = 1.0f / (1.0f + expf(-g));
        return sigma * (1.0f + g * (1.0f - sigma));
    }
    }
}

/* Work items as glu_fwd_kernel's: nv groups of 8 elements, then the tail one by one. */
__global__ void glu_bwd_kernel(bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate,
                               const bf16 *up, size_t n, size_t nv, rs_activation act) {
    const size_t items = nv + (n - 8 * nv);
    GRID_STRIDE(i, items) {
        if (i < nv) {
            float d[8], g[8], u[8], r[8];
            rs_load8(d, dout + 8 * i), rs_load8(g, gate + 8 * i);
            if (dgate) {
                rs_load8(u, up + 8 * i);
#pragma unroll
                for (int j = 0; j < 8; j++) r[j] = d[j] * u[j] * activation_grad(g[j], act);
                rs_store8(dgate + 8 * i, r);
            }
            if (dup) {
#pragma unroll
                for (int j = 0; j < 8; j++) r[j] = d[j] * rs_cuda_activation(g[j], act);
                rs_store8(dup + 8 * i, r);
            }
            continue;
        }
        const size_t e = 8 * nv + (i - nv);
        float d = __bfloat162float(dout[e]), g = __bfloat162float(gate[e]);
        if (dgate)
            dgate[e] = __float2bfloat16(d * __bfloat162float(up[e]) * activation_grad(g, act));
        if (dup) dup[e] = __float2bfloat16(d * rs_cuda_activation(g, act));
    }
}

void rs_cuda_glu_bwd(cudaStream_t s, bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate,
                     const bf16 *up, size_t n, rs_activation act) {
    RS_CHECK(act == RS_ACT_SILU || act == RS_ACT_GELU_TANH || act == RS_ACT_GELU,
             "glu_bwd: unknown activation %d", (int)act);
    if (n == 0 || (!dgate && !dup)) return;
    const int al = rs_cuda_aligned16(dgate) && rs_cuda_aligned16(dup) &&
                   rs_cuda_aligned16(dout) && rs_cuda_aligned16(gate) && rs_cuda_aligned16(up);
    const size_t nv = al ? n / 8 : 0;
    glu_bwd_kernel<<<rs_cuda_blocks(nv + (n - 8 * nv), RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
        dgate, dup, dout, gate, up, n, nv, act);
    CUDA_CHECK_LAUNCH(s, "glu_bwd_kernel");
}
