/* Test runner for the C unit tests: --list, --run NAME, or no argument to run all. */
#define _XOPEN_SOURCE 700 /* nftw */
#include "test.h"
#include "resafe/dist.h"

#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_TESTS 1024
static struct {
    const char *name;
    rs_test_fn fn;
} g_tests[MAX_TESTS];
static int g_n_tests;
int rs_test_failures;

void rs_test_register(const char *name, rs_test_fn fn) {
    if (g_n_tests < MAX_TESTS) {
        g_tests[g_n_tests].name = name;
        g_tests[g_n_tests].fn = fn;
        g_n_tests++;
    }
}

unsigned long long rs_test_seed(void) {
    static unsigned long long seed;
    static int have;
    if (!have) {
        const char *s = getenv("RESAFE_TEST_SEED");
        seed = s ? strtoull(s, NULL, 10) : (unsigned long long)time(NULL) ^ ((unsigned long long)getpid() << 20);
        have = 1;
        fprintf(stderr, "seed %llu (replay with RESAFE_TEST_SEED=%llu)\n", seed, seed);
    }
    return seed;
}

rs_dist rs_test_dist(int rank, int world, const char *run_id) {
    rs_dist d;
    memset(&d, 0, sizeof d);
    d.rank = rank, d.world = world, d.local_rank = rank, d.source = "openmpi";
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    d.t_start = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    snprintf(d.run_id, sizeof d.run_id, "%s", run_id);
    return d;
}

static char g_tmpdir[256];
static pid_t g_tmpdir_owner;

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

/* The process that made the directory removes it at exit (forked ranks inherit the handler and
 * leave it alone); RESAFE_TEST_KEEP=1 keeps it for a look after a failure. */
static void remove_tmpdir(void) {
    if (!g_tmpdir[0] || getpid() != g_tmpdir_owner) return;
    const char *keep = getenv("RESAFE_TEST_KEEP");
    if (keep && strcmp(keep, "0") != 0) {
        fprintf(stderr, "kept %s\n", g_tmpdir);
        return;
    }
    nftw(g_tmpdir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

const char *rs_test_tmpdir(void) {
    if (!g_tmpdir[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(g_tmpdir, sizeof g_tmpdir, "%s/resafe_unit_XXXXXX", base ? base : "/tmp");
        if (!mkdtemp(g_tmpdir)) {
            perror("mkdtemp");
            exit(2);
        }
        g_tmpdir_owner = getpid();
        atexit(remove_tmpdir);
    }
    return g_tmpdir;
}

static int run_one(int i) {
    rs_test_failures = 0;
    g_tests[i].fn();
    printf("%s %s\n", rs_test_failures ? "FAIL" : "PASS", g_tests[i].name);
    return rs_test_failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--list") == 0) {
        for (int i = 0; i < g_n_tests; i++) printf("%s\n", g_tests[i].name);
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "--run") == 0) {
        for (int i = 0; i < g_n_tests; i++)
            if (strcmp(g_tests[i].name, argv[2]) == 0) return run_one(i);
        fprintf(stderr, "no test named %s\n", argv[2]);
        return 2;
    }
    int failed = 0;
    for (int i = 0; i < g_n_tests; i++) failed += run_one(i);
    printf("%d passed, %d failed\n", g_n_tests - failed, failed);
    return failed ? 1 : 0;
}
