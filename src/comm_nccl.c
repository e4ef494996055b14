/* comm_nccl: the sum all-reduce of device buffers over NCCL (see comm.h). Compiled only when the
 * Makefile found nccl.h (RS_HAVE_NCCL); the host collectives of an nccl communicator (metrics,
 * the gather of prompts, barriers) go through the file transport's directory, which the NCCL id
 * file needs on a shared filesystem anyway: they are small and rare next to the gradients.
 *
 * The all-reduce runs on a stream of its own, ordered after the work enqueued so far on the
 * backend's stream by an event (no host wait), so a caller can start it for a finished part of
 * the gradients while backward goes on (rs_comm_all_reduce_device_f32_async). NCCL is used
 * non-blocking (ncclConfig_t.blocking = 0): every call returns at once and the wait polls
 * cudaStreamQuery and ncclCommGetAsyncError, checking the peers' liveness files every half
 * second and giving up after [dist] timeout_s; any failure aborts the communicator
 * (ncclCommAbort), which is what unblocks a rank whose peer died inside a collective. */
#ifdef RS_HAVE_NCCL
#include "comm_internal.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "resafe/backend.h"
#include "resafe/core.h"

struct rs_comm_nccl {
    ncclComm_t comm;
    cudaStream_t stream;
    cudaEvent_t ready; /* recorded on the backend's stream before each reduce */
    int device;
};

_Static_assert(RS_DIST_ID_BYTES == NCCL_UNIQUE_ID_BYTES, "the id file holds one ncclUniqueId");

/* Wait until NCCL leaves ncclInProgress (and, with a stream, until the stream is idle): 0, or -1
 * + a message naming the rank, the failure or the rank that looks gone. */
static int nccl_wait(rs_comm *c, int with_stream, const char *what) {
    rs_comm_nccl *n = c->nccl;
    double t0 = rs_now(), last_check = t0;
    for (;;) {
        ncclResult_t state;
        ncclResult_t rc = ncclCommGetAsyncError(n->comm, &state);
        if (rc != ncclSuccess) state = rc;
        if (state != ncclSuccess && state != ncclInProgress)
            return RS_FAIL("rank %d of %d: NCCL failed in %s: %s (%s)", c->rank, c->world, what,
                           ncclGetErrorString(state), ncclGetLastError(n->comm));
        if (state == ncclSuccess) {
            if (!with_stream) return 0;
            cudaError_t q = cudaStreamQuery(n->stream);
            if (q == cudaSuccess) return 0;
            if (q != cudaErrorNotReady)
                return RS_FAIL("rank %d of %d: CUDA failed in %s: %s", c->rank, c->world, what,
                               cudaGetErrorString(q));
        }
        double now = rs_now();
        if (now - last_check >= 0.5) {
            last_check = now;
            char why[300];
            for (int r = 0; r < c->world; r++)
                if (r != c->rank && rs_comm_peer_gone(c, r, why, sizeof why))
                    return RS_FAIL("rank %d of %d: %s during %s; stopping", c->rank, c->world, why,
                                   what);
        }
        if (now - t0 >= c->timeout_s)
            return RS_FAIL("rank %d of %d: %s did not complete within %g s ([dist] timeout_s): "
                           "a rank is stuck or gone",
                           c->rank, c->world, what, c->timeout_s);
        struct timespec pause = {0, 200 * 1000};
        nanosleep(&pause, NULL);
    }
}

int rs_comm_nccl_gpus(void) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return count;
}

