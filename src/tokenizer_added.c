/* tokenizer added tokens: the byte trie and the splitting of text around added tokens, with the
 * semantics of HF tokenizers' AddedVocabulary::find_matches (leftmost-longest, non-overlapping
 * matches; single_word / lstrip / rstrip applied after a match is found). */
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- trie */

static int32_t new_node(tok_trie *t, uint8_t byte) {
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 64;
        t->nodes = rs_realloc(t->nodes, (size_t)t->cap * sizeof *t->nodes);
    }
    t->nodes[t->n] = (tok_trie_node){-1, -1, -1, byte};
    return t->n++;
}

static int32_t child(const tok_trie *t, int32_t node, uint8_t byte) {
    for (int32_t c = t->nodes[node].first_child; c >= 0; c = t->nodes[c].next_sibling)
        if (t->nodes[c].byte == byte) return c;
    return -1;
}

int32_t tok_trie_insert(tok_trie *t, const char *s, size_t len, int32_t value) {
    if (t->n == 0) new_node(t, 0); /* root */
    int32_t node = 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t b = (uint8_t)s[i];
        int32_t c = child(t, node, b);
        if (c < 0) {
            c = new_node(t, b);
            t->nodes[c].next_sibling = t->nodes[node].first_child;
            t->nodes[node].first_child = c;
        }
        node = c;
    }
    if (len > 0) t->first_bytes[(uint8_t)s[0] >> 3] |= (uint8_t)(1u << ((uint8_t)s[0] & 7));
    int32_t old = t->nodes[node].value;
    if (old < 0) t->nodes[node].value = value;
    return old;
}

/* Longest pattern starting exactly at s[pos]: its value and end, or -1. */
static int32_t longest_at(const tok_trie *t, const char *s, size_t n, size_t pos, size_t *end) {
    int32_t node = 0, best = -1;
    for (size_t i = pos; i < n; i++) {
        node = child(t, node, (uint8_t)s[i]);
        if (node < 0) break;
        if (t->nodes[node].value >= 0) {
            best = t->nodes[node].value;
            *end = i + 1;
        }
    }
    return best;
}

int32_t tok_trie_find(const tok_trie *t, const char *s, size_t n, size_t from, size_t *start,
                      size_t *end) {
    if (t->n == 0) return -1;
    for (size_t pos = from; pos < n; pos++) {
        uint8_t b = (uint8_t)s[pos];
        if (!(t->first_bytes[b >> 3] & (1u << (b & 7)))) continue;
        int32_t v = longest_at(t, s, n, pos, end);
        if (v >= 0) {
            *start = pos;
            return v;
        }
    }
    return -1;
}

void tok_trie_free(tok_trie *t) {
    free(t->nodes);
    memset(t, 0, sizeof *t);
}

/* ---------------------------------------------------------------- splitting around added tokens */

static bool last_char_is_word(const char *s, size_t n) {
    if (n == 0) return false;
    size_t i = n - 1;
    while (i > 0 && ((uint8_t)s[i] & 0xC0) == 0x80) i--;
    uint32_t cp;
    tok_utf8_next(s, n, i, &cp);
    return tok_is_word(cp);
}

static bool first_char_is_word(const char *s, size_t n) {
    if (n == 0) return false;
    uint32_t cp;
    tok_utf8_next(s, n, 0, &cp);
    return tok_is_word(cp);
}

/* Start of the whitespace run that ends s[0..n) (regex \s*$). */
static size_t trailing_space_start(const char *s, size_t n) {
    size_t i = n;
    while (i > 0) {
        size_t j = i - 1;
        while (j > 0 && ((uint8_t)s[j] & 0xC0) == 0x80) j--;
        uint32_t cp;
        tok_utf8_next(s, n, j, &cp);
        if (!tok_is_space(cp)) break;
        i = j;
    }
    return i;
}

/* Length of the whitespace run that starts s[0..n) (regex ^\s*). */
static size_t leading_space_len(const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        int len = tok_utf8_next(s, n, i, &cp);
        if (!tok_is_space(cp)) break;
        i += (size_t)len;
    }
    return i;
}

/* AddedVocabulary::find_matches + split_with_indices for one piece of text. The matcher resumes
 * after the raw match even when the token is discarded (single_word) or widened (rstrip). */
void tok_split_added(const rs_tokenizer *tok, const tok_trie *trie, const char *s, size_t n,
                     bool first, tok_pieces *out) {
    size_t done = 0, from = 0, ms, me;
    int32_t v;
    while ((v = tok_trie_find(trie, s, n, from, &ms, &me)) >= 0) {
        const tok_added *a = &tok->added[v];
        size_t start = ms, stop = me;
        from = me;
        if (a->single_word &&
            (last_char_is_word(s, start) || first_char_is_word(s + stop, n - stop)))
            continue;
        if (a->lstrip) {
            size_t lstart = trailing_space_start(s, start);
            start = lstart > done ? lstart : done;
        }
        if (a->rstrip) stop += leading_space_len(s + stop, n - stop);
        if (done < start) tok_pieces_add(out, s + done, start - done, -1, first && done == 0);
        tok_pieces_add(out, s + start, stop - start, a->id, false);
        done = stop;
    }
    if (done < n) tok_pieces_add(out, s + done, n - done, -1, first && done == 0);
}
