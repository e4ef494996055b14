/* The CUDA ops of mixed-precision SFT and LLM-QAT (backend.h cast_f32_to_weight,
 * fake_quant_groups) against the CPU reference: inputs rounded to bf16 first so both backends
 * see the same values, outputs poisoned with NaN where the op writes a separate buffer, skipped
 * without a device, failing under RESAFE_TEST_GPU=1 when there is none.
 *
 * Both ops are exact functions of their inputs: the kernels use the CPU's fp32 expressions
 * (IEEE divide, rintf) and round to bf16 once on the store, so the cuda output must equal the
 * CPU result rounded to bf16, bit for bit (rs_f32_to_bf16 rounds to nearest even, as
 * __float2bfloat16 does). */
#include "resafe/backend.h"
#include "resafe/core.h"
#include "test.h"
#include "gpu_test_buffers.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int qat_backends_ready(const rs_backend *cpu, const rs_backend *gpu) {
    const char *s = getenv("RESAFE_TEST_GPU");
    if (gpu && cpu) return 1;
    if (s && strcmp(s, "1") == 0)
        CHECK(0, "RESAFE_TEST_GPU=1 but no CUDA device (built without CUDA, or no GPU visible)");
    else
        printf("skip: no CUDA device\n");
    return 0;
}

/* Bit-for-bit equality of two fp32 arrays; prints the first few differences. */
static size_t count_bit_differences(const char *what, const float *got, const float *want,
                                    size_t n) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0 && bad++ < 5)
            fprintf(stderr, "%s [%zu]: cuda %.9g, want %.9g\n", what, i, got[i], want[i]);
    return bad;
}

/* Groups of odd and even sizes (1, 3, 37, 64, 128, 2000: below, at and above a warp; many
 * groups of a block), a constant group, an all-zero group, values of mixed magnitude; in place. */
TEST(test_cuda_qat_fake_quant_groups_matches_cpu_rounded_to_bf16) {
    const rs_backend *cpu = rs_backend_cpu(), *gpu = rs_backend_cuda();
    if (!qat_backends_ready(cpu, gpu)) return;
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed() * 0x9e3779b97f4a7c15ull + 201);
    static const int groups[] = {1, 3, 37, 64, 128, 2000};
    for (size_t gi = 0; gi < sizeof groups / sizeof *groups; gi++) {
        int group = groups[gi];
        size_t n_groups = 1 + rs_rng_next(&rng) % 300, n = n_groups * (size_t)group;
        float sd = 0.01f + 4.0f * rs_rng_uniform(&rng);
        float *x = random_bf16(&rng, n, 0.3f * sd, sd);
        for (int l = 0; l < group; l++)
            x[l] = 0.0f; /* group 0: zeros */
        if (n_groups > 1)
            for (int l = 0; l < group; l++)
                x[(size_t)group + l] = 0.375f; /* group 1: constant */
        for (int bits = 2; bits <= 8; bits++)
            for (int sym = 0; sym < 2; sym++) {
                float *want = rs_malloc(n * sizeof *want);
                memcpy(want, x, n * sizeof *want);
                cpu->fake_quant_groups(want, n_groups, group, bits, sym);
                for (size_t i = 0; i < n; i++)
                    want[i] = round_bf16(want[i]);
                void *xd = upload(gpu, gpu->act_dtype, x, n);
                gpu->fake_quant_groups(xd, n_groups, group, bits, sym);
                float *got = download(gpu, xd, gpu->act_dtype, n);
                size_t bad = count_bit_differences("fake_quant_groups", got, want, n);
                CHECK(bad == 0, "group %d x %zu, %d bits, symmetric %d: %zu values differ", group,
                      n_groups, bits, sym, bad);
                gpu->free(xd);
                free(want), free(got);
            }
        free(x);
    }
}

/* The mixed-precision refresh: fp32 masters (not bf16-representable, plus halfway cases,
 * tiny and huge values, signed zeros) to bf16, rounded to nearest even like rs_f32_to_bf16. */
