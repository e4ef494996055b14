"""Backward, log-prob, LoRA, optimizer and quantization ops of the cpu backend against PyTorch.

Each op runs through build/tools/op_tool (inputs and outputs as safetensors) on random inputs of
odd sizes (seed printed; replay with RESAFE_TEST_SEED). Outputs the op overwrites start as NaN,
gradients it accumulates into start random, so a forgotten element or a missing "+=" fails.

References: the same fp32 inputs in float64 through torch autograd (backward ops), torch.optim.AdamW
(adamw), the documented formula in numpy float32 (fake_quant_rows: test_quant's RTN), and float64 central
differences of the torch forward for the composite ops (attention, rmsnorm, logprob): these check
our gradients against the math, independently of autograd.

Tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-4. Our ops accumulate in fp32 over at
most a few hundred terms: errors are ~sqrt(terms) * 2^-24 relative, i.e. 1e-6 to 1e-5; 1e-4 leaves
room for cancellation without letting a wrong term through (a wrong term is an O(1) error).
"""
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from conftest import BUILD

TOL = 1e-4
f64 = torch.float64


def run_op(tmp_path, op, tensors, **params):
    """Run one op of the cpu backend: tensors are numpy arrays (float32, int32 ids, uint8 masks),
    params go into the metadata (floats as the exact repr of their float32 value)."""
    meta = {}
    for key, v in params.items():
        meta[key] = repr(float(np.float32(v))) if isinstance(v, (float, np.floating)) else str(int(v))
    src, dst = tmp_path / f"{op}.in.safetensors", tmp_path / f"{op}.out.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(src), metadata=meta)
    p = subprocess.run([os.path.join(BUILD, "tools", "op_tool"), op, str(src), str(dst)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"op_tool {op} failed: {p.stderr}"
    return load_file(str(dst))


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if not np.all(np.isfinite(got)):
        return np.inf
    ref_norm = np.linalg.norm(ref)
    return np.linalg.norm(got - ref) / (ref_norm if ref_norm > 0 else 1.0)


def check(what, got, ref, tol=TOL):
    e = rel_err(got, ref)
    print(f"{what}: relative error {e:.2e}")
    assert e <= tol, f"{what}: relative error {e:.3g} > {tol:g}"


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), dtype=f64, requires_grad=grad)


