/* merge: fold the adapter into the quantized model (DESIGN.md section 4, README "resafe merge").
 *
 * Reads q_dir's quantized linears and the adapter (for q_dir's config.json: another model's
 * adapter fails with one line), folds delta = scale * (M ⊙) B A of every adapted linear by the
 * mode (merge_fold.c), and writes a quantized model directory: model.safetensors (every tensor
 * of q_dir, the adapted linears' quantized tensors replaced), the side files, the provenance
 * manifest with the merge added, merge_stats.json. Mode adapter copies q_dir's tensors and the
 * adapter as resafe_adapter.h5 (rs_model_load applies it). Written to a temporary directory and
 * renamed. */
#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "merge_internal.h"
#include "resafe/adapter.h"
#include "resafe/checkpoint.h"
#include "resafe/core.h"
#include "resafe/model_train.h"
#include "resafe/quant_io.h"
#include "resafe/sha256.h"

static const char *const g_modes[] = {"grid", "refit", "adapter", "exact"};

const char *rs_merge_mode_name(rs_merge_mode m) { return g_modes[m]; }

int rs_merge_mode_from_name(const char *name, rs_merge_mode *out) {
    for (int i = 0; i < 4; i++)
        if (strcmp(name, g_modes[i]) == 0) {
            *out = (rs_merge_mode)i;
            return 0;
        }
    return -1;
}

/* ---------------------------------------------------------------- inputs */

typedef struct {
    const char *q_dir, *adapter_path;
    rs_model_config cfg;
    rs_st_set set;
    rs_qspec spec;
    char method[64];
    int n_lin;         /* n_layers * 7 */
    rs_qweight *q0;    /* [n_lin] host, as read */
    rs_qweight *q1;    /* [n_lin] merged (zeroed where not adapted) */
    rs_lora ad;        /* host adapter */
    int have_ad;
} merge_job;

static void linear_name(char *buf, size_t n, int j) {
    snprintf(buf, n, "model.layers.%d.%s", j / RS_N_LINEARS, rs_linear_name(j % RS_N_LINEARS));
}

static int read_inputs(merge_job *j) {
    char *carried = rs_path_join(j->q_dir, RS_ADAPTER_FILE);
    int has = rs_path_exists(carried);
    free(carried);
    if (has) /* its tensors alone are not the model it stands for */
        return RS_FAIL("%s already carries an adapter (%s, from merge --mode adapter): merge into "
                       "the quantized model it was made from", j->q_dir, RS_ADAPTER_FILE);
    RS_TRY(rs_hf_config_load(j->q_dir, &j->cfg));
    RS_TRY(rs_st_open(j->q_dir, &j->set));
    const char *qjson = rs_qconfig_of(&j->set);
    char file[1024];
    snprintf(file, sizeof file, "%s/model.safetensors", j->q_dir);
    if (!qjson)
        return RS_FAIL("%s: not a quantized model directory (no %s): merge folds into quantized "
                       "weights", j->q_dir, RS_QCONFIG_KEY);
    RS_TRY(rs_qconfig_parse(file, qjson, &j->spec, j->method, sizeof j->method));
    j->n_lin = j->cfg.n_layers * RS_N_LINEARS;
    j->q0 = rs_calloc((size_t)j->n_lin, sizeof *j->q0);
    j->q1 = rs_calloc((size_t)j->n_lin, sizeof *j->q1);
    for (int i = 0; i < j->n_lin; i++) {
        char name[128];
        int out, in, used;
        linear_name(name, sizeof name, i);
        rs_linear_shape(&j->cfg, i % RS_N_LINEARS, &out, &in);
        RS_TRY(rs_qweight_read(&j->set, file, name, &j->spec, out, in, &j->q0[i], &used));
    }
    RS_TRY(rs_adapter_load_for(j->adapter_path, &j->cfg, rs_backend_cpu(), &j->ad));
    j->have_ad = 1;
    return 0;
}

