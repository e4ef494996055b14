/* tokenizer internals shared by src/tokenizer*.c: the loaded tokenizer's plain data, the
 * string pieces the encode pipeline passes between stages, hash maps, and the stage functions.
 * The pipeline mirrors Hugging Face `tokenizers` (TokenizerImpl::encode):
 *   added tokens (raw text) -> normalizer -> added tokens (normalized) -> pre-tokenizer -> BPE
 *   -> post-processor,
 * and decode: ids -> token strings -> decoder chain. */
#ifndef RESAFE_TOKENIZER_INTERNAL_H
#define RESAFE_TOKENIZER_INTERNAL_H

#include "resafe/tokenizer.h"

#include <stdbool.h>

/* Limits on what a tokenizer.json may declare; far above any real tokenizer (Gemma: 256k vocab). */
#define TOK_MAX_VOCAB (1 << 24)
#define TOK_MAX_MERGES (1 << 26)
#define TOK_MAX_ADDED (1 << 20)
#define TOK_MAX_STEPS                                                                              \
    64 /* normalizer / pre-tokenizer / decoder / template steps after flattening */
#define TOK_MAX_NESTING 8 /* Sequence inside Sequence */

/* ---------------------------------------------------------------- unicode (tokenizer_unicode.c) */
extern const char rs_tok_unicode_version[];
extern const uint32_t rs_tok_letter_ranges[][2], rs_tok_number_ranges[][2], rs_tok_word_ranges[][2];
extern const int rs_tok_letter_n_ranges, rs_tok_number_n_ranges, rs_tok_word_n_ranges;
extern const uint16_t rs_tok_byte_chars[256];   /* byte -> byte-level code point */
extern const uint8_t rs_tok_remapped_bytes[68]; /* code point 0x100 + i -> byte */

/* Length of the valid UTF-8 prefix of s (== n when all of s is valid). Strict: no overlongs,
 * surrogates or code points above U+10FFFF. */
size_t tok_utf8_valid_prefix(const char *s, size_t n);
/* Decode the character at s[pos] of valid UTF-8; returns its byte length, sets *cp. */
int tok_utf8_next(const char *s, size_t n, size_t pos, uint32_t *cp);
int tok_utf8_encode(uint32_t cp, char out[4]);
/* Length of the maximal ill-formed subpart at s[pos] that Rust's String::from_utf8_lossy (and the
 * Unicode standard's "best practice") replaces with one U+FFFD; 0 if a valid character starts
 * there. */
int tok_utf8_invalid_len(const unsigned char *s, size_t n, size_t pos);

bool tok_is_letter(uint32_t cp); /* \p{L} */
bool tok_is_number(uint32_t cp); /* \p{N} */
bool tok_is_space(uint32_t cp);  /* \s of Oniguruma and Rust: the White_Space property */
bool tok_is_word(uint32_t cp);   /* Rust regex \w */

/* GPT-2 byte-level alphabet: byte -> code point (printable bytes map to themselves) and back. */
uint32_t tok_byte_to_char(uint8_t b);
int tok_char_to_byte(uint32_t cp); /* -1 if cp is not in the alphabet */

/* ---------------------------------------------------------------- growable buffers */
typedef struct {
    char *data;
    size_t len, cap;
} tok_buf;
void tok_buf_put(tok_buf *b, const void *p, size_t n);
void tok_buf_free(tok_buf *b);

typedef struct {
    int32_t *v;
    size_t n, cap;
} tok_ids;
void tok_ids_push(tok_ids *ids, int32_t id);

/* A stretch of text in the pipeline: bytes [off, off+len) of the owning list's text buffer.
 * token >= 0: an added token already resolved (later stages pass it through untouched).
 * first: the piece starts at offset 0 of the original input (Metaspace prepend_scheme "first"). */
typedef struct {
    size_t off, len;
    int32_t token;
    bool first;
} tok_piece;

typedef struct {
    tok_piece *v;
    size_t n, cap;
    tok_buf text;
} tok_pieces;
void tok_pieces_add(tok_pieces *p, const char *s, size_t len, int32_t token, bool first);
void tok_pieces_clear(tok_pieces *p);
void tok_pieces_free(tok_pieces *p);
static inline const char *tok_piece_str(const tok_pieces *p, size_t i) {
    return p->text.data + p->v[i].off;
}

