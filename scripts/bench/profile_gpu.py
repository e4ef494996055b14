#!/usr/bin/env python3
"""Where the time of a DPO step and of a decode step goes, op by op (RESAFE_CUDA_PROFILE=1: every
backend op waits for the GPU before and after itself, so the per-op times add up; the run is
slower than an unprofiled one, which is what scripts/bench/bench_gpu.py times).

  scripts/bench/profile_gpu.py OUT_DIR [--hidden 4096 --layers 8 --inter 11008
                                        --rank 128 --pairs 4 --seq 512 --steps 2 --more 2
                                        --decode-batch 1,64]

Builds a random Llama of the given shape (bench_gpu.make_model: head_dim 128) (default: Llama-2-7B's layer shape, 8 layers), runs
`resafe dpo` for --steps and again for --steps + --more steps, `resafe generate` at each decode
batch, and prints each run's profile table (also written to OUT_DIR/profile.txt), then the
steady-state DPO step: the two DPO runs' per-op times subtracted and divided by --more (loading,
the first calls' set-up, the reference pass and the final save cancel)."""
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


def table(stderr):
    """{op: (ms, calls)} of a `cuda profile:` table."""
    out = {}
    if "cuda profile:" not in stderr:
        return out
    for line in stderr[stderr.find("cuda profile:"):].splitlines()[2:]:
        f = line.split()
        if len(f) != 5:
            break
        try:
            out[f[0]] = (float(f[1]), int(f[2]))
        except ValueError:
            break
    return out


def steady(t1, t2, more):
    """Per-step ms and calls of each op between two runs that differ by `more` steps."""
    rows = []
    for op in sorted(set(t1) | set(t2)):
        ms = (t2.get(op, (0.0, 0))[0] - t1.get(op, (0.0, 0))[0]) / more
        calls = (t2.get(op, (0.0, 0))[1] - t1.get(op, (0.0, 0))[1]) / more
        if calls > 0 or abs(ms) >= 0.05:
            rows.append((op, ms, calls))
    rows.sort(key=lambda r: -r[1])
    total = sum(max(r[1], 0.0) for r in rows)
    lines = [f"steady-state DPO step ({more} extra steps): {total:.1f} ms in ops",
             f"  {'op':<20} {'ms/step':>9} {'calls':>7} {'%':>6}"]
    for op, ms, calls in rows:
        lines.append(f"  {op:<20} {ms:9.2f} {calls:7.1f} {100 * ms / total if total else 0:6.1f}")
    return "\n".join(lines)


def run(cmd, log, env_extra):
    env = dict(os.environ, **env_extra)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n" + p.stderr + "\n")
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    tail = p.stderr[p.stderr.find("cuda profile:"):] if "cuda profile:" in p.stderr else p.stderr
    print("$ " + " ".join(cmd[:3]) + " ...\n" + tail, flush=True)
    return table(p.stderr)


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
    ap.add_argument("--more", type=int, default=2, help="the second DPO run's extra steps")
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
        for i in range(a.pairs * (a.steps + a.more + 1)):
            def text(n, s):
                return " ".join(words[(i * 7 + j * s) % len(words)] for j in range(n))
            f.write(json.dumps({"prompt": text(a.seq // 16, 3), "chosen": text(a.seq // 3, 1),
                                "rejected": text(a.seq // 3, 7)}) + "\n")
    if a.steps < 2 or a.more < 1:
        raise SystemExit("profile_gpu.py: --steps must be >= 2 and --more >= 1")
    prof = {"RESAFE_CUDA_PROFILE": "1", "RESAFE_CUDA_MEMSTATS": "1"}
    # the pairs file above holds enough pairs for the longer run
    tabs = []
    for steps in (a.steps, a.steps + a.more):
        cfg = bench_gpu.dpo_ini(os.path.join(a.out, f"dpo_{steps}.ini"), model, pairs, a.pairs,
                                steps, a.seq, a.rank, a.recompute, f"{a.out}/run_{steps}")
        tabs.append(run([RESAFE, "dpo", "--config", cfg, "--force", "-v"], log, prof))
    text = steady(tabs[0], tabs[1], a.more)
    print(text, flush=True)
    with open(log, "a") as f:
        f.write(text + "\n")
    for b in [int(x) for x in a.decode_batch.split(",") if x]:
        ids = ";".join(",".join(str(3 + (7 * i + 13 * j) % 300) for j in range(32))
                       for i in range(b))
        run([RESAFE, "generate", "--model", model, "--backend", "cuda", "--ids", ids,
             "--max-new-tokens", "64", "--batch-size", str(b), "--format", "jsonl", "-v"], log,
            prof)


if __name__ == "__main__":
    main()
