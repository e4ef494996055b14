/* dist and shard: rank parsing, batch and prompt shards, resume on another world size, and the
 * unique-id exchange through a file between forked processes. */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "resafe/core.h"
#include "resafe/dist.h"
#include "resafe/shard.h"
#include "resafe/train.h"
#include "test.h"

/* ---------------------------------------------------------------- rank parsing */

static const char *g_vars[] = {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                               "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                               "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_JOB_ID", "RESAFE_RUN_ID",
                               "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid"};

static void clear_env(void) {
    for (size_t i = 0; i < sizeof g_vars / sizeof *g_vars; i++) unsetenv(g_vars[i]);
}

static void set_ompi(const char *rank, const char *world, const char *local) {
    if (rank) setenv("OMPI_COMM_WORLD_RANK", rank, 1);
    if (world) setenv("OMPI_COMM_WORLD_SIZE", world, 1);
    if (local) setenv("OMPI_COMM_WORLD_LOCAL_RANK", local, 1);
}

static void set_slurm(const char *rank, const char *world, const char *local, const char *step) {
    if (rank) setenv("SLURM_PROCID", rank, 1);
    if (world) setenv("SLURM_NTASKS", world, 1);
    if (local) setenv("SLURM_LOCALID", local, 1);
    if (step) setenv("SLURM_STEP_ID", step, 1);
}

static int is_dist(const rs_dist *d, int rank, int world, int local, const char *source) {
    return d->rank == rank && d->world == world && d->local_rank == local &&
           strcmp(d->source, source) == 0;
}

TEST(test_dist_ranks_from_each_launcher_and_openmpi_wins_over_slurm) {
    rs_dist d;
    clear_env();
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(is_dist(&d, 0, 1, 0, "single"), "no launcher: rank %d of %d", d.rank, d.world);

    set_ompi("3", "4", "1");
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(is_dist(&d, 3, 4, 1, "openmpi"), "openmpi: %d %d %d %s", d.rank, d.world, d.local_rank,
          d.source);
    /* mpirun inside a SLURM allocation: the OMPI variables describe the ranks */
    set_slurm("0", "1", "0", "0");
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(is_dist(&d, 3, 4, 1, "openmpi"), "both set: source %s", d.source);
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_SLURM, &d) == 0, "%s", rs_last_error());
    CHECK(is_dist(&d, 0, 1, 0, "slurm"), "launcher slurm: source %s", d.source);
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_NONE, &d) == 0, "%s", rs_last_error());
    CHECK(is_dist(&d, 0, 1, 0, "single"), "launcher none: source %s", d.source);

    clear_env();
    set_slurm("5", "8", "1", "0");
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(is_dist(&d, 5, 8, 1, "slurm"), "slurm: %d %d %d %s", d.rank, d.world, d.local_rank,
          d.source);
    /* the batch script itself (no srun step): one process, not rank 0 of 8 */
    unsetenv("SLURM_STEP_ID");
    setenv("SLURM_PROCID", "0", 1);
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(is_dist(&d, 0, 1, 0, "single"), "batch step: source %s world %d", d.source, d.world);
    clear_env();
}

TEST(test_dist_launcher_names) {
    rs_launcher l;
    CHECK(rs_launcher_from_name("auto", &l) == 0 && l == RS_LAUNCHER_AUTO, "auto");
    CHECK(rs_launcher_from_name("mpi", &l) == 0 && l == RS_LAUNCHER_MPI, "mpi");
    CHECK(rs_launcher_from_name("slurm", &l) == 0 && l == RS_LAUNCHER_SLURM, "slurm");
    CHECK(rs_launcher_from_name("none", &l) == 0 && l == RS_LAUNCHER_NONE, "none");
    CHECK(rs_launcher_from_name("pbs", &l) == -1, "pbs");
}

/* One malformed environment: the call fails, leaves one process, and its one-line message
 * contains every `want` fragment. */
static void check_bad(rs_launcher launcher, const char *want1, const char *want2) {
    rs_dist d;
    int rc = rs_dist_from_env(launcher, &d);
    const char *msg = rs_last_error();
    CHECK(rc == -1, "accepted (want an error with '%s')", want1);
    CHECK(strstr(msg, want1) && (!want2 || strstr(msg, want2)), "message '%s' lacks '%s' / '%s'",
          msg, want1, want2 ? want2 : "");
    CHECK(!strchr(msg, '\n'), "message spans lines: %s", msg);
    CHECK(d.world == 1 && d.rank == 0, "failed parse left rank %d of %d", d.rank, d.world);
}

