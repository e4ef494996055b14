/* tokenizer: small hand-checked cases (byte fallback, merge order, added-token matching,
 * errors naming the file); the bulk comparison with HF tokenizers is tests/py/test_tokenizer.py. */
#include "resafe/tokenizer.h"
#include "test.h"

#include <string.h>

/* A Llama-2-shaped tokenizer: <unk> <s> </s>, the 256 byte tokens (ids 3..258), then
 * "▁" 259, "h" 260, "i" 261, "▁h" 262, "▁hi" 263, with the legacy LlamaConverter pipeline. */
#define BYTE_ID(b) (3 + (b))
static char *llama_like_json(void) {
    static const char head[] =
        "{\"version\": \"1.0\", \"added_tokens\": ["
        "{\"id\": 0, \"content\": \"<unk>\", \"special\": true, \"normalized\": false},"
        "{\"id\": 1, \"content\": \"<s>\", \"special\": true, \"normalized\": false},"
        "{\"id\": 2, \"content\": \"</s>\", \"special\": true, \"normalized\": false}],"
        "\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": ["
        "{\"type\": \"Prepend\", \"prepend\": \"\\u2581\"},"
        "{\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, \"content\": \"\\u2581\"}]},"
        "\"pre_tokenizer\": null,"
        "\"post_processor\": {\"type\": \"TemplateProcessing\","
        " \"single\": [{\"SpecialToken\": {\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": "
        "{\"id\": \"A\", \"type_id\": 0}}],"
        " \"special_tokens\": {\"<s>\": {\"id\": \"<s>\", \"ids\": [1], \"tokens\": [\"<s>\"]}}},"
        "\"decoder\": {\"type\": \"Sequence\", \"decoders\": ["
        "{\"type\": \"Replace\", \"pattern\": {\"String\": \"\\u2581\"}, \"content\": \" \"},"
        "{\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"},"
        "{\"type\": \"Strip\", \"content\": \" \", \"start\": 1, \"stop\": 0}]},"
        "\"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"fuse_unk\": true, "
        "\"byte_fallback\": true,"
        " \"merges\": [\"\\u2581 h\", \"\\u2581h i\"], \"vocab\": {\"<unk>\": 0, \"<s>\": 1, "
        "\"</s>\": 2";
    static const char tail[] =
        ", \"\\u2581\": 259, \"h\": 260, \"i\": 261, \"\\u2581h\": 262, \"\\u2581hi\": 263}}}";
    size_t cap = sizeof head + sizeof tail + 256 * 24;
    char *json = malloc(cap);
    size_t n = (size_t)snprintf(json, cap, "%s", head);
    for (int b = 0; b < 256; b++)
        n += (size_t)snprintf(json + n, cap - n, ", \"<0x%02X>\": %d", b, BYTE_ID(b));
    snprintf(json + n, cap - n, "%s", tail);
    return json;
}

static rs_tokenizer *llama_like(void) {
    char *json = llama_like_json();
    rs_tokenizer *tok = rs_tokenizer_parse("llama_like.json", json, strlen(json));
    free(json);
    return tok;
}

/* A bare BPE over single letters (no normalizer, pre-tokenizer or decoder). */
static rs_tokenizer *letters(const char *merges, const char *added) {
    char json[2048];
    snprintf(
        json, sizeof json,
        "{\"added_tokens\": [%s], \"model\": {\"type\": \"BPE\", \"merges\": [%s], \"vocab\": "
        "{\"a\": 0, \"b\": 1, \"c\": 2, \"ab\": 3, \"bc\": 4, \"abc\": 5, \" \": 6, \"x\": 7}}}",
        added, merges);
    return rs_tokenizer_parse("letters.json", json, strlen(json));
}

static int encode(const rs_tokenizer *tok, const char *text, int add_special, int32_t *out,
                  int cap) {
    int32_t *ids;
    int n;
    if (rs_tokenizer_encode(tok, text, strlen(text), add_special, &ids, &n) != 0) return -1;
    for (int i = 0; i < n && i < cap; i++) out[i] = ids[i];
    free(ids);
    return n;
}

static int same_ids(const int32_t *a, int na, const int32_t *b, int nb) {
    return na == nb && memcmp(a, b, (size_t)na * sizeof *a) == 0;
}

