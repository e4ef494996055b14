#!/usr/bin/env python3
"""Plots for a run's report, written next to report.md (<run>/eval/):

  asr_benign.png   ASR and benign accuracy per model state (bars), from eval.json
  attacks.png      ASR per decoding-attack setting per model, when eval.json has attacks
  dpo.png          DPO loss and reward margin per step, from <run>/dpo/metrics.jsonl
  asr_vs_bits.png  ASR against bits, from a sweep JSON: a list of
                   {"bits", "asr_fp", "asr_quantized", "asr_patched"} (rates in [0, 1])

  scripts/plot_report.py RUN_DIR [--eval-dir DIR] [--sweep SWEEP.json]
  make plots RUN=RUN_DIR

Missing inputs are skipped with a note; matplotlib missing is one clear error line (exit 1).
"""
import argparse
import json
import os
import sys

ORDER = ["fp", "quantized", "patched_merged"]


def need_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        sys.exit("plot_report: error: matplotlib is not installed "
                 "(scripts/deps.sh installs it, or: python3 -m pip install matplotlib)")


def save(fig, plt, path, written):
    """Written to a temporary name and renamed, like every resafe output."""
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    written.append(path)


def ordered(models):
    names = [n for n in ORDER if n in models] + [n for n in models if n not in ORDER]
    return names


def pct(v):
    return float("nan") if v is None else 100.0 * v


def plot_eval(plt, ev, out_dir, written):
    models = ev.get("models", {})
    names = ordered(models)
    if not names:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names)), 3.6))
    x = range(len(names))
    w = 0.38
    asr = [pct(models[n].get("asr")) for n in names]
    acc = [pct(models[n].get("benign_accuracy")) for n in names]
    ax.bar([i - w / 2 for i in x], asr, w, label="ASR (%)", color="#c0392b")
    ax.bar([i + w / 2 for i in x], acc, w, label="benign accuracy (%)", color="#2e86c1")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("%")
    ax.set_title("Safety and utility per model state")
    ax.legend(frameon=False, loc="upper center", ncol=2)
    fig.tight_layout()
    save(fig, plt, os.path.join(out_dir, "asr_benign.png"), written)
    with_attacks = [n for n in names if isinstance(models[n].get("attacks"), dict)]
    if not with_attacks:
        return
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for n in with_attacks:
        st = models[n]["attacks"]["settings"]
        labels = [f"T{s['temperature']:g}" + (f" k{s['top_k']}" if s["top_k"] else "")
                  + (f" p{s['top_p']:g}" if s["top_p"] < 1 else "") for s in st]
        ax.plot(labels, [pct(s["asr"]) for s in st], marker="o", label=n)
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Decoding attacks")
    ax.legend(frameon=False)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    save(fig, plt, os.path.join(out_dir, "attacks.png"), written)


def plot_dpo(plt, metrics_path, out_dir, written):
    rows = []
    with open(metrics_path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    rows = [r for r in rows if isinstance(r, dict) and "step" in r]
    if not rows:
        print(f"plot_report: {metrics_path} holds no metrics: dpo.png skipped")
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(steps, [r.get("loss") for r in rows], color="#34495e")
    ax[0].set_title("DPO loss")
    ax[0].set_xlabel("step")
    ax[1].plot(steps, [r.get("margin") for r in rows], color="#27ae60")
    ax[1].set_title("reward margin")
    ax[1].set_xlabel("step")
    fig.tight_layout()
    save(fig, plt, os.path.join(out_dir, "dpo.png"), written)


def plot_sweep(plt, sweep, out_dir, written):
    pts = sorted(sweep, key=lambda p: p["bits"])
    bits = [p["bits"] for p in pts]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for key, label, color in [("asr_fp", "full precision", "#7f8c8d"),
                              ("asr_quantized", "quantized", "#c0392b"),
                              ("asr_patched", "patched", "#27ae60")]:
        ys = [pct(p.get(key)) for p in pts]
        ax.plot(bits, ys, marker="o", label=label, color=color)
    ax.set_xlabel("bits")
    ax.set_ylabel("ASR (%)")
    ax.set_xticks(bits)
    ax.invert_xaxis()
    ax.set_title("ASR against quantization bits")
    ax.legend(frameon=False)
    fig.tight_layout()
    save(fig, plt, os.path.join(out_dir, "asr_vs_bits.png"), written)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--eval-dir", help="where eval.json is and the PNGs go (default RUN/eval)")
    ap.add_argument("--sweep", help="sweep JSON: [{bits, asr_fp, asr_quantized, asr_patched}]")
    args = ap.parse_args()
    plt = need_matplotlib()
    out_dir = args.eval_dir or os.path.join(args.run_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    ev_path = os.path.join(out_dir, "eval.json")
    if os.path.exists(ev_path):
        with open(ev_path) as f:
            plot_eval(plt, json.load(f), out_dir, written)
    else:
        print(f"plot_report: no {ev_path}: model plots skipped")
    metrics = os.path.join(args.run_dir, "dpo", "metrics.jsonl")
    if os.path.exists(metrics):
        plot_dpo(plt, metrics, out_dir, written)
    else:
        print(f"plot_report: no {metrics}: dpo.png skipped")
    if args.sweep:
        with open(args.sweep) as f:
            sweep = json.load(f)
        if not isinstance(sweep, list) or not all(isinstance(p, dict) and "bits" in p for p in sweep):
            sys.exit(f"plot_report: error: {args.sweep}: expected a list of objects with 'bits'")
        plot_sweep(plt, sweep, out_dir, written)
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
