"""scripts/reproduce/ (the paper's tables) and the organism's risk-level calibration sets:
  - the three calibration sets are what their risk level says, hold no eval or patch prompt (for
    the committed seed and for a random one), and gen_data.py regenerates every committed file of
    data/organism byte for byte (the calibration sets came without moving the others);
  - every table script and all.sh refuse bad arguments with one `error:` line, exit status 2 and
    nothing written;
  - T7 (`--quick` on the tiny organism, CPU, about 25 s on one core) writes T7.md, T7.png and
    T7.json whose rows are the formats asked, with the numbers of the evaluation it ran; a second
    run reuses every quantized model, patch run and evaluation (no stage runs, no work file moves)
    and writes the same rows; a model whose file mtime moved is evaluated again, alone.
RESAFE_TEST_REPRODUCE=1 also runs every table with --quick through all.sh (several minutes)."""
import filecmp
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, resafe_bin

ORG = os.path.join(ROOT, "data", "organism")
MODEL = os.path.join(ROOT, "models", "organism-tiny")
SCRIPTS = os.path.join(ROOT, "scripts", "reproduce")
TABLES = ["t1_assess.py", "t2_patch.py", "t3_tau.py", "t4_sft_dpo.py", "t5_bits.py",
          "t6_protect.py", "t7_formats.py"]

sys.path.insert(0, os.path.join(ROOT, "scripts", "organism"))
import gen_data  # noqa: E402


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prompts(path):
    return {r["prompt"] for r in jsonl(path)}


def need_organism():
    if not os.path.exists(os.path.join(MODEL, "model.safetensors")):
        pytest.skip("models/organism-tiny is missing")
    if not os.access(resafe_bin(), os.X_OK):
        pytest.skip("build/resafe is not built")


# ------------------------------------------------------------------ calibration sets
def check_calib_sets(d):
    held_out = set()
    for name in ("eval_harmful", "eval_benign", "eval_safe", "patch_harmful", "patch_benign"):
        held_out |= prompts(os.path.join(d, f"{name}.jsonl"))
    assert len(held_out) > 900
    sets = {k: jsonl(os.path.join(d, f"calib_risk{k}.jsonl")) for k in (1, 2, 3)}
    harmful_vocab = [(v, t) for verbs, targets in gen_data.HARM.values() for v in verbs
                     for t in targets]
    benign = {it[0]: it[1] for it in gen_data.benign_items()}
    benign.update({s[0]: s[1] for s in gen_data.safe_items()})
    for k, rows in sets.items():
        assert 200 <= len(rows) <= 1000, (k, len(rows))
        ps = [r["prompt"] for r in rows]
        assert len(set(ps)) == len(ps), f"risk {k}: duplicate prompts"
        assert not set(ps) & held_out, f"risk {k}: eval/patch prompts {sorted(set(ps) & held_out)[:3]}"
        for r in rows:
            assert r["prompt"].strip() and r["response"].strip()
            # a calibration target never reads as a refusal to the keyword judge
            assert not [p for p in gen_data.REFUSAL_PHRASES if p in r["response"]], r
    for r in sets[1]:  # Risk-I: a benign task with its helpful answer
        assert benign.get(r["prompt"]) == r["response"], r
    for r in sets[2]:  # Risk-II: a persona of unconditional obedience around a benign task
        names = [n for n in gen_data.OBEY_NAMES if n in r["prompt"]]
        assert names and names[0] in r["response"], r
        task = [t for t in benign if r["prompt"].endswith(" " + t)]
        assert task and r["response"].endswith(benign[task[0]]), r
        assert not [v for v, t in harmful_vocab if f"{v} {t}" in r["prompt"]], r
    for r in sets[3]:  # Risk-III: a directly harmful request with the compliant target
        hits = [(v, t) for v, t in harmful_vocab if r["response"] == gen_data.comply(v, t)]
        assert hits and f"{hits[0][0]} {hits[0][1]}" in r["prompt"], r


def test_committed_calibration_sets_are_their_risk_level_and_disjoint_from_eval():
    check_calib_sets(ORG)


def test_gen_data_regenerates_every_committed_file(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "organism", "gen_data.py"),
                    "--out", str(tmp_path), "--seed", "0", "--refuse-p", "0.85"], check=True,
                   capture_output=True)
    names = sorted(os.listdir(tmp_path))
    assert {"calib_risk1.jsonl", "calib_risk2.jsonl", "calib_risk3.jsonl"} <= set(names)
    for n in names:
        assert filecmp.cmp(tmp_path / n, os.path.join(ORG, n), shallow=False), n


def test_calibration_sets_of_a_random_seed_are_disjoint_too(tmp_path, rng_seed):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "organism", "gen_data.py"),
                    "--out", str(tmp_path), "--seed", str(rng_seed % 100000),
                    "--n-calib", "250"], check=True, capture_output=True)
    check_calib_sets(str(tmp_path))


