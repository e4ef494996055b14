/* safetensors: our writer and reader round-trip random tensors; every corruption of a valid
 * header is refused with a message naming the file; sharded directories must agree with their
 * index. (Files of the Python reference library are checked in tests/py/test_safetensors.py.) */
#include "resafe/safetensors.h"
#include "test.h"

#include <string.h>

#define MAX_T 12

/* Random tensors with random bytes: every dtype, 0-d and empty shapes included. */
typedef struct {
    int n;
    char names[MAX_T][40];
    rs_st_write_tensor t[MAX_T];
    uint8_t *data[MAX_T];
} random_tensors;

static void make_random_tensors(random_tensors *r, rs_rng *rng, int n) {
    memset(r, 0, sizeof *r);
    r->n = n;
    for (int i = 0; i < n; i++) {
        rs_st_write_tensor *t = &r->t[i];
        snprintf(r->names[i], sizeof r->names[i], "layers.%d.w%llx", i, (unsigned long long)(rs_rng_next(rng) & 0xffff));
        t->name = r->names[i];
        t->dtype = (rs_dtype)(rs_rng_next(rng) % RS_DTYPE_COUNT);
        t->ndim = (int)(rs_rng_next(rng) % 5);
        size_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            t->shape[d] = (int64_t)(rs_rng_next(rng) % 6); /* 0 makes an empty tensor */
            numel *= (size_t)t->shape[d];
        }
        size_t bytes = numel * rs_dtype_size(t->dtype);
        r->data[i] = rs_malloc(bytes);
        for (size_t b = 0; b < bytes; b++) r->data[i][b] = (uint8_t)(rs_rng_next(rng) | 1); /* never all zero */
        t->data = r->data[i];
    }
}

static void free_random_tensors(random_tensors *r) {
    for (int i = 0; i < r->n; i++) free(r->data[i]);
}

static size_t nbytes_of(const rs_st_write_tensor *t) {
    size_t n = rs_dtype_size(t->dtype);
    for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
    return n;
}

static void check_same_tensor(const rs_st_set *set, const rs_st_write_tensor *w) {
    const rs_st_tensor *t = rs_st_find(set, w->name);
    REQUIRE(t, "'%s' not found", w->name);
    CHECK(t->dtype == w->dtype, "'%s' dtype %s, wrote %s", w->name, rs_dtype_name(t->dtype), rs_dtype_name(w->dtype));
    CHECK(t->ndim == w->ndim, "'%s' ndim %d, wrote %d", w->name, t->ndim, w->ndim);
    for (int d = 0; d < w->ndim && d < t->ndim; d++) CHECK(t->shape[d] == w->shape[d], "'%s' dim %d", w->name, d);
    CHECK(t->nbytes == nbytes_of(w), "'%s' nbytes %zu", w->name, t->nbytes);
    CHECK(t->nbytes == 0 || memcmp(t->data, w->data, t->nbytes) == 0, "'%s' bytes differ", w->name);
    /* the writer orders data so every tensor is aligned to its element size */
    CHECK((uintptr_t)t->data % rs_dtype_size(t->dtype) == 0, "'%s' misaligned", w->name);
}

