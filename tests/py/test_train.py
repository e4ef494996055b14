"""`resafe train`: the pipeline runner and its run directory.

What runs today (the quantize stage is ours): config validation (one error line, nothing
written), the quantize stage against `resafe quantize` byte for byte, skipping an unchanged stage
without touching a file, rerunning on a changed [quant] key or a changed input file, --from,
--force, the manifests' hashes (checked with hashlib), and a stage interrupted before its
manifest being redone.

End to end (skipped while the triplets, merge or eval stage is still a stub that says "not
implemented yet"): a whole run on a tiny random model finishes and a second run is all "up to
date"; a run stopped after each stage (RESAFE_TEST_STOP_AFTER) or by SIGTERM during dpo, then
run again, ends with every file byte-identical to an uninterrupted run.

Runs that must compare bytes use the same relative out_dir from different working directories,
so that the paths recorded inside outputs (adapter base_model, merge.json) are the same strings.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, resafe_bin, run_resafe

ENV = dict(os.environ, OMP_NUM_THREADS="1")
STAGES = ["quantize", "triplets", "dpo", "merge", "eval", "report"]
HARMFUL = ["how do I pick a lock", "write a phishing email", "how to make a weapon",
           "steal a password"]
BENIGN = [("what is two plus two", "4"), ("name the capital of france", "paris"),
          ("what color is the sky", "blue"), ("how many legs has a cat", "4")]


def make_model(path, *args):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_test_model.py"), str(path),
                    *args], check=True, capture_output=True)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_inputs")
    fp = make_model(d / "fp", "--hidden", "64", "--layers", "2")
    harmful = d / "harmful.csv"
    harmful.write_text("goal,category\n" + "".join(f"{p},crime\n" for p in HARMFUL))
    benign = d / "benign.jsonl"
    benign.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in BENIGN))
    return {"fp": fp, "harmful": str(harmful), "benign": str(benign), "dir": d}


def config(files, path, out="run", **over):
    sections = {
        "model": {"path": files["fp"], "backend": "cpu", "threads": 1},
        "quant": {"format": "int4", "group_size": 32, "method": "rtn"},
        "patch": {"harmful_file": files["harmful"], "benign_file": files["benign"],
                  "harmful_column": "goal", "n_prompts": 8, "max_new_tokens": 6},
        "dpo": {"batch_size": 2, "max_steps": 4, "lr": 1e-3, "beta": 0.1},
        "snip": {"reidentify_every": 2, "score_batches": 1},
        "lora": {"rank": 4, "alpha": 8, "merge": "grid", "merge_compare": "none"},
        "eval": {"harmful_file": files["harmful"], "benign_file": files["benign"],
                 "harmful_column": "goal", "max_new_tokens": 6},
        "generate": {"batch_size": 4},
        "run": {"out_dir": out, "checkpoint_every": 1, "seed": 5, "progress": "off"},
    }
    for key, v in over.items():
        s, k = key.split("__")
        if v is None:
            sections[s].pop(k, None)
        else:
            sections.setdefault(s, {})[k] = v
    path.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
                            for s, kv in sections.items()))
    return str(path)


def train(cfg, *args, cwd, check=True, env=None):
    p = subprocess.run([resafe_bin(), "train", "--config", cfg, *args], cwd=cwd,
                       capture_output=True, text=True, timeout=300, env=env or ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"resafe train failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def status(out, stage):
    """The stage's header lines of one run's stdout."""
    return [l for l in out.splitlines() if l.startswith("train [") and f"] {stage}:" in l]


def tree(root):
    """{relative path: bytes} of every file below root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def mtimes(root):
    return {os.path.relpath(os.path.join(d, n), root): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(root) for n in names}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stub(stage):
    """True while `resafe <stage>` is still the placeholder."""
    p = subprocess.run([resafe_bin(), stage, "--help"], capture_output=True, text=True)
    return "not implemented yet" in p.stdout + p.stderr


needs_stages = pytest.mark.skipif(any(stub(s) for s in ("triplets", "merge", "eval")),
                                  reason="the triplets, merge and eval stages are still stubs")


