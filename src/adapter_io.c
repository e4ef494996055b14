/* adapter_io: LoRA adapters in HDF5 (save, load) and in PEFT's safetensors format (export).
 * Layouts in include/resafe/checkpoint.h. */
#include "resafe/checkpoint.h"

#include <cJSON.h>
#include <errno.h>
#include <ftw.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "resafe/safetensors.h"

const char *rs_mask_mode_name(rs_mask_mode mode) {
    static const char *names[] = {"none", "factor", "elementwise"};
    return (unsigned)mode < 3 ? names[mode] : "?";
}

static int mask_mode_from_name(const char *name, rs_mask_mode *out) {
    for (int i = 0; i < 3; i++)
        if (strcmp(name, rs_mask_mode_name((rs_mask_mode)i)) == 0) return *out = (rs_mask_mode)i, 0;
    return -1;
}

char *rs_lora_targets_string(unsigned targets) {
    char buf[128] = "";
    for (int t = 0; t < RS_LORA_N_TARGETS; t++)
        if (targets & (1u << t)) {
            if (buf[0]) strcat(buf, ",");
            strcat(buf, rs_lora_target_name((rs_lora_target)t));
        }
    return rs_strdup(buf);
}

/* ---------------------------------------------------------------- tensors */

/* One device buffer through a host copy into dataset group/layers.<l>.<target>/<name>. */
static int write_one(rs_h5 *h, const rs_lora *l, const char *group, int layer, int t,
                     const char *name, rs_dtype dtype, const void *dev, int64_t d0, int64_t d1) {
    char path[256];
    snprintf(path, sizeof path, "%s/layers.%d.%s/%s", group, layer,
             rs_lora_target_name((rs_lora_target)t), name);
    size_t bytes = (size_t)d0 * (size_t)d1 * rs_dtype_size(dtype);
    void *host = rs_malloc(bytes ? bytes : 1);
    l->be->to_host(host, dev, bytes);
    int64_t shape[2] = {d0, d1};
    int rc = rs_h5_write(h, path, dtype, 2, shape, host);
    free(host);
    return rc;
}

static int read_one(rs_h5 *h, const rs_lora *l, const char *group, int layer, int t,
                    const char *name, rs_dtype dtype, void *dev, int64_t d0, int64_t d1) {
    char path[256];
    snprintf(path, sizeof path, "%s/layers.%d.%s/%s", group, layer,
             rs_lora_target_name((rs_lora_target)t), name);
    size_t bytes = (size_t)d0 * (size_t)d1 * rs_dtype_size(dtype);
    void *host = rs_malloc(bytes ? bytes : 1);
    int64_t shape[2] = {d0, d1};
    int rc = rs_h5_read(h, path, dtype, 2, shape, host);
    if (rc == 0) l->be->to_device(dev, host, bytes);
    free(host);
    return rc;
}

typedef int (*tensor_io)(rs_h5 *, const rs_lora *, const char *, int, int, const char *, rs_dtype,
                         void *, int64_t, int64_t);

/* Apply io to every tensor of every targeted linear. */
static int each_tensor(rs_h5 *h, const char *group, const rs_lora *l, int with_factors,
                       int with_masks, tensor_io io) {
    int r = l->rank;
    for (int layer = 0; layer < l->n_layers; layer++)
        for (int t = 0; t < RS_LORA_N_TARGETS; t++) {
            rs_lora_linear *lin = &l->lin[layer * RS_LORA_N_TARGETS + t];
            if (lin->in == 0) continue;
            if (with_factors) {
                RS_TRY(io(h, l, group, layer, t, "A", RS_F32, lin->A, r, lin->in));
                RS_TRY(io(h, l, group, layer, t, "B", RS_F32, lin->B, lin->out, r));
            }
            if (!with_masks) continue;
            if (l->mask_mode == RS_MASK_FACTOR) {
                RS_TRY(io(h, l, group, layer, t, "mask_A", RS_U8, lin->mask_A, r, lin->in));
                RS_TRY(io(h, l, group, layer, t, "mask_B", RS_U8, lin->mask_B, lin->out, r));
            } else if (l->mask_mode == RS_MASK_ELEMENTWISE) {
                RS_TRY(io(h, l, group, layer, t, "mask_W", RS_U8, lin->mask_W, lin->out, lin->in));
            }
        }
    return 0;
}

