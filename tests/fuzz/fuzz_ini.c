/* libFuzzer: bytes -> rs_config_parse. An accepted file must print (rs_config_print) to text
 * that parses back to the same values, unless printing pushed a line past the reader's limit. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/config.h"
#include "resafe/core.h"

static void same_values(const rs_config *a, const rs_config *b) {
    int n;
    const rs_config_key *schema = rs_config_schema(&n);
    for (int i = 0; i < n; i++) {
        const char *s = schema[i].section, *k = schema[i].key;
        switch (schema[i].type) {
        case RS_CFG_INT:
            if (rs_config_get_int(a, s, k) != rs_config_get_int(b, s, k)) abort();
            break;
        case RS_CFG_FLOAT:
            if (rs_config_get_float(a, s, k) != rs_config_get_float(b, s, k)) abort();
            break;
        case RS_CFG_BOOL:
            if (rs_config_get_bool(a, s, k) != rs_config_get_bool(b, s, k)) abort();
            break;
        default:
            if (strcmp(rs_config_get_str(a, s, k), rs_config_get_str(b, s, k)) != 0) abort();
        }
    }
}

/* A rejection is one printable line: no control bytes from the input leak into it. */
static void one_line(const char *msg) {
    if (!msg[0]) abort();
    for (const unsigned char *p = (const unsigned char *)msg; *p; p++)
        if (*p < 0x20 || *p == 0x7f) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = 0;
    rs_config *cfg = rs_config_parse("fuzz.ini", text);
    if (cfg) {
        char *printed = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&printed, &len);
        rs_config_print(cfg, f);
        fclose(f);
        rs_config *again = rs_config_parse("printed.ini", printed);
        if (again)
            same_values(cfg, again);
        else if (!strstr(rs_last_error(), "line longer than"))
            abort();
        rs_config_free(again);
        free(printed);
        rs_config_free(cfg);
    } else {
        one_line(rs_last_error());
    }
    free(text);
    return 0;
}
