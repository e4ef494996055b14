"""`resafe dpo` on the CUDA backend is deterministic: two runs with the same seed write the same
bytes (metrics, adapter, checkpoint), and a run killed with SIGTERM and resumed ends with the same
bytes as an uninterrupted one. The pairs are long enough (> 16 tokens) for the tensor-core
attention path (kernels/attention_gemm.cu); SNIP re-identification and LoRA dropout are on.
Runs only with RESAFE_TEST_GPU=1."""
import os
import random
import signal

import pytest

from conftest import gpu_enabled, resafe_bin, run_resafe
import test_train_cli as tc

pytestmark = pytest.mark.skipif(not gpu_enabled(), reason="GPU tests run with RESAFE_TEST_GPU=1")
tiny_model = tc.tiny_model  # the module fixture


def long_pairs(path, n, seed=3):
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p, c, l = (" ".join(r.choice(tc.WORDS) for _ in range(k)) for k in (12, 20, 26))
            f.write(tc.json.dumps({"prompt": p, "chosen": c, "rejected": l}) + "\n")
    return str(path)


def gpu_config(tmp_path, model, out):
    return tc.dpo_config(tmp_path, model, out, model__backend="cuda",
                         dpo__data_file=long_pairs(tmp_path / "long_pairs.jsonl", 24))


def test_dpo_on_cuda_is_deterministic_and_resumes_bit_identically(tiny_model, tmp_path):
    outs = [str(tmp_path / n) for n in ("a", "b", "c")]
    for out in outs[:2]:
        run_resafe("dpo", "--config", gpu_config(tmp_path, tiny_model, out), env=tc.ENV)
    tc.assert_same_dpo_outputs(outs[0], outs[1])

    cfg = gpu_config(tmp_path, tiny_model, outs[2])
    rc, err = tc.interrupt_after([resafe_bin(), "dpo", "--config", cfg],
                                 os.path.join(outs[2], "dpo", "metrics.jsonl"), 7, signal.SIGTERM)
    assert rc != 0 and "--resume" in err, err
    run_resafe("dpo", "--config", cfg, "--resume", env=tc.ENV)
    tc.assert_same_dpo_outputs(outs[0], outs[2])
