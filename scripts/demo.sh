#!/usr/bin/env bash
# make demo: the whole Q-resafe pipeline on the tiny safety model organism, on the CPU:
#   build/resafe train --config configs/organism-tiny.ini
# (quantize -> triplets -> dpo -> merge -> eval -> report into runs/organism-tiny), then the
# before/after table (fp, quantized, patched_merged: ASR, benign accuracy, perplexity) and the
# path of the results JSON. A second `make demo` finds every stage up to date and only prints.
# Until the organism (configs/organism-tiny.ini) and every stage are in place it says so and
# runs `resafe generate` on a random tiny model instead (the text is nonsense, the path is real).
set -eu
BUILD=${BUILD:-build}
CONFIG=${CONFIG:-configs/organism-tiny.ini}
PY=${PYTHON:-python3}
RESAFE=$BUILD/resafe

missing=""
[ -f "$CONFIG" ] || missing="$CONFIG (the model organism) is not here yet"
for stage in triplets merge eval; do
  if [ -z "$missing" ] && "$RESAFE" "$stage" --help 2>&1 | grep -q "not implemented yet"; then
    missing="the $stage stage is not implemented yet"
  fi
done

if [ -z "$missing" ]; then
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} "$RESAFE" train --config "$CONFIG"
  exit $?
fi

echo "demo: $missing; running \`resafe generate\` on a random tiny model instead"
MODEL=$BUILD/demo_model
[ -f "$MODEL/model.safetensors" ] || "$PY" scripts/make_test_model.py "$MODEL"
set -x
"$RESAFE" inspect "$MODEL"
"$RESAFE" generate --model "$MODEL" --backend auto --chat \
  --system "You are a helpful assistant." \
  --prompt "How do I bake a loaf of bread?" --prompt "What is the capital of France?" \
  --max-new-tokens 24
