#!/usr/bin/env bash
# The safety model organisms, grown by resafe itself (scripts/organism/README.md):
#   data -> random init -> resafe sft (compliant base) -> snap the base onto the RTN grid
#   -> resafe sft (short safety tune) -> models/organism-<size>/
# Each stage is skipped when its output exists (delete $WORK/<stage> to redo it).
#
#   scripts/organism/build.sh                 # the tiny one (656k parameters, CPU, 15-26 min on
#                                             # one core): models/organism-tiny, committed
#   SIZE=large scripts/organism/build.sh      # the larger one (22M parameters, GPU): models/
#                                             # organism-large (bf16, git-ignored; rebuilt on a GPU)
# Environment: BUILD (build), PYTHON (python3), WORK (out/organism[-large]), BACKEND (large: cuda),
# SFT_ARGS (more options for both resafe sft runs, e.g. "--set sft.max_steps=5" for a smoke run),
# MASK_GRIDS (large: the calibrated quantizers whose grids the freeze box keeps the tune inside
# besides RTN's, default none), FREEZE (large: box, recipes v6 and v5; mask, recipe v4; none, an
# unconstrained tune), BITS (the RTN grid the base is snapped onto: tiny 4, large 2; a WORK
# snapped at another width is an error), DEST (the model's directory, default
# models/organism-<size>). Recipe v5 of the larger organism: BITS=4 MASK_GRIDS="awq:2,3,4 gptq:2,3".
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PY=${PYTHON:-python3}
SIZE=${SIZE:-tiny}
# the quantization grid the organism's safety delta is sized against (tiny: the demo's setting;
# large, recipe v6: INT2, whose four levels per group are INT4 and INT3 levels too)
if [ "$SIZE" = large ]; then BITS=${BITS:-2}; else BITS=${BITS:-4}; fi
GROUP=${GROUP:-128}
case "$SIZE" in
tiny)
    WORK=${WORK:-out/organism}
    DATA=data/organism  # everything committed
    TRAIN_DATA=$DATA
    DEST=${DEST:-models/organism-tiny}
    SETS=()
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    ;;
large)
    WORK=${WORK:-out/organism-large}
    DATA=data/organism-large       # eval, patch and calibration sets: committed
    TRAIN_DATA=$WORK/data           # the training sets (9 MB): regenerated, not committed
    DEST=${DEST:-models/organism-large}
    SETS=(--set "model.backend=${BACKEND:-cuda}")
    ;;
