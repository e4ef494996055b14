/* attention_flash: causal GQA attention forward on tensor cores with an online softmax, the
 * FlashAttention-2 scheme (Dao 2023): scores stay in registers, nothing of size Tq x Tk is
 * written. The CUDA backend's default where rs_cuda_attention_flash_fits
 * (RESAFE_CUDA_ATTENTION=gemm or fused select the older paths; measured 3.5x / 1.9x faster forward
 * / backward than the gemm path on an H100 at the 7B DPO step's shape, README performance section).
 *
 * Same contract as attention.cu (backend.h): q, out [B, Tq, H, D]; k, v [B, Tk, Hkv, D];
 * q_pos[b * Tq + t] the query's position (-1: padding, a zero output row); a query at position p
 * sees keys 0..min(p, Tk - 1); head h reads kv head h / (H / Hkv).
 *
 * A block: 4 warps, 64 queries of one (sequence, head), 16 rows per warp; its Q rows live in
 * registers as m16n8k16 A fragments for the whole kernel. Key tiles of 64 go through shared
 * memory (rows padded to D + 8 bf16 so that the fragment reads of a warp hit 32 different banks),
 * double-buffered: cp.async copies the next K / V tile while the current one is computed (the
 * synchronous copy of the first version took 3x the time), up to the last key any of the block's
 * queries sees; rows past it are written as zeros, so an
 * unwritten cache row (NaN) is never multiplied (0 x NaN would be NaN). Per tile a warp computes
 * S = Q K^T (16 x 64, fp32 in registers), masks keys past each row's last key, updates the
 * running max m and sum l (exp2 with log2(e) folded into the scale), rounds P to bf16 (as
 * FlashAttention does) and adds P V to its 16 x D output, the S accumulator registers reused as
 * the A fragments of P (the m16n8k16 C and A layouts agree); V's B fragments come through
 * ldmatrix.trans. The output is O / l in bf16, zero for a row that sees no key.
 * Deterministic: fixed order, no atomics. */
#include "resafe/cuda_common.h"

#include <stdlib.h>
#include <string.h>

#define FA_ROWS 64 /* queries per block */
#define FA_KEYS 64 /* keys per tile */
#define FA_WARPS 4
static_assert(FA_ROWS == FA_KEYS, "fa_load_tile fills FA_KEYS rows for query tiles too");

extern "C" int rs_cuda_attention_flash_fits(int Tq, int Tk, int n_heads, int n_kv_heads,
                                            int head_dim) {
    (void)Tk;
    return Tq >= 16 && (head_dim == 64 || head_dim == 128) && n_kv_heads > 0 &&
           n_heads % n_kv_heads == 0;
}

