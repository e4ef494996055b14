/* qgemm_cb: the fused kernels for NF4 / FP4 codes (a codebook, fp32 arithmetic). */
#include "qgemm.cuh"

void qmm_launch_cb(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    qmm_launch_mt<4, QMODE_CB>(pl, p, s);
}
