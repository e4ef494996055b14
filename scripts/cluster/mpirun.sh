#!/usr/bin/env bash
# One node, N ranks (one GPU each): the Q-resafe pipeline of CONFIG with the data-parallel stages
# on N processes.
#   scripts/cluster/mpirun.sh 2 configs/run.ini [--set section.key=value ...]
# quantize and merge run once (one process); triplets, dpo and eval run under mpirun -np N, each
# rank reading its rank from OpenMPI's OMPI_COMM_WORLD_* variables ([dist] launcher = auto), and
# rank 0 writing every output. `resafe train` itself is one process (it refuses world > 1), so the
# stages are called one by one (STAGES picks them; DPO_ARGS=--resume continues a stopped dpo).
# N = 1 runs everything as one process.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N CONFIG.ini [--set section.key=value ...]" >&2
  exit 2
fi
N=$1
CONFIG=$2
shift 2
RESAFE=${RESAFE:-$(dirname "$0")/../../build/resafe}
# One run id per launch: the session and NCCL id files of an earlier launch are never taken
# for this one's ([dist] comm_dir, default <[run] out_dir>/.dist).
RUN_ID=${RESAFE_RUN_ID:-mpirun-$(hostname)-$$-$(date +%s)}
# NCCL_NVLS_ENABLE=0: NVLink multicast (NVLS) off, as the device machines require.
ranks() { # ranks STAGE ARGS...: one launch of a data-parallel stage, its own run id
  RESAFE_RUN_ID=$RUN_ID-$1 mpirun -np "$N" -x RESAFE_RUN_ID -x NCCL_NVLS_ENABLE=0 "$RESAFE" "$@"
}
STAGES=${STAGES:-quantize triplets dpo merge eval} # e.g. STAGES="dpo merge eval" to go on
for stage in $STAGES; do
  case $stage in
    quantize) "$RESAFE" train --config "$CONFIG" --to quantize "$@" ;;
    triplets) ranks triplets --config "$CONFIG" "$@" ;;
    dpo) ranks dpo --config "$CONFIG" ${DPO_ARGS:-} "$@" ;; # DPO_ARGS=--resume after a stop
    merge) "$RESAFE" merge --config "$CONFIG" "$@" ;;
    eval) ranks eval --config "$CONFIG" --report "$@" ;;
    *) echo "$0: unknown stage '$stage'" >&2; exit 2 ;;
  esac
done
