#!/usr/bin/env python3
"""ASR against bit width: `resafe train` of one run config at several [quant] formats, then the
sweep table (sweep.json, sweep.md) and the ASR-vs-bits plot (scripts/plot_report.py --sweep).

  scripts/sweep_bits.py CONFIG [--out runs/sweep-<name>] [--bits 8,4,3,2] [--set s.k=v]...

Each width is its own run directory OUT/int<b>/ (resumable like any run). Where the quantized
model answers every patch prompt as the FP model does, there is nothing to patch (the triplets
stage finds no differing pair): the sweep then evaluates fp and quantized only and records the
patched ASR as null."""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print("sweep: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--out")
    ap.add_argument("--bits", default="8,4,3,2")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--resafe", default=os.path.join("build", "resafe"))
    a = ap.parse_args()
    name = os.path.splitext(os.path.basename(a.config))[0]
    out = a.out or os.path.join("runs", f"sweep-{name}")
    os.makedirs(os.path.join(ROOT, out), exist_ok=True)
    sets = [x for s in a.sets for x in ("--set", s)]
    rows = []
    for b in [int(x) for x in a.bits.split(",")]:
        d = os.path.join(out, f"int{b}")
        base = [a.resafe, "train", "--config", a.config, *sets, "--set", f"quant.format=int{b}",
                "--set", f"run.out_dir={d}", "--set", "lora.merge_compare=none"]
        patched = run(base) == 0
        if not patched:  # nothing to patch (or a failure): fp and quantized only
            if run(base + ["--to", "quantize"]) != 0:
                raise SystemExit(f"sweep: int{b}: the quantize stage failed")
            if run([a.resafe, "eval", "--config", a.config, *sets, "--set", f"run.out_dir={d}",
                    "--model", "fp=" + cfg_value(a, "model", "path"),
                    "--model", "quantized=" + os.path.join(d, "quantize", "model"),
                    "--out", os.path.join(d, "eval"), "--report"]) != 0:
                raise SystemExit(f"sweep: int{b}: evaluation failed")
        with open(os.path.join(ROOT, d, "eval", "results.json")) as f:
            m = json.load(f)["models"]
        get = lambda n, k: m.get(n, {}).get(k)  # noqa: E731
        rows.append({"bits": b, "asr_fp": get("fp", "asr"), "asr_quantized": get("quantized", "asr"),
                     "asr_patched": get("patched_merged", "asr"),
                     "benign_fp": get("fp", "benign_accuracy"),
                     "benign_quantized": get("quantized", "benign_accuracy"),
                     "benign_patched": get("patched_merged", "benign_accuracy")})
    with open(os.path.join(ROOT, out, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| bits | ASR fp | ASR quantized | ASR patched+merged | benign fp | benign quantized | "
             "benign patched+merged |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {pct(r['asr_fp'])} | {pct(r['asr_quantized'])} | "
                     f"{pct(r['asr_patched'])} | {pct(r['benign_fp'])} | "
                     f"{pct(r['benign_quantized'])} | {pct(r['benign_patched'])} |")
    with open(os.path.join(ROOT, out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    first = os.path.join(out, f"int{rows[0]['bits']}")
    run([sys.executable, "scripts/plot_report.py", first, "--eval-dir", out,
         "--sweep", os.path.join(out, "sweep.json")])
    print(f"sweep: {out}/sweep.json, {out}/sweep.md")


def cfg_value(a, section, key):
    """A key's effective value (the config with the sweep's --set overrides)."""
    sets = [x for s in a.sets for x in ("--set", s)]
    p = subprocess.run([a.resafe, "config", "--check", a.config, *sets], cwd=ROOT,
                       capture_output=True, text=True, check=True)
    cur = None
    for line in p.stdout.splitlines():
        line = line.strip()
        if line.startswith("["):
            cur = line.strip("[]")
        elif cur == section and line.split("=")[0].strip() == key:
            return line.split("=", 1)[1].split(";")[0].strip().strip('"')
    raise SystemExit(f"sweep: no [{section}] {key} in {a.config}")


if __name__ == "__main__":
    main()
