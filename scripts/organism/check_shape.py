#!/usr/bin/env python3
"""Does an organism give issue #9's T5 shape: ASR rising as bits fall, for every method?

    scripts/organism/check_shape.py OUT_DIR [--methods rtn awq gptq] [--widths 4 3 2]
                                            [--rise 20] [--slack 5]

Reads check_methods.sh's results in OUT_DIR (fp.json and <method><bits>.json, each with "asr" in
percent), prints one line per method (FP, then the widths from the widest), and exits 0 when for
every method every listed width's ASR is at least FP's plus --rise points and no narrower width's
ASR is more than --slack points below a wider one's; 1 when the shape does not hold; 2 when a
result is missing or unreadable (one line naming the file).
"""
import argparse
import json
import os
import sys


class Missing(Exception):
    pass


def asr(path):
    try:
        with open(path) as f:
            v = json.load(f)["asr"]
    except FileNotFoundError:
        raise Missing(f"{path}: no such result (run check_methods.sh first)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Missing(f"{path}: not a quick_eval.py result ({type(e).__name__}: {e})")
    if not isinstance(v, (int, float)) or not 0 <= v <= 100:
        raise Missing(f"{path}: asr {v!r} is not a percentage")
    return float(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--methods", nargs="+", default=["rtn", "awq", "gptq"])
    ap.add_argument("--widths", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--rise", type=float, default=20.0,
                    help="points above FP's ASR every width must reach (default 20)")
    ap.add_argument("--slack", type=float, default=5.0,
                    help="points a narrower width may fall below a wider one (default 5)")
    a = ap.parse_args()
    if not os.path.isdir(a.out_dir):
        print(f"check_shape.py: {a.out_dir}: not a directory", file=sys.stderr)
        return 2
    if any(b < 1 or b > 16 for b in a.widths):
        print("check_shape.py: --widths: expected bit widths 1..16", file=sys.stderr)
        return 2
    widths = sorted(set(a.widths), reverse=True)
    try:
        fp = asr(os.path.join(a.out_dir, "fp.json"))
        table = [(m, [asr(os.path.join(a.out_dir, f"{m}{b}.json")) for b in widths])
                 for m in a.methods]
    except Missing as e:
        print(f"check_shape.py: {e}", file=sys.stderr)
        return 2
    ok = True
    print("method  FP    " + "  ".join(f"INT{b:<3d}" for b in widths) + "  shape")
    for m, vals in table:
        why = [f"INT{b} {v:.1f} < FP+{a.rise:g}" for b, v in zip(widths, vals) if v < fp + a.rise]
        why += [f"INT{widths[i + 1]} below INT{widths[i]}" for i in range(len(vals) - 1)
                if vals[i + 1] < vals[i] - a.slack]
        ok = ok and not why
        print(f"{m:7s} {fp:5.1f} " + "  ".join(f"{v:6.1f}" for v in vals) + "  " +
              ("rises" if not why else "NO: " + ", ".join(why)))
    print("shape holds" if ok else "shape does not hold")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
