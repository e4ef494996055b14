#!/usr/bin/env python3
"""The LoRA GEMMs of the 7B-shape DPO step (4,096 tokens, r 128) timed one by one with PyTorch's
cuBLAS on the device, against the same work batched across the projections that share an input
(q/k/v: x [A_q; A_k; A_v]^T as one GEMM, and gate/up), and against the frozen linear of the same
projection: what batching the rank-128 GEMMs can buy before writing it into kernels/lora.cu.

  scripts/bench/lora_gemm.py [--tokens 4096] [--rank 128] [--hidden 4096] [--inter 11008]

Prints one line per GEMM: microseconds (the median of 50 event-timed calls) and TFLOP/s, and
writes RESULTS_DIR/lora_gemm-<device>-<date>.json (metrics: microseconds by GEMM name)."""
import argparse
import os

import torch

import results_file


def timed(fn, reps=50):
    for _ in range(5):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) for a, b in ev)
    return t[len(t) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--results-dir", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args()
    n, r, D, F = a.tokens, a.rank, a.hidden, a.inter
    bf = dict(device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)

    def rnd(*s):
        return torch.randn(*s, generator=g, **bf)

    rows = []

    def row(name, flops, fn):
        us = timed(fn)
        rows.append((name, us, flops / us / 1e6))

    x, xf = rnd(n, D), rnd(n, F)
    for (k, m, tag) in [(D, D, "q"), (D, F, "gate"), (F, D, "down")]:
        xin = x if k == D else xf
        A, B, W = rnd(r, k), rnd(m, r), rnd(m, k)
        y, xa, dy = rnd(n, m), rnd(n, r), rnd(n, m)
        row(f"{tag}: frozen y = x W^T", 2 * n * k * m, lambda: torch.mm(xin, W.t()))
        try:
            torch.mm(xin[:8], A.t(), out_dtype=torch.float32)
            row(f"{tag}: xa = x A^T (fp32 out)", 2 * n * k * r,
                lambda: torch.mm(xin, A.t(), out_dtype=torch.float32))
        except TypeError:
            pass
        row(f"{tag}: xa = x A^T (bf16 out)", 2 * n * k * r, lambda: torch.mm(xin, A.t()))
        row(f"{tag}: y += xa B^T", 2 * n * r * m, lambda: y.addmm_(xa, B.t()))
        row(f"{tag}: y = xa B^T (no accumulate)", 2 * n * r * m, lambda: torch.mm(xa, B.t()))
        row(f"{tag}: dyB = dy B", 2 * n * m * r, lambda: torch.mm(dy, B))
        row(f"{tag}: dx += dyB A", 2 * n * r * k, lambda: xin.addmm_(xa, A))
        row(f"{tag}: dA = dyB^T x", 2 * n * r * k, lambda: torch.mm(xa.t(), xin))
        row(f"{tag}: dB = dy^T xa", 2 * n * r * m, lambda: torch.mm(dy.t(), xa))
    for cnt, tag in [(3, "qkv"), (2, "gate+up")]:
        A3 = rnd(cnt * r, D)
        xa3 = rnd(n, cnt * r)
        row(f"{tag}: x [A..]^T one GEMM", 2 * n * D * r * cnt, lambda: torch.mm(x, A3.t()))
        row(f"{tag}: dx += [dyB..] [A..] one GEMM", 2 * n * D * r * cnt,
            lambda: x.addmm_(xa3, A3))
        row(f"{tag}: [dA..] = [dyB..]^T x one GEMM", 2 * n * D * r * cnt,
            lambda: torch.mm(xa3.t(), x))
    w = max(len(r[0]) for r in rows)
    print(f"{'GEMM':<{w}}  {'us':>9}  {'TFLOP/s':>8}   "
          f"(n {n}, r {r}, {torch.cuda.get_device_name()})")
    for name, us, tf in rows:
        print(f"{name:<{w}}  {us:9.1f}  {tf:8.1f}")
    path = results_file.write(a.results_dir, "lora_gemm", torch.cuda.get_device_name(),
                              f"scripts/bench/lora_gemm.py --tokens {n} --rank {r}",
                              {name + " us": round(us, 1) for name, us, _ in rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
