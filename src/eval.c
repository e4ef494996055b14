/* eval: the evaluation stage (rs_eval_run in include/resafe/pipeline.h).
 *
 * For every model, loaded one at a time: greedy responses to the harmful prompts judged by the
 * keyword judge (ASR, per category), the decoding-attack grid (worst case per prompt), benign
 * accuracy, over-refusal on safe prompts, perplexity on held-out text, and, against the
 * reference (full-precision) model: KL on the reference's benign responses and first-response-
 * token flips on the harmful prompts. The reference is evaluated first; what the models are
 * compared with (its log-probs over the benign responses) goes to an anonymous temporary file,
 * so memory does not grow with the set sizes. */
#include <cJSON.h>
#include <dirent.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "eval_internal.h"
#include "resafe/dist.h"
#include "resafe/progress.h"
#include "resafe/train.h"

/* ---------------------------------------------------------------- the sets */

static void free_set(eval_set *s) {
    for (int i = 0; i < s->n; i++)
        free(s->items[i].prompt), free(s->items[i].category), free(s->items[i].answer);
    free(s->items);
    memset(s, 0, sizeof *s);
}

/* "column=value" of [eval] safe_filter. */
static int parse_filter(const char *f, char **col, char **value) {
    const char *eq = strchr(f, '=');
    if (!eq || eq == f)
        return RS_FAIL("[eval] safe_filter '%s': expected column=value (XSTest: label=safe)", f);
    *col = rs_strndup(f, (size_t)(eq - f));
    *value = rs_strdup(eq + 1);
    return 0;
}

/* Read one set: the text column, optional category and answer columns, an optional filter. */
static int load_set(eval_set *s, const char *name, const char *path, const char *text_col,
                    const char *cat_col, const char *answer_col, const char *filter, int n_max) {
    memset(s, 0, sizeof *s);
    s->name = name;
    if (!path[0]) return 0;
    s->present = 1;
    s->path = path;
    rs_table t;
    RS_TRY(rs_table_load(path, 0, &t));
    int tc, ac = -1, fc = -1, rc = rs_table_require(&t, text_col, &tc);
    int cc = cat_col && !t.is_txt ? rs_table_col(&t, cat_col) : -1;
    char *fcol = NULL, *fval = NULL;
    if (rc == 0 && answer_col) rc = rs_table_require(&t, answer_col, &ac);
    if (rc == 0 && filter && filter[0]) rc = parse_filter(filter, &fcol, &fval);
    if (rc == 0 && fcol) rc = rs_table_require(&t, fcol, &fc);
    s->has_category = cc >= 0;
    s->items = rs_calloc((size_t)t.n_rows + 1, sizeof *s->items);
    for (int r = 0; rc == 0 && r < t.n_rows && (n_max <= 0 || s->n < n_max); r++) {
        if (fc >= 0) {
            const char *v = rs_table_cell(&t, r, fc);
            if (!v || strcmp(v, fval) != 0) continue;
        }
        const char *text, *answer = NULL, *cat = rs_table_cell(&t, r, cc);
        rc = rs_table_text(&t, r, tc, 0, &text);
        if (rc == 0 && ac >= 0) rc = rs_table_text(&t, r, ac, 0, &answer);
        if (rc != 0) break;
        eval_item *it = &s->items[s->n++];
        it->prompt = rs_strdup(text);
        it->answer = answer ? rs_strdup(answer) : NULL;
        it->category = cc >= 0 ? rs_strdup(cat && cat[0] ? cat : "unknown") : NULL;
    }
    if (rc == 0 && s->n == 0)
        rc =
            RS_FAIL("%s: no rows%s%s", path, fcol ? " match safe_filter " : "", fcol ? filter : "");
    free(fcol), free(fval);
    rs_table_free(&t);
    if (rc != 0) free_set(s);
    return rc;
}

