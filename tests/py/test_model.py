"""The Llama-family model and generation against transformers, the independent reference.

Each test builds a small random checkpoint with transformers itself (random sizes every run,
parameters redrawn at magnitudes that make every term matter: norm weights away from 1, biases
away from 0, logits of order 1-10), saves it as fp32 safetensors, and compares:
  - logits of our CPU forward (build/tools/forward_tool) on a batch of sequences of different
    lengths, in one padded prefill, in prefill + decode steps, and last-position only;
  - greedy generation (`resafe generate --ids ... --format jsonl`) with model.generate;
  - our own invariants: batched == one by one, seeded sampling reproducible.
fp32 on both sides: 1e-4 absolute on logits of order 10 leaves two orders of magnitude over
fp32 rounding and catches any wrong term (a missing bias or scale moves logits by > 1e-2).
"""
import collections
import copy
import json
import os
import random
import re
import subprocess

import numpy as np
import pytest
import torch

from conftest import BUILD, run_resafe

transformers = pytest.importorskip("transformers")

FORWARD_TOOL = os.path.join(BUILD, "tools", "forward_tool")
LOGIT_TOL = 1e-4
TIE_TOL = 1e-4  # greedy may differ only where the reference's top two logits are this close


# ---------------------------------------------------------------- checkpoints

def random_config(arch, rnd, **over):
    """A small config of the family with random sizes (GQA: kv heads divide heads)."""
    n_kv = rnd.choice([1, 2, 3])
    n_heads = n_kv * rnd.choice([1, 2, 3])
    head_dim = rnd.choice([8, 12, 16])
    common = dict(vocab_size=rnd.randint(100, 300), intermediate_size=rnd.randint(40, 130),
                  num_hidden_layers=rnd.randint(2, 3), num_attention_heads=n_heads,
                  num_key_value_heads=n_kv, max_position_embeddings=256,
                  rms_norm_eps=rnd.choice([1e-5, 1e-6]), bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if arch == "gemma":  # explicit head_dim unrelated to hidden / heads, as Gemma's 256
        common.update(hidden_size=rnd.randint(16, 48) * 2, head_dim=head_dim,
                      hidden_activation="gelu_pytorch_tanh")
    else:
        common.update(hidden_size=n_heads * head_dim,
                      rope_theta=rnd.choice([10000.0, 500000.0]) if arch != "qwen2" else 10000.0)
    common.update(over)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "gemma": transformers.GemmaConfig}[arch]
    return cls(**common)


def randomize(model, gen):
    """Redraw every parameter: linears and embeddings ~ N(0, 1/in) (logits of order 1 when
    tied), norm gains 1 +- 0.3 (Gemma stores gain - 1), biases visibly non-zero."""
    gain_offset = 0.0 if model.config.model_type == "gemma" else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(gain_offset + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def make_checkpoint(tmp_path, arch, seed, **over):
    rnd = random.Random(seed)
    cfg = random_config(arch, rnd, **over)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM",
                                   "gemma": "GemmaForCausalLM"}[arch])(cfg)
    randomize(model, torch.Generator().manual_seed(seed))
    model.eval()
    path = str(tmp_path / f"{arch}_model")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def random_batch(rnd, vocab, n=4, lo=1, hi=12):
    return [[rnd.randrange(3, vocab) for _ in range(rnd.randint(lo, hi))] for _ in range(n)]


# ---------------------------------------------------------------- our side

def our_logits(path, seqs, tmp_path, *extra):
    ids_file, out_file = tmp_path / "ids.txt", tmp_path / "logits.f32"
    ids_file.write_text("\n".join(" ".join(map(str, s)) for s in seqs) + "\n")
    p = subprocess.run([FORWARD_TOOL, path, str(ids_file), str(out_file), *extra],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    B, T, V = map(int, p.stdout.split())
    data = np.fromfile(out_file, dtype=np.float32)
    return data.reshape(B, V) if "--last" in extra else data.reshape(B, T, V)


def ref_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].numpy()


def generate_jsonl(path, prompts, *args):
    p = run_resafe("generate", "--model", path, "--backend", "cpu", "--format", "jsonl",
                   "--ids", ";".join(",".join(map(str, s)) for s in prompts), *args)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["prompt_ids"] for r in rows] == prompts
    return [r["ids"] for r in rows]


