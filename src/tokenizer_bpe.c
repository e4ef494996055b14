/* tokenizer BPE model: the vocabulary and merge hash maps, and the merge loop of one pre-token,
 * with exactly the semantics of HF tokenizers' BPE::merge_word + Word::merge_all: symbols in a
 * linked list, candidate merges in a min-heap ordered by (rank, position), stale heap entries
 * skipped when popped. O(n log n) per word. */
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- string map */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

static size_t table_size_for(size_t expected) {
    size_t cap = 16;
    while (cap < expected * 2) cap *= 2; /* load factor <= 1/2 */
    return cap;
}

void tok_strmap_init(tok_strmap *m, size_t expected) {
    size_t cap = table_size_for(expected);
    m->slots = rs_calloc(cap, sizeof *m->slots);
    m->mask = cap - 1;
    m->count = 0;
}

static void strmap_grow(tok_strmap *m) {
    tok_strmap bigger;
    tok_strmap_init(&bigger, (m->mask + 1));
    for (size_t i = 0; i <= m->mask; i++)
        if (m->slots[i].key)
            tok_strmap_put(&bigger, m->slots[i].key, m->slots[i].len, m->slots[i].value);
    free(m->slots);
    *m = bigger;
}

int32_t tok_strmap_put(tok_strmap *m, const char *key, size_t len, int32_t value) {
    if ((m->count + 1) * 2 > m->mask + 1) strmap_grow(m);
    size_t i = hash_bytes(key, len) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        tok_strmap_slot *s = &m->slots[i];
        if (!s->key) {
            s->key = key;
            s->len = (uint32_t)len;
            s->value = value;
            m->count++;
            return -1;
        }
        if (s->len == len && memcmp(s->key, key, len) == 0) {
            int32_t old = s->value;
            s->key = key;
            s->value = value;
            return old;
        }
    }
}

int32_t tok_strmap_get(const tok_strmap *m, const char *key, size_t len) {
    if (!m->slots) return -1;
    size_t i = hash_bytes(key, len) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        const tok_strmap_slot *s = &m->slots[i];
        if (!s->key) return -1;
        if (s->len == len && memcmp(s->key, key, len) == 0) return s->value;
    }
}

void tok_strmap_free(tok_strmap *m) {
    free(m->slots);
    memset(m, 0, sizeof *m);
}

/* ---------------------------------------------------------------- merge map */

#define EMPTY_PAIR UINT64_MAX /* ids are < 2^31, so no real pair has all bits set */

