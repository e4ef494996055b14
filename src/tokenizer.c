/* tokenizer: the public API (tokenizer.h) and the encode pipeline, stage by stage as HF
 * tokenizers' TokenizerImpl::encode runs it. Loading lives in tokenizer_load.c, the stages in
 * tokenizer_added.c, tokenizer_pretok.c, tokenizer_bpe.c, decoding in tokenizer_decode.c. */
#include "tokenizer_internal.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- buffers */

void tok_buf_put(tok_buf *b, const void *p, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1) cap *= 2;
        b->data = rs_realloc(b->data, cap);
        b->cap = cap;
    }
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0; /* always NUL-terminated, for callers that hand it out */
}

void tok_buf_free(tok_buf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

void tok_ids_push(tok_ids *ids, int32_t id) {
    if (ids->n == ids->cap) {
        ids->cap = ids->cap ? 2 * ids->cap : 64;
        ids->v = rs_realloc(ids->v, ids->cap * sizeof *ids->v);
    }
    ids->v[ids->n++] = id;
}

void tok_pieces_add(tok_pieces *p, const char *s, size_t len, int32_t token, bool first) {
    if (p->n == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 32;
        p->v = rs_realloc(p->v, p->cap * sizeof *p->v);
    }
    p->v[p->n++] = (tok_piece){p->text.len, len, token, first};
    tok_buf_put(&p->text, s, len);
}

void tok_pieces_clear(tok_pieces *p) {
    p->n = 0;
    p->text.len = 0;
}

void tok_pieces_free(tok_pieces *p) {
    free(p->v);
    tok_buf_free(&p->text);
    memset(p, 0, sizeof *p);
}

/* ---------------------------------------------------------------- errors */

static void put_escaped(tok_buf *out, const char *s) {
    for (; *s; s++) {
        char esc[8];
        if ((unsigned char)*s < 0x20 || *s == 0x7F) {
            snprintf(esc, sizeof esc, "\\x%02x", (unsigned char)*s);
            tok_buf_put(out, esc, strlen(esc));
        } else {
            tok_buf_put(out, s, 1);
        }
    }
}

int tok_fail_at(const rs_tokenizer *tok, const char *src_file, int src_line, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    tok_buf line = {0};
    put_escaped(&line, tok->label);
    tok_buf_put(&line, ": ", 2);
    put_escaped(&line, msg);
    rs_fail_at(src_file, src_line, "%s", line.data);
    tok_buf_free(&line);
    return -1;
}

/* ---------------------------------------------------------------- load / free */

rs_tokenizer *rs_tokenizer_parse(const char *label, const char *json_text, size_t len) {
    rs_tokenizer *tok = rs_calloc(1, sizeof *tok);
    tok->label = rs_strdup(label ? label : "tokenizer.json");
    if (tok_load_json(tok, json_text, len) != 0) {
        rs_tokenizer_free(tok);
        return NULL;
    }
    return tok;
}

rs_tokenizer *rs_tokenizer_load(const char *path) {
    char *file = rs_path_is_dir(path) ? rs_path_join(path, "tokenizer.json") : rs_strdup(path);
    char *text = NULL;
    size_t len = 0;
    rs_tokenizer *tok = NULL;
    if (rs_read_file(file, &text, &len) == 0) tok = rs_tokenizer_parse(file, text, len);
    free(text);
    free(file);
    return tok;
}

void rs_tokenizer_free(rs_tokenizer *tok) {
    if (!tok) return;
    for (int32_t i = 0; tok->pieces && i < tok->n_vocab; i++) free(tok->pieces[i]);
    free(tok->pieces);
    free(tok->piece_len);
    tok_strmap_free(&tok->vocab);
    tok_mergemap_free(&tok->merges);
    free(tok->unk_token);
    free(tok->prefix);
    free(tok->suffix);
    for (int i = 0; i < tok->n_added; i++) {
        if (tok->added[i].pattern != tok->added[i].content) free(tok->added[i].pattern);
        free(tok->added[i].content);
    }
    free(tok->added);
    free(tok->added_of_id);
    tok_strmap_free(&tok->added_map);
    tok_strmap_free(&tok->special_set);
    tok_trie_free(&tok->raw_trie);
    tok_trie_free(&tok->norm_trie);
    for (int i = 0; i < tok->n_norm; i++) {
        free(tok->norm[i].a);
        free(tok->norm[i].b);
    }
    free(tok->norm);
    for (int i = 0; i < tok->n_pre; i++) free(tok->pre[i].literal);
    free(tok->pre);
    for (int i = 0; i < tok->n_dec; i++) {
        free(tok->dec[i].a);
        free(tok->dec[i].b);
    }
    free(tok->dec);
    for (int i = 0; i < tok->n_tmpl; i++) free(tok->tmpl[i].ids);
    free(tok->tmpl);
    free(tok->label);
    free(tok);
}

/* ---------------------------------------------------------------- encode */

/* AddedVocabulary::extract_and_normalize: non-normalized added tokens are found in the raw text,
 * then each remaining stretch is normalized and searched for the normalized added tokens. */
static void extract_and_normalize(const rs_tokenizer *tok, const char *text, size_t len,
                                  tok_pieces *out) {
    tok_pieces raw = {0};
    tok_buf normalized = {0};
    tok_split_added(tok, &tok->raw_trie, text, len, true, &raw);
    tok_pieces_clear(out);
    for (size_t i = 0; i < raw.n; i++) {
        const tok_piece *p = &raw.v[i];
        if (p->token >= 0) {
            tok_pieces_add(out, tok_piece_str(&raw, i), p->len, p->token, false);
            continue;
        }
        normalized.len = 0;
        tok_normalize(tok, tok_piece_str(&raw, i), p->len, &normalized);
        tok_split_added(tok, &tok->norm_trie, normalized.data, normalized.len, p->first, out);
    }
    tok_buf_free(&normalized);
    tok_pieces_free(&raw);
}

static void run_pre_tokenizer(const rs_tokenizer *tok, tok_pieces *a) {
    tok_pieces b = {0};
    for (int i = 0; i < tok->n_pre; i++) {
        tok_pre_tokenize_step(&tok->pre[i], a, &b);
        tok_pieces swap = *a;
        *a = b;
        b = swap;
    }
    tok_pieces_free(&b);
}

static int model_tokenize(const rs_tokenizer *tok, const tok_pieces *pieces, tok_ids *ids) {
    tok_bpe_scratch *scratch = tok_bpe_scratch_new();
    int rc = 0;
    for (size_t i = 0; i < pieces->n && rc == 0; i++) {
        if (pieces->v[i].token >= 0)
            tok_ids_push(ids, pieces->v[i].token);
        else
            rc = tok_bpe_word(tok, tok_piece_str(pieces, i), pieces->v[i].len, scratch, ids);
    }
    tok_bpe_scratch_free(scratch);
    return rc;
}

/* TemplateProcessing for one sequence: the template's fixed ids around the text's ids. Without
 * add_special (or without a template) the ids pass through unchanged. */
static void post_process(const rs_tokenizer *tok, const tok_ids *body, bool add_special,
                         tok_ids *out) {
    if (tok->n_tmpl == 0) {
        for (size_t i = 0; i < body->n; i++) tok_ids_push(out, body->v[i]);
        return;
    }
    for (int t = 0; t < tok->n_tmpl; t++) {
        const tok_template_item *item = &tok->tmpl[t];
        if (item->is_sequence)
            for (size_t i = 0; i < body->n; i++) tok_ids_push(out, body->v[i]);
        else if (add_special)
            for (int i = 0; i < item->n_ids; i++) tok_ids_push(out, item->ids[i]);
    }
}

int rs_tokenizer_encode(const rs_tokenizer *tok, const char *text, size_t len, int add_special,
                        int32_t **ids, int *n_ids) {
    *ids = NULL;
    *n_ids = 0;
    size_t valid = tok_utf8_valid_prefix(text, len);
    if (valid != len)
        return RS_FAIL("tokenizer: the text is not valid UTF-8 (byte %zu of %zu)", valid, len);
    if (len > (size_t)INT32_MAX / 8)
        return RS_FAIL("tokenizer: text of %zu bytes is too long", len);
    tok_pieces a = {0};
    extract_and_normalize(tok, text, len, &a);
    run_pre_tokenizer(tok, &a);
    tok_ids body = {0}, out = {0};
    int rc = model_tokenize(tok, &a, &body);
    if (rc == 0) post_process(tok, &body, add_special != 0, &out);
    tok_pieces_free(&a);
    free(body.v);
    if (rc != 0) {
        free(out.v);
        return -1;
    }
    if (out.n > (size_t)INT32_MAX) {
        free(out.v);
        return RS_FAIL("tokenizer: too many tokens");
    }
    *ids = out.v ? out.v : rs_malloc(sizeof(int32_t));
    *n_ids = (int)out.n;
    return 0;
}

int rs_tokenizer_pre_tokenize(const rs_tokenizer *tok, const char *text, size_t len, char **pieces,
                              size_t **lens, int *n) {
    *pieces = NULL;
    *lens = NULL;
    *n = 0;
    if (tok_utf8_valid_prefix(text, len) != len)
        return RS_FAIL("tokenizer: the text is not valid UTF-8");
    tok_pieces a = {0};
    if (len > 0) tok_pieces_add(&a, text, len, -1, true);
    run_pre_tokenizer(tok, &a);
    *lens = rs_malloc((a.n ? a.n : 1) * sizeof **lens);
    tok_buf all = {0};
    for (size_t i = 0; i < a.n; i++) {
        (*lens)[i] = a.v[i].len;
        tok_buf_put(&all, tok_piece_str(&a, i), a.v[i].len);
    }
    tok_buf_put(&all, "", 0);
    *pieces = all.data;
    *n = (int)a.n;
    tok_pieces_free(&a);
    return 0;
}

/* ---------------------------------------------------------------- decode and lookups */

char *rs_tokenizer_decode_n(const rs_tokenizer *tok, const int32_t *ids, int n_ids,
                            int skip_special, size_t *out_len) {
    size_t len;
    char *s = tok_decode(tok, ids, n_ids < 0 ? 0 : n_ids, skip_special != 0, &len);
    if (out_len) *out_len = len;
    return s;
}

char *rs_tokenizer_decode(const rs_tokenizer *tok, const int32_t *ids, int n_ids,
                          int skip_special) {
    return rs_tokenizer_decode_n(tok, ids, n_ids, skip_special, NULL);
}

int rs_tokenizer_vocab_size(const rs_tokenizer *tok) { return tok->n_ids; }

int32_t rs_tokenizer_token_to_id(const rs_tokenizer *tok, const char *piece) {
    size_t len = strlen(piece);
    int32_t a = tok_strmap_get(&tok->added_map, piece, len);
    if (a >= 0) return tok->added[a].id;
    return tok_strmap_get(&tok->vocab, piece, len);
}

const char *rs_tokenizer_id_to_token(const rs_tokenizer *tok, int32_t id) {
    if (id < 0 || id >= tok->n_ids) return NULL;
    if (tok->added_of_id[id] >= 0) return tok->added[tok->added_of_id[id]].content;
    return id < tok->n_vocab ? tok->pieces[id] : NULL;
}

int rs_tokenizer_is_special(const rs_tokenizer *tok, int32_t id) {
    if (id < 0 || id >= tok->n_ids || tok->added_of_id[id] < 0) return 0;
    const tok_added *a = &tok->added[tok->added_of_id[id]];
    return tok_strmap_get(&tok->special_set, a->content, a->content_len) >= 0;
}
