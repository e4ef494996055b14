/* tokenizer load: tokenizer.json (parsed with cJSON) -> the plain data of rs_tokenizer.
 * Every value is type- and range-checked; anything we do not implement is an error naming the
 * component, so a tokenizer either loads and behaves as HF tokenizers does, or does not load.
 * Added-token ids are assigned as HF's AddedVocabulary::add_tokens does (the file's ids are only
 * compared, with a warning), since that is what HF encodes with. */
#include "tokenizer_internal.h"

#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>


/* ---------------------------------------------------------------- JSON accessors */

static const cJSON *field(const cJSON *obj, const char *key) {
    return cJSON_GetObjectItemCaseSensitive(obj, key);
}

static bool is_absent(const cJSON *v) { return !v || cJSON_IsNull(v); }

/* An optional boolean: absent/null -> dflt. */
static int get_bool(const rs_tokenizer *tok, const cJSON *obj, const char *where, const char *key,
                    bool dflt, bool *out) {
    const cJSON *v = field(obj, key);
    if (is_absent(v)) {
        *out = dflt;
        return 0;
    }
    if (!cJSON_IsBool(v)) return TOK_FAIL(tok, "%s.%s: expected true or false", where, key);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* An optional string: absent/null -> NULL (not an error). */
static int get_string(const rs_tokenizer *tok, const cJSON *obj, const char *where, const char *key,
                      const char **out) {
    const cJSON *v = field(obj, key);
    *out = NULL;
    if (is_absent(v)) return 0;
    if (!cJSON_IsString(v)) return TOK_FAIL(tok, "%s.%s: expected a string", where, key);
    *out = v->valuestring;
    return 0;
}

static int require_string(const rs_tokenizer *tok, const cJSON *obj, const char *where,
                          const char *key, const char **out) {
    RS_TRY(get_string(tok, obj, where, key, out));
    if (!*out) return TOK_FAIL(tok, "%s.%s: missing", where, key);
    return 0;
}

/* An integer in [0, limit). */
static int as_index(const rs_tokenizer *tok, const cJSON *v, double limit, const char *what,
                    int64_t *out) {
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return TOK_FAIL(tok, "%s: expected an integer", what);
    if (v->valuedouble < 0 || v->valuedouble >= limit)
        return TOK_FAIL(tok, "%s: %g is out of range [0, %.0f)", what, v->valuedouble, limit);
    *out = (int64_t)v->valuedouble;
    return 0;
}

/* A string holding exactly one character (serde's `char`). */
static int get_char(const rs_tokenizer *tok, const cJSON *obj, const char *where, const char *key,
                    uint32_t *cp) {
    const char *s;
    RS_TRY(require_string(tok, obj, where, key, &s));
    size_t n = strlen(s);
    if (n == 0 || (size_t)tok_utf8_next(s, n, 0, cp) != n)
        return TOK_FAIL(tok, "%s.%s: expected a single character, got '%s'", where, key, s);
    return 0;
}

/* {"String": s} or {"Regex": r}: the literal (non-empty), or the regex in *regex. */
static int get_pattern(const rs_tokenizer *tok, const cJSON *obj, const char *where,
                       const char **literal, const char **regex) {
    const cJSON *p = field(obj, "pattern"), *s = field(p, "String"), *r = field(p, "Regex");
    *literal = *regex = NULL;
    if (cJSON_IsObject(p) && cJSON_IsString(s))
        *literal = s->valuestring;
    else if (cJSON_IsObject(p) && cJSON_IsString(r))
        *regex = r->valuestring;
    else
        return TOK_FAIL(tok, "%s.pattern: expected {\"String\": ...} or {\"Regex\": ...}", where);
    if (*literal && !**literal)
        return TOK_FAIL(tok, "%s.pattern: an empty pattern is not supported", where);
    return 0;
}

static int get_prepend_scheme(const rs_tokenizer *tok, const cJSON *obj, const char *where,
                              tok_prepend_scheme *out) {
    const char *s;
    bool add_prefix_space;
    RS_TRY(get_string(tok, obj, where, "prepend_scheme", &s));
    RS_TRY(get_bool(tok, obj, where, "add_prefix_space", true, &add_prefix_space));
    if (!s || strcmp(s, "always") == 0)
        *out = TOK_PREPEND_ALWAYS;
    else if (strcmp(s, "first") == 0)
        *out = TOK_PREPEND_FIRST;
    else if (strcmp(s, "never") == 0)
        *out = TOK_PREPEND_NEVER;
    else
        return TOK_FAIL(tok, "%s.prepend_scheme: unknown value '%s' (first, always or never)", where,
                     s);
    if (!add_prefix_space) { /* the legacy field; HF rejects a contradicting prepend_scheme */
        if (*out != TOK_PREPEND_NEVER && s)
            return TOK_FAIL(tok, "%s: add_prefix_space false contradicts prepend_scheme '%s'", where,
                         s);
        *out = TOK_PREPEND_NEVER;
    }
    return 0;
}

/* The "type" of a component; `where` names it in messages. */
static int get_type(const rs_tokenizer *tok, const cJSON *obj, const char *where,
                    const char **type) {
    if (!cJSON_IsObject(obj)) return TOK_FAIL(tok, "%s: expected an object or null", where);
    RS_TRY(require_string(tok, obj, where, "type", type));
    return 0;
}

static int unsupported(const rs_tokenizer *tok, const char *where, const char *type) {
    return TOK_FAIL(tok, "%s: type '%s' is not supported", where, type);
}

/* Grow a step array by one element, zeroed. */
static void *add_step(void *arr, int *n, size_t size) {
    arr = rs_realloc(arr, (size_t)(*n + 1) * size);
    memset((char *)arr + (size_t)*n * size, 0, size);
    (*n)++;
    return arr;
}

static int check_step_count(const rs_tokenizer *tok, const char *where, int n) {
    if (n >= TOK_MAX_STEPS) return TOK_FAIL(tok, "%s: more than %d steps", where, TOK_MAX_STEPS);
    return 0;
}

/* Each element of a Sequence's list, or fail. */
static int sequence_items(const rs_tokenizer *tok, const cJSON *obj, const char *where,
                          const char *key, const cJSON **list, int depth) {
    *list = field(obj, key);
    if (!cJSON_IsArray(*list)) return TOK_FAIL(tok, "%s.%s: expected an array", where, key);
    if (depth >= TOK_MAX_NESTING) return TOK_FAIL(tok, "%s: Sequence nested too deeply", where);
    return 0;
}

/* ---------------------------------------------------------------- normalizer */

static int load_normalizer(rs_tokenizer *tok, const cJSON *obj, int depth) {
    const char *where = "normalizer", *type;
    if (is_absent(obj)) return 0;
    RS_TRY(get_type(tok, obj, where, &type));
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list, *item;
        RS_TRY(sequence_items(tok, obj, where, "normalizers", &list, depth));
        cJSON_ArrayForEach(item, list) RS_TRY(load_normalizer(tok, item, depth + 1));
        return 0;
    }
    RS_TRY(check_step_count(tok, where, tok->n_norm));
    const char *a = NULL, *b = NULL, *regex = NULL;
    tok_norm_kind kind;
    if (strcmp(type, "Prepend") == 0) {
        kind = TOK_NORM_PREPEND;
        RS_TRY(require_string(tok, obj, "normalizer.Prepend", "prepend", &a));
    } else if (strcmp(type, "Replace") == 0) {
        kind = TOK_NORM_REPLACE;
        RS_TRY(get_pattern(tok, obj, "normalizer.Replace", &a, &regex));
        if (regex)
            return TOK_FAIL(tok, "normalizer.Replace: Regex patterns are not supported ('%s')", regex);
        RS_TRY(require_string(tok, obj, "normalizer.Replace", "content", &b));
    } else {
        return unsupported(tok, where, type);
    }
    tok->norm = add_step(tok->norm, &tok->n_norm, sizeof *tok->norm);
    tok_norm *step = &tok->norm[tok->n_norm - 1];
    step->kind = kind;
    step->a = rs_strdup(a);
    step->a_len = strlen(a);
    step->b = b ? rs_strdup(b) : NULL;
    step->b_len = b ? strlen(b) : 0;
    return 0;
}

