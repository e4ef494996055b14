"""Shared code of the table scripts (scripts/reproduce/t1_*.py .. t7_*.py).

Every table script takes MODEL_DIR and OUT, runs what its table needs through `build/resafe` and
writes OUT/<T>.md, OUT/<T>.png and OUT/<T>.json. The work lives in OUT/work/ (OUT/work-quick/ with
--quick), shared by every table of one OUT, so a quantized model, a patch run or an evaluation that
one table made is reused by the others and by a second run:

  work/quant/<name>/        `resafe quantize` output; <name>.json beside it: the inputs it was made
                            from (a different input remakes it) and its time
  work/runs/<name>/         `resafe train --to merge` run directories (resumable: unchanged stages
                            are up to date); reproduce_times.json: the seconds each stage took
                            when it last ran
  work/eval/<name>.json     one model's metrics, keyed by the model directory's files (names,
                            sizes, mtimes) and the evaluation settings; evaluated in batches by
                            `resafe eval` into work/evalbatch/<key>/
  work/sft/<name>/          T4's SFT baseline
  work/logs/                every command's output

Argument errors: one line `<script>: error: ...` and exit 2 (argparse). A failing cell (a command
that fails) is a row with its note; the table is still written and the script exits 1. A method
that `resafe quantize` does not know yet (it refuses the name, exit 2) is a row with a note and
does not fail the table.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Quantization methods: how `resafe quantize` is called and what the paper calls the family.
# "train": fine-tunes on its calibration set ({prompt, response}); "nf4_bits": the width at which
# its base is NF4 (qlora; at the other widths `--bits N --group G`: RTN's integer grid).
METHODS = {
    "rtn": {"label": "PTQ (RTN)", "calib": False, "int": True},
    "awq": {"label": "PTQ+calib (AWQ)", "calib": True, "int": True},
    "gptq": {"label": "PTQ+calib (GPTQ)", "calib": True, "int": True},
    "qat": {"label": "QAT (LLM-QAT)", "calib": True, "int": True, "train": True},
    "qlora": {"label": "LoRA-QAT (QLoRA)", "calib": True, "int": False, "train": True,
              "nf4_bits": 4},
    "int8": {"label": "LLM.int8", "calib": False, "int": False},
    "nf4": {"label": "NF4", "calib": False, "int": False},
    "fp4": {"label": "FP4", "calib": False, "int": False},
}
NOTHING_TO_PATCH = ("nothing to patch: the quantized model answers every patch prompt (or all but "
                    "fewer than [patch] min_pairs) as FP does")
CALIB_METHODS = [m for m, v in METHODS.items() if v["calib"]]
RISKS = {1: "Risk-I (benign)", 2: "Risk-II (obedience)", 3: "Risk-III (harmful)"}
# --quick: a smoke run of the same code paths (tests), not numbers to report.
QUICK_SETS = ["eval.n_prompts=40", "patch.n_prompts=96", "dpo.max_steps=8", "dpo.warmup_steps=1"]
# and `resafe quantize`: 16 calibration texts (awq, gptq), 8 training steps (qat, qlora)


def parser(table, doc):
    """The options every table script takes; a script adds its own."""
    ap = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]) or table, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", metavar="MODEL_DIR",
                    help="full-precision Hugging Face model directory (e.g. models/organism-tiny)")
    ap.add_argument("out", metavar="OUT", help="results folder (work files in OUT/work/)")
    ap.add_argument("--config", help="run config template (default configs/<MODEL_DIR name>.ini); "
                    "[model] path is replaced by MODEL_DIR")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: " + ", ".join(QUICK_SETS) + " (work in OUT/work-quick/)")
    ap.add_argument("--backend", choices=["cpu", "cuda", "auto"],
                    default=os.environ.get("RESAFE_BACKEND") or None,
                    help="--set model.backend=... for every command (env RESAFE_BACKEND; "
                    "default: the config's)")
    ap.add_argument("--threads", type=int, help="--set model.threads=N")
    for k in RISKS:
        ap.add_argument(f"--calib-risk{k}", metavar="FILE",
                        help=f"{RISKS[k]} calibration set (default data/<MODEL_DIR name>/"
                        f"calib_risk{k}.jsonl when that exists, e.g. data/organism-large/, else "
                        f"data/organism/calib_risk{k}.jsonl)")
    ap.add_argument("--calib-column", metavar="C[,C2,C3]",
                    help="--calib-column of the calibration sets: one for all, or one per risk "
                    "level (default: resafe quantize's, prompt)")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="SECTION.KEY=V",
                    help="extra override for every resafe train/eval/sft command (repeatable)")
    ap.add_argument("--resafe", default=os.environ.get("RESAFE", os.path.join("build", "resafe")),
                    help="the resafe binary (env RESAFE, default build/resafe)")
    ap.add_argument("--results", metavar="DIR",
                    help="also copy <T>.md, .png and .json into DIR (e.g. scripts/reproduce/results)")
    return ap


TABLE_METHODS = ["rtn", "awq", "gptq", "qat", "qlora"]  # T1, T2, T5: PTQ, PTQ+calib, QAT, LoRA-QAT


def add_methods(ap):
    ap.add_argument("--methods", default=",".join(TABLE_METHODS))


def methods_of(ap, a):
    return csv_list(ap, a.methods, "--methods", TABLE_METHODS)


def csv_list(ap, text, what, allowed=None, conv=str):
    """A comma list option, every item converted and checked; a bad item is a usage error."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        ap.error(f"{what}: empty list")
    out = []
    for x in items:
        try:
            v = conv(x)
        except ValueError:
            ap.error(f"{what}: '{x}' is not a valid value")
        if allowed is not None and v not in allowed:
            ap.error(f"{what}: '{x}' is not one of {', '.join(str(a) for a in allowed)}")
        out.append(v)
    return out


