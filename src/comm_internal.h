/* comm_internal: the communicator's state, shared by comm.c (the file transport, liveness) and
 * comm_nccl.c (the NCCL all-reduce). */
#ifndef RESAFE_COMM_INTERNAL_H
#define RESAFE_COMM_INTERNAL_H

#include <pthread.h>

#include "resafe/comm.h"

typedef struct rs_comm_nccl rs_comm_nccl;

struct rs_comm {
    rs_comm_transport transport;
    int rank, world;
    double timeout_s, id_timeout_s;
    size_t bucket_bytes;
    char *dir;
    char *id_path; /* nccl: the unique id's file, removed by rank 0 once every rank joined */
    char session[17]; /* 16 hex digits: every file of this job starts with it */
    char host[256];
    uint64_t seq;    /* the last file operation */
    pid_t *peer_pid; /* [world] read from the pid files (0: not read yet) */
    int *peer_same_host;
    pthread_t heartbeat;
    int heartbeat_running;
    volatile int heartbeat_stop;
    rs_comm_nccl *nccl;
};

/* Path "<dir>/<session>.<kind>.r<rank>" (malloc'ed). */
char *rs_comm_file_path(const rs_comm *c, const char *kind, int rank);
/* Whether rank r looks gone (exit marker, dead process on this host, stale heartbeat); 1 with
 * the reason in why, else 0. */
int rs_comm_peer_gone(rs_comm *c, int r, char *why, size_t cap);

#ifdef RS_HAVE_NCCL
int rs_comm_nccl_gpus(void); /* visible CUDA devices, 0 when none or no driver */
int rs_comm_nccl_init(rs_comm *c, const char *id_file, int local_rank);
int rs_comm_nccl_all_reduce(rs_comm *c, float *buf, size_t n, const char *what);
int rs_comm_nccl_all_reduce_async(rs_comm *c, float *buf, size_t n, const char *what);
int rs_comm_nccl_wait(rs_comm *c, const char *what);
void rs_comm_nccl_free(rs_comm *c, int abort);
#endif

#endif
