"""Chat templates: rs_chat_render against transformers' apply_chat_template on each family's
official Jinja template (quoted below as it appears in the model's tokenizer_config.json),
byte for byte, on random conversations; rs_chat_encode against apply_chat_template(tokenize=True);
rs_chat_detect on model directories laid out as transformers writes them."""
import json
import os
import random
import subprocess

import jinja2
import pytest

from conftest import BUILD, SHARED

CHAT_TOOL = os.path.join(BUILD, "tools", "chat_tool")

# ---------------------------------------------------------------- the official templates
# Each is the JSON string literal of "chat_template" in the family's tokenizer_config.json,
# decoded with json.loads so the escapes are exactly those of the file.

# meta-llama/Llama-2-7b-chat-hf
LLAMA2 = json.loads(r'''"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"''')

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = json.loads(r'''"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"''')

# google/gemma-7b-it and gemma-2-*-it: raises on a system message
GEMMA2 = json.loads(r'''"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"''')

# google/gemma-3-*-it: the system text prefixes the first user turn (what resafe renders)
GEMMA3 = json.loads(r'''"{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"''')

# mistralai/Mistral-7B-Instruct-v0.2 (and v0.1, Mixtral-8x7B-Instruct-v0.1): the current template,
# which accepts a leading system message
MISTRAL = json.loads(r'''"{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n"''')

# mistralai/Mistral-7B-Instruct-v0.1 as first released (no system role): detection only
MISTRAL_V01_ORIGINAL = json.loads(r'''"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"''')

# Qwen/Qwen2-7B-Instruct
CHATML = json.loads(r'''"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"''')

FAMILIES = {
    # kind: (template, special tokens as in the family's tokenizer_config.json)
    "llama-2": (LLAMA2, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
    "llama-3": (LLAMA3, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")),
    "gemma": (GEMMA3, dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                           pad_token="<pad>")),
    "mistral": (MISTRAL, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
    "chatml": (CHATML, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")),
}

# ---------------------------------------------------------------- random conversations

# Python's str.isspace() set (what Jinja's trim and str.strip() remove) and look-alikes they keep
PY_SPACES = [chr(c) for c in range(0x110000) if chr(c).isspace()]
NOT_SPACES = ["\u200b", "\u2060", "\ufeff", "\u180e", "\u00ad", "\u034f"]
WORDS = ["hello", "world", "How", "do", "I", "bake", "bread?", "Sure.", "Here", "is", "how",
         "to", "1234567", "3.14", "naïve", "café", "Straße", "日本語", "中文字符", "Привет", "مرحبا",
         "שלום", "ελληνικά", "😀", "👩‍💻", "🇫🇷", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "e\u0301", "'s", "don't",
         "[INST]", "[/INST]", "<<SYS>>", "<s>", "</s>", "<|im_end|>", "<|eot_id|>", "<bos>",
         "<start_of_turn>", "{{ x }}", "{% raw %}", "\\n", "'", '"', "\\", "\t", "--", "...",
         "#", "$x$", "<b>"]


def rand_space(rng):
    return rng.choice([" ", " ", "\n", "\n\n", "\t", "\r\n"] + PY_SPACES + NOT_SPACES)


def rand_text(rng, words=WORDS):
    r = rng.random()
    if r < 0.05:
        return ""
    if r < 0.10:
        return "".join(rand_space(rng) for _ in range(rng.randint(1, 4)))
    parts = [rand_space(rng) for _ in range(rng.choice([0, 0, 1, 2, 3]))]
    for i in range(rng.randint(1, 12)):
        if i:
            parts.append(rng.choice([" ", " ", " ", "\n", "  ", rand_space(rng)]))
        parts.append(rng.choice(words))
    parts += [rand_space(rng) for _ in range(rng.choice([0, 0, 1, 2, 3]))]
    return "".join(parts)


def rand_conversation(rng, valid_only=False, words=WORDS):
    """Mostly well-formed conversations (optional system, alternating user/assistant); with
    valid_only False, a fifth get their roles perturbed so the templates' checks fire."""
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": rand_text(rng, words)})
    for i in range(rng.randint(1, 6)):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant",
                     "content": rand_text(rng, words)})
    if not valid_only and rng.random() < 0.2:
        op = rng.randrange(4)
        roles = ["system", "user", "assistant", "tool", "Système", ""]
        if op == 0:
            msgs[rng.randrange(len(msgs))]["role"] = rng.choice(roles)
        elif op == 1:
            msgs.insert(rng.randint(0, len(msgs)),
                        {"role": rng.choice(roles), "content": rand_text(rng, words)})
        elif op == 2 and len(msgs) > 1:
            del msgs[rng.randrange(len(msgs))]
        else:
            msgs.reverse()
    if not valid_only and rng.random() < 0.01:
        msgs = []
    return msgs


# ---------------------------------------------------------------- references and our side

def hf_wrap(backend, specials):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def tiny_hf_tokenizer(specials):
    """A tokenizer that only knows the special tokens: rendering needs no vocabulary."""
    from tokenizers import Tokenizer, models
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(["<unk>", *specials.values()]))}
    return hf_wrap(Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), specials)