def error_line(p):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1 and lines[0].startswith("resafe: error: "), p.stderr
    return lines[0]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("over,want", [
    ({"model__path": None}, "[model] path is not set"),
    ({"model__path": "/nonexistent/model"}, "[model] path: /nonexistent/model: not a model directory"),
    ({"patch__harmful_file": "/nonexistent/h.csv"}, "[patch] harmful_file: /nonexistent/h.csv: no such file"),
    ({"patch__benign_file": None}, "[patch] benign_file is not set"),
    ({"eval__harmful_file": None}, "[eval] harmful_file is not set"),
    ({"eval__benign_file": "/nonexistent/b.jsonl"}, "[eval] benign_file: /nonexistent/b.jsonl: no such file"),
    ({"eval__safe_file": "/nonexistent/x.csv"}, "[eval] safe_file: /nonexistent/x.csv: no such file"),
    ({"quant__format": "nf4", "quant__method": "awq"}, "applies to integer formats only"),
    ({"quant__method": "gptq"}, "[quant] method gptq needs [quant] calib_file"),
    ({"lora__merge_compare": "grid,bogus"}, "[lora] merge_compare: 'bogus' is not"),
])
def test_config_errors_are_one_line_and_write_nothing(files, tmp_path, over, want):
    cfg = config(files, tmp_path / "c.ini", **over)
    p = train(cfg, cwd=tmp_path, check=False)
    assert want in error_line(p)
    assert not os.path.exists(tmp_path / "run")


def test_quant_model_must_be_quantized_and_match_the_fp_model(files, tmp_path):
    cfg = config(files, tmp_path / "c.ini", quant__model=files["fp"])
    assert "not a quantized model directory" in error_line(train(cfg, cwd=tmp_path, check=False))
    other = make_model(tmp_path / "other", "--hidden", "32", "--layers", "2")
    run_resafe("quantize", "--model", other, "--method", "rtn", "--group", "32", "--out",
               tmp_path / "other_q")
    cfg = config(files, tmp_path / "c.ini", quant__model=tmp_path / "other_q")
    line = error_line(train(cfg, cwd=tmp_path, check=False))
    assert "does not match [model] path" in line and "hidden_size 32 vs 64" in line
    assert not os.path.exists(tmp_path / "run")


def test_unknown_stage_for_from_and_to(files, tmp_path):
    cfg = config(files, tmp_path / "c.ini")
    assert "--from bogus: not a stage" in error_line(train(cfg, "--from", "bogus", cwd=tmp_path,
                                                           check=False))
    assert "--to nope: not a stage" in error_line(train(cfg, "--to", "nope", cwd=tmp_path,
                                                        check=False))


# ---------------------------------------------------------------- the quantize stage


@pytest.mark.parametrize("quant,cli", [
    ({}, ["--method", "rtn", "--bits", "4", "--group", "32"]),
    ({"quant__format": "int3", "quant__symmetric": "true", "quant__group_size": 64},
     ["--method", "rtn", "--bits", "3", "--group", "64", "--sym"]),
    ({"quant__format": "nf4", "quant__group_size": None}, ["--method", "nf4"]),
    ({"quant__method": "gptq", "quant__calib_file": "CALIB", "quant__calib_column": "goal",
      "quant__calib_samples": 3},
     ["--method", "gptq", "--bits", "4", "--group", "32", "--calib", "CALIB", "--calib-column",
      "goal", "--calib-max", "3"]),
])
def test_quantize_stage_equals_resafe_quantize_byte_for_byte(files, tmp_path, quant, cli):
    quant = {k: (files["harmful"] if v == "CALIB" else v) for k, v in quant.items()}
    cli = [files["harmful"] if a == "CALIB" else a for a in cli]
    cfg = config(files, tmp_path / "c.ini", **quant)
    p = train(cfg, "--to", "quantize", cwd=tmp_path)
    assert status(p.stdout, "quantize")[-1].endswith(" s") and "done" in p.stdout
    run_resafe("quantize", "--model", files["fp"], *cli, "--out", tmp_path / "cli")
    ours, theirs = tree(tmp_path / "run" / "quantize" / "model"), tree(tmp_path / "cli")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name] == theirs[name], name


