/* attention_bwd: causal GQA attention backward, recomputing the probabilities from q and k (as
 * FlashAttention's backward; nothing of the forward is kept). For one query row (b, t, h) with
 * keys j = 0..p of its sequence:
 *   P_j = softmax_j(scale q.k_j),  dP_j = dout.v_j,  Dsum = sum_j P_j dP_j = dout.o,
 *   dS_j = P_j (dP_j - Dsum),  dq = scale sum_j dS_j k_j,  dk_j += scale dS_j q,  dv_j += P_j dout.
 *
 * Simple now, deterministic, no atomics: two kernels, one warp per row each.
 *   1. query rows: an online-softmax pass gives the row's max m, normaliser l and Dsum = dout.o/l
 *      (kept in the scratch, 3 floats a row), a second pass over the keys gives dq.
 *   2. key rows (b, j, kv head): loop over every query that sees key j (p >= j) and every head
 *      of the GQA group, recompute P_j and dS_j from the saved statistics, sum dk_j, dv_j in
 *      registers and store them once (keys no query attends get 0).
 * A lane owns elements d = lane + 32 i of a head (head_dim <= 256, even); dot products are
 * warp sums. Padded queries (q_pos -1): dq row zero, nothing added to dk, dv. */
#include "resafe/cuda_common.h"

#define BWD_WARPS 8                             /* rows per block */
#define BWD_MAX_HEAD_DIM 256
#define BWD_PER_LANE (BWD_MAX_HEAD_DIM / 32)    /* elements of a head each lane owns */
#define STATS 3                                 /* m, l, Dsum per query row */

/* row (bf16, head_dim D) -> this lane's elements as fp32 (0 past D) */
__device__ __forceinline__ void load_lane(float (&dst)[BWD_PER_LANE], const bf16 *row, int D,
                                          int lane) {
#pragma unroll
    for (int i = 0; i < BWD_PER_LANE; i++) {
        int d = lane + 32 * i;
        dst[i] = d < D ? __bfloat162float(row[d]) : 0.0f;
    }
}

/* a . row over the head (every lane gets the sum) */
__device__ __forceinline__ float warp_dot(const float (&a)[BWD_PER_LANE], const bf16 *row, int D,
                                          int lane) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < BWD_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (d < D) s += a[i] * __bfloat162float(row[d]);
    }
    return rs_warp_sum(s);
}

__device__ __forceinline__ void store_lane(bf16 *row, const float (&src)[BWD_PER_LANE], int D,
                                           int lane) {
#pragma unroll
    for (int i = 0; i < BWD_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (d < D) row[d] = __float2bfloat16(src[i]);
    }
}

/* The last key a query sees: -1 for padding; positions past the cache are clamped as the
 * forward kernel does. */
__device__ __forceinline__ int last_key_of(int32_t p, int Tk) { return p < 0 ? -1 : min(p, Tk - 1); }

__global__ void attention_bwd_query_kernel(bf16 *dq, float *stats, const bf16 *dout, const bf16 *q,
                                           const bf16 *k, const bf16 *v, const int32_t *q_pos,
                                           int B, int Tq, int Tk, int n_heads, int n_kv_heads,
                                           int D, float scale) {
    const size_t row = (size_t)blockIdx.x * BWD_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (size_t)B * Tq * n_heads) return; /* whole warps: no block barrier follows */
    const size_t bt = row / (size_t)n_heads;
    const int h = (int)(row % (size_t)n_heads), b = (int)(bt / (size_t)Tq);
    const int hk = h / (n_heads / n_kv_heads), last = last_key_of(q_pos[bt], Tk);
    float *st = stats + STATS * row;
    float df[BWD_PER_LANE], acc[BWD_PER_LANE];
#pragma unroll
    for (int i = 0; i < BWD_PER_LANE; i++) acc[i] = 0.0f;
    if (last < 0) {
        if (dq) store_lane(dq + row * D, acc, D, lane);
        if (lane == 0) st[0] = 0.0f, st[1] = 1.0f, st[2] = 0.0f;
        return;
    }
    float qf[BWD_PER_LANE];
    load_lane(qf, q + row * D, D, lane);
    load_lane(df, dout + row * D, D, lane);
    const size_t kv_stride = (size_t)n_kv_heads * D;
    const size_t kv0 = (size_t)b * Tk * kv_stride + (size_t)hk * D;

    /* pass 1: online softmax, acc = unnormalised output o * l */
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j <= last; j++) {
        const size_t off = kv0 + (size_t)j * kv_stride;
        const float s = scale * warp_dot(qf, k + off, D, lane);
        const float m_new = fmaxf(m, s), corr = expf(m - m_new), e = expf(s - m_new);
        l = l * corr + e;
#pragma unroll
        for (int i = 0; i < BWD_PER_LANE; i++) {
            int d = lane + 32 * i;
            acc[i] = acc[i] * corr + (d < D ? e * __bfloat162float(v[off + d]) : 0.0f);
        }
        m = m_new;
    }
    float dsum = 0.0f;
#pragma unroll
    for (int i = 0; i < BWD_PER_LANE; i++) dsum += df[i] * acc[i];
    dsum = rs_warp_sum(dsum) / l;
    if (lane == 0) st[0] = m, st[1] = l, st[2] = dsum;
    if (!dq) return;

    /* pass 2: dq = scale sum_j dS_j k_j */
