#!/usr/bin/env python3
"""Generates tests/fuzz/seeds/tokenizer/: small valid tokenizer.json files (each < 200 KB) covering
the layouts the tokenizer supports, trained with HF tokenizers on a fixed text: byte-level BPE with
the Llama-3 / Qwen2 split and GPT-2 ByteLevel (pair and string merges), SentencePiece-style BPE
with byte fallback (legacy Prepend+Replace, Metaspace first / always+split, Gemma-like), added
tokens with lstrip / rstrip / single_word / normalized. Run: python3 tests/fuzz/gen_tokenizer_seeds.py"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "py"))
from test_tokenizer import (LLAMA3_SPLIT, QWEN2_SPLIT, SPLIT_REGEXES, sp_json,  # noqa: E402
                            train_byte_level, train_sentencepiece_like)
from tokenizers import AddedToken, Regex, pre_tokenizers, processors  # noqa: E402

OUT = os.path.join(HERE, "seeds", "tokenizer")


def write(name, j):
    data = json.dumps(j, ensure_ascii=False, separators=(",", ":")).encode()
    assert len(data) < 200_000, f"{name}: {len(data)} bytes"
    with open(os.path.join(OUT, name + ".json"), "wb") as f:
        f.write(data)


def main():
    os.makedirs(OUT, exist_ok=True)
    random.seed(0)
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama3 = train_byte_level(split, ["<|begin_of_text|>", "<|eot_id|>"], vocab_size=400)
    llama3.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", llama3.token_to_id("<|begin_of_text|>"))])])
    llama3.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, special=True, normalized=False),
                       AddedToken("cat", single_word=True, normalized=False)])
    j = json.loads(llama3.to_str())
    write("llama3_split", j)
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_SPLIT
    write("qwen2_split", j)
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = SPLIT_REGEXES["llama3_ascii_case"]
    write("llama3_ascii_case_split", j)
    gpt2 = train_byte_level(pre_tokenizers.ByteLevel(add_prefix_space=True), ["<|endoftext|>"], vocab_size=400)
    j = json.loads(gpt2.to_str())
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
    write("gpt2_bytelevel", j)
    vocab, merges = train_sentencepiece_like()
    vocab = {k: v for k, v in vocab.items() if v < 600}
    merges = [m for m in merges if all(p in vocab for p in m) and "".join(m) in vocab]
    for variant in ("llama_legacy", "metaspace_first", "gemma", "metaspace_split", "unk_fused"):
        write("sp_" + variant, sp_json(vocab, merges, variant))


if __name__ == "__main__":
    main()