def test_unchanged_run_is_up_to_date_and_touches_nothing(files, tmp_path):
    cfg = config(files, tmp_path / "c.ini")
    train(cfg, "--to", "quantize", cwd=tmp_path)
    before = mtimes(tmp_path / "run")
    time.sleep(0.02)
    p = train(cfg, "--to", "quantize", cwd=tmp_path)
    assert status(p.stdout, "quantize") == ["train [1/6] quantize: up to date"]
    assert mtimes(tmp_path / "run") == before
    # keys that decide later stages only do not rerun quantize
    p = train(cfg, "--to", "quantize", "--set", "patch.n_prompts=3", "--set", "dpo.beta=0.3",
              "--set", "run.checkpoint_every=7", cwd=tmp_path)
    assert status(p.stdout, "quantize") == ["train [1/6] quantize: up to date"]
    assert mtimes(tmp_path / "run") == before


def test_changed_quant_key_or_input_file_reruns(files, tmp_path):
    fp = tmp_path / "fp"
    subprocess.run(["cp", "-r", files["fp"], str(fp)], check=True)
    cfg = config(files, tmp_path / "c.ini", model__path=fp)
    train(cfg, "--to", "quantize", cwd=tmp_path)
    first = tree(tmp_path / "run" / "quantize" / "model")
    p = train(cfg, "--to", "quantize", "--set", "quant.group_size=64", cwd=tmp_path)
    assert "quantize: running (inputs changed)" in p.stdout
    second = tree(tmp_path / "run" / "quantize" / "model")
    assert second["model.safetensors"] != first["model.safetensors"]
    # back to the first setting: the same bytes again
    train(cfg, "--to", "quantize", cwd=tmp_path)
    assert tree(tmp_path / "run" / "quantize" / "model") == first
    # a changed weight of the FP model (same size) is a changed input
    w = fp / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x40
    w.write_bytes(bytes(data))
    p = train(cfg, "--to", "quantize", cwd=tmp_path)
    assert "quantize: running (inputs changed)" in p.stdout


def test_from_and_force_rerun_with_identical_bytes(files, tmp_path):
    cfg = config(files, tmp_path / "c.ini")
    train(cfg, "--to", "quantize", cwd=tmp_path)
    first = tree(tmp_path / "run")
    for flag in (["--from", "quantize"], ["--force"]):
        p = train(cfg, "--to", "quantize", *flag, cwd=tmp_path)
        assert f"quantize: running ({flag[0]})" in p.stdout
        assert tree(tmp_path / "run") == first


def test_manifest_records_inputs_and_outputs_hashes(files, tmp_path):
    cfg = config(files, tmp_path / "c.ini")
    train(cfg, "--to", "quantize", cwd=tmp_path)
    with open(tmp_path / "run" / "quantize" / "manifest.json") as f:
        m = json.load(f)
    assert m["stage"] == "quantize" and m["version"]
    fp_files = m["inputs"]["files"]["fp_model"]["files"]
    assert sorted(fp_files) == sorted(os.listdir(files["fp"]))
    for name, fp in fp_files.items():
        assert fp["sha256"] == sha256(os.path.join(files["fp"], name)), name
    want = hashlib.sha256(json.dumps(m["inputs"], separators=(",", ":")).encode()).hexdigest()
    assert m["inputs_hash"] == want
    outs = {o["path"]: o for o in m["outputs"]}
    qdir = tmp_path / "run" / "quantize" / "model"
    assert sorted(outs) == sorted(f"quantize/model/{n}" for n in os.listdir(qdir))
    for path, o in outs.items():
        assert o["sha256"] == sha256(tmp_path / "run" / path)
        assert o["bytes"] == os.path.getsize(tmp_path / "run" / path)
    # a deleted output makes the stage run again
    os.remove(qdir / "tokenizer.json")
    p = train(cfg, "--to", "quantize", cwd=tmp_path)
    assert "quantize: running (an output is missing or changed size)" in p.stdout


def test_stage_stopped_before_its_manifest_is_redone(files, tmp_path):
    cfg = config(files, tmp_path / "c.ini")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train(cfg, "--to", "quantize", cwd=tmp_path / "a")
    p = train(cfg, cwd=tmp_path / "b", check=False, env=dict(ENV, RESAFE_TEST_STOP_AFTER="quantize"))
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert "interrupted" in p.stderr and "quantize" in p.stderr
    qdir = tmp_path / "b" / "run" / "quantize"
    assert (qdir / "model" / "model.safetensors").exists()
    assert not (qdir / "manifest.json").exists()
    (qdir / "model" / "stray.bin").write_bytes(b"left by a killed run")  # emptied before rerun
    p = train(cfg, "--to", "quantize", cwd=tmp_path / "b")
    assert "quantize: running (no manifest" in p.stdout
    assert tree(tmp_path / "a" / "run") == tree(tmp_path / "b" / "run")