int rs_comm_nccl_init(rs_comm *c, const char *id_file, int local_rank) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
        return RS_FAIL("rank %d: [dist] transport = nccl but no CUDA device is visible", c->rank);
    rs_comm_nccl *n = rs_calloc(1, sizeof *n);
    c->nccl = n;
    n->device = local_rank % count;
    /* before the backend's first call, so its context and stream live on this rank's GPU */
    if (cudaSetDevice(n->device) != cudaSuccess)
        return RS_FAIL("rank %d: cannot select GPU %d", c->rank, n->device);
    if (cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking) != cudaSuccess ||
        cudaEventCreateWithFlags(&n->ready, cudaEventDisableTiming) != cudaSuccess)
        return RS_FAIL("rank %d: cannot create a CUDA stream and event", c->rank);
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (c->rank == 0 && ncclGetUniqueId(&id) != ncclSuccess)
        return RS_FAIL("rank 0: ncclGetUniqueId failed");
    rs_dist d = {.rank = c->rank, .world = c->world, .source = "comm"};
    /* the session token is this job's: a stale id file of another job cannot pass for ours */
    snprintf(d.run_id, sizeof d.run_id, "%s", c->session);
    d.t_start = 0;
    char *def = rs_path_join(c->dir, "nccl_id");
    const char *path = id_file && id_file[0] ? id_file : def;
    c->id_path = rs_strdup(path);
    int rc = rs_dist_id_exchange(path, &d, c->id_timeout_s, (uint8_t *)id.internal);
    free(def);
    RS_TRY(rc);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&n->comm, c->world, id, c->rank, &config);
    if (r != ncclSuccess && r != ncclInProgress)
        return RS_FAIL("rank %d: ncclCommInitRank failed: %s", c->rank, ncclGetErrorString(r));
    RS_TRY(nccl_wait(c, 0, "ncclCommInitRank"));
    rs_info("comm: rank %d of %d on GPU %d over NCCL %d.%d", c->rank, c->world, n->device,
            NCCL_MAJOR, NCCL_MINOR);
    return 0;
}

int rs_comm_nccl_all_reduce_async(rs_comm *c, float *buf, size_t n, const char *what) {
    /* behind what the backend's stream holds now (the event's state at this call is what the
     * wait takes: recording it again for the next reduce does not move this one) */
    rs_comm_nccl *nc = c->nccl;
    if (cudaEventRecord(nc->ready, (cudaStream_t)rs_cuda_stream_handle()) != cudaSuccess ||
        cudaStreamWaitEvent(nc->stream, nc->ready, 0) != cudaSuccess)
        return RS_FAIL("rank %d of %d: CUDA failed ordering %s after the backend's work: %s",
                       c->rank, c->world, what, cudaGetErrorString(cudaGetLastError()));
    size_t bucket = c->bucket_bytes / sizeof(float);
    if (bucket < 1) bucket = 1;
    for (size_t at = 0; at < n; at += bucket) {
        size_t k = n - at < bucket ? n - at : bucket;
        ncclResult_t r = ncclAllReduce(buf + at, buf + at, k, ncclFloat32, ncclSum, c->nccl->comm,
                                       c->nccl->stream);
        if (r != ncclSuccess && r != ncclInProgress)
            return RS_FAIL("rank %d of %d: ncclAllReduce (%s) failed: %s", c->rank, c->world, what,
                           ncclGetErrorString(r));
        /* a non-blocking communicator takes the next call once this one is enqueued */
        if (r == ncclInProgress) RS_TRY(nccl_wait(c, 0, what));
    }
    return 0;
}

int rs_comm_nccl_wait(rs_comm *c, const char *what) { return nccl_wait(c, 1, what); }

int rs_comm_nccl_all_reduce(rs_comm *c, float *buf, size_t n, const char *what) {
    RS_TRY(rs_comm_nccl_all_reduce_async(c, buf, n, what));
    return nccl_wait(c, 1, what);
}

void rs_comm_nccl_free(rs_comm *c, int abort) {
    rs_comm_nccl *n = c->nccl;
    if (n->comm) {
        ncclResult_t f = abort ? ncclSuccess : ncclCommFinalize(n->comm);
        if (!abort && (f == ncclSuccess || f == ncclInProgress))
            nccl_wait(c, 0, "ncclCommFinalize");
        if (abort)
            ncclCommAbort(n->comm);
        else
            ncclCommDestroy(n->comm);
    }
    if (n->stream) cudaStreamDestroy(n->stream);
    if (n->ready) cudaEventDestroy(n->ready);
    free(n);
    c->nccl = NULL;
}
#else
/* ISO C forbids an empty translation unit. */
typedef int rs_comm_nccl_not_built;
#endif