/* ---------------------------------------------------------------- pre-tokenizer */

static int split_behavior(const rs_tokenizer *tok, const cJSON *obj, tok_split_behavior *out) {
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                  "Contiguous"};
    const char *s;
    RS_TRY(require_string(tok, obj, "pre_tokenizer.Split", "behavior", &s));
    for (int i = 0; i < 5; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = (tok_split_behavior)i;
            return 0;
        }
    return TOK_FAIL(tok, "pre_tokenizer.Split.behavior: unknown value '%s'", s);
}

static int load_split(const rs_tokenizer *tok, const cJSON *obj, tok_pre *step) {
    const char *literal, *regex;
    RS_TRY(get_pattern(tok, obj, "pre_tokenizer.Split", &literal, &regex));
    if (regex) {
        step->regex = tok_regex_from_pattern(regex);
        if (step->regex == TOK_RE_NONE)
            return TOK_FAIL(tok,
                         "pre_tokenizer.Split: regex '%.200s' is not supported (only the GPT-2, "
                         "Llama-3 and Qwen2 split patterns)",
                         regex);
    } else {
        step->literal = rs_strdup(literal);
        step->literal_len = strlen(literal);
    }
    RS_TRY(split_behavior(tok, obj, &step->behavior));
    return get_bool(tok, obj, "pre_tokenizer.Split", "invert", false, &step->invert);
}

