/* eval_model: one model's metrics (ASR, attacks, benign accuracy, over-refusal, perplexity, KL
 * and first-token flips versus the reference) and the reference pass they compare with. */
#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "eval_internal.h"
#include "resafe/shard.h"

/* ---------------------------------------------------------------- growing text buffer */
typedef struct {
    char *s;
    size_t n, cap;
} sbuf;

static void sb_add(sbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->s = rs_realloc(b->s, b->cap);
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}

/* A JSON string of len bytes that may hold NUL bytes (cJSON strings end at the first NUL). */
static cJSON *json_text(const char *s, size_t len) {
    char *out = rs_malloc(6 * len + 3), *o = out;
    *o++ = '"';
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            *o++ = '\\', *o++ = (char)c;
        else if (c < 0x20 || c == 0x7f)
            o += sprintf(o, "\\u%04x", c);
        else
            *o++ = (char)c;
    }
    *o++ = '"';
    *o = 0;
    cJSON *item = cJSON_CreateRaw(out);
    free(out);
    return item;
}

static void sb_line(sbuf *b, cJSON *obj) {
    char *line = cJSON_PrintUnformatted(obj);
    sb_add(b, line, strlen(line));
    sb_add(b, "\n", 1);
    cJSON_free(line);
    cJSON_Delete(obj);
}

static cJSON *line_start(const char *set, int index, const eval_item *it) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "set", set);
    cJSON_AddNumberToObject(o, "index", index);
    if (it->category)
        cJSON_AddStringToObject(o, "category", it->category);
    else
        cJSON_AddNullToObject(o, "category");
    cJSON_AddStringToObject(o, "prompt", it->prompt);
    return o;
}

/* ---------------------------------------------------------------- logits helpers */

static double log_sum_exp(const float *z, int V) {
    double mx = z[0], s = 0;
    for (int v = 1; v < V; v++) mx = z[v] > mx ? z[v] : mx;
    for (int v = 0; v < V; v++) s += exp((double)z[v] - mx);
    return mx + log(s);
}

static int argmax(const float *z, int V) {
    int best = 0;
    for (int v = 1; v < V; v++)
        if (z[v] > z[best]) best = v;
    return best;
}

/* z[t] minus the largest other logit. */
static double logit_gap(const float *z, int V, int t) {
    double other = -INFINITY;
    for (int v = 0; v < V; v++)
        if (v != t && z[v] > other) other = z[v];
    return (double)z[t] - other;
}

/* Prompts processed in batches that fit a logits budget (rows * vocab floats). */
static int batch_for(const ev_model *em, int rows_per_seq, int cap) {
    size_t budget = (size_t)64 << 20; /* floats: 256 MiB of fp32 logits */
    size_t per = (size_t)rows_per_seq * (size_t)em->m.cfg.vocab_size;
    int b = per ? (int)(budget / per) : cap;
    return b < 1 ? 1 : b > cap ? cap : b;
}

typedef void (*row_fn)(void *user, int seq, int t, const float *logits, int target);

/* Sequences per forward of a pass over sequences of len[0..n): the batch size is the set's, so
 * every part of the set runs in the batches the whole set does. */
static int pass_batch(const ev_model *em, const int *len, int n, int last_only) {
    int T = 0;
    for (int i = 0; i < n; i++) T = len[i] > T ? len[i] : T;
    return batch_for(em, last_only ? 1 : T, em->gen.batch_size < n ? em->gen.batch_size : n);
}

/* Run sequences [lo, hi) of n through the model (right-padded batches of the whole set's
 * pass_batch, from lo, no generation) and call fn for each position t in [start[i] - 1,
 * len[i] - 2] with its logits and the next token (target), in order of sequence then position.
 * last_only: only the last position of each sequence (target -1). */
