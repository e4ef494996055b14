/* qgemm.cuh: the fused dequant-matmul kernels for quantized linears, shared by kernels/qgemm*.cu.
 * qgemm.cu plans and launches (and holds the fast dequantizer of the large-M path); the kernels'
 * instantiations are split by weight kind across qgemm_w2/w3/w4/w8/fz/cb/wg.cu so that they
 * compile in parallel (one file held them all: 55 s of a serial build).
 *
 *   out[M, N] = beta * out + X[M, K] dequant(W)[N, K]^T (+ bias[N])
 *
 * The fused kernel is for few rows of X (decode, small batches), where the time is the weight
 * read: W stays packed in global memory (the per-row bit stream of src/quant_pack.c, unchanged)
 * and is dequantized in registers right before mma.sync m16n8k16 (bf16 in, fp32 accumulate), so
 * a 4-bit weight moves a quarter of the bytes of its bf16 form. Large M (prefill, training) is
 * compute bound: there the dequantizer (qgemm.cu) writes the bf16 weight once and cuBLAS multiplies
 * (backend_cuda.cu picks by M; scripts/bench/qmatmul measures the crossover).
 *
 * Work split. A quad of lanes (lane = 4 g + t) owns one row n of W and 128 consecutive k per
 * iteration (a "chunk"): lane t holds the 32 codes k0 = chunk * 128 + 32 t .. k0 + 31 (BITS
 * 32-bit words: group sizes are multiples of 32, so the 32 codes share one scale and zero). A
 * warp holds NT such 8-row tiles, a block 4 warps; blocks split N (grid.x), K (grid.y, "split-K":
 * partial sums in fp32 go to a workspace and a second kernel adds them in a fixed order, so the
 * result is deterministic) and M in blocks of 16 MT rows (grid.z).
 *
 * Fragments. m16n8k16 gives lane (g, t) the B entries (k = 2t, 2t+1, 2t+8, 2t+9; n = g) and the
 * A entries (rows g, g+8; the same k). Any order of k works when A and B agree, so each mma step
 * takes four of the lane's own codes: for a virtual word of 8 codes c0..c7 (k0 + 8i ..), step
 * h = 0 feeds (c0, c4) and (c1, c5), step h = 1 (c2, c6) and (c3, c7). Those pairs are what one
 * shift and mask give from a word of nibbles ((w >> 4p) & 0x000F000F: codes p and p + 4 in the
 * two halves), and OR 0x4300 makes each half the bf16 number 128 + code. X is read as 8
 * consecutive bf16 and the same pairs are formed with byte permutes.
 *
 * Dequantization (three modes, chosen per weight):
 *   BF16 (integer codes of 2/3/4 bits with integer zero points, symmetric or not):
 *        w = bf16((128 + c) - (128 + z)) * bf16(s) in bf16x2 arithmetic: c - z is exact, the
 *        product is rounded once, but the fp32 scale is rounded to bf16 first, so an entry can
 *        differ from the dequantizer's bf16((c - z) * s) by one bf16 step.
 *   F32  (8-bit codes, float zero points): ((float)c - z) * s in fp32, then bf16: the
 *        dequantizer's value exactly.
 *   CB   (NF4, FP4): codebook[c] * absmax in fp32, then bf16: exact likewise.
 * Weights with outlier columns (LLM.int8) or critical entries (SNIP protection) take the
 * dequantize-then-cuBLAS path; an AWQ input_scale is applied to X first (x / s rounded to bf16,
 * one extra rounding against the dequantizer's w / s). */
#ifndef RESAFE_QGEMM_CUH
#define RESAFE_QGEMM_CUH

#include "resafe/cuda_common.h"

extern "C" {
#include "resafe/quant.h"
}

#include <stdlib.h>
#include <string.h>

#define QMM_WARPS 4
#define QMM_CHUNK 128 /* k per chunk: 4 lanes x 32 codes */
#define QMM_XS_ROWS 4 /* qmm_xs_kernel by default up to this many rows (measured, see qgemm.cu) */

enum { QMODE_BF16 = 0, QMODE_F32 = 1, QMODE_CB = 2 };

