/* attention_flash: causal GQA attention forward on tensor cores with an online softmax, the
 * FlashAttention-2 scheme (Dao 2023): scores stay in registers, nothing of size Tq x Tk is
 * written. An experiment beside attention_gemm.cu (RESAFE_CUDA_ATTENTION=flash selects it where
 * rs_cuda_attention_flash_fits; the default is unchanged until it is measured).
 *
 * Same contract as attention.cu (backend.h): q, out [B, Tq, H, D]; k, v [B, Tk, Hkv, D];
 * q_pos[b * Tq + t] the query's position (-1: padding, a zero output row); a query at position p
 * sees keys 0..min(p, Tk - 1); head h reads kv head h / (H / Hkv).
 *
 * A block: 4 warps, 64 queries of one (sequence, head), 16 rows per warp; its Q rows live in
 * registers as m16n8k16 A fragments for the whole kernel. Key tiles of 64 go through shared
 * memory (rows padded to D + 8 bf16 so that the fragment reads of a warp hit 32 different banks)
 * up to the last key any of the block's queries sees; rows past it are written as zeros, so an
 * unwritten cache row (NaN) is never multiplied (0 x NaN would be NaN). Per tile a warp computes
 * S = Q K^T (16 x 64, fp32 in registers), masks keys past each row's last key, updates the
 * running max m and sum l (exp2 with log2(e) folded into the scale), rounds P to bf16 (as
 * FlashAttention does) and adds P V to its 16 x D output, the S accumulator registers reused as
 * the A fragments of P (the m16n8k16 C and A layouts agree); V's B fragments come through
 * ldmatrix.trans. The output is O / l in bf16, zero for a row that sees no key.
 * Deterministic: fixed order, no atomics. */
#include "resafe/cuda_common.h"

#define FA_ROWS 64 /* queries per block */
#define FA_KEYS 64 /* keys per tile */
#define FA_WARPS 4

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

/* rows of a [rows, D] tile from global rows at stride ld (elements), zero where !valid */
template <int D>
__device__ __forceinline__ void fa_load_tile(bf16 *dst, const bf16 *src, size_t ld, int first,
                                             int n_valid) {
    constexpr int STRIDE = D + 8, PIECES = D / 8;
    for (int idx = threadIdx.x; idx < FA_KEYS * PIECES; idx += blockDim.x) {
        const int r = idx / PIECES, c = (idx % PIECES) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < n_valid) v = *(const uint4 *)(src + (size_t)(first + r) * ld + c);
        *(uint4 *)(dst + r * STRIDE + c) = v;
    }
}