__device__ __forceinline__ void fa_ldmatrix_x4_trans(uint32_t (&r)[4], const bf16 *p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ uint32_t fa_pack(float lo, float hi) {
    bf16x2 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

/* rows of a [64, D] tile from global rows at stride ld: cp.async copies of rows < n_valid, zeros
 * past them (an unwritten cache row may be NaN, and 0 x NaN is NaN); no commit, no wait: the
 * caller's fa_tile_sync (or its own wait) and a barrier make the tile visible. */
template <int D>
__device__ __forceinline__ void fa_load_tile(bf16 *dst, const bf16 *src, size_t ld, int first,
                                             int n_valid) {
    constexpr int STRIDE = D + 8, PIECES = D / 8;
    for (int idx = threadIdx.x; idx < FA_KEYS * PIECES; idx += blockDim.x) {
        const int r = idx / PIECES, c = (idx % PIECES) * 8;
        if (r < n_valid)
            cp_async16(dst + r * STRIDE + c, src + (size_t)(first + r) * ld + c);
        else
            *(uint4 *)(dst + r * STRIDE + c) = make_uint4(0u, 0u, 0u, 0u);
    }
}

/* every copy this thread started has landed, and (barrier) every thread's has */
__device__ __forceinline__ void fa_tile_sync() {
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
}

/* K / V tiles double-buffered in kv (4 tiles: K0 V0 K1 V1, FA_TILE<D> elements each): the tile of
 * keys j0.. lives in buffer (j0 / FA_KEYS) & 1. */
template <int D> constexpr int FA_TILE = FA_KEYS *(D + 8);

template <int D> __device__ __forceinline__ bf16 *fa_kbuf(bf16 *kv, int j0) {
    return kv + ((j0 / FA_KEYS) & 1) * 2 * FA_TILE<D>;
}

/* start copying the tile at j0 (rows past block_last zero) into its buffer; none past block_last */
template <int D>
__device__ __forceinline__ void fa_kv_load(bf16 *kv, const bf16 *kb, const bf16 *vb, size_t ld,
                                           int j0, int block_last) {
    if (j0 > block_last) return;
    bf16 *kd = fa_kbuf<D>(kv, j0);
    const int n_valid = min(FA_KEYS, block_last + 1 - j0);
    fa_load_tile<D>(kd, kb, ld, j0, n_valid);
    fa_load_tile<D>(kd + FA_TILE<D>, vb, ld, j0, n_valid);
}

/* The top of the key tile at j0 (every thread of the block calls it; the tile's copy was started
 * by the previous call or the prologue): wait for it, then (after the barrier: every warp is done
 * with the tile before, in the other buffer) start the next tile's copy. false: none of this
 * warp's rows (last keys last0, last1 across its lanes) sees the tile, skip it (a warp-wide
 * test: the shuffles, ldmatrix and mma.sync after it need every lane). */
template <int D>
__device__ __forceinline__ bool fa_kv_next(bf16 *kv, const bf16 *kb, const bf16 *vb, size_t ld,
                                           int j0, int block_last, int last0, int last1) {
    fa_tile_sync();
    fa_kv_load<D>(kv, kb, vb, ld, j0 + FA_KEYS, block_last);
    cp_async_commit();
    return __any_sync(0xffffffffu, last0 >= j0 || last1 >= j0);
}

/* s_last[r] = the last key query t0 + r of sequence b sees (-1: padding or past Tq) */
__device__ __forceinline__ void fa_row_lasts(int *s_last, const int32_t *q_pos, int b, int t0,
                                             int Tq, int Tk) {
    for (int r = threadIdx.x; r < FA_ROWS; r += blockDim.x) {
        int last = -1;
        if (t0 + r < Tq) {
            const int p = q_pos[(size_t)b * Tq + t0 + r];
            last = p < 0 ? -1 : min(p, Tk - 1);
        }
        s_last[r] = last;
    }
}

/* fa_row_lasts, a barrier, and the block's largest last key (every thread gets it) */
__device__ __forceinline__ int fa_block_last(int *s_last, const int32_t *q_pos, int b, int t0,
                                             int Tq, int Tk) {
    fa_row_lasts(s_last, q_pos, b, t0, Tq, Tk);
    __syncthreads();
    int block_last = -1;
    for (int r = 0; r < FA_ROWS; r++) block_last = max(block_last, s_last[r]);
    return block_last;
}

/* rows ra, rb (< limit) of a [.., ld] bf16 tensor from the accumulator, times fa / fb */
template <int ND>
__device__ __forceinline__ void fa_store_rows(bf16 *base, size_t ld, int ra, int rb, int limit,
                                              const float (&acc)[ND][4], float fa, float fb,
                                              int t) {
#pragma unroll
    for (int nd = 0; nd < ND; nd++) {
        const int d = nd * 8 + 2 * t;
        if (ra < limit)
            *(uint32_t *)(base + (size_t)ra * ld + d) = fa_pack(acc[nd][0] * fa, acc[nd][1] * fa);
        if (rb < limit)
            *(uint32_t *)(base + (size_t)rb * ld + d) = fa_pack(acc[nd][2] * fb, acc[nd][3] * fb);
    }
}

__device__ __forceinline__ void fa_ldmatrix_x4(uint32_t (&r)[4], const bf16 *p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/* Fragments from a shared tile of row stride `stride` (bf16; rows 16-byte aligned, stride = 16
 * mod 128 bytes, so the 8 row addresses of each ldmatrix phase hit distinct bank groups):
 * A of rows r0..r0+15, k-step kk along the row (k = 16 kk + ..): a[0] rows r0 + 0..7, a[1]
 * rows r0 + 8..15, a[2], a[3] the same at k + 8; B2: B of rows n0..n0+7 as the n index, k along
 * the row, for the k-steps 2 kp (b[0], b[1]) and 2 kp + 1 (b[2], b[3]); B4 by ldmatrix.trans:
 * k along 16 rows from k0, n = columns 8 nd .. 8 nd + 15 (b[0], b[1] for n-tile nd, b[2], b[3]
 * for nd + 1). */
__device__ __forceinline__ void fa_frag_a(uint32_t (&a)[4], const bf16 *tile, int stride, int r0,
                                          int kk, int lane) {
    fa_ldmatrix_x4(a, tile + (r0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * stride + 16 * kk +
                          8 * (lane >> 4));
}

__device__ __forceinline__ void fa_frag_b2(uint32_t (&b)[4], const bf16 *tile, int stride, int n0,
                                           int kp, int lane) {
    fa_ldmatrix_x4(b, tile + (n0 + (lane & 7)) * stride + 32 * kp + 8 * (lane >> 3));
}

__device__ __forceinline__ void fa_frag_b4t(uint32_t (&b)[4], const bf16 *tile, int stride, int k0,
                                            int nd, int lane) {
    const int mi = lane >> 3, rr = lane & 7;
    fa_ldmatrix_x4_trans(b, tile + (k0 + 8 * (mi & 1) + rr) * stride + 8 * (nd + (mi >> 1)));
}

/* c = the 16 x 8 block (rows ra.., columns nb..) of A B^T over the whole head, A and B rows of
 * shared tiles (stride STRIDE = D + 8, KS = D / 16 k-steps), fragments by 32-bit shared loads
 * (an ldmatrix form of this measured 13-22% slower in the backward on an H100, 2026-12-07) */
template <int KS>
__device__ __forceinline__ void fa_dot_rows(float (&c)[4], const bf16 *ta, const bf16 *tb,
                                            int stride, int ra, int nb, int lane) {
    const int g = lane >> 2, t = lane & 3;
    c[0] = c[1] = c[2] = c[3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        const bf16 *p0 = ta + (ra + g) * stride + 16 * kk + 2 * t, *p1 = p0 + 8 * stride;
        const bf16 *pb = tb + (nb + g) * stride + 16 * kk + 2 * t;
        mma_16816(c, *(const uint32_t *)p0, *(const uint32_t *)p1, *(const uint32_t *)(p0 + 8),
                  *(const uint32_t *)(p1 + 8), *(const uint32_t *)pb, *(const uint32_t *)(pb + 8));
    }
}

/* zero accumulators (16 x 8 MMA tiles) */
template <int ND> __device__ __forceinline__ void fa_zero(float (&acc)[ND][4]) {
#pragma unroll
    for (int nd = 0; nd < ND; nd++) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;
}

/* the warp's 16 Q rows (warp * 16.. of the staged tile qs) as A fragments, KS k-steps */
template <int KS>
__device__ __forceinline__ void fa_q_frags(uint32_t (&qf)[KS][4], const bf16 *qs, int stride,
                                           int warp, int lane) {
#pragma unroll
    for (int kk = 0; kk < KS; kk++) fa_frag_a(qf[kk], qs, stride, warp * 16, kk, lane);
}

/* acc += P B for the warp's 16 rows: P as A fragments (pf, 64 columns in 4 k-steps), B the 64
 * rows of a shared tile (k = its row, n = d) by ldmatrix.trans */
template <int ND>
__device__ __forceinline__ void fa_acc_pb(float (&acc)[ND][4], const uint32_t (&pf)[4][4],
                                          const bf16 *tile, int stride, int lane) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int nd = 0; nd < ND; nd += 2) {
            uint32_t b[4];
            fa_frag_b4t(b, tile, stride, 16 * kk, nd, lane);
            mma_16816(acc[nd], pf[kk][0], pf[kk][1], pf[kk][2], pf[kk][3], b[0], b[1]);
            mma_16816(acc[nd + 1], pf[kk][0], pf[kk][1], pf[kk][2], pf[kk][3], b[2], b[3]);
        }
}

/* S[nt] = Q K^T for the 8 keys n0.. (Q: the warp's A fragments of KS k-steps in registers) */
template <int KS>
__device__ __forceinline__ void fa_qk(float (&c)[4], const uint32_t (&qf)[KS][4], const bf16 *ks,
                                      int stride, int n0, int lane) {
    c[0] = c[1] = c[2] = c[3] = 0.0f;
#pragma unroll
    for (int kp = 0; kp < KS / 2; kp++) {
        uint32_t b[4];
        fa_frag_b2(b, ks, stride, n0, kp, lane);
        mma_16816(c, qf[2 * kp][0], qf[2 * kp][1], qf[2 * kp][2], qf[2 * kp][3], b[0], b[1]);
        mma_16816(c, qf[2 * kp + 1][0], qf[2 * kp + 1][1], qf[2 * kp + 1][2], qf[2 * kp + 1][3],
                  b[2], b[3]);
    }
}

/* What a forward launch writes: O (FA_OUT); instead of O, the backward's statistics (FA_STATS:
 * each row's log-sum-exp in log2 units, m + log2 l, 0 for a row without keys, to lse and
 * Dsum = dout . O of the fp32 O to dsum, both [B, H, Tq]); or O and that log-sum-exp
 * (FA_OUT_LSE, for a backward that takes them: the default in training; RESAFE_CUDA_FLASH_SAVED=0
 * turns it off). */
enum { FA_OUT = 0, FA_STATS = 1, FA_OUT_LSE = 2 };

template <int D, int MODE = FA_OUT>
__global__ void __launch_bounds__(FA_WARPS * 32)
    attention_flash_fwd_kernel(bf16 *out, const bf16 *q, const bf16 *k, const bf16 *v,
                               const int32_t *q_pos, int Tq, int Tk, int H, int Hkv,
                               float scale_log2, const bf16 *dout = NULL, float *lse = NULL,
                               float *dsum = NULL) {
    constexpr int STRIDE = D + 8, KS = D / 16, ND = D / 8;
    extern __shared__ __align__(16) bf16 fa_smem[]; /* K / V double buffer (fa_kv_next) */
    __shared__ int s_last[FA_ROWS];
    const int b = blockIdx.z, h = blockIdx.y, hk = h / (H / Hkv), t0 = blockIdx.x * FA_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const size_t q_ld = (size_t)H * D, kv_ld = (size_t)Hkv * D;
    const bf16 *qb = q + (size_t)b * Tq * q_ld + (size_t)h * D;
    const bf16 *kb = k + (size_t)b * Tk * kv_ld + (size_t)hk * D;
    const bf16 *vb = v + (size_t)b * Tk * kv_ld + (size_t)hk * D;

    /* each query's last key (-1: none), the block's largest */
    const int block_last = fa_block_last(s_last, q_pos, b, t0, Tq, Tk);
    /* Q rows through buffer 1's K slot into registers (A fragments, KS k-steps of 16), while the
     * first key tile goes to buffer 0; the first fa_kv_next's barrier orders the fragment reads
     * before the second tile's copy into buffer 1 */
    const bf16 *qs = fa_smem + 2 * FA_TILE<D>;
    fa_load_tile<D>(fa_smem + 2 * FA_TILE<D>, qb, q_ld, t0, min(FA_ROWS, Tq - t0));
    fa_kv_load<D>(fa_smem, kb, vb, kv_ld, 0, block_last);
    fa_tile_sync();
    const int r0 = warp * 16 + g, r1 = r0 + 8;
    const int last0 = s_last[r0], last1 = s_last[r1];
    uint32_t qf[KS][4];
    fa_q_frags<KS>(qf, qs, STRIDE, warp, lane);

    float o[ND][4];
    fa_zero<ND>(o);
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    for (int j0 = 0; j0 <= block_last; j0 += FA_KEYS) {
        if (!fa_kv_next<D>(fa_smem, kb, vb, kv_ld, j0, block_last, last0, last1)) continue;
        const bf16 *ks = fa_kbuf<D>(fa_smem, j0), *vs = ks + FA_TILE<D>;

        /* S = Q K^T: 8 n-tiles of 8 keys; B (k = d, n = key) straight from the K rows */
        float s[FA_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) fa_qk<KS>(s[nt], qf, ks, STRIDE, nt * 8, lane);
        /* mask (not needed where every row of the warp sees the whole tile), scale (log2
         * units), row max over the quad's lanes */
        float mx0 = -INFINITY, mx1 = -INFINITY;
        const bool full = __all_sync(0xffffffffu, j0 + FA_KEYS - 1 <= min(last0, last1));
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + nt * 8 + 2 * t + (e & 1);
                const bool ok = full || j <= (e < 2 ? last0 : last1);
                s[nt][e] = ok ? s[nt][e] * scale_log2 : -INFINITY;
                if (e < 2)
                    mx0 = fmaxf(mx0, s[nt][e]);
                else
                    mx1 = fmaxf(mx1, s[nt][e]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        /* a row that has seen no key yet keeps m = -inf: use 0 as the base (its p are 0) */
        const float b0 = mn0 == -INFINITY ? 0.0f : mn0, b1 = mn1 == -INFINITY ? 0.0f : mn1;
        const float al0 = exp2f(m0 - b0), al1 = exp2f(m1 - b1); /* exp2(-inf) = 0 */
        m0 = mn0, m1 = mn1;
        l0 *= al0, l1 *= al1;
        if (__any_sync(0xffffffffu, al0 != 1.0f || al1 != 1.0f)) /* else: x 1 changes nothing */
#pragma unroll
            for (int nd = 0; nd < ND; nd++)
                o[nd][0] *= al0, o[nd][1] *= al0, o[nd][2] *= al1, o[nd][3] *= al1;
        uint32_t pf[FA_KEYS / 16][4];
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            /* P rounded to bf16; l sums the rounded values, so O / l is a weighted mean of V */
            const uint32_t lo = fa_pack(exp2f(s[nt][0] - b0), exp2f(s[nt][1] - b0));
            const uint32_t hi = fa_pack(exp2f(s[nt][2] - b1), exp2f(s[nt][3] - b1));
            const bf16x2 plo = *reinterpret_cast<const bf16x2 *>(&lo);
            const bf16x2 phi = *reinterpret_cast<const bf16x2 *>(&hi);
            l0 += __low2float(plo) + __high2float(plo);
            l1 += __low2float(phi) + __high2float(phi);
            pf[nt >> 1][(nt & 1) * 2 + 0] = lo; /* a0 / a2: row g */
            pf[nt >> 1][(nt & 1) * 2 + 1] = hi; /* a1 / a3: row g + 8 */
        }
        /* O += P V: k-steps of 16 keys, B (k = key, n = d) by ldmatrix.trans of V's rows */
        fa_acc_pb<ND>(o, pf, vs, STRIDE, lane);
    }

    /* l over the quad; write O / l (0 for a row without keys or past Tq) */
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    if constexpr (MODE == FA_OUT_LSE) {
        const size_t row = ((size_t)b * H + h) * Tq + t0;
        if (t == 0 && t0 + r0 < Tq) lse[row + r0] = l0 > 0.0f ? m0 + log2f(l0) : 0.0f;
        if (t == 0 && t0 + r1 < Tq) lse[row + r1] = l1 > 0.0f ? m1 + log2f(l1) : 0.0f;
    }
    if constexpr (MODE == FA_STATS) {
        const bf16 *gb = dout + (size_t)b * Tq * q_ld + (size_t)h * D;
        float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
        for (int nd = 0; nd < ND; nd++) {
            const int d = nd * 8 + 2 * t;
            if (t0 + r0 < Tq) {
                const bf16x2 g0 = *(const bf16x2 *)(gb + (size_t)(t0 + r0) * q_ld + d);
                d0 += __low2float(g0) * o[nd][0] + __high2float(g0) * o[nd][1];
            }
            if (t0 + r1 < Tq) {
                const bf16x2 g1 = *(const bf16x2 *)(gb + (size_t)(t0 + r1) * q_ld + d);
                d1 += __low2float(g1) * o[nd][2] + __high2float(g1) * o[nd][3];
            }
        }
        d0 += __shfl_xor_sync(0xffffffffu, d0, 1);
        d0 += __shfl_xor_sync(0xffffffffu, d0, 2);
        d1 += __shfl_xor_sync(0xffffffffu, d1, 1);
        d1 += __shfl_xor_sync(0xffffffffu, d1, 2);
        const size_t row = ((size_t)b * H + h) * Tq + t0;
        if (t == 0 && t0 + r0 < Tq)
            lse[row + r0] = l0 > 0.0f ? m0 + log2f(l0) : 0.0f, dsum[row + r0] = d0 * i0;
        if (t == 0 && t0 + r1 < Tq)
            lse[row + r1] = l1 > 0.0f ? m1 + log2f(l1) : 0.0f, dsum[row + r1] = d1 * i1;
        return;
    }
    fa_store_rows<ND>(out + (size_t)b * Tq * q_ld + (size_t)h * D, q_ld, t0 + r0, t0 + r1, Tq, o,
                      i0, i1, t);
}

/* ---------------------------------------------------------------- backward
 * Three passes after the STATS forward (lse, Dsum per query row), no atomics, each output
 * written once (deterministic), P and dS recomputed from lse (P = exp2(scale_log2 s - lse))
 * and rounded to bf16 before they meet a tensor-core product, as FlashAttention does:
 *   dQ  per (sequence, head, 64 queries):   dQ = scale sum_j dS K,  dS = P (dO V^T - Dsum)
 *   dV  per (sequence, kv head, 64 keys):   dV = sum over the group's heads and the queries P^T dO
 *   dK  the same blocks:                    dK = scale sum dS^T Q
 * dV and dK come from one launch (FA_DKV, the default: the scores and dO V^T once, two 16 x D
 * accumulators per thread) or, with RESAFE_CUDA_FLASH_DKV=0, from two launches of the same
 * kernel (FA_DV, FA_DK: one accumulator per thread). The key-block kernels work in the transposed
 * frame (rows = the warp's 16 keys, columns = queries) so that P^T and dS^T come out of the C
 * registers as A fragments, as P does in the forward. Key rows past the sequence's last visible key
 * are zero in shared memory (an unwritten cache row may be NaN): their dK, dV are exactly 0; padded
 * queries (lse 0, every score masked) give P = 0 and a zero dQ row. Shared memory: dQ 5 tiles (the
 * K / V double buffer, dO), dK / dV 4 tiles of 64 x (D + 8) bf16 (87 / 70 KB at D = 128, dynamic).
 */
template <int D>
__global__ void __launch_bounds__(FA_WARPS * 32)
    attention_flash_dq_kernel(bf16 *dq, const bf16 *dout, const bf16 *q, const bf16 *k,
                              const bf16 *v, const int32_t *q_pos, const float *lse,
                              const float *dsum, int Tq, int Tk, int H, int Hkv, float scale,
                              float scale_log2) {
    constexpr int STRIDE = D + 8, KS = D / 16, ND = D / 8;
    extern __shared__ __align__(16) bf16 fa_smem[]; /* K / V double buffer, then dO */
    bf16 *gs = fa_smem + 4 * FA_TILE<D>;
    __shared__ int s_last[FA_ROWS];
    const int b = blockIdx.z, h = blockIdx.y, hk = h / (H / Hkv), t0 = blockIdx.x * FA_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const size_t q_ld = (size_t)H * D, kv_ld = (size_t)Hkv * D;
    const size_t qoff = (size_t)b * Tq * q_ld + (size_t)h * D;
    const bf16 *kb = k + (size_t)b * Tk * kv_ld + (size_t)hk * D;
    const bf16 *vb = v + (size_t)b * Tk * kv_ld + (size_t)hk * D;

    const int block_last = fa_block_last(s_last, q_pos, b, t0, Tq, Tk);
    const int n_rows = min(FA_ROWS, Tq - t0);
    /* Q staged in buffer 1's K slot for the registers (as in the forward), dO for the whole
     * kernel, the first key tile in buffer 0 */
    const bf16 *qs = fa_smem + 2 * FA_TILE<D>;
    fa_load_tile<D>(fa_smem + 2 * FA_TILE<D>, q + qoff, q_ld, t0, n_rows);
    fa_load_tile<D>(gs, dout + qoff, q_ld, t0, n_rows);
    fa_kv_load<D>(fa_smem, kb, vb, kv_ld, 0, block_last);
    fa_tile_sync();
    const int r0 = warp * 16 + g, r1 = r0 + 8;
    const int last0 = s_last[r0], last1 = s_last[r1];
    const size_t srow = ((size_t)b * H + h) * Tq + t0;
    const float lse0 = t0 + r0 < Tq ? lse[srow + r0] : 0.0f;
    const float lse1 = t0 + r1 < Tq ? lse[srow + r1] : 0.0f;
    const float ds0 = t0 + r0 < Tq ? dsum[srow + r0] : 0.0f;
    const float ds1 = t0 + r1 < Tq ? dsum[srow + r1] : 0.0f;
    uint32_t qf[KS][4];
    fa_q_frags<KS>(qf, qs, STRIDE, warp, lane);

    float acc[ND][4];
    fa_zero<ND>(acc);

    for (int j0 = 0; j0 <= block_last; j0 += FA_KEYS) {
        if (!fa_kv_next<D>(fa_smem, kb, vb, kv_ld, j0, block_last, last0, last1)) continue;
        const bf16 *ks = fa_kbuf<D>(fa_smem, j0), *vs = ks + FA_TILE<D>;

        /* S = Q K^T -> P (masked, bf16) */
        uint32_t pf[FA_KEYS / 16][4];
        float pv[FA_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            float sc[4];
            fa_qk<KS>(sc, qf, ks, STRIDE, nt * 8, lane);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + nt * 8 + 2 * t + (e & 1);
                const bool ok = j <= (e < 2 ? last0 : last1);
                pv[nt][e] = ok ? exp2f(sc[e] * scale_log2 - (e < 2 ? lse0 : lse1)) : 0.0f;
            }
        }
        /* dP = dO V^T, dS = P (dP - Dsum) as A fragments */
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            float dp[4];
            fa_dot_rows<KS>(dp, gs, vs, STRIDE, warp * 16, nt * 8, lane);
            pf[nt >> 1][(nt & 1) * 2 + 0] =
                fa_pack(pv[nt][0] * (dp[0] - ds0), pv[nt][1] * (dp[1] - ds0));
            pf[nt >> 1][(nt & 1) * 2 + 1] =
                fa_pack(pv[nt][2] * (dp[2] - ds1), pv[nt][3] * (dp[3] - ds1));
        }
        /* dQ += dS K: B (k = key, n = d) by ldmatrix.trans of K's rows */
        fa_acc_pb<ND>(acc, pf, ks, STRIDE, lane);
    }
    fa_store_rows<ND>(dq + qoff, q_ld, t0 + r0, t0 + r1, Tq, acc, scale, scale, t);
}

