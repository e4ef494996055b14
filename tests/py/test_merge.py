"""resafe merge (grid, refit, adapter, exact), adapters applied at load, group-constant training
and tau = 0, against independent numpy / torch references.

References: the quantized tensors are read with the `safetensors` package and the packed codes
decoded in numpy from the README's layout (per row a little-endian bit stream of `bits`-bit
codes); the adapter's delta is scale * (M *) B @ A in float64; each merge rule is re-implemented
in numpy from its README statement (fp32 arithmetic as quant.c: W' = fp32(dequant(Q0) + delta),
codes = clip(rint(W' / s) + z) ...). Logits come from transformers (fp32) on the `--export
dequant --export-dtype f32` directory with delta added to the weights. Adapters are random
(A, B both non-zero) and written with h5py in the adapter layout (checkpoint.h).

Tolerances: codes, scales and zeros exactly (the same IEEE fp32 operations on both sides);
logits 1e-4 as in test_model.py (fp32 both sides); stats 1e-6 relative (double sums in a
different order); exact-merge zero points 1e-6 relative (one fp32 rounding of z - c / s).
"""
import json
import os
import random
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import BUILD, ROOT, run_resafe
from test_dpo import LoraPatch, TARGETS, dpo_loss, random_pairs, run_tool, write_adapter
from test_model import make_checkpoint, our_logits, random_batch, ref_logits

transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

f32 = np.float32
LOGIT_TOL = 1e-4
ENV = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80,
             num_hidden_layers=2)


# ---------------------------------------------------------------- helpers

def quantize(src, out, *args):
    return run_resafe("quantize", "--model", src, "--out", out, *args, env=ENV)


def merge(q, adapter, out, mode, check=True):
    return run_resafe("merge", "--quantized", q, "--adapter", adapter, "--out", out, "--mode", mode,
                      check=check, env=ENV)


def linear(name_layer, t):
    mod = "self_attn" if t in TARGETS[:4] else "mlp"
    return f"model.layers.{name_layer}.{mod}.{t}"


def decode(packed, bits, cols):
    """Canonical codes [rows, cols] from the row bit streams (little-endian, LSB first)."""
    b = np.unpackbits(packed, axis=1, bitorder="little")[:, :cols * bits]
    b = b.reshape(packed.shape[0], cols, bits).astype(np.int64)
    return (b << np.arange(bits)).sum(-1)


def qparams(tensors, base, cols, bits, group):
    gs = group or cols
    codes = decode(tensors[base + ".qweight"], bits, cols)
    expand = lambda a: np.repeat(a, gs, axis=1)[:, :cols]  # noqa: E731
    s = expand(tensors[base + ".scales"])
    z = expand(tensors[base + ".zeros"]) if base + ".zeros" in tensors else None
    return codes, s, z


def dequant(codes, s, z, bits):
    off = f32(2 ** (bits - 1))
    return ((codes.astype(f32) - (z if z is not None else off)) * s).astype(f32)


def random_adapter(model, gen, rank, targets, mode="none", group=None):
    """{(layer, target): {A, B[, masks]}}; group: A constant within groups of that many columns."""
    ad = {}
    for layer in range(model.config.num_hidden_layers):
        for t in targets:
            w = dict(model.named_parameters())[linear(layer, t) + ".weight"]
            out, inp = w.shape
            A = torch.randn(rank, inp, generator=gen, dtype=torch.float64) / inp ** 0.5
            if group is not None:
                gs = group or inp
                A = A[:, ::gs].repeat_interleave(gs, dim=1)[:, :inp].contiguous()
            e = {"A": A.float(), "B": (torch.randn(out, rank, generator=gen) * 0.3).float()}
            if mode == "elementwise":
                e["mask_W"] = (torch.rand(out, inp, generator=gen) < 0.6).to(torch.uint8)
            ad[(layer, t)] = e
    return ad


def delta_of(e, scale):
    d = scale * (e["B"].double().numpy() @ e["A"].double().numpy())
    return d * e["mask_W"].numpy() if "mask_W" in e else d


def write(path, ad, rank, alpha, targets, mode="none", group=None):
    write_adapter(path, ad, rank, alpha, targets, mode)
    if group is not None:
        with h5py.File(path, "a") as f:
            f.attrs["group_constant"] = np.int64(1)
            f.attrs["group_size"] = np.int64(group)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    seed = int(os.environ.get("RESAFE_TEST_SEED", "4321"))
    model, path = make_checkpoint(tmp, "llama", seed, **SIZES)
    return model, path, tmp


