/* h5store: random datasets of every dtype and shape round-trip through a committed file; an
 * uncommitted file leaves nothing behind; reads check dtype and shape; every failure names the
 * file and the dataset or attribute. (h5py interoperability: tests/py/test_h5store.py.) */
#include "resafe/h5store.h"
#include "test.h"

#include <dirent.h>
#include <string.h>
#include <unistd.h>

static const rs_dtype k_dtypes[] = {RS_F32, RS_F64, RS_I8, RS_I16, RS_I32, RS_I64, RS_U8};
#define N_DTYPES (int)(sizeof k_dtypes / sizeof k_dtypes[0])
#define N_SETS 9

typedef struct {
    char path[64];
    rs_dtype dtype;
    int ndim;
    int64_t shape[RS_MAX_DIMS];
    size_t bytes;
    uint8_t *data;
} random_dataset;

static void make_random_dataset(random_dataset *d, rs_rng *rng, int i) {
    static const char *groups[] = {"", "lora/", "lora/layers.0.q_proj/", "masks/deep/er/"};
    snprintf(d->path, sizeof d->path, "%sd%d_%llx", groups[rs_rng_next(rng) % 4], i,
             (unsigned long long)(rs_rng_next(rng) & 0xfff));
    d->dtype = k_dtypes[i % N_DTYPES];
    d->ndim = (int)(rs_rng_next(rng) % 5);
    size_t numel = 1;
    for (int k = 0; k < d->ndim; k++) {
        d->shape[k] = (int64_t)(rs_rng_next(rng) % 5);
        numel *= (size_t)d->shape[k];
    }
    d->bytes = numel * rs_dtype_size(d->dtype);
    d->data = rs_malloc(d->bytes);
    if (d->dtype == RS_F32)
        for (size_t k = 0; k < numel; k++) ((float *)d->data)[k] = rs_rng_normal(rng);
    else if (d->dtype == RS_F64)
        for (size_t k = 0; k < numel; k++) ((double *)d->data)[k] = rs_rng_normal(rng) * 1e-3;
    else
        for (size_t k = 0; k < d->bytes; k++) d->data[k] = (uint8_t)(rs_rng_next(rng) | 0x10);
}

static char *scratch(const char *name) { return rs_path_join(rs_test_tmpdir(), name); }

/* Number of entries in the test's scratch folder whose name starts with prefix (temporaries are
 * "<path>.tmp.<pid>.<n>": their exact name is the writer's business). */
static int count_prefixed(const char *prefix) {
    DIR *d = opendir(rs_test_tmpdir());
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));) n += strncmp(e->d_name, prefix, strlen(prefix)) == 0;
    if (d) closedir(d);
    return n;
}

static int compare_paths(const void *a, const void *b) {
    return strcmp(((const random_dataset *)a)->path, ((const random_dataset *)b)->path);
}

