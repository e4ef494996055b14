/* qgemm: fused dequant-matmul for quantized linears, and the fast dequantizer of the large-M path.
 *
 *   out[M, N] = beta * out + X[M, K] dequant(W)[N, K]^T (+ bias[N])
 *
 * The fused kernel is for few rows of X (decode, small batches), where the time is the weight
 * read: W stays packed in global memory (the per-row bit stream of src/quant_pack.c, unchanged)
 * and is dequantized in registers right before mma.sync m16n8k16 (bf16 in, fp32 accumulate), so
 * a 4-bit weight moves a quarter of the bytes of its bf16 form. Large M (prefill, training) is
 * compute bound: there the dequantizer below writes the bf16 weight once and cuBLAS multiplies
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
#include "resafe/cuda_common.h"

extern "C" {
#include "resafe/quant.h"
}

#include <stdlib.h>
#include <string.h>

#define QMM_WARPS 4
#define QMM_CHUNK 128 /* k per chunk: 4 lanes x 32 codes */

enum { QMODE_BF16 = 0, QMODE_F32 = 1, QMODE_CB = 2 };

struct qmm_params {
    const bf16 *x; /* [M, ldx], 16-byte aligned, ldx % 8 == 0 */
    int ldx;
    const uint32_t *packed;
    int row_words; /* 32-bit words per packed row */
    const float *scales, *zeros;
    int n_groups, gs;
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
        for (int i = 0; i < BITS; i++)
            w[i] = __ldg(p + i);
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

__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
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
    const int grp = min((span * 32) / p.gs, p.n_groups - 1);
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
            for (int b = 0; b < BITS; b++)
                st[j].w[b] = 0u;
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
        for (int j = 0; j < NT; j++)
            u[j] = BITS <= 4 ? vword<BITS>(cur[j].w, i) : 0u;
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
                for (int j = 0; j < NT; j++)
                    mma_16816(acc[mt][j], a0, a1, a2, a3, b0[j], b1[j]);
            }
        }
    }
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
        for (int b = 0; b < BITS; b++)
            x ^= cur[j].w[b];
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
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                acc[mt][j][e] = 0.0f;

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
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                acc[mt][j][e] = 0.0f;
    bool xok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
        xok[mt][0] = xok[mt][1] = true;

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
        for (int j = 0; j < NT; j++)
            cur[j] = st[j];
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

/* ---------------------------------------------------------------- wgmma experiment (sm_90a)
 * qmm_wg_kernel, chosen only by the probe bits QPROBE_WG2 / QPROBE_WG4 (W4 integer codes with
 * bf16 arithmetic, M <= 64) until it is timed against the kernels above. "Swap AB": the weight
 * is wgmma's A operand, straight from registers (64 weight rows per warpgroup; each warp
 * dequantizes its 16 rows exactly as qmm_chunk does for NT = 2, which is already the register
 * layout of an m64nNk16 A fragment), and X^T is the B operand, read by the tensor cores from
 * shared memory (NP = M rounded up to 8, 16, 32 or 64 columns), so the four warps of a
 * warpgroup share one copy of X and no warp reads X fragments itself. WGS warpgroups of a block
 * take the same 64 rows and split the block's chunks between them (their sums are added in
 * warpgroup order through shared memory: deterministic); grid.y splits K across blocks as the
 * other kernels do. Each warpgroup streams its X chunks through two shared-memory buffers
 * (cp.async) and keeps the weight DEPTH chunks ahead in registers.
 *
 * X layout (qmm_prep_x_kernel, perm 2): per row, chunk c, k16 step s = 2 i + h (i: virtual word,
 * h: pair half), slab half hi, then 8 values kl = 2 t + e holding k = 128 c + 32 t + 8 i + 4 e +
 * 2 h + hi: the k order in which qmm_chunk pairs codes. In shared memory a chunk is 16 slabs
 * (2 s + hi) of NP rows x 16 bytes: wgmma's K-major layout without swizzle, core matrices of
 * 8 rows x 16 bytes, the K-adjacent one NP x 16 bytes on (LBO), the next 8 rows 128 bytes on
 * (SBO). */
enum { QPROBE_WG2 = 8, QPROBE_WG4 = 16 };
#define QMM_WG_ROWS 64

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QMM_HAVE_WGMMA 1
#endif