static int load_metaspace(const rs_tokenizer *tok, const cJSON *obj, tok_pre *step) {
    uint32_t cp;
    RS_TRY(get_char(tok, obj, "pre_tokenizer.Metaspace", "replacement", &cp));
    step->replacement_len = tok_utf8_encode(cp, step->replacement);
    RS_TRY(get_prepend_scheme(tok, obj, "pre_tokenizer.Metaspace", &step->prepend_scheme));
    return get_bool(tok, obj, "pre_tokenizer.Metaspace", "split", true, &step->split);
}

static int load_pre_tokenizer(rs_tokenizer *tok, const cJSON *obj, int depth) {
    const char *where = "pre_tokenizer", *type;
    if (is_absent(obj)) return 0;
    RS_TRY(get_type(tok, obj, where, &type));
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list, *item;
        RS_TRY(sequence_items(tok, obj, where, "pretokenizers", &list, depth));
        cJSON_ArrayForEach(item, list) RS_TRY(load_pre_tokenizer(tok, item, depth + 1));
        return 0;
    }
    RS_TRY(check_step_count(tok, where, tok->n_pre));
    tok_pre step = {0};
    int rc = 0;
    if (strcmp(type, "ByteLevel") == 0) {
        step.kind = TOK_PRE_BYTELEVEL;
        rc = get_bool(tok, obj, "pre_tokenizer.ByteLevel", "add_prefix_space", true,
                      &step.add_prefix_space);
        if (rc == 0)
            rc = get_bool(tok, obj, "pre_tokenizer.ByteLevel", "use_regex", true, &step.use_regex);
    } else if (strcmp(type, "Split") == 0) {
        step.kind = TOK_PRE_SPLIT;
        rc = load_split(tok, obj, &step);
    } else if (strcmp(type, "Metaspace") == 0) {
        step.kind = TOK_PRE_METASPACE;
        rc = load_metaspace(tok, obj, &step);
    } else {
        return unsupported(tok, where, type);
    }
    if (rc != 0) {
        free(step.literal);
        return -1;
    }
    tok->pre = add_step(tok->pre, &tok->n_pre, sizeof *tok->pre);
    tok->pre[tok->n_pre - 1] = step;
    return 0;
}

/* ---------------------------------------------------------------- decoder */

static int load_decoder_step(const rs_tokenizer *tok, const cJSON *obj, const char *type,
                             tok_dec *step) {
    const char *a = NULL, *b = NULL, *regex = NULL;
    if (strcmp(type, "ByteLevel") == 0) {
        step->kind = TOK_DEC_BYTELEVEL;
    } else if (strcmp(type, "ByteFallback") == 0) {
        step->kind = TOK_DEC_BYTE_FALLBACK;
    } else if (strcmp(type, "Fuse") == 0) {
        step->kind = TOK_DEC_FUSE;
    } else if (strcmp(type, "Replace") == 0) {
        step->kind = TOK_DEC_REPLACE;
        RS_TRY(get_pattern(tok, obj, "decoder.Replace", &a, &regex));
        if (regex)
            return TOK_FAIL(tok, "decoder.Replace: Regex patterns are not supported ('%s')", regex);
        RS_TRY(require_string(tok, obj, "decoder.Replace", "content", &b));
        step->a = rs_strdup(a);
        step->a_len = strlen(a);
        step->b = rs_strdup(b);
        step->b_len = strlen(b);
    } else if (strcmp(type, "Strip") == 0) {
        int64_t start, stop;
        step->kind = TOK_DEC_STRIP;
        RS_TRY(get_char(tok, obj, "decoder.Strip", "content", &step->ch));
        RS_TRY(as_index(tok, field(obj, "start"), 1e9, "decoder.Strip.start", &start));
        RS_TRY(as_index(tok, field(obj, "stop"), 1e9, "decoder.Strip.stop", &stop));
        step->start = (size_t)start;
        step->stop = (size_t)stop;
    } else if (strcmp(type, "Metaspace") == 0) {
        step->kind = TOK_DEC_METASPACE;
        RS_TRY(get_char(tok, obj, "decoder.Metaspace", "replacement", &step->ch));
        RS_TRY(get_prepend_scheme(tok, obj, "decoder.Metaspace", &step->prepend_scheme));
    } else {
        return unsupported(tok, "decoder", type);
    }
    return 0;
}

