/* train_data: sequences, batches, data order and the small run helpers both training loops use
 * (config hash, stop signal, metrics log). */
#include "resafe/train.h"
#include "resafe/progress.h"

#include <cJSON.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------- batches */

void rs_batch_buf_init(rs_batch_buf *bb, int max_B, int max_T) {
    memset(bb, 0, sizeof *bb);
    size_t n = (size_t)max_B * (size_t)max_T;
    bb->max_B = max_B, bb->max_T = max_T;
    bb->tokens = rs_malloc(n * sizeof *bb->tokens);
    bb->pos = rs_malloc(n * sizeof *bb->pos);
    bb->targets = rs_malloc(n * sizeof *bb->targets);
    bb->prefix_tokens = rs_malloc(n * sizeof *bb->prefix_tokens);
    bb->prefix_pos = rs_malloc(n * sizeof *bb->prefix_pos);
    bb->prefix_of = rs_malloc((size_t)max_B * sizeof *bb->prefix_of);
}

void rs_batch_buf_free(rs_batch_buf *bb) {
    free(bb->tokens), free(bb->pos), free(bb->targets);
    free(bb->prefix_tokens), free(bb->prefix_pos), free(bb->prefix_of);
    memset(bb, 0, sizeof *bb);
}

const rs_train_batch *rs_batch_fill(rs_batch_buf *bb, const rs_seq *const *seqs, int n,
                                    long *n_targets) {
    int T = 1;
    for (int b = 0; b < n; b++) T = seqs[b]->n > T ? seqs[b]->n : T;
    RS_CHECK(n <= bb->max_B && T <= bb->max_T, "bug: batch %d x %d exceeds the plan %d x %d", n,
             T, bb->max_B, bb->max_T);
    long count = 0;
    for (int b = 0; b < n; b++) {
        const rs_seq *s = seqs[b];
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)b * T + t;
            int real = t < s->n;
            bb->tokens[i] = real ? s->ids[t] : 0;
            bb->pos[i] = real ? t : -1;
            int predicts_response = t + 1 < s->n && t + 1 >= s->n_prompt;
            bb->targets[i] = predicts_response ? s->ids[t + 1] : -1;
            count += predicts_response;
        }
    }
    bb->batch = (rs_train_batch){.B = n, .T = T, .tokens = bb->tokens, .pos = bb->pos,
                                 .targets = bb->targets};
    if (n_targets) *n_targets = count;
    return &bb->batch;
}

/* The shared start of a pair: common tokens, ending before either's last prompt token. */
static int pair_prefix(const rs_seq *a, const rs_seq *b) {
    int limit = (a->n_prompt < b->n_prompt ? a->n_prompt : b->n_prompt) - 1, n = 0;
    while (n < limit && a->ids[n] == b->ids[n]) n++;
    return n;
}