*) echo "build.sh: SIZE=$SIZE: expected tiny or large" >&2; exit 2 ;;
esac
mkdir -p "$WORK"
stamp() { echo "build.sh: $(date -u +%H:%M:%S) $*" >&2; }
MASK_GRIDS=${MASK_GRIDS-}
# FREEZE=none tunes every linear entry freely (the snap alone decides what rounds away).
FREEZE=${FREEZE:-box}
case "$FREEZE" in box|none) ;; mask) MASK_GRIDS="" ;;
*) echo "build.sh: FREEZE=$FREEZE: expected box, mask or none" >&2; exit 2 ;; esac
# a WORK whose base was snapped at another width is refused before any work
if [ -f "$WORK/base-snap/model.safetensors" ]; then
    snapped=$("$PY" -c 'import json, sys
m = json.load(open(sys.argv[1])); print("%s %s" % (m["bits"], m["group_size"]))' \
        "$WORK/base-snap/resafe_manifest.json" 2>/dev/null || echo "unknown")
    if [ "$snapped" != "$BITS $GROUP" ]; then
        echo "build.sh: $WORK/base-snap is snapped at (bits group) '$snapped'," \
             "not '$BITS $GROUP': delete it and the stages after it, or use another WORK" >&2
        exit 2
    fi
fi

stamp "data"
if [ "$SIZE" = tiny ]; then
    "$PY" scripts/organism/gen_data.py --out "$DATA" --seed 0 --refuse-p 0.85
else
    "$PY" scripts/organism/gen_data_large.py --out "$TRAIN_DATA" --seed 0 --refuse-p 1.0
    mkdir -p "$DATA"
    for f in "$TRAIN_DATA"/*.jsonl; do
        case "$(basename "$f")" in base_train.jsonl|safety_train.jsonl) ;; *) cp "$f" "$DATA/" ;; esac
    done
fi

if [ ! -f "$WORK/init/model.safetensors" ]; then
    stamp "random init"
    if [ "$SIZE" = tiny ]; then
        "$PY" scripts/organism/make_init.py "$WORK/init" --data "$DATA" --vocab 640 --hidden 128 \
            --layers 3 --seed 0
    else
        "$PY" scripts/organism/make_init.py "$WORK/init" --data "$TRAIN_DATA" --vocab 3072 \
            --hidden 512 --layers 6 --head-dim 64 --mlp 1408 --max-pos 256 --seed 0
    fi
fi

CFG=scripts/organism
[ "$SIZE" = large ] && CFG=scripts/organism/large
if [ ! -f "$WORK/base/model.safetensors" ]; then
    stamp "compliant base (resafe sft)"
    "$BUILD/resafe" sft --config "$CFG/base.ini" --force "${SETS[@]}" ${SFT_ARGS:-} \
        --set model.path="$WORK/init" --set sft.output_dir="$WORK/base" \
        --set sft.data_file="$TRAIN_DATA/base_train.jsonl" --set run.out_dir="$WORK/run-base"
fi

# The base is put on the RTN grid (RTN is idempotent: quantizing the snapped copy again gives it
# back), so a safety delta smaller than half a grid step rounds away: the aligned model's
# quantized copy is the compliant base's, which is how real safety tunes (a small delta on a large
# pretrained model) lose their refusals under low-bit quantization, here made exact.
if [ ! -f "$WORK/base-snap/model.safetensors" ]; then
    stamp "snap the base onto the RTN INT$BITS g$GROUP grid"
    rm -rf "$WORK/base-snap"
    "$BUILD/resafe" quantize --model "$WORK/base" --method rtn --bits "$BITS" --group "$GROUP" \
        --out "$WORK/base-snap" --export dequant --export-dtype f32
fi

# The larger organism's tune is boxed (freeze_mask.py --box): each linear entry may move up to,
# not across, the nearest code boundary of RTN at 4, 3 and 2 bits and of the grids that AWQ and
# GPTQ (MASK_GRIDS, "method:bits,bits ..."; "" for RTN only) put on the snapped base with the
# Risk-I calibration set; the group extremes stay. Recipe v5 (scripts/organism/README.md): an
# RTN-only 0/1 mask (v4) left the tune to AWQ INT2 (it refused everything) and GPTQ INT3; v5 at
# this size still leaves it to AWQ and GPTQ at INT3 and INT2 (results/h100-large-v5/). Recipe
# v6, the default: the base snapped onto RTN INT2 and the box on RTN's grids only (at INT2 they
# are the snap's own levels; results/h100-large-v6/: AWQ at every width and GPTQ at INT2 lose
# the tune, GPTQ INT4 / INT3 still refuse 57-72% of the harmful prompts). FREEZE=mask builds v4
# (the 0/1 mask on RTN's grids: results/h100-large-v4/); FREEZE=none is v6's unboxed candidate.
if [ "$SIZE" = large ] && [ "$FREEZE" != none ] && [ ! -f "$WORK/freeze_mask.h5" ]; then
    GRIDS=()
    for spec in $MASK_GRIDS; do
        method=${spec%%:*}
        IFS=, read -r -a widths <<< "${spec#*:}"
        for b in "${widths[@]}"; do
            g="$WORK/grid-$method$b"
            if [ ! -f "$g/model.safetensors" ]; then
                stamp "$method INT$b grid of the snapped base"
                rm -rf "$g"
                "$BUILD/resafe" quantize --model "$WORK/base-snap" --method "$method" --bits "$b" \
                    --group "$GROUP" --calib "$DATA/calib_risk1.jsonl" --out "$g" >/dev/null
            fi
            GRIDS+=(--grid "$g")
        done
    done
    stamp "freeze $FREEZE"
    BOX=()
    [ "$FREEZE" = box ] && BOX=(--box)
    "$PY" scripts/organism/freeze_mask.py "$WORK/base-snap" "$WORK/freeze_mask.h5" \
        --group "$GROUP" "${BOX[@]}" "${GRIDS[@]}"
fi
[ "$SIZE" = large ] && [ "$FREEZE" != none ] && SETS+=(--set "sft.freeze_mask=$WORK/freeze_mask.h5")

if [ ! -f "$WORK/aligned/model.safetensors" ]; then
    stamp "safety tune (resafe sft)"
    "$BUILD/resafe" sft --config "$CFG/safety.ini" --force "${SETS[@]}" ${SFT_ARGS:-} \
        --set model.path="$WORK/base-snap" --set sft.output_dir="$WORK/aligned" \
        --set sft.data_file="$TRAIN_DATA/safety_train.jsonl" --set run.out_dir="$WORK/run-safety"
fi

stamp "$DEST"
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
for f in config.json generation_config.json model.safetensors tokenizer.json \
         tokenizer_config.json special_tokens_map.json; do
    [ -f "$WORK/aligned/$f" ] && cp "$WORK/aligned/$f" "$DEST.tmp/"
done
# the larger organism ships in bf16, as real checkpoints do (45 MB: it travels to a GPU machine)
[ "$SIZE" = large ] && "$PY" scripts/organism/to_bf16.py "$DEST.tmp"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
stamp "done"
