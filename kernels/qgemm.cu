/* qgemm: the fused dequant-matmul's plans and launches (kernels: qgemm.cuh, instantiated by
 * weight kind in qgemm_*.cu), its split-K reduction and X preparation, and the fast dequantizer
 * of the large-M path (dequantize once, then cuBLAS). */
#include "qgemm.cuh"

#include <stdlib.h>
#include <string.h>

/* out = sum over splits of partial (in split order) + bias + beta * out (when the tile counters
 * do not cover the grid). */
__global__ void qmm_reduce_kernel(bf16 *out, const float *partial, const bf16 *bias, int M, int N,
                                  int splits, float beta) {
    const size_t total = (size_t)M * (size_t)N;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < splits; s++) v += partial[(size_t)s * total + i];
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
    /* up to QMM_XS_ROWS rows: X staged in shared memory (qmm_xs_kernel, the next chunk's weight
     * loaded before the current one is computed), unless a probe asks for the register-X kernel
     * (QPROBE_REGX, or one of its depth / load-only / tiled probes); QPROBE_XS takes it up to 16
     * rows (depth 2: that order, else compute first). At most 32 KB of X per block. */
    const int regx = (g_qprobe.probe & (QPROBE_REGX | 3)) || g_qprobe.depth;
    if (pl.mt == 1 && ((g_qprobe.probe & QPROBE_XS) || (M <= QMM_XS_ROWS && !regx))) {
        const int rows = M < 16 ? M : 16;
        pl.xs = 1, pl.xs_pipe = (g_qprobe.probe & QPROBE_XS) ? g_qprobe.depth == 2 : 1;
        pl.xs_seg = (32768 / (2 * rows) - 32) / QMM_CHUNK;
        if (pl.xs_seg > pl.chunks_per_split) pl.xs_seg = pl.chunks_per_split;
        if (pl.xs_seg < 1) pl.xs_seg = 1;
        pl.xs_stride = pl.xs_seg * QMM_CHUNK + 32; /* 64 bytes of pad: rows on other banks */
        pl.xs_smem = (size_t)rows * pl.xs_stride * sizeof(bf16);
    }
    return pl;
}

extern "C" size_t rs_cuda_qmm_workspace_bytes(const rs_qweight *q, const void *x, int M,
                                              int tune_nt, int tune_splits) {
    qmm_plan pl = qmm_make_plan(q, x, M, tune_nt, tune_splits);
    return pl.xs_bytes + pl.partial_bytes;
}

static int qmm_launch_probe(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    if (pl.wgs) {
        qmm_launch_wg(pl, p, s);
        return 1;
    }
    return qmm_launch_w4_probe(pl, p, s, g_qprobe.depth, g_qprobe.probe);
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

static int g_qmm_last_kernel; /* 1 qmm_kernel, 2 qmm_sx_kernel, 3 qmm_wg_kernel, 4 qmm_xs_kernel */
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
    p.gs_shift = -1;
    for (int b = 0; b < 31; b++)
        if (q->group_size == (1 << b)) p.gs_shift = b;
    p.xs_seg = pl.xs_seg, p.xs_stride = pl.xs_stride;
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
    for (int i = 0; i < 16; i++) p.cb[i] = book[i];

    const int mode = qmm_mode(q);
    if (mode == QMODE_BF16 && q->spec.bits == 4 && qmm_launch_probe(pl, p, s))
        ;
    else if (mode == QMODE_CB)
        qmm_launch_cb(pl, p, s);
    else if (mode == QMODE_BF16 && q->spec.bits == 2)
        qmm_launch_w2(pl, p, s);
    else if (mode == QMODE_BF16 && q->spec.bits == 3)
        qmm_launch_w3(pl, p, s);
    else if (mode == QMODE_BF16)
        qmm_launch_w4(pl, p, s);
    else if (q->spec.bits == 8)
        qmm_launch_w8(pl, p, s);
    else
        qmm_launch_fz(q->spec.bits, pl, p, s);
    CUDA_CHECK_LAUNCH(s, pl.wgs ? "qmm_wg_kernel" : "qmm_kernel");
    g_qmm_last_kernel = pl.wgs ? 3 : pl.sx ? 2 : pl.xs ? 4 : 1;
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

/* The same values as qdequant_fast_kernel with less work per thread, the default (measured 1.4-1.5x
 * faster on an H100, 2026-12-07: 18.8 against 27.2 us at 4096 x 4096 W4, 46.6 against 68.2 at
 * 11008 x 4096; RESAFE_CUDA_QDEQUANT=1 takes the former one, kept as an independent
 * cross-check that the tests compare bytes with): a 2-D grid (pieces of 8 codes along x, rows
 * along y: no 64-bit division), and each thread loads only the one or two words that hold its 8
 * codes (code j of a span sits at bit BITS j) and decodes them with shifts, where the former
 * loads the whole span and branches on which quarter is its own (a four-way split inside each
 * warp). */
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
    for (int i = 0; i < 16; i++) cbp.cb[i] = book[i];
    static int env_v1 = -1; /* RESAFE_CUDA_QDEQUANT=1: qdequant_fast_kernel */
    if (env_v1 < 0) {
        const char *e = getenv("RESAFE_CUDA_QDEQUANT");
        env_v1 = e && strcmp(e, "1") == 0;
        if (e && *e && !env_v1 && strcmp(e, "2") != 0)
            rs_warn("RESAFE_CUDA_QDEQUANT=%s: want 1 or 2; using 2", e);
    }
    const int v2 = g_qdq_force > 0 ? g_qdq_force == 2 : !env_v1;
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
                      : b == 2                      ? 1
                      : b == 3                      ? 2
                      : b == 4                      ? 3
                      : b == 8                      ? 4
                                                    : -1;
    if (which < 0) return -1;
    /* v2: pieces of 8 codes along x, rows along y; v1: one grid-stride range */
    const dim3 grid =
        v2 ? dim3((unsigned)(((q->cols + 7) / 8 + RS_CUDA_THREADS - 1) / RS_CUDA_THREADS),
                  (unsigned)(q->rows < 65535 ? q->rows : 65535))
           : dim3(rs_cuda_blocks((size_t)q->rows * ((q->cols + 7) / 8), RS_CUDA_THREADS));
    fns[v2][which]<<<grid, RS_CUDA_THREADS, 0, s>>>(
        w, (const uint32_t *)q->packed, (int)(rs_qpack_row_bytes(q->cols, b) / 4), q->scales,
        q->zeros, q->input_scale, q->rows, q->cols, q->n_groups, q->group_size,
        (float)(1 << (b - 1)), cbp);
    CUDA_CHECK_LAUNCH(s, v2 ? "qdequant_v2_kernel" : "qdequant_fast_kernel");
    g_qdq_last = 1 + v2;
    return 0;
}
