/* core: conversions against exact references, rng determinism, arena alignment, atomic write. */
#include "resafe/core.h"
#include "test.h"

#include <string.h>

TEST(test_bf16_round_trip_is_exact_on_bf16_values) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    for (int i = 0; i < 100000; i++) {
        uint16_t h = (uint16_t)rs_rng_next(&r);
        if ((h & 0x7f80) == 0x7f80) continue; /* inf/nan */
        float f = rs_bf16_to_f32(h);
        CHECK(rs_f32_to_bf16(f) == h, "0x%04x -> %g -> 0x%04x", h, f, rs_f32_to_bf16(f));
    }
}

TEST(test_bf16_rounds_to_nearest_even) {
    /* 1 + 2^-8 is exactly half way between 1 and the next bf16 (1 + 2^-7): ties to even (1). */
    CHECK(rs_f32_to_bf16(1.0f + 1.0f / 256) == 0x3f80, "tie should round to even");
    CHECK(rs_f32_to_bf16(1.0f + 3.0f / 256) == 0x3f82, "tie should round to even (up)");
    CHECK(rs_f32_to_bf16(1.0f + 1.0f / 256 + 1.0f / 65536) == 0x3f81, "above half rounds up");
}

TEST(test_f16_round_trip_matches_ldexp_reference) {
    /* every finite f16 bit pattern converts to its exact value and back */
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
        if (e == 31) continue;
        double ref = e == 0 ? ldexp((double)m, -24) : ldexp(1.0 + m / 1024.0, (int)e - 15);
        if (h & 0x8000) ref = -ref;
        float f = rs_f16_to_f32((uint16_t)h);
        CHECK((double)f == ref, "h=0x%04x got %g want %g", h, f, ref);
        CHECK(rs_f32_to_f16(f) == h || (m == 0 && e == 0), "h=0x%04x round trip gave 0x%04x", h,
              rs_f32_to_f16(f));
    }
}

TEST(test_rng_is_deterministic_per_seed_and_uniform) {
    rs_rng a, b;
    unsigned long long seed = rs_test_seed();
    rs_rng_seed(&a, seed);
    rs_rng_seed(&b, seed);
    double sum = 0;
    int n = 200000;
    for (int i = 0; i < n; i++) {
        float u = rs_rng_uniform(&a);
        CHECK(u == rs_rng_uniform(&b), "streams diverged at %d", i);
        CHECK(u >= 0.0f && u < 1.0f, "uniform out of range: %g", u);
        sum += u;
    }
    /* mean of n uniforms has sd 1/sqrt(12 n) ~ 6.5e-4; 6 sd */
    CHECK_NEAR(sum / n, 0.5, 0.004);
}

TEST(test_arena_allocations_are_aligned_and_disjoint) {
    rs_arena a;
    rs_arena_init(&a, 4096);
    char *p = rs_arena_alloc(&a, "a", 10), *q = rs_arena_alloc(&a, "b", 100);
    CHECK(((uintptr_t)p & 63) == 0 && ((uintptr_t)q & 63) == 0, "not 64-byte aligned");
    CHECK(q >= p + 10, "overlap");
    CHECK(a.n_entries == 2 && a.used == 64 + 128, "plan bookkeeping: %zu", a.used);
    rs_arena_free(&a);
}

TEST(test_size_overflow_is_detected) {
    size_t out;
    CHECK(rs_mul_size(SIZE_MAX / 2 + 1, 2, &out) == -1, "mul overflow missed");
    CHECK(rs_mul_size(3, 5, &out) == 0 && out == 15, "mul");
    CHECK(rs_add_size(SIZE_MAX, 1, &out) == -1, "add overflow missed");
}

TEST(test_atomic_write_leaves_no_temporary) {
    char *path = rs_path_join(rs_test_tmpdir(), "atomic.bin");
    const char msg[] = "hello";
    REQUIRE(rs_write_file_atomic(path, msg, sizeof msg) == 0, "%s", rs_last_error());
    char *data;
    size_t n;
    REQUIRE(rs_read_file(path, &data, &n) == 0, "%s", rs_last_error());
    CHECK(n == sizeof msg && memcmp(data, msg, n) == 0, "content differs");
    char *tmp = rs_tmp_name(path);
    CHECK(!rs_path_exists(tmp), "temporary left behind");
    free(tmp);
    free(data);
    free(path);
}

TEST(test_errors_name_the_file) {
    char *data;
    CHECK(rs_read_file("/nonexistent/x.json", &data, NULL) == -1, "should fail");
    CHECK(strstr(rs_last_error(), "/nonexistent/x.json") != NULL, "message: %s", rs_last_error());
}
