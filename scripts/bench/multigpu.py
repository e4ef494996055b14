#!/usr/bin/env python3
"""#8's benchmark: data-parallel `resafe dpo` on 1 and N GPUs of one host, same global batch and
seed (ratios from one run on one machine, not lone times). Needs a built build/resafe with the
CUDA backend and NCCL, torch and transformers (for the random model), h5py.

  scripts/bench/multigpu.py OUT_DIR [--gpus 2] [--only throughput,equiv,kill]
                            [--batch 8] [--micro 4] [--steps 6] [--quick] [--backend cuda|cpu]
                            [--hidden 4096 --layers 32 --inter 11008 --vocab 32000]
                            [--seq 512 --prompt 128 --rank 128] [--results-dir DIR]

The ranks are started as mpirun starts them (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK in each
process's environment, one GPU per local rank; [dist] transport = nccl on cuda, file on cpu),
without needing mpirun itself. NCCL_NVLS_ENABLE=0 (the device machines require it).
1. throughput: the DPO step of bench_gpu.py (Llama-2-7B shapes, random bf16 weights, LoRA r 128
   on all 7 projections, no SNIP mask), global batch --batch pairs of --seq tokens in micro-batches
   of --micro pairs, on 1 GPU and on N: tokens/s from the median step time of steps 2.. as
   `resafe dpo -v` logs them on rank 0 (loading and the reference pass excluded);
   scaling = tokens/s on N / tokens/s on 1.
2. equiv: the same (micro-batches of --micro / 2: SNIP's fp32 weight gradients take 26 GB at 7B)
   with SNIP factor masks (tau 0.6) re-identified every 2 steps: the per-step
   losses of N GPUs against 1 GPU (max abs difference), the final adapters (max abs difference
   over the largest entry), and the masks' hashes, which every rank logs at each
   re-identification: identical across the N ranks (required) and whether equal to the 1-GPU
   run's (the scores are all-reduced in another order, so entries at the threshold may differ).
3. kill: the equiv run on N GPUs again, one checkpoint per step; after step 2 the last rank is
   SIGKILLed: seconds until every other rank has exited and rank 0's error line (it must name
   the dead rank); then `--resume` on N ranks: it must start at the step-2 checkpoint and its
   losses must equal the uninterrupted N-GPU run's (bit for bit).
Each rank's output is in OUT_DIR/work/logs-*/rank<r>.log.
Writes OUT_DIR/multigpu.json and (unless --quick) RESULTS_DIR/multigpu-<device>-<date>.json with
dpo_tok_s_1gpu, dpo_tok_s_2gpu, scaling_2gpu, max_loss_diff_1v2 (for N = 2; the keys carry N)."""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_gpu as bg  # noqa: E402

LAUNCH_VARS = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_JOB_ID",
               "PMIX_NAMESPACE", "RESAFE_RUN_ID"]


def dpo_config(path, a, model, pairs, out_dir, mask, checkpoint_every, world):
    """mask: SNIP factor masks, an lr at which the losses move and half the micro-batch (the
    equivalence runs: SNIP holds an fp32 weight gradient of every linear, 26 GB at 7B); else no
    mask (the throughput runs, as bench_gpu.py's)."""
    snip = ("mask = factor\ntau = 0.6\nreidentify_every = 2\nscore_batches = 1\n"
            if mask else "mask = none\n")
    # one process communicates with nobody (auto); ranks: nccl on GPUs, the file transport on cpu
    transport = "auto" if world == 1 else "nccl" if a.backend == "cuda" else "file"
    threads = "threads = 1\n" if a.backend == "cpu" else ""
    with open(path, "w") as f:
        f.write(f"""[model]
path = {model}
backend = {a.backend}
{threads}chat_template = none
[dpo]
data_file = {pairs}
batch_size = {a.batch}
micro_batch_size = {max(1, a.micro // 2) if mask else a.micro}
max_steps = {a.steps}
max_seq_len = {a.seq}
lr = {5e-4 if mask else 1e-5}
warmup_steps = 1
[snip]
{snip}[lora]
rank = {a.rank}
alpha = {2 * a.rank}
[dist]
transport = {transport}
timeout_s = 300
[run]
out_dir = {out_dir}
checkpoint_every = {checkpoint_every}
seed = 7
""")
    return path


