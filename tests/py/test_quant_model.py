"""Quantized model directories end to end: `resafe quantize`, loading (rs_model_load detects the
format), the quantized forward against transformers on the dequantized export, generation, the
LoRA training step on packed weights, the files' schema and the CLI's errors.

Reference: `--export dequant --export-dtype f32` writes W_eff = rs_dequantize(Q) as a plain HF
directory; transformers (fp32) on it must give our quantized forward's logits within 1e-4 (the
same tolerance as tests/py/test_model.py: fp32 both sides). The export's weights themselves are
checked bit for bit against the numpy RTN reference of test_quant.py, so the chain
checkpoint -> numpy formula -> transformers is independent of our code.
"""
import hashlib
import json
import os
import random
import struct

import numpy as np
import pytest
import torch

from conftest import ROOT, run_resafe
from test_model import make_checkpoint, our_logits, random_batch, ref_logits, generate_jsonl
from test_quant import ref_int, ref_codebook, NF4

transformers = pytest.importorskip("transformers")
LOGIT_TOL = 1e-4
TOOL_ENV = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def quantize(src, out, *args, check=True):
    return run_resafe("quantize", "--model", src, "--out", out, *args, check=check, env=TOOL_ENV)


def st_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def load_f32(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qmodel")
    seed = int(os.environ.get("RESAFE_TEST_SEED", "1234"))
    model, path = make_checkpoint(tmp, "llama", seed)
    return model, path, tmp


METHODS = [("rtn", ["--bits", "4", "--group", "32"]),
           ("rtn", ["--bits", "3", "--group", "0", "--sym"]),
           ("nf4", []), ("fp4", []), ("int8", ["--threshold", "1.0"]),
           ("rtn", ["--bits", "2", "--group", "64"])]


@pytest.mark.parametrize("method,args", METHODS, ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_quantized_forward_matches_transformers_on_dequant_export(checkpoint, method, args):
    model, src, tmp = checkpoint
    tag = method + "".join(args)
    q, e = str(tmp / f"q_{tag}"), str(tmp / f"e_{tag}")
    p = quantize(src, q, "--method", method, *args)
    assert "quantized bytes" in p.stdout and "critical side" in p.stdout
    quantize(src, e, "--method", method, *args, "--export", "dequant", "--export-dtype", "f32")
    ref_model = load_f32(e)
    rnd = random.Random(5)
    seqs = random_batch(rnd, model.config.vocab_size)
    ours = our_logits(q, seqs, tmp)
    worst = 0.0
    for b, s in enumerate(seqs):
        diff = float(np.abs(ours[b, :len(s)] - ref_logits(ref_model, s)).max())
        worst = max(worst, diff)
        assert diff <= LOGIT_TOL, f"{tag} sequence {b}: max abs diff {diff}"
    # and the quantization did something: the original model differs
    orig = max(float(np.abs(ours[b, :len(s)] - ref_logits(model, s)).max()) for b, s in enumerate(seqs))
    print(f"{tag}: logits vs transformers on the export {worst:.3g}; vs the fp32 model {orig:.3g}")
    assert orig > 10 * LOGIT_TOL


def test_export_weights_equal_numpy_rtn_and_bf16_export_loads(checkpoint):
    model, src, tmp = checkpoint
    e, b = str(tmp / "e_ref"), str(tmp / "e_bf16")
    quantize(src, e, "--method", "rtn", "--bits", "4", "--group", "32", "--export", "dequant",
             "--export-dtype", "f32")
    from safetensors.numpy import load_file
    got = load_file(os.path.join(e, "model.safetensors"))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    n = 0
    for name, w in sd.items():
        if name.endswith("proj.weight"):
            _, deq = ref_int(w.astype(np.float32), 4, 32, 0)
            assert np.array_equal(got[name].view(np.uint32), deq.view(np.uint32)), name
            n += 1
        elif name in got:
            assert np.array_equal(got[name], w), name
    assert n == 7 * model.config.num_hidden_layers
    quantize(src, b, "--method", "nf4", "--export", "dequant")
    m16 = transformers.AutoModelForCausalLM.from_pretrained(b)
    assert next(m16.parameters()).dtype == torch.bfloat16
    w = sd["model.layers.0.mlp.up_proj.weight"].astype(np.float32)
    _, deq, _ = ref_codebook(w, NF4)
    bf = m16.model.layers[0].mlp.up_proj.weight.detach().float().numpy()
    assert np.array_equal(bf, torch.from_numpy(deq).bfloat16().float().numpy())


def test_quantized_directory_schema_and_manifest(checkpoint):
    model, src, tmp = checkpoint
    q = str(tmp / "q_schema")
    quantize(src, q, "--method", "rtn", "--bits", "4", "--group", "64")
    h = st_header(os.path.join(q, "model.safetensors"))
    qc = json.loads(h["__metadata__"]["quantization_config"])
    assert qc == {"quant_format": "int", "bits": 4, "group_size": 64, "symmetric": False,
                  "outlier_threshold": 6, "method": "rtn", "packing": "resafe-rowstream",
                  "packing_version": 1}
    name = "model.layers.1.self_attn.o_proj"
    rows, cols = model.model.layers[1].self_attn.o_proj.weight.shape
    assert h[f"{name}.qweight"]["dtype"] == "U8"
    assert h[f"{name}.qweight"]["shape"] == [rows, (cols + 31) // 32 * 16]
    assert h[f"{name}.scales"]["shape"] == [rows, (cols + 63) // 64]
    assert f"{name}.weight" not in h and "model.embed_tokens.weight" in h
    man = json.load(open(os.path.join(q, "resafe_manifest.json")))
    for f in ("config.json", "model.safetensors"):
        assert man["source"]["sha256"][f] == hashlib.sha256(open(os.path.join(src, f), "rb").read()).hexdigest()
    assert (man["method"], man["bits"], man["group_size"]) == ("rtn", 4, 64)
    assert man["calibration"] is None and man["packing_version"] == 1
    assert not [d for d in os.listdir(tmp) if ".tmp." in d], "temporary directory left behind"
    # inspect validates it; generate runs on it and matches generation on the f32 export
    run_resafe("inspect", "--as", "quant", os.path.join(q, "model.safetensors"))
    e = str(tmp / "e_schema")
    quantize(src, e, "--method", "rtn", "--bits", "4", "--group", "64", "--export", "dequant",
             "--export-dtype", "f32")
    prompts = [[5, 9, 12], [7, 3]]
    assert generate_jsonl(q, prompts, "--max-new-tokens", "8") == \
        generate_jsonl(e, prompts, "--max-new-tokens", "8")


def test_cli_errors(checkpoint, tmp_path):
    _, src, tmp = checkpoint
    for args in (["--method", "zzz"], ["--method", "rtn", "--bits", "5"],
                 ["--method", "rtn", "--group", "48"], ["--method", "awq"],
                 ["--method", "rtn", "--protect-tau", "0.1"], ["--method", "rtn", "--export", "x"]):
        p = quantize(src, str(tmp_path / "o"), *args, check=False)
        assert p.returncode == 2, (args, p.stderr)
    p = quantize(str(tmp_path / "missing"), str(tmp_path / "o"), "--method", "rtn", check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    os.makedirs(tmp_path / "exists")
    p = quantize(src, str(tmp_path / "exists"), "--method", "rtn", check=False)
    assert p.returncode == 1 and "already exists" in p.stderr


def test_malformed_quantized_directory_one_error_line(checkpoint, tmp_path):
    """Nonzero padding codes (only detectable with the exact width from config.json) and a
    truncated scales tensor: generate fails with one line naming the file and tensor."""
    from safetensors.numpy import load_file, save_file
    _, src, tmp = checkpoint
    q = str(tmp / "q_bad_src")
    if not os.path.exists(q):
        quantize(src, q, "--method", "rtn", "--bits", "4", "--group", "32")
    meta = st_header(os.path.join(q, "model.safetensors"))["__metadata__"]
    t = load_file(os.path.join(q, "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    cols = json.load(open(os.path.join(q, "config.json")))["intermediate_size"]
    for defect in ("padding", "scales"):
        bad = dict(t)
        if defect == "padding":
            if cols % 32 == 0:
                continue
            qw = bad[f"{name}.qweight"].copy()
            qw[0, -1] |= 0x80
            bad[f"{name}.qweight"] = qw
        else:
            bad[f"{name}.scales"] = bad[f"{name}.scales"][:, :-1].copy()
        d = tmp_path / defect
        os.makedirs(d)
        for f in os.listdir(q):
            if f != "model.safetensors":
                open(d / f, "wb").write(open(os.path.join(q, f), "rb").read())
        save_file(bad, str(d / "model.safetensors"), metadata=meta)
        p = run_resafe("generate", "--model", str(d), "--ids", "1,2", "--max-new-tokens", "1",
                       "--backend", "cpu", check=False)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode == 1 and len(lines) == 1, p.stderr
        assert "model.safetensors" in lines[0] and name in lines[0], lines[0]


def test_corpus_seeds_are_valid():
    seeds = os.path.join(ROOT, "tests", "fuzz", "seeds", "quant")
    files = sorted(os.listdir(seeds))
    assert files
    for f in files:
        run_resafe("inspect", "--as", "quant", os.path.join(seeds, f))


def test_lora_step_on_quantized_model_matches_autograd_on_dequantized(tmp_path, rng_seed, monkeypatch):
    """LoRA on packed weights (qmatmul forward, qmatmul_t input gradient, frozen base): seq
    log-probs, dA, dB and dW (for SNIP, from x and dout only) equal float64 autograd on the
    dequantized weights within the training tests' 1e-4 relative tolerance."""
    import test_model_grad as g
    _, path = g.make_model(tmp_path, "llama_gqa", rng_seed)
    q, e = str(tmp_path / "q"), str(tmp_path / "e")
    quantize(path, q, "--method", "rtn", "--bits", "4", "--group", "32")
    quantize(path, e, "--method", "rtn", "--bits", "4", "--group", "32", "--export", "dequant",
             "--export-dtype", "f32")
    ref = load_f32(e)
    batch = g.random_batch(random.Random(rng_seed + 3), ref.config.vocab_size)
    adapter = g.random_adapter(ref, 4, torch.Generator().manual_seed(rng_seed))
    ours = g.run_tool(q, batch, tmp_path, "--lora", 2.0, "--mode", "factor", "--want-dw",
                      adapter=adapter)
    refs, logps = g.lora_reference(g.truly_float64(ref, monkeypatch), batch, adapter, 2.0 / 4)
    assert np.abs(ours["seq_logp"] - logps).max() <= g.LOGP_TOL
    worst = g.check_close(ours, refs, g.GRAD_TOL, "quantized lora")
    print(f"quantized LoRA: max relative gradient error {worst:.3g}")
    # elementwise masks merge into dequant(Q) (the qdequantize op)
    fresh = load_f32(e)
    adapter = g.random_adapter(fresh, 4, torch.Generator().manual_seed(rng_seed + 1), "elementwise")
    ours = g.run_tool(q, batch, tmp_path, "--lora", 2.0, "--mode", "elementwise", "--want-dw",
                      adapter=adapter)
    refs, logps = g.lora_reference(g.truly_float64(fresh, monkeypatch), batch, adapter, 2.0 / 4,
                                   "elementwise")
    assert np.abs(ours["seq_logp"] - logps).max() <= g.LOGP_TOL
    g.check_close(ours, refs, g.GRAD_TOL, "quantized elementwise lora")


def test_quantize_with_calibration_and_protection_then_dpo(tmp_path):
    """GPTQ with calibration text and SNIP protection through the CLI (a model with a tokenizer):
    the manifest hashes the data, protected entries are exactly their fp16 originals in the
    export, the report counts the side matrix, and the DPO patch (SNIP on dequant(Q) + adapter,
    elementwise masks) runs on the quantized directory."""
    import subprocess
    import sys
    from safetensors.numpy import load_file
    src = str(tmp_path / "m")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_test_model.py"), src,
                    "--hidden", "64", "--layers", "2"], check=True, capture_output=True)
    words = "the cat dog sat ran on a mat hat big red blue fast slow sun moon".split()
    r = random.Random(0)
    sent = lambda k: " ".join(r.choice(words) for _ in range(k))
    (tmp_path / "calib.txt").write_text("\n".join(sent(8) for _ in range(12)) + "\n")
    with open(tmp_path / "prot.jsonl", "w") as f:
        for _ in range(6):
            f.write(json.dumps({"prompt": sent(5), "target": sent(4)}) + "\n")
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"prompt": sent(5), "chosen": sent(6), "rejected": sent(7)}) + "\n")
    args = ["--method", "gptq", "--bits", "4", "--group", "32", "--calib", str(tmp_path / "calib.txt"),
            "--protect-tau", "0.01", "--protect-data", str(tmp_path / "prot.jsonl")]
    q, e = str(tmp_path / "q"), str(tmp_path / "e")
    p = quantize(src, q, *args)
    crit = int(p.stdout.split("critical side")[1].split()[0])
    assert crit > 0
    man = json.load(open(os.path.join(q, "resafe_manifest.json")))
    digest = hashlib.sha256(open(tmp_path / "calib.txt", "rb").read()).hexdigest()
    assert man["calibration"]["sha256"] == digest and man["protect_tau"] == pytest.approx(0.01)
    quantize(src, e, *args, "--export", "dequant", "--export-dtype", "f32")
    qt, et = load_file(os.path.join(q, "model.safetensors")), load_file(os.path.join(e, "model.safetensors"))
    orig = load_file(os.path.join(src, "model.safetensors"))
    n = 0
    for name in orig:
        base = name[:-len(".weight")]
        if f"{base}.crit_row_ptr" not in qt:
            continue
        rp, cols = qt[f"{base}.crit_row_ptr"], qt[f"{base}.crit_cols"]
        rows = np.repeat(np.arange(len(rp) - 1), np.diff(rp))
        want = orig[name].astype(np.float32)[rows, cols].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(et[name][rows, cols], want)
        n += len(cols)
    assert n > 0
    ini = tmp_path / "dpo.ini"
    ini.write_text(f"[model]\npath = {q}\nbackend = cpu\nthreads = 1\n"
                   f"[dpo]\ndata_file = {tmp_path / 'pairs.jsonl'}\nbeta = 0.1\nlr = 2e-3\n"
                   "batch_size = 4\nmicro_batch_size = 2\nmax_steps = 2\nwarmup_steps = 1\n"
                   "[snip]\ntau = 0.6\nreidentify_every = 1\nscore_batches = 1\nmask = elementwise\n"
                   f"[lora]\nrank = 4\nalpha = 8\ndropout = 0\n[run]\nout_dir = {tmp_path / 'out'}\nseed = 7\n")
    run_resafe("dpo", "--config", str(ini), env=TOOL_ENV)
    assert os.path.exists(tmp_path / "out" / "dpo" / "adapter.h5")
