"""`resafe dpo` data parallel on CPU ranks: separate processes started with the variables OpenMPI
sets (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK, a run id), [dist] transport = file, a tiny random
model.

What the ranks must reproduce: a one-process run with the same global batch and seed. Each pair's
gradient scale is the same number in both (dpo.c divides by the global pair count), the masks are
selected from the same all-reduced weight gradients, and the ranks sum their slices' gradients in
rank order. What differs is only the order of fp32 additions: a one-process run adds its
micro-batches' contributions into one buffer inside backward, W ranks add W partial sums.
That is a relative error of a few 2^-24 per gradient entry per step, which AdamW carries into the
parameters as a few 1e-7 relative per step; the tolerances below (1e-5 on losses of about 0.69,
1e-4 of the largest entry on adapters after 6 steps) leave two orders of magnitude for that and
would still catch a rank that used another batch slice, a wrong weight n_r / n (a factor 2 on a
rank's share) or masks that differ (a loss moves by ~1e-3 per step here).

The runs use factor masks. With elementwise masks and micro_batch_size = 1 on 2 ranks, one entry
of an A factor was seen 4e-4 of the largest entry apart after 6 steps (losses within 3e-7, masks
equal): its gradient nearly cancels to about AdamW's eps (1e-8), where m / (sqrt(v) + eps)
turns the reorder noise into a change of the update itself; the same runs with eps = 1e-6
(a local build) agree to 5e-6. An optimizer property, not a rank's error.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import BUILD, ROOT, resafe_bin

LAUNCH_VARS = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_JOB_ID",
               "PMIX_NAMESPACE", "RESAFE_RUN_ID", "RESAFE_TEST_NAN_STEP", "RESAFE_TEST_SIGTERM_AT"]
WORDS = "the cat dog sat ran on a mat hat big red blue fast slow sun moon".split()
LOSS_TOL = 1e-5
ADAPTER_TOL = 1e-4


def rank_env(rank, world, run_id, **extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", OMPI_COMM_WORLD_RANK=str(rank),
               OMPI_COMM_WORLD_SIZE=str(world), OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
               RESAFE_RUN_ID=run_id)
    env.update(extra)
    return env


def launch(world, args, run_id, **extra):
    """world ranks of `resafe dpo args`, as mpirun would start them."""
    return [subprocess.Popen([resafe_bin(), *args], env=rank_env(r, world, run_id, **extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(world)]


def finish(procs, timeout=600):
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e))
    return out


def run_world(world, args, run_id, **extra):
    res = finish(launch(world, args, run_id, **extra))
    for r, (rc, _, err) in enumerate(res):
        assert rc == 0, f"rank {r} of {world} failed ({rc}):\n{err}"
    return res


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_dpo")
    model = str(d / "model")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_test_model.py"), model,
                    "--hidden", "32", "--layers", "2", "--vocab", "300"], check=True,
                   capture_output=True)
    pairs = d / "pairs.jsonl"
    import random
    r = random.Random(3)
    with open(pairs, "w") as f:
        for _ in range(16):
            p, c, l = (" ".join(r.choice(WORDS) for _ in range(k)) for k in (4, 5, 6))
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": l}) + "\n")
    return d, model, str(pairs)


def config(tiny, name, mask="factor", **over):
    d, model, pairs = tiny
    sections = {
        "model": {"path": model, "backend": "cpu", "threads": 1},
        "dpo": {"data_file": pairs, "beta": 0.1, "lr": 5e-3, "batch_size": 6,
                "micro_batch_size": 2, "max_steps": 6, "warmup_steps": 1},
        "snip": {"tau": 0.5, "reidentify_every": 3, "score_batches": 2, "mask": mask},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0},
        "dist": {"transport": "file", "timeout_s": 120},
        "run": {"out_dir": str(d / name), "checkpoint_every": 1, "seed": 11},
    }
    for key, v in over.items():
        s, k = key.split("__")
        sections.setdefault(s, {})[k] = v
    path = d / f"{name}.ini"
    path.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
                            for s, kv in sections.items()))
    return str(path), str(d / name)


def losses(out):
    with open(os.path.join(out, "dpo", "metrics.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f]


def adapter(out):
    with h5py.File(os.path.join(out, "dpo", "adapter.h5")) as f:
        arrays = {}
        f.visititems(lambda n, o: arrays.__setitem__(n, np.array(o))
                     if isinstance(o, h5py.Dataset) else None)
        return arrays


def assert_adapters_close(a, b):
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    scale = max(float(np.abs(v).max()) for v in x.values() if v.dtype.kind == "f")
    for k in x:
        if x[k].dtype.kind == "f":
            np.testing.assert_allclose(y[k], x[k], rtol=0, atol=ADAPTER_TOL * scale, err_msg=k)
        else:
            assert np.array_equal(x[k], y[k]), k


def mask_hashes(stderr):
    return re.findall(r"step (\d+): masks hash ([0-9a-f]{16}) \(rank (\d+)", stderr)


def ref_shares(stderr):
    """(first, end, hash of the whole gathered arrays, rank) of the reference pass's debug line."""
    return [(int(a), int(b), h, int(r)) for a, b, h, r in re.findall(
        r"reference of pairs \[(\d+), (\d+)\) computed here, hash of all ([0-9a-f]{16}) "
        r"\(rank (\d+)", stderr)]


