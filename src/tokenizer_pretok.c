/* tokenizer pre-tokenization: the normalizers (Prepend, Replace), the split regexes of GPT-2,
 * Llama-3 and Qwen2 matched by hand, Split's delimiter behaviours, ByteLevel and Metaspace.
 * HF tokenizers compiles the regexes with Oniguruma: alternatives are tried left to right and
 * the first that matches wins (not the longest); quantifiers are greedy and backtrack. Each
 * matcher below is that search unrolled for one pattern. */
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

static const char RE_GPT2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char RE_LLAMA3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char RE_QWEN2[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                               "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* The same two with the contractions spelled out per case (some converted tokenizers). */
static const char CONTRACTIONS_ASCII_CASE[] =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";
static const char CONTRACTIONS_FOLDED[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)";

/* pattern == CONTRACTIONS_ASCII_CASE followed by the rest of `folded` after its contractions. */
static bool is_ascii_case_spelling(const char *pattern, const char *folded) {
    size_t head = strlen(CONTRACTIONS_ASCII_CASE);
    return strncmp(pattern, CONTRACTIONS_ASCII_CASE, head) == 0 &&
           strcmp(pattern + head, folded + strlen(CONTRACTIONS_FOLDED)) == 0;
}

tok_regex tok_regex_from_pattern(const char *pattern) {
    if (strcmp(pattern, RE_GPT2) == 0) return TOK_RE_GPT2;
    if (strcmp(pattern, RE_LLAMA3) == 0) return TOK_RE_LLAMA3;
    if (strcmp(pattern, RE_QWEN2) == 0) return TOK_RE_QWEN2;
    if (is_ascii_case_spelling(pattern, RE_LLAMA3)) return TOK_RE_LLAMA3_ASCII_CASE;
    if (is_ascii_case_spelling(pattern, RE_QWEN2)) return TOK_RE_QWEN2_ASCII_CASE;
    return TOK_RE_NONE;
}

/* ---------------------------------------------------------------- character classes at a position
 */

typedef enum {
    CLS_LETTER,
    CLS_NUMBER,
    CLS_SPACE,
    CLS_OTHER
} char_class; /* OTHER: [^\s\p{L}\p{N}] */

static char_class class_of(uint32_t cp) {
    if (tok_is_letter(cp)) return CLS_LETTER;
    if (tok_is_number(cp)) return CLS_NUMBER;
    if (tok_is_space(cp)) return CLS_SPACE;
    return CLS_OTHER;
}

static uint32_t char_at(const char *s, size_t n, size_t pos, size_t *len) {
    uint32_t cp;
    *len = (size_t)tok_utf8_next(s, n, pos, &cp);
    return cp;
}

/* End of the run of characters of class c starting at pos, at most max_chars of them (0: no limit).
 */
static size_t run_end(const char *s, size_t n, size_t pos, char_class c, int max_chars) {
    int count = 0;
    while (pos < n && (max_chars == 0 || count < max_chars)) {
        size_t len;
        if (class_of(char_at(s, n, pos, &len)) != c) break;
        pos += len;
        count++;
    }
    return pos;
}

static size_t newline_run_end(const char *s, size_t n, size_t pos) { /* [\r\n]* */
    while (pos < n && (s[pos] == '\r' || s[pos] == '\n')) pos++;
    return pos;
}

/* ---------------------------------------------------------------- alternatives */

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d  (case-sensitive) */
static size_t contraction_gpt2(const char *s, size_t n, size_t pos) {
    if (s[pos] != '\'' || pos + 1 >= n) return pos;
    char c = s[pos + 1];
    if (c == 's' || c == 't' || c == 'm' || c == 'd') return pos + 2;
    if (pos + 2 < n) {
        char d = s[pos + 2];
        if ((c == 'r' && d == 'e') || (c == 'v' && d == 'e') || (c == 'l' && d == 'l'))
            return pos + 3;
    }
    return pos;
}

/* Oniguruma's case folding for the letters of the contractions: ASCII case, plus U+017F LATIN
 * SMALL LETTER LONG S, which folds to 's' (unless the pattern spells the cases out). */
static char fold_letter(const char *s, size_t n, size_t pos, size_t *len, bool unicode_fold) {
    uint32_t cp = char_at(s, n, pos, len);
    if (cp == 0x17F && unicode_fold) return 's';
    if (cp >= 'A' && cp <= 'Z') return (char)(cp + 32);
    return cp < 0x80 ? (char)cp : 0;
}

/* Llama-3 / Qwen2: (?i:'s|'t|'re|'ve|'m|'ll|'d) */
static size_t contraction_folded(const char *s, size_t n, size_t pos, bool unicode_fold) {
    if (s[pos] != '\'' || pos + 1 >= n) return pos;
    size_t l1, l2;
    char c = fold_letter(s, n, pos + 1, &l1, unicode_fold);
    size_t after = pos + 1 + l1;
    if (c == 's' || c == 't' || c == 'm' || c == 'd') return after;
    if ((c == 'r' || c == 'v' || c == 'l') && after < n) {
        char d = fold_letter(s, n, after, &l2, unicode_fold);
        if ((c == 'l' && d == 'l') || (c != 'l' && d == 'e')) return after + l2;
    }
    return pos;
}

/* \s+(?!\S)|\s+ at a whitespace character: the run, less its last character when a non-space
 * follows and the run is longer than one character (that character then leads the next word). */
static size_t whitespace_tail(const char *s, size_t n, size_t pos) {
    size_t end = pos, last = pos, len;
    while (end < n && tok_is_space(char_at(s, n, end, &len))) {
        last = end;
        end += len;
    }
    if (end == n || last == pos) return end;
    return last;
}

/* \s*[\r\n]+ : the whitespace run up to and including its last \r or \n; pos if it has none. */
static size_t whitespace_to_newline(const char *s, size_t n, size_t pos) {
    size_t end = pos, best = pos, len;
    while (end < n && tok_is_space(char_at(s, n, end, &len))) {
        if (s[end] == '\r' || s[end] == '\n') best = end + 1;
        end += len;
    }
    return best;
}

/* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t match_gpt2(const char *s, size_t n, size_t pos) {
    size_t end = contraction_gpt2(s, n, pos), len, len1;
    if (end > pos) return end;
    char_class c0 = class_of(char_at(s, n, pos, &len));
    if (s[pos] == ' ' && pos + 1 < n) {
        char_class c1 = class_of(char_at(s, n, pos + 1, &len1));
        if (c1 != CLS_SPACE) return run_end(s, n, pos + 1, c1, 0);
    }
    if (c0 != CLS_SPACE) return run_end(s, n, pos, c0, 0);
    return whitespace_tail(s, n, pos);
}

/* (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
 *  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static size_t match_llama3(const char *s, size_t n, size_t pos, int max_digits, bool unicode_fold) {
    size_t end = contraction_folded(s, n, pos, unicode_fold), len, len1;
    if (end > pos) return end;
    uint32_t cp0 = char_at(s, n, pos, &len);
    char_class c0 = class_of(cp0);
    bool has_next = pos + len < n;
    char_class c1 = has_next ? class_of(char_at(s, n, pos + len, &len1)) : CLS_SPACE;
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (cp0 != '\r' && cp0 != '\n' && c0 != CLS_LETTER && c0 != CLS_NUMBER && has_next &&
        c1 == CLS_LETTER)
        return run_end(s, n, pos + len, CLS_LETTER, 0);
    if (c0 == CLS_LETTER) return run_end(s, n, pos, CLS_LETTER, 0);
    if (c0 == CLS_NUMBER) return run_end(s, n, pos, CLS_NUMBER, max_digits);
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    if (cp0 == ' ' && has_next && c1 == CLS_OTHER)
        return newline_run_end(s, n, run_end(s, n, pos + 1, CLS_OTHER, 0));
    if (c0 == CLS_OTHER) return newline_run_end(s, n, run_end(s, n, pos, CLS_OTHER, 0));
    end = whitespace_to_newline(s, n, pos);
    if (end > pos) return end;
    return whitespace_tail(s, n, pos);
}

size_t tok_regex_match_at(tok_regex re, const char *s, size_t n, size_t pos) {
    if (pos >= n) return pos;
    switch (re) {
    case TOK_RE_GPT2: return match_gpt2(s, n, pos);
    case TOK_RE_LLAMA3: return match_llama3(s, n, pos, 3, true);
    case TOK_RE_QWEN2: return match_llama3(s, n, pos, 1, true);
    case TOK_RE_LLAMA3_ASCII_CASE: return match_llama3(s, n, pos, 3, false);
    case TOK_RE_QWEN2_ASCII_CASE: return match_llama3(s, n, pos, 1, false);
    default: return pos;
    }
}

/* ---------------------------------------------------------------- Pattern::find_matches */

typedef struct {
    size_t start, end;
    bool is_match;
} span;

typedef struct {
    span *v;
    size_t n, cap;
} spans;

static void spans_add(spans *sp, size_t start, size_t end, bool is_match) {
    if (sp->n == sp->cap) {
        sp->cap = sp->cap ? 2 * sp->cap : 32;
        sp->v = rs_realloc(sp->v, sp->cap * sizeof *sp->v);
    }
    sp->v[sp->n++] = (span){start, end, is_match};
}

static const char *find_literal(const char *s, size_t n, size_t from, const char *lit,
                                size_t lit_len) {
    if (lit_len == 0 || from > n || n - from < lit_len) return NULL;
    return memmem(s + from, n - from, lit, lit_len);
}

/* The piece cut into matches and the gaps between them, covering all of s (HF's find_matches
 * for a regex, a literal string and a single character alike). */
static void find_matches(const tok_pre *step, const char *s, size_t n, spans *out) {
    size_t prev = 0, pos = 0;
    out->n = 0;
    if (step->kind == TOK_PRE_SPLIT && step->regex != TOK_RE_NONE) {
        while (pos < n) {
            size_t end = tok_regex_match_at(step->regex, s, n, pos), len;
            if (end > pos) {
                if (prev != pos) spans_add(out, prev, pos, false);
                spans_add(out, pos, end, true);
                prev = pos = end;
            } else {
                char_at(s, n, pos, &len);
                pos += len;
            }
        }
    } else {
        const char *lit = step->kind == TOK_PRE_METASPACE ? step->replacement : step->literal;
        size_t lit_len =
            step->kind == TOK_PRE_METASPACE ? (size_t)step->replacement_len : step->literal_len;
        const char *hit;
        while ((hit = find_literal(s, n, pos, lit, lit_len)) != NULL) {
            size_t start = (size_t)(hit - s);
            if (prev != start) spans_add(out, prev, start, false);
            spans_add(out, start, start + lit_len, true);
            prev = pos = start + lit_len;
        }
    }
    if (prev != n) spans_add(out, prev, n, false);
    if (step->invert)
        for (size_t i = 0; i < out->n; i++) out->v[i].is_match = !out->v[i].is_match;
}

/* NormalizedString::split's SplitDelimiterBehavior, rewriting sp in place; a span left with
 * is_match set is to be removed. */
static void apply_behavior(tok_split_behavior behavior, spans *sp) {
    size_t k = 0;
    bool previous_match = false;
    switch (behavior) {
    case TOK_SPLIT_REMOVED: return;
    case TOK_SPLIT_ISOLATED:
        for (size_t i = 0; i < sp->n; i++) sp->v[i].is_match = false;
        return;
    case TOK_SPLIT_CONTIGUOUS:
    case TOK_SPLIT_MERGED_WITH_PREVIOUS:
        for (size_t i = 0; i < sp->n; i++) {
            span cur = sp->v[i];
            bool join = behavior == TOK_SPLIT_CONTIGUOUS ? cur.is_match == previous_match
                                                         : cur.is_match && !previous_match;
            if (join && k > 0)
                sp->v[k - 1].end = cur.end;
            else
                sp->v[k++] = (span){cur.start, cur.end, false};
            previous_match = cur.is_match;
        }
        sp->n = k;
        return;
    case TOK_SPLIT_MERGED_WITH_NEXT: /* the same walked from the end */
        k = sp->n;
        for (size_t i = sp->n; i-- > 0;) {
            span cur = sp->v[i];
            if (cur.is_match && !previous_match && k < sp->n)
                sp->v[k].start = cur.start;
            else
                sp->v[--k] = (span){cur.start, cur.end, false};
            previous_match = cur.is_match;
        }
        memmove(sp->v, sp->v + k, (sp->n - k) * sizeof *sp->v);
        sp->n -= k;
        return;
    }
}

static void split_piece(const tok_pre *step, tok_split_behavior behavior, const char *s, size_t n,
                        bool first, spans *sp, tok_pieces *out) {
    find_matches(step, s, n, sp);
    apply_behavior(behavior, sp);
    for (size_t i = 0; i < sp->n; i++)
        if (!sp->v[i].is_match && sp->v[i].end > sp->v[i].start)
            tok_pieces_add(out, s + sp->v[i].start, sp->v[i].end - sp->v[i].start, -1,
                           first && sp->v[i].start == 0);
}

/* ---------------------------------------------------------------- normalizers */

void tok_replace_literal(const char *s, size_t n, const char *a, size_t a_len, const char *b,
                         size_t b_len, tok_buf *out) {
    size_t pos = 0;
    const char *hit;
    while ((hit = find_literal(s, n, pos, a, a_len)) != NULL) {
        tok_buf_put(out, s + pos, (size_t)(hit - s) - pos);
        tok_buf_put(out, b, b_len);
        pos = (size_t)(hit - s) + a_len;
    }
    tok_buf_put(out, s + pos, n - pos);
}

void tok_normalize(const rs_tokenizer *tok, const char *s, size_t n, tok_buf *out) {
    tok_buf cur = {0}, next = {0};
    tok_buf_put(&cur, s, n);
    for (int i = 0; i < tok->n_norm; i++) {
        const tok_norm *step = &tok->norm[i];
        next.len = 0;
        if (step->kind == TOK_NORM_PREPEND) {
            if (cur.len > 0) tok_buf_put(&next, step->a, step->a_len); /* only non-empty strings */
            tok_buf_put(&next, cur.data, cur.len);
        } else {
            tok_replace_literal(cur.data, cur.len, step->a, step->a_len, step->b, step->b_len,
                                &next);
        }
        tok_buf swap = cur;
        cur = next;
        next = swap;
    }
    tok_buf_put(out, cur.data, cur.len);
    tok_buf_free(&cur);
    tok_buf_free(&next);
}

/* ---------------------------------------------------------------- pre-tokenizer steps */

static const tok_pre GPT2_SPLIT = {.kind = TOK_PRE_SPLIT, .regex = TOK_RE_GPT2};

/* ByteLevel: optional prefix space, the GPT-2 regex split, then every byte to its alphabet char. */
static void byte_level(const tok_pre *step, const char *s, size_t n, bool first, spans *sp,
                       tok_buf *tmp, tok_pieces *out) {
    tmp->len = 0;
    if (step->add_prefix_space && s[0] != ' ') tok_buf_put(tmp, " ", 1);
    tok_buf_put(tmp, s, n);
    tok_pieces split = {0};
    if (step->use_regex)
        split_piece(&GPT2_SPLIT, TOK_SPLIT_ISOLATED, tmp->data, tmp->len, first, sp, &split);
    else
        tok_pieces_add(&split, tmp->data, tmp->len, -1, first);
    tok_buf mapped = {0};
    for (size_t i = 0; i < split.n; i++) {
        const char *p = tok_piece_str(&split, i);
        mapped.len = 0;
        for (size_t k = 0; k < split.v[i].len; k++) {
            char utf8[4];
            tok_buf_put(&mapped, utf8,
                        (size_t)tok_utf8_encode(tok_byte_to_char((uint8_t)p[k]), utf8));
        }
        tok_pieces_add(out, mapped.data, mapped.len, -1, split.v[i].first);
    }
    tok_buf_free(&mapped);
    tok_pieces_free(&split);
}

/* Metaspace: spaces become the replacement, which is prepended per the scheme; split keeps each
 * replacement with the word after it. */
static void metaspace(const tok_pre *step, const char *s, size_t n, bool first, spans *sp,
                      tok_buf *tmp, tok_pieces *out) {
    tmp->len = 0;
    bool starts = (size_t)step->replacement_len <= n &&
                  memcmp(s, step->replacement, (size_t)step->replacement_len) == 0;
    if (!starts && s[0] == ' ') starts = true; /* the space is about to become the replacement */
    bool prepend = !starts && (step->prepend_scheme == TOK_PREPEND_ALWAYS ||
                               (step->prepend_scheme == TOK_PREPEND_FIRST && first));
    if (prepend) tok_buf_put(tmp, step->replacement, (size_t)step->replacement_len);
    tok_replace_literal(s, n, " ", 1, step->replacement, (size_t)step->replacement_len, tmp);
    if (step->split)
        split_piece(step, TOK_SPLIT_MERGED_WITH_NEXT, tmp->data, tmp->len, first, sp, out);
    else
        tok_pieces_add(out, tmp->data, tmp->len, -1, first);
}

void tok_pre_tokenize_step(const tok_pre *step, const tok_pieces *in, tok_pieces *out) {
    spans sp = {0};
    tok_buf tmp = {0};
    tok_pieces_clear(out);
    for (size_t i = 0; i < in->n; i++) {
        const tok_piece *p = &in->v[i];
        const char *s = tok_piece_str(in, i);
        if (p->token >= 0) {
            tok_pieces_add(out, s, p->len, p->token, p->first);
            continue;
        }
        switch (step->kind) {
        case TOK_PRE_BYTELEVEL: byte_level(step, s, p->len, p->first, &sp, &tmp, out); break;
        case TOK_PRE_METASPACE: metaspace(step, s, p->len, p->first, &sp, &tmp, out); break;
        case TOK_PRE_SPLIT: split_piece(step, step->behavior, s, p->len, p->first, &sp, out); break;
        }
    }
    free(sp.v);
    tok_buf_free(&tmp);
}
