#!/usr/bin/env bash
# make demo: `resafe generate` on the embedded tiny model. Until the project's own model organism
# exists, that model is random (scripts/make_test_model.py): the text is nonsense, the pipeline
# (weights, tokenizer, chat template, KV-cache generation) is real.
set -eu
BUILD=${BUILD:-build}
MODEL=$BUILD/demo_model
PY=${PYTHON:-python3}
[ -f "$MODEL/model.safetensors" ] || "$PY" scripts/make_test_model.py "$MODEL"
set -x
"$BUILD/resafe" inspect "$MODEL"
"$BUILD/resafe" generate --model "$MODEL" --backend auto --chat \
  --system "You are a helpful assistant." \
  --prompt "How do I bake a loaf of bread?" --prompt "What is the capital of France?" \
  --max-new-tokens 24
"$BUILD/resafe" generate --model "$MODEL" --prompt "The quick brown fox" --max-new-tokens 24 \
  --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1 --format jsonl