def hf_render(hf_tok, template, msgs, add_generation_prompt):
    """apply_chat_template(tokenize=False); ("error", message) where the template refuses."""
    try:
        return ("text", hf_tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt))
    except (jinja2.TemplateError, ValueError) as e:
        return ("error", str(e))


def hf_ids(hf_tok, template, msgs, add_generation_prompt):
    out = hf_tok.apply_chat_template(msgs, chat_template=template, tokenize=True,
                                     add_generation_prompt=add_generation_prompt)
    if not isinstance(out, list):  # transformers 5 returns a BatchEncoding (return_dict=True)
        out = out["input_ids"]
    return list(out)


def run_tool(tmp_path, mode, cases, *args):
    path = tmp_path / f"cases_{mode}.json"
    path.write_text(json.dumps(cases, ensure_ascii=False), encoding="utf-8")
    p = subprocess.run([CHAT_TOOL, mode, *map(str, args), str(path)], capture_output=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")
    results = json.loads(p.stdout.decode("utf-8"))
    assert len(results) == len(cases)
    return results


def ours_render(tmp_path, cases):
    """[(kind, msgs, add_generation_prompt)] -> [("text", s) | ("error", message)]"""
    out = run_tool(tmp_path, "render", [
        {"kind": k, "messages": m, "add_generation_prompt": g} for k, m, g in cases])
    return [("text", r["text"]) if "text" in r else ("error", r["error"]) for r in out]


def describe(kind, msgs, gen, want, got):
    return (f"{kind} add_generation_prompt={gen}\n  messages={msgs!r}\n  transformers: {want!r}\n"
            f"  resafe:       {got!r}")


# ---------------------------------------------------------------- rendering tests

@pytest.mark.parametrize("kind", list(FAMILIES))
def test_render_equals_apply_chat_template_on_random_conversations(kind, tmp_path, rng_seed):
    template, specials = FAMILIES[kind]
    hf_tok = tiny_hf_tokenizer(specials)
    rng = random.Random(rng_seed)
    cases = [(kind, rand_conversation(rng), rng.random() < 0.5) for _ in range(300)]
    want = [hf_render(hf_tok, template, m, g) for _, m, g in cases]
    got = ours_render(tmp_path, cases)
    bad = [describe(k, m, g, w, o) for (k, m, g), w, o in zip(cases, want, got)
           if w[0] != o[0] or (w[0] == "text" and w[1] != o[1])]
    assert not bad, f"{len(bad)} of {len(cases)} differ; first ones:\n" + "\n".join(bad[:3])
    n_err = sum(w[0] == "error" for w in want)
    assert n_err < len(cases) // 2, "too few renderable conversations to mean anything"
    print(f"{kind}: {len(cases)} conversations, {n_err} refused by the template and by us")


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_render_edge_cases_and_errors_where_the_template_raises(kind, tmp_path):
    template, specials = FAMILIES[kind]
    hf_tok = tiny_hf_tokenizer(specials)
    blanks = ["", " ", "\n\n", "\u3000 \t"]
    convs = [[{"role": "system", "content": s}, {"role": "user", "content": u},
              {"role": "assistant", "content": a}] for s in blanks for u in blanks for a in blanks]
    convs += [[{"role": "user", "content": u}] for u in blanks]
    convs += [
        [{"role": "system", "content": "only a system message"}],
        [{"role": "user", "content": "u"}, {"role": "", "content": "empty role"}],
        [{"role": "user", "content": "u"}, {"role": "Système", "content": "ünïcode role"}],
        [],
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "u"}, {"role": "user", "content": "u"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}],
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
         {"role": "system", "content": "s"}],
        [{"role": "system", "content": "s"}, {"role": "system", "content": "s"}],
        [{"role": "user", "content": "u"}, {"role": "tool", "content": "t"}],
    ]
    cases = [(kind, m, g) for m in convs for g in (False, True)]
    want = [hf_render(hf_tok, template, m, g) for _, m, g in cases]
    got = ours_render(tmp_path, cases)
    for (k, m, g), w, o in zip(cases, want, got):
        assert w[0] == o[0] and (w[0] == "error" or w[1] == o[1]), describe(k, m, g, w, o)
        if o[0] == "error":
            assert o[1], "an error needs a message"


