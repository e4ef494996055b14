#!/usr/bin/env python3
"""GPU benchmarks of resafe against the PyTorch stack, in one run on one GPU (ratios, not lone
times). Needs a built build/resafe with the CUDA backend, torch, transformers and peft.

  scripts/bench/bench_gpu.py OUT_DIR [--results-dir scripts/bench/results] [--quick]
                             [--hidden 4096 --layers 32 --inter 11008 --vocab 32000]

Default shapes: Llama-2-7B (random bf16 weights, made on the GPU and saved once).
1. DPO step: masked-LoRA DPO as `resafe dpo` runs it (bf16 frozen weights, fp32 adapter, rank 128,
   alpha 256 on all 7 projections, no SNIP mask, 4 pairs x 2 sequences of exactly 512 tokens: a
   128-token prompt and a 384-token response) versus PyTorch + PEFT doing the same DPO step (bf16
   model, sdpa attention, fp32 LoRA, AdamW, grad clip 1, reference log-probs computed before the
   timed steps, as `resafe dpo` computes them once before training). resafe's step time is the
   median of steps 2..6 as `resafe dpo -v` logs them (loading and the reference pass excluded);
   once without and once with [model] recompute = true (and, with --micro N, with [dpo]
   micro_batch_size = N pairs per forward: activations shrink with N, the step is the same
   gradient accumulated; with --recompute-layers K, with only the first K layers recomputed).
   resafe runs with [dpo] share_prompt = true (each pair's prompt runs once for
   both responses; PEFT runs it twice, as TRL does) and, as its own row (unless --skip
   unshared), with share_prompt = false. tokens/s = 4096 / step seconds in every row (the
   pairs' tokens, however many rows a side runs).
2. Decode: greedy generation of 128 new tokens after 32-token prompts at batch 1 and 64, `resafe
   generate` versus transformers `generate` (bf16, sdpa, KV cache); per-token time from runs of
   128 and 1 new tokens (difference), so loading and prefill cancel. At batch 1 the bound is
   the bytes of the weights read per token (every linear and lm_head in bf16; the embedding is a
   gather) over the device's copy bandwidth measured in the same run (torch d2d copy, best of 5).
3. (--with-qdecode) Quantized decode: the RTN INT4 g128 copy through the CUDA backend's
   dequantize-into-scratch path versus resafe's own bf16 decode at batch 8.
Peak GPU memory: torch.cuda.max_memory_allocated for PyTorch; for resafe the peak of the memory
allocated through its backend (RESAFE_CUDA_MEMSTATS=1; neither counts the CUDA context).
Writes OUT_DIR/bench.json and RESULTS_DIR/dpo_decode-<device>-<date>.json, prints a table."""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
RESAFE = os.path.join(ROOT, os.environ.get("RESAFE_BUILD", "build"), "resafe")


def gpu_mem_used():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else 0


class MemPoll:
    def __init__(self):
        self.peak, self.stop = 0, False
        self.idle = gpu_mem_used()

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, gpu_mem_used())
            time.sleep(0.05)

    def __enter__(self):
        self.t = threading.Thread(target=self.run)
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop = True
        self.t.join()


def timed(cmd, env=None):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return dt, p


def make_model(d, a, device="cuda"):
    import torch
    import make_test_model as mtm
    from transformers import LlamaConfig, LlamaForCausalLM
    os.makedirs(d, exist_ok=True)
    mtm.write_tokenizer(mtm.make_tokenizer(384), d)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 128,
                      num_key_value_heads=a.hidden // 128, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if os.path.exists(os.path.join(d, "config.json")):
        return cfg
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        m = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    m.save_pretrained(d, safe_serialization=True, max_shard_size="20GB")
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    return cfg


def n_params(cfg):
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    linear = L * (4 * D * D + 3 * D * F)
    return linear, linear + 2 * V * D + (2 * L + 1) * D


def make_pairs(path, model_dir, n, a):
    """Pairs whose sequences are exactly a.prompt + (a.seq - a.prompt) tokens with the test
    tokenizer (' the' and ' a' are one token each; <s> is prepended to the prompt, </s> appended
    to the response by both sides)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    words = [" the", " a"]
    resp = a.seq - a.prompt - 1
    rows = []
    for i in range(n):
        prompt = "".join(words[(i + j // 7) % 2] for j in range(a.prompt - 1))
        chosen = "".join(words[(i + j // 3) % 2] for j in range(resp))
        rejected = "".join(words[(i + j // 5) % 2] for j in range(resp))
        assert len(tok.encode(prompt).ids) == a.prompt, "prompt token count"
        assert len(tok.encode(chosen, add_special_tokens=False).ids) == resp
        assert len(tok.encode(rejected, add_special_tokens=False).ids) == resp
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def peak_from(stderr):
    import re
    m = re.search(r"peak memory allocated (\d+) bytes", stderr)
    return int(m.group(1)) if m else None


def dpo_ini(path, model, pairs, batch, steps, seq, rank, recompute, out_dir, micro=0, share=True):
    """The `resafe dpo` config of the benchmarks: cuda, no chat template, no SNIP mask.
    recompute: False, True (every layer) or a layer count ([model] recompute_layers); share:
    [dpo] share_prompt."""
    with open(path, "w") as f:
        f.write(f"""[model]
