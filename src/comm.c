/* comm: the communicator, its file transport and the liveness of the ranks (see comm.h). */
#include "comm_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "resafe/core.h"

/* The communicator of this process, for the atexit handler (one per process). */
static rs_comm *g_live;

static const char g_part_magic[8] = {'R', 'S', 'C', 'O', 'M', 'M', 'O', 'P'};
#define LABEL_BYTES 80 /* the operation's name ("dpo step 3 gradients"), NUL-padded */
#define PART_HEADER (24 + LABEL_BYTES) /* magic, seq u64, payload bytes u64, label */

/* ---------------------------------------------------------------- files */

char *rs_comm_file_path(const rs_comm *c, const char *kind, int rank) {
    size_t cap = strlen(c->dir) + strlen(kind) + 64;
    char *p = rs_malloc(cap);
    snprintf(p, cap, "%s/%s.%s.r%d", c->dir, c->session, kind, rank);
    return p;
}

static char *op_path(const rs_comm *c, uint64_t seq, int rank) {
    char kind[32];
    snprintf(kind, sizeof kind, "op%llu", (unsigned long long)seq);
    return rs_comm_file_path(c, kind, rank);
}

/* tmp + rename, no fsync: the parts only need to be whole when seen, not to survive a crash. */
static int write_whole(const char *path, const void *head, size_t head_bytes, const void *data,
                       size_t bytes) {
    size_t cap = strlen(path) + 32;
    char *tmp = rs_malloc(cap);
    snprintf(tmp, cap, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    int ok = f != NULL, err = errno;
    if (ok && head_bytes) ok = fwrite(head, 1, head_bytes, f) == head_bytes;
    if (ok && bytes) ok = fwrite(data, 1, bytes, f) == bytes;
    if (!ok) err = errno;
    if (f && fclose(f) != 0 && ok) ok = 0, err = errno;
    if (ok && rename(tmp, path) != 0) ok = 0, err = errno;
    if (!ok) unlink(tmp);
    free(tmp);
    return ok ? 0 : RS_FAIL("cannot write %s: %s", path, strerror(err));
}

static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* The payload of rank r's part of operation c->seq (malloc'ed, *bytes long). */
static int read_part(rs_comm *c, int r, uint8_t **out, size_t *bytes) {
    char *path = op_path(c, c->seq, r);
    char *data = NULL;
    size_t size = 0;
    int rc = rs_read_file(path, &data, &size);
    if (rc == 0 && (size < PART_HEADER || memcmp(data, g_part_magic, 8) != 0 ||
                    get_u64((uint8_t *)data + 8) != c->seq ||
                    get_u64((uint8_t *)data + 16) != size - PART_HEADER))
        rc = RS_FAIL("rank %d: %s is not rank %d's part of operation %llu (%zu bytes)", c->rank,
                     path, r, (unsigned long long)c->seq, size);
    free(path);
    if (rc != 0) return free(data), -1;
    *bytes = size - PART_HEADER;
    *out = rs_malloc(*bytes ? *bytes : 1);
    memcpy(*out, data + PART_HEADER, *bytes);
    free(data);
    return 0;
}

/* ---------------------------------------------------------------- liveness */

static double wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *heartbeat_main(void *arg) {
    rs_comm *c = arg;
    char *path = rs_comm_file_path(c, "hb", c->rank);
    while (!c->heartbeat_stop) {
        FILE *f = fopen(path, "ab"); /* creates it once; then only the time changes */
        if (f) fclose(f);
        utimensat(AT_FDCWD, path, NULL, 0);
        for (int i = 0; i < 10 && !c->heartbeat_stop; i++) {
            struct timespec pause = {0, 100 * 1000 * 1000};
            nanosleep(&pause, NULL);
        }
    }
    free(path);
    return NULL;
}

static int write_marker(rs_comm *c, const char *kind, const char *text) {
    char *path = rs_comm_file_path(c, kind, c->rank);
    int rc = write_whole(path, NULL, 0, text, strlen(text));
    free(path);
    return rc;
}

/* Peer r's host and pid from its pid file, once. */
static void read_peer_pid(rs_comm *c, int r) {
    if (c->peer_pid[r]) return;
    char *path = rs_comm_file_path(c, "pid", r), *text = NULL;
    size_t n;
    char host[256];
    long pid;
    if (rs_read_file(path, &text, &n) == 0 && sscanf(text, "%255s %ld", host, &pid) == 2 &&
        pid > 0) {
        c->peer_pid[r] = (pid_t)pid;
        c->peer_same_host[r] = strcmp(host, c->host) == 0;
    }
    rs_clear_error();
    free(text), free(path);
}

