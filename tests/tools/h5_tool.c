/* h5_tool: drives the HDF5 store from the Python reference tests (h5py).
 *   h5_tool dump PATH [OBJECT...]   print JSON {"datasets": [{"path", "kind", "dtype", "shape",
 *                                   "hex" | "strings"}], "attrs": {object: {name: {"str" |
 *                                   "i64" (decimal string) | "f64": value}}} with the attributes
 *                                   of the root, every dataset and each OBJECT named
 *   h5_tool read PATH DATASET DTYPE D0,D1,..  read with this expected dtype and shape ("" for a
 *                                   scalar); prints the raw bytes as hex
 *   h5_tool write OUT SPEC          write OUT from SPEC, a JSON file {"groups": [..], "datasets":
 *                                   [{"path", "dtype", "shape", "hex"} | {"path", "strings"}],
 *                                   "attrs": [{"object", "name", "str" | "i64" | "f64"}],
 *                                   "commit": true}; "commit": false closes without committing
 * Errors: one line "resafe: error: ..." on stderr and exit status 1. */
#include "resafe/h5store.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

static char *hex_of(const void *data, size_t n) {
    static const char digits[] = "0123456789abcdef";
    const uint8_t *p = data;
    char *s = rs_malloc(2 * n + 1);
    for (size_t i = 0; i < n; i++) {
        s[2 * i] = digits[p[i] >> 4];
        s[2 * i + 1] = digits[p[i] & 15];
    }
    s[2 * n] = 0;
    return s;
}

static uint8_t *bytes_of_hex(const char *hex, size_t *n) {
    size_t len = strlen(hex);
    RS_CHECK(len % 2 == 0, "spec: hex string of odd length");
    uint8_t *out = rs_malloc(len / 2);
    for (size_t i = 0; i < len / 2; i++) {
        unsigned v;
        RS_CHECK(sscanf(hex + 2 * i, "%2x", &v) == 1, "spec: bad hex");
        out[i] = (uint8_t)v;
    }
    *n = len / 2;
    return out;
}

static size_t numel_of(int ndim, const int64_t *shape) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    return n;
}

static cJSON *dataset_json(rs_h5 *h, const rs_h5_dataset *d) {
    static const char *kinds[] = {"numbers", "strings", "other"};
    cJSON *j = cJSON_CreateObject(), *shape = cJSON_AddArrayToObject(j, "shape");
    cJSON_AddStringToObject(j, "path", d->path);
    cJSON_AddStringToObject(j, "kind", kinds[d->kind]);
    for (int i = 0; i < d->ndim; i++) cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)d->shape[i]));
    if (d->kind == RS_H5_NUMBERS) {
        cJSON_AddStringToObject(j, "dtype", rs_dtype_name(d->dtype));
        size_t bytes = numel_of(d->ndim, d->shape) * rs_dtype_size(d->dtype);
        void *buf = rs_malloc(bytes);
        if (rs_h5_read(h, d->path, d->dtype, d->ndim, d->shape, buf) != 0) rs_die_last();
        char *hex = hex_of(buf, bytes);
        cJSON_AddStringToObject(j, "hex", hex);
        free(hex);
        free(buf);
    } else if (d->kind == RS_H5_STRINGS) {
        char **strings;
        int64_t n;
        if (rs_h5_read_strings(h, d->path, &strings, &n) != 0) rs_die_last();
        cJSON *arr = cJSON_AddArrayToObject(j, "strings");
        for (int64_t i = 0; i < n; i++) cJSON_AddItemToArray(arr, cJSON_CreateString(strings[i]));
        rs_h5_free_strings(strings, n);
    }
    return j;
}

/* Each attribute as the first getter that accepts it: string, then integer, then number. */
static cJSON *attrs_json(rs_h5 *h, const char *object) {
    char **names;
    int n;
    if (rs_h5_attr_names(h, object, &names, &n) != 0) rs_die_last();
    cJSON *j = cJSON_CreateObject();
    for (int i = 0; i < n; i++) {
        cJSON *v = cJSON_AddObjectToObject(j, names[i]);
        char *s;
        int64_t iv;
        double dv;
        RS_CHECK(rs_h5_has_attr(h, object, names[i]) == 1, "has_attr disagrees with attr_names");
        if (rs_h5_get_attr_str(h, object, names[i], &s) == 0) {
            cJSON_AddStringToObject(v, "str", s);
            free(s);
        } else if (rs_h5_get_attr_i64(h, object, names[i], &iv) == 0) {
            char buf[32];
            snprintf(buf, sizeof buf, "%lld", (long long)iv);
            cJSON_AddStringToObject(v, "i64", buf);
        } else if (rs_h5_get_attr_f64(h, object, names[i], &dv) == 0) {
            cJSON_AddNumberToObject(v, "f64", dv);
        }
    }
    rs_h5_free_strings(names, n);
    return j;
}

static int dump(const char *path, int n_objects, char **objects) {
    rs_h5 *h;
    if (rs_h5_open(path, &h) != 0) rs_die_last();
    rs_h5_dataset *ds;
    int n;
    if (rs_h5_list(h, &ds, &n) != 0) rs_die_last();
    cJSON *root = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(root, "datasets");
    cJSON *attrs = cJSON_AddObjectToObject(root, "attrs");
    cJSON_AddItemToObject(attrs, "/", attrs_json(h, "/"));
    for (int i = 0; i < n; i++) {
        cJSON_AddItemToArray(arr, dataset_json(h, &ds[i]));
        cJSON_AddItemToObject(attrs, ds[i].path, attrs_json(h, ds[i].path));
    }
    for (int i = 0; i < n_objects; i++) cJSON_AddItemToObject(attrs, objects[i], attrs_json(h, objects[i]));
    char *text = cJSON_PrintUnformatted(root);
    puts(text);
    cJSON_free(text);
    cJSON_Delete(root);
    rs_h5_free_list(ds, n);
    rs_h5_close(h);
    return 0;
}

