"""Quantization formats (src/quant.c, src/quant_pack.c) against independent numpy references.

Each case runs build/tools/quant_tool on a matrix (random, or adversarial: constant rows, zero
rows, huge outliers, odd column counts) and compares:
  - the RTN dequantized weight with the documented formula evaluated in numpy float32, BIT FOR
    BIT (every step is one IEEE fp32 operation; rounding is round half to even, np.rint);
  - NF4/FP4 with bitsandbytes' published codebooks (constants copied below from bitsandbytes'
    dDequantizeNF4 / dDequantizeFP4Tree) and its block absmax over blocks of 64;
  - the packed bytes with an independent packer (numpy bit arithmetic on the canonical codes), and
    pack(unpack(packed)) == packed (checked inside the tool);
  - qmatmul / qmatmul_t with numpy matmuls on the dequantized weight (relative error <= 1e-5: fp32
    sums of a few hundred terms).
"""
import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import BUILD

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)
# bitsandbytes FP4: bit 3 = sign, low 3 bits -> magnitude (dDequantizeFP4Tree)
FP4_MAG = np.array([0.0, 5.208333333e-03, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25],
                   dtype=np.float32)
FP4 = np.concatenate([FP4_MAG, -FP4_MAG]).astype(np.float32)

f32 = np.float32


def run_tool(tmp_path, w, fmt="int", bits=4, group=128, sym=0, threshold=0.0, protect=None,
             input_scale=None, x=None, dout=None, check=True):
    t = {"w": np.ascontiguousarray(w, dtype=f32)}
    if protect is not None:
        t["protect"] = protect.astype(np.uint8)
    if input_scale is not None:
        t["input_scale"] = input_scale.astype(f32)
    if x is not None:
        t["x"] = x.astype(f32)
    if dout is not None:
        t["dout"] = dout.astype(f32)
    meta = {"format": fmt, "bits": str(bits), "group": str(group), "sym": str(sym),
            "threshold": repr(float(threshold))}
    src, dst = tmp_path / "q.in.safetensors", tmp_path / "q.out.safetensors"
    save_file(t, str(src), metadata=meta)
    p = subprocess.run([os.path.join(BUILD, "tools", "quant_tool"), str(src), str(dst)],
                       capture_output=True, text=True, timeout=60)
    if not check:
        return p
    assert p.returncode == 0, p.stderr
    return load_file(str(dst))


# ---- independent references (numpy float32, one operation at a time)

def ref_int(w, bits, group, sym, protect=None):
    rows, cols = w.shape
    gs = group or cols
    codes = np.zeros((rows, cols), np.uint8)
    deq = np.zeros((rows, cols), f32)
    keep = np.ones_like(w, bool) if protect is None else protect == 0
    for r in range(rows):
        for c0 in range(0, cols, gs):
            g = w[r, c0:c0 + gs]
            k = keep[r, c0:c0 + gs]
            if sym:
                qs = f32(2 ** (bits - 1) - 1)
                off = f32(2 ** (bits - 1))
                amax = np.abs(g[k]).max() if k.any() else f32(0)
                scale = f32(f32(amax) / qs)
                if scale == 0:
                    scale = f32(1)
                q = np.clip(np.rint(g / scale), -qs, qs).astype(f32)
                code = (q + off).astype(f32)
                codes[r, c0:c0 + gs] = code.astype(np.uint8)
                deq[r, c0:c0 + gs] = (code - off) * scale  # the stored code: no -0
            else:
                qmax = f32(2 ** bits - 1)
                lo = min(f32(0), g[k].min()) if k.any() else f32(0)
                hi = max(f32(0), g[k].max()) if k.any() else f32(0)
                scale = f32(f32(f32(hi) - f32(lo)) / qmax)
                if scale == 0:
                    scale = f32(1)
                zero = f32(np.clip(np.rint(f32(-lo) / scale), 0, qmax))
                q = np.clip(np.rint(g / scale) + zero, 0, qmax).astype(f32)
                codes[r, c0:c0 + gs] = q.astype(np.uint8)
                deq[r, c0:c0 + gs] = (q - zero) * scale
    return codes, deq


