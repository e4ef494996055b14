/* safetensors: read (mmap, sharded index) and write (atomic) Hugging Face safetensors files.
 * The reader trusts nothing: every number in the header is checked before it is used to form a
 * pointer, and the tensors of a file must tile its data section exactly, as the reference
 * implementation (huggingface/safetensors, Rust) requires. */
#define _POSIX_C_SOURCE 200809L
#include "resafe/safetensors.h"

#include <cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The reference reader refuses headers over 100 MB; a bigger one is an attack, not a model. */
#define ST_MAX_HEADER 100000000ull
/* Integers read from JSON pass through a double: above 2^53 they may have been rounded. */
#define ST_MAX_JSON_INT 9007199254740992.0
#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"

/* ---------------------------------------------------------------- small helpers */

/* Names come from the file and a JSON escape can put a newline in one: rs_fail_at (core.c)
 * keeps every message on one line. */
#define ST_FAIL(...) RS_FAIL(__VA_ARGS__)

static uint64_t read_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void write_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* A JSON number that is a non-negative integer small enough to have survived the double. */
static int json_to_uint(const cJSON *item, uint64_t *out) {
    if (!cJSON_IsNumber(item)) return -1;
    double v = item->valuedouble;
    if (!(v >= 0) || signbit(v) || v >= ST_MAX_JSON_INT || v != floor(v)) return -1;
    *out = (uint64_t)v;
    return 0;
}

/* ---------------------------------------------------------------- header text checks */

/* Length of the UTF-8 sequence at s (max n bytes), 0 if malformed (overlong, surrogate,
 * above U+10FFFF, truncated) or a NUL byte. */
static size_t utf8_sequence_length(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    if (c == 0) return 0;
    if (c < 0x80) return 1;
    size_t len;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) len = 2, cp = c & 0x1f, min = 0x80;
    else if ((c & 0xf0) == 0xe0) len = 3, cp = c & 0x0f, min = 0x800;
    else if ((c & 0xf8) == 0xf0) len = 4, cp = c & 0x07, min = 0x10000;
    else return 0;
    if (len > n) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return len;
}

static int check_utf8(const char *label, const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t len = utf8_sequence_length(s + i, n - i);
        if (!len && !s[i]) return ST_FAIL("%s: header byte %zu is a NUL byte (padding must be spaces)", label, i);
        if (!len) return ST_FAIL("%s: header byte %zu is not valid UTF-8 text", label, i);
        i += len;
    }
    return 0;
}

/* A number token s[0..len) in strict JSON integer form: -?(0|[1-9][0-9]*). */
static int is_json_integer(const char *s, size_t len) {
    size_t i = s[0] == '-';
    if (i == len) return 0;
    if (s[i] == '0' && len - i > 1) return 0; /* leading zero, which strict JSON forbids */
    for (; i < len; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}

/* What cJSON is lenient about, found by a scan that tracks strings:
 * - always: raw control characters (cJSON skips every byte below 0x20 as whitespace and keeps
 *   them in strings; JSON allows only tab, newline and carriage return between tokens), and the
 *   escape \u0000, at which cJSON would silently cut a name short;
 * - with check_numbers: cJSON keeps only a double per number, so "2.0", "2e0" and "02" look
 *   like "2"; every number in a header is a shape entry or an offset, so anything but a plain
 *   integer is an error (run after the entries, whose checks give more precise messages). */
static int check_header_tokens(const char *label, const char *s, size_t n, int check_numbers) {
    int in_string = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 && (in_string || (c != '\t' && c != '\n' && c != '\r')))
            return ST_FAIL("%s: header byte %zu is a raw control character (0x%02x)", label, i, c);
        if (in_string) {
            if (c == '"') in_string = 0;
            else if (c == '\\' && i + 1 < n) {
                if (n - i >= 6 && memcmp(s + i + 1, "u0000", 5) == 0)
                    return ST_FAIL("%s: header contains a NUL character (\\u0000) in a string", label);
                i++;
            }
        } else if (c == '"') {
            in_string = 1;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            size_t j = i;
            while (j < n && s[j] && strchr("0123456789+-.eE", s[j])) j++;
            if (check_numbers && !is_json_integer(s + i, j - i))
                return ST_FAIL("%s: header number '%.*s' at byte %zu is not a plain integer", label,
                               (int)(j - i > 32 ? 32 : j - i), s + i, i);
            i = j - 1;
        }
    }
    return 0;
}

