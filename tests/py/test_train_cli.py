"""`resafe sft` and `resafe dpo` end to end: learning a task, resuming bit-identically after
kill -9 and SIGTERM, stopping on a NaN loss, refusing bad inputs, and outputs that transformers
and peft load.

The models are tiny random Llama chat models made by scripts/make_test_model.py (a byte-level
BPE tokenizer, Llama-2 chat template). Runs use one thread: the steps are small, and OpenMP
fork/join on a busy 2-core CI machine costs more than it saves.
"""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import BUILD, ROOT, resafe_bin, run_resafe

transformers = pytest.importorskip("transformers")

ENV = dict(os.environ, OMP_NUM_THREADS="1")
WORDS = "the cat dog sat ran on a mat hat big red blue fast slow sun moon".split()


def make_model(path, *args):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_test_model.py"), str(path),
                    *args], check=True, capture_output=True)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny") / "model", "--hidden", "64", "--layers", "2")


def write_pairs(path, n, seed=0):
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p, c, l = (" ".join(r.choice(WORDS) for _ in range(k)) for k in (5, 6, 7))
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": l}) + "\n")
    return str(path)


def write_ini(path, sections):
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
                   for s, kv in sections.items())
    path.write_text(text)
    return str(path)


def dpo_config(tmp_path, model, out, **over):
    sections = {
        "model": {"path": model, "backend": "cpu", "threads": 1},
        "dpo": {"data_file": write_pairs(tmp_path / "pairs.jsonl", 24), "beta": 0.1, "lr": 2e-3,
                "batch_size": 4, "micro_batch_size": 2, "max_steps": 16, "warmup_steps": 2},
        "snip": {"tau": 0.6, "reidentify_every": 5, "score_batches": 2},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "run": {"out_dir": out, "checkpoint_every": 1, "seed": 7},
    }
    for key, v in over.items():
        s, k = key.split("__")
        sections.setdefault(s, {})[k] = v
    return write_ini(tmp_path / f"{os.path.basename(out)}.ini", sections)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def assert_same_dpo_outputs(a, b):
    a, b = os.path.join(a, "dpo"), os.path.join(b, "dpo")
    assert read(f"{a}/metrics.jsonl") == read(f"{b}/metrics.jsonl")
    assert read(f"{a}/adapter_peft/adapter_model.safetensors") == \
        read(f"{b}/adapter_peft/adapter_model.safetensors")
    assert read(f"{a}/adapter_peft/adapter_config.json") == read(f"{b}/adapter_peft/adapter_config.json")
    assert read(f"{a}/adapter.h5") == read(f"{b}/adapter.h5")
    assert read(f"{a}/checkpoint.h5") == read(f"{b}/checkpoint.h5")


def lines(path):
    try:
        with open(path) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