TEST(test_h5_random_datasets_round_trip_through_a_committed_file) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    random_dataset d[N_SETS];
    char *path = scratch("round.h5");
    rs_h5 *h;
    REQUIRE(rs_h5_create(path, &h) == 0, "%s", rs_last_error());
    for (int i = 0; i < N_SETS; i++) {
        make_random_dataset(&d[i], &rng, i);
        CHECK(rs_h5_write(h, d[i].path, d[i].dtype, d[i].ndim, d[i].shape, d[i].data) == 0, "%s", rs_last_error());
    }
    CHECK(!rs_path_exists(path), "final name exists before commit");
    REQUIRE(rs_h5_commit(h) == 0, "%s", rs_last_error());
    CHECK(rs_path_exists(path) && count_prefixed("round.h5.tmp.") == 0, "commit did not rename");

    REQUIRE(rs_h5_open(path, &h) == 0, "%s", rs_last_error());
    rs_h5_dataset *list;
    int n;
    REQUIRE(rs_h5_list(h, &list, &n) == 0, "%s", rs_last_error());
    CHECK(n == N_SETS, "listed %d datasets, wrote %d", n, N_SETS);
    /* listing is depth first by link name; compare as sets via sorted paths */
    qsort(d, N_SETS, sizeof d[0], compare_paths);
    for (int i = 0; i < n && i < N_SETS; i++) {
        const rs_h5_dataset *got = NULL;
        for (int k = 0; k < n; k++)
            if (strcmp(list[k].path, d[i].path) == 0) got = &list[k];
        REQUIRE(got, "'%s' not listed", d[i].path);
        CHECK(got->kind == RS_H5_NUMBERS && got->dtype == d[i].dtype && got->ndim == d[i].ndim, "'%s' listed as %s/%d",
              d[i].path, rs_dtype_name(got->dtype), got->ndim);
        for (int k = 0; k < d[i].ndim; k++) CHECK(got->shape[k] == d[i].shape[k], "'%s' dim %d", d[i].path, k);
        uint8_t *back = rs_malloc(d[i].bytes);
        memset(back, 0, d[i].bytes);
        CHECK(rs_h5_read(h, d[i].path, d[i].dtype, d[i].ndim, d[i].shape, back) == 0, "%s", rs_last_error());
        CHECK(d[i].bytes == 0 || memcmp(back, d[i].data, d[i].bytes) == 0, "'%s' data differs", d[i].path);
        free(back);
    }
    rs_h5_free_list(list, n);
    rs_h5_close(h);
    for (int i = 0; i < N_SETS; i++) free(d[i].data);
    free(path);
}

/* Up to 11 random pieces (ASCII, 2-, 3- and 4-byte UTF-8, quotes, newline); may be empty. */
static void random_utf8_string(rs_rng *rng, char *buf, size_t cap) {
    static const char *pieces[] = {"a", "Z", " ", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x99\x82", "\\", "\"", "\n"};
    size_t len = 0, n = rs_rng_next(rng) % 12;
    buf[0] = 0;
    for (size_t i = 0; i < n; i++) {
        int added = snprintf(buf + len, cap - len, "%s", pieces[rs_rng_next(rng) % 9]);
        if (added < 0 || (size_t)added >= cap - len) {
            buf[len] = 0; /* the piece did not fit whole: drop it */
            break;
        }
        len += (size_t)added;
    }
}

