"""Calibrated quantization (AWQ, GPTQ), critical-weight protection and calibration files,
driven through build/tools/qmeth_tool, against independent torch/numpy computations.

The model: scripts/make_test_model.py's tiny Llama (hidden 64, 2 layers), with structure added
so that activation-aware methods have something to find, as real LLMs have: a few "outlier"
input channels (norm gains x8 on 3 channels of each RMSNorm, 2 rows of v_proj and of up_proj
x5, so o_proj and down_proj inputs have outlier channels too), and lm_head x3 so that its own text
has structure (perplexity well below the vocabulary size). Calibration and held-out texts are
the model's own samples (decoded), so the activations are real ones from its forward on text.
Errors are recomputed in torch from the dequantized weights the tool writes and the inputs each
linear sees in a torch forward where the earlier layers hold that method's dequantized weights
(the sequential scheme the driver uses).
"""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import BUILD, ROOT

transformers = pytest.importorskip("transformers")

TOOL = os.path.join(BUILD, "tools", "qmeth_tool")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_SEQ = 48
N_CALIB, N_HELD = 32, 16  # ~1500 calibration tokens: H well determined for inputs of 64-170
GROUP = 32


def tool(*args, check=True):
    # one thread: the matrices are tiny, and OpenMP threads only spin on shared cores
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, timeout=120,
                       env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"qmeth_tool {args} failed:\n{p.stderr[-3000:]}")
    return p


def linears(model):
    for layer in model.model.layers:
        for t in TARGETS:
            yield getattr(layer.self_attn if t[0] in "qkvo" else layer.mlp, t)


# ---------------------------------------------------------------- the model and its text

def add_outliers(model, rnd):
    with torch.no_grad():
        model.lm_head.weight *= 3.0  # peaked next-token distributions: text with structure
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[rnd.sample(range(norm.weight.shape[0]), 3)] *= 8.0
            for w in (layer.self_attn.v_proj.weight, layer.mlp.up_proj.weight):
                w[rnd.sample(range(w.shape[0]), 2)] *= 5.0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: extra threads only spin on the shared cores (20x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    seed = int(os.environ.get("RESAFE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed {seed}")
    rnd = random.Random(seed)
    d = tmp_path_factory.mktemp("qmeth")
    path = str(d / "model")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_test_model.py"), path,
                    "--seed", str(seed % 10000), "--hidden", "64", "--layers", "2"],
                   check=True, capture_output=True)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    add_outliers(model, rnd)
    model.save_pretrained(path, safe_serialization=True)
    torch.manual_seed(seed % (2**31))
    with torch.no_grad():
        out = model.generate(torch.full((N_CALIB + N_HELD, 1), tok.bos_token_id), do_sample=True,
                             max_new_tokens=MAX_SEQ, pad_token_id=tok.eos_token_id, top_k=0)
    # one text per line of a .txt file: control characters (line breaks of any kind) -> space
    texts = ["".join(c if c.isprintable() else " " for c in
                     tok.decode(o[1:], skip_special_tokens=True)).strip() for o in out]
    texts = [t for t in texts if t]
    calib = texts[:N_CALIB]
    # held-out: the sampled ids themselves (decoding and re-encoding would change the tokens, and
    # the model's distribution is over its own token sequences), cut after the first eos
    held = []
    for o in out[N_CALIB:].tolist():
        held.append(o[:o.index(tok.eos_token_id, 1) + 1] if tok.eos_token_id in o[1:] else o)
    calib_file = d / "calib.txt"
    calib_file.write_text("\n".join(calib) + "\n", encoding="utf-8")
    return dict(path=path, tok=tok, model=model, calib=calib, held=held,
                calib_file=str(calib_file), dir=d, rnd=rnd, runs={}, errs={})


def run_method(q, method, bits, *extra):
    """(dequantized weights, summary, output dir) of one quantization, memoised per model."""
    key = (method, bits, *extra)
    if key not in q["runs"]:
        q["runs"][key] = _run_method(q, method, bits, *extra)
    return q["runs"][key]


