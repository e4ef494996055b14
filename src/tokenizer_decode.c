/* tokenizer decode: ids -> token strings -> the decoder chain (HF tokenizers' decode_chain of
 * ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace), then joined. Without a decoder the
 * token strings are joined with spaces, as HF does. */
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

static const char REPLACEMENT_CHAR[] = "\xEF\xBF\xBD"; /* U+FFFD */

/* String::from_utf8_lossy: each maximal ill-formed subpart becomes one U+FFFD. */
static void put_lossy(tok_buf *out, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t pos = 0;
    while (pos < n) {
        if (u[pos] < 0x80) {
            tok_buf_put(out, s + pos, 1);
            pos++;
            continue;
        }
        int bad = tok_utf8_invalid_len(u, n, pos);
        if (bad > 0) {
            tok_buf_put(out, REPLACEMENT_CHAR, 3);
            pos += (size_t)bad;
        } else {
            size_t len = u[pos] < 0xE0 ? 2 : u[pos] < 0xF0 ? 3 : 4;
            tok_buf_put(out, s + pos, len);
            pos += len;
        }
    }
}

/* ByteLevel: a token whose characters are all in the byte alphabet stands for those bytes,
 * any other token for its own UTF-8; the bytes of all tokens are read as one lossy string. */
static void dec_byte_level(const tok_pieces *in, tok_pieces *out) {
    tok_buf bytes = {0}, text = {0};
    for (size_t i = 0; i < in->n; i++) {
        const char *s = tok_piece_str(in, i);
        size_t n = in->v[i].len, start = bytes.len;
        bool all_mapped = true;
        for (size_t pos = 0; pos < n;) {
            uint32_t cp;
            pos += (size_t)tok_utf8_next(s, n, pos, &cp);
            int b = tok_char_to_byte(cp);
            if (b < 0) {
                all_mapped = false;
                break;
            }
            uint8_t byte = (uint8_t)b;
            tok_buf_put(&bytes, &byte, 1);
        }
        if (!all_mapped) {
            bytes.len = start;
            tok_buf_put(&bytes, s, n);
        }
    }
    put_lossy(&text, bytes.data, bytes.len);
    tok_pieces_add(out, text.data ? text.data : "", text.len, -1, false);
    tok_buf_free(&bytes);
    tok_buf_free(&text);
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* "<0xNN>" -> NN. HF parses the two characters with u8::from_str_radix, which also takes "+N". */
static int byte_token_value(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    if (s[3] == '+') return hex_digit(s[4]);
    int hi = hex_digit(s[3]), lo = hex_digit(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

static void flush_bytes(tok_buf *bytes, tok_pieces *out) {
    if (bytes->len == 0) return;
    if (tok_utf8_valid_prefix(bytes->data, bytes->len) == bytes->len)
        tok_pieces_add(out, bytes->data, bytes->len, -1, false);
    else /* one U+FFFD per byte, not per ill-formed subpart */
        for (size_t k = 0; k < bytes->len; k++) tok_pieces_add(out, REPLACEMENT_CHAR, 3, -1, false);
    bytes->len = 0;
}

/* ByteFallback: runs of <0xNN> tokens become the string they spell when it is valid UTF-8. */
static void dec_byte_fallback(const tok_pieces *in, tok_pieces *out) {
    tok_buf bytes = {0};
    for (size_t i = 0; i < in->n; i++) {
        int value = byte_token_value(tok_piece_str(in, i), in->v[i].len);
        if (value >= 0) {
            uint8_t b = (uint8_t)value;
            tok_buf_put(&bytes, &b, 1);
            continue;
        }
        flush_bytes(&bytes, out);
        tok_pieces_add(out, tok_piece_str(in, i), in->v[i].len, -1, false);
    }
    flush_bytes(&bytes, out);
    tok_buf_free(&bytes);
}

static void dec_fuse(const tok_pieces *in, tok_pieces *out) {
    tok_buf all = {0};
    for (size_t i = 0; i < in->n; i++) tok_buf_put(&all, tok_piece_str(in, i), in->v[i].len);
    tok_pieces_add(out, all.data ? all.data : "", all.len, -1, false);
    tok_buf_free(&all);
}

/* Strip: drop up to `start` leading and `stop` trailing copies of the character. */
static void dec_strip(const tok_dec *step, const char *s, size_t n, tok_pieces *out) {
    char c[4];
    size_t clen = (size_t)tok_utf8_encode(step->ch, c), begin = 0, end = n;
    for (size_t k = 0; k < step->start && begin + clen <= end && memcmp(s + begin, c, clen) == 0;
         k++)
        begin += clen;
    for (size_t k = 0;
         k < step->stop && end >= begin + clen && memcmp(s + end - clen, c, clen) == 0; k++)
        end -= clen;
    tok_pieces_add(out, s + begin, end - begin, -1, false);
}

/* Metaspace: the replacement becomes a space, except in the first token, where it is dropped
 * (every occurrence, as HF does) unless the prepend scheme is "never". */
static void dec_metaspace(const tok_dec *step, size_t index, const char *s, size_t n, tok_buf *tmp,
                          tok_pieces *out) {
    char r[4];
    size_t rlen = (size_t)tok_utf8_encode(step->ch, r);
    bool drop = index == 0 && step->prepend_scheme != TOK_PREPEND_NEVER;
    tmp->len = 0;
    tok_replace_literal(s, n, r, rlen, " ", drop ? 0 : 1, tmp);
    tok_pieces_add(out, tmp->data ? tmp->data : "", tmp->len, -1, false);
}

static void decode_step(const tok_dec *step, const tok_pieces *in, tok_pieces *out) {
    tok_buf tmp = {0};
    tok_pieces_clear(out);
    switch (step->kind) {
    case TOK_DEC_BYTELEVEL: dec_byte_level(in, out); break;
    case TOK_DEC_BYTE_FALLBACK: dec_byte_fallback(in, out); break;
    case TOK_DEC_FUSE: dec_fuse(in, out); break;
    case TOK_DEC_REPLACE:
    case TOK_DEC_STRIP:
    case TOK_DEC_METASPACE:
        for (size_t i = 0; i < in->n; i++) {
            const char *s = tok_piece_str(in, i);
            size_t n = in->v[i].len;
            if (step->kind == TOK_DEC_STRIP) {
                dec_strip(step, s, n, out);
            } else if (step->kind == TOK_DEC_METASPACE) {
                dec_metaspace(step, i, s, n, &tmp, out);
            } else {
                tmp.len = 0;
                tok_replace_literal(s, n, step->a, step->a_len, step->b, step->b_len, &tmp);
                tok_pieces_add(out, tmp.data ? tmp.data : "", tmp.len, -1, false);
            }
        }
        break;
    }
    tok_buf_free(&tmp);
}

/* The string HF's decode starts from: an added token's (normalized) content, else the model's. */
static const char *token_string(const rs_tokenizer *tok, int32_t id, size_t *len) {
    if (id < 0 || id >= tok->n_ids) return NULL;
    if (tok->added_of_id[id] >= 0) {
        const tok_added *a = &tok->added[tok->added_of_id[id]];
        *len = a->pattern_len;
        return a->pattern;
    }
    if (id >= tok->n_vocab) return NULL;
    *len = tok->piece_len[id];
    return tok->pieces[id];
}

char *tok_decode(const rs_tokenizer *tok, const int32_t *ids, int n_ids, bool skip_special,
                 size_t *out_len) {
    tok_pieces a = {0}, b = {0};
    for (int i = 0; i < n_ids; i++) {
        size_t len;
        const char *s = token_string(tok, ids[i], &len);
        if (!s) continue; /* unknown ids are skipped, as HF does */
        if (skip_special && tok_strmap_get(&tok->special_set, s, len) >= 0) continue;
        tok_pieces_add(&a, s, len, -1, false);
    }
    for (int i = 0; i < tok->n_dec; i++) {
        decode_step(&tok->dec[i], &a, &b);
        tok_pieces swap = a;
        a = b;
        b = swap;
    }
    tok_buf text = {0};
    for (size_t i = 0; i < a.n; i++) {
        if (i > 0 && !tok->has_decoder) tok_buf_put(&text, " ", 1);
        tok_buf_put(&text, tok_piece_str(&a, i), a.v[i].len);
    }
    tok_pieces_free(&a);
    tok_pieces_free(&b);
    if (!text.data) tok_buf_put(&text, "", 0);
    *out_len = text.len;
    return text.data;
}
