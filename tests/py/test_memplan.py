"""`resafe dpo`'s memory plan (src/memplan.c): made before anything is allocated, checked against
the memory the run then holds, refused when it exceeds the free memory, and `--plan` as a dry run
from config.json alone.

On the cpu backend the plan is computed by the same sizing code that allocates (model_load,
lora, snip, model_train), so it should agree with the backend's accounting up to allocator
rounding; the tolerance is 15% (what the issue asks for) although the runs below agree to the
printed 0.1 MiB. The models are the tiny random Llama chat models of test_train_cli.py.
"""
import json
import os
import re

import pytest

from conftest import run_resafe
from test_train_cli import ENV, dpo_config, make_model, tiny_model  # noqa: F401 (fixture)

PLAN = re.compile(r"dpo: memory plan on (\w+) .*?: weights ([0-9.]+) MiB.*?; ([0-9.]+) MiB in all")
PARTS = re.compile(r"weights ([0-9.]+) MiB.*?, adapter \(A, B, gradients, masks, SNIP\) ([0-9.]+) "
                   r"MiB, optimizer state ([0-9.]+) MiB, activations ([0-9.]+) MiB")
HELD = re.compile(r"dpo: memory on \w+: .*?; ([0-9.]+) MiB in all \(planned ([0-9.]+) MiB\)")
PEAK = re.compile(r"after the first step [0-9.]+ MiB held, peak ([0-9.]+) MiB")
GIB = re.compile(r"MiB in all \(([0-9.]+) GiB\)")


@pytest.mark.parametrize("over", [
    {},
    {"model__recompute": "true"},
    {"lora__rank": 16, "snip__mask": "none", "lora__dropout": 0},
    {"lora__rank": 8, "dpo__micro_batch_size": 4, "model__recompute": "true"},
    {"model__recompute": "true", "model__recompute_layers": 1},
    {"snip__mask": "elementwise", "lora__dropout": 0, "lora__targets": "q,v,down"},
])
def test_dpo_plan_is_within_15_percent_of_the_measured_memory_on_cpu(tmp_path, tiny_model, over):
    over = dict(over, dpo__max_steps=1, run__checkpoint_every=0)
    out = str(tmp_path / "run")
    p = run_resafe("dpo", "--config", dpo_config(tmp_path, tiny_model, out, **over), "-v", env=ENV)
    plan = PLAN.search(p.stderr)
    held, peak = HELD.search(p.stderr), PEAK.search(p.stderr)
    assert plan and held and peak, p.stderr
    planned = float(plan.group(3))
    assert float(held.group(2)) == planned
    for measured in (float(held.group(1)), float(peak.group(1))):
        assert abs(measured - planned) <= 0.15 * measured, (over, planned, measured)
    # part by part too (the measured line follows the plan's)
    lines = [l for l in p.stderr.splitlines() if "memory plan on" in l or "memory on" in l]
    want, got = ([float(x) for x in PARTS.search(l).groups()] for l in lines[:2])
    for w, g in zip(want, got):
        assert abs(w - g) <= 0.15 * g + 0.05, (over, want, got)  # + half the printed 0.1 MiB
    assert "exceeds the memory plan" not in p.stderr
    # printed before the weights are read
    assert p.stderr.index("memory plan on") < p.stderr.index("parameters (")


LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
             "eos_token_id": 2}


def plan_llama2_7b(tmp_path, *sets, env=ENV):
    model = tmp_path / "llama2-7b"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    cfg = dpo_config(tmp_path, str(model), str(tmp_path / "run"), model__backend="cuda",
                     dpo__data_file=str(tmp_path / "absent.jsonl"), dpo__batch_size=4,
                     dpo__micro_batch_size=0, dpo__max_seq_len=512, snip__mask="none",
                     lora__rank=128, lora__alpha=256, lora__targets="all", lora__dropout=0)
    return run_resafe("dpo", "--config", cfg, "--plan", *sets, check=False, env=env)