__device__ __forceinline__ uint64_t wg_desc(const void *smem, int lbo, int sbo) {
    const uint64_t a = (uint64_t)__cvta_generic_to_shared(smem);
    return ((a & 0x3FFFFull) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

__device__ __forceinline__ void wg_bar(int id) {
    asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory");
}

#ifdef QMM_HAVE_WGMMA
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_wait0() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

/* D[64 x N] += A[64 x 16] (registers) * B[16 x N] (shared memory, descriptor), N = NP. */
template <int NP> struct wg_mma;
template <> struct wg_mma<8> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint64_t b) {
        asm volatile("wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, 1, 1, 1, 0;\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
    }
};
template <> struct wg_mma<16> {
    static __device__ __forceinline__ void run(float (&d)[8], const uint32_t (&a)[4], uint64_t b) {
        asm volatile("wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
                     "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, 1, 1, 1, 0;\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
                       "+f"(d[6]), "+f"(d[7])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
    }
};
template <> struct wg_mma<32> {
    static __device__ __forceinline__ void run(float (&d)[16], const uint32_t (&a)[4], uint64_t b) {
        asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
                     "{%16, %17, %18, %19}, %20, 1, 1, 1, 0;\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
                       "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
                       "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
    }
};
template <> struct wg_mma<64> {
    static __device__ __forceinline__ void run(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
        asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, "
                     "%31}, {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
                       "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
                       "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
                       "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),
                       "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]),
                       "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
    }
};
#endif

/* Chunk c of X's first M rows (perm-2 layout) into a warpgroup's buffer, without a commit. */
template <int NP>
__device__ __forceinline__ void qmm_wg_copy(bf16 *xs, const qmm_params &p, int c, int tid) {
    for (int idx = tid; idx < p.M * 16; idx += 128) {
        const int m = idx >> 4, slab = idx & 15;
        cp_async16(xs + (slab * NP + m) * 8, p.x + (size_t)m * p.ldx + (size_t)c * QMM_CHUNK +
                                                 slab * 8);
    }
}

template <int BITS, int MODE, int NP, int WGS, int DEPTH>
__global__ void __launch_bounds__(WGS * 128, 1) qmm_wg_kernel(qmm_params p) {
    static_assert(BITS <= 4 && MODE == QMODE_BF16 && DEPTH % 2 == 0, "W4/W3/W2 bf16 codes");
#ifdef QMM_HAVE_WGMMA
    extern __shared__ __align__(128) unsigned char qmm_wg_smem[];
    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127;
    const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    constexpr int BUF = NP * QMM_CHUNK; /* bf16 per buffer */
    bf16 *xs = (bf16 *)qmm_wg_smem + (size_t)wg * 2 * BUF;
    const int n_warp = blockIdx.x * QMM_WG_ROWS + warp * 16;
    const int cb0 = blockIdx.y * p.chunks_per_split;
    const int cb1 = min(cb0 + p.chunks_per_split, p.n_chunks);
    const int per = (cb1 - cb0 + WGS - 1) / WGS;
    const int c_begin = min(cb0 + wg * per, cb1), c_end = min(c_begin + per, cb1);
    const int span_limit = (p.K + 31) / 32;

    float acc[NP / 2];
#pragma unroll
    for (int e = 0; e < NP / 2; e++)
        acc[e] = 0.0f;
    /* rows M..NP-1 of both buffers stay zero (never copied) */
    for (int idx = tid; idx < 2 * 16 * (NP - p.M); idx += 128) {
        const int b = idx / (16 * (NP - p.M)), r = idx % (16 * (NP - p.M));
        const int slab = r / (NP - p.M), m = p.M + r % (NP - p.M);
        *(uint4 *)(xs + b * BUF + (slab * NP + m) * 8) = make_uint4(0u, 0u, 0u, 0u);
    }

    qmm_stage<BITS> st[DEPTH][2];
    if (c_begin < c_end) {
        qmm_wg_copy<NP>(xs, p, c_begin, tid);
        cp_async_commit();
    }
#pragma unroll
    for (int d = 0; d < DEPTH; d++)
        if (c_begin + d < c_end)
            qmm_load<BITS, 2>(st[d], p, n_warp, g, (c_begin + d) * 4 + t, span_limit);
    for (int c0 = c_begin; c0 < c_end; c0 += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; d++) {
            const int c = c0 + d;
            if (c >= c_end) break;
            bf16 *cur_x = xs + (d & 1) * BUF; /* DEPTH is even: buffer (c - c_begin) & 1 */
            if (c + 1 < c_end) {
                qmm_wg_copy<NP>(xs + ((d + 1) & 1) * BUF, p, c + 1, tid);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            fence_proxy_async(); /* the copies (and the zero rows) before the tensor cores read */
            wg_bar(1 + wg);
            /* the A fragments of the chunk's 8 k16 steps from the two rows' codes */
            const qmm_stage<BITS>(&cur)[2] = st[d];
            uint32_t a[8][4];
            bf16x2 zz[2], ss[2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                zz[j] = __float2bfloat162_rn(128.0f + cur[j].z);
                ss[j] = __float2bfloat162_rn(cur[j].s);
            }
#pragma unroll
            for (int i = 0; i < 4; i++) {
                uint32_t u[2];
#pragma unroll
                for (int j = 0; j < 2; j++)
                    u[j] = vword<BITS>(cur[j].w, i);
#pragma unroll
                for (int h = 0; h < 2; h++)
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        a[2 * i + h][j] = dq_pair<BITS, MODE>(cur[j].w, u[j], i, 2 * h, zz[j],
                                                              ss[j], cur[j].s, cur[j].z, NULL);
                        a[2 * i + h][2 + j] = dq_pair<BITS, MODE>(
                            cur[j].w, u[j], i, 2 * h + 1, zz[j], ss[j], cur[j].s, cur[j].z, NULL);
                    }
            }
            if (c + DEPTH < c_end)
                qmm_load<BITS, 2>(st[d], p, n_warp, g, (c + DEPTH) * 4 + t, span_limit);
#pragma unroll
            for (int e = 0; e < NP / 2; e++)
                asm volatile("" : "+f"(acc[e])::"memory");
            wg_fence();
#pragma unroll
            for (int s = 0; s < 8; s++)
                wg_mma<NP>::run(acc, a[s], wg_desc(cur_x + 2 * s * NP * 8, NP * 16, 128));
            wg_commit();
            wg_wait0();
#pragma unroll
            for (int e = 0; e < NP / 2; e++)
                asm volatile("" : "+f"(acc[e])::"memory");
            wg_bar(1 + wg); /* the buffer is free for the copy two chunks on */
        }
    }

    /* warpgroups 1..WGS-1 hand their sums to warpgroup 0 through their own buffers */
    float *red = (float *)xs;
    if (WGS > 1) {
        __syncthreads();
        if (wg > 0)
#pragma unroll
            for (int e = 0; e < NP / 2; e++)
                red[e * 128 + tid] = acc[e];
        __syncthreads();
        if (wg > 0) return;
        for (int w = 1; w < WGS; w++) {
            const float *o = (const float *)((const bf16 *)qmm_wg_smem + (size_t)w * 2 * BUF);
#pragma unroll
            for (int e = 0; e < NP / 2; e++)
                acc[e] += o[e * 128 + tid];
        }
    }
    /* acc[4 j + e]: weight row n_warp + g (+ 8 for e >= 2), X row 8 j + 2 t + (e & 1) */
#pragma unroll
    for (int j = 0; j < NP / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int n = n_warp + g + (e >= 2 ? 8 : 0), m = 8 * j + 2 * t + (e & 1);
            if (m >= p.M || n >= p.N) continue;
            if (p.partial)
                p.partial[((size_t)blockIdx.y * p.M + m) * p.N + n] = acc[4 * j + e];
            else
                qmm_store(p, m, n, acc[4 * j + e]);
        }
#else
    __trap(); /* chosen on sm_90 devices only, which run the sm_90a code */
#endif
}

/* out = sum over splits of partial (in split order) + bias + beta * out (when the tile counters
 * do not cover the grid). */
__global__ void qmm_reduce_kernel(bf16 *out, const float *partial, const bf16 *bias, int M, int N,
                                  int splits, float beta) {
    const size_t total = (size_t)M * (size_t)N;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < splits; s++)
            v += partial[(size_t)s * total + i];
        if (bias) v += __bfloat162float(bias[i % (size_t)N]);
        if (beta != 0.0f) v += beta * __bfloat162float(out[i]);
        out[i] = __float2bfloat16(v);
    }
}