struct qmm_params {
    const bf16 *x; /* [M, ldx], 16-byte aligned, ldx % 8 == 0 */
    int ldx;
    const uint32_t *packed;
    int row_words; /* 32-bit words per packed row */
    const float *scales, *zeros;
    int n_groups, gs;
    int gs_shift; /* log2(gs) when gs is a power of two, else -1 (a division per chunk) */
    int xs_seg, xs_stride; /* qmm_xs_kernel: chunks of X per shared-memory segment, row stride */
    float zero_sym; /* the zero point of symmetric codes: 2^(bits-1) */
    int M, N, K;
    int n_chunks, chunks_per_split;
    float *partial; /* [splits, M, N], or NULL: write out directly */
    int *counters;  /* per output tile, zero between calls; NULL: qmm_reduce_kernel adds */
    bf16 *out;
    const bf16 *bias;
    float beta;
    float cb[16]; /* NF4 / FP4 codebook */
};

/* ---------------------------------------------------------------- code extraction */
template <int BITS>
__device__ __forceinline__ void load_span(uint32_t (&w)[BITS], const uint32_t *p) {
    if (BITS == 4) {
        uint4 v = __ldg((const uint4 *)p);
        w[0] = v.x, w[1] = v.y, w[2 % BITS] = v.z, w[3 % BITS] = v.w;
    } else if (BITS == 8) {
        uint4 v = __ldg((const uint4 *)p), u = __ldg((const uint4 *)p + 1);
        w[0] = v.x, w[1] = v.y, w[2 % BITS] = v.z, w[3 % BITS] = v.w;
        w[4 % BITS] = u.x, w[5 % BITS] = u.y, w[6 % BITS] = u.z, w[7 % BITS] = u.w;
    } else if (BITS == 2) {
        uint2 v = __ldg((const uint2 *)p);
        w[0] = v.x, w[1 % BITS] = v.y;
    } else {
#pragma unroll
        for (int i = 0; i < BITS; i++) w[i] = __ldg(p + i);
    }
}

/* Virtual word i (codes 8i .. 8i+7 of a 32-code span, BITS <= 4) spread over the two halves:
 * code 8i + p at bit BITS p, code 8i + 4 + p at bit 16 + BITS p (p = 0..3). */
template <int BITS> __device__ __forceinline__ uint32_t vword(const uint32_t (&w)[BITS], int i) {
    if (BITS == 4) return w[i % BITS];
    if (BITS == 2) return __byte_perm(w[(i >> 1) % BITS], 0u, (i & 1) ? 0x4342 : 0x4140);
    /* BITS == 3: 24 bits at bit 24 i of the 96-bit span */
    const int bit = 24 * i, lo = bit >> 5, sh = bit & 31;
    uint32_t v =
        lo + 1 < BITS ? __funnelshift_r(w[lo % BITS], w[(lo + 1) % BITS], sh) : w[lo % BITS] >> sh;
    return (v & 0xFFFu) | ((v & 0xFFF000u) << 4);
}

/* Code j (0..31) of the span, any BITS (the dequantizer's generic path). */
template <int BITS> __device__ __forceinline__ uint32_t code_of(const uint32_t (&w)[BITS], int j) {
    const int bit = j * BITS, lo = bit >> 5, sh = bit & 31;
    uint32_t v = (sh + BITS > 32 && lo + 1 < BITS)
                     ? __funnelshift_r(w[lo % BITS], w[(lo + 1) % BITS], sh)
                     : w[lo % BITS] >> sh;
    return v & ((1u << BITS) - 1u);
}

__device__ __forceinline__ uint32_t bf16x2_bits(bf16x2 v) {
    return *reinterpret_cast<uint32_t *>(&v);
}
__device__ __forceinline__ bf16x2 bits_bf16x2(uint32_t u) {
    return *reinterpret_cast<bf16x2 *>(&u);
}

/* The two bf16 weights of pair p (codes 8i + p, 8i + 4 + p) of virtual word i, one 32-bit
 * register: low half the first. */