static int load_decoder(rs_tokenizer *tok, const cJSON *obj, int depth) {
    const char *where = "decoder", *type;
    if (is_absent(obj)) return 0;
    RS_TRY(get_type(tok, obj, where, &type));
    tok->has_decoder = true;
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list, *item;
        RS_TRY(sequence_items(tok, obj, where, "decoders", &list, depth));
        cJSON_ArrayForEach(item, list) RS_TRY(load_decoder(tok, item, depth + 1));
        return 0;
    }
    RS_TRY(check_step_count(tok, where, tok->n_dec));
    tok_dec step = {0};
    if (load_decoder_step(tok, obj, type, &step) != 0) {
        free(step.a);
        free(step.b);
        return -1;
    }
    tok->dec = add_step(tok->dec, &tok->n_dec, sizeof *tok->dec);
    tok->dec[tok->n_dec - 1] = step;
    return 0;
}

/* ---------------------------------------------------------------- model: BPE */

/* vocab: {"piece": id, ...}; ids must be exactly 0 .. n-1, each once. */
static int load_vocab(rs_tokenizer *tok, const cJSON *vocab) {
    if (!cJSON_IsObject(vocab)) return TOK_FAIL(tok, "model.vocab: expected an object {token: id}");
    int n = cJSON_GetArraySize(vocab);
    if (n <= 0 || n > TOK_MAX_VOCAB)
        return TOK_FAIL(tok, "model.vocab: %d entries (expected 1 to %d)", n, TOK_MAX_VOCAB);
    tok->n_vocab = n;
    tok->pieces = rs_calloc((size_t)n, sizeof *tok->pieces);
    tok->piece_len = rs_calloc((size_t)n, sizeof *tok->piece_len);
    tok_strmap_init(&tok->vocab, (size_t)n);
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab) {
        int64_t id;
        char what[96];
        snprintf(what, sizeof what, "model.vocab['%.40s']", item->string);
        RS_TRY(as_index(tok, item, n, what, &id));
        if (tok->pieces[id])
            return TOK_FAIL(tok, "%s: id %lld is also used by '%.40s'", what, (long long)id,
                         tok->pieces[id]);
        size_t len = strlen(item->string);
        tok->pieces[id] = rs_strndup(item->string, len);
        tok->piece_len[id] = (uint32_t)len;
        if (tok_strmap_put(&tok->vocab, tok->pieces[id], len, (int32_t)id) >= 0)
            return TOK_FAIL(tok, "%s: the token appears twice", what);
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        tok->byte_token[b] = tok_strmap_get(&tok->vocab, name, 6);
    }
    return 0;
}

static int32_t vocab_id(const rs_tokenizer *tok, const char *s, size_t len, size_t rank) {
    int32_t id = tok_strmap_get(&tok->vocab, s, len);
    if (id < 0)
        TOK_FAIL(tok, "model.merges[%zu]: '%.*s' is not in the vocabulary", rank,
              (int)(len > 60 ? 60 : len), s);
    return id;
}

/* One merge "a b": the pair's ids and the id of their concatenation (b without the
 * continuing_subword_prefix), all of which must be in the vocabulary, as HF requires. */
static int add_merge(rs_tokenizer *tok, const char *a, size_t a_len, const char *b, size_t b_len,
                     size_t index, uint32_t rank, tok_buf *tmp) {
    int32_t ia = vocab_id(tok, a, a_len, index), ib;
    if (ia < 0) return -1;
    if ((ib = vocab_id(tok, b, b_len, index)) < 0) return -1;
    if (b_len < tok->prefix_len)
        return TOK_FAIL(tok, "model.merges[%zu]: '%.*s' is shorter than continuing_subword_prefix",
                     index, (int)b_len, b);
    tmp->len = 0;
    tok_buf_put(tmp, a, a_len);
    tok_buf_put(tmp, b + tok->prefix_len, b_len - tok->prefix_len);
    int32_t merged = vocab_id(tok, tmp->data, tmp->len, index);
    if (merged < 0) return -1;
    tok_mergemap_put(&tok->merges, ia, ib, rank, merged);
    return 0;
}

