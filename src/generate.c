/* generate: batched generation over the KV cache (semantics in include/resafe/generate.h). */
#include "resafe/generate.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- parameters */

/* eos_token_id of generation_config.json: an int or a list of ints. 1 found, 0 absent, -1 bad. */
static int read_generation_eos(const char *model_dir, rs_gen_params *p) {
    char *path = rs_path_join(model_dir, "generation_config.json"), *text;
    if (!rs_path_exists(path)) {
        free(path);
        return 0;
    }
    int rc = -1;
    if (rs_read_file(path, &text, NULL) != 0) goto done;
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(root)) {
        RS_FAIL("%s: not a JSON object", path);
        goto done_json;
    }
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    rc = 0;
    if (!eos || cJSON_IsNull(eos)) goto done_json;
    int n = cJSON_IsArray(eos) ? cJSON_GetArraySize(eos) : 1;
    if (n > RS_MAX_EOS) {
        rc = RS_FAIL("%s: eos_token_id lists %d ids (at most %d supported)", path, n, RS_MAX_EOS);
        goto done_json;
    }
    p->n_eos = 0;
    for (int i = 0; i < n; i++) {
        const cJSON *v = cJSON_IsArray(eos) ? cJSON_GetArrayItem(eos, i) : eos;
        if (!cJSON_IsNumber(v) || v->valuedouble != (double)v->valueint || v->valueint < 0) {
            rc = RS_FAIL("%s: eos_token_id must be a non-negative integer or a list of them", path);
            goto done_json;
        }
        p->eos_ids[p->n_eos++] = v->valueint;
    }
    rc = 1;
done_json:
    cJSON_Delete(root);
done:
    free(path);
    return rc < 0 ? -1 : rc;
}

int rs_gen_params_init(rs_gen_params *p, const char *model_dir, const rs_model_config *cfg) {
    memset(p, 0, sizeof *p);
    p->max_new_tokens = 128;
    p->top_p = 1.0f;
    p->batch_size = 8;
    p->n_eos = cfg->n_eos;
    for (int i = 0; i < cfg->n_eos; i++) p->eos_ids[i] = cfg->eos_token_ids[i];
    if (model_dir && read_generation_eos(model_dir, p) < 0) return -1;
    return 0;
}

uint64_t rs_gen_seed(uint64_t seed, int prompt_index) {
    return seed + 0x9E3779B97F4A7C15ull * (uint64_t)(prompt_index + 1);
}

void rs_gen_output_free(rs_gen_output *out, int n) {
    for (int i = 0; i < n; i++) free(out[i].ids);
    memset(out, 0, (size_t)n * sizeof *out);
}

static int is_eos(const rs_gen_params *p, int32_t id) {
    for (int i = 0; i < p->n_eos; i++)
        if (p->eos_ids[i] == id) return 1;
    return 0;
}

/* ---------------------------------------------------------------- the loop */

/* Per batch scratch, sized once for the largest batch. */
typedef struct {
    rs_kv_cache cache;
    rs_sampler sampler;
    rs_rng *rngs;
    float *logits;    /* [batch, vocab] */
    int32_t *tokens, *pos;
    int *running;
    int greedy;        /* temperature <= 0 and the backend has argmax_rows: ids, not logits */
    int32_t *next_ids; /* [batch] the greedy step's ids */
} gen_state;

static int check_params(const rs_model *m, const int *lens, int n, const rs_gen_params *p) {
    if (p->max_new_tokens < 0 || p->batch_size < 1)
        return RS_FAIL("generate: max_new_tokens %d must be >= 0 and batch_size %d >= 1",
                       p->max_new_tokens, p->batch_size);
    if (p->temperature > 0 && (p->top_k < 0 || !(p->top_p > 0.0f)))
        return RS_FAIL("generate: top_k %d must be >= 0 and top_p %g > 0", p->top_k, p->top_p);
    int window = m->cfg.sliding_window;
    for (int i = 0; i < n; i++) {
        if (lens[i] < 1) return RS_FAIL("generate: prompt %d is empty", i);
        if (window > 0 && (int64_t)lens[i] + p->max_new_tokens > window)
            return RS_FAIL("generate: prompt %d: %d tokens + %d new exceed the sliding window %d", i,
                           lens[i], p->max_new_tokens, window);
    }
    return 0;
}

/* One forward call: greedy decoding takes the argmax ids from the device, sampling the logits. */
static int forward_step(rs_model *m, gen_state *g, int B, int T) {
    if (g->greedy) return rs_model_forward_greedy(m, &g->cache, g->tokens, g->pos, B, T, g->next_ids);
    return rs_model_forward(m, &g->cache, g->tokens, g->pos, B, T, RS_LOGITS_LAST, g->logits);
}

