/* Minimal test registry for the C unit tests. Each TEST registers itself at load time;
 * build/test_unit --list prints the names, --run NAME runs one (tests/run.py runs each
 * as its own process, so a crash fails one test, not the suite). */
#ifndef RESAFE_TEST_H
#define RESAFE_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "resafe/dist.h"

typedef void (*rs_test_fn)(void);
void rs_test_register(const char *name, rs_test_fn fn);
extern int rs_test_failures;
/* Seed for random inputs: RESAFE_TEST_SEED or the clock; printed so a failure can be replayed. */
unsigned long long rs_test_seed(void);
/* Directory for scratch files of this test run (created, unique per process). */
const char *rs_test_tmpdir(void);
/* The rank of an OpenMPI-launched job as rs_dist_init would see it (start time now). */
rs_dist rs_test_dist(int rank, int world, const char *run_id);

#define TEST(name)                                                                                 \
    static void name(void);                                                                        \
    __attribute__((constructor)) static void register_##name(void) {                               \
        rs_test_register(#name, name);                                                             \
    }                                                                                              \
    static void name(void)

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);              \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            rs_test_failures++;                                                                    \
        }                                                                                          \
    } while (0)

#define REQUIRE(cond, ...)                                                                         \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: requirement failed: %s: ", __FILE__, __LINE__, #cond);        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            rs_test_failures++;                                                                    \
            return;                                                                                \
        }                                                                                          \
    } while (0)

/* |a - b| <= tol, with NaN always failing. */
#define CHECK_NEAR(a, b, tol)                                                                      \
    do {                                                                                           \
        double a_ = (double)(a), b_ = (double)(b);                                                 \
        if (!(fabs(a_ - b_) <= (tol)))                                                             \
            CHECK(0, "%s = %.9g, %s = %.9g, tolerance %g", #a, a_, #b, b_, (double)(tol));         \
    } while (0)

#endif
