"""LLM-QAT activation and KV fake quantization ([sft] qat_act_bits, qat_kv_bits) on the cpu
backend: the op against the formula, the training forward and backward against torch autograd
with the same fake quantization and a straight-through estimator, and `resafe sft` with the new
options resuming bit-identically.

The grids (backend.h fake_quant_groups, model_train.h rs_train_state_set_fake_quant):
  linear inputs: per token, symmetric   q = clamp(rint(x / s), -Q, Q) s, s = max|x| / Q, Q = 2^(b-1) - 1
  K (after RoPE), V: per token and kv head, asymmetric
                 q = (clamp(rint(x / s) + z, 0, 2^b - 1) - z) s, s = (max - min) / (2^b - 1),
                 z = rint(-min / s)
  a constant run is left unchanged; STE: d q / d x = identity.

The model reference is float64 autograd (test_model_grad's truly_float64) with the fake
quantization applied at the same places (torch.round: half to even, as rintf). A rounding
decision is discontinuous, so where an fp32 value sits within its rounding error of a decision
boundary (x / s at k + 1/2, or -min / s for the zero point) ours and the reference may legitimately
land on neighbouring grid points. The test therefore picks an instance (model and batch, drawn
from the seed) whose every quantized value is at least 8x the observed fp32-vs-float64 error away
from any boundary; torch's own fp32 run measures that error (ours is within a few times of it,
see test_model_grad). On such an instance both sides make the same decisions and the usual
tolerances apply: gradients 1e-4 relative per tensor, seq_logp 1e-4 absolute. That the test can
fail: the quantized reference differs from the unquantized one by far more (checked: > 50x the
tolerance), so a missing or misplaced quantizer, or a weight gradient taken from the unquantized
input, fails it.
"""
import copy
import os
import random
import sys

import numpy as np
import pytest
import torch

from conftest import run_resafe
from test_model_grad import (GRAD_TOL, LOGP_TOL, check_close, make_model, random_batch,
                             rel_err, reference_loss, run_tool, truly_float64)
from test_ops_grad import fake_quant_ref, nan, run_op

transformers = pytest.importorskip("transformers")

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- the op

def fake_quant64(x, bits, symmetric):
    """Rows of x onto their grids in float64; also the distance of each rounding argument to the
    nearest tie (k + 1/2), the smallest per row (inf for constant rows)."""
    x = np.asarray(x, np.float64)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    const = (lo == hi)[:, 0]
    span = np.where(lo == hi, 1.0, hi - lo)
    if symmetric:
        q_max = 2.0 ** (bits - 1) - 1
        scale = np.where(lo == hi, 1.0, np.maximum(-lo, hi)) / q_max
        t = x / scale
        out = np.clip(np.rint(t), -q_max, q_max) * scale
        args = [t]
    else:
        q_max = 2.0 ** bits - 1
        scale = span / q_max
        zero = np.rint(-lo / scale)
        t = x / scale
        out = (np.clip(np.rint(t) + zero, 0, q_max) - zero) * scale
        args = [t, -lo / scale]
    out[const] = x[const]
    margin = np.full(len(x), np.inf)
    for a in args:
        d = np.abs(a - np.floor(a) - 0.5).min(axis=1)
        margin = np.minimum(margin, np.where(const, np.inf, d))
    return out, margin


@pytest.mark.parametrize("symmetric", [0, 1], ids=["asym", "sym"])
def test_fake_quant_groups_matches_the_formula_and_float64(tmp_path, rng_seed, symmetric):
    """Bit-identical to the fp32 formula (fake_quant_rows's, per group, in place); within fp32
    rounding of the float64 grid point wherever the float64 argument is not within 1e-4 of a tie;
    constant groups unchanged; group sizes odd and even, 1 included."""
    rng = np.random.default_rng(rng_seed)
    for bits in range(2, 9):
        group = int(rng.choice([1, 2, 3, 8, 37, 64, 129]))
        # at least 8 groups: a group lands within 1e-4 of a tie with probability up to ~3% (129
        # arguments), so with 1-2 groups the "most groups clear" check below failed ~0.4% of runs
        n_groups = int(rng.integers(8, 40))
        x = (rng.standard_normal((n_groups, group)) * rng.uniform(0.01, 10)).astype(np.float32)
        if group > 1:
            x[0] = 0
            x[1] = np.float32(0.3)
            x[2, :] = x[2, 0]
            x[2, -1] += 1  # constant but for one entry
        got = run_op(tmp_path, "fake_quant_groups", {"x": x.reshape(-1)}, n_groups=n_groups,
                     group=group, bits=bits, symmetric=symmetric)["x"].reshape(n_groups, group)
        want32 = fake_quant_ref(x, bits, symmetric)
        bad = np.flatnonzero(got.view(np.uint32) != want32.view(np.uint32))
        assert bad.size == 0, f"bits={bits} group={group}: {bad.size} values differ from the formula"
        want64, margin = fake_quant64(x, bits, symmetric)
        clear = margin > 1e-4
        assert clear.mean() > 0.5 or group <= 2, "too few values away from ties to compare"
        scale = np.abs(x).max(1) + 1e-30
        err = np.abs(got - want64).max(1) / scale
        assert np.all(err[clear] <= 4 * 2.0 ** -24 * 2 ** bits), (bits, group, err[clear].max())
        const = x.min(1) == x.max(1)
        assert np.array_equal(got[const], x[const])
        levels = [len(np.unique(r)) for r in got]
        assert max(levels) <= 2 ** bits