TEST(test_safetensors_write_then_open_round_trips_random_tensors) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    random_tensors r;
    make_random_tensors(&r, &rng, 3 + (int)(rs_rng_next(&rng) % (MAX_T - 3)));
    const char *keys[] = {"format", "note"}, *values[] = {"pt", "h\xc3\xa9llo \"quoted\""};
    char *path = rs_path_join(rs_test_tmpdir(), "round.safetensors");
    REQUIRE(rs_st_write(path, r.t, r.n, keys, values, 2) == 0, "%s", rs_last_error());
    char *tmp = rs_tmp_name(path);
    CHECK(!rs_path_exists(tmp), "temporary left behind");
    rs_st_set set;
    REQUIRE(rs_st_open(path, &set) == 0, "%s", rs_last_error());
    CHECK(set.n_tensors == r.n, "%d tensors, wrote %d", set.n_tensors, r.n);
    for (int i = 0; i < r.n; i++) check_same_tensor(&set, &r.t[i]);
    for (int i = 1; i < set.n_tensors; i++)
        CHECK(strcmp(set.tensors[i - 1].name, set.tensors[i].name) < 0, "tensors not sorted by name");
    CHECK(rs_st_find(&set, "absent") == NULL, "found a tensor never written");
    REQUIRE(set.n_meta == 2, "%d metadata entries", set.n_meta);
    CHECK(strcmp(set.meta_keys[0], "format") == 0 && strcmp(set.meta_values[0], "pt") == 0, "meta 0");
    CHECK(strcmp(set.meta_values[1], values[1]) == 0, "meta 1 = %s", set.meta_values[1]);
    /* the header is padded to 8 bytes, as the reference writer does */
    CHECK(set.sizes[0] >= 8 && ((const uint8_t *)set.maps[0])[0] % 8 == 0, "header length not a multiple of 8");
    rs_st_close(&set);
    free_random_tensors(&r);
    free(tmp);
    free(path);
}

TEST(test_safetensors_read_f32_converts_each_float_dtype_exactly) {
    /* values k / 2^s with |k| <= 256 are exact in bf16, f16 and f64: conversion must be exact */
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    enum { N = 37 };
    float ref[N];
    uint16_t bf16[N], f16[N];
    double f64[N];
    for (int i = 0; i < N; i++) {
        int k = (int)(rs_rng_next(&rng) % 511) - 255;
        ref[i] = ldexpf((float)(k ? k : 3), -(int)(rs_rng_next(&rng) % 8));
        uint32_t bits;
        memcpy(&bits, &ref[i], 4);
        bf16[i] = (uint16_t)(bits >> 16); /* exact values: truncation is the conversion */
        f16[i] = rs_f32_to_f16(ref[i]);
        f64[i] = ref[i];
    }
    rs_st_write_tensor w[3] = {{"a.bf16", RS_BF16, 1, {N}, bf16}, {"b.f16", RS_F16, 1, {N}, f16},
                               {"c.f64", RS_F64, 1, {N}, f64}};
    char *path = rs_path_join(rs_test_tmpdir(), "floats.safetensors");
    REQUIRE(rs_st_write(path, w, 3, NULL, NULL, 0) == 0, "%s", rs_last_error());
    rs_st_set set;
    REQUIRE(rs_st_open(path, &set) == 0, "%s", rs_last_error());
    for (int t = 0; t < 3; t++) {
        float got[N];
        REQUIRE(rs_st_read_f32(rs_st_find(&set, w[t].name), got, N) == 0, "%s", rs_last_error());
        for (int i = 0; i < N; i++) CHECK(got[i] == ref[i], "%s[%d] = %g, want %g", w[t].name, i, got[i], ref[i]);
    }
    float small[N];
    CHECK(rs_st_read_f32(rs_st_find(&set, "a.bf16"), small, N - 1) == -1, "numel mismatch accepted");
    CHECK(strstr(rs_last_error(), "a.bf16") != NULL, "message: %s", rs_last_error());
    rs_st_close(&set);
    free(path);
}

/* A file image: 8-byte length, header text as given (no padding), data bytes (all 0x5a). */
static uint8_t *image(const char *header, size_t data_bytes, size_t *size) {
    size_t n = strlen(header);
    *size = 8 + n + data_bytes;
    uint8_t *buf = rs_malloc(*size);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)n >> (8 * i));
    memcpy(buf + 8, header, n);
    memset(buf + 8 + n, 0x5a, data_bytes);
    return buf;
}

