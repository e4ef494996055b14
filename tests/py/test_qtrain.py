"""The training quantization methods of `resafe quantize` (qat, qlora) and their pipeline stage,
against independent numpy / torch computations.

- qat: the export's dequantized linears equal, bit for bit (but for the sign of zero), numpy's
  RTN (test_quant.ref_int: the formula resafe sft's fake_quant_rows uses, README) of the trained
  fp32 masters kept with --save-trained, per row and in groups of 32, symmetric and asymmetric;
  every other tensor is the trained master itself. A --group that does not divide a projection's
  columns (the default 128 on the 64-wide model) is one error line before any training.
- qlora: the output's NF4 codes and absmax equal numpy's NF4 refit of (NF4 of the original weights)
  + (alpha / r) B A from the saved adapter (exactly: the same fp32 operations); with --merge
  adapter the logits equal transformers' on those weights (1e-4: fp32 both sides, as
  test_merge.py); with --bits (an integer base) the codes equal numpy's RTN (test_quant.ref_int)
  of (RTN of the original weights) + the delta.
- both lower the response NLL on the calibration set, computed in torch from the exported weights,
  below the same format without training (rtn per row / plain nf4); same seed -> the same bytes,
  another seed -> other bytes; bad arguments -> one line, nothing written.
- `resafe train` with [quant] method qat / qlora: the stage equals `resafe quantize` byte for byte,
  a second run is up to date, and a run stopped before the stage's manifest redoes it to the same
  bytes.

The calibration set is a copy task on a tiny random Llama (scripts/make_test_model.py), rendered
without chat template (--chat-template none: prompt = BOS + text, response = text + EOS), so the
torch loss needs no template. One thread: the models are tiny.
"""
import json
import os
import random
import signal

import h5py
import numpy as np
import pytest
import torch

from conftest import run_resafe
from test_merge import decode, dequant, qparams
from test_model import our_logits, random_batch
from test_quant import NF4, ref_int
from test_train import config, make_model, status, train, tree

transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

f32 = np.float32
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = "the cat dog sat ran on a mat hat big red blue fast slow sun moon".split()
TRAIN = ["--steps", "30", "--batch", "8", "--chat-template", "none", "--threads", "1"]


def lin(layer, t):
    return f"model.layers.{layer}.{'self_attn' if t in TARGETS[:4] else 'mlp'}.{t}"


