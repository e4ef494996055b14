/* records: .txt/.csv/.jsonl prompt files as tables (include/resafe/records.h). */
#include "resafe/records.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/core.h"

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int full(const rs_table *t, int max_rows) { return max_rows > 0 && t->n_rows >= max_rows; }

static int add_col(rs_table *t, const char *name) {
    for (int i = 0; i < t->n_cols; i++)
        if (strcmp(t->names[i], name) == 0) return i;
    /* a new column: widen every row already read */
    int nc = t->n_cols + 1;
    char **cells = rs_calloc((size_t)t->n_rows * (size_t)nc + 1, sizeof *cells);
    for (int r = 0; r < t->n_rows; r++)
        for (int c = 0; c < t->n_cols; c++) cells[r * nc + c] = t->cells[r * t->n_cols + c];
    free(t->cells);
    t->cells = cells;
    t->names = rs_realloc(t->names, (size_t)nc * sizeof *t->names);
    t->names[t->n_cols] = rs_strdup(name);
    t->n_cols = nc;
    return nc - 1;
}

/* A new empty row; returns its index. */
static int add_row(rs_table *t, int line) {
    int r = t->n_rows++;
    t->cells = rs_realloc(t->cells, ((size_t)t->n_rows * (size_t)t->n_cols + 1) * sizeof *t->cells);
    for (int c = 0; c < t->n_cols; c++) t->cells[r * t->n_cols + c] = NULL;
    t->lines = rs_realloc(t->lines, (size_t)t->n_rows * sizeof *t->lines);
    t->lines[r] = line;
    return r;
}

static int load_txt(char *data, int max_rows, rs_table *t) {
    add_col(t, "text");
    int line_no = 1;
    for (char *line = data; line && *line && !full(t, max_rows); line_no++) {
        char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        if (len > 0 && line[len - 1] == '\r') len--;
        if (len > 0) {
            int r = add_row(t, line_no);
            t->cells[r] = rs_strndup(line, len);
        }
        line = nl ? nl + 1 : NULL;
    }
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

static void free_fields(char **f, int n) {
    for (int i = 0; i < n; i++) free(f[i]);
    free(f);
}

/* One record: fields[] (malloc'ed), *n_fields. */
static int csv_record(csv_reader *rd, const char *path, char ***fields, int *n_fields) {
    *fields = NULL;
    *n_fields = 0;
    do {
        char *f = NULL;
        if (csv_field(rd, path, &f) != 0) {
            free_fields(*fields, *n_fields);
            *fields = NULL;
            return -1;
        }
        *fields = rs_realloc(*fields, (size_t)(*n_fields + 1) * sizeof **fields);
        (*fields)[(*n_fields)++] = f;
    } while (!rd->at_end);
    return 0;
}

static int load_csv(const char *path, char *data, int max_rows, rs_table *t) {
    csv_reader rd = {data, 1, 0};
    char **head;
    int n_head;
    if (*data == '\0') return RS_FAIL("%s: empty CSV file (no header)", path);
    RS_TRY(csv_record(&rd, path, &head, &n_head));
    for (int i = 0; i < n_head; i++) add_col(t, head[i]);
    int n_cols = t->n_cols; /* repeated header names share a column: keep the count */
    free_fields(head, n_head);
    while (*rd.p && !full(t, max_rows)) {
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
        int r = add_row(t, line);
        for (int c = 0; c < nf && c < n_cols; c++) {
            char **cell = &t->cells[r * t->n_cols + c];
            if (!*cell) *cell = f[c], f[c] = NULL;
        }
        free_fields(f, nf);
    }
    return 0;
}

/* ---- JSONL */
static int jsonl_line(rs_table *t, const char *path, int line, const char *text, size_t len) {
    cJSON *o = cJSON_ParseWithLength(text, len);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return RS_FAIL("%s:%d: not a JSON object", path, line);
    }
    int r = add_row(t, line);
    for (const cJSON *m = o->child; m; m = m->next) {
        const cJSON *v = m;
        char num[64];
        const char *s = NULL;
        if (cJSON_IsArray(v) && cJSON_IsString(v->child)) v = v->child;
        if (cJSON_IsString(v))
            s = v->valuestring;
        else if (cJSON_IsNumber(v)) {
            double d = v->valuedouble;
            if (d == (double)(long long)d && d > -1e15 && d < 1e15)
                snprintf(num, sizeof num, "%lld", (long long)d);
            else
                snprintf(num, sizeof num, "%.17g", d);
            s = num;
        }
        if (!s || !m->string) continue;
        int c = add_col(t, m->string);
        char **cell = &t->cells[r * t->n_cols + c];
        if (!*cell) *cell = rs_strdup(s);
    }
    cJSON_Delete(o);
    return 0;
}

static int load_jsonl(const char *path, char *data, int max_rows, rs_table *t) {
    int line = 1;
    for (char *p = data; p && *p && !full(t, max_rows); line++) {
        char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        size_t k = 0;
        while (k < len && (p[k] == ' ' || p[k] == '\t' || p[k] == '\r')) k++;
        if (k < len) RS_TRY(jsonl_line(t, path, line, p, len));
        p = nl ? nl + 1 : NULL;
    }
    return 0;
}

int rs_table_load(const char *path, int max_rows, rs_table *t) {
    memset(t, 0, sizeof *t);
    int is_csv = ends_with(path, ".csv"), is_jsonl = ends_with(path, ".jsonl");
    int is_txt = ends_with(path, ".txt");
    if (!is_csv && !is_jsonl && !is_txt)
        return RS_FAIL("%s: unknown file type (expected .txt, .csv or .jsonl)", path);
    char *data;
    RS_TRY(rs_read_file(path, &data, NULL));
    t->path = rs_strdup(path);
    t->is_txt = is_txt;
    char *text = strncmp(data, "\xEF\xBB\xBF", 3) == 0 ? data + 3 : data; /* UTF-8 BOM (Excel) */
    int rc = is_csv     ? load_csv(path, text, max_rows, t)
             : is_jsonl ? load_jsonl(path, text, max_rows, t)
                        : load_txt(text, max_rows, t);
    free(data);
    if (rc == 0 && t->n_rows == 0) rc = RS_FAIL("%s: no rows", path);
    if (rc != 0) rs_table_free(t);
    return rc;
}

void rs_table_free(rs_table *t) {
    for (size_t i = 0; i < (size_t)t->n_rows * (size_t)t->n_cols; i++) free(t->cells[i]);
    for (int i = 0; i < t->n_cols; i++) free(t->names[i]);
    free(t->cells), free(t->names), free(t->lines), free(t->path);
    memset(t, 0, sizeof *t);
}

int rs_table_col(const rs_table *t, const char *name) {
    if (t->is_txt) return 0;
    for (int i = 0; i < t->n_cols; i++)
        if (strcmp(t->names[i], name) == 0) return i;
    return -1;
}

int rs_table_require(const rs_table *t, const char *name, int *col) {
    *col = rs_table_col(t, name);
    if (*col >= 0) return 0;
    char list[512] = "", shown[96];
    size_t n = 0;
    for (int i = 0; i < t->n_cols && n + 1 < sizeof list; i++)
        n += (size_t)snprintf(list + n, sizeof list - n, "%s%s", i ? ", " : "", t->names[i]);
    return RS_FAIL("%s: no column '%s' (columns: %s)", t->path, rs_shown_text(name, shown, sizeof shown), list);
}

const char *rs_table_cell(const rs_table *t, int row, int col) {
    if (col < 0 || row < 0 || row >= t->n_rows || col >= t->n_cols) return NULL;
    return t->cells[row * t->n_cols + col];
}

int rs_table_text(const rs_table *t, int row, int col, int allow_empty, const char **out) {
    const char *s = rs_table_cell(t, row, col);
    const char *name = col >= 0 && col < t->n_cols ? t->names[col] : "?";
    if (!s) return RS_FAIL("%s:%d: no string member '%s'", t->path, t->lines[row], name);
    if (!allow_empty && !*s) return RS_FAIL("%s:%d: empty field '%s'", t->path, t->lines[row], name);
    *out = s;
    return 0;
}
