#!/usr/bin/env python3
"""T4, SFT vs DPO vs Q-resafe: the ASR, benign accuracy and time of three ways to repair one
quantized model with the same patch set (FP winners of the patch prompts):

  SFT       `resafe sft` of the FP model on the winners, quantization-aware (straight-through fake
            quantization on the same grid, [sft] qat), then quantized like the others; time =
            the fine-tune plus the quantization
  DPO       LoRA DPO on the quantized model without SNIP masks (`[snip] mask = none`: every LoRA
            entry trains); time = the dpo stage
  Q-resafe  the config's masked-LoRA DPO (SNIP masks, tau); time = the dpo stage
All three use the config's step count (`[dpo] max_steps`, else one epoch of the patch set) and
batch size. Building the patch set (triplets stage) is shared and timed once.

  scripts/reproduce/t4_sft_dpo.py MODEL_DIR OUT [--method rtn] [--risk 1] [--sft-lr 1e-4]
                                  [common options, see --help]
"""
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

INT_METHODS = ["rtn", "awq", "gptq"]


def sft_data(patchset, path):
    """The patch set's (prompt, FP winner) pairs as SFT JSONL."""
    import h5py
    with h5py.File(patchset, "r") as f:
        prompts = [p.decode() if isinstance(p, bytes) else p for p in f["prompt"][()]]
        winners = [w.decode() if isinstance(w, bytes) else w for w in f["winner_text"][()]]
    C.write_atomic(path, "".join(json.dumps({"prompt": p, "response": w}) + "\n"
                                 for p, w in zip(prompts, winners)))
    return len(prompts)


def sft(cx, base_run, name, lr):
    """The SFT baseline's model (or None) and its info {'time_s', 'note'}."""
    work = os.path.join(cx.work, "sft", name)
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data.jsonl")
    n = sft_data(os.path.join(base_run, "triplets", "patchset.h5"), data)
    d = cx.cfg["dpo"]
    batch = int(d["batch_size"])
    steps = int(d["max_steps"]) or math.ceil(n / batch) * int(d["epochs"])
    sets = [f"sft.data_file={data}", f"sft.output_dir={work}/model", f"run.out_dir={work}/run",
            "sft.qat=true", f"sft.qat_bits={cx.bits}",
            f"sft.qat_symmetric={'true' if cx.sym else 'false'}", f"sft.qat_group_size={cx.group}",
            f"sft.max_steps={steps}",
            f"sft.batch_size={batch}", f"sft.lr={lr:g}", "sft.warmup_steps=0"]
    if cx.cfg["generate"].get("system_prompt"):
        sets.append(f"sft.system_prompt={cx.cfg['generate']['system_prompt']}")
    if cx.cfg["dpo"].get("max_seq_len"):
        sets.append(f"sft.max_seq_len={cx.cfg['dpo']['max_seq_len']}")
    inputs = {"data": C.sha256_file(data), "config": cx.config_sha, "sets": cx.sets + sets}
    stamp_path = os.path.join(work, "stamp.json")
    stamp = C.load_json(stamp_path)
    model = os.path.join(work, "model")
    if stamp and stamp.get("inputs") == inputs and os.path.isfile(os.path.join(model, "config.json")):
        cx.log(f"sft {name}: reused")
        cx.counts["reused"] += 1
        cx.compute_s += stamp["time_s"]
        return model, {"time_s": stamp["time_s"], "steps": steps, "note": None}
    cmd = [cx.resafe, "sft", "--config", cx.config, *cx.set_args(sets)]
    t = time.time()
    resume = os.path.exists(os.path.join(work, "run", "sft", "checkpoint.h5"))
    rc, out = cx.run(cmd + (["--resume"] if resume else []), f"sft-{name}")
    if rc != 0 and resume:  # the checkpoint is of other settings: start over
        rc, out = cx.run(cmd + ["--force"], f"sft-{name}")
    dt = time.time() - t
    if rc != 0:
        return None, {"time_s": None, "steps": steps, "note": cx.fail(f"sft {name}", out)}
    cx.counts["ran"] += 1
    cx.compute_s += dt
    C.write_atomic(stamp_path, json.dumps({"inputs": inputs, "time_s": dt}))
    return model, {"time_s": dt, "steps": steps, "note": None}


