"""safetensors against the reference implementation (the `safetensors` Python library and
transformers' save_pretrained): files they write are read by resafe exactly, files resafe writes
load in the reference library identically, and every file of the malformed corpus is refused
with one message naming it. Driven through build/tools/st_tool."""
import glob
import json
import os
import random
import re
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import BUILD, ROOT

CORPUS = sorted(glob.glob(os.path.join(ROOT, "tests", "corpus", "safetensors", "*.safetensors")))
# Files the reference reader accepts and resafe refuses on purpose: a NUL inside a tensor name,
# more dimensions than RS_MAX_DIMS, keys other than dtype/shape/data_offsets in an entry, a
# name given twice (the reference silently keeps one entry).
STRICTER_THAN_REFERENCE = {"nul_in_name", "too_many_dims", "unknown_key_in_entry", "duplicate_name_identical"}

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
FLOATS = ("F32", "F16", "BF16", "F64")


def st_tool(*args, check=True):
    p = subprocess.run([os.path.join(BUILD, "tools", "st_tool"), *map(str, args)],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, f"st_tool {args} failed: {p.stderr}"
    return p


def dump(path):
    return json.loads(st_tool("dump", path).stdout)


def raw_bytes(t):
    """The tensor's bytes in memory order, as a safetensors file holds them."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(rng, gen, dtype):
    shape = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(0, 4))]
    if dtype in FLOATS:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(TORCH_DTYPES[dtype]) * 3 + 0.5
    if dtype == "BOOL":
        return torch.randint(0, 2, shape, generator=gen).bool()
    lo, hi = (0, 256) if dtype == "U8" else (-100, 100)
    return torch.randint(lo, hi, shape, generator=gen, dtype=TORCH_DTYPES[dtype])


def random_tensors(seed, dtypes, n):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    names = rng.sample([f"model.layers.{i}.{p}" for i in range(20) for p in ("q.weight", "k.bias", "é")], n)
    tensors = {name: random_tensor(rng, gen, rng.choice(dtypes)) for name in names}
    # at least one 0-d and one empty tensor every run
    tensors["scalar"] = torch.tensor(rng.uniform(-2, 2), dtype=TORCH_DTYPES[rng.choice(FLOATS)])
    tensors["empty"] = torch.zeros([rng.randint(1, 4), 0], dtype=TORCH_DTYPES[rng.choice(FLOATS)])
    return tensors


def dtype_name(t):
    return next(k for k, v in TORCH_DTYPES.items() if v == t.dtype)


def check_matches(ours, expected):
    """ours: st_tool dump tensors by name; expected: torch tensors by name."""
    assert sorted(ours) == sorted(expected)
    for name, t in expected.items():
        got = ours[name]
        assert got["dtype"] == dtype_name(t), name
        assert got["shape"] == list(t.shape), name
        assert bytes.fromhex(got["hex"]) == raw_bytes(t), name
        if got["dtype"] in FLOATS:  # widening to fp32 is exact for bf16/f16; f64 rounds
            assert got["f32"] == t.float().reshape(-1).tolist(), name


def test_reference_written_file_reads_exactly(tmp_path, rng_seed):
    tensors = random_tensors(rng_seed, list(TORCH_DTYPES), 12)
    meta = {"format": "pt", "seed": str(rng_seed), "note": "h\u00e9llo"}
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata=meta)
    out = dump(path)
    check_matches({t["name"]: t for t in out["tensors"]}, tensors)
    assert out["metadata"] == meta
    assert [t["name"] for t in out["tensors"]] == sorted(tensors, key=lambda s: s.encode())


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    """A tiny random Llama saved by transformers in several shards, in a random float dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM
    seed = int(os.environ.get("RESAFE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"sharded model seed {seed} (replay with RESAFE_TEST_SEED={seed})")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(random.Random(seed).choice([torch.float32, torch.bfloat16, torch.float16]))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(str(path), max_shard_size="8KB")
    return path, {k: v.detach() for k, v in model.state_dict().items()}


def test_transformers_sharded_directory_reads_exactly(sharded_model):
    path, state = sharded_model
    index = json.load(open(path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1, "expected several shards"
    out = dump(path)
    ours = {t["name"]: t for t in out["tensors"]}
    check_matches(ours, state)
    for name, shard in index["weight_map"].items():
        assert ours[name]["file"] == shard
    # the index file itself names the model as well as its directory does
    assert dump(path / "model.safetensors.index.json")["tensors"] == out["tensors"]


def test_shard_missing_from_directory_is_refused(sharded_model, tmp_path):
    path, _ = sharded_model
    index = json.load(open(path / "model.safetensors.index.json"))
    victim = sorted(set(index["weight_map"].values()))[-1]
    for f in os.listdir(path):
        if f != victim:
            os.symlink(path / f, tmp_path / f)
    p = st_tool("dump", tmp_path, check=False)
    assert p.returncode != 0 and victim in p.stderr and "does not exist" in p.stderr


def test_our_file_loads_identically_in_reference_library(tmp_path, rng_seed):
    tensors = random_tensors(rng_seed + 1, list(TORCH_DTYPES), 10)
    meta = {"format": "pt", "written_by": "resafe", "seed": str(rng_seed)}
    spec = {"metadata": meta, "tensors": [{"name": k, "dtype": dtype_name(v), "shape": list(v.shape),
                                           "hex": raw_bytes(v).hex()} for k, v in tensors.items()]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    path = tmp_path / "ours.safetensors"
    st_tool("write", path, tmp_path / "spec.json")
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0, "header not padded to 8 bytes"
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f], "temporary left behind"


# Messages of the refusals listed in STRICTER_THAN_REFERENCE: with unsupported_dtype below, the
# only ways resafe may refuse a file the reference accepts.
STRICTER_MESSAGES = ("appears twice", "unknown key", "NUL character", "dimensions, at most")
UNSUPPORTED_DTYPE = re.compile(r": unsupported dtype '([^']*)'$")


def unsupported_dtype(verdict):
    """resafe reads the dtypes of TORCH_DTYPES only. The reference knows more (U16, U32, U64,
    F8_E4M3, F8_E5M2, F8_E8M0, F4, C64, ...; the list grows with its versions), and one edit makes
    some of them: 'I16' -> 'U16', 'F64' -> 'F4'; zero elements or an equal element size keep the
    offsets right, so the reference accepts the file. A refusal naming such a dtype is deliberate;
    naming one of ours it is a bug."""
    m = UNSUPPORTED_DTYPE.search(verdict)
    return m is not None and m.group(1) not in TORCH_DTYPES


def mutate(rng, data):
    """One random edit of a valid file: a header byte replaced by a JSON-ish character, a byte
    deleted or doubled, the length field nudged, or data bytes cut or added."""
    n = int.from_bytes(data[:8], "little")
    kind = rng.randrange(5)
    if kind == 4:
        return data[:-rng.randint(1, 3)] if rng.random() < 0.5 else data + b"\0" * rng.randint(1, 3)
    if kind == 3:
        return (n + rng.choice([-2, -1, 1, 2])).to_bytes(8, "little") + data[8:]
    i = rng.randrange(8, 8 + n)
    if kind == 0:
        return data[:i] + bytes([rng.choice(b'0123456789-.e"{}[],: aFSIU8\\\x01')]) + data[i + 1:]
    if kind == 1:
        return (n - 1).to_bytes(8, "little") + data[8:i] + data[i + 1:]
    return (n + 1).to_bytes(8, "little") + data[8:i] + data[i:i + 1] + data[i:]


def reference_accepts(path):
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:  # the reference raises several exception types
        return False


def test_random_edits_are_judged_like_the_reference(tmp_path, rng_seed):
    """Differential test: on random single edits of a valid file, resafe accepts exactly what the
    reference accepts, except for the deliberate refusals above."""
    rng = random.Random(rng_seed)
    base = tmp_path / "base.safetensors"
    save_file(random_tensors(rng_seed, list(TORCH_DTYPES), 4), str(base), metadata={"format": "pt"})
    data = base.read_bytes()
    paths = []
    for k in range(300):
        paths.append(tmp_path / f"m{k}.safetensors")
        paths[-1].write_bytes(mutate(rng, data))
    verdicts = st_tool("verdicts", *paths).stdout.splitlines()
    assert len(verdicts) == len(paths)
    n_refused = 0
    for path, verdict in zip(paths, verdicts):
        ref = reference_accepts(path)
        if verdict == "ok":
            assert ref, f"resafe accepts {path.name}, which the reference refuses: {path.read_bytes()[:300]!r}"
        else:
            n_refused += 1
            assert verdict.startswith(f"error: {path}: "), verdict
            assert not ref or any(m in verdict for m in STRICTER_MESSAGES) or unsupported_dtype(verdict), \
                f"reference accepts {path.name}: {verdict}"
    assert 0 < n_refused < len(paths), "edits should produce both valid and invalid files"


def test_corpus_is_complete():
    assert len(CORPUS) >= 30, "run tests/corpus/make_safetensors_corpus.py"


@pytest.mark.parametrize("path", CORPUS, ids=[os.path.basename(p) for p in CORPUS])
def test_corpus_file_is_refused_with_one_message_naming_it(path):
    name = os.path.basename(path)
    for mode in ("dump", "parse"):  # from the mapped file, and from memory
        p = st_tool(mode, path, check=False)
        lines = p.stderr.splitlines()
        assert p.returncode != 0 and p.stdout == "", f"{mode}: accepted {name}"
        assert len(lines) == 1 and lines[0].startswith("resafe: error: "), f"{mode}: {p.stderr!r}"
        assert name in lines[0], lines[0]


@pytest.mark.parametrize("path", CORPUS, ids=[os.path.basename(p) for p in CORPUS])
def test_corpus_file_is_refused_by_reference_too(path):
    stem = os.path.basename(path)[: -len(".safetensors")]
    try:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        accepted = True
    except Exception:  # the reference raises several exception types
        accepted = False
    assert accepted == (stem in STRICTER_THAN_REFERENCE), \
        f"reference {'accepts' if accepted else 'refuses'} {stem}; update STRICTER_THAN_REFERENCE?"
