/* qgemm_w8: the fused kernels for 8-bit integer codes (fp32 arithmetic). */
#include "qgemm.cuh"

void qmm_launch_w8(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    qmm_launch_mt<8, QMODE_F32>(pl, p, s);
}
