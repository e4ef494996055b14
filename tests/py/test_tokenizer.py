"""Tokenizer reference tests: our encode/decode (driven through build/tools/tok_tool) must equal
Hugging Face `tokenizers` exactly, id for id and byte for byte, on tokenizers trained here (byte-level
BPE with the Llama-3 / GPT-2 / Qwen2 splits, SentencePiece-style BPE with byte fallback as
transformers' converters write it) and on the real Llama 2 tokenizer, over thousands of random
strings drawn fresh each run (the seed is printed and in every failure message)."""
import copy
import json
import os
import random
import subprocess
import time
import unicodedata

import pytest

from conftest import BUILD, ROOT, shared_data

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,  # noqa: E402
                        pre_tokenizers, processors, trainers)

TOOL = os.path.join(BUILD, "tools", "tok_tool")
N_STRINGS = 2000
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
ASCII_CASE_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
SPLIT_REGEXES = {"gpt2": GPT2_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT,
                 "llama3_ascii_case": LLAMA3_SPLIT.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", ASCII_CASE_CONTRACTIONS),
                 "qwen2_ascii_case": QWEN2_SPLIT.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", ASCII_CASE_CONTRACTIONS)}
CORPUS_DIR = os.path.join(ROOT, "tests", "corpus", "tokenizer")

# ---------------------------------------------------------------- random text

SCRIPT_RANGES = [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xFF), (0x391, 0x3A9), (0x3B1, 0x3C9),
                 (0x410, 0x44F), (0x5D0, 0x5EA), (0x627, 0x64A), (0x915, 0x939), (0xE01, 0xE2E),
                 (0x10D0, 0x10FA), (0x3041, 0x3096), (0x30A1, 0x30FA), (0x4E00, 0x9FFF),
                 (0xAC00, 0xD7A3), (0x1E00, 0x1EFF)]
MARKS = "\u0300\u0301\u0308\u0327\u093e\u094d\u0e31\u20dd\ufe0f\u200d"
EMOJI = ["😀", "🎉", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸", "1️⃣", "❤️", "🧑🏿‍💻", "👩‍❤️‍💋‍👨", "🫠"]
NUMBERS = "0123456789" * 4 + "٠١٢٣४५६०१२０１２²³¹ⅠⅡⅫ①②½¾"
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2009", "\u200b",
          "\x0b", "\x0c", "\x85", "\u2028", "\u1680", "\ufeff", " \n ", "\t \t"]
PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»—–…“”‘’·•€£¥§©®™°±×÷"
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'rE", "'Ve", "'LL",
                "'lL", "'D", "'ſ", "'x", "'", "''", "'1", "'ſt"]
WORDS = ["the", "quick", "brown", "fox", "don't", "We'll", "I'M", "hello", "world", "Hello",
         "tokenizer", "ab", "abc", "ing", "tion", "Привет", "мир", "你好", "世界", "こんにちは",
         "안녕하세요", "مرحبا", "שלום", "नमस्ते", "สวัสดี", "ελληνικά", "naïve", "café"]


def _assigned_code_points():
    """Code points assigned in Python's Unicode version: later additions are the one known
    difference from HF's Oniguruma tables (see scripts/gen_tokenizer_unicode.py)."""
    return [cp for cp in range(0x110000)
            if not 0xD800 <= cp <= 0xDFFF and unicodedata.category(chr(cp)) != "Cn"]


ASSIGNED = _assigned_code_points()


def _random_part(rng, added):
    r = rng.random()
    if r < 0.16:
        w = rng.choice(WORDS)
        return w.upper() if rng.random() < 0.1 else w
    if r < 0.24:
        return "".join(chr(rng.randint(*rng.choice(SCRIPT_RANGES))) for _ in range(rng.randint(1, 8)))
    if r < 0.32:
        return rng.choice(CONTRACTIONS)
    if r < 0.40:
        return "".join(rng.choice(NUMBERS) for _ in range(rng.randint(1, 9)))
    if r < 0.52:
        return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 3)))
    if r < 0.58:
        return "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 4)))
    if r < 0.64:
        return rng.choice(EMOJI)
    if r < 0.70:
        base = chr(rng.randint(*rng.choice(SCRIPT_RANGES))) if rng.random() < 0.7 else ""
        return base + "".join(rng.choice(MARKS) for _ in range(rng.randint(1, 3)))
    if r < 0.80 and added:
        tok = rng.choice(added)
        return rng.choice(["", " ", "  ", "\n"]) + tok + rng.choice(["", " ", "  ", "x"])
    if r < 0.88:
        return "".join(chr(rng.choice(ASSIGNED)) for _ in range(rng.randint(1, 4)))
    return "".join(chr(rng.randint(0, 0x7F)) for _ in range(rng.randint(1, 6)))


