#!/usr/bin/env python3
"""Where the time of a DPO step and of a decode step goes, op by op (RESAFE_CUDA_PROFILE=1: every
backend op waits for the GPU before and after itself, so the per-op times add up; the run is
slower than an unprofiled one, which is what scripts/bench/bench_gpu.py times).

  scripts/bench/profile_gpu.py OUT_DIR [--hidden 4096 --layers 8 --inter 11008
                                        --rank 128 --pairs 4 --seq 512 --decode-batch 1,64]

Builds a random Llama of the given shape (bench_gpu.make_model: head_dim 128) (default: Llama-2-7B's layer shape, 8 layers), runs
`resafe dpo` for 2 steps and `resafe generate` at each decode batch, and prints each run's
profile table (also written to OUT_DIR/profile.txt)."""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))
import bench_gpu  # noqa: E402  (make_model, dpo_ini)
RESAFE = os.path.join(ROOT, os.environ.get("RESAFE_BUILD", "build"), "resafe")


def run(cmd, log, env_extra):
    env = dict(os.environ, **env_extra)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n" + p.stderr + "\n")
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    tail = p.stderr[p.stderr.find("cuda profile:"):] if "cuda profile:" in p.stderr else p.stderr
    print("$ " + " ".join(cmd[:3]) + " ...\n" + tail, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--decode-batch", default="1,64")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model = os.path.join(a.out, "model")
    log = os.path.join(a.out, "profile.txt")
    if not os.path.exists(os.path.join(model, "config.json")):
        bench_gpu.make_model(model, a)
    # about 4 tokens a word with the test tokenizer: ~128 prompt tokens, responses cut at seq
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "blue", "map"]
    pairs = os.path.join(a.out, "pairs.jsonl")
    with open(pairs, "w") as f:
        for i in range(a.pairs * (a.steps + 1)):
            def text(n, s):
                return " ".join(words[(i * 7 + j * s) % len(words)] for j in range(n))
            f.write(json.dumps({"prompt": text(a.seq // 16, 3), "chosen": text(a.seq // 3, 1),
                                "rejected": text(a.seq // 3, 7)}) + "\n")
    cfg = bench_gpu.dpo_ini(os.path.join(a.out, "dpo.ini"), model, pairs, a.pairs, a.steps,
                            a.seq, a.rank, a.recompute, f"{a.out}/run")
    prof = {"RESAFE_CUDA_PROFILE": "1", "RESAFE_CUDA_MEMSTATS": "1"}
    run([RESAFE, "dpo", "--config", cfg, "--force", "-v"], log, prof)
    for b in [int(x) for x in a.decode_batch.split(",") if x]:
        ids = ";".join(",".join(str(3 + (7 * i + 13 * j) % 300) for j in range(32))
                       for i in range(b))
        run([RESAFE, "generate", "--model", model, "--backend", "cuda", "--ids", ids,
             "--max-new-tokens", "64", "--batch-size", str(b), "--format", "jsonl", "-v"], log,
            prof)


if __name__ == "__main__":
    main()
