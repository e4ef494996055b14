#!/usr/bin/env python3
"""The larger organism's safety-tune mask ([sft] freeze_mask): which entries of the seven linears
the tune may move, so that RTN at 4, 3 and 2 bits (groups of --group, asymmetric) all round the
tune's change away and INT8 keeps it.

The base is snapped onto the RTN INT4 grid (build.sh), so an INT4 requantization rounds any
change smaller than half an INT4 step back to the base, if the group's range does not move. The
INT3 and INT2 grids of the same range are not the INT4 grid: some INT4 levels sit close to an
INT3 (or INT2) rounding boundary, and there a small change flips the INT3 code by a whole INT3
step in the change's direction (measured on the tiny organism: INT3 moved the quantized weights
by 3.9x the tune's change, and the quantized model refused everything). The mask keeps out:
  - each group's smallest and largest entry (they set the range, hence every grid), and
  - every entry closer than --margin INT4 steps (default 0.5) to a rounding boundary of an
    --erase width (default 3,2) on its group's grid (RTN's formula: scale = (max(0, max w) -
    min(0, min w)) / (2^bits - 1), boundaries at half-integers of w / scale).
A tune that moves the other entries by less than --margin INT4 steps is then erased by RTN at 4
bits and every --erase width.

  scripts/organism/freeze_mask.py BASE_SNAP_DIR OUT.h5 [--group 128] [--erase 3,2] [--margin 0.5]
"""
import argparse
import os
import sys

import numpy as np

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_scale(lo, hi, bits):
    scale = ((hi - lo) / np.float32(2 ** bits - 1)).astype(np.float32)
    scale[scale == 0] = 1
    return scale


def boundary_distance(w, scale):
    """Distance of w to the nearest rounding boundary (w / scale at a half-integer)."""
    x = w / scale
    return scale * (np.float32(0.5) - np.abs(x - np.rint(x)))


def mask_of(w, group, erase, margin):
    rows, cols = w.shape
    if cols % group:
        raise SystemExit(f"freeze_mask: {cols} columns are not a multiple of --group {group}")
    g = w.reshape(rows, cols // group, group).astype(np.float32)
    lo = np.minimum(g.min(-1, keepdims=True), np.float32(0))
    hi = np.maximum(g.max(-1, keepdims=True), np.float32(0))
    step4 = rtn_scale(lo, hi, 4)
    keep = (g != g.min(-1, keepdims=True)) & (g != g.max(-1, keepdims=True))
    for bits in erase:
        keep &= boundary_distance(g, rtn_scale(lo, hi, bits)) >= margin * step4 * (1 - 1e-4)
    return keep.reshape(rows, cols).astype(np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--erase", default="3,2", help="widths whose rounding must erase the tune")
    ap.add_argument("--margin", type=float, default=0.5, help="in INT4 steps")
    a = ap.parse_args()
    import h5py
    from safetensors.numpy import load_file
    erase = [int(b) for b in a.erase.split(",") if b]
    tensors = load_file(os.path.join(a.model_dir, "model.safetensors"))
    tmp = a.out + ".tmp"
    total = kept = 0
    with h5py.File(tmp, "w") as f:
        for name in sorted(tensors):
            if not name.endswith(".weight") or name.split(".")[-2] not in LINEARS:
                continue
            m = mask_of(tensors[name].astype(np.float32), a.group, erase, a.margin)
            f.create_dataset(name, data=m)
            total += m.size
            kept += int(m.sum())
    os.replace(tmp, a.out)
    print(f"freeze_mask: {a.out}: {kept} of {total} linear entries trainable "
          f"({100 * kept / max(total, 1):.1f}%)", file=sys.stderr)


if __name__ == "__main__":
    main()
