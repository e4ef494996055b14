/* patchset: reading the patch set HDF5 into preference pairs (layout in
 * include/resafe/patchset.h). */
#include "resafe/patchset.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/h5store.h"

/* A 1-d numeric dataset of exactly dtype; its length in *n. */
static int vector_len(rs_h5 *h, const char *name, rs_dtype dtype, int64_t *n) {
    rs_h5_dataset info;
    if (!rs_h5_exists(h, name))
        return RS_FAIL("%s: no dataset '%s' (not a resafe patch set?)", rs_h5_path(h), name);
    RS_TRY(rs_h5_info(h, name, &info));
    if (info.kind != RS_H5_NUMBERS || info.dtype != dtype || info.ndim != 1)
        return RS_FAIL("%s: dataset '%s' must be a 1-d %s vector", rs_h5_path(h), name,
                       rs_dtype_name(dtype));
    *n = info.shape[0];
    return 0;
}

/* ids (I32 [total]) and their offsets (I64 [n+1]) of one part ("prompt", "winner", "loser"),
 * checked; *ids and *off are malloc'ed. */
static int read_part(rs_h5 *h, const char *part, int64_t n, int32_t **ids, int64_t **off) {
    char ids_name[32], off_name[32];
    snprintf(ids_name, sizeof ids_name, "%s_ids", part);
    snprintf(off_name, sizeof off_name, "%s_offsets", part);
    int64_t total, n_off;
    RS_TRY(vector_len(h, ids_name, RS_I32, &total));
    RS_TRY(vector_len(h, off_name, RS_I64, &n_off));
    const char *path = rs_h5_path(h);
    if (n_off != n + 1)
        return RS_FAIL("%s: dataset '%s' has %lld entries, expected %lld (pairs + 1)", path,
                       off_name, (long long)n_off, (long long)n + 1);
    *ids = rs_malloc((size_t)(total ? total : 1) * sizeof **ids);
    *off = rs_malloc((size_t)n_off * sizeof **off);
    if (rs_h5_read(h, ids_name, RS_I32, 1, &total, *ids) != 0 ||
        rs_h5_read(h, off_name, RS_I64, 1, &n_off, *off) != 0)
        return -1;
    if ((*off)[0] != 0 || (*off)[n] != total)
        return RS_FAIL("%s: dataset '%s' must start at 0 and end at %lld (the length of '%s')",
                       path, off_name, (long long)total, ids_name);
    for (int64_t i = 0; i < n; i++)
        if ((*off)[i + 1] <= (*off)[i] || (*off)[i + 1] - (*off)[i] > INT32_MAX / 4)
            return RS_FAIL("%s: dataset '%s': pair %lld has %lld tokens (must be 1 .. 2^29)", path,
                           off_name, (long long)i, (long long)((*off)[i + 1] - (*off)[i]));
    for (int64_t i = 0; i < total; i++)
        if ((*ids)[i] < 0)
            return RS_FAIL("%s: dataset '%s': negative token id %d at %lld", path, ids_name,
                           (*ids)[i], (long long)i);
    return 0;
}

static int read_refs(rs_h5 *h, const char *name, int64_t n, float *dst) {
    int64_t len;
    RS_TRY(vector_len(h, name, RS_F32, &len));
    if (len != n)
        return RS_FAIL("%s: dataset '%s' has %lld entries for %lld pairs", rs_h5_path(h), name,
                       (long long)len, (long long)n);
    RS_TRY(rs_h5_read(h, name, RS_F32, 1, &len, dst));
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(dst[i]) || dst[i] > 0)
            return RS_FAIL("%s: dataset '%s': pair %lld: %g is not a log-probability "
                           "(finite, <= 0)",
                           rs_h5_path(h), name, (long long)i, (double)dst[i]);
    return 0;
}

