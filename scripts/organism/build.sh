#!/usr/bin/env bash
# The tiny safety model organism, grown by resafe itself (scripts/organism/README.md):
#   data -> random init -> resafe sft (compliant base) -> snap the base onto the RTN grid
#   -> resafe sft (short safety tune) -> models/organism-tiny/
# Each stage is skipped when its output exists (delete out/organism/<stage> to redo it).
# On one CPU core the whole recipe takes 15-26 minutes (26 measured on a loaded shared machine).
#
#   scripts/organism/build.sh            # environment: BUILD (build), PYTHON (python3), OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PY=${PYTHON:-python3}
OUT=${OUT:-out/organism}
DATA=data/organism
# the quantization grid the organism's safety delta is sized against (the demo's setting)
BITS=${BITS:-4}
GROUP=${GROUP:-128}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
stamp() { echo "build.sh: $(date -u +%H:%M:%S) $*" >&2; }

stamp "data"
"$PY" scripts/organism/gen_data.py --out "$DATA" --seed 0 --refuse-p 0.85

if [ ! -f "$OUT/init/model.safetensors" ]; then
    stamp "random init"
    "$PY" scripts/organism/make_init.py "$OUT/init" --data "$DATA" --vocab 640 --hidden 128 \
        --layers 3 --seed 0
fi

if [ ! -f "$OUT/base/model.safetensors" ]; then
    stamp "compliant base (resafe sft)"
    "$BUILD/resafe" sft --config scripts/organism/base.ini --force \
        --set model.path="$OUT/init" --set sft.output_dir="$OUT/base" \
        --set run.out_dir="$OUT/run-base"
fi

# The base is put on the RTN grid (RTN is idempotent: quantizing the snapped copy again gives it
# back), so a safety delta smaller than half a grid step rounds away: the aligned model's
# quantized copy is the compliant base's, which is how real safety tunes (a small delta on a large
# pretrained model) lose their refusals under low-bit quantization, here made exact.
if [ ! -f "$OUT/base-snap/model.safetensors" ]; then
    stamp "snap the base onto the RTN INT$BITS g$GROUP grid"
    rm -rf "$OUT/base-snap"
    "$BUILD/resafe" quantize --model "$OUT/base" --method rtn --bits "$BITS" --group "$GROUP" \
        --out "$OUT/base-snap" --export dequant --export-dtype f32
fi

if [ ! -f "$OUT/aligned/model.safetensors" ]; then
    stamp "safety tune (resafe sft)"
    "$BUILD/resafe" sft --config scripts/organism/safety.ini --force \
        --set model.path="$OUT/base-snap" --set sft.output_dir="$OUT/aligned" \
        --set run.out_dir="$OUT/run-safety"
fi

stamp "models/organism-tiny"
rm -rf models/organism-tiny.tmp
mkdir -p models/organism-tiny.tmp
for f in config.json generation_config.json model.safetensors tokenizer.json \
         tokenizer_config.json special_tokens_map.json; do
    [ -f "$OUT/aligned/$f" ] && cp "$OUT/aligned/$f" models/organism-tiny.tmp/
done
rm -rf models/organism-tiny
mv models/organism-tiny.tmp models/organism-tiny
stamp "done"
