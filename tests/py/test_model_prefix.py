"""Shared prefixes in the training forward and backward (model_train.h, rs_train_batch
n_prefix): sequences that continue a prefix run it once, their tokens attending to its keys.

The packed batch is built here from whole sequences (each prefix and the continuations' own
tokens, positions going on from the prefix's length), and checked against torch autograd in
float64 on the whole sequences, each run alone (test_model_grad.py's reference and
tolerances), and against our own unpacked batch of the same sequences. The layouts cover what
the DPO packing (rs_batch_fill_pairs) never makes, since the forward takes any: a prefix with
three continuations and one with a single continuation, a sequence with no prefix, prefixes of
different lengths, padding on both sides with random ids.
"""
import random

import numpy as np
import pytest
import torch

from test_model_grad import (GRAD_TOL, LOGP_TOL, PAD_TOL, check_close, full_reference,
                             lora_reference, make_model, random_adapter, run_tool,
                             truly_float64)


def shared_batch(rnd, vocab):
    """Whole sequences (the reference's batch) and the packed batch of the same sequences:
    prefix 0 continued by 3 sequences, prefix 1 by one, and one sequence with no prefix."""
    conts = [0, 0, 1, 0, -1]  # prefix_of per sequence
    plens = [rnd.randint(2, 6), rnd.randint(1, 4)]
    prefixes = [[rnd.randrange(3, vocab) for _ in range(n)] for n in plens]
    whole, first = [], []
    for p in conts:
        own = [rnd.randrange(3, vocab) for _ in range(rnd.randint(2, 7))]
        seq = (prefixes[p] if p >= 0 else []) + own
        whole.append(seq)
        lo = plens[p] if p >= 0 else 0  # rows of a prefix take no loss
        first.append(rnd.randint(lo, len(seq) - 2))  # the first row with a target
    B, lens = len(whole), [len(s) for s in whole]
    T_whole = max(lens) + rnd.randint(0, 2)
    full = dict(tokens=np.array([[rnd.randrange(3, vocab) for _ in range(T_whole)]
                                 for _ in range(B)], np.int32),
                pos=np.full((B, T_whole), -1, np.int32),
                targets=np.full((B, T_whole), -1, np.int32),
                d_seq_logp=np.array([rnd.choice([-1, 1]) * rnd.uniform(0.5, 2.0)
                                     for _ in range(B)], np.float32), lens=lens)
    for b, seq in enumerate(whole):
        n = len(seq)
        full["tokens"][b, :n] = seq
        full["pos"][b, :n] = np.arange(n)
        full["targets"][b, first[b]:n - 1] = seq[first[b] + 1:]
    starts = [plens[p] if p >= 0 else 0 for p in conts]
    T = max(n - s for n, s in zip(lens, starts)) + rnd.randint(0, 2)
    TP = max(plens) + rnd.randint(0, 2)
    packed = dict(tokens=np.array([[rnd.randrange(3, vocab) for _ in range(T)]
                                   for _ in range(B)], np.int32),
                  pos=np.full((B, T), -1, np.int32), targets=np.full((B, T), -1, np.int32),
                  d_seq_logp=full["d_seq_logp"].copy(),
                  prefix_tokens=np.array([[rnd.randrange(3, vocab) for _ in range(TP)]
                                          for _ in plens], np.int32),
                  prefix_pos=np.full((len(plens), TP), -1, np.int32),
                  prefix_of=np.array(conts, np.int32))
    for p, toks in enumerate(prefixes):
        packed["prefix_tokens"][p, :len(toks)] = toks
        packed["prefix_pos"][p, :len(toks)] = np.arange(len(toks))
    for b, seq in enumerate(whole):
        s, n = starts[b], len(seq)
        packed["tokens"][b, :n - s] = seq[s:]
        packed["pos"][b, :n - s] = np.arange(s, n)
        packed["targets"][b, :n - s] = full["targets"][b, s:n]
    return full, packed


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias", "gemma"])
def test_prefixed_full_gradients_match_autograd(family, tmp_path, rng_seed, monkeypatch):
    """seq_logp and every parameter's gradient of a packed batch against autograd on the
    whole sequences; our unpacked batch agrees to summation order; recompute is bit-identical."""
    model, path = make_model(tmp_path, family, rng_seed)
    full, packed = shared_batch(random.Random(rng_seed + 11), model.config.vocab_size)
    ours = run_tool(path, packed, tmp_path)
    unpacked = run_tool(path, full, tmp_path)
    refs, logps = full_reference(truly_float64(model, monkeypatch), full)
    assert np.abs(ours["seq_logp"] - logps).max() <= LOGP_TOL, (ours["seq_logp"], logps)
    worst = check_close(ours, refs, GRAD_TOL, f"{family} packed")
    print(f"{family}: packed, max relative gradient error {worst:.3g}")
    assert np.abs(ours["seq_logp"] - unpacked["seq_logp"]).max() <= PAD_TOL * 10
    check_close(ours, {k: v for k, v in unpacked.items() if k != "seq_logp"}, PAD_TOL,
                "packed vs unpacked", allow_zero=True)
    again = run_tool(path, packed, tmp_path, "--recompute", 1)
    for name in ours:
        assert np.array_equal(ours[name], again[name]), f"recompute changed '{name}'"


@pytest.mark.parametrize("family", ["llama_gqa", "mistral"])
def test_prefixed_lora_gradients_match_autograd(family, tmp_path, rng_seed, monkeypatch):
    """dA, dB (and dW) of all 7 targets on a packed batch against the plain-torch adapter."""
    model, path = make_model(tmp_path, family, rng_seed)
    full, packed = shared_batch(random.Random(rng_seed + 12), model.config.vocab_size)
    adapter = random_adapter(model, 4, torch.Generator().manual_seed(rng_seed))
    ours = run_tool(path, packed, tmp_path, "--lora", 2.0, "--want-dw", adapter=adapter)
    refs, logps = lora_reference(truly_float64(model, monkeypatch), full, adapter, 0.5)
    assert np.abs(ours["seq_logp"] - logps).max() <= LOGP_TOL
    check_close(ours, refs, GRAD_TOL, f"{family} packed LoRA")


@pytest.mark.parametrize("break_it,message", [
    (lambda b: b["prefix_of"].__setitem__(0, 7), "continues prefix 7"),
    (lambda b: b["pos"].__setitem__((0, 0), 0), "right padding"),
    (lambda b: b["prefix_pos"].__setitem__((1, 0), -1), "prefix 1"),
    (lambda b: b["prefix_tokens"].__setitem__((0, 0), 10 ** 6), "vocabulary"),
])
def test_bad_prefixes_are_refused(break_it, message, tmp_path, rng_seed):
    model, path = make_model(tmp_path, "llama_gqa", rng_seed)
    _, packed = shared_batch(random.Random(rng_seed + 13), model.config.vocab_size)
    break_it(packed)
    p = run_tool(path, packed, tmp_path, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2