static int run_positions_range(ev_model *em, int32_t *const *ids, const int *len, const int *start,
                               int n, int lo, int hi, int last_only, row_fn fn, void *user,
                               rs_progress *bar) {
    int V = em->m.cfg.vocab_size, T = 0, rc = 0;
    for (int i = 0; i < n; i++) T = len[i] > T ? len[i] : T;
    if (hi <= lo || T == 0) return 0;
    int B = pass_batch(em, len, n, last_only);
    int rows = last_only ? B : B * T;
    rs_kv_cache cache;
    RS_TRY(rs_kv_cache_init(&em->m, B, T, &cache));
    if (rs_model_reserve(&em->m, B * T, rows) != 0) {
        rs_kv_cache_free(&em->m, &cache);
        return -1;
    }
    int32_t *tok = rs_malloc((size_t)B * T * sizeof *tok),
            *pos = rs_malloc((size_t)B * T * sizeof *pos);
    float *logits = rs_malloc((size_t)rows * V * sizeof *logits);
    for (int first = lo; first < hi && rc == 0; first += B) {
        int nb = hi - first < B ? hi - first : B, Tb = 0;
        for (int b = 0; b < nb; b++) Tb = len[first + b] > Tb ? len[first + b] : Tb;
        for (int b = 0; b < nb; b++)
            for (int t = 0; t < Tb; t++) {
                int in = t < len[first + b];
                tok[b * Tb + t] = in ? ids[first + b][t] : 0;
                pos[b * Tb + t] = in ? t : -1;
            }
        rc = rs_model_forward(&em->m, &cache, tok, pos, nb, Tb,
                              last_only ? RS_LOGITS_LAST : RS_LOGITS_ALL, logits);
        for (int b = 0; rc == 0 && b < nb; b++) {
            int i = first + b;
            if (last_only) {
                fn(user, i, len[i] - 1, logits + (size_t)b * V, -1);
                continue;
            }
            for (int t = start[i] - 1; t <= len[i] - 2; t++)
                fn(user, i, t, logits + ((size_t)b * Tb + t) * V, ids[i][t + 1]);
        }
        if (bar) rs_progress_update(bar, first + nb - lo, bar->tokens + (long long)nb * Tb);
    }
    free(tok), free(pos), free(logits);
    rs_kv_cache_free(&em->m, &cache);
    return rc;
}

static int run_positions(ev_model *em, int32_t *const *ids, const int *len, const int *start, int n,
                         int last_only, row_fn fn, void *user, rs_progress *bar) {
    return run_positions_range(em, ids, len, start, n, 0, n, last_only, fn, user, bar);
}

/* ---------------------------------------------------------------- passes split over the ranks */

/* A teacher-forced pass whose every position gives one number (its NLL, its KL term) over the
 * ranks of a data-parallel job: rank r runs the whole batches rs_chunk_shard names (the batches
 * of one process, so each position's logits, and its number, are one process's bytes) and an
 * all-gather hands every rank every position's number in sequence-then-position order; the caller
 * sums them in that order, as one process adds them up, so the sum is bit-identical whatever the
 * world size. One process (comm NULL or world 1) runs the whole set. */
typedef int (*value_fn)(void *user, const float *logits, int target, double *value);

typedef struct {
    value_fn fn;
    void *user;
    double *v;
    long n, cap;
    int failed; /* fn failed (its message recorded): the later rows are skipped */
} collect_ctx;

static void collect_row(void *user, int i, int t, const float *z, int target) {
    (void)i, (void)t;
    collect_ctx *c = user;
    if (c->failed) return;
    if (c->n == c->cap) c->v = rs_realloc(c->v, (size_t)(c->cap = 2 * c->cap + 64) * sizeof *c->v);
    c->failed = c->fn(c->user, z, target, &c->v[c->n++]) != 0;
}

/* This rank's sequences of a pass over n (all of them alone). */
static rs_shard pass_shard(const ev_model *em, const int *len, int n) {
    int world = em->comm ? rs_comm_world(em->comm) : 1,
        rank = em->comm ? rs_comm_rank(em->comm) : 0;
    rs_shard s = {0, n};
    if (world > 1 && n > 0) rs_chunk_shard(n, pass_batch(em, len, n, 0), world, rank, &s);
    return s;
}

/* The numbers of every position of sequences [0, n) (*values malloc'ed, *n_values of them): this
 * rank computes those of sequences s (pass_shard), the ranks all-gather. `what` names the pass
 * in the log and in a failed gather ("q/ppl"). -1 when fn failed (its message) or the gather did;
 * *values is then NULL. */
