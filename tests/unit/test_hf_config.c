/* hf_config: random config.json texts of every family parse to the sizes written; rope
 * frequencies match double-precision references of the published formulas; bad types, sizes and
 * truncated files are rejected with a message naming the file and the key. */
#include "resafe/hf_config.h"
#include "test.h"

#include <string.h>

static int rand_int(rs_rng *r, int lo, int hi) { return lo + (int)(rs_rng_next(r) % (uint64_t)(hi - lo + 1)); }

typedef struct {
    const char *arch, *model_type;
    int vocab, hidden, inter, layers, heads, kv, head_dim; /* head_dim 0 = not written */
    double theta, eps;
    int max_pos, tie, bos, eos[3], n_eos;
} gen_config;

static gen_config random_config(rs_rng *r, int family) {
    static const char *archs[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                  "GemmaForCausalLM"};
    static const char *types[] = {"llama", "mistral", "qwen2", "gemma"};
    gen_config g = {0};
    g.arch = archs[family];
    g.model_type = types[family];
    g.heads = 1 << rand_int(r, 0, 5);
    int kv_shift = rand_int(r, 0, 5);
    g.kv = g.heads >> (kv_shift > 5 ? 5 : kv_shift);
    if (g.kv < 1) g.kv = 1;
    int hd = 2 * rand_int(r, 1, 64);
    g.hidden = g.heads * hd;
    g.head_dim = rs_rng_uniform(r) < 0.5f ? 2 * rand_int(r, 1, 128) : 0;
    g.vocab = rand_int(r, 16, 1 << 17);
    g.inter = rand_int(r, 1, 1 << 15);
    g.layers = rand_int(r, 1, 96);
    g.theta = rs_rng_uniform(r) < 0.3f ? 10000.0 : (double)rand_int(r, 2, 5000000);
    g.eps = rs_rng_uniform(r) < 0.5f ? 1e-5 : 1e-6;
    g.max_pos = rand_int(r, 1, 1 << 20);
    g.tie = rand_int(r, 0, 1);
    g.bos = rand_int(r, 0, g.vocab - 1);
    g.n_eos = rand_int(r, 1, 3);
    for (int i = 0; i < g.n_eos; i++) g.eos[i] = rand_int(r, 0, g.vocab - 1);
    return g;
}

/* config.json text; `extra` is spliced in as additional members (may be ""). */
static void write_json(const gen_config *g, const char *extra, char *out, size_t n) {
    char head_dim[48] = "", eos[64];
    if (g->head_dim) snprintf(head_dim, sizeof head_dim, "\"head_dim\": %d,\n", g->head_dim);
    if (g->n_eos == 1)
        snprintf(eos, sizeof eos, "%d", g->eos[0]);
    else if (g->n_eos == 2)
        snprintf(eos, sizeof eos, "[%d, %d]", g->eos[0], g->eos[1]);
    else
        snprintf(eos, sizeof eos, "[%d, %d, %d]", g->eos[0], g->eos[1], g->eos[2]);
    snprintf(out, n,
             "{\"architectures\": [\"%s\"], \"model_type\": \"%s\",\n"
             "\"vocab_size\": %d, \"hidden_size\": %d, \"intermediate_size\": %d,\n"
             "\"num_hidden_layers\": %d, \"num_attention_heads\": %d, \"num_key_value_heads\": %d,\n"
             "%s\"rope_theta\": %.17g, \"rms_norm_eps\": %.17g, \"max_position_embeddings\": %d,\n"
             "\"tie_word_embeddings\": %s, \"bos_token_id\": %d, \"eos_token_id\": %s%s%s}\n",
             g->arch, g->model_type, g->vocab, g->hidden, g->inter, g->layers, g->heads, g->kv,
             head_dim, g->theta, g->eps, g->max_pos, g->tie ? "true" : "false", g->bos, eos,
             extra[0] ? ",\n" : "", extra);
}

