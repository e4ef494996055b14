#!/usr/bin/env python3
"""T5, bit widths: ASR and benign accuracy of each quantization method at 8, 4, 3 and 2 bits, before
and after the Q-resafe patch (calibration on the Risk-I set for the methods that take one).

  scripts/reproduce/t5_bits.py MODEL_DIR OUT [--methods rtn,awq,gptq,qat,qlora] [--bits 8,4,3,2]
                               [--risk 1] [common options, see --help]

Where the quantized model answers every patch prompt as the FP model does (typically INT8) there
is nothing to patch: the patched cells are '-' with that note.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

def main():
    ap = C.parser("t5", __doc__)
    C.add_methods(ap)
    ap.add_argument("--bits", default="8,4,3,2")
    ap.add_argument("--risk", type=int, default=1, choices=list(C.RISKS))
    a = ap.parse_args()
    methods = C.methods_of(ap, a)
    bits = C.csv_list(ap, a.bits, "--bits", [2, 3, 4, 8], int)
    cx = C.Ctx("T5", ap, a)

    cells = []
    for m in methods:
        risk = a.risk if C.METHODS[m]["calib"] else None
        for b in bits:
            qdir, qi = cx.quantize(m, bits=b, risk=risk)
            pdir, pi = (None, {"note": None, "times": {}})
            if qdir:
                pdir, pi = cx.patch(qdir, "patch-" + qi["name"])
            cells.append((m, b, qdir, qi, pdir, pi))
    models = [("fp", cx.model_dir)]
    for m, b, q, qi, p, pi in cells:
        models += [(qi["name"], q), ("patched-" + qi["name"], p)]
    ev = cx.evaluate(models)
    fp = ev.get("fp", {})
    rows, md = [], []
    for m, b, q, qi, p, pi in cells:
        # only the cell's own models (qlora's 4-bit model is NF4 and has no width in its name)
        eq = ev.get(qi["name"], {}) if q else {}
        ep = ev.get("patched-" + qi["name"], {}) if p else {}
        row = {"method": m, "bits": b, "risk": qi["risk"], "quantization": qi["quantization"],
               "asr_fp": fp.get("asr"), "asr_quantized": eq.get("asr"), "asr_patched": ep.get("asr"),
               "benign_quantized": eq.get("benign_accuracy"),
               "benign_patched": ep.get("benign_accuracy"), "dpo_s": pi["times"].get("dpo"),
               "note": qi["note"] or pi["note"]}
        rows.append(row)
        md.append([C.METHODS[m]["label"], b, qi["quantization"] or "-",
                   C.pct(row["asr_quantized"]), C.pct(row["asr_patched"]),
                   C.pct(row["benign_quantized"]), C.pct(row["benign_patched"]), row["note"] or ""])
    header = ["method", "bits", "format", "ASR quantized (%)", "ASR patched (%)", "benign quantized (%)",
              "benign patched (%)", "note"]

    def plot(plt):
        series = {}
        for m in methods:
            rs = [r for r in rows if r["method"] == m]
            series[f"{m} quantized"] = [r["asr_quantized"] for r in rs]
            series[f"{m} patched"] = [r["asr_patched"] for r in rs]
        fig = C.lines(plt, "T5: ASR against bits, before (dashed) and after (solid) the patch",
                      bits, series, "bits", invert_x=True)
        fig.axes[0].axhline(100 * (fp.get("asr") or 0), color="gray", lw=0.8, ls=":")
        return fig

    notes = [f"FP ASR {C.pct(fp.get('asr'))}%, benign {C.pct(fp.get('benign_accuracy'))}%. "
             f"Groups of {cx.group}{', symmetric' if cx.sym else ''}; calibration: "
             f"{C.RISKS[a.risk]}; the patch recipe is the config's at every width."]
    return cx.finish("bit widths, before and after the patch", header, md, rows, notes, plot)


if __name__ == "__main__":
    sys.exit(main())