template <int BITS, int MODE>
__device__ __forceinline__ uint32_t dq_pair(const uint32_t (&w)[BITS], uint32_t u, int i, int p,
                                            bf16x2 zz, bf16x2 ss, float s, float z,
                                            const float *cb) {
    if (MODE == QMODE_BF16) {
        const uint32_t mask = ((1u << BITS) - 1u) * 0x00010001u;
        bf16x2 v = bits_bf16x2(((u >> (BITS * p)) & mask) | 0x43004300u);
        return bf16x2_bits(__hmul2(__hsub2(v, zz), ss));
    }
    uint32_t ca, cb_;
    if (BITS == 8) {
        ca = (w[(2 * i) % BITS] >> (8 * p)) & 0xFFu;
        cb_ = (w[(2 * i + 1) % BITS] >> (8 * p)) & 0xFFu;
    } else {
        ca = (u >> (BITS * p)) & ((1u << BITS) - 1u);
        cb_ = (u >> (16 + BITS * p)) & ((1u << BITS) - 1u);
    }
    float fa, fb;
    if (MODE == QMODE_CB) {
        fa = cb[ca] * s, fb = cb[cb_] * s;
    } else { /* 2^23 + c - 2^23 is (float)c exactly */
        fa = ((__uint_as_float(0x4B000000u | ca) - 8388608.0f) - z) * s;
        fb = ((__uint_as_float(0x4B000000u | cb_) - 8388608.0f) - z) * s;
    }
    return bf16x2_bits(__floats2bfloat162_rn(fa, fb));
}

/* ---------------------------------------------------------------- the fused kernel */
/* Depth of a warp's load pipeline in chunks (the loads of chunk c + D are issued as chunk c is
 * computed). */
template <int BITS, int NT> struct qmm_batch {
    /* One chunk ahead: deeper pipelines measured slower on the H100 (more registers, fewer warps
     * per SM; `qmm_tool probe`), occupancy hides the latency better. */
    static constexpr int value = 1;
};

template <int BITS> struct qmm_stage {
    uint32_t w[BITS];
    float s, z;
};

/* TILED (a timing probe only, see rs_cuda_qmm_probe): read the same number of bytes as if the 8
 * rows of an n-tile were stored together span by span (a warp's loads one contiguous run); the
 * values are then not the weight's. */
template <int BITS, int NT, bool TILED = false>
__device__ __forceinline__ void qmm_load(qmm_stage<BITS> (&st)[NT], const qmm_params &p, int n_warp,
                                         int g, int span, int span_limit) {
    const int grp =
        min(p.gs_shift >= 0 ? (span * 32) >> p.gs_shift : (span * 32) / p.gs, p.n_groups - 1);
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int n = n_warp + j * 8 + g;
        if (n < p.N && span < span_limit) {
            const size_t at = TILED ? ((size_t)(n >> 3) * (p.row_words / BITS) + span) * 8 * BITS +
                                          (size_t)(n & 7) * BITS
                                    : (size_t)n * p.row_words + (size_t)span * BITS;
            load_span<BITS>(st[j].w, p.packed + at);
            st[j].s = __ldg(p.scales + (size_t)n * p.n_groups + grp);
            st[j].z = p.zeros ? __ldg(p.zeros + (size_t)n * p.n_groups + grp) : p.zero_sym;
        } else {
#pragma unroll
            for (int b = 0; b < BITS; b++) st[j].w[b] = 0u;
            st[j].s = 0.0f, st[j].z = 0.0f;
        }
    }
}

/* X's layout for MT > 1 (written by qmm_prep_x_kernel): per row, chunk c, virtual word i, lane t,
 * the 8 values of k = 128 c + 32 t + 8 i + (0, 4, 1, 5, 2, 6, 3, 7): one 16-byte load gives
 * the A registers of both mma steps, and a quad's loads are 64 contiguous bytes. */