TEST(test_h5_strings_and_attributes_round_trip) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    enum { N = 7 };
    char text[N][64];
    const char *strings[N];
    for (int i = 0; i < N; i++) {
        random_utf8_string(&rng, text[i], sizeof text[i]);
        strings[i] = text[i];
    }
    int64_t step = (int64_t)(rs_rng_next(&rng) >> 1) * (rs_rng_next(&rng) & 1 ? 1 : -1);
    double lr = rs_rng_normal(&rng);
    float w = rs_rng_normal(&rng);
    char *path = scratch("attrs.h5");
    rs_h5 *h;
    REQUIRE(rs_h5_create(path, &h) == 0, "%s", rs_last_error());
    CHECK(rs_h5_write_strings(h, "patch/prompts", strings, N) == 0, "%s", rs_last_error());
    CHECK(rs_h5_write(h, "w", RS_F32, 0, NULL, &w) == 0, "%s", rs_last_error());
    CHECK(rs_h5_create_group(h, "cfg/dpo") == 0 && rs_h5_create_group(h, "cfg/dpo") == 0, "%s", rs_last_error());
    CHECK(rs_h5_set_attr_str(h, NULL, "version", "old") == 0, "%s", rs_last_error());
    CHECK(rs_h5_set_attr_str(h, "/", "version", text[0]) == 0, "replace: %s", rs_last_error());
    CHECK(rs_h5_set_attr_i64(h, "w", "step", step) == 0, "%s", rs_last_error());
    CHECK(rs_h5_set_attr_f64(h, "cfg/dpo", "lr", lr) == 0, "%s", rs_last_error());
    CHECK(rs_h5_set_attr_i64(h, "cfg/dpo", "beta_x100", 10) == 0, "%s", rs_last_error());
    REQUIRE(rs_h5_commit(h) == 0, "%s", rs_last_error());

    REQUIRE(rs_h5_open(path, &h) == 0, "%s", rs_last_error());
    char **back, *s;
    int64_t n, iv;
    double dv;
    REQUIRE(rs_h5_read_strings(h, "patch/prompts", &back, &n) == 0, "%s", rs_last_error());
    CHECK(n == N, "%lld strings", (long long)n);
    for (int i = 0; i < N && i < n; i++) CHECK(strcmp(back[i], text[i]) == 0, "string %d: '%s' != '%s'", i, back[i], text[i]);
    rs_h5_free_strings(back, n);
    CHECK(rs_h5_get_attr_str(h, "", "version", &s) == 0 && strcmp(s, text[0]) == 0, "version");
    free(s);
    CHECK(rs_h5_get_attr_i64(h, "w", "step", &iv) == 0 && iv == step, "step %lld != %lld", (long long)iv, (long long)step);
    CHECK(rs_h5_get_attr_f64(h, "cfg/dpo", "lr", &dv) == 0 && dv == lr, "lr");
    CHECK(rs_h5_get_attr_f64(h, "cfg/dpo", "beta_x100", &dv) == 0 && dv == 10.0, "integer read as a number");
    CHECK(rs_h5_get_attr_i64(h, "cfg/dpo", "lr", &iv) == -1 && strstr(rs_last_error(), "'lr' of 'cfg/dpo'"),
          "float read as integer: %s", rs_last_error());
    CHECK(rs_h5_has_attr(h, "w", "step") == 1 && rs_h5_has_attr(h, "w", "nope") == 0, "has_attr");
    char **names;
    int n_names;
    REQUIRE(rs_h5_attr_names(h, "cfg/dpo", &names, &n_names) == 0, "%s", rs_last_error());
    CHECK(n_names == 2 && strcmp(names[0], "beta_x100") == 0 && strcmp(names[1], "lr") == 0, "attribute names");
    rs_h5_free_strings(names, n_names);
    CHECK(rs_h5_exists(h, "cfg/dpo") == 1 && rs_h5_exists(h, "cfg/nope/x") == 0, "exists");
    rs_h5_close(h);
    free(path);
}

TEST(test_h5_uncommitted_file_leaves_nothing_behind) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    char *path = scratch("aborted.h5");
    rs_h5 *h;
    REQUIRE(rs_h5_create(path, &h) == 0, "%s", rs_last_error());
    double v = rs_rng_normal(&rng);
    CHECK(rs_h5_write(h, "a/b", RS_F64, 0, NULL, &v) == 0, "%s", rs_last_error());
    CHECK(count_prefixed("aborted.h5.tmp.") == 1 && !rs_path_exists(path),
          "writing should happen at a temporary name");
    rs_h5_close(h);
    CHECK(count_prefixed("aborted.h5") == 0, "an uncommitted file was left behind");
    free(path);
}

