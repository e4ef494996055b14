"""The reference log-probs of `resafe dpo` split over ranks on the CUDA backend: worlds 2 and 3
(file transport, every rank on the one GPU: the split, not NCCL, is under test) each run whole
micro-batches of the one-process pass and gather, and every rank must end with the one-process
arrays bit for bit. On the GPU a sequence's log-prob depends on its batch (the padded length, the
GEMM shapes), so this holds only because the ranks' forwards are the one-process forwards: the
pairs here differ in length (tens of tokens, past the tensor-core attention threshold of 16)
so the micro-batches pad to different lengths. Runs only with RESAFE_TEST_GPU=1."""
import json
import os
import random

import pytest

from conftest import gpu_enabled
import test_dist_ranks as tdr

pytestmark = pytest.mark.skipif(not gpu_enabled(), reason="GPU tests run with RESAFE_TEST_GPU=1")
tiny = tdr.tiny  # the module fixture
N_PAIRS, MICRO = 13, 3


@pytest.fixture(scope="module")
def gpu_pairs(tiny):
    d = tiny[0]
    path = d / "gpu_pairs.jsonl"
    r = random.Random(7)
    words = lambda lo, hi: " ".join(r.choice(tdr.WORDS) for _ in range(r.randint(lo, hi)))
    with open(path, "w") as f:
        for _ in range(N_PAIRS):
            f.write(json.dumps({"prompt": words(6, 12), "chosen": words(6, 28),
                                "rejected": words(6, 28)}) + "\n")
    return str(path)


def gpu_config(tiny, pairs, name):
    return tdr.config(tiny, name, model__backend="cuda", dpo__data_file=pairs,
                      dpo__micro_batch_size=MICRO, dpo__max_steps=2)


@pytest.fixture(scope="module")
def gpu_single(tiny, gpu_pairs):
    cfg, out = gpu_config(tiny, gpu_pairs, "gpu1")
    (_, _, err), = tdr.run_world(1, ["dpo", "--config", cfg, "-v"], f"gpu1-{os.getpid()}")
    return out, tdr.ref_shares(err)


@pytest.mark.parametrize("world", [2, 3])
def test_cuda_reference_split_over_ranks_is_the_one_process_bytes(tiny, gpu_pairs, gpu_single,
                                                                   world):
    out1, ref1 = gpu_single
    assert [(a, b) for a, b, _, _ in ref1] == [(0, N_PAIRS)], ref1
    cfg, out = gpu_config(tiny, gpu_pairs, f"gpu{world}")
    res = tdr.run_world(world, ["dpo", "--config", cfg, "-v"], f"gpu{world}-{os.getpid()}",
                        NCCL_NVLS_ENABLE="0")
    shares = [x for _, _, err in res for x in tdr.ref_shares(err)]
    assert shares == [(a, b, ref1[0][2], r)
                      for r, (a, b) in enumerate(tdr.chunk_shares(N_PAIRS, MICRO, world))]
    assert tdr.checkpoint_refs(out) == tdr.checkpoint_refs(out1)