/* ---------------------------------------------------------------- hash maps (tokenizer_bpe.c) */
/* string -> int32; keys are borrowed (they live in the tokenizer's own storage). */
typedef struct {
    const char *key;
    uint32_t len;
    int32_t value;
} tok_strmap_slot;
typedef struct {
    tok_strmap_slot *slots;
    size_t mask, count;
} tok_strmap;
void tok_strmap_init(tok_strmap *m, size_t expected);
/* Returns the previous value when the key was present (the value is then replaced), else -1. */
int32_t tok_strmap_put(tok_strmap *m, const char *key, size_t len, int32_t value);
int32_t tok_strmap_get(const tok_strmap *m, const char *key, size_t len); /* -1 if absent */
void tok_strmap_free(tok_strmap *m);

/* (left id, right id) -> (rank, merged id), the BPE merge table. */
typedef struct {
    uint64_t pair;
    uint32_t rank;
    int32_t new_id;
} tok_merge_slot;
typedef struct {
    tok_merge_slot *slots;
    size_t mask, count;
} tok_mergemap;
void tok_mergemap_init(tok_mergemap *m, size_t expected);
void tok_mergemap_put(tok_mergemap *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id);
const tok_merge_slot *tok_mergemap_get(const tok_mergemap *m, int32_t a, int32_t b);
void tok_mergemap_free(tok_mergemap *m);

/* ---------------------------------------------------------------- byte trie for added tokens */
typedef struct {
    int32_t first_child, next_sibling, value; /* value: added-token index, -1 if none ends here */
    uint8_t byte;
} tok_trie_node;
typedef struct {
    tok_trie_node *nodes;
    int32_t n, cap;
    uint8_t first_bytes[32]; /* bitmap of the bytes patterns start with: skips hopeless starts */
} tok_trie;
/* Insert; returns the value already stored for this exact pattern, or -1. */
int32_t tok_trie_insert(tok_trie *t, const char *s, size_t len, int32_t value);
/* Leftmost-longest match at or after `from`: returns the value, sets [*start, *end); -1 if none. */
int32_t tok_trie_find(const tok_trie *t, const char *s, size_t n, size_t from, size_t *start,
                      size_t *end);
void tok_trie_free(tok_trie *t);

/* ---------------------------------------------------------------- the loaded tokenizer */
typedef enum { TOK_NORM_PREPEND, TOK_NORM_REPLACE } tok_norm_kind;
typedef struct {
    tok_norm_kind kind;
    char *a, *b; /* PREPEND: a = prefix. REPLACE: every a (a literal) becomes b */
    size_t a_len, b_len;
} tok_norm;

/* The split regexes we implement by hand (HF compiles them with Oniguruma). */
typedef enum {
    TOK_RE_NONE = 0,
    TOK_RE_GPT2,
    TOK_RE_LLAMA3,
    TOK_RE_QWEN2,
    TOK_RE_LLAMA3_ASCII_CASE, /* contractions spelled '[sS]|...: no Unicode case folding */
    TOK_RE_QWEN2_ASCII_CASE
} tok_regex;
typedef enum {
    TOK_SPLIT_REMOVED,
    TOK_SPLIT_ISOLATED,
    TOK_SPLIT_MERGED_WITH_PREVIOUS,
    TOK_SPLIT_MERGED_WITH_NEXT,
    TOK_SPLIT_CONTIGUOUS
} tok_split_behavior;
typedef enum { TOK_PREPEND_ALWAYS, TOK_PREPEND_FIRST, TOK_PREPEND_NEVER } tok_prepend_scheme;

typedef enum { TOK_PRE_BYTELEVEL, TOK_PRE_SPLIT, TOK_PRE_METASPACE } tok_pre_kind;
typedef struct {
    tok_pre_kind kind;
    bool add_prefix_space, use_regex; /* ByteLevel */
    tok_regex regex;                  /* Split with a known regex, or TOK_RE_NONE: literal */
    char *literal;                    /* Split with a String pattern */
    size_t literal_len;
    tok_split_behavior behavior;
    bool invert;
    char replacement[4]; /* Metaspace: the replacement character (UTF-8) */
    int replacement_len;
    tok_prepend_scheme prepend_scheme;
    bool split;
} tok_pre;

typedef enum {
    TOK_DEC_BYTELEVEL,
    TOK_DEC_REPLACE,
    TOK_DEC_BYTE_FALLBACK,
    TOK_DEC_FUSE,
    TOK_DEC_STRIP,
    TOK_DEC_METASPACE
} tok_dec_kind;
typedef struct {
    tok_dec_kind kind;
    char *a, *b; /* REPLACE: literal a -> b */
    size_t a_len, b_len;
    uint32_t ch; /* STRIP: the character; METASPACE: the replacement */
    size_t start, stop;
    tok_prepend_scheme prepend_scheme;
} tok_dec;