def setup(base, tag, qargs, targets, rank=4, alpha=8.0, mode="none", group=None, seed=0):
    model, src, tmp = base
    q = str(tmp / f"q_{tag}")
    if not os.path.exists(q):
        quantize(src, q, *qargs)
    gen = torch.Generator().manual_seed(seed)
    ad = random_adapter(model, gen, rank, targets, mode, group)
    apath = str(tmp / f"ad_{tag}_{seed}.h5")
    write(apath, ad, rank, alpha, targets, mode, group)
    return model, q, ad, apath, alpha / rank


def stats_of(out):
    return json.load(open(os.path.join(out, "merge_stats.json")))


def check_stats(st, pairs):
    """pairs: [(delta, realized, codes0, codes1)] over the adapted linears."""
    dd = sum(float((d * d).sum()) for d, _, _, _ in pairs)
    rd = sum(float((r * d).sum()) for d, r, _, _ in pairs)
    ee = sum(float(((r - d) ** 2).sum()) for d, r, _, _ in pairs)
    changed = sum(int((c0 != c1).sum()) for _, _, c0, c1 in pairs)
    assert st["delta_norm"] == pytest.approx(dd ** 0.5, rel=1e-6)
    assert st["kept_fraction"] == pytest.approx(rd / dd, rel=1e-6, abs=1e-9)
    assert st["rel_error"] == pytest.approx((ee / dd) ** 0.5, rel=1e-6)
    assert st["n_codes_changed"] == changed
    return rd / dd


# ---------------------------------------------------------------- grid and refit

GRID_CASES = [("int4_g32_asym", ["--bits", "4", "--group", "32"], 4, 32, False),
              ("int3_g32_sym", ["--bits", "3", "--group", "32", "--sym"], 3, 32, True),
              ("int4_row_sym", ["--bits", "4", "--group", "0", "--sym"], 4, 0, True),
              ("int3_row_asym", ["--bits", "3", "--group", "0"], 3, 0, False)]


@pytest.mark.parametrize("tag,qargs,bits,group,sym", GRID_CASES, ids=[c[0] for c in GRID_CASES])
def test_grid_merge_equals_numpy_rounding_onto_q0_grid_and_stats(base, rng_seed, tag, qargs, bits,
                                                                  group, sym):
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    model, q, ad, apath, scale = setup(base, tag, ["--method", "rtn", *qargs], targets, seed=rng_seed)
    out = str(base[2] / f"grid_{tag}")
    p = merge(q, apath, out, "grid")
    assert "merge grid: kept" in p.stdout and "codes changed" in p.stdout
    t0 = load_file(os.path.join(q, "model.safetensors"))
    t1 = load_file(os.path.join(out, "model.safetensors"))
    pairs = []
    for (layer, t), e in ad.items():
        base_name = linear(layer, t)
        cols = e["A"].shape[1]
        c0, s, z = qparams(t0, base_name, cols, bits, group)
        c1, s1, z1 = qparams(t1, base_name, cols, bits, group)
        assert np.array_equal(s, s1) and (z is None or np.array_equal(z, z1))
        d = delta_of(e, scale)
        w0 = dequant(c0, s, z, bits)
        wp = (w0.astype(np.float64) + d).astype(f32)
        if sym:
            qs = f32(2 ** (bits - 1) - 1)
            want = np.clip(np.rint(wp / s), -qs, qs) + 2 ** (bits - 1)
        else:
            want = np.clip(np.rint(wp / s) + z, 0, 2 ** bits - 1)
        assert np.array_equal(c1, want.astype(np.int64)), f"{base_name}: codes differ"
        realized = dequant(c1, s, z, bits).astype(np.float64) - w0.astype(np.float64)
        pairs.append((d, realized, c0, c1))
    # untouched linears and dense tensors are bit-identical
    for name in t0:
        if not any(name.startswith(linear(l, t) + ".") for l, t in ad):
            assert np.array_equal(t0[name], t1[name]), name
    kept = check_stats(stats_of(out), pairs)
    assert 0 < kept < 1.0 and stats_of(out)["n_codes_changed"] > 0


