#!/usr/bin/env python3
"""Causal attention forward and backward on the GPU: our kernels (each RESAFE_CUDA_ATTENTION
mode, through build/tools/qmm_tool attn) against PyTorch's scaled_dot_product_attention (its
flash backend on Hopper) on the same shapes, measured in the same run.

  scripts/bench/attention.py [--shapes B,T,H,HKV,D;...]   (default: the 7B DPO step's
                                                           8,512,32,32,128 and 1,2048,32,8,128)

Prints one row per shape and implementation: microseconds per call and TFLOP/s (causal FLOPs:
forward 4 B H T(T+1)/2 D, backward 2.5x that), and writes
RESULTS_DIR/attention-<device>-<date>.json (metrics "<impl>_<B>_<T>_<H>_<HKV>_<D>_fwd_us" and
"..._bwd_us")."""
import argparse
import json
import os
import subprocess

import torch
import torch.nn.functional as F

import results_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, os.environ.get("RESAFE_BUILD", "build"), "tools", "qmm_tool")


def sdpa_times(B, T, H, Hkv, D):
    g = torch.Generator(device="cuda").manual_seed(3)
    mk = lambda h: torch.randn(B, h, T, D, generator=g, device="cuda",  # noqa: E731
                               dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(H), mk(Hkv), mk(Hkv)
    if Hkv != H:  # sdpa's enable_gqa where it exists, else expanded K/V (counted in the time)
        kw = {"enable_gqa": True}
    else:
        kw = {}
    dout = torch.randn(B, H, T, D, generator=g, device="cuda", dtype=torch.bfloat16)

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)

    def timed(fn, n=10):
        fn()
        torch.cuda.synchronize()
        best = 1e30
        for _ in range(2):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(n):
                fn()
            b.record()
            torch.cuda.synchronize()
            best = min(best, a.elapsed_time(b) * 1e3 / n)
        return best

    with torch.no_grad():
        f_us = timed(fwd)
    both = timed(lambda: torch.autograd.grad(fwd(), (q, k, v), dout))
    return f_us, both - f_us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8,512,32,32,128;1,2048,32,8,128")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "scripts", "bench", "results"))
    a = ap.parse_args()
    metrics = {}
    print(f"{'shape B,T,H,Hkv,D':<22} {'impl':<8} {'fwd us':>9} {'bwd us':>9} "
          f"{'fwd TF/s':>9} {'bwd TF/s':>9}   ({torch.cuda.get_device_name()})")
    for sh in a.shapes.split(";"):
        B, T, H, Hkv, D = map(int, sh.split(","))
        flops = 4.0 * B * H * T * (T + 1) / 2 * D
        p = subprocess.run([TOOL, "attn", str(B), str(T), str(H), str(Hkv), str(D)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"qmm_tool attn failed ({p.returncode}): {p.stderr[-2000:]}")
        rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
        f_us, b_us = sdpa_times(B, T, H, Hkv, D)
        rows.append({"mode": "sdpa", "fwd_us": f_us, "bwd_us": b_us,
                     "fwd_tflops": flops / f_us / 1e6, "bwd_tflops": 2.5 * flops / b_us / 1e6})
        for r in rows:
            print(f"{sh:<22} {r['mode']:<8} {r['fwd_us']:9.1f} {r['bwd_us']:9.1f} "
                  f"{r['fwd_tflops']:9.1f} {r['bwd_tflops']:9.1f}", flush=True)
            tag = f"{r['mode']}_{sh.replace(',', '_')}"
            metrics[f"{tag}_fwd_us"], metrics[f"{tag}_bwd_us"] = r["fwd_us"], r["bwd_us"]
    path = results_file.write(a.results_dir, "attention", torch.cuda.get_device_name(),
                              "scripts/bench/attention.py --shapes '" + a.shapes + "'", metrics)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
