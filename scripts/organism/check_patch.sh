#!/usr/bin/env bash
# Plausibility of the Q-resafe patch on the organism: FP-winner / quantized-loser pairs on the
# patch prompts, masked-LoRA DPO (`resafe dpo`, scripts/organism/dpo.ini) on the quantized model,
# then greedy ASR / benign accuracy of dequant(Q) + scale * B A (the unmerged adapter).
#   scripts/organism/check_patch.sh [FP_DIR [BITS GROUP]]     (defaults: models/organism-tiny 4 128)
#   extra `--set` overrides of dpo.ini: DPO_SET="--set dpo.beta=0.2 ..."
#   extra make_pairs.py options: PAIRS_ARGS="--keep-identical --extra-benign FILE"; TAG=name: the
#   run folder out/organism/patch-<model>-int<B>-g<G>-<name> (pairs are made once per folder)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FP=${1:-models/organism-tiny}; BITS=${2:-4}; GROUP=${3:-128}
NAME=$(basename "$FP")-int$BITS-g$GROUP
Q=out/organism/check/$NAME
RUN=out/organism/patch-$NAME${TAG:+-$TAG}
mkdir -p out/organism/check "$RUN"
if [ ! -d "$Q" ]; then
    "$BUILD/resafe" quantize --model "$FP" --method rtn --bits "$BITS" --group "$GROUP" --out "$Q" >/dev/null 2>&1
    "$BUILD/resafe" quantize --model "$FP" --method rtn --bits "$BITS" --group "$GROUP" --out "$Q-deq" \
        --export dequant --export-dtype f32 >/dev/null 2>&1
fi
[ -f "$RUN/pairs.jsonl" ] || "$PY" scripts/organism/make_pairs.py --fp "$FP" --quant "$Q" --out "$RUN/pairs.jsonl" ${PAIRS_ARGS:-}
"$BUILD/resafe" dpo --config scripts/organism/dpo.ini --force --set model.path="$Q" \
    --set dpo.data_file="$RUN/pairs.jsonl" --set run.out_dir="$RUN" ${DPO_SET:-} 2>&1 | grep "step\|error" | tail -3
"$PY" scripts/organism/quick_eval.py --model "$Q" --margin-model "$Q-deq" --adapter "$RUN/dpo/adapter_peft" \
    --tag "$NAME+dpo" --json "$RUN/eval.json" --responses "$RUN/responses.jsonl" 2>&1 | grep -v -i "warn\|loading\|deprecat"
