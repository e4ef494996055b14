"""config.json parsing against transformers: random small configs of every family are saved with
save_pretrained, loaded back by transformers (AutoConfig + the model it builds) and by resafe
(build/tools/hf_config_tool); every field resafe reports must match what the built model does,
and rs_rope_inv_freq must equal the model's rotary inv_freq to 1e-6 relative."""
import glob
import json
import os
import random
import subprocess

import pytest

from conftest import BUILD, ROOT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

TOOL = os.path.join(BUILD, "tools", "hf_config_tool")
CORPUS = os.path.join(ROOT, "tests", "corpus", "hf_config")


def run_tool(path):
    return subprocess.run([TOOL, str(path)], capture_output=True, text=True, timeout=60)


def parse_ok(path):
    p = run_tool(path)
    assert p.returncode == 0, f"hf_config_tool {path} failed:\n{p.stderr}"
    return json.loads(p.stdout)


def f32(x):
    return float(torch.tensor(float(x), dtype=torch.float32))


# ---------------------------------------------------------------- random configs

def _sizes(rng, n_heads_choices=(2, 4, 8), kv_divides=True):
    n_heads = rng.choice(n_heads_choices)
    head_dim = rng.choice([8, 16, 32])
    kv = rng.choice([d for d in range(1, n_heads + 1) if n_heads % d == 0]) if kv_divides else n_heads
    return dict(
        vocab_size=rng.randint(64, 512), hidden_size=n_heads * head_dim,
        intermediate_size=rng.randint(8, 256), num_hidden_layers=rng.randint(1, 3),
        num_attention_heads=n_heads, num_key_value_heads=kv,
        max_position_embeddings=rng.choice([256, 512, 2048, 4096, 8192]),
        rms_norm_eps=rng.choice([1e-5, 1e-6, 3e-6]),
    )


def _ids(rng, vocab):
    eos = rng.choice([rng.randrange(vocab), [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]])
    return dict(bos_token_id=rng.randrange(vocab), eos_token_id=eos,
                pad_token_id=rng.choice([None, rng.randrange(vocab)]))


def _theta(rng):
    return rng.choice([10000.0, 500000.0, 1000000.0, float(rng.randint(100, 2000000))])


def llama_gqa(rng):
    s = _sizes(rng, (4, 8))
    return transformers.LlamaConfig(**s, **_ids(rng, s["vocab_size"]), rope_theta=_theta(rng),
                                    attention_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5)


def llama3_tied(rng):
    s = _sizes(rng)
    low = rng.choice([0.5, 1.0, 2.0])
    scaling = {"rope_type": "llama3", "factor": rng.choice([2.0, 8.0, 32.0, rng.uniform(1.5, 40)]),
               "low_freq_factor": low, "high_freq_factor": low + rng.choice([0.5, 3.0, 7.5]),
               "original_max_position_embeddings": rng.choice([64, 256, 1024, 8192])}
    return transformers.LlamaConfig(**s, **_ids(rng, s["vocab_size"]), tie_word_embeddings=True,
                                    rope_theta=_theta(rng), rope_scaling=scaling)


def llama_linear(rng):
    s = _sizes(rng)
    key = rng.choice(["type", "rope_type"])
    return transformers.LlamaConfig(**s, rope_theta=_theta(rng),
                                    rope_scaling={key: "linear", "factor": rng.uniform(1.0, 16.0)})


def mistral(rng):
    s = _sizes(rng)
    s["head_dim"] = rng.choice([8, 16, 64])  # explicit, not hidden / heads
    return transformers.MistralConfig(**s, **_ids(rng, s["vocab_size"]), rope_theta=_theta(rng),
                                      sliding_window=rng.choice([None, 16, 4096]))


def qwen2(rng):
    s = _sizes(rng)
    return transformers.Qwen2Config(**s, **_ids(rng, s["vocab_size"]), rope_theta=_theta(rng),
                                    use_sliding_window=rng.random() < 0.5, sliding_window=rng.choice([32, 4096]),
                                    max_window_layers=rng.randint(0, 3), tie_word_embeddings=rng.random() < 0.5)


def gemma(rng):
    s = _sizes(rng)
    s["head_dim"] = rng.choice([16, 32, 48])
    return transformers.GemmaConfig(**s, **_ids(rng, s["vocab_size"]), rope_theta=_theta(rng),
                                    hidden_act=rng.choice(["gelu", "gelu_pytorch_tanh"]),
                                    attention_bias=rng.random() < 0.5)


