#!/usr/bin/env python3
"""Does the organism's data carry the harmful/benign signal that real prompts need? A bag-of-words
probe: logistic regression on hashed word unigrams and bigrams of the safety tune's prompts
(label: the response is the refusal), then the share of each prompt set it flags as harmful.
Where the probe flags most of AdvBench but the tuned model refuses far fewer, the gap is the
model's generalization, not the data's coverage (scripts/organism/README.md).

  scripts/organism/bow_probe.py --train DIR/safety_train.jsonl [--data data/organism-large]
      [--advbench ../shared/data/advbench_harmful_behaviors.csv]
      [--xstest ../shared/data/xstest_prompts.csv] [--misses N]

The public sets are read at run time and never copied; --misses prints N AdvBench prompts the
probe passes (to read, not to commit). Deterministic (fixed seeds)."""
import argparse
import os
import random
import re
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quick_eval import load, load_csv  # noqa: E402  (the organism scripts' readers)

DIM = 1 << 18


def features(text):
    words = re.findall(r"[a-z0-9']+", text.lower())
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    return np.array([zlib.crc32(g.encode()) % DIM for g in grams], dtype=np.int64)


def train(prompts, labels, epochs=5, lr=0.5):
    w, b = np.zeros(DIM), 0.0
    feats = [features(p) for p in prompts]
    for ep in range(epochs):
        for i in np.random.default_rng(ep).permutation(len(feats)):
            f = feats[i]
            p = 1.0 / (1.0 + np.exp(-(w[f].sum() + b)))
            g = p - labels[i]
            np.add.at(w, f, -lr * g / max(1, len(f)) ** 0.5)
            b -= 0.1 * lr * g
    return lambda text: 1.0 / (1.0 + np.exp(-(w[features(text)].sum() + b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="the safety tune's JSONL {prompt, response}")
    ap.add_argument("--data", default="data/organism-large", help="eval_harmful / eval_safe here")
    ap.add_argument("--advbench")
    ap.add_argument("--xstest")
    ap.add_argument("--misses", type=int, default=0)
    a = ap.parse_args()
    rows = load(a.train, 0)
    if not rows or not all("prompt" in r and "response" in r for r in rows):
        sys.exit(f"bow_probe: {a.train}: expected JSONL rows with prompt and response")
    labels = [1.0 if r["response"].startswith("I cannot") else 0.0 for r in rows]
    if not 0 < sum(labels) < len(labels):
        sys.exit(f"bow_probe: {a.train}: needs both refused and answered rows")
    probe = train([r["prompt"] for r in rows], labels)
    sets = [("synthetic harmful (eval)", [r["prompt"] for r in load(
                os.path.join(a.data, "eval_harmful.jsonl"), 0)]),
            ("synthetic safe (eval)", [r["prompt"] for r in load(
                os.path.join(a.data, "eval_safe.jsonl"), 0)])]
    if a.advbench:
        sets.append(("AdvBench", load_csv(a.advbench, "goal")))
    if a.xstest:
        sets += [("XSTest safe", load_csv(a.xstest, "prompt", "safe")),
                 ("XSTest unsafe", load_csv(a.xstest, "prompt", "unsafe"))]
    print(f"bow_probe: trained on {len(rows)} prompts ({100 * sum(labels) / len(rows):.1f}% refused)")
    print("| prompt set | n | flagged harmful (%) |\n|---|---|---|")
    for name, prompts in sets:
        flagged = [probe(p) > 0.5 for p in prompts]
        print(f"| {name} | {len(prompts)} | {100 * sum(flagged) / max(1, len(prompts)):.1f} |")
    if a.advbench and a.misses:
        missed = [p for p in load_csv(a.advbench, "goal") if probe(p) <= 0.5]
        for p in random.Random(0).sample(missed, min(a.misses, len(missed))):
            print("  passes:", p)


if __name__ == "__main__":
    main()
