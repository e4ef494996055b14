/* quant_export: writing a quantized model directory (quant_io.h) and the dequantized HF export. */
#include "resafe/quant_io.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const SIDE_FILES[] = {
    "config.json",           "generation_config.json",  "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json",     "chat_template.jinja",     "chat_template.json"};

int rs_copy_model_side_files(const char *src_dir, const char *out_dir) {
    for (size_t i = 0; i < sizeof SIDE_FILES / sizeof *SIDE_FILES; i++) {
        char *src = rs_path_join(src_dir, SIDE_FILES[i]),
             *dst = rs_path_join(out_dir, SIDE_FILES[i]);
        int rc = 0;
        if (rs_path_exists(src)) {
            char *data;
            size_t size;
            rc = rs_read_file(src, &data, &size);
            if (rc == 0) {
                rc = rs_write_file_atomic(dst, data, size);
                free(data);
            }
        }
        free(src);
        free(dst);
        if (rc) return -1;
    }
    return 0;
}

/* Linear index j (layer-major) of a tensor named model.layers.<l>.<linear>.weight, or -1. */
static int linear_index(const char *name, int n_layers) {
    int l, used = 0;
    if (sscanf(name, "model.layers.%d.%n", &l, &used) != 1 || used == 0 || l < 0 || l >= n_layers)
        return -1;
    for (int i = 0; i < RS_N_LINEARS; i++) {
        char want[96];
        snprintf(want, sizeof want, "%s.weight", rs_linear_name(i));
        if (!strcmp(name + used, want)) return l * RS_N_LINEARS + i;
    }
    return -1;
}

typedef struct {
    rs_st_write_tensor *t;
    int n, cap;
    char **names; /* owned */
    void **bufs;  /* owned */
    int n_names, n_bufs;
} tensor_list;

static rs_st_write_tensor *push(tensor_list *l) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->t = rs_realloc(l->t, (size_t)l->cap * sizeof *l->t);
        l->names = rs_realloc(l->names, (size_t)l->cap * sizeof *l->names);
        l->bufs = rs_realloc(l->bufs, (size_t)l->cap * sizeof *l->bufs);
    }
    rs_st_write_tensor *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    return t;
}

static const char *own_name(tensor_list *l, const char *fmt_a, const char *b) {
    char buf[300];
    snprintf(buf, sizeof buf, "%s.%s", fmt_a, b);
    return l->names[l->n_names++] = rs_strdup(buf);
}

static void add(tensor_list *l, const char *base, const char *part, rs_dtype dt, int64_t d0,
                int64_t d1, const void *data) {
    rs_st_write_tensor *t = push(l);
    t->name = own_name(l, base, part);
    t->dtype = dt;
    t->ndim = d1 < 0 ? 1 : 2;
    t->shape[0] = d0;
    t->shape[1] = d1 < 0 ? 0 : d1;
    t->data = data;
}

static void free_list(tensor_list *l) {
    for (int i = 0; i < l->n_names; i++)
        free(l->names[i]);
    for (int i = 0; i < l->n_bufs; i++)
        free(l->bufs[i]);
    free(l->names);
    free(l->bufs);
    free(l->t);
}

static void add_qweight(tensor_list *l, const char *base, const rs_qweight *q) {
    int64_t rb = (int64_t)rs_qpack_row_bytes(q->cols, q->spec.bits);
    add(l, base, "qweight", RS_U8, q->rows, rb, q->packed);
    add(l, base, "scales", RS_F32, q->rows, q->n_groups, q->scales);
    if (q->zeros) add(l, base, "zeros", RS_F32, q->rows, q->n_groups, q->zeros);
    if (q->input_scale) add(l, base, "input_scale", RS_F32, q->cols, -1, q->input_scale);
    if (q->n_outlier_cols) {
        add(l, base, "outlier_cols", RS_I32, q->n_outlier_cols, -1, q->outlier_cols);
        add(l, base, "outlier_vals", RS_F16, q->rows, q->n_outlier_cols, q->outlier_vals);
    }
    if (q->crit_row_ptr) {
        add(l, base, "crit_row_ptr", RS_I64, q->rows + 1, -1, q->crit_row_ptr);
        add(l, base, "crit_cols", RS_I32, q->n_critical, -1, q->crit_cols);
        add(l, base, "crit_vals", RS_F16, q->n_critical, -1, q->crit_vals);
    }
}

static void base_name(char *buf, size_t n, const char *weight_name) {
    snprintf(buf, n, "%s", weight_name);
    char *dot = strrchr(buf, '.');
    if (dot) *dot = '\0'; /* drop ".weight" */
}

static const rs_qspec *first_spec(const rs_model_config *cfg, const rs_qweight *const *qw) {
    for (int j = 0; j < cfg->n_layers * RS_N_LINEARS; j++)
        if (qw[j]) return &qw[j]->spec;
    return NULL;
}