template <int BITS, int MODE, int MT, int NT, bool SX = false>
__device__ __forceinline__ void qmm_chunk(float (&acc)[MT][NT][4], const qmm_stage<BITS> (&cur)[NT],
                                          const qmm_params &p, const bf16 *const (&xrow)[MT][2],
                                          const bool (&xok)[MT][2], int c, int t, const float *cb) {
    const int k0 = c * QMM_CHUNK + 32 * t;
    bf16x2 zz[NT], ss[NT];
    if (MODE == QMODE_BF16) {
#pragma unroll
        for (int j = 0; j < NT; j++) {
            zz[j] = __float2bfloat162_rn(128.0f + cur[j].z);
            ss[j] = __float2bfloat162_rn(cur[j].s);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        uint4 xa[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                if (SX) { /* xrow: the chunk's rows in shared memory, zero past M */
                    xa[mt][hr] = *(const uint4 *)(xrow[mt][hr] + 32 * i + 8 * t);
                } else if (MT > 1) {
                    const int off = c * QMM_CHUNK + 32 * i + 8 * t;
                    xa[mt][hr] = xok[mt][hr] ? __ldg((const uint4 *)(xrow[mt][hr] + off))
                                             : make_uint4(0u, 0u, 0u, 0u);
                } else {
                    const int kk = k0 + 8 * i;
                    xa[mt][hr] = (xok[mt][hr] && kk < p.K)
                                     ? __ldg((const uint4 *)(xrow[mt][hr] + kk))
                                     : make_uint4(0u, 0u, 0u, 0u);
                }
            }
        uint32_t u[NT];
#pragma unroll
        for (int j = 0; j < NT; j++) u[j] = BITS <= 4 ? vword<BITS>(cur[j].w, i) : 0u;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            uint32_t b0[NT], b1[NT];
#pragma unroll
            for (int j = 0; j < NT; j++) {
                b0[j] = dq_pair<BITS, MODE>(cur[j].w, u[j], i, 2 * h, zz[j], ss[j], cur[j].s,
                                            cur[j].z, cb);
                b1[j] = dq_pair<BITS, MODE>(cur[j].w, u[j], i, 2 * h + 1, zz[j], ss[j], cur[j].s,
                                            cur[j].z, cb);
            }
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                uint32_t a0, a1, a2, a3;
                if (SX || MT > 1) {
                    a0 = h ? xa[mt][0].z : xa[mt][0].x, a2 = h ? xa[mt][0].w : xa[mt][0].y;
                    a1 = h ? xa[mt][1].z : xa[mt][1].x, a3 = h ? xa[mt][1].w : xa[mt][1].y;
                } else {
                    const uint32_t q0 = h ? xa[mt][0].y : xa[mt][0].x;
                    const uint32_t q2 = h ? xa[mt][0].w : xa[mt][0].z;
                    const uint32_t r0 = h ? xa[mt][1].y : xa[mt][1].x;
                    const uint32_t r2 = h ? xa[mt][1].w : xa[mt][1].z;
                    a0 = __byte_perm(q0, q2, 0x5410), a2 = __byte_perm(q0, q2, 0x7632);
                    a1 = __byte_perm(r0, r2, 0x5410), a3 = __byte_perm(r0, r2, 0x7632);
                }
#pragma unroll
                for (int j = 0; j < NT; j++) mma_16816(acc[mt][j], a0, a1, a2, a3, b0[j], b1[j]);
            }
        }
    }
}

template <int MT, int NT> __device__ __forceinline__ void qmm_zero(float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mt][j][e] = 0.0f;
}

__device__ __forceinline__ void qmm_store(const qmm_params &p, int m, int n, float v) {
    bf16 *o = p.out + (size_t)m * p.N + n;
    if (p.bias) v += __bfloat162float(p.bias[n]);
    if (p.beta != 0.0f) v += p.beta * __bfloat162float(*o);
    *o = __float2bfloat16(v);
}

/* Write the block's sums: straight to out, or (split-K) as fp32 partials, where the last block
 * of a tile to finish adds the tile's partial sums in split order (deterministic whichever block
 * that is) and re-arms the tile's counter. */
template <int MT, int NT, int WARPS>
__device__ __forceinline__ void qmm_epilogue(const qmm_params &p, const float (&acc)[MT][NT][4],
                                             int n_warp, int m_base, int g, int t) {
    __shared__ int s_last;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int m = m_base + mt * 16 + g + (e >= 2 ? 8 : 0);
                const int n = n_warp + j * 8 + 2 * t + (e & 1);
                if (m >= p.M || n >= p.N) continue;
                if (p.partial)
                    p.partial[((size_t)blockIdx.y * p.M + m) * p.N + n] = acc[mt][j][e];
                else
                    qmm_store(p, m, n, acc[mt][j][e]);
            }
    if (!p.partial || !p.counters) return;
    __threadfence();
    __syncthreads();
    const int tile = blockIdx.z * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) s_last = atomicAdd(p.counters + tile, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    const int rows_blk = WARPS * NT * 8, n0 = blockIdx.x * rows_blk;
    for (int idx = threadIdx.x; idx < MT * 16 * rows_blk; idx += blockDim.x) {
        const int m = m_base + idx / rows_blk, n = n0 + idx % rows_blk;
        if (m >= p.M || n >= p.N) continue;
        float v = 0.0f;
        for (int s = 0; s < (int)gridDim.y; s++)
            v += __ldcg(p.partial + ((size_t)s * p.M + m) * p.N + n);
        qmm_store(p, m, n, v);
    }
    if (threadIdx.x == 0) p.counters[tile] = 0;
}