/* What a key-block launch computes: dV, dK, or both in one pass (FA_DKV, the default: the scores
 * and dO V^T computed once for both, two 16 x D accumulators per thread; 3% faster DPO step on an
 * H100; RESAFE_CUDA_FLASH_DKV=0 selects the two launches) */
enum { FA_DV = 0, FA_DK = 1, FA_DKV = 2 };

template <int D, int MODE>
__global__ void __launch_bounds__(FA_WARPS * 32)
    attention_flash_dkv_kernel(bf16 *dst, bf16 *dst_v, const bf16 *dout, const bf16 *q,
                               const bf16 *k, const bf16 *v, const int32_t *q_pos, const float *lse,
                               const float *dsum, int Tq, int Tk, int H, int Hkv, float scale,
                               float scale_log2) {
    constexpr int STRIDE = D + 8, KS = D / 16, ND = D / 8;
    extern __shared__ __align__(16) bf16 fa_smem[];
    bf16 *kbs = fa_smem, *vbs = kbs + FA_KEYS * STRIDE, *qs = vbs + FA_KEYS * STRIDE;
    bf16 *gs = qs + FA_ROWS * STRIDE;
    __shared__ int s_qlast[FA_ROWS];
    __shared__ float s_lse[FA_ROWS], s_ds[FA_ROWS];
    __shared__ int s_red[FA_WARPS];
    const int b = blockIdx.z, hk = blockIdx.y, j0 = blockIdx.x * FA_KEYS, group = H / Hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const size_t q_ld = (size_t)H * D, kv_ld = (size_t)Hkv * D;
    const size_t kvoff = (size_t)b * Tk * kv_ld + (size_t)hk * D;

    /* the last key any query of the sequence sees: key rows past it stay zero */
    int sl = -1;
    for (int i = threadIdx.x; i < Tq; i += blockDim.x) {
        const int p = q_pos[(size_t)b * Tq + i];
        sl = max(sl, p < 0 ? -1 : min(p, Tk - 1));
    }
    for (int o = 16; o > 0; o >>= 1) sl = max(sl, __shfl_xor_sync(0xffffffffu, sl, o));
    if (lane == 0) s_red[warp] = sl;
    __syncthreads();
    int seq_last = -1;
    for (int w = 0; w < FA_WARPS; w++) seq_last = max(seq_last, s_red[w]);
    const int n_keys = max(0, min(FA_KEYS, seq_last + 1 - j0));
    fa_load_tile<D>(kbs, k + kvoff, kv_ld, j0, n_keys);
    fa_load_tile<D>(vbs, v + kvoff, kv_ld, j0, n_keys);
    cp_async_commit();
    cp_async_wait<0>(); /* the barrier at the top of the query loop makes it visible */
    const int kr0 = j0 + warp * 16 + g, kr1 = kr0 + 8; /* this lane's two keys */

    float acc[ND][4];                        /* dV (FA_DV), else dK */
    float acc_v[MODE == FA_DKV ? ND : 1][4]; /* dV (FA_DKV) */
    fa_zero<ND>(acc);
    fa_zero<MODE == FA_DKV ? ND : 1>(acc_v);

    for (int hh = 0; hh < group && n_keys > 0; hh++) {
        const int h = hk * group + hh;
        const size_t qoff = (size_t)b * Tq * q_ld + (size_t)h * D;
        for (int i0 = 0; i0 < Tq; i0 += FA_ROWS) {
            __syncthreads(); /* the previous tile is no longer read */
            const int n_rows = min(FA_ROWS, Tq - i0);
            for (int r = threadIdx.x; r < FA_ROWS; r += blockDim.x) {
                int last = -1;
                float ls = 0.0f, dd = 0.0f;
                if (r < n_rows) {
                    const int p = q_pos[(size_t)b * Tq + i0 + r];
                    last = p < 0 ? -1 : min(p, Tk - 1);
                    const size_t at = ((size_t)b * H + h) * Tq + i0 + r;
                    ls = lse[at], dd = dsum[at];
                }
                s_qlast[r] = last, s_lse[r] = ls, s_ds[r] = dd;
            }
            __syncthreads();
            int tile_last = -1;
            for (int r = 0; r < FA_ROWS; r++) tile_last = max(tile_last, s_qlast[r]);
            if (tile_last < j0) continue; /* no query of the tile sees the block (uniform) */
            fa_load_tile<D>(qs, q + qoff, q_ld, i0, n_rows);
            fa_load_tile<D>(gs, dout + qoff, q_ld, i0, n_rows);
            fa_tile_sync();
            if (tile_last < j0 + warp * 16) continue; /* none sees this warp's keys (uniform) */

            /* S^T = K Q^T (rows: the warp's keys, columns: the tile's queries) -> P^T; pf: the
             * A fragments of P^T (FA_DV) or dS^T (FA_DK, FA_DKV), pf_v: P^T's (FA_DKV) */
            uint32_t pf[FA_ROWS / 16][4], pf_v[MODE == FA_DKV ? FA_ROWS / 16 : 1][4];
#pragma unroll
            for (int nt = 0; nt < FA_ROWS / 8; nt++) {
                float sc[4];
                fa_dot_rows<KS>(sc, kbs, qs, STRIDE, warp * 16, nt * 8, lane);
                float pv[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qi = nt * 8 + 2 * t + (e & 1), key = e < 2 ? kr0 : kr1;
                    pv[e] = key <= s_qlast[qi] ? exp2f(sc[e] * scale_log2 - s_lse[qi]) : 0.0f;
                }
                if constexpr (MODE == FA_DKV) {
                    pf_v[nt >> 1][(nt & 1) * 2 + 0] = fa_pack(pv[0], pv[1]);
                    pf_v[nt >> 1][(nt & 1) * 2 + 1] = fa_pack(pv[2], pv[3]);
                }
                if constexpr (MODE != FA_DV) { /* dS^T = P^T (dP^T - Dsum), dP^T = V dO^T */
                    float dp[4];
                    fa_dot_rows<KS>(dp, vbs, gs, STRIDE, warp * 16, nt * 8, lane);
                    const float da = s_ds[nt * 8 + 2 * t], db = s_ds[nt * 8 + 2 * t + 1];
                    pv[0] *= dp[0] - da, pv[1] *= dp[1] - db;
                    pv[2] *= dp[2] - da, pv[3] *= dp[3] - db;
                }
                pf[nt >> 1][(nt & 1) * 2 + 0] = fa_pack(pv[0], pv[1]);
                pf[nt >> 1][(nt & 1) * 2 + 1] = fa_pack(pv[2], pv[3]);
            }
            /* dV += P^T dO, dK += dS^T Q: B (k = query, n = d) by ldmatrix.trans */
            fa_acc_pb<ND>(acc, pf, MODE == FA_DV ? gs : qs, STRIDE, lane);
            if constexpr (MODE == FA_DKV) fa_acc_pb<ND>(acc_v, pf_v, gs, STRIDE, lane);
        }
    }
    const float f = MODE == FA_DV ? 1.0f : scale;
    fa_store_rows<ND>(dst + kvoff, kv_ld, kr0, kr1, Tk, acc, f, f, t);
    if constexpr (MODE == FA_DKV)
        fa_store_rows<ND>(dst_v + kvoff, kv_ld, kr0, kr1, Tk, acc_v, 1.0f, 1.0f, t);
}