def normal(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def nan(*shape):
    return np.full(shape, np.nan, np.float32)


@pytest.fixture
def rng(rng_seed):
    return np.random.default_rng(rng_seed)


# ---------------------------------------------------------------- float64 torch forwards

def rmsnorm_ref(x, w, eps, add_one):
    rstd = torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return x * rstd * ((1 + w) if add_one else w)


def rope_ref(x, pos, inv_freq):
    """x [n_tok, heads, head_dim] float64; the angle formed in fp32 as the op (and transformers)."""
    angle = torch.tensor((pos.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64))
    c, s = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    y = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    keep = torch.tensor(pos < 0)[:, None, None]
    return torch.where(keep, x, y)


def attention_ref(q, k, v, q_pos, scale):
    """q [B,Tq,H,D], k/v [B,Tk,Hkv,D]; query at position p sees keys 0..p; padded rows give 0."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    kh = k.repeat_interleave(group, dim=2)  # [B,Tk,H,D]: head h reads kv head h // group
    vh = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bjhd->bhtj", q, kh) * scale
    pos = torch.tensor(q_pos.reshape(B, Tq), dtype=torch.int64)
    allowed = torch.arange(Tk)[None, None, :] <= pos.clamp(min=0)[:, :, None]  # [B,Tq,Tk]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhtj,bjhd->bthd", torch.softmax(scores, dim=-1), vh)
    return out * (pos >= 0)[:, :, None, None]


def logprob_ref(logits, targets):
    lp = torch.log_softmax(logits, dim=-1)
    picked = lp.gather(1, torch.tensor(np.maximum(targets, 0), dtype=torch.int64)[:, None])[:, 0]
    return picked * torch.tensor(targets >= 0), torch.logsumexp(logits, dim=-1)


def central_differences(f, inputs, picks, h=1e-5):
    """d f(inputs) / d inputs[name][idx] for each (name, idx) in picks: float64 central
    differences (error ~h^2 * f''' + 1e-16 / h, about 1e-10 relative here)."""
    out = []
    for name, idx in picks:
        plus = {k: v.clone() for k, v in inputs.items()}
        minus = {k: v.clone() for k, v in inputs.items()}
        plus[name][idx] += h
        minus[name][idx] -= h
        out.append((f(**plus) - f(**minus)).item() / (2 * h))
    return np.array(out)


def pick_entries(rng, arrays, names, per_name):
    picks = []
    for name in names:
        shape = arrays[name].shape
        for _ in range(per_name):
            picks.append((name, tuple(int(rng.integers(0, s)) for s in shape)))
    return picks


# ---------------------------------------------------------------- embedding, rmsnorm, linear

def test_embedding_bwd_accumulates_repeated_ids_with_scale(tmp_path, rng):
    vocab, dim, n = int(rng.integers(3, 30)), int(rng.integers(1, 40)), int(rng.integers(5, 40))
    ids = rng.integers(0, vocab, n).astype(np.int32)
    ids[-1] = ids[0]  # at least one repeat
    scale = float(rng.uniform(0.3, 3.0))
    dout, dtable0 = normal(rng, n, dim), normal(rng, vocab, dim)
    got = run_op(tmp_path, "embedding_bwd", {"dtable": dtable0, "dout": dout, "ids": ids},
                 n=n, dim=dim, vocab=vocab, scale=scale)["dtable"]
    table = t64(np.zeros((vocab, dim)), grad=True)
    (table[torch.tensor(ids, dtype=torch.int64)] * float(np.float32(scale)) * t64(dout)).sum().backward()
    check("embedding_bwd dtable", got, dtable0 + table.grad.numpy())


def rmsnorm_case(rng, add_one):
    n, dim = int(rng.integers(1, 9)), int(rng.integers(2, 131))
    x, w = normal(rng, n, dim, scale=3.0), normal(rng, dim)
    eps = float(np.float32(1e-5))
    rstd = (1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1) + eps)).astype(np.float32)
    return n, dim, x, w, eps, rstd


@pytest.mark.parametrize("add_one", [0, 1])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("with_dw", [False, True])
def test_rmsnorm_bwd_matches_autograd(tmp_path, rng, add_one, beta, with_dw):
    n, dim, x, w, eps, rstd = rmsnorm_case(rng, add_one)
    dout, dx0, dw0 = normal(rng, n, dim), normal(rng, n, dim), normal(rng, dim)
    inputs = {"dx": dx0 if beta else nan(n, dim), "dout": dout, "x": x, "w": w, "rstd": rstd}
    if with_dw:
        inputs["dw"] = dw0
    got = run_op(tmp_path, "rmsnorm_bwd", inputs, n=n, dim=dim, add_one=add_one, beta=beta)
    tx, tw = t64(x, True), t64(w, True)
    (rmsnorm_ref(tx, tw, eps, add_one) * t64(dout)).sum().backward()
    check(f"rmsnorm_bwd dx add_one={add_one} beta={beta}", got["dx"], beta * dx0 + tx.grad.numpy())
    if with_dw:
        check(f"rmsnorm_bwd dw add_one={add_one}", got["dw"], dw0 + tw.grad.numpy())
    else:
        assert "dw" not in got


def test_rmsnorm_bwd_matches_central_differences(tmp_path, rng):
    for add_one in (0, 1):
        n, dim, x, w, eps, rstd = rmsnorm_case(rng, add_one)
        dout = normal(rng, n, dim)
        got = run_op(tmp_path, "rmsnorm_bwd", {"dx": nan(n, dim), "dw": np.zeros(dim, np.float32), "dout": dout,
                                               "x": x, "w": w, "rstd": rstd},
                     n=n, dim=dim, add_one=add_one, beta=0.0)
        picks = pick_entries(rng, {"x": x, "w": w}, ["x", "w"], 4)
        fd = central_differences(lambda x, w: (rmsnorm_ref(x, w, eps, add_one) * t64(dout)).sum(),
                                 {"x": t64(x), "w": t64(w)}, picks)
        ours = np.array([got["dx" if name == "x" else "dw"][idx] for name, idx in picks])
        check(f"rmsnorm_bwd vs central differences add_one={add_one}", ours, fd)


@pytest.mark.parametrize("case", ["bias_overwrite", "bias_accumulate", "no_dx", "only_dx_large"])
def test_linear_bwd_matches_autograd(tmp_path, rng, case):
    if case == "only_dx_large":  # n*k*m above the threads' threshold
        n, k, m = int(rng.integers(30, 50)), int(rng.integers(60, 90)), int(rng.integers(40, 70))
    else:
        n, k, m = int(rng.integers(1, 13)), int(rng.integers(1, 77)), int(rng.integers(1, 41))
    beta = 1.0 if case == "bias_accumulate" else 0.0
    x, w, dout = normal(rng, n, k), normal(rng, m, k), normal(rng, n, m)
    dx0, dw0, db0 = normal(rng, n, k), normal(rng, m, k), normal(rng, m)
    inputs = {"dout": dout, "x": x, "w": w}
    if case != "no_dx":
        inputs["dx"] = dx0 if beta else nan(n, k)
    if case != "only_dx_large":
        inputs["dw"], inputs["dbias"] = dw0, db0
    got = run_op(tmp_path, "linear_bwd", inputs, n=n, k=k, m=m, beta=beta)
    tx, tw, tb = t64(x, True), t64(w, True), t64(np.zeros(m), True)
    ((tx @ tw.T + tb) * t64(dout)).sum().backward()
    if case != "no_dx":
        check(f"linear_bwd dx {case}", got["dx"], beta * dx0 + tx.grad.numpy())
    if case != "only_dx_large":
        check(f"linear_bwd dw {case}", got["dw"], dw0 + tw.grad.numpy())
        check(f"linear_bwd dbias {case}", got["dbias"], db0 + tb.grad.numpy())
    assert set(got) == set(inputs) - {"dout", "x", "w"}


# ---------------------------------------------------------------- rope

def rope_case(rng):
    n_tok, n_heads, half = int(rng.integers(2, 12)), int(rng.integers(1, 5)), int(rng.integers(1, 10))
    head_dim = 2 * half
    inv_freq = (10000.0 ** (-2.0 * np.arange(half) / head_dim)).astype(np.float32)
    pos = rng.integers(0, 200, n_tok).astype(np.int32)
    pos[rng.random(n_tok) < 0.3] = -1
    pos[0] = -1  # at least one padded token
    return n_tok, n_heads, head_dim, inv_freq, pos


def test_rope_bwd_is_the_adjoint_and_skips_padding(tmp_path, rng):
    n_tok, n_heads, head_dim, inv_freq, pos = rope_case(rng)
    dy = normal(rng, n_tok, n_heads, head_dim)
    got = run_op(tmp_path, "rope_bwd", {"x": dy, "pos": pos, "inv_freq": inv_freq},
                 n_tok=n_tok, n_heads=n_heads, head_dim=head_dim)["x"]
    x = t64(np.zeros_like(dy), True)
    (rope_ref(x, pos, inv_freq) * t64(dy)).sum().backward()
    check("rope_bwd vs autograd (adjoint)", got, x.grad.numpy())
    assert np.array_equal(got[pos < 0], dy[pos < 0]), "rope_bwd changed a padded token"


def test_rope_bwd_undoes_rope_fwd(tmp_path, rng):
    n_tok, n_heads, head_dim, inv_freq, pos = rope_case(rng)
    x = normal(rng, n_tok, n_heads, head_dim)
    params = dict(n_tok=n_tok, n_heads=n_heads, head_dim=head_dim)
    y = run_op(tmp_path, "rope_fwd", {"x": x, "pos": pos, "inv_freq": inv_freq}, **params)["x"]
    check("rope_fwd vs float64", y, rope_ref(t64(x), pos, inv_freq).numpy())
    back = run_op(tmp_path, "rope_bwd", {"x": y, "pos": pos, "inv_freq": inv_freq}, **params)["x"]
    # a rotation and its inverse with the same cos/sin in fp32: a few ulps of |x|
    check("rope_bwd(rope_fwd(x)) vs x", back, x, tol=1e-6)
    assert np.array_equal(back[pos < 0], x[pos < 0])


# ---------------------------------------------------------------- attention

def attention_case(rng, kind):
    """kind: mha (one kv head per head), gqa_cache (GQA, keys before the queries play the KV
    cache), gqa_large (above the threads' threshold)."""
    n_kv = {"mha": 1, "gqa_cache": int(rng.integers(1, 4)), "gqa_large": 2}[kind]
    group = 1 if kind == "mha" else int(rng.integers(2, 5))
    n_heads = n_kv * group
    if kind == "gqa_large":
        B, Tq, hd = 2, int(rng.integers(14, 20)), 16
    else:
        B, Tq, hd = int(rng.integers(1, 4)), int(rng.integers(1, 7)), int(rng.integers(1, 20))
    Tk = Tq + (0 if kind == "mha" else int(rng.integers(1, 9)))
    q_pos = np.full((B, Tq), -1, np.int32)
    for b in range(B):
        n_real = int(rng.integers(1 if b == 0 else 0, Tq + 1))
        start = 0 if kind == "mha" else int(rng.integers(0, Tk - n_real + 1))
        q_pos[b, :n_real] = start + np.arange(n_real)
    if Tq > 1 and kind != "mha":
        q_pos[-1, -1] = -1  # at least one padded query
    scale = float(np.float32(1 / np.sqrt(hd) * (1 + 0.1 * rng.integers(0, 6))))
    q = normal(rng, B, Tq, n_heads, hd)
    k, v = normal(rng, B, Tk, n_kv, hd), normal(rng, B, Tk, n_kv, hd)
    dout = normal(rng, B, Tq, n_heads, hd)  # padded rows too: they must contribute nothing
    params = dict(B=B, Tq=Tq, Tk=Tk, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd, scale=scale)
    return q, k, v, q_pos.reshape(-1), dout, params


def run_attention_bwd(tmp_path, q, k, v, q_pos, dout, params):
    return run_op(tmp_path, "attention_bwd", {"dq": nan(*q.shape), "dk": nan(*k.shape), "dv": nan(*v.shape),
                                              "dout": dout, "q": q, "k": k, "v": v, "q_pos": q_pos}, **params)


@pytest.mark.parametrize("kind", ["mha", "gqa_cache", "gqa_large"])
def test_attention_bwd_matches_autograd(tmp_path, rng, kind):
    q, k, v, q_pos, dout, params = attention_case(rng, kind)
    got = run_attention_bwd(tmp_path, q, k, v, q_pos, dout, params)
    tq, tk, tv = t64(q, True), t64(k, True), t64(v, True)
    (attention_ref(tq, tk, tv, q_pos, params["scale"]) * t64(dout)).sum().backward()
    for name, t in (("dq", tq), ("dk", tk), ("dv", tv)):
        check(f"attention_bwd {name} {kind} {params}", got[name], t.grad.numpy())
    B, Tq = params["B"], params["Tq"]
    padded = q_pos.reshape(B, Tq) < 0
    assert np.all(got["dq"][padded] == 0), "padded queries must get a zero dq"
    for b in range(B):  # keys past the last attended position get exactly 0
        last = q_pos.reshape(B, Tq)[b].max()
        assert np.all(got["dk"][b, last + 1:] == 0) and np.all(got["dv"][b, last + 1:] == 0)


def test_attention_bwd_matches_central_differences(tmp_path, rng):
    q, k, v, q_pos, dout, params = attention_case(rng, "gqa_cache")
    got = run_attention_bwd(tmp_path, q, k, v, q_pos, dout, params)
    real = np.flatnonzero(q_pos >= 0)
    B, Tq = params["B"], params["Tq"]
    picks = []
    for _ in range(3):  # q entries of real queries; k, v entries of keys 0..max position
        b, t = divmod(int(rng.choice(real)), Tq)
        picks.append(("q", (b, t, int(rng.integers(0, q.shape[2])), int(rng.integers(0, q.shape[3])))))
        j = int(rng.integers(0, q_pos.reshape(B, Tq)[b].max() + 1))
        for name in ("k", "v"):
            picks.append((name, (b, j, int(rng.integers(0, k.shape[2])), int(rng.integers(0, k.shape[3])))))
    loss = lambda q, k, v: (attention_ref(q, k, v, q_pos, params["scale"]) * t64(dout)).sum()  # noqa: E731
    fd = central_differences(loss, {"q": t64(q), "k": t64(k), "v": t64(v)}, picks)
    ours = np.array([got["d" + name][idx] for name, idx in picks])
    check("attention_bwd vs central differences", ours, fd)


# ---------------------------------------------------------------- glu

ACTS = {0: F.silu, 1: lambda g: F.gelu(g, approximate="tanh"), 2: F.gelu}


@pytest.mark.parametrize("act", [0, 1, 2], ids=["silu", "gelu_tanh", "gelu"])
def test_glu_bwd_matches_autograd(tmp_path, rng, act):
    n = int(rng.integers(1, 2000))
    gate, up, dout = normal(rng, n, scale=3.0), normal(rng, n), normal(rng, n)
    got = run_op(tmp_path, "glu_bwd", {"dgate": nan(n), "dup": nan(n), "dout": dout, "gate": gate, "up": up},
                 n=n, act=act)
    tg, tu = t64(gate, True), t64(up, True)
    (ACTS[act](tg) * tu * t64(dout)).sum().backward()
    check(f"glu_bwd dgate act={act}", got["dgate"], tg.grad.numpy())
    check(f"glu_bwd dup act={act}", got["dup"], tu.grad.numpy())


# ---------------------------------------------------------------- log-probabilities

def logprob_case(rng):
    n, vocab = int(rng.integers(2, 12)), int(rng.integers(2, 300))
    logits = normal(rng, n, vocab, scale=3.0)
    targets = rng.integers(0, vocab, n).astype(np.int32)
    targets[rng.random(n) < 0.3] = -1
    targets[0] = -1  # a prompt token
    targets[-1] = vocab - 1
    return n, vocab, logits, targets


def run_logprob(tmp_path, n, vocab, logits, targets, dlogp):
    fwd = run_op(tmp_path, "logprob_fwd", {"logp": nan(n), "lse": nan(n), "logits": logits, "targets": targets},
                 n=n, vocab=vocab)
    bwd = run_op(tmp_path, "logprob_bwd", {"dlogits": nan(n, vocab), "dlogp": dlogp, "logits": logits,
                                           "lse": fwd["lse"], "targets": targets}, n=n, vocab=vocab)
    return fwd, bwd["dlogits"]


def test_logprob_fwd_and_bwd_match_autograd(tmp_path, rng):
    n, vocab, logits, targets = logprob_case(rng)
    dlogp = normal(rng, n)
    fwd, dlogits = run_logprob(tmp_path, n, vocab, logits, targets, dlogp)
    tl = t64(logits, True)
    logp, lse = logprob_ref(tl, targets)
    check("logprob_fwd logp", fwd["logp"], logp.detach().numpy())
    check("logprob_fwd lse", fwd["lse"], lse.detach().numpy())
    assert np.all(fwd["logp"][targets < 0] == 0)
    (logp * t64(dlogp)).sum().backward()
    check("logprob_bwd dlogits", dlogits, tl.grad.numpy())
    assert np.all(dlogits[targets < 0] == 0)


def test_logprob_bwd_matches_central_differences(tmp_path, rng):
    n, vocab, logits, targets = logprob_case(rng)
    dlogp = normal(rng, n)
    _, dlogits = run_logprob(tmp_path, n, vocab, logits, targets, dlogp)
    rows = np.flatnonzero(targets >= 0)
    picks = [("logits", (int(i), int(targets[i]))) for i in rows[:3]]  # the target's own logit
    picks += [("logits", (int(rng.choice(rows)), int(rng.integers(0, vocab)))) for _ in range(4)]
    loss = lambda logits: (logprob_ref(logits, targets)[0] * t64(dlogp)).sum()  # noqa: E731
    fd = central_differences(loss, {"logits": t64(logits)}, picks)
    check("logprob_bwd vs central differences", np.array([dlogits[idx] for _, idx in picks]), fd)


# ---------------------------------------------------------------- LoRA

def lora_case(rng):
    n, k, m, r = (int(rng.integers(1, 12)), int(rng.integers(1, 60)), int(rng.integers(1, 50)),
                  int(rng.integers(1, 9)))
    scale = float(np.float32(rng.uniform(0.5, 4.0)))
    return n, k, m, r, scale, normal(rng, n, k), normal(rng, r, k), normal(rng, m, r)


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_lora_fwd_adds_scaled_low_rank_product(tmp_path, rng, beta):
    """y = beta y + scale (x A^T) B^T; beta 0 on a NaN-poisoned y (y is not read)."""
    n, k, m, r, scale, x, A, B = lora_case(rng)
    y0 = nan(n, m) if beta == 0.0 else normal(rng, n, m)
    got = run_op(tmp_path, "lora_fwd", {"y": y0, "xa": nan(n, r), "x": x, "A": A, "B": B},
                 n=n, k=k, m=m, r=r, scale=scale, beta=beta)
    xa = t64(x) @ t64(A).T
    check("lora_fwd xa", got["xa"], xa.numpy())
    want = scale * (xa @ t64(B).T).numpy()
    check("lora_fwd y", got["y"], want if beta == 0.0 else beta * y0 + want)


@pytest.mark.parametrize("beta", [0.0, 1.0, None], ids=["overwrite", "accumulate", "no_dx"])
def test_lora_bwd_matches_autograd(tmp_path, rng, beta):
    n, k, m, r, scale, x, A, B = lora_case(rng)
    dy, dx0, dA0, dB0 = normal(rng, n, m), normal(rng, n, k), normal(rng, r, k), normal(rng, m, r)
    xa = (x.astype(np.float64) @ A.astype(np.float64).T).astype(np.float32)
    inputs = {"dA": dA0, "dB": dB0, "dy": dy, "x": x, "xa": xa, "A": A, "B": B}
    if beta is not None:
        inputs["dx"] = dx0 if beta else nan(n, k)
    got = run_op(tmp_path, "lora_bwd", inputs, n=n, k=k, m=m, r=r, scale=scale, beta=beta or 0.0)
    tx, tA, tB = t64(x, True), t64(A, True), t64(B, True)
    (scale * (tx @ tA.T) @ tB.T * t64(dy)).sum().backward()
    if beta is not None:
        check(f"lora_bwd dx beta={beta}", got["dx"], beta * dx0 + tx.grad.numpy())
    check("lora_bwd dA", got["dA"], dA0 + tA.grad.numpy())
    check("lora_bwd dB", got["dB"], dB0 + tB.grad.numpy())


def mask_case(rng, kind, m, k):
    if kind == "none":
        return None
    mask = (rng.random((m, k)) < 0.6).astype(np.uint8)
    if kind == "mask_big_values":  # any nonzero byte means "keep"
        mask *= rng.integers(1, 256, (m, k)).astype(np.uint8)
    return mask


@pytest.mark.parametrize("mask_kind", ["none", "mask", "mask_big_values"])
def test_lora_merge_and_masked_grad_match_autograd(tmp_path, rng, mask_kind):
    _, k, m, r, scale, _, A, B = lora_case(rng)
    w, dw = normal(rng, m, k), normal(rng, m, k)
    dA0, dB0 = normal(rng, r, k), normal(rng, m, r)
    mask = mask_case(rng, mask_kind, m, k)
    extra = {} if mask is None else {"mask": mask}
    merged = run_op(tmp_path, "lora_merge", {"w_eff": nan(m, k), "w": w, "A": A, "B": B, **extra},
                    m=m, k=k, r=r, scale=scale)["w_eff"]
    grads = run_op(tmp_path, "lora_masked_grad", {"dA": dA0, "dB": dB0, "dw": dw, "A": A, "B": B, **extra},
                   m=m, k=k, r=r, scale=scale)
    tA, tB = t64(A, True), t64(B, True)
    keep = t64(np.ones((m, k)) if mask is None else (mask != 0))
    w_eff = t64(w) + scale * (keep * (tB @ tA))
    check(f"lora_merge w_eff {mask_kind}", merged, w_eff.detach().numpy())
    if mask is not None:  # masked-out entries are w itself, bit for bit
        assert np.array_equal(merged[mask == 0], w[mask == 0])
    (w_eff * t64(dw)).sum().backward()
    check(f"lora_masked_grad dA {mask_kind}", grads["dA"], dA0 + tA.grad.numpy())
    check(f"lora_masked_grad dB {mask_kind}", grads["dB"], dB0 + tB.grad.numpy())


# ---------------------------------------------------------------- optimizer and scores

@pytest.mark.parametrize("masked", [False, True])
def test_adamw_matches_torch_and_leaves_masked_entries_alone(tmp_path, rng, masked):
    n, steps = int(rng.integers(50, 3000)), 6
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    hyper = {key: float(np.float32(val)) for key, val in hyper.items()}  # what the op sees
    grad_scale = float(np.float32(0.37))
    p0 = normal(rng, n)
    mask = (rng.random(n) < 0.7).astype(np.uint8) if masked else None
    keep = np.ones(n, bool) if mask is None else mask != 0
    # masked entries carry a moment history of their own, which must survive untouched
    m0 = np.where(keep, 0, normal(rng, n)).astype(np.float32)
    v0 = np.where(keep, 0, np.abs(normal(rng, n))).astype(np.float32)
    param = t64(p0, True)
    opt = torch.optim.AdamW([param], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                            eps=hyper["eps"], weight_decay=hyper["weight_decay"], foreach=False)
    state = {"p": p0, "m": m0, "v": v0}
    for step in range(1, steps + 1):
        g = normal(rng, n, scale=float(rng.uniform(0.1, 3)))
        inputs = {**state, "g": g, **({} if mask is None else {"mask": mask})}
        state = run_op(tmp_path, "adamw", inputs, n=n, step=step, grad_scale=grad_scale, **hyper)
        param.grad = t64(g) * grad_scale
        opt.step()
    ref_m, ref_v = opt.state[param]["exp_avg"].numpy(), opt.state[param]["exp_avg_sq"].numpy()
    check(f"adamw update p - p0 masked={masked}", (state["p"] - p0)[keep], (param.detach().numpy() - p0)[keep])
    check(f"adamw m masked={masked}", state["m"][keep], ref_m[keep])
    check(f"adamw v masked={masked}", state["v"][keep], ref_v[keep])
    for name, before in (("p", p0), ("m", m0), ("v", v0)):
        assert np.array_equal(state[name][~keep].view(np.uint32), before[~keep].view(np.uint32)), \
            f"adamw changed a masked entry of {name}"


def test_snip_accumulate_adds_weighted_abs_product(tmp_path, rng):
    n = int(rng.integers(1, 50000))
    score0, w, dw = np.abs(normal(rng, n)), normal(rng, n), normal(rng, n)
    weight = float(np.float32(rng.uniform(0.1, 2)))
    got = run_op(tmp_path, "snip_accumulate", {"score": score0, "w": w, "dw": dw}, n=n, weight=weight)["score"]
    check("snip_accumulate", got, score0 + weight * np.abs(w.astype(np.float64) * dw))


def test_sum_squares_matches_float64(tmp_path, rng):
    for n in (1, int(rng.integers(2, 5000)), int(rng.integers(40000, 90000))):
        x = normal(rng, n, scale=10.0)
        got = run_op(tmp_path, "sum_squares", {"x": x}, n=n)["out"]
        # double accumulation of fp32 squares (exact in double): only double rounding remains
        check(f"sum_squares n={n}", got, [np.sum(x.astype(np.float64) ** 2)], tol=1e-10)
        mask = (rng.random(n) < 0.6).astype(np.uint8) * rng.integers(1, 256, n).astype(np.uint8)
        got = run_op(tmp_path, "sum_squares", {"x": x, "mask": mask}, n=n)["out"]
        check(f"masked sum_squares n={n}", got, [np.sum(x.astype(np.float64)[mask != 0] ** 2)], tol=1e-10)


def test_zero_f32_zeroes_everything(tmp_path, rng):
    n = int(rng.integers(1, 5000))
    assert np.all(run_op(tmp_path, "zero_f32", {"x": nan(n)}, n=n)["x"] == 0)


# ---------------------------------------------------------------- fake quantization

def fake_quant_ref(w, bits, symmetric):
    """fake_quant_groups' min-max formula (backend.h), step by step in float32 (numpy's rint:
    half to even)."""
    out = np.empty_like(w)
    for i, row in enumerate(w):
        lo, hi = row.min(), row.max()
        if lo == hi:
            out[i] = row
        elif symmetric:
            q_max = np.float32(2 ** (bits - 1) - 1)
            scale = np.maximum(-lo, hi) / q_max
            out[i] = np.clip(np.rint(row / scale), -q_max, q_max) * scale
        else:
            q_max = np.float32(2 ** bits - 1)
            scale = (hi - lo) / q_max
            zero = np.rint(-lo / scale)
            out[i] = (np.clip(np.rint(row / scale) + zero, 0, q_max) - zero) * scale
        assert out.dtype == np.float32
    return out


@pytest.mark.parametrize("symmetric", [0, 1], ids=["asym", "sym"])
def test_fake_quant_rows_matches_the_formula(tmp_path, rng, symmetric):
    """fake_quant_rows is RTN's INT grid (test_quant.ref_int, quant.c's formula, per row): equal
    as numbers (+0 folds the fake quant's -0 into the export's +0), every bit otherwise."""
    from test_quant import ref_int
    for bits in range(2, 9):
        rows, cols = int(rng.integers(6, 12)), int(rng.integers(2, 70))
        w = normal(rng, rows, cols)
        w[0] = 0
        w[1] = np.float32(-0.7)  # constant rows land on the grid like any other
        w[2] = np.float32(rng.standard_normal() * 100)
        w[3, 1:] = w[3, 0]  # constant but for one entry
        w[3, 0] = np.float32(w[3, 0] + 1)
        w[4] = np.abs(w[4]) + np.float32(0.5)  # rows of one sign: the range still holds 0
        w[5] = -np.abs(w[5]) - np.float32(0.5)
        got = run_op(tmp_path, "fake_quant_rows", {"w_q": nan(rows, cols), "w": w},
                     rows=rows, cols=cols, bits=bits, symmetric=symmetric)["w_q"]
        want = ref_int(w, bits, 0, symmetric)[1] + np.float32(0)
        got0 = got + np.float32(0)
        bad = np.flatnonzero(got0.view(np.uint32) != want.view(np.uint32))
        assert bad.size == 0, f"bits={bits} sym={symmetric}: {bad.size} values differ, e.g. {got.flat[bad[0]]} " \
                              f"vs {want.flat[bad[0]]} from {w.flat[bad[0]]}"
        for i in range(rows):  # on a grid of at most 2^bits levels, within half a step of w
            assert len(np.unique(got0[i])) <= 2 ** bits
        lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
        span = np.where(symmetric, 2 * np.abs(w).max(axis=1), hi - lo)
        step = span / (2 ** bits - 1 - symmetric)
        assert np.all(np.abs(got - w) <= 0.5001 * step[:, None] + 1e-6)
    print(f"fake_quant_rows symmetric={symmetric}: bit-identical to RTN for bits 2..8")


def test_fake_quant_rows_rounds_half_to_even(tmp_path):
    # symmetric 4 bits, max |w| = 7: scale is exactly 1, so w / scale lands on the ties
    w = np.array([[7, 0.5, 1.5, 2.5, -0.5, -2.5, -3.5, -7]], np.float32)
    got = run_op(tmp_path, "fake_quant_rows", {"w_q": nan(1, 8), "w": w}, rows=1, cols=8, bits=4,
                 symmetric=1)["w_q"]
    assert got.tolist() == [[7, 0, 2, 2, -0.0, -2, -4, -7]]
    # asymmetric 3 bits on [0, 7]: scale 1, zero 0
    w = np.array([[0, 0.5, 1.5, 2.5, 6.5, 7]], np.float32)
    got = run_op(tmp_path, "fake_quant_rows", {"w_q": nan(1, 6), "w": w}, rows=1, cols=6, bits=3,
                 symmetric=0)["w_q"]
    assert got.tolist() == [[0, 0, 2, 2, 6, 7]]
