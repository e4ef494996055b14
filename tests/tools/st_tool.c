/* st_tool: drives the safetensors module from the Python reference tests.
 *   st_tool dump PATH        open PATH (file, model directory, index .json) and print JSON:
 *                            {"metadata": {..}, "files": [..], "tensors": [{"name", "dtype",
 *                             "shape", "file", "hex" (raw bytes), "f32" (float dtypes only)}]}
 *   st_tool parse FILE       read FILE into memory and check it with rs_st_parse (no output)
 *   st_tool write OUT SPEC   write OUT from SPEC, a JSON file
 *                            {"metadata": {..}, "tensors": [{"name", "dtype", "shape", "hex"}]}
 * Errors: one line "resafe: error: ..." on stderr and exit status 1. */
#include "resafe/safetensors.h"

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

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static uint8_t *bytes_of_hex(const char *hex, size_t *n) {
    size_t len = strlen(hex);
    RS_CHECK(len % 2 == 0, "spec: hex string of odd length");
    uint8_t *out = rs_malloc(len / 2);
    for (size_t i = 0; i < len / 2; i++) {
        int hi = hex_digit(hex[2 * i]), lo = hex_digit(hex[2 * i + 1]);
        RS_CHECK(hi >= 0 && lo >= 0, "spec: bad hex digit");
        out[i] = (uint8_t)(hi * 16 + lo);
    }
    *n = len / 2;
    return out;
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static cJSON *tensor_json(const rs_st_set *set, const rs_st_tensor *t) {
    cJSON *j = cJSON_CreateObject(), *shape = cJSON_AddArrayToObject(j, "shape");
    cJSON_AddStringToObject(j, "name", t->name);
    cJSON_AddStringToObject(j, "dtype", rs_dtype_name(t->dtype));
    for (int d = 0; d < t->ndim; d++) cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
    cJSON_AddStringToObject(j, "file", base_name(set->paths[t->file_index]));
    char *hex = hex_of(t->data, t->nbytes);
    cJSON_AddStringToObject(j, "hex", hex);
    free(hex);
    if (t->dtype == RS_F32 || t->dtype == RS_F16 || t->dtype == RS_BF16 || t->dtype == RS_F64) {
        size_t n = (size_t)rs_st_numel(t);
        float *v = rs_malloc(n * sizeof *v);
        if (rs_st_read_f32(t, v, n) != 0) rs_die_last();
        cJSON *values = cJSON_AddArrayToObject(j, "f32");
        for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(values, cJSON_CreateNumber(v[i]));
        free(v);
    }
    return j;
}

static int dump(const char *path) {
    rs_st_set set;
    if (rs_st_open(path, &set) != 0) rs_die_last();
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "metadata");
    for (int i = 0; i < set.n_meta; i++) cJSON_AddStringToObject(meta, set.meta_keys[i], set.meta_values[i]);
    cJSON *files = cJSON_AddArrayToObject(root, "files");
    for (int i = 0; i < set.n_files; i++) cJSON_AddItemToArray(files, cJSON_CreateString(base_name(set.paths[i])));
    cJSON *tensors = cJSON_AddArrayToObject(root, "tensors");
    for (int i = 0; i < set.n_tensors; i++) {
        RS_CHECK(rs_st_find(&set, set.tensors[i].name) == &set.tensors[i], "rs_st_find missed '%s'",
                 set.tensors[i].name);
        cJSON_AddItemToArray(tensors, tensor_json(&set, &set.tensors[i]));
    }
    char *text = cJSON_PrintUnformatted(root);
    puts(text);
    cJSON_free(text);
    cJSON_Delete(root);
    rs_st_close(&set);
    return 0;
}

static int parse(const char *path) {
    char *data;
    size_t size;
    rs_st_set set;
    if (rs_read_file(path, &data, &size) != 0) rs_die_last();
    if (rs_st_parse(path, data, size, &set) != 0) {
        free(data);
        rs_die_last();
    }
    rs_st_close(&set);
    free(data);
    return 0;
}

static void spec_tensor(const cJSON *j, rs_st_write_tensor *t, uint8_t **data) {
    const cJSON *name = cJSON_GetObjectItem(j, "name"), *dtype = cJSON_GetObjectItem(j, "dtype");
    const cJSON *shape = cJSON_GetObjectItem(j, "shape"), *hex = cJSON_GetObjectItem(j, "hex");
    RS_CHECK(cJSON_IsString(name) && cJSON_IsString(dtype) && cJSON_IsArray(shape) && cJSON_IsString(hex),
             "spec: tensor needs name, dtype, shape, hex");
    memset(t, 0, sizeof *t);
    t->name = name->valuestring;
    RS_CHECK(rs_dtype_from_name(dtype->valuestring, &t->dtype) == 0, "spec: dtype %s", dtype->valuestring);
    for (const cJSON *d = shape->child; d; d = d->next) {
        RS_CHECK(t->ndim < RS_MAX_DIMS, "spec: too many dims");
        t->shape[t->ndim++] = (int64_t)d->valuedouble;
    }
    size_t n;
    *data = bytes_of_hex(hex->valuestring, &n);
    t->data = *data;
}

static int write(const char *out, const char *spec_path) {
    char *text;
    if (rs_read_file(spec_path, &text, NULL) != 0) rs_die_last();
    cJSON *spec = cJSON_Parse(text);
    free(text);
    const cJSON *tensors = cJSON_GetObjectItem(spec, "tensors"), *meta = cJSON_GetObjectItem(spec, "metadata");
    RS_CHECK(cJSON_IsArray(tensors), "spec: no tensors array");
    int n = cJSON_GetArraySize(tensors), n_meta = meta ? cJSON_GetArraySize(meta) : 0, i = 0;
    rs_st_write_tensor *ts = rs_calloc((size_t)n, sizeof *ts);
    uint8_t **bufs = rs_calloc((size_t)n, sizeof *bufs);
    for (const cJSON *j = tensors->child; j; j = j->next, i++) spec_tensor(j, &ts[i], &bufs[i]);
    const char **keys = rs_calloc((size_t)n_meta, sizeof *keys), **values = rs_calloc((size_t)n_meta, sizeof *values);
    i = 0;
    for (const cJSON *m = meta ? meta->child : NULL; m; m = m->next, i++) {
        keys[i] = m->string;
        values[i] = m->valuestring;
    }
    int rc = rs_st_write(out, ts, n, keys, values, n_meta);
    for (i = 0; i < n; i++) free(bufs[i]);
    free(bufs);
    free(ts);
    free(keys);
    free(values);
    cJSON_Delete(spec);
    if (rc != 0) rs_die_last();
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "dump") == 0) return dump(argv[2]);
    if (argc == 3 && strcmp(argv[1], "parse") == 0) return parse(argv[2]);
    if (argc == 4 && strcmp(argv[1], "write") == 0) return write(argv[2], argv[3]);
    fprintf(stderr, "usage: st_tool dump PATH | parse FILE | write OUT SPEC.json\n");
    return 2;
}
