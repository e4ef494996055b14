#!/usr/bin/env python3
"""Generates tests/corpus/tokenizer/: malformed or unsupported tokenizer.json files, each of which
resafe must reject with one line naming the file, and expected.txt with, per file, a phrase the
message must contain and who rejects it: "hf" when Hugging Face tokenizers rejects it too (checked
here against the installed version), "ours" for a deliberate limit of resafe (unsupported
component, or a check HF does not make). Run: python3 tests/corpus/gen_tokenizer_corpus.py"""
import copy
import json
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")

BASE = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": 4, "content": "<s>", "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {"<s>": {"id": "<s>", "ids": [4], "tokens": ["<s>"]}}},
    "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3, "<s>": 4}, "merges": [["a", "b"]]},
}


def variant(**edits):
    """BASE with dotted-path edits: {"model.vocab": {...}}; the value None deletes the key."""
    j = copy.deepcopy(BASE)
    for path, value in edits.items():
        keys = path.split("__")
        node = j
        for k in keys[:-1]:
            node = node[k]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return j


DELETE = object()


def nested_sequence(depth):
    node = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    for _ in range(depth):
        node = {"type": "Sequence", "pretokenizers": [node]}
    return node


CASES = [
    # name, content (dict -> JSON, str/bytes -> raw), phrase in the message
    ("bad_json", '{"model": ', "not valid JSON"),
    ("empty_file", "", "not valid JSON"),
    ("trailing_garbage", json.dumps(BASE) + " xx", "unexpected data after the JSON value"),
    ("top_level_array", "[1, 2]", "expected a JSON object at the top level"),
    ("invalid_utf8", b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"\xff": 0}, "merges": []}}', "not valid UTF-8"),
    ("nul_escape", variant(model__vocab={"a": 0, "b": 1, "ab": 2, "c": 3, "<s>": 4, "x\\u0000": 5}), "\\u0000"),
    ("version_2", variant(version="2.0"), "unknown tokenizer version"),
    ("no_model", variant(model=DELETE), "no model"),
    ("model_not_object", variant(model=5), "model: expected an object"),
    ("unknown_model_type", variant(model__type="Foo"), "model: unknown type 'Foo'"),
    ("wordpiece_model", variant(model={"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                                       "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0, "a": 1, "<s>": 2}}),
     "model: type 'WordPiece' is not supported"),
    ("unigram_model", variant(model={"type": "Unigram", "unk_id": 0, "byte_fallback": False,
                                     "vocab": [["<unk>", 0.0], ["a", -1.0], ["<s>", -2.0]]}),
     "model: type 'Unigram' is not supported"),
    ("vocab_not_object", variant(model__vocab=["a", "b"]), "model.vocab: expected an object"),
    ("vocab_empty", variant(model__vocab={}, model__merges=[], added_tokens=[], post_processor=None), "model.vocab: 0 entries"),
    ("vocab_id_string", variant(model__vocab={"a": "0", "b": 1, "ab": 2}), "expected an integer"),
    ("vocab_id_fraction", variant(model__vocab={"a": 0.5, "b": 1, "ab": 2}), "expected an integer"),
    ("vocab_id_negative", variant(model__vocab={"a": -1, "b": 1, "ab": 2}), "out of range"),
    ("vocab_id_huge", variant(model__vocab={"a": 1e300, "b": 1, "ab": 2}), "out of range"),
    ("vocab_id_gap", variant(model__vocab={"a": 0, "b": 1, "ab": 2, "c": 3, "<s>": 70000}), "out of range"),
    ("vocab_duplicate_id", variant(model__vocab={"a": 0, "b": 0, "ab": 2, "c": 3, "<s>": 4}), "is also used by"),
    ("missing_merges", variant(model__merges=DELETE), "model.merges: expected an array"),
    ("merges_not_array", variant(model__merges="a b"), "model.merges: expected an array"),
    ("merge_unknown_token", variant(model__merges=[["a", "z"]]), "'z' is not in the vocabulary"),
    ("merge_unknown_token_newline", variant(model__merges=[["a", "z\nq"]]), "'z\\x0aq' is not in the vocabulary"),
    ("merge_result_unknown", variant(model__merges=[["b", "a"]]), "'ba' is not in the vocabulary"),
    ("merge_three_parts", variant(model__merges=["a b c"]), "is not two tokens separated by one space"),
    ("merge_pair_wrong_type", variant(model__merges=[["a", 1]]), "expected a pair of strings"),
    ("merges_mixed_formats", variant(model__merges=[["a", "b"], "a b"]), "expected a pair of strings"),
    ("dropout", variant(model__dropout=0.1), "dropout"),
    ("unk_not_string", variant(model__unk_token=5), "model.unk_token: expected a string"),
    ("byte_fallback_not_bool", variant(model__byte_fallback="yes"), "model.byte_fallback: expected true or false"),
    ("added_tokens_not_array", variant(added_tokens={"<s>": 4}), "added_tokens: expected an array"),
    ("added_token_no_content", variant(added_tokens=[{"id": 4, "special": True}]), "added_tokens[0].content: missing"),
    ("added_token_bad_id", variant(added_tokens=[{"id": "x", "content": "<s>"}]), "expected an integer"),
    ("normalizer_nfkc", variant(normalizer={"type": "NFKC"}), "normalizer: type 'NFKC' is not supported"),
    ("normalizer_unknown", variant(normalizer={"type": "Bogus"}), "normalizer: type 'Bogus' is not supported"),
    ("normalizer_replace_regex", variant(normalizer={"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"}),
     "Regex patterns are not supported"),
    ("pre_tokenizer_whitespace", variant(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer: type 'Whitespace' is not supported"),
    ("split_unknown_regex", variant(pre_tokenizer={"type": "Split", "pattern": {"Regex": "\\d+"}, "behavior": "Isolated", "invert": False}),
     "regex '\\d+' is not supported"),
    ("split_bad_behavior", variant(pre_tokenizer={"type": "Split", "pattern": {"String": " "}, "behavior": "Sideways", "invert": False}),
     "unknown value 'Sideways'"),
    ("metaspace_two_chars", variant(pre_tokenizer={"type": "Metaspace", "replacement": "ab", "prepend_scheme": "always", "split": True}),
     "expected a single character"),
    ("metaspace_bad_scheme", variant(pre_tokenizer={"type": "Metaspace", "replacement": "_", "prepend_scheme": "sometimes", "split": True}),
     "unknown value 'sometimes'"),
    ("sequence_too_deep", variant(pre_tokenizer=nested_sequence(12)), "nested too deeply"),
    ("decoder_wordpiece", variant(decoder={"type": "WordPiece", "prefix": "##", "cleanup": True}), "decoder: type 'WordPiece' is not supported"),
    ("decoder_strip_negative", variant(decoder={"type": "Strip", "content": " ", "start": -1, "stop": 0}), "out of range"),
    ("decoder_strip_two_chars", variant(decoder={"type": "Strip", "content": "ab", "start": 1, "stop": 0}), "expected a single character"),
    ("post_processor_bert", variant(post_processor={"type": "BertProcessing", "sep": ["<s>", 4], "cls": ["<s>", 4]}),
     "post_processor: type 'BertProcessing' is not supported"),
    ("template_missing_special", variant(post_processor__special_tokens={}), "is not in special_tokens"),
    ("template_id_out_of_range", variant(post_processor__special_tokens={"<s>": {"id": "<s>", "ids": [99999], "tokens": ["<s>"]}}),
     "out of range"),
    ("template_single_uses_b", variant(post_processor__single=[{"Sequence": {"id": "B", "type_id": 0}}]), "uses $B"),
    ("template_not_array", variant(post_processor__single="$A"), "expected a non-empty array"),
]


def hf_rejects(data):
    from tokenizers import Tokenizer
    try:
        Tokenizer.from_str(data.decode("utf-8"))
        return False
    except Exception:  # noqa: BLE001 -- any failure to load counts as a rejection
        return True


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.unlink(os.path.join(OUT, f))
    rows = []
    for name, content, phrase in CASES:
        if isinstance(content, dict):
            data = json.dumps(content, ensure_ascii=False, indent=1).encode()
            data = data.replace(b"\\\\u0000", b"\\u0000")  # the escape itself, not a backslash
        elif isinstance(content, str):
            data = content.encode()
        else:
            data = content
        with open(os.path.join(OUT, name + ".json"), "wb") as f:
            f.write(data)
        rows.append(f"{name}.json\t{phrase}\t{'hf' if hf_rejects(data) else 'ours'}\n")
    with open(os.path.join(OUT, "expected.txt"), "w") as f:
        f.writelines(rows)


if __name__ == "__main__":
    main()
