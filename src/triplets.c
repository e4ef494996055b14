/* triplets: the patch set (DESIGN.md sections 1 and 4; include/resafe/pipeline.h).
 *
 *  1. prompts: round(harmful_fraction * n_prompts) rows of [patch] harmful_file (rounded half
 *     away from zero) and the rest from benign_file, drawn without replacement and shuffled
 *     with an rng of [run] seed;
 *  2. both models answer them with the same chat template and decoding (rs_generate; prompt i
 *     samples from the same seed in both runs), one model loaded at a time;
 *  3. winner = FP response, loser = quantized response; identical pairs are counted and dropped;
 *  4. the reference: the quantized model's log-probs of both responses, computed by
 *     rs_dpo_reference (no adapter) with [dpo]'s micro-batches: the code path and batches
 *     `resafe dpo` would use (data parallel: split over the ranks by micro-batch, gathered);
 *  5. written as HDF5 (include/resafe/patchset.h), at a temporary name renamed when complete. */
#include "resafe/pipeline.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/dist.h"
#include "resafe/dpo.h"
#include "resafe/eval.h"
#include "resafe/gen_shard.h"
#include "resafe/generate.h"
#include "resafe/h5store.h"
#include "resafe/patchset.h"
#include "resafe/progress.h"
#include "resafe/records.h"
#include "resafe/sha256.h"

enum { HARMFUL = 0, BENIGN = 1 };
static const char *const g_source[2] = {"harmful", "benign"};

typedef struct {
    int source;            /* HARMFUL or BENIGN */
    int row;               /* 0-based data row of its file */
    const char *text;      /* the prompt as in its file (points into the table) */
    const char *category;  /* the category column, else the source's name */
    int32_t *ids;          /* what the models are fed */
    int n_ids;
    int skip;              /* too long for the model's context */
} trip_prompt;

typedef struct {
    const rs_config *cfg;
    const char *fp_dir, *q_dir, *out_path;
    rs_model_config mcfg;  /* the FP model's (the quantized one's is checked equal) */
    rs_table tables[2];
    int n_asked, n_drawn[2], n_too_long, n_identical;
    int n_complying; /* harmful pairs dropped: FP's winner is no refusal ([patch] harmful_winner) */
    const rs_tokenizer *tok;
    trip_prompt *prompts;
    int n_prompts;
    rs_gen_output *out[2]; /* [n_prompts] FP and quantized responses */
    int *pair_prompt;      /* [n_pairs] the prompt of each kept pair */
    int n_pairs, n_pairs_of[2];
    rs_pref_set set;       /* the kept pairs as DPO sees them, with the reference */
    rs_progress progress;
    long long tokens_before; /* tokens of the first model, for the display of the second */
    int prompts_before;
    rs_comm *comm; /* data parallel: generation split by prompt (gen_shard.h); NULL alone */
    int rank;      /* only rank 0 writes the patch set */
} triplets;

/* ---------------------------------------------------------------- the two models */

static int tokenizer_hash(const char *dir, char hex[65]) {
    char *path = rs_path_join(dir, "tokenizer.json");
    int rc = rs_sha256_file(path, hex);
    free(path);
    return rc;
}

/* The quantized model must be the FP model's quantization: same vocabulary, tokenizer and
 * shapes (checked from config.json and tokenizer.json, before either model is loaded). */
static int check_same_models(triplets *t) {
    rs_model_config q;
    RS_TRY(rs_hf_config_load(t->fp_dir, &t->mcfg));
    RS_TRY(rs_hf_config_load(t->q_dir, &q));
    const rs_model_config *f = &t->mcfg;
    struct {
        const char *what;
        int a, b;
    } fields[] = {{"vocab", f->vocab_size, q.vocab_size},
                  {"hidden_size", f->hidden_size, q.hidden_size},
                  {"intermediate_size", f->intermediate_size, q.intermediate_size},
                  {"layers", f->n_layers, q.n_layers},
                  {"attention heads", f->n_heads, q.n_heads},
                  {"key/value heads", f->n_kv_heads, q.n_kv_heads},
                  {"head_dim", f->head_dim, q.head_dim},
                  {"architecture", (int)f->arch, (int)q.arch}};
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        if (fields[i].a != fields[i].b)
            return RS_FAIL("FP model %s and quantized model %s differ: %s %d vs %d", t->fp_dir,
                           t->q_dir, fields[i].what, fields[i].a, fields[i].b);
    char hf[65], hq[65];
    RS_TRY(tokenizer_hash(t->fp_dir, hf));
    RS_TRY(tokenizer_hash(t->q_dir, hq));
    if (strcmp(hf, hq) != 0)
        return RS_FAIL("FP model %s and quantized model %s differ: tokenizer.json (sha256 %.12s "
                       "vs %.12s)",
                       t->fp_dir, t->q_dir, hf, hq);
    return 0;
}