TEST(test_safetensors_parse_accepts_the_valid_base_image) {
    size_t size;
    uint8_t *buf = image("{\"__metadata__\":{\"k\":\"v\"},\"b\":{\"dtype\":\"F16\",\"shape\":[2],"
                         "\"data_offsets\":[8,12]},\"a\":{\"dtype\":\"F32\",\"shape\":[1,2],"
                         "\"data_offsets\":[0,8]},\"z\":{\"dtype\":\"I8\",\"shape\":[0],\"data_offsets\":[12,12]}}  ",
                         12, &size);
    rs_st_set set;
    REQUIRE(rs_st_parse("base.safetensors", buf, size, &set) == 0, "%s", rs_last_error());
    CHECK(set.n_tensors == 3 && strcmp(set.tensors[0].name, "a") == 0, "sorted tensors");
    CHECK(set.tensors[1].data == buf + size - 4, "offsets are relative to the data section");
    rs_st_close(&set);
    free(buf);
}

TEST(test_safetensors_parse_refuses_each_bad_header_naming_file_and_problem) {
    static const struct {
        const char *header;
        size_t data;
        const char *expect;
    } cases[] = {
        {"[1,2]", 0, "start with '{'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4, "not valid JSON"},
        {"{} x", 0, "after the JSON object"},
        {"{\"a\":{\"dtype\":\"F8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "dtype 'F8'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "shape entry 0"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "shape entry 0"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", 4, "not an integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4, "shape entry 0"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,99]}}", 64, "[0, 99) exceed the 64-byte"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, "needs 8"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, "end before"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "two non-negative"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[2,6]}}", 6, "overlap"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "belong to no tensor"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 9, "after the last tensor"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "appears twice"},
        {"{\"__metadata__\":{\"k\":1}}", 0, "not a string"},
        {"{\"__metadata__\":[]}", 0, "__metadata__ is not an object"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,1]}}", 1,
         "overflows"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[9007199254740993],\"data_offsets\":[0,1]}}", 1, "shape entry 0"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4, "unknown key 'x'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "missing 'data_offsets'"},
        {"{\"a\":[1]}", 0, "not an object"},
        {"{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "NUL"},
        {"{\"\xff\":{}}", 0, "UTF-8"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1, "9 dimensions"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t size;
        uint8_t *buf = image(cases[i].header, cases[i].data, &size);
        rs_st_set set;
        rs_clear_error();
        CHECK(rs_st_parse("bad.safetensors", buf, size, &set) == -1, "case %zu accepted: %s", i, cases[i].header);
        CHECK(strncmp(rs_last_error(), "bad.safetensors: ", 17) == 0 && strstr(rs_last_error(), cases[i].expect),
              "case %zu: message '%s' lacks '%s'", i, rs_last_error(), cases[i].expect);
        CHECK(set.n_tensors == 0 && set.tensors == NULL, "case %zu: set not emptied on failure", i);
        rs_st_close(&set);
        free(buf);
    }
}

TEST(test_safetensors_header_length_is_checked_against_file_size_and_cap) {
    uint8_t buf[24] = {0};
    rs_st_set set;
    CHECK(rs_st_parse("short", buf, 7, &set) == -1 && strstr(rs_last_error(), "too short"), "%s", rs_last_error());
    buf[0] = 17; /* 17 > 24 - 8 */
    CHECK(rs_st_parse("long", buf, 24, &set) == -1 && strstr(rs_last_error(), "exceeds the 16 bytes"), "%s",
          rs_last_error());
    memset(buf, 0xff, 8); /* 2^64 - 1 */
    CHECK(rs_st_parse("huge", buf, 24, &set) == -1 && strstr(rs_last_error(), "limit"), "%s", rs_last_error());
}