/* Sample one token for every running sequence; returns how many are still running. */
static int sample_step(gen_state *g, const rs_model *m, int B, const rs_gen_params *p,
                       rs_gen_output *out) {
    int V = m->cfg.vocab_size, still = 0;
    for (int b = 0; b < B; b++) {
        if (!g->running[b]) continue;
        int32_t id = g->greedy ? g->next_ids[b]
                               : rs_sampler_next(&g->sampler, g->logits + (size_t)b * V, p,
                                                 &g->rngs[b]);
        out[b].ids[out[b].n_ids++] = id;
        out[b].hit_eos = is_eos(p, id);
        g->running[b] = !out[b].hit_eos && out[b].n_ids < p->max_new_tokens;
        still += g->running[b];
    }
    return still;
}

/* Prompts [first, first + B): prefill, then decode until every sequence stopped. */
static int generate_batch(rs_model *m, gen_state *g, const int32_t *const *prompts,
                          const int *lens, int first, int B, const rs_gen_params *p,
                          rs_gen_output *out) {
    int T = 0;
    for (int b = 0; b < B; b++) T = lens[first + b] > T ? lens[first + b] : T;
    for (int b = 0; b < B; b++) {
        int i = first + b;
        for (int t = 0; t < T; t++) {
            g->tokens[b * T + t] = t < lens[i] ? prompts[i][t] : 0;
            g->pos[b * T + t] = t < lens[i] ? t : -1;
        }
        rs_rng_seed(&g->rngs[b], p->seeds ? p->seeds[i] : rs_gen_seed(p->seed, i));
        out[i].ids = rs_malloc((size_t)(p->max_new_tokens ? p->max_new_tokens : 1) * sizeof(int32_t));
        g->running[b] = p->max_new_tokens > 0;
    }
    if (p->max_new_tokens == 0) return 0;
    RS_TRY(forward_step(m, g, B, T));
    while (sample_step(g, m, B, p, out + first) > 0) {
        for (int b = 0; b < B; b++) { /* the token just drawn, at the next position */
            const rs_gen_output *o = &out[first + b];
            g->tokens[b] = g->running[b] ? o->ids[o->n_ids - 1] : 0;
            g->pos[b] = g->running[b] ? lens[first + b] + o->n_ids - 1 : -1;
        }
        RS_TRY(forward_step(m, g, B, 1));
    }
    return 0;
}

int rs_generate(rs_model *m, const int32_t *const *prompts, const int *prompt_lens, int n_prompts,
                const rs_gen_params *p, rs_gen_output *out) {
    memset(out, 0, (size_t)n_prompts * sizeof *out);
    RS_TRY(check_params(m, prompt_lens, n_prompts, p));
    if (n_prompts == 0) return 0;
    int max_len = 0, batch = p->batch_size < n_prompts ? p->batch_size : n_prompts;
    for (int i = 0; i < n_prompts; i++) max_len = prompt_lens[i] > max_len ? prompt_lens[i] : max_len;
    int max_seq = max_len + p->max_new_tokens;
    if (max_seq > m->cfg.max_position_embeddings)
        rs_warn("generate: up to %d positions, beyond the model's max_position_embeddings %d",
                max_seq, m->cfg.max_position_embeddings);
    gen_state g;
    memset(&g, 0, sizeof g);
    RS_TRY(rs_kv_cache_init(m, batch, max_seq, &g.cache));
    if (rs_model_reserve(m, batch * max_len, batch) != 0) {
        rs_kv_cache_free(m, &g.cache);
        return -1;
    }
    rs_sampler_init(&g.sampler, m->cfg.vocab_size);
    g.rngs = rs_malloc((size_t)batch * sizeof *g.rngs);
    g.logits = rs_malloc((size_t)batch * m->cfg.vocab_size * sizeof *g.logits);
    g.tokens = rs_malloc((size_t)batch * max_len * sizeof *g.tokens);
    g.pos = rs_malloc((size_t)batch * max_len * sizeof *g.pos);
    g.running = rs_malloc((size_t)batch * sizeof *g.running);
    g.next_ids = rs_malloc((size_t)batch * sizeof *g.next_ids);
    g.greedy = p->temperature <= 0.0f && m->be->argmax_rows != NULL;
    int rc = 0;
    long long n_tokens = 0;
    for (int first = 0; first < n_prompts && rc == 0; first += batch) {
        int B = n_prompts - first < batch ? n_prompts - first : batch;
        rc = generate_batch(m, &g, prompts, prompt_lens, first, B, p, out);
        for (int b = 0; b < B; b++) n_tokens += out[first + b].n_ids;
        if (rc == 0 && p->progress) p->progress(p->progress_user, first + B, n_prompts, n_tokens);
    }
    rs_kv_cache_free(m, &g.cache);
    rs_sampler_free(&g.sampler);
    free(g.rngs), free(g.logits), free(g.tokens), free(g.pos), free(g.running), free(g.next_ids);
    if (rc != 0) rs_gen_output_free(out, n_prompts);
    return rc;
}
