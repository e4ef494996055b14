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

/* One KV-cache slot: the prompt it holds (-1: idle) and how many of its tokens are cached. */
typedef struct {
    int prompt, fed;
} gen_slot;

/* Scratch of the whole run, sized once: batch slots, calls of up to batch x max_T tokens. */
typedef struct {
    rs_kv_cache cache;
    rs_sampler sampler;
    gen_slot *slots;
    rs_rng *rngs;      /* [batch] the generator of each slot's prompt */
    float *logits;     /* [batch, vocab] */
    int32_t *tokens, *pos;
    int batch, max_T;
    int greedy;        /* temperature <= 0 and the backend has argmax_rows: ids, not logits */
    int32_t *next_ids; /* [batch] the greedy step's ids */
    int next_prompt, n_done;
    long long n_tokens, n_calls, n_rows, n_real; /* generated; forward calls and their rows */
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

/* Slot b takes the next waiting prompt, or goes idle when none is left. */
static void refill(gen_state *g, int b, int n_prompts, const rs_gen_params *p, rs_gen_output *out) {
    gen_slot *s = &g->slots[b];
    s->prompt = g->next_prompt < n_prompts ? g->next_prompt++ : -1;
    s->fed = 0;
    if (s->prompt < 0) return;
    int i = s->prompt;
    rs_rng_seed(&g->rngs[b], p->seeds ? p->seeds[i] : rs_gen_seed(p->seed, i));
    out[i].ids = rs_malloc((size_t)p->max_new_tokens * sizeof(int32_t));
}

/* Tokens slot b feeds in a call of T per sequence: the rest of its prompt (at most T), else
 * its last generated token. */
static int slot_tokens(const gen_state *g, int b, const int *lens, int T) {
    const gen_slot *s = &g->slots[b];
    if (s->prompt < 0) return 0;
    int left = lens[s->prompt] - s->fed;
    return left == 0 ? 1 : left < T ? left : T;
}

/* The call's tokens per sequence: 1 when every slot decodes; while some prefill, the longest
 * chunk whose padding (slots that feed fewer tokens) stays within a quarter of the real tokens
 * (on cpu every row costs its arithmetic: a prompt beside decoding slots is fed a token per
 * call), or whose rows stay within the backend's free rows (a GPU call costs the weights'
 * read up to there). *B: the sequences up to the last busy slot. */
static int call_width(const gen_state *g, const rs_model *m, const int *lens, int *B) {
    int longest = 1;
    *B = 0;
    for (int b = 0; b < g->batch; b++) {
        if (g->slots[b].prompt < 0) continue;
        *B = b + 1;
        int left = lens[g->slots[b].prompt] - g->slots[b].fed;
        longest = left > longest ? left : longest;
    }
    int T = 1;
    for (int t = 2; t <= longest && t <= g->max_T; t++) {
        long long real = 0;
        for (int b = 0; b < *B; b++) real += slot_tokens(g, b, lens, t);
        if (4LL * *B * t <= 5 * real || (long long)*B * t <= m->be->free_rows) T = t;
    }
    return T;
}

/* Fill tokens/pos [B, T]: each slot's next tokens at their positions, padding after them. */
static void stage_call(gen_state *g, const int32_t *const *prompts, const int *lens,
                       const rs_gen_output *out, int B, int T) {
    for (int b = 0; b < B; b++) {
        const gen_slot *s = &g->slots[b];
        int k = slot_tokens(g, b, lens, T);
        for (int t = 0; t < T; t++) {
            int32_t id = 0, at = -1;
            if (t < k && s->fed < lens[s->prompt]) {
                id = prompts[s->prompt][s->fed + t], at = s->fed + t;
            } else if (t < k) {
                const rs_gen_output *o = &out[s->prompt];
                id = o->ids[o->n_ids - 1], at = lens[s->prompt] + o->n_ids - 1;
            }
            g->tokens[b * T + t] = id;
            g->pos[b * T + t] = at;
        }
        g->n_real += k;
    }
    g->n_rows += (long long)B * T;
    g->n_calls++;
}

/* One forward call: greedy decoding takes the argmax ids from the device, sampling the logits. */
static int forward_step(rs_model *m, gen_state *g, int B, int T) {
    if (g->greedy) return rs_model_forward_greedy(m, &g->cache, g->tokens, g->pos, B, T, g->next_ids);
    return rs_model_forward(m, &g->cache, g->tokens, g->pos, B, T, RS_LOGITS_LAST, g->logits);
}

/* After a call: every slot whose prompt is now cached takes its next token; a finished
 * response frees its slot for the next prompt. Returns how many prompts finished. */
static int take_tokens(rs_model *m, gen_state *g, const int *lens, int n_prompts, int B, int T,
                       const rs_gen_params *p, rs_gen_output *out) {
    int V = m->cfg.vocab_size, finished = 0;
    for (int b = 0; b < B; b++) {
        gen_slot *s = &g->slots[b];
        if (s->prompt < 0) continue;
        int k = slot_tokens(g, b, lens, T);
        if (s->fed < lens[s->prompt]) s->fed += k;
        if (s->fed < lens[s->prompt]) continue; /* a prefill chunk: no token yet */
        rs_gen_output *o = &out[s->prompt];
        int32_t id = g->greedy ? g->next_ids[b]
                               : rs_sampler_next(&g->sampler, g->logits + (size_t)b * V, p,
                                                 &g->rngs[b]);
        o->ids[o->n_ids++] = id;
        o->hit_eos = is_eos(p, id);
        g->n_tokens++;
        if (o->hit_eos || o->n_ids == p->max_new_tokens) {
            finished++;
            refill(g, b, n_prompts, p, out);
        }
    }
    return finished;
}

/* Continuous batching: the slots run until every prompt has been answered. */
static int generate_all(rs_model *m, gen_state *g, const int32_t *const *prompts, const int *lens,
                        int n_prompts, const rs_gen_params *p, rs_gen_output *out) {
    for (int b = 0; b < g->batch; b++) refill(g, b, n_prompts, p, out);
    while (g->n_done < n_prompts) {
        int B, T = call_width(g, m, lens, &B);
        stage_call(g, prompts, lens, out, B, T);
        RS_TRY(forward_step(m, g, B, T));
        int finished = take_tokens(m, g, lens, n_prompts, B, T, p, out);
        g->n_done += finished;
        if (finished && p->progress) p->progress(p->progress_user, g->n_done, n_prompts, g->n_tokens);
    }
    return 0;
}

static void gen_state_free(const rs_model *m, gen_state *g) {
    rs_kv_cache_free(m, &g->cache);
    rs_sampler_free(&g->sampler);
    free(g->slots), free(g->rngs), free(g->logits), free(g->tokens), free(g->pos);
    free(g->next_ids);
}

int rs_generate(rs_model *m, const int32_t *const *prompts, const int *prompt_lens, int n_prompts,
                const rs_gen_params *p, rs_gen_output *out) {
    memset(out, 0, (size_t)n_prompts * sizeof *out);
    RS_TRY(check_params(m, prompt_lens, n_prompts, p));
    if (n_prompts == 0) return 0;
    if (p->max_new_tokens == 0) { /* nothing to run: every response is empty */
        for (int i = 0; i < n_prompts; i++) out[i].ids = rs_malloc(sizeof(int32_t));
        return 0;
    }
    int max_len = 0, batch = p->batch_size < n_prompts ? p->batch_size : n_prompts;
    for (int i = 0; i < n_prompts; i++) max_len = prompt_lens[i] > max_len ? prompt_lens[i] : max_len;
    /* any prompt may land in any slot: each slot holds the longest prompt and its response */
    int max_seq = max_len + p->max_new_tokens;
    if (max_seq > m->cfg.max_position_embeddings)
        rs_warn("generate: up to %d positions, beyond the model's max_position_embeddings %d",
                max_seq, m->cfg.max_position_embeddings);
    gen_state g;
    memset(&g, 0, sizeof g);
    g.batch = batch;
    g.max_T = max_len;
    RS_TRY(rs_kv_cache_init(m, batch, max_seq, &g.cache));
    if (rs_model_reserve(m, batch * max_len, batch) != 0) {
        rs_kv_cache_free(m, &g.cache);
        return -1;
    }
    rs_sampler_init(&g.sampler, m->cfg.vocab_size);
    g.slots = rs_malloc((size_t)batch * sizeof *g.slots);
    g.rngs = rs_malloc((size_t)batch * sizeof *g.rngs);
    g.logits = rs_malloc((size_t)batch * m->cfg.vocab_size * sizeof *g.logits);
    g.tokens = rs_malloc((size_t)batch * max_len * sizeof *g.tokens);
    g.pos = rs_malloc((size_t)batch * max_len * sizeof *g.pos);
    g.next_ids = rs_malloc((size_t)batch * sizeof *g.next_ids);
    g.greedy = p->temperature <= 0.0f && m->be->argmax_rows != NULL;
    int rc = generate_all(m, &g, prompts, prompt_lens, n_prompts, p, out);
    if (rc == 0)
        rs_debug("generate: %lld forward calls over %d slots, %lld token rows (%lld real)",
                 g.n_calls, batch, g.n_rows, g.n_real);
    gen_state_free(m, &g);
    if (rc != 0) rs_gen_output_free(out, n_prompts);
    return rc;
}