/* ---------------------------------------------------------------- prompts */

/* take of the table's rows, without replacement: a partial Fisher-Yates shuffle. */
static int *draw_rows(int n_rows, int take, rs_rng *rng) {
    int *idx = rs_malloc((size_t)n_rows * sizeof *idx);
    for (int i = 0; i < n_rows; i++) idx[i] = i;
    for (int i = 0; i < take; i++) {
        int j = i + (int)(rs_rng_next(rng) % (uint64_t)(n_rows - i));
        int s = idx[i];
        idx[i] = idx[j], idx[j] = s;
    }
    return idx;
}

static int load_source(triplets *t, int src, int want, rs_rng *rng) {
    static const char *const file_key[2] = {"harmful_file", "benign_file"};
    static const char *const col_key[2] = {"harmful_column", "benign_column"};
    const char *file = rs_config_get_str(t->cfg, "patch", file_key[src]);
    if (!file[0])
        return RS_FAIL("[patch] %s is not set (%d %s prompts asked by n_prompts and "
                       "harmful_fraction)",
                       file_key[src], want, g_source[src]);
    rs_table *tab = &t->tables[src];
    RS_TRY(rs_table_load(file, 0, tab));
    int col;
    RS_TRY(rs_table_require(tab, rs_config_get_str(t->cfg, "patch", col_key[src]), &col));
    const char *cat_name = rs_config_get_str(t->cfg, "patch", "category_column");
    int cat = tab->is_txt ? -1 : rs_table_col(tab, cat_name); /* optional */
    int take = want < tab->n_rows ? want : tab->n_rows;
    if (take < want)
        rs_warn("%s: %d rows, fewer than the %d %s prompts asked: taking all of them", file,
                tab->n_rows, want, g_source[src]);
    int *idx = draw_rows(tab->n_rows, take, rng);
    int rc = 0;
    for (int i = 0; i < take && rc == 0; i++) {
        trip_prompt *p = &t->prompts[t->n_prompts];
        memset(p, 0, sizeof *p);
        p->source = src, p->row = idx[i];
        rc = rs_table_text(tab, p->row, col, 0, &p->text);
        const char *c = rs_table_cell(tab, p->row, cat);
        p->category = c && c[0] ? c : g_source[src];
        t->n_prompts += rc == 0;
    }
    free(idx);
    t->n_drawn[src] = take;
    return rc;
}

static int draw_prompts(triplets *t) {
    t->n_asked = (int)rs_config_get_int(t->cfg, "patch", "n_prompts");
    double frac = rs_config_get_float(t->cfg, "patch", "harmful_fraction");
    int want[2];
    want[HARMFUL] = (int)floor(frac * t->n_asked + 0.5);
    want[BENIGN] = t->n_asked - want[HARMFUL];
    rs_rng rng;
    rs_rng_seed(&rng, (uint64_t)rs_config_get_int(t->cfg, "run", "seed") ^ 0x7219e75ull);
    t->prompts = rs_calloc((size_t)t->n_asked, sizeof *t->prompts);
    for (int src = 0; src < 2; src++)
        if (want[src] > 0) RS_TRY(load_source(t, src, want[src], &rng));
    for (int i = t->n_prompts - 1; i > 0; i--) { /* one order for both sources */
        int j = (int)(rs_rng_next(&rng) % (uint64_t)(i + 1));
        trip_prompt s = t->prompts[i];
        t->prompts[i] = t->prompts[j], t->prompts[j] = s;
    }
    return 0;
}

/* The prompts as generation sees them ([generate] chat and system_prompt, [model]
 * chat_template; as `resafe generate --config`). Prompts whose answer would not fit in the
 * model's context are marked skipped. */