/* Shared memory of each kernel (dynamic, bytes): the forward 4 tiles (the K / V double buffer),
 * dQ 5 (and dO), dK / dV 4 (K, V, Q, dO) of 64 x (D + 8) bf16: 70 / 87 / 70 KB at D = 128. The
 * opt-in above 48 KB is set once per instantiation (one GPU per process). */
template <int D> constexpr int FA_SMEM_FWD = 4 * FA_TILE<D> *(int)sizeof(bf16);
template <int D> constexpr int FA_SMEM_DQ = 5 * FA_TILE<D> *(int)sizeof(bf16);
template <int D> constexpr int FA_SMEM_DKV = 4 * FA_TILE<D> *(int)sizeof(bf16);

/* a kernel's dynamic shared memory opt-in above 48 KB */
template <typename K> static void fa_allow_smem(K kernel, int bytes) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

template <int D> static void fa_set_smem() {
    static bool done = false;
    if (done) return;
    fa_allow_smem(attention_flash_fwd_kernel<D, FA_OUT>, FA_SMEM_FWD<D>);
    fa_allow_smem(attention_flash_fwd_kernel<D, FA_STATS>, FA_SMEM_FWD<D>);
    fa_allow_smem(attention_flash_fwd_kernel<D, FA_OUT_LSE>, FA_SMEM_FWD<D>);
    fa_allow_smem(attention_flash_dq_kernel<D>, FA_SMEM_DQ<D>);
    fa_allow_smem(attention_flash_dkv_kernel<D, FA_DV>, FA_SMEM_DKV<D>);
    fa_allow_smem(attention_flash_dkv_kernel<D, FA_DK>, FA_SMEM_DKV<D>);
    fa_allow_smem(attention_flash_dkv_kernel<D, FA_DKV>, FA_SMEM_DKV<D>);
    done = true;
}