def test_refit_merge_equals_numpy_rtn_of_merged_weight(base, rng_seed):
    from test_quant import ref_int
    targets = ["k_proj", "gate_proj", "up_proj"]
    model, q, ad, apath, scale = setup(base, "int4_g32_asym", ["--method", "rtn", "--bits", "4",
                                                               "--group", "32"], targets,
                                       seed=rng_seed)
    out = str(base[2] / "refit")
    merge(q, apath, out, "refit")
    t0 = load_file(os.path.join(q, "model.safetensors"))
    t1 = load_file(os.path.join(out, "model.safetensors"))
    pairs = []
    for (layer, t), e in ad.items():
        b = linear(layer, t)
        cols = e["A"].shape[1]
        c0, s0, z0 = qparams(t0, b, cols, 4, 32)
        w0 = dequant(c0, s0, z0, 4)
        d = delta_of(e, scale)
        wp = (w0.astype(np.float64) + d).astype(f32)
        codes, deq = ref_int(wp, 4, 32, False)
        c1, s1, z1 = qparams(t1, b, cols, 4, 32)
        assert np.array_equal(c1, codes.astype(np.int64)), b
        got = dequant(c1, s1, z1, 4)
        assert np.array_equal(got.view(np.uint32), deq.view(np.uint32)), b
        pairs.append((d, got.astype(np.float64) - w0.astype(np.float64), c0, c1))
    check_stats(stats_of(out), pairs)


# ---------------------------------------------------------------- adapter mode

def patched_export(base, qargs, tag, ad, scale):
    """transformers on the f32 dequant export with delta added to every adapted weight."""
    model, src, tmp = base
    e = str(tmp / f"e_{tag}")
    if not os.path.exists(e):
        quantize(src, e, "--method", "rtn", *qargs, "--export", "dequant", "--export-dtype", "f32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(e, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for (layer, t), entry in ad.items():
            w = params[linear(layer, t) + ".weight"]
            w.copy_((w.double() + torch.from_numpy(delta_of(entry, scale))).float())
    return ref


@pytest.mark.parametrize("mode", ["none", "elementwise"])
def test_adapter_mode_logits_equal_torch_with_delta_added(base, rng_seed, mode):
    qargs = ["--bits", "4", "--group", "32"]
    targets = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]
    model, q, ad, apath, scale = setup(base, "int4_g32_asym", ["--method", "rtn", *qargs], targets,
                                       mode=mode, seed=rng_seed)
    out = base[2] / f"adapter_{mode}"
    p = merge(q, apath, str(out), "adapter")
    assert "merge adapter: kept 100.0%" in p.stdout
    assert os.path.exists(out / "resafe_adapter.h5")
    st = stats_of(str(out))
    assert st["kept_fraction"] == 1 and st["rel_error"] == 0 and st["n_codes_changed"] == 0
    ref = patched_export(base, qargs, "int4_g32_asym", ad, scale)
    seqs = random_batch(random.Random(rng_seed), model.config.vocab_size)
    plain = our_logits(q, seqs, base[2])
    for extra in [(), ("--prefill", "2")]:  # prefill + KV-cache decode steps
        ours = our_logits(str(out), seqs, base[2], *extra)
        for b, s in enumerate(seqs):
            diff = float(np.abs(ours[b, :len(s)] - ref_logits(ref, s)).max())
            assert diff <= LOGIT_TOL, f"sequence {b} {extra}: max abs diff {diff}"
    assert float(np.abs(plain - ours).max()) > 100 * LOGIT_TOL  # the adapter does something
    info = run_resafe("inspect", str(out)).stdout
    assert "resafe_adapter.h5" in info and "rank 4" in info


# ---------------------------------------------------------------- exact

@pytest.mark.parametrize("tag,qargs,bits,group", [
    ("int4_g32_asym", ["--bits", "4", "--group", "32"], 4, 32),
    ("int3_g32_sym", ["--bits", "3", "--group", "32", "--sym"], 3, 32),
    ("int3_row_asym", ["--bits", "3", "--group", "0"], 3, 0)])