/* Comma list of numbers ("0.5,0.7,1.0") of an [eval] key. */
static int parse_list(const rs_config *cfg, const char *key, int integer, double lo, double hi,
                      double **out, int *n) {
    const char *text = rs_config_get_str(cfg, "eval", key);
    char *copy = rs_strdup(text), *save = NULL;
    *out = NULL, *n = 0;
    for (char *tok = strtok_r(copy, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
        char *end;
        double v = strtod(tok, &end);
        if (*end || !(v >= lo && v <= hi) || (integer && v != floor(v))) {
            RS_FAIL("[eval] %s: '%s' is not %s in [%.10g, %.10g]", key, tok,
                    integer ? "an integer" : "a number", lo, hi);
            free(copy), free(*out);
            *out = NULL;
            return -1;
        }
        *out = rs_realloc(*out, (size_t)(*n + 1) * sizeof **out);
        (*out)[(*n)++] = v;
    }
    free(copy);
    return 0;
}

/* The attack grid: each temperature alone, each top-k at T = 1, each top-p at T = 1. */
static int attack_grid(const rs_config *cfg, eval_ctx *c) {
    double *t, *k, *p;
    int nt, nk, np;
    RS_TRY(parse_list(cfg, "attack_temperatures", 0, 1e-6, 100, &t, &nt));
    if (parse_list(cfg, "attack_top_k", 1, 1, 16777216, &k, &nk) != 0) return free(t), -1;
    if (parse_list(cfg, "attack_top_p", 0, 1e-6, 1, &p, &np) != 0) return free(t), free(k), -1;
    c->n_settings = nt + nk + np;
    c->settings = rs_calloc((size_t)c->n_settings + 1, sizeof *c->settings);
    for (int i = 0; i < c->n_settings; i++) {
        attack_setting *s = &c->settings[i];
        s->temperature = i < nt ? t[i] : 1.0;
        s->top_k = i >= nt && i < nt + nk ? (int)k[i - nt] : 0;
        s->top_p = i >= nt + nk ? p[i - nt - nk] : 1.0;
    }
    free(t), free(k), free(p);
    if (c->n_settings == 0) return RS_FAIL("[eval] decoding_attacks: the attack grid is empty");
    return 0;
}

static int read_options(const rs_config *cfg, eval_ctx *c) {
    c->cfg = cfg;
    c->max_new_tokens = (int)rs_config_get_int(cfg, "eval", "max_new_tokens");
    c->batch_size = (int)rs_config_get_int(cfg, "generate", "batch_size");
    c->chat = rs_config_get_bool(cfg, "generate", "chat");
    const char *sys = rs_config_get_str(cfg, "generate", "system_prompt");
    c->system = sys[0] ? sys : NULL;
    c->seed = (uint64_t)rs_config_get_int(cfg, "run", "seed");
    c->attack_samples = (int)rs_config_get_int(cfg, "eval", "attack_samples");
    const char *m = rs_config_get_str(cfg, "eval", "answer_match");
    if (rs_answer_match_from_name(m, &c->match) != 0)
        return RS_FAIL("[eval] answer_match: unknown '%s'", m);
    if (rs_config_get_bool(cfg, "eval", "decoding_attacks")) RS_TRY(attack_grid(cfg, c));
    int n = (int)rs_config_get_int(cfg, "eval", "n_prompts");
    const char *cat = rs_config_get_str(cfg, "eval", "category_column");
#define EV(k) rs_config_get_str(cfg, "eval", k)
    RS_TRY(load_set(&c->harmful, "harmful", EV("harmful_file"), EV("harmful_column"), cat, NULL,
                    NULL, n));
    RS_TRY(load_set(&c->benign, "benign", EV("benign_file"), EV("benign_column"), cat,
                    EV("answer_column"), NULL, n));
    RS_TRY(load_set(&c->safe, "safe", EV("safe_file"), EV("safe_column"), NULL, NULL,
                    EV("safe_filter"), n));
    RS_TRY(load_set(&c->heldout, "heldout", EV("heldout_file"), EV("heldout_column"), NULL, NULL,
                    NULL, n));
    RS_TRY(rs_judge_init(&c->judge, EV("refusal_phrases")));
#undef EV
    if (!c->harmful.present && !c->benign.present && !c->safe.present && !c->heldout.present)
        return RS_FAIL("[eval]: none of harmful_file, benign_file, safe_file, heldout_file is set: "
                       "nothing to evaluate");
    const char *be = rs_config_get_str(cfg, "model", "backend");
    c->be = rs_backend_by_name(be);
    if (!c->be) return -1;
    int threads = (int)rs_config_get_int(cfg, "model", "threads");
    if (threads > 0) omp_set_num_threads(threads);
    return 0;
}

static void free_ctx(eval_ctx *c) {
    free_set(&c->harmful), free_set(&c->benign), free_set(&c->safe), free_set(&c->heldout);
    rs_judge_free(&c->judge);
    free(c->settings);
}

/* ---------------------------------------------------------------- one loaded model */

int ev_model_open(const eval_ctx *c, const char *dir, ev_model *em) {
    memset(em, 0, sizeof *em);
    em->dir = dir;
    RS_TRY(rs_model_load(dir, c->be, &em->m));
    em->tok = rs_tokenizer_load(dir);
    int rc = em->tok ? 0 : -1;
    em->kind = RS_CHAT_NONE;
    if (rc == 0 && c->chat) rc = rs_chat_kind_of_config(c->cfg, dir, &em->kind);
    if (rc == 0) rc = rs_gen_params_init(&em->gen, dir, &em->m.cfg);
    if (rc != 0) {
        ev_model_close(em);
        return rs_fail_context("%s", dir);
    }
    em->gen.batch_size = c->batch_size;
    em->gen.max_new_tokens = c->max_new_tokens;
    em->comm = c->comm;
    return 0;
}

void ev_model_close(ev_model *em) {
    if (em->tok) rs_tokenizer_free(em->tok);
    if (em->m.params) rs_model_free(&em->m);
    memset(em, 0, sizeof *em);
}

/* Encode the prompts of a set as generation does (chat template with one user turn and the
 * generation prompt, or plain text with the tokenizer's specials). */
int ev_encode_prompts(const eval_ctx *c, const ev_model *em, const eval_set *s, int32_t ***ids,
                      int **lens) {
    *ids = rs_calloc((size_t)s->n + 1, sizeof **ids);
    *lens = rs_calloc((size_t)s->n + 1, sizeof **lens);
    for (int i = 0; i < s->n; i++) {
        rs_chat_message msgs[2] = {{"system", c->system}, {"user", s->items[i].prompt}};
        int rc = c->chat
                     ? rs_chat_encode(em->tok, em->kind, c->system ? msgs : msgs + 1,
                                      c->system ? 2 : 1, 1, &(*ids)[i], &(*lens)[i])
                     : rs_tokenizer_encode(em->tok, s->items[i].prompt, strlen(s->items[i].prompt),
                                           1, &(*ids)[i], &(*lens)[i]);
        if (rc == 0 && (*lens)[i] == 0) rc = RS_FAIL("encodes to no tokens");
        for (int t = 0; rc == 0 && t < (*lens)[i]; t++)
            if ((*ids)[i][t] < 0 || (*ids)[i][t] >= em->m.cfg.vocab_size)
                rc = RS_FAIL("token id %d outside the model's vocabulary %d", (*ids)[i][t],
                             em->m.cfg.vocab_size);
        if (rc != 0) {
            ev_free_ids(*ids, *lens, s->n);
            return rs_fail_context("%s: %s prompt %d", s->path, s->name, i + 1);
        }
    }
    return 0;
}

void ev_free_ids(int32_t **ids, int *lens, int n) {
    for (int i = 0; i < n; i++) free(ids[i]);
    free(ids), free(lens);
}

/* ---------------------------------------------------------------- generation with progress */

typedef struct {
    rs_progress *bar;
    int64_t base;
    long long tokens_base;
} gen_progress;

static void on_batch(void *user, int done, int total, long long tokens) {
    (void)total;
    gen_progress *g = user;
    rs_progress_update(g->bar, g->base + done, g->tokens_base + tokens);
}

int ev_generate(ev_model *em, int32_t **ids, int *lens, int n, const rs_gen_params *p,
                rs_progress *bar, int64_t base, rs_gen_output *out) {
    rs_gen_params q = *p;
    gen_progress g = {bar, base, bar ? bar->tokens : 0};
    if (bar) q.progress = on_batch, q.progress_user = &g;
    return rs_generate_sharded(em->comm, &em->m, (const int32_t *const *)ids, lens, n, &q, out);
}

/* Decoded response (skip special tokens, as the generate command's text). */
char *ev_decode(const ev_model *em, const rs_gen_output *o, size_t *len) {
    char *t = rs_tokenizer_decode_n(em->tok, o->ids, o->n_ids, 1, len);
    if (!t) {
        *len = 0;
        return rs_strdup("");
    }
    return t;
}

/* ---------------------------------------------------------------- the run's models */

static void push_model(rs_eval_model **ms, int *n, const char *name, char *dir) {
    *ms = rs_realloc(*ms, (size_t)(*n + 1) * sizeof **ms);
    (*ms)[(*n)++] = (rs_eval_model){rs_strdup(name), dir};
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int rs_eval_default_models(const rs_config *cfg, const rs_run_paths *p, rs_eval_model **models,
                           int *n) {
    *models = NULL, *n = 0;
    if (p->fp_dir[0] && rs_path_is_dir(p->fp_dir))
        push_model(models, n, "fp", rs_strdup(p->fp_dir));
    if (rs_path_is_dir(p->q_dir)) push_model(models, n, "quantized", rs_strdup(p->q_dir));
    const char *chosen = rs_config_get_str(cfg, "lora", "merge");
    DIR *d = opendir(p->merge_dir);
    if (!d) return 0;
    char **names = NULL;
    int k = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.' || strstr(e->d_name, ".tmp")) continue; /* unfinished outputs */
        char *dir = rs_path_join(p->merge_dir, e->d_name), *cfgp = rs_path_join(dir, "config.json");
        if (rs_path_is_dir(dir) && rs_path_exists(cfgp)) {
            names = rs_realloc(names, (size_t)(k + 1) * sizeof *names);
            names[k++] = rs_strdup(e->d_name);
        }
        free(dir), free(cfgp);
    }
    closedir(d);
    if (k) qsort(names, (size_t)k, sizeof *names, cmp_str);
    for (int i = 0; i < k; i++)
        if (strcmp(names[i], chosen) == 0)
            push_model(models, n, "patched_merged", rs_path_join(p->merge_dir, names[i]));
    for (int i = 0; i < k; i++) {
        if (strcmp(names[i], chosen) != 0) {
            char name[300];
            snprintf(name, sizeof name, "merge_%s", names[i]);
            push_model(models, n, name, rs_path_join(p->merge_dir, names[i]));
        }
        free(names[i]);
    }
    free(names);
    return 0;
}

void rs_eval_models_free(rs_eval_model *models, int n) {
    for (int i = 0; i < n; i++) free((char *)models[i].name), free((char *)models[i].dir);
    free(models);
}

/* ---------------------------------------------------------------- the stage */

static int check_models(const rs_eval_model *models, int n_models, const char *reference_dir) {
    if (n_models < 1) return RS_FAIL("eval: no models to evaluate");
    for (int i = 0; i < n_models; i++) {
        if (!models[i].name[0] || strchr(models[i].name, '/') || strcmp(models[i].name, ".") == 0 ||
            strcmp(models[i].name, "..") == 0)
            return RS_FAIL("eval: model name '%s' cannot be a directory name", models[i].name);
        for (int j = 0; j < i; j++)
            if (strcmp(models[i].name, models[j].name) == 0)
                return RS_FAIL("eval: model name '%s' given twice", models[i].name);
        if (!rs_path_is_dir(models[i].dir))
            return RS_FAIL("%s: no such model directory (model '%s')", models[i].dir,
                           models[i].name);
    }
    if (reference_dir && !rs_path_is_dir(reference_dir))
        return RS_FAIL("%s: no such reference model directory", reference_dir);
    return 0;
}

static cJSON *judge_json(const eval_ctx *c) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "kind", "keyword");
    if (c->judge.source)
        cJSON_AddStringToObject(j, "phrases_file", c->judge.source);
    else
        cJSON_AddNullToObject(j, "phrases_file");
    cJSON *list = cJSON_AddArrayToObject(j, "phrases");
    for (int i = 0; i < c->judge.n; i++)
        cJSON_AddItemToArray(list, cJSON_CreateString(c->judge.phrases[i]));
    cJSON_AddStringToObject(j, "match", "case-sensitive substring; U+2019 read as '");
    cJSON_AddStringToObject(j, "answer_match", rs_answer_match_name(c->match));
    return j;
}