static int write_io(rs_h5 *h, const rs_lora *l, const char *g, int layer, int t, const char *name,
                    rs_dtype dtype, void *dev, int64_t d0, int64_t d1) {
    return write_one(h, l, g, layer, t, name, dtype, dev, d0, d1);
}

int rs_adapter_write_tensors(rs_h5 *h, const char *group, const rs_lora *l, int with_factors,
                             int with_masks) {
    return each_tensor(h, group, l, with_factors, with_masks, write_io);
}

int rs_adapter_read_tensors(rs_h5 *h, const char *group, rs_lora *l, int with_factors,
                            int with_masks) {
    return each_tensor(h, group, l, with_factors, with_masks, read_one);
}

/* ---------------------------------------------------------------- adapter files */

int rs_adapter_save(const char *path, const rs_lora *l, uint64_t config_hash,
                    const char *base_model) {
    rs_h5 *h;
    RS_TRY(rs_h5_create(path, &h));
    char hash[32], *targets = rs_lora_targets_string(l->targets);
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)config_hash);
    int rc = rs_h5_set_attr_i64(h, NULL, "format", 1);
    if (rc == 0) rc = rs_h5_set_attr_i64(h, NULL, "rank", l->rank);
    if (rc == 0) rc = rs_h5_set_attr_f64(h, NULL, "alpha", l->alpha);
    if (rc == 0) rc = rs_h5_set_attr_f64(h, NULL, "dropout", l->dropout);
    if (rc == 0) rc = rs_h5_set_attr_str(h, NULL, "targets", targets);
    if (rc == 0) rc = rs_h5_set_attr_str(h, NULL, "mask_mode", rs_mask_mode_name(l->mask_mode));
    if (rc == 0) rc = rs_h5_set_attr_str(h, NULL, "config_hash", hash);
    if (rc == 0) rc = rs_h5_set_attr_str(h, NULL, "base_model", base_model ? base_model : "");
    if (rc == 0) rc = rs_h5_set_attr_i64(h, NULL, "group_constant", l->group_constant != 0);
    if (rc == 0)
        rc = rs_h5_set_attr_i64(h, NULL, "group_size", l->group_constant ? l->group_size : 0);
    if (rc == 0) rc = rs_adapter_write_tensors(h, "lora", l, 1, 1);
    free(targets);
    if (rc != 0) {
        rs_h5_close(h);
        return -1;
    }
    return rs_h5_commit(h);
}

/* Optional attributes group_constant, group_size (older files: absent = 0). */
static int read_group_info(rs_h5 *h, const char *path, rs_adapter_info *info) {
    int64_t gc = 0, gs = 0;
    info->group_constant = info->group_size = 0;
    if (rs_h5_has_attr(h, NULL, "group_constant") == 1)
        RS_TRY(rs_h5_get_attr_i64(h, NULL, "group_constant", &gc));
    if (rs_h5_has_attr(h, NULL, "group_size") == 1)
        RS_TRY(rs_h5_get_attr_i64(h, NULL, "group_size", &gs));
    if ((gc != 0 && gc != 1) || gs < 0 || gs > (1 << 30))
        return RS_FAIL("%s: attributes group_constant = %lld, group_size = %lld are out of range",
                       path, (long long)gc, (long long)gs);
    info->group_constant = (int)gc, info->group_size = (int)gs;
    return 0;
}

