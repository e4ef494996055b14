#!/usr/bin/env python3
"""T7, LLM.int8, NF4 and FP4: ASR and benign accuracy before and after the Q-resafe patch for the
three bitsandbytes-style formats (`resafe quantize --method int8|nf4|fp4`: per-row int8 with fp16
outlier columns; NormalFloat4 / FP4 codebooks in absmax blocks of 64).

  scripts/reproduce/t7_formats.py MODEL_DIR OUT [--formats int8,nf4,fp4] [common options, see --help]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

ALL = ["int8", "nf4", "fp4"]


def main():
    ap = C.parser("t7", __doc__)
    ap.add_argument("--formats", default=",".join(ALL))
    a = ap.parse_args()
    formats = C.csv_list(ap, a.formats, "--formats", ALL)
    cx = C.Ctx("T7", ap, a)

    cells = []
    for f in formats:
        qdir, qi = cx.quantize(f)
        pdir, pi = (None, {"note": None, "times": {}})
        if qdir:
            pdir, pi = cx.patch(qdir, "patch-" + qi["name"])
        cells.append((f, qdir, qi, pdir, pi))
    models = [("fp", cx.model_dir)]
    for f, q, qi, p, pi in cells:
        models += [(qi["name"], q), ("patched-" + qi["name"], p)]
    ev = cx.evaluate(models)
    fp = ev.get("fp", {})
    rows = []
    md = [["FP (reference)", C.pct(fp.get("asr")), "", C.pct(fp.get("benign_accuracy")), "", "", ""]]
    for f, q, qi, p, pi in cells:
        eq = ev.get(qi["name"], {}) if q else {}
        ep = ev.get("patched-" + qi["name"], {}) if p else {}
        row = {"format": f, "quantization": qi["quantization"], "asr_quantized": eq.get("asr"),
               "asr_patched": ep.get("asr"), "benign_quantized": eq.get("benign_accuracy"),
               "benign_patched": ep.get("benign_accuracy"),
               "over_refusal_patched": ep.get("over_refusal"), "dpo_s": pi["times"].get("dpo"),
               "note": qi["note"] or pi["note"]}
        rows.append(row)
        md.append([C.METHODS[f]["label"], C.pct(row["asr_quantized"]), C.pct(row["asr_patched"]),
                   C.pct(row["benign_quantized"]), C.pct(row["benign_patched"]),
                   C.secs(row["dpo_s"]), row["note"] or ""])
    header = ["format", "ASR quantized (%)", "ASR patched (%)", "benign quantized (%)",
              "benign patched (%)", "patch (dpo) s", "note"]

    def plot(plt):
        return C.bars(plt, "T7: LLM.int8 / NF4 / FP4 before and after the patch",
                      ["fp"] + [r["format"] for r in rows],
                      {"ASR quantized": [fp.get("asr")] + [r["asr_quantized"] for r in rows],
                       "ASR patched": [None] + [r["asr_patched"] for r in rows],
                       "benign patched": [fp.get("benign_accuracy")] +
                       [r["benign_patched"] for r in rows]})

    return cx.finish("LLM.int8, NF4 and FP4 before and after the patch", header, md, rows, [], plot)


if __name__ == "__main__":
    sys.exit(main())