/* xs[M, ldx] = x / input_scale, columns past K zero; perm 1: in qmm_chunk's MT > 1 order, 2: in
 * qmm_wg_kernel's. */
__global__ void qmm_prep_x_kernel(bf16 *xs, const bf16 *x, const float *input_scale, int M, int K,
                                  int ldx, int perm) {
    const size_t total = (size_t)M * (size_t)ldx;
    for (size_t o = blockIdx.x * (size_t)blockDim.x + threadIdx.x; o < total;
         o += (size_t)gridDim.x * blockDim.x) {
        const int m = (int)(o / (size_t)ldx), r = (int)(o % (size_t)ldx);
        int k = r;
        if (perm == 1) { /* r = 128 c + 32 i + 8 t + e  ->  k = 128 c + 32 t + 8 i + src[e] */
            const int c = r >> 7, i = (r >> 5) & 3, tt = (r >> 3) & 3, e = r & 7;
            k = c * 128 + 32 * tt + 8 * i + ((e & 1) ? 4 : 0) + (e >> 1);
        } else if (perm == 2) { /* qmm_wg_kernel: r = 128 c + 16 (2 i + h) + 8 hi + 2 t + e */
            const int c = r >> 7, i = (r >> 5) & 3, h = (r >> 4) & 1, hi = (r >> 3) & 1;
            const int tt = (r >> 1) & 3, e = r & 1;
            k = c * 128 + 32 * tt + 8 * i + 4 * e + 2 * h + hi;
        }
        float v = 0.0f;
        if (k < K) {
            v = __bfloat162float(x[(size_t)m * K + k]);
            if (input_scale) v /= input_scale[k];
        }
        xs[o] = __float2bfloat16(v);
    }
}

/* ---------------------------------------------------------------- host side */
static int qmm_mode(const rs_qweight *q) {
    if (q->spec.format == RS_QFMT_NF4 || q->spec.format == RS_QFMT_FP4) return QMODE_CB;
    if (q->spec.bits <= 4 && !(q->zeros && q->spec.float_zeros)) return QMODE_BF16;
    return QMODE_F32;
}

extern "C" int rs_cuda_qmm_supported(const rs_qweight *q) {
    const int fmt_ok = q->spec.format == RS_QFMT_INT || q->spec.format == RS_QFMT_NF4 ||
                       q->spec.format == RS_QFMT_FP4;
    const int bits_ok =
        q->spec.bits == 2 || q->spec.bits == 3 || q->spec.bits == 4 || q->spec.bits == 8;
    const int group_ok = q->group_size % 32 == 0 || q->n_groups == 1;
    return fmt_ok && bits_ok && group_ok && q->n_critical == 0 && q->n_outlier_cols == 0 &&
           q->rows > 0 && q->cols > 0;
}