TEST(test_dist_malformed_environments_are_one_line_naming_the_variable) {
    static const struct {
        const char *rank, *world, *local, *want1, *want2;
    } cases[] = {
        {"x", "4", "0", "OMPI_COMM_WORLD_RANK", "'x'"},
        {"1", "four", "0", "OMPI_COMM_WORLD_SIZE", "'four'"},
        {"1", "4", "-1", "OMPI_COMM_WORLD_LOCAL_RANK", "'-1'"},
        {"1", " 4", "0", "OMPI_COMM_WORLD_SIZE", "' 4'"},
        {"1", "4x", "0", "OMPI_COMM_WORLD_SIZE", "'4x'"},
        {"", "4", "0", "OMPI_COMM_WORLD_RANK", "''"},
        {"1", "99999999999", "0", "OMPI_COMM_WORLD_SIZE", "99999999999"},
        {"4", "4", "0", "OMPI_COMM_WORLD_RANK=4", "outside 0 .. 3"},
        {"0", "0", "0", "OMPI_COMM_WORLD_SIZE=0", "at least 1"},
        {"1", "2", "2", "OMPI_COMM_WORLD_LOCAL_RANK=2", "outside 0 .. 1"},
        {"1", NULL, "0", "OMPI_COMM_WORLD_SIZE is not set", "OMPI_COMM_WORLD_RANK=1"},
        {NULL, "2", "0", "OMPI_COMM_WORLD_RANK is not set", "OMPI_COMM_WORLD_SIZE=2"},
        {"1", "2", NULL, "OMPI_COMM_WORLD_LOCAL_RANK is not set", "incomplete"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        clear_env();
        set_ompi(cases[i].rank, cases[i].world, cases[i].local);
        check_bad(RS_LAUNCHER_AUTO, cases[i].want1, cases[i].want2);
        /* the same values as SLURM's, inside an srun step */
        clear_env();
        set_slurm(cases[i].rank, cases[i].world, cases[i].local, "0");
        char want1[128];
        snprintf(want1, sizeof want1, "%s", cases[i].want1);
        const char *from[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_RANK",
                              "OMPI_COMM_WORLD_SIZE"};
        const char *to[] = {"SLURM_LOCALID", "SLURM_PROCID", "SLURM_NTASKS"};
        for (int k = 0; k < 3; k++)
            if (strncmp(want1, from[k], strlen(from[k])) == 0) {
                char rest[128];
                snprintf(rest, sizeof rest, "%s", want1 + strlen(from[k]));
                snprintf(want1, sizeof want1, "%s%s", to[k], rest);
                break;
            }
        check_bad(RS_LAUNCHER_AUTO, want1, strstr(cases[i].want2, "OMPI") ? NULL : cases[i].want2);
    }
    /* a launcher that was asked for but did not start us */
    clear_env();
    check_bad(RS_LAUNCHER_MPI, "OMPI_COMM_WORLD_RANK is not set", "mpirun");
    check_bad(RS_LAUNCHER_SLURM, "SLURM_PROCID is not set", "srun");
    clear_env();
}

TEST(test_dist_world_above_one_is_refused_by_a_single_process_command_naming_rank_and_world) {
    clear_env();
    set_ompi("1", "2", "1");
    rs_dist d;
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(rs_dist_require_single(&d, "sft") == -1, "world 2 accepted");
    const char *msg = rs_last_error();
    CHECK(strstr(msg, "rank 1 of 2 (openmpi)") && strstr(msg, "resafe sft does not run data parallel"), "%s", msg);
    clear_env();
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(rs_dist_require_single(&d, "sft") == 0, "one process refused: %s", rs_last_error());
}

TEST(test_dist_run_id_from_the_launcher) {
    clear_env();
    set_slurm("0", "2", "0", "3");
    setenv("SLURM_JOB_ID", "777", 1);
    rs_dist d;
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(strcmp(d.run_id, "slurm-777.3") == 0, "slurm run id '%s'", d.run_id);
    set_ompi("0", "2", "0");
    setenv("PMIX_NAMESPACE", "prterun-host-123@1", 1);
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(strcmp(d.run_id, "prterun-host-123@1") == 0, "openmpi run id '%s'", d.run_id);
    setenv("RESAFE_RUN_ID", "mine", 1);
    REQUIRE(rs_dist_from_env(RS_LAUNCHER_AUTO, &d) == 0, "%s", rs_last_error());
    CHECK(strcmp(d.run_id, "mine") == 0, "RESAFE_RUN_ID run id '%s'", d.run_id);
    clear_env();
}

/* ---------------------------------------------------------------- batch shards */

TEST(test_batch_shards_cover_every_index_once_contiguous_in_rank_order) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    for (int trial = 0; trial < 2000; trial++) {
        int n = 1 + (int)(rs_rng_next(&rng) % 300);
        int world = 1 + (int)(rs_rng_next(&rng) % (uint64_t)n);
        int next = 0, lo = n, hi = 0;
        for (int r = 0; r < world; r++) {
            rs_shard s;
            REQUIRE(rs_batch_shard(n, world, r, &s) == 0, "%s", rs_last_error());
            CHECK(s.first == next, "n %d world %d rank %d starts at %d, want %d", n, world, r,
                  s.first, next);
            next = s.first + s.count;
            lo = s.count < lo ? s.count : lo, hi = s.count > hi ? s.count : hi;
        }
        CHECK(next == n, "n %d world %d: shards end at %d", n, world, next);
        CHECK(lo >= 1 && hi - lo <= 1, "n %d world %d: shard sizes %d .. %d", n, world, lo, hi);
    }
}