static void free_job(merge_job *j) {
    for (int i = 0; j->q0 && i < j->n_lin; i++) rs_qweight_free(&j->q0[i]);
    for (int i = 0; j->q1 && i < j->n_lin; i++) rs_qweight_free(&j->q1[i]);
    free(j->q0), free(j->q1);
    if (j->have_ad) rs_lora_free(&j->ad);
    rs_st_close(&j->set);
}

/* ---------------------------------------------------------------- folding */

static int fold_all(merge_job *j, rs_merge_mode mode, rs_merge_stats *st) {
    rs_merge_sums s = {0};
    for (int i = 0; i < j->n_lin; i++) {
        const rs_lora_linear *lin = &j->ad.lin[i];
        if (lin->in == 0 && mode == RS_MERGE_EXACT && j->spec.symmetric) {
            /* one spec per file: exact makes a symmetric format asymmetric for every linear */
            RS_TRY(rs_merge_exact_supported(&j->q0[i], "the model"));
            double *zero = rs_calloc((size_t)j->q0[i].rows * j->q0[i].cols, sizeof *zero);
            int rc = rs_merge_fold(mode, &j->q0[i], zero, &j->q1[i]);
            free(zero);
            RS_TRY(rc);
        }
        if (lin->in == 0) continue;
        char name[128];
        linear_name(name, sizeof name, i);
        if (mode == RS_MERGE_EXACT) RS_TRY(rs_merge_exact_supported(&j->q0[i], name));
        double *delta = rs_malloc((size_t)lin->out * lin->in * sizeof *delta);
        rs_adapter_delta(&j->ad, lin, delta);
        int rc = 0;
        if (mode == RS_MERGE_ADAPTER) {
            for (size_t k = 0; k < (size_t)lin->out * lin->in; k++) s.dd += delta[k] * delta[k];
        } else {
            rc = rs_merge_fold(mode, &j->q0[i], delta, &j->q1[i]);
            if (rc == 0) rs_merge_accumulate(&j->q0[i], &j->q1[i], delta, &s);
            if (rc != 0) rs_fail_context("%s", name);
        }
        free(delta);
        RS_TRY(rc);
    }
    if (mode == RS_MERGE_ADAPTER) s.rd = s.dd; /* the adapter is kept as it is */
    st->delta_norm = sqrt(s.dd);
    /* a zero delta (tau = 0: nothing trained) loses nothing */
    st->kept_fraction = s.dd > 0 ? s.rd / s.dd : 1.0;
    st->rel_error = s.dd > 0 ? sqrt(s.ee / s.dd) : 0.0;
    st->n_codes_changed = s.codes_changed;
    return 0;
}

/* ---------------------------------------------------------------- output */

static void add_tensor(rs_st_write_tensor *t, int *n, char **names, const char *base,
                       const char *part, rs_dtype dt, int64_t d0, int64_t d1, const void *data) {
    char buf[300];
    snprintf(buf, sizeof buf, "%s.%s", base, part);
    names[*n] = rs_strdup(buf);
    rs_st_write_tensor *x = &t[(*n)++];
    memset(x, 0, sizeof *x);
    x->name = names[*n - 1];
    x->dtype = dt;
    x->ndim = d1 < 0 ? 1 : 2;
    x->shape[0] = d0;
    x->shape[1] = d1 < 0 ? 0 : d1;
    x->data = data;
}

