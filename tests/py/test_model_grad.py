"""The training forward and backward (model_train.h) against torch autograd.

Each test builds a tiny random checkpoint of one family with transformers (fp32, 2 layers, hidden
32-64, vocab ~100; parameters redrawn by test_model.randomize so every term matters), runs
build/tools/train_tool on a right-padded batch, and compares with autograd of
    L = sum_b c_b * seq_logp_b,   seq_logp_b = sum of log p(target) over sequence b's targets,
c random of both signs (DPO weighs sequences that way). The reference is torch autograd in
float64 (truly: see truly_float64), so what is measured is our fp32 error alone; it runs each
sequence alone, unpadded, so padding is checked too. Tolerances:
  - gradients: relative error ||ours - ref|| / ||ref|| <= 1e-4 per tensor. Ours are fp32: about
    1e-6 on these models, up to a few 1e-5 on layer-0 attention gradients when the residual stream
    grows large (fp32 rounding compounds through the layers; torch's own fp32 is within 2-6x of
    ours there). A wrong term (a missing scale, bias, transpose, residual) moves a tensor's
    gradient by far more than 1e-2.
  - seq_logp: 1e-4 absolute on sums of ~10 log-probs of order -5.
  - recompute = 1: bit-identical (same ops on the same values).
  - padding vs separate batches: 1e-5 relative (summation order only).
  - finite differences in float64 (see test_finite_differences_float64).
"""
import os
import random
import subprocess

import numpy as np
import pytest
import torch

from conftest import BUILD
from test_model import randomize

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TRAIN_TOOL = os.path.join(BUILD, "tools", "train_tool")
GRAD_TOL = 1e-4
LOGP_TOL = 1e-4
PAD_TOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

