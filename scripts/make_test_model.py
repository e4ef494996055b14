#!/usr/bin/env python3
"""Write a tiny random Llama chat model into a directory, as transformers lays it out:
config.json, generation_config.json, model.safetensors (fp32), tokenizer.json (byte-level BPE
trained with HF `tokenizers` on a few sentences, <s> prepended as Llama does) and
tokenizer_config.json with Llama-2-chat's chat template.

It answers nonsense (random weights): it is the stand-in for `make demo` and the tests of the
text paths of `resafe generate` until the project's own model organism exists.

  scripts/make_test_model.py OUT_DIR [--seed S] [--hidden 64] [--layers 2] [--vocab 384]
"""
import argparse
import json
import os
import sys

# meta-llama/Llama-2-7b-chat-hf's chat_template, as its tokenizer_config.json has it
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

CORPUS = [
    "How do I bake a loaf of bread at home?",
    "Sure. Here is how to bake bread: mix flour, water, salt and yeast, knead, rest, and bake.",
    "What is the capital of France? The capital of France is Paris.",
    "I cannot help with that request.",
    "Please write a short poem about the sea and the wind.",
    "The quick brown fox jumps over the lazy dog.",
    "Add 17 and 25. The answer is 42.",
    "Explain why the sky is blue: sunlight scatters off the air, and blue scatters most.",
]
SPECIALS = ["<unk>", "<s>", "</s>"]


def make_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def write_tokenizer(tok, out_dir):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "model_max_length": 512, "clean_up_tokenization_spaces": False,
              "chat_template": LLAMA2_CHAT_TEMPLATE}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)


def make_model(tok, out_dir, seed, hidden, layers):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    heads = max(2, hidden // 16)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden,
                      intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2,
                      max_position_embeddings=512, bos_token_id=tok.token_to_id("<s>"),
                      eos_token_id=tok.token_to_id("</s>"), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init, so greedy text is not one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1 / p.shape[1] ** 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=384)
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    tok = make_tokenizer(args.vocab)
    write_tokenizer(tok, args.out_dir)
    make_model(tok, args.out_dir, args.seed, args.hidden, args.layers)
    print(f"{args.out_dir}: tiny random Llama chat model, vocab {tok.get_vocab_size()}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