TEST(test_hf_config_random_configs_parse_to_the_sizes_written) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    char json[4096];
    for (int trial = 0; trial < 400; trial++) {
        int family = trial % 4;
        gen_config g = random_config(&r, family);
        write_json(&g, "", json, sizeof json);
        rs_model_config c;
        REQUIRE(rs_hf_config_parse("config.json", json, &c) == 0, "%s\n%s", rs_last_error(), json);
        CHECK(c.arch == (rs_arch)family && strcmp(c.model_type, g.model_type) == 0, "%s", c.model_type);
        CHECK(c.vocab_size == g.vocab && c.hidden_size == g.hidden && c.intermediate_size == g.inter,
              "sizes");
        CHECK(c.n_layers == g.layers && c.n_heads == g.heads && c.n_kv_heads == g.kv, "heads");
        int gemma = family == 3; /* GemmaConfig's head_dim defaults to 256 */
        int want_hd = g.head_dim ? g.head_dim : gemma ? 256 : g.hidden / g.heads;
        CHECK(c.head_dim == want_hd, "head_dim %d want %d", c.head_dim, want_hd);
        CHECK(c.rope_theta == (float)g.theta && c.rms_norm_eps == (float)g.eps, "theta/eps");
        CHECK(c.rope_type == RS_ROPE_DEFAULT, "rope type");
        CHECK(c.max_position_embeddings == g.max_pos && c.tie_word_embeddings == g.tie, "pos/tie");
        CHECK(c.bos_token_id == g.bos && c.n_eos == g.n_eos, "bos %d n_eos %d", c.bos_token_id, c.n_eos);
        for (int i = 0; i < g.n_eos && i < c.n_eos; i++) CHECK(c.eos_token_ids[i] == g.eos[i], "eos");
        CHECK(c.norm_add_one == gemma, "norm_add_one");
        CHECK(c.hidden_act == (gemma ? RS_ACT_GELU_TANH : RS_ACT_SILU), "act %d", c.hidden_act);
        CHECK_NEAR(c.embed_scale, gemma ? sqrt((double)g.hidden) : 1.0, 1e-6 * sqrt((double)g.hidden));
        CHECK_NEAR(c.attn_scale, 1.0 / sqrt((double)want_hd), 1e-7);
        CHECK(c.attention_bias == (family == 2) && c.o_bias == 0 && c.mlp_bias == 0, "biases");
        CHECK(c.sliding_window == (family == 1 ? 4096 : 0), "sliding window %d", c.sliding_window);
    }
}

TEST(test_hf_config_absent_keys_take_the_family_defaults) {
    /* the dataclass defaults of transformers' LlamaConfig/MistralConfig/Qwen2Config/GemmaConfig */
    static const struct {
        const char *type;
        int heads, kv, head_dim, max_pos, tie, bos, eos, pad;
    } want[] = {
        {"llama", 4, 4, 16, 2048, 0, 1, 2, -1},
        {"mistral", 8, 8, 8, 131072, 0, 1, 2, -1},
        {"qwen2", 32, 32, 2, 32768, 0, -1, -1, -1},
        {"gemma", 16, 16, 256, 8192, 1, 2, 1, 0},
    };
    for (int i = 0; i < 4; i++) {
        char json[512];
        snprintf(json, sizeof json,
                 "{\"model_type\": \"%s\", \"vocab_size\": 100, \"hidden_size\": 64, "
                 "\"intermediate_size\": 8, \"num_hidden_layers\": 1, \"num_attention_heads\": %d}",
                 want[i].type, want[i].heads);
        rs_model_config c;
        REQUIRE(rs_hf_config_parse("config.json", json, &c) == 0, "%s", rs_last_error());
        CHECK(c.n_kv_heads == want[i].kv && c.head_dim == want[i].head_dim, "%s: kv %d hd %d",
              want[i].type, c.n_kv_heads, c.head_dim);
        CHECK(c.max_position_embeddings == want[i].max_pos && c.tie_word_embeddings == want[i].tie,
              "%s", want[i].type);
        CHECK(c.bos_token_id == want[i].bos && c.pad_token_id == want[i].pad, "%s", want[i].type);
        CHECK(want[i].eos < 0 ? c.n_eos == 0 : c.n_eos == 1 && c.eos_token_ids[0] == want[i].eos,
              "%s eos", want[i].type);
        CHECK(c.rope_theta == 10000.0f && c.rms_norm_eps == 1e-6f, "%s", want[i].type);
    }
}

/* inv_freq references in double, written from the formulas (RoPE paper; Llama 3.1's
 * apply_scaling), independent of the float32 op order the library mirrors. */
static double ref_inv_freq(const rs_model_config *c, int i) {
    double f = 1.0 / pow(c->rope_theta, 2.0 * i / c->head_dim);
    if (c->rope_type == RS_ROPE_LINEAR) return f / c->rope_factor;
    if (c->rope_type != RS_ROPE_LLAMA3) return f;
    double wavelen = 2 * M_PI / f, old = c->rope_original_max_position;
    double lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor;
    if (wavelen < old / hi) return f;
    if (wavelen > old / lo) return f / c->rope_factor;
    double smooth = (old / wavelen - lo) / (hi - lo);
    return (1 - smooth) * f / c->rope_factor + smooth * f;
}