def _run_method(q, method, bits, *extra):
    out = q["dir"] / f"{method}_{bits}_{'_'.join(map(str, extra))}".replace("-", "")
    os.makedirs(out, exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    args = ["model", q["path"], str(out), method, bits, GROUP, "--max-seq", MAX_SEQ,
            "--calib", q["calib_file"]]
    tool(*args, *extra)
    deq = np.fromfile(out / "deq.f32", dtype=np.float32)
    weights, off = [], 0
    for lin in linears(q["model"]):
        n = lin.weight.numel()
        weights.append(torch.from_numpy(deq[off:off + n].reshape(lin.weight.shape).copy()))
        off += n
    assert off == deq.size
    summary = json.loads((out / "summary.json").read_text())
    return weights, summary, out


def ids_of(tok, text):
    return tok(text).input_ids[:MAX_SEQ]


def with_weights(model, weights, n_layers):
    """A copy of model whose first n_layers layers hold the given (dequantized) weights."""
    import copy
    m = copy.deepcopy(model)
    with torch.no_grad():
        for lin, w in list(zip(linears(m), weights))[:7 * n_layers]:
            lin.weight.copy_(w)
    return m


def layer_inputs(model, layer, texts, tok):
    """Inputs X [tokens, in] of the seven linears of one layer, over the texts."""
    xs = {t: [] for t in TARGETS}
    hooks = []
    lay = model.model.layers[layer]
    for t in TARGETS:
        mod = getattr(lay.self_attn if t[0] in "qkvo" else lay.mlp, t)
        hooks.append(mod.register_forward_hook(
            lambda mod, inp, out, t=t: xs[t].append(inp[0].reshape(-1, inp[0].shape[-1]).double())))
    with torch.no_grad():
        for text in texts:
            model(torch.tensor([ids_of(tok, text)]))
    for h in hooks:
        h.remove()
    return {t: torch.cat(v) for t, v in xs.items()}


def errors_of(q, method, bits, *extra):
    key = (method, bits, *extra)
    if key not in q["errs"]:
        q["errs"][key] = output_errors(q, run_method(q, method, bits, *extra)[0])
    return q["errs"][key]


def output_errors(q, weights):
    """Relative output error ||X (Wq - W)^T|| / ||X W^T|| per linear, X the linear's inputs with
    the earlier layers holding weights (as the driver quantizes sequentially)."""
    model, n_layers = q["model"], q["model"].config.num_hidden_layers
    errs = []
    for l in range(n_layers):
        xs = layer_inputs(with_weights(model, weights, l) if l else model, l, q["calib"], q["tok"])
        lins = list(linears(model))[7 * l:7 * l + 7]
        for t, lin, wq in zip(TARGETS, lins, weights[7 * l:7 * l + 7]):
            w, x = lin.weight.detach().double(), xs[t]
            err = torch.linalg.norm(x @ (wq.double() - w).T) / torch.linalg.norm(x @ w.T)
            errs.append(float(err))
    return np.array(errs)


def perplexity(q, weights, seqs):
    m = with_weights(q["model"], weights, q["model"].config.num_hidden_layers)
    nll, n = 0.0, 0
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq])
            if ids.shape[1] < 2:
                continue
            logp = torch.log_softmax(m(ids).logits[0, :-1].double(), -1)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            n += ids.shape[1] - 1
    return float(np.exp(nll / n))


# ---------------------------------------------------------------- AWQ / GPTQ vs RTN

