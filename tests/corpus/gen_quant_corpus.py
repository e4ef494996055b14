#!/usr/bin/env python3
"""Writes tests/corpus/quant/*.safetensors: quantized-weight files (schema: README "Quantized model
directory") that the quant reader must refuse, one defect each (the file name says which), and
tests/fuzz/seeds/quant/*.safetensors: valid files (the fuzz target's seeds). Run from anywhere;
the outputs are committed. tests/py/test_malformed_cli.py checks that `resafe inspect --as quant`
refuses every corpus file with one line naming it; tests/py/test_quant_model.py checks that the
seeds are accepted.

The files are built here with numpy (not by resafe), from the documented layout: per row a
little-endian bit stream of `bits`-bit codes, padded to a multiple of 32 codes."""
import json
import os

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "quant")
SEEDS = os.path.join(HERE, "..", "fuzz", "seeds", "quant")
NAME = "model.layers.0.mlp.up_proj"


def qconfig(**over):
    c = {"quant_format": "int", "bits": 4, "group_size": 32, "symmetric": False,
         "outlier_threshold": 6.0, "method": "rtn", "packing": "resafe-rowstream",
         "packing_version": 1}
    c.update(over)
    return json.dumps(c)


def pack(codes, bits):
    rows, cols = codes.shape
    padded = (cols + 31) // 32 * 32
    out = np.zeros((rows, padded * bits // 8), np.uint8)
    for r in range(rows):
        b = np.zeros(padded * bits, np.uint8)
        for c in range(cols):
            for k in range(bits):
                b[c * bits + k] = (int(codes[r, c]) >> k) & 1
        out[r] = np.packbits(b, bitorder="little")
    return out


def valid(bits=4, rows=4, cols=64, group=32, crit=True):
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 2 ** bits, (rows, cols), dtype=np.uint8)
    ng = (cols + group - 1) // group
    t = {f"{NAME}.qweight": pack(codes, bits),
         f"{NAME}.scales": (rng.random((rows, ng)) * 0.1 + 0.01).astype(np.float32),
         f"{NAME}.zeros": rng.integers(0, 2 ** bits, (rows, ng)).astype(np.float32),
         "model.norm.weight": np.ones(8, np.float32)}
    if crit:
        t[f"{NAME}.crit_row_ptr"] = np.array([0, 1, 1, 3, 3], np.int64)
        t[f"{NAME}.crit_cols"] = np.array([5, 0, 63], np.int32)
        t[f"{NAME}.crit_vals"] = np.array([0.5, -2.0, 1e3], np.float16)
    return t


def mutate(name, **changes):
    t = valid()
    meta = {"format": "pt", "quantization_config": qconfig()}
    for k, v in changes.items():
        if k == "meta":
            meta.update(v)
        elif v is None:
            del t[f"{NAME}.{k}"]
        else:
            t[f"{NAME}.{k}"] = v
    return name, t, meta


def cases():
    v = valid()
    qw = v[f"{NAME}.qweight"]
    pad = qw.copy()
    big = valid(cols=40)[f"{NAME}.qweight"]  # 40 codes in a 64-code row: padding
    pad40 = big.copy()
    pad40[1, -1] |= 0x80
    sc = v[f"{NAME}.scales"]
    z = v[f"{NAME}.zeros"]
    yield mutate("missing_qweight.safetensors", qweight=None, scales=sc[:, :1].copy())
    yield mutate("qweight_wrong_dtype.safetensors", qweight=qw.astype(np.int16))
    yield mutate("qweight_bad_width.safetensors", qweight=qw[:, :30].copy())
    yield mutate("scales_wrong_shape.safetensors", scales=sc[:, :1].copy())
    yield mutate("scales_wrong_dtype.safetensors", scales=sc.astype(np.float16))
    yield mutate("scales_nan.safetensors", scales=np.where(np.arange(sc.size).reshape(sc.shape) == 3, np.nan, sc).astype(np.float32))
    yield mutate("scales_inf.safetensors", scales=np.full_like(sc, np.inf))
    yield mutate("zeros_missing.safetensors", zeros=None)
    yield mutate("zeros_fractional.safetensors", zeros=(z + 0.5).astype(np.float32))
    yield mutate("zeros_out_of_range.safetensors", zeros=np.full_like(z, 16.0))
    yield mutate("zeros_negative.safetensors", zeros=np.full_like(z, -1.0))
    yield mutate("input_scale_negative.safetensors", input_scale=np.full(64, -1.0, np.float32))
    yield mutate("input_scale_wrong_len.safetensors", input_scale=np.ones(63, np.float32))
    yield mutate("crit_row_ptr_not_monotone.safetensors", crit_row_ptr=np.array([0, 2, 1, 3, 3], np.int64))
    yield mutate("crit_row_ptr_wrong_end.safetensors", crit_row_ptr=np.array([0, 1, 1, 3, 4], np.int64))
    yield mutate("crit_row_ptr_negative.safetensors", crit_row_ptr=np.array([-1, 1, 1, 3, 3], np.int64))
    yield mutate("crit_cols_out_of_range.safetensors", crit_cols=np.array([5, 0, 64], np.int32))
    yield mutate("crit_cols_unsorted.safetensors", crit_cols=np.array([5, 63, 0], np.int32))
    yield mutate("crit_cols_missing.safetensors", crit_cols=None)
    yield mutate("crit_vals_inf.safetensors", crit_vals=np.array([0.5, np.inf, 1.0], np.float16))
    yield mutate("crit_vals_nan.safetensors", crit_vals=np.array([np.nan, 1.0, 1.0], np.float16))
    yield mutate("crit_vals_wrong_len.safetensors", crit_vals=np.array([0.5, 1.0], np.float16))
    yield mutate("outlier_cols_in_int4.safetensors", outlier_cols=np.array([3], np.int32),
                 outlier_vals=np.ones((4, 1), np.float16))
    yield mutate("config_not_json.safetensors", meta={"quantization_config": "{bits: 4"})
    yield mutate("config_unknown_format.safetensors", meta={"quantization_config": qconfig(quant_format="int5")})
    yield mutate("config_bits_5.safetensors", meta={"quantization_config": qconfig(bits=5)})
    yield mutate("config_bits_string.safetensors", meta={"quantization_config": qconfig(bits="4")})
    yield mutate("config_group_48.safetensors", meta={"quantization_config": qconfig(group_size=48)})
    yield mutate("config_packing_v2.safetensors", meta={"quantization_config": qconfig(packing_version=2)})
    yield mutate("config_symmetric_missing.safetensors",
                 meta={"quantization_config": json.dumps({k: v for k, v in json.loads(qconfig()).items() if k != "symmetric"})})
    yield mutate("config_sym_with_zeros.safetensors", meta={"quantization_config": qconfig(symmetric=True)})
    yield mutate("no_quantization_config.safetensors", meta={"quantization_config": "null"})
    # int8 with outliers
    i8 = {f"{NAME}.qweight": np.full((4, 64), 128, np.uint8), f"{NAME}.scales": np.ones((4, 1), np.float32),
          f"{NAME}.outlier_cols": np.array([7, 3], np.int32), f"{NAME}.outlier_vals": np.ones((4, 2), np.float16)}
    yield "int8_outlier_cols_unsorted.safetensors", i8, {"quantization_config": qconfig(quant_format="int8", bits=8, group_size=0, symmetric=True)}
    i8b = dict(i8)
    i8b[f"{NAME}.outlier_cols"] = np.array([3, 7], np.int32)
    i8b[f"{NAME}.outlier_vals"] = np.ones((3, 2), np.float16)
    yield "int8_outlier_vals_wrong_shape.safetensors", i8b, {"quantization_config": qconfig(quant_format="int8", bits=8, group_size=0, symmetric=True)}
    nf = {f"{NAME}.qweight": pack(np.zeros((2, 64), np.uint8), 4), f"{NAME}.scales": np.array([[1.0], [-1.0]], np.float32)}
    yield "nf4_negative_absmax.safetensors", nf, {"quantization_config": qconfig(quant_format="nf4", group_size=64, symmetric=False)}
    t3 = valid(bits=3)
    t3[f"{NAME}.qweight"][0, -1] = 0xff  # codes 62, 63 and padding? 64 codes of 3 bits fill 24 bytes exactly
    t3[f"{NAME}.qweight"] = np.concatenate([t3[f"{NAME}.qweight"], np.zeros((4, 1), np.uint8)], 1)
    yield "int3_bad_width.safetensors", t3, {"quantization_config": qconfig(bits=3)}
    del pad, pad40


def seeds():
    yield "int4_asym_crit.safetensors", valid(), {"quantization_config": qconfig()}
    t3 = valid(bits=3, crit=False)
    yield "int3_asym.safetensors", t3, {"quantization_config": qconfig(bits=3)}
    s2 = valid(bits=2, crit=False)
    del s2[f"{NAME}.zeros"]
    s2[f"{NAME}.input_scale"] = np.linspace(0.5, 2, 64).astype(np.float32)
    yield "int2_sym_awq.safetensors", s2, {"quantization_config": qconfig(bits=2, symmetric=True)}
    i8 = {f"{NAME}.qweight": np.full((4, 64), 128, np.uint8), f"{NAME}.scales": np.ones((4, 1), np.float32),
          f"{NAME}.outlier_cols": np.array([3, 7], np.int32), f"{NAME}.outlier_vals": np.ones((4, 2), np.float16)}
    yield "int8_outliers.safetensors", i8, {"quantization_config": qconfig(quant_format="int8", bits=8, group_size=0, symmetric=True)}
    nf = {f"{NAME}.qweight": pack(np.arange(128).reshape(2, 64) % 16, 4), f"{NAME}.scales": np.array([[1.0], [0.5]], np.float32)}
    yield "nf4.safetensors", nf, {"quantization_config": qconfig(quant_format="nf4", group_size=64, symmetric=False)}


def main():
    for folder, gen in ((CORPUS, cases), (SEEDS, seeds)):
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):
            if f.endswith(".safetensors"):
                os.remove(os.path.join(folder, f))
        for name, tensors, meta in gen():
            meta = {k: v for k, v in meta.items() if v != "null"}
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                      os.path.join(folder, name), metadata=meta)


if __name__ == "__main__":
    main()