TEST(test_batch_shard_refuses_more_ranks_than_entries) {
    rs_shard s;
    CHECK(rs_batch_shard(3, 4, 3, &s) == -1, "3 entries over 4 ranks accepted");
    CHECK(strstr(rs_last_error(), "3") && strstr(rs_last_error(), "4 ranks"), "%s",
          rs_last_error());
    CHECK(rs_batch_shard(3, 2, 2, &s) == -1, "rank 2 of 2 accepted");
    CHECK(rs_batch_check_world(8, 100, 4, "[dpo] batch_size") == 0, "8 over 4 refused");
    CHECK(rs_batch_check_world(2, 100, 4, "[dpo] batch_size") == -1, "2 over 4 accepted");
    CHECK(strstr(rs_last_error(), "[dpo] batch_size >= 4"), "%s", rs_last_error());
    CHECK(rs_batch_check_world(8, 3, 4, "[dpo] batch_size") == -1, "3 examples over 4 accepted");
}

TEST(test_shard_weights_make_the_sum_of_rank_means_the_global_mean) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed() + 1);
    for (int trial = 0; trial < 200; trial++) {
        int n = 1 + (int)(rs_rng_next(&rng) % 64);
        int world = 1 + (int)(rs_rng_next(&rng) % (uint64_t)n);
        double x[64], global = 0, reduced = 0;
        for (int i = 0; i < n; i++) global += (x[i] = rs_rng_normal(&rng)) / n;
        for (int r = 0; r < world; r++) {
            rs_shard s;
            REQUIRE(rs_batch_shard(n, world, r, &s) == 0, "%s", rs_last_error());
            double mean = 0;
            for (int i = 0; i < s.count; i++) mean += x[s.first + i] / s.count;
            reduced += rs_shard_weight(s.count, n) * mean;
        }
        /* a few roundings of O(1) numbers */
        CHECK_NEAR(reduced, global, 1e-12);
    }
}

/* The global batch a job of `world` ranks trains on at one step: every rank draws it from its own
 * copy of the order and takes its slice; the slices in rank order are the batch. */
static int world_step(rs_data_order *orders, int world, int batch_size, int32_t *global) {
    int32_t buf[512];
    int n = 0, want = 0;
    for (int r = 0; r < world; r++) {
        want = rs_data_order_next(&orders[r], batch_size, buf);
        rs_shard s;
        if (rs_batch_shard(want, world, r, &s) != 0) return -1;
        memcpy(global + s.first, buf + s.first, (size_t)s.count * sizeof *global);
        n += s.count;
    }
    return n == want ? n : -1;
}

/* What a checkpoint keeps of the order (order/perm, order/rng, epoch, cursor) and nothing
 * about the world size. */
static void restore_order(rs_data_order *to, const rs_data_order *from) {
    memcpy(to->perm, from->perm, (size_t)from->n * sizeof *to->perm);
    to->rng = from->rng, to->epoch = from->epoch, to->cursor = from->cursor;
}

