"""`resafe triplets` (the patch set) and `resafe dpo` on it, against independent references.

Models: tiny random Llama chat models (scripts/make_test_model.py, random seed per run) and
their RTN quantization (`resafe quantize`); the reference for the quantized model is
transformers on the `--export dequant --export-dtype f32` copy (the same rounding as a plain HF
directory). Prompts: a CSV file with a category column (quotes and commas in cells) and a JSONL
file without one, random sentences written by the test.

- winners / losers equal transformers' greedy `generate` on the FP model / the export, prompt
  ids equal `apply_chat_template` (with and without a system prompt); identical pairs are
  dropped and counted; sources, categories, rows and texts are stored right;
- the stored reference log-probs equal torch's sum of response-token log-probs on the export
  (relative 1e-4: fp32 on both sides, sums of ~10 terms);
- the same seed gives a byte-identical file, another seed another draw and order;
- errors are one line, exit 1, and leave no file;
- `resafe dpo` on the patch set starts at loss log 2 (policy = reference at step 0) and reads
  the stored reference (a shifted reference shifts the first loss as the DPO formula says).
"""
import csv
import glob
import importlib.util
import json
import math
import os
import random
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, run_resafe

transformers = pytest.importorskip("transformers")

WORDS = ["bread", "How", "do", "I", "bake", "the", "sea", "wind", "Paris", "capital", "of",
         "France?", "fox", "42", "17", "quick", "brown", "café", "poem", "blue", "sky", "add"]
CATEGORIES = ["cooking", "weather", "math, numbers", "geo \"quoted\""]
MAX_NEW = 12


def load_script():
    spec = importlib.util.spec_from_file_location(
        "make_test_model", os.path.join(ROOT, "scripts", "make_test_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_model(out, seed, vocab=384):
    """A tiny random Llama chat model in out (what scripts/make_test_model.py writes)."""
    mk = load_script()
    os.makedirs(out, exist_ok=True)
    tok = mk.make_tokenizer(vocab)
    mk.write_tokenizer(tok, out)
    mk.make_model(tok, out, seed, 64, 2)
    return out


def quantize(src, out, bits, group, export=False):
    args = ["quantize", "--model", src, "--method", "rtn", "--bits", bits, "--group", group,
            "--out", out]
    if export:
        args += ["--export", "dequant", "--export-dtype", "f32"]
    run_resafe(*args)


def sentence(rnd):
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 8)))


