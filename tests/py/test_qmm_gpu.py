"""The CUDA quantized matmuls (kernels/qgemm.cu fused dequant-matmul, kernels/quant.cu
dequantize-then-cuBLAS, and the input gradient) against a float64 product with rs_dequantize's
effective weight (the CPU dequantizer, itself checked against bitsandbytes' codebooks and the
quantization tests), at every format, odd M/N/K and the Llama-2-7B / Llama-3-8B linear shapes.
build/tools/qmm_tool does the work (random W, x, dout, bias from the seed; the output is
poisoned with NaN before a beta = 0 call) and prints max |y - ref| / max |ref| per path.

Tolerance 1.2e-2: the output is rounded to bf16 (up to 2^-9 = 2e-3 of the largest entry), each
weight is rounded to bf16 (the fused kernel's bf16 arithmetic rounds the scale and the product:
up to 2 x 2^-9 relative per weight, random in sign, so a dot product moves by ~2^-8 of its rms);
measured errors are 2e-3..5e-3. A wrong code, scale, zero or group index gives errors of order 1.
Runs only with RESAFE_TEST_GPU=1 (make test-gpu)."""
import os
import subprocess

import pytest

from conftest import BUILD, gpu_enabled

pytestmark = pytest.mark.skipif(not gpu_enabled(), reason="GPU tests run with RESAFE_TEST_GPU=1")
TOOL = os.path.join(BUILD, "tools", "qmm_tool")
TOL = 1.2e-2

# name: (format, bits, group, symmetric, extra options, fused expected)
FORMATS = {
    "int4_g128_asym": ("int", 4, 128, 0, [], 1),
    "int4_g128_sym": ("int", 4, 128, 1, [], 1),
    "int4_g32_asym": ("int", 4, 32, 0, [], 1),
    "int4_g64_floatzero": ("int", 4, 64, 0, ["floatzero"], 1),
    "int4_g128_awq": ("int", 4, 128, 0, ["awq"], 1),
    "int3_g64_sym": ("int", 3, 64, 1, [], 1),
    "int3_g128_asym": ("int", 3, 128, 0, [], 1),
    "int2_row_asym": ("int", 2, 0, 0, [], 1),
    "int2_g64_asym": ("int", 2, 64, 0, [], 1),
    "int8_g128_asym": ("int", 8, 128, 0, [], 1),
    "int8_row_sym": ("int", 8, 0, 1, [], 1),
    "nf4": ("nf4", 4, 64, 0, [], 1),
    "fp4": ("fp4", 4, 64, 0, [], 1),
    "int4_g128_critical": ("int", 4, 128, 0, ["crit"], 0),
    "int8_outlier": ("int8o", 8, 0, 0, [], 0),
}

# (M, N, K): odd sizes (K not a multiple of 8 or 32, N not a multiple of 8), M across the m-tile
# counts (1, 2, 4 tiles of 16) and past the fused kernel's one block of 64 rows
SHAPES = [(1, 72, 256), (5, 37, 77), (16, 96, 200), (17, 130, 384), (33, 64, 160), (64, 40, 136),
          (100, 24, 520)]
LLAMA = [(1, 4096, 4096), (16, 11008, 4096), (7, 4096, 11008), (32, 14336, 4096),
         (64, 4096, 4096)]


