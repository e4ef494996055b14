/* quant_io: reading and writing quantized model directories (schema in quant_io.h). Every
 * tensor read is checked (dtype, shape against the spec's geometry) before rs_qweight_check
 * looks at its values, so a malformed file fails with one line naming the file and tensor. */
#include "resafe/quant_io.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

static const char *format_name(rs_qformat f) {
    switch (f) {
    case RS_QFMT_NF4: return "nf4";
    case RS_QFMT_FP4: return "fp4";
    case RS_QFMT_INT8_OUTLIER: return "int8";
    default: return "int";
    }
}

char *rs_qconfig_json(const rs_qspec *spec, const char *method) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "quant_format", format_name(spec->format));
    cJSON_AddNumberToObject(o, "bits", spec->bits);
    cJSON_AddNumberToObject(o, "group_size", spec->group_size);
    cJSON_AddBoolToObject(o, "symmetric", spec->symmetric != 0);
    cJSON_AddNumberToObject(o, "outlier_threshold", rs_qspec_threshold(spec));
    cJSON_AddStringToObject(o, "method", method ? method : "rtn");
    if (spec->float_zeros) cJSON_AddStringToObject(o, "zero_point", "float");
    cJSON_AddStringToObject(o, "packing", RS_QPACKING_NAME);
    cJSON_AddNumberToObject(o, "packing_version", RS_QPACK_VERSION);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    char *r = rs_strdup(s);
    cJSON_free(s);
    return r;
}

static int json_int(const char *file, const cJSON *o, const char *key, int lo, int hi, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v) || v->valuedouble != (double)(int)v->valuedouble ||
        v->valuedouble < lo || v->valuedouble > hi)
        return RS_FAIL("%s: quantization_config.%s must be an integer in [%d, %d]", file, key, lo,
                       hi);
    *out = (int)v->valuedouble;
    return 0;
}

static int parse_fields(const char *file, const cJSON *o, rs_qspec *spec, char *method, size_t n) {
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(o, "quant_format");
    const cJSON *sym = cJSON_GetObjectItemCaseSensitive(o, "symmetric");
    const cJSON *thr = cJSON_GetObjectItemCaseSensitive(o, "outlier_threshold");
    const cJSON *meth = cJSON_GetObjectItemCaseSensitive(o, "method");
    const cJSON *pack = cJSON_GetObjectItemCaseSensitive(o, "packing");
    if (!cJSON_IsString(fmt)) return RS_FAIL("%s: quantization_config.quant_format missing", file);
    const char *f = fmt->valuestring;
    if (!strcmp(f, "int"))
        spec->format = RS_QFMT_INT;
    else if (!strcmp(f, "nf4"))
        spec->format = RS_QFMT_NF4;
    else if (!strcmp(f, "fp4"))
        spec->format = RS_QFMT_FP4;
    else if (!strcmp(f, "int8"))
        spec->format = RS_QFMT_INT8_OUTLIER;
    else
        return RS_FAIL("%s: quantization_config.quant_format '%s' unknown", file, f);
    int version;
    if (json_int(file, o, "bits", 1, 8, &spec->bits) ||
        json_int(file, o, "group_size", 0, 1 << 20, &spec->group_size) ||
        json_int(file, o, "packing_version", 0, 1000, &version))
        return -1;
    if (!cJSON_IsString(pack) || strcmp(pack->valuestring, RS_QPACKING_NAME) ||
        version != RS_QPACK_VERSION)
        return RS_FAIL("%s: packing must be %s version %d", file, RS_QPACKING_NAME,
                       RS_QPACK_VERSION);
    if (!cJSON_IsBool(sym))
        return RS_FAIL("%s: quantization_config.symmetric must be a boolean", file);
    spec->symmetric = cJSON_IsTrue(sym);
    if (thr && !cJSON_IsNumber(thr))
        return RS_FAIL("%s: quantization_config.outlier_threshold must be a number", file);
    spec->outlier_threshold = thr ? (float)thr->valuedouble : 0.0f;
    const cJSON *zp = cJSON_GetObjectItemCaseSensitive(o, "zero_point");
    if (zp && (!cJSON_IsString(zp) || (strcmp(zp->valuestring, "float") &&
                                       strcmp(zp->valuestring, "integer"))))
        return RS_FAIL("%s: quantization_config.zero_point must be \"integer\" or \"float\"", file);
    spec->float_zeros = zp && !strcmp(zp->valuestring, "float");
    if (method) snprintf(method, n, "%s", cJSON_IsString(meth) ? meth->valuestring : "unknown");
    if (rs_qspec_check(spec) != 0) return rs_fail_context("%s", file);
    return 0;
}