# ---------------------------------------------------------------- checks

def check_logits(model, path, tmp_path, seed):
    rnd = random.Random(seed + 1)
    seqs = random_batch(rnd, model.config.vocab_size)
    refs = [ref_logits(model, s) for s in seqs]
    prefill = rnd.randint(0, 4)
    worst = 0.0
    for extra in [(), ("--prefill", str(prefill))]:
        ours = our_logits(path, seqs, tmp_path, *extra)
        for b, s in enumerate(seqs):
            diff = float(np.abs(ours[b, :len(s)] - refs[b]).max())
            worst = max(worst, diff)
            assert diff <= LOGIT_TOL, f"sequence {b} (len {len(s)}) {extra}: max abs diff {diff}"
    last = our_logits(path, seqs, tmp_path, "--last")
    for b, s in enumerate(seqs):
        diff = float(np.abs(last[b] - refs[b][-1]).max())
        assert diff <= LOGIT_TOL, f"sequence {b} last position: max abs diff {diff}"
    scale = max(float(np.abs(r).max()) for r in refs)
    print(f"{model.config.model_type}: logits max abs diff {worst:.3g} (max |logit| {scale:.3g})")
    assert scale > 1.0, "logits too small for the tolerance to mean anything"


def check_greedy(model, path, seed, n_new=20):
    """Token for token equal to model.generate; a divergence is accepted only at a step where
    the reference's logits of the two tokens are within TIE_TOL (then the rest is moot)."""
    rnd = random.Random(seed + 2)
    prompts = random_batch(rnd, model.config.vocab_size, n=3, lo=1, hi=8)
    ours = generate_jsonl(path, prompts, "--max-new-tokens", n_new)
    eos = model.generation_config.eos_token_id
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n_new,
                                 pad_token_id=eos, output_logits=True,
                                 return_dict_in_generate=True)
        want = out.sequences[0, len(prompt):].tolist()
        for step, (a, b) in enumerate(zip(got, want)):
            if a != b:
                logits = out.logits[step][0]
                gap = float(logits[b] - logits[a])
                assert gap <= TIE_TOL, f"prompt {prompt}: step {step}: ours {a}, transformers {b}" \
                                       f" (logit gap {gap})"
                break
        else:
            assert len(got) == len(want), f"prompt {prompt}: ours {got}, transformers {want}"


