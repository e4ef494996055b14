#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool: the working tree copied there, cJSON / inih
# unpacked into .deps with `dpkg -x` and carried, results under $OUT): builds for sm_90a, then
# runs the phases named in PHASE in order, each under a timeout that keeps the whole call inside
# LIMIT seconds; every step's log and the results files go to $OUT/dev.tgz (re-packed after each
# step, so a call cut short still returns what finished), a summary to stdout.
#   PHASE="fa attn gpuQ fabench" GPUK="not qmm" LIMIT=540 bash scripts/bench/device_run.sh
# Phases: fa (the attention unit tests), faprof (profile_gpu.py gemm vs flash, FLAYERS layers),
# attn (attention.py), lora (lora_gemm.py), xs (the shared-memory-X qmm test, formats XK),
# gpuQ (tests/run.py --gpu-only -k GPUK), qbench / qdecode (qmatmul table / e2e decode),
# fabench (bench_gpu.py's DPO step against PEFT, RESAFE_CUDA_ATTENTION=FAMODE, env FBENV, skip
# FBSKIP, extra arguments FBARGS, limit FBLIM), lgroup (the
# LoRA group unit test, and the DPO step with RESAFE_CUDA_LORA_GROUP=0: the single ops in turn),
# prof (profile_gpu.py's steady-state DPO step, FLAYERS layers, PMORE extra steps), faauto (the
# attention backward test, our DPO step alone with RESAFE_CUDA_FLASH_DKV=0 _SAVED=0 and with the
# defaults, the faster (the defaults only where the test passed) against PEFT with
# --recompute-layers RCL (not with FAQUICK=1), and the model / DPO GPU tests with it), ops (the C
# unit tests named in OPS one by one; default: the row, elementwise and LoRA op tests), organism
# (SIZE=large build.sh, then check_methods.sh: RTN/AWQ/GPTQ at 8/4/3/2 bits), tables (all.sh on
# the larger organism (TMODEL, default models/organism-large or, with VGATE, the variant that
# won), TLIM seconds; resumable),
# variants (organism recipes VARIANTS="name:bits:freeze ...", each built into models/organism-
# large-<name> from the data, init and base of /tmp/olarge, else of the first variant, then
# check_methods.sh with WIDTHS, VLIM seconds each, evaluated on VBACKEND, default cuda), cmd
# (CMD, CLIM seconds).
set -u
START=$(date +%s); LIMIT=${LIMIT:-570}; O=/tmp/o; mkdir -p $O
rem() { echo $(( LIMIT - ($(date +%s) - START) )); }
step() { # step NAME MAXSEC cmd...
  local n=$1 m=$2; shift 2; local r=$(rem); local t=$(( r - 5 < m ? r - 5 : m ))
  if [ $t -lt 15 ]; then echo "== $n skipped (t=$t)" | tee -a $O/summary.log; return 1; fi
  local s=$(date +%s); echo "== $n (limit $t) at $((s-START))s" | tee -a $O/summary.log
  timeout -k 5 $t "$@" > $O/$n.log 2>&1; local rc=$?
  echo "== $n rc=$rc in $(( $(date +%s) - s ))s" | tee -a $O/summary.log
  tail -4 $O/$n.log | sed 's/^/   /' >> $O/summary.log
  tar czf ${OUT:-/tmp}/dev.tgz -C $O . 2>/dev/null; return $rc
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $O/gpu.txt 2>&1
export PATH=/usr/local/cuda/bin:$PATH
step build 300 make -j16 DEPS_PREFIX=.deps NVCC_GENCODE="-gencode arch=compute_90a,code=sm_90a" \
  all || { echo build failed; tail -50 $O/build.log; exit 1; }
export RESAFE_TEST_GPU=1
for P in ${PHASE:-fa}; do case $P in
fa)
  step fa_fwd 100 build/test_unit --run test_cuda_attention_matches_cpu
  step fa_bwd 120 build/test_unit --run test_cuda_attention_bwd_matches_cpu ;;
faprof)
  L=${FLAYERS:-4}
  RESAFE_CUDA_ATTENTION=gemm step prof_gemm 150 python3 scripts/bench/profile_gpu.py /tmp/pf \
    --layers $L --decode-batch ""
  RESAFE_CUDA_ATTENTION=flash step prof_flash 150 python3 scripts/bench/profile_gpu.py /tmp/pf \
    --layers $L --decode-batch "" ;;
