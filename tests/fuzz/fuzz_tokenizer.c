/* libFuzzer target: bytes -> rs_tokenizer_parse. When a tokenizer loads, encode fixed strings and
 * the input's own tail as text, decode the ids (with and without specials) and ids made from
 * input bytes, pre-tokenize; everything must stay in bounds and free what it allocates. */
#include "resafe/tokenizer.h"

#include <stdlib.h>
#include <string.h>

static void exercise_text(const rs_tokenizer *tok, const char *text, size_t len) {
    for (int add_special = 0; add_special <= 1; add_special++) {
        int32_t *ids;
        int n;
        if (rs_tokenizer_encode(tok, text, len, add_special, &ids, &n) != 0) continue;
        for (int i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= rs_tokenizer_vocab_size(tok))
                abort(); /* ids stay in range */
        size_t out_len;
        free(rs_tokenizer_decode_n(tok, ids, n, 0, &out_len));
        free(rs_tokenizer_decode_n(tok, ids, n, 1, &out_len));
        free(ids);
    }
    char *pieces;
    size_t *lens;
    int n;
    if (rs_tokenizer_pre_tokenize(tok, text, len, &pieces, &lens, &n) == 0) {
        free(pieces);
        free(lens);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char *texts[] = {"",
                                  "Hello world",
                                  " it's  I'M 12345 \n\n\t x",
                                  "<s>a</s><|eot_id|>",
                                  "\xC3\xA9\xF0\x9F\x98\x80\xE4\xBD\xA0\xE5\xA5\xBD",
                                  "\xE2\x96\x81 a",
                                  "\xFF bad",
                                  "'s'S'\xC5\xBF  \r\n"};
    rs_set_log_level(RS_LOG_ERROR);
    rs_tokenizer *tok = rs_tokenizer_parse("fuzz.json", (const char *)data, size);
    if (!tok) return 0;
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++)
        exercise_text(tok, texts[i], strlen(texts[i]));
    size_t tail = size < 256 ? size : 256;
    exercise_text(tok, (const char *)data + size - tail, tail);
    int32_t ids[64];
    int n = 0;
    for (size_t i = 0; i + 1 < size && n < 64; i += 2)
        ids[n++] = (int32_t)((data[i] << 8 | data[i + 1]) % (rs_tokenizer_vocab_size(tok) + 4)) - 2;
    size_t len;
    free(rs_tokenizer_decode_n(tok, ids, n, 0, &len));
    free(rs_tokenizer_decode_n(tok, ids, n, 1, &len));
    for (int32_t id = -1; id < 8; id++) {
        const char *t = rs_tokenizer_id_to_token(tok, id);
        if (t) rs_tokenizer_token_to_id(tok, t);
        rs_tokenizer_is_special(tok, id);
    }
    rs_tokenizer_free(tok);
    return 0;
}
