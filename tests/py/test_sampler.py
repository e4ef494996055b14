"""Our sampler's candidate set and probabilities against transformers' logits warpers
(temperature, then top-k, then top-p, then softmax), on random logits every run."""
import json
import os
import random
import subprocess

import numpy as np
import pytest
import torch

from conftest import BUILD

lp = pytest.importorskip("transformers.generation.logits_process")
SAMPLER_TOOL = os.path.join(BUILD, "tools", "sampler_tool")


def ours(logits, temperature, top_k, top_p, tmp_path):
    path = tmp_path / "logits.f32"
    np.asarray(logits, dtype=np.float32).tofile(path)
    p = subprocess.run([SAMPLER_TOOL, str(path), repr(temperature), str(top_k), repr(top_p)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    return dict(zip(out["ids"], out["probs"]))


def reference(logits, temperature, top_k, top_p):
    """transformers' kept tokens and probabilities, and the scores top-p was given (after
    temperature and top-k), which decide whether its cut is ambiguous."""
    scores = torch.tensor(np.asarray(logits, dtype=np.float32))[None]
    scores = lp.TemperatureLogitsWarper(temperature)(None, scores)
    if top_k > 0:
        scores = lp.TopKLogitsWarper(top_k)(None, scores)
    before_top_p = scores[0].clone()
    if top_p < 1.0:
        scores = lp.TopPLogitsWarper(top_p)(None, scores)
    probs = scores.softmax(-1)[0].double().numpy()
    return {i: float(p) for i, p in enumerate(probs) if p > 0}, before_top_p


def near_top_p_boundary(scores, top_p):
    """A cumulative probability within fp32 noise of 1 - top_p: either answer is right.
    scores: what top-p filters (after temperature and top-k), not what it leaves; after the cut
    the cumulative sums are renormalised and no longer show where the cut fell. The typical
    case is a tie: n equal top-k survivors with n * (1 - top_p) a whole number, e.g. 14 tokens
    of 1/14 and top_p 0.5, where the 7th cumulative sum is exactly 0.5 in exact arithmetic and
    fp32 (transformers) and double (resafe) round it to opposite sides."""
    s, _ = torch.sort(scores[torch.isfinite(scores)])
    cum = s.softmax(-1).cumsum(-1).double().numpy()
    return np.any(np.abs(cum - (1 - top_p)) < 1e-5)


@pytest.mark.parametrize("trial", range(12))
def test_sampler_filter_matches_transformers_warpers(trial, tmp_path, rng_seed):
    rnd = random.Random(rng_seed * 100 + trial)
    vocab = rnd.randint(1, 400)
    if trial % 3 == 0:  # ties: values on a coarse grid, so the k-th value is often shared
        logits = [rnd.randint(-8, 8) / 2 for _ in range(vocab)]
    else:
        logits = [rnd.gauss(0, 3) for _ in range(vocab)]
    temperature = rnd.choice([0.3, 0.7, 1.0, 1.5])
    top_k = rnd.choice([0, 1, 5, 50, vocab + 3])
    top_p = rnd.choice([1.0, 0.5, 0.9, 0.95])
    want, scores = reference(logits, temperature, top_k, top_p)
    if top_p < 1.0 and near_top_p_boundary(scores, top_p):
        top_p = 1.0
        want, _ = reference(logits, temperature, top_k, top_p)
    got = ours(logits, temperature, top_k, top_p, tmp_path)
    # Among tokens of equal logit at the top-p cut, which ones survive is the sort's choice
    # (torch.sort is not stable): the sets may differ only by tokens of one shared value.
    differ = set(got) ^ set(want)
    assert len(got) == len(want) and len({logits[i] for i in differ}) <= 1, \
        f"T={temperature} k={top_k} p={top_p}: kept {sorted(got)}, transformers {sorted(want)}"
    for i in set(got) & set(want):
        assert abs(got[i] - want[i]) <= 1e-6, f"token {i}: p {got[i]} vs {want[i]}"
    assert np.allclose(sorted(got.values()), sorted(want.values()), atol=1e-6, rtol=0)