TEST(test_hf_config_rope_inv_freq_matches_double_reference) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed() + 1);
    char json[4096], extra[512];
    float inv[2048];
    for (int trial = 0; trial < 300; trial++) {
        gen_config g = random_config(&r, 0);
        int kind = trial % 3;
        double factor = 1 + 39 * rs_rng_uniform(&r), lo = 0.5 + rs_rng_uniform(&r);
        double hi = lo + 0.25 + 8 * rs_rng_uniform(&r);
        int orig = rand_int(&r, 16, 65536);
        const char *spelling = rs_rng_uniform(&r) < 0.5f ? "rope_scaling" : "rope_parameters";
        if (kind == 0)
            snprintf(extra, sizeof extra, "\"%s\": null", spelling);
        else if (kind == 1)
            snprintf(extra, sizeof extra, "\"%s\": {\"type\": \"linear\", \"factor\": %.17g}",
                     spelling, factor);
        else
            snprintf(extra, sizeof extra,
                     "\"%s\": {\"rope_type\": \"llama3\", \"factor\": %.17g, \"low_freq_factor\": "
                     "%.17g, \"high_freq_factor\": %.17g, \"original_max_position_embeddings\": %d}",
                     spelling, factor, lo, hi, orig);
        write_json(&g, extra, json, sizeof json);
        rs_model_config c;
        REQUIRE(rs_hf_config_parse("config.json", json, &c) == 0, "%s\n%s", rs_last_error(), json);
        REQUIRE(c.rope_type == (rs_rope_type)kind, "rope type %d want %d", c.rope_type, kind);
        REQUIRE(c.head_dim / 2 <= 2048, "head_dim");
        rs_rope_inv_freq(&c, inv);
        /* Tolerance from the float32 arithmetic transformers uses (and we mirror; the Python
         * tests compare with transformers itself at 1e-6): the exponent 2i/d rounded to float
         * moves theta^(2i/d) by up to ln(theta) * 2^-24 ~ 9e-7 relative for theta <= 5e6, so
         * 1.5e-6. In llama3's smoothing band the weight s = (old/wavelen - lo) / (hi - lo)
         * inherits that error magnified by hi / (hi - lo), and the result moves by
         * ds * (f - f/factor). The band's edges are continuous, so a band decision that flips
         * on a rounding changes little. */
        for (int i = 0; i < c.head_dim / 2; i++) {
            double want = ref_inv_freq(&c, i), f = 1.0 / pow(c.rope_theta, 2.0 * i / c.head_dim);
            double tol = 1.5e-6 * want;
            if (kind == 2) {
                double lo_f = c.rope_low_freq_factor, hi_f = c.rope_high_freq_factor;
                tol += 2 * 1.5e-6 * hi_f / (hi_f - lo_f) * f * (1 - 1 / c.rope_factor);
            }
            CHECK(fabs(inv[i] - want) <= tol, "kind %d i %d: %.9g vs %.9g (tolerance %.3g)", kind,
                  i, (double)inv[i], want, tol);
        }
    }
}

TEST(test_hf_config_rope_dict_rope_theta_wins_and_rope_type_beats_type) {
    const char *json =
        "{\"model_type\": \"llama\", \"vocab_size\": 10, \"hidden_size\": 64, \"intermediate_size\": 8,"
        " \"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"rope_theta\": 1000.0,"
        " \"rope_parameters\": {\"rope_theta\": 5000.0, \"type\": \"linear\", \"rope_type\": \"default\"}}";
    rs_model_config c;
    REQUIRE(rs_hf_config_parse("c.json", json, &c) == 0, "%s", rs_last_error());
    CHECK(c.rope_theta == 5000.0f && c.rope_type == RS_ROPE_DEFAULT, "theta %g type %d",
          (double)c.rope_theta, c.rope_type);
}

/* Replace the value of "key" in json (a number or a string) by `value`. */
static void replace_value(const char *json, const char *key, const char *value, char *out, size_t n) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *at = strstr(json, pat);
    if (!at) {
        snprintf(out, n, "%s", json);
        return;
    }
    const char *v = at + strlen(pat), *end = v;
    while (*end && *end != ',' && *end != '}' && *end != '\n') end++;
    snprintf(out, n, "%.*s%s%s", (int)(v - json), json, value, end);
}