TEST(test_safetensors_every_truncation_of_a_valid_file_is_refused) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    random_tensors r;
    make_random_tensors(&r, &rng, 4);
    r.t[0].ndim = 1; /* at least one non-empty tensor, so dropping a data byte matters */
    r.t[0].shape[0] = 3;
    char *path = rs_path_join(rs_test_tmpdir(), "trunc.safetensors");
    free(r.data[0]);
    r.data[0] = rs_malloc(nbytes_of(&r.t[0]));
    memset(r.data[0], 0x77, nbytes_of(&r.t[0]));
    r.t[0].data = r.data[0];
    REQUIRE(rs_st_write(path, r.t, r.n, NULL, NULL, 0) == 0, "%s", rs_last_error());
    char *file;
    size_t size;
    REQUIRE(rs_read_file(path, &file, &size) == 0, "%s", rs_last_error());
    for (size_t n = 0; n < size; n++) {
        uint8_t *copy = rs_malloc(n ? n : 1); /* exact-size copy so ASan sees any over-read */
        memcpy(copy, file, n);
        rs_st_set set;
        CHECK(rs_st_parse("cut", copy, n, &set) == -1, "prefix of %zu of %zu bytes accepted", n, size);
        CHECK(strncmp(rs_last_error(), "cut: ", 5) == 0, "message: %s", rs_last_error());
        free(copy);
    }
    free(file);
    free(path);
    free_random_tensors(&r);
}

/* ---------------------------------------------------------------- directories and shards */

static void write_text(const char *dir, const char *name, const char *text) {
    char *path = rs_path_join(dir, name);
    RS_CHECK(rs_write_file_atomic(path, text, strlen(text)) == 0, "%s", rs_last_error());
    free(path);
}

/* dir/s1.safetensors holds x and y, dir/s2.safetensors holds z; returns the directory. */
static char *make_sharded_dir(const char *name, rs_rng *rng) {
    char *dir = rs_path_join(rs_test_tmpdir(), name);
    RS_CHECK(rs_mkdir_p(dir) == 0, "%s", rs_last_error());
    float v[6];
    for (int i = 0; i < 6; i++) v[i] = rs_rng_normal(rng);
    rs_st_write_tensor s1[2] = {{"x", RS_F32, 1, {2}, v}, {"y", RS_F32, 2, {1, 2}, v + 2}};
    rs_st_write_tensor s2[1] = {{"z", RS_F32, 0, {0}, v + 5}};
    char *p1 = rs_path_join(dir, "s1.safetensors"), *p2 = rs_path_join(dir, "s2.safetensors");
    RS_CHECK(rs_st_write(p1, s1, 2, NULL, NULL, 0) == 0 && rs_st_write(p2, s2, 1, NULL, NULL, 0) == 0, "%s",
             rs_last_error());
    free(p1);
    free(p2);
    return dir;
}

TEST(test_safetensors_sharded_directory_opens_through_its_index) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    char *dir = make_sharded_dir("sharded_ok", &rng);
    write_text(dir, "model.safetensors.index.json",
               "{\"metadata\":{\"total_size\":24},\"weight_map\":{\"z\":\"s2.safetensors\","
               "\"x\":\"s1.safetensors\",\"y\":\"s1.safetensors\"}}");
    rs_st_set set;
    REQUIRE(rs_st_open(dir, &set) == 0, "%s", rs_last_error());
    CHECK(set.n_files == 2 && set.n_tensors == 3, "%d files, %d tensors", set.n_files, set.n_tensors);
    const rs_st_tensor *z = rs_st_find(&set, "z"), *y = rs_st_find(&set, "y");
    REQUIRE(z && y, "tensors missing");
    CHECK(strstr(set.paths[z->file_index], "s2.safetensors") && strstr(set.paths[y->file_index], "s1.safetensors"),
          "file_index wrong");
    CHECK(z->ndim == 0 && z->nbytes == 4, "0-d tensor z");
    rs_st_close(&set);
    free(dir);
}

