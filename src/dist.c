/* dist: rank and world from the launcher's environment, and the unique id through a file. */
#include "resafe/dist.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "resafe/core.h"

/* ---------------------------------------------------------------- rank and world */

typedef struct {
    const char *source, *rank, *world, *local; /* the set's variable names */
} env_set;

static const env_set g_openmpi = {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                  "OMPI_COMM_WORLD_LOCAL_RANK"};
static const env_set g_slurm = {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"};

int rs_launcher_from_name(const char *name, rs_launcher *out) {
    static const char *names[] = {"auto", "none", "mpi", "slurm"};
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0) return *out = (rs_launcher)i, 0;
    return -1;
}

static int any_set(const env_set *s) {
    return getenv(s->rank) || getenv(s->world) || getenv(s->local);
}

/* A decimal integer 0 .. 2^31 - 1 and nothing else (no sign, blanks or suffix). */
static int parse_count(const char *name, const char *text, int *out) {
    char shown[64];
    int ok = text[0] != 0 && strlen(text) <= 10;
    for (const char *c = text; ok && *c; c++) ok = *c >= '0' && *c <= '9';
    long long v = ok ? strtoll(text, NULL, 10) : -1;
    if (!ok || v > 2147483647LL)
        return RS_FAIL("%s='%s' is not a non-negative integer", name,
                       rs_shown_text(text, shown, sizeof shown));
    *out = (int)v;
    return 0;
}

static int parse_set(const env_set *s, rs_dist *d) {
    const char *names[3] = {s->rank, s->world, s->local};
    const char *values[3];
    for (int i = 0; i < 3; i++) values[i] = getenv(names[i]);
    for (int i = 0; i < 3; i++)
        if (!values[i]) {
            int j = values[0] ? 0 : values[1] ? 1 : 2; /* name the first one that is set */
            char shown[64];
            if (!values[j])
                return RS_FAIL("%s is not set: not started by the %s launcher (%s)", names[i],
                               s->source, s == &g_openmpi ? "mpirun" : "srun");
            return RS_FAIL("%s is not set but %s=%s is: an incomplete %s environment", names[i],
                           names[j], rs_shown_text(values[j], shown, sizeof shown), s->source);
        }
    RS_TRY(parse_count(s->world, values[1], &d->world));
    RS_TRY(parse_count(s->rank, values[0], &d->rank));
    RS_TRY(parse_count(s->local, values[2], &d->local_rank));
    if (d->world < 1) return RS_FAIL("%s=%d: the world size must be at least 1", s->world, d->world);
    if (d->rank >= d->world)
        return RS_FAIL("%s=%d is outside 0 .. %d (%s=%d)", s->rank, d->rank, d->world - 1, s->world,
                       d->world);
    if (d->local_rank >= d->world)
        return RS_FAIL("%s=%d is outside 0 .. %d (%s=%d)", s->local, d->local_rank, d->world - 1,
                       s->world, d->world);
    d->source = s->source;
    return 0;
}

/* The job's identity: the first of these variables that is set (see dist.h). */
static void read_run_id(rs_dist *d) {
    const char *own = getenv("RESAFE_RUN_ID"), *job = getenv("SLURM_JOB_ID");
    const char *step = getenv("SLURM_STEP_ID"), *pmix = getenv("PMIX_NAMESPACE");
    const char *ompi = getenv("OMPI_MCA_ess_base_jobid");
    int mpi = strcmp(d->source, "openmpi") == 0;
    if (own) snprintf(d->run_id, sizeof d->run_id, "%s", own);
    else if (mpi && pmix) snprintf(d->run_id, sizeof d->run_id, "%s", pmix);
    else if (mpi && ompi) snprintf(d->run_id, sizeof d->run_id, "%s", ompi);
    else if (job) snprintf(d->run_id, sizeof d->run_id, "slurm-%s.%s", job, step ? step : "");
}

static double wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int rs_dist_from_env(rs_launcher launcher, rs_dist *d) {
    memset(d, 0, sizeof *d);
    d->world = 1;
    d->source = "single";
    d->t_start = wall_now();
    int rc = 0;
    if (launcher == RS_LAUNCHER_MPI) rc = parse_set(&g_openmpi, d);
    else if (launcher == RS_LAUNCHER_SLURM) rc = parse_set(&g_slurm, d);
    else if (launcher == RS_LAUNCHER_AUTO && any_set(&g_openmpi)) rc = parse_set(&g_openmpi, d);
    else if (launcher == RS_LAUNCHER_AUTO && any_set(&g_slurm) && getenv("SLURM_STEP_ID"))
        rc = parse_set(&g_slurm, d);
    if (rc != 0) {
        d->rank = 0, d->world = 1, d->local_rank = 0, d->source = "single";
        return -1;
    }
    read_run_id(d);
    return 0;
}

int rs_dist_from_config(const rs_config *cfg, rs_dist *d) {
    rs_launcher launcher;
    if (rs_launcher_from_name(rs_config_get_str(cfg, "dist", "launcher"), &launcher) != 0)
        return RS_FAIL("[dist] launcher: unknown launcher '%s'",
                       rs_config_get_str(cfg, "dist", "launcher"));
    if (rs_dist_from_env(launcher, d) != 0) return rs_fail_context("[dist] launcher = %s",
                                                                  rs_config_get_str(cfg, "dist",
                                                                                    "launcher"));
    return 0;
}