static int qmm_sm_count(void) {
    static int n = 0;
    if (!n) {
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
        if (n < 1) n = 1;
    }
    return n;
}

/* Timing probes (rs_cuda_qmm_probe; all zero in real use). */
static struct { int depth, probe, blocks_per_sm, reduce; } g_qprobe;
enum { QPROBE_NO_SX = 4 };

typedef struct {
    int mt, nt, sx, warps, splits, chunks_per_split, n_chunks, ldx, prep, perm;
    int wgs, np, depth; /* qmm_wg_kernel: warpgroups per block (0: not it), X columns, depth */
    dim3 grid;
    size_t partial_bytes, xs_bytes;
} qmm_plan;

/* qmm_wg_kernel takes W4/W3/W2 integer codes with bf16 arithmetic, up to 64 rows, on an sm_90
 * device (the build's sm_90a code); only when a probe asks for it. */
static int qmm_wg_ok(const rs_qweight *q, int M) {
    static int sm90 = -1;
    if (sm90 < 0) {
        int dev = 0, major = 0, minor = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
        sm90 = major == 9 && minor == 0;
    }
    return sm90 && (g_qprobe.probe & (QPROBE_WG2 | QPROBE_WG4)) && M <= QMM_WG_ROWS &&
           qmm_mode(q) == QMODE_BF16 && q->spec.bits == 4;
}

/* The qmm_wg_kernel launch: 64 weight rows per block, split-K across blocks so that about one
 * block of 4 warpgroups (two of 2) runs per SM, each warpgroup at least two chunks, the fp32
 * partials at most half the packed weight's bytes (tune_splits > 0 forces the split). */
static qmm_plan qmm_make_wg_plan(const rs_qweight *q, int M, int tune_splits) {
    qmm_plan pl = {};
    pl.wgs = (g_qprobe.probe & QPROBE_WG4) ? 4 : 2;
    pl.np = M <= 8 ? 8 : M <= 16 ? 16 : M <= 32 ? 32 : 64;
    pl.depth = g_qprobe.depth == 4 ? 4 : 2;
    pl.mt = 1, pl.nt = 2, pl.warps = pl.wgs * 4;
    const int N = q->rows, K = q->cols;
    const int blocks_n = (N + QMM_WG_ROWS - 1) / QMM_WG_ROWS;
    pl.n_chunks = (K + QMM_CHUNK - 1) / QMM_CHUNK;
    int splits = tune_splits;
    if (splits <= 0) {
        const long want = (pl.wgs == 4 ? 1L : 2L) * qmm_sm_count();
        splits = (int)((want + blocks_n - 1) / blocks_n);
        const double wbytes = (double)N * K * q->spec.bits / 8.0;
        const int cap = (int)(wbytes / 2.0 / ((double)M * N * 4.0));
        if (splits > cap) splits = cap;
        if (splits > pl.n_chunks / (2 * pl.wgs)) splits = pl.n_chunks / (2 * pl.wgs);
    }
    if (splits < 1) splits = 1;
    if (splits > pl.n_chunks) splits = pl.n_chunks;
    pl.chunks_per_split = (pl.n_chunks + splits - 1) / splits;
    pl.splits = (pl.n_chunks + pl.chunks_per_split - 1) / pl.chunks_per_split;
    pl.grid = dim3((unsigned)blocks_n, (unsigned)pl.splits, 1);
    pl.partial_bytes = pl.splits > 1 ? (size_t)pl.splits * M * N * sizeof(float) : 0;
    pl.perm = 2, pl.prep = 1;
    pl.ldx = pl.n_chunks * QMM_CHUNK;
    pl.xs_bytes = ((size_t)M * pl.ldx * sizeof(bf16) + 255) / 256 * 256;
    return pl;
}

/* The launch shape for M rows: m-tiles per block by M, NT from tune_nt (0: 2), split-K so that
 * the grid has about eight blocks of 4 warps per SM at M <= 16 (32 warps: the most the registers
 * allow; `qmm_tool probe` on an H100 measured this 20-30% faster than two blocks with a deeper
 * load pipeline) or four 8-warp blocks of the shared-memory kernel past 16 rows
 * (tune_splits > 0 forces the split), while the fp32 partials stay at most half the packed
 * weight's bytes (they go through L2 twice). Past 16 rows X is rewritten in qmm_chunk's order
 * first. */