@pytest.mark.parametrize("symmetric", [0, 1], ids=["asym", "sym"])
def test_grouped_fake_quant_rows_equals_numpy_grouped_rtn(tmp_path, rng_seed, symmetric):
    """[sft] qat_group_size = G: resafe sft fake-quantizes a [rows, cols] weight as fake_quant_rows
    of its [rows * cols / G, G] view. On the cpu that equals numpy's grouped RTN (test_quant's
    ref_int, quant.c's formula: groups of G columns of each row) bit for bit, but for the sign
    of zero (+0 folds it), for every bits and G, constant and one-sign groups included."""
    from test_quant import ref_int
    rng = np.random.default_rng(rng_seed)
    for bits in range(2, 9):
        for G in (0, 32, 64, 128):
            rows, cols = int(rng.integers(2, 9)), 128 * int(rng.integers(1, 4))
            w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 10)).astype(np.float32)
            w[0, :32] = 0  # a zero group, a constant one, one of each sign
            w[0, 32:64] = np.float32(0.3)
            w[1, :32] = np.abs(w[1, :32]) + np.float32(0.1)
            w[1, 32:64] = -np.abs(w[1, 32:64])
            g = G or cols
            got = run_op(tmp_path, "fake_quant_rows", {"w_q": nan(rows * cols // g, g),
                                                       "w": w.reshape(-1, g)},
                         rows=rows * cols // g, cols=g, bits=bits,
                         symmetric=symmetric)["w_q"].reshape(rows, cols)
            want = ref_int(w, bits, G, symmetric)[1] + np.float32(0)
            bad = np.flatnonzero((got + np.float32(0)).view(np.uint32) != want.view(np.uint32))
            assert bad.size == 0, f"bits={bits} G={G}: {bad.size} values differ from grouped RTN"
            if 0 < G < cols:  # and the groups are not the rows: per-row RTN is another grid
                per_row = ref_int(w, bits, 0, symmetric)[1]
                assert not np.array_equal(want, per_row + np.float32(0))


# ---------------------------------------------------------------- the reference model

def fq_torch(x, bits, symmetric, group):
    """Fake quantization of x's last dimension in runs of `group`, in x's dtype, STE backward;
    returns (value, the rounding arguments t, their scale) for the boundary checks."""
    g = x.reshape(-1, group)
    lo, hi = g.min(-1, keepdim=True).values, g.max(-1, keepdim=True).values
    const = lo == hi
    with torch.no_grad():
        if symmetric:
            q_max = 2.0 ** (bits - 1) - 1
            scale = torch.where(const, torch.ones_like(lo), torch.maximum(-lo, hi) / q_max)
            t = g / scale
            q = torch.clamp(torch.round(t), -q_max, q_max) * scale
            args = [t]
        else:
            q_max = 2.0 ** bits - 1
            scale = torch.where(const, torch.ones_like(lo), (hi - lo) / q_max)
            zero = torch.round(-lo / scale)
            t = g / scale
            q = (torch.clamp(torch.round(t) + zero, 0, q_max) - zero) * scale
            args = [t, (-lo / scale).expand_as(t)]
        q = torch.where(const, g, q)
        keep = (~const).expand_as(t)
        args = [a[keep].reshape(-1) for a in args]
    q = g + (q - g).detach()  # straight-through
    return q.reshape(x.shape), args


class Recorder:
    """Fake quantization at the sites of ours, recording every rounding argument in call order."""

    def __init__(self, act_bits, kv_bits):
        self.act_bits, self.kv_bits, self.args, self.kv_calls = act_bits, kv_bits, [], 0

    def act(self, x):
        if not self.act_bits:
            return x
        q, args = fq_torch(x, self.act_bits, 1, x.shape[-1])
        self.args += args
        return q

    def kv(self, x):  # [B, n_kv, T, head_dim]: runs of head_dim are (token, head)
        if not self.kv_bits:
            return x
        self.kv_calls += 1
        q, args = fq_torch(x, self.kv_bits, 0, x.shape[-1])
        self.args += args
        return q


class QuantInput(torch.nn.Module):
    def __init__(self, base, rec):
        super().__init__()
        self.base, self.rec = base, rec

    def forward(self, x):
        return self.base(self.rec.act(x))


def attach_quant(model, rec, monkeypatch):
    """Quantizers on every linear's input and on K, V at the attention's entry (after RoPE,
    before the GQA repeat), undone when the monkeypatch context ends."""
    wrapped = []
    for layer in model.model.layers:
        for name in LINEARS:
            parent = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
            wrapped.append((parent, name, getattr(parent, name)))
            setattr(parent, name, QuantInput(getattr(parent, name), rec))
    monkeypatch.setattr(model, "_quant_wrapped", wrapped, raising=False)
    mod = sys.modules[type(model).__module__]
    eager = mod.eager_attention_forward

    def quant_attention(module, query, key, value, *args, **kwargs):
        return eager(module, query, rec.kv(key), rec.kv(value), *args, **kwargs)

    monkeypatch.setattr(mod, "eager_attention_forward", quant_attention)


def detach_quant(model):
    for parent, name, linear in model._quant_wrapped:
        setattr(parent, name, linear)


def quant_reference(model, batch, act_bits, kv_bits, monkeypatch):
    """Gradients, seq_logps and the rounding arguments of the fake-quantized model."""
    rec = Recorder(act_bits, kv_bits)
    with monkeypatch.context() as mp:
        attach_quant(model, rec, mp)
        try:
            model.zero_grad(set_to_none=True)
            loss, logps = reference_loss(model, batch)
            loss.backward()
        finally:
            detach_quant(model)
    assert not kv_bits or rec.kv_calls == 4 * len(batch["lens"]), "K/V were not quantized"
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return grads, logps, torch.cat(rec.args).numpy() if rec.args else np.zeros(0)


def clear_of_ties(args64, args32):
    """Every float64 rounding argument is farther from a tie (k + 1/2) than 8x its estimated fp32
    error: the larger of torch's fp32 deviation for that value and a typical relative deviation
    (the 90th percentile over the instance) times its size."""
    if len(args64) == 0:
        return True
    if len(args32) != len(args64):
        return False  # the runs quantized different things: a decision already differs
    err = np.abs(args64 - args32)
    size = np.maximum(np.abs(args64), 1.0)
    typical = np.quantile(err / size, 0.9)
    dist = np.abs(args64 - np.floor(args64) - 0.5)
    return bool(np.all(dist > 8 * np.maximum(err, typical * size)))


def clean_instance(tmp_path, family, seed, act_bits, kv_bits, monkeypatch, tries=60):
    """The first (model, batch) from the seed on which every rounding decision is clear of
    fp32 noise by 8x (see the module docstring)."""
    for k in range(tries):
        s = seed + 7919 * k
        model, path = make_model(tmp_path, family, s)
        batch = random_batch(random.Random(s + 1), model.config.vocab_size, B=2, lo=3, hi=7,
                             extra_pad=2)
        _, _, a32 = quant_reference(copy.deepcopy(model), batch, act_bits, kv_bits, monkeypatch)
        m64 = truly_float64(model, monkeypatch)
        g64, lp64, a64 = quant_reference(m64, batch, act_bits, kv_bits, monkeypatch)
        if clear_of_ties(a64, a32):
            return model, m64, path, batch, g64, lp64, k
    pytest.fail(f"no instance clear of rounding ties in {tries} draws")


# Each quantizer alone: with both on, token 0's attention output is a copy of its quantized V
# row (softmax over one key), whose grid values put exact ties on the activation grid, which fp32
# and float64 may break differently; the two code paths are independent flags, and `resafe sft`
# runs them together below.
@pytest.mark.parametrize("act_bits,kv_bits", [(8, 0), (4, 0), (0, 4), (0, 8)])
@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias"])
def test_fake_quant_forward_and_ste_gradients_match_autograd(family, act_bits, kv_bits, tmp_path,
                                                             rng_seed, monkeypatch):
    model, m64, path, batch, refs, logps, tries = clean_instance(tmp_path, family, rng_seed,
                                                                 act_bits, kv_bits, monkeypatch)
    args = ["--qat-act", act_bits, "--qat-kv", kv_bits]
    ours = run_tool(path, batch, tmp_path, *args)
    assert set(refs) == set(ours) - {"seq_logp"}
    assert np.abs(ours["seq_logp"] - logps).max() <= LOGP_TOL, (ours["seq_logp"], logps)
    worst = check_close(ours, refs, GRAD_TOL, f"{family} A{act_bits} KV{kv_bits}")
    # the quantizers matter far beyond the tolerance (else this test could not fail)
    m64.zero_grad(set_to_none=True)
    loss, plain_logps = reference_loss(m64, batch)
    loss.backward()
    plain = {n: p.grad.numpy() for n, p in m64.named_parameters()}
    moved = max(rel_err(plain[n], refs[n]) for n in refs)
    assert moved > 50 * GRAD_TOL, f"quantization moves the gradients by only {moved:.3g}"
    print(f"{family} A{act_bits} KV{kv_bits}: instance {tries}, worst {worst:.3g}, "
          f"quantization moves gradients by {moved:.3g}")
    recomputed = run_tool(path, batch, tmp_path, *args, "--recompute")
    for name in ours:
        assert np.array_equal(ours[name], recomputed[name]), f"recompute changed '{name}'"
    plain_ours = run_tool(path, batch, tmp_path)
    assert np.abs(plain_ours["seq_logp"] - plain_logps).max() <= LOGP_TOL


def test_bad_fake_quant_bits_are_refused(tmp_path, rng_seed):
    model, path = make_model(tmp_path, "llama_gqa", rng_seed)
    batch = random_batch(random.Random(rng_seed), model.config.vocab_size)
    p = run_tool(path, batch, tmp_path, "--qat-act", 1, check=False)
    assert p.returncode == 1 and "0 = off, else 2..8" in p.stderr, p.stderr


# ---------------------------------------------------------------- resafe sft

def test_sft_act_kv_qat_resume_is_identical_and_changes_the_run(tmp_path):
    """W4 A8 KV4 SFT stopped by a NaN after the step-4 checkpoint, then resumed: the same bytes
    as one run; and the options change the numbers (they are not ignored)."""
    from test_train_cli import ENV, copy_task, read, sft_config
    from test_train_cli import make_model as make_char_model
    model = make_char_model(tmp_path / "char", "--hidden", "32", "--layers", "2", "--vocab", "259")
    data, _ = copy_task(tmp_path, n_train=64, n_held=1)
    over = dict(sft__qat="true", sft__qat_bits=4, sft__qat_act_bits=8, sft__qat_kv_bits=4,
                sft__max_steps=8, sft__batch_size=8, sft__micro_batch_size=4,
                run__checkpoint_every=2, sft__weight_decay=0.01)
    a, b, c = (str(tmp_path / n) for n in "abc")
    run_resafe("sft", "--config", sft_config(tmp_path, model, data, a, **over), env=ENV)
    cfg = sft_config(tmp_path, model, data, b, **over)
    p = run_resafe("sft", "--config", cfg, check=False, env=dict(ENV, RESAFE_TEST_NAN_STEP="5"))
    assert p.returncode == 1 and "step 6" in p.stderr, p.stderr
    run_resafe("sft", "--config", cfg, "--resume", env=ENV)
    for f in ("metrics.jsonl", "model/model.safetensors", "checkpoint.h5"):
        assert read(f"{a}/sft/{f}") == read(f"{b}/sft/{f}"), f
    plain = dict(over, sft__qat_act_bits=0, sft__qat_kv_bits=0)
    run_resafe("sft", "--config", sft_config(tmp_path, model, data, c, **plain), env=ENV)
    assert read(f"{a}/sft/metrics.jsonl") != read(f"{c}/sft/metrics.jsonl")


def test_sft_refuses_one_bit(tmp_path):
    from test_train_cli import ENV, copy_task, sft_config
    from test_train_cli import make_model as make_char_model
    model = make_char_model(tmp_path / "char", "--hidden", "32", "--layers", "1", "--vocab", "259")
    data, _ = copy_task(tmp_path, n_train=8, n_held=1)
    out = str(tmp_path / "run")
    cfg = sft_config(tmp_path, model, data, out, sft__qat_kv_bits=1)
    p = run_resafe("sft", "--config", cfg, check=False, env=ENV)
    assert p.returncode == 1 and "qat_kv_bits = 1" in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(out, "sft", "model"))