TEST(test_tokenizer_byte_fallback_spells_unknown_characters) {
    rs_tokenizer *tok = llama_like();
    REQUIRE(tok, "%s", rs_last_error());
    int32_t ids[16];
    /* "hi é" -> "▁hi▁é": ▁hi, ▁, then é (not in the vocabulary) as its UTF-8 bytes C3 A9 */
    const int32_t want[] = {1, 263, 259, BYTE_ID(0xC3), BYTE_ID(0xA9)};
    int n = encode(tok, "hi \xC3\xA9", 1, ids, 16);
    CHECK(same_ids(ids, n, want, 5), "got %d ids, first %d", n, n > 0 ? ids[0] : -1);
    char *text = rs_tokenizer_decode(tok, ids, n, 1);
    CHECK(strcmp(text, "hi \xC3\xA9") == 0, "decoded '%s'", text);
    free(text);
    /* a lone byte that is not valid UTF-8 on its own decodes to U+FFFD */
    const int32_t lone[] = {263, BYTE_ID(0xC3)};
    text = rs_tokenizer_decode(tok, lone, 2, 0);
    CHECK(strcmp(text, "hi\xEF\xBF\xBD") == 0, "decoded '%s'", text);
    free(text);
    rs_tokenizer_free(tok);
}

TEST(test_tokenizer_bpe_applies_lowest_rank_merge_first) {
    int32_t ids[8];
    rs_tokenizer *tok = letters("\"b c\", \"a b\"", "");
    REQUIRE(tok, "%s", rs_last_error());
    int n = encode(tok, "abc", 0, ids, 8);
    CHECK(n == 2 && ids[0] == 0 && ids[1] == 4, "b c first: want a bc, got %d ids", n);
    rs_tokenizer_free(tok);
    tok = letters("\"a b\", \"b c\"", "");
    n = encode(tok, "abc", 0, ids, 8);
    CHECK(n == 2 && ids[0] == 3 && ids[1] == 2, "a b first: want ab c, got %d ids", n);
    rs_tokenizer_free(tok);
    tok = letters("[\"b\", \"c\"], [\"a\", \"bc\"]", ""); /* pair format, chained merges */
    n = encode(tok, "abcabc", 0, ids, 8);
    CHECK(n == 2 && ids[0] == 5 && ids[1] == 5, "want abc abc, got %d ids", n);
    rs_tokenizer_free(tok);
}

TEST(test_tokenizer_added_tokens_match_longest_then_strip_spaces) {
    const char *added =
        "{\"id\": 8, \"content\": \"<a>\", \"special\": true, \"normalized\": false},"
        "{\"id\": 9, \"content\": \"<a><b>\", \"special\": true, \"normalized\": false},"
        "{\"id\": 10, \"content\": \"<m>\", \"lstrip\": true, \"rstrip\": true, "
        "\"special\": false, \"normalized\": false}";
    rs_tokenizer *tok = letters("", added);
    REQUIRE(tok, "%s", rs_last_error());
    int32_t ids[16];
    const int32_t want[] = {7, 9, 0, 8, 1};
    int n = encode(tok, "x<a><b>a<a>b", 0, ids, 16);
    CHECK(same_ids(ids, n, want, 5), "longest match: got %d ids", n);
    const int32_t want_strip[] = {0, 10, 1}; /* the spaces around <m> belong to it */
    n = encode(tok, "a  <m>  b", 0, ids, 16);
    CHECK(same_ids(ids, n, want_strip, 3), "lstrip/rstrip: got %d ids", n);
    CHECK(rs_tokenizer_is_special(tok, 9) && !rs_tokenizer_is_special(tok, 10), "special flags");
    CHECK(rs_tokenizer_token_to_id(tok, "<a><b>") == 9 && rs_tokenizer_vocab_size(tok) == 11,
          "lookups");
    rs_tokenizer_free(tok);
}