/* PROBE (timing probes of rs_cuda_qmm_probe, 0 in real use): bit 0 skips the dequantize and
 * MMA work (loads only), bit 1 reads with qmm_load's TILED addresses. DEPTH: the load pipeline's
 * depth in chunks (0: qmm_batch). */
enum { QPROBE_LOAD_ONLY = 1, QPROBE_TILED = 2 };

template <int BITS, int NT>
__device__ __forceinline__ void qmm_touch(float (&acc)[NT][4], const qmm_stage<BITS> (&cur)[NT]) {
#pragma unroll
    for (int j = 0; j < NT; j++) {
        uint32_t x = 0u;
#pragma unroll
        for (int b = 0; b < BITS; b++) x ^= cur[j].w[b];
        acc[j][0] += __uint_as_float(x & 0x007FFFFFu) + cur[j].s + cur[j].z;
    }
}

template <int BITS, int MODE, int MT, int NT, int DEPTH = 0, int PROBE = 0>
__global__ void __launch_bounds__(QMM_WARPS * 32) qmm_kernel(qmm_params p) {
    __shared__ float cb[16];
    if (MODE == QMODE_CB) {
        if (threadIdx.x < 16) cb[threadIdx.x] = p.cb[threadIdx.x];
        __syncthreads();
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int n_warp = (blockIdx.x * QMM_WARPS + warp) * NT * 8;
    const int m_base = blockIdx.z * MT * 16;
    const int c_begin = blockIdx.y * p.chunks_per_split;
    const int c_end = min(c_begin + p.chunks_per_split, p.n_chunks);
    const int span_limit = (p.K + 31) / 32;

    float acc[MT][NT][4];
    qmm_zero<MT, NT>(acc);

    const bf16 *xrow[MT][2];
    bool xok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            const int m = m_base + mt * 16 + g + 8 * hr;
            xok[mt][hr] = m < p.M;
            xrow[mt][hr] = p.x + (size_t)(xok[mt][hr] ? m : 0) * p.ldx;
        }

    constexpr int D = DEPTH ? DEPTH : qmm_batch<BITS, NT>::value;
    constexpr bool TILED = (PROBE & QPROBE_TILED) != 0;
    qmm_stage<BITS> st[D][NT];
#pragma unroll
    for (int d = 0; d < D; d++)
        if (c_begin + d < c_end)
            qmm_load<BITS, NT, TILED>(st[d], p, n_warp, g, (c_begin + d) * 4 + t, span_limit);
    for (int c0 = c_begin; c0 < c_end; c0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            const int c = c0 + d;
            if (c < c_end) {
                if (PROBE & QPROBE_LOAD_ONLY)
                    qmm_touch<BITS, NT>(acc[0], st[d]);
                else
                    qmm_chunk<BITS, MODE, MT, NT>(acc, st[d], p, xrow, xok, c, t, cb);
                if (c + D < c_end)
                    qmm_load<BITS, NT, TILED>(st[d], p, n_warp, g, (c + D) * 4 + t, span_limit);
            }
        }
    }

    qmm_epilogue<MT, NT, QMM_WARPS>(p, acc, n_warp, m_base, g, t);
}

/* The fused kernel for 17..64 rows of X ("SX": X in shared memory). Past 16 rows each warp's X
 * fragments outweigh its weight bytes several times, so the block (QMM_SX_WARPS warps, 8 NT
 * rows of W each) copies a chunk of X (the permuted layout of qmm_prep_x_kernel, MT x 16 rows x
 * 128 k) into shared memory once with cp.async, double-buffered against the next chunk, and
 * every warp reads its fragments there. Row stride 160 bf16 (320 bytes = 64 mod 128) keeps a
 * quarter-warp's 16-byte reads (rows g, g + 1; 64 bytes each) on disjoint banks. Weights go
 * through registers as in qmm_kernel, one chunk ahead. */
#define QMM_SX_WARPS 8
#define QMM_SX_STRIDE 160