int rs_qconfig_parse(const char *file, const char *json, rs_qspec *spec, char *method, size_t n) {
    memset(spec, 0, sizeof *spec);
    cJSON *o = cJSON_Parse(json);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return RS_FAIL("%s: quantization_config is not a JSON object", file);
    }
    int rc = parse_fields(file, o, spec, method, n);
    cJSON_Delete(o);
    return rc;
}

const char *rs_qconfig_of(const rs_st_set *set) {
    for (int i = 0; i < set->n_meta; i++)
        if (!strcmp(set->meta_keys[i], RS_QCONFIG_KEY)) return set->meta_values[i];
    return NULL;
}

/* ---- reading one linear */

/* Copy tensor <name>.<part> (dtype, shape d0 x d1; d1 < 0 for 1-d) into a fresh host array.
 * Absent: NULL and 0 when optional, an error otherwise. */
static int read_part(const rs_st_set *set, const char *file, const char *name, const char *part,
                     rs_dtype dtype, int64_t d0, int64_t d1, int required, void **out,
                     int *n_used) {
    char full[256];
    snprintf(full, sizeof full, "%s.%s", name, part);
    *out = NULL;
    const rs_st_tensor *t = rs_st_find(set, full);
    if (!t) return required ? RS_FAIL("%s: tensor '%s' is missing", file, full) : 0;
    int ndim = d1 < 0 ? 1 : 2;
    if (t->dtype != dtype)
        return RS_FAIL("%s: tensor '%s' has dtype %s, expected %s", file, full,
                       rs_dtype_name(t->dtype), rs_dtype_name(dtype));
    if (t->ndim != ndim || t->shape[0] != d0 || (ndim == 2 && t->shape[1] != d1)) {
        char want[64];
        if (ndim == 2)
            snprintf(want, sizeof want, "[%lld, %lld]", (long long)d0, (long long)d1);
        else
            snprintf(want, sizeof want, "[%lld]", (long long)d0);
        return RS_FAIL("%s: tensor '%s' has the wrong shape (expected %s)", file, full, want);
    }
    size_t bytes = t->nbytes;
    *out = rs_malloc(bytes ? bytes : 1);
    memcpy(*out, t->data, bytes);
    (*n_used)++;
    return 0;
}

static int64_t dim_of(const rs_st_set *set, const char *name, const char *part) {
    char full[256];
    snprintf(full, sizeof full, "%s.%s", name, part);
    const rs_st_tensor *t = rs_st_find(set, full);
    return t && t->ndim >= 1 ? t->shape[0] : -1;
}

static int read_extras(const rs_st_set *set, const char *file, const char *name, rs_qweight *q,
                       int *n_used) {
    void *p;
    int64_t n_out = dim_of(set, name, "outlier_cols");
    if (n_out > q->cols) return RS_FAIL("%s: tensor '%s.outlier_cols' is too long", file, name);
    if (n_out >= 0) {
        q->n_outlier_cols = (int)n_out;
        if (read_part(set, file, name, "outlier_cols", RS_I32, n_out, -1, 1, &p, n_used)) return -1;
        q->outlier_cols = p;
        if (read_part(set, file, name, "outlier_vals", RS_F16, q->rows, n_out, 1, &p, n_used))
            return -1;
        q->outlier_vals = p;
    }
    int64_t nnz = dim_of(set, name, "crit_cols");
    if (nnz >= 0 || dim_of(set, name, "crit_row_ptr") >= 0) {
        if (nnz < 0) return RS_FAIL("%s: tensor '%s.crit_cols' is missing", file, name);
        q->n_critical = nnz;
        if (read_part(set, file, name, "crit_row_ptr", RS_I64, q->rows + 1, -1, 1, &p, n_used))
            return -1;
        q->crit_row_ptr = p;
        if (read_part(set, file, name, "crit_cols", RS_I32, nnz, -1, 1, &p, n_used)) return -1;
        q->crit_cols = p;
        if (read_part(set, file, name, "crit_vals", RS_F16, nnz, -1, 1, &p, n_used)) return -1;
        q->crit_vals = p;
    }
    return 0;
}

int rs_qweight_read(const rs_st_set *set, const char *file, const char *name, const rs_qspec *spec,
                    int rows, int cols, rs_qweight *q, int *n_used) {
    *n_used = 0;
    if (rs_qweight_init(q, spec, rows, cols) != 0) return rs_fail_context("%s: %s", file, name);
    int64_t rb = (int64_t)rs_qpack_row_bytes(cols, q->spec.bits);
    void *p;
    int rc = read_part(set, file, name, "qweight", RS_U8, rows, rb, 1, &p, n_used);
    q->packed = p;
    if (!rc) rc = read_part(set, file, name, "scales", RS_F32, rows, q->n_groups, 1, &p, n_used);
    if (!rc) q->scales = p;
    int asym = q->spec.format == RS_QFMT_INT && !q->spec.symmetric;
    if (!rc) rc = read_part(set, file, name, "zeros", RS_F32, rows, q->n_groups, asym, &p, n_used);
    if (!rc) q->zeros = p;
    if (!rc) rc = read_part(set, file, name, "input_scale", RS_F32, cols, -1, 0, &p, n_used);
    if (!rc) q->input_scale = p;
    if (!rc) rc = read_extras(set, file, name, q, n_used);
    if (!rc) {
        char label[300];
        snprintf(label, sizeof label, "%s: %s", file, name);
        rc = rs_qweight_check(q, label);
    }
    if (rc) rs_qweight_free(q);
    return rc;
}

/* ---- a standalone file (inspect --as quant, the fuzz target) */

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

int rs_qset_check(const rs_st_set *set, const char *file, int *n_linears) {
    const char *qjson = rs_qconfig_of(set);
    *n_linears = 0;
    if (!qjson)
        return RS_FAIL("%s: no %s in __metadata__ (not a quantized file)", file, RS_QCONFIG_KEY);
    rs_qspec spec;
    if (rs_qconfig_parse(file, qjson, &spec, NULL, 0) != 0) return -1;
    for (int i = 0; i < set->n_tensors; i++) {
        const rs_st_tensor *t = &set->tensors[i];
        if (ends_with(t->name, ".scales")) { /* every quantized linear has both */
            char q[256];
            snprintf(q, sizeof q, "%.*s.qweight", (int)(strlen(t->name) - strlen(".scales")),
                     t->name);
            if (!rs_st_find(set, q)) return RS_FAIL("%s: tensor '%s' is missing", file, q);
        }
        if (!ends_with(t->name, ".qweight")) continue;
        if (t->ndim != 2 || t->shape[0] < 1 || t->shape[0] > INT32_MAX || t->shape[1] < 1 ||
            t->shape[1] % (4 * spec.bits) != 0 || t->shape[1] / spec.bits * 8 > INT32_MAX)
            return RS_FAIL("%s: tensor '%s' has a shape that no %d-bit packing gives", file,
                           t->name, spec.bits);
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(strlen(t->name) - strlen(".qweight")), t->name);
        int rows = (int)t->shape[0], cols = (int)(t->shape[1] / spec.bits * 8), used;
        rs_qweight q;
        if (rs_qweight_read(set, file, name, &spec, rows, cols, &q, &used) != 0) return -1;
        rs_qweight_free(&q);
        (*n_linears)++;
    }
    return 0;
}

int rs_qfile_check(const char *path, int *n_linears) {
    rs_st_set set;
    if (rs_st_open(path, &set) != 0) return -1;
    int rc = rs_qset_check(&set, path, n_linears);
    rs_st_close(&set);
    return rc;
}