/* merges: ["a b", ...] (lines of merges.txt; "#version" lines skipped) or [["a", "b"], ...]. */
static int load_merges(rs_tokenizer *tok, const cJSON *merges) {
    if (!cJSON_IsArray(merges)) return TOK_FAIL(tok, "model.merges: expected an array");
    int n = cJSON_GetArraySize(merges);
    if (n > TOK_MAX_MERGES)
        return TOK_FAIL(tok, "model.merges: %d entries (at most %d)", n, TOK_MAX_MERGES);
    tok_mergemap_init(&tok->merges, (size_t)n);
    bool as_pairs = n > 0 && cJSON_IsArray(merges->child);
    tok_buf tmp = {0};
    uint32_t rank = 0;
    size_t index = 0;
    int rc = 0;
    for (const cJSON *m = merges->child; m && rc == 0; m = m->next, index++) {
        if (as_pairs) {
            const cJSON *a = cJSON_GetArrayItem(m, 0), *b = cJSON_GetArrayItem(m, 1);
            if (!cJSON_IsArray(m) || cJSON_GetArraySize(m) != 2 || !cJSON_IsString(a) ||
                !cJSON_IsString(b)) {
                rc = TOK_FAIL(tok, "model.merges[%zu]: expected a pair of strings [\"a\", \"b\"]",
                           index);
                break;
            }
            rc = add_merge(tok, a->valuestring, strlen(a->valuestring), b->valuestring,
                           strlen(b->valuestring), index, rank++, &tmp);
            continue;
        }
        if (!cJSON_IsString(m)) {
            rc = TOK_FAIL(tok, "model.merges[%zu]: expected a string \"a b\"", index);
            break;
        }
        const char *line = m->valuestring, *space = strchr(line, ' ');
        if (strncmp(line, "#version", 8) == 0) continue;
        if (!space || strchr(space + 1, ' ')) {
            rc = TOK_FAIL(tok, "model.merges[%zu]: '%.60s' is not two tokens separated by one space",
                       index, line);
            break;
        }
        rc = add_merge(tok, line, (size_t)(space - line), space + 1, strlen(space + 1), index,
                       rank++, &tmp);
    }
    tok_buf_free(&tmp);
    return rc;
}

static int load_bpe_options(rs_tokenizer *tok, const cJSON *model) {
    const char *unk, *prefix, *suffix;
    const cJSON *dropout = field(model, "dropout");
    if (!is_absent(dropout)) {
        if (!cJSON_IsNumber(dropout) || dropout->valuedouble < 0 || dropout->valuedouble > 1)
            return TOK_FAIL(tok, "model.dropout: expected null or a number in [0, 1]");
        if (dropout->valuedouble > 0)
            return TOK_FAIL(tok, "model.dropout: BPE dropout (random merges) is not supported");
    }
    RS_TRY(get_string(tok, model, "model", "unk_token", &unk));
    RS_TRY(get_string(tok, model, "model", "continuing_subword_prefix", &prefix));
    RS_TRY(get_string(tok, model, "model", "end_of_word_suffix", &suffix));
    RS_TRY(get_bool(tok, model, "model", "fuse_unk", false, &tok->fuse_unk));
    RS_TRY(get_bool(tok, model, "model", "byte_fallback", false, &tok->byte_fallback));
    RS_TRY(get_bool(tok, model, "model", "ignore_merges", false, &tok->ignore_merges));
    if (unk) tok->unk_token = rs_strdup(unk);
    if (prefix) tok->prefix = rs_strdup(prefix), tok->prefix_len = strlen(prefix);
    if (suffix) tok->suffix = rs_strdup(suffix), tok->suffix_len = strlen(suffix);
    return 0;
}

static int load_model(rs_tokenizer *tok, const cJSON *model) {
    const char *type;
    if (!cJSON_IsObject(model)) return TOK_FAIL(tok, "model: expected an object");
    RS_TRY(get_string(tok, model, "model", "type", &type));
    if (!type && !field(model, "merges"))
        return TOK_FAIL(tok, "model: no type and no merges: not a BPE model");
    if (type && strcmp(type, "BPE") != 0) {
        if (strcmp(type, "WordPiece") == 0 || strcmp(type, "WordLevel") == 0 ||
            strcmp(type, "Unigram") == 0)
            return TOK_FAIL(tok, "model: type '%s' is not supported (only BPE)", type);
        return TOK_FAIL(tok, "model: unknown type '%s'", type);
    }
    RS_TRY(load_bpe_options(tok, model));
    RS_TRY(load_vocab(tok, field(model, "vocab")));
    return load_merges(tok, field(model, "merges"));
}