def write_prompts(d, rnd, n_harmful, n_benign):
    """harmful.csv (prompt, category) and benign.jsonl ({"prompt"} only)."""
    harmful = [(sentence(rnd) + rnd.choice(["", ", and more", " \"now\""]), rnd.choice(CATEGORIES))
               for _ in range(n_harmful)]
    benign = [sentence(rnd) for _ in range(n_benign)]
    with open(os.path.join(d, "harmful.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "category"])
        for i, (p, c) in enumerate(harmful):
            w.writerow([i, p, c])
    with open(os.path.join(d, "benign.jsonl"), "w") as f:
        for p in benign:
            f.write(json.dumps({"prompt": p, "n": 1}) + "\n")
    return harmful, benign


def write_config(d, fp, q, **patch):
    keys = {"harmful_file": os.path.join(d, "harmful.csv"),
            "benign_file": os.path.join(d, "benign.jsonl"), "max_new_tokens": MAX_NEW}
    keys.update(patch)
    lines = ["[model]", f"path = {fp}", "backend = cpu", "threads = 1", "[quant]", f"model = {q}",
             "[patch]"] + [f"{k} = {v}" for k, v in keys.items()] + [
             "[dpo]", "batch_size = 4", "max_steps = 1", "beta = 0.1", "[lora]", "rank = 4",
             "alpha = 8", "[run]", f"out_dir = {os.path.join(d, 'run')}", "checkpoint_every = 0",
             "progress = off"]
    path = os.path.join(d, "run.ini")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def read_patchset(path):
    with h5py.File(path, "r") as f:
        def parts(name):
            ids, off = f[f"{name}_ids"][:], f[f"{name}_offsets"][:]
            return [ids[off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
        strings = {k: [s.decode() for s in f[k][:]] for k in
                   ("prompt", "winner_text", "loser_text", "source", "category")}
        return dict(prompt_ids=parts("prompt"), winner=parts("winner"), loser=parts("loser"),
                    rows=f["source_row"][:].tolist(), ref_w=f["ref_winner"][:],
                    ref_l=f["ref_loser"][:], attrs=dict(f.attrs), **strings)


def chat_ids(tok, prompt, system):
    msgs = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def hf_greedy(model, ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW,
                             pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(ids):].tolist()


def hf_logp(model, prompt, response):
    """Sum of log p(response token | everything before it), fp64 accumulation of fp32 logits."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(response))


def one_error_line(p):
    lines = [l for l in p.stderr.splitlines() if l.startswith("resafe: error:")]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    return lines[0]


def no_patchset_left(d):
    left = glob.glob(os.path.join(d, "run", "triplets", "*")) + glob.glob(os.path.join(d, "*.h5*"))
    assert left == [], left


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=[(4, 32, ""), (8, 0, "You answer briefly.")],
                ids=["int4-g32", "int8-row-system"])
def setup(request, tmp_path_factory):
    """An FP model, its quantization (bits, group) and f32 export; 5 + 5 prompts."""
    bits, group, system = request.param
    seed = int(os.environ.get("RESAFE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed {seed} (replay with RESAFE_TEST_SEED={seed})")
    d = str(tmp_path_factory.mktemp("triplets"))
    rnd = random.Random(seed)
    harmful, benign = write_prompts(d, rnd, 5, 5)
    # the first of a few models (seeds derived from the test's) whose quantization answers some
    # harmful prompt otherwise than FP does, with a non-empty first line from FP (by transformers
    # greedy on the dequantized export): the tests then run at every seed instead of skipping
    for k in range(8):
        fp = make_model(os.path.join(d, f"fp{k}"), seed % 100000 + bits + 1000 * k)
        q, e = os.path.join(d, f"q{k}"), os.path.join(d, f"e{k}")
        quantize(fp, q, bits, group)
        quantize(fp, e, bits, group, export=True)
        tok = transformers.AutoTokenizer.from_pretrained(fp)
        load = transformers.AutoModelForCausalLM.from_pretrained
        mf, me = (load(m, dtype=torch.float32).eval() for m in (fp, e))
        differ = 0
        for prompt, _ in harmful:
            ids = chat_ids(tok, prompt, system)
            win, lose = hf_greedy(mf, ids), hf_greedy(me, ids)
            text = tok.decode(win, skip_special_tokens=True).replace("\0", "\ufffd")
            differ += win != lose and bool(judge_text(text).split("\n")[0].strip())
        if differ:
            break
    print(f"model {k}: {differ} harmful prompts answered otherwise when quantized")
    return dict(d=d, fp=fp, q=q, e=e, harmful=harmful, benign=benign, system=system, rnd=rnd,
                seed=seed)


@pytest.fixture(scope="module")
def hf(setup):
    tok = transformers.AutoTokenizer.from_pretrained(setup["fp"])
    load = transformers.AutoModelForCausalLM.from_pretrained
    return (tok, load(setup["fp"], dtype=torch.float32).eval(),
            load(setup["e"], dtype=torch.float32).eval())


def triplets(setup, cfg, *args, out=None, check=True):
    extra = ["--out", out] if out else []
    return run_resafe("triplets", "--config", cfg, "--set",
                      f"generate.system_prompt={setup['system']}", *extra, *args, check=check,
                      env=dict(os.environ, OMP_NUM_THREADS="1"))


def patchset_or_skip(setup, cfg, out):
    """The patch set the config gives, or a skip when every response is identical at this seed
    (test_pairs_equal_transformers_greedy_and_identical_pairs_are_dropped checks that case)."""
    p = triplets(setup, cfg, out=out, check=False)
    if p.returncode != 0:
        assert "identical" in one_error_line(p)
        pytest.skip("every response identical at this seed")
    return read_patchset(out)


# ---------------------------------------------------------------- tests

def test_pairs_equal_transformers_greedy_and_identical_pairs_are_dropped(setup, hf, tmp_path):
    """Every row drawn (10 asked of 5 + 5): the kept pairs are exactly the rows where greedy
    transformers on the FP model and on the dequantized export answer differently."""
    tok, fp_model, q_model = hf
    cfg = write_config(setup["d"], setup["fp"], setup["q"], n_prompts=10, harmful_fraction=0.5)
    out = str(tmp_path / "ps.h5")
    p = triplets(setup, cfg, out=out, check=False)
    want = {}
    for src, rows in (("harmful", [h for h, _ in setup["harmful"]]), ("benign", setup["benign"])):
        for row, text in enumerate(rows):
            ids = chat_ids(tok, text, setup["system"])
            want[(src, row)] = (text, ids, hf_greedy(fp_model, ids), hf_greedy(q_model, ids))
    differ = {k for k, v in want.items() if v[2] != v[3]}
    print(f"{len(differ)} of {len(want)} prompts answered differently")
    if not differ:  # possible at 8 bits: the stage must refuse with no file
        assert "identical" in one_error_line(p) and not os.path.exists(out)
        return
    assert p.returncode == 0, p.stderr
    ps = read_patchset(out)
    keys = list(zip(ps["source"], ps["rows"]))
    assert set(keys) == differ and len(keys) == len(differ)
    a = ps["attrs"]
    assert a["n_identical"] == len(want) - len(differ) and a["n_pairs"] == len(differ)
    assert a["n_harmful_prompts"] == 5 and a["n_benign_prompts"] == 5
    assert a["n_harmful_pairs"] == sum(s == "harmful" for s in ps["source"])
    assert f"{len(differ)} pairs kept" in p.stdout
    for i, key in enumerate(keys):
        text, ids, win, lose = want[key]
        assert ps["prompt"][i] == text
        assert ps["prompt_ids"][i] == ids
        assert ps["winner"][i] == win and ps["loser"][i] == lose
        # NUL (a <0x00> byte token) is stored as U+FFFD: HDF5 strings end at NUL
        assert ps["winner_text"][i] == tok.decode(win, skip_special_tokens=True).replace("\0", "\ufffd")
        assert ps["loser_text"][i] == tok.decode(lose, skip_special_tokens=True).replace("\0", "\ufffd")
        src, row = key
        assert ps["category"][i] == (setup["harmful"][row][1] if src == "harmful" else "benign")
    # [patch] min_pairs: one more than the pairs transformers counts refuses, with no file
    out2 = str(tmp_path / "few.h5")
    p = triplets(setup, cfg, "--set", f"patch.min_pairs={len(differ) + 1}", out=out2, check=False)
    line = one_error_line(p)
    assert f"only {len(differ)} of {len(want)}" in line and "min_pairs" in line, line
    assert not os.path.exists(out2)
    p = triplets(setup, cfg, "--set", f"patch.min_pairs={len(differ)}", out=out2, check=False)
    assert p.returncode == 0 and read_patchset(out2)["attrs"]["n_pairs"] == len(differ)


def judge_text(t):
    """src/eval_judge.c's normalisation: U+2019 becomes an ASCII apostrophe."""
    return t.replace("\u2019", "'")


def test_harmful_winner_refusal_keeps_harmful_pairs_whose_fp_winner_refuses(setup, tmp_path):
    """[patch] harmful_winner = refusal keeps a harmful pair only when the [eval] refusal judge
    finds a phrase in FP's response (the winner); benign pairs all stay. Reference: the default
    (any) patch set filtered here by substring search, with a phrase cut from one harmful winner
    (so that winner is kept and others are kept or dropped by what they say); then a phrase no
    response holds drops every harmful pair (or, with no benign pair, fails with one line)."""
    cfg = write_config(setup["d"], setup["fp"], setup["q"], n_prompts=10, harmful_fraction=0.5)
    ps = patchset_or_skip(setup, cfg, str(tmp_path / "any.h5"))
    assert ps["attrs"]["n_complying_winners_dropped"] == 0  # the default keeps every pair
    keys = list(zip(ps["source"], ps["rows"]))
    harm = [i for i, s in enumerate(ps["source"])
            if s == "harmful" and judge_text(ps["winner_text"][i]).split("\n")[0].strip()]
    if not harm:
        pytest.skip("no harmful pair with a non-empty winner at this seed")
    words = judge_text(ps["winner_text"][harm[0]]).split("\n")[0].split()
    phrase = " ".join(words[len(words) // 2:len(words) // 2 + 2])
    for name, phr in (("cut", phrase), ("none", "\u2603 no response says this \u2603")):
        phrases = tmp_path / f"{name}.txt"
        phrases.write_text(phr + "\n", encoding="utf-8")
        want = [k for i, k in enumerate(keys)
                if k[0] == "benign" or phr in judge_text(ps["winner_text"][i])]
        out = str(tmp_path / f"{name}.h5")
        p = triplets(setup, cfg, "--set", "patch.harmful_winner=refusal", "--set",
                     f"eval.refusal_phrases={phrases}", out=out, check=False)
        if not want:
            line = one_error_line(p)
            assert "harmful_winner" in line and not os.path.exists(out), line
            continue
        assert p.returncode == 0, p.stderr
        got = read_patchset(out)
        assert list(zip(got["source"], got["rows"])) == want, (phr, want)
        assert got["attrs"]["n_complying_winners_dropped"] == len(keys) - len(want)
        assert got["attrs"]["n_pairs"] == len(want)
        if len(want) < len(keys):
            assert f"{len(keys) - len(want)} harmful pairs with a complying FP winner" in p.stdout
        print(f"phrase {phr!r}: {len(want)} of {len(keys)} pairs kept")


def test_reference_logprobs_equal_torch_on_the_dequantized_export(setup, hf, tmp_path):
    tok, _, q_model = hf
    cfg = write_config(setup["d"], setup["fp"], setup["q"], n_prompts=10)
    ps = patchset_or_skip(setup, cfg, str(tmp_path / "ps.h5"))
    worst = 0.0
    for i in range(len(ps["prompt"])):
        for resp, ref in ((ps["winner"][i], ps["ref_w"][i]), (ps["loser"][i], ps["ref_l"][i])):
            want = hf_logp(q_model, ps["prompt_ids"][i], resp)
            worst = max(worst, abs(float(ref) - want) / abs(want))
    print(f"reference log-probs: worst relative error {worst:.3g}")
    assert worst <= 1e-4


def test_counts_follow_harmful_fraction_and_too_long_prompts_are_skipped(setup, tmp_path):
    """10 prompts asked at fraction 0.3 -> 3 harmful and 7 benign, of which only 5 + 1 exist
    (one benign row is longer than the model's 512 positions): the file's counts say so."""
    d = str(tmp_path)
    for name in ("harmful.csv", "benign.jsonl"):
        shutil.copy(os.path.join(setup["d"], name), d)
    with open(os.path.join(d, "benign.jsonl"), "a") as f:
        f.write(json.dumps({"prompt": " ".join(["quick brown fox"] * 200)}) + "\n")
    cfg = write_config(d, setup["fp"], setup["fp"], n_prompts=10, harmful_fraction=0.3)
    # the FP model as its own "quantized" model: every pair is identical, so the counts are
    # checked through the refusal message; then through a real quantized model
    p = triplets(setup, cfg, check=False)
    assert "identical" in one_error_line(p)
    cfg = write_config(d, setup["fp"], setup["q"], n_prompts=10, harmful_fraction=0.3)
    p = triplets(setup, cfg, check=False)
    assert "fewer than the 7 benign prompts asked" in p.stderr
    assert "1 prompts skipped" in p.stderr
    if p.returncode != 0:
        assert "identical" in one_error_line(p)
        return
    a = read_patchset(os.path.join(d, "run", "triplets", "patchset.h5"))["attrs"]
    assert (a["n_harmful_prompts"], a["n_benign_prompts"], a["n_too_long"]) == (3, 6, 1)
    assert a["n_pairs"] + a["n_identical"] == 8 and a["n_prompts_asked"] == 10
    # harmful only: no benign file needed; 4 distinct rows of the 5
    cfg = write_config(d, setup["fp"], setup["q"], n_prompts=4, harmful_fraction=1,
                       benign_file="")
    p = triplets(setup, cfg, check=False)
    if p.returncode != 0:
        assert "identical" in one_error_line(p)
        return
    ps = read_patchset(os.path.join(d, "run", "triplets", "patchset.h5"))
    assert (ps["attrs"]["n_harmful_prompts"], ps["attrs"]["n_benign_prompts"]) == (4, 0)
    assert set(ps["source"]) == {"harmful"} and len(set(ps["rows"])) == len(ps["rows"])


def test_same_seed_same_bytes_other_seed_other_order(setup, tmp_path):
    cfg = write_config(setup["d"], setup["fp"], setup["q"], n_prompts=8,
                       harmful_fraction=0.5, temperature=0.8)
    outs = [str(tmp_path / f"{k}.h5") for k in ("a", "b", "c")]
    rcs = []
    for out, seed in zip(outs, (11, 11, 12)):
        rcs.append(triplets(setup, cfg, "--set", f"run.seed={seed}", out=out,
                            check=False).returncode)
    if rcs != [0, 0, 0]:
        pytest.skip("every sampled response identical at this seed")
    a, b, c = (open(o, "rb").read() for o in outs)
    assert a == b
    pa, pc = read_patchset(outs[0]), read_patchset(outs[2])
    assert list(zip(pa["source"], pa["rows"])) != list(zip(pc["source"], pc["rows"]))


def test_errors_are_one_line_and_leave_no_file(setup, tmp_path):
    d = str(tmp_path)
    for name in ("harmful.csv", "benign.jsonl"):
        shutil.copy(os.path.join(setup["d"], name), d)
    cfg = write_config(d, setup["fp"], setup["q"], n_prompts=4,
                       harmful_file=os.path.join(d, "missing.csv"))
    line = one_error_line(triplets(setup, cfg, check=False))
    assert "missing.csv" in line
    no_patchset_left(d)
    cfg = write_config(d, setup["fp"], setup["q"], n_prompts=4, benign_column="goal")
    line = one_error_line(triplets(setup, cfg, check=False))
    assert "benign.jsonl" in line and "'goal'" in line
    no_patchset_left(d)
    other = make_model(os.path.join(d, "other"), 1, vocab=300)
    vocab = json.load(open(os.path.join(other, "config.json")))["vocab_size"]
    cfg = write_config(d, setup["fp"], other, n_prompts=4)
    line = one_error_line(triplets(setup, cfg, check=False))
    fp_vocab = json.load(open(os.path.join(setup["fp"], "config.json")))["vocab_size"]
    assert f"differ: vocab {fp_vocab} vs {vocab}" in line, line
    no_patchset_left(d)
    cfg = write_config(d, setup["fp"], setup["fp"], n_prompts=4)
    line = one_error_line(triplets(setup, cfg, check=False))
    assert "identical" in line
    no_patchset_left(d)
    with open(os.path.join(d, "benign.jsonl"), "a") as f:
        f.write(json.dumps({"text": "no prompt member"}) + "\n")
    n_lines = len(open(os.path.join(d, "benign.jsonl")).readlines())
    cfg = write_config(d, setup["fp"], setup["q"], n_prompts=20)  # every row drawn
    line = one_error_line(triplets(setup, cfg, check=False))
    assert f"benign.jsonl:{n_lines}: no string member 'prompt'" in line, line
    no_patchset_left(d)
    p = run_resafe("triplets", "--config", cfg, "--bogus", check=False)
    assert p.returncode == 2
    p = run_resafe("triplets", check=False)
    assert p.returncode == 2


def test_dpo_on_the_patch_set_starts_at_log2_and_reads_the_stored_reference(setup, tmp_path):
    d = str(tmp_path)
    for name in ("harmful.csv", "benign.jsonl"):
        shutil.copy(os.path.join(setup["d"], name), d)
    cfg = write_config(d, setup["fp"], setup["q"], n_prompts=10)
    p = triplets(setup, cfg, check=False)
    if p.returncode != 0:
        assert "identical" in one_error_line(p)
        pytest.skip("every response identical at this seed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    metrics = os.path.join(d, "run", "dpo", "metrics.jsonl")

    def first_step(*sets):
        args = [a for s in sets for a in ("--set", s)]
        r = run_resafe("dpo", "--config", cfg, "--force", *args, env=env)
        return json.loads(open(metrics).readline()), r.stderr

    # data_file empty: the run's patch set on the run's quantized model
    m, err = first_step()
    assert abs(m["loss"] - math.log(2)) < 1e-6 and m["margin"] == 0, m
    assert "from the patch set" in err and "reference log-probs of" not in err
    # a reference shifted by c: z = c at step 0, loss = softplus(-beta c)
    ps = os.path.join(d, "run", "triplets", "patchset.h5")
    shifted = os.path.join(d, "shifted.h5")
    shutil.copy(ps, shifted)
    c = 5.0
    with h5py.File(shifted, "r+") as f:
        f["ref_winner"][...] = f["ref_winner"][:] - np.float32(c)
    m, err = first_step(f"dpo.data_file={shifted}", f"model.path={setup['q']}")
    assert abs(m["loss"] - math.log1p(math.exp(-0.1 * c))) < 1e-5, m
    assert "were computed on the quantized model" not in err
    # another model than the one the reference came from: a warning
    _, err = first_step(f"dpo.data_file={ps}", f"model.path={setup['e']}")
    assert "were computed on the quantized model" in err
    # responses cut by max_seq_len: the stored reference no longer applies and is recomputed
    longest = max(len(s) for s in read_patchset(ps)["prompt_ids"])
    m, err = first_step(f"dpo.max_seq_len={longest + 2}")
    assert "recomputing" in err and abs(m["loss"] - math.log(2)) < 1e-6, m
    # a malformed patch set: one line naming the file and the dataset
    with h5py.File(shifted, "r+") as f:
        off = f["loser_offsets"][:]
        off[-1] += 1  # past the end of loser_ids
        f["loser_offsets"][...] = off
    r = run_resafe("dpo", "--config", cfg, "--force", "--set", f"dpo.data_file={shifted}",
                   check=False, env=env)
    line = one_error_line(r)
    assert "shifted.h5" in line and "loser_offsets" in line