const rs_train_batch *rs_batch_fill_pairs(rs_batch_buf *bb, const rs_seq *const *seqs, int k) {
    int B = 2 * k, P = 0, TP = 1, T = 1, T_whole = 1;
    RS_CHECK(B <= bb->max_B, "bug: %d pairs exceed the plan's %d sequences", k, bb->max_B);
    for (int i = 0; i < k; i++) {
        int L = pair_prefix(seqs[i], seqs[k + i]);
        P += L > 0;
        TP = L > TP ? L : TP;
        for (int s = 0; s < 2; s++) {
            const rs_seq *q = seqs[s * k + i];
            T = q->n - L > T ? q->n - L : T;
            T_whole = q->n > T_whole ? q->n : T_whole;
        }
    }
    int64_t rows = (int64_t)P * TP + (int64_t)B * T, cap = (int64_t)bb->max_B * bb->max_T;
    if (P == 0 || rows >= (int64_t)B * T_whole || rows > cap || T_whole > bb->max_T) return NULL;
    for (size_t i = 0; i < (size_t)P * TP; i++) bb->prefix_tokens[i] = 0, bb->prefix_pos[i] = -1;
    for (size_t i = 0; i < (size_t)B * T; i++) bb->tokens[i] = 0, bb->pos[i] = bb->targets[i] = -1;
    for (int i = 0, p = 0; i < k; i++) {
        int L = pair_prefix(seqs[i], seqs[k + i]);
        if (L > 0) {
            for (int t = 0; t < L; t++) {
                bb->prefix_tokens[(size_t)p * TP + t] = seqs[i]->ids[t];
                bb->prefix_pos[(size_t)p * TP + t] = t;
            }
        }
        for (int s = 0; s < 2; s++) {
            int b = s * k + i;
            const rs_seq *q = seqs[b];
            bb->prefix_of[b] = L > 0 ? p : -1;
            for (int g = L; g < q->n; g++) { /* g: the token's index in the whole sequence */
                size_t r = (size_t)b * T + (g - L);
                bb->tokens[r] = q->ids[g];
                bb->pos[r] = g;
                bb->targets[r] = g + 1 < q->n && g + 1 >= q->n_prompt ? q->ids[g + 1] : -1;
            }
        }
        p += L > 0;
    }
    bb->batch = (rs_train_batch){B, T, bb->tokens, bb->pos, bb->targets, P, TP,
                                 bb->prefix_tokens, bb->prefix_pos, bb->prefix_of};
    return &bb->batch;
}

/* ---------------------------------------------------------------- encoding */

void rs_seq_free(rs_seq *s) {
    free(s->ids);
    memset(s, 0, sizeof *s);
}

/* Template text of the prompt (generation prompt appended) and of the whole conversation. */
static int render_pair(const rs_encoder *e, const char *prompt, const char *response,
                       char **prompt_text, char **full_text) {
    rs_chat_message msgs[3] = {{"system", e->system}, {"user", prompt}, {"assistant", response}};
    const rs_chat_message *m = e->system ? msgs : msgs + 1;
    int n = e->system ? 2 : 1;
    *prompt_text = rs_chat_render(e->kind, m, n, 1);
    if (!*prompt_text) return -1;
    *full_text = rs_chat_render(e->kind, m, n + 1, 0);
    if (!*full_text) {
        free(*prompt_text);
        return -1;
    }
    size_t lp = strlen(*prompt_text);
    if (strncmp(*prompt_text, *full_text, lp) != 0) {
        free(*prompt_text), free(*full_text);
        return RS_FAIL("the %s template's rendering of the conversation does not start with its "
                       "rendering of the prompt",
                       rs_chat_kind_name(e->kind));
    }
    return 0;
}

int rs_encode_example(const rs_encoder *e, const char *prompt, const char *response, rs_seq *out,
                      int *truncated) {
    memset(out, 0, sizeof *out);
    int32_t *p_ids = NULL, *r_ids = NULL;
    int np = 0, nr = 0, rc;
    if (e->kind == RS_CHAT_NONE) {
        rc = rs_tokenizer_encode(e->tok, prompt, strlen(prompt), 1, &p_ids, &np);
        if (rc == 0) rc = rs_tokenizer_encode(e->tok, response, strlen(response), 0, &r_ids, &nr);
        if (rc == 0 && e->eos_id >= 0) {
            r_ids = rs_realloc(r_ids, (size_t)(nr + 1) * sizeof *r_ids);
            r_ids[nr++] = e->eos_id;
        }
    } else {
        char *pt, *ft;
        RS_TRY(render_pair(e, prompt, response, &pt, &ft));
        size_t lp = strlen(pt);
        rc = rs_tokenizer_encode(e->tok, pt, lp, 0, &p_ids, &np);
        if (rc == 0) rc = rs_tokenizer_encode(e->tok, ft + lp, strlen(ft + lp), 0, &r_ids, &nr);
        free(pt), free(ft);
    }
    if (rc == 0 && nr == 0) rc = RS_FAIL("the response encodes to no tokens");
    if (rc == 0 && e->max_len > 0 && np >= e->max_len)
        rc = RS_FAIL("the prompt is %d tokens: no room for a response within max_seq_len %d", np,
                     e->max_len);
    if (rc != 0) {
        free(p_ids), free(r_ids);
        return -1;
    }
    int keep = nr;
    if (e->max_len > 0 && np + nr > e->max_len) keep = e->max_len - np;
    if (truncated) *truncated = keep < nr;
    out->ids = rs_malloc((size_t)(np + keep) * sizeof *out->ids);
    memcpy(out->ids, p_ids, (size_t)np * sizeof *p_ids);
    memcpy(out->ids + np, r_ids, (size_t)keep * sizeof *r_ids);
    out->n = np + keep, out->n_prompt = np;
    free(p_ids), free(r_ids);
    return 0;
}