ARCHS = {
    "llama_gqa": ("llama", {}),
    "llama_tied_rope_llama3": ("llama", dict(
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "llama_all_biases_rope_linear": ("llama", dict(
        attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.5})),
    "mistral": ("mistral", {}),
    "qwen2_bias": ("qwen2", {}),
    "gemma": ("gemma", {}),
}


@pytest.mark.parametrize("case", sorted(ARCHS))
def test_forward_logits_match_transformers(case, tmp_path, rng_seed):
    arch, over = ARCHS[case]
    model, path = make_checkpoint(tmp_path, arch, rng_seed, **over)
    check_logits(model, path, tmp_path, rng_seed)


@pytest.mark.parametrize("case", sorted(ARCHS))
def test_greedy_generation_matches_transformers(case, tmp_path, rng_seed):
    arch, over = ARCHS[case]
    model, path = make_checkpoint(tmp_path, arch, rng_seed, **over)
    check_greedy(model, path, rng_seed)


def test_llama3_rope_scaling_changes_the_logits(tmp_path, rng_seed):
    """The llama3 case above can fail: with the same weights and no scaling the logits move."""
    arch, over = ARCHS["llama_tied_rope_llama3"]
    model, _ = make_checkpoint(tmp_path, arch, rng_seed, **over)
    plain = dict(over)
    plain.pop("rope_scaling")
    unscaled, _ = make_checkpoint(tmp_path / "plain", arch, rng_seed, **plain)
    seq = random_batch(random.Random(rng_seed), model.config.vocab_size, n=1, lo=12, hi=12)[0]
    diff = np.abs(ref_logits(model, seq) - ref_logits(unscaled, seq)).max()
    assert diff > 100 * LOGIT_TOL, f"rope scaling moved logits by only {diff}"


def test_tied_checkpoint_has_no_lm_head(tmp_path, rng_seed):
    from safetensors import safe_open
    _, path = make_checkpoint(tmp_path, "llama", rng_seed, tie_word_embeddings=True)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_batched_generation_equals_one_by_one(tmp_path, rng_seed):
    model, path = make_checkpoint(tmp_path, "llama", rng_seed)
    rnd = random.Random(rng_seed + 3)
    prompts = random_batch(rnd, model.config.vocab_size, n=5, lo=1, hi=10)
    for sample in [(), ("--temperature", "1.5", "--top-k", "20", "--top-p", "0.9", "--seed", "7")]:
        batched = generate_jsonl(path, prompts, "--max-new-tokens", 12, "--batch-size", 5, *sample)
        single = generate_jsonl(path, prompts, "--max-new-tokens", 12, "--batch-size", 1, *sample)
        pairs = generate_jsonl(path, prompts, "--max-new-tokens", 12, "--batch-size", 2, *sample)
        assert batched == single == pairs, f"{sample}: batch composition changed the output"


def token_rows(stderr):
    """Token rows (padding included) of all forward calls, from `resafe generate -v`."""
    found = re.findall(r"generate: \d+ forward calls over \d+ slots, (\d+) token rows", stderr)
    assert len(found) == 1, stderr
    return int(found[0])


def test_continuous_batching_equals_one_by_one(tmp_path, rng_seed):
    """Slots refill as responses end: prompts of 1 to 40 tokens, responses of different lengths
    (the eight ids a free run draws most often are made stop ids), 10 prompts in 3 slots (seven
    refills, prefills beside decoding slots) and in 16 slots (more slots than prompts). Every
    response equals the one generated alone, greedy and sampled, and the 3-slot run computes
    fewer token rows than fixed batches of 3 would (each batch padded to its longest prompt,
    then decoding until its longest response ends): what a call costs on the cpu backend."""
    model, path = make_checkpoint(tmp_path, "llama", rng_seed)
    rnd = random.Random(rng_seed + 7)
    lens = [1, 40, 2, 31, 5, 1, 22, 3, 36, 9]
    rnd.shuffle(lens)
    prompts = [random_batch(rnd, model.config.vocab_size, n=1, lo=n, hi=n)[0] for n in lens]
    sample = ("--temperature", "1.5", "--top-k", "40", "--top-p", "0.95", "--seed", "5")
    free = generate_jsonl(path, prompts, "--max-new-tokens", 24, *sample)
    counts = collections.Counter(t for r in free for t in r)
    gc_path = os.path.join(path, "generation_config.json")
    gc = json.load(open(gc_path))
    gc["eos_token_id"] = [t for t, _ in counts.most_common(8)]
    json.dump(gc, open(gc_path, "w"))
    for decoding in [(), sample]:
        args = ("--max-new-tokens", 24, *decoding)
        alone = generate_jsonl(path, prompts, *args, "--batch-size", 1)
        slots = run_resafe("generate", "--model", path, "--backend", "cpu", "--format", "jsonl",
                           "--ids", ";".join(",".join(map(str, s)) for s in prompts), *args,
                           "--batch-size", 3, "-v")
        three = [json.loads(line)["ids"] for line in slots.stdout.splitlines()]
        many = generate_jsonl(path, prompts, *args, "--batch-size", 16)
        assert three == alone, f"{decoding}: 3 slots changed the output"
        assert many == alone, f"{decoding}: 16 slots changed the output"
        assert len({len(r) for r in alone}) > 1, "responses of one length: nothing refilled early"
        fixed = sum(len(alone[i:i + 3]) * (max(lens[i:i + 3]) + max(map(len, alone[i:i + 3])) - 1)
                    for i in range(0, len(alone), 3))
        assert token_rows(slots.stderr) < fixed, slots.stderr


def test_sampling_is_seeded(tmp_path, rng_seed):
    model, path = make_checkpoint(tmp_path, "qwen2", rng_seed)
    prompts = random_batch(random.Random(rng_seed + 4), model.config.vocab_size, n=3)
    args = ("--max-new-tokens", 16, "--temperature", "3.0")
    a = generate_jsonl(path, prompts, *args, "--seed", 11)
    b = generate_jsonl(path, prompts, *args, "--seed", 11)
    c = generate_jsonl(path, prompts, *args, "--seed", 12)
    assert a == b, "same seed, different tokens"
    assert a != c, "different seeds gave identical samples (48 tokens at temperature 3)"
    # top-k 1 leaves one candidate: sampling at any temperature is greedy
    greedy = generate_jsonl(path, prompts, "--max-new-tokens", 16)
    topk1 = generate_jsonl(path, prompts, "--max-new-tokens", 16, "--temperature", "2",
                           "--top-k", "1", "--seed", 5)
    assert topk1 == greedy


def test_generation_stops_at_eos_from_generation_config(tmp_path, rng_seed):
    """generation_config.json's eos list wins over config.json: make the greedy continuation's
    third token a stop id and the response ends there, stop token included."""
    model, path = make_checkpoint(tmp_path, "mistral", rng_seed)
    prompt = random_batch(random.Random(rng_seed + 5), model.config.vocab_size, n=1)[0]
    gc_path = os.path.join(path, "generation_config.json")
    gc = json.load(open(gc_path))

    def set_eos(ids):
        gc["eos_token_id"] = ids
        json.dump(gc, open(gc_path, "w"))

    set_eos(99999)  # unreachable: config.json's eos (2) must not stop this run
    free = generate_jsonl(path, [prompt], "--max-new-tokens", 8)[0]
    assert len(free) == 8
    set_eos([free[2], 99999])
    stopped = generate_jsonl(path, [prompt], "--max-new-tokens", 8)[0]
    first = free.index(free[2])
    assert stopped == free[:first + 1]


# ---------------------------------------------------------------- errors

def test_missing_and_misshaped_tensors_are_named(tmp_path, rng_seed):
    from safetensors.torch import load_file, save_file
    _, path = make_checkpoint(tmp_path, "llama", rng_seed)
    st = os.path.join(path, "model.safetensors")
    tensors = load_file(st)
    name = "model.layers.1.mlp.up_proj.weight"
    good = tensors.pop(name)
    save_file(tensors, st, metadata={"format": "pt"})
    p = run_resafe("generate", "--model", path, "--ids", "3,4", check=False)
    assert p.returncode == 1 and name in p.stderr and "missing" in p.stderr, p.stderr
    tensors[name] = good[:, :-1].contiguous()
    save_file(tensors, st, metadata={"format": "pt"})
    p = run_resafe("generate", "--model", path, "--ids", "3,4", check=False)
    assert p.returncode == 1 and name in p.stderr and "shape" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2  # the info line at most, then one error line


def test_bf16_and_f16_checkpoints_load_as_their_f32_values(tmp_path, rng_seed):
    """Weights stored in half precision are converted exactly: the reference is transformers
    loading the same half-precision checkpoint into fp32."""
    model, path = make_checkpoint(tmp_path, "qwen2", rng_seed)
    seqs = random_batch(random.Random(rng_seed + 6), model.config.vocab_size, n=2)
    for dtype in (torch.bfloat16, torch.float16):
        half = str(tmp_path / f"half_{dtype}")
        copy.deepcopy(model).to(dtype).save_pretrained(half, safe_serialization=True)
        ref = type(model).from_pretrained(half, dtype=torch.float32, attn_implementation="eager")
        ours = our_logits(half, seqs, tmp_path)
        for b, s in enumerate(seqs):
            diff = float(np.abs(ours[b, :len(s)] - ref_logits(ref, s)).max())
            assert diff <= LOGIT_TOL, f"{dtype}: max abs diff {diff}"


@pytest.mark.parametrize("args,code", [
    ((), 2), (("--model", "X"), 2), (("--model", "X", "--ids", "1", "--prompt", "a"), 2),
    (("--model", "X", "--ids", "1,x"), 2), (("--model", "X", "--ids", "1", "--top-p", "0"), 2),
    (("--model", "X", "--ids", "1", "--chat"), 2), (("--model", "X", "--ids", "1", "--bogus", "1"), 2),
    (("--model", "/nonexistent", "--ids", "1"), 1),
])
def test_generate_usage_and_input_errors(args, code):
    p = run_resafe("generate", *args, check=False)
    assert p.returncode == code, p.stderr
    assert p.stderr.strip(), "no message"