FAMILIES = [llama_gqa, llama3_tied, llama_linear, mistral, qwen2, gemma]


# ---------------------------------------------------------------- the reference: the built model

def reference(model_dir):
    """What transformers builds from model_dir: every field read off the model itself."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    inner = model.model
    layer = inner.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    hd = attn.head_dim
    x = torch.linspace(-4, 4, 101)
    act = mlp.act_fn(x)
    acts = {"silu": F.silu(x), "gelu_tanh": F.gelu(x, approximate="tanh"), "gelu": F.gelu(x)}
    act_name = [k for k, v in acts.items() if torch.allclose(act, v, atol=1e-6, rtol=0)]
    norm = inner.norm
    with torch.no_grad():
        norm.weight.fill_(0.5)
        h = torch.randn(3, config.hidden_size)
        ratio = (norm(h) / (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps(norm)))).mean().item()
        tok = 1 if config.pad_token_id != 1 else 2  # the padding row is zero
        w = inner.embed_tokens.weight[tok]
        embed_scale = (inner.embed_tokens(torch.tensor([tok]))[0] @ w / (w @ w)).item()
    layer_windows = [getattr(l.self_attn, "sliding_window", None) for l in inner.layers]
    if config.model_type == "mistral":
        layer_windows = [config.sliding_window]
    windows = [w for w in layer_windows if w]
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    none = lambda v: -1 if v is None else v  # noqa: E731
    return config, {
        "vocab_size": inner.embed_tokens.weight.shape[0],
        "hidden_size": inner.embed_tokens.weight.shape[1],
        "intermediate_size": mlp.gate_proj.out_features,
        "n_layers": len(inner.layers),
        "n_heads": attn.q_proj.out_features // hd,
        "n_kv_heads": attn.k_proj.out_features // hd,
        "head_dim": hd,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": f32(norm_eps(norm)),
        "tie_word_embeddings": model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr(),
        "attention_bias": attn.q_proj.bias is not None,
        "o_bias": attn.o_proj.bias is not None,
        "mlp_bias": mlp.gate_proj.bias is not None,
        "hidden_act": act_name[0] if len(act_name) == 1 else f"ambiguous {act_name}",
        "norm_add_one": abs(ratio - 1.5) < 1e-4,
        "embed_scale": embed_scale,
        "attn_scale": f32(attn.scaling),
        "sliding_window": windows[0] if windows else 0,
        "bos_token_id": none(config.bos_token_id),
        "pad_token_id": none(config.pad_token_id),
        "eos_token_ids": eos,
        "inv_freq": inner.rotary_emb.inv_freq.tolist(),
    }


def norm_eps(norm):
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


def check_matches(ours, config, ref, label):
    for key, want in ref.items():
        got = ours[key]
        if key == "inv_freq":
            assert len(got) == len(want), label
            for i, (g, w) in enumerate(zip(got, want)):
                assert abs(g - w) <= 1e-6 * abs(w), f"{label}: inv_freq[{i}] {g!r} != {w!r}"
        elif key == "embed_scale":
            assert abs(got - want) <= 1e-5 * want, f"{label}: embed_scale {got} != {want}"
        else:
            if isinstance(got, float):  # float32 fields travel as JSON numbers (cJSON prints 15 digits)
                got = f32(got)
            assert got == want, f"{label}: {key}: resafe {got!r}, transformers {want!r}"
    rp = config.rope_parameters
    assert ours["rope_type"] == rp["rope_type"], label
    assert f32(ours["rope_theta"]) == f32(rp["rope_theta"]), label
    if rp["rope_type"] != "default":
        assert f32(ours["rope_factor"]) == f32(rp["factor"]), label
    if rp["rope_type"] == "llama3":
        assert f32(ours["rope_low_freq_factor"]) == f32(rp["low_freq_factor"]), label
        assert f32(ours["rope_high_freq_factor"]) == f32(rp["high_freq_factor"]), label
        assert ours["rope_original_max_position"] == rp["original_max_position_embeddings"], label
    assert ours["model_type"] == config.model_type, label


def save(config, path):
    config.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_hf_config_matches_transformers_model(family, tmp_path, rng_seed):
    rng = random.Random(f"{rng_seed}-{family.__name__}")
    for trial in range(3):
        d = save(family(rng), tmp_path / f"m{trial}")
        config, ref = reference(d)
        check_matches(parse_ok(d), config, ref, f"{family.__name__} trial {trial}")


def _to_legacy(cfg):
    """The 4.x spelling: rope_theta at top level, scaling in rope_scaling with "type"."""
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rtype = rp.pop("rope_type")
    rp.pop("type", None)
    cfg["rope_scaling"] = None if rtype == "default" else {"type": rtype, **rp}
    return cfg


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_hf_config_legacy_rope_scaling_spelling(family, tmp_path, rng_seed):
    rng = random.Random(f"{rng_seed}-legacy-{family.__name__}")
    d = save(family(rng), tmp_path / "m")
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    assert "rope_parameters" in cfg, "transformers 5.x writes rope_parameters"
    path.write_text(json.dumps(_to_legacy(cfg)))
    config, ref = reference(d)
    check_matches(parse_ok(d), config, ref, f"legacy {family.__name__}")


MINIMAL = {"llama": 4, "mistral": 8, "qwen2": 32, "gemma": 16}  # n_heads divisible by the kv default


@pytest.mark.parametrize("model_type", sorted(MINIMAL))
def test_hf_config_absent_keys_take_the_family_defaults(model_type, tmp_path, rng_seed):
    rng = random.Random(f"{rng_seed}-{model_type}")
    heads = MINIMAL[model_type]
    cfg = {"model_type": model_type, "vocab_size": rng.randint(64, 300), "hidden_size": heads * 2 * rng.randint(1, 4),
           "intermediate_size": rng.randint(8, 64), "num_hidden_layers": rng.randint(1, 2),
           "num_attention_heads": heads}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config, ref = reference(tmp_path)
    check_matches(parse_ok(tmp_path), config, ref, f"minimal {model_type}")


def test_hf_config_rope_scaling_replaces_rope_parameters(tmp_path):
    """Both spellings present: transformers keeps rope_scaling, with the top-level rope_theta."""
    cfg = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 123456.0,
           "rope_scaling": {"type": "linear", "factor": 3.0},
           "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config, ref = reference(tmp_path)
    ours = parse_ok(tmp_path)
    check_matches(ours, config, ref, "both spellings")
    assert ours["rope_type"] == "linear" and ours["rope_theta"] == 123456.0


def test_hf_config_real_model_configs_match_transformers():
    """Configs shaped like the released checkpoints (4.x spelling): config-level comparison."""
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "corpus", "hf_config_good", "*.json")))
    assert len(files) >= 5
    for path in files:
        ours = parse_ok(path)
        c = transformers.AutoConfig.for_model(**json.load(open(path)))
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        assert (ours["hidden_size"], ours["n_layers"], ours["n_heads"], ours["n_kv_heads"], ours["head_dim"]) == \
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, hd), path
        assert f32(ours["rope_theta"]) == f32(c.rope_parameters["rope_theta"]), path
        assert ours["rope_type"] == c.rope_parameters["rope_type"], path
        assert ours["tie_word_embeddings"] == c.tie_word_embeddings, path
        eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
        assert ours["eos_token_ids"] == eos, path
        if c.rope_parameters["rope_type"] != "default":  # inv_freq of the real rope init function
            init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[c.rope_parameters["rope_type"]]
            want = init(c)[0].tolist()
            assert all(abs(g - w) <= 1e-6 * w for g, w in zip(ours["inv_freq"], want)), path


# ---------------------------------------------------------------- malformed inputs

def _corpus():
    return sorted(glob.glob(os.path.join(CORPUS, "*.json")))


def test_hf_config_corpus_is_present():
    assert len(_corpus()) >= 20


@pytest.mark.parametrize("path", _corpus(), ids=os.path.basename)
def test_hf_config_malformed_is_rejected_with_one_line(path):
    p = run_tool(path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, f"{path}: exit {p.returncode}\n{p.stdout}{p.stderr}"
    assert len(lines) == 1 and lines[0].startswith("resafe: error: "), p.stderr
    assert lines[0].startswith(f"resafe: error: {path}: "), f"message does not name the file: {lines[0]}"
    assert p.stdout == ""
    # the file name ends with "__<word>": a word the message must contain (the key at fault)
    expect = os.path.basename(path).split("__")[-1].removesuffix(".json")
    message = lines[0][len(f"resafe: error: {path}: "):]
    assert expect in message, f"message should mention '{expect}': {lines[0]}"


def test_hf_config_missing_directory_and_file(tmp_path):
    p = run_tool(tmp_path)
    assert p.returncode == 1 and "config.json" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = run_tool(tmp_path / "nope")
    assert p.returncode == 1 and "nope" in p.stderr, p.stderr