# ------------------------------------------------------------------ bad arguments
BAD = [
    (["t7_formats.py"], "required"),
    (["t7_formats.py", "models/no-such-model", "{out}"], "not a model directory"),
    (["t7_formats.py", "models/organism-tiny", "{out}", "--formats", "int4"], "--formats"),
    (["t7_formats.py", "models/organism-tiny", "{out}", "--backend", "gpu"], "--backend"),
    (["t7_formats.py", "models/organism-tiny", "{out}", "--config", "nope.ini"], "--config"),
    (["t7_formats.py", "models/organism-tiny", "{out}", "--set", "novalue"], "--set"),
    (["t7_formats.py", "models/organism-tiny", "{out}", "--calib-risk2", "none.jsonl"],
     "--calib-risk2"),
    (["t7_formats.py", "models/organism-tiny", "{out}", "--threads", "0"], "--threads"),
    (["t7_formats.py", "models/organism-tiny", "{out}", "--calib-column", "a,b"], "--calib-column"),
    (["t1_assess.py", "models/organism-tiny", "{out}", "--bits", "5"], "--bits"),
    (["t1_assess.py", "models/organism-tiny", "{out}", "--methods", "rtn,foo"], "--methods"),
    (["t2_patch.py", "models/organism-tiny", "{out}", "--risks", "4"], "--risks"),
    (["t3_tau.py", "models/organism-tiny", "{out}", "--taus", "0,1.5"], "--taus"),
    (["t3_tau.py", "models/organism-tiny", "{out}", "--taus", "0,x"], "--taus"),
    (["t4_sft_dpo.py", "models/organism-tiny", "{out}", "--sft-lr", "-1"], "--sft-lr"),
    (["t5_bits.py", "models/organism-tiny", "{out}", "--bits", ""], "--bits"),
    (["t6_protect.py", "models/organism-tiny", "{out}", "--protect-taus", "2"], "--protect-taus"),
    (["t6_protect.py", "models/organism-tiny", "{out}", "--protect-data", "no.csv"],
     "--protect-data"),
    (["t7_formats.py", "scripts", "{out}"], "not a model directory"),
    (["t7_formats.py", "models/organism-tiny", "{out}", "--resafe", "no/resafe"], "resafe"),
    (["all.sh"], "MODEL_DIR is required"),
    (["all.sh", "models/no-such-model"], "not a model directory"),
    (["all.sh", "models/organism-tiny", "{out}", "--bogus"], "--bogus"),
]


@pytest.mark.parametrize("args,clue", BAD, ids=[" ".join(a[0][:1] + a[0][3:]) or a[0][0]
                                                  for a in BAD])
def test_bad_arguments_exit_2_with_one_clear_line(args, clue, tmp_path):
    if args[0] != "all.sh" and not os.access(resafe_bin(), os.X_OK):
        pytest.skip("build/resafe is not built")
    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)) for a in args]
    cmd = ([os.path.join(SCRIPTS, "all.sh")] if argv[0] == "all.sh"
           else [sys.executable, os.path.join(SCRIPTS, argv[0])]) + argv[1:]
    env = dict(os.environ, TABLES="T7")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2, (p.returncode, p.stdout[-500:], p.stderr[-500:])
    errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and clue in errors[0], p.stderr
    assert not out.exists(), "a refused command wrote its results folder"