static qmm_plan qmm_make_plan(const rs_qweight *q, const void *x, int M, int tune_nt,
                              int tune_splits) {
    if (qmm_wg_ok(q, M)) return qmm_make_wg_plan(q, M, tune_splits);
    qmm_plan pl = {};
    pl.mt = M <= 16 ? 1 : M <= 32 ? 2 : 4;
    pl.nt = tune_nt == 1 || tune_nt == 2 || tune_nt == 4 ? tune_nt : 2;
    pl.sx = pl.mt > 1 && !(g_qprobe.probe & QPROBE_NO_SX);
    pl.warps = pl.sx ? QMM_SX_WARPS : QMM_WARPS;
    const int N = q->rows, K = q->cols, rows_per_block = pl.warps * pl.nt * 8;
    const int blocks_n = (N + rows_per_block - 1) / rows_per_block;
    const int blocks_m = (M + 16 * pl.mt - 1) / (16 * pl.mt);
    pl.n_chunks = (K + QMM_CHUNK - 1) / QMM_CHUNK;
    int splits = tune_splits;
    if (splits <= 0) {
        const long per_sm = g_qprobe.blocks_per_sm > 0 ? g_qprobe.blocks_per_sm : pl.sx ? 4 : 8;
        const long want = per_sm * qmm_sm_count();
        splits = (int)((want + (long)blocks_n * blocks_m - 1) / ((long)blocks_n * blocks_m));
        const double wbytes = (double)N * K * q->spec.bits / 8.0;
        const int cap = (int)(wbytes / 2.0 / ((double)M * N * 4.0));
        if (splits > cap) splits = cap;
        if (splits > pl.n_chunks / 2) splits = pl.n_chunks / 2;
    }
    if (splits < 1) splits = 1;
    if (splits > pl.n_chunks) splits = pl.n_chunks;
    pl.chunks_per_split = (pl.n_chunks + splits - 1) / splits;
    pl.splits = (pl.n_chunks + pl.chunks_per_split - 1) / pl.chunks_per_split;
    pl.grid = dim3((unsigned)blocks_n, (unsigned)pl.splits, (unsigned)blocks_m);
    pl.partial_bytes = pl.splits > 1 ? (size_t)pl.splits * M * N * sizeof(float) : 0;
    pl.perm = pl.mt > 1;
    pl.prep = pl.perm || q->input_scale || K % 8 != 0 || ((uintptr_t)x & 15u) != 0;
    pl.ldx = pl.perm ? pl.n_chunks * QMM_CHUNK : pl.prep ? (K + 7) / 8 * 8 : K;
    pl.xs_bytes = pl.prep ? ((size_t)M * pl.ldx * sizeof(bf16) + 255) / 256 * 256 : 0;
    return pl;
}

extern "C" size_t rs_cuda_qmm_workspace_bytes(const rs_qweight *q, const void *x, int M,
                                              int tune_nt, int tune_splits) {
    qmm_plan pl = qmm_make_plan(q, x, M, tune_nt, tune_splits);
    return pl.xs_bytes + pl.partial_bytes;
}