def interrupt_after(cmd, metrics, n_lines, sig):
    """Start cmd, send sig once the metrics log has n_lines lines; returns the exit code."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 300
    while lines(metrics) < n_lines and time.time() < deadline:
        time.sleep(0.002)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(sig)
    p.wait(timeout=300)
    return p.returncode, p.stderr.read().decode()


@pytest.fixture(scope="module")
def uninterrupted_dpo(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_a")
    out = str(tmp / "a")
    cfg = dpo_config(tmp, tiny_model, out)
    run_resafe("dpo", "--config", cfg, env=ENV)
    return tmp, out


# ---------------------------------------------------------------- DPO

def test_dpo_metrics_and_outputs(uninterrupted_dpo):
    tmp, out = uninterrupted_dpo
    rows = [json.loads(l) for l in open(os.path.join(out, "dpo", "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert abs(rows[0]["loss"] - np.log(2)) < 1e-6  # B = 0: the policy is the reference
    for key in ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "logp_chosen",
                "logp_rejected", "lr", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert np.mean([r["loss"] for r in rows[-4:]]) < np.log(2)
    with h5py.File(os.path.join(out, "dpo", "adapter.h5")) as f:
        assert f.attrs["rank"] == 4 and f.attrs["mask_mode"] == "factor"
        assert f.attrs["targets"] == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        assert f["lora/layers.0.q_proj/A"].shape == f["lora/layers.0.q_proj/mask_A"].shape == (4, 64)
        masks = [f[f"lora/{g}/{m}"][...] for g in f["lora"] for m in ("mask_A", "mask_B")]
        trainable = sum(m.sum() for m in masks) / sum(m.size for m in masks)
        assert 0.05 < trainable < 0.95, trainable


def test_dpo_kill9_then_resume_is_byte_identical(uninterrupted_dpo, tiny_model, rng_seed):
    tmp, a = uninterrupted_dpo
    b = str(tmp / "b")
    cfg = dpo_config(tmp, tiny_model, b)
    k = random.Random(rng_seed).randint(2, 12)
    rc, _ = interrupt_after([resafe_bin(), "dpo", "--config", cfg],
                            os.path.join(b, "dpo", "metrics.jsonl"), k, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    run_resafe("dpo", "--config", cfg, "--resume", env=ENV)
    assert_same_dpo_outputs(a, b)


def test_dpo_sigterm_writes_a_checkpoint_and_resume_is_identical(uninterrupted_dpo, tiny_model,
                                                                rng_seed):
    tmp, a = uninterrupted_dpo
    c = str(tmp / "c")
    cfg = dpo_config(tmp, tiny_model, c, run__checkpoint_every=0)  # only the signal's checkpoint
    k = random.Random(rng_seed + 1).randint(2, 12)
    rc, err = interrupt_after([resafe_bin(), "dpo", "--config", cfg],
                              os.path.join(c, "dpo", "metrics.jsonl"), k, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    assert "--resume" in err
    with h5py.File(os.path.join(c, "dpo", "checkpoint.h5")) as f:
        step = int(f.attrs["step"])
    assert k <= step < 16
    assert lines(os.path.join(c, "dpo", "metrics.jsonl")) == step
    p = run_resafe("dpo", "--config", cfg, check=False, env=ENV)
    assert p.returncode == 1 and "--resume continues it" in p.stderr
    run_resafe("dpo", "--config", cfg, "--resume", env=ENV)
    assert read(f"{a}/dpo/metrics.jsonl") == read(f"{c}/dpo/metrics.jsonl")
    assert read(f"{a}/dpo/adapter.h5") == read(f"{c}/dpo/adapter.h5")


def test_nan_loss_stops_cleanly_and_leaves_the_last_checkpoint(uninterrupted_dpo, tiny_model):
    tmp, a = uninterrupted_dpo
    d = str(tmp / "d")
    cfg = dpo_config(tmp, tiny_model, d, run__checkpoint_every=2)
    p = run_resafe("dpo", "--config", cfg, check=False, env=dict(ENV, RESAFE_TEST_NAN_STEP="5"))
    assert p.returncode == 1
    err = [l for l in p.stderr.splitlines() if "error" in l]
    assert len(err) == 1 and "step 6: the loss is nan" in err[0] and "checkpoint" in err[0], p.stderr
    with h5py.File(os.path.join(d, "dpo", "checkpoint.h5")) as f:
        assert int(f.attrs["step"]) == 4
    assert not os.path.exists(os.path.join(d, "dpo", "adapter.h5"))
    run_resafe("dpo", "--config", cfg, "--resume", env=ENV)  # the same run, continued
    assert read(f"{a}/dpo/metrics.jsonl") == read(f"{d}/dpo/metrics.jsonl")


def test_checkpoint_holds_nothing_of_the_launcher_and_resumes_under_another(uninterrupted_dpo,
                                                                          tiny_model):
    """A run started as OpenMPI's rank 0 of 1 stops at step 5 and resumes as SLURM's rank 0 of 1
    (srun step): the same outputs as the plain uninterrupted run. (Other world sizes are refused
    until the NCCL build; the global order across world sizes is tests/unit/test_dist.c.)"""
    tmp, a = uninterrupted_dpo
    e = str(tmp / "e")
    cfg = dpo_config(tmp, tiny_model, e, run__checkpoint_every=2)
    mpi = dict(ENV, OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="1",
               OMPI_COMM_WORLD_LOCAL_RANK="0", RESAFE_TEST_NAN_STEP="5")
    p = run_resafe("dpo", "--config", cfg, check=False, env=mpi)
    assert p.returncode == 1 and "step 6: the loss is nan" in p.stderr, p.stderr
    with h5py.File(os.path.join(e, "dpo", "checkpoint.h5")) as f:
        assert int(f.attrs["step"]) == 4
        names = set(f.attrs) | set(f.keys())
    assert not any("rank" in n or "world" in n for n in names), names
    slurm = dict(ENV, SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_STEP_ID="0")
    run_resafe("dpo", "--config", cfg, "--resume", env=slurm)
    assert_same_dpo_outputs(a, e)


def test_resume_refuses_a_different_config(uninterrupted_dpo, tiny_model):
    tmp, a = uninterrupted_dpo
    cfg = dpo_config(tmp, tiny_model, a)
    p = run_resafe("dpo", "--config", cfg, "--resume", "--set", "dpo.beta=0.2", check=False, env=ENV)
    assert p.returncode == 1 and "different config" in p.stderr and "checkpoint.h5" in p.stderr


@pytest.mark.parametrize("text,want", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n',
     'pairs.jsonl:2: "chosen" is not a string'),
    ('{"prompt": "a", "chosen": "b"}\n', 'pairs.jsonl:1: no "rejected" member'),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"\n', "pairs.jsonl:1: not a JSON object"),
    ('\n\n', "pairs.jsonl: no preference pairs"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen": -1, "ref_rejected": -2}\n'
     '{"prompt": "a", "chosen": "b", "rejected": "c"}\n', "1 of 2 pairs have reference log-probs"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen": 1, "ref_rejected": -2}\n',
     'pairs.jsonl:1: "ref_chosen" is not a finite log-probability'),
    ('{"prompt": "a", "chosen": "\xff", "rejected": "c"}\n', "pairs.jsonl:1: chosen"),
])
def test_dpo_bad_data_is_one_clear_error_and_writes_nothing(tmp_path, tiny_model, text, want):
    out = str(tmp_path / "run")
    cfg = dpo_config(tmp_path, tiny_model, out)
    (tmp_path / "pairs.jsonl").write_bytes(text.encode("latin-1"))  # "\xff": invalid UTF-8
    p = run_resafe("dpo", "--config", cfg, check=False, env=ENV)
    err = [l for l in p.stderr.splitlines() if l.startswith("resafe: error")]
    assert p.returncode == 1 and len(err) == 1 and want in err[0], p.stderr
    assert not os.path.exists(os.path.join(out, "dpo"))


def test_config_errors_name_the_key(tmp_path, tiny_model):
    cfg = dpo_config(tmp_path, tiny_model, str(tmp_path / "run"), dpo__data_file='""')
    p = run_resafe("dpo", "--config", cfg, check=False, env=ENV)
    assert p.returncode == 1 and "[dpo] data_file is not set" in p.stderr
    p = run_resafe("dpo", "--config", cfg, "--set", "snip.tau=1.5", check=False, env=ENV)
    assert p.returncode == 1 and "tau" in p.stderr and "out of range" in p.stderr
    p = run_resafe("dpo", check=False)
    assert p.returncode == 2 and "--config" in p.stderr
    cfg = dpo_config(tmp_path, tiny_model, str(tmp_path / "run"))
    p = run_resafe("dpo", "--config", cfg, "--set", "lora.dropout=0.1", "--set", "snip.mask=elementwise",
                   check=False, env=ENV)
    assert p.returncode == 1 and "[lora] dropout" in p.stderr


def test_peft_loads_the_exported_adapter_and_it_equals_the_hdf5_one(uninterrupted_dpo, tiny_model):
    peft = pytest.importorskip("peft")
    tmp, a = uninterrupted_dpo
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, os.path.join(a, "dpo", "adapter_peft"))
    model.eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with h5py.File(os.path.join(a, "dpo", "adapter.h5")) as f, torch.no_grad():
        scale = f.attrs["alpha"] / f.attrs["rank"]
        for layer in range(2):
            for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                blk = ref.model.layers[layer]
                lin = getattr(blk.self_attn if t[0] in "qkvo" else blk.mlp, t)
                A = torch.from_numpy(f[f"lora/layers.{layer}.{t}/A"][...])
                B = torch.from_numpy(f[f"lora/layers.{layer}.{t}/B"][...])
                assert B.abs().max() > 0
                lin.weight += scale * B @ A
        want = ref(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


@pytest.mark.skipif("asan" in BUILD, reason="timing means nothing under the sanitizers")
def test_tiny_dpo_step_is_well_under_a_second(tmp_path):
    """2 layers, width 128, a batch of 4 pairs of ~40 tokens, rank 8 on every linear."""
    model = make_model(tmp_path / "m128", "--hidden", "128", "--layers", "2")
    out = str(tmp_path / "run")
    cfg = dpo_config(tmp_path, model, out, lora__rank=8, lora__alpha=16, lora__dropout=0,
                     snip__reidentify_every=1000, run__checkpoint_every=0)
    # CPU time of the child processes, not wall time: other load on the machine (CI shares its two
    # cores) must not make the test fail; the step is single-threaded here (ENV), so CPU time is
    # what a step costs.
    times = []
    for steps in (2, 12):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run_resafe("dpo", "--config", cfg, "--force", "--set", f"dpo.max_steps={steps}", env=ENV)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    per_step = (times[1] - times[0]) / 10
    print(f"tiny DPO step: {per_step * 1000:.0f} ms of CPU time")
    assert per_step < 0.5, f"{per_step:.2f} s per step"


# ---------------------------------------------------------------- SFT

def copy_task(tmp_path, n_train=2000, n_held=100, seed=1):
    r = random.Random(seed)
    seen, train, held = set(), [], []
    while len(train) + len(held) < n_train + n_held:
        x = "".join(r.choice("abcdefghij") for _ in range(4))
        if x in seen:
            continue
        seen.add(x)
        (train if len(train) < n_train else held).append(x)
    with open(tmp_path / "copy.jsonl", "w") as f:
        for x in train:
            f.write(json.dumps({"q": x, "a": x}) + "\n")
    (tmp_path / "held.txt").write_text("\n".join(held) + "\n")
    return str(tmp_path / "copy.jsonl"), held


def sft_config(tmp_path, model, data, out, **over):
    sections = {
        "model": {"path": model, "backend": "cpu", "threads": 1, "chat_template": "llama-2"},
        "sft": {"data_file": data, "prompt_key": "q", "response_key": "a", "lr": 3e-3,
                "warmup_steps": 20, "max_steps": 120, "batch_size": 32, "micro_batch_size": 16},
        "run": {"out_dir": out, "checkpoint_every": 50},
    }
    for key, v in over.items():
        s, k = key.split("__")
        sections.setdefault(s, {})[k] = v
    return write_ini(tmp_path / f"{os.path.basename(out)}.ini", sections)


def test_sft_learns_to_copy_and_writes_a_model_transformers_loads(tmp_path):
    """A character-level model (byte-level BPE without merges) learns to copy 4-letter strings
    in the Llama-2 chat format; greedy generation then copies >= 95% of held-out strings."""
    model = make_model(tmp_path / "char", "--hidden", "64", "--layers", "2", "--vocab", "259")
    data, held = copy_task(tmp_path)
    out = str(tmp_path / "run")
    run_resafe("sft", "--config", sft_config(tmp_path, model, data, out), env=ENV)
    rows = [json.loads(l) for l in open(os.path.join(out, "sft", "metrics.jsonl"))]
    assert len(rows) == 120 and rows[-1]["loss"] < 0.05 * rows[0]["loss"]
    trained = os.path.join(out, "sft", "model")
    p = run_resafe("generate", "--model", trained, "--prompts-file", tmp_path / "held.txt", "--chat",
                   "--format", "jsonl", "--max-new-tokens", "8", "--batch-size", "50", env=ENV)
    texts = [json.loads(l)["text"].strip() for l in p.stdout.splitlines()]
    solved = sum(t == h for t, h in zip(texts, held))
    print(f"copy task: {solved}/{len(held)} held-out strings copied")
    assert solved >= 0.95 * len(held)

    hf = transformers.AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(trained)
    msgs = [{"role": "user", "content": held[0]}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert tok.decode(gen[0, len(ids):], skip_special_tokens=True).strip() == texts[0]


def test_sft_trainable_linears_freezes_everything_else(tmp_path, rng_seed):
    """[sft] trainable = linears: embeddings, norms and lm_head come out byte-identical to the
    input while the seven projections move; with no clipping (the only coupling between
    tensors in AdamW) the first step moves each projection exactly as trainable = all does, and
    from the second step on the two runs differ (the frozen tensors did not move)."""
    from safetensors.numpy import load_file
    model = make_model(tmp_path / "char", "--hidden", "32", "--layers", "2", "--vocab", "259")
    data, _ = copy_task(tmp_path, n_train=64, n_held=1, seed=rng_seed % 1000)
    runs = {}
    for name, trainable, steps in (("lin1", "linears", 1), ("all1", "all", 1),
                                   ("lin3", "linears", 3), ("all3", "all", 3)):
        out = str(tmp_path / name)
        cfg = sft_config(tmp_path, model, data, out, sft__trainable=trainable,
                         sft__max_steps=steps, sft__warmup_steps=0, sft__grad_clip=0,
                         sft__schedule="constant", sft__lr=1e-3, sft__batch_size=16,
                         sft__micro_batch_size=16, run__checkpoint_every=0)
        run_resafe("sft", "--config", cfg, env=ENV)
        runs[name] = (load_file(os.path.join(out, "sft", "model", "model.safetensors")),
                      [json.loads(l)["loss"] for l in open(os.path.join(out, "sft",
                                                                       "metrics.jsonl"))])
    base = load_file(os.path.join(model, "model.safetensors"))
    linear = [k for k in base if "_proj.weight" in k]
    frozen = [k for k in base if k not in linear]
    assert len(linear) == 14 and {"model.embed_tokens.weight", "lm_head.weight"} <= set(frozen)
    for k in frozen:
        for name in ("lin1", "lin3"):
            assert runs[name][0][k].tobytes() == base[k].astype(np.float32).tobytes(), (name, k)
        assert not np.array_equal(runs["all3"][0][k], base[k]), k  # trainable = all moves them
    for k in linear:
        assert not np.array_equal(runs["lin3"][0][k], base[k]), k
        assert np.array_equal(runs["lin1"][0][k], runs["all1"][0][k]), k
    assert runs["lin1"][1] == runs["all1"][1]
    assert runs["lin3"][1][0] == runs["all3"][1][0] and runs["lin3"][1][1:] != runs["all3"][1][1:]


def sft_masked(tmp_path, model, data, name, steps, mask_file=None, **over):
    from safetensors.numpy import load_file
    out = str(tmp_path / name)
    extra = {"sft__freeze_mask": mask_file} if mask_file else {}
    cfg = sft_config(tmp_path, model, data, out, sft__max_steps=steps, sft__warmup_steps=0,
                     sft__grad_clip=0, sft__schedule="constant", sft__lr=1e-3,
                     sft__batch_size=16, sft__micro_batch_size=16, run__checkpoint_every=0,
                     **extra, **over)
    p = subprocess.run([resafe_bin(), "sft", "--config", cfg], capture_output=True, text=True,
                       env=ENV)
    path = os.path.join(out, "sft", "model", "model.safetensors")
    return p, (load_file(path) if p.returncode == 0 else None), out


def test_sft_freeze_mask_keeps_the_masked_entries(tmp_path, rng_seed):
    """[sft] freeze_mask: the entries a mask holds at 0 come out byte-identical, the others move,
    and (no clipping: AdamW is entrywise) after one step they equal an unmasked run's; a tensor
    the file does not name is trained in full."""
    from safetensors.numpy import load_file
    model = make_model(tmp_path / "char", "--hidden", "32", "--layers", "2", "--vocab", "259")
    data, _ = copy_task(tmp_path, n_train=64, n_held=1, seed=rng_seed % 1000)
    base = load_file(os.path.join(model, "model.safetensors"))
    rng = np.random.default_rng(rng_seed)
    masked = sorted(k for k in base if "_proj.weight" in k)[::2]
    masks = {k: (rng.random(base[k].shape) < 0.5).astype(np.uint8) for k in masked}
    with h5py.File(tmp_path / "mask.h5", "w") as f:
        for k, m in masks.items():
            f.create_dataset(k, data=m)
    _, one_all, _ = sft_masked(tmp_path, model, data, "all1", 1)
    p1, one, _ = sft_masked(tmp_path, model, data, "m1", 1, str(tmp_path / "mask.h5"))
    p3, three, _ = sft_masked(tmp_path, model, data, "m3", 3, str(tmp_path / "mask.h5"))
    assert p1.returncode == 0 and p3.returncode == 0, p3.stderr
    assert f"{len(masked)} tensors masked" in p3.stderr
    for k, m in masks.items():
        b = base[k].astype(np.float32)
        for got in (one, three):
            assert got[k][m == 0].tobytes() == b[m == 0].tobytes(), k
        assert np.mean(three[k][m == 1] != b[m == 1]) > 0.9, k
        assert np.array_equal(one[k][m == 1], one_all[k][m == 1]), k
    for k in base:
        if k not in masks:
            assert np.array_equal(one[k], one_all[k]), k


def test_sft_freeze_box_clamps_the_update_into_the_bounds(tmp_path, rng_seed):
    """[sft] freeze_mask with float32 bounds [2, rows, cols]: after one step every entry is
    numpy's clip of an unconstrained run's value into its box (AdamW is entrywise, no clipping);
    after three steps every entry lies in its box, many sit on a bound and differ from the
    unconstrained run's, and entries with lo == hi are byte-identical to the loaded ones; an
    infinite box is no box (one step)."""
    from safetensors.numpy import load_file
    model = make_model(tmp_path / "char", "--hidden", "32", "--layers", "2", "--vocab", "259")
    data, _ = copy_task(tmp_path, n_train=64, n_held=1, seed=rng_seed % 1000)
    base = load_file(os.path.join(model, "model.safetensors"))
    rng = np.random.default_rng(rng_seed)
    names = sorted(k for k in base if "_proj.weight" in k)
    boxed, free = names[::2], names[1]
    boxes = {}
    for k in boxed:
        w = base[k].astype(np.float32)
        r = rng.choice([0.0, 1e-4, 3e-4, np.inf], size=(2,) + w.shape, p=[0.2, 0.3, 0.3, 0.2])
        boxes[k] = np.stack([w - r[0], w + r[1]]).astype(np.float32)
    w = base[free].astype(np.float32)
    boxes[free] = np.stack([np.full_like(w, -np.inf), np.full_like(w, np.inf)])
    with h5py.File(tmp_path / "box.h5", "w") as f:
        for k, b in boxes.items():
            f.create_dataset(k, data=b)
    _, one_all, _ = sft_masked(tmp_path, model, data, "all1", 1)
    _, three_all, _ = sft_masked(tmp_path, model, data, "all3", 3)
    p1, one, _ = sft_masked(tmp_path, model, data, "b1", 1, str(tmp_path / "box.h5"))
    p3, three, _ = sft_masked(tmp_path, model, data, "b3", 3, str(tmp_path / "box.h5"))
    assert p1.returncode == 0 and p3.returncode == 0, p1.stderr + p3.stderr
    on_bound = moved = 0
    for k in boxed:
        lo, hi = boxes[k]
        assert np.clip(one_all[k], lo, hi).tobytes() == one[k].tobytes(), k
        assert np.all((three[k] >= lo) & (three[k] <= hi)), k
        fixed = lo == hi
        assert three[k][fixed].tobytes() == base[k].astype(np.float32)[fixed].tobytes(), k
        on_bound += int(np.sum(((three[k] == lo) | (three[k] == hi)) & ~fixed))
        moved += int(np.sum(three[k] != three_all[k]))
    assert on_bound > 100 and moved > 100, (on_bound, moved)
    assert one[free].tobytes() == one_all[free].tobytes()


@pytest.mark.parametrize("what", ["shape", "value", "dtype", "name", "box_order", "box_nan",
                                  "box_outside", "box_shape"])
def test_sft_bad_freeze_mask_is_one_line_and_writes_nothing(tmp_path, rng_seed, what):
    model = make_model(tmp_path / "char", "--hidden", "32", "--layers", "1", "--vocab", "259")
    data, _ = copy_task(tmp_path, n_train=32, n_held=1, seed=rng_seed % 1000)
    name = "model.layers.0.self_attn.q_proj.weight"
    m = np.ones((32, 32), np.uint8)
    if what == "shape":
        m = np.ones((32, 31), np.uint8)
    elif what == "value":
        m[3, 4] = 2
    elif what == "dtype":
        m = m.astype(np.float64)
    elif what.startswith("box"):
        from safetensors.numpy import load_file
        w = load_file(os.path.join(model, "model.safetensors"))[name].astype(np.float32)
        m = np.stack([w - 1e-3, w + 1e-3])
        i, j = np.random.default_rng(rng_seed).integers(0, 32, 2)
        if what == "box_order":
            m[0, i, j], m[1, i, j] = m[1, i, j], m[0, i, j]
        elif what == "box_nan":
            m[1, i, j] = np.nan
        elif what == "box_outside":
            m[:, i, j] = w[i, j] + np.float32(1e-2)
        else:
            m = m[:, :, :31]
    else:
        name = "model.layers.0.self_attn.qq_proj.weight"  # a typo: names no tensor
    with h5py.File(tmp_path / "mask.h5", "w") as f:
        f.create_dataset(name, data=m)
    p, _, out = sft_masked(tmp_path, model, data, "bad", 2, str(tmp_path / "mask.h5"))
    assert p.returncode != 0
    errs = [l for l in p.stderr.splitlines() if "error" in l]
    assert len(errs) == 1 and "mask.h5" in errs[0] and name in errs[0], p.stderr
    assert not os.path.exists(os.path.join(out, "sft", "model"))


def test_sft_qat_sigterm_then_resume_is_identical(tmp_path, rng_seed):
    model = make_model(tmp_path / "char", "--hidden", "32", "--layers", "2", "--vocab", "259")
    data, _ = copy_task(tmp_path, n_train=200, n_held=1)
    outs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        cfg = sft_config(tmp_path, model, data, out, sft__qat="true", sft__qat_bits=4,
                         sft__max_steps=24, sft__batch_size=8, sft__micro_batch_size=4,
                         run__checkpoint_every=0, sft__weight_decay=0.01)
        if name == "a":
            run_resafe("sft", "--config", cfg, env=ENV)
        else:
            k = random.Random(rng_seed).randint(2, 18)
            rc, err = interrupt_after([resafe_bin(), "sft", "--config", cfg],
                                      os.path.join(out, "sft", "metrics.jsonl"), k, signal.SIGTERM)
            assert rc == 128 + signal.SIGTERM, err
            run_resafe("sft", "--config", cfg, "--resume", env=ENV)
        outs.append(out)
    a, b = (os.path.join(o, "sft") for o in outs)
    assert read(f"{a}/metrics.jsonl") == read(f"{b}/metrics.jsonl")
    assert read(f"{a}/model/model.safetensors") == read(f"{b}/model/model.safetensors")
    assert read(f"{a}/checkpoint.h5") == read(f"{b}/checkpoint.h5")


def test_sft_bad_data_is_one_clear_error_and_writes_nothing(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    out = str(tmp_path / "run")
    cfg = sft_config(tmp_path, tiny_model, str(data), out, sft__prompt_key="prompt",
                     sft__response_key="response")
    p = run_resafe("sft", "--config", cfg, check=False, env=ENV)
    assert p.returncode == 1 and 'd.jsonl:2: no "response" member' in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(out, "sft"))


@pytest.mark.parametrize("over", [
    {"snip__mask": "elementwise", "snip__scope": "per_layer", "snip__loss": "nll", "lora__dropout": 0},
    {"snip__mask": "none", "lora__targets": "q,v,down", "dpo__schedule": "cosine"},
    {"dpo__share_prompt": "true", "snip__mask": "factor"},
])
def test_dpo_other_modes_resume_identically(tmp_path, tiny_model, over):
    """Stopped by a NaN after the step-4 checkpoint, then resumed: the same as one run."""
    over = dict(over, dpo__max_steps=8, run__checkpoint_every=2, snip__reidentify_every=3)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_resafe("dpo", "--config", dpo_config(tmp_path, tiny_model, a, **over), env=ENV)
    cfg = dpo_config(tmp_path, tiny_model, b, **over)
    p = run_resafe("dpo", "--config", cfg, check=False, env=dict(ENV, RESAFE_TEST_NAN_STEP="5"))
    assert p.returncode == 1
    run_resafe("dpo", "--config", cfg, "--resume", env=ENV)
    assert read(f"{a}/dpo/metrics.jsonl") == read(f"{b}/dpo/metrics.jsonl")
    assert read(f"{a}/dpo/adapter.h5") == read(f"{b}/dpo/adapter.h5")
    with h5py.File(f"{b}/dpo/adapter.h5") as f:
        assert f.attrs["mask_mode"] == over["snip__mask"]
        if over["snip__mask"] == "elementwise":
            m = f["lora/layers.0.q_proj/mask_W"][...]
            assert m.shape == (64, 64) and 0 < m.mean() < 1
    assert os.path.exists(f"{b}/dpo/adapter_peft") == (over["snip__mask"] != "elementwise")


def test_dpo_shared_prompts_train_as_whole_sequences(tmp_path, tiny_model):
    """[dpo] share_prompt = true runs each pair's prompt once (the chat template's prompt is
    the pairs' common start); the run's losses, log-probs and adapter equal those of whole
    sequences up to fp32 summation order (dropout off: its masks are drawn per row)."""
    over = dict(dpo__max_steps=6, lora__dropout=0, snip__reidentify_every=3)
    runs = {}
    for share in ("false", "true"):
        out = str(tmp_path / share)
        p = run_resafe("dpo", "--config", dpo_config(tmp_path, tiny_model, out,
                                                     dpo__share_prompt=share, **over), "-v", env=ENV)
        assert ("dpo: shared prompts" in p.stderr) == (share == "true"), p.stderr[-2000:]
        runs[share] = [json.loads(l) for l in open(os.path.join(out, "dpo", "metrics.jsonl"))]
    for a, b in zip(runs["false"], runs["true"]):
        for key in ("loss", "logp_chosen", "logp_rejected", "margin"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a, b)
    with h5py.File(tmp_path / "false" / "dpo" / "adapter.h5") as fa, \
            h5py.File(tmp_path / "true" / "dpo" / "adapter.h5") as fb:
        for g in fa["lora"]:
            for m in ("A", "B"):
                x, y = fa[f"lora/{g}/{m}"][...], fb[f"lora/{g}/{m}"][...]
                assert np.linalg.norm(x) > 0
                assert np.linalg.norm(x - y) <= 1e-3 * np.linalg.norm(x), (g, m)


def test_dpo_prints_its_memory_by_part_and_the_parts_add_up(tiny_model, tmp_path):
    import re
    cfg = dpo_config(tmp_path, tiny_model, str(tmp_path / "m"), dpo__max_steps=1,
                     model__recompute="true")
    p = run_resafe("dpo", "--config", cfg, "-v", env=ENV)
    m = re.search(r"dpo: memory on cpu: weights ([0-9.]+) MiB, adapter \(A, B, gradients, masks, "
                  r"SNIP\) ([0-9.]+) MiB, optimizer state ([0-9.]+) MiB, activations ([0-9.]+) MiB "
                  r"\(recompute on\), backend workspace ([0-9.]+) MiB; ([0-9.]+) MiB in all",
                  p.stderr)
    assert m, p.stderr
    parts = [float(x) for x in m.groups()]
    assert all(x > 0 for x in parts[:4]), parts
    assert abs(sum(parts[:5]) - parts[5]) <= 0.5, parts  # rounding of five one-decimal numbers
    # the activations are the training arena the plan printed at debug level
    arena = re.search(r"memory plan: ([0-9.]+) MiB", p.stderr)
    assert arena and abs(float(arena.group(1)) - parts[3]) <= 0.1, p.stderr