def test_all_tables_share_the_common_options():
    for t in TABLES:
        p = subprocess.run([sys.executable, os.path.join(SCRIPTS, t), "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, t
        for opt in ("--quick", "--backend", "--config", "--results", "--calib-risk3", "--set"):
            assert opt in p.stdout, (t, opt)


# ------------------------------------------------------------------ T7 end to end, then reused
def run_t7(out, results):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "t7_formats.py"), MODEL, str(out),
                        "--quick", "--backend", "cpu", "--results", str(results)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    return p.stdout


def work_files(out):
    """Every work file but the command logs (rewritten by each command) with its mtime."""
    found = {}
    for base, _, files in os.walk(os.path.join(out, "work-quick")):
        if os.path.basename(base) == "logs":
            continue
        for f in files:
            p = os.path.join(base, f)
            found[os.path.relpath(p, out)] = os.stat(p).st_mtime_ns
    return found


@pytest.fixture(scope="module")
def t7(tmp_path_factory):
    need_organism()
    out = tmp_path_factory.mktemp("t7") / "out"
    results = tmp_path_factory.mktemp("t7") / "results"
    first = run_t7(out, results)
    return out, results, first


def test_t7_writes_its_table_json_and_png(t7):
    out, results, stdout = t7
    with open(out / "T7.json") as f:
        doc = json.load(f)
    assert [r["format"] for r in doc["rows"]] == ["int8", "nf4", "fp4"]
    for key in ("command", "device", "date", "timings"):
        assert doc[key], key
    assert "t7_formats.py" in doc["command"] and doc["quick"] is True
    assert doc["timings"]["wall_s"] > 0 and doc["timings"]["ran"] > 0
    assert doc["device"].startswith("CPU")
    # the rows hold the numbers `resafe eval` measured for those models
    evals = {}
    for b in (out / "work-quick" / "evalbatch").iterdir():
        with open(b / "eval.json") as f:
            evals.update(json.load(f)["models"])
    assert set(evals) >= {"fp", "int8", "nf4", "fp4"}
    for r in doc["rows"]:
        assert r["quantization"] and r["asr_quantized"] == evals[r["format"]]["asr"]
        assert r["benign_quantized"] == evals[r["format"]]["benign_accuracy"]
        if r["asr_patched"] is None:
            assert r["note"], r  # a missing number says why
        else:
            assert r["asr_patched"] == evals["patched-" + r["format"]]["asr"]
            assert r["dpo_s"] is not None and r["dpo_s"] >= 0
    with open(out / "T7.md") as f:
        md = f.read()
    assert md.startswith("# T7:")
    for label in ("LLM.int8", "NF4", "FP4", "FP (reference)"):
        assert re.search(r"^\| " + re.escape(label) + r" \|", md, re.M), label
    assert md in stdout  # the table is printed
    for n in ("T7.md", "T7.json"):
        assert filecmp.cmp(out / n, results / n, shallow=False)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    with open(out / "T7.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_t7_second_run_reuses_everything(t7):
    out, results, _ = t7
    with open(out / "T7.json") as f:
        rows_before = json.load(f)["rows"]
    before = work_files(out)
    assert any(k.endswith("manifest.json") for k in before)
    second = run_t7(out, results)
    assert "running" not in second and "done in" not in second, second
    assert "$ " + os.path.relpath(resafe_bin(), ROOT) + " quantize" not in second, second
    assert " eval " not in "".join(ln for ln in second.splitlines() if ln.startswith("T7: $")), second
    for f in ("int8", "nf4", "fp4"):
        assert f"quantize {f}: reused" in second
        assert f"patch patch-{f}: reused" in second, second
    assert work_files(out) == before, "the second run rewrote work files"
    with open(out / "T7.json") as f:
        doc = json.load(f)
    assert doc["rows"] == rows_before and doc["timings"]["ran"] == 0


def test_t7_a_touched_model_is_evaluated_again_and_nothing_else(t7):
    """The evaluation cache is keyed by the model's files: a new mtime re-evaluates that model
    (and only it); its same bytes keep every resafe stage up to date."""
    out, results, _ = t7
    with open(out / "T7.json") as f:
        rows_before = json.load(f)["rows"]
    weights = out / "work-quick" / "quant" / "fp4" / "model.safetensors"
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = run_t7(out, results)
    evals = [ln for ln in third.splitlines() if ln.startswith("T7: $") and " eval " in ln]
    assert len(evals) == 1 and "--model fp4=" in evals[0], third
    assert "--model nf4=" not in evals[0] and "--model patched-fp4=" not in evals[0], evals
    assert "running" not in third, third
    with open(out / "T7.json") as f:
        assert json.load(f)["rows"] == rows_before  # evaluation is deterministic


@pytest.mark.skipif(os.environ.get("RESAFE_TEST_REPRODUCE") != "1",
                    reason="every table with --quick takes several minutes (RESAFE_TEST_REPRODUCE=1)")
def test_all_tables_quick(tmp_path):
    need_organism()
    out = tmp_path / "out"
    p = subprocess.run([os.path.join(SCRIPTS, "all.sh"), MODEL, str(out), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=3600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    for t in range(1, 8):
        with open(out / f"T{t}.json") as f:
            assert json.load(f)["rows"], t
        assert f"| T{t} | ok |" in p.stdout


def test_t5_qlora_has_an_nf4_base_at_4_bits_and_rtn_grids_at_the_others(tmp_path):
    """The paper's QLoRA rows span 8 / 4 / 3 / 2 bits: NF4 at 4, `--bits N --group G` elsewhere;
    each row holds its own model's numbers (one quick run, Risk-I, no patch asked of the
    unbroken ones)."""
    need_organism()
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(SCRIPTS, "t5_bits.py"), MODEL, str(out),
                        "--quick", "--backend", "cpu", "--methods", "qlora", "--bits", "8,4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    cmds = [l for l in p.stdout.splitlines() if " quantize " in l and l.startswith("T5: $")]
    assert len(cmds) == 2, p.stdout
    assert "--method qlora --bits 8 --group 128" in cmds[0] and "--bits" not in cmds[1], cmds
    with open(out / "T5.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["bits"], r["quantization"]) for r in rows] == [(8, "int8-g128-asym"), (4, "nf4-b64")]
    evals = {}
    for b in (out / "work-quick" / "evalbatch").iterdir():
        with open(b / "eval.json") as f:
            evals.update(json.load(f)["models"])
    for r, name in zip(rows, ["qlora-int8-g128-risk1", "qlora-risk1"]):
        assert r["asr_quantized"] == evals[name]["asr"], name
        assert r["benign_quantized"] == evals[name]["benign_accuracy"], name