TEST(test_tokenizer_decode_skips_special_and_unknown_ids) {
    rs_tokenizer *tok = llama_like();
    REQUIRE(tok, "%s", rs_last_error());
    const int32_t ids[] = {1, 263, 999999, -5, 2};
    char *with = rs_tokenizer_decode(tok, ids, 5, 0),
         *without = rs_tokenizer_decode(tok, ids, 5, 1);
    CHECK(strcmp(with, "<s> hi</s>") == 0, "with specials: '%s'", with);
    CHECK(strcmp(without, "hi") == 0, "skip_special: '%s'", without);
    free(with);
    free(without);
    CHECK(strcmp(rs_tokenizer_id_to_token(tok, 263), "\xE2\x96\x81hi") == 0, "id_to_token");
    CHECK(rs_tokenizer_id_to_token(tok, 264) == NULL && rs_tokenizer_token_to_id(tok, "zz") == -1,
          "unknown");
    rs_tokenizer_free(tok);
}

static size_t put_utf8(char *out, uint32_t cp) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

TEST(test_tokenizer_round_trips_random_text) {
    /* With byte fallback every string encodes, and the Llama decoder restores it exactly when
     * it has no '▁' of its own. Random code points from all planes, as UTF-8. */
    rs_tokenizer *tok = llama_like();
    REQUIRE(tok, "%s", rs_last_error());
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    for (int iter = 0; iter < 500; iter++) {
        char text[256];
        size_t n = 0;
        int chars = (int)(rs_rng_next(&r) % 40);
        for (int i = 0; i < chars; i++) {
            uint32_t cp = (uint32_t)(rs_rng_next(&r) % 3 == 0 ? rs_rng_next(&r) % 0x110000
                                                              : rs_rng_next(&r) % 0x80);
            if ((cp >= 0xD800 && cp <= 0xDFFF) || cp == 0x2581 || cp == 0) continue;
            n += put_utf8(text + n, cp);
        }
        text[n] = 0;
        int32_t *ids;
        int n_ids;
        REQUIRE(rs_tokenizer_encode(tok, text, n, 0, &ids, &n_ids) == 0, "%s", rs_last_error());
        size_t len;
        char *back = rs_tokenizer_decode_n(tok, ids, n_ids, 0, &len);
        CHECK(len == n && memcmp(back, text, n) == 0, "round trip of %zu bytes gave %zu", n, len);
        free(back);
        free(ids);
    }
    rs_tokenizer_free(tok);
}

TEST(test_tokenizer_rejects_invalid_utf8) {
    rs_tokenizer *tok = llama_like();
    REQUIRE(tok, "%s", rs_last_error());
    int32_t *ids = (int32_t *)1;
    int n = 7;
    CHECK(rs_tokenizer_encode(tok, "ok\xC0\xAF", 4, 0, &ids, &n) == -1, "overlong '/' accepted");
    CHECK(strstr(rs_last_error(), "UTF-8") != NULL, "message: %s", rs_last_error());
    CHECK(ids == NULL && n == 0, "outputs not cleared");
    rs_tokenizer_free(tok);
}

TEST(test_tokenizer_errors_name_the_file) {
    CHECK(rs_tokenizer_parse("some/dir/my_tok.json", "{\"model\": ", 10) == NULL,
          "bad JSON accepted");
    CHECK(strstr(rs_last_error(), "some/dir/my_tok.json") && strstr(rs_last_error(), "JSON"), "%s",
          rs_last_error());
    const char *unigram = "{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}}";
    CHECK(rs_tokenizer_parse("u.json", unigram, strlen(unigram)) == NULL, "Unigram accepted");
    CHECK(strstr(rs_last_error(), "u.json") && strstr(rs_last_error(), "Unigram"), "%s",
          rs_last_error());
    CHECK(rs_tokenizer_load("/nonexistent/tokenizer.json") == NULL, "missing file accepted");
    CHECK(strstr(rs_last_error(), "/nonexistent/tokenizer.json") != NULL, "%s", rs_last_error());
}

TEST(test_tokenizer_loads_from_a_model_directory) {
    char *json = llama_like_json(), *path = rs_path_join(rs_test_tmpdir(), "tokenizer.json");
    REQUIRE(rs_write_file_atomic(path, json, strlen(json)) == 0, "%s", rs_last_error());
    rs_tokenizer *tok = rs_tokenizer_load(rs_test_tmpdir());
    CHECK(tok && rs_tokenizer_vocab_size(tok) == 264, "%s", rs_last_error());
    rs_tokenizer_free(tok);
    free(path);
    free(json);
}