/* Chunk c of the block's MT x 16 rows of X into xs (rows past M zero), without a commit. */
template <int MT>
__device__ __forceinline__ void qmm_sx_copy(bf16 *xs, const qmm_params &p, int m_base, int c) {
    for (int idx = threadIdx.x; idx < MT * 16 * 16; idx += blockDim.x) {
        const int row = idx >> 4, piece = idx & 15, m = m_base + row;
        bf16 *dst = xs + row * QMM_SX_STRIDE + piece * 8;
        if (m < p.M)
            cp_async16(dst, p.x + (size_t)m * p.ldx + (size_t)c * QMM_CHUNK + piece * 8);
        else
            *(uint4 *)dst = make_uint4(0u, 0u, 0u, 0u);
    }
}

template <int MT>
__device__ __forceinline__ void qmm_sx_stage(bf16 *xs, const qmm_params &p, int m_base, int c) {
    qmm_sx_copy<MT>(xs, p, m_base, c);
    cp_async_commit();
}

template <int BITS, int MODE, int MT, int NT>
__global__ void __launch_bounds__(QMM_SX_WARPS * 32) qmm_sx_kernel(qmm_params p) {
    __shared__ float cb[16];
    __shared__ __align__(16) bf16 xs[2][MT * 16 * QMM_SX_STRIDE];
    if (MODE == QMODE_CB && threadIdx.x < 16) cb[threadIdx.x] = p.cb[threadIdx.x];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int n_warp = (blockIdx.x * QMM_SX_WARPS + warp) * NT * 8;
    const int m_base = blockIdx.z * MT * 16;
    const int c_begin = blockIdx.y * p.chunks_per_split;
    const int c_end = min(c_begin + p.chunks_per_split, p.n_chunks);
    const int span_limit = (p.K + 31) / 32;

    float acc[MT][NT][4];
    qmm_zero<MT, NT>(acc);
    bool xok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) xok[mt][0] = xok[mt][1] = true;

    qmm_stage<BITS> st[NT];
    if (c_begin < c_end) {
        qmm_sx_stage<MT>(xs[0], p, m_base, c_begin);
        qmm_load<BITS, NT>(st, p, n_warp, g, c_begin * 4 + t, span_limit);
    }
    for (int c = c_begin; c < c_end; c++) {
        const int buf = (c - c_begin) & 1;
        if (c + 1 < c_end) {
            qmm_sx_stage<MT>(xs[buf ^ 1], p, m_base, c + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        qmm_stage<BITS> cur[NT];
#pragma unroll
        for (int j = 0; j < NT; j++) cur[j] = st[j];
        if (c + 1 < c_end) qmm_load<BITS, NT>(st, p, n_warp, g, (c + 1) * 4 + t, span_limit);
        const bf16 *xrow[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int hr = 0; hr < 2; hr++)
                xrow[mt][hr] = xs[buf] + (mt * 16 + g + 8 * hr) * QMM_SX_STRIDE;
        qmm_chunk<BITS, MODE, MT, NT, true>(acc, cur, p, xrow, xok, c, t, cb);
        __syncthreads();
    }
    qmm_epilogue<MT, NT, QMM_SX_WARPS>(p, acc, n_warp, m_base, g, t);
}

/* The fused kernel for few rows with X staged in shared memory ("XS"; the default up to
 * QMM_XS_ROWS rows, QPROBE_XS takes it up to 16). qmm_kernel reads each lane's X fragments from
 * global memory (L2) inside the chunk loop: four L2 round trips per chunk, each behind a bounds
 * test, and byte permutes to form the fragments. Here the block copies its rows of X for xs_seg
 * chunks at a time into shared memory once, permuted as qmm_prep_x_kernel's layout (slot (i, t)
 * of a chunk holds k = 128 c + 32 t + 8 i + (0, 4, 1, 5, 2, 6, 3, 7)), so that every fragment is
 * one 16-byte shared load; rows past M read a zero row. Same fragments, same MMAs in the same
 * order as qmm_kernel: the result is bit-identical (test_qmm_gpu.py checks it, every format).
 * PIPE 1 (the default) copies the chunk's weight registers, loads the next chunk, then computes
 * (the load overlaps the compute); PIPE 0 computes first, as qmm_kernel. Measured on an H200
 * (2026-12-07, `qmm_tool probe`): at 1 and 4 rows 0-16% faster than qmm_kernel (11008x4096,
 * M = 1: 17.6 vs 20.3 us), at 16 rows slower on two of the four Llama shapes: hence the limit.
 * A copy through cp.async (every piece in flight, permuted in place after) and per-row weight
 * pointers set once measured slower (more registers: 71 against 62, fewer blocks per SM). */
__device__ __forceinline__ uint4 qmm_perm8(uint4 v) { /* (k0..k7) -> (k0 k4, k1 k5, k2 k6, k3 k7) */
    return make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632),
                      __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632));
}

template <int BITS, int MODE, int NT, int PIPE>
__global__ void __launch_bounds__(QMM_WARPS * 32) qmm_xs_kernel(qmm_params p) {
    extern __shared__ __align__(16) bf16 qmm_xs[];
    __shared__ __align__(16) bf16 zrow[QMM_CHUNK];
    __shared__ float cb[16];
    if (MODE == QMODE_CB && threadIdx.x < 16) cb[threadIdx.x] = p.cb[threadIdx.x];
    if (threadIdx.x < QMM_CHUNK / 8) ((uint4 *)zrow)[threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int n_warp = (blockIdx.x * QMM_WARPS + warp) * NT * 8;
    const int m_base = blockIdx.z * 16, rows = min(16, p.M - m_base);
    const int c_begin = blockIdx.y * p.chunks_per_split;
    const int c_end = min(c_begin + p.chunks_per_split, p.n_chunks);
    const int span_limit = (p.K + 31) / 32;

    float acc[1][NT][4];
    qmm_zero<1, NT>(acc);
    bool xok[1][2];
    xok[0][0] = xok[0][1] = true;

    qmm_stage<BITS> st[NT];
    if (c_begin < c_end) qmm_load<BITS, NT>(st, p, n_warp, g, c_begin * 4 + t, span_limit);
    for (int s0 = c_begin; s0 < c_end; s0 += p.xs_seg) {
        const int s1 = min(s0 + p.xs_seg, c_end), pieces = (s1 - s0) * 16;
        __syncthreads(); /* the previous segment's reads are done (and zrow, cb are written) */
        for (int idx = threadIdx.x; idx < rows * pieces; idx += blockDim.x) {
            const int r = idx / pieces, q = idx % pieces, c = s0 + (q >> 4), kq = (q & 15) * 8;
            const int k = c * QMM_CHUNK + kq;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (k < p.K)
                v = qmm_perm8(__ldg((const uint4 *)(p.x + (size_t)(m_base + r) * p.ldx + k)));
            /* piece 4 t + i of the chunk goes to slot 4 i + t */
            const int slot = ((kq >> 3) & 3) * 4 + (kq >> 5);
            *(uint4 *)(qmm_xs + r * p.xs_stride + (c - s0) * QMM_CHUNK + slot * 8) = v;
        }
        __syncthreads();
        for (int c = s0; c < s1; c++) {
            const bf16 *xrow[1][2];
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                const int r = g + 8 * hr;
                xrow[0][hr] = r < rows ? qmm_xs + r * p.xs_stride + (c - s0) * QMM_CHUNK : zrow;
            }
            if (PIPE) {
                qmm_stage<BITS> cur[NT];
#pragma unroll
                for (int j = 0; j < NT; j++) cur[j] = st[j];
                if (c + 1 < c_end)
                    qmm_load<BITS, NT>(st, p, n_warp, g, (c + 1) * 4 + t, span_limit);
                qmm_chunk<BITS, MODE, 1, NT, true>(acc, cur, p, xrow, xok, c, t, cb);
            } else {
                qmm_chunk<BITS, MODE, 1, NT, true>(acc, st, p, xrow, xok, c, t, cb);
                if (c + 1 < c_end)
                    qmm_load<BITS, NT>(st, p, n_warp, g, (c + 1) * 4 + t, span_limit);
            }
        }
    }
    qmm_epilogue<1, NT, QMM_WARPS>(p, acc, n_warp, m_base, g, t);
}

/* Probe bits (rs_cuda_qmm_probe; qgemm.cu says what each does): QPROBE_NO_SX, the register-X
 * kernel past 16 rows; QPROBE_WG2 / QPROBE_WG4: qmm_wg_kernel (qgemm_wg.cu). */
enum { QPROBE_NO_SX = 4, QPROBE_WG2 = 8, QPROBE_WG4 = 16, QPROBE_XS = 32, QPROBE_REGX = 64 };
#define QMM_WG_ROWS 64 /* weight rows per qmm_wg_kernel block */