def test_trim_strips_exactly_pythons_whitespace(tmp_path):
    """Jinja's trim is str.strip(): every str.isspace() code point goes, look-alikes stay."""
    template, specials = FAMILIES["llama-3"]
    hf_tok = tiny_hf_tokenizer(specials)
    cases = [("llama-3", [{"role": "user", "content": f"{c}{c}x{c}y{c}"}], False)
             for c in PY_SPACES + NOT_SPACES + ["\u00a0\u3000", "\u0085"]]
    want = [hf_render(hf_tok, template, m, g) for _, m, g in cases]
    assert ours_render(tmp_path, cases) == want


def test_gemma_follows_gemma3_and_matches_gemma2_without_system(tmp_path, rng_seed):
    """resafe's gemma is Gemma 3's template; on conversations without a system message it is also
    byte-identical to the Gemma 1/2 template, which refuses system messages outright."""
    _, specials = FAMILIES["gemma"]
    hf_tok = tiny_hf_tokenizer(specials)
    rng = random.Random(rng_seed)
    cases = [("gemma", [m for m in rand_conversation(rng, valid_only=True)
                        if m["role"] != "system"], rng.random() < 0.5) for _ in range(100)]
    want2 = [hf_render(hf_tok, GEMMA2, m, g) for _, m, g in cases]
    want3 = [hf_render(hf_tok, GEMMA3, m, g) for _, m, g in cases]
    assert want2 == want3
    assert ours_render(tmp_path, cases) == want2
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert hf_render(hf_tok, GEMMA2, with_system, True)[0] == "error"
    assert ours_render(tmp_path, [("gemma", with_system, True)]) == [
        ("text", "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")]


def test_none_renders_the_contents_concatenated(tmp_path):
    msgs = [{"role": "system", "content": " a "}, {"role": "user", "content": "b\n"}]
    assert ours_render(tmp_path, [("none", msgs, True)]) == [("text", " a b\n")]


# ---------------------------------------------------------------- detection

def detect(model_dir):
    p = subprocess.run([CHAT_TOOL, "detect", str(model_dir)], capture_output=True, text=True,
                       timeout=60)
    return p.returncode, p.stdout.strip(), p.stderr.strip()


DETECT_CASES = [("llama-2", LLAMA2), ("llama-3", LLAMA3), ("gemma", GEMMA2), ("gemma", GEMMA3),
                ("mistral", MISTRAL), ("mistral", MISTRAL_V01_ORIGINAL), ("chatml", CHATML)]


@pytest.mark.parametrize("kind,template", DETECT_CASES)
def test_detect_finds_family_in_every_layout(kind, template, tmp_path):
    layouts = {
        "string": lambda d: (d / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<s>", "chat_template": template})),
        "list": lambda d: (d / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "{{ '<|im_start|>' }}"},
                               {"name": "default", "template": template}]})),
        "jinja_file": lambda d: ((d / "tokenizer_config.json").write_text("{}"),
                                 (d / "chat_template.jinja").write_text(template)),
        "processor_json": lambda d: (d / "chat_template.json").write_text(
            json.dumps({"chat_template": template})),
    }
    for name, write in layouts.items():
        d = tmp_path / name
        d.mkdir()
        write(d)
        rc, out, err = detect(d)
        assert (rc, out) == (0, kind), f"{name}: {err}"


def test_detect_reads_what_save_pretrained_writes(tmp_path):
    for kind, (template, specials) in FAMILIES.items():
        hf_tok = tiny_hf_tokenizer(specials)
        hf_tok.chat_template = template
        d = tmp_path / kind
        hf_tok.save_pretrained(str(d))
        rc, out, err = detect(d)
        assert (rc, out) == (0, kind), err