TEST(test_safetensors_index_disagreeing_with_shards_is_refused) {
    static const struct {
        const char *index, *expect;
    } cases[] = {
        {"{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s2.safetensors\",\"z\":\"s2.safetensors\"}}",
         "puts tensor 'y' in s2.safetensors, but it is in s1.safetensors"},
        {"{\"weight_map\":{\"x\":\"s1.safetensors\",\"z\":\"s2.safetensors\"}}", "holds tensor 'y'"},
        {"{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s1.safetensors\",\"z\":\"s2.safetensors\","
         "\"w\":\"s2.safetensors\"}}", "lists tensor 'w'"},
        {"{\"weight_map\":{\"x\":\"../s1.safetensors\"}}", "not a plain file name"},
        {"{\"weight_map\":{\"x\":\"/etc/passwd\"}}", "not a plain file name"},
        {"{\"weight_map\":{\"x\":\"s3.safetensors\"}}", "does not exist"},
        {"{\"weight_map\":{\"x\":7}}", "not a string"},
        {"{\"weight_map\":[]}", "weight_map is not an object"},
        {"{\"weight_map\":{}}", "empty"},
        {"{\"metadata\":{}}", "no weight_map"},
        {"{\"weight_map\":{\"x\":\"s1.safetensors\",\"x\":\"s1.safetensors\"}}", "twice"},
        {"{\"weight_map\":", "not valid JSON"},
    };
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    char *dir = make_sharded_dir("sharded_bad", &rng);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_text(dir, "model.safetensors.index.json", cases[i].index);
        rs_st_set set;
        CHECK(rs_st_open(dir, &set) == -1, "case %zu accepted", i);
        CHECK(strstr(rs_last_error(), "model.safetensors.index.json: ") && strstr(rs_last_error(), cases[i].expect),
              "case %zu: message '%s' lacks '%s'", i, rs_last_error(), cases[i].expect);
    }
    free(dir);
}

TEST(test_safetensors_tensor_in_two_shards_is_refused) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    char *dir = make_sharded_dir("sharded_dup", &rng);
    float v = rs_rng_normal(&rng);
    rs_st_write_tensor again = {"x", RS_F32, 0, {0}, &v};
    char *p3 = rs_path_join(dir, "s3.safetensors");
    REQUIRE(rs_st_write(p3, &again, 1, NULL, NULL, 0) == 0, "%s", rs_last_error());
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s1.safetensors\",\"z\":\"s3.safetensors\"}}");
    rs_st_set set;
    CHECK(rs_st_open(dir, &set) == -1, "duplicate accepted");
    CHECK(strstr(rs_last_error(), "tensor 'x' is also in"), "message: %s", rs_last_error());
    free(p3);
    free(dir);
}

TEST(test_safetensors_directory_without_weights_and_missing_file_are_named) {
    char *dir = rs_path_join(rs_test_tmpdir(), "empty_model");
    REQUIRE(rs_mkdir_p(dir) == 0, "%s", rs_last_error());
    rs_st_set set;
    CHECK(rs_st_open(dir, &set) == -1 && strstr(rs_last_error(), "empty_model") &&
              strstr(rs_last_error(), "neither"),
          "message: %s", rs_last_error());
    CHECK(rs_st_open("/nonexistent/m.safetensors", &set) == -1 && strstr(rs_last_error(), "/nonexistent/m.safetensors"),
          "message: %s", rs_last_error());
    free(dir);
}

TEST(test_safetensors_writer_refuses_duplicate_names_and_leaves_no_file) {
    float v[2] = {1.5f, -2.25f};
    rs_st_write_tensor w[3] = {{"a", RS_F32, 1, {1}, v}, {"b", RS_F32, 1, {1}, v + 1}, {"a", RS_F16, 0, {0}, v}};
    char *path = rs_path_join(rs_test_tmpdir(), "dup.safetensors");
    CHECK(rs_st_write(path, w, 3, NULL, NULL, 0) == -1 && strstr(rs_last_error(), "'a' given twice"), "message: %s",
          rs_last_error());
    CHECK(!rs_path_exists(path), "file written despite the error");
    rs_st_write_tensor meta_name = {"__metadata__", RS_F32, 1, {1}, v};
    CHECK(rs_st_write(path, &meta_name, 1, NULL, NULL, 0) == -1, "__metadata__ accepted as a tensor name");
    free(path);
}