#pragma unroll
    for (int i = 0; i < BWD_PER_LANE; i++) acc[i] = 0.0f;
    for (int j = 0; j <= last; j++) {
        const size_t off = kv0 + (size_t)j * kv_stride;
        const float p = expf(scale * warp_dot(qf, k + off, D, lane) - m) / l;
        const float ds = p * (warp_dot(df, v + off, D, lane) - dsum);
#pragma unroll
        for (int i = 0; i < BWD_PER_LANE; i++) {
            int d = lane + 32 * i;
            if (d < D) acc[i] += scale * ds * __bfloat162float(k[off + d]);
        }
    }
    store_lane(dq + row * D, acc, D, lane);
}

__global__ void attention_bwd_key_kernel(bf16 *dk, bf16 *dv, const float *stats, const bf16 *dout,
                                         const bf16 *q, const bf16 *k, const bf16 *v,
                                         const int32_t *q_pos, int B, int Tq, int Tk, int n_heads,
                                         int n_kv_heads, int D, float scale) {
    const size_t row = (size_t)blockIdx.x * BWD_WARPS + (threadIdx.x >> 5); /* (b, j, hk) */
    const int lane = threadIdx.x & 31;
    if (row >= (size_t)B * Tk * n_kv_heads) return;
    const size_t bj = row / (size_t)n_kv_heads;
    const int hk = (int)(row % (size_t)n_kv_heads), b = (int)(bj / (size_t)Tk);
    const int j = (int)(bj % (size_t)Tk), group = n_heads / n_kv_heads;
    float kf[BWD_PER_LANE], vf[BWD_PER_LANE], dk_acc[BWD_PER_LANE], dv_acc[BWD_PER_LANE];
    load_lane(kf, k + row * D, D, lane);
    load_lane(vf, v + row * D, D, lane);
#pragma unroll
    for (int i = 0; i < BWD_PER_LANE; i++) dk_acc[i] = dv_acc[i] = 0.0f;
    for (int t = 0; t < Tq; t++) {
        if (last_key_of(q_pos[(size_t)b * Tq + t], Tk) < j) continue; /* warp-uniform */
        for (int h = hk * group; h < (hk + 1) * group; h++) {
            const size_t qrow = ((size_t)b * Tq + t) * n_heads + h;
            const float *st = stats + STATS * qrow;
            const bf16 *qr = q + qrow * D, *dr = dout + qrow * D;
            float qf[BWD_PER_LANE], df[BWD_PER_LANE];
            load_lane(qf, qr, D, lane);
            load_lane(df, dr, D, lane);
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int i = 0; i < BWD_PER_LANE; i++) s += qf[i] * kf[i], dp += df[i] * vf[i];
            s = rs_warp_sum(s) * scale;
            dp = rs_warp_sum(dp);
            const float p = expf(s - st[0]) / st[1];
            const float ds = p * (dp - st[2]);
#pragma unroll
            for (int i = 0; i < BWD_PER_LANE; i++) {
                dk_acc[i] += scale * ds * qf[i];
                dv_acc[i] += p * df[i];
            }
        }
    }
    if (dk) store_lane(dk + row * D, dk_acc, D, lane);
    if (dv) store_lane(dv + row * D, dv_acc, D, lane);
}

size_t rs_cuda_attention_bwd_scratch_bytes(int B, int Tq, int n_heads) {
    if (B <= 0 || Tq <= 0 || n_heads <= 0) return 0;
    return (size_t)B * Tq * n_heads * STATS * sizeof(float);
}

void rs_cuda_attention_bwd(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout,
                           const bf16 *q, const bf16 *k, const bf16 *v, const int32_t *q_pos,
                           int B, int Tq, int Tk, int n_heads, int n_kv_heads, int head_dim,
                           float scale, void *scratch) {
    RS_CHECK(head_dim > 0 && head_dim <= BWD_MAX_HEAD_DIM,
             "attention_bwd: head_dim %d is not supported by the CUDA kernel (at most %d)",
             head_dim, BWD_MAX_HEAD_DIM);
    RS_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0,
             "attention_bwd: n_heads %d is not a multiple of n_kv_heads %d", n_heads, n_kv_heads);
    if (B <= 0 || Tk <= 0 || (!dq && !dk && !dv)) return;
    float *stats = (float *)scratch;
    if (Tq > 0) {
        size_t rows = (size_t)B * Tq * n_heads;
        unsigned blocks = (unsigned)((rows + BWD_WARPS - 1) / BWD_WARPS);
        attention_bwd_query_kernel<<<blocks, BWD_WARPS * 32, 0, s>>>(
            dq, stats, dout, q, k, v, q_pos, B, Tq, Tk, n_heads, n_kv_heads, head_dim, scale);
        CUDA_CHECK_LAUNCH(s, "attention_bwd_query_kernel");
    }
    if (!dk && !dv) return;
    size_t rows = (size_t)B * Tk * n_kv_heads;
    unsigned blocks = (unsigned)((rows + BWD_WARPS - 1) / BWD_WARPS);
    attention_bwd_key_kernel<<<blocks, BWD_WARPS * 32, 0, s>>>(
        dk, dv, stats, dout, q, k, v, q_pos, B, Tq, Tk, n_heads, n_kv_heads, head_dim, scale);
    CUDA_CHECK_LAUNCH(s, "attention_bwd_key_kernel");
}