/* ---------------------------------------------------------------- added tokens */

static int parse_added(const rs_tokenizer *tok, const cJSON *obj, size_t index, tok_added *a,
                       int64_t *file_id) {
    char where[48];
    const char *content;
    snprintf(where, sizeof where, "added_tokens[%zu]", index);
    if (!cJSON_IsObject(obj)) return TOK_FAIL(tok, "%s: expected an object", where);
    RS_TRY(require_string(tok, obj, where, "content", &content));
    char id_where[64];
    snprintf(id_where, sizeof id_where, "%s.id", where);
    RS_TRY(as_index(tok, field(obj, "id"), 4294967296.0, id_where, file_id));
    RS_TRY(get_bool(tok, obj, where, "special", false, &a->special));
    RS_TRY(get_bool(tok, obj, where, "single_word", false, &a->single_word));
    RS_TRY(get_bool(tok, obj, where, "lstrip", false, &a->lstrip));
    RS_TRY(get_bool(tok, obj, where, "rstrip", false, &a->rstrip));
    RS_TRY(get_bool(tok, obj, where, "normalized", !a->special, &a->normalized));
    a->content = (char *)content; /* borrowed until kept */
    a->content_len = strlen(content);
    return 0;
}

static bool same_added(const tok_added *x, const tok_added *y) {
    return x->content_len == y->content_len &&
           memcmp(x->content, y->content, x->content_len) == 0 &&
           x->single_word == y->single_word && x->lstrip == y->lstrip && x->rstrip == y->rstrip &&
           x->normalized == y->normalized && x->special == y->special;
}

/* AddedVocabulary::add_tokens for one token: reuse the id of a known content (added or in the
 * model vocabulary), else take the next id after the model's. */
static void add_token(rs_tokenizer *tok, tok_added a, int64_t file_id, int32_t *next_id) {
    int32_t known = tok_strmap_get(&tok->added_map, a.content, a.content_len);
    if (known >= 0 && same_added(&tok->added[known], &a)) return;
    a.id =
        known >= 0 ? tok->added[known].id : tok_strmap_get(&tok->vocab, a.content, a.content_len);
    if (a.id < 0) a.id = (*next_id)++;
    if (a.id != file_id)
        rs_warn(
            "%s: added token '%.40s' has id %lld in the file but id %d as Hugging Face assigns it",
            tok->label, a.content, (long long)file_id, a.id);
    a.content = rs_strndup(a.content, a.content_len);
    a.pattern = a.content;
    a.pattern_len = a.content_len;
    if (a.normalized && tok->n_norm > 0) {
        tok_buf normalized = {0};
        tok_normalize(tok, a.content, a.content_len, &normalized);
        a.pattern = normalized.data ? normalized.data : rs_strdup("");
        a.pattern_len = normalized.len;
    }
    tok->added = add_step(tok->added, &tok->n_added, sizeof *tok->added);
    tok->added[tok->n_added - 1] = a;
    tok_strmap_put(&tok->added_map, a.content, a.content_len, tok->n_added - 1);
    if (a.special) tok_strmap_put(&tok->special_set, a.content, a.content_len, 1);
}

/* id -> added token (a later token with the same id replaces the earlier, as in HF's map), and
 * the two tries of patterns: matched in the raw text, or in the normalized text. */
static int index_added(rs_tokenizer *tok) {
    tok->n_ids = tok->n_vocab;
    for (int i = 0; i < tok->n_added; i++)
        if (tok->added[i].id >= tok->n_ids) tok->n_ids = tok->added[i].id + 1;
    tok->added_of_id = rs_malloc((size_t)tok->n_ids * sizeof *tok->added_of_id);
    for (int32_t id = 0; id < tok->n_ids; id++) tok->added_of_id[id] = -1;
    for (int i = 0; i < tok->n_added; i++) tok->added_of_id[tok->added[i].id] = i;
    for (int32_t id = 0; id < tok->n_ids; id++) {
        int32_t k = tok->added_of_id[id];
        if (k < 0) continue;
        const tok_added *a = &tok->added[k];
        if (a->pattern_len == 0)
            return TOK_FAIL(tok, "added token '%.40s' normalizes to an empty string", a->content);
        tok_trie *trie = a->normalized ? &tok->norm_trie : &tok->raw_trie;
        int32_t other = tok_trie_insert(trie, a->pattern, a->pattern_len, k);
        if (other >= 0)
            return TOK_FAIL(tok, "added tokens '%.40s' and '%.40s' match the same text",
                         tok->added[other].content, a->content);
    }
    return 0;
}