def test_exact_merge_of_group_constant_adapter_equals_adapter_mode(base, rng_seed, tag, qargs, bits,
                                                                   group):
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    model, q, ad, apath, scale = setup(base, tag, ["--method", "rtn", *qargs], targets, group=group,
                                       seed=rng_seed)
    ex, am = str(base[2] / f"exact_{tag}"), str(base[2] / f"adapter_gc_{tag}")
    merge(q, apath, ex, "exact")
    merge(q, apath, am, "adapter")
    st = stats_of(ex)
    assert st["kept_fraction"] == pytest.approx(1, abs=1e-5) and st["rel_error"] < 1e-4
    assert st["n_codes_changed"] == 0 and st["group_constant"] is True
    t0 = load_file(os.path.join(q, "model.safetensors"))
    t1 = load_file(os.path.join(ex, "model.safetensors"))
    with open(os.path.join(ex, "model.safetensors"), "rb") as f:
        head = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    qc = json.loads(head["__metadata__"]["quantization_config"])
    assert qc["zero_point"] == "float" and qc["symmetric"] is False and qc["bits"] == bits
    for (layer, t), e in ad.items():  # zeros' = z - c / s, codes and scales unchanged
        b = linear(layer, t)
        cols = e["A"].shape[1]
        gs = group or cols
        assert np.array_equal(t0[b + ".qweight"], t1[b + ".qweight"])
        assert np.array_equal(t0[b + ".scales"], t1[b + ".scales"])
        d = delta_of(e, scale)
        c = np.stack([d[:, g:g + gs].mean(1) for g in range(0, cols, gs)], 1)
        z0 = t0.get(b + ".zeros", np.full_like(t0[b + ".scales"], 2 ** (bits - 1)))
        want = z0.astype(np.float64) - c / t0[b + ".scales"].astype(np.float64)
        np.testing.assert_allclose(t1[b + ".zeros"], want, rtol=1e-6, atol=1e-6)
    seqs = random_batch(random.Random(rng_seed + 1), model.config.vocab_size)
    a, e = our_logits(am, seqs, base[2]), our_logits(ex, seqs, base[2])
    for b, s in enumerate(seqs):
        diff = float(np.abs(a[b, :len(s)] - e[b, :len(s)]).max())
        assert diff <= LOGIT_TOL, f"sequence {b}: exact vs adapter mode {diff}"


def test_exact_merge_of_general_adapter_keeps_its_group_mean_projection(base, rng_seed):
    targets = ["k_proj", "o_proj", "up_proj"]
    model, q, ad, apath, scale = setup(base, "int4_g32_asym", ["--method", "rtn", "--bits", "4",
                                                               "--group", "32"], targets,
                                       seed=rng_seed)
    out = str(base[2] / "exact_general")
    p = merge(q, apath, out, "exact")
    assert "not trained group-constant" in p.stderr
    num = den = 0.0
    for e in ad.values():
        d = delta_of(e, scale)
        cols = d.shape[1]
        proj = np.concatenate([np.repeat(d[:, g:g + 32].mean(1, keepdims=True),
                                         min(32, cols - g), 1) for g in range(0, cols, 32)], 1)
        num += float((proj * d).sum())
        den += float((d * d).sum())
    st = stats_of(out)
    assert 0 < num / den < 0.9
    assert st["kept_fraction"] == pytest.approx(num / den, rel=1e-4)


# ---------------------------------------------------------------- training

def test_group_constant_gradient_is_group_sum_of_torch_gradient(tmp_path, rng_seed):
    model, path = make_checkpoint(tmp_path, "llama", rng_seed, **SIZES)
    rnd, gen = random.Random(rng_seed), torch.Generator().manual_seed(rng_seed)
    targets, rank, alpha, gs = ["q_proj", "o_proj", "down_proj"], 4, 8.0, 32
    ad = random_adapter(model, gen, rank, targets, group=gs)
    write(tmp_path / "adapter.h5", ad, rank, alpha, targets, group=gs)
    pairs = random_pairs(rnd, model.config.vocab_size, 4)
    beta = 0.5
    with torch.no_grad():
        ref = dpo_loss(model, pairs, beta)
    for p, rw, rl in zip(pairs, ref[0].tolist(), ref[1].tolist()):
        p["ref_chosen"], p["ref_rejected"] = rw, rl
    (tmp_path / "pairs.json").write_text(json.dumps({"beta": beta, "pairs": pairs}))
    run_tool("grad", path, tmp_path / "adapter.h5", tmp_path / "pairs.json", tmp_path / "out.h5")
    patch = LoraPatch(model, ad, alpha / rank, "none")
    loss, _, _ = dpo_loss(model, pairs, beta, ref)
    loss.backward()
    patch.restore()
    with h5py.File(tmp_path / "out.h5") as f:
        for (layer, t), (A, B) in patch.params.items():
            g = A.grad.double().numpy()
            cols = g.shape[1]
            tied = np.concatenate([np.repeat(g[:, c:c + gs].sum(1, keepdims=True),
                                             min(gs, cols - c), 1) for c in range(0, cols, gs)], 1)
            got = f[f"grad/layers.{layer}.{t}/A"][...].reshape(g.shape)
            err = np.abs(got - tied).max() / np.abs(tied).max()
            assert err <= 1e-4, f"{layer}.{t} dA': relative error {err:.2e}"


