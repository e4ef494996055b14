/* comm: the collectives of a data-parallel job (issue #8): sum all-reduce, broadcast, barrier and
 * a gather of byte blobs to rank 0, every wait bounded, and a dead peer named.
 *
 * Transports ([dist] transport):
 *   file  files in a directory every rank shares ([dist] comm_dir). Every collective is one
 *         numbered operation: each rank writes its part as "<session>.op<seq>.r<rank>" (a tmp
 *         name renamed into place, so a reader never sees half a part), then waits for the parts
 *         of all ranks. A sum is taken in rank order (rank 0's part, + rank 1's, ...) by every
 *         rank from the same bytes, so all ranks hold bit-identical results, equal to a
 *         sequential float sum over the ranks. Every rank writes a part for every operation (an
 *         empty one where it has nothing to send), so a part of operation seq proves its writer
 *         has finished reading operation seq - 1: a rank then deletes its own part of seq - 1.
 *         For CPU ranks on one machine, and the CI vehicle for the distributed logic.
 *   nccl  NCCL on the CUDA backend (built when the Makefile finds nccl.h): one GPU per rank
 *         (local rank modulo the device count), the unique id through [dist] nccl_id_file,
 *         ncclAllReduce / ncclBroadcast / send-receive, waited for by polling the stream and
 *         ncclCommGetAsyncError against the timeout; a failure or a timeout aborts the
 *         communicator (ncclCommAbort) so no rank stays stuck inside NCCL.
 *   auto  nccl on the cuda backend when built with it, else file.
 *
 * Liveness (both transports; the nccl one keeps the files only for this): at init every rank
 * writes "<session>.pid.r<rank>" (host and pid) and a thread touches "<session>.hb.r<rank>" every
 * second. A rank that leaves through exit() without rs_comm_finalize (an error, a signal the train
 * loop turned into an exit) writes "<session>.exit.r<rank>" from an atexit handler. A waiting rank
 * checks the ranks it waits for every half second and fails with one line naming the rank when
 * its exit marker exists ("rank 1 exited"), its process is gone (same host: "rank 1 (pid 123)
 * died"), or its heartbeat is older than RS_COMM_HEARTBEAT_DEAD_S ("rank 1 died: no heartbeat
 * for 31 s", other hosts), and after [dist] timeout_s with the ranks that did not arrive.
 *
 * Session: rank 0 draws a random session token and hands it to the others through
 * "<comm_dir>/session" (the id file of dist.h, with its stale-file guard: a new job never reads
 * a dead job's parts). */
#ifndef RESAFE_COMM_H
#define RESAFE_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "resafe/backend.h"
#include "resafe/config.h"
#include "resafe/dist.h"

#define RS_COMM_HEARTBEAT_DEAD_S 30.0

typedef enum { RS_COMM_FILE = 1, RS_COMM_NCCL } rs_comm_transport;

typedef struct {
    rs_comm_transport transport;
    const char *dir;     /* liveness files and the file transport's parts */
    const char *id_file; /* nccl: where rank 0 publishes the unique id ("" = <dir>/nccl_id) */
    double timeout_s;    /* any one wait */
    double id_timeout_s; /* the session token / unique id exchange at init */
    size_t bucket_bytes; /* rs_comm_all_reduce_device: floats per call = bucket_bytes / 4 */
} rs_comm_options;

typedef struct rs_comm rs_comm;

/* One process (world 1) gets a communicator too: its collectives return at once (sums are the
 * identity, the gather copies), so callers need no special case. -1 + message. */
int rs_comm_init(rs_comm **out, const rs_dist *d, const rs_comm_options *o);
/* The options from [dist] (transport, comm_dir, nccl_id_file, timeout_s, id_timeout_s,
 * bucket_mb) and [run] out_dir (comm_dir "" = <out_dir>/.dist); `backend` is [model] backend
 * (auto's transport: file for cpu, else nccl when built with it and a GPU is visible). Ranks
 * other than 0 lower an info log level to warnings (one voice in the job's log). One process
 * gets a communicator without files. */
int rs_comm_from_config(const rs_config *cfg, const rs_dist *d, const char *backend, rs_comm **out);
/* A clean end: a barrier, then rank 0 removes the session's files. Frees c. 0 or -1. */
int rs_comm_finalize(rs_comm *c);
/* An end after an error on this rank: marks this rank exited (peers stop waiting for it at
 * once), aborts the NCCL communicator, frees c. */
void rs_comm_abort(rs_comm *c);

int rs_comm_rank(const rs_comm *c);
int rs_comm_world(const rs_comm *c);
const char *rs_comm_transport_name(const rs_comm *c);
/* [dist] bucket_mb in bytes: the most one all-reduce call moves. */
size_t rs_comm_bucket_bytes(const rs_comm *c);

/* Collectives on HOST buffers, every rank calling them in the same order. `what` names the
 * operation in timeout messages ("dpo step 12 gradients"). */
int rs_comm_all_reduce_sum_f32(rs_comm *c, float *buf, size_t n, const char *what);
int rs_comm_all_reduce_sum_f64(rs_comm *c, double *buf, size_t n, const char *what);
int rs_comm_broadcast(rs_comm *c, void *buf, size_t bytes, int root, const char *what);
int rs_comm_barrier(rs_comm *c, const char *what);
/* Rank 0 receives every rank's blob: *out (malloc'ed) holds them packed in rank order and
 * sizes[r] the bytes of rank r (sizes has world entries); other ranks get *out = NULL. */
int rs_comm_gather(rs_comm *c, const void *blob, size_t bytes, void **out, size_t *sizes,
                   const char *what);

/* The same with every rank receiving the packed blobs. */
int rs_comm_all_gather(rs_comm *c, const void *blob, size_t bytes, void **out, size_t *sizes,
                       const char *what);

/* Sum all-reduce of n floats in backend memory, in calls of at most bucket_bytes: nccl reduces
 * the device buffer in place; file stages each bucket through host memory. */
int rs_comm_all_reduce_device_f32(rs_comm *c, const rs_backend *be, float *buf, size_t n,
                                  const char *what);
/* The same, overlapped with the backend's later work: nccl enqueues the reduce on the
 * communicator's stream behind everything the backend has enqueued so far (a CUDA event orders
 * the streams; the host does not wait) and returns; file reduces at once. buf must not be
 * touched again until rs_comm_wait_device returns. Every rank must make the same calls in the
 * same order (sizes included). */
int rs_comm_all_reduce_device_f32_async(rs_comm *c, const rs_backend *be, float *buf, size_t n,
                                        const char *what);
/* Wait for every reduce enqueued so far (nccl: the stream, against [dist] timeout_s). */
int rs_comm_wait_device(rs_comm *c, const char *what);

/* "auto", "file", "nccl" -> 0, RS_COMM_FILE, RS_COMM_NCCL; -1 when unknown. */
int rs_comm_transport_from_name(const char *name, int *out);
/* Whether this build has the nccl transport. */
int rs_comm_have_nccl(void);

#endif