xs)
  step xs ${XLIM:-200} python3 -m pytest -q -x tests/py/test_qmm_gpu.py \
    -k "shared_memory_x and (${XK:-int4})" ;;
gpuQ)
  step gpuQ ${QLIM:-400} python3 tests/run.py --gpu-only -k "${GPUK:-qmm}" ;;
qbench)
  step qbench 300 python3 scripts/bench/qmatmul /tmp/qb --results-dir $O/results \
    --bits ${QBITS:-4,3,2} ;;
qdecode)
  step qdecode 300 python3 scripts/bench/qmatmul /tmp/qd --results-dir $O/results --bits none \
    --e2e ;;
fabench)
  step fabench ${FBLIM:-400} env RESAFE_CUDA_ATTENTION=${FAMODE:-flash} ${FBENV:-} \
    python3 scripts/bench/bench_gpu.py /tmp/fb --results-dir $O/results \
    --skip ${FBSKIP:-decode,hf,recompute} ${FBARGS:-} ;;
lora)
  step lora 90 python3 scripts/bench/lora_gemm.py ;;
attn)
  step attn 120 python3 scripts/bench/attention.py ;;
lgroup)
  step lgroup_test 100 build/test_unit --run test_cuda_lora_group_matches_cpu
  step lgroup_bench 400 env RESAFE_CUDA_LORA_GROUP=0 python3 scripts/bench/bench_gpu.py /tmp/lg \
    --results-dir $O/results_single --skip decode,hf,recompute ;;
prof)
  step prof 300 python3 scripts/bench/profile_gpu.py /tmp/pr --layers ${FLAYERS:-8} \
    --more ${PMORE:-4} --decode-batch "" ;;
faauto)
  # our DPO step with the attention's old and new paths, then the faster (the new only where the
  # attention test passed) with PEFT and --recompute-layers RCL in one bench_gpu.py run, then
  # the model / DPO GPU tests with it
  step faexp_test 120 build/test_unit --run test_cuda_attention_bwd_matches_cpu
  OK=$?
  BEST=""; BT=0
  for X in "RESAFE_CUDA_FLASH_DKV=0 RESAFE_CUDA_FLASH_SAVED=0" ""; do
    [ -z "$X" ] && [ $OK -ne 0 ] && continue
    N=$(echo "base $X" | tr -c 'A-Za-z0-9\n' _ | cut -c1-60)
    step "faexp_$N" 150 env $X python3 scripts/bench/bench_gpu.py /tmp/fe --results-dir \
      "$O/results_$N" --skip decode,hf,recompute,peft || continue
    T=$(python3 -c "import glob, json; f = glob.glob('$O/results_$N/*.json')[0]
print(int(json.load(open(f))['metrics']['dpo_tok_s']))")
    echo "   $N: $T tokens/s" >> $O/summary.log
    if [ "$T" -gt "$BT" ]; then BT=$T; BEST="$X"; fi
  done
  echo "   best: '$BEST' ($BT tokens/s)" | tee -a $O/summary.log
  [ -n "${FAQUICK:-}" ] || step fabest 300 env $BEST python3 scripts/bench/bench_gpu.py /tmp/fe \
    --results-dir $O/results --skip decode,hf,recompute ${FBARGS:---recompute-layers ${RCL:-26}}
  step fabest_model 200 env $BEST python3 -m pytest -q tests/py/test_model_gpu_train.py \
    tests/py/test_dpo_gpu.py ;;
ops)
  for T in ${OPS:-test_cuda_rope_matches_cpu test_cuda_rope_bwd_matches_cpu \
      test_cuda_rmsnorm_matches_cpu test_cuda_rmsnorm_bwd_matches_cpu test_cuda_glu_matches_cpu \
      test_cuda_glu_bwd_matches_cpu test_cuda_lora_fwd_bwd_match_cpu \
      test_cuda_lora_group_matches_cpu}; do
    step "$T" 60 build/test_unit --run "$T"
  done ;;
