/* dpo: preference data, the DPO loss and its gradient through the model (equations in
 * include/resafe/dpo.h). The training loop that drives it lives in dpo_run.c. */
#include "resafe/dpo.h"
#include "resafe/shard.h"

#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- data */

void rs_pref_alloc(rs_pref_set *set, int n) {
    memset(set, 0, sizeof *set);
    set->n = n;
    size_t k = (size_t)(n ? n : 1);
    set->chosen = rs_calloc(k, sizeof *set->chosen);
    set->rejected = rs_calloc(k, sizeof *set->rejected);
    set->ref_chosen = rs_calloc(k, sizeof *set->ref_chosen);
    set->ref_rejected = rs_calloc(k, sizeof *set->ref_rejected);
}

void rs_pref_free(rs_pref_set *set) {
    for (int i = 0; i < set->n; i++) rs_seq_free(&set->chosen[i]), rs_seq_free(&set->rejected[i]);
    free(set->chosen), free(set->rejected), free(set->ref_chosen), free(set->ref_rejected);
    memset(set, 0, sizeof *set);
}

typedef struct {
    const rs_encoder *enc;
    rs_pref_set *set;
    int cap, n_with_ref;
} pref_loader;

/* Optional precomputed reference log-prob: 1 present, 0 absent, -1 malformed. */
static int get_ref(const cJSON *obj, const char *key, const char *path, int line, float *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble > 0)
        return RS_FAIL("%s:%d: \"%s\" is not a finite log-probability (a number <= 0)", path, line,
                       key);
    *out = (float)v->valuedouble;
    return 1;
}

static int add_pair(void *user, const cJSON *obj, const char *path, int line) {
    pref_loader *L = user;
    rs_pref_set *s = L->set;
    const char *prompt, *chosen, *rejected;
    RS_TRY(rs_json_get_string(obj, "prompt", path, line, &prompt));
    RS_TRY(rs_json_get_string(obj, "chosen", path, line, &chosen));
    RS_TRY(rs_json_get_string(obj, "rejected", path, line, &rejected));
    if (s->n == L->cap) {
        L->cap = L->cap ? 2 * L->cap : 64;
        s->chosen = rs_realloc(s->chosen, (size_t)L->cap * sizeof *s->chosen);
        s->rejected = rs_realloc(s->rejected, (size_t)L->cap * sizeof *s->rejected);
        s->ref_chosen = rs_realloc(s->ref_chosen, (size_t)L->cap * sizeof *s->ref_chosen);
        s->ref_rejected = rs_realloc(s->ref_rejected, (size_t)L->cap * sizeof *s->ref_rejected);
    }
    int i = s->n, cut_w = 0, cut_l = 0;
    int has_w = get_ref(obj, "ref_chosen", path, line, &s->ref_chosen[i]);
    int has_l = has_w < 0 ? -1 : get_ref(obj, "ref_rejected", path, line, &s->ref_rejected[i]);
    if (has_w < 0 || has_l < 0) return -1;
    if (has_w != has_l)
        return RS_FAIL("%s:%d: give both \"ref_chosen\" and \"ref_rejected\", or neither", path,
                       line);
    if (rs_encode_example(L->enc, prompt, chosen, &s->chosen[i], &cut_w) != 0)
        return rs_fail_context("%s:%d: chosen", path, line);
    if (rs_encode_example(L->enc, prompt, rejected, &s->rejected[i], &cut_l) != 0) {
        rs_seq_free(&s->chosen[i]);
        return rs_fail_context("%s:%d: rejected", path, line);
    }
    s->n++;
    L->n_with_ref += has_w;
    s->n_truncated += cut_w + cut_l;
    int len = s->chosen[i].n > s->rejected[i].n ? s->chosen[i].n : s->rejected[i].n;
    if (len > s->max_len) s->max_len = len;
    return 0;
}