static cJSON *sets_json(const eval_ctx *c) {
    cJSON *o = cJSON_CreateObject();
    const eval_set *sets[] = {&c->harmful, &c->benign, &c->safe, &c->heldout};
    for (int i = 0; i < 4; i++) {
        if (!sets[i]->present) {
            cJSON_AddNullToObject(o, sets[i]->name);
            continue;
        }
        cJSON *s = cJSON_AddObjectToObject(o, sets[i]->name);
        cJSON_AddStringToObject(s, "file", sets[i]->path);
        cJSON_AddNumberToObject(s, "n", sets[i]->n);
    }
    return o;
}

/* Data parallel: the communicator before the backend starts (nccl picks the rank's GPU). */
static int start_comm(const rs_config *cfg, eval_ctx *c) {
    rs_dist d;
    RS_TRY(rs_dist_from_config(cfg, &d));
    c->rank = d.rank;
    if (d.world == 1) return 0;
    RS_TRY(rs_comm_from_config(cfg, &d, rs_config_get_str(cfg, "model", "backend"), &c->comm));
    rs_info("eval: generation split over %d ranks (%s transport); rank 0 writes", d.world,
            rs_comm_transport_name(c->comm));
    return 0;
}

int rs_eval_run(const rs_config *cfg, const rs_eval_model *models, int n_models,
                const char *reference_dir, const char *out_dir) {
    RS_TRY(check_models(models, n_models, reference_dir));
    eval_ctx c;
    memset(&c, 0, sizeof c);
    if (start_comm(cfg, &c) != 0 || read_options(cfg, &c) != 0) {
        rs_comm_abort(c.comm);
        free_ctx(&c);
        return -1;
    }
    ev_reference ref;
    memset(&ref, 0, sizeof ref);
    int rc = c.rank == 0 ? rs_mkdir_p(out_dir) : 0;
    double t0 = rs_now();
    if (rc == 0 && reference_dir) rc = ev_reference_run(&c, reference_dir, &ref);
    cJSON *root = cJSON_CreateObject(), *jm = NULL;
    cJSON_AddStringToObject(root, "version", RS_VERSION);
    static const char *const sections[] = {"eval", "generate", NULL};
    char hash[24];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)rs_config_hash(cfg, sections));
    cJSON_AddStringToObject(root, "config_hash", hash);
    cJSON_AddItemToObject(root, "judge", judge_json(&c));
    cJSON_AddItemToObject(root, "sets", sets_json(&c));
    if (reference_dir)
        cJSON_AddStringToObject(root, "reference", reference_dir);
    else
        cJSON_AddNullToObject(root, "reference");
    jm = cJSON_AddObjectToObject(root, "models");
    for (int i = 0; rc == 0 && i < n_models; i++) {
        cJSON *one = NULL;
        rc = ev_model_run(&c, &models[i], reference_dir ? &ref : NULL, out_dir, &one);
        if (rc == 0)
            cJSON_AddItemToObject(jm, models[i].name, one);
        else
            rs_fail_context("model '%s'", models[i].name);
    }
    if (rc == 0 && c.rank == 0) {
        char *text = cJSON_Print(root), *path = rs_path_join(out_dir, "eval.json");
        size_t n = strlen(text);
        text = rs_realloc(text, n + 2);
        text[n] = '\n', text[n + 1] = 0;
        rc = rs_write_file_atomic(path, text, n + 1);
        if (rc == 0) rs_info("eval: wrote %s (%d models, %.1f s)", path, n_models, rs_now() - t0);
        free(path);
        free(text);
    }
    cJSON_Delete(root);
    ev_reference_free(&ref);
    if (c.comm && rc == 0) rc = rs_comm_finalize(c.comm);
    else if (c.comm) rs_comm_abort(c.comm);
    free_ctx(&c);
    return rc;
}