@pytest.mark.parametrize("recompute,measured_gib", [("false", 34.5), ("true", 19.5)])
def test_dpo_plan_of_llama2_7b_from_config_json_alone_matches_the_h100_measurements(
        tmp_path, recompute, measured_gib):
    """Issue #6's benchmark shape (r 128, alpha 256, all 7 projections, 4 pairs x 2 sequences of
    512 tokens, no SNIP mask, bf16 on cuda) planned on this GPU-less machine from a directory
    holding only config.json. An H100 measured a peak of 34.5 GiB without recompute and 19.5 GiB
    with it (scripts/bench/results, allocations through the backend, weights 12.6 GiB bf16): the
    plan must be within 20% of both (it was within 0.1 GiB when written)."""
    p = plan_llama2_7b(tmp_path, "--set", f"model.recompute={recompute}")
    assert p.returncode == 0, p.stderr
    assert not os.path.exists(tmp_path / "run" / "dpo")
    plan = PLAN.search(p.stderr)
    assert plan and plan.group(1) == "cuda", p.stderr
    assert "for 8 x 512 tokens" in p.stderr and "bf16 weights" in p.stderr
    weights_gib = float(plan.group(2)) / 1024
    assert abs(weights_gib - 12.6) <= 0.05 * 12.6, weights_gib
    total_gib = float(GIB.search(p.stderr).group(1))
    assert abs(total_gib - measured_gib) <= 0.2 * measured_gib, (total_gib, measured_gib)


def test_dpo_plan_says_when_it_does_not_fit_and_still_exits_0(tmp_path):
    p = plan_llama2_7b(tmp_path, env=dict(ENV, RESAFE_PLAN_FREE_BYTES="24G"))
    assert p.returncode == 0, p.stderr
    assert re.search(r"warning: .*memory plan needs 3[0-9.]+ GiB .* only 24.00 GiB are free", p.stderr)
    p = plan_llama2_7b(tmp_path, "--set", "model.recompute=true",
                       env=dict(ENV, RESAFE_PLAN_FREE_BYTES="24G"))
    assert p.returncode == 0 and "the plan fits: 24.00 GiB free" in p.stderr, p.stderr


def activations_mib(p):
    assert p.returncode == 0, p.stderr
    return float(PARTS.search(p.stderr).group(4))


def test_partial_recompute_plans_one_layer_of_activations_per_kept_layer(tmp_path):
    """[model] recompute_layers = k: the first k layers reuse the buffers of layer k (the first
    that keeps its own), so the plan's activations are all-recompute's (one set) plus 31 - k
    layers' worth; recompute off is k = 0."""
    none = activations_mib(plan_llama2_7b(tmp_path))
    every = activations_mib(plan_llama2_7b(tmp_path, "--set", "model.recompute=true"))
    plans = {k: activations_mib(plan_llama2_7b(tmp_path, "--set", "model.recompute=true",
                                               "--set", f"model.recompute_layers={k}"))
             for k in (1, 7, 31, 32, 40)}
    layer = (plans[1] - every) / 30
    assert layer > 300, plans  # a 7B layer keeps ~0.48 GiB for 8 x 512 tokens
    for k, mib in plans.items():
        assert abs(mib - (every + max(31 - k, 0) * layer)) <= 0.2, (k, plans, every)
    assert abs(none - (every + 31 * layer)) <= 0.2, (none, every, plans)
    p = plan_llama2_7b(tmp_path, "--set", "model.recompute=true", "--set",
                       "model.recompute_layers=7")
    assert "recompute 7 of 32 layers" in p.stderr, p.stderr


