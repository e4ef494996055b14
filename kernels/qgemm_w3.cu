/* qgemm_w3: the fused kernels for W3 integer codes (bf16 arithmetic). */
#include "qgemm.cuh"

void qmm_launch_w3(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    qmm_launch_mt<3, QMODE_BF16>(pl, p, s);
}