/* Parse the JSON header: must start with '{', be UTF-8, one object, only whitespace after. */
static cJSON *parse_header_json(const char *label, const char *text, size_t n) {
    if (n == 0 || text[0] != '{') {
        ST_FAIL("%s: header does not start with '{' (not a safetensors file?)", label);
        return NULL;
    }
    if (check_utf8(label, (const uint8_t *)text, n) != 0) return NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, n, &end, 0);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= text && at <= text + n ? (size_t)(at - text) : 0;
        ST_FAIL("%s: header is not valid JSON (error near header byte %zu)", label, off);
        return NULL;
    }
    for (const char *p = end; p && p < text + n; p++)
        if (!*p || !strchr(" \t\r\n", *p)) {
            ST_FAIL("%s: header has data after the JSON object at byte %zu", label, (size_t)(p - text));
            cJSON_Delete(root);
            return NULL;
        }
    if (!cJSON_IsObject(root)) {
        ST_FAIL("%s: header is not a JSON object", label);
        cJSON_Delete(root);
        return NULL;
    }
    if (check_header_tokens(label, text, n, 0) != 0) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

/* ---------------------------------------------------------------- set bookkeeping */

/* A tensor's byte range in its file's data section, kept while checking the tiling. */
typedef struct {
    uint64_t begin, end;
    const char *name;
} st_span;

static rs_st_tensor *push_tensor(rs_st_set *set) {
    int n = set->n_tensors;
    if ((n & (n - 1)) == 0) /* grow at powers of two */
        set->tensors = rs_realloc(set->tensors, (size_t)(n ? 2 * n : 1) * sizeof *set->tensors);
    rs_st_tensor *t = &set->tensors[set->n_tensors++];
    memset(t, 0, sizeof *t);
    return t;
}

static int push_file(rs_st_set *set, const char *path, void *map, size_t size) {
    int i = set->n_files++;
    set->paths = rs_realloc(set->paths, (size_t)set->n_files * sizeof *set->paths);
    set->maps = rs_realloc(set->maps, (size_t)set->n_files * sizeof *set->maps);
    set->sizes = rs_realloc(set->sizes, (size_t)set->n_files * sizeof *set->sizes);
    set->paths[i] = rs_strdup(path);
    set->maps[i] = map;
    set->sizes[i] = size;
    return i;
}

void rs_st_close(rs_st_set *set) {
    if (!set) return;
    for (int i = 0; i < set->n_tensors; i++) free(set->tensors[i].name);
    for (int i = 0; i < set->n_files; i++) {
        if (set->maps && set->maps[i]) munmap(set->maps[i], set->sizes[i]);
        free(set->paths[i]);
    }
    for (int i = 0; i < set->n_meta; i++) {
        free(set->meta_keys[i]);
        free(set->meta_values[i]);
    }
    free(set->tensors);
    free(set->paths);
    free(set->maps);
    free(set->sizes);
    free(set->meta_keys);
    free(set->meta_values);
    memset(set, 0, sizeof *set);
}

/* ---------------------------------------------------------------- one header entry */

/* The three keys of a tensor entry, each exactly once and nothing else. */
static int tensor_entry_fields(const char *label, const cJSON *entry, const cJSON **dtype,
                               const cJSON **shape, const cJSON **offsets) {
    const char *name = entry->string;
    if (!cJSON_IsObject(entry)) return ST_FAIL("%s: tensor '%s': entry is not an object", label, name);
    *dtype = *shape = *offsets = NULL;
    for (const cJSON *f = entry->child; f; f = f->next) {
        const cJSON **slot = !f->string                          ? NULL
                             : strcmp(f->string, "dtype") == 0        ? dtype
                             : strcmp(f->string, "shape") == 0        ? shape
                             : strcmp(f->string, "data_offsets") == 0 ? offsets
                                                                      : NULL;
        if (!slot) return ST_FAIL("%s: tensor '%s': unknown key '%s'", label, name, f->string ? f->string : "");
        if (*slot) return ST_FAIL("%s: tensor '%s': key '%s' appears twice", label, name, f->string);
        *slot = f;
    }
    if (!*dtype) return ST_FAIL("%s: tensor '%s': missing 'dtype'", label, name);
    if (!*shape) return ST_FAIL("%s: tensor '%s': missing 'shape'", label, name);
    if (!*offsets) return ST_FAIL("%s: tensor '%s': missing 'data_offsets'", label, name);
    return 0;
}

/* dtype and shape; *nbytes = numel * dtype size, checked for overflow. */
static int parse_dtype_and_shape(const char *label, const char *name, const cJSON *dtype,
                                 const cJSON *shape, rs_st_tensor *t) {
    if (!cJSON_IsString(dtype) || rs_dtype_from_name(dtype->valuestring, &t->dtype) != 0)
        return ST_FAIL("%s: tensor '%s': unsupported dtype %s%s%s", label, name,
                       cJSON_IsString(dtype) ? "'" : "(not a string)",
                       cJSON_IsString(dtype) ? dtype->valuestring : "", cJSON_IsString(dtype) ? "'" : "");
    if (!cJSON_IsArray(shape)) return ST_FAIL("%s: tensor '%s': shape is not an array", label, name);
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > RS_MAX_DIMS)
        return ST_FAIL("%s: tensor '%s': shape has %d dimensions, at most %d are supported", label, name,
                       ndim, RS_MAX_DIMS);
    t->ndim = 0;
    size_t numel = 1;
    for (const cJSON *d = shape->child; d; d = d->next) {
        uint64_t v;
        if (json_to_uint(d, &v) != 0)
            return ST_FAIL("%s: tensor '%s': shape entry %d is not a non-negative integer", label, name,
                           t->ndim);
        t->shape[t->ndim++] = (int64_t)v;
        if (rs_mul_size(numel, (size_t)v, &numel) != 0)
            return ST_FAIL("%s: tensor '%s': shape element count overflows", label, name);
    }
    if (rs_mul_size(numel, rs_dtype_size(t->dtype), &t->nbytes) != 0)
        return ST_FAIL("%s: tensor '%s': shape byte size overflows", label, name);
    return 0;
}

/* data_offsets: [begin, end) inside the data section and exactly nbytes long. */
static int parse_offsets(const char *label, const char *name, const cJSON *offsets, size_t data_size,
                         const rs_st_tensor *t, st_span *span) {
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 ||
        json_to_uint(offsets->child, &span->begin) != 0 ||
        json_to_uint(offsets->child->next, &span->end) != 0)
        return ST_FAIL("%s: tensor '%s': data_offsets is not two non-negative integers", label, name);
    if (span->begin > span->end)
        return ST_FAIL("%s: tensor '%s': data_offsets [%llu, %llu) end before they begin", label, name,
                       (unsigned long long)span->begin, (unsigned long long)span->end);
    if (span->end > data_size)
        return ST_FAIL("%s: tensor '%s': data_offsets [%llu, %llu) exceed the %zu-byte data section",
                       label, name, (unsigned long long)span->begin, (unsigned long long)span->end,
                       data_size);
    if (span->end - span->begin != t->nbytes) {
        char shp[160];
        return ST_FAIL("%s: tensor '%s': data_offsets [%llu, %llu) hold %llu bytes but %s %s needs %zu",
                       label, name, (unsigned long long)span->begin, (unsigned long long)span->end,
                       (unsigned long long)(span->end - span->begin), rs_dtype_name(t->dtype),
                       rs_shape_text(shp, sizeof shp, t->ndim, t->shape), t->nbytes);
    }
    span->name = name;
    return 0;
}

static int parse_tensor_entry(rs_st_set *set, int file_index, const char *label, const cJSON *entry,
                              const uint8_t *data, size_t data_size, st_span *span) {
    const cJSON *dtype, *shape, *offsets;
    RS_TRY(tensor_entry_fields(label, entry, &dtype, &shape, &offsets));
    rs_st_tensor t;
    memset(&t, 0, sizeof t);
    RS_TRY(parse_dtype_and_shape(label, entry->string, dtype, shape, &t));
    RS_TRY(parse_offsets(label, entry->string, offsets, data_size, &t, span));
    t.name = rs_strdup(entry->string);
    t.data = data + span->begin;
    t.file_index = file_index;
    *push_tensor(set) = t;
    return 0;
}

/* __metadata__: an object of strings. Kept only when keep is set (the set's first file). */
static int parse_metadata(rs_st_set *set, const char *label, const cJSON *meta, int keep) {
    if (!cJSON_IsObject(meta)) return ST_FAIL("%s: __metadata__ is not an object", label);
    for (const cJSON *m = meta->child; m; m = m->next) {
        if (!cJSON_IsString(m)) return ST_FAIL("%s: __metadata__ value of '%s' is not a string", label, m->string);
        for (const cJSON *p = meta->child; p != m; p = p->next)
            if (strcmp(p->string, m->string) == 0)
                return ST_FAIL("%s: __metadata__ key '%s' appears twice", label, m->string);
    }
    if (!keep) return 0;
    int n = cJSON_GetArraySize(meta);
    set->meta_keys = rs_calloc((size_t)n, sizeof(char *));
    set->meta_values = rs_calloc((size_t)n, sizeof(char *));
    for (const cJSON *m = meta->child; m; m = m->next) {
        set->meta_keys[set->n_meta] = rs_strdup(m->string);
        set->meta_values[set->n_meta++] = rs_strdup(m->valuestring);
    }
    return 0;
}

/* ---------------------------------------------------------------- one file */

static int compare_spans(const void *a, const void *b) {
    const st_span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Tensors must cover the data section exactly once: no overlap, no gap, nothing left over
 * (the reference reader refuses all three). */
static int check_tiling(const char *label, st_span *spans, int n, size_t data_size) {
    qsort(spans, (size_t)n, sizeof *spans, compare_spans);
    uint64_t pos = 0;
    for (int i = 0; i < n; i++) {
        if (spans[i].begin < pos && strcmp(spans[i].name, spans[i - 1].name) == 0)
            return ST_FAIL("%s: tensor '%s' appears twice in the header", label, spans[i].name);
        if (spans[i].begin < pos)
            return ST_FAIL("%s: tensor '%s': data_offsets [%llu, %llu) overlap tensor '%s' [%llu, %llu)",
                           label, spans[i].name, (unsigned long long)spans[i].begin,
                           (unsigned long long)spans[i].end, spans[i - 1].name,
                           (unsigned long long)spans[i - 1].begin, (unsigned long long)spans[i - 1].end);
        if (spans[i].begin > pos)
            return ST_FAIL("%s: bytes [%llu, %llu) of the data section belong to no tensor", label,
                           (unsigned long long)pos, (unsigned long long)spans[i].begin);
        pos = spans[i].end;
    }
    if (pos != data_size)
        return ST_FAIL("%s: the data section has %zu bytes after the last tensor", label,
                       data_size - (size_t)pos);
    return 0;
}

/* Walk the header object: tensors into set (pointing into data), metadata, then the tiling. */
static int parse_entries(rs_st_set *set, int file_index, const char *label, const cJSON *root,
                         const uint8_t *data, size_t data_size) {
    int n = cJSON_GetArraySize(root), n_spans = 0, rc = 0, have_meta = 0;
    st_span *spans = rs_calloc((size_t)n, sizeof *spans);
    for (const cJSON *e = root->child; e && rc == 0; e = e->next) {
        if (!e->string) {
            rc = ST_FAIL("%s: header entry without a name", label);
        } else if (strcmp(e->string, "__metadata__") == 0) {
            rc = have_meta++ ? ST_FAIL("%s: __metadata__ appears twice", label)
                             : parse_metadata(set, label, e, file_index == 0);
        } else {
            rc = parse_tensor_entry(set, file_index, label, e, data, data_size, &spans[n_spans]);
            n_spans += rc == 0;
        }
    }
    if (rc == 0) rc = check_tiling(label, spans, n_spans, data_size);
    free(spans);
    return rc;
}

/* Parse the file image buf (length field + header + data) as file file_index of set. */
static int parse_file(rs_st_set *set, int file_index, const char *label, const uint8_t *buf, size_t size) {
    if (size < 8)
        return ST_FAIL("%s: file is %zu bytes, too short for the 8-byte header length", label, size);
    uint64_t header_len = read_le64(buf);
    if (header_len > ST_MAX_HEADER)
        return ST_FAIL("%s: header length %llu exceeds the %llu-byte limit", label,
                       (unsigned long long)header_len, ST_MAX_HEADER);
    if (header_len > size - 8)
        return ST_FAIL("%s: header length %llu exceeds the %zu bytes after the length field", label,
                       (unsigned long long)header_len, size - 8);
    cJSON *root = parse_header_json(label, (const char *)buf + 8, (size_t)header_len);
    if (!root) return -1;
    const uint8_t *data = buf + 8 + header_len;
    int rc = parse_entries(set, file_index, label, root, data, size - 8 - (size_t)header_len);
    if (rc == 0) rc = check_header_tokens(label, (const char *)buf + 8, (size_t)header_len, 1);
    cJSON_Delete(root);
    return rc;
}

static int compare_tensor_names(const void *a, const void *b) {
    return strcmp(((const rs_st_tensor *)a)->name, ((const rs_st_tensor *)b)->name);
}

/* Sort by name (rs_st_find relies on it) and refuse a name seen twice, in one file or two. */
static int sort_and_check_names(rs_st_set *set) {
    if (set->n_tensors > 1)
        qsort(set->tensors, (size_t)set->n_tensors, sizeof *set->tensors, compare_tensor_names);
    for (int i = 1; i < set->n_tensors; i++) {
        const rs_st_tensor *a = &set->tensors[i - 1], *b = &set->tensors[i];
        if (strcmp(a->name, b->name) != 0) continue;
        if (a->file_index == b->file_index)
            return ST_FAIL("%s: tensor '%s' appears twice in the header", set->paths[a->file_index], a->name);
        return ST_FAIL("%s: tensor '%s' is also in %s", set->paths[b->file_index], b->name,
                       set->paths[a->file_index]);
    }
    return 0;
}

int rs_st_parse(const char *label, const void *buf, size_t size, rs_st_set *set) {
    memset(set, 0, sizeof *set);
    push_file(set, label, NULL, size); /* maps[0] NULL: the caller owns buf */
    if (parse_file(set, 0, label, buf, size) != 0 || sort_and_check_names(set) != 0) {
        rs_st_close(set);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- files on disk */

/* Map path read-only and parse it as the next file of set. */
static int add_file(rs_st_set *set, const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ST_FAIL("%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return ST_FAIL("%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    void *map = NULL;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int err = errno;
            close(fd);
            return ST_FAIL("%s: cannot map: %s", path, strerror(err));
        }
    }
    close(fd);
    int index = push_file(set, path, map, size);
    static const uint8_t empty[1];
    return parse_file(set, index, path, map ? map : empty, size);
}

static int compare_strings(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A shard name from weight_map: a plain file name in the model directory. */
static int check_shard_name(const char *index_path, const cJSON *entry) {
    if (!cJSON_IsString(entry))
        return ST_FAIL("%s: weight_map value of '%s' is not a string", index_path, entry->string);
    const char *s = entry->valuestring;
    if (!*s || strchr(s, '/') || strstr(s, ".."))
        return ST_FAIL("%s: weight_map names shard '%s' for '%s': not a plain file name", index_path,
                       s, entry->string);
    return 0;
}

/* Distinct shard names of weight_map, sorted; checks each one. Caller frees the array only. */
static int list_shards(const char *index_path, const cJSON *weight_map, const char ***shards, int *n) {
    int n_entries = cJSON_GetArraySize(weight_map), k = 0;
    const char **names = rs_calloc((size_t)n_entries, sizeof *names);
    for (const cJSON *e = weight_map->child; e; e = e->next) {
        if (check_shard_name(index_path, e) != 0) {
            free(names);
            return -1;
        }
        names[k++] = e->valuestring;
    }
    if (k > 1) qsort(names, (size_t)k, sizeof *names, compare_strings);
    int unique = 0;
    for (int i = 0; i < k; i++)
        if (unique == 0 || strcmp(names[unique - 1], names[i]) != 0) names[unique++] = names[i];
    *shards = names;
    *n = unique;
    return 0;
}

/* weight_map and the shards must agree: every listed tensor is in the shard it names, and
 * every tensor in a shard is listed (with unique names, equal counts then make it a bijection). */
static int check_weight_map(const rs_st_set *set, const char *index_path, const cJSON *weight_map) {
    int n_listed = 0;
    for (const cJSON *e = weight_map->child; e; e = e->next, n_listed++) {
        const rs_st_tensor *t = rs_st_find(set, e->string);
        if (!t)
            return ST_FAIL("%s: weight_map lists tensor '%s' in %s, but no shard holds it", index_path,
                           e->string, e->valuestring);
        const char *holder = base_name(set->paths[t->file_index]);
        if (strcmp(holder, e->valuestring) != 0)
            return ST_FAIL("%s: weight_map puts tensor '%s' in %s, but it is in %s", index_path,
                           e->string, e->valuestring, holder);
    }
    if (n_listed == set->n_tensors) return 0;
    for (int i = 0; i < set->n_tensors; i++)
        if (!cJSON_GetObjectItemCaseSensitive(weight_map, set->tensors[i].name))
            return ST_FAIL("%s: %s holds tensor '%s', which weight_map does not list", index_path,
                           base_name(set->paths[set->tensors[i].file_index]), set->tensors[i].name);
    return ST_FAIL("%s: weight_map lists a tensor twice", index_path);
}

/* A tensor listed twice in weight_map (cJSON keeps both entries); NULL when none. */
static const char *weight_map_duplicate(const cJSON *weight_map) {
    int n = cJSON_GetArraySize(weight_map), k = 0;
    const char **names = rs_calloc((size_t)n, sizeof *names);
    for (const cJSON *e = weight_map->child; e; e = e->next) names[k++] = e->string;
    if (k > 1) qsort(names, (size_t)k, sizeof *names, compare_strings);
    const char *dup = NULL;
    for (int i = 1; i < k && !dup; i++)
        if (strcmp(names[i], names[i - 1]) == 0) dup = names[i];
    free(names);
    return dup;
}

/* Read the index file and return its checked weight_map (an object, unique keys). */
static cJSON *read_index(const char *index_path, cJSON **root_out) {
    char *text;
    size_t size;
    if (rs_read_file(index_path, &text, &size) != 0) return NULL;
    cJSON *root = cJSON_ParseWithLength(text, size);
    free(text);
    cJSON *wm = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    const char *problem = !root                   ? "is not valid JSON"
                          : !cJSON_IsObject(root) ? "is not a JSON object"
                          : !wm                   ? "has no weight_map"
                          : !cJSON_IsObject(wm)   ? "weight_map is not an object"
                          : !wm->child            ? "weight_map is empty"
                                                  : NULL;
    const char *dup = problem ? NULL : weight_map_duplicate(wm);
    if (problem) ST_FAIL("%s: %s", index_path, problem);
    else if (dup) ST_FAIL("%s: weight_map lists tensor '%s' twice", index_path, dup);
    if (problem || dup) {
        cJSON_Delete(root);
        return NULL;
    }
    *root_out = root;
    return wm;
}

static int open_index(rs_st_set *set, const char *index_path) {
    cJSON *root = NULL, *weight_map = read_index(index_path, &root);
    if (!weight_map) return -1;
    const char **shards = NULL;
    int n_shards = 0, rc = list_shards(index_path, weight_map, &shards, &n_shards);
    char *dir = rs_strdup(index_path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    for (int i = 0; i < n_shards && rc == 0; i++) {
        char *shard = slash ? rs_path_join(dir, shards[i]) : rs_strdup(shards[i]);
        if (!rs_path_exists(shard))
            rc = ST_FAIL("%s: weight_map names shard %s, which does not exist", index_path, shards[i]);
        else
            rc = add_file(set, shard);
        free(shard);
    }
    if (rc == 0) rc = sort_and_check_names(set);
    if (rc == 0) rc = check_weight_map(set, index_path, weight_map);
    free(shards);
    free(dir);
    cJSON_Delete(root);
    return rc;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* A directory holds model.safetensors or an index (transformers looks for them in this order). */
static int open_dir(rs_st_set *set, const char *dir) {
    char *single = rs_path_join(dir, SINGLE_NAME), *index = rs_path_join(dir, INDEX_NAME);
    int rc;
    if (rs_path_exists(single)) {
        rc = add_file(set, single);
        if (rc == 0) rc = sort_and_check_names(set);
    } else if (rs_path_exists(index)) {
        rc = open_index(set, index);
    } else {
        rc = ST_FAIL("%s: directory has neither %s nor %s", dir, SINGLE_NAME, INDEX_NAME);
    }
    free(single);
    free(index);
    return rc;
}

int rs_st_open(const char *path, rs_st_set *set) {
    memset(set, 0, sizeof *set);
    int rc;
    if (rs_path_is_dir(path)) {
        rc = open_dir(set, path);
    } else if (ends_with(path, ".json")) {
        rc = open_index(set, path);
    } else {
        rc = add_file(set, path);
        if (rc == 0) rc = sort_and_check_names(set);
    }
    if (rc != 0) rs_st_close(set);
    return rc;
}

const rs_st_tensor *rs_st_find(const rs_st_set *set, const char *name) {
    int lo = 0, hi = set->n_tensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(set->tensors[mid].name, name);
        if (c == 0) return &set->tensors[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

int64_t rs_st_numel(const rs_st_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

int rs_st_read_f32(const rs_st_tensor *t, float *dst, size_t numel) {
    if ((size_t)rs_st_numel(t) != numel)
        return ST_FAIL("tensor '%s' has %lld elements, the caller expected %zu", t->name,
                       (long long)rs_st_numel(t), numel);
    if (rs_convert_to_f32(dst, t->data, t->dtype, numel) != 0)
        return ST_FAIL("tensor '%s': dtype %s cannot be read as fp32", t->name, rs_dtype_name(t->dtype));
    return 0;
}

/* ---------------------------------------------------------------- writing */

/* What the writer will not put in a file: names the reader would refuse, bad shapes. */
static int check_write_tensor(const char *path, const rs_st_write_tensor *t, size_t *nbytes) {
    if (!t->name) return ST_FAIL("%s: a tensor has no name", path);
    if (strcmp(t->name, "__metadata__") == 0) return ST_FAIL("%s: '__metadata__' is not a tensor name", path);
    if (check_utf8(path, (const uint8_t *)t->name, strlen(t->name)) != 0)
        return ST_FAIL("%s: tensor name is not valid UTF-8", path);
    if ((unsigned)t->dtype >= RS_DTYPE_COUNT) return ST_FAIL("%s: tensor '%s': bad dtype", path, t->name);
    if (t->ndim < 0 || t->ndim > RS_MAX_DIMS)
        return ST_FAIL("%s: tensor '%s': %d dimensions", path, t->name, t->ndim);
    size_t numel = 1;
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] < 0 || (double)t->shape[d] >= ST_MAX_JSON_INT ||
            rs_mul_size(numel, (size_t)t->shape[d], &numel) != 0)
            return ST_FAIL("%s: tensor '%s': bad shape entry %lld", path, t->name, (long long)t->shape[d]);
    if (rs_mul_size(numel, rs_dtype_size(t->dtype), nbytes) != 0)
        return ST_FAIL("%s: tensor '%s': size overflows", path, t->name);
    if (*nbytes && !t->data) return ST_FAIL("%s: tensor '%s': no data", path, t->name);
    return 0;
}

/* A tensor to write with its checked byte size. */
typedef struct {
    const rs_st_write_tensor *t;
    size_t nbytes;
} st_out;

/* Data order: larger dtypes first, then by name, as the reference writer does, so that with the
 * 8-byte-aligned header every tensor starts aligned to its element size. */
static int compare_write_order(const void *a, const void *b) {
    const rs_st_write_tensor *x = ((const st_out *)a)->t, *y = ((const st_out *)b)->t;
    size_t sx = rs_dtype_size(x->dtype), sy = rs_dtype_size(y->dtype);
    if (sx != sy) return sx > sy ? -1 : 1;
    return strcmp(x->name, y->name);
}

static cJSON *json_uint_raw(uint64_t v) {
    char buf[32];
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)v); /* cJSON would print 1e+15 */
    cJSON *item = cJSON_CreateRaw(buf);
    RS_CHECK(item, "out of memory building a safetensors header");
    return item;
}

static void add_tensor_json(cJSON *root, const rs_st_write_tensor *t, uint64_t begin, uint64_t end) {
    cJSON *entry = cJSON_CreateObject(), *shape = cJSON_CreateArray(), *offsets = cJSON_CreateArray();
    RS_CHECK(entry && shape && offsets, "out of memory building a safetensors header");
    cJSON_AddStringToObject(entry, "dtype", rs_dtype_name(t->dtype));
    for (int d = 0; d < t->ndim; d++) cJSON_AddItemToArray(shape, json_uint_raw((uint64_t)t->shape[d]));
    cJSON_AddItemToObject(entry, "shape", shape);
    cJSON_AddItemToArray(offsets, json_uint_raw(begin));
    cJSON_AddItemToArray(offsets, json_uint_raw(end));
    cJSON_AddItemToObject(entry, "data_offsets", offsets);
    cJSON_AddItemToObject(root, t->name, entry);
}

/* The header JSON, padded with spaces to a multiple of 8 bytes like the reference writer. */
static char *build_header(const st_out *out, int n, const char *const *meta_keys,
                          const char *const *meta_values, int n_meta, size_t *len) {
    cJSON *root = cJSON_CreateObject();
    RS_CHECK(root, "out of memory building a safetensors header");
    if (n_meta > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        RS_CHECK(meta, "out of memory building a safetensors header");
        for (int i = 0; i < n_meta; i++) cJSON_AddStringToObject(meta, meta_keys[i], meta_values[i]);
    }
    uint64_t pos = 0;
    for (int i = 0; i < n; i++) {
        add_tensor_json(root, out[i].t, pos, pos + out[i].nbytes);
        pos += out[i].nbytes;
    }
    char *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    RS_CHECK(json, "out of memory printing a safetensors header");
    size_t n_json = strlen(json), padded = (n_json + 7) & ~(size_t)7;
    char *header = rs_malloc(padded);
    memcpy(header, json, n_json);
    memset(header + n_json, ' ', padded - n_json);
    cJSON_free(json);
    *len = padded;
    return header;
}

static int write_all(FILE *f, const void *p, size_t n) { return n == 0 || fwrite(p, 1, n, f) == n; }

static int write_to_tmp_and_rename(const char *path, const char *header, size_t header_len,
                                   const st_out *out, int n) {
    char *tmp = rs_tmp_name(path);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        ST_FAIL("%s: cannot create: %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    uint8_t len_bytes[8];
    write_le64(len_bytes, header_len);
    int ok = write_all(f, len_bytes, 8) && write_all(f, header, header_len);
    for (int i = 0; i < n && ok; i++) ok = write_all(f, out[i].t->data, out[i].nbytes);
    ok = fflush(f) == 0 && ok;
    ok = fsync(fileno(f)) == 0 && ok;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        ST_FAIL("%s: write failed: %s", path, strerror(errno));
        remove(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}

static int compare_out_names(const void *a, const void *b) {
    return strcmp(((const st_out *)a)->t->name, ((const st_out *)b)->t->name);
}

/* Names must be unique (sorted copy, neighbours compared); metadata keys too (few: pairwise). */
static int check_unique_names(const char *path, const st_out *out, int n, const char *const *meta_keys,
                              const char *const *meta_values, int n_meta) {
    st_out *by_name = rs_calloc((size_t)n, sizeof *by_name);
    if (n > 0) memcpy(by_name, out, (size_t)n * sizeof *out);
    if (n > 1) qsort(by_name, (size_t)n, sizeof *by_name, compare_out_names);
    int rc = 0;
    for (int i = 1; i < n && rc == 0; i++)
        if (strcmp(by_name[i].t->name, by_name[i - 1].t->name) == 0)
            rc = ST_FAIL("%s: tensor '%s' given twice", path, by_name[i].t->name);
    free(by_name);
    for (int i = 0; i < n_meta && rc == 0; i++) {
        if (!meta_keys[i] || !meta_values[i]) return ST_FAIL("%s: metadata entry %d is NULL", path, i);
        for (int j = 0; j < i; j++)
            if (strcmp(meta_keys[i], meta_keys[j]) == 0)
                return ST_FAIL("%s: metadata key '%s' given twice", path, meta_keys[i]);
    }
    return rc;
}

int rs_st_write(const char *path, const rs_st_write_tensor *tensors, int n, const char *const *meta_keys,
                const char *const *meta_values, int n_meta) {
    if (n < 0 || n_meta < 0) return ST_FAIL("%s: negative tensor or metadata count", path);
    st_out *out = rs_calloc((size_t)n, sizeof *out);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        out[i].t = &tensors[i];
        rc = check_write_tensor(path, &tensors[i], &out[i].nbytes);
    }
    if (rc == 0) rc = check_unique_names(path, out, n, meta_keys, meta_values, n_meta);
    if (rc == 0) {
        if (n > 1) qsort(out, (size_t)n, sizeof *out, compare_write_order);
        size_t header_len;
        char *header = build_header(out, n, meta_keys, meta_values, n_meta, &header_len);
        rc = write_to_tmp_and_rename(path, header, header_len, out, n);
        free(header);
    }
    free(out);
    return rc;
}
