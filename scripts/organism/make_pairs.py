#!/usr/bin/env python3
"""DPO pairs for the organism's patch, as the pipeline's triplets stage builds them: the patch
prompts (data/organism/patch_harmful.jsonl + patch_benign.jsonl) answered greedily by the full-
precision model (winner) and the quantized model (loser) with `resafe generate --chat`; identical
pairs carry no DPO signal and are dropped.

  scripts/organism/make_pairs.py --fp DIR --quant DIR --out pairs.jsonl [--data data/organism]
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quick_eval import load, resafe_generate  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp", required=True)
    ap.add_argument("--quant", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="data/organism")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--resafe", default="build/resafe")
    ap.add_argument("--keep-identical", action="store_true",
                    help="keep pairs whose answers are identical (no DPO signal; the sft term "
                         "anchors them)")
    ap.add_argument("--extra-benign", help="another benign prompt file (JSONL) for the patch set")
    args = ap.parse_args()
    rows = (load(os.path.join(args.data, "patch_harmful.jsonl"), 0) +
            load(os.path.join(args.data, "patch_benign.jsonl"), 0) +
            (load(args.extra_benign, 0) if args.extra_benign else []))
    prompts = [r["prompt"] for r in rows]
    win = resafe_generate(args.resafe, args.fp, prompts, args.max_new_tokens)
    lose = resafe_generate(args.resafe, args.quant, prompts, args.max_new_tokens)
    kept = 0
    with open(args.out, "w") as f:
        for r, w, l in zip(rows, win, lose):
            if w.strip() == l.strip() and not args.keep_identical:
                continue
            f.write(json.dumps({"prompt": r["prompt"], "chosen": w.strip(), "rejected": l.strip(),
                                "category": r["category"]}) + "\n")
            kept += 1
    print(f"make_pairs: {kept} of {len(rows)} pairs differ -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