int rs_pref_load_jsonl(const char *path, const rs_encoder *enc, rs_pref_set *set) {
    memset(set, 0, sizeof *set);
    pref_loader L = {enc, set, 0, 0};
    int rc = rs_jsonl_each(path, add_pair, &L);
    if (rc == 0 && set->n == 0) rc = RS_FAIL("%s: no preference pairs", path);
    if (rc == 0 && L.n_with_ref != 0 && L.n_with_ref != set->n)
        rc = RS_FAIL("%s: %d of %d pairs have reference log-probs: give them for every pair or "
                     "for none",
                     path, L.n_with_ref, set->n);
    if (rc != 0) {
        rs_pref_free(set);
        return -1;
    }
    set->has_ref = L.n_with_ref == set->n;
    if (set->n_truncated)
        rs_warn("%s: %d responses cut to max_seq_len %d tokens", path, set->n_truncated,
                enc->max_len);
    return 0;
}

static int cut_seq(rs_seq *s, int max_len) {
    if (s->n <= max_len) return 0;
    s->n = max_len;
    return 1;
}

int rs_pref_truncate(rs_pref_set *set, int max_len, const char *label) {
    int cut = 0;
    set->max_len = 0;
    for (int i = 0; i < set->n; i++) {
        rs_seq *w = &set->chosen[i], *l = &set->rejected[i];
        if (w->n_prompt >= max_len || l->n_prompt >= max_len)
            return RS_FAIL("%s: pair %d: the prompt is %d tokens: no room for a response within "
                           "max_seq_len %d",
                           label, i, w->n_prompt, max_len);
        cut += cut_seq(w, max_len) + cut_seq(l, max_len);
        int len = w->n > l->n ? w->n : l->n;
        if (len > set->max_len) set->max_len = len;
    }
    set->n_truncated += cut;
    return cut;
}

/* ---------------------------------------------------------------- loss */

/* log(1 + e^x) without overflow. */
static double softplus(double x) { return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x)); }
static double sigmoid(double x) {
    if (x >= 0) return 1 / (1 + exp(-x));
    double e = exp(x);
    return e / (1 + e);
}

void rs_dpo_pair_loss(double beta, double pi_w, double pi_l, double ref_w, double ref_l,
                      rs_dpo_pair *out) {
    out->reward_chosen = beta * (pi_w - ref_w);
    out->reward_rejected = beta * (pi_l - ref_l);
    double x = out->reward_chosen - out->reward_rejected; /* beta z */
    out->loss = softplus(-x);                              /* -log sigmoid(x) */
    double g = -beta * sigmoid(-x);                        /* dloss/dpi_w = beta dloss/dx */
    out->d_chosen = g;
    out->d_rejected = -g;
}

/* ---------------------------------------------------------------- trainer */

int rs_dpo_trainer_init(rs_dpo_trainer *t, rs_model *m, rs_lora *lora, rs_pref_set *data,
                        const rs_dpo_params *p) {
    memset(t, 0, sizeof *t);
    t->m = m, t->lora = lora, t->data = data, t->p = *p;
    if (t->p.micro_pairs < 1) t->p.micro_pairs = 1;
    int B = 2 * t->p.micro_pairs;
    t->state = rs_train_state_new(m, lora, B, data->max_len, p->recompute, p->share_prompt);
    if (!t->state) return -1;
    rs_batch_buf_init(&t->bb, B, data->max_len);
    t->logp = rs_malloc((size_t)B * sizeof *t->logp);
    t->d_logp = rs_malloc((size_t)B * sizeof *t->d_logp);
    t->seqs = rs_malloc((size_t)B * sizeof *t->seqs);
    return 0;
}

void rs_dpo_trainer_free(rs_dpo_trainer *t) {
    if (t->state) rs_train_state_free(t->state);
    rs_batch_buf_free(&t->bb);
    free(t->logp), free(t->d_logp), free(t->seqs);
    memset(t, 0, sizeof *t);
}

/* Chosen then rejected sequences of pairs idx[0..k) into the batch buffer: each pair's prompt
 * shared by both when share_prompt (and the packed batch is the smaller). */