template <int D>
__global__ void __launch_bounds__(FA_WARPS * 32)
    attention_flash_fwd_kernel(bf16 *out, const bf16 *q, const bf16 *k, const bf16 *v,
                               const int32_t *q_pos, int Tq, int Tk, int H, int Hkv,
                               float scale_log2) {
    constexpr int STRIDE = D + 8, KS = D / 16, ND = D / 8;
    __shared__ __align__(16) bf16 ks[FA_KEYS * STRIDE];
    __shared__ __align__(16) bf16 vs[FA_KEYS * STRIDE];
    __shared__ int s_last[FA_ROWS];
    const int b = blockIdx.z, h = blockIdx.y, hk = h / (H / Hkv), t0 = blockIdx.x * FA_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const size_t q_ld = (size_t)H * D, kv_ld = (size_t)Hkv * D;
    const bf16 *qb = q + (size_t)b * Tq * q_ld + (size_t)h * D;
    const bf16 *kb = k + (size_t)b * Tk * kv_ld + (size_t)hk * D;
    const bf16 *vb = v + (size_t)b * Tk * kv_ld + (size_t)hk * D;

    /* each query's last key (-1: none), the block's largest */
    for (int r = threadIdx.x; r < FA_ROWS; r += blockDim.x) {
        int last = -1;
        if (t0 + r < Tq) {
            const int p = q_pos[(size_t)b * Tq + t0 + r];
            last = p < 0 ? -1 : min(p, Tk - 1);
        }
        s_last[r] = last;
    }
    /* Q rows through the K buffer into registers (A fragments, KS k-steps of 16) */
    fa_load_tile<D>(ks, qb, q_ld, t0, min(FA_ROWS, Tq - t0));
    __syncthreads();
    int block_last = -1;
    for (int r = 0; r < FA_ROWS; r++) block_last = max(block_last, s_last[r]);
    const int r0 = warp * 16 + g, r1 = r0 + 8;
    const int last0 = s_last[r0], last1 = s_last[r1];
    uint32_t qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        const bf16 *q0 = ks + r0 * STRIDE + 16 * kk + 2 * t,
                   *q1 = ks + r1 * STRIDE + 16 * kk + 2 * t;
        qf[kk][0] = *(const uint32_t *)q0, qf[kk][1] = *(const uint32_t *)q1;
        qf[kk][2] = *(const uint32_t *)(q0 + 8), qf[kk][3] = *(const uint32_t *)(q1 + 8);
    }

    float o[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    for (int j0 = 0; j0 <= block_last; j0 += FA_KEYS) {
        __syncthreads(); /* the previous tile (or the Q staging) is no longer read */
        const int n_valid = min(FA_KEYS, block_last + 1 - j0);
        fa_load_tile<D>(ks, kb, kv_ld, j0, n_valid);
        fa_load_tile<D>(vs, vb, kv_ld, j0, n_valid);
        __syncthreads();
        /* none of this warp's rows sees the tile: skip it (a warp-wide test: the shuffles,
         * ldmatrix and mma.sync below need every lane) */
        if (!__any_sync(0xffffffffu, last0 >= j0 || last1 >= j0)) continue;

        /* S = Q K^T: 8 n-tiles of 8 keys; B (k = d, n = key) straight from the K rows */
        float s[FA_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            const bf16 *kr = ks + (nt * 8 + g) * STRIDE + 2 * t;
#pragma unroll
            for (int kk = 0; kk < KS; kk++)
                mma_16816(s[nt], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3],
                       *(const uint32_t *)(kr + 16 * kk), *(const uint32_t *)(kr + 16 * kk + 8));
        }
        /* mask, scale (log2 units), row max over the quad's lanes */
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < FA_KEYS / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + nt * 8 + 2 * t + (e & 1);
                const bool ok = j <= (e < 2 ? last0 : last1);
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
#pragma unroll
        for (int kk = 0; kk < FA_KEYS / 16; kk++)
#pragma unroll
            for (int nd = 0; nd < ND; nd += 2) {
                const int mi = lane >> 3, rr = lane & 7;
                uint32_t bv[4];
                fa_ldmatrix_x4_trans(bv, vs + (16 * kk + 8 * (mi & 1) + rr) * STRIDE +
                                             8 * (nd + (mi >> 1)));
                mma_16816(o[nd], pf[kk][0], pf[kk][1], pf[kk][2], pf[kk][3], bv[0], bv[1]);
                mma_16816(o[nd + 1], pf[kk][0], pf[kk][1], pf[kk][2], pf[kk][3], bv[2], bv[3]);
            }
    }

    /* l over the quad; write O / l (0 for a row without keys or past Tq) */
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    bf16 *ob = out + (size_t)b * Tq * q_ld + (size_t)h * D;
#pragma unroll
    for (int nd = 0; nd < ND; nd++) {
        const int d = nd * 8 + 2 * t;
        if (t0 + r0 < Tq)
            *(uint32_t *)(ob + (size_t)(t0 + r0) * q_ld + d) =
                fa_pack(o[nd][0] * i0, o[nd][1] * i0);
        if (t0 + r1 < Tq)
            *(uint32_t *)(ob + (size_t)(t0 + r1) * q_ld + d) =
                fa_pack(o[nd][2] * i1, o[nd][3] * i1);
    }
}

extern "C" void rs_cuda_attention_flash_fwd(cudaStream_t s, bf16 *out, const bf16 *q, const bf16 *k,
                                            const bf16 *v, const int32_t *q_pos, int B, int Tq,
                                            int Tk, int n_heads, int n_kv_heads, int head_dim,
                                            float scale) {
    const dim3 grid((unsigned)((Tq + FA_ROWS - 1) / FA_ROWS), (unsigned)n_heads, (unsigned)B);
    const float scale_log2 = scale * 1.4426950408889634f;
    if (head_dim == 128)
        attention_flash_fwd_kernel<128><<<grid, FA_WARPS * 32, 0, s>>>(
            out, q, k, v, q_pos, Tq, Tk, n_heads, n_kv_heads, scale_log2);
    else
        attention_flash_fwd_kernel<64><<<grid, FA_WARPS * 32, 0, s>>>(
            out, q, k, v, q_pos, Tq, Tk, n_heads, n_kv_heads, scale_log2);
    CUDA_CHECK_LAUNCH(s, "attention_flash_fwd_kernel");
}