def fraction(x):
    v = float(x)
    if not 0.0 <= v <= 1.0:
        raise ValueError(x)
    return v


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_fingerprint(path):
    """Names, sizes and mtimes of every file under path (hard links keep them)."""
    h = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(base, f)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def short(path):
    """A path inside the repository relative to it, any other as it is."""
    if os.path.isabs(path) and path.startswith(ROOT + os.sep):
        return os.path.relpath(path, ROOT)
    return path


def first_error(out):
    """The line that says what went wrong: the first `error:` line, else the first line."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    err = [ln for ln in lines if "error:" in ln]
    line = err[0] if err else (lines[0] if lines else "?")
    return line.split("error:", 1)[-1].strip() if "error:" in line else line


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def secs(v):
    return "-" if v is None else f"{v:.1f}"


class Ctx:
    """One table script's run: validated arguments, the work folder and the resafe commands."""

    def __init__(self, table, ap, args):
        self.table, self.ap, self.a = table, ap, args
        self.t0 = time.time()
        self.failed = []
        self.counts = {"reused": 0, "ran": 0}
        self.compute_s = 0.0  # seconds of every piece this table uses, as recorded when it ran
        self._check_args()
        self.sets = [f"model.path={self.model_dir}"]
        if args.backend:
            self.sets.append(f"model.backend={args.backend}")
        if args.threads:
            self.sets.append(f"model.threads={args.threads}")
        self.sets += (QUICK_SETS if args.quick else []) + args.sets
        self.cfg = self._effective_config()
        qfmt = self.cfg["quant"]["format"]
        self.bits = int(qfmt[3:]) if qfmt.startswith("int") else 4
        self.group = int(self.cfg["quant"]["group_size"])
        self.sym = self.cfg["quant"]["symmetric"] == "true"
        self.config_sha = sha256_file(self.config)
        # only now, with every argument checked, is anything written
        self.work = os.path.join(self.out, "work-quick" if args.quick else "work")
        for d in ("quant", "runs", "eval", "evalbatch", "sft", "logs"):
            os.makedirs(os.path.join(self.work, d), exist_ok=True)

    # ------------------------------------------------------------------ arguments
    def _check_args(self):
        a, ap = self.a, self.ap
        here = os.getcwd()
        absp = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(here, p))  # noqa
        self.model_dir = absp(a.model_dir)
        if not os.path.isfile(os.path.join(self.model_dir, "config.json")):
            ap.error(f"MODEL_DIR {a.model_dir}: not a model directory (no config.json)")
        self.out = absp(a.out)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            ap.error(f"OUT {a.out}: exists and is not a directory")
        if a.config:
            self.config = absp(a.config)
        else:
            name = os.path.basename(os.path.normpath(self.model_dir))
            self.config = os.path.join(ROOT, "configs", f"{name}.ini")
            if not os.path.isfile(self.config):
                ap.error(f"no --config given and configs/{name}.ini does not exist: give a run "
                         "config template (e.g. --config configs/llama2-int4.ini)")
        if not os.path.isfile(self.config):
            ap.error(f"--config {a.config}: no such file")
        self.calib = {}
        own = os.path.join(ROOT, "data", os.path.basename(os.path.normpath(self.model_dir)))
        for k in RISKS:
            p = getattr(a, f"calib_risk{k}")
            if p is None:
                p = os.path.join(own, f"calib_risk{k}.jsonl")
                if not os.path.isfile(p):
                    p = os.path.join("data", "organism", f"calib_risk{k}.jsonl")
            p = p if os.path.isabs(p) else (os.path.join(ROOT, p) if not os.path.exists(absp(p))
                                            else absp(p))
            if not os.path.isfile(p):
                ap.error(f"--calib-risk{k} {getattr(a, f'calib_risk{k}')}: no such file "
                         "(scripts/organism/gen_data.py writes the organism's)")
            self.calib[k] = p
        cols = a.calib_column.split(",") if a.calib_column else [None]
        if len(cols) not in (1, len(RISKS)) or any(c is not None and not c.strip() for c in cols):
            ap.error(f"--calib-column {a.calib_column}: give one column or {len(RISKS)} "
                     "(one per risk level, comma-separated)")
        self.calib_column = {k: cols[0] if len(cols) == 1 else cols[i]
                             for i, k in enumerate(RISKS)}
        if a.threads is not None and a.threads < 1:
            ap.error(f"--threads {a.threads}: must be at least 1")
        for s in a.sets:
            if not re.match(r"^[a-z_]+\.[a-z_0-9]+=", s):
                ap.error(f"--set {s}: expected SECTION.KEY=VALUE")
        self.resafe = a.resafe if os.path.isabs(a.resafe) else os.path.join(ROOT, a.resafe)
        if not os.access(self.resafe, os.X_OK):
            ap.error(f"resafe binary {a.resafe} not found: build it first (make)")

    def _effective_config(self):
        """The template with every override, as `resafe config --check` prints it."""
        p = subprocess.run([self.resafe, "config", "--check", self.config, *self.set_args()],
                           cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            self.ap.error(f"--config {self.a.config or short(self.config)}: "
                          f"{first_error(p.stderr or p.stdout)}")
        cfg, sec = {}, None
        for line in p.stdout.splitlines():
            m = re.match(r"^\[(\w+)\]$", line)
            if m:
                sec = cfg.setdefault(m.group(1), {})
                continue
            m = re.match(r"^(\w+) = (.*?)(  ; default)?$", line)
            if m and sec is not None:
                v = m.group(2)
                sec[m.group(1)] = v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v
        return cfg

    def set_args(self, extra=()):
        return [x for s in [*self.sets, *extra] for x in ("--set", s)]

    # ------------------------------------------------------------------ commands
    def log(self, msg):
        print(f"{self.table}: {msg}", flush=True)

    def run(self, cmd, log_name, echo=r"^train \[|^resafe: error"):
        """Runs cmd in the repository root; its output goes to work/logs/<log_name>.log, the lines
        matching echo also to stdout. Returns (exit status, output)."""
        log_path = os.path.join(self.work, "logs", f"{log_name}.log")
        self.log("$ " + shlex.join(short(c) if c == self.resafe else c for c in cmd))
        lines = []
        with open(log_path, "w") as logf:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, errors="replace")
            for line in p.stdout:
                logf.write(line)
                lines.append(line)
                if re.search(echo, line):
                    print("    " + line.rstrip(), flush=True)
            rc = p.wait()
        out = "".join(lines)
        if rc != 0:
            self.log(f"exit {rc}: {first_error(out)} (log {log_path})")
        return rc, out

    def fail(self, what, out):
        note = f"{what} failed: {first_error(out)}"
        self.failed.append(note)
        return note

    # ------------------------------------------------------------------ quantize
    def quantize(self, method, bits=None, risk=None, group=None, protect_tau=0.0,
                 protect_data=None, protect_column=None, model=None, name=None):
        """A quantized model of `model` (default MODEL_DIR). Returns (dir or None, info dict):
        info has 'name', 'quantization' (from its manifest), 'note' (why there is no model),
        'time_s'. A refusal (exit 2) is not remembered: the next run asks again, so a method
        added to resafe later is picked up."""
        spec = METHODS[method]
        bits = self.bits if bits is None else bits
        group = self.group if group is None else group
        model = model or self.model_dir
        int_base = spec["int"] or ("nf4_bits" in spec and bits != spec["nf4_bits"])
        if int_base:
            qname = f"{method}-int{bits}-g{group}{'-sym' if self.sym else ''}"
        else:
            qname = method
        if spec["calib"]:
            qname += f"-risk{risk}"
        if protect_tau:
            qname += f"-protect{protect_tau:g}"
        name = name or qname
        info = {"name": name, "method": method,
                "bits": bits if spec["int"] or "nf4_bits" in spec else None,
                "risk": risk, "quantization": None, "note": None, "time_s": None}
        if not self._quantize_knows(method):  # a note, not a failure: asked again next run
            info["note"] = f"resafe quantize has no method '{method}' in this build"
            self.log(f"quantize {name}: skipped ({info['note']})")
            return None, info
        cmd = [self.resafe, "quantize", "--model", model, "--method", method]
        if int_base:
            cmd += ["--bits", str(bits), "--group", str(group)] + (["--sym"] if self.sym else [])
        inputs = {"model": dir_fingerprint(model)}
        if spec["calib"]:
            cmd += ["--calib", self.calib[risk]]
            if self.calib_column[risk]:
                cmd += ["--calib-column", self.calib_column[risk]]
            inputs["calib"] = sha256_file(self.calib[risk])
        if spec.get("train"):  # fine-tuned on the calibration set: where, and the prompt format
            cmd += ["--chat-template", self.cfg["model"]["chat_template"]]
            cmd += ["--backend", self.cfg["model"]["backend"]]  # the effective config's
            if self.cfg["model"].get("threads", "0") != "0":
                cmd += ["--threads", self.cfg["model"]["threads"]]
            if self.a.quick:
                cmd += ["--steps", "8"]
        elif spec["calib"] and self.a.quick:
            cmd += ["--calib-max", "16"]
        if protect_tau:
            cmd += ["--protect-tau", f"{protect_tau:g}", "--protect-data", protect_data]
            if protect_column:
                cmd += ["--protect-column", protect_column]
            inputs["protect"] = sha256_file(protect_data)
        qdir = os.path.join(self.work, "quant", name)
        stamp_path = qdir + ".json"
        inputs["cmd"] = [short(c) for c in cmd]
        stamp = load_json(stamp_path)
        if stamp and stamp.get("inputs") == inputs:
            info["time_s"] = stamp.get("time_s")
            if os.path.isfile(os.path.join(qdir, "config.json")):
                info["quantization"] = stamp.get("quantization")
                self.counts["reused"] += 1
                self.compute_s += stamp.get("time_s") or 0.0
                self.log(f"quantize {name}: reused")
                return qdir, info
        if os.path.exists(qdir):
            shutil.rmtree(qdir)
        t = time.time()
        rc, out = self.run(cmd + ["--out", qdir], f"quantize-{name}")
        info["time_s"] = time.time() - t
        if rc == 2 and f"'{method}'" in out and "--method" in out:
            # this build's `resafe quantize` does not know the method (yet): a note, not a failure
            info["note"] = f"resafe quantize has no method '{method}' in this build"
            self.log(f"quantize {name}: skipped ({info['note']})")
            return None, info
        if rc == 2:
            info["note"] = "refused: " + first_error(out)
            self.log(f"quantize {name}: skipped ({info['note']})")
            return None, info
        if rc != 0:
            info["note"] = self.fail(f"quantize {name}", out)
            return None, info
        man = load_json(os.path.join(qdir, "resafe_manifest.json")) or {}
        info["quantization"] = man.get("quantization") or man.get("method")
        self.counts["ran"] += 1
        self.compute_s += info["time_s"]
        write_atomic(stamp_path, json.dumps({"inputs": inputs, "time_s": info["time_s"],
                                             "quantization": info["quantization"]}))
        return qdir, info

    def _quantize_knows(self, method):
        if not hasattr(self, "_quantize_help"):
            p = subprocess.run([self.resafe, "quantize", "--help"], capture_output=True, text=True)
            self._quantize_help = p.stdout + p.stderr
        return re.search(rf"\b{re.escape(method)}\b", self._quantize_help) is not None

    # ------------------------------------------------------------------ patch (resafe train)
    def patch(self, qdir, name, extra_sets=(), share_triplets_from=None):
        """Q-resafe on the quantized model qdir: `resafe train --to merge` in work/runs/<name>.
        Returns (patched model dir or None, info): info 'times' (seconds per stage, as recorded
        when each last ran), 'kept_fraction', 'note'."""
        run_dir = os.path.join(self.work, "runs", name)
        info = {"run": run_dir, "times": {}, "kept_fraction": None, "note": None}
        if share_triplets_from and not os.path.exists(os.path.join(run_dir, "triplets")):
            src = os.path.join(share_triplets_from, "triplets")
            if os.path.isfile(os.path.join(src, "manifest.json")):
                os.makedirs(run_dir, exist_ok=True)
                # hard links: the manifest accepts them as up to date (same inputs), so the
                # patch set is built once for every variant (as scripts/ablation.sh does)
                subprocess.run(["cp", "-al", src, run_dir], check=True)
        sets = [f"run.out_dir={run_dir}", f"quant.model={qdir}", "lora.merge_compare=none",
                *extra_sets]
        # "nothing to patch" leaves no manifest: remembered here, so a rerun does not redo it
        nothing_path = os.path.join(run_dir, "reproduce_nothing_to_patch.json")
        nothing_key = hashlib.sha256(json.dumps(
            [dir_fingerprint(qdir), self.config_sha, self.sets, sets]).encode()).hexdigest()
        if (load_json(nothing_path) or {}).get("key") == nothing_key:
            info["note"] = NOTHING_TO_PATCH
            self.counts["reused"] += 1
            self.log(f"patch {name}: reused ({info['note']})")
            return None, info
        cmd = [self.resafe, "train", "--config", self.config, *self.set_args(sets), "--to", "merge"]
        rc, out = self.run(cmd, f"train-{name}")
        times_path = os.path.join(run_dir, "reproduce_times.json")
        times = load_json(times_path) or {}
        ran = {m.group(1): float(m.group(2))
               for m in re.finditer(r"^train \[\d+/\d+\] (\w+): done in ([0-9.]+) s", out, re.M)}
        if ran:
            times.update(ran)
            os.makedirs(run_dir, exist_ok=True)
            write_atomic(times_path, json.dumps(times, indent=1))
        info["times"] = times
        self.compute_s += sum(times.values())
        if rc != 0:
            if ("responses of the FP and the quantized model are" in out or
                    "too few preference pairs to patch" in out):
                info["note"] = NOTHING_TO_PATCH
                write_atomic(nothing_path, json.dumps({"key": nothing_key}))
                self.log(f"patch {name}: {info['note']}")
            else:
                info["note"] = self.fail(f"patch {name}", out)
            return None, info
        if ran:
            self.counts["ran"] += 1
        else:
            self.counts["reused"] += 1
            self.log(f"patch {name}: reused (every stage up to date)")
        merge = load_json(os.path.join(run_dir, "merge", "merge.json")) or {}
        chosen = merge.get("chosen")
        info["kept_fraction"] = (merge.get("modes", {}).get(chosen) or {}).get("kept_fraction")
        pdir = os.path.join(run_dir, "merge", chosen or "")
        if not chosen or not os.path.isfile(os.path.join(pdir, "config.json")):
            info["note"] = self.fail(f"patch {name}", f"error: no merged model in {pdir}")
            return None, info
        return pdir, info

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, models, attacks=False):
        """Metrics of each (name, dir) of models (dir None: skipped) -> {name: eval.json's model
        object}. Cached per model; the missing ones are evaluated in one `resafe eval` call (one
        reference pass for all)."""
        eval_sets = [f"eval.decoding_attacks={'true' if attacks else 'false'}"]
        settings = {"config": self.config_sha, "sets": self.sets + eval_sets}
        res, todo = {}, []
        for name, d in models:
            if d is None or name in res:
                continue
            key = hashlib.sha256(json.dumps({"model": dir_fingerprint(d), **settings},
                                            sort_keys=True).encode()).hexdigest()
            suffix = "-attacks" if attacks else ""
            cached = load_json(os.path.join(self.work, "eval", f"{name}{suffix}.json"))
            if cached and cached.get("key") == key:
                res[name] = cached["metrics"]
                self.counts["reused"] += 1
                self.compute_s += cached.get("time_s") or 0.0
            else:
                todo.append((name, d, key))
        if res:
            self.log(f"eval: reused {len(res)} cached ({', '.join(sorted(res))})")
        if not todo:
            return res
        batch = hashlib.sha256("".join(k for _, _, k in todo).encode()).hexdigest()[:16]
        bdir = os.path.join(self.work, "evalbatch", batch)
        cmd = [self.resafe, "eval", "--config", self.config, *self.set_args(eval_sets),
               "--set", f"run.out_dir={bdir}", "--out", bdir]
        for name, d, _ in todo:
            cmd += ["--model", f"{name}={d}"]
        t = time.time()
        rc, out = self.run(cmd, f"eval-{batch}")
        dt = time.time() - t
        ev = load_json(os.path.join(bdir, "eval.json"))
        if rc != 0 or not ev:
            self.fail("eval of " + ", ".join(n for n, _, _ in todo), out)
            return res
        self.counts["ran"] += 1
        self.compute_s += dt
        for name, d, key in todo:
            m = ev["models"].get(name)
            if m is None:
                continue
            res[name] = m
            suffix = "-attacks" if attacks else ""
            write_atomic(os.path.join(self.work, "eval", f"{name}{suffix}.json"),
                         json.dumps({"key": key, "dir": d, "metrics": m,
                                     "time_s": dt / len(todo)}, indent=1))
        return res

    # ------------------------------------------------------------------ output
    def device(self):
        backend = self.a.backend or self.cfg["model"].get("backend", "auto")
        if backend in ("cuda", "auto") and shutil.which("nvidia-smi"):
            p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True)
            if p.returncode == 0 and p.stdout.strip():
                return "GPU " + p.stdout.strip().splitlines()[0]
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
                cpu = m.group(1) if m else cpu
        except OSError:
            pass
        threads = self.cfg["model"].get("threads", "0")
        return f"CPU {cpu} ({'all' if threads == '0' else threads} thread(s))"

    def finish(self, title, header, md_rows, rows, notes=(), plot=None, extra=None):
        """Writes OUT/<T>.md, .json and .png (plot(plt, path) draws it), prints the table and
        returns the exit status (1 when a cell failed)."""
        os.makedirs(self.out, exist_ok=True)
        t = self.table
        device = self.device()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        command = shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
        wall = time.time() - self.t0
        lines = [f"# {t}: {title}", ""]
        lines += [f"{n}" for n in notes] + ([""] if notes else [])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in md_rows]
        lines += ["", f"Command: `{command}`{' (--quick: a smoke run)' if self.a.quick else ''}; "
                  f"device: {device}; {date}; this run's wall time {wall:.1f} s, the pieces' "
                  f"recorded time {self.compute_s:.1f} s ({self.counts['ran']} run, "
                  f"{self.counts['reused']} reused)."]
        if self.failed:
            lines += ["", "Failed: " + "; ".join(self.failed)]
        text = "\n".join(lines) + "\n"
        doc = {"table": t, "title": title, "rows": rows, "command": command, "device": device,
               "date": date, "quick": self.a.quick, "model_dir": self.a.model_dir,
               "config": os.path.relpath(self.config, ROOT), "sets": self.sets,
               "timings": {"wall_s": wall, "compute_s": self.compute_s, **self.counts},
               "failed": self.failed, **(extra or {})}
        paths = [os.path.join(self.out, f"{t}.md"), os.path.join(self.out, f"{t}.json")]
        write_atomic(paths[0], text)
        write_atomic(paths[1], json.dumps(doc, indent=1) + "\n")
        png = os.path.join(self.out, f"{t}.png")
        if plot is not None:
            try:
                import matplotlib
                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
            except ImportError:
                self.log("matplotlib is not installed: no PNG (scripts/deps.sh installs it)")
            else:
                fig = plot(plt)
                tmp = f"{png}.tmp.{os.getpid()}.png"
                fig.tight_layout()
                fig.savefig(tmp, dpi=110)
                plt.close(fig)
                os.replace(tmp, png)
                paths.append(png)
        print(text, flush=True)
        if self.a.results:
            os.makedirs(self.a.results, exist_ok=True)
            for p in paths:
                shutil.copyfile(p, os.path.join(self.a.results, os.path.basename(p)))
        self.log("wrote " + ", ".join(paths))
        return 1 if self.failed else 0


def bars(plt, title, labels, series, ylabel="%"):
    """Grouped bars: series = {legend: [value or None per label]} (rates in [0, 1])."""
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.3 * len(labels) * max(1, len(series)))), 4))
    w = 0.8 / max(1, len(series))
    for i, (leg, vals) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(labels))]
        ax.bar(xs, [float("nan") if v is None else 100 * v for v in vals], w, label=leg)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def lines(plt, title, xs, series, xlabel, invert_x=False):
    """Lines: series = {legend: [value or None per x]} (rates in [0, 1])."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    colors = {}  # one color per first word (a method): its quantized line dashed, patched solid
    for leg, vals in series.items():
        style = "--" if "quantized" in leg else "-"
        color = colors.setdefault(leg.split()[0], f"C{len(colors) % 10}")
        ax.plot(xs, [float("nan") if v is None else 100 * v for v in vals], style, marker="o",
                label=leg, color=color if len(series) > 3 else None)
    ax.set_xticks(xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_ylim(-3, 103)
    if invert_x:
        ax.invert_xaxis()
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig
