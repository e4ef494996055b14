/* calib: calibration texts for quantization and protection (quant_methods.h): .txt (one text
 * per non-empty line), .csv (a named column, RFC 4180 quoting: fields in double quotes may hold
 * commas, newlines and "" for a quote) and .jsonl (a named string member per line; "a+b" joins
 * members a and b with a space into the text and keeps b as the target). Read through records.h. */
#include "resafe/quant_methods.h"
#include "resafe/records.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void calib_add(rs_calib_set *c, char *text, char *target) {
    c->texts = rs_realloc(c->texts, (size_t)(c->n + 1) * sizeof *c->texts);
    c->targets = rs_realloc(c->targets, (size_t)(c->n + 1) * sizeof *c->targets);
    c->texts[c->n] = text;
    c->targets[c->n++] = target;
}

int rs_calib_load(const char *path, const char *column, int max_items, rs_calib_set *out) {
    memset(out, 0, sizeof *out);
    rs_table t;
    RS_TRY(rs_table_load(path, max_items, &t));
    if (!t.is_txt && (!column || !*column)) {
        rs_table_free(&t);
        return RS_FAIL("%s: a column (member) name is needed for CSV and JSONL files", path);
    }
    char *a = rs_strdup(t.is_txt ? "text" : column), *b = strchr(a, '+');
    if (b) *b++ = '\0';
    int ca, cb = -1, rc = rs_table_require(&t, a, &ca);
    if (rc == 0 && b) rc = rs_table_require(&t, b, &cb);
    for (int r = 0; r < t.n_rows && rc == 0; r++) {
        const char *first, *second = NULL;
        rc = rs_table_text(&t, r, ca, 1, &first);
        if (rc == 0 && b) rc = rs_table_text(&t, r, cb, 1, &second);
        if (rc != 0) break;
        if (second) {
            size_t n = strlen(first) + strlen(second) + 2;
            char *joined = rs_malloc(n);
            snprintf(joined, n, "%s %s", first, second);
            calib_add(out, joined, rs_strdup(second));
        } else {
            calib_add(out, rs_strdup(first), NULL);
        }
    }
    int with_targets = b != NULL;
    free(a);
    rs_table_free(&t);
    if (rc == 0 && !with_targets) { /* targets only for "a+b" members */
        free(out->targets);
        out->targets = NULL;
    }
    if (rc != 0) rs_calib_free(out);
    return rc;
}

void rs_calib_free(rs_calib_set *c) {
    for (int i = 0; i < c->n; i++) {
        free(c->texts[i]);
        if (c->targets) free(c->targets[i]);
    }
    free(c->texts);
    free(c->targets);
    memset(c, 0, sizeof *c);
}
