/* calib: calibration texts for quantization and protection (quant_methods.h): .txt (one text
 * per non-empty line), .csv (a named column, RFC 4180 quoting: fields in double quotes may hold
 * commas, newlines and "" for a quote) and .jsonl (a named string member per line; "a+b" joins
 * members a and b with a space into the text and keeps b as the target). */
#include "resafe/quant_methods.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static void calib_add(rs_calib_set *c, char *text, char *target) {
    c->texts = rs_realloc(c->texts, (size_t)(c->n + 1) * sizeof *c->texts);
    c->targets = rs_realloc(c->targets, (size_t)(c->n + 1) * sizeof *c->targets);
    c->texts[c->n] = text;
    c->targets[c->n++] = target;
}

static int full(const rs_calib_set *c, int max_items) { return max_items > 0 && c->n >= max_items; }

static int load_txt(const char *path, char *data, int max_items, rs_calib_set *c) {
    for (char *line = data; line && *line && !full(c, max_items);) {
        char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        if (len > 0 && line[len - 1] == '\r') len--;
        if (len > 0) calib_add(c, rs_strndup(line, len), NULL);
        line = nl ? nl + 1 : NULL;
    }
    (void)path;
    return 0;
}

/* ---- CSV (RFC 4180) */
typedef struct {
    const char *p;
    int line;   /* 1-based line of p */
    int at_end; /* the record ended */
} csv_reader;

/* One field into a malloc'ed string; *rd advanced past the separator or the record end. */
static int csv_field(csv_reader *rd, const char *path, char **out) {
    size_t cap = 64, n = 0;
    char *buf = rs_malloc(cap);
    const char *p = rd->p;
    int start_line = rd->line;
    if (*p == '"') {
        for (p++;; p++) {
            if (*p == '\0') {
                free(buf);
                return RS_FAIL("%s:%d: unterminated quoted field", path, start_line);
            }
            if (*p == '"' && p[1] == '"')
                p++;
            else if (*p == '"')
                break;
            if (*p == '\n') rd->line++;
            if (n + 2 > cap) buf = rs_realloc(buf, cap *= 2);
            buf[n++] = *p;
        }
        p++;
        if (*p == '\r' && p[1] == '\n') p++;
        if (*p != ',' && *p != '\n' && *p != '\0') {
            free(buf);
            return RS_FAIL("%s:%d: text after a closing quote", path, rd->line);
        }
    } else {
        for (; *p && *p != ',' && *p != '\n'; p++) {
            if (*p == '"') {
                free(buf);
                return RS_FAIL("%s:%d: quote inside an unquoted field", path, rd->line);
            }
            if (*p == '\r' && (p[1] == '\n' || p[1] == '\0')) continue;
            if (n + 2 > cap) buf = rs_realloc(buf, cap *= 2);
            buf[n++] = *p;
        }
    }
    buf[n] = '\0';
    rd->at_end = *p != ',';
    if (*p == '\n') rd->line++;
    rd->p = *p ? p + 1 : p;
    *out = buf;
    return 0;
}

/* One record: fields[] (malloc'ed), *n_fields. */
static int csv_record(csv_reader *rd, const char *path, char ***fields, int *n_fields) {
    *fields = NULL;
    *n_fields = 0;
    do {
        char *f = NULL;
        if (csv_field(rd, path, &f) != 0) {
            for (int i = 0; i < *n_fields; i++) free((*fields)[i]);
            free(*fields);
            return -1;
        }
        *fields = rs_realloc(*fields, (size_t)(*n_fields + 1) * sizeof **fields);
        (*fields)[(*n_fields)++] = f;
    } while (!rd->at_end);
    return 0;
}

static void free_fields(char **f, int n) {
    for (int i = 0; i < n; i++) free(f[i]);
    free(f);
}