path = {model}
backend = cuda
chat_template = none
recompute = {"true" if recompute else "false"}
recompute_layers = {0 if recompute is True else int(recompute)}
[dpo]
data_file = {pairs}
batch_size = {batch}
micro_batch_size = {micro}
share_prompt = {"true" if share else "false"}
max_steps = {steps}
max_seq_len = {seq}
lr = 1e-5
[snip]
mask = none
[lora]
rank = {rank}
alpha = {2 * rank}
[run]
out_dir = {out_dir}
checkpoint_every = 0
""")
    return path


def resafe_dpo(model, pairs, work, steps, a, recompute, micro=0, share=True):
    rc = "" if recompute is True or not recompute else str(int(recompute))
    tag = f"{steps}_{'rc' + rc if recompute else 'full'}" + (f"_mb{micro}" if micro else "") + \
        ("" if share else "_unshared")
    cfg = dpo_ini(os.path.join(work, f"dpo_{tag}.ini"), model, pairs, a.batch, steps, a.seq,
                  a.rank, recompute, f"{work}/run_{tag}", micro, share)
    env = dict(os.environ, RESAFE_CUDA_MEMSTATS="1")
    with MemPoll() as mp:
        _, p = timed([RESAFE, "dpo", "--config", cfg, "--force", "-v"], env=env)
    import re
    import statistics
    took = [float(x) for x in re.findall(r"dpo: step \d+ took ([0-9.]+) s", p.stderr)]
    if len(took) < 3:
        raise SystemExit("resafe dpo -v printed no step times:\n" + p.stderr[-2000:])
    peak = peak_from(p.stderr)
    # the median of the steps after the first (the first grows the op scratch, warms cuBLAS)
    return statistics.median(took[1:]), peak if peak is not None else (mp.peak - mp.idle) * 2**20


def torch_dpo_step(model_dir, pairs, a, steps=6, warm=2):
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    rows = [json.loads(l) for l in open(pairs)]

    def enc(p, r):
        pi = tok.encode(p).ids
        ri = tok.encode(r, add_special_tokens=False).ids + [2]
        ids = (pi + ri)[:a.seq]
        return ids, len(pi)
    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda()
    model.config.use_cache = False
    lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n_batches = len(rows) // a.batch

    def batch(i):
        seqs = []
        for r in rows[i * a.batch:(i + 1) * a.batch]:
            seqs.append(enc(r["prompt"], r["chosen"]))
            seqs.append(enc(r["prompt"], r["rejected"]))
        T = max(len(s) for s, _ in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        att = torch.zeros(len(seqs), T, dtype=torch.long)
        for k, (s, npr) in enumerate(seqs):
            ids[k, :len(s)] = torch.tensor(s)
            att[k, :len(s)] = 1
            mask[k, npr:len(s)] = True
        return ids.cuda(), att.cuda(), mask.cuda()

    def logps(ids, att, mask):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        return (lp * mask[:, 1:]).sum(-1)

    b0 = batch(0)
    assert b0[0].shape[1] == a.seq, b0[0].shape
    ref = []
    with torch.no_grad(), model.disable_adapter():
        for i in range(n_batches):
            ref.append(logps(*batch(i)))
    for i in range(steps + warm):
        if i == warm:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        j = i % n_batches
        lp = logps(*batch(j))
        z = (lp[0::2] - ref[j][0::2]) - (lp[1::2] - ref[j][1::2])
        loss = -F.logsigmoid(0.1 * z).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated()
    del model, opt
    torch.cuda.empty_cache()
    return dt, peak


def prompt_ids(B):
    return [[3 + (7 * i + 13 * j) % 300 for j in range(32)] for i in range(B)]


def decode_resafe(model, n_new, B):
    """(seconds inside rs_generate, as `resafe generate -v` reports it: loading excluded; new
    tokens over all prompts; peak bytes allocated)."""
    import re
    ids = ";".join(",".join(str(t) for t in row) for row in prompt_ids(B))
    env = dict(os.environ, RESAFE_CUDA_MEMSTATS="1")
    _, p = timed([RESAFE, "generate", "--model", model, "--backend", "cuda", "--ids", ids,
                  "--max-new-tokens", str(n_new), "--batch-size", str(B), "--format", "jsonl",
                  "-v"], env=env)
    m = re.search(r"generate: \d+ prompts, (\d+) new tokens in ([0-9.]+) s", p.stderr)
    if not m:
        raise SystemExit("resafe generate -v printed no timing line:\n" + p.stderr[-2000:])
    return float(m.group(2)), int(m.group(1)), peak_from(p.stderr)


def decode_torch(model_dir, n_new, batches):
    import torch
    from transformers import AutoModelForCausalLM
    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda()
    res = {}
    for B in batches:
        ids = torch.tensor(prompt_ids(B)).cuda()
        t = {}
        for n in (1, n_new):
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            t[n] = (time.perf_counter() - t0, out.shape[1] - 32)
        res[B] = (t[n_new][0] - t[1][0]) / (t[n_new][1] - t[1][1])
    peak = torch.cuda.max_memory_allocated()
    del model
    torch.cuda.empty_cache()
    return res, peak


def copy_bandwidth():
    import torch
    n = 1 << 30  # 2 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    best = 1e9
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * n / best  # read + write bytes per second


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "scripts", "bench", "results"))
    ap.add_argument("--quick", action="store_true", help="a small model (smoke test)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4, help="DPO pairs per step")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--micro", default="", metavar="N[,N]",
                    help="also time the DPO step with [dpo] micro_batch_size = N pairs per "
                         "forward (no recomputation): dpo_mbN_tok_s, dpo_mbN_peak_gib")
    ap.add_argument("--recompute-layers", default="", metavar="K[,K]",
                    help="also time the DPO step with [model] recompute_layers = K (the first K "
                         "layers recomputed): dpo_rcK_tok_s, dpo_rcK_peak_gib")
    ap.add_argument("--skip", default="",
                    help="comma list: dpo,unshared,recompute,peft,decode,hf")
    ap.add_argument("--with-qdecode", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.hidden, a.layers, a.inter = 256, 2, 688
    if a.prompt >= a.seq or a.rank < 1 or a.batch < 1:
        ap.error("need 0 < prompt < seq, rank >= 1, batch >= 1")
    skip = set(x for x in a.skip.split(",") if x)
    try:
        micros = [int(x) for x in a.micro.split(",") if x]
    except ValueError:
        ap.error(f"--micro {a.micro}: expected pair counts such as 1,2")
    try:
        rc_layers = [int(x) for x in a.recompute_layers.split(",") if x]
    except ValueError:
        ap.error(f"--recompute-layers {a.recompute_layers}: expected layer counts such as 8,24")
    if any(k < 1 or k >= a.layers for k in rc_layers):
        ap.error(f"--recompute-layers: each K must be in 1..{a.layers - 1} (--layers is {a.layers})")
    if any(m < 1 or m >= a.batch for m in micros):
        ap.error(f"--micro {a.micro}: each N must be in 1..{a.batch - 1} (--batch is {a.batch})")
    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(a.out, "work")
    model = os.path.join(work, "model")
    t_start = time.time()
    cfg = make_model(model, a)
    import torch
    dev = torch.cuda.get_device_name(0)
    linear, total = n_params(cfg)
    res = {"device": dev, "params": total, "hidden": a.hidden, "layers": a.layers,
           "batch_pairs": a.batch, "seq": a.seq, "prompt": a.prompt, "rank": a.rank}
    metrics = {}
    tokens = a.batch * 2 * a.seq
    if "dpo" not in skip:
        pairs = os.path.join(work, "pairs.jsonl")
        make_pairs(pairs, model, a.batch * 8, a)
        step, mem = resafe_dpo(model, pairs, work, 6, a, False)
        metrics.update(dpo_tok_s=tokens / step, dpo_step_s=step, dpo_peak_gib=mem / 2**30)
        if "unshared" not in skip:  # each pair's prompt run twice, as the baseline does
            ustep, umem = resafe_dpo(model, pairs, work, 6, a, False, share=False)
            metrics.update(dpo_unshared_tok_s=tokens / ustep, dpo_unshared_peak_gib=umem / 2**30)
        if "recompute" not in skip:
            rstep, rmem = resafe_dpo(model, pairs, work, 6, a, True)
            metrics.update(dpo_recompute_tok_s=tokens / rstep, dpo_recompute_peak_gib=rmem / 2**30)
        for k in rc_layers:
            kstep, kmem = resafe_dpo(model, pairs, work, 6, a, k)
            metrics.update({f"dpo_rc{k}_tok_s": tokens / kstep, f"dpo_rc{k}_peak_gib": kmem / 2**30})
        for m in micros:
            mstep, mmem = resafe_dpo(model, pairs, work, 6, a, False, m)
            metrics.update({f"dpo_mb{m}_tok_s": tokens / mstep, f"dpo_mb{m}_peak_gib": mmem / 2**30})
        if "peft" not in skip:
            pt_step, pt_mem = torch_dpo_step(model, pairs, a)
            metrics.update(dpo_peft_tok_s=tokens / pt_step, dpo_peft_peak_gib=pt_mem / 2**30,
                           dpo_speedup_vs_peft=pt_step / step,
                           dpo_peak_ratio_vs_peft=mem / pt_mem)
            if "unshared" not in skip:
                metrics["dpo_unshared_speedup_vs_peft"] = \
                    metrics["dpo_unshared_tok_s"] / metrics["dpo_peft_tok_s"]
            for k in rc_layers:
                metrics[f"dpo_rc{k}_speedup_vs_peft"] = metrics[f"dpo_rc{k}_tok_s"] / metrics["dpo_peft_tok_s"]
                metrics[f"dpo_rc{k}_peak_ratio_vs_peft"] = metrics[f"dpo_rc{k}_peak_gib"] / metrics["dpo_peft_peak_gib"]
            if "recompute" not in skip:
                metrics["dpo_recompute_speedup_vs_peft"] = metrics["dpo_recompute_tok_s"] / metrics["dpo_peft_tok_s"]
            for m in micros:
                metrics[f"dpo_mb{m}_speedup_vs_peft"] = metrics[f"dpo_mb{m}_tok_s"] / metrics["dpo_peft_tok_s"]
                metrics[f"dpo_mb{m}_peak_ratio_vs_peft"] = metrics[f"dpo_mb{m}_peak_gib"] / metrics["dpo_peft_peak_gib"]
    if "decode" not in skip:
        bw = copy_bandwidth()
        weight_bytes = 2 * (linear + cfg.vocab_size * cfg.hidden_size)
        metrics["copy_bw_gb_s"] = bw / 1e9
        ours = {}
        for B in (1, 64):
            r1 = decode_resafe(model, 1, B)
            rn = decode_resafe(model, a.new_tokens, B)
            per = (rn[0] - r1[0]) / ((rn[1] - r1[1]) / B)
            ours[B] = per
            metrics[f"decode_b{B}_tok_s"] = B / per
            metrics[f"decode_b{B}_peak_gib"] = (rn[2] or 0) / 2**30
        metrics["decode_b1_bw_fraction"] = (weight_bytes / bw) / ours[1]
        if "hf" not in skip:
            hf, hf_peak = decode_torch(model, a.new_tokens, (1, 64))
            for B in (1, 64):
                metrics[f"decode_b{B}_hf_tok_s"] = B / hf[B]
                metrics[f"decode_speedup_vs_hf_b{B}"] = hf[B] / ours[B]
            metrics["decode_hf_peak_gib"] = hf_peak / 2**30
    if a.with_qdecode:
        qdir = os.path.join(work, "model_int4")
        if not os.path.exists(os.path.join(qdir, "config.json")):
            timed([RESAFE, "quantize", "--model", model, "--method", "rtn", "--bits", "4",
                   "--group", "128", "--out", qdir])
        d1, dn = decode_resafe(model, 1, 8), decode_resafe(model, a.new_tokens, 8)
        q1, qn = decode_resafe(qdir, 1, 8), decode_resafe(qdir, a.new_tokens, 8)
        dense = (dn[0] - d1[0]) / ((dn[1] - d1[1]) / 8)
        quant = (qn[0] - q1[0]) / ((qn[1] - q1[1]) / 8)
        metrics.update(qdecode_b8_int4_vs_bf16=dense / quant)
    res["metrics"] = metrics
    res["wall_s"] = time.time() - t_start
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(res, f, indent=2)
    slug = dev.lower().replace(" ", "-")
    date = time.strftime("%Y-%m-%d")
    os.makedirs(a.results_dir, exist_ok=True)
    cmd = "scripts/bench/bench_gpu.py " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else \
        "scripts/bench/bench_gpu.py OUT"
    with open(os.path.join(a.results_dir, f"dpo_decode-{slug}-{date}.json"), "w") as f:
        json.dump({"device": dev, "date": date, "command": cmd, "metrics": metrics}, f, indent=2)
    print("| metric | value |\n|---|---|")
    for k, v in metrics.items():
        print(f"| {k} | {v:.4g} |")


if __name__ == "__main__":
    main()
