"""Quantized models on the CUDA backend (kernels/quant.cu: dequantize into a bf16 scratch, then
cuBLAS): logits of a `resafe quantize` output on cuda agree with transformers running the
dequantized export of the same model (an independent implementation of the same effective
weights) and with our CPU backend, for every weight format; training through frozen quantized
weights (qmatmul_t for dx, qdequantize for elementwise LoRA) gives the CPU backend's gradients.
Runs only with RESAFE_TEST_GPU=1 (make test-gpu). Tolerances as test_model_gpu.py and
test_model_gpu_train.py (bf16 activations and weights on the GPU)."""
import random
import subprocess

import numpy as np
import pytest
import torch

from conftest import gpu_enabled, run_resafe
import test_model as tm
import test_model_gpu as tmg
import test_model_gpu_train as tgt
import test_model_grad as tg

pytestmark = pytest.mark.skipif(not gpu_enabled(), reason="GPU tests run with RESAFE_TEST_GPU=1")
transformers = pytest.importorskip("transformers")

FORMATS = {
    "int4_g32_asym": ["--method", "rtn", "--bits", "4", "--group", "32"],
    "int3_g64_sym": ["--method", "rtn", "--bits", "3", "--group", "64", "--sym"],
    "int2_row": ["--method", "rtn", "--bits", "2", "--group", "0"],
    "int8_g128": ["--method", "rtn", "--bits", "8", "--group", "128"],
    "nf4": ["--method", "nf4"],
    "fp4": ["--method", "fp4"],
    "int8_outlier": ["--method", "int8", "--threshold", "0.05"],
}


def quantize(path, tmp_path, name, args):
    q, d = str(tmp_path / f"q_{name}"), str(tmp_path / f"d_{name}")
    run_resafe("quantize", "--model", path, "--out", q, *args)
    run_resafe("quantize", "--model", path, "--out", d, *args, "--export", "dequant",
               "--export-dtype", "f32")
    return q, d


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_cuda_quantized_logits_match_dequant_export_and_cpu(fmt, tmp_path, rng_seed):
    model, path = tm.make_checkpoint(tmp_path, "llama", rng_seed)
    q, d = quantize(path, tmp_path, fmt, FORMATS[fmt])
    ref_model = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    ref_model.eval()
    rnd = random.Random(rng_seed + 11)
    seqs = tm.random_batch(rnd, model.config.vocab_size, n=4, lo=2, hi=30)
    cpu = tmg.logits_on("cpu", q, seqs, tmp_path)
    gpu = tmg.logits_on("cuda", q, seqs, tmp_path)
    assert np.isfinite(gpu).all()
    for b, s in enumerate(seqs):
        ref = tm.ref_logits(ref_model, s)
        e_ref = tmg.rel_err(gpu[b, :len(s)], ref)
        e_cpu = tmg.rel_err(gpu[b, :len(s)], cpu[b, :len(s)])
        print(f"{fmt} seq {b}: rel err vs dequant export {e_ref:.2e}, vs cpu {e_cpu:.2e}")
        assert e_ref <= tmg.REL_TOL and e_cpu <= tmg.REL_TOL, (e_ref, e_cpu)


@pytest.mark.parametrize("mode", ["factor", "elementwise"])
def test_cuda_lora_gradients_on_quantized_model_match_cpu(mode, tmp_path, rng_seed):
    model, path = tg.make_model(tmp_path, "llama_gqa", rng_seed)
    q, _ = quantize(path, tmp_path, "int4", FORMATS["int4_g32_asym"])
    batch = tgt.positive_batch(rng_seed + 5, model.config.vocab_size)
    adapter = tg.random_adapter(model, 4, torch.Generator().manual_seed(rng_seed), mode)
    args = ["--lora", 2.0, "--mode", mode]
    cpu = tgt.run_on("cpu", q, batch, tmp_path, *args, adapter=adapter)
    gpu = tgt.run_on("cuda", q, batch, tmp_path, *args, adapter=adapter)
    tgt.compare_all(gpu, cpu, f"quantized int4 lora {mode}")
