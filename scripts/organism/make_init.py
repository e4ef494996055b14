#!/usr/bin/env python3
"""Random initialisation of the tiny safety model organism: a Llama chat model (Llama-2 chat
template) with a byte-level BPE tokenizer trained with HF `tokenizers` on the organism's own data
(data/organism/*.jsonl), so that a prompt and its response are a few dozen tokens.

  scripts/organism/make_init.py OUT_DIR [--data data/organism] [--vocab 640] [--hidden 128]
                                [--layers 3] [--seed 0] [--head-dim 32] [--mlp 2*hidden]
                                [--max-pos 128]
"""
import argparse
import glob
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "make_test_model", os.path.join(HERE, "..", "make_test_model.py"))
mtm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mtm)


def corpus(data_dir):
    """Every prompt and response, rendered as the chat template lays them out. The safety tune's
    file is left out, so that its refusal share (gen_data.py --refuse-p) does not change the
    tokenizer (and with it the base)."""
    lines = []
    for path in sorted(glob.glob(os.path.join(data_dir, "*.jsonl"))):
        if os.path.basename(path).startswith("safety"):
            continue
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "prompt" in r:
                    lines.append(f"[INST] {r['prompt']} [/INST] {r.get('response', '')}")
                if "text" in r:
                    lines.append(r["text"])
    return lines


def make_tokenizer(lines, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=mtm.SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def make_model(tok, out_dir, seed, hidden, layers, head_dim=32, mlp=0, max_pos=128):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    heads = max(2, hidden // head_dim)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden,
                      intermediate_size=mlp or hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_pos, bos_token_id=tok.token_to_id("<s>"),
                      eos_token_id=tok.token_to_id("</s>"), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)  # transformers' init (normal, std 0.02)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--data", default="data/organism")
    ap.add_argument("--vocab", type=int, default=640)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--mlp", type=int, default=0, help="MLP width (default 2 x hidden)")
    ap.add_argument("--max-pos", type=int, default=128)
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    lines = corpus(args.data)
    tok = make_tokenizer(lines, args.vocab)
    mtm.write_tokenizer(tok, args.out_dir)
    if args.hidden % args.head_dim:
        ap.error(f"--hidden {args.hidden} is not a multiple of --head-dim {args.head_dim}")
    model = make_model(tok, args.out_dir, args.seed, args.hidden, args.layers, args.head_dim,
                       args.mlp, args.max_pos)
    lens = sorted(len(tok.encode(s).ids) for s in lines)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out_dir}: random organism init, {n} parameters, vocab {tok.get_vocab_size()}, "
          f"chat tokens median {lens[len(lens) // 2]} max {lens[-1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
