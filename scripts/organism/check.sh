#!/usr/bin/env bash
# Evaluate an organism state at full precision and after RTN quantization (held-out eval sets):
#   scripts/organism/check.sh MODEL_DIR [BITS GROUP [--sym]]     (defaults: 4 128)
# Quantized copies go to out/organism/check/; results print one line per state.
# Environment: EVAL_ARGS (more quick_eval.py options, e.g. "--data data/organism-large --backend
# cuda --advbench ../shared/data/advbench_harmful_behaviors.csv"), SKIP_FP=1 (no FP line).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MODEL=$1; BITS=${2:-4}; GROUP=${3:-128}; SYM=${4:-}
NAME=$(basename "$MODEL")-int$BITS-g$GROUP${SYM:+-sym}
Q=out/organism/check/$NAME
mkdir -p out/organism/check
if [ ! -d "$Q" ]; then
    "$BUILD/resafe" quantize --model "$MODEL" --method rtn --bits "$BITS" --group "$GROUP" $SYM \
        --out "$Q" >/dev/null 2>&1
    "$BUILD/resafe" quantize --model "$MODEL" --method rtn --bits "$BITS" --group "$GROUP" $SYM \
        --out "$Q-deq" --export dequant --export-dtype f32 >/dev/null 2>&1
fi
[ -n "${SKIP_FP:-}" ] || "$PY" scripts/organism/quick_eval.py --model "$MODEL" --tag "$(basename "$MODEL") fp" \
    --json "out/organism/check/$(basename "$MODEL")-fp.json" ${EVAL_ARGS:-} 2>&1 | grep -v -i "warn\|loading\|deprecat"
"$PY" scripts/organism/quick_eval.py --model "$Q" --margin-model "$Q-deq" --tag "$NAME" \
    --json "$Q.json" ${EVAL_ARGS:-} 2>&1 | grep -v -i "warn\|loading\|deprecat"