static uint64_t pair_key(int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

static uint64_t hash_pair(uint64_t x) { /* splitmix64 finalizer */
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

void tok_mergemap_init(tok_mergemap *m, size_t expected) {
    size_t cap = table_size_for(expected);
    m->slots = rs_malloc(cap * sizeof *m->slots);
    for (size_t i = 0; i < cap; i++) m->slots[i].pair = EMPTY_PAIR;
    m->mask = cap - 1;
    m->count = 0;
}

/* A later merge of the same pair replaces the earlier one, as HF's HashMap collect does. */
void tok_mergemap_put(tok_mergemap *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id) {
    uint64_t key = pair_key(a, b);
    size_t i = hash_pair(key) & m->mask;
    while (m->slots[i].pair != EMPTY_PAIR && m->slots[i].pair != key) i = (i + 1) & m->mask;
    if (m->slots[i].pair == EMPTY_PAIR) m->count++;
    m->slots[i] = (tok_merge_slot){key, rank, new_id};
}

const tok_merge_slot *tok_mergemap_get(const tok_mergemap *m, int32_t a, int32_t b) {
    if (!m->slots) return NULL;
    uint64_t key = pair_key(a, b);
    for (size_t i = hash_pair(key) & m->mask;; i = (i + 1) & m->mask) {
        if (m->slots[i].pair == key) return &m->slots[i];
        if (m->slots[i].pair == EMPTY_PAIR) return NULL;
    }
}

void tok_mergemap_free(tok_mergemap *m) {
    free(m->slots);
    memset(m, 0, sizeof *m);
}

/* ---------------------------------------------------------------- one word */

typedef struct {
    int32_t id;
    int32_t prev, next; /* -1 at the ends */
    bool removed;       /* merged into its left neighbour */
} symbol;

typedef struct {
    uint32_t rank, pos;
    int32_t new_id;
} merge_cand;

struct tok_bpe_scratch {
    symbol *sym;
    size_t n_sym, cap_sym;
    merge_cand *heap;
    size_t n_heap, cap_heap;
    tok_buf piece; /* a character with prefix/suffix attached */
};

tok_bpe_scratch *tok_bpe_scratch_new(void) { return rs_calloc(1, sizeof(tok_bpe_scratch)); }

void tok_bpe_scratch_free(tok_bpe_scratch *s) {
    if (!s) return;
    free(s->sym);
    free(s->heap);
    tok_buf_free(&s->piece);
    free(s);
}

static void add_symbol(tok_bpe_scratch *s, int32_t id) {
    if (s->n_sym == s->cap_sym) {
        s->cap_sym = s->cap_sym ? 2 * s->cap_sym : 64;
        s->sym = rs_realloc(s->sym, s->cap_sym * sizeof *s->sym);
    }
    int32_t i = (int32_t)s->n_sym;
    if (i > 0) s->sym[i - 1].next = i;
    s->sym[s->n_sym++] = (symbol){id, i - 1, -1, false};
}

static bool cand_before(merge_cand a, merge_cand b) {
    return a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos;
}

static void heap_push(tok_bpe_scratch *s, merge_cand c) {
    if (s->n_heap == s->cap_heap) {
        s->cap_heap = s->cap_heap ? 2 * s->cap_heap : 64;
        s->heap = rs_realloc(s->heap, s->cap_heap * sizeof *s->heap);
    }
    size_t i = s->n_heap++;
    while (i > 0 && cand_before(c, s->heap[(i - 1) / 2])) {
        s->heap[i] = s->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    s->heap[i] = c;
}

static merge_cand heap_pop(tok_bpe_scratch *s) {
    merge_cand top = s->heap[0], last = s->heap[--s->n_heap];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= s->n_heap) break;
        if (child + 1 < s->n_heap && cand_before(s->heap[child + 1], s->heap[child])) child++;
        if (!cand_before(s->heap[child], last)) break;
        s->heap[i] = s->heap[child];
        i = child;
    }
    if (s->n_heap > 0) s->heap[i] = last;
    return top;
}

static void push_pair(const rs_tokenizer *tok, tok_bpe_scratch *s, int32_t left) {
    int32_t right = s->sym[left].next;
    if (right < 0) return;
    const tok_merge_slot *m = tok_mergemap_get(&tok->merges, s->sym[left].id, s->sym[right].id);
    if (m) heap_push(s, (merge_cand){m->rank, (uint32_t)left, m->new_id});
}

/* Word::merge_all: apply the lowest-ranked merge (leftmost on ties) until none applies. An entry
 * is stale when its left symbol was merged away or the pair now there yields another token. */
static void merge_all(const rs_tokenizer *tok, tok_bpe_scratch *s) {
    s->n_heap = 0;
    for (size_t i = 0; i + 1 < s->n_sym; i++) push_pair(tok, s, (int32_t)i);
    while (s->n_heap > 0) {
        merge_cand top = heap_pop(s);
        symbol *left = &s->sym[top.pos];
        if (left->removed || left->next < 0) continue;
        symbol *right = &s->sym[left->next];
        const tok_merge_slot *m = tok_mergemap_get(&tok->merges, left->id, right->id);
        if (!m || m->new_id != top.new_id) continue;
        left->id = top.new_id;
        left->next = right->next;
        right->removed = true;
        if (right->next >= 0) s->sym[right->next].prev = (int32_t)top.pos;
        if (left->prev >= 0) push_pair(tok, s, left->prev);
        push_pair(tok, s, (int32_t)top.pos);
    }
}

/* The vocabulary entry for one character, with continuing_subword_prefix / end_of_word_suffix
 * attached as HF does; returns the string looked up (in s->piece or w itself). */
static const char *char_piece(const rs_tokenizer *tok, const char *w, size_t i, size_t clen,
                              bool is_last, tok_bpe_scratch *s, size_t *len) {
    bool with_prefix = i > 0 && tok->prefix, with_suffix = is_last && tok->suffix;
    if (!with_prefix && !with_suffix) {
        *len = clen;
        return w + i;
    }
    s->piece.len = 0;
    if (with_prefix) tok_buf_put(&s->piece, tok->prefix, tok->prefix_len);
    tok_buf_put(&s->piece, w + i, clen);
    if (with_suffix) tok_buf_put(&s->piece, tok->suffix, tok->suffix_len);
    *len = s->piece.len;
    return s->piece.data;
}

static bool add_byte_fallback(const rs_tokenizer *tok, const char *p, size_t len,
                              tok_bpe_scratch *s) {
    for (size_t k = 0; k < len; k++)
        if (tok->byte_token[(uint8_t)p[k]] < 0) return false;
    for (size_t k = 0; k < len; k++) add_symbol(s, tok->byte_token[(uint8_t)p[k]]);
    return true;
}

static int unk_id(const rs_tokenizer *tok, int32_t *id) {
    *id = tok_strmap_get(&tok->vocab, tok->unk_token, strlen(tok->unk_token));
    if (*id < 0)
        return TOK_FAIL(tok, "model.unk_token '%s' is needed but is not in the vocabulary",
                        tok->unk_token);
    return 0;
}

/* BPE::merge_word's first half: one symbol per character (or its bytes, or unk). A pending unk
 * is only flushed by the next known character, as in HF (byte-fallback symbols can pass it). */
static int initial_symbols(const rs_tokenizer *tok, const char *w, size_t n, tok_bpe_scratch *s) {
    int32_t pending_unk = -1;
    s->n_sym = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t clen = (size_t)tok_utf8_next(w, n, i, &cp), plen;
        const char *p = char_piece(tok, w, i, clen, i + clen == n, s, &plen);
        int32_t id = tok_strmap_get(&tok->vocab, p, plen);
        i += clen;
        if (id >= 0) {
            if (pending_unk >= 0) add_symbol(s, pending_unk);
            pending_unk = -1;
            add_symbol(s, id);
            continue;
        }
        if (tok->byte_fallback && add_byte_fallback(tok, p, plen, s)) continue;
        if (!tok->unk_token) continue;
        if (pending_unk >= 0 && tok->fuse_unk) continue;
        if (pending_unk >= 0) add_symbol(s, pending_unk);
        RS_TRY(unk_id(tok, &pending_unk));
    }
    if (pending_unk >= 0) add_symbol(s, pending_unk);
    return 0;
}

int tok_bpe_word(const rs_tokenizer *tok, const char *w, size_t n, tok_bpe_scratch *s,
                 tok_ids *out) {
    if (n == 0) return 0;
    if (tok->ignore_merges) {
        int32_t id = tok_strmap_get(&tok->vocab, w, n);
        if (id >= 0) {
            tok_ids_push(out, id);
            return 0;
        }
    }
    RS_TRY(initial_symbols(tok, w, n, s));
    merge_all(tok, s);
    for (size_t i = 0; i < s->n_sym; i++)
        if (!s->sym[i].removed) tok_ids_push(out, s->sym[i].id);
    return 0;
}