FAMILIES = {
    "llama_gqa": ("llama", {}),
    "llama_tied_rope_llama3": ("llama", dict(
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "mistral": ("mistral", {}),
    "qwen2_bias": ("qwen2", {}),
    "gemma": ("gemma", {}),
}
# Tiny models on 2 shared cores: thread fork/join costs more than the work (40x slower on a
# loaded machine), so both sides run single-threaded unless OMP_NUM_THREADS says otherwise.
TOOL_ENV = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(int(TOOL_ENV["OMP_NUM_THREADS"]))
    yield
    torch.set_num_threads(before)


CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}


# ---------------------------------------------------------------- checkpoints and batches

def tiny_config(arch, rnd, **over):
    n_heads, n_kv, head_dim = rnd.choice([(4, 2, 8), (4, 1, 16), (2, 1, 16), (6, 2, 8), (4, 4, 12)])
    common = dict(vocab_size=rnd.randint(80, 120), intermediate_size=rnd.randint(40, 96),
                  num_hidden_layers=2, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                  max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if arch == "gemma":
        common.update(hidden_size=rnd.randint(16, 32) * 2, head_dim=rnd.choice([8, 16]),
                      hidden_activation="gelu_pytorch_tanh")
    else:
        common.update(hidden_size=n_heads * head_dim, rope_theta=rnd.choice([10000.0, 500000.0]))
    common.update(over)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "gemma": transformers.GemmaConfig}[arch]
    return cls(**common)


def make_model(tmp_path, family, seed, **extra):
    arch, over = FAMILIES[family]
    cfg = tiny_config(arch, random.Random(seed), **{**over, **extra})
    cfg._attn_implementation = "eager"
    model = getattr(transformers, CLASSES[arch])(cfg)
    randomize(model, torch.Generator().manual_seed(seed))
    model.eval()
    path = str(tmp_path / f"{family}_model")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def random_batch(rnd, vocab, B=3, lo=3, hi=12, extra_pad=2):
    """Right-padded sequences with a prompt part (no targets) and a response part whose targets
    are the next tokens; padded slots hold random ids that must not matter."""
    lens = [rnd.randint(lo, hi) for _ in range(B)]
    T = max(lens) + rnd.randint(0, extra_pad)
    tokens = np.array([[rnd.randrange(3, vocab) for _ in range(T)] for _ in range(B)], np.int32)
    pos = np.full((B, T), -1, np.int32)
    targets = np.full((B, T), -1, np.int32)
    for b, n in enumerate(lens):
        pos[b, :n] = np.arange(n)
        prompt = rnd.randint(0, n - 2)
        targets[b, prompt:n - 1] = tokens[b, prompt + 1:n]
    c = np.array([rnd.choice([-1, 1]) * rnd.uniform(0.5, 2.0) for _ in range(B)], np.float32)
    return dict(tokens=tokens, pos=pos, targets=targets, d_seq_logp=c, lens=lens)


def sequence(batch, b):
    """Sequence b alone as a batch of one, unpadded."""
    n = batch["lens"][b]
    return dict(tokens=batch["tokens"][b:b + 1, :n], pos=batch["pos"][b:b + 1, :n],
                targets=batch["targets"][b:b + 1, :n], d_seq_logp=batch["d_seq_logp"][b:b + 1],
                lens=[n])


def random_adapter(model, rank, rnd_t, mode=None, targets=TARGETS):
    """A and B of every targeted linear, random and non-zero (B = 0 would hide dA), with masks.
    With the tests' scale 0.5 the adapter's B A is about half of W, a trained adapter's size."""
    out = {}
    for l, layer in enumerate(model.model.layers):
        for name in targets:
            lin = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            o, i = lin.weight.shape
            out[f"lora.{l}.{name}.A"] = torch.randn(rank, i, generator=rnd_t) / i ** 0.5
            out[f"lora.{l}.{name}.B"] = torch.randn(o, rank, generator=rnd_t) / rank ** 0.5
            if mode == "factor":
                out[f"lora.{l}.{name}.mask_A"] = (torch.rand(rank, i, generator=rnd_t) < 0.5).to(torch.uint8)
                out[f"lora.{l}.{name}.mask_B"] = (torch.rand(o, rank, generator=rnd_t) < 0.5).to(torch.uint8)
            elif mode == "elementwise":
                out[f"lora.{l}.{name}.mask_W"] = (torch.rand(o, i, generator=rnd_t) < 0.5).to(torch.uint8)
    return out


# ---------------------------------------------------------------- our side

def run_tool(path, batch, tmp_path, *args, adapter=None, check=True):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(batch[k]))
               for k in ("tokens", "pos", "targets", "d_seq_logp", "prefix_tokens", "prefix_pos",
                         "prefix_of") if k in batch}
    tensors.update(adapter or {})
    batch_file, out_file = tmp_path / "batch.safetensors", tmp_path / "grads.safetensors"
    safetensors_torch.save_file(tensors, str(batch_file))
    p = subprocess.run([TRAIN_TOOL, path, str(batch_file), str(out_file), *map(str, args)],
                       capture_output=True, text=True, timeout=120, env=TOOL_ENV)
    if not check:
        return p
    assert p.returncode == 0, p.stderr
    return {k: v.numpy() for k, v in safetensors_torch.load_file(str(out_file)).items()}


# ---------------------------------------------------------------- the reference

class LoraLinear(torch.nn.Module):
    """W x + b + scale * B A drop(x), or elementwise (W + scale * (M * (B @ A))) x + b."""

    def __init__(self, base, A, B, scale, mask_w=None):
        super().__init__()
        self.base, self.scale, self.mask_w, self.drop = base, scale, mask_w, None
        self.A = torch.nn.Parameter(A.clone().to(base.weight.dtype))
        self.B = torch.nn.Parameter(B.clone().to(base.weight.dtype))

    def forward(self, x):
        if self.mask_w is not None:
            w = self.base.weight + self.scale * (self.mask_w * (self.B @ self.A))
            return torch.nn.functional.linear(x, w, self.base.bias)
        xd = x if self.drop is None else x * self.drop
        return self.base(x) + self.scale * (xd @ self.A.T) @ self.B.T


def attach_adapter(model, adapter, scale, mode=None, targets=TARGETS):
    mods = {}
    for l, layer in enumerate(model.model.layers):
        for name in targets:
            parent = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
            mask = adapter[f"lora.{l}.{name}.mask_W"].float() if mode == "elementwise" else None
            mods[(l, name)] = LoraLinear(getattr(parent, name), adapter[f"lora.{l}.{name}.A"],
                                         adapter[f"lora.{l}.{name}.B"], scale, mask)
            setattr(parent, name, mods[(l, name)])
    return mods