static int read_info(rs_h5 *h, const char *path, rs_adapter_info *info) {
    int64_t rank;
    double alpha, dropout;
    char *targets = NULL, *mode = NULL;
    int rc = rs_h5_get_attr_i64(h, NULL, "rank", &rank);
    if (rc == 0) rc = rs_h5_get_attr_f64(h, NULL, "alpha", &alpha);
    if (rc == 0) rc = rs_h5_get_attr_f64(h, NULL, "dropout", &dropout);
    if (rc == 0) rc = rs_h5_get_attr_str(h, NULL, "targets", &targets);
    if (rc == 0) rc = rs_h5_get_attr_str(h, NULL, "mask_mode", &mode);
    if (rc == 0 && (rank < 1 || rank > 65536))
        rc = RS_FAIL("%s: attribute rank = %lld is out of range 1..65536", path, (long long)rank);
    if (rc == 0 && !(alpha > 0 && alpha < 1e9))
        rc = RS_FAIL("%s: attribute alpha = %g is not a positive number", path, alpha);
    if (rc == 0 && !(dropout >= 0 && dropout < 1))
        rc = RS_FAIL("%s: attribute dropout = %g is not in [0, 1)", path, dropout);
    if (rc == 0 && rs_lora_parse_targets(targets, &info->targets) != 0)
        rc = rs_fail_context("%s: attribute targets", path);
    if (rc == 0 && mask_mode_from_name(mode, &info->mask_mode) != 0)
        rc = RS_FAIL("%s: attribute mask_mode = '%s' is not none, factor or elementwise", path,
                     mode);
    if (rc == 0) info->rank = (int)rank, info->alpha = (float)alpha, info->dropout = (float)dropout;
    if (rc == 0) rc = read_group_info(h, path, info);
    free(targets), free(mode);
    return rc;
}

int rs_adapter_info_read(const char *path, rs_adapter_info *info) {
    rs_h5 *h;
    RS_TRY(rs_h5_open(path, &h));
    int rc = read_info(h, path, info);
    rs_h5_close(h);
    return rc;
}

int rs_adapter_load(const char *path, rs_lora *l) {
    rs_h5 *h;
    RS_TRY(rs_h5_open(path, &h));
    rs_adapter_info info;
    int rc = read_info(h, path, &info);
    if (rc == 0 && (info.rank != l->rank || info.targets != l->targets ||
                    info.mask_mode != l->mask_mode))
        rc = RS_FAIL("%s: adapter has rank %d, %s mask, targets %#x; expected rank %d, %s mask, "
                     "targets %#x",
                     path, info.rank, rs_mask_mode_name(info.mask_mode), info.targets, l->rank,
                     rs_mask_mode_name(l->mask_mode), l->targets);
    if (rc == 0) rc = rs_adapter_read_tensors(h, "lora", l, 1, 1);
    if (rc == 0) l->group_constant = info.group_constant, l->group_size = info.group_size;
    rs_h5_close(h);
    return rc;
}

/* ---------------------------------------------------------------- directories */

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

int rs_remove_tree(const char *path) {
    if (!rs_path_exists(path)) return 0;
    if (nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
        return RS_FAIL("%s: cannot remove: %s", path, strerror(errno));
    return 0;
}

int rs_replace_dir(const char *tmp, const char *dir) {
    char *old = NULL;
    if (rs_path_exists(dir)) {
        old = rs_tmp_name(dir);
        if (rename(dir, old) != 0) {
            RS_FAIL("%s: cannot move the previous output aside: %s", dir, strerror(errno));
            free(old);
            return -1;
        }
    }
    int rc = 0;
    if (rename(tmp, dir) != 0) {
        rc = RS_FAIL("%s: cannot move %s into place: %s", dir, tmp, strerror(errno));
        if (old) rename(old, dir);
    } else if (old) {
        rc = rs_remove_tree(old);
    }
    free(old);
    return rc;
}

/* ---------------------------------------------------------------- PEFT export */

static const char *module_of(rs_lora_target t) { return t <= RS_LORA_O ? "self_attn" : "mlp"; }

static char *peft_config_json(const rs_lora *l, const char *base_model) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "peft_type", "LORA");
    cJSON_AddStringToObject(o, "task_type", "CAUSAL_LM");
    cJSON_AddNumberToObject(o, "r", l->rank);
    cJSON_AddNumberToObject(o, "lora_alpha", l->alpha);
    cJSON_AddNumberToObject(o, "lora_dropout", l->dropout);
    cJSON *mods = cJSON_AddArrayToObject(o, "target_modules");
    for (int t = 0; t < RS_LORA_N_TARGETS; t++)
        if (l->targets & (1u << t))
            cJSON_AddItemToArray(mods, cJSON_CreateString(rs_lora_target_name((rs_lora_target)t)));
    cJSON_AddStringToObject(o, "bias", "none");
    cJSON_AddBoolToObject(o, "fan_in_fan_out", 0);
    cJSON_AddBoolToObject(o, "inference_mode", 1);
    cJSON_AddBoolToObject(o, "use_rslora", 0);
    cJSON_AddBoolToObject(o, "init_lora_weights", 1);
    cJSON_AddStringToObject(o, "base_model_name_or_path", base_model ? base_model : "");
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    return text;
}

