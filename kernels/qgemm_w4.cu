/* qgemm_w4: the fused kernels for W4 integer codes (bf16 arithmetic), and the timing-probe
 * variants of the register-X kernel (rs_cuda_qmm_probe). */
#include "qgemm.cuh"

void qmm_launch_w4(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    qmm_launch_mt<4, QMODE_BF16>(pl, p, s);
}

template <int MT, int DEPTH>
static void qmm_launch_probe_depth(const qmm_plan &pl, const qmm_params &p, cudaStream_t s,
                                   int probe) {
    const dim3 block(QMM_WARPS * 32);
    switch (MT == 1 ? probe & 3 : 0) {
    case 1: qmm_kernel<4, QMODE_BF16, MT, 2, DEPTH, 1><<<pl.grid, block, 0, s>>>(p); break;
    case 2: qmm_kernel<4, QMODE_BF16, MT, 2, DEPTH, 2><<<pl.grid, block, 0, s>>>(p); break;
    case 3: qmm_kernel<4, QMODE_BF16, MT, 2, DEPTH, 3><<<pl.grid, block, 0, s>>>(p); break;
    default: qmm_kernel<4, QMODE_BF16, MT, 2, DEPTH, 0><<<pl.grid, block, 0, s>>>(p); break;
    }
}

template <int MT>
static void qmm_launch_probe_mt(const qmm_plan &pl, const qmm_params &p, cudaStream_t s, int depth,
                                int probe) {
    switch (depth) {
    case 2: qmm_launch_probe_depth<MT, 2>(pl, p, s, probe); break;
    case 4: qmm_launch_probe_depth<MT, 4>(pl, p, s, probe); break;
    default: qmm_launch_probe_depth<MT, 1>(pl, p, s, probe); break;
    }
}

int qmm_launch_w4_probe(const qmm_plan &pl, const qmm_params &p, cudaStream_t s, int depth,
                        int probe) {
    if (pl.xs || (!depth && !(probe & 3))) return 0;
    if (pl.sx || pl.nt != 2) return 0;
    switch (pl.mt) {
    case 1: qmm_launch_probe_mt<1>(pl, p, s, depth, probe); break;
    case 2: qmm_launch_probe_mt<2>(pl, p, s, depth, probe); break;
    default: qmm_launch_probe_mt<4>(pl, p, s, depth, probe); break;
    }
    return 1;
}