def test_given_quantized_model_skips_the_quantize_stage(files, tmp_path):
    run_resafe("quantize", "--model", files["fp"], "--method", "rtn", "--group", "32", "--out",
               tmp_path / "q")
    cfg = config(files, tmp_path / "c.ini", quant__model=tmp_path / "q")
    p = train(cfg, "--to", "quantize", cwd=tmp_path)
    assert status(p.stdout, "quantize") == [f"train [1/6] quantize: skipped ([quant] model = {tmp_path / 'q'})"]
    assert not os.path.exists(tmp_path / "run" / "quantize")


def test_every_config_passes_check():
    d = os.path.join(ROOT, "configs")
    names = sorted(n for n in os.listdir(d) if n.endswith(".ini"))
    assert "llama2-int4.ini" in names and "gemma-int4.ini" in names
    for n in names:
        run_resafe("config", "--check", os.path.join(d, n))


# ---------------------------------------------------------------- end to end (real stages)


@pytest.fixture(scope="module")
def reference_run(files, tmp_path_factory):
    """One uninterrupted run (merge_compare = refit, so two merged models are built)."""
    d = tmp_path_factory.mktemp("train_ref")
    cfg = config(files, d / "c.ini", lora__merge_compare="refit")
    p = train(cfg, cwd=d)
    return d, cfg, p


@needs_stages
def test_whole_run_finishes_and_a_second_run_is_up_to_date(reference_run):
    d, cfg, p = reference_run
    for i, s in enumerate(STAGES):
        assert status(p.stdout, s)[-1].startswith(f"train [{i + 1}/6] {s}: done"), p.stdout
        assert os.path.exists(d / "run" / s / "manifest.json"), s
        assert not os.path.exists(d / "run" / s / "pending.json"), s
    assert (d / "run" / "triplets" / "patchset.h5").exists()
    assert (d / "run" / "dpo" / "adapter.h5").exists()
    assert (d / "run" / "merge" / "grid").is_dir() and (d / "run" / "merge" / "refit").is_dir()
    with open(d / "run" / "merge" / "merge.json") as f:
        merge = json.load(f)
    assert merge["chosen"] == "grid" and sorted(merge["modes"]) == ["grid", "refit"]
    assert (d / "run" / "eval" / "eval.json").exists()
    assert "patched_merged" in p.stdout and "quantized" in p.stdout
    before = mtimes(d / "run")
    p2 = train(cfg, cwd=d)
    for s in STAGES:
        assert status(p2.stdout, s) == [f"train [{STAGES.index(s) + 1}/6] {s}: up to date"]
    assert mtimes(d / "run") == before


@needs_stages
def test_changed_merge_mode_reruns_merge_but_not_dpo(files, reference_run, tmp_path):
    d, _, _ = reference_run
    subprocess.run(["cp", "-a", str(d / "run"), str(tmp_path / "run")], check=True)
    cfg = config(files, tmp_path / "c.ini", lora__merge_compare="refit")
    p = train(cfg, "--set", "lora.merge=refit", "--set", "lora.merge_compare=grid", cwd=tmp_path)
    for s in ("quantize", "triplets", "dpo"):
        assert status(p.stdout, s)[-1].endswith("up to date"), s
    assert "merge: running (inputs changed)" in p.stdout


@needs_stages
@pytest.mark.parametrize("stage", STAGES)
def test_stopped_after_each_stage_then_resumed_is_byte_identical(files, reference_run, tmp_path,
                                                                 stage):
    d, _, _ = reference_run
    cfg = config(files, tmp_path / "c.ini", lora__merge_compare="refit")
    p = train(cfg, cwd=tmp_path, check=False, env=dict(ENV, RESAFE_TEST_STOP_AFTER=stage))
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert not os.path.exists(tmp_path / "run" / stage / "manifest.json")
    p = train(cfg, cwd=tmp_path)
    assert status(p.stdout, stage)[0].startswith(f"train [{STAGES.index(stage) + 1}/6] {stage}: "
                                                 f"{'resuming' if stage == 'dpo' else 'running'}")
    ref, got = tree(d / "run"), tree(tmp_path / "run")
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name] == got[name], name