TEST(test_resume_at_another_world_size_gives_the_same_global_batches) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed() + 2);
    for (int trial = 0; trial < 100; trial++) {
        int n = 4 + (int)(rs_rng_next(&rng) % 200);
        int bs = 4 + (int)(rs_rng_next(&rng) % 60);
        int k = (int)(rs_rng_next(&rng) % 40), steps = k + 1 + (int)(rs_rng_next(&rng) % 40);
        uint64_t seed = rs_rng_next(&rng);
        int worlds[3] = {1, 4, 1 + (int)(rs_rng_next(&rng) % 4)};
        /* reference: one process, uninterrupted */
        rs_data_order ref;
        rs_data_order_init(&ref, n, seed);
        int32_t want[64], got[64];
        int32_t(*ref_batches)[64] = rs_malloc((size_t)steps * sizeof *ref_batches);
        for (int s = 0; s < steps; s++) rs_data_order_next(&ref, bs, ref_batches[s]);
        /* world 2 for k steps, then a checkpoint */
        rs_data_order two[2], saved;
        for (int r = 0; r < 2; r++) rs_data_order_init(&two[r], n, seed);
        for (int s = 0; s < k; s++) {
            int m = world_step(two, 2, bs, got);
            REQUIRE(m > 0, "world 2 step %d: %s", s, rs_last_error());
            CHECK(memcmp(got, ref_batches[s], (size_t)m * sizeof *got) == 0,
                  "world 2 step %d differs (n %d bs %d)", s, n, bs);
        }
        rs_data_order_init(&saved, n, 0);
        restore_order(&saved, &two[0]);
        /* resume at worlds 1, 4 and a random one: the same global batches as the reference */
        for (int w = 0; w < 3; w++) {
            rs_data_order ranks[4];
            for (int r = 0; r < worlds[w]; r++) {
                rs_data_order_init(&ranks[r], n, seed ^ 0xdead); /* overwritten by the restore */
                restore_order(&ranks[r], &saved);
            }
            for (int s = k; s < steps; s++) {
                int m = world_step(ranks, worlds[w], bs, got);
                memcpy(want, ref_batches[s], sizeof want);
                REQUIRE(m > 0, "world %d step %d: %s", worlds[w], s, rs_last_error());
                CHECK(memcmp(got, want, (size_t)m * sizeof *got) == 0,
                      "resumed at world %d after %d steps at world 2: step %d differs (n %d bs %d)",
                      worlds[w], k, s, n, bs);
            }
            for (int r = 0; r < worlds[w]; r++) rs_data_order_free(&ranks[r]);
        }
        for (int r = 0; r < 2; r++) rs_data_order_free(&two[r]);
        rs_data_order_free(&saved);
        rs_data_order_free(&ref);
        free(ref_batches);
    }
}

/* ---------------------------------------------------------------- chunk shards */

/* Rank r's chunks by the definition, counted rather than computed: chunk j belongs to the
 * rank r with floor(r c / world) <= j < floor((r + 1) c / world). */
static int chunk_owner(int j, int c, int world) {
    int owner = -1;
    for (int r = 0; r < world; r++)
        if ((int64_t)r * c / world <= j && j < (int64_t)(r + 1) * c / world) owner = r;
    return owner;
}

TEST(test_chunk_shards_are_whole_chunks_in_rank_order_covering_every_item_once) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed() + 5);
    for (int trial = 0; trial < 500; trial++) {
        int n = (int)(rs_rng_next(&rng) % 300), chunk = 1 + (int)(rs_rng_next(&rng) % 9);
        int world = 1 + (int)(rs_rng_next(&rng) % 12), c = (n + chunk - 1) / chunk;
        int at = 0, lo = c, hi = 0;
        for (int r = 0; r < world; r++) {
            rs_shard s;
            rs_chunk_shard(n, chunk, world, r, &s);
            REQUIRE(s.first == at && s.count >= 0, "n %d chunk %d world %d rank %d: [%d, +%d) "
                    "after %d", n, chunk, world, r, s.first, s.count, at);
            CHECK(s.count == 0 || s.first % chunk == 0, "rank %d starts inside a chunk", r);
            CHECK(s.count % chunk == 0 || s.first + s.count == n, "rank %d ends inside a chunk", r);
            int mine = (s.count + chunk - 1) / chunk;
            lo = mine < lo ? mine : lo, hi = mine > hi ? mine : hi;
            for (int i = s.first; i < s.first + s.count; i++)
                CHECK(chunk_owner(i / chunk, c, world) == r, "item %d on rank %d", i, r);
            at += s.count;
        }
        CHECK(at == n, "n %d chunk %d world %d: %d items dealt", n, chunk, world, at);
        CHECK(hi - lo <= 1 || c == 0, "n %d chunk %d world %d: %d .. %d chunks", n, chunk, world,
              lo, hi);
    }
}

