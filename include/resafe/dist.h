/* dist: who this process is in a data-parallel job (rank, world size, local rank) as the launcher
 * tells it through the environment, and the NCCL unique id shared through a file on a shared
 * filesystem. Nothing here needs NCCL or a GPU: the id is opaque bytes, so the exchange is tested
 * with processes on the CPU. (The communicator and the all-reduce come with the NCCL build,
 * issue #8.)
 *
 * Where rank and world come from ([dist] launcher):
 *   auto   OpenMPI (OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK) when
 *          any of them is set, else SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) when any
 *          of them is set inside a job step (SLURM_STEP_ID set: started by srun), else one process
 *          (rank 0 of 1). OpenMPI comes first because `mpirun` inside a SLURM allocation is common:
 *          there the SLURM variables describe the allocation's batch step, the OMPI ones the ranks.
 *          The batch script itself (no srun) also has SLURM_PROCID=0 and SLURM_NTASKS=N, but no
 *          SLURM_STEP_ID: it is one process, not rank 0 of N waiting for peers that never start.
 *   mpi    the OpenMPI variables, required
 *   slurm  the SLURM variables, required (SLURM_STEP_ID not needed)
 *   none   one process, whatever the environment says
 * A set is all or nothing: some of its variables without the others, a value that is not a
 * decimal integer, world < 1, rank or local rank outside 0 .. world - 1 are errors whose one-line
 * message names the variable and its value. */
#ifndef RESAFE_DIST_H
#define RESAFE_DIST_H

#include <stdint.h>

#include "resafe/config.h"

typedef enum { RS_LAUNCHER_AUTO = 0, RS_LAUNCHER_NONE, RS_LAUNCHER_MPI, RS_LAUNCHER_SLURM } rs_launcher;

#define RS_DIST_RUN_ID 128
typedef struct {
    int rank, world, local_rank;
    const char *source;          /* "single", "openmpi" or "slurm" */
    char run_id[RS_DIST_RUN_ID]; /* this job's identity for the id file's stale guard: RESAFE_RUN_ID,
                                  * else SLURM_JOB_ID.SLURM_STEP_ID, else PMIX_NAMESPACE, else
                                  * OMPI_MCA_ess_base_jobid; "" when none is set */
    double t_start;              /* wall-clock seconds when the environment was read */
} rs_dist;

/* "auto", "none", "mpi", "slurm" -> launcher; -1 when unknown (no message). */
int rs_launcher_from_name(const char *name, rs_launcher *out);
/* Rank, world and local rank from the environment (see the top of this file); -1 + message. */
int rs_dist_from_env(rs_launcher launcher, rs_dist *d);
/* The same with [dist] launcher of cfg. */
int rs_dist_from_config(const rs_config *cfg, rs_dist *d);
/* "rank 1 of 4 (openmpi, local rank 1)" into buf; returns buf. */
const char *rs_dist_describe(const rs_dist *d, char *buf, int cap);
/* What a command that does not run data parallel does with world > 1: -1 + the message
 * "rank R of W (source): resafe <command> does not run data parallel (...)", instead of running
 * W copies of the same job. 0 for one process. */
int rs_dist_require_single(const rs_dist *d, const char *command);

/* ---------------------------------------------------------------- unique id through a file
 * Rank 0 writes the id to "<path>.tmp.<pid>" and renames it to path (readers never see half a
 * file); every other rank polls path until it holds an id of this job, or fails after timeout_s
 * with a message naming its rank, the path and the timeout.
 *
 * File: "RSDISTID" (8 bytes), version u32 = 1, world u32, run id (128 bytes, NUL-padded), the id
 * (RS_DIST_ID_BYTES); little-endian, 272 bytes.
 *
 * Stale-file guard: a file left by an earlier job must not be taken for this job's id (NCCL would
 * hang connecting to peers that are gone). A file whose run id differs from ours is stale; when
 * neither has a run id, a file modified more than RS_DIST_ID_STALE_S before this process read its
 * environment (d->t_start) is stale (the slack covers ranks started seconds apart and clocks of
 * different nodes). Readers keep polling past a stale file (rank 0 replaces it) and name it in
 * the timeout message. A file of this job with another world size is an error at once. */
#define RS_DIST_ID_BYTES 128
#define RS_DIST_ID_FILE_BYTES 272
#define RS_DIST_ID_STALE_S 120.0

int rs_dist_id_publish(const char *path, const rs_dist *d, const uint8_t id[RS_DIST_ID_BYTES]);
int rs_dist_id_wait(const char *path, const rs_dist *d, double timeout_s,
                    uint8_t id[RS_DIST_ID_BYTES]);
/* Rank 0 publishes id, the others wait for it and fill id. */
int rs_dist_id_exchange(const char *path, const rs_dist *d, double timeout_s,
                        uint8_t id[RS_DIST_ID_BYTES]);

#endif
