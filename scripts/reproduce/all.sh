#!/usr/bin/env bash
# Every table of the paper, one script each (scripts/reproduce/t1_assess.py .. t7_formats.py), into
# one results folder whose work (quantized models, patch runs, evaluations) they share; then a
# summary with each table's wall time and the recorded time of the pieces it used.
#
#   scripts/reproduce/all.sh MODEL_DIR [OUT] [table options...]
#     OUT defaults to runs/reproduce-<MODEL_DIR name>; the options go to every table script
#     (--quick, --backend cpu|cuda|auto, --config FILE, --results DIR, --set s.k=v, ...; see
#     scripts/reproduce/t1_assess.py --help; a table's own options, such as --taus, only by
#     running its script). Env TABLES="T3 T7" runs a subset.
# Re-running reuses everything that is done. Exit status: 1 when any table failed, else 0.
set -u
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  [ $# -lt 1 ] && { echo "all.sh: error: MODEL_DIR is required" >&2; exit 2; }
  exit 0
fi
MODEL=$1; shift
case "$MODEL" in -*) echo "all.sh: error: MODEL_DIR must come first (got option $MODEL)" >&2; exit 2;; esac
[ -f "$MODEL/config.json" ] || { echo "all.sh: error: MODEL_DIR $MODEL: not a model directory (no config.json)" >&2; exit 2; }
OUT=runs/reproduce-$(basename "$MODEL")
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT=$1; shift; fi
PY=${PYTHON:-python3}
declare -A SCRIPT=([T1]=t1_assess.py [T2]=t2_patch.py [T3]=t3_tau.py [T4]=t4_sft_dpo.py
                   [T5]=t5_bits.py [T6]=t6_protect.py [T7]=t7_formats.py)
TABLES=${TABLES:-T1 T2 T3 T4 T5 T6 T7}
for t in $TABLES; do
  [ -n "${SCRIPT[$t]:-}" ] || { echo "all.sh: error: TABLES: unknown table $t (T1..T7)" >&2; exit 2; }
done

summary=()
status=0
for t in $TABLES; do
  echo "== $t: ${SCRIPT[$t]}"
  start=$(date +%s%N)
  "$PY" "$here/${SCRIPT[$t]}" "$MODEL" "$OUT" "$@"
  rc=$?
  end=$(date +%s%N)
  [ $rc -eq 2 ] && exit 2   # a usage error: the same for every table
  [ $rc -ne 0 ] && status=1
  rec=$("$PY" -c 'import json,sys
try: print("%.1f" % json.load(open(sys.argv[1]))["timings"]["compute_s"])
except Exception: print("-")' "$OUT/$t.json")
  ms=$(( (end - start) / 1000000 ))
  summary+=("$(printf '| %s | %s | %d.%d | %s |' "$t" "$([ $rc -eq 0 ] && echo ok || echo "failed ($rc)")" \
              $((ms / 1000)) $((ms % 1000 / 100)) "$rec")")
done
echo
echo "== summary ($OUT)"
echo "| table | status | wall time (s) | recorded time of its pieces (s) |"
echo "|---|---|---|---|"
printf '%s\n' "${summary[@]}"
exit $status
