#!/usr/bin/env bash
# An organism state under every PTQ method and width: quantize (groups of GROUP, asymmetric; AWQ
# and GPTQ calibrated on DATA/calib_risk1.jsonl) and scripts/organism/quick_eval.py, one line
# each (ASR, benign, over-refusal):
#   scripts/organism/check_methods.sh MODEL_DIR [OUT_DIR]     (default out/organism/methods/<name>)
# Environment: METHODS (rtn awq gptq), WIDTHS (8 4 3 2), GROUP (128), DATA (data/organism),
# EVAL_ARGS (more quick_eval.py options, e.g. "--data data/organism-large --backend cuda").
# Quantized copies are kept and reused; results also go to OUT_DIR/<method><bits>.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PY=${PYTHON:-python3}
MODEL=${1:?usage: check_methods.sh MODEL_DIR [OUT_DIR]}
OUT=${2:-out/organism/methods/$(basename "$MODEL")}
DATA=${DATA:-data/organism}
die() { echo "check_methods.sh: $*" >&2; exit 2; }
[ -f "$MODEL/model.safetensors" ] || die "$MODEL: no model.safetensors"
[ -f "$DATA/calib_risk1.jsonl" ] || die "$DATA: no calib_risk1.jsonl"
mkdir -p "$OUT"
evaluate() { # evaluate DIR TAG
    "$PY" scripts/organism/quick_eval.py --model "$1" --tag "$2" --json "$OUT/$2.json" \
        ${EVAL_ARGS:-} 2>&1 | grep -v -i "warn\|loading\|deprecat" | tail -1
}
evaluate "$MODEL" fp
for m in ${METHODS:-rtn awq gptq}; do
    for b in ${WIDTHS:-8 4 3 2}; do
        q="$OUT/$m$b"
        if [ ! -f "$q/model.safetensors" ]; then
            calib=()
            [ "$m" = rtn ] || calib=(--calib "$DATA/calib_risk1.jsonl")
            rm -rf "$q"
            "$BUILD/resafe" quantize --model "$MODEL" --method "$m" --bits "$b" \
                --group "${GROUP:-128}" "${calib[@]}" --out "$q" >/dev/null 2>"$q.log" ||
                { echo "check_methods.sh: $m INT$b failed:" >&2; tail -3 "$q.log" >&2; exit 1; }
        fi
        evaluate "$q" "$m$b"
    done
done