template <int BITS, int MODE, int MT>
static void qmm_launch_nt(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    const dim3 block(pl.warps * 32);
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

/* The probe instantiations: W4 integer codes, NT = 2, the register-X kernel. */
template <int MT, int DEPTH>
static void qmm_launch_probe_depth(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    const dim3 block(QMM_WARPS * 32);
    switch (MT == 1 ? g_qprobe.probe & 3 : 0) {
    case 1: qmm_kernel<4, QMODE_BF16, MT, 2, DEPTH, 1><<<pl.grid, block, 0, s>>>(p); break;
    case 2: qmm_kernel<4, QMODE_BF16, MT, 2, DEPTH, 2><<<pl.grid, block, 0, s>>>(p); break;
    case 3: qmm_kernel<4, QMODE_BF16, MT, 2, DEPTH, 3><<<pl.grid, block, 0, s>>>(p); break;
    default: qmm_kernel<4, QMODE_BF16, MT, 2, DEPTH, 0><<<pl.grid, block, 0, s>>>(p); break;
    }
}

template <int MT>
static void qmm_launch_probe_mt(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    switch (g_qprobe.depth) {
    case 2: qmm_launch_probe_depth<MT, 2>(pl, p, s); break;
    case 4: qmm_launch_probe_depth<MT, 4>(pl, p, s); break;
    default: qmm_launch_probe_depth<MT, 1>(pl, p, s); break;
    }
}

template <int NP, int WGS, int DEPTH>
static void qmm_launch_wg_kernel(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    const size_t smem = (size_t)WGS * 2 * NP * QMM_CHUNK * sizeof(bf16);
    static bool raised = false;
    if (!raised) {
        CUDA_CHECK(cudaFuncSetAttribute(qmm_wg_kernel<4, QMODE_BF16, NP, WGS, DEPTH>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        raised = true;
    }
    qmm_wg_kernel<4, QMODE_BF16, NP, WGS, DEPTH><<<pl.grid, WGS * 128, smem, s>>>(p);
}

template <int WGS, int DEPTH>
static void qmm_launch_wg_np(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    switch (pl.np) {
    case 8: qmm_launch_wg_kernel<8, WGS, DEPTH>(pl, p, s); break;
    case 16: qmm_launch_wg_kernel<16, WGS, DEPTH>(pl, p, s); break;
    case 32: qmm_launch_wg_kernel<32, WGS, DEPTH>(pl, p, s); break;
    default: qmm_launch_wg_kernel<64, WGS, DEPTH>(pl, p, s); break;
    }
}

static void qmm_launch_wg(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    if (pl.wgs == 4)
        pl.depth == 4 ? qmm_launch_wg_np<4, 4>(pl, p, s) : qmm_launch_wg_np<4, 2>(pl, p, s);
    else
        pl.depth == 4 ? qmm_launch_wg_np<2, 4>(pl, p, s) : qmm_launch_wg_np<2, 2>(pl, p, s);
}

static int qmm_launch_probe(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    if (pl.wgs) {
        qmm_launch_wg(pl, p, s);
        return 1;
    }
    if (!g_qprobe.depth && !(g_qprobe.probe & 3)) return 0;
    if (pl.sx || pl.nt != 2) return 0;
    switch (pl.mt) {
    case 1: qmm_launch_probe_mt<1>(pl, p, s); break;
    case 2: qmm_launch_probe_mt<2>(pl, p, s); break;
    default: qmm_launch_probe_mt<4>(pl, p, s); break;
    }
    return 1;
}

/* Timing probes for scripts/bench (qmm_tool probe), never for results: depth = load pipeline
 * depth in chunks of the register-X kernel (1, 2, 4; 0 = qmm_batch), probe = QPROBE_* bits
 * (load only and tiled addresses at M <= 16: wrong values, timing only; NO_SX: the register-X
 * kernel past 16 rows too), blocks_per_sm = split-K
 * target (0 = the plan's), reduce: 0 = a second kernel adds split-K partials, 1 = the last block
 * of each tile does. Depth and probe bits 1, 2 apply to W4 integer weights with NT = 2 only.
 * Bits 8 / 16 (QPROBE_WG2 / QPROBE_WG4): qmm_wg_kernel with 2 / 4 warpgroups per block for W4
 * integer weights up to 64 rows on sm_90 (right values: tested), its weight DEPTH 4 when depth
 * is 4, else 2. */
extern "C" void rs_cuda_qmm_probe(int depth, int probe, int blocks_per_sm, int reduce) {
    g_qprobe.depth = depth, g_qprobe.probe = probe;
    g_qprobe.blocks_per_sm = blocks_per_sm, g_qprobe.reduce = reduce;
}

template <int BITS, int MODE>
static void qmm_launch_mt(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    switch (pl.mt) {
    case 1: qmm_launch_nt<BITS, MODE, 1>(pl, p, s); break;
    case 2: qmm_launch_nt<BITS, MODE, 2>(pl, p, s); break;
    default: qmm_launch_nt<BITS, MODE, 4>(pl, p, s); break;
    }
}

static int g_qmm_last_kernel; /* 1 qmm_kernel, 2 qmm_sx_kernel, 3 qmm_wg_kernel */
extern "C" int rs_cuda_qmm_last_kernel(void) { return g_qmm_last_kernel; }

/* The fused product (rs_cuda_qmm_supported(q) must hold). ws: at least
 * rs_cuda_qmm_workspace_bytes(q, x, M, tune_nt, tune_splits) bytes, 256-byte aligned.
 * counters: n_counters ints that are zero between calls (the kernel re-arms them), or NULL. */
extern "C" void rs_cuda_qmm(cudaStream_t s, bf16 *out, const bf16 *x, const rs_qweight *q,
                            const bf16 *bias, int M, float beta, void *ws, int *counters,
                            int n_counters, int tune_nt, int tune_splits) {
    if (M <= 0) return;
    qmm_plan pl = qmm_make_plan(q, x, M, tune_nt, tune_splits);
    qmm_params p;
    memset(&p, 0, sizeof p);
    p.x = x;
    p.ldx = pl.ldx;
    if (pl.prep) {
        bf16 *xs = (bf16 *)ws;
        const size_t n = (size_t)M * pl.ldx;
        qmm_prep_x_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
            xs, x, q->input_scale, M, q->cols, pl.ldx, pl.perm);
        CUDA_CHECK_LAUNCH(s, "qmm_prep_x_kernel");
        p.x = xs;
    }
    p.packed = (const uint32_t *)q->packed;
    p.row_words = (int)(rs_qpack_row_bytes(q->cols, q->spec.bits) / 4);
    p.scales = q->scales;
    p.zeros = q->zeros;
    p.n_groups = q->n_groups;
    p.gs = q->group_size;
    p.zero_sym = (float)(1 << (q->spec.bits - 1));
    p.M = M, p.N = q->rows, p.K = q->cols;
    p.n_chunks = pl.n_chunks;
    p.chunks_per_split = pl.chunks_per_split;
    p.partial = pl.splits > 1 ? (float *)((char *)ws + pl.xs_bytes) : NULL;
    const long tiles = (long)pl.grid.x * pl.grid.z;
    /* Partial sums are added by qmm_reduce_kernel: measured faster than the last block of each
     * tile doing it (the tail of the grid waits on it); the probe can still ask for that. */
    p.counters = p.partial && counters && tiles <= n_counters && g_qprobe.reduce && !pl.wgs
                     ? counters
                     : NULL;
    p.out = out;
    p.bias = bias;
    p.beta = beta;
    const float *book = q->spec.format == RS_QFMT_FP4 ? rs_fp4_codebook : rs_nf4_codebook;
    for (int i = 0; i < 16; i++)
        p.cb[i] = book[i];

    const int mode = qmm_mode(q);
    if (mode == QMODE_BF16 && q->spec.bits == 4 && qmm_launch_probe(pl, p, s))
        ;
    else if (mode == QMODE_CB)
        qmm_launch_mt<4, QMODE_CB>(pl, p, s);
    else if (mode == QMODE_BF16 && q->spec.bits == 2)
        qmm_launch_mt<2, QMODE_BF16>(pl, p, s);
    else if (mode == QMODE_BF16 && q->spec.bits == 3)
        qmm_launch_mt<3, QMODE_BF16>(pl, p, s);
    else if (mode == QMODE_BF16)
        qmm_launch_mt<4, QMODE_BF16>(pl, p, s);
    else if (q->spec.bits == 2)
        qmm_launch_mt<2, QMODE_F32>(pl, p, s);
    else if (q->spec.bits == 3)
        qmm_launch_mt<3, QMODE_F32>(pl, p, s);
    else if (q->spec.bits == 4)
        qmm_launch_mt<4, QMODE_F32>(pl, p, s);
    else
        qmm_launch_mt<8, QMODE_F32>(pl, p, s);
    CUDA_CHECK_LAUNCH(s, pl.wgs ? "qmm_wg_kernel" : "qmm_kernel");
    g_qmm_last_kernel = pl.wgs ? 3 : pl.sx ? 2 : 1;
    if (p.partial && !p.counters) {
        const size_t n = (size_t)M * q->rows;
        qmm_reduce_kernel<<<rs_cuda_blocks(n, RS_CUDA_THREADS), RS_CUDA_THREADS, 0, s>>>(
            out, p.partial, bias, M, q->rows, pl.splits, beta);
        CUDA_CHECK_LAUNCH(s, "qmm_reduce_kernel");
    }
}

/* Eight dequantized values of row n from column kk: divided by input_scale (AWQ) when given,
 * rounded to bf16 once, one 16-byte store (K % 8 == 0) or element by element up to K. */
__device__ __forceinline__ void qdq_store8(bf16 *dst, float (&f)[8], const float *input_scale,
                                           int kk, int K) {
    if (input_scale)
#pragma unroll
        for (int e = 0; e < 8; e++)
            if (kk + e < K) f[e] /= input_scale[kk + e];
    if (K % 8 == 0) {
        uint4 o;
        o.x = bf16x2_bits(__floats2bfloat162_rn(f[0], f[1]));
        o.y = bf16x2_bits(__floats2bfloat162_rn(f[2], f[3]));
        o.z = bf16x2_bits(__floats2bfloat162_rn(f[4], f[5]));
        o.w = bf16x2_bits(__floats2bfloat162_rn(f[6], f[7]));
        *(uint4 *)dst = o;
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++)
            if (kk + e < K) dst[e] = __float2bfloat16(f[e]);
    }
}

/* ---------------------------------------------------------------- the dequantizer
 * One thread per 8 codes (one 16-byte store; neighbouring threads store neighbouring bytes):
 * w[n, k] = bf16(value / input_scale[k]) with the value of rs_dequantize_row (fp32 arithmetic,
 * one rounding). The span's words are loaded whole by each of its four threads (L1 serves the
 * repeats). */
template <int BITS, int CB>
__global__ void qdequant_fast_kernel(bf16 *w, const uint32_t *packed, int row_words,
                                     const float *scales, const float *zeros,
                                     const float *input_scale, int N, int K, int n_groups, int gs,
                                     float zero_sym, qmm_params cbp) {
    const int pieces = (K + 7) / 8;
    const size_t total = (size_t)N * pieces;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const int n = (int)(idx / (size_t)pieces), pc = (int)(idx % (size_t)pieces);
        const int sp = pc >> 2, v8 = pc & 3, kk = 8 * pc;
        uint32_t raw[BITS];
        load_span<BITS>(raw, packed + (size_t)n * row_words + (size_t)sp * BITS);
        const int grp = min(sp * 32 / gs, n_groups - 1);
        const float sc = scales[(size_t)n * n_groups + grp];
        const float z = zeros ? zeros[(size_t)n * n_groups + grp] : zero_sym;
        float f[8];
#pragma unroll
        for (int v = 0; v < 4; v++) {
            if (v != v8) continue;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const uint32_t c = code_of<BITS>(raw, 8 * v + e);
                f[e] = CB ? cbp.cb[c] * sc : ((float)c - z) * sc;
            }
        }
        qdq_store8(w + (size_t)n * K + kk, f, input_scale, kk, K);
    }
}

