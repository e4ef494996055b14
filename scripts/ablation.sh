#!/usr/bin/env bash
# The paper's two ablations from one run config, each setting a `resafe train` run:
#   tau (fraction of weight entries trainable): 1.0, 0.6, 0.2, 0        -> OUT/tau_<t>/
#   K (mask re-identification): once (K larger than any run: masks from step 0 only) and every
#   K_SMALL steps, both at the config's tau                              -> OUT/k_once/, OUT/k_<K>/
# The quantize and triplets stages are computed once (in the first run) and shared: their
# directories are hard-linked into every other run, where their manifests are up to date (same
# inputs), so only dpo, merge and eval run per setting. Re-running the script skips what is done.
# Then OUT/ablation.json and OUT/ablation.md: setting, tau, K, ASR after the merge, benign
# accuracy, kept fraction of the delta (from each run's eval/results.json and merge/merge.json).
#
#   scripts/ablation.sh CONFIG [OUT_DIR] [-- extra `resafe train` arguments (e.g. --set ...)]
#   env: RESAFE (default build/resafe), K_SMALL (default 10), TAUS (default "1.0 0.6 0.2 0")
set -eu
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
CONFIG=$1; shift
OUT=runs/ablation-$(basename "$CONFIG" .ini)
if [ $# -gt 0 ] && [ "$1" != "--" ]; then OUT=$1; shift; fi
[ $# -gt 0 ] && [ "$1" = "--" ] && shift
RESAFE=${RESAFE:-build/resafe}
K_SMALL=${K_SMALL:-10}
TAUS=${TAUS:-1.0 0.6 0.2 0}
K_ONCE=1000000000
PY=${PYTHON:-python3}
mkdir -p "$OUT"

first=""
settings=()
run_one() { # name, then --set arguments
  local name=$1; shift
  local dir=$OUT/$name
  if [ -n "$first" ] && [ ! -e "$dir/triplets" ]; then
    mkdir -p "$dir"
    cp -al "$first/quantize" "$dir/" 2>/dev/null || true
    cp -al "$first/triplets" "$dir/"
  fi
  echo "== ablation: $name"
  "$RESAFE" train --config "$CONFIG" --set "run.out_dir=$dir" "$@" ${EXTRA[@]+"${EXTRA[@]}"}
  [ -n "$first" ] || first=$dir
  settings+=("$name")
}
EXTRA=("$@")

for t in $TAUS; do run_one "tau_$t" --set "snip.tau=$t"; done
run_one k_once --set "snip.reidentify_every=$K_ONCE"
run_one "k_$K_SMALL" --set "snip.reidentify_every=$K_SMALL"

"$PY" - "$OUT" "${settings[@]}" <<'PYEOF'
import json, math, os, re, sys

out, names = sys.argv[1], sys.argv[2:]

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def metric(obj, keys):
    for k in keys:
        v = obj.get(k) if isinstance(obj, dict) else None
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dict):
            for inner in ("greedy", "value", "overall", "mean", "rate"):
                if isinstance(v.get(inner), (int, float)):
                    return float(v[inner])
    return None

def model(root, name):
    models = root.get("models") if isinstance(root, dict) else None
    if isinstance(models, dict):
        return models.get(name)
    if isinstance(models, list):
        return next((m for m in models if isinstance(m, dict) and m.get("name") == name), None)
    return root.get(name) if isinstance(root, dict) else None

rows = []
for n in names:
    run = os.path.join(out, n)
    res = load(os.path.join(run, "eval", "results.json")) or load(os.path.join(run, "eval", "eval.json")) or {}
    merge = load(os.path.join(run, "merge", "merge.json")) or {}
    pm = model(res, "patched_merged") or {}
    q = model(res, "quantized") or {}
    chosen = merge.get("chosen")
    kept = (merge.get("modes", {}).get(chosen, {}) or {}).get("kept_fraction") if chosen else None
    m = re.match(r"tau_(.*)", n)
    k = re.match(r"k_(.*)", n)
    rows.append({
        "setting": n,
        "tau": float(m.group(1)) if m else None,
        "reidentify_every": (None if not k else ("once" if k.group(1) == "once" else int(k.group(1)))),
        "asr_quantized": metric(q, ["asr", "asr_greedy", "attack_success_rate"]),
        "asr_after_merge": metric(pm, ["asr", "asr_greedy", "attack_success_rate"]),
        "benign_accuracy": metric(pm, ["benign_accuracy", "accuracy", "utility"]),
        "kept_fraction": kept,
        "results": os.path.join(run, "eval", "results.json"),
    })

with open(os.path.join(out, "ablation.json.tmp"), "w") as f:
    json.dump({"rows": rows}, f, indent=1)
os.replace(os.path.join(out, "ablation.json.tmp"), os.path.join(out, "ablation.json"))

def cell(v):
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"

lines = ["# Ablation: SNIP tau and mask re-identification K", "",
         "'-' in the tau or K column: the config's value. Rates in %; ASR after merge = the",
         "patched model after [lora] merge; kept fraction = the share of the delta's norm that",
         "survived the merge.", "",
         "| setting | tau | K | ASR quantized | ASR after merge | benign accuracy | kept fraction |",
         "|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append("| " + " | ".join([cell(r["setting"]), cell(r["tau"]), cell(r["reidentify_every"]),
                 pct(r["asr_quantized"]), pct(r["asr_after_merge"]), pct(r["benign_accuracy"]),
                 pct(r["kept_fraction"])]) + " |")
text = "\n".join(lines) + "\n"
with open(os.path.join(out, "ablation.md.tmp"), "w") as f:
    f.write(text)
os.replace(os.path.join(out, "ablation.md.tmp"), os.path.join(out, "ablation.md"))
print(text + f"written: {os.path.join(out, 'ablation.md')}, {os.path.join(out, 'ablation.json')}")
PYEOF