typedef struct {
    int mt, nt, sx, warps, splits, chunks_per_split, n_chunks, ldx, prep, perm;
    int wgs, np, depth; /* qmm_wg_kernel: warpgroups per block (0: not it), X columns, depth */
    int xs, xs_pipe, xs_seg, xs_stride; /* qmm_xs_kernel (1..16 rows): taken, PIPE, segment */
    size_t xs_smem;     /* its dynamic shared memory */
    dim3 grid;
    size_t partial_bytes, xs_bytes;
} qmm_plan;

template <int BITS, int MODE, int NT, int PIPE>
void qmm_launch_xs_kernel(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    qmm_xs_kernel<BITS, MODE, NT, PIPE><<<pl.grid, dim3(QMM_WARPS * 32), pl.xs_smem, s>>>(p);
}

template <int BITS, int MODE>
void qmm_launch_xs(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    if (pl.xs_pipe) {
        switch (pl.nt) {
        case 1: qmm_launch_xs_kernel<BITS, MODE, 1, 1>(pl, p, s); break;
        case 4: qmm_launch_xs_kernel<BITS, MODE, 4, 1>(pl, p, s); break;
        default: qmm_launch_xs_kernel<BITS, MODE, 2, 1>(pl, p, s); break;
        }
        return;
    }
    switch (pl.nt) {
    case 1: qmm_launch_xs_kernel<BITS, MODE, 1, 0>(pl, p, s); break;
    case 4: qmm_launch_xs_kernel<BITS, MODE, 4, 0>(pl, p, s); break;
    default: qmm_launch_xs_kernel<BITS, MODE, 2, 0>(pl, p, s); break;
    }
}

template <int BITS, int MODE, int MT>
void qmm_launch_nt(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    const dim3 block(pl.warps * 32);
    if constexpr (MT == 1) {
        if (pl.xs) {
            qmm_launch_xs<BITS, MODE>(pl, p, s);
            return;
        }
    }
    if constexpr (MT > 1) { /* the shared-memory kernels: past 16 rows only */
        if (pl.sx) {
            switch (pl.nt) {
            case 1: qmm_sx_kernel<BITS, MODE, MT, 1><<<pl.grid, block, 0, s>>>(p); break;
            case 4: qmm_sx_kernel<BITS, MODE, MT, 4><<<pl.grid, block, 0, s>>>(p); break;
            default: qmm_sx_kernel<BITS, MODE, MT, 2><<<pl.grid, block, 0, s>>>(p); break;
            }
            return;
        }
    }
    switch (pl.nt) {
    case 1: qmm_kernel<BITS, MODE, MT, 1><<<pl.grid, block, 0, s>>>(p); break;
    case 4: qmm_kernel<BITS, MODE, MT, 4><<<pl.grid, block, 0, s>>>(p); break;
    default: qmm_kernel<BITS, MODE, MT, 2><<<pl.grid, block, 0, s>>>(p); break;
    }
}

template <int BITS, int MODE>
void qmm_launch_mt(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    switch (pl.mt) {
    case 1: qmm_launch_nt<BITS, MODE, 1>(pl, p, s); break;
    case 2: qmm_launch_nt<BITS, MODE, 2>(pl, p, s); break;
    default: qmm_launch_nt<BITS, MODE, 4>(pl, p, s); break;
    }
}

/* The launchers, one per weight kind, each in its own file (its kernels' instantiations):
 * integer codes with bf16 arithmetic (w2, w3, w4), 8-bit codes (w8) and float zero points of
 * 2..4 bits (fz) in fp32, NF4 / FP4 codebooks (cb); the W4 timing probes (NT = 2, the
 * register-X kernel: 0 when the plan is not theirs); the wgmma experiment (wg). */
void qmm_launch_w2(const qmm_plan &pl, const qmm_params &p, cudaStream_t s);
void qmm_launch_w3(const qmm_plan &pl, const qmm_params &p, cudaStream_t s);
void qmm_launch_w4(const qmm_plan &pl, const qmm_params &p, cudaStream_t s);
void qmm_launch_w8(const qmm_plan &pl, const qmm_params &p, cudaStream_t s);
void qmm_launch_fz(int bits, const qmm_plan &pl, const qmm_params &p, cudaStream_t s);
void qmm_launch_cb(const qmm_plan &pl, const qmm_params &p, cudaStream_t s);
int qmm_launch_w4_probe(const qmm_plan &pl, const qmm_params &p, cudaStream_t s, int depth,
                        int probe);
void qmm_launch_wg(const qmm_plan &pl, const qmm_params &p, cudaStream_t s);

#endif