/* One element of the post-processor's single-sequence template: the text's ids, or fixed ids. */
typedef struct {
    bool is_sequence;
    int32_t *ids;
    int n_ids;
} tok_template_item;

typedef struct {
    char *content, *pattern; /* pattern: what is matched (content, normalized if `normalized`) */
    size_t content_len, pattern_len;
    int32_t id;
    bool single_word, lstrip, rstrip, normalized, special;
} tok_added;

struct rs_tokenizer {
    char *label; /* the file, for messages */
    /* model: BPE */
    int32_t n_vocab; /* model ids are 0 .. n_vocab-1 */
    char **pieces;   /* [n_vocab] model token strings (NUL-terminated, owned) */
    uint32_t *piece_len;
    tok_strmap vocab; /* piece -> id */
    tok_mergemap merges;
    char *unk_token;       /* NULL: unknown characters are dropped (as HF does without unk) */
    char *prefix, *suffix; /* continuing_subword_prefix / end_of_word_suffix, or NULL */
    size_t prefix_len, suffix_len;
    bool fuse_unk, byte_fallback, ignore_merges;
    int32_t byte_token[256]; /* id of "<0xNN>", -1 if absent */
    /* added tokens */
    tok_added *added;
    int n_added;
    int32_t n_ids;                /* size of the id space: model and added tokens */
    int32_t *added_of_id;         /* [n_ids] index into added, -1 */
    tok_strmap added_map;         /* content -> index into added */
    tok_strmap special_set;       /* contents of special tokens -> 1 */
    tok_trie raw_trie, norm_trie; /* patterns of non-normalized / normalized added tokens */
    /* pipeline */
    tok_norm *norm;
    int n_norm;
    tok_pre *pre;
    int n_pre;
    tok_dec *dec;
    int n_dec;
    bool has_decoder;
    tok_template_item *tmpl;
    int n_tmpl;
};

/* tokenizer_added.c: split s around the added tokens of trie (AddedVocabulary::find_matches);
 * pieces (text and resolved added tokens) are appended to out. */
void tok_split_added(const rs_tokenizer *tok, const tok_trie *trie, const char *s, size_t n,
                     bool first, tok_pieces *out);

/* Record "<file>: <message>" (see rs_fail) with control characters escaped, so that names of
 * tokens (which may hold newlines) keep the message on one line. Returns -1. */
int tok_fail_at(const rs_tokenizer *tok, const char *src_file, int src_line, const char *fmt, ...)
    RS_PRINTF(4, 5);
#define TOK_FAIL(tok, ...) tok_fail_at((tok), __FILE__, __LINE__, __VA_ARGS__)

/* tokenizer_load.c: fill tok from the parsed JSON text. -1 + message naming tok->label. */
int tok_load_json(rs_tokenizer *tok, const char *json_text, size_t len);

/* tokenizer_pretok.c */
tok_regex tok_regex_from_pattern(const char *pattern);
/* End of the regex's match at pos (leftmost-first alternation, as Oniguruma), or pos if none. */
size_t tok_regex_match_at(tok_regex re, const char *s, size_t n, size_t pos);
/* Apply the normalizer steps to s, appending the result to out. */
void tok_normalize(const rs_tokenizer *tok, const char *s, size_t n, tok_buf *out);
/* Run one pre-tokenizer step over every unresolved piece of in, writing the result to out. */
void tok_pre_tokenize_step(const tok_pre *step, const tok_pieces *in, tok_pieces *out);
/* Replace every occurrence of the literal a with b (non-overlapping, left to right). */
void tok_replace_literal(const char *s, size_t n, const char *a, size_t a_len, const char *b,
                         size_t b_len, tok_buf *out);

/* tokenizer_bpe.c: BPE of one pre-token, ids appended to out. -1 + message (unk not in vocab). */
typedef struct tok_bpe_scratch tok_bpe_scratch;
tok_bpe_scratch *tok_bpe_scratch_new(void);
void tok_bpe_scratch_free(tok_bpe_scratch *s);
int tok_bpe_word(const rs_tokenizer *tok, const char *w, size_t n, tok_bpe_scratch *s,
                 tok_ids *out);

/* tokenizer_decode.c */
char *tok_decode(const rs_tokenizer *tok, const int32_t *ids, int n_ids, bool skip_special,
                 size_t *out_len);

#endif