static int position_values(ev_model *em, int32_t *const *ids, const int *len, const int *start,
                           int n, rs_shard s, value_fn fn, void *user, rs_progress *bar,
                           const char *what, double **values, long *n_values) {
    collect_ctx c = {fn, user, NULL, 0, 0, 0};
    int rc = run_positions_range(em, ids, len, start, n, s.first, s.first + s.count, 0, collect_row,
                                 &c, bar);
    if (c.failed) rc = -1; /* before the gather: the other ranks see this one exit */
    int world = em->comm ? rs_comm_world(em->comm) : 1;
    if (rc == 0 && world > 1) {
        rs_debug("eval: %s: sequences [%d, %d) of %d computed here (rank %d of %d)", what, s.first,
                 s.first + s.count, n, rs_comm_rank(em->comm), world);
        size_t *sizes = rs_calloc((size_t)world, sizeof *sizes), total = 0;
        void *all = NULL;
        rc = rs_comm_all_gather(em->comm, c.v ? (void *)c.v : (void *)"", (size_t)c.n * sizeof *c.v,
                                &all, sizes, what);
        for (int r = 0; rc == 0 && r < world; r++) total += sizes[r];
        if (rc == 0 && total % sizeof *c.v != 0)
            rc = RS_FAIL("eval: %s: the ranks sent %zu bytes, not whole numbers", what, total);
        free(c.v), free(sizes);
        c.v = all, c.n = (long)(total / sizeof *c.v);
    }
    if (rc != 0) free(c.v), c.v = NULL, c.n = 0;
    *values = c.v, *n_values = c.n;
    return rc;
}

/* ---------------------------------------------------------------- the reference */

typedef struct {
    ev_reference *ref;
    int V;
    int failed;
} ref_ctx;

static void ref_first(void *user, int i, int t, const float *z, int target) {
    (void)t, (void)target;
    ref_ctx *r = user;
    int a = argmax(z, r->V);
    r->ref->first_tok[i] = a;
    r->ref->first_p[i] = exp((double)z[a] - log_sum_exp(z, r->V));
    r->ref->first_gap[i] = logit_gap(z, r->V, a);
}

/* The reference's logits row as the model gave them (fp32) and its log-normaliser (double): the
 * log-probs without a rounding step, in 4 V + 8 bytes per position. */
static void ref_logp(void *user, int i, int t, const float *z, int target) {
    (void)i, (void)t, (void)target;
    ref_ctx *r = user;
    double lse = log_sum_exp(z, r->V);
    if (fwrite(z, sizeof *z, (size_t)r->V, r->ref->logp) != (size_t)r->V ||
        fwrite(&lse, sizeof lse, 1, r->ref->logp) != 1)
        r->failed = 1;
    r->ref->n_positions++;
}

/* The reference's benign sequences: its prompt ids + its greedy response, cut to its context. */
static int ref_benign(const eval_ctx *c, ev_model *em, ev_reference *ref) {
    int32_t **ids;
    int *lens, n = c->benign.n;
    RS_TRY(ev_encode_prompts(c, em, &c->benign, &ids, &lens));
    rs_gen_output *out = rs_calloc((size_t)n + 1, sizeof *out);
    int rc = ev_generate(em, ids, lens, n, &em->gen, NULL, 0, out);
    ref->n_benign = n;
    ref->seq_ids = rs_calloc((size_t)n + 1, sizeof *ref->seq_ids);
    ref->seq_len = rs_calloc((size_t)n + 1, sizeof *ref->seq_len);
    ref->seq_prompt = rs_calloc((size_t)n + 1, sizeof *ref->seq_prompt);
    int ctx = em->m.cfg.max_position_embeddings;
    for (int i = 0; rc == 0 && i < n; i++) {
        int L = lens[i] + out[i].n_ids;
        if (L > ctx) L = ctx;
        ref->seq_ids[i] = rs_malloc((size_t)(L + 1) * sizeof(int32_t));
        memcpy(ref->seq_ids[i], ids[i], (size_t)(lens[i] < L ? lens[i] : L) * sizeof(int32_t));
        for (int t = lens[i]; t < L; t++) ref->seq_ids[i][t] = out[i].ids[t - lens[i]];
        ref->seq_len[i] = L;
        ref->seq_prompt[i] = lens[i] < L ? lens[i] : L;
    }
    if (rc == 0) rs_gen_output_free(out, n);
    free(out);
    ev_free_ids(ids, lens, n);
    return rc;
}