const char *rs_dist_describe(const rs_dist *d, char *buf, int cap) {
    snprintf(buf, (size_t)cap, "rank %d of %d (%s, local rank %d)", d->rank, d->world, d->source,
             d->local_rank);
    return buf;
}

int rs_dist_require_single(const rs_dist *d, const char *command) {
    if (d->world == 1) return 0;
    return RS_FAIL("rank %d of %d (%s): resafe %s does not run data parallel (resafe dpo, "
                   "triplets and eval do); start it as one process", d->rank, d->world, d->source,
                   command);
}

/* ---------------------------------------------------------------- unique id through a file */

static const char g_magic[8] = {'R', 'S', 'D', 'I', 'S', 'T', 'I', 'D'};

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int rs_dist_id_publish(const char *path, const rs_dist *d, const uint8_t id[RS_DIST_ID_BYTES]) {
    uint8_t buf[RS_DIST_ID_FILE_BYTES] = {0};
    memcpy(buf, g_magic, 8);
    put_u32(buf + 8, 1);
    put_u32(buf + 12, (uint32_t)d->world);
    memcpy(buf + 16, d->run_id, strnlen(d->run_id, RS_DIST_RUN_ID));
    memcpy(buf + 16 + RS_DIST_RUN_ID, id, RS_DIST_ID_BYTES);
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return RS_FAIL("[dist] nccl_id_file: path too long: %s", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return RS_FAIL("rank %d: cannot write %s: %s", d->rank, tmp, strerror(errno));
    int ok = fwrite(buf, 1, sizeof buf, f) == sizeof buf && fflush(f) == 0 && fsync(fileno(f)) == 0;
    int err = errno; /* of the first failure */
    if (fclose(f) != 0 && ok) ok = 0, err = errno;
    if (ok && rename(tmp, path) != 0) ok = 0, err = errno;
    if (ok) return 0;
    unlink(tmp);
    return RS_FAIL("rank %d: cannot write %s: %s", d->rank, path, strerror(err));
}

typedef enum { ID_NONE, ID_OURS, ID_STALE, ID_FAIL } id_state;

/* Read path once: ID_OURS with the id, ID_NONE when absent, ID_STALE with why in note, or
 * ID_FAIL + message when it is this job's file but for another world size. */
static id_state read_id_file(const char *path, const rs_dist *d, uint8_t *id, char *note, int cap) {
    FILE *f = fopen(path, "rb");
    if (!f) return ID_NONE;
    uint8_t buf[RS_DIST_ID_FILE_BYTES + 1];
    size_t n = fread(buf, 1, sizeof buf, f);
    struct stat st;
    int have_stat = fstat(fileno(f), &st) == 0;
    fclose(f);
    if (n != RS_DIST_ID_FILE_BYTES || memcmp(buf, g_magic, 8) != 0 || get_u32(buf + 8) != 1) {
        snprintf(note, (size_t)cap, "%s is not a resafe id file (%zu bytes)", path, n);
        return ID_STALE;
    }
    char run_id[RS_DIST_RUN_ID + 1] = {0}, shown[64], ours[64];
    memcpy(run_id, buf + 16, RS_DIST_RUN_ID);
    if (strcmp(run_id, d->run_id) != 0) {
        snprintf(note, (size_t)cap, "%s is from another job (run id '%s', ours '%s')", path,
                 rs_shown_text(run_id, shown, sizeof shown),
                 rs_shown_text(d->run_id, ours, sizeof ours));
        return ID_STALE;
    }
    double mtime = have_stat ? (double)st.st_mtim.tv_sec + 1e-9 * (double)st.st_mtim.tv_nsec : 0;
    if (!d->run_id[0] && mtime < d->t_start - RS_DIST_ID_STALE_S) {
        snprintf(note, (size_t)cap,
                 "%s is older than this job (written %.0f s before it started; no run id: set "
                 "RESAFE_RUN_ID to tell jobs apart)", path, d->t_start - mtime);
        return ID_STALE;
    }
    if (get_u32(buf + 12) != (uint32_t)d->world) {
        RS_FAIL("rank %d of %d: %s was written by a rank 0 of world size %u: the ranks disagree "
                "on the world size", d->rank, d->world, path, get_u32(buf + 12));
        return ID_FAIL;
    }
    memcpy(id, buf + 16 + RS_DIST_RUN_ID, RS_DIST_ID_BYTES);
    return ID_OURS;
}

int rs_dist_id_wait(const char *path, const rs_dist *d, double timeout_s,
                    uint8_t id[RS_DIST_ID_BYTES]) {
    char note[768] = "";
    double t0 = rs_now();
    for (;;) {
        id_state s = read_id_file(path, d, id, note, sizeof note);
        if (s == ID_OURS) return 0;
        if (s == ID_FAIL) return -1;
        if (rs_now() - t0 >= timeout_s) break;
        struct timespec pause = {0, 50 * 1000 * 1000}; /* 50 ms: cheap on a shared filesystem */
        nanosleep(&pause, NULL);
    }
    return RS_FAIL("rank %d of %d: no unique id from rank 0 in %s after %g s ([dist] "
                   "id_timeout_s)%s%s; is the path on a filesystem every rank shares, and did rank "
                   "0 start?", d->rank, d->world, path, timeout_s, note[0] ? ": " : "", note);
}

int rs_dist_id_exchange(const char *path, const rs_dist *d, double timeout_s,
                        uint8_t id[RS_DIST_ID_BYTES]) {
    if (d->rank == 0) return rs_dist_id_publish(path, d, id);
    return rs_dist_id_wait(path, d, timeout_s, id);
}