template <int D>
static void fa_fwd(cudaStream_t s, bf16 *out, float *lse, const bf16 *q, const bf16 *k,
                   const bf16 *v, const int32_t *q_pos, int B, int Tq, int Tk, int H, int Hkv,
                   float scale) {
    fa_set_smem<D>();
    const dim3 grid((unsigned)((Tq + FA_ROWS - 1) / FA_ROWS), (unsigned)H, (unsigned)B);
    const float sl = scale * 1.4426950408889634f;
    if (lse)
        attention_flash_fwd_kernel<D, FA_OUT_LSE><<<grid, FA_WARPS * 32, FA_SMEM_FWD<D>, s>>>(
            out, q, k, v, q_pos, Tq, Tk, H, Hkv, sl, NULL, lse, NULL);
    else
        attention_flash_fwd_kernel<D>
            <<<grid, FA_WARPS * 32, FA_SMEM_FWD<D>, s>>>(out, q, k, v, q_pos, Tq, Tk, H, Hkv, sl);
    CUDA_CHECK_LAUNCH(s, "attention_flash_fwd_kernel");
}

extern "C" void rs_cuda_attention_flash_fwd(cudaStream_t s, bf16 *out, float *lse, const bf16 *q,
                                            const bf16 *k, const bf16 *v, const int32_t *q_pos,
                                            int B, int Tq, int Tk, int n_heads, int n_kv_heads,
                                            int head_dim, float scale) {
    if (head_dim == 128)
        fa_fwd<128>(s, out, lse, q, k, v, q_pos, B, Tq, Tk, n_heads, n_kv_heads, scale);
    else
        fa_fwd<64>(s, out, lse, q, k, v, q_pos, B, Tq, Tk, n_heads, n_kv_heads, scale);
}

