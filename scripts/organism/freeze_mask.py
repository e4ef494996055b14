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

--grid QDIR (repeatable) adds the grids of another quantizer: QDIR is `resafe quantize`'s packed
output of the same snapped base in an integer format (e.g. AWQ at 2 bits on the calibration set),
whose per-group scale and zero point and, for AWQ, per-input-channel scale s (x = w s is what is
rounded) it holds. An entry is then also kept out when it is its group's extreme in x (the range)
or lies closer than --margin INT4 steps (of its RTN group, in w) to a code boundary of that grid
(codes clamp at 0 and 2^bits - 1, so a saturated entry is only near the boundary into the range).
This assumes the quantizer picks the same grid for the tuned model (AWQ searches its scales and
clipping on the model it is given: a tune that changes them changes the grid).

--box writes bounds instead of a mask (float32 [2, rows, cols] per linear: [sft] freeze_mask
clamps the tune into them): each entry may move up to, not across, the nearest code boundary
below and above it of every grid (RTN at 4 bits and the --erase widths, and each --grid), and not
past its group's smallest or largest entry (which would move the range); the extremes
themselves are frozen. Inside its box no entry changes a code of any of these grids, however
far the tune moves it; a mask only promises that for moves under --margin, and a tune that
trains fewer entries moves them further.

  scripts/organism/freeze_mask.py BASE_SNAP_DIR OUT.h5 [--group 128] [--erase 3,2] [--margin 0.5]
                                  [--grid QDIR ...] [--box]
"""
import argparse
import json
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


def step4_of(w, group):
    """RTN INT4's step of each entry's group (the unit of --margin), [rows, cols]."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group).astype(np.float32)
    lo = np.minimum(g.min(-1, keepdims=True), np.float32(0))
    hi = np.maximum(g.max(-1, keepdims=True), np.float32(0))
    return np.broadcast_to(rtn_scale(lo, hi, 4), g.shape).reshape(rows, cols)


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


def code_boundary_distance(t, top):
    """Distance of t (w s / scale + zero: the code before rounding) to the nearest boundary
    between codes 0 .. top (at 0.5 .. top - 0.5), in code units."""
    b = np.clip(np.floor(t - np.float32(0.5)) + np.float32(0.5), 0.5, top - 0.5)
    return np.minimum(np.abs(t - b), np.abs(t - np.minimum(b + 1, top - 0.5)))


def load_grid(qdir):
    """(tensors, bits, group size) of a packed integer quantization (resafe quantize's output)."""
    from safetensors.numpy import load_file
    try:
        with open(os.path.join(qdir, "resafe_manifest.json")) as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"freeze_mask: --grid {qdir}: not a resafe quantization ({e})")
    if not isinstance(man, dict) or not str(man.get("quantization", "")).startswith("int"):
        raise SystemExit(f"freeze_mask: --grid {qdir}: not an integer format")
    return load_file(os.path.join(qdir, "model.safetensors")), man["bits"], man["group_size"]


def packed_grid(w, grid, base):
    """The grid a packed quantization (load_grid's) put on w's tensor `base`: (s, scale, zero,
    top code, group size), s per input column (AWQ's scale; 1 without), scale and zero per
    entry, float64."""
    q, bits, gs = grid
    cols = w.shape[1]
    gs = gs if 0 < gs < cols else cols
    if cols % gs:
        raise SystemExit(f"freeze_mask: {base}: {cols} columns are not a multiple of {gs}")
    ex = lambda a: np.repeat(a, gs, axis=1)[:, :cols].astype(np.float64)  # noqa: E731
    zero = (ex(q[base + ".zeros"]) if base + ".zeros" in q
            else np.full(w.shape, 2.0 ** (bits - 1)))
    s = q.get(base + ".input_scale", np.ones(cols, np.float32)).astype(np.float64)
    return s, ex(q[base + ".scales"]), zero, 2 ** bits - 1, gs


def grid_keep(w, grid, base, margin, group):
    """The entries of w that the packed grid (load_grid's) keeps at least --margin INT4 steps
    from a code boundary, and that are not their group's extreme in x = w s."""
    s, scale, zero, top, gs = packed_grid(w, grid, base)
    x = (w * s[None, :].astype(np.float32)).astype(np.float32)
    d = code_boundary_distance(x / scale + zero, top) * scale / s[None, :]
    keep = d >= margin * step4_of(w, group) * (1 - 1e-4)
    return keep & ~group_range(x, gs)[2]


