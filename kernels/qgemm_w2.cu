/* qgemm_w2: the fused kernels for W2 integer codes (bf16 arithmetic). */
#include "qgemm.cuh"

void qmm_launch_w2(const qmm_plan &pl, const qmm_params &p, cudaStream_t s) {
    qmm_launch_mt<2, QMODE_BF16>(pl, p, s);
}