@pytest.fixture(scope="module")
def chat_q(tmp_path_factory):
    """A tiny chat model (tokenizer included) quantized int4 g32, and a pairs file."""
    tmp = tmp_path_factory.mktemp("chat")
    src = str(tmp / "m")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_test_model.py"), src,
                    "--hidden", "64", "--layers", "2"], check=True, capture_output=True)
    words = "the cat dog sat ran on a mat hat big red blue fast slow sun moon".split()
    r = random.Random(0)
    sent = lambda k: " ".join(r.choice(words) for _ in range(k))  # noqa: E731
    with open(tmp / "pairs.jsonl", "w") as f:
        for _ in range(4):
            f.write(json.dumps({"prompt": sent(3), "chosen": sent(4), "rejected": sent(5)}) + "\n")
    q = str(tmp / "q")
    quantize(src, q, "--method", "rtn", "--bits", "4", "--group", "32")
    return q, tmp / "pairs.jsonl", src


def dpo_ini(tmp_path, chat_q, extra):
    q, pairs = chat_q[:2]
    ini = tmp_path / "dpo.ini"
    ini.write_text(f"[model]\npath = {q}\nbackend = cpu\nthreads = 1\n"
                   f"[dpo]\ndata_file = {pairs}\nbeta = 0.5\nlr = 2e-2\n"
                   "batch_size = 2\nmax_steps = 3\nwarmup_steps = 0\ngrad_clip = 0\n"
                   "[snip]\nreidentify_every = 2\nscore_batches = 1\n"
                   f"[lora]\nrank = 4\nalpha = 8\ndropout = 0\ntargets = q,v,down\n"
                   f"[run]\nout_dir = {tmp_path / 'out'}\nseed = 3\n" + extra)
    return str(ini)


def test_group_constant_dpo_keeps_A_constant_within_groups_and_merges_exactly(tmp_path, chat_q):
    q = chat_q[0]
    ini = dpo_ini(tmp_path, chat_q, "")
    run_resafe("dpo", "--config", ini, "--set", "lora.merge=exact", "--set", "snip.mask=factor",
               "--set", "snip.tau=0.5", env=ENV)
    adapter = tmp_path / "out" / "dpo" / "adapter.h5"
    with h5py.File(adapter) as f:
        assert f.attrs["group_constant"] == 1 and f.attrs["group_size"] == 32
        n_b = 0
        for name, g in f["lora"].items():
            A, mA = g["A"][...], g["mask_A"][...]
            cols = A.shape[1]
            for c in range(0, cols, 32):
                blk = A[:, c:c + 32]
                assert np.array_equal(blk, np.repeat(blk[:, :1], blk.shape[1], 1)), name
                assert (mA[:, c:c + 32] == mA[:, c:c + 1]).all(), name
            n_b += int((g["B"][...] != 0).sum())
        assert n_b > 0, "B never moved: nothing was trained"
    # defaults from the config: [quant] model, <out_dir>/dpo/adapter.h5, [lora] merge first and
    # then merge_compare (all), each into <out_dir>/merge/<mode>
    p = run_resafe("merge", "--config", ini, "--set", "lora.merge=exact", "--set",
                   f"quant.model={q}", env=ENV)
    lines = p.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["merge exact", "merge grid", "merge refit",
                                                       "merge adapter"]
    assert "merge exact: kept 100.0%" in lines[0]
    out = tmp_path / "out" / "merge" / "exact"
    assert stats_of(str(out))["kept_fraction"] == pytest.approx(1, abs=1e-5)
    assert stats_of(str(tmp_path / "out" / "merge" / "grid"))["kept_fraction"] < 0.999
    man = json.load(open(out / "resafe_manifest.json"))
    assert man["merge"]["mode"] == "exact" and man["method"] == "rtn"
    assert man["merge"]["adapter"] == str(adapter)