static int add_qweight(rs_st_write_tensor *t, int *n, char **names, const char *base,
                       const rs_qweight *q) {
    int64_t rb = (int64_t)rs_qpack_row_bytes(q->cols, q->spec.bits);
    add_tensor(t, n, names, base, "qweight", RS_U8, q->rows, rb, q->packed);
    add_tensor(t, n, names, base, "scales", RS_F32, q->rows, q->n_groups, q->scales);
    if (q->zeros) add_tensor(t, n, names, base, "zeros", RS_F32, q->rows, q->n_groups, q->zeros);
    if (q->input_scale)
        add_tensor(t, n, names, base, "input_scale", RS_F32, q->cols, -1, q->input_scale);
    if (q->n_outlier_cols) {
        add_tensor(t, n, names, base, "outlier_cols", RS_I32, q->n_outlier_cols, -1,
                   q->outlier_cols);
        add_tensor(t, n, names, base, "outlier_vals", RS_F16, q->rows, q->n_outlier_cols,
                   q->outlier_vals);
    }
    if (q->crit_row_ptr) {
        add_tensor(t, n, names, base, "crit_row_ptr", RS_I64, q->rows + 1, -1, q->crit_row_ptr);
        add_tensor(t, n, names, base, "crit_cols", RS_I32, q->n_critical, -1, q->crit_cols);
        add_tensor(t, n, names, base, "crit_vals", RS_F16, q->n_critical, -1, q->crit_vals);
    }
    return 0;
}

/* Which linear a tensor name belongs to ("model.layers.3.mlp.up_proj.scales" -> 3*7+5), or -1. */
static int owner_linear(const merge_job *j, const char *name) {
    int layer, at = 0;
    if (sscanf(name, "model.layers.%d.%n", &layer, &at) != 1 || at == 0 || layer < 0 ||
        layer >= j->cfg.n_layers)
        return -1;
    for (int i = 0; i < RS_N_LINEARS; i++) {
        size_t len = strlen(rs_linear_name(i));
        if (strncmp(name + at, rs_linear_name(i), len) == 0 && name[at + len] == '.')
            return layer * RS_N_LINEARS + i;
    }
    return -1;
}

/* model.safetensors: q_dir's tensors, with the merged linears' quantized tensors replaced. */
static int write_tensors(const merge_job *j, const char *path) {
    int cap = j->set.n_tensors + 9 * j->n_lin, n = 0;
    rs_st_write_tensor *t = rs_calloc((size_t)cap, sizeof *t);
    char **names = rs_calloc((size_t)cap, sizeof *names);
    const rs_qspec *spec = &j->spec;
    for (int i = 0; i < j->set.n_tensors; i++) {
        const rs_st_tensor *s = &j->set.tensors[i];
        int o = owner_linear(j, s->name);
        if (o >= 0 && j->q1[o].packed) continue;
        rs_st_write_tensor *x = &t[n++];
        x->name = s->name, x->dtype = s->dtype, x->ndim = s->ndim;
        memcpy(x->shape, s->shape, sizeof x->shape);
        x->data = s->data;
    }
    for (int i = 0; i < j->n_lin; i++) {
        if (!j->q1[i].packed) continue;
        char base[128];
        linear_name(base, sizeof base, i);
        add_qweight(t, &n, names, base, &j->q1[i]);
        spec = &j->q1[i].spec; /* exact on a symmetric format: now asymmetric */
    }
    char *qjson = rs_qconfig_json(spec, j->method);
    const char **keys = rs_calloc((size_t)j->set.n_meta + 1, sizeof *keys);
    const char **vals = rs_calloc((size_t)j->set.n_meta + 1, sizeof *vals);
    int n_meta = 0;
    for (int i = 0; i < j->set.n_meta; i++) {
        keys[n_meta] = j->set.meta_keys[i];
        int is_q = strcmp(j->set.meta_keys[i], RS_QCONFIG_KEY) == 0;
        vals[n_meta++] = is_q ? qjson : j->set.meta_values[i];
    }
    int rc = rs_st_write(path, t, n, keys, vals, n_meta);
    for (int i = 0; i < cap; i++) free(names[i]);
    free(names), free(t), free(qjson), free(keys), free(vals);
    return rc;
}

static cJSON *stats_json(const merge_job *j, rs_merge_mode mode, const rs_merge_stats *st) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "mode", rs_merge_mode_name(mode));
    cJSON_AddNumberToObject(o, "delta_norm", st->delta_norm);
    cJSON_AddNumberToObject(o, "kept_fraction", st->kept_fraction);
    cJSON_AddNumberToObject(o, "rel_error", st->rel_error);
    cJSON_AddNumberToObject(o, "n_codes_changed", (double)st->n_codes_changed);
    cJSON_AddStringToObject(o, "adapter", j->adapter_path);
    cJSON_AddStringToObject(o, "base", j->q_dir);
    cJSON_AddBoolToObject(o, "group_constant", j->ad.group_constant);
    return o;
}