/* The factors on the host, named as PEFT names them. */
static int peft_tensors(const rs_lora *l, rs_st_write_tensor **out, int *n_out) {
    int n = 0, cap = 2 * l->n_layers * RS_LORA_N_TARGETS;
    rs_st_write_tensor *ts = rs_calloc((size_t)(cap ? cap : 1), sizeof *ts);
    for (int layer = 0; layer < l->n_layers; layer++)
        for (int t = 0; t < RS_LORA_N_TARGETS; t++) {
            const rs_lora_linear *lin = &l->lin[layer * RS_LORA_N_TARGETS + t];
            if (lin->in == 0) continue;
            for (int f = 0; f < 2; f++) {
                rs_st_write_tensor *x = &ts[n++];
                char name[160];
                rs_lora_target tt = (rs_lora_target)t;
                snprintf(name, sizeof name, "base_model.model.model.layers.%d.%s.%s.lora_%c.weight",
                         layer, module_of(tt), rs_lora_target_name(tt), f ? 'B' : 'A');
                x->name = rs_strdup(name);
                x->dtype = RS_F32, x->ndim = 2;
                x->shape[0] = f ? lin->out : l->rank;
                x->shape[1] = f ? l->rank : lin->in;
                size_t bytes = (size_t)x->shape[0] * (size_t)x->shape[1] * sizeof(float);
                void *host = rs_malloc(bytes);
                l->be->to_host(host, f ? lin->B : lin->A, bytes);
                x->data = host;
            }
        }
    *out = ts, *n_out = n;
    return 0;
}

int rs_adapter_export_peft(const char *dir, const rs_lora *l, const char *base_model) {
    if (l->mask_mode == RS_MASK_ELEMENTWISE)
        return RS_FAIL("%s: an elementwise-masked adapter has no PEFT form (its mask acts on B A); "
                       "merge it into the model instead",
                       dir);
    char *tmp = rs_tmp_name(dir);
    int rc = rs_mkdir_p(tmp);
    rs_st_write_tensor *ts = NULL;
    int n = 0;
    if (rc == 0) rc = peft_tensors(l, &ts, &n);
    char *st_path = rs_path_join(tmp, "adapter_model.safetensors");
    char *cfg_path = rs_path_join(tmp, "adapter_config.json");
    const char *keys[] = {"format"}, *values[] = {"pt"};
    if (rc == 0) rc = rs_st_write(st_path, ts, n, keys, values, 1);
    char *json = rc == 0 ? peft_config_json(l, base_model) : NULL;
    if (rc == 0) rc = rs_write_file_atomic(cfg_path, json, strlen(json));
    if (rc == 0) rc = rs_replace_dir(tmp, dir);
    if (rc != 0) rs_remove_tree(tmp);
    for (int i = 0; i < n; i++) free((void *)ts[i].name), free((void *)ts[i].data);
    free(ts), free(st_path), free(cfg_path), free(tmp);
    if (json) cJSON_free(json);
    return rc;
}
