#!/usr/bin/env python3
"""Writes tests/corpus/safetensors/*.safetensors: small hand-made files that a safetensors reader
must refuse, one defect each (the file name says which). Run from anywhere; the outputs are
committed. tests/py/test_safetensors.py checks that resafe refuses every one with one message
naming the file, and that the reference library refuses them too (except where resafe is
deliberately stricter, listed there)."""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "safetensors")


def image(header, data=b"", length=None):
    """8-byte little-endian header length, header bytes, data bytes."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def t(dtype="F32", shape=(1,), offsets=(0, 4), **extra):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


D4 = b"\x11\x22\x33\x44"
D8 = D4 * 2

CASES = {
    "empty": b"",
    "short_length_field": b"\x05\x00\x00",
    "length_exceeds_file": image({"a": t()}, D4, length=1000),
    "length_over_100MB_cap": image({"a": t()}, D4, length=200_000_000),
    "bad_json": image('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]', D4),
    "not_object_header": image("[1, 2]"),
    "trailing_garbage": image('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x', D4),
    "nul_padding": image('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}\0\0\0', D4),
    "invalid_utf8": image(b'{"a\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D4),
    "bad_dtype": image({"a": t(dtype="F33")}, D4),
    "dtype_not_string": image({"a": t(dtype=4)}, D4),
    "negative_shape": image({"a": t(shape=(-1,))}, D4),
    "float_shape": image({"a": t(shape=(1.5,))}, D4),
    "float_integral_shape": image('{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', D4),
    "string_shape": image({"a": t(shape=("1",))}, D4),
    "shape_not_array": image({"a": t() | {"shape": 1}}, D4),
    "huge_shape_entry": image('{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]}}', b"x"),
    "shape_product_overflow": image({"a": t(dtype="U8", shape=(2**32, 2**32, 2**32), offsets=(0, 1))}, b"x"),
    "offsets_out_of_range": image({"a": t(offsets=(0, 99))}, D4),
    "offsets_reversed": image({"a": t(offsets=(4, 0))}, D4),
    "offsets_one_value": image({"a": t(offsets=(0,))}, D4),
    "offsets_negative": image({"a": t(offsets=(-4, 0))}, D4),
    "offsets_exponent": image('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4e0]}}', D4),
    "size_mismatch": image({"a": t(shape=(2,), offsets=(0, 4))}, D4),
    "overlapping_tensors": image({"a": t(offsets=(0, 4)), "b": t(offsets=(2, 6))}, D8[:6]),
    "gap_between_tensors": image({"a": t(offsets=(4, 8))}, D8),
    "trailing_data": image({"a": t()}, D8),
    "duplicate_name": image('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                            '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', D8),
    "duplicate_key_in_entry": image('{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}', D4),
    "entry_not_object": image({"a": [0, 4]}, D4),
    "missing_data_offsets": image({"a": {"dtype": "F32", "shape": [1]}}, D4),
    "metadata_not_strings": image({"__metadata__": {"step": 3}, "a": t()}, D4),
    "metadata_not_object": image({"__metadata__": ["x"], "a": t()}, D4),
    "unknown_key_in_entry": image({"a": t(extra=1)}, D4),
    "too_many_dims": image({"a": t(dtype="U8", shape=(1,) * 9, offsets=(0, 1))}, b"x"),
    "nul_in_name": image('{"a\\u0000b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D4),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in CASES.items():
        with open(os.path.join(OUT, name + ".safetensors"), "wb") as f:
            f.write(data)
    print(f"wrote {len(CASES)} files to {OUT}")


if __name__ == "__main__":
    main()