def random_texts(seed, n=N_STRINGS, added=()):
    """Varied strings: words of many scripts, CJK, emoji with ZWJ / modifiers, combining marks,
    whitespace runs (tabs, \\r, newlines, Unicode spaces), digit runs, contractions, added
    tokens mid-text, random assigned code points, control characters; plus fixed edge cases."""
    rng = random.Random(seed)
    fixed = ["", " ", "  ", "\n", "\n\n \n", "\t", "a", "'s", "'S", "'ſ", "Hello world", " Hello",
             "it's I'M we'LL", "12345678", "\r\n\r\n", "  x  ", "\x00", "😀" * 3, "e\u0301",
             "\u0301", "<0x41>", "▁", "▁▁a", " ▁ "] + [f"{a}{a}" for a in added]
    texts = list(fixed)
    while len(texts) < n:
        parts = [_random_part(rng, list(added)) for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 21]))]
        sep = rng.choice(["", "", " ", "\n"])
        texts.append(sep.join(parts))
    for _ in range(3):  # a few long ones: the merge heap and buffers at scale
        texts.append("".join(_random_part(rng, list(added)) for _ in range(2000)))
    return texts

# ---------------------------------------------------------------- our side


def _tool(args, stdin_lines):
    """Run tok_tool on a file of lines; returns its output lines."""
    assert os.path.exists(TOOL), f"{TOOL} missing: run make"
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tok_tool_{os.getpid()}_{time.time_ns()}")
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in stdin_lines))
    try:
        p = subprocess.run([TOOL, args[0], args[1], path, args[2]], capture_output=True, text=True,
                           timeout=600)
    finally:
        os.unlink(path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.split("\n")
    assert out[-1] == "" and len(out) == len(stdin_lines) + 1, "tok_tool output has the wrong length"
    return out[:-1]


def ours_encode(path, texts, add_special):
    lines = _tool(["encode", path, "1" if add_special else "0"], [t.encode().hex() for t in texts])
    return [line if line.startswith("ERR") else [int(x) for x in line.split()] for line in lines]


def ours_encode_bytes(path, blobs):
    return _tool(["encode", path, "0"], [b.hex() for b in blobs])


def ours_pre_tokenize(path, texts):
    lines = _tool(["pretok", path, "0"], [t.encode().hex() for t in texts])
    return [[bytes.fromhex(h).decode("utf-8") for h in line.split()] for line in lines]


def hf_pre_tokenize(hf, texts):
    return [[piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(t)] for t in texts]


def ours_decode(path, id_lists, skip_special):
    lines = _tool(["decode", path, "1" if skip_special else "0"],
                  [" ".join(map(str, ids)) for ids in id_lists])
    return [bytes.fromhex(line).decode("utf-8") for line in lines]


def compare(name, seed, texts, ours, ref, what):
    bad = [(t, o, r) for t, o, r in zip(texts, ours, ref) if o != r]
    msg = "\n".join(f"  {t!r}\n    ours {o}\n    HF   {r}" for t, o, r in bad[:5])
    assert not bad, f"{name}: {what}: {len(bad)} of {len(texts)} differ (seed {seed}):\n{msg}"


def check_encode_decode(name, path, hf, seed, added=(), n=N_STRINGS):
    """encode with and without special tokens, and decode of those ids with and without
    skip_special, all equal to HF on n random strings."""
    texts = random_texts(seed, n, added)
    if hf.pre_tokenizer is not None:
        compare(name, seed, texts, ours_pre_tokenize(path, texts), hf_pre_tokenize(hf, texts), "pre-tokenize")
    for add_special in (False, True):
        ref = [e.ids for e in hf.encode_batch(texts, add_special_tokens=add_special)]
        ours = ours_encode(path, texts, add_special)
        compare(name, seed, texts, ours, ref, f"encode(add_special={add_special})")
    for skip in (False, True):
        ref_text = hf.decode_batch(ref, skip_special_tokens=skip)
        compare(name, seed, texts, ours_decode(path, ref, skip), ref_text, f"decode(skip_special={skip})")
    return texts, ref


def check_decode_random_ids(name, path, hf, seed, n=600):
    """Random id sequences (byte tokens out of order, specials, ids past the vocabulary) decode
    as HF decodes them: exercises the lossy UTF-8 and byte-fallback paths."""
    rng = random.Random(seed)
    size = hf.get_vocab_size(with_added_tokens=True)
    seqs = [[rng.randrange(size + 3) for _ in range(rng.randint(0, 30))] for _ in range(n)]
    for skip in (False, True):
        ref = hf.decode_batch(seqs, skip_special_tokens=skip)
        compare(name, seed, seqs, ours_decode(path, seqs, skip), ref, f"decode random ids (skip={skip})")

# ---------------------------------------------------------------- tokenizers trained here


def training_corpus():
    rng = random.Random(12345)  # fixed: the models need not vary, the test strings do
    return [" ".join(_random_part(rng, []) for _ in range(rng.randint(3, 30))) for _ in range(4000)]


SPECIALS_LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                   "<|end_header_id|>"]


