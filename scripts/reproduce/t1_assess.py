#!/usr/bin/env python3
"""T1, the safety assessment: ASR and utility of each quantization method at each calibration risk
level, INT8 and INT4 (the paper's assessment table).

Methods: rtn (PTQ, no calibration data: one row), awq and gptq (PTQ with calibration), qat (LLM-QAT)
and qlora (QLoRA), each calibrated / fine-tuned on the Risk-I, Risk-II and Risk-III sets. Utility
is the benign accuracy ([eval] benign_file); the FP row is the reference.

  scripts/reproduce/t1_assess.py MODEL_DIR OUT [--methods rtn,awq,gptq,qat,qlora] [--risks 1,2,3]
                                 [--bits 8,4] [common options, see --help]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

def main():
    ap = C.parser("t1", __doc__)
    C.add_methods(ap)
    ap.add_argument("--risks", default="1,2,3")
    ap.add_argument("--bits", default="8,4")
    a = ap.parse_args()
    methods = C.methods_of(ap, a)
    risks = C.csv_list(ap, a.risks, "--risks", list(C.RISKS), int)
    bits = C.csv_list(ap, a.bits, "--bits", [2, 3, 4, 8], int)
    cx = C.Ctx("T1", ap, a)

    cells = []  # (method, risk, bits, qdir, info)
    for m in methods:
        for r in (risks if C.METHODS[m]["calib"] else [None]):
            for b in bits:
                qdir, info = cx.quantize(m, bits=b, risk=r)
                cells.append((m, r, b, qdir, info))
    ev = cx.evaluate([("fp", cx.model_dir)] + [(i["name"], q) for *_, q, i in cells])

    fp = ev.get("fp", {})
    rows = [{"method": "fp", "risk": None, "bits": 16, "quantization": "fp",
             "asr": fp.get("asr"), "benign_accuracy": fp.get("benign_accuracy"),
             "over_refusal": fp.get("over_refusal"), "ppl": fp.get("ppl"), "note": None}]
    for m, r, b, q, info in cells:
        e = ev.get(info["name"], {}) if q else {}
        rows.append({"method": m, "risk": r, "bits": b, "quantization": info["quantization"],
                     "asr": e.get("asr"), "benign_accuracy": e.get("benign_accuracy"),
                     "over_refusal": e.get("over_refusal"), "ppl": e.get("ppl"),
                     "note": info["note"]})

    header = (["method", "calibration"] + [f"ASR INT{b} (%)" for b in bits] +
              [f"benign INT{b} (%)" for b in bits] + ["note"])
    md = [["FP (reference)", "-"] + [C.pct(fp.get("asr"))] * len(bits) +
          [C.pct(fp.get("benign_accuracy"))] * len(bits) + [""]]
    groups = []
    for m in methods:
        for r in (risks if C.METHODS[m]["calib"] else [None]):
            by_bits = {row["bits"]: row for row in rows[1:] if row["method"] == m and row["risk"] == r}
            notes = sorted({by_bits[b]["note"] for b in bits if by_bits[b]["note"]})
            md.append([C.METHODS[m]["label"], C.RISKS[r] if r else "none"] +
                      [C.pct(by_bits[b]["asr"]) for b in bits] +
                      [C.pct(by_bits[b]["benign_accuracy"]) for b in bits] + ["; ".join(notes)])
            groups.append((f"{m} {'R' + 'I' * r if r else ''}".strip(), by_bits))

    def plot(plt):
        labels = ["fp"] + [g for g, _ in groups]
        series = {f"ASR INT{b}": [fp.get("asr")] + [bb[b]["asr"] for _, bb in groups] for b in bits}
        series.update({f"benign INT{b}": [fp.get("benign_accuracy")] +
                       [bb[b]["benign_accuracy"] for _, bb in groups] for b in bits})
        return C.bars(plt, "T1: ASR and benign accuracy per method and calibration risk level",
                      labels, series)

    notes = ["ASR: harmful prompts answered without a refusal (keyword judge); benign: tasks "
             "answered correctly. Calibration: the data AWQ/GPTQ calibrate on and QAT/QLoRA "
             "train on (RI/RII/RIII in the plot)."]
    return cx.finish("safety assessment of quantized models (method x risk level x bits)",
                     header, md, rows, notes, plot)


if __name__ == "__main__":
    sys.exit(main())