static int encode_prompts(triplets *t, const rs_tokenizer *tok, int max_new) {
    int chat = rs_config_get_bool(t->cfg, "generate", "chat");
    const char *system = rs_config_get_str(t->cfg, "generate", "system_prompt");
    rs_chat_kind kind = RS_CHAT_NONE;
    if (chat) RS_TRY(rs_chat_kind_of_config(t->cfg, t->fp_dir, &kind));
    int limit = t->mcfg.max_position_embeddings;
    if (t->mcfg.sliding_window > 0 && t->mcfg.sliding_window < limit)
        limit = t->mcfg.sliding_window;
    for (int i = 0; i < t->n_prompts; i++) {
        trip_prompt *p = &t->prompts[i];
        rs_chat_message msgs[2] = {{"system", system}, {"user", p->text}};
        int rc = chat ? rs_chat_encode(tok, kind, system[0] ? msgs : msgs + 1, system[0] ? 2 : 1,
                                       1, &p->ids, &p->n_ids)
                      : rs_tokenizer_encode(tok, p->text, strlen(p->text), 1, &p->ids, &p->n_ids);
        if (rc == 0 && p->n_ids == 0) rc = RS_FAIL("the prompt encodes to no tokens");
        if (rc != 0)
            return rs_fail_context("%s:%d", t->tables[p->source].path,
                                   t->tables[p->source].lines[p->row]);
        p->skip = (int64_t)p->n_ids + max_new > limit;
        t->n_too_long += p->skip;
    }
    if (t->n_too_long)
        rs_warn("triplets: %d prompts skipped: with %d new tokens they exceed the model's context "
                "of %d positions",
                t->n_too_long, max_new, limit);
    if (t->n_too_long == t->n_prompts)
        return RS_FAIL("triplets: every prompt is too long for the model's context (%d positions)",
                       limit);
    return 0;
}

/* ---------------------------------------------------------------- generation */

static void on_progress(void *user, int done, int n, long long tokens) {
    triplets *t = user;
    (void)n;
    rs_progress_update(&t->progress, t->prompts_before + done, t->tokens_before + tokens);
}

/* The decoding of both models: [patch] temperature and max_new_tokens, [generate] top_k, top_p,
 * seed and batch_size, the stop ids of the FP model's directory. */
static int gen_params(const triplets *t, rs_gen_params *p) {
    RS_TRY(rs_gen_params_init(p, t->fp_dir, &t->mcfg));
    const rs_config *c = t->cfg;
    p->max_new_tokens = (int)rs_config_get_int(c, "patch", "max_new_tokens");
    p->temperature = (float)rs_config_get_float(c, "patch", "temperature");
    p->top_k = (int)rs_config_get_int(c, "generate", "top_k");
    p->top_p = (float)rs_config_get_float(c, "generate", "top_p");
    p->seed = (uint64_t)rs_config_get_int(c, "generate", "seed");
    p->batch_size = (int)rs_config_get_int(c, "generate", "batch_size");
    return 0;
}

/* Responses of model `which` (0 FP, 1 quantized) to the prompts not skipped; out[which][i]. */
static int generate_with(triplets *t, rs_model *m, int which, rs_gen_params *p) {
    const int32_t **ids = rs_malloc((size_t)t->n_prompts * sizeof *ids);
    int *lens = rs_malloc((size_t)t->n_prompts * sizeof *lens);
    uint64_t *seeds = rs_malloc((size_t)t->n_prompts * sizeof *seeds);
    int *where = rs_malloc((size_t)t->n_prompts * sizeof *where), n = 0;
    for (int i = 0; i < t->n_prompts; i++)
        if (!t->prompts[i].skip) {
            ids[n] = t->prompts[i].ids, lens[n] = t->prompts[i].n_ids;
            seeds[n] = rs_gen_seed(p->seed, i); /* a prompt's draws do not depend on skips */
            where[n++] = i;
        }
    p->seeds = seeds;
    p->progress = on_progress, p->progress_user = t;
    rs_gen_output *out = rs_calloc((size_t)(n ? n : 1), sizeof *out);
    int rc = rs_generate_sharded(t->comm, m, ids, lens, n, p, out);
    t->out[which] = rs_calloc((size_t)t->n_prompts, sizeof *t->out[which]);
    for (int k = 0; rc == 0 && k < n; k++) {
        t->out[which][where[k]] = out[k];
        t->tokens_before += out[k].n_ids;
    }
    t->prompts_before += n;
    p->seeds = NULL;
    free(out), free(ids), free(lens), free(seeds), free(where);
    return rc;
}