/* ---------------------------------------------------------------- prompt shards */

TEST(test_prompt_shards_cover_every_prompt_once_and_the_gather_restores_the_order) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed() + 3);
    for (int trial = 0; trial < 500; trial++) {
        int n = (int)(rs_rng_next(&rng) % 400), world = 1 + (int)(rs_rng_next(&rng) % 16);
        int *seen = calloc((size_t)n + 1, sizeof *seen);
        int64_t *packed = rs_malloc(((size_t)n + 1) * sizeof *packed);
        int64_t *out = rs_malloc(((size_t)n + 1) * sizeof *out);
        int at = 0, lo = n, hi = 0;
        for (int r = 0; r < world; r++) {
            int c = rs_prompt_shard_count(n, world, r);
            lo = c < lo ? c : lo, hi = c > hi ? c : hi;
            for (int j = 0; j < c; j++) {
                int i = rs_prompt_global_index(world, r, j);
                REQUIRE(i >= 0 && i < n, "rank %d prompt %d -> %d of %d", r, j, i, n);
                seen[i]++;
                CHECK(rs_prompt_packed_slot(n, world, i) == at, "slot of %d is %d, want %d", i,
                      rs_prompt_packed_slot(n, world, i), at);
                packed[at++] = 1000003LL * i + 7; /* rank r's result for prompt i */
            }
        }
        CHECK(at == n, "n %d world %d: %d prompts dealt", n, world, at);
        CHECK(n == 0 || hi - lo <= 1, "n %d world %d: counts %d .. %d", n, world, lo, hi);
        for (int i = 0; i < n; i++) CHECK(seen[i] == 1, "prompt %d dealt %d times", i, seen[i]);
        rs_prompt_gather(n, world, sizeof *packed, packed, out);
        for (int i = 0; i < n; i++)
            CHECK(out[i] == 1000003LL * i + 7, "gathered %d holds %lld", i, (long long)out[i]);
        free(seen), free(packed), free(out);
    }
}

/* ---------------------------------------------------------------- id exchange through a file */

static void random_id(uint8_t *id, uint64_t seed) {
    rs_rng rng;
    rs_rng_seed(&rng, seed);
    for (int i = 0; i < RS_DIST_ID_BYTES; i++) id[i] = (uint8_t)rs_rng_next(&rng);
}

/* Forks world - 1 waiting ranks, publishes as rank 0 after a pause (they poll meanwhile), and
 * returns how many of them exited 0 (received exactly the id). */
