/* LoRA adapter lifetime (lora.c), target names, and the backend dropout op it relies on. */
#include "resafe/model_train.h"
#include "test.h"

#include <string.h>

TEST(test_lora_parse_targets_accepts_short_hf_and_all) {
    unsigned t = 123;
    REQUIRE(rs_lora_parse_targets("q, v ,down_proj", &t) == 0, "%s", rs_last_error());
    CHECK(t == ((1u << RS_LORA_Q) | (1u << RS_LORA_V) | (1u << RS_LORA_DOWN)), "bits 0x%x", t);
    REQUIRE(rs_lora_parse_targets("all", &t) == 0, "%s", rs_last_error());
    CHECK(t == (1u << RS_LORA_N_TARGETS) - 1, "bits 0x%x", t);
    for (int i = 0; i < RS_LORA_N_TARGETS; i++) {
        REQUIRE(rs_lora_parse_targets(rs_lora_target_name((rs_lora_target)i), &t) == 0, "%s",
                rs_last_error());
        CHECK(t == 1u << i, "%s -> 0x%x", rs_lora_target_name((rs_lora_target)i), t);
    }
}

TEST(test_lora_parse_targets_rejects_unknown_and_empty_names) {
    const char *bad[] = {"", "q,,k", "q,", "qkv", "gate_projx", "all,z"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        unsigned t = 5;
        CHECK(rs_lora_parse_targets(bad[i], &t) == -1 && t == 0, "'%s' accepted", bad[i]);
        CHECK(strstr(rs_last_error(), "LoRA targets") != NULL, "message: %s", rs_last_error());
    }
}

/* A model shell: rs_lora_init needs only the config, the backend and a loaded marker. */
static rs_model shell_model(void) {
    static rs_layer_weights layers[3];
    rs_model m = {0};
    m.cfg = (rs_model_config){.hidden_size = 24, .intermediate_size = 40, .n_layers = 3,
                              .n_heads = 4, .n_kv_heads = 2, .head_dim = 6, .vocab_size = 50};
    m.be = rs_backend_cpu();
    m.layers = layers;
    return m;
}

/* A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT, B = 0, masks all ones, flat views line up with the
 * per-linear pointers, and untargeted linears have nothing. */
TEST(test_lora_init_layout_and_initial_values) {
    rs_model m = shell_model();
    rs_lora l;
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    unsigned targets = (1u << RS_LORA_K) | (1u << RS_LORA_O) | (1u << RS_LORA_DOWN);
    REQUIRE(rs_lora_init(&l, &m, 5, 10.0f, targets, RS_MASK_FACTOR, 1, &rng) == 0, "%s",
            rs_last_error());
    CHECK(l.scale == 2.0f && l.enabled == 1 && l.dropout == 0.0f, "scale %g", l.scale);
    size_t covered = 0;
    for (int layer = 0; layer < 3; layer++)
        for (int t = 0; t < RS_LORA_N_TARGETS; t++) {
            rs_lora_linear *a = rs_lora_at(&l, layer, (rs_lora_target)t);
            if (!(targets & (1u << t))) {
                CHECK(a->in == 0 && !a->A && !a->dW, "untargeted %d has buffers", t);
                continue;
            }
            int want_in = t == RS_LORA_K ? 24 : t == RS_LORA_O ? 24 : 40;
            int want_out = t == RS_LORA_K ? 12 : 24;
            CHECK(a->in == want_in && a->out == want_out, "target %d: [%d, %d]", t, a->out, a->in);
            size_t na = (size_t)5 * a->in, nb = (size_t)a->out * 5;
            float bound = 1.0f / sqrtf((float)a->in), amax = 0;
            for (size_t i = 0; i < na; i++) amax = fmaxf(amax, fabsf(a->A[i]));
            CHECK(amax <= bound && amax > 0.5f * bound, "A max %g, bound %g", amax, bound);
            for (size_t i = 0; i < nb; i++) CHECK(a->B[i] == 0.0f, "B[%zu] = %g", i, a->B[i]);
            CHECK(a->dA - l.flat_grads == a->A - l.flat_params, "dA offset differs from A's");
            CHECK(a->mask_B - l.flat_mask == a->B - l.flat_params, "mask_B offset differs");
            for (size_t i = 0; i < na; i++) CHECK(a->mask_A[i] == 1, "mask_A[%zu]", i);
            CHECK(a->dW && a->mask_W == NULL, "dW/mask_W");
            covered += na + nb;
        }
    size_t ones = 0;
    for (size_t i = 0; i < l.n_flat; i++) ones += l.flat_mask[i];
    CHECK(ones == covered, "flat mask has %zu ones, %zu trainable values", ones, covered);
    rs_lora_free(&l);
}

TEST(test_lora_init_rejects_bad_arguments) {
    rs_model m = shell_model();
    rs_lora l;
    rs_rng rng;
    rs_rng_seed(&rng, 1);
    CHECK(rs_lora_init(&l, &m, 0, 1.0f, 1, RS_MASK_NONE, 0, &rng) == -1, "rank 0");
    CHECK(rs_lora_init(&l, &m, 4, -1.0f, 1, RS_MASK_NONE, 0, &rng) == -1, "alpha < 0");
    CHECK(rs_lora_init(&l, &m, 4, 1.0f, 0, RS_MASK_NONE, 0, &rng) == -1, "no targets");
    CHECK(rs_lora_init(&l, &m, 4, 1.0f, 1u << 9, RS_MASK_NONE, 0, &rng) == -1, "unknown bit");
    CHECK(l.block == NULL && l.lin == NULL, "failed init left memory");
}

/* The op's contract: a pure function of (seed, index); kept values scaled by 1/(1-p); the
 * dropped fraction near p; in place allowed. */
TEST(test_dropout_is_seeded_scaled_and_in_place) {
    const rs_backend *be = rs_backend_cpu();
    enum { N = 20000 };
    static float x[N], a[N], b[N], c[N];
    for (int i = 0; i < N; i++) x[i] = 1.0f + (float)(i % 7);
    float p = 0.3f;
    be->dropout(a, x, N, p, 42);
    memcpy(b, x, sizeof b);
    be->dropout(b, b, N, p, 42);
    be->dropout(c, x, N, p, 43);
    int dropped = 0, same_as_other_seed = 0;
    for (int i = 0; i < N; i++) {
        CHECK(a[i] == b[i], "in place differs at %d", i);
        CHECK(a[i] == 0.0f || a[i] == x[i] * (1.0f / (1.0f - p)), "a[%d] = %g", i, a[i]);
        dropped += a[i] == 0.0f;
        same_as_other_seed += (a[i] == 0.0f) == (c[i] == 0.0f);
    }
    /* binomial(20000, 0.3): sd 65, so 6000 +- 400 is over 6 sd */
    CHECK(dropped > 5600 && dropped < 6400, "dropped %d of %d", dropped, N);
    CHECK(same_as_other_seed < N - 1000, "another seed gives nearly the same mask (%d)", same_as_other_seed);
    be->dropout(a, x, N, 0.0f, 42);
    CHECK(memcmp(a, x, sizeof a) == 0, "p = 0 must copy");
}