/* The same values as qdequant_fast_kernel with less work per thread, for RESAFE_CUDA_QDEQUANT=2
 * (an experiment until timed against it): a 2-D grid (pieces of 8 codes along x, rows along y:
 * no 64-bit division), and each thread loads only the one or two words that hold its 8 codes
 * (code j of a span sits at bit BITS j) and decodes them with shifts, where the default loads
 * the whole span and branches on which quarter is its own (a four-way split inside each warp). */
template <int BITS, int CB>
__global__ void qdequant_v2_kernel(bf16 *w, const uint32_t *packed, int row_words,
                                   const float *scales, const float *zeros,
                                   const float *input_scale, int N, int K, int n_groups, int gs,
                                   float zero_sym, qmm_params cbp) {
    const int pc = blockIdx.x * blockDim.x + threadIdx.x;
    if (pc >= (K + 7) / 8) return;
    const int sp = pc >> 2, kk = 8 * pc, bit = (pc & 3) * 8 * BITS, lo = bit >> 5;
    const bool two = BITS == 8 || (BITS == 3 && lo + 1 < BITS); /* 8 codes over two words */
    const int grp = min(sp * 32 / gs, n_groups - 1);
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const uint32_t *src = packed + (size_t)n * row_words + (size_t)sp * BITS + lo;
        const uint64_t codes =
            ((two ? (uint64_t)__ldg(src + 1) << 32 : 0ull) | __ldg(src)) >> (bit & 31);
        const float sc = __ldg(scales + (size_t)n * n_groups + grp);
        const float z = zeros ? __ldg(zeros + (size_t)n * n_groups + grp) : zero_sym;
        float f[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const uint32_t c = (uint32_t)(codes >> (e * BITS)) & ((1u << BITS) - 1u);
            f[e] = CB ? cbp.cb[c] * sc : ((float)c - z) * sc;
        }
        qdq_store8(w + (size_t)n * K + kk, f, input_scale, kk, K);
    }
}