/* No such process, or a zombie (killed, not yet reaped by its launcher). */
static int process_gone(pid_t pid) {
    if (kill(pid, 0) != 0) return errno == ESRCH;
    char path[64], stat[512];
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(stat, 1, sizeof stat - 1, f);
    fclose(f);
    stat[n] = 0;
    const char *paren = strrchr(stat, ')'); /* "pid (name) S ...": the name may hold blanks */
    return paren && paren[1] == ' ' && paren[2] == 'Z';
}

int rs_comm_peer_gone(rs_comm *c, int r, char *why, size_t cap) {
    char *path = rs_comm_file_path(c, "exit", r), *text = NULL;
    size_t n;
    int gone = rs_read_file(path, &text, &n) == 0;
    rs_clear_error();
    free(path);
    if (gone) {
        char shown[200];
        snprintf(why, cap, "rank %d exited (%s)", r, rs_shown_text(text, shown, sizeof shown));
        free(text);
        return 1;
    }
    read_peer_pid(c, r);
    if (c->peer_pid[r] && c->peer_same_host[r] && process_gone(c->peer_pid[r])) {
        snprintf(why, cap, "rank %d (pid %ld) died", r, (long)c->peer_pid[r]);
        return 1;
    }
    path = rs_comm_file_path(c, "hb", r);
    struct stat st;
    double age = stat(path, &st) == 0
                     ? wall_now() - ((double)st.st_mtim.tv_sec + 1e-9 * (double)st.st_mtim.tv_nsec)
                     : 0;
    free(path);
    if (age > RS_COMM_HEARTBEAT_DEAD_S) {
        snprintf(why, cap, "rank %d died: no heartbeat for %.0f s", r, age);
        return 1;
    }
    return 0;
}

static void at_exit(void) {
    if (g_live && g_live->session[0]) {
        write_marker(g_live, "exit", "without finishing the job");
        g_live->heartbeat_stop = 1;
    }
}

/* ---------------------------------------------------------------- operations */