int rs_qmodel_write(const char *src_dir, const char *out_dir, const rs_model_config *cfg,
                    const rs_qweight *const *qw, const char *method) {
    const rs_qspec *spec = first_spec(cfg, qw);
    if (!spec) return RS_FAIL("%s: nothing was quantized", out_dir);
    rs_st_set set;
    if (rs_st_open(src_dir, &set) != 0) return -1;
    tensor_list l = {0};
    for (int i = 0; i < set.n_tensors; i++) {
        const rs_st_tensor *s = &set.tensors[i];
        int j = linear_index(s->name, cfg->n_layers);
        if (j >= 0 && qw[j]) {
            char base[256];
            base_name(base, sizeof base, s->name);
            add_qweight(&l, base, qw[j]);
            continue;
        }
        rs_st_write_tensor *t = push(&l);
        t->name = s->name;
        t->dtype = s->dtype;
        t->ndim = s->ndim;
        memcpy(t->shape, s->shape, sizeof t->shape);
        t->data = s->data;
    }
    char *qjson = rs_qconfig_json(spec, method);
    const char *keys[2] = {"format", RS_QCONFIG_KEY}, *vals[2] = {"pt", qjson};
    char *path = rs_path_join(out_dir, "model.safetensors");
    int rc = rs_st_write(path, l.t, l.n, keys, vals, 2);
    free(path);
    free(qjson);
    free_list(&l);
    rs_st_close(&set);
    if (rc == 0) rc = rs_copy_model_side_files(src_dir, out_dir);
    return rc;
}

/* fp32 values into a fresh buffer of dtype (F32, F16 or BF16). */
static void *convert(const float *src, size_t n, rs_dtype dtype) {
    if (dtype == RS_F32) {
        float *d = rs_malloc(n * sizeof *d + 1);
        memcpy(d, src, n * sizeof *d);
        return d;
    }
    uint16_t *d = rs_malloc(n * sizeof *d + 1);
    for (size_t i = 0; i < n; i++)
        d[i] = dtype == RS_BF16 ? rs_f32_to_bf16(src[i]) : rs_f32_to_f16(src[i]);
    return d;
}

/* config.json of the export says the dtype its weights are in (transformers loads in it). */
static int set_config_dtype(const char *out_dir, rs_dtype dtype) {
    char *path = rs_path_join(out_dir, "config.json"), *text = NULL;
    size_t size;
    int rc = rs_read_file(path, &text, &size);
    cJSON *o = rc == 0 ? cJSON_ParseWithLength(text, size) : NULL;
    if (rc == 0 && !cJSON_IsObject(o)) rc = RS_FAIL("%s: not a JSON object", path);
    if (rc == 0) {
        const char *name = dtype == RS_F32 ? "float32" : dtype == RS_F16 ? "float16" : "bfloat16";
        const char *keys[2] = {"torch_dtype", "dtype"};
        for (int i = 0; i < 2; i++)
            if (cJSON_GetObjectItemCaseSensitive(o, keys[i]) || i == 0) {
                cJSON_DeleteItemFromObjectCaseSensitive(o, keys[i]);
                cJSON_AddStringToObject(o, keys[i], name);
            }
        char *out = cJSON_PrintUnformatted(o);
        rc = rs_write_file_atomic(path, out, strlen(out));
        cJSON_free(out);
    }
    free(text);
    cJSON_Delete(o);
    free(path);
    return rc;
}

int rs_qmodel_write_dequant(const char *src_dir, const char *out_dir, const rs_model_config *cfg,
                            const rs_qweight *const *qw, rs_dtype dtype) {
    if (dtype != RS_F32 && dtype != RS_F16 && dtype != RS_BF16)
        return RS_FAIL("dequantized export: dtype %s (F32, F16 or BF16)", rs_dtype_name(dtype));
    rs_st_set set;
    if (rs_st_open(src_dir, &set) != 0) return -1;
    tensor_list l = {0};
    int rc = 0;
    for (int i = 0; i < set.n_tensors && rc == 0; i++) {
        const rs_st_tensor *s = &set.tensors[i];
        size_t n = (size_t)rs_st_numel(s);
        float *f = rs_malloc(n * sizeof *f + 1);
        int j = linear_index(s->name, cfg->n_layers);
        if (j >= 0 && qw[j])
            rc = rs_dequantize(qw[j], f);
        else if (s->dtype == RS_F32 || s->dtype == RS_F16 || s->dtype == RS_BF16 ||
                 s->dtype == RS_F64)
            rc = rs_st_read_f32(s, f, n);
        else
            rc =
                RS_FAIL("%s: tensor '%s' has dtype %s; the dequantized export converts floats only",
                        src_dir, s->name, rs_dtype_name(s->dtype));
        rs_st_write_tensor *t = push(&l);
        t->name = s->name;
        t->dtype = dtype;
        t->ndim = s->ndim;
        memcpy(t->shape, s->shape, sizeof t->shape);
        t->data = l.bufs[l.n_bufs++] = convert(f, n, dtype);
        free(f);
    }
    const char *keys[1] = {"format"}, *vals[1] = {"pt"};
    char *path = rs_path_join(out_dir, "model.safetensors");
    if (rc == 0) rc = rs_st_write(path, l.t, l.n, keys, vals, 1);
    free(path);
    free_list(&l);
    rs_st_close(&set);
    if (rc == 0) rc = rs_copy_model_side_files(src_dir, out_dir);
    if (rc == 0) rc = set_config_dtype(out_dir, dtype);
    return rc;
}
