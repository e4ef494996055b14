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
  "$RESAFE" train --config "$CONFIG"
  RUN=$("$RESAFE" config --check "$CONFIG" 2>/dev/null | sed -n 's/^out_dir = \([^ ;]*\).*/\1/p' | tr -d '"')
  RUN=${RUN:-runs/organism-tiny}
  # the same three model states on the real AdvBench prompts, when ../shared/data is beside us
  # (the organism's synthetic world does not cover real wording: see scripts/organism/README.md)
  ADV=${ADVBENCH:-../shared/data/advbench_harmful_behaviors.csv}
  if [ -f "$ADV" ] && [ -f "$RUN/eval/results.json" ]; then
    echo "demo: the same model states on AdvBench ($ADV, not asserted by the tests)"
    MODEL=$("$RESAFE" config --check "$CONFIG" 2>/dev/null | sed -n 's/^path = \([^ ;]*\).*/\1/p' | head -1 | tr -d '"')
    MERGE=$("$RESAFE" config --check "$CONFIG" 2>/dev/null | sed -n 's/^merge = \([^ ;]*\).*/\1/p' | head -1)
    "$RESAFE" eval --config "$CONFIG" --set eval.harmful_file="$ADV" --set eval.harmful_column=goal \
      --set eval.category_column=none --set run.progress=off \
      --model fp="$MODEL" --model quantized="$RUN/quantize/model" \
      --model patched_merged="$RUN/merge/$MERGE" --out "$RUN/eval-advbench" --report
  fi
  if "$PY" -c "import matplotlib" 2>/dev/null; then
    "$PY" scripts/plot_report.py "$RUN" || true
  else
    echo "demo: matplotlib is not installed: no plots (pip install matplotlib; then make plots RUN=$RUN)"
  fi
  echo "demo: before/after table as JSON: $RUN/eval/results.json (report: $RUN/eval/report.md)"
  exit 0
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