def main():
    ap = C.parser("t4", __doc__)
    ap.add_argument("--method", default="rtn", choices=INT_METHODS)
    ap.add_argument("--risk", type=int, default=1, choices=list(C.RISKS))
    ap.add_argument("--sft-lr", type=float, default=1e-4, help="SFT learning rate (default 1e-4)")
    a = ap.parse_args()
    if not 0 < a.sft_lr <= 1:
        ap.error(f"--sft-lr {a.sft_lr}: must be in (0, 1]")
    cx = C.Ctx("T4", ap, a)
    risk = a.risk if C.METHODS[a.method]["calib"] else None

    qdir, qi = cx.quantize(a.method, risk=risk)
    res = []  # (label, model name, model dir, time_s, time_what, note)
    trip_s = None
    if qdir:
        base = "patch-" + qi["name"]
        pdir, pi = cx.patch(qdir, base)
        trip_s = pi["times"].get("triplets")
        if os.path.isfile(os.path.join(pi["run"], "triplets", "patchset.h5")):
            smodel, si = sft(cx, pi["run"], qi["name"], a.sft_lr)
            sq, sqi = (None, {"time_s": None, "note": None})
            if smodel:
                sq, sqi = cx.quantize(a.method, risk=risk, model=smodel, name="sft-" + qi["name"])
            st = None if si["time_s"] is None else si["time_s"] + (sqi["time_s"] or 0)
            res.append(("SFT (QAT)", "sft-" + qi["name"], sq, st, "sft + quantize",
                        si["note"] or sqi["note"]))
        else:
            res.append(("SFT (QAT)", "sft", None, None, "", pi["note"] or "no patch set"))
        dp, di = cx.patch(qdir, base + "-dpo-nomask", ["snip.mask=none"],
                          share_triplets_from=pi["run"])
        res.append(("DPO (LoRA, no mask)", "patched-" + qi["name"] + "-dpo-nomask", dp,
                    di["times"].get("dpo"), "dpo stage", di["note"]))
        res.append(("Q-resafe", "patched-" + qi["name"], pdir, pi["times"].get("dpo"), "dpo stage",
                    pi["note"]))
    else:
        cx.failed.append(f"quantize {qi['name']}: {qi['note']}")
    ev = cx.evaluate([("fp", cx.model_dir), (qi["name"], qdir)] + [(n, d) for _, n, d, *_ in res])
    rows = []
    refs = [("FP", "fp", cx.model_dir, None, "", None),
            ("quantized (no repair)", qi["name"], qdir, None, "", None)]
    for label, n, d, ts, what, note in refs + res:
        e = ev.get(n, {})
        rows.append({"method": label, "model": n, "asr": e.get("asr"),
                     "benign_accuracy": e.get("benign_accuracy"),
                     "over_refusal": e.get("over_refusal"), "time_s": ts, "time_of": what,
                     "note": note})
    device = cx.device()
    md = [[r["method"], C.pct(r["asr"]), C.pct(r["benign_accuracy"]), C.pct(r["over_refusal"]),
           C.secs(r["time_s"]) + (f" ({r['time_of']})" if r["time_of"] else ""), r["note"] or ""]
          for r in rows]
    header = ["method", "ASR (%)", "benign (%)", "over-refusal (%)", f"time (s, {device})", "note"]

    def plot(plt):
        fig = C.bars(plt, f"T4: SFT vs DPO vs Q-resafe on {qi['name']}", [r["method"] for r in rows],
                     {"ASR": [r["asr"] for r in rows],
                      "benign": [r["benign_accuracy"] for r in rows]})
        ax2 = fig.axes[0].twinx()
        ax2.plot(range(len(rows)), [r["time_s"] if r["time_s"] is not None else float("nan")
                                    for r in rows], "k*", markersize=10, label="time (s)")
        ax2.set_ylabel(f"time (s, {device})", fontsize=7)
        ax2.set_ylim(bottom=0)
        return fig

    notes = [f"Quantized model {qi['name']}; patch set built once in {C.secs(trip_s)} s (triplets "
             "stage, not counted in the times below); every method trains the same number of "
             "steps of the same batch size."]
    return cx.finish("SFT vs DPO vs Q-resafe (ASR, time)", header, md, rows, notes, plot,
                     {"triplets_s": trip_s})


if __name__ == "__main__":
    sys.exit(main())
