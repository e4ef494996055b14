/* comm's file transport between forked processes: every rank gets the rank-order float sum bit
 * for bit (checked against the same sum redone here and against float64), broadcast and the
 * gather of blobs of several sizes (0 and odd included), and a missing, dead or failed rank named
 * in one line within seconds. */
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "resafe/comm.h"
#include "resafe/core.h"
#include "test.h"

static rs_comm *open_comm(int rank, int world, const char *job, double timeout_s) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/comm-%s", rs_test_tmpdir(), job);
    rs_dist d = rs_test_dist(rank, world, job);
    rs_comm_options o = {RS_COMM_FILE, dir, "", timeout_s, 10.0, 64};
    rs_comm *c;
    if (rs_comm_init(&c, &d, &o) != 0) {
        fprintf(stderr, "rank %d: %s\n", rank, rs_last_error());
        return NULL;
    }
    return c;
}

/* Rank r's values for a buffer of n: random, of mixed signs and magnitudes (sums round). */
static void rank_values(uint64_t seed, int r, size_t n, float *out) {
    rs_rng g;
    rs_rng_seed(&g, seed * 1000003u + (uint64_t)r * 7919u + n);
    for (size_t i = 0; i < n; i++)
        out[i] = (rs_rng_uniform(&g) - 0.5f) * (float)(1 << (rs_rng_next(&g) % 12));
}

static const size_t g_sizes[] = {0, 1, 7, 1000, 4099};
#define N_SIZES (sizeof g_sizes / sizeof g_sizes[0])

/* One rank's checks: 0 when every result matched. */
static int sums_on_rank(int rank, int world, const char *job, uint64_t seed) {
    rs_comm *c = open_comm(rank, world, job, 20.0);
    if (!c) return 1;
    int bad = 0;
    for (size_t s = 0; s < N_SIZES && !bad; s++) {
        size_t n = g_sizes[s];
        float *buf = rs_malloc((n + 1) * sizeof *buf), *part = rs_malloc((n + 1) * sizeof *part);
        float *want = rs_calloc(n + 1, sizeof *want);
        double *want64 = rs_calloc(n + 1, sizeof *want64), *mag = rs_calloc(n + 1, sizeof *mag);
        rank_values(seed, rank, n, buf);
        for (int r = 0; r < world; r++) { /* the reference: the same order, fp32 and fp64 */
            rank_values(seed, r, n, part);
            for (size_t i = 0; i < n; i++) {
                want[i] = r == 0 ? part[i] : want[i] + part[i];
                want64[i] += part[i], mag[i] += fabs(part[i]);
            }
        }
        if (rs_comm_all_reduce_sum_f32(c, buf, n, "test sum") != 0) {
            fprintf(stderr, "rank %d: %s\n", rank, rs_last_error());
            bad = 1;
        }
        if (!bad && n && memcmp(buf, want, n * sizeof *buf) != 0) {
            fprintf(stderr, "rank %d: n %zu: not the rank-order fp32 sum\n", rank, n);
            bad = 1;
        }
        /* fp32 summation of world terms: |error| <= (world - 1) u sum |x| (u = 2^-24) */
        for (size_t i = 0; i < n && !bad; i++)
            if (fabs(buf[i] - want64[i]) > (world - 1) * 0x1p-24 * mag[i] * 1.0001 + 1e-30) {
                fprintf(stderr, "rank %d: [%zu] %.9g vs float64 %.17g\n", rank, i, buf[i],
                        want64[i]);
                bad = 1;
            }
        free(buf), free(part), free(want), free(want64), free(mag);
    }
    double d[3] = {rank + 0.25, -rank * 1e10, 1e-300};
    if (!bad && rs_comm_all_reduce_sum_f64(c, d, 3, "f64") != 0) bad = 1;
    double tri = world * (world - 1) / 2.0;
    if (!bad && (d[0] != tri + 0.25 * world || d[1] != -tri * 1e10 || d[2] != world * 1e-300)) {
        fprintf(stderr, "rank %d: f64 sums %g %g %g\n", rank, d[0], d[1], d[2]);
        bad = 1;
    }
    if (bad)
        rs_comm_abort(c);
    else
        bad = rs_comm_finalize(c) != 0;
    return bad;
}