typedef struct {
    const rs_encoder *enc;
    const char *prompt_key, *response_key;
    rs_example_set *set;
} example_loader;

static int add_example(void *user, const cJSON *obj, const char *path, int line) {
    example_loader *L = user;
    rs_example_set *s = L->set;
    const char *prompt, *response;
    RS_TRY(rs_json_get_string(obj, L->prompt_key, path, line, &prompt));
    RS_TRY(rs_json_get_string(obj, L->response_key, path, line, &response));
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->seqs = rs_realloc(s->seqs, (size_t)s->cap * sizeof *s->seqs);
    }
    int cut;
    if (rs_encode_example(L->enc, prompt, response, &s->seqs[s->n], &cut) != 0)
        return rs_fail_context("%s:%d", path, line);
    s->n_truncated += cut;
    if (s->seqs[s->n].n > s->max_len) s->max_len = s->seqs[s->n].n;
    s->n++;
    return 0;
}

int rs_examples_load(const char *path, const rs_encoder *enc, const char *prompt_key,
                     const char *response_key, rs_example_set *out) {
    memset(out, 0, sizeof *out);
    example_loader L = {enc, prompt_key, response_key, out};
    return rs_jsonl_each(path, add_example, &L);
}

void rs_example_set_free(rs_example_set *s) {
    for (int i = 0; i < s->n; i++)
        rs_seq_free(&s->seqs[i]);
    free(s->seqs);
    memset(s, 0, sizeof *s);
}

int rs_chat_kind_of_config(const rs_config *cfg, const char *model_dir, rs_chat_kind *kind) {
    const char *name = rs_config_get_str(cfg, "model", "chat_template");
    if (strcmp(name, "auto") == 0) return rs_chat_detect(model_dir, kind);
    if (rs_chat_kind_from_name(name, kind) != 0)
        return RS_FAIL("[model] chat_template: unknown template '%s'", name);
    return 0;
}

/* ---------------------------------------------------------------- data order */

static void shuffle(rs_data_order *d) {
    for (int i = 0; i < d->n; i++) d->perm[i] = i;
    for (int i = d->n - 1; i > 0; i--) { /* Fisher-Yates */
        int j = (int)(rs_rng_next(&d->rng) % (uint64_t)(i + 1));
        int32_t t = d->perm[i];
        d->perm[i] = d->perm[j], d->perm[j] = t;
    }
}

void rs_data_order_init(rs_data_order *d, int n, uint64_t seed) {
    memset(d, 0, sizeof *d);
    d->n = n;
    d->perm = rs_malloc((size_t)(n ? n : 1) * sizeof *d->perm);
    rs_rng_seed(&d->rng, seed);
    shuffle(d);
}

void rs_data_order_free(rs_data_order *d) {
    free(d->perm);
    memset(d, 0, sizeof *d);
}

int rs_batches_per_epoch(int n, int batch_size) {
    return n < batch_size ? 1 : n / batch_size;
}

int rs_data_order_next(rs_data_order *d, int batch_size, int32_t *out) {
    int size = d->n < batch_size ? d->n : batch_size;
    if (d->cursor + size > d->n) {
        shuffle(d);
        d->epoch++;
        d->cursor = 0;
    }
    memcpy(out, d->perm + d->cursor, (size_t)size * sizeof *out);
    d->cursor += size;
    return size;
}