static int load_added_tokens(rs_tokenizer *tok, const cJSON *list) {
    tok_strmap_init(&tok->added_map, 16);
    tok_strmap_init(&tok->special_set, 16);
    if (!is_absent(list)) {
        if (!cJSON_IsArray(list)) return TOK_FAIL(tok, "added_tokens: expected an array");
        if (cJSON_GetArraySize(list) > TOK_MAX_ADDED)
            return TOK_FAIL(tok, "added_tokens: more than %d tokens", TOK_MAX_ADDED);
        int32_t next_id = tok->n_vocab;
        size_t index = 0;
        for (const cJSON *item = list->child; item; item = item->next, index++) {
            tok_added a = {0};
            int64_t file_id;
            RS_TRY(parse_added(tok, item, index, &a, &file_id));
            if (a.content_len > 0) add_token(tok, a, file_id, &next_id);
        }
    }
    return index_added(tok);
}

/* ---------------------------------------------------------------- post-processor */

/* The ids of special token `name` of a TemplateProcessing, each a valid id. */
static int template_special(rs_tokenizer *tok, const cJSON *specials, const char *name,
                            tok_template_item *item) {
    const cJSON *entry = field(specials, name), *ids = field(entry, "ids"),
                *tokens = field(entry, "tokens");
    if (!cJSON_IsObject(entry) || !cJSON_IsArray(ids))
        return TOK_FAIL(
            tok, "post_processor: special token '%.40s' of the template is not in special_tokens",
            name);
    if (cJSON_IsArray(tokens) && cJSON_GetArraySize(tokens) != cJSON_GetArraySize(ids))
        return TOK_FAIL(tok, "post_processor.special_tokens['%.40s']: ids and tokens differ in length",
                     name);
    int n = cJSON_GetArraySize(ids);
    if (n > 1024) return TOK_FAIL(tok, "post_processor.special_tokens['%.40s']: too many ids", name);
    item->ids = rs_malloc((size_t)(n ? n : 1) * sizeof *item->ids);
    const cJSON *v;
    cJSON_ArrayForEach(v, ids) {
        int64_t id;
        RS_TRY(as_index(tok, v, tok->n_ids, "post_processor.special_tokens[].ids", &id));
        item->ids[item->n_ids++] = (int32_t)id;
    }
    return 0;
}

/* One element of a template: {"Sequence": {"id": "A"}} or {"SpecialToken": {"id": "<s>"}}. */
static int template_item(rs_tokenizer *tok, const cJSON *piece, const cJSON *specials,
                         bool single) {
    const cJSON *seq = field(piece, "Sequence"), *special = field(piece, "SpecialToken");
    const cJSON *id = field(seq ? seq : special, "id");
    if (!cJSON_IsObject(piece) || !(seq || special) || !cJSON_IsString(id))
        return TOK_FAIL(tok,
                     "post_processor: template pieces must be {\"Sequence\": {\"id\": ...}} or "
                     "{\"SpecialToken\": {\"id\": ...}}");
    if (seq && strcmp(id->valuestring, "A") != 0 && strcmp(id->valuestring, "B") != 0)
        return TOK_FAIL(tok, "post_processor: unknown sequence '%.20s' (A or B)", id->valuestring);
    if (seq && single && strcmp(id->valuestring, "B") == 0)
        return TOK_FAIL(tok, "post_processor: the single-sequence template uses $B");
    tok_template_item item = {.is_sequence = seq != NULL};
    if (special && template_special(tok, specials, id->valuestring, &item) != 0) {
        free(item.ids);
        return -1;
    }
    if (!single) {
        free(item.ids);
        return 0;
    }
    RS_TRY(check_step_count(tok, "post_processor.single", tok->n_tmpl));
    tok->tmpl = add_step(tok->tmpl, &tok->n_tmpl, sizeof *tok->tmpl);
    tok->tmpl[tok->n_tmpl - 1] = item;
    return 0;
}