def train_byte_level(pre_tokenizer, specials, vocab_size=1200):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    return tok


def save(tok_or_json, directory, name):
    path = os.path.join(directory, name + ".json")
    if isinstance(tok_or_json, dict):
        with open(path, "w") as f:
            json.dump(tok_or_json, f, ensure_ascii=False)
    else:
        tok_or_json.save(path)
    return path, Tokenizer.from_file(path)


def legacy_merges(path):
    """Rewrite merges as "a b" strings (the older format, still common in the wild)."""
    with open(path) as f:
        j = json.load(f)
    j["model"]["merges"] = ["#version: 0.2"] + [" ".join(m) for m in j["model"]["merges"]]
    return j


@pytest.fixture(scope="module")
def byte_level_tokenizers(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok_bytelevel"))
    out = {}
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama3 = train_byte_level(split, SPECIALS_LLAMA3)
    bos = llama3.token_to_id("<|begin_of_text|>")
    llama3.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    llama3.add_tokens([AddedToken(" hello world", normalized=True),  # non-special, spans a split
                       AddedToken("<mask>", lstrip=True, rstrip=True, special=True, normalized=False),
                       AddedToken("cat", single_word=True, normalized=False),
                       AddedToken("数字", normalized=False)])
    out["llama3"] = save(llama3, d, "llama3")

    qwen = Tokenizer.from_str(llama3.to_str())
    qwen.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    qwen.post_processor = processors.ByteLevel(trim_offsets=False)
    out["qwen2"] = save(qwen, d, "qwen2")

    gpt2 = train_byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"])
    gpt2.post_processor = processors.ByteLevel(trim_offsets=True)
    path, _ = save(gpt2, d, "gpt2_pairs")
    out["gpt2"] = save(legacy_merges(path), d, "gpt2")

    roberta_like = Tokenizer.from_str(gpt2.to_str())
    roberta_like.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    roberta_like.add_special_tokens(["<s>", "</s>"])
    roberta_like.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", roberta_like.token_to_id("<s>")),
                                              ("</s>", roberta_like.token_to_id("</s>"))])
    out["gpt2_prefix_space"] = save(roberta_like, d, "gpt2_prefix_space")
    return out


BYTE_LEVEL_ADDED = {
    "llama3": SPECIALS_LLAMA3 + [" hello world", "<mask>", "cat", "数字"],
    "qwen2": SPECIALS_LLAMA3 + [" hello world", "<mask>", "cat"],
    "gpt2": ["<|endoftext|>"],
    "gpt2_prefix_space": ["<|endoftext|>", "<s>", "</s>"],
}


@pytest.mark.parametrize("name", list(BYTE_LEVEL_ADDED))
def test_byte_level_bpe_matches_hf(byte_level_tokenizers, name, rng_seed):
    path, hf = byte_level_tokenizers[name]
    check_encode_decode(name, path, hf, rng_seed, BYTE_LEVEL_ADDED[name])
    check_decode_random_ids(name, path, hf, rng_seed)

