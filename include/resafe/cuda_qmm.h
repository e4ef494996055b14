/* cuda_qmm: how the CUDA backend multiplies by quantized weights, and hooks for the tests and
 * benchmarks that compare its paths (RS_HAVE_CUDA builds; kernels/qgemm.cu, kernels/quant.cu).
 *
 * qmatmul takes the fused dequant-matmul (weights stay packed) when x has at most
 * RS_QMM_FUSED_MAX_M rows and the format allows it (integer 2/3/4/8 bits, NF4, FP4; not
 * LLM.int8 outliers or critical entries), else it dequantizes into a bf16 scratch and calls
 * cuBLAS. RESAFE_CUDA_QMATMUL=fused|scratch|auto in the environment forces a path (fused still
 * falls back for the formats it does not take); RESAFE_CUDA_QMM_MAX_M=N moves the crossover. */
#ifndef RESAFE_CUDA_QMM_H
#define RESAFE_CUDA_QMM_H

#include "resafe/quant.h"

/* Measured on an H100 (scripts/bench/qmatmul, README performance section). */
#define RS_QMM_FUSED_MAX_M 64

typedef enum { RS_QMM_AUTO = 0, RS_QMM_SCRATCH = 1, RS_QMM_FUSED = 2 } rs_qmm_path;

/* Force a path and the fused kernel's tile width (nt: 1, 2, 4 n-tiles of 8 rows per warp) and
 * split-K count (0 = heuristics). The environment variables are read once, at backend start;
 * this call overrides them. */
void rs_cuda_qmm_configure(rs_qmm_path path, int nt, int splits);
/* Timing probes for the benchmark only (kernels/qgemm.cu says what each does); all 0 = off. */
void rs_cuda_qmm_probe(int depth, int probe, int blocks_per_sm, int reduce_kernel);
/* Which fused kernel the last fused call launched (for tests): 1 qmm_kernel, 2 qmm_sx_kernel,
 * 3 qmm_wg_kernel (the wgmma experiment, probe bits 8 / 16 only); 0 before any. */
int rs_cuda_qmm_last_kernel(void);
/* Which dequantizer the scratch path's last call took (for tests): 2 qdequant_v2_kernel (the
 * default), 1 qdequant_fast_kernel (RESAFE_CUDA_QDEQUANT=1), 0 the generic one (LLM.int8). */
int rs_cuda_qdequant_last_kernel(void);
/* Tests: take dequantizer 1 or 2 from now on (-1: RESAFE_CUDA_QDEQUANT's choice again). */
void rs_cuda_qdequant_select(int which);
/* 1 when the fused kernel takes this (backend-resident) weight. */
int rs_cuda_qmm_fused_supported(const rs_qweight *q);

#endif