/* Blobs of rank r: 3r bytes (rank 0 sends nothing), then a broadcast from the last rank. */
static int gather_on_rank(int rank, int world, const char *job) {
    rs_comm *c = open_comm(rank, world, job, 20.0);
    if (!c) return 1;
    uint8_t blob[64];
    size_t mine = (size_t)(3 * rank);
    for (size_t i = 0; i < mine; i++)
        blob[i] = (uint8_t)(rank * 16 + i);
    void *all;
    size_t sizes[16];
    int bad = rs_comm_gather(c, blob, mine, &all, sizes, "gather") != 0;
    for (int r = 0, at = 0; !bad && rank == 0 && r < world; at += 3 * r, r++) {
        bad = sizes[r] != (size_t)(3 * r);
        for (int i = 0; i < 3 * r && !bad; i++)
            bad = ((uint8_t *)all)[at + i] != r * 16 + i;
    }
    if (!bad && rank != 0) bad = all != NULL;
    free(all);
    char word[8] = "";
    if (rank == world - 1) snprintf(word, sizeof word, "last%d", world);
    if (!bad) bad = rs_comm_broadcast(c, word, sizeof word, world - 1, "broadcast") != 0;
    char want[8];
    snprintf(want, sizeof want, "last%d", world);
    if (!bad) bad = strcmp(word, want) != 0;
    if (bad) fprintf(stderr, "rank %d: gather/broadcast wrong: %s\n", rank, rs_last_error());
    if (bad)
        rs_comm_abort(c);
    else
        bad = rs_comm_finalize(c) != 0;
    return bad;
}

typedef int (*rank_fn)(int rank, int world, const char *job, uint64_t seed);