organism)
  # the larger organism (recipe of build.sh) and every PTQ method at 8/4/3/2 bits on it
  step organism ${OLIM:-300} env SIZE=large WORK=/tmp/olarge bash scripts/organism/build.sh
  step methods ${MLIM:-240} env DATA=data/organism-large EVAL_ARGS="--data \
data/organism-large --backend cuda" bash scripts/organism/check_methods.sh models/organism-large \
    /tmp/omethods ;;
tables)
  # every paper table on the larger organism (resumable: a second call finishes it)
  TM=${TMODEL:-models/organism-large}
  if [ -z "${TMODEL:-}" ] && [ -n "${VGATE:-}" ]; then
    [ -s $O/vwin ] || { echo "== tables skipped: no variant won" >> $O/summary.log; continue; }
    TM=models/organism-large-$(cat $O/vwin)
  fi
  mkdir -p $O/tables-$(basename $TM)
  CF=configs/$(basename $TM).ini  # a variant's model has no config of its own: the organism's
  [ -f $CF ] || CF=configs/organism-large.ini
  step tables ${TLIM:-540} bash scripts/reproduce/all.sh $TM runs/rep-$(basename $TM) \
    --backend cuda --config $CF --results $O/tables-$(basename $TM) ;;
variants)
  # candidate recipes (scripts/organism/README.md, "v6 candidates"): the snap width and the
  # freeze, the rest shared; each variant's build and method lines in $O/variant-<name>.log.
  # With VGATE=1 the first variant whose methods rise as bits fall (check_shape.py) wins: the
  # rest are skipped and a later tables phase (no TMODEL) runs on it. With the public sets in
  # .pubdata (advbench_harmful_behaviors.csv, xstest_prompts.csv: carried, never committed),
  # each variant's FP model is also evaluated on them ($O/variant-<name>-public.log).
  SH=/tmp/olarge  # the shared stages: the organism phase's, else the first built variant's
  [ -e $SH/base/model.safetensors ] || SH=$(ls -d /tmp/ov-*/base/model.safetensors 2>/dev/null |
    head -1 | sed 's,/base/model.safetensors$,,')
  for V in ${VARIANTS:-s2none:2:none s2box:2:box}; do
    [ -s $O/vwin ] && break
    IFS=: read -r VN VB VF <<< "$V"; W=/tmp/ov-$VN; mkdir -p $W
    for st in data init base; do
      [ -n "$SH" ] && [ -e $SH/$st ] && [ ! -e $W/$st ] && cp -r $SH/$st $W/
    done
    [ -n "$SH" ] || SH=$W
    step "variant-$VN" ${VLIM:-300} bash -c "env SIZE=large WORK=$W BITS=$VB FREEZE=$VF \
MASK_GRIDS='' DEST=models/organism-large-$VN bash scripts/organism/build.sh && env \
DATA=data/organism-large WIDTHS='${WIDTHS:-8 4 3 2}' EVAL_ARGS='--data data/organism-large \
--backend ${VBACKEND:-cuda}' bash scripts/organism/check_methods.sh \
models/organism-large-$VN /tmp/om-$VN" || continue
    # the gate: every width below 8 (INT8 stays at FP's level, as in the paper)
    python3 scripts/organism/check_shape.py /tmp/om-$VN --widths $(echo ${WIDTHS:-8 4 3 2} |
      tr ' ' '\n' | awk '$1 < 8') > $O/shape-$VN.log 2>&1; SR=$?
    sed 's/^/   /' $O/shape-$VN.log >> $O/summary.log
    [ -f .pubdata/advbench_harmful_behaviors.csv ] && step "variant-$VN-public" 60 \
      python3 scripts/organism/quick_eval.py --model models/organism-large-$VN --tag fp-$VN \
      --data data/organism-large --backend cuda \
      --advbench .pubdata/advbench_harmful_behaviors.csv --xstest .pubdata/xstest_prompts.csv \
      --json $O/public-$VN.json
    [ "${VGATE:-0}" = 1 ] && [ $SR -eq 0 ] && echo $VN > $O/vwin
  done
  [ -s $O/vwin ] && echo "   winner: $(cat $O/vwin)" >> $O/summary.log ;;
cmd)
  step cmd ${CLIM:-300} bash -c "$CMD" ;;
esac; done
echo "total $(( $(date +%s) - START ))s" >> $O/summary.log
tar czf ${OUT:-/tmp}/dev.tgz -C $O . 2>/dev/null
cat $O/summary.log