static void pause_ms(int ms) {
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* Every rank's part of operation c->seq must be of the same operation: ranks that went different
 * ways (one stopped for a checkpoint, another went on to the next step) would otherwise read
 * each other's parts as their own. */
static int check_labels(rs_comm *c, const char *mine) {
    for (int r = 0; r < c->world; r++) {
        if (r == c->rank) continue;
        char *path = op_path(c, c->seq, r), head[PART_HEADER], shown[2][100];
        FILE *f = fopen(path, "rb");
        size_t n = f ? fread(head, 1, sizeof head, f) : 0;
        if (f) fclose(f);
        free(path);
        head[PART_HEADER - 1] = 0;
        if (n == sizeof head && strncmp(head + 24, mine, LABEL_BYTES) == 0) continue;
        return RS_FAIL("rank %d of %d: operation %llu: this rank is at '%s', rank %d at '%s': the "
                       "ranks went different ways; stopping",
                       c->rank, c->world, (unsigned long long)c->seq,
                       rs_shown_text(mine, shown[0], sizeof shown[0]), r,
                       n == sizeof head ? rs_shown_text(head + 24, shown[1], sizeof shown[1])
                                        : "(unreadable)");
    }
    return 0;
}

/* Write this rank's part of the next operation and wait for every rank's. */
static int op_exchange(rs_comm *c, const void *data, size_t bytes, const char *what) {
    uint8_t head[PART_HEADER];
    c->seq++;
    memcpy(head, g_part_magic, 8);
    put_u64(head + 8, c->seq);
    put_u64(head + 16, bytes);
    memset(head + 24, 0, LABEL_BYTES);
    memcpy(head + 24, what, strnlen(what, LABEL_BYTES - 1));
    char *mine = op_path(c, c->seq, c->rank);
    int rc = write_whole(mine, head, sizeof head, data, bytes);
    free(mine);
    RS_TRY(rc);
    uint8_t *arrived = rs_calloc((size_t)c->world, 1);
    int missing = c->world;
    double t0 = rs_now(), last_check = t0;
    for (int polls = 0;; polls++) {
        for (int r = 0; r < c->world; r++) {
            if (arrived[r]) continue;
            char *p = op_path(c, c->seq, r);
            if (rs_path_exists(p)) arrived[r] = 1, missing--;
            free(p);
        }
        if (missing == 0) break;
        double now = rs_now();
        if (now - last_check >= 0.5) {
            last_check = now;
            char why[300];
            for (int r = 0; r < c->world; r++)
                if (!arrived[r] && rs_comm_peer_gone(c, r, why, sizeof why)) {
                    free(arrived);
                    return RS_FAIL("rank %d of %d: %s: %s never came (operation %llu); stopping",
                                   c->rank, c->world, why, what, (unsigned long long)c->seq);
                }
        }
        if (now - t0 >= c->timeout_s) {
            char list[256] = "";
            for (int r = 0, len = 0; r < c->world && len < 200; r++)
                if (!arrived[r])
                    len +=
                        snprintf(list + len, sizeof list - (size_t)len, "%s%d", len ? ", " : "", r);
            free(arrived);
            return RS_FAIL("rank %d of %d: rank(s) %s did not arrive at %s (operation %llu) within "
                           "%g s ([dist] timeout_s)",
                           c->rank, c->world, list, what, (unsigned long long)c->seq, c->timeout_s);
        }
        pause_ms(polls < 200 ? 1 : 10);
    }
    free(arrived);
    RS_TRY(check_labels(c, (const char *)head + 24));
    if (c->seq > 1) { /* every rank has finished reading the previous operation */
        char *old = op_path(c, c->seq - 1, c->rank);
        unlink(old);
        free(old);
    }
    return 0;
}

static int sum_parts(rs_comm *c, void *buf, size_t n, int f64, const char *what) {
    size_t elem = f64 ? sizeof(double) : sizeof(float), bytes = n * elem;
    RS_TRY(op_exchange(c, buf, bytes, what));
    uint8_t *acc = rs_malloc(bytes ? bytes : 1);
    memcpy(acc, buf, bytes); /* placeholder until rank 0's part is in */
    int rc = 0;
    for (int r = 0; r < c->world && rc == 0; r++) {
        uint8_t *part = NULL;
        size_t got = bytes;
        if (r == c->rank)
            part = buf; /* the same bytes the others read */
        else
            rc = read_part(c, r, &part, &got);
        if (rc == 0 && got != bytes)
            rc = RS_FAIL("rank %d: %s: rank %d sent %zu bytes, this rank %zu: the ranks disagree",
                         c->rank, what, r, got, bytes);
        /* in rank order, the same operations on every rank: identical bytes everywhere */
        if (rc == 0 && r == 0)
            memcpy(acc, part, bytes);
        else if (rc == 0 && f64)
            for (size_t i = 0; i < n; i++)
                ((double *)acc)[i] += ((const double *)part)[i];
        else if (rc == 0)
            for (size_t i = 0; i < n; i++)
                ((float *)acc)[i] += ((const float *)part)[i];
        if (part != buf) free(part);
    }
    if (rc == 0) memcpy(buf, acc, bytes);
    free(acc);
    return rc;
}

int rs_comm_all_reduce_sum_f32(rs_comm *c, float *buf, size_t n, const char *what) {
    return c->world == 1 ? 0 : sum_parts(c, buf, n, 0, what);
}

int rs_comm_all_reduce_sum_f64(rs_comm *c, double *buf, size_t n, const char *what) {
    return c->world == 1 ? 0 : sum_parts(c, buf, n, 1, what);
}

int rs_comm_broadcast(rs_comm *c, void *buf, size_t bytes, int root, const char *what) {
    if (c->world == 1) return 0;
    RS_TRY(op_exchange(c, buf, c->rank == root ? bytes : 0, what));
    if (c->rank == root) return 0;
    uint8_t *part;
    size_t got;
    RS_TRY(read_part(c, root, &part, &got));
    int rc = got == bytes ? 0
                          : RS_FAIL("rank %d: %s: rank %d broadcast %zu bytes, %zu expected",
                                    c->rank, what, root, got, bytes);
    if (rc == 0) memcpy(buf, part, bytes);
    free(part);
    return rc;
}

int rs_comm_barrier(rs_comm *c, const char *what) {
    return c->world == 1 ? 0 : op_exchange(c, NULL, 0, what);
}

/* Gather to rank 0 (all 0) or to every rank (all 1). */
static int gather(rs_comm *c, const void *blob, size_t bytes, void **out, size_t *sizes, int all,
                  const char *what) {
    *out = NULL;
    if (c->world == 1) {
        *out = rs_malloc(bytes ? bytes : 1);
        memcpy(*out, blob, bytes);
        sizes[0] = bytes;
        return 0;
    }
    RS_TRY(op_exchange(c, blob, bytes, what));
    if (c->rank != 0 && !all) return 0;
    uint8_t **parts = rs_calloc((size_t)c->world, sizeof *parts);
    size_t total = 0;
    int rc = 0;
    for (int r = 0; r < c->world && rc == 0; r++) {
        rc = read_part(c, r, &parts[r], &sizes[r]);
        if (rc == 0) total += sizes[r];
    }
    if (rc == 0) {
        uint8_t *packed = rs_malloc(total ? total : 1);
        for (int r = 0, at = 0; r < c->world; at += (int)sizes[r], r++)
            memcpy(packed + at, parts[r], sizes[r]);
        *out = packed;
    }
    for (int r = 0; r < c->world; r++)
        free(parts[r]);
    free(parts);
    return rc;
}

int rs_comm_gather(rs_comm *c, const void *blob, size_t bytes, void **out, size_t *sizes,
                   const char *what) {
    return gather(c, blob, bytes, out, sizes, 0, what);
}

int rs_comm_all_gather(rs_comm *c, const void *blob, size_t bytes, void **out, size_t *sizes,
                       const char *what) {
    return gather(c, blob, bytes, out, sizes, 1, what);
}

int rs_comm_all_reduce_device_f32(rs_comm *c, const rs_backend *be, float *buf, size_t n,
                                  const char *what) {
    if (n == 0) return 0;
#ifdef RS_HAVE_NCCL
    if (c->transport == RS_COMM_NCCL) return rs_comm_nccl_all_reduce(c, buf, n, what);
#endif
    if (c->world == 1) return 0;
    size_t bucket = c->bucket_bytes / sizeof(float);
    if (bucket < 1) bucket = 1;
    if (bucket > n) bucket = n;
    float *host = rs_malloc(bucket * sizeof *host);
    char label[256];
    int rc = 0;
    for (size_t at = 0; at < n && rc == 0; at += bucket) {
        size_t k = n - at < bucket ? n - at : bucket;
        be->to_host(host, buf + at, k * sizeof *host);
        snprintf(label, sizeof label, "%s [%zu, %zu)", what, at, at + k);
        rc = rs_comm_all_reduce_sum_f32(c, host, k, label);
        if (rc == 0) be->to_device(buf + at, host, k * sizeof *host);
    }
    free(host);
    return rc;
}

int rs_comm_all_reduce_device_f32_async(rs_comm *c, const rs_backend *be, float *buf, size_t n,
                                        const char *what) {
#ifdef RS_HAVE_NCCL
    if (c->transport == RS_COMM_NCCL) return n ? rs_comm_nccl_all_reduce_async(c, buf, n, what) : 0;
#endif
    return rs_comm_all_reduce_device_f32(c, be, buf, n, what);
}

int rs_comm_wait_device(rs_comm *c, const char *what) {
#ifdef RS_HAVE_NCCL
    if (c->transport == RS_COMM_NCCL) return rs_comm_nccl_wait(c, what);
#endif
    (void)c, (void)what;
    return 0;
}

/* ---------------------------------------------------------------- set-up */

int rs_comm_transport_from_name(const char *name, int *out) {
    if (strcmp(name, "auto") == 0) return *out = 0, 0;
    if (strcmp(name, "file") == 0) return *out = RS_COMM_FILE, 0;
    if (strcmp(name, "nccl") == 0) return *out = RS_COMM_NCCL, 0;
    return -1;
}

int rs_comm_have_nccl(void) {
#ifdef RS_HAVE_NCCL
    return 1;
#else
    return 0;
#endif
}

int rs_comm_rank(const rs_comm *c) { return c->rank; }
int rs_comm_world(const rs_comm *c) { return c->world; }
size_t rs_comm_bucket_bytes(const rs_comm *c) { return c->bucket_bytes; }

const char *rs_comm_transport_name(const rs_comm *c) {
    return c->world == 1 ? "none" : c->transport == RS_COMM_NCCL ? "nccl" : "file";
}

/* Rank 0 draws the session token; the others read it through <dir>/session. */
static int agree_on_session(rs_comm *c, const rs_dist *d) {
    uint8_t id[RS_DIST_ID_BYTES] = {0};
    if (c->rank == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        rs_rng g;
        rs_rng_seed(&g, (uint64_t)ts.tv_nsec ^ (uint64_t)ts.tv_sec << 30 ^ (uint64_t)getpid());
        put_u64(id, rs_rng_next(&g));
    }
    char *path = rs_path_join(c->dir, "session");
    int rc = rs_dist_id_exchange(path, d, c->id_timeout_s, id);
    free(path);
    RS_TRY(rc);
    snprintf(c->session, sizeof c->session, "%016llx", (unsigned long long)get_u64(id));
    return 0;
}

static int start_liveness(rs_comm *c) {
    char text[300];
    snprintf(text, sizeof text, "%s %ld\n", c->host, (long)getpid());
    RS_TRY(write_marker(c, "pid", text));
    char *hb = rs_comm_file_path(c, "hb", c->rank);
    FILE *f = fopen(hb, "ab");
    if (f) fclose(f);
    free(hb);
    if (pthread_create(&c->heartbeat, NULL, heartbeat_main, c) != 0)
        return RS_FAIL("rank %d: cannot start the heartbeat thread", c->rank);
    c->heartbeat_running = 1;
    g_live = c;
    static int registered;
    if (!registered) registered = 1, atexit(at_exit);
    return 0;
}

static void stop_heartbeat(rs_comm *c);

static void free_comm(rs_comm *c) {
    stop_heartbeat(c);
    if (g_live == c) g_live = NULL;
    free(c->dir), free(c->id_path), free(c->peer_pid), free(c->peer_same_host);
    free(c);
}

int rs_comm_init(rs_comm **out, const rs_dist *d, const rs_comm_options *o) {
    *out = NULL;
    rs_comm *c = rs_calloc(1, sizeof *c);
    c->transport = o->transport;
    c->rank = d->rank, c->world = d->world;
    c->timeout_s = o->timeout_s, c->id_timeout_s = o->id_timeout_s;
    c->bucket_bytes = o->bucket_bytes;
    c->dir = rs_strdup(o->dir ? o->dir : "");
    c->peer_pid = rs_calloc((size_t)d->world, sizeof *c->peer_pid);
    c->peer_same_host = rs_calloc((size_t)d->world, sizeof *c->peer_same_host);
    if (gethostname(c->host, sizeof c->host - 1) != 0) snprintf(c->host, sizeof c->host, "?");
    /* one process needs no files, except to test NCCL itself (nranks 1) */
    if (c->world == 1 && c->transport == RS_COMM_FILE) return *out = c, 0;
#ifndef RS_HAVE_NCCL
    if (c->transport == RS_COMM_NCCL) {
        free_comm(c);
        return RS_FAIL("rank %d of %d: [dist] transport = nccl, but this build has no NCCL "
                       "(the Makefile found no nccl.h: set NCCL_HOME)",
                       d->rank, d->world);
    }
#endif
    int rc = c->dir[0] ? 0 : RS_FAIL("bug: a communicator without a directory");
    if (rc == 0 && c->rank == 0 && rs_mkdir_p(c->dir) != 0)
        rc = rs_fail_context("rank 0: [dist] comm_dir");
    if (rc == 0) rc = agree_on_session(c, d);
    if (rc == 0) rc = start_liveness(c);
#ifdef RS_HAVE_NCCL
    if (rc == 0 && c->transport == RS_COMM_NCCL)
        rc = rs_comm_nccl_init(c, o->id_file, d->local_rank);
#endif
    if (rc == 0) rc = c->world > 1 ? rs_comm_barrier(c, "start-up") : 0;
    if (rc == 0 && c->rank == 0) { /* every rank has read them: no later job can mistake them */
        char *session = rs_path_join(c->dir, "session");
        unlink(session);
        free(session);
        if (c->id_path) unlink(c->id_path);
    }
    if (rc != 0) {
        rs_comm_abort(c);
        return -1;
    }
    rs_debug("comm: rank %d of %d, transport %s, session %s in %s", c->rank, c->world,
             rs_comm_transport_name(c), c->session, c->dir);
    *out = c;
    return 0;
}

/* Rank 0 at the end: every file of the session goes. */
static void remove_session_files(rs_comm *c) {
    DIR *dir = opendir(c->dir);
    if (!dir) return;
    size_t n = strlen(c->session);
    for (struct dirent *e; (e = readdir(dir)) != NULL;)
        if (strncmp(e->d_name, c->session, n) == 0 && e->d_name[n] == '.') {
            char *p = rs_path_join(c->dir, e->d_name);
            unlink(p);
            free(p);
        }
    closedir(dir);
    char *session = rs_path_join(c->dir, "session");
    unlink(session);
    free(session);
}

static void stop_heartbeat(rs_comm *c) {
    if (!c->heartbeat_running) return;
    c->heartbeat_stop = 1;
    pthread_join(c->heartbeat, NULL);
    c->heartbeat_running = 0;
}

int rs_comm_finalize(rs_comm *c) {
    if (!c) return 0;
    if (rs_comm_barrier(c, "the end of the job") != 0) {
        rs_comm_abort(c);
        return -1;
    }
    stop_heartbeat(c); /* it would make its file again */
    if (c->session[0]) {
        write_marker(c, "exit", "finished");
        if (c->rank == 0) { /* the others' exit markers say they read everything */
            double t0 = rs_now();
            for (int r = 1; r < c->world && rs_now() - t0 < c->timeout_s; r++) {
                char *p = rs_comm_file_path(c, "exit", r);
                while (!rs_path_exists(p) && rs_now() - t0 < c->timeout_s)
                    pause_ms(5);
                free(p);
            }
            remove_session_files(c);
        }
    }
#ifdef RS_HAVE_NCCL
    if (c->nccl) rs_comm_nccl_free(c, 0);
#endif
    free_comm(c);
    return 0;
}

void rs_comm_abort(rs_comm *c) {
    if (!c) return;
    if (c->dir[0] && c->session[0]) {
        char text[400], shown[300];
        snprintf(text, sizeof text, "failed: %s",
                 rs_shown_text(rs_last_error(), shown, sizeof shown));
        write_marker(c, "exit", text);
    }
#ifdef RS_HAVE_NCCL
    if (c->nccl) rs_comm_nccl_free(c, 1);
#endif
    free_comm(c);
}

static int have_gpu(void) {
#ifdef RS_HAVE_NCCL
    return rs_comm_nccl_gpus() > 0;
#else
    return 0;
#endif
}

int rs_comm_from_config(const rs_config *cfg, const rs_dist *d, const char *backend,
                        rs_comm **out) {
    rs_comm_options o = {0};
    int t;
    const char *name = rs_config_get_str(cfg, "dist", "transport");
    if (rs_comm_transport_from_name(name, &t) != 0)
        return RS_FAIL("[dist] transport: unknown transport '%s'", name);
    int gpu = strcmp(backend, "cuda") == 0 || (strcmp(backend, "auto") == 0 && have_gpu());
    if (t == 0) t = gpu && rs_comm_have_nccl() ? RS_COMM_NCCL : RS_COMM_FILE;
    if (t == RS_COMM_NCCL && !gpu)
        return RS_FAIL("[dist] transport = nccl needs the cuda backend ([model] backend is %s%s); "
                       "use transport = file for CPU ranks",
                       backend, strcmp(backend, "auto") == 0 ? " and no GPU is visible" : "");
    o.transport = d->world == 1 ? RS_COMM_FILE : (rs_comm_transport)t;
    const char *dir = rs_config_get_str(cfg, "dist", "comm_dir");
    char *def = rs_path_join(rs_config_get_str(cfg, "run", "out_dir"), ".dist");
    o.dir = dir[0] ? dir : def;
    o.id_file = rs_config_get_str(cfg, "dist", "nccl_id_file");
    o.timeout_s = rs_config_get_float(cfg, "dist", "timeout_s");
    o.id_timeout_s = rs_config_get_float(cfg, "dist", "id_timeout_s");
    o.bucket_bytes = (size_t)(rs_config_get_float(cfg, "dist", "bucket_mb") * 1048576.0);
    /* one voice: the other ranks say only warnings and errors (all of it at debug level) */
    if (d->rank != 0 && rs_get_log_level() == RS_LOG_INFO) rs_set_log_level(RS_LOG_WARN);
    int rc = rs_comm_init(out, d, &o);
    free(def);
    return rc;
}