int ev_reference_run(const eval_ctx *c, const char *dir, ev_reference *ref) {
    memset(ref, 0, sizeof *ref);
    if (!c->harmful.present && !c->benign.present) return 0;
    double t0 = rs_now();
    ev_model em;
    RS_TRY(ev_model_open(c, dir, &em));
    int V = ref->vocab = em.m.cfg.vocab_size, rc = 0;
    ref_ctx r = {ref, V, 0};
    if (c->harmful.present) {
        int32_t **ids;
        int *lens, n = ref->n_harmful = c->harmful.n;
        rc = ev_encode_prompts(c, &em, &c->harmful, &ids, &lens);
        if (rc == 0) {
            ref->first_tok = rs_calloc((size_t)n + 1, sizeof *ref->first_tok);
            ref->first_p = rs_calloc((size_t)n + 1, sizeof *ref->first_p);
            ref->first_gap = rs_calloc((size_t)n + 1, sizeof *ref->first_gap);
            rc = run_positions(&em, ids, lens, lens, n, 1, ref_first, &r, NULL);
            ev_free_ids(ids, lens, n);
        }
    }
    if (rc == 0 && c->benign.present) rc = ref_benign(c, &em, ref);
    if (rc == 0 && c->benign.present) {
        ref->logp = tmpfile();
        if (!ref->logp)
            rc = RS_FAIL("eval: cannot create a temporary file for the reference log-probs");
        if (rc == 0)
            rc = run_positions(&em, ref->seq_ids, ref->seq_len, ref->seq_prompt, ref->n_benign, 0,
                               ref_logp, &r, NULL);
        if (rc == 0 && (r.failed || fflush(ref->logp) != 0))
            rc = RS_FAIL(
                "eval: writing the reference log-probs to a temporary file failed (disk full?)");
    }
    ev_model_close(&em);
    if (rc == 0)
        rs_info("eval: reference %s: %ld response positions (%.1f s)", dir, ref->n_positions,
                rs_now() - t0);
    else
        rs_fail_context("reference %s", dir);
    return rc;
}

void ev_reference_free(ev_reference *ref) {
    for (int i = 0; i < ref->n_benign; i++) free(ref->seq_ids ? ref->seq_ids[i] : NULL);
    free(ref->seq_ids), free(ref->seq_len), free(ref->seq_prompt);
    free(ref->first_tok), free(ref->first_p), free(ref->first_gap);
    if (ref->logp) fclose(ref->logp);
    memset(ref, 0, sizeof *ref);
}

/* ---------------------------------------------------------------- per-category counts */
typedef struct {
    int n;
    char **names;
    int *hits, *total;
} cat_counts;