static int exchange_with_children(const char *path, int world, const char *run_id,
                                  double timeout_s, uint64_t seed) {
    uint8_t id[RS_DIST_ID_BYTES];
    random_id(id, seed);
    pid_t pids[16];
    for (int r = 1; r < world; r++) {
        pids[r] = fork();
        if (pids[r] == 0) {
            rs_dist d = rs_test_dist(r, world, run_id);
            uint8_t got[RS_DIST_ID_BYTES];
            int rc = rs_dist_id_exchange(path, &d, timeout_s, got);
            if (rc != 0) fprintf(stderr, "child: %s\n", rs_last_error());
            _exit(rc == 0 && memcmp(got, id, sizeof id) == 0 ? 0 : 1);
        }
    }
    struct timespec pause = {0, 200 * 1000 * 1000};
    nanosleep(&pause, NULL);
    rs_dist d0 = rs_test_dist(0, world, run_id);
    if (rs_dist_id_exchange(path, &d0, timeout_s, id) != 0)
        fprintf(stderr, "rank 0: %s\n", rs_last_error());
    int ok = 0;
    for (int r = 1; r < world; r++) {
        int status;
        waitpid(pids[r], &status, 0);
        ok += WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    return ok;
}

TEST(test_id_file_reaches_every_rank_and_leaves_no_temporary) {
    char path[512];
    snprintf(path, sizeof path, "%s/nccl_id_ok", rs_test_tmpdir());
    uint64_t seed = rs_test_seed() + 4;
    int world = 2 + (int)(seed % 6);
    CHECK(exchange_with_children(path, world, "job-1", 10.0, seed) == world - 1,
          "not every one of %d ranks got the id", world - 1);
    /* the next job (another run id) over the same path: the old file is not taken for its id */
    CHECK(exchange_with_children(path, world, "job-2", 10.0, seed + 1) == world - 1,
          "second job: not every rank got its own id");
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    CHECK(access(tmp, F_OK) != 0, "temporary %s left behind", tmp);
}

TEST(test_id_wait_times_out_naming_rank_path_and_timeout) {
    char path[512];
    snprintf(path, sizeof path, "%s/nccl_id_missing", rs_test_tmpdir());
    rs_dist d = rs_test_dist(3, 4, "job-1");
    uint8_t id[RS_DIST_ID_BYTES];
    double t0 = rs_now();
    CHECK(rs_dist_id_wait(path, &d, 0.3, id) == -1, "no file, yet an id");
    double took = rs_now() - t0;
    /* 50 ms polls: at most one poll and some scheduling late */
    CHECK(took >= 0.3 && took < 2.0, "waited %.3f s for a 0.3 s timeout", took);
    const char *msg = rs_last_error();
    CHECK(strstr(msg, "rank 3 of 4") && strstr(msg, path) && strstr(msg, "0.3 s"), "%s", msg);
}

TEST(test_id_wait_ignores_a_stale_file_of_another_job_or_an_old_one) {
    char path[512];
    snprintf(path, sizeof path, "%s/nccl_id_stale", rs_test_tmpdir());
    uint8_t id[RS_DIST_ID_BYTES], got[RS_DIST_ID_BYTES];
    random_id(id, rs_test_seed() + 5);
    rs_dist old = rs_test_dist(0, 2, "job-old"), now = rs_test_dist(1, 2, "job-new");
    REQUIRE(rs_dist_id_publish(path, &old, id) == 0, "%s", rs_last_error());
    CHECK(rs_dist_id_wait(path, &now, 0.2, got) == -1, "took another job's id");
    CHECK(strstr(rs_last_error(), "another job") && strstr(rs_last_error(), "job-old"), "%s",
          rs_last_error());
    /* no run id on either side: the file's age decides */
    rs_dist old0 = rs_test_dist(0, 2, ""), now1 = rs_test_dist(1, 2, "");
    REQUIRE(rs_dist_id_publish(path, &old0, id) == 0, "%s", rs_last_error());
    CHECK(rs_dist_id_wait(path, &now1, 1.0, got) == 0 && memcmp(got, id, sizeof id) == 0,
          "fresh file without run id refused: %s", rs_last_error());
    struct timespec times[2] = {{time(NULL) - 3600, 0}, {time(NULL) - 3600, 0}};
    REQUIRE(utimensat(AT_FDCWD, path, times, 0) == 0, "utimensat");
    CHECK(rs_dist_id_wait(path, &now1, 0.2, got) == -1, "took an hour-old id");
    CHECK(strstr(rs_last_error(), "older than this job"), "%s", rs_last_error());
    /* this job's file for another world size: an error at once */
    rs_dist three = rs_test_dist(0, 3, "job-new");
    REQUIRE(rs_dist_id_publish(path, &three, id) == 0, "%s", rs_last_error());
    double t0 = rs_now();
    CHECK(rs_dist_id_wait(path, &now, 30.0, got) == -1, "world 3's id accepted at world 2");
    CHECK(rs_now() - t0 < 5.0, "a world mismatch waited for the timeout");
    CHECK(strstr(rs_last_error(), "world size 3"), "%s", rs_last_error());
    /* not an id file at all */
    FILE *f = fopen(path, "w");
    REQUIRE(f, "open %s", path);
    fputs("hello", f);
    fclose(f);
    CHECK(rs_dist_id_wait(path, &now, 0.2, got) == -1, "took a text file as an id");
    CHECK(strstr(rs_last_error(), "not a resafe id file"), "%s", rs_last_error());
}

TEST(test_id_publish_into_a_missing_directory_names_rank_and_path) {
    char path[512];
    snprintf(path, sizeof path, "%s/no-such-dir/nccl_id", rs_test_tmpdir());
    rs_dist d = rs_test_dist(0, 2, "job-1");
    uint8_t id[RS_DIST_ID_BYTES] = {0};
    CHECK(rs_dist_id_publish(path, &d, id) == -1, "wrote into a missing directory");
    CHECK(strstr(rs_last_error(), "rank 0") && strstr(rs_last_error(), "no-such-dir"), "%s",
          rs_last_error());
}