@pytest.mark.parametrize("bits", [4, 3])
def test_awq_and_gptq_lower_output_error_than_rtn_for_every_linear(qmodel, bits):
    q = qmodel
    res = {m: run_method(q, m, bits) for m in ("rtn", "awq", "gptq")}
    errs = {m: errors_of(q, m, bits) for m in res}
    for m in res:  # the driver's own rel_error is the same quantity
        np.testing.assert_allclose(res[m][1]["rel_error"], errs[m], rtol=2e-3, atol=1e-6)
    print(f"\n{bits}-bit g{GROUP} relative output error per linear (layer-major q..down):")
    for m in res:
        print(f"  {m:5s}", " ".join(f"{e:.4f}" for e in errs[m]))
    print("  awq/rtn", " ".join(f"{r:.2f}" for r in errs["awq"] / errs["rtn"]))
    print("  gptq/rtn", " ".join(f"{r:.2f}" for r in errs["gptq"] / errs["rtn"]))
    assert np.all(errs["awq"] < errs["rtn"]), (errs["awq"], errs["rtn"])
    assert np.all(errs["gptq"] < errs["rtn"]), (errs["gptq"], errs["rtn"])
    if bits == 3:
        ppl = {m: perplexity(q, res[m][0], q["held"]) for m in res}
        ppl["fp32"] = perplexity(q, [lin.weight.detach() for lin in linears(q["model"])], q["held"])
        print("  held-out perplexity:", {k: round(v, 3) for k, v in ppl.items()})
        # End to end, AWQ beats RTN on every seed tried (awq/rtn 0.29-0.65 over 25 seeds); GPTQ
        # minimises each linear's error on the calibration texts (asserted above), which on this
        # 2-layer model carries over to held-out text on most seeds but not all (gptq/rtn
        # 0.54-1.01 over 25 seeds; CI failed at 1.08 once): it may sit up to 20% above RTN.
        assert ppl["awq"] <= ppl["rtn"] and ppl["gptq"] <= 1.2 * ppl["rtn"], ppl


def test_gptq_act_order_also_beats_rtn(qmodel):
    q = qmodel
    rtn = errors_of(q, "rtn", 3)
    act = errors_of(q, "gptq", 3, "--act-order")
    print("\n  gptq act-order/rtn", " ".join(f"{r:.2f}" for r in act / rtn))
    assert np.all(act < rtn)


def test_same_inputs_give_identical_outputs(qmodel):
    q = qmodel
    for method, extra in (("awq", ()), ("gptq", ("--act-order",))):
        a = run_method(q, method, 4, *extra)[2]
        b = _run_method(q, method, 4, *extra, "--max-seq", MAX_SEQ)[2]  # a second run
        assert (a / "deq.f32").read_bytes() == (b / "deq.f32").read_bytes()


# ---------------------------------------------------------------- GPTQ vs a numpy reference

def ref_grid(x, bits, sym):
    """quant.h's grid of one group (the same formula as RTN)."""
    if sym:
        qs = 2 ** (bits - 1) - 1
        s = np.float32(np.max(np.abs(x)) / qs)
        s = s if s > 0 else np.float32(1)
        return s, np.float32(2 ** (bits - 1)), 1, 2 ** bits - 1
    qmax = 2 ** bits - 1
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    s = np.float32((hi - lo) / qmax)
    s = s if s > 0 else np.float32(1)
    z = np.float32(np.clip(np.rint(-lo / np.float64(s)), 0, qmax))
    return s, z, 0, qmax


def ref_gptq(W, H, bits, gs, act_order, damp, sym):
    """GPTQ, Algorithm 1 column by column (no lazy batches), in float64."""
    rows, cols = W.shape
    W = W.astype(np.float64).copy()
    H = H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * np.mean(np.diag(H)) * np.eye(cols)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    W0 = W.copy()
    W, H = W[:, perm], H[perm][:, perm]
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # H^-1 = U^T U
    ng = (cols + gs - 1) // gs
    scales = np.zeros((rows, ng), np.float32)
    zeros = np.zeros((rows, ng), np.float32)
    lo_hi = {}
    if act_order:
        for r in range(rows):
            for g in range(ng):
                s, z, lo, hi = ref_grid(W0[r, g * gs:(g + 1) * gs], bits, sym)
                scales[r, g], zeros[r, g], lo_hi[g] = s, z, (lo, hi)
    codes = np.zeros((rows, cols), np.uint8)
    for i in range(cols):
        j = perm[i]
        g = j // gs
        if not act_order and j % gs == 0:
            for r in range(rows):
                s, z, lo, hi = ref_grid(W[r, i:i + gs], bits, sym)
                scales[r, g], zeros[r, g], lo_hi[g] = s, z, (lo, hi)
        lo, hi = lo_hi[g]
        c = np.clip(np.rint(W[:, i] / scales[:, g].astype(np.float64)) + zeros[:, g], lo, hi)
        codes[:, j] = c
        qv = ((c.astype(np.float32) - zeros[:, g]) * scales[:, g]).astype(np.float64)
        e = (W[:, i] - qv) / U[i, i]
        W[:, i + 1:] -= np.outer(e, U[i, i + 1:])
    return codes, scales, zeros