static void cat_add(cat_counts *cc, const char *name, int hit) {
    int k = 0;
    while (k < cc->n && strcmp(cc->names[k], name) != 0) k++;
    if (k == cc->n) {
        cc->names = rs_realloc(cc->names, (size_t)(k + 1) * sizeof *cc->names);
        cc->hits = rs_realloc(cc->hits, (size_t)(k + 1) * sizeof *cc->hits);
        cc->total = rs_realloc(cc->total, (size_t)(k + 1) * sizeof *cc->total);
        cc->names[k] = rs_strdup(name), cc->hits[k] = cc->total[k] = 0;
        cc->n++;
    }
    cc->hits[k] += hit, cc->total[k]++;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* {category: hits / total}, categories sorted; null when the set has no categories. */
static cJSON *cat_json(cat_counts *cc, int has_category) {
    if (!has_category) {
        for (int k = 0; k < cc->n; k++) free(cc->names[k]);
        free(cc->names), free(cc->hits), free(cc->total);
        return cJSON_CreateNull();
    }
    char **sorted = rs_malloc((size_t)(cc->n + 1) * sizeof *sorted);
    memcpy(sorted, cc->names, (size_t)cc->n * sizeof *sorted);
    qsort(sorted, (size_t)cc->n, sizeof *sorted, cmp_str);
    cJSON *o = cJSON_CreateObject();
    for (int s = 0; s < cc->n; s++)
        for (int k = 0; k < cc->n; k++)
            if (cc->names[k] == sorted[s])
                cJSON_AddNumberToObject(o, cc->names[k], (double)cc->hits[k] / cc->total[k]);
    for (int k = 0; k < cc->n; k++) free(cc->names[k]);
    free(sorted), free(cc->names), free(cc->hits), free(cc->total);
    return o;
}

static void add_rate(cJSON *o, const char *key, int present, double hits, double n) {
    if (present && n > 0)
        cJSON_AddNumberToObject(o, key, hits / n);
    else
        cJSON_AddNullToObject(o, key);
}

/* ---------------------------------------------------------------- one model */

typedef struct {
    const eval_ctx *c;
    const ev_reference *ref;
    const rs_eval_model *model;
    ev_model em;
    sbuf lines;
    cJSON *json;
} model_run;

static void progress_begin(rs_progress *bar, const model_run *r, const char *set, int64_t total) {
    char stage[64];
    snprintf(stage, sizeof stage, "%s/%s", r->model->name, set);
    stage[31] = 0;
    rs_progress_start(bar, stage, "prompts", total);
}

/* First-response-token statistics of one harmful prompt versus the reference. */
typedef struct {
    const ev_reference *ref;
    int V;
    int32_t *tok;
    double flips, shift, gap_change;
} first_ctx;

static void model_first(void *user, int i, int t, const float *z, int target) {
    (void)t, (void)target;
    first_ctx *f = user;
    int a = argmax(z, f->V), tr = f->ref->first_tok[i];
    f->tok[i] = a;
    f->flips += a != tr;
    f->shift += exp((double)z[tr] - log_sum_exp(z, f->V)) - f->ref->first_p[i];
    f->gap_change += fabs(logit_gap(z, f->V, tr) - f->ref->first_gap[i]);
}

static int harmful_greedy(model_run *r, int32_t **ids, int *lens) {
    const eval_ctx *c = r->c;
    int n = c->harmful.n, rc = 0, V = r->em.m.cfg.vocab_size;
    first_ctx f = {r->ref, V, rs_calloc((size_t)n + 1, sizeof(int32_t)), 0, 0, 0};
    if (r->ref) rc = run_positions(&r->em, ids, lens, lens, n, 1, model_first, &f, NULL);
    rs_gen_output *out = rs_calloc((size_t)n + 1, sizeof *out);
    rs_progress bar;
    progress_begin(&bar, r, "harmful", n);
    if (rc == 0) rc = ev_generate(&r->em, ids, lens, n, &r->em.gen, &bar, 0, out);
    rs_progress_end(&bar);
    cat_counts cc = {0};
    int unsafe = 0;
    for (int i = 0; rc == 0 && i < n; i++) {
        size_t len;
        char *text = ev_decode(&r->em, &out[i], &len);
        int refusal = rs_judge_is_refusal(&c->judge, text, len);
        unsafe += !refusal;
        const eval_item *it = &c->harmful.items[i];
        if (it->category) cat_add(&cc, it->category, !refusal);
        cJSON *o = line_start("harmful", i, it);
        cJSON_AddItemToObject(o, "response", json_text(text, len));
        cJSON_AddBoolToObject(o, "refusal", refusal);
        if (r->ref) {
            cJSON_AddNumberToObject(o, "first_token", f.tok[i]);
            cJSON_AddNumberToObject(o, "ref_first_token", r->ref->first_tok[i]);
            cJSON_AddBoolToObject(o, "flip", f.tok[i] != r->ref->first_tok[i]);
        }
        sb_line(&r->lines, o);
        free(text);
    }
    if (rc == 0) rs_gen_output_free(out, n);
    free(out);
    add_rate(r->json, "asr", 1, unsafe, n);
    cJSON_AddItemToObject(r->json, "asr_per_category", cat_json(&cc, c->harmful.has_category));
    cJSON_AddNumberToObject(r->json, "n_harmful", n);
    add_rate(r->json, "flip_rate", r->ref != NULL, f.flips, n);
    add_rate(r->json, "prob_shift", r->ref != NULL, f.shift, n);
    add_rate(r->json, "logit_gap_change", r->ref != NULL, f.gap_change, n);
    free(f.tok);
    return rc;
}

/* The seed of (setting s, sample j, prompt i): independent of batching and of the other
 * settings, fixed by [run] seed. */
static uint64_t attack_seed(uint64_t seed, int s, int samples, int j) {
    return rs_gen_seed(seed ^ 0x61747461636b2121ull, s * samples + j);
}

static int attacks(model_run *r, int32_t **ids, int *lens) {
    const eval_ctx *c = r->c;
    int n = c->harmful.n, S = c->n_settings, J = c->attack_samples, rc = 0;
    uint8_t *broken = rs_calloc((size_t)S * n + 1, 1);
    uint64_t *seeds = rs_malloc((size_t)(n + 1) * sizeof *seeds);
    rs_gen_output *out = rs_calloc((size_t)n + 1, sizeof *out);
    rs_progress bar;
    progress_begin(&bar, r, "attacks", (int64_t)S * J * n);
    for (int s = 0; rc == 0 && s < S; s++)
        for (int j = 0; rc == 0 && j < J; j++) {
            const attack_setting *a = &c->settings[s];
            rs_gen_params p = r->em.gen;
            p.temperature = (float)a->temperature, p.top_k = a->top_k, p.top_p = (float)a->top_p;
            uint64_t base = attack_seed(c->seed, s, J, j);
            for (int i = 0; i < n; i++) seeds[i] = rs_gen_seed(base, i);
            p.seeds = seeds;
            rc = ev_generate(&r->em, ids, lens, n, &p, &bar, (int64_t)(s * J + j) * n, out);
            for (int i = 0; rc == 0 && i < n; i++) {
                size_t len;
                char *text = ev_decode(&r->em, &out[i], &len);
                int refusal = rs_judge_is_refusal(&c->judge, text, len);
                broken[(size_t)s * n + i] |= !refusal;
                cJSON *o = line_start("attack", i, &c->harmful.items[i]);
                cJSON_AddNumberToObject(o, "setting", s);
                cJSON_AddNumberToObject(o, "sample", j);
                cJSON_AddNumberToObject(o, "temperature", a->temperature);
                cJSON_AddNumberToObject(o, "top_k", a->top_k);
                cJSON_AddNumberToObject(o, "top_p", a->top_p);
                cJSON_AddItemToObject(o, "response", json_text(text, len));
                cJSON_AddBoolToObject(o, "refusal", refusal);
                sb_line(&r->lines, o);
                free(text);
            }
            if (rc == 0) rs_gen_output_free(out, n);
        }
    rs_progress_end(&bar);
    cJSON *ja = cJSON_AddObjectToObject(r->json, "attacks"), *list = cJSON_CreateArray();
    int worst = 0;
    for (int i = 0; i < n; i++) {
        int any = 0;
        for (int s = 0; s < S; s++) any |= broken[(size_t)s * n + i];
        worst += any;
    }
    add_rate(ja, "worst_case_asr", 1, worst, n);
    cJSON_AddNumberToObject(ja, "samples", J);
    for (int s = 0; s < S; s++) {
        cJSON *o = cJSON_CreateObject();
        int hits = 0;
        for (int i = 0; i < n; i++) hits += broken[(size_t)s * n + i];
        cJSON_AddNumberToObject(o, "temperature", c->settings[s].temperature);
        cJSON_AddNumberToObject(o, "top_k", c->settings[s].top_k);
        cJSON_AddNumberToObject(o, "top_p", c->settings[s].top_p);
        add_rate(o, "asr", 1, hits, n);
        cJSON_AddItemToArray(list, o);
    }
    cJSON_AddItemToObject(ja, "settings", list);
    free(broken), free(seeds), free(out);
    return rc;
}

static int harmful_all(model_run *r) {
    const eval_ctx *c = r->c;
    if (!c->harmful.present) {
        const char *keys[] = {"asr",        "asr_per_category", "n_harmful", "flip_rate",
                              "prob_shift", "logit_gap_change", "attacks"};
        for (int k = 0; k < 7; k++) cJSON_AddNullToObject(r->json, keys[k]);
        return 0;
    }
    int32_t **ids;
    int *lens;
    RS_TRY(ev_encode_prompts(c, &r->em, &c->harmful, &ids, &lens));
    int rc = harmful_greedy(r, ids, lens);
    if (rc == 0 && c->n_settings)
        rc = attacks(r, ids, lens);
    else if (rc == 0)
        cJSON_AddNullToObject(r->json, "attacks");
    ev_free_ids(ids, lens, c->harmful.n);
    return rc;
}

/* Greedy responses to the benign (with answers) or the safe set. */
static int greedy_set(model_run *r, const eval_set *s) {
    const eval_ctx *c = r->c;
    int benign = s == &c->benign;
    const char *k_rate = benign ? "benign_accuracy" : "over_refusal";
    const char *k_cat = benign ? "benign_per_category" : NULL,
               *k_n = benign ? "n_benign" : "n_safe";
    if (!s->present) {
        cJSON_AddNullToObject(r->json, k_rate);
        if (k_cat) cJSON_AddNullToObject(r->json, k_cat);
        if (benign) cJSON_AddNullToObject(r->json, "benign_refusal");
        cJSON_AddNullToObject(r->json, k_n);
        return 0;
    }
    int32_t **ids;
    int *lens, n = s->n;
    RS_TRY(ev_encode_prompts(c, &r->em, s, &ids, &lens));
    rs_gen_output *out = rs_calloc((size_t)n + 1, sizeof *out);
    rs_progress bar;
    progress_begin(&bar, r, s->name, n);
    int rc = ev_generate(&r->em, ids, lens, n, &r->em.gen, &bar, 0, out);
    rs_progress_end(&bar);
    cat_counts cc = {0};
    int hits = 0, refusals = 0;
    for (int i = 0; rc == 0 && i < n; i++) {
        size_t len;
        char *text = ev_decode(&r->em, &out[i], &len);
        const eval_item *it = &s->items[i];
        int refusal = rs_judge_is_refusal(&c->judge, text, len);
        int correct = benign && rs_answer_correct(c->match, text, len, it->answer);
        hits += benign ? correct : refusal;
        refusals += refusal;
        if (benign && it->category) cat_add(&cc, it->category, correct);
        cJSON *o = line_start(s->name, i, it);
        cJSON_AddItemToObject(o, "response", json_text(text, len));
        cJSON_AddBoolToObject(o, "refusal", refusal);
        if (benign) {
            cJSON_AddStringToObject(o, "answer", it->answer);
            cJSON_AddBoolToObject(o, "correct", correct);
        }
        sb_line(&r->lines, o);
        free(text);
    }
    if (rc == 0) rs_gen_output_free(out, n);
    free(out);
    ev_free_ids(ids, lens, n);
    add_rate(r->json, k_rate, 1, hits, n);
    if (k_cat) cJSON_AddItemToObject(r->json, k_cat, cat_json(&cc, s->has_category));
    if (benign) add_rate(r->json, "benign_refusal", 1, refusals, n);
    cJSON_AddNumberToObject(r->json, k_n, n);
    return rc;
}

/* Perplexity: held-out texts with the tokenizer's specials (BOS), no chat template, cut to the
 * context; exp of the mean NLL over every predicted token of every text. */
typedef struct {
    int V;
    double nll;
    long n;
} ppl_ctx;

static int ppl_value(void *user, const float *z, int target, double *value) {
    const ppl_ctx *p = user;
    *value = log_sum_exp(z, p->V) - (double)z[target];
    return 0;
}

static int perplexity(model_run *r) {
    const eval_set *s = &r->c->heldout;
    if (!s->present) {
        cJSON_AddNullToObject(r->json, "ppl");
        cJSON_AddNullToObject(r->json, "ppl_tokens");
        return 0;
    }
    int n = s->n, ctx = r->em.m.cfg.max_position_embeddings, rc = 0;
    int32_t **ids = rs_calloc((size_t)n + 1, sizeof *ids);
    int *lens = rs_calloc((size_t)n + 1, sizeof *lens),
        *start = rs_calloc((size_t)n + 1, sizeof *start);
    for (int i = 0; rc == 0 && i < n; i++) {
        const char *text = s->items[i].prompt;
        rc = rs_tokenizer_encode(r->em.tok, text, strlen(text), 1, &ids[i], &lens[i]);
        if (rc != 0) rs_fail_context("%s: text %d", s->path, i + 1);
        if (lens[i] > ctx) lens[i] = ctx;
        start[i] = 1;
    }
    ppl_ctx p = {r->em.m.cfg.vocab_size, 0, 0};
    rs_progress bar;
    progress_begin(&bar, r, "ppl", n);
    double *v = NULL;
    long nv = 0;
    char what[128];
    snprintf(what, sizeof what, "%s/ppl", r->model->name);
    if (rc == 0)
        rc = position_values(&r->em, ids, lens, start, n, pass_shard(&r->em, lens, n), ppl_value,
                             &p, &bar, what, &v, &nv);
    rs_progress_end(&bar);
    for (long j = 0; j < nv; j++) p.nll += v[j]; /* in order: one process's sum */
    p.n = nv;
    free(v);
    ev_free_ids(ids, lens, n);
    free(start);
    if (p.n > 0)
        cJSON_AddNumberToObject(r->json, "ppl", exp(p.nll / (double)p.n));
    else
        cJSON_AddNullToObject(r->json, "ppl");
    cJSON_AddNumberToObject(r->json, "ppl_tokens", (double)p.n);
    return rc;
}

/* KL(p_ref || p_model) at every position that predicts a token of the reference's response. */
typedef struct {
    const ev_reference *ref;
    int V;
    float *row;
    double kl;
    long n;
} kl_ctx;

/* Reads the reference's row of this position (the file is at it: rows in position order). */
static int kl_value(void *user, const float *z, int target, double *value) {
    (void)target;
    kl_ctx *k = user;
    double ref_lse;
    if (fread(k->row, sizeof *k->row, (size_t)k->V, k->ref->logp) != (size_t)k->V ||
        fread(&ref_lse, sizeof ref_lse, 1, k->ref->logp) != 1)
        return RS_FAIL("eval: reading the reference log-probs back failed");
    double lse = log_sum_exp(z, k->V), kl = 0;
    for (int v = 0; v < k->V; v++) {
        double lr = (double)k->row[v] - ref_lse;
        kl += exp(lr) * (lr - ((double)z[v] - lse));
    }
    *value = kl;
    return 0;
}

/* The reference file at the first position of sequence `first`: rows of V floats and a double,
 * len - start positions per sequence (run_positions). */
static int kl_seek(const ev_reference *ref, int first) {
    int64_t rows = 0;
    for (int i = 0; i < first; i++)
        rows += ref->seq_len[i] > ref->seq_prompt[i] ? ref->seq_len[i] - ref->seq_prompt[i] : 0;
    int64_t at = rows * ((int64_t)ref->vocab * (int64_t)sizeof(float) + (int64_t)sizeof(double));
    if (fseeko(ref->logp, (off_t)at, SEEK_SET) != 0)
        return RS_FAIL("eval: seeking the reference log-probs to position %lld failed",
                       (long long)rows);
    return 0;
}

static int kl_to_reference(model_run *r) {
    const ev_reference *ref = r->ref;
    if (!ref || !ref->logp) {
        cJSON_AddNullToObject(r->json, "kl_to_fp");
        cJSON_AddNullToObject(r->json, "kl_positions");
        return 0;
    }
    kl_ctx k = {ref, ref->vocab, rs_malloc((size_t)ref->vocab * sizeof(float)), 0, 0};
    rs_shard s = pass_shard(&r->em, ref->seq_len, ref->n_benign);
    double *v = NULL;
    long nv = 0;
    char what[128];
    snprintf(what, sizeof what, "%s/kl", r->model->name);
    rs_progress bar;
    progress_begin(&bar, r, "kl", ref->n_benign);
    int rc = kl_seek(ref, s.first);
    if (rc == 0)
        rc = position_values(&r->em, ref->seq_ids, ref->seq_len, ref->seq_prompt, ref->n_benign, s,
                             kl_value, &k, &bar, what, &v, &nv);
    rs_progress_end(&bar);
    for (long j = 0; j < nv; j++) k.kl += v[j]; /* in order: one process's sum */
    k.n = nv;
    free(k.row), free(v);
    if (rc == 0 && k.n != ref->n_positions)
        rc = RS_FAIL("eval: %ld KL positions, the reference has %ld", k.n, ref->n_positions);
    add_rate(r->json, "kl_to_fp", 1, k.kl, (double)k.n);
    cJSON_AddNumberToObject(r->json, "kl_positions", (double)k.n);
    return rc;
}

static int write_responses(model_run *r, const char *out_dir) {
    if (r->c->rank != 0) return 0;
    char *dir = rs_path_join(out_dir, r->model->name), *path = rs_path_join(dir, "responses.jsonl");
    int rc = rs_mkdir_p(dir);
    if (rc == 0) rc = rs_write_file_atomic(path, r->lines.s ? r->lines.s : "", r->lines.n);
    free(dir), free(path);
    return rc;
}

int ev_model_run(const eval_ctx *c, const rs_eval_model *model, const ev_reference *ref,
                 const char *out_dir, cJSON **out) {
    model_run r;
    memset(&r, 0, sizeof r);
    r.c = c, r.model = model;
    r.ref = ref && (ref->first_tok || ref->logp) ? ref : NULL;
    double t0 = rs_now();
    RS_TRY(ev_model_open(c, model->dir, &r.em));
    int rc = 0;
    if (r.ref && r.ref->vocab != r.em.m.cfg.vocab_size)
        rc = RS_FAIL("%s: vocabulary of %d tokens, the reference has %d", model->dir,
                     r.em.m.cfg.vocab_size, r.ref->vocab);
    r.json = cJSON_CreateObject();
    cJSON_AddStringToObject(r.json, "dir", model->dir);
    if (rc == 0) rc = harmful_all(&r);
    if (rc == 0) rc = greedy_set(&r, &c->benign);
    if (rc == 0) rc = greedy_set(&r, &c->safe);
    if (rc == 0) rc = perplexity(&r);
    if (rc == 0) rc = kl_to_reference(&r);
    if (rc == 0) rc = write_responses(&r, out_dir);
    ev_model_close(&r.em);
    free(r.lines.s);
    if (rc != 0) {
        cJSON_Delete(r.json);
        return -1;
    }
    rs_info("eval: %s (%s) done in %.1f s", model->name, model->dir, rs_now() - t0);
    *out = r.json;
    return 0;
}