def test_tau_zero_dpo_runs_and_leaves_B_zero(tmp_path, chat_q):
    p = run_resafe("dpo", "--config", dpo_ini(tmp_path, chat_q, ""), "--set", "snip.tau=0", "--set",
                   "snip.mask=factor", env=ENV)
    assert "nothing is trainable" in p.stderr
    with h5py.File(tmp_path / "out" / "dpo" / "adapter.h5") as f:
        for name, g in f["lora"].items():
            assert not g["B"][...].any(), name
    for line in open(tmp_path / "out" / "dpo" / "metrics.jsonl"):
        assert np.isfinite(json.loads(line)["loss"])


# ---------------------------------------------------------------- errors

def test_merge_errors_are_one_line_and_leave_no_output(base, tmp_path, rng_seed):
    model, q, ad, apath, scale = setup(base, "int4_g32_asym", ["--method", "rtn", "--bits", "4",
                                                               "--group", "32"], ["q_proj"],
                                       seed=rng_seed)
    other, opath = make_checkpoint(tmp_path, "llama", rng_seed,
                                   **dict(SIZES, hidden_size=32, num_attention_heads=2,
                                          num_key_value_heads=1))
    gen = torch.Generator().manual_seed(1)
    wrong = random_adapter(other, gen, 4, ["q_proj"])
    write(tmp_path / "wrong.h5", wrong, 4, 8.0, ["q_proj"])
    os.makedirs(tmp_path / "d")
    deep, _ = make_checkpoint(tmp_path / "d", "llama", rng_seed, **dict(SIZES, num_hidden_layers=3))
    deeper = random_adapter(deep, gen, 4, ["q_proj"])
    write(tmp_path / "deeper.h5", deeper, 4, 8.0, ["q_proj"])
    nf4 = str(base[2] / "q_nf4")
    if not os.path.exists(nf4):
        quantize(base[1], nf4, "--method", "nf4")
    carrying = str(tmp_path / "carrying")
    merge(q, apath, carrying, "adapter")
    cases = [(q, str(tmp_path / "wrong.h5"), "grid", "does not fit"),
             (carrying, apath, "grid", "already carries an adapter"),
             (q, str(tmp_path / "deeper.h5"), "refit", "more layers"),
             (nf4, apath, "exact", "merge exact needs a grouped INT format"),
             (base[1], apath, "grid", "not a quantized model directory")]
    for qd, ad_path, mode, msg in cases:
        out = tmp_path / f"out_{mode}"
        p = merge(qd, ad_path, str(out), mode, check=False)
        assert p.returncode == 1, p.stderr
        err = [line for line in p.stderr.splitlines() if "error" in line]
        assert len(err) == 1 and msg in err[0], p.stderr
        assert not out.exists()
        assert not [d for d in os.listdir(tmp_path) if ".tmp." in d]
    p = run_resafe("merge", "--quantized", q, "--adapter", apath, check=False)
    assert p.returncode == 2 and "--out" in p.stderr


# ---------------------------------------------------------------- adapter at load, dense models

@pytest.mark.parametrize("backend,mode", [("cpu", "factor"), ("cuda", "none"),
                                          ("cuda", "elementwise")])
