#!/usr/bin/env python3
"""GPU benchmarks of resafe against the PyTorch stack, in one run on one GPU (ratios, not lone
times). Needs a built build/resafe with the CUDA backend, torch, transformers and peft.

  scripts/bench/bench_gpu.py OUT_DIR [--hidden 2048 --layers 16 --inter 5632 --vocab 32000]

1. DPO step: masked-LoRA DPO as `resafe dpo` runs it (bf16 weights, fp32 adapter, rank 16 on
   every projection, no SNIP mask, batch 8 pairs of ~256+256 tokens) versus PyTorch + PEFT doing
   the same DPO step (bf16 model, fp32 LoRA, AdamW). resafe's per-step time is the difference of
   two runs (max_steps 13 and 3) divided by 10, which removes loading and the reference pass.
2. Decode: greedy generation of 128 new tokens for 8 prompts of 32 tokens, `resafe generate`
   versus transformers `generate` (bf16, KV cache); per-token time from runs of 128 and 1 new
   tokens (difference), so loading and prefill cancel.
3. Quantized decode: the same decode on the model's RTN INT4 g128 copy (`resafe quantize`), whose
   linears go through the CUDA backend's dequantize-into-scratch path, versus resafe's own bf16
   decode (the baseline the fused dequant-matmul kernels must beat).
Peak GPU memory: torch.cuda.max_memory_allocated for PyTorch; for resafe the largest
nvidia-smi "memory.used" sampled every 50 ms minus the idle value (coarser: it includes the CUDA
context). Writes OUT_DIR/bench.json and prints a Markdown table."""
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


def make_model(d, a):
    import torch
    import make_test_model as mtm
    from transformers import LlamaConfig, LlamaForCausalLM
    os.makedirs(d, exist_ok=True)
    tok = mtm.make_tokenizer(384)
    mtm.write_tokenizer(tok, d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 128,
                      num_key_value_heads=a.hidden // 128, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      torch_dtype="bfloat16")
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(d, safe_serialization=True)
    return sum(p.numel() for p in m.parameters())


def make_pairs(path, n, words, seed):
    import random
    r = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "blue", "map"]
    def text(k):
        return " ".join(r.choice(vocab) for _ in range(k))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(words), "chosen": text(words),
                                "rejected": text(words)}) + "\n")


def resafe_dpo_step(model, pairs, work, steps, a):
    cfg = os.path.join(work, f"dpo_{steps}.ini")
    with open(cfg, "w") as f:
        f.write(f"""[model]
path = {model}
backend = cuda
chat_template = none
[dpo]
data_file = {pairs}
batch_size = {a.batch}
max_steps = {steps}
max_seq_len = {a.seq}
lr = 1e-5
[snip]
mask = none
[lora]
rank = {a.rank}
alpha = {2 * a.rank}
[run]
out_dir = {work}/run_{steps}
checkpoint_every = 0
""")
    with MemPoll() as mp:
        dt, _ = timed([RESAFE, "dpo", "--config", cfg, "--force"])
    return dt, (mp.peak - mp.idle) * 2**20


def torch_dpo_step(model_dir, pairs, a, steps=10, warm=3):
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    rows = [json.loads(l) for l in open(pairs)]
    def enc(p, r):
        pi, ri = tok(p)["input_ids"], tok(r)["input_ids"] + [2]
        ids = (pi + ri)[:a.seq]
        return ids, len(pi)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda()
    model.config.use_cache = False
    lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

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

    ref = []
    with torch.no_grad(), model.disable_adapter():
        for i in range(steps + warm):
            ref.append(logps(*batch(i % (len(rows) // a.batch))))
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + warm):
        if i == warm:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        b = batch(i % (len(rows) // a.batch))
        lp = logps(*b)
        z = (lp[0::2] - ref[i][0::2]) - (lp[1::2] - ref[i][1::2])
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


def decode_resafe(model, n_new, a):
    """(seconds inside rs_generate, as `resafe generate -v` reports it: loading excluded; new
    tokens over all prompts; peak GPU bytes)."""
    import re
    ids = ";".join(",".join(str(3 + (7 * i + 13 * j) % 300) for j in range(32)) for i in range(8))
    with MemPoll() as mp:
        _, p = timed([RESAFE, "generate", "--model", model, "--backend", "cuda", "--ids", ids,
                      "--max-new-tokens", str(n_new), "--batch-size", "8", "--format", "jsonl",
                      "-v"])
    m = re.search(r"generate: \d+ prompts, (\d+) new tokens in ([0-9.]+) s", p.stderr)
    if not m:
        raise SystemExit("resafe generate -v printed no timing line:\n" + p.stderr[-2000:])
    return float(m.group(2)), int(m.group(1)), (mp.peak - mp.idle) * 2**20


def decode_torch(model_dir, n_new):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda()
    ids = torch.tensor([[3 + (7 * i + 13 * j) % 300 for j in range(32)] for i in range(8)]).cuda()
    res = {}
    for n in (1, n_new):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        res[n] = (time.perf_counter() - t0, out.shape[1] - 32)
    del model
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma list: dpo,decode,qdecode")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(a.out, "work")
    model = os.path.join(work, "model")
    n_params = make_model(model, a)
    import torch
    dev = torch.cuda.get_device_name(0)
    res = {"device": dev, "params": n_params, "hidden": a.hidden, "layers": a.layers,
           "batch_pairs": a.batch, "seq": a.seq, "rank": a.rank}
    if "dpo" not in a.skip:
        pairs = os.path.join(work, "pairs.jsonl")
        make_pairs(pairs, a.batch * 16, 100, 0)
        t3, _ = resafe_dpo_step(model, pairs, work, 3, a)
        t13, mem = resafe_dpo_step(model, pairs, work, 13, a)
        rs_step = (t13 - t3) / 10
        pt_step, pt_mem = torch_dpo_step(model, pairs, a)
        res["dpo"] = {"resafe_s_per_step": rs_step, "torch_peft_s_per_step": pt_step,
                      "speedup": pt_step / rs_step, "resafe_peak_bytes": mem,
                      "torch_peak_bytes": pt_mem}
    if "decode" not in a.skip:
        r1 = decode_resafe(model, 1, a)
        r128 = decode_resafe(model, 128, a)
        rs_tok = (r128[0] - r1[0]) / max(1, (r128[1] - r1[1]) / 8)
        tr = decode_torch(model, 128)
        pt_tok = (tr[128][0] - tr[1][0]) / max(1, tr[128][1] - tr[1][1])
        res["decode"] = {"resafe_s_per_token": rs_tok, "torch_s_per_token": pt_tok,
                         "speedup": pt_tok / rs_tok, "resafe_tokens": r128[1],
                         "resafe_peak_bytes": r128[2]}
    if "qdecode" not in a.skip:
        qdir = os.path.join(work, "model_int4")
        timed([RESAFE, "quantize", "--model", model, "--method", "rtn", "--bits", "4", "--group",
               "128", "--out", qdir])
        d1, d128 = decode_resafe(model, 1, a), decode_resafe(model, 128, a)
        q1, q128 = decode_resafe(qdir, 1, a), decode_resafe(qdir, 128, a)
        dense = (d128[0] - d1[0]) / max(1, (d128[1] - d1[1]) / 8)
        quant = (q128[0] - q1[0]) / max(1, (q128[1] - q1[1]) / 8)
        res["qdecode"] = {"int4_s_per_token": quant, "bf16_s_per_token": dense,
                          "speedup": dense / quant, "int4_peak_bytes": q128[2],
                          "bf16_peak_bytes": d128[2]}
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
