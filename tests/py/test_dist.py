"""Data-parallel launch plumbing seen from the command line: the commands read rank and world from
OpenMPI or SLURM, those that do not run data parallel (sft, train) refuse a world above one with
one line naming rank and world before touching anything, and a malformed launcher environment is
one line naming the variable and its value. The shard maps, the resume on another world size and
the id file between processes are C unit tests (tests/unit/test_dist.c); the communicator is
tests/unit/test_comm.c; dpo, triplets and eval on several ranks are tests/py/test_dist_dpo.py."""
import os
import random

import pytest

from conftest import run_resafe

LAUNCH_VARS = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_JOB_ID",
               "PMIX_NAMESPACE", "RESAFE_RUN_ID"]


def clean_env(**launch):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in launch.items()})
    return env


def ompi(rank, world, local):
    return clean_env(OMPI_COMM_WORLD_RANK=rank, OMPI_COMM_WORLD_SIZE=world,
                     OMPI_COMM_WORLD_LOCAL_RANK=local)


def slurm(rank, world, local, step=0):
    env = clean_env(SLURM_PROCID=rank, SLURM_NTASKS=world, SLURM_LOCALID=local, SLURM_JOB_ID=42)
    if step is not None:
        env["SLURM_STEP_ID"] = str(step)
    return env


@pytest.fixture
def config(tmp_path):
    """A config whose inputs do not exist: any run that gets past the launcher check fails on a
    missing-* input, so the refusal is seen to come first."""
    out = tmp_path / "run"
    path = tmp_path / "run.ini"
    path.write_text(f"[model]\npath = {tmp_path / 'missing-model'}\nbackend = cpu\n"
                    f"[dpo]\ndata_file = {tmp_path / 'missing-pairs.jsonl'}\n"
                    f"[sft]\ndata_file = {tmp_path / 'missing-sft.jsonl'}\n"
                    f"[run]\nout_dir = {out}\n")
    return str(path), out


def error_lines(p):
    return [l for l in p.stderr.splitlines() if l.strip()]


@pytest.mark.parametrize("command", ["sft", "train"])
@pytest.mark.parametrize("launcher", ["openmpi", "slurm"])
def test_world_above_one_is_refused_in_one_line_naming_rank_and_world(config, command, launcher,
                                                                     rng_seed):
    r = random.Random(rng_seed)
    world = r.randint(2, 64)
    rank = r.randrange(world)
    env = ompi(rank, world, rank % 8) if launcher == "openmpi" else slurm(rank, world, rank % 8)
    cfg, out = config
    p = run_resafe(command, "--config", cfg, check=False, env=env)
    assert p.returncode == 1, p.stderr
    assert error_lines(p) == [f"resafe: error: rank {rank} of {world} ({launcher}): resafe {command} "
                              "does not run data parallel (resafe dpo, triplets and eval do); start "
                              "it as one process"], p.stderr
    assert not out.exists(), "a refused run wrote into the run directory"


def test_openmpi_wins_over_slurm_and_launcher_picks_one(config):
    cfg, _ = config
    env = dict(ompi(1, 2, 1), **{k: v for k, v in slurm(3, 4, 3).items() if k.startswith("SLURM")})
    # sft refuses ranks at once, naming them (dpo would wait for its peers)
    p = run_resafe("sft", "--config", cfg, check=False, env=env)
    assert "rank 1 of 2 (openmpi)" in p.stderr, p.stderr
    p = run_resafe("sft", "--config", cfg, "--set", "dist.launcher=slurm", check=False, env=env)
    assert "rank 3 of 4 (slurm)" in p.stderr, p.stderr
    # launcher = none and world 1 get past the check: the error is a missing input
    for e, sets in ((env, ["--set", "dist.launcher=none"]), (ompi(0, 1, 0), [])):
        p = run_resafe("dpo", "--config", cfg, *sets, check=False, env=e)
        assert p.returncode == 1 and "NCCL" not in p.stderr and "missing-" in p.stderr, p.stderr


def test_slurm_batch_script_without_srun_is_one_process(config):
    """sbatch --ntasks=4 running resafe directly: SLURM_PROCID=0, SLURM_NTASKS=4 but no step."""
    cfg, _ = config
    p = run_resafe("dpo", "--config", cfg, check=False, env=slurm(0, 4, 0, step=None))
    assert p.returncode == 1 and "NCCL" not in p.stderr and "missing-" in p.stderr, p.stderr
    p = run_resafe("sft", "--config", cfg, "--set", "dist.launcher=slurm", check=False,
                   env=slurm(0, 4, 0, step=None))
    assert "rank 0 of 4 (slurm)" in p.stderr, p.stderr


BAD = [  # (variable, value, what the message says besides the variable)
    ("RANK", "x", "not a non-negative integer"),
    ("RANK", "-1", "not a non-negative integer"),
    ("RANK", "1.5", "not a non-negative integer"),
    ("SIZE", "", "not a non-negative integer"),
    ("SIZE", "0", "at least 1"),
    ("SIZE", "2e3", "not a non-negative integer"),
    ("RANK", "7", "outside 0 .. 3"),
    ("LOCAL", "4", "outside 0 .. 3"),
    ("RANK", None, "is not set"),
    ("SIZE", None, "is not set"),
    ("LOCAL", None, "is not set"),
]
NAMES = {"openmpi": {"RANK": "OMPI_COMM_WORLD_RANK", "SIZE": "OMPI_COMM_WORLD_SIZE",
                     "LOCAL": "OMPI_COMM_WORLD_LOCAL_RANK"},
         "slurm": {"RANK": "SLURM_PROCID", "SIZE": "SLURM_NTASKS", "LOCAL": "SLURM_LOCALID"}}


@pytest.mark.parametrize("launcher", ["openmpi", "slurm"])
@pytest.mark.parametrize("which,value,says", BAD)
def test_malformed_launcher_environment_is_one_line_naming_variable_and_value(
        config, launcher, which, value, says):
    cfg, out = config
    env = ompi(3, 4, 1) if launcher == "openmpi" else slurm(3, 4, 1)
    name = NAMES[launcher][which]
    if value is None:
        del env[name]
    else:
        env[name] = value
    p = run_resafe("dpo", "--config", cfg, check=False, env=env)
    lines = error_lines(p)
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith("resafe: error: [dist] launcher = auto: ") and name in lines[0] \
        and says in lines[0], lines[0]
    if value:
        assert value in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("setting,says", [
    ("dist.launcher=pbs", "launcher"),
    ("dist.id_timeout_s=0", "id_timeout_s"),
    ("dist.id_timeout_s=soon", "id_timeout_s"),
    ("dist.transport=mpi", "transport"),
    ("dist.timeout_s=0", "timeout_s"),
    ("dist.bucket_mb=-1", "bucket_mb"),
])
def test_dist_keys_are_validated(config, setting, says):
    cfg, _ = config
    p = run_resafe("dpo", "--config", cfg, "--set", setting, check=False, env=clean_env())
    lines = error_lines(p)
    assert p.returncode == 1 and len(lines) == 1 and says in lines[0], p.stderr
