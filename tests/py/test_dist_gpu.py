"""The nccl transport on one GPU (the only NCCL test one GPU allows: NCCL refuses two ranks on
one device). build/tools/comm_tool makes a communicator of world 1 over NCCL (ncclCommInitRank
with nranks 1, the unique id through the id file), all-reduces random floats in place in
buckets (one call, and many calls with an odd tail) and checks the bytes come back unchanged:
a sum over one rank is exact, so any difference (a wrong offset, count or stream order) fails.
The multi-rank logic is tests/py/test_dist_ranks.py over the file transport.
Runs only with RESAFE_TEST_GPU=1 (make test-gpu); needs a build where the Makefile found
nccl.h (NCCL_HOME=... otherwise)."""
import os
import subprocess

import pytest

from conftest import BUILD, gpu_enabled

pytestmark = pytest.mark.skipif(not gpu_enabled(), reason="GPU tests run with RESAFE_TEST_GPU=1")
TOOL = os.path.join(BUILD, "tools", "comm_tool")


@pytest.mark.parametrize("n,bucket", [(1, 1 << 20), (1000, 1 << 20), (100003, 4096),
                                      (3 << 20, 64 << 20)])
def test_nccl_all_reduce_over_one_rank_is_the_identity(tmp_path, rng_seed, n, bucket):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    p = subprocess.run([TOOL, "nccl-identity", str(tmp_path / "comm"), str(n), str(rng_seed),
                        str(bucket)], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 77, "this build has no nccl transport or sees no GPU: " + p.stdout
    assert p.returncode == 0 and f"identity {n} ok" in p.stdout, p.stdout + p.stderr
    assert not os.listdir(tmp_path / "comm"), "the session's files were left behind"