TEST(test_h5_read_checks_dtype_and_shape_and_names_the_dataset) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    float v[6];
    for (int i = 0; i < 6; i++) v[i] = rs_rng_normal(&rng);
    int64_t shape[2] = {2, 3}, wrong[2] = {3, 2};
    char *path = scratch("checks.h5");
    rs_h5 *h;
    REQUIRE(rs_h5_create(path, &h) == 0, "%s", rs_last_error());
    REQUIRE(rs_h5_write(h, "lora/A", RS_F32, 2, shape, v) == 0, "%s", rs_last_error());
    CHECK(rs_h5_write(h, "lora/A", RS_F32, 2, shape, v) == -1 && strstr(rs_last_error(), "already exists"),
          "overwrite: %s", rs_last_error());
    CHECK(rs_h5_write(h, "lora/../x", RS_F32, 2, shape, v) == -1 && strstr(rs_last_error(), "'..'"), "%s",
          rs_last_error());
    CHECK(rs_h5_write(h, "h", RS_BF16, 2, shape, v) == -1 && strstr(rs_last_error(), "BF16"), "%s", rs_last_error());
    REQUIRE(rs_h5_commit(h) == 0, "%s", rs_last_error());
    REQUIRE(rs_h5_open(path, &h) == 0, "%s", rs_last_error());
    float back[6];
    CHECK(rs_h5_read(h, "lora/A", RS_F32, 2, wrong, back) == -1, "wrong shape accepted");
    CHECK(strstr(rs_last_error(), "checks.h5: dataset 'lora/A' has shape [2, 3], expected [3, 2]"), "%s",
          rs_last_error());
    CHECK(rs_h5_read(h, "lora/A", RS_F64, 2, shape, back) == -1 && strstr(rs_last_error(), "holds F32, expected F64"),
          "%s", rs_last_error());
    CHECK(rs_h5_read(h, "lora/B", RS_F32, 2, shape, back) == -1 &&
              strstr(rs_last_error(), "checks.h5: dataset 'lora/B' does not exist"),
          "%s", rs_last_error());
    CHECK(rs_h5_read(h, "lora", RS_F32, 2, shape, back) == -1 && strstr(rs_last_error(), "'lora'"), "%s",
          rs_last_error());
    int64_t iv;
    CHECK(rs_h5_get_attr_i64(h, "lora/A", "rank", &iv) == -1 && strstr(rs_last_error(), "attribute 'rank' of 'lora/A'"),
          "%s", rs_last_error());
    CHECK(rs_h5_write(h, "x", RS_F32, 2, shape, v) == -1 && strstr(rs_last_error(), "reading only"), "%s",
          rs_last_error());
    rs_h5_close(h);
    free(path);
}

TEST(test_h5_non_hdf5_and_missing_files_are_named) {
    char *path = scratch("not_hdf5.h5");
    const char junk[] = "this is not an HDF5 file at all";
    REQUIRE(rs_write_file_atomic(path, junk, sizeof junk) == 0, "%s", rs_last_error());
    rs_h5 *h = NULL;
    CHECK(rs_h5_open(path, &h) == -1 && strstr(rs_last_error(), "not_hdf5.h5: not a readable HDF5 file"), "%s",
          rs_last_error());
    CHECK(rs_h5_open("/nonexistent/x.h5", &h) == -1 && strstr(rs_last_error(), "/nonexistent/x.h5"), "%s",
          rs_last_error());
    CHECK(rs_h5_create("/nonexistent/dir/y.h5", &h) == -1 && strstr(rs_last_error(), "/nonexistent/dir/y.h5"), "%s",
          rs_last_error());
    free(path);
}

/* Two files written with the same content a second apart are byte-identical: HDF5 records no
 * object times (resumed training runs compare their outputs byte for byte). */
TEST(test_h5_same_content_gives_identical_bytes) {
    rs_rng rng;
    rs_rng_seed(&rng, rs_test_seed());
    float v[24];
    for (int i = 0; i < 24; i++) v[i] = rs_rng_normal(&rng);
    int64_t shape[2] = {4, 6};
    char *data[2];
    size_t n[2];
    for (int k = 0; k < 2; k++) {
        char name[32];
        snprintf(name, sizeof name, "same%d.h5", k);
        char *path = scratch(name);
        rs_h5 *h;
        REQUIRE(rs_h5_create(path, &h) == 0, "%s", rs_last_error());
        CHECK(rs_h5_write(h, "lora/layers.0/A", RS_F32, 2, shape, v) == 0, "%s", rs_last_error());
        CHECK(rs_h5_create_group(h, "extra/group") == 0, "%s", rs_last_error());
        CHECK(rs_h5_set_attr_i64(h, "/", "step", 7) == 0, "%s", rs_last_error());
        REQUIRE(rs_h5_commit(h) == 0, "%s", rs_last_error());
        REQUIRE(rs_read_file(path, &data[k], &n[k]) == 0, "%s", rs_last_error());
        free(path);
        if (k == 0) sleep(2); /* HDF5 times have one-second resolution */
    }
    CHECK(n[0] == n[1] && memcmp(data[0], data[1], n[0]) == 0, "files differ (%zu vs %zu bytes)",
          n[0], n[1]);
    free(data[0]);
    free(data[1]);
}
