"""`resafe sft` on the CUDA backend (mixed precision: bf16 weights and activations, fp32 masters,
gradients and AdamW state), against the same run on the cpu backend (fp32 everything), and on
its own: deterministic, resuming bit-identically, masters read in fp32 from the model files.
The op-level checks of the new kernels (cast_f32_to_weight, fake_quant_groups bit-exact against
the CPU op) are the C unit tests test_cuda_qat_* (tests/unit/test_backend_gpu_qat.c).
Runs only with RESAFE_TEST_GPU=1.

Tolerances, cuda against cpu (the tiny char-level Llama of test_train_cli, hidden 64, 2 layers,
the copy task, 30 steps of batch 16, lr 2e-3):
  - Loss curve: each step's loss within 2% of the cpu loss + 0.01 nats, and both runs learn (last
    loss < 60% of the first). The step-1 loss differs only by the forward's bf16 rounding
    (weights and activations rounded to 8 significant bits, unit roundoff 2^-9); later the runs
    drift apart slowly: bf16 gradients differ from fp32 ones by ~1%, and Adam normalises each
    entry's update, so entries with near-zero gradients may step differently. Measured on an
    emulation in PyTorch (this model and task, the same AdamW, schedule and clipping; model run
    in bf16 end to end, gradients in bf16, fp32 masters): at most 0.2% apart over the 30 steps,
    a tenth of the tolerance.
  - Written weights: per tensor ||w_cuda - w_cpu|| <= 0.15 ||w_cpu - w_0|| (the emulation: 1.8%
    at worst), and the cosine similarity of the two whole-model updates >= 0.99 (emulation:
    0.99993). A broken GPU path fails by far more: weights not refreshed from the masters (the
    loss stops falling), a tensor without a master or not stepped (its update is 0: difference
    100%), gradients of the wrong input.
"""
import json
import os

import numpy as np
import pytest

from conftest import gpu_enabled, run_resafe
import test_train_cli as tc

safetensors_numpy = pytest.importorskip("safetensors.numpy")

pytestmark = pytest.mark.skipif(not gpu_enabled(), reason="GPU tests run with RESAFE_TEST_GPU=1")


@pytest.fixture(scope="module")
def char_task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_gpu")
    model = tc.make_model(tmp / "char", "--hidden", "64", "--layers", "2", "--vocab", "259")
    data, _ = tc.copy_task(tmp, n_train=256, n_held=1)
    return tmp, model, data


def config(tmp, model, data, out, backend="cuda", **over):
    base = dict(model__backend=backend, sft__max_steps=30, sft__batch_size=16,
                sft__micro_batch_size=8, sft__warmup_steps=5, sft__lr=2e-3,
                run__checkpoint_every=0)
    base.update(over)
    return tc.sft_config(tmp, model, data, out, **base)


