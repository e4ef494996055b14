"""The CUDA backend trains the whole model: one training forward + backward (train_tool, as in
test_model_grad.py) on tiny random transformers checkpoints gives the same LoRA gradients dA, dB
(every mode: plain, factor masks, elementwise masks, adapter dropout) and the same full-parameter
gradients on cuda as on our fp32 CPU backend (and dW of every targeted linear, --want-dw), which test_model_grad.py checks against torch
autograd. Runs only with RESAFE_TEST_GPU=1 (make test-gpu).

Tolerance: relative Frobenius error per tensor, ||cuda - cpu|| / ||cpu|| <= 5e-2. The CUDA backend
rounds every activation and activation gradient to bf16 (relative 2^-9 each) and the LoRA GEMMs
round A, B and the rank-r intermediates to bf16 (kernels/lora.cu); through 2 layers forward and
backward that compounds to about 1e-2 (the forward logits alone are within 3e-2 in
test_model_gpu.py). A wrong kernel (missing term, transpose, scale) gives errors of order 1.
The sequence weights d_seq_logp are positive here so that the per-sequence gradients add up
rather than cancel (cancellation would turn bf16 noise into large relative errors of a small
sum without saying anything about the kernels). seq_logp: the same 5e-2, relative to the norm.
Per tensor the bound is 0.3, the aggregate over all tensors 5e-2: a gradient whose norm is small
because its terms cancel (seen on an H100, 2026-11-23: Qwen2 k_proj dA, 0.16 while every other
tensor was ~1e-2) carries the bf16 noise of its large terms; 0.3 still catches a wrong kernel.
"""
import os
import random
import subprocess

import numpy as np
import pytest
import torch

from conftest import gpu_enabled
import test_model_grad as tg

pytestmark = pytest.mark.skipif(not gpu_enabled(), reason="GPU tests run with RESAFE_TEST_GPU=1")
safetensors_torch = pytest.importorskip("safetensors.torch")
REL_TOL = 5e-2
PER_TENSOR_TOL = 0.3
FAMILIES = ["llama_gqa", "qwen2_bias", "gemma"]


def run_on(backend, path, batch, tmp_path, *args, adapter=None):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(batch[k]))
               for k in ("tokens", "pos", "targets", "d_seq_logp", "prefix_tokens", "prefix_pos",
                         "prefix_of") if k in batch}
    tensors.update(adapter or {})
    batch_file = tmp_path / "batch.safetensors"
    out_file = tmp_path / f"grads_{backend}.safetensors"
    safetensors_torch.save_file(tensors, str(batch_file))
    env = dict(tg.TOOL_ENV, RESAFE_BACKEND=backend)
    p = subprocess.run([tg.TRAIN_TOOL, path, str(batch_file), str(out_file), *map(str, args)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, f"{backend}: {p.stderr[-3000:]}"
    return {k: v.numpy() for k, v in safetensors_torch.load_file(str(out_file)).items()}


def positive_batch(seed, vocab):
    batch = tg.random_batch(random.Random(seed), vocab)
    batch["d_seq_logp"] = np.abs(batch["d_seq_logp"]).astype(np.float32)
    return batch


def compare_all(gpu, cpu, what):
    assert set(gpu) == set(cpu), f"{what}: outputs differ: {set(gpu) ^ set(cpu)}"
    worst, diff2, ref2 = 0.0, 0.0, 0.0
    for name, ref in cpu.items():
        if name == "dropout_seeds":
            assert np.array_equal(gpu[name], ref), f"{what}: dropout seeds differ"
            continue
        assert np.isfinite(gpu[name]).all(), f"{what}: '{name}' has non-finite values on cuda"
        if not np.any(ref):
            assert float(np.abs(gpu[name]).max()) <= 1e-6, f"{what}: '{name}' should be ~0"
            continue
        err = tg.rel_err(gpu[name], ref)
        worst = max(worst, err)
        diff2 += float(np.sum((gpu[name].astype(np.float64) - ref) ** 2))
        ref2 += float(np.sum(ref.astype(np.float64) ** 2))
        assert err <= PER_TENSOR_TOL, f"{what}: '{name}' relative error {err:.3g} > {PER_TENSOR_TOL}"
    total = (diff2 / ref2) ** 0.5 if ref2 > 0 else 0.0
    print(f"{what}: relative error cuda vs cpu: all tensors {total:.3g}, worst tensor {worst:.3g}")
    assert total <= REL_TOL, f"{what}: relative error over all tensors {total:.3g} > {REL_TOL}"


@pytest.mark.parametrize("mode", ["none", "factor", "elementwise", "dropout"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_lora_gradients_match_cpu(family, mode, tmp_path, rng_seed):
    model, path = tg.make_model(tmp_path, family, rng_seed)
    batch = positive_batch(rng_seed + 3, model.config.vocab_size)
    rank, alpha = 4, 2.0
    mask_mode = mode if mode in ("factor", "elementwise") else None
    adapter = tg.random_adapter(model, rank, torch.Generator().manual_seed(rng_seed), mask_mode)
    args = ["--lora", alpha, "--mode", mode if mask_mode else "none", "--want-dw"]
    if mode == "dropout":
        args += ["--dropout", 0.1, "--seed", rng_seed % 1000 + 1]
    cpu = run_on("cpu", path, batch, tmp_path, *args, adapter=adapter)
    gpu = run_on("cuda", path, batch, tmp_path, *args, adapter=adapter)
    compare_all(gpu, cpu, f"{family} lora {mode}")


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_full_gradients_match_cpu(family, tmp_path, rng_seed):
    model, path = tg.make_model(tmp_path, family, rng_seed)
    batch = positive_batch(rng_seed + 1, model.config.vocab_size)
    cpu = run_on("cpu", path, batch, tmp_path)
    gpu = run_on("cuda", path, batch, tmp_path)
    compare_all(gpu, cpu, f"{family} full")


@pytest.mark.parametrize("family", ["llama_gqa", "gemma"])
def test_cuda_prefixed_batch_matches_cpu(family, tmp_path, rng_seed):
    """Shared prefixes (test_model_prefix.py's layouts): the joined keys, the two attentions
    and the folded key gradients on cuda, LoRA and full-parameter gradients against the CPU."""
    from test_model_prefix import shared_batch
    model, path = tg.make_model(tmp_path, family, rng_seed)
    _, packed = shared_batch(random.Random(rng_seed + 21), model.config.vocab_size)
    packed["d_seq_logp"] = np.abs(packed["d_seq_logp"]).astype(np.float32)
    adapter = tg.random_adapter(model, 4, torch.Generator().manual_seed(rng_seed))
    args = ["--lora", 2.0, "--want-dw"]
    compare_all(run_on("cuda", path, packed, tmp_path, *args, adapter=adapter),
                run_on("cpu", path, packed, tmp_path, *args, adapter=adapter),
                f"{family} prefixed lora")
    compare_all(run_on("cuda", path, packed, tmp_path), run_on("cpu", path, packed, tmp_path),
                f"{family} prefixed full")