static int parse_shape(const char *text, int64_t *shape) {
    int ndim = 0;
    for (const char *s = text; *s;) {
        char *end;
        RS_CHECK(ndim < RS_MAX_DIMS, "too many dims");
        shape[ndim++] = strtoll(s, &end, 10);
        s = *end == ',' ? end + 1 : end;
        RS_CHECK(end != s || !*s, "bad shape '%s'", text);
    }
    return ndim;
}

static int read_one(const char *path, const char *dataset, const char *dtype_name, const char *shape_text) {
    rs_dtype dtype;
    RS_CHECK(rs_dtype_from_name(dtype_name, &dtype) == 0, "dtype %s", dtype_name);
    int64_t shape[RS_MAX_DIMS];
    int ndim = parse_shape(shape_text, shape);
    size_t bytes = numel_of(ndim, shape) * rs_dtype_size(dtype);
    rs_h5 *h;
    if (rs_h5_open(path, &h) != 0) rs_die_last();
    void *buf = rs_malloc(bytes);
    if (rs_h5_read(h, dataset, dtype, ndim, shape, buf) != 0) {
        free(buf);
        rs_h5_close(h);
        rs_die_last();
    }
    char *hex = hex_of(buf, bytes);
    puts(hex);
    free(hex);
    free(buf);
    rs_h5_close(h);
    return 0;
}

static int write_dataset(rs_h5 *h, const cJSON *d) {
    const char *path = cJSON_GetStringValue(cJSON_GetObjectItem(d, "path"));
    const cJSON *strings = cJSON_GetObjectItem(d, "strings");
    if (strings) {
        int n = cJSON_GetArraySize(strings), i = 0;
        const char **s = rs_calloc((size_t)n, sizeof *s);
        for (const cJSON *e = strings->child; e; e = e->next) s[i++] = e->valuestring;
        int rc = rs_h5_write_strings(h, path, s, n);
        free(s);
        return rc;
    }
    rs_dtype dtype;
    const char *dtype_name = cJSON_GetStringValue(cJSON_GetObjectItem(d, "dtype"));
    RS_CHECK(dtype_name && rs_dtype_from_name(dtype_name, &dtype) == 0, "spec: dtype");
    int64_t shape[RS_MAX_DIMS];
    int ndim = 0;
    for (const cJSON *e = cJSON_GetObjectItem(d, "shape")->child; e; e = e->next) shape[ndim++] = (int64_t)e->valuedouble;
    size_t n;
    uint8_t *data = bytes_of_hex(cJSON_GetStringValue(cJSON_GetObjectItem(d, "hex")), &n);
    int rc = rs_h5_write(h, path, dtype, ndim, shape, data);
    free(data);
    return rc;
}

static int write_attr(rs_h5 *h, const cJSON *a) {
    const char *object = cJSON_GetStringValue(cJSON_GetObjectItem(a, "object"));
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItem(a, "name"));
    const cJSON *s = cJSON_GetObjectItem(a, "str"), *i = cJSON_GetObjectItem(a, "i64"), *f = cJSON_GetObjectItem(a, "f64");
    if (s) return rs_h5_set_attr_str(h, object, name, s->valuestring);
    if (i) return rs_h5_set_attr_i64(h, object, name, strtoll(i->valuestring, NULL, 10));
    RS_CHECK(f, "spec: attribute without a value");
    return rs_h5_set_attr_f64(h, object, name, f->valuedouble);
}

static int write(const char *out, const char *spec_path) {
    char *text;
    if (rs_read_file(spec_path, &text, NULL) != 0) rs_die_last();
    cJSON *spec = cJSON_Parse(text);
    free(text);
    RS_CHECK(spec, "spec: not JSON");
    rs_h5 *h;
    if (rs_h5_create(out, &h) != 0) rs_die_last();
    int rc = 0;
    for (const cJSON *g = cJSON_GetObjectItem(spec, "groups") ? cJSON_GetObjectItem(spec, "groups")->child : NULL; g && rc == 0; g = g->next)
        rc = rs_h5_create_group(h, g->valuestring);
    for (const cJSON *d = cJSON_GetObjectItem(spec, "datasets")->child; d && rc == 0; d = d->next)
        rc = write_dataset(h, d);
    for (const cJSON *a = cJSON_GetObjectItem(spec, "attrs") ? cJSON_GetObjectItem(spec, "attrs")->child : NULL; a && rc == 0; a = a->next)
        rc = write_attr(h, a);
    int commit = !cJSON_IsFalse(cJSON_GetObjectItem(spec, "commit"));
    cJSON_Delete(spec);
    if (rc != 0) {
        rs_h5_close(h);
        rs_die_last();
    }
    if (!commit) {
        rs_h5_close(h);
        return 0;
    }
    if (rs_h5_commit(h) != 0) rs_die_last();
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "dump") == 0) return dump(argv[2], argc - 3, argv + 3);
    if (argc == 6 && strcmp(argv[1], "read") == 0) return read_one(argv[2], argv[3], argv[4], argv[5]);
    if (argc == 4 && strcmp(argv[1], "write") == 0) return write(argv[2], argv[3]);
    fprintf(stderr, "usage: h5_tool dump PATH [OBJECT...] | read PATH DATASET DTYPE SHAPE | write OUT SPEC\n");
    return 2;
}