def ref_codebook(w, cb, protect=None):
    """bitsandbytes blockwise quantization along each row: absmax over blocks of 64, x = w *
    (1/absmax), the nearest codebook entry (lowest index on a tie), w' = cb[q] * absmax."""
    rows, cols = w.shape
    codes = np.zeros((rows, cols), np.uint8)
    deq = np.zeros((rows, cols), f32)
    absmax = np.zeros((rows, (cols + 63) // 64), f32)
    keep = np.ones_like(w, bool) if protect is None else protect == 0
    for r in range(rows):
        for b, c0 in enumerate(range(0, cols, 64)):
            g, k = w[r, c0:c0 + 64], keep[r, c0:c0 + 64]
            am = np.abs(g[k]).max() if k.any() else f32(0)
            inv = f32(1) / f32(am) if am > 0 else f32(0)
            xn = (g * inv).astype(f32)
            q = np.argmin(np.abs(xn[:, None] - cb[None, :]), axis=1)
            codes[r, c0:c0 + 64] = q
            deq[r, c0:c0 + 64] = cb[q] * f32(am)
            absmax[r, b] = am
    return codes, deq, absmax


def ref_pack(codes, bits):
    """Per row a little-endian bit stream of `bits`-bit codes, padded to 32 codes."""
    rows, cols = codes.shape
    padded = (cols + 31) // 32 * 32
    out = np.zeros((rows, padded * bits // 8), np.uint8)
    for r in range(rows):
        bitarr = np.zeros(padded * bits, np.uint8)
        for c in range(cols):
            for b in range(bits):
                bitarr[c * bits + b] = (int(codes[r, c]) >> b) & 1
        out[r] = np.packbits(bitarr, bitorder="little")
    return out


def matrices(rng, rows, cols):
    w = rng.standard_normal((rows, cols)).astype(f32) * f32(0.05)
    w[0] = f32(0.3)                       # constant row
    w[1] = 0                              # zero row
    w[2, 5] = f32(1e6)                    # a huge outlier
    w[3] = rng.standard_normal(cols).astype(f32) * f32(1e-30)   # tiny values
    w[4, :] = -np.abs(w[4, :])            # all negative
    return w


INT_CASES = [(b, g, s) for b in (2, 3, 4, 8) for g in (32, 64, 128, 0) for s in (0, 1)]


@pytest.mark.parametrize("bits,group,sym", INT_CASES)
def test_rtn_int_matches_numpy_formula_bit_for_bit(tmp_path, rng_seed, bits, group, sym):
    rng = np.random.default_rng(rng_seed)
    w = matrices(rng, 9, 200)             # 200: a partial last group and padding in the last word
    out = run_tool(tmp_path, w, bits=bits, group=group, sym=sym)
    codes, deq = ref_int(w, bits, group, sym)
    np.testing.assert_array_equal(out["codes"], codes)
    assert np.array_equal(out["dequant"].view(np.uint32), deq.view(np.uint32))
    np.testing.assert_array_equal(out["packed"], ref_pack(codes, bits))


@pytest.mark.parametrize("fmt,cb", [("nf4", NF4), ("fp4", FP4)])
def test_codebook_formats_match_bitsandbytes_definition(tmp_path, rng_seed, fmt, cb):
    rng = np.random.default_rng(rng_seed)
    w = matrices(rng, 7, 130)
    out = run_tool(tmp_path, w, fmt=fmt, bits=4, group=64)
    codes, deq, absmax = ref_codebook(w, cb)
    np.testing.assert_array_equal(out["scales"], absmax)
    np.testing.assert_array_equal(out["codes"], codes)
    assert np.array_equal(out["dequant"].view(np.uint32), deq.view(np.uint32))
    np.testing.assert_array_equal(out["packed"], ref_pack(codes, 4))
    # every codebook value is reachable and reconstructs exactly at absmax 1
    e = np.tile(cb, 4)[None, :].astype(f32)
    e[0, 0] = 1.0
    out = run_tool(tmp_path, e, fmt=fmt, bits=4, group=64)
    np.testing.assert_array_equal(out["dequant"], e)


def test_int8_outlier_columns_kept_in_fp16(tmp_path, rng_seed):
    rng = np.random.default_rng(rng_seed)
    w = rng.standard_normal((6, 70)).astype(f32)
    w[2, 9] = 40.0
    w[4, 33] = -7.5
    out = run_tool(tmp_path, w, fmt="int8", bits=8, threshold=6.0)
    oc = out["outlier_cols"]
    np.testing.assert_array_equal(oc, np.nonzero((np.abs(w) > 6).any(0))[0])
    rest = np.setdiff1d(np.arange(70), oc)
    amax = np.abs(w[:, rest]).max(1)
    scale = (amax / f32(127)).astype(f32)
    code = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(f32) + f32(128)
    ref = (code - f32(128)) * scale[:, None]
    ref[:, oc] = w[:, oc].astype(np.float16).astype(f32)
    assert np.array_equal(out["dequant"], ref)


def test_protected_entries_excluded_and_reconstructed(tmp_path, rng_seed):
    rng = np.random.default_rng(rng_seed)
    w = rng.standard_normal((8, 96)).astype(f32) * f32(0.02)
    w[3, 10] = 5.0
    protect = (rng.random(w.shape) < 0.05).astype(np.uint8)
    protect[3, 10] = 1
    out = run_tool(tmp_path, w, bits=4, group=32, sym=0, protect=protect)
    codes, deq = ref_int(w, 4, 32, 0, protect)
    deq[protect == 1] = w[protect == 1].astype(np.float16).astype(f32)
    assert np.array_equal(out["dequant"], deq)
    rp = out["crit_row_ptr"]
    assert rp[-1] == protect.sum() and np.all(np.diff(rp) == protect.sum(1))
    np.testing.assert_array_equal(out["crit_cols"], np.nonzero(protect)[1])
    for fmt, cb in (("nf4", NF4), ("fp4", FP4)):
        out = run_tool(tmp_path, w, fmt=fmt, bits=4, group=64, protect=protect)
        _, deq, absmax = ref_codebook(w, cb, protect)
        deq[protect == 1] = w[protect == 1].astype(np.float16).astype(f32)
        np.testing.assert_array_equal(out["scales"], absmax)
        assert np.array_equal(out["dequant"], deq)


def test_input_scale_divided_back_out(tmp_path, rng_seed):
    rng = np.random.default_rng(rng_seed)
    w = rng.standard_normal((5, 64)).astype(f32)
    s = (rng.random(64) + 0.5).astype(f32)
    out = run_tool(tmp_path, w, bits=4, group=32, sym=1, input_scale=s)
    _, deq = ref_int((w * s).astype(f32), 4, 32, 1)
    assert np.array_equal(out["dequant"], (deq / s).astype(f32))


@pytest.mark.parametrize("fmt,bits,group", [("int", 3, 64), ("int", 4, 128), ("nf4", 4, 64),
                                            ("int8", 8, 0), ("int", 2, 0)])
def test_qmatmul_matches_numpy_on_dequantized_weight(tmp_path, rng_seed, fmt, bits, group):
    rng = np.random.default_rng(rng_seed)
    w = rng.standard_normal((37, 150)).astype(f32)
    x = rng.standard_normal((5, 150)).astype(f32)
    dout = rng.standard_normal((5, 37)).astype(f32)
    out = run_tool(tmp_path, w, fmt=fmt, bits=bits, group=group, x=x, dout=dout)
    wd = out["dequant"].astype(np.float64)
    y, dx = x @ wd.T, dout @ wd
    assert np.linalg.norm(out["y"] - y) / np.linalg.norm(y) < 1e-5
    assert np.linalg.norm(out["dx"] - dx) / np.linalg.norm(dx) < 1e-5


@pytest.mark.parametrize("bad,where", [(np.nan, "NaN at row 2, column 7"),
                                       (np.inf, "infinite at row 2, column 7")])
def test_nonfinite_weights_rejected_with_position(tmp_path, bad, where):
    w = np.zeros((4, 32), f32)
    w[2, 7] = bad
    p = run_tool(tmp_path, w, check=False)
    assert p.returncode != 0 and where in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_range_overflow_rejected(tmp_path):
    w = np.zeros((2, 32), f32)
    w[1, 0], w[1, 1] = 3e38, -3e38
    p = run_tool(tmp_path, w, check=False)
    assert p.returncode != 0 and "row 1, group 0" in p.stderr, p.stderr


def test_range_overflow_names_the_first_bad_row_whatever_the_threads(tmp_path, rng_seed):
    """Rows are quantized in parallel: the error must still name the first bad row (and only it)."""
    rng = np.random.default_rng(rng_seed)
    w = rng.standard_normal((301, 96)).astype(f32)
    rows = sorted(rng.choice(np.arange(20, 301), size=3, replace=False))
    for r in rows:
        g = int(rng.integers(0, 3))
        w[r, 32 * g], w[r, 32 * g + 5] = 3e38, -3e38
    first_group = [g for g in range(3) if w[rows[0], 32 * g] == np.float32(3e38)][0]
    p = run_tool(tmp_path, w, group=32, check=False)
    assert p.returncode != 0, p.stderr
    assert f"row {rows[0]}, group {first_group}" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