static int write_json(const char *dir, const char *name, cJSON *o) {
    char *text = cJSON_Print(o), *path = rs_path_join(dir, name);
    int rc = rs_write_file_atomic(path, text, strlen(text));
    cJSON_free(text);
    free(path);
    return rc;
}

/* q_dir's resafe_manifest.json (when it has one) with "merge" added. */
static int write_manifest(const merge_job *j, const char *dir, rs_merge_mode mode,
                          const rs_merge_stats *st) {
    char *src = rs_path_join(j->q_dir, "resafe_manifest.json"), *text = NULL;
    size_t size;
    int rc = 0;
    if (rs_path_exists(src)) {
        rc = rs_read_file(src, &text, &size);
        cJSON *man = rc == 0 ? cJSON_ParseWithLength(text, size) : NULL;
        if (rc == 0 && !cJSON_IsObject(man)) rc = RS_FAIL("%s: not a JSON object", src);
        char hex[65];
        if (rc == 0) rc = rs_sha256_file(j->adapter_path, hex);
        if (rc == 0) {
            cJSON *m = stats_json(j, mode, st);
            cJSON_AddStringToObject(m, "adapter_sha256", hex);
            cJSON_DeleteItemFromObject(man, "merge");
            cJSON_AddItemToObject(man, "merge", m);
            rc = write_json(dir, "resafe_manifest.json", man);
        }
        cJSON_Delete(man);
        free(text);
    }
    free(src);
    return rc;
}

static int write_output(const merge_job *j, rs_merge_mode mode, const char *tmp,
                        const rs_merge_stats *st) {
    RS_TRY(rs_mkdir_p(tmp));
    char *st_path = rs_path_join(tmp, "model.safetensors");
    int rc;
    if (mode == RS_MERGE_ADAPTER) {
        char *src = rs_path_join(j->q_dir, "model.safetensors");
        char *ad = rs_path_join(tmp, RS_ADAPTER_FILE);
        rc = rs_copy_file(src, st_path);
        if (rc == 0) rc = rs_copy_file(j->adapter_path, ad);
        free(src), free(ad);
    } else {
        rc = write_tensors(j, st_path);
    }
    free(st_path);
    if (rc == 0) rc = rs_copy_model_side_files(j->q_dir, tmp);
    if (rc == 0) rc = write_manifest(j, tmp, mode, st);
    if (rc == 0) {
        cJSON *o = stats_json(j, mode, st);
        rc = write_json(tmp, "merge_stats.json", o);
        cJSON_Delete(o);
    }
    return rc;
}

int rs_merge_run(const rs_config *cfg, const char *q_dir, const char *adapter_path,
                 rs_merge_mode mode, const char *out_dir, rs_merge_stats *st) {
    (void)cfg;
    memset(st, 0, sizeof *st);
    merge_job j;
    memset(&j, 0, sizeof j);
    j.q_dir = q_dir, j.adapter_path = adapter_path;
    int rc = read_inputs(&j);
    if (rc == 0 && mode == RS_MERGE_EXACT && !j.ad.group_constant)
        rs_warn("merge exact: %s was not trained group-constant: only its mean over each "
                "quantization group survives (see kept_fraction)", adapter_path);
    if (rc == 0) rc = fold_all(&j, mode, st);
    char *tmp = rs_tmp_name(out_dir);
    if (rc == 0) rc = write_output(&j, mode, tmp, st);
    if (rc == 0) rc = rs_replace_dir(tmp, out_dir);
    if (rc != 0) rs_remove_tree(tmp);
    free(tmp);
    free_job(&j);
    return rc;
}
