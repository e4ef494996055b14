"""`resafe quantize --method qlora|qat --backend cuda`: the fine-tuning on the GPU (LoRA through the
packed NF4 weights on cuda; QAT once resafe sft trains on cuda). On test_qtrain.py's tiny model and
copy task: the first step's loss (before any update) equals the CPU run's within 2% (bf16
activations on cuda: whole-model logits differ by 0.6-1.6% relative, a mean NLL much less), the
loss falls, and the output loads and generates on cuda. Runs only with RESAFE_TEST_GPU=1."""
import json
import os

import pytest

from conftest import gpu_enabled, run_resafe
import test_qtrain as tq

pytestmark = pytest.mark.skipif(not gpu_enabled(), reason="GPU tests run with RESAFE_TEST_GPU=1")
setup = tq.setup  # the module fixtures
wide = tq.wide


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "train_metrics.jsonl"))]


@pytest.mark.parametrize("method,extra", [
    ("qlora", ["--rank", "4", "--alpha", "8", "--lr", "1e-2"]),
    ("qat", ["--bits", "4", "--lr", "2e-3", "--group", "0"]),
    ("qat", ["--bits", "4", "--lr", "2e-3", "--group", "32"]),  # on the 96-wide model
], ids=["qlora", "qat-row", "qat-g32"])
def test_training_method_on_cuda_matches_cpu_at_the_first_step(setup, wide, tmp_path, method,
                                                               extra):
    args = ["--method", method, "--calib", setup["calib"], *extra, *tq.TRAIN]
    model = wide if "32" in extra else setup["model"]
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    tq.quantize(model, cpu, *args, "--backend", "cpu")
    p = tq.quantize(model, gpu, *args, "--backend", "cuda", check=False)
    assert p.returncode == 0, p.stderr
    lc, lg = losses(cpu), losses(gpu)
    assert abs(lg[0] - lc[0]) <= 2e-2 * lc[0], (lc[0], lg[0])
    assert lg[-1] < 0.9 * lg[0], lg
    run_resafe("generate", "--model", gpu, "--backend", "cuda", "--prompt", "the cat",
               "--max-new-tokens", "4", env=tq.ENV)