def test_a_plan_that_does_not_fit_names_the_fewest_recomputing_layers_that_do(tmp_path):
    free = dict(ENV, RESAFE_PLAN_FREE_BYTES="26G")
    p = plan_llama2_7b(tmp_path, env=free)
    m = re.search(r"set \[model\] recompute = true and recompute_layers = (\d+) \(the fewest "
                  r"recomputing layers that fit: ([0-9.]+) GiB\)", p.stderr)
    assert p.returncode == 0 and m, p.stderr
    k = int(m.group(1))
    assert 1 < k < 32 and float(m.group(2)) <= 26, m.groups()
    fits = plan_llama2_7b(tmp_path, "--set", "model.recompute=true", "--set",
                          f"model.recompute_layers={k}", env=free)
    assert "the plan fits: 26.00 GiB free" in fits.stderr, fits.stderr
    short = plan_llama2_7b(tmp_path, "--set", "model.recompute=true", "--set",
                           f"model.recompute_layers={k - 1}", env=free)
    assert "the plan fits" not in short.stderr and f"recompute_layers = {k} " in short.stderr
    more = plan_llama2_7b(tmp_path, "--set", "model.recompute=true", "--set",
                          "model.recompute_layers=20", env=dict(ENV, RESAFE_PLAN_FREE_BYTES="21G"))
    m = re.search(r"recompute_layers = (\d+) \(the fewest", more.stderr)
    assert m and 20 < int(m.group(1)) < 32, more.stderr
    tight = plan_llama2_7b(tmp_path, env=dict(ENV, RESAFE_PLAN_FREE_BYTES="8G"))
    assert "even [model] recompute = true does not fit" in tight.stderr, tight.stderr
    p = plan_llama2_7b(tmp_path, "--set", "model.recompute_layers=4")
    assert p.returncode == 1 and "recompute_layers = 4 needs recompute = true" in p.stderr, \
        p.stderr


def test_dpo_refuses_a_plan_over_the_free_memory_with_one_line(tmp_path, tiny_model):
    out = str(tmp_path / "run")
    cfg = dpo_config(tmp_path, tiny_model, out)
    p = run_resafe("dpo", "--config", cfg, check=False,
                   env=dict(ENV, RESAFE_PLAN_FREE_BYTES="1M"))
    assert p.returncode == 1, p.stderr
    errors = [l for l in p.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith("resafe: error: dpo: the memory plan needs"), \
        p.stderr
    assert "only 1.0 MiB are free" in errors[0] and "recompute = true" in errors[0]
    assert "parameters (" not in p.stderr  # refused before loading the weights
    assert not os.path.exists(os.path.join(out, "dpo"))
    # the same run fits in 1 GiB
    p = run_resafe("dpo", "--config", cfg, "--set", "dpo.max_steps=1", check=False,
                   env=dict(ENV, RESAFE_PLAN_FREE_BYTES="1G"))
    assert p.returncode == 0, p.stderr


def test_dpo_plan_needs_config_json_and_sft_has_no_plan(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    cfg = dpo_config(tmp_path, str(tmp_path / "empty"), str(tmp_path / "run"))
    p = run_resafe("dpo", "--config", cfg, "--plan", check=False, env=ENV)
    assert p.returncode == 1 and "config.json" in p.stderr, p.stderr
    p = run_resafe("sft", "--config", cfg, "--plan", check=False, env=ENV)
    assert p.returncode == 2 and "unknown argument '--plan'" in p.stderr, p.stderr


def test_train_plan_plans_the_dpo_stage_on_model_path_before_the_quantized_model_exists(tmp_path):
    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    cfg = dpo_config(tmp_path, str(model), str(tmp_path / "run"), model__backend="cuda",
                     dpo__data_file="", dpo__batch_size=4, dpo__micro_batch_size=0,
                     dpo__max_seq_len=512, snip__mask="none", lora__rank=128,
                     lora__targets="all", lora__dropout=0)
    p = run_resafe("train", "--config", cfg, "--plan", check=False, env=ENV)
    assert p.returncode == 0, p.stderr
    assert "does not exist yet: planning [model] path" in p.stderr
    assert PLAN.search(p.stderr) and "for 8 x 512 tokens" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "run" / "quantize")