/* dsum[b, h, t] = dout[b, t, h, :] . out[b, t, h, :] in fp32 over the bf16 values (the saved
 * output: FlashAttention-2's Dsum), one warp per row; a padded query's zero output gives 0 */
template <int D>
__global__ void attention_flash_dsum_kernel(float *dsum, const bf16 *dout, const bf16 *out, int B,
                                            int Tq, int H) {
    const size_t row = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= (size_t)B * Tq * H) return; /* whole warps leave together */
    const bf16 *g = dout + row * D, *o = out + row * D;
    float sum = 0.0f;
#pragma unroll
    for (int d = 2 * lane; d < D; d += 64) {
        const float2 a = __bfloat1622float2(*(const bf16x2 *)(g + d));
        const float2 c = __bfloat1622float2(*(const bf16x2 *)(o + d));
        sum += a.x * c.x + a.y * c.y;
    }
    sum = rs_warp_sum(sum);
    if (lane == 0) {
        const int h = (int)(row % H), t = (int)(row / H % Tq), b = (int)(row / H / Tq);
        dsum[((size_t)b * H + h) * Tq + t] = sum;
    }
}

extern "C" size_t rs_cuda_attention_flash_bwd_scratch_bytes(int B, int Tq, int n_heads) {
    return ((size_t)2 * B * n_heads * Tq * sizeof(float) + 255) / 256 * 256;
}

