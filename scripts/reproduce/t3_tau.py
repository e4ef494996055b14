#!/usr/bin/env python3
"""T3, the tau ablation: ASR and benign accuracy after the Q-resafe patch for each SNIP fraction
tau of trainable (safety-critical) weight entries, with the patch's time (the dpo stage) on the
device. One quantized model and one patch set (built once, hard-linked into every tau's run); the
config's tau is the run T2 makes for the same method.

  scripts/reproduce/t3_tau.py MODEL_DIR OUT [--taus 0,0.2,0.4,0.6,0.8,1.0] [--method rtn]
                              [--risk 1] [common options, see --help]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

INT_METHODS = ["rtn", "awq", "gptq", "qat", "qlora"]


def main():
    ap = C.parser("t3", __doc__)
    ap.add_argument("--taus", default="0,0.2,0.4,0.6,0.8,1.0")
    ap.add_argument("--method", default="rtn", choices=INT_METHODS)
    ap.add_argument("--risk", type=int, default=1, choices=list(C.RISKS),
                    help="calibration set of a method that takes one (default 1)")
    a = ap.parse_args()
    taus = C.csv_list(ap, a.taus, "--taus", None, C.fraction)
    cx = C.Ctx("T3", ap, a)
    risk = a.risk if C.METHODS[a.method]["calib"] else None

    cfg_tau = float(cx.cfg["snip"]["tau"])
    qdir, qi = cx.quantize(a.method, risk=risk)
    runs = []
    if qdir:
        base = "patch-" + qi["name"]
        base_dir, base_info = cx.patch(qdir, base)  # the config's tau: T2's run
        base_run = base_info["run"]
        for t in taus:
            if abs(t - cfg_tau) < 1e-12:
                runs.append((t, base_dir, base_info))
            else:
                p, pi = cx.patch(qdir, f"{base}-tau{t:g}", [f"snip.tau={t:g}"],
                                 share_triplets_from=base_run)
                runs.append((t, p, pi))
    ev = cx.evaluate([("fp", cx.model_dir), (qi["name"], qdir)] +
                     [(f"patched-{qi['name']}" + ("" if abs(t - cfg_tau) < 1e-12 else f"-tau{t:g}"), p)
                      for t, p, _ in runs])
    eq = ev.get(qi["name"], {})
    rows, md = [], []
    for t, p, pi in runs:
        e = ev.get(f"patched-{qi['name']}" + ("" if abs(t - cfg_tau) < 1e-12 else f"-tau{t:g}"), {})
        row = {"tau": t, "asr_quantized": eq.get("asr"), "asr_patched": e.get("asr"),
               "benign_patched": e.get("benign_accuracy"),
               "over_refusal_patched": e.get("over_refusal"),
               "dpo_s": pi["times"].get("dpo"), "triplets_s": pi["times"].get("triplets"),
               "kept_fraction": pi.get("kept_fraction"), "note": pi["note"]}
        rows.append(row)
        md.append([f"{t:g}" + (" (config)" if abs(t - cfg_tau) < 1e-12 else ""),
                   C.pct(row["asr_patched"]), C.pct(row["benign_patched"]),
                   C.pct(row["over_refusal_patched"]), C.secs(row["dpo_s"]), row["note"] or ""])
    if not qdir:
        cx.failed.append(f"quantize {qi['name']}: {qi['note']}")
    header = ["tau", "ASR patched (%)", "benign patched (%)", "over-refusal (%)",
              "patch time (dpo stage, s)", "note"]
    device = cx.device()

    def plot(plt):
        fig = C.lines(plt, f"T3: ASR after the patch against tau ({qi['name']})",
                      [r["tau"] for r in rows],
                      {"ASR patched": [r["asr_patched"] for r in rows],
                       "benign patched": [r["benign_patched"] for r in rows],
                       "ASR quantized (before)": [r["asr_quantized"] for r in rows]}, "tau")
        ax2 = fig.axes[0].twinx()
        ax2.bar([r["tau"] for r in rows], [r["dpo_s"] or 0 for r in rows], width=0.05, alpha=0.25,
                color="gray")
        ax2.set_ylabel(f"patch time (s, {device})", fontsize=7)
        return fig

    notes = [f"Quantized model: {qi['name']} (ASR {C.pct(eq.get('asr'))}%, benign "
             f"{C.pct(eq.get('benign_accuracy'))}%); FP ASR {C.pct(ev.get('fp', {}).get('asr'))}%. "
             "Patch time: the dpo stage (SNIP scores, masks, training; model loading included) "
             "when it last ran, on the device named below."]
    return cx.finish("tau ablation with the patch's time", header, md, rows, notes, plot)


if __name__ == "__main__":
    sys.exit(main())