# ---------------------------------------------------------------- SentencePiece-style BPE


SP_SPECIALS = ["<unk>", "<s>", "</s>"]
SP_ADDED_SPECIAL = ["<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]


def train_sentencepiece_like():
    """A Llama-2-shaped vocabulary: <unk> <s> </s>, the 256 <0xNN> byte tokens, then BPE pieces
    learnt over '▁'-marked words (a small alphabet, so byte fallback is exercised)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=900, limit_alphabet=120, show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    learnt = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    return vocab, learnt["merges"]


def sp_json(vocab, merges, variant):
    """tokenizer.json as transformers' LlamaConverter (legacy / non-legacy) and GemmaConverter
    write it, plus a Metaspace-decoder variant and unk (no byte fallback) variants."""
    byte_fallback = variant not in ("unk_fused", "unk_unfused")
    model = {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": variant != "unk_unfused",
             "byte_fallback": byte_fallback, "ignore_merges": False, "vocab": vocab, "merges": merges}
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in SP_SPECIALS]
    for i, t in enumerate(SP_ADDED_SPECIAL):
        added.append({"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    added.append({"id": len(vocab) + len(SP_ADDED_SPECIAL), "content": "foo bar", "single_word": False,
                  "lstrip": False, "rstrip": False, "normalized": True, "special": False})
    replace = {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}
    strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    llama_decoder = {"type": "Sequence", "decoders": [replace, {"type": "ByteFallback"}, {"type": "Fuse"}, strip]}
    legacy_norm = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                       {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    j = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
         "normalizer": legacy_norm, "pre_tokenizer": None, "decoder": llama_decoder, "model": model,
         "post_processor": {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                     {"Sequence": {"id": "A", "type_id": 0}},
                                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                     {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}}
    if variant == "metaspace_first":
        j["normalizer"] = None
        j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    elif variant == "gemma":
        j["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        j["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                              "invert": False}
        j["decoder"] = {"type": "Sequence", "decoders": [replace, {"type": "ByteFallback"}, {"type": "Fuse"}]}
    elif variant == "metaspace_split":
        j["normalizer"] = None
        j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        j["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        j["post_processor"] = None
    return j


SP_VARIANTS = ["llama_legacy", "metaspace_first", "gemma", "metaspace_split", "unk_fused", "unk_unfused"]


@pytest.fixture(scope="module")
def sentencepiece_tokenizers(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok_sp"))
    vocab, merges = train_sentencepiece_like()
    return {v: save(sp_json(vocab, merges, v), d, v) for v in SP_VARIANTS}


@pytest.mark.parametrize("variant", SP_VARIANTS)
def test_sentencepiece_bpe_matches_hf(sentencepiece_tokenizers, variant, rng_seed):
    path, hf = sentencepiece_tokenizers[variant]
    n = N_STRINGS if variant in ("llama_legacy", "metaspace_first") else N_STRINGS // 2
    check_encode_decode(variant, path, hf, rng_seed, SP_SPECIALS + SP_ADDED_SPECIAL + ["foo bar"], n)
    check_decode_random_ids(variant, path, hf, rng_seed)


def test_byte_fallback_is_exercised(sentencepiece_tokenizers, rng_seed):
    """Guards the test itself: the random strings do reach byte fallback and unk."""
    path, hf = sentencepiece_tokenizers["llama_legacy"]
    texts = random_texts(rng_seed, 300)
    byte_ids = {hf.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    assert any(byte_ids & set(ids) for ids in ours_encode(path, texts, False))
    path, hf = sentencepiece_tokenizers["unk_fused"]
    assert any(0 in ids for ids in ours_encode(path, texts, False))

# ---------------------------------------------------------------- less common layouts and HF quirks


def _json(tok):
    return json.loads(tok.to_str())


def _quirk_variants(byte_level, sentencepiece):
    """tokenizer.json edits that exercise rarer paths, each still loadable by HF."""
    llama3 = _json(byte_level["llama3"][1])
    gpt2 = _json(byte_level["gpt2"][1])
    sp = _json(sentencepiece["llama_legacy"][1])
    out = {}

    j = copy.deepcopy(llama3)  # file ids disagree with HF's assignment, and new tokens reversed
    new = [t for t in j["added_tokens"] if t["content"] not in j["model"]["vocab"]]
    for t in new:
        t["id"] += 7
    j["added_tokens"] = [t for t in j["added_tokens"] if t not in new] + new[::-1]
    out["added_ids_reassigned"] = j

    j = copy.deepcopy(gpt2)  # a repeated merge takes the later rank
    j["model"]["merges"] = j["model"]["merges"] + j["model"]["merges"][1:40:3]
    out["duplicate_merges"] = j

    j = copy.deepcopy(llama3)
    j["model"]["ignore_merges"] = False
    j["decoder"] = None  # token strings joined with spaces
    j["post_processor"] = None
    out["no_ignore_merges_no_decoder"] = j

    j = copy.deepcopy(gpt2)
    j["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}
    out["bytelevel_prefix_no_regex"] = j

    j = copy.deepcopy(sp)  # some byte tokens missing: those bytes fall back to (fused) <unk>
    vocab = j["model"]["vocab"]
    for b in list(range(0x80, 0xC0, 3)) + [0x0A, 0xE4, 0xF0]:
        vocab[f"<junk{b:02X}>"] = vocab.pop(f"<0x{b:02X}>")
    out["partial_byte_fallback"] = j

    j = copy.deepcopy(sp)  # normalized added tokens with lstrip / rstrip / single_word
    j["added_tokens"] += [
        {"id": 0, "content": "wor", "single_word": True, "lstrip": False, "rstrip": False, "normalized": True, "special": False},
        {"id": 0, "content": " ab", "single_word": False, "lstrip": True, "rstrip": True, "normalized": True, "special": True},
        {"id": 0, "content": "<x>", "single_word": False, "lstrip": True, "rstrip": False, "normalized": False, "special": False}]
    out["normalized_added_tokens"] = j

    j = copy.deepcopy(sp)
    j["normalizer"] = None
    j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "◆", "prepend_scheme": "never", "split": True}
    j["decoder"] = {"type": "Metaspace", "replacement": "◆", "prepend_scheme": "never", "split": True}
    out["metaspace_other_char_never"] = j
    return out


QUIRKS = ["added_ids_reassigned", "duplicate_merges", "no_ignore_merges_no_decoder",
          "bytelevel_prefix_no_regex", "partial_byte_fallback", "normalized_added_tokens",
          "metaspace_other_char_never"]


@pytest.fixture(scope="module")
def quirk_tokenizers(byte_level_tokenizers, sentencepiece_tokenizers, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok_quirks"))
    variants = _quirk_variants(byte_level_tokenizers, sentencepiece_tokenizers)
    return {name: save(j, d, name) for name, j in variants.items()}


@pytest.mark.parametrize("name", QUIRKS)
def test_rarer_layouts_match_hf(quirk_tokenizers, name, rng_seed):
    path, hf = quirk_tokenizers[name]
    added = [t.content for t in hf.get_added_tokens_decoder().values()] + ["wor", " ab", "ab"]
    check_encode_decode(name, path, hf, rng_seed, added, n=400)
    check_decode_random_ids(name, path, hf, rng_seed, n=200)


def test_subword_prefix_and_suffix_match_hf(tmp_path, rng_seed):
    """continuing_subword_prefix / end_of_word_suffix: attached to characters and stripped from
    the right side of merges as HF does."""
    tok = Tokenizer(models.BPE(continuing_subword_prefix="##", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, continuing_subword_prefix="##", end_of_word_suffix="</w>",
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    path, hf = save(tok, str(tmp_path), "prefix_suffix")
    check_encode_decode("prefix_suffix", path, hf, rng_seed, n=400)


@pytest.mark.parametrize("regex", list(SPLIT_REGEXES))
def test_split_regexes_match_hf(byte_level_tokenizers, tmp_path, regex, rng_seed):
    """Every split regex we recognise, as a Split pre-tokenizer, cuts text as Oniguruma does."""
    j = _json(byte_level_tokenizers["gpt2"][1])
    j["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": SPLIT_REGEXES[regex]},
                          "behavior": "Isolated", "invert": False}
    path, hf = save(j, str(tmp_path), "split_" + regex)
    texts = random_texts(rng_seed, 1000)
    compare(regex, rng_seed, texts, ours_pre_tokenize(path, texts), hf_pre_tokenize(hf, texts), "pre-tokenize")


SPLIT_BEHAVIORS = ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"]


def test_split_behaviors_match_hf(byte_level_tokenizers, tmp_path, rng_seed):
    """Split with each delimiter behaviour, inverted or not, on a literal and on a regex."""
    base = _json(byte_level_tokenizers["gpt2"][1])
    texts = random_texts(rng_seed, 300)
    for pattern in ({"String": " "}, {"String": "e"}, {"String": "ab"}, {"Regex": LLAMA3_SPLIT}):
        for behavior in SPLIT_BEHAVIORS:
            for invert in (False, True):
                j = copy.deepcopy(base)
                j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": pattern, "behavior": behavior, "invert": invert},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
                path, hf = save(j, str(tmp_path), "split")
                compare(f"Split {pattern} {behavior} invert={invert}", rng_seed, texts,
                        ours_pre_tokenize(path, texts), hf_pre_tokenize(hf, texts), "pre-tokenize")


# ---------------------------------------------------------------- the real Llama 2 tokenizer


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """Llama 2's tokenizer.model converted by transformers (as LlamaTokenizer.from_pretrained
    does offline in transformers 5), and the legacy layout of the Llama-2-hf tokenizer.json built
    from the same vocabulary and merges. Written to a temporary directory only."""
    model_path = shared_data("llama2_tokenizer.model")
    transformers = pytest.importorskip("transformers")
    d = str(tmp_path_factory.mktemp("llama2"))
    os.symlink(model_path, os.path.join(d, "tokenizer.model"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    converted = json.loads(transformers.LlamaTokenizer.from_pretrained(d).backend_tokenizer.to_str())
    out = {"metaspace": save(converted, d, "llama2_metaspace")}
    legacy = json.loads(json.dumps(converted))
    legacy["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    legacy["pre_tokenizer"] = None
    legacy["model"]["unk_token"] = "<unk>"
    legacy["post_processor"] = {"type": "TemplateProcessing",
                                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                           {"Sequence": {"id": "A", "type_id": 0}}],
                                "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    out["legacy"] = save(legacy, d, "llama2_legacy")
    return model_path, out


@pytest.mark.parametrize("layout", ["legacy", "metaspace"])
def test_llama2_matches_hf(llama2, layout, rng_seed):
    _, tokenizers_by_layout = llama2
    path, hf = tokenizers_by_layout[layout]
    assert hf.get_vocab_size() == 32000
    check_encode_decode("llama2 " + layout, path, hf, rng_seed, ["<s>", "</s>", "<unk>"])
    check_decode_random_ids("llama2 " + layout, path, hf, rng_seed)


def test_llama2_matches_sentencepiece_where_hf_does(llama2, rng_seed):
    """sentencepiece itself as a second reference: where HF's conversion agrees with it (no
    special-token text, which sentencepiece does not parse), so do we; and it mostly agrees."""
    spm = pytest.importorskip("sentencepiece")
    model_path, tokenizers_by_layout = llama2
    path, hf = tokenizers_by_layout["legacy"]
    sp = spm.SentencePieceProcessor(model_file=model_path)
    texts = random_texts(rng_seed, N_STRINGS)
    ref_sp = [sp.encode(t) for t in texts]
    ref_hf = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    ours = ours_encode(path, texts, False)
    agree = [i for i in range(len(texts)) if ref_sp[i] == ref_hf[i]]
    assert len(agree) >= 0.8 * len(texts), f"HF and sentencepiece agree on only {len(agree)} (seed {rng_seed})"
    compare("llama2 vs sentencepiece", rng_seed, [texts[i] for i in agree], [ours[i] for i in agree],
            [ref_sp[i] for i in agree], "encode")


def test_llama2_loads_in_well_under_a_second(llama2):
    _, tokenizers_by_layout = llama2
    path, _ = tokenizers_by_layout["legacy"]
    t0 = time.time()
    p = subprocess.run([TOOL, "load", path], capture_output=True, text=True, timeout=60)
    elapsed = time.time() - t0
    assert p.returncode == 0 and p.stdout.strip() == "vocab_size 32000", p.stderr
    limit = 10.0 if "asan" in BUILD else 0.5  # sanitizers slow everything down ~10x
    assert elapsed < limit, f"loading 32k tokens + 61k merges took {elapsed:.2f} s"

# ---------------------------------------------------------------- every code point, every class


def test_every_code_point_splits_as_hf(byte_level_tokenizers):
    """Each assigned code point after an apostrophe, a letter, a digit, a space and before a
    letter (the contexts that decide the split regexes), pre-tokenized: checks our letter /
    number / space tables and the contraction case folding against Oniguruma's, for the
    Llama-3 and GPT-2 patterns (Qwen2's differs from Llama-3's only in digit grouping)."""
    texts = []
    for k in range(0, len(ASSIGNED), 256):
        texts.append("".join(f"'{c}a{c}1{c} {c}b" for c in map(chr, ASSIGNED[k:k + 256])))
    for name in ("llama3", "gpt2"):
        path, hf = byte_level_tokenizers[name]
        compare(name, 0, texts, ours_pre_tokenize(path, texts), hf_pre_tokenize(hf, texts),
                "pre-tokenize all code points")

def test_unicode_tables_are_generated_from_unicodedata():
    """src/tokenizer_unicode_data.c is exactly what its generator writes (no hand edits)."""
    with open(os.path.join(ROOT, "src", "tokenizer_unicode_data.c")) as f:
        committed = f.read()
    if f'(Unicode {unicodedata.unidata_version})' not in committed.split("\n")[0]:
        pytest.skip(f"this Python has Unicode {unicodedata.unidata_version}, the tables another")
    p = subprocess.run(["python3", os.path.join(ROOT, "scripts", "gen_tokenizer_unicode.py")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == committed


# ---------------------------------------------------------------- errors


def test_invalid_utf8_is_rejected(byte_level_tokenizers, rng_seed):
    path, _ = byte_level_tokenizers["llama3"]
    rng = random.Random(rng_seed)
    bad = [b"\xff", b"abc\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
           b"\xc0\xaf", b"ok \xf0\x9f\x98"]
    bad += [bytes(rng.randrange(256) for _ in range(8)) + b"\xfe" for _ in range(50)]
    lines = ours_encode_bytes(path, bad)
    for blob, line in zip(bad, lines):
        assert line.startswith("ERR ") and "UTF-8" in line, (blob, line)
    good = ours_encode_bytes(path, [b"caf\xc3\xa9", b"\xf0\x9f\x98\x80"])
    assert not any(line.startswith("ERR") for line in good)


def _expected_corpus_errors():
    """name -> (phrase the message must contain, "hf" if HF rejects the file too, else "ours")."""
    with open(os.path.join(CORPUS_DIR, "expected.txt")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return {name: (phrase, who) for name, phrase, who in rows}


def test_malformed_tokenizer_files_are_rejected_with_one_line_naming_the_file():
    expected = _expected_corpus_errors()
    files = sorted(f for f in os.listdir(CORPUS_DIR) if f.endswith(".json"))
    assert set(files) == set(expected), "tests/corpus/tokenizer/expected.txt is out of date"
    assert len(files) >= 20
    for name in files:
        path = os.path.join(CORPUS_DIR, name)
        p = subprocess.run([TOOL, "load", path], capture_output=True, text=True, timeout=60)
        lines = p.stderr.strip("\n").split("\n")
        assert p.returncode != 0, f"{name} was accepted"
        assert len(lines) == 1 and lines[0].startswith("resafe: error: "), f"{name}: {p.stderr!r}"
        assert path in lines[0], f"{name}: message does not name the file: {lines[0]}"
        assert expected[name][0] in lines[0], f"{name}: expected '{expected[name][0]}' in: {lines[0]}"


def test_corpus_labels_match_hf():
    """expected.txt says which files HF rejects too ("hf") and which are our own limits ("ours",
    e.g. unsupported components): both claims hold for the installed HF tokenizers."""
    for name, (_, who) in _expected_corpus_errors().items():
        with open(os.path.join(CORPUS_DIR, name), "rb") as f:
            data = f.read()
        try:
            Tokenizer.from_str(data.decode("utf-8"))
            hf_rejects = False
        except Exception:  # noqa: BLE001 -- any failure to load is a rejection
            hf_rejects = True
        assert hf_rejects == (who == "hf"), f"{name}: labelled '{who}' but HF rejects it: {hf_rejects}"
