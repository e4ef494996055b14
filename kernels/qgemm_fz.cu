/* qgemm_fz: the fused kernels for 2/3/4-bit codes with float zero points (fp32 arithmetic). */
#include "qgemm.cuh"

void qmm_launch_fz(int bits, const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    if (bits == 2)
        qmm_launch_mt<2, QMODE_F32>(pl, p, s);
    else if (bits == 3)
        qmm_launch_mt<3, QMODE_F32>(pl, p, s);
    else
        qmm_launch_mt<4, QMODE_F32>(pl, p, s);
}