static int load_template(rs_tokenizer *tok, const cJSON *obj) {
    const cJSON *single = field(obj, "single"), *pair = field(obj, "pair"),
                *specials = field(obj, "special_tokens"), *p;
    if (tok->n_tmpl > 0) return TOK_FAIL(tok, "post_processor: more than one TemplateProcessing");
    if (!cJSON_IsArray(single) || cJSON_GetArraySize(single) == 0)
        return TOK_FAIL(tok, "post_processor.single: expected a non-empty array");
    if (!is_absent(specials) && !cJSON_IsObject(specials))
        return TOK_FAIL(tok, "post_processor.special_tokens: expected an object");
    cJSON_ArrayForEach(p, single) RS_TRY(template_item(tok, p, specials, true));
    if (cJSON_IsArray(pair)) /* checked as HF's builder does; only single sequences are encoded */
        cJSON_ArrayForEach(p, pair) RS_TRY(template_item(tok, p, specials, false));
    return 0;
}

static int load_post_processor(rs_tokenizer *tok, const cJSON *obj, int depth) {
    const char *type;
    if (is_absent(obj)) return 0;
    RS_TRY(get_type(tok, obj, "post_processor", &type));
    if (strcmp(type, "ByteLevel") == 0) return 0; /* it only trims offsets */
    if (strcmp(type, "TemplateProcessing") == 0) return load_template(tok, obj);
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list, *item;
        RS_TRY(sequence_items(tok, obj, "post_processor", "processors", &list, depth));
        cJSON_ArrayForEach(item, list) RS_TRY(load_post_processor(tok, item, depth + 1));
        return 0;
    }
    return unsupported(tok, "post_processor", type);
}

/* ---------------------------------------------------------------- the file */

/* cJSON ends strings at NUL, so "\u0000" would silently shorten a token: refuse such files. */
static bool has_nul_escape(const char *s, size_t n) {
    for (size_t i = 0; i + 1 < n; i++) {
        if (s[i] != '\\') continue;
        if (s[i + 1] == 'u' && i + 5 < n && memcmp(s + i + 2, "0000", 4) == 0) return true;
        i++; /* skip the escaped character, so "\\u0000" is not mistaken for an escape */
    }
    return false;
}

static int check_top_level(rs_tokenizer *tok, const cJSON *root) {
    const char *version;
    if (!cJSON_IsObject(root)) return TOK_FAIL(tok, "expected a JSON object at the top level");
    RS_TRY(get_string(tok, root, "tokenizer", "version", &version));
    if (version && strcmp(version, "1.0") != 0)
        return TOK_FAIL(tok, "unknown tokenizer version '%.20s'", version);
    if (!is_absent(field(root, "truncation")))
        rs_warn("%s: truncation settings are ignored (resafe never truncates)", tok->label);
    if (!is_absent(field(root, "padding")))
        rs_warn("%s: padding settings are ignored (resafe never pads)", tok->label);
    if (is_absent(field(root, "model"))) return TOK_FAIL(tok, "no model");
    return 0;
}

static int load_parts(rs_tokenizer *tok, const cJSON *root) {
    RS_TRY(check_top_level(tok, root));
    RS_TRY(load_model(tok, field(root, "model")));
    RS_TRY(load_normalizer(tok, field(root, "normalizer"), 0));
    RS_TRY(load_pre_tokenizer(tok, field(root, "pre_tokenizer"), 0));
    RS_TRY(load_added_tokens(tok, field(root, "added_tokens"))); /* patterns need the normalizer */
    RS_TRY(load_post_processor(tok, field(root, "post_processor"), 0)); /* ids need n_ids */
    return load_decoder(tok, field(root, "decoder"), 0);
}

int tok_load_json(rs_tokenizer *tok, const char *text, size_t len) {
    if (!text) return TOK_FAIL(tok, "no data");
    size_t valid = tok_utf8_valid_prefix(text, len);
    if (valid != len) return TOK_FAIL(tok, "not valid UTF-8 (byte %zu)", valid);
    if (has_nul_escape(text, len))
        return TOK_FAIL(tok, "strings containing \\u0000 are not supported");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        size_t at = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
        return TOK_FAIL(tok, "not valid JSON (near byte %zu)", at);
    }
    while (end && end < text + len &&
           (*end == ' ' || *end == '\n' || *end == '\r' || *end == '\t' || *end == 0))
        end++;
    int rc = end && end < text + len ? TOK_FAIL(tok, "unexpected data after the JSON value (byte %zu)",
                                             (size_t)(end - text))
                                     : load_parts(tok, root);
    cJSON_Delete(root);
    return rc;
}
