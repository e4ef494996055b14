/* attention: causal GQA attention forward with an online softmax (Milakov & Gimelshein 2018,
 * "Online normalizer calculation for softmax"; the FlashAttention recurrence).
 *
 * Layouts (backend.h): q, out [B, Tq, n_heads, head_dim]; k, v [B, Tk, n_kv_heads, head_dim],
 * key row j of a sequence holds position j. q_pos[b * Tq + t] is the absolute position p of a
 * query (-1: padding, output row of zeros); it attends to keys 0..min(p, Tk - 1). Query head h
 * reads kv head h / (n_heads / n_kv_heads), as Hugging Face's repeat_kv.
 *
 * Simple now: a block takes one (sequence, kv head) and ATTN_ROWS query rows, where a row is a
 * (query, head) pair among the heads sharing that kv head, so a decode step (Tq = 1) still fills
 * a block with the GQA group. One warp per row. K and V tiles of ATTN_KEYS keys go through shared
 * memory, shared by the block's warps; lane j scores key j of the tile, then the warp folds the
 * tile into its running max, normaliser and output (each lane owning head_dim/64 bf16 pairs).
 * fp32 everywhere, bf16 only in storage. */
#include "resafe/cuda_common.h"

#define ATTN_ROWS 8 /* query rows (warps) per block */
#define ATTN_KEYS 32 /* keys per tile: one per lane */
#define ATTN_MAX_HEAD_DIM 256
#define ATTN_MAX_PAIRS (ATTN_MAX_HEAD_DIM / 64) /* bf16 pairs of the output each lane owns */

/* Shared memory, in 4-byte words: q rows as fp32, then the K tile with an odd row stride (lane j
 * reads row j: an odd stride puts the 32 lanes in 32 different banks), then the V tile (lanes
 * read consecutive words of one row). */
static size_t attention_smem_bytes(int head_dim) {
    int half = head_dim / 2, k_stride = half | 1;
    return sizeof(float) * ((size_t)ATTN_ROWS * head_dim + (size_t)ATTN_KEYS * k_stride +
                            (size_t)ATTN_KEYS * half);
}