static int load_model(const triplets *t, const char *dir, rs_model *m) {
    const rs_backend *be = rs_backend_by_name(rs_config_get_str(t->cfg, "model", "backend"));
    if (!be) return -1;
    return rs_model_load(dir, be, m);
}

/* ---------------------------------------------------------------- pairs and reference */

static void join_seq(rs_seq *s, const trip_prompt *p, const rs_gen_output *r) {
    s->n_prompt = p->n_ids, s->n = p->n_ids + r->n_ids;
    s->ids = rs_malloc((size_t)s->n * sizeof *s->ids);
    memcpy(s->ids, p->ids, (size_t)p->n_ids * sizeof *s->ids);
    memcpy(s->ids + p->n_ids, r->ids, (size_t)r->n_ids * sizeof *s->ids);
}

static int same_ids(const rs_gen_output *a, const rs_gen_output *b) {
    return a->n_ids == b->n_ids && memcmp(a->ids, b->ids, (size_t)a->n_ids * sizeof *a->ids) == 0;
}

static char *decode_text(const rs_tokenizer *tok, const int32_t *ids, int n);

/* [patch] harmful_winner = refusal: does the FP response to harmful prompt i refuse? */
static int winner_refuses(const triplets *t, const rs_judge *j, int i) {
    char *text = decode_text(t->tok, t->out[0][i].ids, t->out[0][i].n_ids);
    int r = rs_judge_is_refusal(j, text, strlen(text));
    free(text);
    return r;
}

static int build_pairs(triplets *t) {
    t->pair_prompt = rs_malloc((size_t)(t->n_prompts ? t->n_prompts : 1) * sizeof *t->pair_prompt);
    rs_judge judge;
    const char *winner = rs_config_get_str(t->cfg, "patch", "harmful_winner");
    const int refusal_only = !strcmp(winner, "refusal");
    if (refusal_only)
        RS_TRY(rs_judge_init(&judge, rs_config_get_str(t->cfg, "eval", "refusal_phrases")));
    for (int i = 0; i < t->n_prompts; i++) {
        if (t->prompts[i].skip) continue;
        if (same_ids(&t->out[0][i], &t->out[1][i])) t->n_identical++;
        else if (refusal_only && t->prompts[i].source == HARMFUL && !winner_refuses(t, &judge, i))
            t->n_complying++;
        else t->pair_prompt[t->n_pairs++] = i;
    }
    if (refusal_only) rs_judge_free(&judge);
    if (t->n_pairs == 0 && t->n_complying == 0)
        return RS_FAIL("triplets: all %d responses of the FP and the quantized model are "
                       "identical: no preference pairs (no patch set written)",
                       t->n_identical);
    if (t->n_pairs == 0)
        return RS_FAIL("triplets: no preference pairs: %d responses identical, %d harmful pairs "
                       "dropped because the FP response does not refuse ([patch] harmful_winner "
                       "= refusal; no patch set written)",
                       t->n_identical, t->n_complying);
    int min_pairs = (int)rs_config_get_int(t->cfg, "patch", "min_pairs");
    if (t->n_pairs < min_pairs)
        return RS_FAIL("triplets: only %d of %d responses of the FP and the quantized model "
                       "differ%s, fewer than [patch] min_pairs = %d: too few preference pairs to "
                       "patch (no patch set written)",
                       t->n_pairs, t->n_pairs + t->n_identical + t->n_complying,
                       t->n_complying ? " and are kept (harmful_winner = refusal)" : "",
                       min_pairs);
    rs_pref_alloc(&t->set, t->n_pairs);
    for (int k = 0; k < t->n_pairs; k++) {
        int i = t->pair_prompt[k];
        join_seq(&t->set.chosen[k], &t->prompts[i], &t->out[0][i]);
        join_seq(&t->set.rejected[k], &t->prompts[i], &t->out[1][i]);
        int len = t->set.chosen[k].n > t->set.rejected[k].n ? t->set.chosen[k].n
                                                             : t->set.rejected[k].n;
        if (len > t->set.max_len) t->set.max_len = len;
        t->n_pairs_of[t->prompts[i].source]++;
    }
    return 0;
}