def checkpoint_refs(out):
    with h5py.File(os.path.join(out, "dpo", "checkpoint.h5")) as f:
        return f["ref/chosen"][()].tobytes() + f["ref/rejected"][()].tobytes()


def chunk_shares(n, chunk, world):
    """Rank r's pairs: the whole micro-batches [r c // world, (r + 1) c // world) of the
    one-process pass's c = ceil(n / chunk), as [first, end) of pairs."""
    c = -(-n // chunk)
    return [(min(r * c // world * chunk, n), min((r + 1) * c // world * chunk, n))
            for r in range(world)]


@pytest.fixture(scope="module")
def single(tiny):
    cfg, out = config(tiny, "w1")
    (rc, _, err), = run_world(1, ["dpo", "--config", cfg, "-v"], "w1")
    return cfg, out, mask_hashes(err), ref_shares(err)


@pytest.mark.parametrize("world", [2, 3])
def test_dpo_on_ranks_matches_one_process(tiny, single, world, tmp_path):
    """Same global batch (6: slices 3+3, or 2+2+2) and seed: per-step losses within fp32
    reordering, final adapters close, the masks of every rank hash alike at every
    re-identification (and like the one-process run's), and only rank 0 wrote outputs.
    The reference log-probs: each rank computed only its micro-batches (16 pairs in
    micro-batches of 2: pairs [0, 8) and [8, 16), or [0, 4), [4, 10) and [10, 16)) and every
    rank holds the one-process arrays bit for bit (the hash each logs; rank 0's checkpoint has
    the bytes): a rank that skipped or misplaced its share fails here."""
    _, out1, hashes1, ref1 = single
    cfg, out = config(tiny, f"w{world}")
    res = run_world(world, ["dpo", "--config", cfg, "-v"], f"w{world}-{os.getpid()}")
    l1, lw = losses(out1), losses(out)
    assert len(lw) == len(l1) == 6
    np.testing.assert_allclose(lw, l1, rtol=0, atol=LOSS_TOL)
    assert_adapters_close(out1, out)
    per_rank = [mask_hashes(err) for _, _, err in res]
    for r, h in enumerate(per_rank):
        assert [(s, x) for s, x, _ in h] == [(s, x) for s, x, _ in per_rank[0]], f"rank {r}"
        assert len(h) == 2, h  # steps 0 and 3
    assert [(s, x) for s, x, _ in per_rank[0]] == [(s, x) for s, x, _ in hashes1]
    assert [(a, b) for a, b, _, _ in ref1] == [(0, 16)]
    shares = [ref_shares(err) for _, _, err in res]
    assert [x for sh in shares for x in sh] == [
        (a, b, ref1[0][2], r) for r, (a, b) in enumerate(chunk_shares(16, 2, world))]
    assert checkpoint_refs(out) == checkpoint_refs(out1)
    assert not os.path.exists(os.path.join(out, ".dist")) or not os.listdir(
        os.path.join(out, ".dist")), "the session's files were left behind"


def test_gradient_buckets_are_all_reduced_during_backward(tiny, single):
    """[dist] bucket_mb small enough for one bucket per layer (each layer's adapter gradients
    are ~9 KB here, the bucket 4 KB): both ranks plan 2 buckets and start both inside each
    step's last backward, as it finishes their layers (the debug line counts them: 2 of 2 at
    every one of the 6 steps), and the run still matches one process. A reduce left until after
    backward counts 0 of 2."""
    _, out1, _, _ = single
    cfg, out = config(tiny, "w2buckets", dist__bucket_mb=0.004)
    res = run_world(2, ["dpo", "--config", cfg, "-v"], f"w2b-{os.getpid()}")
    for r, (_, _, err) in enumerate(res):
        assert re.findall(r"all-reduced in (\d+) buckets of whole layers", err) == ["2"], err
        counts = re.findall(r"dpo step (\d+) gradients: (\d+) of (\d+) buckets all-reduced "
                            r"during backward", err)
        assert [int(s) for s, _, _ in counts] == list(range(1, 7)), (r, counts)
        assert all(e == n == "2" for _, e, n in counts), (r, counts)
    np.testing.assert_allclose(losses(out), losses(out1), rtol=0, atol=LOSS_TOL)
    assert_adapters_close(out1, out)


@pytest.mark.parametrize("world_after", [1, 3])
def test_world_2_checkpoint_resumes_on_another_world_size(tiny, single, world_after):
    """World 2 stops at step 4 (an injected NaN: every rank stops, checkpoint of step 3 intact);
    resumed at world 1 or 3 it ends like the uninterrupted one-process run."""
    out1 = single[1]
    cfg, out = config(tiny, f"resume{world_after}")
    res = finish(launch(2, ["dpo", "--config", cfg], f"r{world_after}a-{os.getpid()}",
                        RESAFE_TEST_NAN_STEP="3"))
    for rc, _, err in res:
        assert rc == 1 and "step 4: the loss is nan" in err, err
    assert len(losses(out)) == 3
    with h5py.File(os.path.join(out, "dpo", "checkpoint.h5")) as f:
        assert int(f.attrs["step"]) == 3
    run_world(world_after, ["dpo", "--config", cfg, "--resume"], f"r{world_after}b-{os.getpid()}")
    np.testing.assert_allclose(losses(out), losses(out1), rtol=0, atol=LOSS_TOL)
    assert_adapters_close(out1, out)


def test_killed_rank_stops_the_others_within_60_s_naming_it(tiny):
    cfg, out = config(tiny, "killed", dpo__max_steps=200)
    procs = launch(3, ["dpo", "--config", cfg], f"kill-{os.getpid()}")
    metrics = os.path.join(out, "dpo", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and
                                           open(metrics).read().count("\n") >= 2):
        assert all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)  # left unreaped (a zombie) until the end
    t0 = time.time()
    for r in (0, 2):
        procs[r].wait(timeout=90)
    took = time.time() - t0
    res = finish(procs)
    assert took < 60, took
    for r in (0, 2):
        rc, _, err = res[r]
        assert rc != 0
        assert re.search(r"rank 1 \(pid \d+\) died", err), err
        errors = [l for l in err.splitlines() if l.startswith("resafe: error")]
        assert len(errors) == 1, err


def test_sft_and_train_still_refuse_ranks_in_one_line(tiny):
    cfg, _ = config(tiny, "refused")
    for command in ("sft", "train"):
        rc, _, err = finish(launch(2, [command, "--config", cfg], "refuse"))[1]
        assert rc == 1 and f"resafe {command} does not run data parallel" in err, err


# ---------------------------------------------------------------- the reference pass, split

DPO_TOOL = os.path.join(BUILD, "tools", "dpo_tool")


def tool_adapter(model, path, rng):
    """A random factor-free adapter on q_proj (the reference pass switches it off: it must not
    matter, but it is there to be switched off)."""
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    h, rank = c["hidden_size"], 2
    with h5py.File(path, "w") as f:
        f.attrs["rank"], f.attrs["alpha"], f.attrs["dropout"] = np.int64(rank), 4.0, 0.0
        f.attrs["targets"], f.attrs["mask_mode"] = "q_proj", "none"
        for layer in range(c["num_hidden_layers"]):
            f[f"lora/layers.{layer}.q_proj/A"] = rng.standard_normal((rank, h)).astype(np.float32)
            f[f"lora/layers.{layer}.q_proj/B"] = rng.standard_normal((h, rank)).astype(np.float32)


def tool_ref(world, args, out, run_id):
    """`dpo_tool ref` on world ranks; per rank: (ref bytes, first, count)."""
    procs = [subprocess.Popen([DPO_TOOL, "ref", *args, f"{out}.r{r}.h5", f"{out}.comm"],
                              env=rank_env(r, world, run_id), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    got = []
    for r, (rc, _, err) in enumerate(finish(procs, timeout=300)):
        assert rc == 0, f"rank {r} of {world}: {err}"
        with h5py.File(f"{out}.r{r}.h5") as f:
            assert (int(f.attrs["rank"]), int(f.attrs["world"])) == (r, world)
            w, l = f["ref/chosen"][()], f["ref/rejected"][()]
            got.append((w.tobytes() + l.tobytes(), int(f.attrs["first"]), int(f.attrs["count"]),
                        np.isfinite(w).all() and np.isfinite(l).all()))
    return got


@pytest.mark.parametrize("n,micro,world", [(11, 2, 2), (11, 3, 3), (11, 1, 3), (12, 4, 2),
                                           (11, 5, 3), (7, 4, 3), (3, 2, 4)])
def test_reference_split_over_ranks_gives_every_rank_the_one_process_bytes(
        tiny, tmp_path, rng_seed, n, micro, world):
    """rs_dpo_reference_sharded through dpo_tool: random pairs of random lengths (so padding
    differs between micro-batches), arrays NaN-poisoned before the pass. Every rank of world
    2..4 ends with the world-1 arrays byte for byte, having computed exactly the whole
    micro-batches chunk_shares names (a world above the micro-batch count leaves ranks idle:
    (7, 4, 3) and (3, 2, 4)). A rank that skipped its share would leave NaN (or, sending zeros,
    other bytes) in every rank's arrays."""
    _, model, _ = tiny
    rng = np.random.default_rng(rng_seed)
    pairs = []
    for _ in range(n):
        prompt = [int(x) for x in rng.integers(3, 300, rng.integers(1, 6))]
        seq = lambda: prompt + [int(x) for x in rng.integers(3, 300, rng.integers(1, 9))]
        pairs.append({"chosen": seq(), "chosen_prompt": len(prompt), "rejected": seq(),
                      "rejected_prompt": len(prompt)})
    pairs_path = tmp_path / "pairs.json"
    pairs_path.write_text(json.dumps({"beta": 0.1, "micro": micro, "pairs": pairs}))
    tool_adapter(model, tmp_path / "adapter.h5", rng)
    args = [model, str(tmp_path / "adapter.h5"), str(pairs_path)]
    (want, first1, count1, finite1), = tool_ref(1, args, str(tmp_path / "w1"), f"t1-{os.getpid()}")
    assert (first1, count1) == (0, n) and finite1
    got = tool_ref(world, args, str(tmp_path / f"w{world}"), f"t{world}-{os.getpid()}")
    assert [(a, a + c) for _, a, c, _ in got] == chunk_shares(n, micro, world)
    for r, (b, _, _, _) in enumerate(got):
        assert b == want, f"rank {r} of {world}: not the one-process reference"


# ---------------------------------------------------------------- triplets and eval

def write_ini(path, sections):
    path.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
                            for s, kv in sections.items()))
    return str(path)


@pytest.fixture(scope="module")
def gen_setup(tiny):
    """The tiny model, its RTN int4 quantization, 7 harmful + 6 benign prompts (odd counts: the
    ranks' shares differ), sampled patch responses (temperature 0.8: every prompt's draws come
    from its own seed) and an eval with decoding attacks (sampling) and held-out text."""
    d, model, _ = tiny
    q = str(d / "q")
    subprocess.run([resafe_bin(), "quantize", "--model", model, "--method", "rtn", "--bits", "4",
                    "--group", "32", "--out", q], check=True, capture_output=True,
                   env=rank_env(0, 1, "quantize"))
    import random
    r = random.Random(5)
    sent = lambda: " ".join(r.choice(WORDS) for _ in range(r.randint(2, 7)))
    (d / "harmful.csv").write_text("prompt,category\n" + "".join(
        f"{sent()},{r.choice(['cyber', 'fraud'])}\n" for _ in range(7)))
    (d / "benign.jsonl").write_text("".join(
        json.dumps({"prompt": sent(), "answer": r.choice(WORDS)}) + "\n" for _ in range(6)))
    (d / "heldout.txt").write_text("".join(sent() + "\n" for _ in range(4)))
    return d, model, q


def gen_config(gen_setup, name):
    d, model, q = gen_setup
    return write_ini(d / f"{name}.ini", {
        "model": {"path": model, "backend": "cpu", "threads": 1},
        "quant": {"model": q},
        "generate": {"batch_size": 3},
        "patch": {"harmful_file": d / "harmful.csv", "benign_file": d / "benign.jsonl",
                  "n_prompts": 13, "max_new_tokens": 6, "temperature": 0.8},
        "eval": {"harmful_file": d / "harmful.csv", "benign_file": d / "benign.jsonl",
                 "heldout_file": d / "heldout.txt", "max_new_tokens": 5,
                 "decoding_attacks": "true", "attack_temperatures": "0.7",
                 "attack_top_k": "20", "attack_top_p": "0.9"},
        "dpo": {"batch_size": 4},
        "dist": {"transport": "file", "timeout_s": 120},
        "run": {"out_dir": d / name, "progress": "off", "seed": 3},
    }), d / name


def tree(root):
    """Every file under root (the session directory aside) with its bytes."""
    files = {}
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x != ".dist"]
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def gen_single(gen_setup):
    cfg, out = gen_config(gen_setup, "g1")
    run_world(1, ["triplets", "--config", cfg], "g1")
    run_world(1, ["eval", "--config", cfg, "--model", f"q={gen_setup[2]}", "--reference",
                  gen_setup[1]], "g1e")
    return tree(out)


@pytest.mark.parametrize("world", [2, 3])
def test_triplets_and_eval_on_ranks_write_the_one_process_bytes(gen_setup, gen_single, world):
    """Prompt i on rank i mod world, gathered: the patch set, eval.json and the responses are
    the one-process run's byte for byte, written once (by rank 0); the other ranks print
    nothing on stdout. The patch set's reference log-probs and eval's perplexity and KL passes
    are split by whole batches ([dpo] batch_size 4 pairs; [generate] batch_size 3 sequences:
    4 held-out texts and 6 benign responses are 2 batches each) and gathered: each rank logs
    the sequences it ran (-v), and the ppl and KL numbers in eval.json are the one-process
    bytes only if every rank ran its share."""
    cfg, out = gen_config(gen_setup, f"g{world}")
    res = run_world(world, ["triplets", "--config", cfg], f"g{world}-{os.getpid()}")
    res += run_world(world, ["eval", "--config", cfg, "--model", f"q={gen_setup[2]}",
                             "--reference", gen_setup[1], "-v"], f"g{world}e-{os.getpid()}")
    passes = {}
    for _, _, err in res[world:]:
        for name, what, a, b, n, r, w in re.findall(
                r"eval: (\S+)/(ppl|kl): sequences \[(\d+), (\d+)\) of (\d+) computed here "
                r"\(rank (\d+) of (\d+)\)", err):
            passes.setdefault((name, what, int(n)), []).append((int(a), int(b), int(r), int(w)))
    assert {(name, what) for name, what, _ in passes} >= {("q", "ppl"), ("q", "kl")}, passes
    for (name, what, n), shares in passes.items():
        want = chunk_shares(n, min(3, n), world)
        assert sorted(shares, key=lambda x: x[2]) == [
            (a, b, r, world) for r, (a, b) in enumerate(want)], (name, what, shares)
    got = tree(out)
    assert sorted(got) == sorted(gen_single)
    for name in gen_single:
        assert got[name] == gen_single[name], name
    assert any(n.endswith(".h5") for n in got) and any(n.endswith("eval.json") for n in got), got
    for r, (_, stdout, _) in enumerate(res):
        if r % world != 0:
            assert stdout == "", stdout


# ---------------------------------------------------------------- the launch script

FAKE_MPIRUN = """#!/usr/bin/env python3
# mpirun -np N [-x VAR]... CMD...: N copies of CMD with OpenMPI's rank variables
import os, subprocess, sys
a, n, i = sys.argv[1:], 1, 0
while a[i].startswith("-"):
    n = int(a[i + 1]) if a[i] == "-np" else n
    i += 2
with open(os.environ["FAKE_MPIRUN_LOG"], "a") as f:
    f.write(f"{n} {a[i + 1]} {os.environ['RESAFE_RUN_ID']}\\n")
env = lambda r: dict(os.environ, OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_SIZE=str(n),
                     OMPI_COMM_WORLD_LOCAL_RANK=str(r))
ps = [subprocess.Popen(a[i:], env=env(r)) for r in range(n)]
sys.exit(1 if any(p.wait() for p in ps) else 0)
"""


def test_mpirun_script_runs_every_stage_with_the_ranks_where_they_apply(gen_setup, tmp_path):
    """scripts/cluster/mpirun.sh with an mpirun stand-in on PATH: quantize and merge once,
    triplets, dpo and eval on 2 ranks (each launch its own run id), every output written."""
    d, model, _ = gen_setup
    (tmp_path / "mpirun").write_text(FAKE_MPIRUN)
    (tmp_path / "mpirun").chmod(0o755)
    out = tmp_path / "run"
    cfg = write_ini(tmp_path / "run.ini", {
        "model": {"path": model, "backend": "cpu", "threads": 1},
        "quant": {"format": "int4", "group_size": 32, "method": "rtn"},
        "patch": {"harmful_file": d / "harmful.csv", "benign_file": d / "benign.jsonl",
                  "n_prompts": 8, "max_new_tokens": 6},
        "dpo": {"batch_size": 4, "max_steps": 3},
        "snip": {"reidentify_every": 2, "score_batches": 1},
        "lora": {"rank": 4, "alpha": 8, "merge": "grid", "merge_compare": "none"},
        "eval": {"harmful_file": d / "harmful.csv", "benign_file": d / "benign.jsonl",
                 "max_new_tokens": 4},
        "run": {"out_dir": out, "progress": "off", "checkpoint_every": 0},
    })
    env = rank_env(0, 1, "script", PATH=f"{tmp_path}:{os.environ['PATH']}",
                   FAKE_MPIRUN_LOG=str(tmp_path / "log"), RESAFE=resafe_bin())
    for k in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
              "RESAFE_RUN_ID"):
        env.pop(k)
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "cluster", "mpirun.sh"), "2", cfg],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    launches = [l.split() for l in (tmp_path / "log").read_text().splitlines()]
    assert [(n, stage) for n, stage, _ in launches] == [("2", "triplets"), ("2", "dpo"),
                                                        ("2", "eval")]
    assert len({run_id for _, _, run_id in launches}) == 3
    for f in ("quantize/model/config.json", "triplets/patchset.h5", "dpo/adapter.h5",
              "merge/grid/config.json", "eval/eval.json", "eval/report.md"):
        assert (out / f).exists(), f
    assert not os.listdir(out / ".dist")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tiny, single):
    """SIGTERM to rank 1 alone in step 2, after that step's reduce (RESAFE_TEST_SIGTERM_AT, so
    the test does not race the run): held until step 3's reduce, then both ranks stop after
    step 3 with exit code 128 + 15 and one checkpoint; --resume at world 1 ends like the
    uninterrupted run."""
    out1 = single[1]
    cfg, out = config(tiny, "sigterm")
    res = finish(launch(2, ["dpo", "--config", cfg], f"term-{os.getpid()}",
                        RESAFE_TEST_SIGTERM_AT="1:2"))
    assert [rc for rc, _, _ in res] == [143, 143], res
    assert len(losses(out)) == 3
    with h5py.File(os.path.join(out, "dpo", "checkpoint.h5")) as f:
        assert int(f.attrs["step"]) == 3
    run_world(1, ["dpo", "--config", cfg, "--resume"], f"term-b-{os.getpid()}")
    np.testing.assert_allclose(losses(out), losses(out1), rtol=0, atol=LOSS_TOL)
    assert_adapters_close(out1, out)