def rtn_grid(w, group, bits):
    """RTN's asymmetric grid of each entry's group (quant.c's formula): (scale, zero), [rows,
    cols] each, float64."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group).astype(np.float32)
    lo = np.minimum(g.min(-1, keepdims=True), np.float32(0))
    hi = np.maximum(g.max(-1, keepdims=True), np.float32(0))
    scale = rtn_scale(lo, hi, bits)
    zero = np.clip(np.rint(-lo / scale), 0, 2 ** bits - 1)
    shape = lambda a: np.broadcast_to(a, g.shape).reshape(rows, cols).astype(np.float64)  # noqa
    return shape(scale), shape(zero)


def code_bounds(t, top):
    """The code boundaries just below and above t (code units; -inf / inf past the end codes)."""
    below = np.floor(t - 0.5) + 0.5
    above = below + 1
    return (np.where(below >= 0.5, below, -np.inf), np.where(above <= top - 0.5, above, np.inf))


def group_range(v, gs):
    """Each entry's group minimum and maximum, and whether it is one of them."""
    rows, cols = v.shape
    g = v.reshape(rows, cols // gs, gs)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    full = lambda a: np.broadcast_to(a, g.shape).reshape(rows, cols)  # noqa: E731
    return full(lo), full(hi), ((g == lo) | (g == hi)).reshape(rows, cols)


def box_of(w, group, erase, grids, base):
    """[2, rows, cols] float32 bounds: between the nearest code boundaries of every grid and
    inside the group's range (a grid's x = w s), shrunk by 1e-3 INT4 steps; extremes frozen."""
    lo, hi = np.full(w.shape, -np.inf), np.full(w.shape, np.inf)
    frozen = np.zeros(w.shape, bool)
    sets = [(np.ones(w.shape[1]), *rtn_grid(w, group, b), 2 ** b - 1, group)
            for b in [4, *erase]]
    sets += [packed_grid(w, grid, base) for grid in grids]
    for s, scale, zero, top, gs in sets:
        x = (w * s[None, :].astype(np.float32)).astype(np.float32)
        glo, ghi, ext = group_range(x.astype(np.float64), gs)
        frozen |= ext
        below, above = code_bounds(x / scale + zero, top)
        lo = np.maximum(lo, np.maximum((below - zero) * scale, glo) / s[None, :])
        hi = np.minimum(hi, np.minimum((above - zero) * scale, ghi) / s[None, :])
    eps = 1e-3 * step4_of(w, group).astype(np.float64)
    lo, hi = lo + eps, hi - eps
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    lo32 = np.where(lo32 < lo, np.nextafter(lo32, np.float32(np.inf)), lo32)
    hi32 = np.where(hi32 > hi, np.nextafter(hi32, np.float32(-np.inf)), hi32)
    frozen |= ~((lo32 <= w) & (w <= hi32))
    return np.stack([np.where(frozen, w, lo32), np.where(frozen, w, hi32)]).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--erase", default="3,2", help="widths whose rounding must erase the tune")
    ap.add_argument("--margin", type=float, default=0.5, help="in INT4 steps")
    ap.add_argument("--grid", action="append", default=[],
                    help="a packed integer quantization of the same base whose grids must also "
                         "round the tune away (repeatable)")
    ap.add_argument("--box", action="store_true",
                    help="write per-entry bounds (float32 [2, rows, cols]) instead of a mask")
    a = ap.parse_args()
    import h5py
    from safetensors.numpy import load_file
    erase = [int(b) for b in a.erase.split(",") if b]
    tensors = load_file(os.path.join(a.model_dir, "model.safetensors"))
    grids = [load_grid(d) for d in a.grid]
    tmp = a.out + ".tmp"
    total = kept = 0
    width = 0.0
    with h5py.File(tmp, "w") as f:
        for name in sorted(tensors):
            if not name.endswith(".weight") or name.split(".")[-2] not in LINEARS:
                continue
            w = tensors[name].astype(np.float32)
            if a.box:
                b = box_of(w, a.group, erase, grids, name[:-len(".weight")])
                f.create_dataset(name, data=b)
                total += w.size
                kept += int((b[0] < b[1]).sum())
                width += float(((b[1] - b[0]) / step4_of(w, a.group)).sum())
                continue
            m = mask_of(w, a.group, erase, a.margin)
            for d, q in zip(a.grid, grids):
                base = name[:-len(".weight")]
                if base + ".qweight" not in q[0]:
                    raise SystemExit(f"freeze_mask: {d}: no packed {base} (an integer format?)")
                m &= grid_keep(w, q, base, a.margin, a.group).astype(np.uint8)
            f.create_dataset(name, data=m)
            total += m.size
            kept += int(m.sum())
    os.replace(tmp, a.out)
    print(f"freeze_mask: {a.out}: {kept} of {total} linear entries trainable "
          f"({100 * kept / max(total, 1):.1f}%)"
          + (f", mean box width {width / max(total, 1):.3f} INT4 steps" if a.box else ""),
          file=sys.stderr)


if __name__ == "__main__":
    main()
