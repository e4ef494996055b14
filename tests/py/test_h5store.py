"""h5store against h5py (an independent HDF5 binding): files resafe writes read identically in
h5py (datasets, strings, attributes, groups), files h5py writes read identically in resafe, and an
uncommitted file leaves nothing behind. Driven through build/tools/h5_tool."""
import json
import os
import subprocess

import h5py
import numpy as np
import pytest

from conftest import BUILD

NUMPY = {"F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
         "I64": np.int64, "U8": np.uint8}
STRING_PIECES = ["a", "Z", " ", "\u00e9", "\u20ac", "\U0001f642", "\\", '"', "\n", "q_proj"]


def h5_tool(*args, check=True):
    p = subprocess.run([os.path.join(BUILD, "tools", "h5_tool"), *map(str, args)],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, f"h5_tool {args} failed: {p.stderr}"
    return p


def random_array(rng, dtype):
    shape = tuple(int(d) for d in rng.integers(0, 5, size=rng.integers(0, 5)))
    if dtype in ("F32", "F64"):
        return (rng.standard_normal(shape) * 2 + 0.25).astype(NUMPY[dtype])
    info = np.iinfo(NUMPY[dtype])
    return rng.integers(info.min, info.max, size=shape, dtype=NUMPY[dtype], endpoint=True)


def random_string(rng):
    return "".join(rng.choice(STRING_PIECES, size=rng.integers(0, 10)))


def random_content(seed):
    """Datasets at nested paths (every dtype), a string list, attributes of every type."""
    rng = np.random.default_rng(seed)
    groups = ["", "lora/", "lora/layers.0.q_proj/", "masks/m/"]
    arrays = {f"{groups[rng.integers(4)]}{d.lower()}_{i}": random_array(rng, d)
              for i, d in enumerate(list(NUMPY) * 2)}
    strings = [random_string(rng) for _ in range(rng.integers(1, 8))]
    attrs = {"/": {"version": random_string(rng), "step": int(rng.integers(-2**62, 2**62)),
                   "lr": float(rng.standard_normal())},
             next(iter(arrays)): {"rank": int(rng.integers(1, 64))}}
    return arrays, strings, attrs


def test_our_file_reads_identically_in_h5py(tmp_path, rng_seed):
    arrays, strings, attrs = random_content(rng_seed)
    spec = {"groups": ["cfg/empty"],
            "datasets": [{"path": k, "dtype": next(d for d, t in NUMPY.items() if t == v.dtype),
                          "shape": list(v.shape), "hex": v.tobytes().hex()} for k, v in arrays.items()]
            + [{"path": "patch/prompts", "strings": strings}],
            "attrs": [{"object": obj, "name": n, **({"str": v} if isinstance(v, str) else
                                                    {"i64": str(v)} if isinstance(v, int) else {"f64": v})}
                      for obj, d in attrs.items() for n, v in d.items()]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    path = tmp_path / "ours.h5"
    h5_tool("write", path, tmp_path / "spec.json")
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f], "temporary left behind"
    with h5py.File(path, "r") as f:
        for name, a in arrays.items():
            assert f[name].dtype == a.dtype and f[name].shape == a.shape, name
            assert np.array_equal(f[name][()], a), name
        assert list(f["patch/prompts"].asstr()[()]) == strings
        assert isinstance(f["cfg/empty"], h5py.Group)
        for obj, d in attrs.items():
            assert dict(f[obj].attrs) == d, obj


def test_h5py_file_reads_identically_in_resafe(tmp_path, rng_seed):
    arrays, strings, attrs = random_content(rng_seed + 1)
    path = tmp_path / "theirs.h5"
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            f.create_dataset(name, data=a)
        f.create_dataset("patch/prompts", data=strings, dtype=h5py.string_dtype())
        f.create_dataset("patch/fixed", data=np.array([s.encode() for s in strings], dtype="S"))
        f.create_group("cfg/dpo").attrs["beta"] = 0.1
        for obj, d in attrs.items():
            for n, v in d.items():
                f[obj].attrs[n] = v
        f["cfg/dpo"].attrs["bytes"] = np.bytes_(b"fixed-length")
        f.create_dataset("other/compound", data=np.zeros(2, dtype=[("x", "i4"), ("y", "f4")]))
    out = json.loads(h5_tool("dump", path, "cfg/dpo").stdout)
    ours = {d["path"]: d for d in out["datasets"]}
    assert sorted(ours) == sorted(list(arrays) + ["patch/prompts", "patch/fixed", "other/compound"])
    for name, a in arrays.items():
        assert ours[name]["kind"] == "numbers" and NUMPY[ours[name]["dtype"]] == a.dtype, name
        assert ours[name]["shape"] == list(a.shape), name
        assert bytes.fromhex(ours[name]["hex"]) == a.tobytes(), name
    assert ours["patch/prompts"]["strings"] == strings
    assert ours["patch/fixed"]["strings"] == strings
    assert ours["other/compound"]["kind"] == "other"
    for obj, d in attrs.items():
        got = out["attrs"][obj]
        for n, v in d.items():
            key = "str" if isinstance(v, str) else "i64" if isinstance(v, int) else "f64"
            assert got[n] == {key: str(v) if key == "i64" else v}, (obj, n)
    assert out["attrs"]["cfg/dpo"] == {"beta": {"f64": 0.1}, "bytes": {"str": "fixed-length"}}


def test_read_with_wrong_expectations_names_file_and_dataset(tmp_path, rng_seed):
    rng = np.random.default_rng(rng_seed)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f["lora/A"] = a
    assert bytes.fromhex(h5_tool("read", path, "lora/A", "F32", "3,4").stdout.strip()) == a.tobytes()
    for args, expect in [(("lora/A", "F32", "4,3"), "has shape [3, 4], expected [4, 3]"),
                         (("lora/A", "F64", "3,4"), "holds F32, expected F64"),
                         (("lora/B", "F32", "3,4"), "dataset 'lora/B' does not exist")]:
        p = h5_tool("read", path, *args, check=False)
        lines = p.stderr.splitlines()
        assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("resafe: error: "), p.stderr
        assert "w.h5" in lines[0] and expect in lines[0], lines[0]


@pytest.mark.parametrize("fail", [False, True], ids=["closed_without_commit", "failed_midway"])
def test_unfinished_file_leaves_nothing(tmp_path, fail):
    spec = {"datasets": [{"path": "a", "dtype": "F32", "shape": [1], "hex": "0000c03f"}]
            + ([{"path": "a", "dtype": "F32", "shape": [1], "hex": "0000c03f"}] if fail else []),
            "commit": fail}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    p = h5_tool("write", tmp_path / "out.h5", tmp_path / "spec.json", check=False)
    assert (p.returncode != 0) == fail, p.stderr
    if fail:
        assert "out.h5: dataset 'a' already exists" in p.stderr
    assert os.listdir(tmp_path) == ["spec.json"]