TEST(test_cuda_qat_cast_f32_to_weight_rounds_to_nearest_even) {
    const rs_backend *cpu = rs_backend_cpu(), *gpu = rs_backend_cuda();
    if (!qat_backends_ready(cpu, gpu)) return;
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed() * 0x9e3779b97f4a7c15ull + 202);
    const size_t n = 100003;
    float *x = rs_malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++)
        x[i] = 0.1f * rs_rng_normal(&rng);
    const float special[] = {0.0f,   -0.0f,   1.0f + 1.0f / 256.0f, 1.0f + 3.0f / 256.0f, 1e-30f,
                             -3e38f, 65504.0f};
    memcpy(x, special, sizeof special);
    float *xd = upload(gpu, RS_F32, x, n);
    void *wd = upload_nan(gpu, gpu->weight_dtype, n);
    gpu->cast_f32_to_weight(wd, xd, n);
    float *got = download(gpu, wd, gpu->weight_dtype, n);
    float *want = rs_malloc(n * sizeof *want);
    for (size_t i = 0; i < n; i++)
        want[i] = round_bf16(x[i]);
    CHECK(count_bit_differences("cast_f32_to_weight", got, want, n) == 0,
          "cast_f32_to_weight differs from round-to-nearest-even bf16");
    /* the cpu op (fp32 weights) is a copy, in place too */
    float *copy = rs_malloc(n * sizeof *copy);
    cpu->cast_f32_to_weight(copy, x, n);
    CHECK(memcmp(copy, x, n * sizeof *x) == 0, "cpu cast_f32_to_weight is not a copy");
    cpu->cast_f32_to_weight(copy, copy, n);
    CHECK(memcmp(copy, x, n * sizeof *x) == 0, "cpu cast_f32_to_weight in place changed values");
    gpu->free(xd), gpu->free(wd);
    free(x), free(got), free(want), free(copy);
}

/* Full-parameter SFT repeats and resumes bit-identically only if every gradient is the same bits
 * every run: embedding_bwd on cuda groups the tokens by id instead of adding with atomics.
 * Many repeated ids (vocab 7 for 500 tokens) and padding (-1, adds nothing); two calls give the
 * same bits, and the CPU's sum within fp32 summation error (only the order of the adds differs:
 * the GPU sums an id's rows first, then adds to the table; 4 (L + 4) u times the magnitude). */
TEST(test_cuda_qat_embedding_bwd_is_deterministic) {
    const rs_backend *cpu = rs_backend_cpu(), *gpu = rs_backend_cuda();
    if (!qat_backends_ready(cpu, gpu)) return;
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed() * 0x9e3779b97f4a7c15ull + 203);
    const int n = 500, dim = 77, vocab = 7;
    const float scale = 0.75f;
    float *dout = random_bf16(&rng, (size_t)n * dim, 0.0f, 1.0f);
    float *table0 = random_bf16(&rng, (size_t)vocab * dim, 0.0f, 1.0f);
    int32_t *ids = rs_malloc((size_t)n * sizeof *ids);
    for (int i = 0; i < n; i++)
        ids[i] = i % 11 == 5 ? -1 : (int32_t)(rs_rng_next(&rng) % vocab);
    float *res[3];
    const rs_backend *order[3] = {cpu, gpu, gpu};
    for (int s = 0; s < 3; s++) {
        const rs_backend *be = order[s];
        void *dd = upload(be, be->act_dtype, dout, (size_t)n * dim);
        float *dt = upload(be, RS_F32, table0, (size_t)vocab * dim);
        void *id = upload_bytes(be, ids, (size_t)n * sizeof(int32_t));
        be->embedding_bwd(dt, dd, id, n, dim, scale);
        res[s] = download(be, dt, RS_F32, (size_t)vocab * dim);
        be->free(dd), be->free(dt), be->free(id);
    }
    CHECK(memcmp(res[1], res[2], (size_t)vocab * dim * sizeof(float)) == 0,
          "two cuda embedding_bwd calls differ");
    size_t bad = 0;
    for (int v = 0; v < vocab; v++)
        for (int d = 0; d < dim; d++) {
            double mag = fabs(table0[(size_t)v * dim + d]);
            for (int i = 0; i < n; i++)
                if (ids[i] == v) mag += fabs(scale * dout[(size_t)i * dim + d]);
            double tol = 4.0 * (n + 4.0) * (1.0 / 16777216.0) * mag;
            size_t e = (size_t)v * dim + d;
            if (!(fabs((double)res[1][e] - res[0][e]) <= tol) && bad++ < 5)
                fprintf(stderr, "embedding_bwd [%d, %d]: cuda %.9g, cpu %.9g\n", v, d, res[1][e],
                        res[0][e]);
        }
    CHECK(bad == 0, "embedding_bwd: %zu entries differ from the cpu beyond summation error", bad);
    free(dout), free(table0), free(ids), free(res[0]), free(res[1]), free(res[2]);
}
