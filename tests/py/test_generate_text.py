"""The text paths of `resafe generate` (--prompt, --prompts-file, --chat) on the tiny chat model
of scripts/make_test_model.py, against transformers: prompt ids equal the HF tokenizer's (plain:
add_special_tokens=True; --chat: apply_chat_template with the generation prompt), greedy ids equal
model.generate, and the text equals tokenizer.decode(ids, skip_special_tokens=True)."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_resafe

transformers = pytest.importorskip("transformers")

WORDS = ["bread", "How", "do", "I", "bake", "the", "sea", "wind", "Paris", "capital", "of",
         "France?", "fox", "42", "17", "quick", "brown", "café", "日本", "!"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    seed = int(os.environ.get("RESAFE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed {seed}")
    out = str(tmp_path_factory.mktemp("chat") / "model")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_test_model.py"), out,
                    "--seed", str(seed % 1000)], check=True, capture_output=True)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return out, tok, model, random.Random(seed)


def sentence(rnd):
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 8)))


def jsonl(p):
    return [json.loads(line) for line in p.stdout.splitlines()]


def hf_greedy(model, ids, n_new):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n_new,
                             pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(ids):].tolist()


def test_plain_prompts_match_hf_tokenizer_and_generate(chat_model):
    path, tok, model, rnd = chat_model
    prompts = [sentence(rnd) for _ in range(3)]
    args = []
    for p in prompts:
        args += ["--prompt", p]
    rows = jsonl(run_resafe("generate", "--model", path, "--backend", "cpu", "--format", "jsonl",
                            "--max-new-tokens", 12, *args))
    assert [r["prompt"] for r in rows] == prompts
    for r, p in zip(rows, prompts):
        assert r["prompt_ids"] == tok(p).input_ids
        assert r["ids"] == hf_greedy(model, r["prompt_ids"], 12)
        assert r["text"] == tok.decode(r["ids"], skip_special_tokens=True)


def test_chat_prompts_match_apply_chat_template(chat_model, tmp_path):
    path, tok, model, rnd = chat_model
    prompts = [sentence(rnd) for _ in range(2)]
    system = sentence(rnd)
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n\n")
    rows = jsonl(run_resafe("generate", "--model", path, "--backend", "cpu", "--format", "jsonl",
                            "--chat", "--system", system, "--prompts-file", f,
                            "--max-new-tokens", 8))
    assert len(rows) == 2
    for r, p in zip(rows, prompts):
        want = tok.apply_chat_template([{"role": "system", "content": system},
                                        {"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert r["prompt_ids"] == list(want)
        assert r["ids"] == hf_greedy(model, r["prompt_ids"], 8)


def test_text_format_prints_the_decoded_response(chat_model):
    path, tok, model, rnd = chat_model
    prompt = sentence(rnd)
    p = run_resafe("generate", "--model", path, "--backend", "cpu", "--prompt", prompt,
                   "--max-new-tokens", 6)
    ids = hf_greedy(model, tok(prompt).input_ids, 6)
    want = tok.decode(ids, skip_special_tokens=True) + "\n"
    # run_resafe reads stdout in text mode, whose universal newlines turn "\r" into "\n"
    assert p.stdout == want.replace("\r\n", "\n").replace("\r", "\n")


def test_chat_without_template_is_one_line_error(chat_model, tmp_path):
    path, *_ = chat_model
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(path):
        data = open(os.path.join(path, name), "rb").read()
        if name == "tokenizer_config.json":
            cfg = json.loads(data)
            cfg.pop("chat_template")
            data = json.dumps(cfg).encode()
        (bare / name).write_bytes(data)
    p = run_resafe("generate", "--model", bare, "--chat", "--prompt", "hi", check=False)
    assert p.returncode == 1 and "chat template" in p.stderr
    assert len([l for l in p.stderr.splitlines() if "error" in l]) == 1


def test_config_file_sets_generation_and_flags_override_it(chat_model, tmp_path):
    """--config takes [model] and [generate] from the INI; the same run given as flags gives the
    same ids; a flag overrides the file; a bad key is one error line naming file and key."""
    path, tok, model, rnd = chat_model
    temp, top_p, seed, n_new = round(rnd.uniform(0.5, 1.5), 3), round(rnd.uniform(0.5, 1), 3), rnd.randint(0, 10**6), rnd.randint(3, 9)
    ini = tmp_path / "run.ini"
    ini.write_text(f"[model]\npath = {path}\nbackend = cpu\n[generate]\nchat = false\n"
                   f"max_new_tokens = {n_new}\ntemperature = {temp}\ntop_p = {top_p}\nseed = {seed}\n")
    prompt = sentence(rnd)
    by_file = jsonl(run_resafe("generate", "--config", ini, "--prompt", prompt, "--format", "jsonl"))
    by_flags = jsonl(run_resafe("generate", "--model", path, "--backend", "cpu", "--prompt", prompt,
                                "--format", "jsonl", "--max-new-tokens", n_new, "--temperature", temp,
                                "--top-p", top_p, "--seed", seed))
    assert by_file[0]["ids"] == by_flags[0]["ids"] and by_file[0]["prompt_ids"] == tok(prompt).input_ids
    greedy = jsonl(run_resafe("generate", "--config", ini, "--prompt", prompt, "--format", "jsonl",
                              "--temperature", 0, "--set", "generate.max_new_tokens=4"))
    assert greedy[0]["ids"] == hf_greedy(model, greedy[0]["prompt_ids"], 4)
    ini.write_text(ini.read_text() + "beam_width = 3\n")
    p = run_resafe("generate", "--config", ini, "--prompt", prompt, check=False)
    assert p.returncode == 1 and "run.ini" in p.stderr and "beam_width" in p.stderr, p.stderr


def test_config_batch_size_is_used_and_the_flag_overrides_it(chat_model, tmp_path):
    """[generate] batch_size from --config sets the KV-cache slots (progress lines come a batch's
    worth of prompts apart, only when there are more prompts than slots); --batch-size wins."""
    path, tok, model, rnd = chat_model
    n, b = rnd.randint(7, 12), rnd.randint(2, 3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(sentence(rnd) + "\n" for _ in range(n)))
    ini = tmp_path / "run.ini"
    ini.write_text(f"[model]\npath = {path}\nbackend = cpu\n[generate]\nchat = false\n"
                   f"max_new_tokens = 3\nbatch_size = {b}\n")
    args = ("generate", "--config", ini, "--prompts-file", prompts, "--format", "jsonl")
    lines = [l for l in run_resafe(*args).stderr.splitlines() if l.startswith("generate: ")]
    assert len(lines) >= 2 and lines[-1].startswith(f"generate: {n}/{n} prompts"), lines
    assert len(lines) <= -(-n // b) + 1, lines
    first = int(lines[0].split()[1].split("/")[0])
    assert b <= first < 2 * b, lines  # the default 8 slots would first report at 8 or more
    big = run_resafe(*args, "--batch-size", n + 1).stderr
    assert "generate: " not in big, big


def test_jsonl_text_is_the_exact_decode_even_with_nul_and_control_bytes(chat_model):
    """Sampled junk from a random model decodes to every byte, NUL and control bytes included
    (byte-fallback tokens): the jsonl text field must hold all of it, as tok.decode does."""
    path, tok, model, rnd = chat_model
    prompts = [sentence(rnd) for _ in range(4)]
    args = [a for p in prompts for a in ("--prompt", p)]
    rows = jsonl(run_resafe("generate", "--model", path, "--backend", "cpu", "--format", "jsonl",
                            "--max-new-tokens", 48, "--temperature", 2.0, "--seed", rnd.randint(0, 999),
                            *args))
    for r in rows:
        assert r["text"] == tok.decode(r["ids"], skip_special_tokens=True)