/* out, saved_lse: the forward's output and log-sum-exp (FA_OUT_LSE) to use instead of the
 * statistics pass (NULL: run it); scratch: lse and Dsum [B, H, Tq] each */
template <int D>
static void fa_bwd(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *q,
                   const bf16 *k, const bf16 *v, const bf16 *out, const float *saved_lse,
                   const int32_t *q_pos, int B, int Tq, int Tk, int H, int Hkv, float scale,
                   float *scratch) {
    fa_set_smem<D>();
    const float sl = scale * 1.4426950408889634f;
    float *dsum = scratch + (size_t)B * H * Tq;
    const float *lse = scratch;
    const dim3 gq((unsigned)((Tq + FA_ROWS - 1) / FA_ROWS), (unsigned)H, (unsigned)B);
    const dim3 gk((unsigned)((Tk + FA_KEYS - 1) / FA_KEYS), (unsigned)Hkv, (unsigned)B);
    if (out && saved_lse) {
        const size_t rows = (size_t)B * Tq * H;
        attention_flash_dsum_kernel<D>
            <<<(unsigned)((rows * 32 + 255) / 256), 256, 0, s>>>(dsum, dout, out, B, Tq, H);
        CUDA_CHECK_LAUNCH(s, "attention_flash_dsum_kernel");
        lse = saved_lse;
    } else {
        attention_flash_fwd_kernel<D, FA_STATS><<<gq, FA_WARPS * 32, FA_SMEM_FWD<D>, s>>>(
            NULL, q, k, v, q_pos, Tq, Tk, H, Hkv, sl, dout, scratch, dsum);
        CUDA_CHECK_LAUNCH(s, "attention_flash_fwd_kernel (stats)");
    }
    attention_flash_dq_kernel<D><<<gq, FA_WARPS * 32, FA_SMEM_DQ<D>, s>>>(
        dq, dout, q, k, v, q_pos, lse, dsum, Tq, Tk, H, Hkv, scale, sl);
    CUDA_CHECK_LAUNCH(s, "attention_flash_dq_kernel");
    const char *e = getenv("RESAFE_CUDA_FLASH_DKV");
    if (!e || strcmp(e, "0") != 0) {
        attention_flash_dkv_kernel<D, FA_DKV><<<gk, FA_WARPS * 32, FA_SMEM_DKV<D>, s>>>(
            dk, dv, dout, q, k, v, q_pos, lse, dsum, Tq, Tk, H, Hkv, scale, sl);
        CUDA_CHECK_LAUNCH(s, "attention_flash_dkv_kernel (dk and dv)");
        return;
    }
    attention_flash_dkv_kernel<D, FA_DV><<<gk, FA_WARPS * 32, FA_SMEM_DKV<D>, s>>>(
        dv, NULL, dout, q, k, v, q_pos, lse, dsum, Tq, Tk, H, Hkv, scale, sl);
    CUDA_CHECK_LAUNCH(s, "attention_flash_dkv_kernel (dv)");
    attention_flash_dkv_kernel<D, FA_DK><<<gk, FA_WARPS * 32, FA_SMEM_DKV<D>, s>>>(
        dk, NULL, dout, q, k, v, q_pos, lse, dsum, Tq, Tk, H, Hkv, scale, sl);
    CUDA_CHECK_LAUNCH(s, "attention_flash_dkv_kernel (dk)");
}

/* The backward (rs_cuda_attention_flash_fits must hold); scratch: at least
 * rs_cuda_attention_flash_bwd_scratch_bytes(B, Tq, n_heads) bytes (lse and Dsum per query row).
 * out and lse: the output and log-sum-exp of rs_cuda_attention_flash_fwd with lse (the same q,
 * k, v), or both NULL: the backward recomputes them in a statistics pass. */
extern "C" void rs_cuda_attention_flash_bwd(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv,
                                            const bf16 *dout, const bf16 *q, const bf16 *k,
                                            const bf16 *v, const bf16 *out, const float *lse,
                                            const int32_t *q_pos, int B, int Tq, int Tk,
                                            int n_heads, int n_kv_heads, int head_dim, float scale,
                                            void *scratch) {
    if (head_dim == 128)
        fa_bwd<128>(s, dq, dk, dv, dout, q, k, v, out, lse, q_pos, B, Tq, Tk, n_heads, n_kv_heads,
                    scale, (float *)scratch);
    else
        fa_bwd<64>(s, dq, dk, dv, dout, q, k, v, out, lse, q_pos, B, Tq, Tk, n_heads, n_kv_heads,
                   scale, (float *)scratch);
}