/* ---------------------------------------------------------------- JSONL */

int rs_jsonl_each(const char *path, rs_jsonl_fn fn, void *user) {
    char *text;
    size_t size;
    RS_TRY(rs_read_file(path, &text, &size));
    int rc = 0, line = 0;
    for (size_t at = 0; at < size && rc == 0;) {
        const char *start = text + at;
        const char *nl = memchr(start, '\n', size - at);
        size_t len = nl ? (size_t)(nl - start) : size - at;
        at += len + 1;
        line++;
        size_t b = 0;
        while (b < len && (start[b] == ' ' || start[b] == '\t' || start[b] == '\r')) b++;
        if (b == len) continue;
        if (memchr(start, 0, len)) {
            rc = RS_FAIL("%s:%d: contains a NUL byte (not a text file)", path, line);
            break;
        }
        const char *end = NULL;
        cJSON *obj = cJSON_ParseWithLengthOpts(start, len, &end, 0);
        while (obj && end < start + len && (*end == ' ' || *end == '\t' || *end == '\r')) end++;
        if (!obj || !cJSON_IsObject(obj) || end != start + len)
            rc = RS_FAIL("%s:%d: not a JSON object (one per line)", path, line);
        else
            rc = fn(user, obj, path, line);
        cJSON_Delete(obj);
    }
    free(text);
    return rc;
}

int rs_json_get_string(const struct cJSON *obj, const char *key, const char *path, int line,
                       const char **out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) return RS_FAIL("%s:%d: no \"%s\" member", path, line, key);
    if (!cJSON_IsString(v)) return RS_FAIL("%s:%d: \"%s\" is not a string", path, line, key);
    *out = v->valuestring;
    return 0;
}

/* ---------------------------------------------------------------- hashes */