def seq_logp(model, batch, b, dtype=torch.float32):
    n = batch["lens"][b]
    tokens = torch.tensor(batch["tokens"][b, :n], dtype=torch.long)
    targets = torch.tensor(batch["targets"][b, :n], dtype=torch.long)
    logp = torch.log_softmax(model(tokens[None]).logits[0].to(dtype), -1)
    keep = targets >= 0
    return logp[keep].gather(1, targets[keep][:, None]).sum()


def reference_loss(model, batch, before_sequence=None):
    """L = sum_b c_b seq_logp_b and the seq_logps, each sequence run alone."""
    loss, logps = 0.0, []
    for b in range(len(batch["lens"])):
        if before_sequence:
            before_sequence(b)
        lp = seq_logp(model, batch, b, next(model.parameters()).dtype)
        logps.append(float(lp.detach()))
        loss = loss + float(batch["d_seq_logp"][b]) * lp
    return loss, np.array(logps)


def rel_err(ours, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def check_close(ours, refs, tol, what, allow_zero=False):
    """Relative error per tensor. A zero reference means nothing against torch (the test would
    be vacuous); between two runs of ours (allow_zero) it must be matched exactly: a sequence
    whose only target is at position 0 gives k_proj exactly zero gradient (softmax of one key)."""
    worst = 0.0
    for name, ref in refs.items():
        assert name in ours, f"{what}: no gradient '{name}' from train_tool"
        if allow_zero and not np.any(ref):
            assert not np.any(ours[name]), f"{what}: '{name}' should be zero"
            continue
        assert float(np.linalg.norm(ref)) > 0, f"{what}: '{name}' has a zero reference gradient"
        err = rel_err(ours[name], ref)
        worst = max(worst, err)
        assert err <= tol, f"{what}: '{name}' relative error {err:.3g} > {tol}"
    return worst


def truly_float64(model, monkeypatch):
    """model.double() still normalises (RMSNorm) and takes the attention softmax in fp32, as
    transformers does for stability: fp32 noise of ~1e-7 relative in L would swamp a difference
    quotient. Run both in float64. (RoPE's cos/sin stay fp32, as ours: fixed constants, no noise.)"""
    model = model.double()
    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)
    add_one = model.config.model_type == "gemma"
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))

            def norm64(x, mod=mod, eps=eps):
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                return y * (1.0 + mod.weight if add_one else mod.weight)

            mod.forward = norm64
    return model


def full_reference(model, batch):
    model.zero_grad(set_to_none=True)
    loss, logps = reference_loss(model, batch)
    loss.backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}, logps


# ---------------------------------------------------------------- full-parameter gradients

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_gradients_match_autograd(family, tmp_path, rng_seed, monkeypatch):
    """Every parameter's gradient and every seq_logp on a padded batch; recompute = 1 gives the
    same bytes."""
    model, path = make_model(tmp_path, family, rng_seed)
    batch = random_batch(random.Random(rng_seed + 1), model.config.vocab_size)
    ours = run_tool(path, batch, tmp_path)
    refs, logps = full_reference(truly_float64(model, monkeypatch), batch)
    assert set(refs) == set(ours) - {"seq_logp"}, "gradient names differ from the parameters"
    assert np.abs(ours["seq_logp"] - logps).max() <= LOGP_TOL, (ours["seq_logp"], logps)
    worst = check_close(ours, refs, GRAD_TOL, family)
    print(f"{family}: max relative gradient error {worst:.3g}")
    recomputed = run_tool(path, batch, tmp_path, "--recompute")
    for name in ours:
        assert np.array_equal(ours[name], recomputed[name]), f"recompute changed '{name}'"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padding_equals_separate_batches(family, tmp_path, rng_seed):
    """A right-padded batch gives, sequence by sequence, what each sequence gives alone."""
    model, path = make_model(tmp_path, family, rng_seed)
    batch = random_batch(random.Random(rng_seed + 2), model.config.vocab_size, B=3, lo=2,
                         extra_pad=3)
    padded = run_tool(path, batch, tmp_path)
    alone = [run_tool(path, sequence(batch, b), tmp_path) for b in range(3)]
    assert np.abs(padded["seq_logp"] - [a["seq_logp"][0] for a in alone]).max() <= PAD_TOL * 10
    summed = {k: sum(a[k] for a in alone) for k in padded if k != "seq_logp"}
    check_close(padded, summed, PAD_TOL, "padded vs alone", allow_zero=True)
    one_hot = dict(batch, d_seq_logp=np.array([0, 1, 0], np.float32))
    only_1 = run_tool(path, one_hot, tmp_path)
    single = run_tool(path, dict(sequence(batch, 1), d_seq_logp=np.array([1], np.float32)), tmp_path)
    check_close(only_1, {k: single[k] for k in single if k != "seq_logp"}, PAD_TOL, "one sequence",
                allow_zero=True)


