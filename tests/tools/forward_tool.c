/* forward_tool: run the model's forward pass on given token ids and dump the logits, for the
 * Python tests that compare against transformers.
 *
 *   forward_tool MODEL_DIR IDS_FILE OUT.f32 [--last] [--prefill K]
 *
 * IDS_FILE: one sequence per line, ids separated by spaces or commas. All sequences go in one
 * batch, right-padded. OUT.f32: raw little-endian fp32 logits, [B, T, vocab] for every
 * position (padded rows zero), or [B, vocab] with --last (the last token of each sequence).
 * --prefill K: prefill only the first K tokens of each sequence, then feed the rest one decode
 * step at a time (sequences already complete are padding in those steps), so the output also
 * checks the KV cache path. Prints "B T vocab" on stdout. RESAFE_BACKEND=cuda runs it on the GPU. */
#include "resafe/model.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    int n, cap;
    int32_t **ids;
    int *lens;
} batch;

static int read_batch(const char *path, batch *bt) {
    char *text;
    RS_TRY(rs_read_file(path, &text, NULL));
    memset(bt, 0, sizeof *bt);
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        int32_t *ids = rs_malloc(strlen(line) * sizeof *ids + sizeof *ids);
        int n = 0;
        for (char *p = line, *end; *p; p = end) {
            while (*p == ' ' || *p == ',' || *p == '\r') p++;
            if (!*p) break;
            long v = strtol(p, &end, 10);
            if (end == p) return RS_FAIL("%s: not an id: '%s'", path, p);
            ids[n++] = (int32_t)v;
        }
        if (n == 0) {
            free(ids);
            continue;
        }
        bt->ids = rs_realloc(bt->ids, (size_t)(bt->n + 1) * sizeof *bt->ids);
        bt->lens = rs_realloc(bt->lens, (size_t)(bt->n + 1) * sizeof *bt->lens);
        bt->ids[bt->n] = ids;
        bt->lens[bt->n++] = n;
    }
    free(text);
    return bt->n > 0 ? 0 : RS_FAIL("%s: no sequences", path);
}

/* Positions [from, to) of every sequence as one call; logits of each real token land in
 * out[b, t, :]. */
static int run_span(rs_model *m, rs_kv_cache *cache, const batch *bt, int T, int from, int to,
                    float *out) {
    int B = bt->n, S = to - from, V = m->cfg.vocab_size;
    int32_t *tokens = rs_malloc((size_t)B * S * sizeof *tokens), *pos = rs_malloc((size_t)B * S * sizeof *pos);
    float *logits = rs_malloc((size_t)B * S * V * sizeof *logits);
    for (int b = 0; b < B; b++)
        for (int s = 0; s < S; s++) {
            int t = from + s;
            tokens[b * S + s] = t < bt->lens[b] ? bt->ids[b][t] : 0;
            pos[b * S + s] = t < bt->lens[b] ? t : -1;
        }
    int rc = rs_model_forward(m, cache, tokens, pos, B, S, RS_LOGITS_ALL, logits);
    for (int b = 0; rc == 0 && b < B; b++)
        for (int s = 0; s < S; s++)
            if (pos[b * S + s] >= 0)
                memcpy(out + ((size_t)b * T + from + s) * V, logits + ((size_t)b * S + s) * V,
                       (size_t)V * sizeof *out);
    free(tokens), free(pos), free(logits);
    return rc;
}

static int run_last(rs_model *m, rs_kv_cache *cache, const batch *bt, int T, float *out) {
    int B = bt->n;
    int32_t *tokens = rs_calloc((size_t)B * T, sizeof *tokens), *pos = rs_malloc((size_t)B * T * sizeof *pos);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            tokens[b * T + t] = t < bt->lens[b] ? bt->ids[b][t] : 0;
            pos[b * T + t] = t < bt->lens[b] ? t : -1;
        }
    int rc = rs_model_forward(m, cache, tokens, pos, B, T, RS_LOGITS_LAST, out);
    free(tokens), free(pos);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: forward_tool MODEL_DIR IDS_FILE OUT.f32 [--last] [--prefill K]\n");
        return 2;
    }
    int last = 0, prefill = -1;
    for (int i = 4; i < argc; i++) {
        if (strcmp(argv[i], "--last") == 0) last = 1;
        else if (strcmp(argv[i], "--prefill") == 0 && i + 1 < argc) prefill = atoi(argv[++i]);
        else return fprintf(stderr, "forward_tool: unknown option %s\n", argv[i]), 2;
    }
    if (getenv("RESAFE_DEBUG")) rs_set_log_level(RS_LOG_DEBUG);
    rs_model m;
    batch bt;
    /* RESAFE_BACKEND selects the backend (default cpu): the GPU tests run the same tool on cuda. */
    const char *be_name = getenv("RESAFE_BACKEND");
    const rs_backend *be = rs_backend_by_name(be_name ? be_name : "cpu");
    if (!be || rs_model_load(argv[1], be, &m) != 0 || read_batch(argv[2], &bt) != 0) rs_die_last();
    int T = 0, V = m.cfg.vocab_size, B = bt.n;
    for (int b = 0; b < B; b++) T = bt.lens[b] > T ? bt.lens[b] : T;
    rs_kv_cache cache;
    if (rs_kv_cache_init(&m, B, T, &cache) != 0) rs_die_last();
    size_t n_out = (size_t)B * (last ? 1 : T) * V;
    float *out = rs_calloc(n_out, sizeof *out);
    int rc;
    if (last) {
        rc = run_last(&m, &cache, &bt, T, out);
    } else {
        int k = prefill < 0 || prefill > T ? T : prefill;
        rc = k > 0 ? run_span(&m, &cache, &bt, T, 0, k, out) : 0;
        for (int t = k; rc == 0 && t < T; t++) rc = run_span(&m, &cache, &bt, T, t, t + 1, out);
    }
    if (rc != 0 || rs_write_file_atomic(argv[3], out, n_out * sizeof *out) != 0) rs_die_last();
    printf("%d %d %d\n", B, T, V);
    for (int b = 0; b < B; b++) free(bt.ids[b]);
    free(bt.ids), free(bt.lens), free(out);
    rs_kv_cache_free(&m, &cache);
    rs_model_free(&m);
    return 0;
}