static const rs_train_batch *pair_batch(rs_dpo_trainer *t, const int32_t *idx, int k,
                                        int with_rejected) {
    for (int i = 0; i < k; i++) {
        t->seqs[i] = &t->data->chosen[idx[i]];
        t->seqs[k + i] = &t->data->rejected[idx[i]];
    }
    const rs_train_batch *b = NULL;
    if (with_rejected && t->p.share_prompt) b = rs_batch_fill_pairs(&t->bb, t->seqs, k);
    if (b && !t->told_shared) {
        t->told_shared = 1;
        rs_debug("dpo: shared prompts: a batch of %d pairs runs %d prompt rows and %d x %d "
                 "response rows", k, b->n_prefix * b->T_prefix, b->B, b->T);
    }
    return b ? b : rs_batch_fill(&t->bb, t->seqs, with_rejected ? 2 * k : k, NULL);
}

/* Reference log-probs of pairs [first, end) in micro-batches from `first` (a batch boundary of
 * the whole pass, or 0). */
static int reference_range(rs_dpo_trainer *t, int first, int end) {
    rs_pref_set *d = t->data;
    int enabled = t->lora ? t->lora->enabled : 0, rc = 0;
    if (t->lora) t->lora->enabled = 0; /* the forward then takes the plain model's path */
    int32_t *idx = rs_malloc((size_t)t->p.micro_pairs * sizeof *idx);
    for (int a = first; a < end && rc == 0; a += t->p.micro_pairs) {
        int k = end - a < t->p.micro_pairs ? end - a : t->p.micro_pairs;
        for (int i = 0; i < k; i++) idx[i] = a + i;
        rc = rs_train_forward(t->m, t->lora, t->state, pair_batch(t, idx, k, 1), t->logp);
        for (int i = 0; i < k && rc == 0; i++) {
            d->ref_chosen[a + i] = t->logp[i];
            d->ref_rejected[a + i] = t->logp[k + i];
        }
    }
    if (t->lora) t->lora->enabled = enabled;
    free(idx);
    return rc;
}

int rs_dpo_reference(rs_dpo_trainer *t) { return rs_dpo_reference_sharded(t, NULL); }

/* Every rank's share (pairs in order, chosen then rejected per pair) into the arrays. */
static int unpack_refs(rs_pref_set *d, int micro_pairs, int world, const float *all,
                       const size_t *sizes) {
    for (int r = 0; r < world; r++) {
        rs_shard s;
        rs_chunk_shard(d->n, micro_pairs, world, r, &s);
        if (sizes[r] != 2 * (size_t)s.count * sizeof *all)
            return RS_FAIL("dpo reference: rank %d sent %zu bytes for its %d pairs (%zu expected)",
                           r, sizes[r], s.count, 2 * (size_t)s.count * sizeof *all);
        for (int i = 0; i < s.count; i++) {
            d->ref_chosen[s.first + i] = *all++;
            d->ref_rejected[s.first + i] = *all++;
        }
    }
    return 0;
}

int rs_dpo_reference_sharded(rs_dpo_trainer *t, rs_comm *comm) {
    rs_pref_set *d = t->data;
    int world = comm ? rs_comm_world(comm) : 1, rank = comm ? rs_comm_rank(comm) : 0;
    rs_shard s;
    rs_chunk_shard(d->n, t->p.micro_pairs, world, rank, &s);
    RS_TRY(reference_range(t, s.first, s.first + s.count));
    if (world > 1) {
        float *mine = rs_malloc((2 * (size_t)s.count + 1) * sizeof *mine);
        for (int i = 0; i < s.count; i++) {
            mine[2 * i] = d->ref_chosen[s.first + i];
            mine[2 * i + 1] = d->ref_rejected[s.first + i];
        }
        size_t *sizes = rs_calloc((size_t)world, sizeof *sizes);
        void *all = NULL;
        int rc = rs_comm_all_gather(comm, mine, 2 * (size_t)s.count * sizeof *mine, &all, sizes,
                                    "the reference log-probs");
        if (rc == 0) rc = unpack_refs(d, t->p.micro_pairs, world, all, sizes);
        free(mine), free(sizes), free(all);
        RS_TRY(rc);
    }
    d->has_ref = 1;
    return 0;
}