/* rs_dpo_reference without an adapter, in [dpo]'s micro-batches (pairs in file order), so
 * `resafe dpo` on this patch set starts from these very numbers; data parallel, the ranks split
 * the micro-batches and gather (rs_dpo_reference_sharded: the same bytes as one process). */
static int reference(triplets *t, rs_model *qm) {
    const rs_config *c = t->cfg;
    rs_dpo_params dp = {.beta = (float)rs_config_get_float(c, "dpo", "beta"),
                        .micro_pairs = (int)rs_config_get_int(c, "dpo", "micro_batch_size")};
    RS_TRY(rs_train_recompute_of_config(c, &dp.recompute));
    int batch = (int)rs_config_get_int(c, "dpo", "batch_size");
    if (dp.micro_pairs == 0 || dp.micro_pairs > batch) dp.micro_pairs = batch;
    rs_dpo_trainer tr;
    double t0 = rs_now();
    RS_TRY(rs_dpo_trainer_init(&tr, qm, NULL, &t->set, &dp));
    int rc = rs_dpo_reference_sharded(&tr, t->comm);
    rs_dpo_trainer_free(&tr);
    if (rc == 0)
        rs_info("triplets: reference log-probs of %d pairs (quantized model) in %.1f s",
                t->n_pairs, rs_now() - t0);
    return rc;
}

/* ---------------------------------------------------------------- the file */

static int write_part(rs_h5 *h, const char *part, const triplets *t, int which) {
    int64_t n = t->n_pairs, total = 0;
    int64_t *off = rs_malloc((size_t)(n + 1) * sizeof *off);
    for (int64_t k = 0; k < n; k++) {
        int i = t->pair_prompt[k];
        off[k] = total;
        total += which < 0 ? t->prompts[i].n_ids : t->out[which][i].n_ids;
    }
    off[n] = total;
    int32_t *ids = rs_malloc((size_t)(total ? total : 1) * sizeof *ids);
    for (int64_t k = 0; k < n; k++) {
        int i = t->pair_prompt[k];
        const int32_t *src = which < 0 ? t->prompts[i].ids : t->out[which][i].ids;
        memcpy(ids + off[k], src, (size_t)(off[k + 1] - off[k]) * sizeof *ids);
    }
    char name[32];
    snprintf(name, sizeof name, "%s_ids", part);
    int rc = rs_h5_write(h, name, RS_I32, 1, &total, ids);
    snprintf(name, sizeof name, "%s_offsets", part);
    int64_t n1 = n + 1;
    if (rc == 0) rc = rs_h5_write(h, name, RS_I64, 1, &n1, off);
    free(ids), free(off);
    return rc;
}

/* The response as text (special tokens skipped). HDF5 strings end at a NUL byte, which a
 * <0x00> byte token decodes to: it is stored as U+FFFD (the ids are the record; texts are for
 * reading). */
static char *decode_text(const rs_tokenizer *tok, const int32_t *ids, int n) {
    size_t len = 0, nul = 0;
    char *s = rs_tokenizer_decode_n(tok, ids, n, 1, &len);
    if (!s) return rs_strdup(""); /* undecodable: the ids are what count */
    for (size_t i = 0; i < len; i++) nul += s[i] == '\0';
    if (!nul) return s;
    char *out = rs_malloc(len + 2 * nul + 1), *o = out;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '\0') memcpy(o, "\xEF\xBF\xBD", 3), o += 3;
        else *o++ = s[i];
    }
    *o = '\0';
    free(s);
    return out;
}