def launch(world, args, run_id, log_dir):
    """world ranks of `resafe args`; each rank's output goes to its own file in log_dir (a pipe
    nobody reads while the ranks run could fill and block a rank)."""
    os.makedirs(log_dir, exist_ok=True)
    procs = []
    for r in range(world):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        env.update(OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_SIZE=str(world),
                   OMPI_COMM_WORLD_LOCAL_RANK=str(r), RESAFE_RUN_ID=run_id,
                   NCCL_NVLS_ENABLE="0", RESAFE_CUDA_MEMSTATS="1")
        log = open(os.path.join(log_dir, f"rank{r}.log"), "w")
        p = subprocess.Popen([bg.RESAFE, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        p.log_path = log.name
        log.close()
        procs.append(p)
    return procs


def finish(procs, timeout=3600):
    """(returncode, output) per rank; ranks still running after timeout are killed."""
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for p in procs:
        with open(p.log_path) as f:
            out.append((p.returncode, f.read()))
    return out


def run_world(world, cfg, tag, log_dir, extra=("--force",)):
    res = finish(launch(world, ["dpo", "--config", cfg, "-v", *extra],
                        f"{tag}-{os.getpid()}-{time.time_ns()}", log_dir))
    for r, (rc, out) in enumerate(res):
        if rc != 0:
            raise SystemExit(f"multigpu: {tag}: rank {r} of {world} failed ({rc}):\n{out[-3000:]}")
    return res


def step_times(stderr):
    took = [float(x) for x in re.findall(r"dpo: step \d+ took ([0-9.]+) s", stderr)]
    if len(took) < 3:
        raise SystemExit("multigpu: resafe dpo -v logged fewer than 3 step times:\n" +
                         stderr[-2000:])
    return statistics.median(took[1:])


def losses(out_dir):
    with open(os.path.join(out_dir, "dpo", "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def mask_hashes(stderr):
    return [(int(s), h) for s, h in re.findall(r"step (\d+): masks hash ([0-9a-f]{16})", stderr)]


def adapter_diff(d1, d2):
    import h5py
    import numpy as np

    def arrays(d):
        got = {}
        with h5py.File(os.path.join(d, "dpo", "adapter.h5")) as f:
            f.visititems(lambda n, o: got.__setitem__(n, np.array(o))
                         if isinstance(o, h5py.Dataset) and o.dtype.kind == "f" else None)
        return got
    x, y = arrays(d1), arrays(d2)
    if x.keys() != y.keys():
        raise SystemExit(f"multigpu: the adapters of {d1} and {d2} hold different tensors")
    scale = max(float(np.abs(v).max()) for v in x.values()) or 1.0
    return max(float(np.abs(x[k].astype(np.float64) - y[k]).max()) for k in x) / scale


def kill_and_resume(a, cfg, out_dir, world, log_dir):
    """The equiv run on `world` ranks, its last rank SIGKILLed after step 2; then --resume.
    Returns (seconds until the other ranks exited, rank 0's error line, whether every other
    rank exited and rank 0 named the dead rank, whether the resume started at the checkpoint)."""
    shutil.rmtree(out_dir, ignore_errors=True)  # --force deletes nothing: no old metrics here
    procs = launch(world, ["dpo", "--config", cfg, "--force"], f"kill-{os.getpid()}",
                   os.path.join(log_dir, "killed"))
    metrics = os.path.join(out_dir, "dpo", "metrics.jsonl")
    deadline = time.time() + 1800
    try:
        while time.time() < deadline:
            if os.path.exists(metrics) and open(metrics).read().count("\n") >= 2:
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit("multigpu: kill: a rank ended before step 2:\n" +
                                 "\n".join(o[-1500:] for _, o in finish(procs)))
            time.sleep(0.05)
        else:
            raise SystemExit("multigpu: kill: step 2 did not come within 30 minutes")
        victim = world - 1
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.time()
        for r in range(world - 1):
            try:
                procs[r].wait(timeout=max(1, t0 + 180 - time.time()))
            except subprocess.TimeoutExpired:
                pass
        took = time.time() - t0
        exited = all(procs[r].poll() is not None for r in range(world - 1))
    finally:
        res = finish(procs, timeout=1)  # kills what still runs
    msg = next((l for l in res[0][1].splitlines() if l.startswith("resafe: error")), "")
    # rank 0 names the dead rank; with more ranks the others may name rank 0's exit first
    named = exited and re.search(rf"rank {victim} \(pid \d+\) died", msg) is not None
    out = run_world(world, cfg, "resume", os.path.join(log_dir, "resume"), ["--resume"])
    resumed = re.search(r"dpo: resuming \S+ at step 2\b", out[0][1]) is not None
    return took, msg, named, resumed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--gpus", type=int, default=2, help="ranks of the data-parallel runs (>= 2)")
    ap.add_argument("--only", default="throughput,equiv,kill")
    ap.add_argument("--batch", type=int, default=8, help="global batch in pairs")
    ap.add_argument("--micro", type=int, default=4,
                    help="pairs per forward ([dpo] micro_batch_size)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--quick", action="store_true",
                    help="a small model (smoke test; results stay in OUT_DIR)")
    ap.add_argument("--backend", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: ranks over the file transport (a smoke test of this script)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--results-dir", default=os.path.join(bg.ROOT, "scripts", "bench", "results"))
    a = ap.parse_args()
    parts = [p for p in a.only.split(",") if p]
    bad = [p for p in parts if p not in ("throughput", "equiv", "kill")]
    if bad or not parts:
        ap.error(f"--only {a.only}: expected a comma list of throughput, equiv, kill")
    if a.quick:
        a.hidden, a.layers, a.inter, a.vocab, a.seq, a.prompt, a.rank = 256, 2, 688, 512, 48, 16, 8
    if a.gpus < 2 or a.batch < 1 or a.micro < 1 or a.steps < 3:
        ap.error("need --gpus >= 2, --batch >= 1, --micro >= 1, --steps >= 3")
    if a.batch % (a.gpus * a.micro):
        ap.error(f"--batch {a.batch} must be a multiple of --gpus x --micro ({a.gpus * a.micro}): "
                 "every rank then runs whole micro-batches and the 1-GPU run the same ones")
    if a.prompt >= a.seq:
        ap.error("need --prompt < --seq")
    if not os.access(bg.RESAFE, os.X_OK):
        sys.exit(f"multigpu: {bg.RESAFE} is missing: build it first (make)")
    if a.backend == "cuda":
        import torch
        n = torch.cuda.device_count()
        if n < a.gpus:
            sys.exit(f"multigpu: --gpus {a.gpus} but {n} CUDA device(s) are visible")
        dev = f"{a.gpus}x {torch.cuda.get_device_name(0)}"
    else:
        dev = f"{a.gpus} CPU ranks"
    work = os.path.join(a.out, "work")
    model, pairs = os.path.join(work, "model"), os.path.join(work, "pairs.jsonl")
    t0 = time.time()
    bg.make_model(model, a, device="cuda" if a.backend == "cuda" else "cpu")
    bg.make_pairs(pairs, model, a.batch * (a.steps + 2), a)
    N, tokens = a.gpus, a.batch * 2 * a.seq
    m = {}

    def log(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    if "throughput" in parts:
        for w in (1, N):
            d = os.path.join(work, f"tp{w}")
            cfg = dpo_config(os.path.join(work, f"tp{w}.ini"), a, model, pairs, d, False, 0, w)
            res = run_world(w, cfg, f"tp{w}", os.path.join(work, f"logs-tp{w}"))
            step = step_times(res[0][1])
            m[f"dpo_tok_s_{w}gpu"] = tokens / step
            log(f"throughput on {w}: {tokens / step:.0f} tokens/s ({step * 1e3:.1f} ms/step)")
        m[f"scaling_{N}gpu"] = m[f"dpo_tok_s_{N}gpu"] / m["dpo_tok_s_1gpu"]
    if "equiv" in parts or "kill" in parts:
        runs = {}
        for w in (1, N):
            d = os.path.join(work, f"eq{w}")
            cfg = dpo_config(os.path.join(work, f"eq{w}.ini"), a, model, pairs, d, True, 0, w)
            res = run_world(w, cfg, f"eq{w}", os.path.join(work, f"logs-eq{w}"))
            runs[w] = (cfg, d, [mask_hashes(out) for _, out in res])
            log(f"equiv on {w}: losses {' '.join(f'{x:.6f}' for x in losses(d))}")
        l1, ln = losses(runs[1][1]), losses(runs[N][1])
        if len(l1) != a.steps or len(ln) != a.steps:
            sys.exit(f"multigpu: expected {a.steps} losses, got {len(l1)} and {len(ln)}")
        hashes = runs[N][2]
        m[f"max_loss_diff_1v{N}"] = max(abs(x - y) for x, y in zip(l1, ln))
        m[f"adapter_max_rel_diff_1v{N}"] = adapter_diff(runs[1][1], runs[N][1])
        m["mask_reidentifications"] = len(hashes[0])
        m["masks_identical_across_ranks"] = int(len(hashes[0]) > 0 and
                                                all(h == hashes[0] for h in hashes))
        m[f"masks_equal_1v{N}"] = int(hashes[0] == runs[1][2][0])
        log(f"equiv: max loss diff {m[f'max_loss_diff_1v{N}']:.3g}, adapters "
            f"{m[f'adapter_max_rel_diff_1v{N}']:.3g} of the largest entry, masks identical across "
            f"ranks: {bool(m['masks_identical_across_ranks'])} "
            f"({len(hashes[0])} re-identifications)")
        if "kill" in parts:
            d_eq = runs[N][1]
            d = os.path.join(work, "kill")
            kcfg = dpo_config(os.path.join(work, "kill.ini"), a, model, pairs, d, True, 1, N)
            took, msg, named, resumed = kill_and_resume(a, kcfg, d, N,
                                                        os.path.join(work, "logs-kill"))
            m["kill_others_exit_s"] = took
            m["kill_message_names_rank"] = int(named)
            m["resume_from_checkpoint"] = int(resumed)
            m["resume_losses_equal"] = int(resumed and losses(d) == losses(d_eq))
            log(f"kill: the other ranks exited {took:.1f} s after rank {N - 1} was killed: "
                f"{msg or '(no error line)'}; resumed at step 2: {resumed}; losses equal the "
                f"uninterrupted run's: {bool(m['resume_losses_equal'])}")
    res = {"device": dev, "date": time.strftime("%Y-%m-%d"),
           "command": "scripts/bench/multigpu.py " + " ".join(sys.argv[2:]) if len(sys.argv) > 2
           else "scripts/bench/multigpu.py OUT",
           "shape": {"hidden": a.hidden, "layers": a.layers, "inter": a.inter, "vocab": a.vocab,
                     "seq": a.seq, "prompt": a.prompt, "rank": a.rank, "batch_pairs": a.batch,
                     "micro_pairs": a.micro, "steps": a.steps},
           "metrics": m, "wall_s": time.time() - t0}
    with open(os.path.join(a.out, "multigpu.json"), "w") as f:
        json.dump(res, f, indent=2)
    if not a.quick and a.backend == "cuda":
        os.makedirs(a.results_dir, exist_ok=True)
        slug = dev.lower().replace(" ", "-")
        path = os.path.join(a.results_dir, f"multigpu-{slug}-{res['date']}.json")
        rec = {k: res[k] for k in ("device", "date", "command", "metrics")}
        try:  # a partial run (--only) adds its metrics to the day's file instead of replacing it
            with open(path) as f:
                old = json.load(f)
            rec["metrics"] = {**old.get("metrics", {}), **m}
            if old.get("command") != rec["command"]:
                rec["command"] = f"{old.get('command')}; {rec['command']}"
        except (OSError, ValueError):
            pass
        with open(path, "w") as f:
            json.dump(rec, f, indent=2)
    print("| metric | value |\n|---|---|")
    for k, v in m.items():
        print(f"| {k} | {v:.4g} |")


if __name__ == "__main__":
    main()
