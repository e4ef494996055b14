#!/usr/bin/env bash
# One node, N processes: mpirun -np N resafe train --config CONFIG.
#   scripts/cluster/mpirun.sh 2 configs/run.ini [--set section.key=value ...]
# Each process reads its rank from OpenMPI's OMPI_COMM_WORLD_* variables ([dist] launcher = auto).
# Today a build without NCCL refuses world > 1 with one line per rank ("multi-GPU data parallel
# needs the NCCL build; not available yet", issue #8): the launch and rank plumbing works, the
# gradient all-reduce does not exist yet. N = 1 runs the ordinary single-process job.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N CONFIG.ini [resafe train options...]" >&2
  exit 2
fi
N=$1
CONFIG=$2
shift 2
RESAFE=${RESAFE:-$(dirname "$0")/../../build/resafe}
# The NCCL unique id goes from rank 0 to the others through this file ([dist] nccl_id_file);
# one run id per launch, so a file left by an earlier launch is never taken for this one's.
ID_FILE=${ID_FILE:-${TMPDIR:-/tmp}/resafe-nccl-id.$$}
export RESAFE_RUN_ID=${RESAFE_RUN_ID:-mpirun-$(hostname)-$$-$(date +%s)}
# NCCL_NVLS_ENABLE=0: NVLink multicast (NVLS) off, as the device machines require.
exec mpirun -np "$N" -x RESAFE_RUN_ID -x NCCL_NVLS_ENABLE=0 \
  "$RESAFE" train --config "$CONFIG" --set "dist.nccl_id_file=$ID_FILE" "$@"