def test_detect_fails_clearly(tmp_path):
    rc, _, err = detect(tmp_path / "missing")
    assert rc == 1 and "missing" in err
    base = tmp_path / "base"  # a base model: tokenizer_config.json without a template
    base.mkdir()
    (base / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    rc, _, err = detect(base)
    assert rc == 1 and "no chat template" in err and "[model] chat_template" in err
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"}))
    rc, _, err = detect(odd)
    assert rc == 1 and "matches no known family" in err and "[model] chat_template" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"')
    rc, _, err = detect(broken)
    assert rc == 1 and "tokenizer_config.json" in err and "JSON" in err


def test_detect_warns_on_later_versions_that_render_differently(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{{- bos_token }}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
        "{{- 'Cutting Knowledge Date: December 2023\\n' }}")}))
    rc, out, err = detect(tmp_path)
    assert (rc, out) == (0, "llama-3") and "Llama-3.1" in err


# ---------------------------------------------------------------- token ids

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Content for the ids test: no special-token strings inside messages (that is the tokenizer's
# own test), but every script, byte-fallback material and odd whitespace.
PLAIN_WORDS = [w for w in WORDS if not (w.startswith("<") or w.startswith("[") or "{" in w)]


def training_corpus():
    rng = random.Random(1234)  # fixed: the vocabulary is a fixture, not the thing under test
    lines = [rand_text(rng, PLAIN_WORDS) for _ in range(3000)]
    lines += ["You are a helpful assistant.", "[INST] hello [/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n",
              "user\nmodel\nassistant\nsystem"] * 50
    return lines


def byte_level_bpe(specials, split_regex, ignore_merges):
    """GPT-2 style byte-level BPE as Llama-3 and Qwen2 ship it: Split(regex) + ByteLevel."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    if ignore_merges:
        d = json.loads(tok.to_str())
        d["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(d))
    return tok


def sentencepiece_bpe(specials, unk, style):
    """SentencePiece BPE as transformers converts it: <0xNN> byte fallback, fused unknowns, and
    either Metaspace (llama-2, mistral) or a space->U+2581 normalizer without prefix (gemma)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import trainers
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(training_corpus(), trainers.BpeTrainer(
        vocab_size=900, limit_alphabet=150, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                               fuse_unk=True))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tail = [decoders.Strip(" ", 1, 0)]
    else:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tail = []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()] + tail)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def real_llama2_tokenizer(tmp_path):
    """Meta's Llama-2 tokenizer.model converted by transformers, when ../shared has it."""
    src = os.path.join(SHARED, "data", "llama2_tokenizer.model")
    if not os.path.exists(src):
        return None
    from transformers import LlamaTokenizer
    d = tmp_path / "llama2_sp"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(open(src, "rb").read())
    return LlamaTokenizer.from_pretrained(str(d))


def family_tokenizer(kind, tmp_path):
    _, specials = FAMILIES[kind]
    if kind in ("llama-2", "mistral"):
        real = real_llama2_tokenizer(tmp_path)
        if real is not None:
            return real
        return hf_wrap(sentencepiece_bpe(["<unk>", "<s>", "</s>"], "<unk>", "metaspace"), specials)
    if kind == "gemma":
        return hf_wrap(sentencepiece_bpe(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                          "<end_of_turn>"], "<unk>", "replace"), specials)
    if kind == "llama-3":
        return hf_wrap(byte_level_bpe(["<|begin_of_text|>", "<|end_of_text|>",
                                       "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                                      LLAMA3_SPLIT, True), specials)
    return hf_wrap(byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN2_SPLIT,
                                  False), specials)


SYSTEM_CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant. Refuse harmful requests."},
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": " Mix flour, water, salt and yeast; knead; let it rise; bake. "},
    {"role": "user", "content": "And in 日本語, with an emoji 😀?\n"},
]


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_encode_ids_equal_apply_chat_template(kind, tmp_path, rng_seed):
    template, _ = FAMILIES[kind]
    hf_tok = family_tokenizer(kind, tmp_path)
    tok_path = tmp_path / "tokenizer.json"
    hf_tok.backend_tokenizer.save(str(tok_path))
    rng = random.Random(rng_seed)
    cases = [(kind, SYSTEM_CONVERSATION, g) for g in (True, False)]
    cases += [(kind, rand_conversation(rng, valid_only=True, words=PLAIN_WORDS),
               rng.random() < 0.5) for _ in range(40)]
    want = [hf_ids(hf_tok, template, m, g) for _, m, g in cases]
    got = run_tool(tmp_path, "encode", [
        {"kind": k, "messages": m, "add_generation_prompt": g} for k, m, g in cases], tok_path)
    for (k, m, g), w, o in zip(cases, want, got):
        assert o.get("ids") == w, describe(k, m, g, w, o)