def test_dense_model_with_adapter_file_applies_it_at_load(tmp_path, rng_seed, backend, mode):
    """A plain HF directory holding resafe_adapter.h5: logits equal torch with W + delta (cpu:
    1e-4; cuda: bf16, relative error 3e-2 as tests/py/test_model_gpu.py, and against our cpu)."""
    if backend == "cuda" and os.environ.get("RESAFE_TEST_GPU") != "1":
        pytest.skip("GPU tests run with RESAFE_TEST_GPU=1")
    model, path = make_checkpoint(tmp_path, "qwen2", rng_seed, **SIZES)
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    gen = torch.Generator().manual_seed(rng_seed)
    ad = random_adapter(model, gen, 4, targets, "elementwise" if mode == "elementwise" else "none")
    if mode == "factor":  # the masks only froze training: the adapter is B A
        for e in ad.values():
            e["mask_A"] = (torch.rand(e["A"].shape, generator=gen) < 0.5).to(torch.uint8)
            e["mask_B"] = (torch.rand(e["B"].shape, generator=gen) < 0.5).to(torch.uint8)
    write(os.path.join(path, "resafe_adapter.h5"), ad, 4, 8.0, targets, mode)
    seqs = random_batch(random.Random(rng_seed), model.config.vocab_size)
    cpu = our_logits(path, seqs, tmp_path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for (layer, t), e in ad.items():
            w = params[linear(layer, t) + ".weight"]
            w.copy_((w.double() + torch.from_numpy(delta_of(e, 2.0))).float())
    for b, s in enumerate(seqs):
        diff = float(np.abs(cpu[b, :len(s)] - ref_logits(model, s)).max())
        assert diff <= LOGIT_TOL, f"cpu sequence {b}: {diff}"
    if backend == "cuda":
        os.environ["RESAFE_BACKEND"] = "cuda"
        try:
            for extra in [(), ("--prefill", "3")]:
                gpu = our_logits(path, seqs, tmp_path, *extra)
                for b, s in enumerate(seqs):
                    g, c = gpu[b, :len(s)], cpu[b, :len(s)]
                    err = float(np.linalg.norm(g - c) / np.linalg.norm(c))
                    assert err <= 3e-2, f"cuda sequence {b} {extra}: relative error {err}"
        finally:
            del os.environ["RESAFE_BACKEND"]


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_grid_merge_on_codebook_formats_picks_nearest_code_with_q0_absmax(base, rng_seed, fmt):
    from test_quant import NF4, FP4
    cb = np.asarray(NF4 if fmt == "nf4" else FP4, f32)
    targets = ["q_proj", "up_proj", "down_proj"]
    model, q, ad, apath, scale = setup(base, fmt, ["--method", fmt], targets, seed=rng_seed)
    out = str(base[2] / f"grid_{fmt}")
    merge(q, apath, out, "grid")
    t0 = load_file(os.path.join(q, "model.safetensors"))
    t1 = load_file(os.path.join(out, "model.safetensors"))
    pairs = []
    for (layer, t), e in ad.items():
        b = linear(layer, t)
        cols = e["A"].shape[1]
        c0 = decode(t0[b + ".qweight"], 4, cols)
        c1 = decode(t1[b + ".qweight"], 4, cols)
        amax = np.repeat(t0[b + ".scales"], 64, axis=1)[:, :cols]
        assert np.array_equal(t0[b + ".scales"], t1[b + ".scales"])
        w0 = (cb[c0] * amax).astype(f32)
        d = delta_of(e, scale)
        wp = (w0.astype(np.float64) + d).astype(f32)
        inv = np.where(amax > 0, f32(1) / np.where(amax > 0, amax, f32(1)), f32(0)).astype(f32)
        x = (wp * inv).astype(f32)
        want = np.abs(x[..., None] - cb).argmin(-1)  # the lowest index on a tie
        assert np.array_equal(c1, want), b
        pairs.append((d, (cb[c1] * amax).astype(f32).astype(np.float64) - w0.astype(np.float64),
                      c0, c1))
    check_stats(stats_of(out), pairs)


def test_group_constant_is_refused_on_nf4_and_ignored_on_a_dense_model(tmp_path, chat_q):
    q, pairs, src = chat_q
    nf4 = str(tmp_path / "nf4")
    quantize(src, nf4, "--method", "nf4")
    ini = dpo_ini(tmp_path, chat_q, "")
    p = run_resafe("dpo", "--config", ini, "--set", f"model.path={nf4}", "--set",
                   "lora.group_constant=true", check=False, env=ENV)
    err = [line for line in p.stderr.splitlines() if "error" in line]
    assert p.returncode == 1 and len(err) == 1 and "grouped INT format" in err[0], p.stderr
    p = run_resafe("dpo", "--config", ini, "--set", f"model.path={src}", "--set",
                   "lora.group_constant=true", "--set", "dpo.max_steps=1", "--force", env=ENV)
    assert "group_constant ignored" in p.stderr
    with h5py.File(tmp_path / "out" / "dpo" / "adapter.h5") as f:
        assert f.attrs["group_constant"] == 0
