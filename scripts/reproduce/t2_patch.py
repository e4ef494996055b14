#!/usr/bin/env python3
"""T2, the Q-resafe patch per quantization method and calibration risk level: ASR and benign
accuracy of each quantized model before and after the patch (masked-LoRA DPO on the FP-winner /
quantized-loser patch set, merged with the config's [lora] merge), at the config's bit width.

  scripts/reproduce/t2_patch.py MODEL_DIR OUT [--methods rtn,awq,gptq,qat,qlora] [--risks 1,2,3]
                                [common options, see --help]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

def main():
    ap = C.parser("t2", __doc__)
    C.add_methods(ap)
    ap.add_argument("--risks", default="1,2,3")
    a = ap.parse_args()
    methods = C.methods_of(ap, a)
    risks = C.csv_list(ap, a.risks, "--risks", list(C.RISKS), int)
    cx = C.Ctx("T2", ap, a)

    cells = []
    for m in methods:
        for r in (risks if C.METHODS[m]["calib"] else [None]):
            qdir, qi = cx.quantize(m, risk=r)
            pdir, pi = (None, {"note": None, "times": {}})
            if qdir:
                pdir, pi = cx.patch(qdir, "patch-" + qi["name"])
            cells.append((m, r, qdir, qi, pdir, pi))
    models = [("fp", cx.model_dir)]
    for m, r, q, qi, p, pi in cells:
        models += [(qi["name"], q), ("patched-" + qi["name"], p)]
    ev = cx.evaluate(models)

    fp = ev.get("fp", {})
    rows, md = [], [["FP (reference)", "-", "fp", C.pct(fp.get("asr")), "",
                     C.pct(fp.get("benign_accuracy")), "", "", ""]]
    for m, r, q, qi, p, pi in cells:
        eq = ev.get(qi["name"], {}) if q else {}
        ep = ev.get("patched-" + qi["name"], {}) if p else {}
        row = {"method": m, "risk": r, "bits": cx.bits, "quantization": qi["quantization"],
               "asr_quantized": eq.get("asr"), "asr_patched": ep.get("asr"),
               "benign_quantized": eq.get("benign_accuracy"),
               "benign_patched": ep.get("benign_accuracy"),
               "over_refusal_patched": ep.get("over_refusal"),
               "triplets_s": pi["times"].get("triplets"), "dpo_s": pi["times"].get("dpo"),
               "note": qi["note"] or pi["note"]}
        rows.append(row)
        md.append([C.METHODS[m]["label"], C.RISKS[r] if r else "none", qi["quantization"] or "-",
                   C.pct(row["asr_quantized"]), C.pct(row["asr_patched"]),
                   C.pct(row["benign_quantized"]), C.pct(row["benign_patched"]),
                   C.secs(row["dpo_s"]), row["note"] or ""])
    header = ["method", "calibration", "format", "ASR quantized (%)", "ASR patched (%)",
              "benign quantized (%)", "benign patched (%)", "patch (dpo) s", "note"]

    def plot(plt):
        labels = [f"{r['method']} {'R' + 'I' * r['risk'] if r['risk'] else ''}".strip() for r in rows]
        return C.bars(plt, f"T2: Q-resafe at INT{cx.bits}: ASR before and after the patch", labels,
                      {"ASR quantized": [r["asr_quantized"] for r in rows],
                       "ASR patched": [r["asr_patched"] for r in rows],
                       "benign patched": [r["benign_patched"] for r in rows]})

    notes = [f"INT{cx.bits} g{cx.group}{' symmetric' if cx.sym else ''}; patch = the config's "
             "DPO/SNIP/LoRA recipe (`resafe train --to merge` with `[quant] model` = the "
             "quantized model); patch (dpo) s = the dpo stage's time on the device below."]
    return cx.finish(f"Q-resafe patch per method and risk level (INT{cx.bits})", header, md, rows,
                     notes, plot)


if __name__ == "__main__":
    sys.exit(main())