def run_check(fmt, seed, M, N, K, probe="", dequant=""):
    f, bits, group, sym, extra, fused = FORMATS[fmt]
    env = dict(os.environ, RESAFE_QMM_PROBE=probe, RESAFE_CUDA_QDEQUANT=dequant)
    p = subprocess.run([TOOL, "check", f, str(bits), str(group), str(sym), str(seed), str(M),
                        str(N), str(K), *extra], capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    vals = {words[i]: float(words[i + 1]) for i in range(0, len(words), 2)}
    print(fmt, M, N, K, probe, vals)
    assert vals["supported"] == fused
    return vals


def check(fmt, seed, M, N, K, probe=""):
    vals = run_check(fmt, seed, M, N, K, probe)
    for key in ("fused0", "scratch0", "fused1", "scratch1", "dgrad"):
        assert vals[key] <= TOL, (key, vals)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_qmatmul_paths_match_float64_reference_odd_shapes(fmt, rng_seed):
    for i, (M, N, K) in enumerate(SHAPES):
        check(fmt, rng_seed + i, M, N, K)


@pytest.mark.parametrize("fmt", ["int4_g128_asym", "int3_g128_asym", "nf4", "int8_g128_asym"])
def test_qmatmul_paths_match_float64_reference_llama_shapes(fmt, rng_seed):
    for i, (M, N, K) in enumerate(LLAMA):
        check(fmt, rng_seed + 100 + i, M, N, K)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dequantizers_1_and_2_are_bit_identical(fmt, rng_seed):
    """The scratch path's dequantizer (kernels/qgemm.cu qdequant_v2_kernel, the default) writes
    the same bytes as the former one (qdequant_fast_kernel, RESAFE_CUDA_QDEQUANT=1: a different
    work split, kept as a cross-check; the tool hashes both in one process), and the scratch path
    and the input gradient through either match the float64 reference; every format, odd shapes
    (K not a multiple of 8 or 32: the element-wise tail), a Llama shape and 70,000 rows (past the
    65,535 rows of one grid column). The tool says which dequantizer ran: 2 by default, 1 with
    the variable (LLM.int8 outliers take the generic one, 0)."""
    for i, (M, N, K) in enumerate(SHAPES[1:4] + [(100, 11008, 4096), (1, 70000, 40)]):
        b = run_check(fmt, rng_seed + 400 + i, M, N, K)
        assert (b["dequant"], b["dqkernel1"]) == ((0, 0) if fmt == "int8_outlier" else (2, 1)), b
        assert b["dqhash"] == b["dqhash1"], b
        for key in ("scratch0", "scratch1", "dgrad"):
            assert b[key] <= TOL, (key, b)
    b = run_check(fmt, rng_seed, 5, 37, 77, dequant="1")
    assert b["dequant"] == (0 if fmt == "int8_outlier" else 1), b
    for key in ("scratch0", "scratch1", "dgrad"):
        assert b[key] <= TOL, (key, b)


def test_the_probe_variable_reaches_the_kernel(rng_seed):
    """RESAFE_QMM_PROBE is applied: the load-only probe ("1,1,0,0") skips the products, so the
    fused error becomes of order 1; without it the same call is right."""
    vals = run_check("int4_g128_asym", rng_seed, 5, 72, 256, probe="1,1,0,0")
    assert not vals["fused0"] <= 0.5 and vals["scratch0"] <= TOL, vals  # NaN counts as wrong
    assert run_check("int4_g128_asym", rng_seed, 5, 72, 256)["fused0"] <= TOL


@pytest.mark.parametrize("probe", ["0,8,0,0", "4,16,0,0"])
def test_wgmma_kernel_matches_float64_reference(probe, rng_seed):
    """The wgmma experiment (kernels/qgemm_wg.cu qmm_wg_kernel, probe bits 8 / 16: 2 / 4 warpgroups
    per block; depth 4: the weight four chunks ahead; one of each): W4 integer weights
    (asymmetric, symmetric, group 32), every M up to 64 it takes (X padded to 8, 16, 32, 64
    columns), odd N and K, the Llama shapes (split-K across blocks too), beta = 0 on a
    NaN-poisoned output and beta = 1 with a bias. The tool reports which kernel ran: the wgmma
    one up to 64 rows on an H100 / H200 (sm_90), the others past 64."""
    shapes = [(1, 72, 256), (5, 37, 77), (8, 130, 384), (16, 96, 200), (17, 130, 384),
              (33, 64, 160), (64, 40, 136), (100, 24, 520)]
    for i, fmt in enumerate(["int4_g128_asym", "int4_g128_sym", "int4_g32_asym"]):
        for j, (M, N, K) in enumerate(shapes + (LLAMA if i == 0 else [])):
            vals = run_check(fmt, rng_seed + 500 + 20 * i + j, M, N, K, probe=probe)
            assert vals["fkernel"] == (3 if M <= 64 else 2), vals
            for key in ("fused0", "fused1"):
                assert vals[key] <= TOL, (key, fmt, M, N, K, vals)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_shared_memory_x_kernel_is_bit_identical_to_the_register_kernel(fmt, rng_seed):
    """qmm_xs_kernel (X staged in shared memory: the default up to 4 rows; probe bit 32 takes it up
    to 16, depth 2 its PIPE 1, the next chunk loaded before the current one is computed, as by
    default, depth 0 PIPE 0) feeds the same fragments to the same MMAs in the same order as
    qmm_kernel (probe bit 64 forces that one), so with the same split-K plan its outputs are the
    same bytes (beta = 0 on a NaN-poisoned output, beta = 1 with a bias), and both match the
    float64 reference. Blocks per SM 1 (the third field) forces long split ranges, so the copy of
    X runs in several shared-memory segments (at 16 rows a segment holds 7 chunks); every
    format, odd M/N/K, the Llama shapes. Without a probe the tool reports kernel 4 up to 4 rows
    and 1 (qmm_kernel) from 5 to 16."""
    shapes = [(1, 72, 256), (5, 37, 77), (16, 96, 200), (9, 130, 1000)]
    if fmt in ("int4_g128_asym", "int3_g128_asym", "nf4", "int8_g128_asym"):
        shapes += [(1, 4096, 4096), (16, 11008, 4096), (7, 4096, 11008)]
    for i, (M, N, K) in enumerate(shapes):
        for bps in ("0", "1") if N * K < 10**6 or fmt == "int4_g128_asym" else ("0",):
            base = run_check(fmt, rng_seed + 600 + i, M, N, K, probe=f"0,64,{bps},0")
            dflt = run_check(fmt, rng_seed + 600 + i, M, N, K, probe=f"0,0,{bps},0")
            for depth in ("0", "2"):
                v = run_check(fmt, rng_seed + 600 + i, M, N, K, probe=f"{depth},32,{bps},0")
                if FORMATS[fmt][5]:
                    assert v["fkernel"] == 4 and base["fkernel"] == 1, (v, base)
                    assert dflt["fkernel"] == (4 if M <= 4 else 1), dflt
                    assert dflt["fhash0"] == base["fhash0"], (fmt, M, N, K, dflt, base)
                    assert (v["fhash0"], v["fhash1"]) == (base["fhash0"], base["fhash1"]), (
                        fmt, M, N, K, bps, depth, v, base)
                for key in ("fused0", "fused1"):
                    assert v[key] <= TOL, (key, fmt, M, N, K, v)