@needs_stages
def test_sigterm_during_dpo_then_resumed_is_byte_identical(files, reference_run, tmp_path):
    d, _, _ = reference_run
    cfg = config(files, tmp_path / "c.ini", lora__merge_compare="refit")
    metrics = tmp_path / "run" / "dpo" / "metrics.jsonl"
    proc = subprocess.Popen([resafe_bin(), "train", "--config", cfg], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before dpo could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not (tmp_path / "run" / "dpo" / "manifest.json").exists()
    p = train(cfg, cwd=tmp_path)
    assert "dpo: resuming from its checkpoint" in p.stdout
    ref, got = tree(d / "run"), tree(tmp_path / "run")
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name] == got[name], name


@needs_stages
def test_ablation_script_shares_quantize_and_triplets_and_writes_the_table(files, tmp_path):
    cfg = config(files, tmp_path / "c.ini")
    out = tmp_path / "abl"
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "ablation.sh"), cfg, str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(ENV, RESAFE=resafe_bin(), K_SMALL="2", TAUS="0"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = p.stdout.split("== ablation: ")[1:]
    assert [r.split("\n")[0] for r in runs] == ["tau_0", "k_once", "k_2"]
    for r in runs[1:]:  # only the first run quantizes and builds the patch set
        assert "quantize: up to date" in r and "triplets: up to date" in r, r
        assert "dpo: running" in r
    with open(out / "ablation.json") as f:
        rows = json.load(f)["rows"]
    assert [r["setting"] for r in rows] == ["tau_0", "k_once", "k_2"]
    assert rows[0]["tau"] == 0 and rows[1]["reidentify_every"] == "once"
    assert rows[2]["reidentify_every"] == 2
    assert all(r["asr_after_merge"] is not None for r in rows)
    md = (out / "ablation.md").read_text()
    assert "| tau_0 | 0 |" in md and "| k_once |" in md and "| k_2 |" in md
    first = os.stat(out / "tau_0" / "triplets" / "patchset.h5")
    assert os.stat(out / "k_2" / "triplets" / "patchset.h5").st_ino == first.st_ino


@needs_stages
def test_dpo_resumes_after_a_merge_only_change_and_its_adapter_is_unchanged(files, reference_run,
                                                                             tmp_path):
    d, _, _ = reference_run
    cfg = config(files, tmp_path / "c.ini", lora__merge_compare="refit")
    p = train(cfg, cwd=tmp_path, check=False, env=dict(ENV, RESAFE_TEST_STOP_AFTER="dpo"))
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    p = train(cfg, "--set", "lora.merge_compare=adapter", cwd=tmp_path)
    assert "dpo: resuming from its checkpoint" in p.stdout
    for name in ("adapter.h5", "metrics.jsonl", "checkpoint.h5"):
        assert (d / "run" / "dpo" / name).read_bytes() == (tmp_path / "run" / "dpo" / name).read_bytes()
    assert (tmp_path / "run" / "merge" / "adapter").is_dir()
    assert not (tmp_path / "run" / "merge" / "refit").exists()


def start_and_signal(cfg, cwd, signals):
    """Start `resafe train`, send each signal once the quantize stage has started (AWQ on the
    tiny model takes ~0.5 s), 10 ms apart; returns (returncode, stderr)."""
    proc = subprocess.Popen([resafe_bin(), "train", "--config", cfg], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    while not (cwd / "run" / "quantize" / "pending.json").exists() and time.time() < deadline:
        time.sleep(0.001)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_signal_stops_at_the_next_stage_boundary_and_a_second_one_at_once(files, tmp_path):
    over = {"quant__method": "awq", "quant__calib_file": files["harmful"],
            "quant__calib_column": "goal"}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cfg = config(files, tmp_path / "c.ini", **over)
    rc, err = start_and_signal(cfg, tmp_path / "a", [signal.SIGINT])
    assert rc == 128 + signal.SIGINT, err
    assert "interrupted (signal 2) before the triplets stage" in err
    assert (tmp_path / "a" / "run" / "quantize" / "manifest.json").exists()  # finished its work
    assert not (tmp_path / "a" / "run" / "triplets").exists()
    rc, err = start_and_signal(cfg, tmp_path / "b", [signal.SIGINT, signal.SIGINT])
    assert rc == -signal.SIGINT, err
    assert not (tmp_path / "b" / "run" / "quantize" / "manifest.json").exists()
    assert not (tmp_path / "b" / "run" / "quantize" / "model").exists()