uint64_t rs_fnv1a(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static int in_list(const char *s, const char *const *list) {
    for (; *list; list++)
        if (strcmp(s, *list) == 0) return 1;
    return 0;
}

uint64_t rs_config_hash(const rs_config *cfg, const char *const *sections) {
    int n;
    const rs_config_key *keys = rs_config_schema(&n);
    uint64_t h = RS_FNV_INIT;
    for (int i = 0; i < n; i++) {
        const rs_config_key *k = &keys[i];
        int wanted = in_list(k->section, sections) ||
                     (strcmp(k->section, "model") == 0 &&
                      (strcmp(k->key, "path") == 0 || strcmp(k->key, "chat_template") == 0)) ||
                     (strcmp(k->section, "run") == 0 && strcmp(k->key, "seed") == 0);
        if (!wanted) continue;
        char value[64];
        const char *s = k->section, *key = k->key;
        switch (k->type) {
        case RS_CFG_INT:
            snprintf(value, sizeof value, "%lld", (long long)rs_config_get_int(cfg, s, key));
            break;
        case RS_CFG_FLOAT:
            snprintf(value, sizeof value, "%.17g", rs_config_get_float(cfg, s, key));
            break;
        case RS_CFG_BOOL: snprintf(value, sizeof value, "%d", rs_config_get_bool(cfg, s, key)); break;
        default: value[0] = 0;
        }
        const char *v = value[0] ? value : rs_config_get_str(cfg, k->section, k->key);
        h = rs_fnv1a(h, k->section, strlen(k->section) + 1);
        h = rs_fnv1a(h, k->key, strlen(k->key) + 1);
        h = rs_fnv1a(h, v, strlen(v) + 1);
    }
    return h;
}

int rs_file_hash(const char *path, uint64_t *out) {
    char *data;
    size_t size;
    RS_TRY(rs_read_file(path, &data, &size));
    *out = rs_fnv1a(RS_FNV_INIT, data, size);
    free(data);
    return 0;
}

/* ---------------------------------------------------------------- signals and test hooks */

static volatile sig_atomic_t g_stop_signal;

/* The first signal asks for a stop at the next boundary; a second one ends the process at once
 * (the default action), for a user whose stage takes long to reach a boundary. Every output is
 * written to a temporary name, so nothing looks finished that is not. */
static void on_stop_signal(int sig) {
    if (g_stop_signal) {
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    g_stop_signal = sig;
}

void rs_train_catch_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

int rs_train_stop_signal(void) { return (int)g_stop_signal; }

int rs_train_loop_run(const rs_train_loop *l) {
    rs_progress pr;
    int64_t step0 = *l->step;
    rs_progress_start(&pr, l->stage, "steps", l->total_steps - step0);
    while (*l->step < l->total_steps) {
        int sig = rs_train_stop_signal();
        if (sig) {
            rs_progress_end(&pr);
            if (l->restart_hint) {
                rs_warn("%s: interrupted by signal %d after step %lld; %s", l->stage, sig,
                        (long long)*l->step, l->restart_hint);
                return sig;
            }
            RS_TRY(l->save_fn(l->user));
            rs_warn("%s: interrupted by signal %d after step %lld; checkpoint %s (continue with "
                    "--resume)",
                    l->stage, sig, (long long)*l->step, l->ckpt_path);
            return sig;
        }
        RS_TRY(l->step_fn(l->user));
        rs_progress_update(&pr, *l->step - step0, 0);
        if (l->checkpoint_every > 0 && *l->step % l->checkpoint_every == 0)
            RS_TRY(l->save_fn(l->user));
    }
    rs_progress_end(&pr);
    return 0;
}

int rs_train_stage_start(const char *stage_dir, const char *ckpt_path, int resume, int force) {
    RS_TRY(rs_mkdir_p(stage_dir));
    int have = rs_path_exists(ckpt_path);
    if (resume && !have) return RS_FAIL("%s: no checkpoint to resume from", ckpt_path);
    if (!resume && have && !force)
        return RS_FAIL("%s exists (an earlier run): --resume continues it, --force starts over",
                       ckpt_path);
    return resume ? 1 : 0;
}

int rs_train_nan_injected(int step) {
    const char *s = getenv("RESAFE_TEST_NAN_STEP");
    return s && *s && atoi(s) == step;
}

/* ---------------------------------------------------------------- metrics log */

int rs_metrics_open(rs_metrics_log *l, const char *path, int64_t keep_bytes) {
    memset(l, 0, sizeof *l);
    if (keep_bytes > 0) {
        struct stat st;
        if (stat(path, &st) != 0 || st.st_size < keep_bytes)
            return RS_FAIL("%s: missing or shorter than the %lld bytes the checkpoint recorded",
                           path, (long long)keep_bytes);
        if (truncate(path, (off_t)keep_bytes) != 0)
            return RS_FAIL("%s: cannot cut the metrics log back to the checkpoint (%lld bytes): %s",
                           path, (long long)keep_bytes, strerror(errno));
        l->f = fopen(path, "ab");
    } else {
        l->f = fopen(path, "wb");
    }
    if (!l->f) return RS_FAIL("%s: cannot open for writing: %s", path, strerror(errno));
    if (keep_bytes > 0) {
        fseek(l->f, 0, SEEK_END);
        long size = ftell(l->f);
        if (size != keep_bytes) {
            fclose(l->f);
            l->f = NULL;
            return RS_FAIL("%s: holds %ld bytes, the checkpoint expects at least %lld", path, size,
                           (long long)keep_bytes);
        }
    }
    l->path = rs_strdup(path);
    l->bytes = keep_bytes > 0 ? keep_bytes : 0;
    return 0;
}

int rs_metrics_write(rs_metrics_log *l, const char *json_line) {
    size_t n = strlen(json_line);
    if (fwrite(json_line, 1, n, l->f) != n || fputc('\n', l->f) == EOF || fflush(l->f) != 0)
        return RS_FAIL("%s: write failed: %s", l->path, strerror(errno));
    l->bytes += (int64_t)n + 1;
    return 0;
}

void rs_metrics_close(rs_metrics_log *l) {
    if (l->f) fclose(l->f);
    free(l->path);
    memset(l, 0, sizeof *l);
}
