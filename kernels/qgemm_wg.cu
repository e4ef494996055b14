/* qgemm_wg: the wgmma experiment (sm_90a).
 * qmm_wg_kernel, chosen only by the probe bits QPROBE_WG2 / QPROBE_WG4 (W4 integer codes with
 * bf16 arithmetic, M <= 64) until it is timed against the kernels of qgemm.cuh. "Swap AB": the weight
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
#include "qgemm.cuh"

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
__device__ __forceinline__ void wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
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
                       "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
                       "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                       "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
                       "+f"(d[30]), "+f"(d[31])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
    }
};
#endif

/* Chunk c of X's first M rows (perm-2 layout) into a warpgroup's buffer, without a commit. */
template <int NP>
__device__ __forceinline__ void qmm_wg_copy(bf16 *xs, const qmm_params &p, int c, int tid) {
    for (int idx = tid; idx < p.M * 16; idx += 128) {
        const int m = idx >> 4, slab = idx & 15;
        cp_async16(xs + (slab * NP + m) * 8,
                   p.x + (size_t)m * p.ldx + (size_t)c * QMM_CHUNK + slab * 8);
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
    for (int e = 0; e < NP / 2; e++) acc[e] = 0.0f;
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
                for (int j = 0; j < 2; j++) u[j] = vword<BITS>(cur[j].w, i);
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
            for (int e = 0; e < NP / 2; e++) asm volatile("" : "+f"(acc[e])::"memory");
            wg_fence();
#pragma unroll
            for (int s = 0; s < 8; s++)
                wg_mma<NP>::run(acc, a[s], wg_desc(cur_x + 2 * s * NP * 8, NP * 16, 128));
            wg_commit();
            wg_wait0();
#pragma unroll
            for (int e = 0; e < NP / 2; e++) asm volatile("" : "+f"(acc[e])::"memory");
            wg_bar(1 + wg); /* the buffer is free for the copy two chunks on */
        }
    }

    /* warpgroups 1..WGS-1 hand their sums to warpgroup 0 through their own buffers */
    float *red = (float *)xs;
    if (WGS > 1) {
        __syncthreads();
        if (wg > 0)
#pragma unroll
            for (int e = 0; e < NP / 2; e++) red[e * 128 + tid] = acc[e];
        __syncthreads();
        if (wg > 0) return;
        for (int w = 1; w < WGS; w++) {
            const float *o = (const float *)((const bf16 *)qmm_wg_smem + (size_t)w * 2 * BUF);
#pragma unroll
            for (int e = 0; e < NP / 2; e++) acc[e] += o[e * 128 + tid];
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

void qmm_launch_wg(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    if (pl.wgs == 4)
        pl.depth == 4 ? qmm_launch_wg_np<4, 4>(pl, p, s) : qmm_launch_wg_np<4, 2>(pl, p, s);
    else
        pl.depth == 4 ? qmm_launch_wg_np<2, 4>(pl, p, s) : qmm_launch_wg_np<2, 2>(pl, p, s);
}