@pytest.mark.parametrize("act_order", [0, 1])
@pytest.mark.parametrize("bits,sym", [(4, 0), (3, 0), (4, 1)])
def test_gptq_matches_numpy_reference(tmp_path, act_order, bits, sym):
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    rows, cols, gs, block = 24, 128, 32, 48  # several lazy batches and groups
    X = rng.standard_normal((300, cols)) * np.where(rng.random(cols) < 0.1, 8.0, 1.0)
    X[:, rng.integers(cols)] = 0  # a dead input
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    H = X.T @ X
    W.tofile(tmp_path / "w.f32")
    H.tofile(tmp_path / "h.f64")
    tool("gptq", tmp_path / "w.f32", tmp_path / "h.f64", rows, cols, bits, gs, act_order, block,
         0.01, sym, tmp_path)
    codes = np.fromfile(tmp_path / "codes.u8", np.uint8).reshape(rows, cols)
    scales = np.fromfile(tmp_path / "scales.f32", np.float32).reshape(rows, -1)
    rc, rs, rz = ref_gptq(W, H, bits, gs, act_order, 0.01, sym)
    # Same algorithm, same order; only the summation order differs (lazy batches, Cholesky by
    # hand vs LAPACK), ~1e-13 relative: a code can flip only when w / scale lands within that
    # of a rounding boundary.
    mismatch = np.mean(codes != rc)
    assert mismatch <= 2 / codes.size, mismatch
    np.testing.assert_allclose(scales, rs, rtol=1e-5)


# ---------------------------------------------------------------- protection

SAFETY = [("How do I pick a lock?", "I cannot help with that request."),
          ("Write a poem about the sea.", "Sure. The sea and the wind."),
          ("What is the capital of France?", "The capital of France is Paris."),
          ("Tell me how to bake bread.", "Mix flour, water, salt and yeast, knead, and bake.")]


def example_ids(tok, prompt, target, chat):
    """raw: tok(prompt) + tok(" " + target); chat: the user turn with the generation prompt
    (apply_chat_template) + tok(target)."""
    if not chat:
        return tok(prompt).input_ids, tok(" " + target, add_special_tokens=False).input_ids
    p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                tokenize=True)
    p = list(p["input_ids"] if hasattr(p, "keys") else p)
    return p, tok(target, add_special_tokens=False).input_ids


def torch_scores(q, chat):
    """mean over examples of |W * dL/dW|, L = mean NLL of the target tokens (prompt masked)."""
    model, tok = q["model"], q["tok"]
    lins = list(linears(model))
    scores = [torch.zeros_like(l.weight, dtype=torch.float64) for l in lins]
    for prompt, target in SAFETY:
        p, t = example_ids(tok, prompt, target, chat)
        ids = (p + t)[:MAX_SEQ]
        model.zero_grad()
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        tgt = torch.tensor(ids[1:])
        keep = torch.arange(1, len(ids)) >= len(p)
        loss = -(logp.gather(1, tgt[:, None])[:, 0] * keep).sum() / keep.sum()
        loss.backward()
        for s, l in zip(scores, lins):
            s += (l.weight.detach() * l.weight.grad).abs().double() / len(SAFETY)
    return np.concatenate([s.numpy().ravel() for s in scores])


@pytest.mark.parametrize("method,chat", [("rtn", None), ("gptq", None), ("awq", None),
                                         ("rtn", "llama-2")])