TEST(test_hf_config_wrong_types_and_sizes_name_the_key) {
    static const char *int_keys[] = {"vocab_size", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "max_position_embeddings"};
    static const char *bad_values[] = {"\"64\"", "true", "[1]", "{}", "2.5", "-3", "0", "1e12"};
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed() + 2);
    char json[4096], bad[4096];
    for (int trial = 0; trial < 300; trial++) {
        gen_config g = random_config(&r, trial % 4);
        write_json(&g, "", json, sizeof json);
        const char *key = int_keys[rs_rng_next(&r) % 7];
        const char *value = bad_values[rs_rng_next(&r) % 8];
        replace_value(json, key, value, bad, sizeof bad);
        rs_model_config c;
        CHECK(rs_hf_config_parse("dir/config.json", bad, &c) == -1, "accepted %s = %s", key, value);
        const char *msg = rs_last_error();
        CHECK(strncmp(msg, "dir/config.json: ", 17) == 0, "no file name: %s", msg);
        /* "0"/"-3" on num_key_value_heads fail as a range error of that key, nothing else */
        CHECK(strstr(msg, key) != NULL, "%s = %s: message does not name the key: %s", key, value, msg);
        CHECK(c.vocab_size == 0 && c.hidden_size == 0, "config not cleared on error");
    }
}

TEST(test_hf_config_inconsistent_heads_are_rejected) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed() + 3);
    char json[4096];
    for (int trial = 0; trial < 200; trial++) {
        gen_config g = random_config(&r, trial % 4);
        g.heads = 2 * rand_int(&r, 2, 32);
        g.kv = g.heads + 1 + rand_int(&r, 0, 3) * 2; /* more KV heads than heads: never divides */
        if (trial % 2) g.kv = g.heads - 1;           /* odd, below an even head count */
        g.hidden = g.heads * 8;
        write_json(&g, "", json, sizeof json);
        rs_model_config c;
        CHECK(rs_hf_config_parse("config.json", json, &c) == -1, "heads %d kv %d accepted", g.heads, g.kv);
        CHECK(strstr(rs_last_error(), "num_key_value_heads") != NULL, "%s", rs_last_error());
    }
    gen_config g = random_config(&r, 0);
    g.heads = 3;
    g.kv = 3;
    g.hidden = 64;
    g.head_dim = 0;
    write_json(&g, "", json, sizeof json);
    rs_model_config c;
    CHECK(rs_hf_config_parse("config.json", json, &c) == -1, "hidden 64 with 3 heads accepted");
    CHECK(strstr(rs_last_error(), "hidden_size") != NULL, "%s", rs_last_error());
}

TEST(test_hf_config_every_truncation_fails_cleanly) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed() + 4);
    char json[4096], cut[4096];
    gen_config g = random_config(&r, (int)(rs_rng_next(&r) % 4));
    write_json(&g, "", json, sizeof json);
    size_t n = strlen(json);
    /* the text ends "}\n": every prefix shorter than n - 1 is invalid JSON */
    for (size_t len = 0; len + 1 < n; len++) {
        memcpy(cut, json, len);
        cut[len] = 0;
        rs_model_config c;
        CHECK(rs_hf_config_parse("t.json", cut, &c) == -1, "prefix %zu accepted", len);
        CHECK(strstr(rs_last_error(), "t.json: invalid JSON at line") != NULL, "%s", rs_last_error());
    }
}

TEST(test_hf_config_load_reads_the_directory) {
    char *dir = rs_path_join(rs_test_tmpdir(), "model");
    REQUIRE(rs_mkdir_p(dir) == 0, "%s", rs_last_error());
    rs_model_config c;
    CHECK(rs_hf_config_load(dir, &c) == -1, "empty directory accepted");
    CHECK(strstr(rs_last_error(), "config.json") != NULL, "%s", rs_last_error());
    char *path = rs_path_join(dir, "config.json");
    const char *json = "{\"architectures\": [\"Qwen2ForCausalLM\"], \"vocab_size\": 77, \"hidden_size\": 32,"
                       " \"intermediate_size\": 8, \"num_hidden_layers\": 2, \"num_attention_heads\": 4,"
                       " \"num_key_value_heads\": 2, \"use_sliding_window\": true, \"sliding_window\": 64,"
                       " \"max_window_layers\": 1}";
    REQUIRE(rs_write_file_atomic(path, json, strlen(json)) == 0, "%s", rs_last_error());
    REQUIRE(rs_hf_config_load(dir, &c) == 0, "%s", rs_last_error());
    CHECK(c.arch == RS_ARCH_QWEN2 && c.vocab_size == 77 && c.n_kv_heads == 2, "parsed wrong");
    CHECK(c.sliding_window == 64, "layer 1 of 2 slides: window %d", c.sliding_window);
    CHECK(rs_hf_config_load(path, &c) == -1, "a file taken as a directory");
    free(path);
    free(dir);
}