def quantize(model, out, *args, check=True):
    return run_resafe("quantize", "--model", model, "--out", out, *args, check=check, env=ENV)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    seed = int(os.environ.get("RESAFE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed {seed} (replay with RESAFE_TEST_SEED={seed})")
    d = tmp_path_factory.mktemp("qtrain")
    model = make_model(d / "model", "--hidden", "64", "--layers", "2", "--seed", str(seed % 1000))
    r = random.Random(seed)
    rows = []
    for _ in range(48):
        text = " ".join(r.choice(WORDS) for _ in range(r.randint(3, 6)))
        rows.append({"prompt": text, "response": text})
    calib = d / "calib.jsonl"
    calib.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return {"dir": d, "model": model, "calib": str(calib), "rows": rows, "seed": seed,
            "rnd": r, "runs": {}}


def run(s, name, *args):
    """One quantization of the fixture's model, memoised by name."""
    if name not in s["runs"]:
        out = s["dir"] / name
        quantize(s["model"], out, *args)
        s["runs"][name] = out
    return s["runs"][name]


# ---------------------------------------------------------------- references

def fake_quant(w, bits, sym, group):
    """resafe sft's QAT weight (README): RTN's grid (quant.c's formula, numpy in test_quant) per
    group of `group` columns of a row (0: the whole row), fp32."""
    return ref_int(w, bits, group, sym)[1]


def nf4(w):
    """bitsandbytes NF4, absmax blocks of 64 along each row: (codes, absmax per column)."""
    cb = np.asarray(NF4, f32)
    amax = np.zeros_like(w)
    for c in range(0, w.shape[1], 64):
        amax[:, c:c + 64] = np.abs(w[:, c:c + 64]).max(1, keepdims=True)
    inv = np.where(amax > 0, f32(1) / np.where(amax > 0, amax, f32(1)), f32(0)).astype(f32)
    codes = np.abs((w * inv).astype(f32)[..., None] - cb).argmin(-1)  # lowest index on a tie
    return codes, amax


def nf4_weights(tensors, base, cols):
    codes = decode(tensors[base + ".qweight"], 4, cols)
    amax = np.repeat(tensors[base + ".scales"], 64, axis=1)[:, :cols]
    return codes, amax, (np.asarray(NF4, f32)[codes] * amax).astype(f32)


def adapter_deltas(path):
    """{linear name: (alpha / r) B A} in float64 from an adapter file (checkpoint.h layout)."""
    out = {}
    with h5py.File(path, "r") as f:
        scale = float(f.attrs["alpha"]) / int(f.attrs["rank"])
        for key in f["lora"]:
            layer, t = key.split(".")[1:]
            A, B = f[f"lora/{key}/A"][()], f[f"lora/{key}/B"][()]
            out[lin(int(layer), t)] = scale * (B.astype(np.float64) @ A.astype(np.float64))
    return out


def torch_model(src, weights):
    """The fp model of src with the given tensors (name -> array) replacing its own."""
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return m


def response_nll(s, m):
    """Mean NLL of the response tokens (prompt = BOS + text, response = text + EOS)."""
    tok = transformers.AutoTokenizer.from_pretrained(s["model"])
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in s["rows"]:
            p = tok(row["prompt"]).input_ids
            r = tok(row["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(m(ids).logits[0, :-1].double(), -1)
            tgt = ids[0, 1:]
            nll -= float(logp[torch.arange(len(p) - 1, ids.shape[1] - 1), tgt[len(p) - 1:]].sum())
            n += len(r)
    return nll / n


def shapes(src):
    t = load_file(os.path.join(src, "model.safetensors"))
    return {k: v.shape for k, v in t.items()}


def int_weights(out, src, bits):
    """Dequantized linears of a per-row INT export, and its dense tensors, by HF name."""
    t = load_file(os.path.join(out, "model.safetensors"))
    w = {k: v for k, v in t.items() if k in shapes(src)}
    for name, shape in shapes(src).items():
        base = name[:-len(".weight")]
        if base + ".qweight" in t:
            codes, sc, z = qparams(t, base, shape[1], bits, 0)
            w[name] = dequant(codes, sc, z, bits)
    return w


def nf4_model_weights(out, src):
    t = load_file(os.path.join(out, "model.safetensors"))
    w = {}
    for name, shape in shapes(src).items():
        base = name[:-len(".weight")]
        w[name] = nf4_weights(t, base, shape[1])[2] if base + ".qweight" in t else t[name]
    return w


# ---------------------------------------------------------------- qat

@pytest.fixture(scope="module")
def qat(setup):
    bits = setup["rnd"].choice([2, 3, 4, 8])
    sym = setup["rnd"].random() < 0.5
    args = ["--method", "qat", "--calib", setup["calib"], "--bits", str(bits), "--lr", "2e-3",
            "--group", "0", *TRAIN, *(["--sym"] if sym else [])]
    trained = setup["dir"] / "qat_trained"
    out = run(setup, "qat", *args, "--save-trained", str(trained), "--seed", "7")
    print(f"qat: {bits} bits, {'symmetric' if sym else 'asymmetric'}")
    return out, trained, bits, sym, args


def check_export_equals_fake_quant(out, trained, bits, sym, group, src):
    """The export's dequantized linears are numpy's fake quantization of the trained masters (bit
    for bit but for the sign of zero), its other tensors the masters; the manifest agrees."""
    master = load_file(os.path.join(trained, "model.safetensors"))
    t = load_file(os.path.join(out, "model.safetensors"))
    n = 0
    for name, w in master.items():
        base = name[:-len(".weight")]
        if base + ".qweight" not in t:
            assert np.array_equal(t[name], w), name  # embeddings, norms, lm_head: the masters
            continue
        codes, sc, z = qparams(t, base, w.shape[1], bits, group)
        assert (z is None) == sym and sc.shape == w.shape
        assert t[base + ".scales"].shape[1] == (w.shape[1] // group if group else 1), name
        got = dequant(codes, sc, z, bits)
        # bit for bit but for the sign of zero: the symmetric fake quant's rint(-0.3) * s = -0
        # is the export's (code - 2^(bits-1)) * s = +0 (x + 0 turns -0 into +0 only)
        want = (fake_quant(w, bits, sym, group) + f32(0)).astype(f32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
        n += 1
    assert n == 14
    man = json.load(open(os.path.join(out, "resafe_manifest.json")))
    assert man["method"] == "qat" and man["group_size"] == group and man["bits"] == bits
    check = man["qat_grid_check"]
    assert check["rows_differing"] == 0 and check["group_size"] == group
    assert man["training"]["group_size"] == group
    assert man["training"]["grid"] == ("per group" if group else "per row") + ", as rs fake_quant_rows"
    # the masters moved: the export is not the untrained model's fake quantization
    orig = load_file(os.path.join(src, "model.safetensors"))
    assert not np.array_equal(orig["model.layers.0.self_attn.q_proj.weight"],
                              master["model.layers.0.self_attn.q_proj.weight"])


def test_qat_export_equals_fake_quant_of_the_trained_weights_bitwise(setup, qat):
    out, trained, bits, sym, _ = qat
    check_export_equals_fake_quant(out, trained, bits, sym, 0, setup["model"])
    man = json.load(open(os.path.join(out, "resafe_manifest.json")))
    assert man["training"]["kind"] == "qat" and man["calibration"]["file"] == setup["calib"]
    assert man["calibration"]["response_key"] == "response"


@pytest.fixture(scope="module")
def wide(setup):
    """A model whose projections' columns (96, 256) are multiples of 32: --group 32 applies."""
    return make_model(setup["dir"] / "model96", "--hidden", "96", "--layers", "2", "--seed",
                      str(setup["seed"] % 1000))


@pytest.mark.parametrize("sym", [0, 1], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [0, 32])
def test_qat_grouped_export_equals_fake_quant_of_the_trained_weights_bitwise(setup, wide, tmp_path,
                                                                           group, sym):
    """--group G trains through G-column groups ([sft] qat_group_size) and exports on them."""
    bits = setup["rnd"].choice([2, 3, 4, 8])
    out, trained = tmp_path / "out", tmp_path / "trained"
    quantize(wide, out, "--method", "qat", "--calib", setup["calib"], "--bits", str(bits),
             "--group", str(group), "--lr", "2e-3", "--steps", "8", *TRAIN[2:],
             *(["--sym"] if sym else []), "--save-trained", str(trained))
    print(f"qat: {bits} bits, group {group}, {'symmetric' if sym else 'asymmetric'}")
    check_export_equals_fake_quant(out, trained, bits, sym, group, wide)


def test_qat_training_forward_sees_the_grouped_grid(setup, wide, tmp_path):
    """The first step's loss (before any update; one batch = the whole calibration set) is torch's
    response NLL of the model whose projections are numpy's fake quantization in groups of 32,
    not per row: resafe sft applies qat_group_size in the forward, not only in the export.

    The loss is one number, and the two grids' losses can lie arbitrarily close at a given seed
    (0.006% apart at 3 bits asymmetric in one CI run): the test takes the first (bits, sym) in a
    seeded order whose two losses lie at least 3x the tolerance apart, so the per-row grid could
    not pass the first assertion."""
    orig = load_file(os.path.join(wide, "model.safetensors"))
    combos = [(b, s) for b in (2, 3) for s in (False, True)]
    setup["rnd"].shuffle(combos)
    for bits, sym in combos:
        nll = {}
        for group in (32, 0):
            w = {k: fake_quant(v, bits, sym, group) for k, v in orig.items() if "_proj." in k}
            nll[group] = response_nll(setup, torch_model(wide, w))
        print(f"{bits} bits sym={sym}: torch g32 {nll[32]:.6f}, per row {nll[0]:.6f}")
        if abs(nll[0] - nll[32]) > 3 * 1e-4 * nll[32]:
            break
    else:
        pytest.fail("no 2/3-bit grid whose per-row and group-32 losses differ by 0.03% here")
    out = tmp_path / "out"
    quantize(wide, out, "--method", "qat", "--calib", setup["calib"], "--bits", str(bits),
             "--group", "32", "--steps", "1", "--batch", str(len(setup["rows"])), *TRAIN[4:],
             *(["--sym"] if sym else []))
    first = json.loads(open(out / "train_metrics.jsonl").readline())["loss"]
    print(f"{bits} bits sym={sym}: first loss {first:.6f}")
    assert abs(first - nll[32]) <= 1e-4 * nll[32]  # fp32 both sides


@pytest.mark.parametrize("group,cols,tensor", [
    (None, 64, "model.layers.0.self_attn.q_proj.weight"),  # the default, 128
    ("32", 170, "model.layers.0.mlp.down_proj.weight"),
])
def test_qat_group_not_dividing_the_columns_is_one_line_before_training(setup, tmp_path, group,
                                                                        cols, tensor):
    args = ["--group", group] if group else []
    p = quantize(setup["model"], tmp_path / "out", "--method", "qat", "--calib", setup["calib"],
                 *args, *TRAIN, check=False)
    errors = [l for l in p.stderr.splitlines() if l.startswith("resafe: error")]
    assert p.returncode == 1 and len(errors) == 1, p.stderr
    assert f"groups of {group or 128} columns do not divide the {cols} columns of {tensor}" \
        in errors[0], p.stderr
    assert "sft: step" not in p.stderr
    assert os.listdir(tmp_path) == []


def test_qat_lowers_the_calibration_loss_below_rtn_on_the_same_grid(setup, qat):
    out, _, bits, sym, _ = qat
    rtn = run(setup, f"rtn_row_{bits}_{sym}", "--method", "rtn", "--bits", str(bits), "--group",
              "0", *(["--sym"] if sym else []))
    src = setup["model"]
    after = response_nll(setup, torch_model(src, int_weights(out, src, bits)))
    before = response_nll(setup, torch_model(src, int_weights(rtn, src, bits)))
    print(f"response NLL: rtn {before:.4f}, qat {after:.4f}")
    assert after < before - 0.1
    rows = [json.loads(l) for l in open(os.path.join(out, "train_metrics.jsonl"))]
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"]


def test_qat_same_seed_same_bytes_other_seed_other_bytes(setup, qat):
    out, _, _, _, args = qat
    again = run(setup, "qat_again", *args, "--seed", "7")
    other = run(setup, "qat_seed8", *args, "--seed", "8")
    a, b, c = tree(out), tree(again), tree(other)
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]


# ---------------------------------------------------------------- qlora

QLORA = ["--method", "qlora", "--rank", "4", "--alpha", "8", "--lr", "1e-2", *TRAIN]


@pytest.fixture(scope="module")
def qlora(setup):
    args = [*QLORA, "--calib", setup["calib"], "--seed", "3"]
    return run(setup, "qlora", *args), args


def test_qlora_refit_equals_nf4_of_nf4_base_plus_the_saved_adapter(setup, qlora):
    out, _ = qlora
    src = setup["model"]
    orig = load_file(os.path.join(src, "model.safetensors"))
    t = load_file(os.path.join(out, "model.safetensors"))
    deltas = adapter_deltas(os.path.join(out, "qlora_adapter.h5"))
    assert sorted(deltas) == sorted(lin(l, x) for l in range(2) for x in TARGETS)
    cb = np.asarray(NF4, f32)
    for base, d in deltas.items():
        w = orig[base + ".weight"]
        c0, a0 = nf4(w)
        w0 = (cb[c0] * a0).astype(f32)
        c1, a1 = nf4((w0.astype(np.float64) + d).astype(f32))
        codes, amax, _ = nf4_weights(t, base, w.shape[1])
        assert np.array_equal(codes, c1) and np.array_equal(amax, a1), base
    assert max(float(np.abs(d).max()) for d in deltas.values()) > 1e-3  # it trained
    for name in orig:
        if not name.endswith("_proj.weight"):
            assert np.array_equal(t[name], orig[name]), name  # the rest is frozen
    man = json.load(open(os.path.join(out, "resafe_manifest.json")))
    assert man["method"] == "qlora" and man["quantization"] == "nf4-b64"
    assert man["merge"]["mode"] == "refit" and man["training"]["rank"] == 4
    assert man["merge"]["adapter"] == "qlora_adapter.h5"  # not the work directory's name
    assert man["calibration"]["file"] == setup["calib"] and "sha256" in man["calibration"]


def test_qlora_adapter_mode_logits_equal_torch_on_nf4_base_plus_lora(setup, qlora, tmp_path):
    _, args = qlora
    out = run(setup, "qlora_adapter", *args, "--merge", "adapter")
    src = setup["model"]
    # the same training: the same adapter
    assert (open(out / "resafe_adapter.h5", "rb").read() ==
            open(setup["runs"]["qlora"] / "qlora_adapter.h5", "rb").read())
    t = load_file(os.path.join(out, "model.safetensors"))
    orig = load_file(os.path.join(src, "model.safetensors"))
    deltas = adapter_deltas(os.path.join(out, "resafe_adapter.h5"))
    weights = {}
    for base, d in deltas.items():
        codes, amax, w0 = nf4_weights(t, base, d.shape[1])
        want_codes, want_amax = nf4(orig[base + ".weight"])  # the base is NF4 of the model
        assert np.array_equal(codes, want_codes) and np.array_equal(amax, want_amax), base
        weights[base + ".weight"] = (w0.astype(np.float64) + d).astype(f32)
    ref = torch_model(src, weights)
    seqs = random_batch(setup["rnd"], ref.config.vocab_size)
    ours = our_logits(str(out), seqs, tmp_path)
    with torch.no_grad():
        for b, s in enumerate(seqs):
            want = ref(torch.tensor([s])).logits[0].numpy()
            diff = float(np.abs(ours[b, :len(s)] - want).max())
            assert diff <= 1e-4, f"sequence {b}: max abs diff {diff}"


def test_qlora_lowers_the_calibration_loss_below_plain_nf4(setup, qlora):
    out, _ = qlora
    base = run(setup, "nf4", "--method", "nf4")
    src = setup["model"]
    after = response_nll(setup, torch_model(src, nf4_model_weights(out, src)))
    before = response_nll(setup, torch_model(src, nf4_model_weights(base, src)))
    print(f"response NLL: nf4 {before:.4f}, qlora {after:.4f}")
    assert after < before - 0.1
    rows = [json.loads(l) for l in open(os.path.join(out, "train_metrics.jsonl"))]
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"]


def test_qlora_same_seed_same_bytes_other_seed_other_bytes(setup, qlora):
    out, args = qlora
    again = run(setup, "qlora_again", *args)
    other = run(setup, "qlora_seed4", *args[:-1], "4")
    a, b, c = tree(out), tree(again), tree(other)
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]


def test_qlora_output_is_a_plain_quantized_model_directory(setup, qlora):
    out, _ = qlora
    run_resafe("generate", "--model", out, "--backend", "cpu", "--prompt", "the cat",
               "--max-new-tokens", "4", env=ENV)
    info = run_resafe("inspect", str(out), env=ENV).stdout
    assert "down_proj.qweight" in info and "resafe_adapter.h5" not in os.listdir(out)


@pytest.mark.parametrize("bits,sym", [(3, False), (8, True)])
def test_qlora_integer_base_refit_equals_rtn_of_rtn_base_plus_the_saved_adapter(setup, bits, sym):
    """--bits B: the base is RTN's integer grid (groups of 32 here), the merge RTN of
    dequant(base) + (alpha / r) B A with new scales and zeros."""
    flags = ["--bits", str(bits), "--group", "32"] + (["--sym"] if sym else [])
    out = run(setup, f"qlora_int{bits}", *QLORA, "--calib", setup["calib"], "--seed", "3", *flags)
    orig = load_file(os.path.join(setup["model"], "model.safetensors"))
    t = load_file(os.path.join(out, "model.safetensors"))
    deltas = adapter_deltas(os.path.join(out, "qlora_adapter.h5"))
    assert sorted(deltas) == sorted(lin(l, x) for l in range(2) for x in TARGETS)
    for base, d in deltas.items():
        w = orig[base + ".weight"]
        _, w0 = ref_int(w, bits, 32, sym)  # the base: RTN of the model
        want_codes, want_w = ref_int((w0.astype(np.float64) + d).astype(f32), bits, 32, sym)
        codes, sc, z = qparams(t, base, w.shape[1], bits, 32)
        assert np.array_equal(codes, want_codes), base
        assert np.array_equal(dequant(codes, sc, z, bits), want_w), base
    assert max(float(np.abs(d).max()) for d in deltas.values()) > 1e-3  # it trained
    for name in orig:
        if not name.endswith("_proj.weight"):
            assert np.array_equal(t[name], orig[name]), name
    man = json.load(open(os.path.join(out, "resafe_manifest.json")))
    spec = f"int{bits}-g32-{'sym' if sym else 'asym'}"
    assert man["method"] == "qlora" and man["quantization"] == spec
    assert man["merge"]["base"] == f"{spec} of {setup['model']}"


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("args,want", [
    (["--method", "qat"], "--method qat needs --calib FILE"),
    (["--method", "qlora"], "--method qlora needs --calib FILE"),
    (["--method", "qlora", "--calib", "CALIB", "--group", "32"], "--group and --sym need --bits"),
    (["--method", "qlora", "--calib", "CALIB", "--sym"], "--group and --sym need --bits"),
    (["--method", "qat", "--calib", "CALIB", "--rank", "4"], "--rank applies to --method qlora"),
    (["--method", "qlora", "--calib", "CALIB", "--act-bits", "8"], "--act-bits applies to --method qat"),
    (["--method", "rtn", "--lr", "1e-3"], "--lr applies to --method qat and qlora only"),
    (["--method", "qlora", "--calib", "CALIB", "--merge", "exact"], "--merge: 'exact' is not"),
])
def test_usage_errors_exit_2_with_one_line_and_write_nothing(setup, tmp_path, args, want):
    args = [setup["calib"] if a == "CALIB" else a for a in args]
    p = quantize(setup["model"], tmp_path / "out", *args, check=False)
    assert p.returncode == 2, p.stderr
    assert want in p.stderr.splitlines()[0], p.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", ["qat", "qlora"])
@pytest.mark.parametrize("text,want", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', 'calib.jsonl:2: no "response" member'),
    ('{"prompt": "a", "response": "b"}\nnot json\n', "calib.jsonl:2"),
    (None, "calibration file not found"),
])
def test_bad_calibration_file_is_one_error_line_and_writes_nothing(setup, tmp_path, method, text,
                                                                   want):
    calib = tmp_path / "calib.jsonl"
    if text is not None:
        calib.write_text(text)
    p = quantize(setup["model"], tmp_path / "out", "--method", method, "--calib", calib, *TRAIN,
                 check=False)
    errors = [l for l in p.stderr.splitlines() if l.startswith("resafe: error")]
    assert p.returncode == 1 and len(errors) == 1 and want in errors[0], p.stderr
    assert sorted(os.listdir(tmp_path)) == (["calib.jsonl"] if text is not None else [])


def test_an_existing_output_is_refused_before_training(setup, tmp_path):
    (tmp_path / "out").mkdir()
    p = quantize(setup["model"], tmp_path / "out", "--method", "qat", "--calib", setup["calib"],
                 *TRAIN, check=False)
    assert p.returncode == 1 and "already exists" in p.stderr and "sft:" not in p.stderr
    assert os.listdir(tmp_path) == ["out"]


def test_qat_interrupted_writes_nothing(setup, tmp_path):
    """SIGTERM during the training: exit 128 + 15, no output, no work directory left."""
    import subprocess
    from conftest import resafe_bin
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in setup["rows"] * 20))
    proc = subprocess.Popen([resafe_bin(), "quantize", "--model", setup["model"], "--out",
                             str(tmp_path / "out"), "--method", "qat", "--calib", str(big),
                             "--steps", "100000", "--batch", "8", "--chat-template", "none",
                             "--group", "0"],
                            stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stderr:
        if "sft: step" in line:
            break
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, err
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl"]
    # it says so: no checkpoint to resume (the work directory is gone)
    assert "interrupted by signal 15" in err and "run the command again" in err, err
    assert "--resume" not in err and "checkpoint.h5" not in err, err


# ---------------------------------------------------------------- the pipeline stage

@pytest.fixture(scope="module")
def files(setup):
    d = setup["dir"] / "pipe"
    d.mkdir()
    harmful = d / "harmful.csv"
    harmful.write_text("goal,category\nhow do I pick a lock,crime\nsteal a password,crime\n")
    benign = d / "benign.jsonl"
    benign.write_text(json.dumps({"prompt": "what is two plus two", "answer": "4"}) + "\n")
    return {"fp": setup["model"], "harmful": str(harmful), "benign": str(benign), "dir": d}


@pytest.mark.parametrize("quant,cli", [
    ({"quant__method": "qat", "quant__format": "int3", "quant__group_size": 0,
      "quant__train_lr": 2e-3},
     ["--method", "qat", "--bits", "3", "--lr", "2e-3", "--group", "0"]),
    ({"quant__method": "qat", "quant__format": "int4", "quant__group_size": 32,
      "quant__symmetric": "true", "quant__train_lr": 2e-3},
     ["--method", "qat", "--bits", "4", "--lr", "2e-3", "--group", "32", "--sym"]),
    ({"quant__method": "qlora", "quant__format": "nf4", "quant__group_size": None,
      "quant__qlora_rank": 4, "quant__qlora_alpha": 8, "quant__train_lr": 1e-2,
      "quant__qlora_targets": "q,v,down"},
     ["--method", "qlora", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--targets", "q,v,down"]),
    ({"quant__method": "qlora", "quant__format": "int3", "quant__group_size": 32,
      "quant__qlora_rank": 4, "quant__qlora_alpha": 8, "quant__train_lr": 1e-2},
     ["--method", "qlora", "--bits", "3", "--group", "32", "--rank", "4", "--alpha", "8", "--lr",
      "1e-2"]),
])
def test_train_stage_equals_resafe_quantize_and_resumes(setup, files, wide, tmp_path, quant, cli):
    if quant.get("quant__group_size") == 32:  # on the model whose columns 32 divides
        files = dict(files, fp=wide)
    common = {"quant__calib_file": setup["calib"], "quant__train_steps": 12,
              "quant__train_batch_size": 8, "model__chat_template": "none"}
    cfg = config(files, tmp_path / "c.ini", **common, **quant)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    p = train(cfg, "--to", "quantize", cwd=tmp_path / "a")
    assert status(p.stdout, "quantize")[-1].endswith(" s"), p.stdout
    quantize(files["fp"], tmp_path / "cli", *cli, "--calib", setup["calib"], "--steps", "12",
             "--batch", "8", "--chat-template", "none", "--seed", "5")
    ours, theirs = tree(tmp_path / "a" / "run" / "quantize" / "model"), tree(tmp_path / "cli")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name] == theirs[name], name
    p = train(cfg, "--to", "quantize", cwd=tmp_path / "a")
    assert status(p.stdout, "quantize") == ["train [1/6] quantize: up to date"]
    # stopped after the stage's work, before its manifest: redone to the same bytes
    p = train(cfg, "--to", "quantize", cwd=tmp_path / "b", check=False,
              env=dict(ENV, RESAFE_TEST_STOP_AFTER="quantize"))
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    p = train(cfg, "--to", "quantize", cwd=tmp_path / "b")
    assert "quantize: running (no manifest" in p.stdout
    assert tree(tmp_path / "a" / "run") == tree(tmp_path / "b" / "run")
    # a changed training key reruns the stage
    cfg2 = config(files, tmp_path / "c2.ini", **{**common, "quant__train_steps": 13}, **quant)
    p = train(cfg2, "--to", "quantize", cwd=tmp_path / "a")
    assert "quantize: running" in status(p.stdout, "quantize")[0]


@pytest.mark.parametrize("quant", [
    {"quant__method": "qat", "quant__format": "int4", "quant__group_size": 0},
    {"quant__method": "qlora", "quant__format": "nf4", "quant__group_size": None,
     "quant__qlora_rank": 4, "quant__qlora_alpha": 8},
])
def test_whole_run_on_a_qat_or_qlora_model_finishes_and_is_then_up_to_date(setup, files, tmp_path,
                                                                            quant):
    """triplets, dpo (LoRA on the trained quantized model), every merge mode and eval load it."""
    cfg = config(files, tmp_path / "c.ini", quant__calib_file=setup["calib"],
                 quant__train_steps=6, quant__train_lr=1e-2, lora__merge_compare="all", **quant)
    p = train(cfg, cwd=tmp_path)
    stages = ["quantize", "triplets", "dpo", "merge", "eval", "report"]
    for i, st in enumerate(stages):
        assert status(p.stdout, st)[-1].startswith(f"train [{i + 1}/6] {st}: done"), p.stdout
    modes = json.load(open(tmp_path / "run" / "merge" / "merge.json"))["modes"]
    assert {"grid", "refit", "adapter"} <= set(modes)
    p = train(cfg, cwd=tmp_path)
    assert all(status(p.stdout, st) == [f"train [{i + 1}/6] {st}: up to date"]
               for i, st in enumerate(stages)), p.stdout


@pytest.mark.parametrize("over,want", [
    ({"quant__method": "qat"}, "[quant] method qat needs [quant] calib_file"),
    ({"quant__method": "qlora", "quant__format": "fp4", "quant__calib_file": "CALIB"},
     "set format = nf4 or int2 .. int8"),
    ({"quant__method": "qat", "quant__group_size": 48, "quant__calib_file": "CALIB"},
     "48"),
    ({"quant__method": "qlora", "quant__format": "nf4", "quant__group_size": 64,
      "quant__calib_file": "CALIB"}, "--group and --sym need --bits"),
])
def test_train_config_errors_are_one_line(setup, files, tmp_path, over, want):
    over = {k: (setup["calib"] if v == "CALIB" else v) for k, v in over.items()}
    cfg = config(files, tmp_path / "c.ini", **over)
    p = train(cfg, cwd=tmp_path, check=False)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 1 and len(lines) == 1 and want in lines[0], p.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("flag,key", [("--act-bits", "qat_act_bits"), ("--kv-bits", "qat_kv_bits")])
def test_qat_activation_and_kv_bits_reach_resafe_sft(setup, qat, tmp_path, flag, key):
    """Passed to [sft] qat_act_bits / qat_kv_bits: the training differs from the weights-only run
    and the manifest says so."""
    _, _, _, _, args = qat
    p = quantize(setup["model"], tmp_path / "out", *args, "--seed", "7", flag, "4", check=False)
    assert p.returncode == 0, p.stderr
    man = json.load(open(tmp_path / "out" / "resafe_manifest.json"))
    assert man["training"][flag[2:].replace("-", "_")] == 4
    plain = [json.loads(l)["loss"] for l in open(setup["runs"]["qat"] / "train_metrics.jsonl")]
    ours = [json.loads(l)["loss"] for l in open(tmp_path / "out" / "train_metrics.jsonl")]
    assert ours != plain