static int check_format(rs_h5 *h) {
    char *format = NULL;
    int64_t version = 0;
    int has = rs_h5_has_attr(h, NULL, "format");
    if (has < 0) return -1;
    if (has == 0 || rs_h5_get_attr_str(h, NULL, "format", &format) != 0 ||
        strcmp(format, RS_PATCHSET_FORMAT) != 0) {
        free(format);
        return RS_FAIL("%s: not a resafe patch set (root attribute 'format' is not '%s')",
                       rs_h5_path(h), RS_PATCHSET_FORMAT);
    }
    free(format);
    RS_TRY(rs_h5_get_attr_i64(h, NULL, "format_version", &version));
    if (version != RS_PATCHSET_VERSION)
        return RS_FAIL("%s: patch set format_version %lld (this resafe reads %d)", rs_h5_path(h),
                       (long long)version, RS_PATCHSET_VERSION);
    return 0;
}

/* prompt + response of pair i into s. */
static void join(rs_seq *s, const int32_t *p, int np, const int32_t *r, int nr) {
    s->n = np + nr, s->n_prompt = np;
    s->ids = rs_malloc((size_t)s->n * sizeof *s->ids);
    memcpy(s->ids, p, (size_t)np * sizeof *p);
    memcpy(s->ids + np, r, (size_t)nr * sizeof *r);
}

static int fill(rs_h5 *h, rs_pref_set *set) {
    int64_t n;
    RS_TRY(check_format(h));
    RS_TRY(vector_len(h, "ref_winner", RS_F32, &n));
    if (n < 1 || n > INT32_MAX / 2)
        return RS_FAIL("%s: dataset 'ref_winner': %lld pairs (must be 1 .. 2^30)", rs_h5_path(h),
                       (long long)n);
    int32_t *ids[3] = {NULL, NULL, NULL};
    int64_t *off[3] = {NULL, NULL, NULL};
    static const char *const parts[3] = {"prompt", "winner", "loser"};
    rs_pref_alloc(set, (int)n);
    int rc = 0;
    for (int k = 0; k < 3 && rc == 0; k++) rc = read_part(h, parts[k], n, &ids[k], &off[k]);
    if (rc == 0) rc = read_refs(h, "ref_winner", n, set->ref_chosen);
    if (rc == 0) rc = read_refs(h, "ref_loser", n, set->ref_rejected);
    for (int64_t i = 0; i < n && rc == 0; i++) {
        int np = (int)(off[0][i + 1] - off[0][i]);
        const int32_t *p = ids[0] + off[0][i];
        join(&set->chosen[i], p, np, ids[1] + off[1][i], (int)(off[1][i + 1] - off[1][i]));
        join(&set->rejected[i], p, np, ids[2] + off[2][i], (int)(off[2][i + 1] - off[2][i]));
        int len = set->chosen[i].n > set->rejected[i].n ? set->chosen[i].n : set->rejected[i].n;
        if (len > set->max_len) set->max_len = len;
    }
    for (int k = 0; k < 3; k++) free(ids[k]), free(off[k]);
    set->has_ref = rc == 0;
    return rc;
}

int rs_patchset_load(const char *path, rs_pref_set *set) {
    memset(set, 0, sizeof *set);
    rs_h5 *h;
    RS_TRY(rs_h5_open(path, &h));
    int rc = fill(h, set);
    rs_h5_close(h);
    if (rc != 0) rs_pref_free(set);
    return rc;
}

void rs_patchset_check_model(const char *path, const char *model_dir) {
    rs_h5 *h;
    char *q = NULL;
    if (rs_h5_open(path, &h) != 0) return;
    if (rs_h5_get_attr_str(h, NULL, "quantized_model", &q) == 0) {
        char a[PATH_MAX], b[PATH_MAX];
        int same = realpath(q, a) && realpath(model_dir, b) && strcmp(a, b) == 0;
        if (!same)
            rs_warn("%s: its reference log-probs were computed on the quantized model %s, not on "
                    "%s, the model being trained",
                    path, q, model_dir);
    }
    free(q);
    rs_h5_close(h);
}