static int load_csv(const char *path, char *data, const char *column, int max_items,
                    rs_calib_set *c) {
    csv_reader rd = {data, 1, 0};
    char **head;
    int n_head, col = -1;
    if (*data == '\0') return RS_FAIL("%s: empty CSV file (no header)", path);
    RS_TRY(csv_record(&rd, path, &head, &n_head));
    for (int i = 0; i < n_head; i++)
        if (strcmp(head[i], column) == 0) col = i;
    free_fields(head, n_head);
    if (col < 0) return RS_FAIL("%s:1: no column named '%s' in the header", path, column);
    while (*rd.p && !full(c, max_items)) {
        int line = rd.line, nf;
        char **f;
        if (*rd.p == '\n' || (*rd.p == '\r' && rd.p[1] == '\n')) { /* blank line */
            rd.p += *rd.p == '\r' ? 2 : 1;
            rd.line++;
            continue;
        }
        RS_TRY(csv_record(&rd, path, &f, &nf));
        if (nf != n_head) {
            free_fields(f, nf);
            return RS_FAIL("%s:%d: %d fields, the header has %d", path, line, nf, n_head);
        }
        calib_add(c, f[col], NULL);
        f[col] = NULL;
        free_fields(f, nf);
    }
    return 0;
}

/* ---- JSONL */
static int json_member(const cJSON *o, const char *name, const char *path, int line, char **out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsString(v)) return RS_FAIL("%s:%d: no string member '%s'", path, line, name);
    *out = rs_strdup(v->valuestring);
    return 0;
}

static int jsonl_line(const char *path, int line, const char *text, size_t len, const char *a,
                      const char *b, rs_calib_set *c) {
    cJSON *o = cJSON_ParseWithLength(text, len);
    char *first = NULL, *second = NULL;
    int rc = -1;
    if (!cJSON_IsObject(o))
        RS_FAIL("%s:%d: not a JSON object", path, line);
    else if (json_member(o, a, path, line, &first) == 0 &&
             (!b || json_member(o, b, path, line, &second) == 0)) {
        if (second) {
            size_t n = strlen(first) + strlen(second) + 2;
            char *joined = rs_malloc(n);
            snprintf(joined, n, "%s %s", first, second);
            free(first);
            first = joined;
        }
        calib_add(c, first, second);
        first = second = NULL;
        rc = 0;
    }
    free(first), free(second);
    cJSON_Delete(o);
    return rc;
}

static int load_jsonl(const char *path, char *data, const char *column, int max_items,
                      rs_calib_set *c) {
    char *a = rs_strdup(column), *b = strchr(a, '+');
    if (b) *b++ = '\0';
    int line = 1, rc = 0;
    for (char *p = data; p && *p && !full(c, max_items) && rc == 0; line++) {
        char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        size_t k = 0;
        while (k < len && (p[k] == ' ' || p[k] == '\t' || p[k] == '\r')) k++;
        if (k < len) rc = jsonl_line(path, line, p, len, a, b, c);
        p = nl ? nl + 1 : NULL;
    }
    free(a);
    return rc;
}

int rs_calib_load(const char *path, const char *column, int max_items, rs_calib_set *out) {
    memset(out, 0, sizeof *out);
    int is_csv = ends_with(path, ".csv"), is_jsonl = ends_with(path, ".jsonl");
    if ((is_csv || is_jsonl) && (!column || !*column))
        return RS_FAIL("%s: a column (member) name is needed for CSV and JSONL files", path);
    char *data;
    RS_TRY(rs_read_file(path, &data, NULL));
    char *text = strncmp(data, "\xEF\xBB\xBF", 3) == 0 ? data + 3 : data; /* UTF-8 BOM (Excel) */
    int rc = is_csv     ? load_csv(path, text, column, max_items, out)
             : is_jsonl ? load_jsonl(path, text, column, max_items, out)
                        : load_txt(path, text, max_items, out);
    free(data);
    if (rc == 0 && out->n == 0) rc = RS_FAIL("%s: no calibration texts", path);
    if (rc == 0 && !(is_jsonl && strchr(column, '+'))) { /* targets only for "a+b" members */
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