static int write_texts(rs_h5 *h, const triplets *t, const rs_tokenizer *tok) {
    int n = t->n_pairs, rc = 0;
    const char **s = rs_malloc((size_t)n * sizeof *s);
    char **dec[2];
    for (int w = 0; w < 2; w++) {
        dec[w] = rs_malloc((size_t)n * sizeof *dec[w]);
        for (int k = 0; k < n; k++) {
            const rs_gen_output *r = &t->out[w][t->pair_prompt[k]];
            dec[w][k] = decode_text(tok, r->ids, r->n_ids);
        }
    }
    for (int k = 0; k < n; k++) s[k] = t->prompts[t->pair_prompt[k]].text;
    rc = rs_h5_write_strings(h, "prompt", s, n);
    if (rc == 0) rc = rs_h5_write_strings(h, "winner_text", (const char *const *)dec[0], n);
    if (rc == 0) rc = rs_h5_write_strings(h, "loser_text", (const char *const *)dec[1], n);
    for (int k = 0; k < n; k++) s[k] = g_source[t->prompts[t->pair_prompt[k]].source];
    if (rc == 0) rc = rs_h5_write_strings(h, "source", s, n);
    for (int k = 0; k < n; k++) s[k] = t->prompts[t->pair_prompt[k]].category;
    if (rc == 0) rc = rs_h5_write_strings(h, "category", s, n);
    for (int w = 0; w < 2; w++) {
        for (int k = 0; k < n; k++) free(dec[w][k]);
        free(dec[w]);
    }
    free(s);
    return rc;
}

static int write_attrs(rs_h5 *h, const triplets *t) {
    static const char *const sections[] = {"patch", "generate", NULL};
    const rs_config *c = t->cfg;
    char hash[24];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)rs_config_hash(c, sections));
    struct {
        const char *name;
        int64_t v;
    } ints[] = {{"format_version", RS_PATCHSET_VERSION},
                {"n_prompts_asked", t->n_asked},
                {"n_harmful_prompts", t->n_drawn[HARMFUL]},
                {"n_benign_prompts", t->n_drawn[BENIGN]},
                {"n_too_long", t->n_too_long},
                {"n_identical", t->n_identical},
                {"n_complying_winners_dropped", t->n_complying},
                {"n_pairs", t->n_pairs},
                {"n_harmful_pairs", t->n_pairs_of[HARMFUL]},
                {"n_benign_pairs", t->n_pairs_of[BENIGN]},
                {"max_new_tokens", rs_config_get_int(c, "patch", "max_new_tokens")},
                {"seed", rs_config_get_int(c, "run", "seed")}};
    struct {
        const char *name, *v;
    } strs[] = {{"format", RS_PATCHSET_FORMAT},
                {"fp_model", t->fp_dir},
                {"quantized_model", t->q_dir},
                {"harmful_file", rs_config_get_str(c, "patch", "harmful_file")},
                {"benign_file", rs_config_get_str(c, "patch", "benign_file")},
                {"chat_template", rs_config_get_str(c, "model", "chat_template")},
                {"system_prompt", rs_config_get_str(c, "generate", "system_prompt")},
                {"config_hash", hash},
                {"resafe_version", RS_VERSION}};
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++)
        RS_TRY(rs_h5_set_attr_i64(h, NULL, ints[i].name, ints[i].v));
    for (size_t i = 0; i < sizeof strs / sizeof *strs; i++)
        RS_TRY(rs_h5_set_attr_str(h, NULL, strs[i].name, strs[i].v));
    return rs_h5_set_attr_f64(h, NULL, "temperature",
                              rs_config_get_float(c, "patch", "temperature"));
}

static int write_patchset(const triplets *t, const rs_tokenizer *tok) {
    char *dir = rs_strdup(t->out_path), *slash = strrchr(dir, '/');
    int rc = 0;
    if (slash && slash != dir) *slash = '\0', rc = rs_mkdir_p(dir);
    free(dir);
    RS_TRY(rc);
    rs_h5 *h;
    RS_TRY(rs_h5_create(t->out_path, &h));
    int64_t n = t->n_pairs;
    int64_t *rows = rs_malloc((size_t)n * sizeof *rows);
    for (int64_t k = 0; k < n; k++) rows[k] = t->prompts[t->pair_prompt[k]].row;
    rc = write_part(h, "prompt", t, -1);
    if (rc == 0) rc = write_part(h, "winner", t, 0);
    if (rc == 0) rc = write_part(h, "loser", t, 1);
    if (rc == 0) rc = write_texts(h, t, tok);
    if (rc == 0) rc = rs_h5_write(h, "source_row", RS_I64, 1, &n, rows);
    if (rc == 0) rc = rs_h5_write(h, "ref_winner", RS_F32, 1, &n, t->set.ref_chosen);
    if (rc == 0) rc = rs_h5_write(h, "ref_loser", RS_F32, 1, &n, t->set.ref_rejected);
    if (rc == 0) rc = write_attrs(h, t);
    free(rows);
    if (rc != 0) {
        rs_h5_close(h);
        return -1;
    }
    return rs_h5_commit(h);
}