static int g_qdq_last; /* the dequantizer the last call took: 1 fast, 2 v2, 0 none (generic) */
static int g_qdq_force = -1; /* rs_cuda_qdequant_select: 1 or 2, or -1 for the environment's */
extern "C" int rs_cuda_qdequant_last_kernel(void) { return g_qdq_last; }
extern "C" void rs_cuda_qdequant_select(int which) { g_qdq_force = which; }

/* The weight's dense bf16 matrix without critical entries (the caller adds them), for the
 * formats rs_cuda_qmm_supported takes apart from the critical entries; 0 when done, -1 when the
 * format needs the generic dequantizer (outlier columns). */
extern "C" int rs_cuda_qdequant_fast(cudaStream_t s, bf16 *w, const rs_qweight *q) {
    g_qdq_last = 0;
    if (q->n_outlier_cols > 0 || q->rows <= 0 || q->cols <= 0) return -1;
    if (q->spec.format == RS_QFMT_INT8_OUTLIER) return -1;
    if (!(q->group_size % 32 == 0 || q->n_groups == 1)) return -1;
    qmm_params cbp;
    memset(&cbp, 0, sizeof cbp);
    const float *book = q->spec.format == RS_QFMT_FP4 ? rs_fp4_codebook : rs_nf4_codebook;
    for (int i = 0; i < 16; i++)
        cbp.cb[i] = book[i];
    static int env_v2 = -1; /* RESAFE_CUDA_QDEQUANT=2: qdequant_v2_kernel */
    if (env_v2 < 0) {
        const char *e = getenv("RESAFE_CUDA_QDEQUANT");
        env_v2 = e && strcmp(e, "2") == 0;
        if (e && *e && !env_v2 && strcmp(e, "1") != 0)
            rs_warn("RESAFE_CUDA_QDEQUANT=%s: want 1 or 2; using 1", e);
    }
    const int v2 = g_qdq_force > 0 ? g_qdq_force == 2 : env_v2;
    typedef void (*qdq_fn)(bf16 *, const uint32_t *, int, const float *, const float *,
                           const float *, int, int, int, int, float, qmm_params);
    /* [v2][0: codebook 4-bit, 1..4: integer 2, 3, 4, 8 bits] */
    static const qdq_fn fns[2][5] = {
        {qdequant_fast_kernel<4, 1>, qdequant_fast_kernel<2, 0>, qdequant_fast_kernel<3, 0>,
         qdequant_fast_kernel<4, 0>, qdequant_fast_kernel<8, 0>},
        {qdequant_v2_kernel<4, 1>, qdequant_v2_kernel<2, 0>, qdequant_v2_kernel<3, 0>,
         qdequant_v2_kernel<4, 0>, qdequant_v2_kernel<8, 0>}};
    const int b = q->spec.bits;
    const int which = q->spec.format != RS_QFMT_INT ? 0
                      : b == 2                        ? 1
                      : b == 3                        ? 2
                      : b == 4                        ? 3
                      : b == 8                        ? 4
                                                      : -1;
    if (which < 0) return -1;
    /* v2: pieces of 8 codes along x, rows along y; the default: one grid-stride range */
    const dim3 grid = v2 ? dim3((unsigned)(((q->cols + 7) / 8 + RS_CUDA_THREADS - 1) /
                                           RS_CUDA_THREADS),
                                (unsigned)(q->rows < 65535 ? q->rows : 65535))
                         : dim3(rs_cuda_blocks((size_t)q->rows * ((q->cols + 7) / 8),
                                               RS_CUDA_THREADS));
    fns[v2][which]<<<grid, RS_CUDA_THREADS, 0, s>>>(
        w, (const uint32_t *)q->packed, (int)(rs_qpack_row_bytes(q->cols, b) / 4), q->scales,
        q->zeros, q->input_scale, q->rows, q->cols, q->n_groups, q->group_size,
        (float)(1 << (b - 1)), cbp);
    CUDA_CHECK_LAUNCH(s, v2 ? "qdequant_v2_kernel" : "qdequant_fast_kernel");
    g_qdq_last = 1 + v2;
    return 0;
}
