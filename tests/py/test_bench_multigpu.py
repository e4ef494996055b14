"""scripts/bench/multigpu.py (#8's benchmark, run on a multi-GPU device) in its CPU smoke mode:
2 ranks over the file transport on a small random Llama. The script's own checks must come out
as the acceptance wants them on the GPUs: per-step losses of 2 ranks within fp32 reordering of
the one-process run's, masks identical across ranks, the killed rank named and the others gone
within 60 s, the resumed run's losses equal to the uninterrupted one's. Bad arguments: one line,
exit 2, before any work."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("transformers")
pytest.importorskip("h5py")
SCRIPT = os.path.join(ROOT, "scripts", "bench", "multigpu.py")


def test_cpu_smoke_run_meets_the_acceptance_checks(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--quick", "--backend", "cpu"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    with open(tmp_path / "multigpu.json") as f:
        m = json.load(f)["metrics"]
    assert m["dpo_tok_s_1gpu"] > 0 and m["dpo_tok_s_2gpu"] > 0
    assert m["scaling_2gpu"] == pytest.approx(m["dpo_tok_s_2gpu"] / m["dpo_tok_s_1gpu"])
    assert 0 < m["max_loss_diff_1v2"] < 1e-5 or m["max_loss_diff_1v2"] == 0
    # AdamW turns the fp32 reordering of a near-zero gradient entry into a step of up to lr, so
    # the adapters differ by more than the losses (measured 2e-4 of the largest entry here);
    # the benchmark's bound is bf16's relative precision, 2^-8
    assert m["adapter_max_rel_diff_1v2"] < 2.0 ** -8
    assert m["mask_reidentifications"] == 3  # steps 0, 2, 4 of 6
    assert m["masks_identical_across_ranks"] == 1
    assert m["kill_others_exit_s"] < 60 and m["kill_message_names_rank"] == 1
    assert m["resume_from_checkpoint"] == 1 and m["resume_losses_equal"] == 1
    assert not [f for f in os.listdir(os.path.join(ROOT, "scripts", "bench", "results"))
                if "cpu-ranks" in f], "a smoke run wrote a results file"


@pytest.mark.parametrize("args, msg", [
    (["--batch", "6"], "must be a multiple of --gpus x --micro"),
    (["--gpus", "1"], "need --gpus >= 2"),
    (["--only", "speed"], "--only speed"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, args, msg):
    p = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "o"), "--backend", "cpu", *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and msg in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "o")