/* Runs fn on `world` forked ranks; returns how many exited 0. */
static int run_ranks(int world, const char *job, uint64_t seed, rank_fn fn) {
    pid_t pids[16];
    rs_test_tmpdir(); /* made once, before the ranks share it */
    for (int r = 0; r < world; r++) {
        pids[r] = fork();
        if (pids[r] == 0) _exit(fn(r, world, job, seed));
    }
    int ok = 0;
    for (int r = 0; r < world; r++) {
        int status;
        waitpid(pids[r], &status, 0);
        ok += WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    return ok;
}

static int gather_fn(int rank, int world, const char *job, uint64_t seed) {
    (void)seed;
    return gather_on_rank(rank, world, job);
}

TEST(test_comm_file_sum_is_the_rank_order_fp32_sum_on_every_rank) {
    uint64_t seed = rs_test_seed();
    for (int world = 2; world <= 3; world++) {
        char job[64];
        snprintf(job, sizeof job, "sum-%d-%llu", world, (unsigned long long)seed);
        CHECK(run_ranks(world, job, seed, sums_on_rank) == world, "world %d: a rank failed", world);
        /* rank 0 removed the session's files at the end */
        char dir[600], cmd[700];
        snprintf(dir, sizeof dir, "%s/comm-%s", rs_test_tmpdir(), job);
        snprintf(cmd, sizeof cmd, "test -z \"$(ls -A '%s')\"", dir);
        CHECK(system(cmd) == 0, "files left in %s", dir);
    }
}

TEST(test_comm_file_gather_and_broadcast_of_odd_sizes) {
    for (int world = 2; world <= 4; world++) {
        char job[64];
        snprintf(job, sizeof job, "gather-%d-%llu", world, (unsigned long long)rs_test_seed());
        CHECK(run_ranks(world, job, 0, gather_fn) == world, "world %d: a rank failed", world);
    }
}

TEST(test_comm_one_process_needs_no_files) {
    rs_dist d = rs_test_dist(0, 1, "single");
    rs_comm_options o = {RS_COMM_FILE, "", "", 1.0, 1.0, 64};
    rs_comm *c;
    REQUIRE(rs_comm_init(&c, &d, &o) == 0, "%s", rs_last_error());
    float x[3] = {1.5f, -2, 3};
    CHECK(rs_comm_all_reduce_sum_f32(c, x, 3, "x") == 0 && x[0] == 1.5f && x[1] == -2, "identity");
    void *all;
    size_t sizes[1];
    CHECK(rs_comm_gather(c, x, sizeof x, &all, sizes, "g") == 0 && sizes[0] == sizeof x &&
              memcmp(all, x, sizeof x) == 0,
          "gather of one");
    free(all);
    CHECK(rs_comm_finalize(c) == 0, "finalize");
}

/* ---------------------------------------------------------------- failures */

/* The surviving rank's error after `victim` does `how` (0 never starts, 1 SIGKILL after
 * start-up, 2 fails with an error); "" when it did not fail. */
static void survivor_error(int how, const char *job, char *msg, size_t cap, double *seconds) {
    int world = 3, victim = 2;
    int fds[2];
    REQUIRE(pipe(fds) == 0, "pipe");
    pid_t pids[3] = {0};
    rs_test_tmpdir();
    for (int r = 0; r < world; r++) {
        if (r == victim && how == 0) continue;
        pids[r] = fork();
        if (pids[r] != 0) continue;
        close(fds[0]);
        rs_comm *c = open_comm(r, world, job, how == 0 ? 1.5 : 30.0);
        if (c && r == victim && how == 1) raise(SIGKILL);
        if (c && r == victim && how == 2) {
            RS_FAIL("out of disk on purpose");
            rs_comm_abort(c);
            _exit(1);
        }
        float x = 1;
        int rc = c ? rs_comm_all_reduce_sum_f32(c, &x, 1, "the test's sum") : -1;
        if (rc != 0 && r == 0) {
            const char *e = rs_last_error();
            if (write(fds[1], e, strlen(e)) < 0) _exit(3);
        }
        if (rc == 0)
            rs_comm_finalize(c);
        else if (c)
            rs_comm_abort(c);
        _exit(rc == 0 ? 0 : 1);
    }
    close(fds[1]);
    double t0 = rs_now();
    /* reaped as they end: a killed rank must not linger as a zombie (a launcher reaps too) */
    while (wait(NULL) > 0)
        continue;
    *seconds = rs_now() - t0;
    ssize_t n = read(fds[0], msg, cap - 1);
    msg[n > 0 ? n : 0] = 0;
    close(fds[0]);
}

TEST(test_comm_rank_that_never_comes_is_named_after_the_timeout) {
    char msg[1024], job[64];
    double s;
    snprintf(job, sizeof job, "absent-%llu", (unsigned long long)rs_test_seed());
    survivor_error(0, job, msg, sizeof msg, &s);
    CHECK(strstr(msg, "rank(s) 2 did not arrive") && strstr(msg, "[dist] timeout_s"), "got: %s",
          msg);
    CHECK(s < 15, "took %.1f s", s);
}

TEST(test_comm_killed_rank_is_named_within_seconds) {
    char msg[1024], job[64];
    double s;
    snprintf(job, sizeof job, "killed-%llu", (unsigned long long)rs_test_seed());
    survivor_error(1, job, msg, sizeof msg, &s);
    CHECK(strstr(msg, "rank 2 (pid ") && strstr(msg, "died"), "got: %s", msg);
    CHECK(s < 10, "took %.1f s (timeout 30 s: the death was not noticed)", s);
}

TEST(test_comm_failed_rank_is_named_with_its_error) {
    char msg[1024], job[64];
    double s;
    snprintf(job, sizeof job, "failed-%llu", (unsigned long long)rs_test_seed());
    survivor_error(2, job, msg, sizeof msg, &s);
    CHECK(strstr(msg, "rank 2 exited (failed: out of disk on purpose)"), "got: %s", msg);
    CHECK(s < 10, "took %.1f s", s);
}