def losses(out):
    with open(os.path.join(out, "sft", "metrics.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f])


def weights(path):
    return safetensors_numpy.load_file(os.path.join(path, "model.safetensors"))


def test_sft_on_cuda_follows_the_cpu_run(char_task):
    tmp, model, data = char_task
    runs = {}
    for backend in ("cpu", "cuda"):
        out = str(tmp / f"follow_{backend}")
        run_resafe("sft", "--config", config(tmp, model, data, out, backend), env=tc.ENV)
        runs[backend] = out
    cpu, gpu = losses(runs["cpu"]), losses(runs["cuda"])
    print("loss cpu ", np.round(cpu, 4).tolist())
    print("loss cuda", np.round(gpu, 4).tolist())
    assert len(cpu) == len(gpu) == 30
    assert np.all(np.abs(gpu - cpu) <= 0.02 * cpu + 0.01), np.abs(gpu - cpu).max()
    assert gpu[-1] < 0.6 * gpu[0] and cpu[-1] < 0.6 * cpu[0]

    w0 = weights(model)
    wc = weights(os.path.join(runs["cpu"], "sft", "model"))
    wg = weights(os.path.join(runs["cuda"], "sft", "model"))
    assert set(wc) == set(wg) and all(wg[k].dtype == np.float32 for k in wg)
    dots = norms_c = norms_g = 0.0
    worst = 0.0
    for k in wc:
        dc, dg = (wc[k] - w0[k]).astype(np.float64), (wg[k] - w0[k]).astype(np.float64)
        diff = np.linalg.norm(wg[k] - wc[k].astype(np.float64))
        bound = 0.15 * np.linalg.norm(dc) + 1e-6 * np.linalg.norm(w0[k])
        worst = max(worst, diff / max(np.linalg.norm(dc), 1e-30))
        assert diff <= bound, f"{k}: cuda and cpu weights differ by {diff:.3g} (bound {bound:.3g})"
        dots += float(np.sum(dc * dg))
        norms_c += float(np.sum(dc * dc))
        norms_g += float(np.sum(dg * dg))
    cosine = dots / np.sqrt(norms_c * norms_g)
    print(f"update cosine cuda vs cpu {cosine:.4f}, worst per-tensor difference {worst:.3g} "
          f"of the cpu update")
    assert cosine >= 0.99


@pytest.mark.parametrize("qat", [{}, dict(sft__qat="true", sft__qat_bits=4, sft__qat_act_bits=8,
                                          sft__qat_kv_bits=4)], ids=["mixed", "w4a8kv4"])
def test_sft_on_cuda_is_deterministic_and_resumes_bit_identically(char_task, qat):
    """Two runs: the same bytes. A run stopped by a NaN loss at step 13 (after the step-12
    checkpoint), resumed: the same bytes again (metrics, model, checkpoint)."""
    tmp, model, data = char_task
    tag = "qat" if qat else "mixed"
    outs = [str(tmp / f"det_{tag}_{n}") for n in "abc"]
    over = dict(qat, sft__max_steps=20, run__checkpoint_every=4)
    for out in outs[:2]:
        run_resafe("sft", "--config", config(tmp, model, data, out, **over), env=tc.ENV)
    cfg = config(tmp, model, data, outs[2], **over)
    p = run_resafe("sft", "--config", cfg, check=False, env=dict(tc.ENV, RESAFE_TEST_NAN_STEP="12"))
    assert p.returncode == 1 and "step 13" in p.stderr, p.stderr
    run_resafe("sft", "--config", cfg, "--resume", env=tc.ENV)
    for f in ("metrics.jsonl", "model/model.safetensors", "checkpoint.h5"):
        first = tc.read(os.path.join(outs[0], "sft", f))
        assert first == tc.read(os.path.join(outs[1], "sft", f)), f"two runs differ: {f}"
        assert first == tc.read(os.path.join(outs[2], "sft", f)), f"resumed run differs: {f}"
    assert losses(outs[0])[-1] < losses(outs[0])[0]


def test_sft_on_cuda_masters_start_from_the_fp32_files(char_task):
    """With a learning rate far below any weight's ulp, the written (master) weights are the
    model file's fp32 values exactly, not their bf16 copies on the device; the plan line names
    the mixed precision."""
    tmp, model, data = char_task
    out = str(tmp / "masters")
    p = run_resafe("sft", "--config", config(tmp, model, data, out, sft__lr=1e-30,
                                             sft__max_steps=2), env=tc.ENV)
    assert "mixed precision on cuda" in p.stderr and "fp32 masters" in p.stderr, p.stderr
    w0, w = weights(model), weights(os.path.join(out, "sft", "model"))
    rounded = 0
    for k in w:
        assert np.array_equal(w[k], w0[k].astype(np.float32)), k
        bf16 = (w0[k].astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
        rounded += int(np.sum(bf16 != w0[k]))
    assert rounded > 0, "the file's weights are all bf16 values: the test would not see a bf16 copy"


def test_sft_on_cuda_clamps_into_freeze_bounds(char_task):
    """[sft] freeze_mask bounds on cuda (the masters are clamped): every written entry inside its
    box, entries with lo == hi the file's fp32 values exactly, and many entries on a bound."""
    import h5py
    tmp, model, data = char_task
    w0 = weights(model)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    boxes = {}
    for k in sorted(k for k in w0 if "_proj.weight" in k)[::2]:
        w = w0[k].astype(np.float32)
        r = rng.choice([0.0, 1e-4, np.inf], size=(2,) + w.shape, p=[0.2, 0.6, 0.2])
        boxes[k] = np.stack([w - r[0], w + r[1]]).astype(np.float32)
    with h5py.File(tmp / "box.h5", "w") as f:
        for k, b in boxes.items():
            f.create_dataset(k, data=b)
    out = str(tmp / "box")
    run_resafe("sft", "--config", config(tmp, model, data, out, sft__max_steps=10,
                                         sft__freeze_mask=str(tmp / "box.h5")), env=tc.ENV)
    w = weights(os.path.join(out, "sft", "model"))
    on_bound = 0
    for k, (lo, hi) in boxes.items():
        assert np.all((w[k] >= lo) & (w[k] <= hi)), k
        fixed = lo == hi
        assert np.array_equal(w[k][fixed], w0[k].astype(np.float32)[fixed]), k
        on_bound += int(np.sum(((w[k] == lo) | (w[k] == hi)) & ~fixed))
    assert on_bound > 100, on_bound
