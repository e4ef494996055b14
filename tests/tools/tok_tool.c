/* tok_tool: drives the tokenizer from the Python reference tests, many strings per process.
 *   tok_tool load   TOKENIZER                     prints "vocab_size N"
 *   tok_tool encode TOKENIZER TEXTS ADD_SPECIAL   TEXTS: one hex-encoded UTF-8 string per line;
 *                                                 prints the ids of each, or "ERR <message>"
 *   tok_tool decode TOKENIZER IDS SKIP_SPECIAL    IDS: space-separated ids per line;
 *                                                 prints the hex of each decoded string
 *   tok_tool pretok TOKENIZER TEXTS 0             prints the pre-tokenizer's pieces of each text,
 *                                                 hex, space-separated
 *   tok_tool tokens TOKENIZER                     prints "id special hex(token)" for every id
 * Hex keeps every byte (NUL, newlines, invalid UTF-8) intact across the pipe.
 * A tokenizer that fails to load ends the process with the one-line error (rs_die_last). */
#include "resafe/tokenizer.h"

#include <stdlib.h>
#include <string.h>

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static void print_hex(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x", (unsigned char)s[i]);
    putchar('\n');
}

/* Split the file into lines in place; returns the number of lines (a trailing newline ends the
 * last). */
static size_t split_lines(char *data, size_t size, char ***lines) {
    size_t n = 0, cap = 1024;
    *lines = malloc(cap * sizeof **lines);
    char *p = data, *end = data + size;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) nl = end;
        *nl = 0;
        if (n == cap) *lines = realloc(*lines, (cap *= 2) * sizeof **lines);
        (*lines)[n++] = p;
        p = nl + 1;
    }
    return n;
}

static void encode_line(const rs_tokenizer *tok, const char *hex, int add_special) {
    size_t len = strlen(hex) / 2;
    char *text = malloc(len + 1);
    for (size_t i = 0; i < len; i++)
        text[i] = (char)(hex_value(hex[2 * i]) * 16 + hex_value(hex[2 * i + 1]));
    int32_t *ids;
    int n;
    if (rs_tokenizer_encode(tok, text, len, add_special, &ids, &n) != 0) {
        printf("ERR %s\n", rs_last_error());
    } else {
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        putchar('\n');
        free(ids);
    }
    free(text);
}

static void pretok_line(const rs_tokenizer *tok, const char *hex) {
    size_t len = strlen(hex) / 2, *lens;
    char *text = malloc(len + 1), *pieces;
    int n;
    for (size_t i = 0; i < len; i++)
        text[i] = (char)(hex_value(hex[2 * i]) * 16 + hex_value(hex[2 * i + 1]));
    if (rs_tokenizer_pre_tokenize(tok, text, len, &pieces, &lens, &n) != 0) {
        printf("ERR %s\n", rs_last_error());
    } else {
        size_t off = 0;
        for (int i = 0; i < n; i++) {
            if (i) putchar(' ');
            for (size_t k = 0; k < lens[i]; k++) printf("%02x", (unsigned char)pieces[off + k]);
            off += lens[i];
        }
        putchar('\n');
        free(pieces);
        free(lens);
    }
    free(text);
}

static void decode_line(const rs_tokenizer *tok, const char *line, int skip_special) {
    int32_t *ids = malloc((strlen(line) / 2 + 1) * sizeof *ids);
    int n = 0;
    for (char *p = (char *)line, *next; *p; p = next) {
        long v = strtol(p, &next, 10);
        if (next == p) break;
        ids[n++] = (int32_t)v;
    }
    size_t len;
    char *text = rs_tokenizer_decode_n(tok, ids, n, skip_special, &len);
    print_hex(text, len);
    free(text);
    free(ids);
}

static void print_tokens(const rs_tokenizer *tok) {
    for (int id = 0; id < rs_tokenizer_vocab_size(tok); id++) {
        const char *t = rs_tokenizer_id_to_token(tok, id);
        printf("%d %d ", id, rs_tokenizer_is_special(tok, id));
        print_hex(t ? t : "", t ? strlen(t) : 0);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: tok_tool load|encode|decode|pretok|tokens TOKENIZER [FILE FLAG]\n");
        return 2;
    }
    rs_set_log_level(RS_LOG_ERROR);
    rs_tokenizer *tok = rs_tokenizer_load(argv[2]);
    if (!tok) rs_die_last();
    const char *mode = argv[1];
    if (strcmp(mode, "load") == 0) {
        printf("vocab_size %d\n", rs_tokenizer_vocab_size(tok));
    } else if (strcmp(mode, "tokens") == 0) {
        print_tokens(tok);
    } else if ((strcmp(mode, "encode") == 0 || strcmp(mode, "decode") == 0 ||
                strcmp(mode, "pretok") == 0) &&
               argc == 5) {
        char *data, **lines;
        size_t size;
        if (rs_read_file(argv[3], &data, &size) != 0) rs_die_last();
        size_t n = split_lines(data, size, &lines);
        for (size_t i = 0; i < n; i++) {
            if (mode[0] == 'e')
                encode_line(tok, lines[i], atoi(argv[4]));
            else if (mode[0] == 'p')
                pretok_line(tok, lines[i]);
            else
                decode_line(tok, lines[i], atoi(argv[4]));
        }
        free(lines);
        free(data);
    } else {
        fprintf(stderr, "tok_tool: unknown mode or missing arguments\n");
        rs_tokenizer_free(tok);
        return 2;
    }
    rs_tokenizer_free(tok);
    return 0;
}