int rs_dpo_accumulate(rs_dpo_trainer *t, const int32_t *idx, int n, rs_dpo_stats *stats) {
    const rs_pref_set *d = t->data;
    RS_CHECK(d->has_ref, "bug: DPO step before the reference log-probs");
    rs_dpo_stats sum = {0};
    sum.n_pairs = n;
    int denom = t->global_pairs > 0 ? t->global_pairs : n; /* the mean is over this many pairs */
    for (int a = 0; a < n; a += t->p.micro_pairs) {
        int k = n - a < t->p.micro_pairs ? n - a : t->p.micro_pairs;
        const int32_t *mi = idx + a;
        const rs_train_batch *b = pair_batch(t, mi, k, 1);
        RS_TRY(rs_train_forward(t->m, t->lora, t->state, b, t->logp));
        for (int i = 0; i < k; i++) {
            rs_dpo_pair r;
            double pw = t->logp[i], pl = t->logp[k + i];
            rs_dpo_pair_loss(t->p.beta, pw, pl, d->ref_chosen[mi[i]], d->ref_rejected[mi[i]], &r);
            const rs_seq *w = &d->chosen[mi[i]];
            int n_resp = w->n - w->n_prompt; /* >= 1 by rs_encode_example */
            double sft = t->p.sft_weight;
            /* -log p(winner) per response token: a length-free weight for the added term */
            sum.loss += r.loss + sft * (-pw / n_resp);
            t->d_logp[i] = (float)((r.d_chosen - sft / n_resp) / denom);
            t->d_logp[k + i] = (float)(r.d_rejected / denom);
            sum.reward_chosen += r.reward_chosen, sum.reward_rejected += r.reward_rejected;
            sum.margin += r.reward_chosen - r.reward_rejected;
            sum.accuracy += r.reward_chosen > r.reward_rejected;
            sum.logp_chosen += pw, sum.logp_rejected += pl;
        }
        const int last = a + k >= n;
        if (last) rs_train_state_set_layer_hook(t->state, t->layer_done, t->layer_done_user);
        int rc = rs_train_backward(t->m, t->lora, t->state, b, t->d_logp, NULL);
        if (last) rs_train_state_set_layer_hook(t->state, NULL, NULL);
        RS_TRY(rc);
    }
    if (stats) {
        *stats = sum;
        double *fields[] = {&stats->loss, &stats->reward_chosen, &stats->reward_rejected,
                            &stats->margin, &stats->accuracy, &stats->logp_chosen,
                            &stats->logp_rejected};
        for (size_t f = 0; f < sizeof fields / sizeof *fields; f++) *fields[f] /= denom;
    }
    return 0;
}

int rs_dpo_nll_accumulate(rs_dpo_trainer *t, const int32_t *idx, int n, double *loss) {
    const rs_pref_set *d = t->data;
    long n_targets = 0;
    for (int i = 0; i < n; i++) n_targets += d->chosen[idx[i]].n - d->chosen[idx[i]].n_prompt;
    if (t->global_targets > 0) n_targets = t->global_targets;
    double total = 0;
    for (int a = 0; a < n; a += t->p.micro_pairs) {
        int k = n - a < t->p.micro_pairs ? n - a : t->p.micro_pairs;
        const rs_train_batch *b = pair_batch(t, idx + a, k, 0);
        RS_TRY(rs_train_forward(t->m, t->lora, t->state, b, t->logp));
        for (int i = 0; i < k; i++) {
            total -= t->logp[i];
            t->d_logp[i] = (float)(-1.0 / (double)n_targets);
        }
        RS_TRY(rs_train_backward(t->m, t->lora, t->state, b, t->d_logp, NULL));
    }
    if (loss) *loss = total / (double)n_targets;
    return 0;
}