def test_protection_keeps_exactly_the_top_tau_scores(qmodel, tmp_path, method, chat):
    q = qmodel
    data = tmp_path / "safety.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in SAFETY))
    tau = 0.01
    extra = ("--chat", chat) if chat else ()
    weights, summary, out = run_method(q, method, 3, "--protect", str(data), "--tau", tau, *extra)
    ours = np.fromfile(out / "scores.f32", np.float32)
    mask = np.fromfile(out / "mask.u8", np.uint8).astype(bool)
    ref = torch_scores(q, chat)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-4 * ref.max())
    k = int(np.floor(tau * ref.size + 0.5))
    assert mask.sum() == k
    # exactly the top k of our scores by a full sort (descending, ties: lower index first)
    order = np.lexsort((np.arange(ours.size), -ours.astype(np.float64)))
    top = np.zeros(ours.size, bool)
    top[order[:k]] = True
    assert np.array_equal(mask, top)
    # and the top k of the torch scores, up to entries within float noise of the threshold
    thr = np.sort(ref)[::-1][k - 1]
    ref_top = ref >= thr
    differ = mask != ref_top
    assert np.all(np.abs(ref[differ] - thr) <= 2e-3 * thr), ref[differ]
    # protected entries reconstruct exactly (their fp16 value), wherever they are
    w_all = np.concatenate([l.weight.detach().numpy().ravel() for l in linears(q["model"])])
    deq = np.concatenate([w.numpy().ravel() for w in weights])
    np.testing.assert_array_equal(deq[mask], w_all[mask].astype(np.float16).astype(np.float32))
    assert sum(summary["n_critical"]) == k
    overhead = summary["critical_bytes"] / summary["bytes"]
    print(f"\n{method} int3-g{GROUP} tau={tau}: {k} protected entries, side matrix "
          f"{summary['critical_bytes']} B = {100 * overhead:.1f}% of {summary['bytes']} B "
          f"quantized (fp16 dense {summary['dense_bytes']} B)")
    assert 0 < summary["critical_bytes"] < summary["dense_bytes"]


# ---------------------------------------------------------------- calibration files

def load(path, column="text", max_items=0, check=True):
    p = tool("calib", path, column, max_items, check=check)
    return [json.loads(line) for line in p.stdout.splitlines()] if check else p


def test_calib_txt_csv_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one\r\n\ntwo words\nthree")
    assert [r["text"] for r in load(tmp_path / "a.txt")] == ["one", "two words", "three"]
    assert len(load(tmp_path / "a.txt", max_items=2)) == 2
    (tmp_path / "b.csv").write_bytes(
        b'id,text,other\r\n1,plain,x\r\n2,"with, comma",y\n3,"multi\nline ""quoted""",z\n\n4,,w\n')
    assert [r["text"] for r in load(tmp_path / "b.csv")] == \
        ["plain", "with, comma", 'multi\nline "quoted"', ""]
    (tmp_path / "bom.csv").write_bytes(b'\xef\xbb\xbftext\nhello\n')  # Excel's UTF-8 BOM
    assert [r["text"] for r in load(tmp_path / "bom.csv")] == ["hello"]
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"prompt": "Hi \u00e9", "target": "Hello"}) + "\n\n" +
        json.dumps({"prompt": "a\nb", "target": "c", "extra": 1}) + "\n")
    rows = load(tmp_path / "c.jsonl", "prompt+target")
    assert rows == [{"text": "Hi \u00e9 Hello", "target": "Hello"},
                    {"text": "a\nb c", "target": "c"}]
    assert [r["text"] for r in load(tmp_path / "c.jsonl", "prompt")] == ["Hi \u00e9", "a\nb"]


@pytest.mark.parametrize("name,content,column,needle", [
    ("bad.csv", 'text\n"open quote\n', "text", "bad.csv:2: unterminated"),
    ("bad2.csv", 'text,b\nx\n', "text", "bad2.csv:2: 1 fields"),
    ("bad3.csv", 'a,b\n1,2\n', "text", "bad3.csv: no column 'text' (columns: a, b)"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": null}\n', "text", "bad.jsonl:2: no string member 'text'"),
    ("bad2.jsonl", '{"text": "ok"}\n\n[1, 2\n', "text", "bad2.jsonl:3: not a JSON object"),
    ("empty.txt", '\n\n', "text", "empty.txt: no rows"),
])
def test_calib_errors_name_file_and_line(tmp_path, name, content, column, needle):
    (tmp_path / name).write_text(content)
    p = load(tmp_path / name, column, check=False)
    assert p.returncode != 0 and needle in p.stderr, p.stderr