__global__ void attention_fwd_kernel(bf16 *out, const bf16 *q, const bf16 *k, const bf16 *v,
                                     const int32_t *q_pos, int Tq, int Tk, int n_heads,
                                     int n_kv_heads, int head_dim, float scale) {
    extern __shared__ float smem[];
    __shared__ int row_last_key[ATTN_ROWS];
    const int group = n_heads / n_kv_heads, half = head_dim / 2, k_stride = half | 1;
    const int b = blockIdx.z, hk = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *q_s = smem + (size_t)warp * head_dim;
    bf16x2 *k_s = (bf16x2 *)(smem + (size_t)ATTN_ROWS * head_dim);
    bf16x2 *v_s = k_s + (size_t)ATTN_KEYS * k_stride;

    /* this warp's row: query t, head h; last_key = -1 for padding or rows past the end */
    const int row = blockIdx.x * ATTN_ROWS + warp;
    const int row_valid = row < Tq * group;
    const int t = row / group, h = hk * group + row % group;
    int last_key = -1;
    if (row_valid) {
        int p = q_pos[(size_t)b * Tq + t];
        last_key = p < 0 ? -1 : min(p, Tk - 1);
    }
    const size_t q_off = (((size_t)b * Tq + t) * n_heads + h) * (size_t)head_dim;
    if (last_key >= 0)
        for (int d = lane; d < head_dim; d += 32) q_s[d] = __bfloat162float(q[q_off + d]);
    if (lane == 0) row_last_key[warp] = last_key;
    __syncthreads();
    int block_last_key = -1;
    for (int r = 0; r < ATTN_ROWS; r++) block_last_key = max(block_last_key, row_last_key[r]);

    float m_run = -INFINITY, l_run = 0.0f;
    float2 acc[ATTN_MAX_PAIRS];
#pragma unroll
    for (int i = 0; i < ATTN_MAX_PAIRS; i++) acc[i] = make_float2(0.0f, 0.0f);

    const bf16x2 *k2 = (const bf16x2 *)k, *v2 = (const bf16x2 *)v;
    for (int j0 = 0; j0 <= block_last_key; j0 += ATTN_KEYS) {
        __syncthreads(); /* every warp is done with the previous tile */
        for (int idx = threadIdx.x; idx < ATTN_KEYS * half; idx += blockDim.x) {
            int jj = idx / half, c = idx % half, j = j0 + jj;
            bf16x2 kv = __float2bfloat162_rn(0.0f), vv = kv;
            if (j <= block_last_key) {
                size_t off = (((size_t)b * Tk + j) * n_kv_heads + hk) * (size_t)half + c;
                kv = k2[off];
                vv = v2[off];
            }
            k_s[(size_t)jj * k_stride + c] = kv;
            v_s[(size_t)jj * half + c] = vv;
        }
        __syncthreads();
        if (last_key < j0) continue; /* warp-uniform: this row is done */
        const int n_keys = min(ATTN_KEYS, last_key - j0 + 1);
        float s = -INFINITY;
        if (lane < n_keys) {
            float dot = 0.0f;
            for (int c = 0; c < half; c++) {
                float2 kf = __bfloat1622float2(k_s[(size_t)lane * k_stride + c]);
                dot += q_s[2 * c] * kf.x + q_s[2 * c + 1] * kf.y;
            }
            s = dot * scale;
        }
        /* key j0 is always valid here, so m_new is finite and exp(-inf - m_new) = 0 */
        const float m_new = fmaxf(m_run, rs_warp_max(s));
        const float corr = expf(m_run - m_new);
        const float p = lane < n_keys ? expf(s - m_new) : 0.0f;
        l_run = l_run * corr + rs_warp_sum(p);
#pragma unroll
        for (int i = 0; i < ATTN_MAX_PAIRS; i++) {
            acc[i].x *= corr;
            acc[i].y *= corr;
        }
        for (int jj = 0; jj < n_keys; jj++) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
            for (int i = 0; i < ATTN_MAX_PAIRS; i++) {
                int c = lane + 32 * i;
                if (c < half) {
                    float2 vf = __bfloat1622float2(v_s[(size_t)jj * half + c]);
                    acc[i].x += pj * vf.x;
                    acc[i].y += pj * vf.y;
                }
            }
        }
        m_run = m_new;
    }

    if (!row_valid) return;
    bf16x2 *out2 = (bf16x2 *)(out + q_off);
    const float inv_l = last_key >= 0 ? 1.0f / l_run : 0.0f;
#pragma unroll
    for (int i = 0; i < ATTN_MAX_PAIRS; i++) {
        int c = lane + 32 * i;
        if (c < half) out2[c] = __floats2bfloat162_rn(acc[i].x * inv_l, acc[i].y * inv_l);
    }
}

void rs_cuda_attention_fwd(cudaStream_t s, bf16 *out, const bf16 *q, const bf16 *k, const bf16 *v,
                           const int32_t *q_pos, int B, int Tq, int Tk, int n_heads,
                           int n_kv_heads, int head_dim, float scale) {
    RS_CHECK(head_dim > 0 && head_dim % 2 == 0 && head_dim <= ATTN_MAX_HEAD_DIM,
             "attention: head_dim %d is not supported by the CUDA kernel (even, at most %d)",
             head_dim, ATTN_MAX_HEAD_DIM);
    RS_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0,
             "attention: n_heads %d is not a multiple of n_kv_heads %d", n_heads, n_kv_heads);
    RS_CHECK(B <= 65535 && n_kv_heads <= 65535, "attention: batch %d or kv heads %d too large",
             B, n_kv_heads);
    RS_CHECK(((uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)out) % 4 == 0,
             "attention: q, k, v and out must be 4-byte aligned (read as bf16 pairs)");
    if (B <= 0 || Tq <= 0) return;
    int group = n_heads / n_kv_heads;
    size_t rows = (size_t)Tq * (size_t)group;
    RS_CHECK(rows <= (size_t)INT32_MAX - ATTN_ROWS, "attention: %d queries x %d heads too many", Tq,
             group);
    dim3 grid((unsigned)((rows + ATTN_ROWS - 1) / ATTN_ROWS), (unsigned)n_kv_heads, (unsigned)B);
    attention_fwd_kernel<<<grid, ATTN_ROWS * 32, attention_smem_bytes(head_dim), s>>>(
        out, q, k, v, q_pos, Tq, Tk, n_heads, n_kv_heads, head_dim, scale);
    CUDA_CHECK_LAUNCH(s, "attention_fwd_kernel");
}
