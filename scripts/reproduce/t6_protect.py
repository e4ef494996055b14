#!/usr/bin/env python3
"""T6, no fine-tuning: AWQ (and RTN) against critical-weight protection under the decoding-attack
grid. Protection keeps the top-tau fraction of SNIP scores |W * dL/dW| on a safety set (prompt +
safe response) in fp16 beside the packed weights (`resafe quantize --protect-tau`); nothing is
trained. Every model answers the harmful prompts greedily and under each setting of the
`[eval]` attack grid (temperatures, top-k, top-p; `attack_samples` samples each); worst case =
broken in any setting.

  scripts/reproduce/t6_protect.py MODEL_DIR OUT [--protect-taus 0.01,0.05,0.2]
        [--protect-data FILE] [--protect-column prompt+response] [--risk 1]
        [common options, see --help]

--protect-data defaults to the config's [patch] harmful_file (the organism's holds the refusal as
`response`); for a real model give a set of harmful prompts with safe responses.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def setting_name(s):
    if s.get("top_k"):
        return f"top-k {s['top_k']}"
    if s.get("top_p") is not None and s.get("top_p") < 1:
        return f"top-p {s['top_p']:g}"
    return f"T {s.get('temperature'):g}"


def main():
    ap = C.parser("t6", __doc__)
    ap.add_argument("--protect-taus", default="0.01,0.05,0.2")
    ap.add_argument("--protect-data", metavar="FILE")
    ap.add_argument("--protect-column", default="prompt+response")
    ap.add_argument("--risk", type=int, default=1, choices=list(C.RISKS),
                    help="AWQ's calibration set (default 1)")
    a = ap.parse_args()
    taus = C.csv_list(ap, a.protect_taus, "--protect-taus", None, C.fraction)
    if a.protect_data and not os.path.isfile(a.protect_data):
        ap.error(f"--protect-data {a.protect_data}: no such file")
    cx = C.Ctx("T6", ap, a)
    pdata = os.path.abspath(a.protect_data) if a.protect_data else cx.cfg["patch"].get("harmful_file")
    if not pdata:
        ap.error("no --protect-data and the config has no [patch] harmful_file")
    pdata = pdata if os.path.isabs(pdata) else os.path.join(C.ROOT, pdata)

    specs = [("AWQ (no fine-tune)", "awq", 0.0), ("RTN (no fine-tune)", "rtn", 0.0)]
    specs += [(f"RTN + protection tau {t:g}", "rtn", t) for t in taus if t > 0]
    specs += [(f"AWQ + protection tau {t:g}", "awq", t) for t in taus if t > 0]
    cells = []
    for label, m, t in specs:
        q, qi = cx.quantize(m, risk=a.risk if m == "awq" else None, protect_tau=t,
                            protect_data=pdata if t else None,
                            protect_column=a.protect_column if t else None)
        cells.append((label, q, qi))
    ev = cx.evaluate([("fp", cx.model_dir)] + [(qi["name"], q) for _, q, qi in cells], attacks=True)

    names = []
    for e in ev.values():
        for s in ((e.get("attacks") or {}).get("settings") or []):
            if setting_name(s) not in names:
                names.append(setting_name(s))
    rows, md = [], []
    for label, n, note in [("FP", "fp", None)] + [(lb, qi["name"], qi["note"]) for lb, _, qi in cells]:
        e = ev.get(n, {})
        att = e.get("attacks") or {}
        per = {setting_name(s): s.get("asr") for s in att.get("settings") or []}
        row = {"model": label, "name": n, "asr_greedy": e.get("asr"), "attacks": per,
               "worst_case_asr": att.get("worst_case_asr"),
               "benign_accuracy": e.get("benign_accuracy"), "note": note}
        rows.append(row)
        md.append([label, C.pct(row["asr_greedy"])] + [C.pct(per.get(s)) for s in names] +
                  [C.pct(row["worst_case_asr"]), C.pct(row["benign_accuracy"]), note or ""])
    header = (["model", "greedy ASR (%)"] + [f"{s} (%)" for s in names] +
              ["worst case (%)", "benign (%)", "note"])

    def plot(plt):
        return C.bars(plt, "T6: ASR under the decoding-attack grid, no fine-tuning",
                      [r["model"] for r in rows],
                      {"greedy ASR": [r["asr_greedy"] for r in rows],
                       "worst-case ASR": [r["worst_case_asr"] for r in rows],
                       "benign": [r["benign_accuracy"] for r in rows]})

    notes = [f"INT{cx.bits} g{cx.group}; protection data {os.path.relpath(pdata, C.ROOT)} "
             f"(column {a.protect_column}); AWQ calibration {C.RISKS[a.risk]}. Attack settings "
             "from the config's [eval] attack_* keys."]
    return cx.finish("no-fine-tune AWQ vs critical-weight protection under decoding attacks",
                     header, md, rows, notes, plot)


if __name__ == "__main__":
    sys.exit(main())