# ---------------------------------------------------------------- LoRA

def lora_reference(model, batch, adapter, scale, mode=None, drop=None, targets=TARGETS):
    """dA, dB (and dW) of the plain-torch adapter; drop(l, name, b) gives a dropout mask."""
    for p in model.parameters():
        p.requires_grad_(False)
    mods = attach_adapter(model, adapter, scale, mode, targets)
    for mod in mods.values():
        mod.base.weight.requires_grad_(True)

    def set_masks(b):
        for (l, name), mod in mods.items():
            mod.drop = drop(l, name, b) if drop else None

    loss, logps = reference_loss(model, batch, set_masks)
    loss.backward()
    refs = {}
    for (l, name), mod in mods.items():
        refs[f"lora.{l}.{name}.dA"] = mod.A.grad.numpy()
        refs[f"lora.{l}.{name}.dB"] = mod.B.grad.numpy()
        refs[f"lora.{l}.{name}.dW"] = mod.base.weight.grad.numpy()
    return refs, logps


@pytest.mark.parametrize("mode", ["none", "factor", "elementwise"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_gradients_match_autograd(family, mode, tmp_path, rng_seed, monkeypatch):
    """dA, dB of all 7 targets with random non-zero A and B, and dW (want_weight_grad).
    Factor masks act in the optimizer only (lora.h), so the gradients are the unmasked ones;
    elementwise masks enter the forward: W + scale * (M * (B @ A))."""
    model, path = make_model(tmp_path, family, rng_seed)
    batch = random_batch(random.Random(rng_seed + 3), model.config.vocab_size)
    rank, alpha = 4, 2.0
    adapter = random_adapter(model, rank, torch.Generator().manual_seed(rng_seed), mode)
    ours = run_tool(path, batch, tmp_path, "--lora", alpha, "--mode", mode, "--want-dw",
                    adapter=adapter)
    refs, logps = lora_reference(truly_float64(model, monkeypatch), batch, adapter, alpha / rank,
                                 mode)
    assert np.abs(ours["seq_logp"] - logps).max() <= LOGP_TOL
    worst = check_close(ours, refs, GRAD_TOL, f"{family} {mode}")
    print(f"{family} {mode}: max relative LoRA gradient error {worst:.3g}")
    if mode == "elementwise":
        recomputed = run_tool(path, batch, tmp_path, "--lora", alpha, "--mode", mode,
                              "--want-dw", "--recompute", adapter=adapter)
        for name in ours:
            assert np.array_equal(ours[name], recomputed[name]), f"recompute changed '{name}'"


@pytest.mark.parametrize("family", ["llama_gqa", "gemma"])
def test_partial_recompute_is_bit_identical(family, tmp_path, rng_seed):
    """5 layers; the first N recompute in backward (they share one set of buffers, the others
    keep their own): every gradient and the dropout masks the same bytes as no recompute, for
    every N. An index mix-up between a kept layer and the shared buffers would hand a layer
    another layer's activations in its backward."""
    model, path = make_model(tmp_path, family, rng_seed, num_hidden_layers=5)
    batch = random_batch(random.Random(rng_seed + 9), model.config.vocab_size)
    adapter = random_adapter(model, 4, torch.Generator().manual_seed(rng_seed))
    for args in [(), ("--lora", 2.0, "--dropout", 0.25, "--seed", 3)]:
        ad = adapter if args else None
        ours = run_tool(path, batch, tmp_path, *args, adapter=ad)
        for n in (1, 2, 4, 5, 9):
            again = run_tool(path, batch, tmp_path, *args, "--recompute", n, adapter=ad)
            for name in ours:
                assert np.array_equal(ours[name], again[name]), \
                    f"recompute {n} of 5 layers changed '{name}' ({args})"


def dropout_keep(seed, n, p):
    """The backend dropout op's mask (backend.h): splitmix64's (i+1)-th output from `seed`."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24) >= np.float32(p)


@pytest.mark.parametrize("family", ["llama_gqa", "gemma"])
def test_lora_dropout_matches_autograd(family, tmp_path, rng_seed, monkeypatch):
    """Dropout on the adapter input, masks reproduced from the seeds the forward used; a
    different rng seed draws different masks, recompute regenerates the same ones."""
    model, path = make_model(tmp_path, family, rng_seed)
    batch = random_batch(random.Random(rng_seed + 4), model.config.vocab_size)
    rank, alpha, p = 4, 2.0, 0.3
    adapter = random_adapter(model, rank, torch.Generator().manual_seed(rng_seed))
    args = ("--lora", alpha, "--dropout", p, "--seed", 5)
    ours = run_tool(path, batch, tmp_path, *args, adapter=adapter)
    seeds = ours["dropout_seeds"].view(np.uint64)
    T = batch["tokens"].shape[1]

    def drop(l, name, b):
        layer = model.model.layers[l]
        n_in = (getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)).base.in_features
        keep = dropout_keep(seeds[l, TARGETS.index(name)], T * len(batch["lens"]) * n_in, p)
        rows = keep.reshape(-1, n_in)[b * T:b * T + batch["lens"][b]]
        return torch.from_numpy(rows.astype(np.float32) / (1 - p))

    refs, logps = lora_reference(truly_float64(model, monkeypatch), batch, adapter, alpha / rank,
                                 drop=drop)
    assert np.abs(ours["seq_logp"] - logps).max() <= LOGP_TOL
    check_close(ours, {k: v for k, v in refs.items() if not k.endswith("dW")}, GRAD_TOL, family)
    assert len(set(seeds.ravel().tolist())) == seeds.size, "dropout seeds repeat"
    other = run_tool(path, batch, tmp_path, "--lora", alpha, "--dropout", p, "--seed", 6,
                     adapter=adapter)
    assert abs(float(other["seq_logp"][0] - ours["seq_logp"][0])) > 1e-6, "seed changed nothing"
    again = run_tool(path, batch, tmp_path, *args, "--recompute", adapter=adapter)
    for name in ours:
        assert np.array_equal(ours[name], again[name]), f"recompute changed '{name}'"


def test_lora_subset_of_targets_and_disabled_adapter(tmp_path, rng_seed, monkeypatch):
    """Targets q,v only: only their gradients exist and match. Disabled adapter: the base
    model's log-probs, no dA/dB, and dW is the base model's weight gradient."""
    model, path = make_model(tmp_path, "qwen2_bias", rng_seed)
    batch = random_batch(random.Random(rng_seed + 5), model.config.vocab_size)
    targets = ["q_proj", "v_proj"]
    adapter = random_adapter(model, 3, torch.Generator().manual_seed(rng_seed), targets=targets)
    model = truly_float64(model, monkeypatch)
    base_grads, base_logps = full_reference(model, batch)
    off = run_tool(path, batch, tmp_path, "--lora", 1.5, "--targets", "q,v", "--want-dw",
                   "--disabled", adapter=adapter)
    assert np.abs(off["seq_logp"] - base_logps).max() <= LOGP_TOL
    assert not any(np.any(off[k]) for k in off if k.endswith(("dA", "dB")))
    check_close(off, {f"lora.{l}.{n}.dW": base_grads[f"model.layers.{l}.self_attn.{n}.weight"]
                      for l in range(2) for n in targets}, GRAD_TOL, "disabled adapter dW")
    ours = run_tool(path, batch, tmp_path, "--lora", 1.5, "--targets", "q_proj,v_proj",
                    adapter=adapter)
    assert sorted(k for k in ours if k != "seq_logp") == sorted(
        f"lora.{l}.{n}.{g}" for l in range(2) for n in targets for g in ("dA", "dB"))
    refs, _ = lora_reference(model, batch, adapter, 0.5, targets=targets)
    check_close(ours, {k: v for k, v in refs.items() if not k.endswith("dW")}, GRAD_TOL, "q,v")


# ---------------------------------------------------------------- finite differences

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_finite_differences_float64(family, tmp_path, rng_seed, monkeypatch):
    """Central differences of torch's float64 loss against our fp32 gradient, entry by entry.
    With eps = 1e-5 the difference quotient is exact to ~eps^2 |L'''| ~ 1e-10 (truncation) and
    ~1e-16 |L| / eps ~ 1e-10 (rounding), far below our fp32 gradient's own error (~1e-6 of the
    magnitudes summed into an entry). An entry can be a sum of cancelling terms, so its error
    is measured against max(|fd|, rms of the tensor's gradient): 1e-3 leaves a wide margin over
    fp32 and still catches any wrong term. This checks both our gradient and the autograd
    reference the other tests trust."""
    model, path = make_model(tmp_path, family, rng_seed)
    batch = random_batch(random.Random(rng_seed + 6), model.config.vocab_size, B=2)
    ours = run_tool(path, batch, tmp_path)
    model = truly_float64(model, monkeypatch)
    params = dict(model.named_parameters())
    rnd = np.random.default_rng(rng_seed)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight",
             "model.layers.1.input_layernorm.weight", "model.norm.weight"]
    eps = 1e-5
    with torch.no_grad():
        for name in names:
            g = ours[name].ravel()
            rms = float(np.sqrt(np.mean(g.astype(np.float64) ** 2)))
            for idx in [int(np.abs(g).argmax()), int(rnd.integers(g.size))]:
                flat = params[name].view(-1)
                orig = float(flat[idx])
                flat[idx] = orig + eps
                up, _ = reference_loss(model, batch)
                flat[idx] = orig - eps
                down, _ = reference_loss(model, batch)
                flat[idx] = orig
                fd = (float(up) - float(down)) / (2 * eps)
                err = abs(float(g[idx]) - fd) / max(abs(fd), rms)
                assert err <= 1e-3, f"{name}[{idx}]: ours {g[idx]:.8g}, finite difference {fd:.8g}"


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("break_it,message", [
    (lambda b: b["pos"].__setitem__((0, 0), -1), "right padding"),
    (lambda b: b["targets"].__setitem__((0, b["lens"][0]), 5), "target"),
    (lambda b: b["tokens"].__setitem__((1, 0), 10 ** 6), "vocabulary"),
])
def test_bad_batches_are_refused(break_it, message, tmp_path, rng_seed):
    model, path = make_model(tmp_path, "llama_gqa", rng_seed)
    batch = random_batch(random.Random(rng_seed), model.config.vocab_size, lo=4, extra_pad=0)
    batch["lens"][0] = min(batch["lens"][0], batch["tokens"].shape[1] - 1)
    batch["pos"][0, batch["lens"][0]:] = -1
    batch["targets"][0, batch["lens"][0] - 1:] = -1
    break_it(batch)
    p = run_tool(path, batch, tmp_path, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2


def test_dropout_with_elementwise_masks_is_refused(tmp_path, rng_seed):
    model, path = make_model(tmp_path, "llama_gqa", rng_seed)
    batch = random_batch(random.Random(rng_seed), model.config.vocab_size)
    adapter = random_adapter(model, 2, torch.Generator().manual_seed(0), "elementwise")
    p = run_tool(path, batch, tmp_path, "--lora", 2, "--mode", "elementwise", "--dropout", 0.1,
                 adapter=adapter, check=False)
    assert p.returncode == 1 and "elementwise" in p.stderr, p.stderr