/* ---------------------------------------------------------------- the stage */

static void free_triplets(triplets *t) {
    for (int w = 0; w < 2; w++)
        if (t->out[w]) {
            rs_gen_output_free(t->out[w], t->n_prompts);
            free(t->out[w]);
        }
    for (int i = 0; i < t->n_prompts; i++) free(t->prompts[i].ids);
    free(t->prompts), free(t->pair_prompt);
    for (int s = 0; s < 2; s++) rs_table_free(&t->tables[s]);
    rs_pref_free(&t->set);
}

/* Generation with both models, the pairs, the reference (the quantized model is loaded once for
 * its responses and the reference). */
static int answer_and_score(triplets *t) {
    rs_gen_params p;
    RS_TRY(gen_params(t, &p));
    rs_model m;
    rs_progress_start(&t->progress, "triplets", "prompts",
                      2 * (int64_t)(t->n_prompts - t->n_too_long));
    int rc = load_model(t, t->fp_dir, &m);
    if (rc == 0) {
        rc = generate_with(t, &m, 0, &p);
        rs_model_free(&m);
    }
    if (rc == 0) rc = load_model(t, t->q_dir, &m);
    if (rc != 0) {
        rs_progress_end(&t->progress);
        return -1;
    }
    rc = generate_with(t, &m, 1, &p);
    rs_progress_end(&t->progress);
    if (rc == 0) rc = build_pairs(t);
    if (rc == 0) rc = reference(t, &m);
    rs_model_free(&m);
    return rc;
}

/* Data parallel: the communicator before the backend starts (nccl picks the rank's GPU). The
 * ranks generate their prompts' responses and all hold all of them; the pairs are built on every
 * rank (the same numbers), the reference split by micro-batch and gathered, rank 0 writes. */
static int start_comm(triplets *t) {
    rs_dist d;
    RS_TRY(rs_dist_from_config(t->cfg, &d));
    t->rank = d.rank;
    if (d.world == 1) return 0;
    RS_TRY(rs_comm_from_config(t->cfg, &d, rs_config_get_str(t->cfg, "model", "backend"),
                               &t->comm));
    rs_info("triplets: generation split over %d ranks (%s transport); rank 0 writes", d.world,
            rs_comm_transport_name(t->comm));
    return 0;
}

int rs_triplets_run(const rs_config *cfg, const char *fp_dir, const char *q_dir,
                    const char *out_path) {
    if (!fp_dir || !fp_dir[0]) return RS_FAIL("triplets: no full-precision model ([model] path)");
    if (!q_dir || !q_dir[0]) return RS_FAIL("triplets: no quantized model ([quant] model)");
    triplets t;
    memset(&t, 0, sizeof t);
    t.cfg = cfg, t.fp_dir = fp_dir, t.q_dir = q_dir, t.out_path = out_path;
    int threads = (int)rs_config_get_int(cfg, "model", "threads");
    if (threads > 0) omp_set_num_threads(threads);
    int rc = start_comm(&t);
    if (rc == 0) rc = check_same_models(&t);
    if (rc == 0) rc = draw_prompts(&t);
    rs_tokenizer *tok = NULL;
    if (rc == 0 && !(tok = rs_tokenizer_load(fp_dir))) rc = -1;
    int max_new = (int)rs_config_get_int(cfg, "patch", "max_new_tokens");
    if (rc == 0) rc = encode_prompts(&t, tok, max_new);
    t.tok = tok;
    if (rc == 0) rc = answer_and_score(&t);
    if (rc == 0 && t.rank == 0) rc = write_patchset(&t, tok);
    if (t.comm && rc == 0) rc = rs_comm_finalize(t.comm);
    else if (t.comm) rs_comm_abort(t.comm);
    if (rc == 0)
        rs_info("triplets: %d pairs (%d harmful, %d benign), %d identical dropped, %d harmful "
                "dropped for a complying FP winner, %d prompts too long; wrote %s",
                t.n_pairs, t.n_pairs_of[HARMFUL], t.n_pairs_of[BENIGN], t.n_identical,
                t.n_complying, t.n_too_long, out_path);
    if (tok) rs_tokenizer_free(tok);
    free_triplets(&t);
    return rc;
}
