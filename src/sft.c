/* sft: full-parameter supervised fine-tuning (`resafe sft`), optionally quantization-aware.
 *
 * Loss: mean NLL over the response tokens of a batch (prompt tokens carry no loss), i.e. each
 * sequence's d loss / d seq_logp = -1 / (response tokens in the whole batch), so gradient
 * accumulation over micro-batches gives exactly the full batch's gradient.
 * QAT (LLM-QAT style, straight-through): the optimizer owns fp32 master copies of the linear
 * weights; before every step the model's weights are fake_quant_rows(master) (RTN's INT grid, per
 * row or per qat_group_size columns of a row: the [rows * cols / G, G] view), the forward and
 * backward run on them, and the gradient (taken w.r.t. the quantized weight) updates the master.
 * qat_act_bits / qat_kv_bits add fake quantization of the linears' inputs and of K, V in the
 * training forward (rs_train_state_set_fake_quant), independent of the weights' qat.
 * Mixed precision (a backend whose weights are not fp32, e.g. cuda's bf16): every trained tensor
 * gets an fp32 master read from the model files; the optimizer steps the masters, gradients are
 * fp32 (the backward ops accumulate in fp32), and before every step each weight is refreshed
 * from its master: cast_f32_to_weight, or fake_quant_rows for a QAT linear. On cpu (fp32
 * weights) only QAT linears have masters, so its numbers are those of plain fp32 training.
 * Output: a Hugging Face directory with the master weights (config and tokenizer files copied
 * from the input model), written at a temporary name and renamed. */
#include "resafe/checkpoint.h"
#include "resafe/train.h"

#include <cJSON.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/h5store.h"
#include "resafe/safetensors.h"

/* ---------------------------------------------------------------- options */

typedef struct {
    const char *model_dir, *data_file, *prompt_key, *response_key, *system;
    char *stage_dir, *output_dir, *ckpt_path, *metrics_path;
    rs_lr_schedule sched;
    int batch_size, micro, epochs, max_steps, max_seq_len, checkpoint_every, recompute;
    int linears_only;        /* [sft] trainable = linears */
    const char *freeze_mask; /* [sft] freeze_mask: HDF5 uint8 masks per tensor, or "" */
    double weight_decay, beta2, grad_clip;
    int qat, qat_bits, qat_symmetric, qat_group, qat_act_bits, qat_kv_bits;
    const char *restart_hint; /* rs_sft_run_once */
    uint64_t seed, config_hash, data_hash;
} sft_options;

static const char *const g_sft_sections[] = {"sft", NULL};

static void free_options(sft_options *o) {
    free(o->stage_dir), free(o->output_dir), free(o->ckpt_path), free(o->metrics_path);
}

static int read_options(const rs_config *cfg, sft_options *o) {
    memset(o, 0, sizeof *o);
    o->model_dir = rs_config_get_str(cfg, "model", "path");
    o->data_file = rs_config_get_str(cfg, "sft", "data_file");
    if (!o->model_dir[0]) return RS_FAIL("resafe sft: [model] path is not set");
    if (!o->data_file[0]) return RS_FAIL("resafe sft: [sft] data_file is not set");
    o->prompt_key = rs_config_get_str(cfg, "sft", "prompt_key");
    o->response_key = rs_config_get_str(cfg, "sft", "response_key");
    o->system = rs_config_get_str(cfg, "sft", "system_prompt");
    if (!o->system[0]) o->system = NULL;
    o->stage_dir = rs_path_join(rs_config_get_str(cfg, "run", "out_dir"), "sft");
    const char *out = rs_config_get_str(cfg, "sft", "output_dir");
    o->output_dir = out[0] ? rs_strdup(out) : rs_path_join(o->stage_dir, "model");
    o->ckpt_path = rs_path_join(o->stage_dir, "checkpoint.h5");
    o->metrics_path = rs_path_join(o->stage_dir, "metrics.jsonl");
    rs_sched_kind_from_name(rs_config_get_str(cfg, "sft", "schedule"), &o->sched.kind);
    o->sched.lr = rs_config_get_float(cfg, "sft", "lr");
    o->sched.warmup_steps = (int)rs_config_get_int(cfg, "sft", "warmup_steps");
    o->batch_size = (int)rs_config_get_int(cfg, "sft", "batch_size");
    o->micro = (int)rs_config_get_int(cfg, "sft", "micro_batch_size");
    if (o->micro == 0 || o->micro > o->batch_size) o->micro = o->batch_size;
    o->epochs = (int)rs_config_get_int(cfg, "sft", "epochs");
    o->max_steps = (int)rs_config_get_int(cfg, "sft", "max_steps");
    o->max_seq_len = (int)rs_config_get_int(cfg, "sft", "max_seq_len");
    o->weight_decay = rs_config_get_float(cfg, "sft", "weight_decay");
    o->linears_only = strcmp(rs_config_get_str(cfg, "sft", "trainable"), "linears") == 0;
    o->freeze_mask = rs_config_get_str(cfg, "sft", "freeze_mask");
    o->beta2 = rs_config_get_float(cfg, "sft", "adam_beta2");
    o->grad_clip = rs_config_get_float(cfg, "sft", "grad_clip");
    o->qat = rs_config_get_bool(cfg, "sft", "qat");
    o->qat_bits = (int)rs_config_get_int(cfg, "sft", "qat_bits");
    o->qat_symmetric = rs_config_get_bool(cfg, "sft", "qat_symmetric");
    o->qat_group = (int)rs_config_get_int(cfg, "sft", "qat_group_size");
    o->qat_act_bits = (int)rs_config_get_int(cfg, "sft", "qat_act_bits");
    o->qat_kv_bits = (int)rs_config_get_int(cfg, "sft", "qat_kv_bits");
    if (o->qat_act_bits == 1 || o->qat_kv_bits == 1)
        return RS_FAIL("resafe sft: [sft] qat_act_bits = %d, qat_kv_bits = %d: each is 0 (off) or "
                       "2..8",
                       o->qat_act_bits, o->qat_kv_bits);
    o->checkpoint_every = (int)rs_config_get_int(cfg, "run", "checkpoint_every");
    RS_TRY(rs_train_recompute_of_config(cfg, &o->recompute));
    o->seed = (uint64_t)rs_config_get_int(cfg, "run", "seed");
    o->config_hash = rs_config_hash(cfg, g_sft_sections);
    RS_TRY(rs_file_hash(o->data_file, &o->data_hash));
    if (o->freeze_mask[0]) { /* a changed mask file makes a checkpoint not resume, as data does */
        uint64_t h;
        RS_TRY(rs_file_hash(o->freeze_mask, &h));
        o->data_hash = o->data_hash * 1000003u ^ h;
    }
    return 0;
}

/* ---------------------------------------------------------------- data */

/* ---------------------------------------------------------------- parameters */

/* One trainable tensor: its HF name, the model's weight (weight dtype), its gradient, and (QAT
 * linears; every tensor in mixed precision) its fp32 master. */
typedef struct {
    char name[96];
    void *w;
    float *g, *master;
    int rows, cols; /* cols 0: a vector */
    int linear;     /* one of the seven projections (QAT quantizes these) */
    uint8_t *mask;  /* [sft] freeze_mask's entries for it (device; NULL: all trained) */
    float *box;     /* its bounds from a float32 freeze_mask dataset (device, the n lower bounds
                     * then the n upper; NULL: none): the update is clamped into them */
} sft_tensor;

typedef struct {
    sft_tensor *t;
    int n, cap;
} tensor_list;

RS_PRINTF(6, 7)
static void add_tensor(tensor_list *l, void *w, float *g, int rows, int cols, const char *fmt,
                       ...) {
    if (!w) return; /* absent bias */
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->t = rs_realloc(l->t, (size_t)l->cap * sizeof *l->t);
    }
    sft_tensor *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->w = w, t->g = g, t->rows = rows, t->cols = cols;
    t->linear = strstr(t->name, "_proj.weight") != NULL;
}

/* Every parameter of the model with its gradient, named as in the checkpoint it came from. */
static void list_tensors(rs_model *m, rs_model_grads *g, tensor_list *l) {
    const rs_model_config *c = &m->cfg;
    int D = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    int Q = c->n_heads * c->head_dim, KV = c->n_kv_heads * c->head_dim;
    add_tensor(l, m->embed, g->embed, V, D, "model.embed_tokens.weight");
    for (int i = 0; i < c->n_layers; i++) {
        rs_layer_weights *w = &m->layers[i];
        rs_layer_grads *d = &g->layers[i];
        const char *p = "model.layers";
        add_tensor(l, w->attn_norm, d->attn_norm, D, 0, "%s.%d.input_layernorm.weight", p, i);
        add_tensor(l, w->wq, d->wq, Q, D, "%s.%d.self_attn.q_proj.weight", p, i);
        add_tensor(l, w->wk, d->wk, KV, D, "%s.%d.self_attn.k_proj.weight", p, i);
        add_tensor(l, w->wv, d->wv, KV, D, "%s.%d.self_attn.v_proj.weight", p, i);
        add_tensor(l, w->wo, d->wo, D, Q, "%s.%d.self_attn.o_proj.weight", p, i);
        add_tensor(l, w->bq, d->bq, Q, 0, "%s.%d.self_attn.q_proj.bias", p, i);
        add_tensor(l, w->bk, d->bk, KV, 0, "%s.%d.self_attn.k_proj.bias", p, i);
        add_tensor(l, w->bv, d->bv, KV, 0, "%s.%d.self_attn.v_proj.bias", p, i);
        add_tensor(l, w->bo, d->bo, D, 0, "%s.%d.self_attn.o_proj.bias", p, i);
        add_tensor(l, w->mlp_norm, d->mlp_norm, D, 0, "%s.%d.post_attention_layernorm.weight", p,
                   i);
        add_tensor(l, w->w_gate, d->w_gate, F, D, "%s.%d.mlp.gate_proj.weight", p, i);
        add_tensor(l, w->w_up, d->w_up, F, D, "%s.%d.mlp.up_proj.weight", p, i);
        add_tensor(l, w->w_down, d->w_down, D, F, "%s.%d.mlp.down_proj.weight", p, i);
        add_tensor(l, w->b_gate, d->b_gate, F, 0, "%s.%d.mlp.gate_proj.bias", p, i);
        add_tensor(l, w->b_up, d->b_up, F, 0, "%s.%d.mlp.up_proj.bias", p, i);
        add_tensor(l, w->b_down, d->b_down, D, 0, "%s.%d.mlp.down_proj.bias", p, i);
    }
    add_tensor(l, m->final_norm, g->final_norm, D, 0, "model.norm.weight");
    if (!c->tie_word_embeddings) add_tensor(l, m->lm_head, g->lm_head, V, D, "lm_head.weight");
}

static size_t numel(const sft_tensor *t) {
    return (size_t)t->rows * (size_t)(t->cols ? t->cols : 1);
}

/* Mixed precision: the backend keeps weights in a narrower dtype than the fp32 optimizer. */
static int mixed_precision(const rs_backend *be) { return be->weight_dtype != RS_F32; }

static int has_master(const rs_backend *be, const sft_tensor *t, const sft_options *o) {
    return mixed_precision(be) || (o->qat && t->linear);
}

/* The masters of mixed precision, in fp32 from the model's files (the backend's copy was
 * already rounded to its weight dtype). */
static int read_masters(const char *model_dir, const rs_backend *be, const tensor_list *l) {
    rs_st_set set;
    RS_TRY(rs_st_open(model_dir, &set));
    int rc = 0;
    float *host = NULL;
    for (int i = 0; i < l->n && rc == 0; i++) {
        const sft_tensor *t = &l->t[i];
        const rs_st_tensor *st = rs_st_find(&set, t->name);
        if (!st) {
            rc = RS_FAIL("%s: tensor '%s' is missing", model_dir, t->name);
            break;
        }
        host = rs_realloc(host, numel(t) * sizeof *host);
        rc = rs_st_read_f32(st, host, numel(t));
        if (rc == 0) be->to_device(t->master, host, numel(t) * sizeof *host);
    }
    free(host);
    rs_st_close(&set);
    return rc;
}

/* A float32 dataset [2, shape]: lower and upper bounds per entry (lo <= hi, no NaN; lo == hi
 * freezes the entry); the mask is lo < hi, the bounds go to t->box. */
static int read_freeze_box(rs_h5 *h, const char *path, const rs_backend *be, sft_tensor *t,
                           uint8_t *host_mask, size_t *zeros) {
    size_t n = numel(t);
    int ndim = t->cols ? 3 : 2;
    int64_t shape[3] = {2, t->rows, t->cols};
    float *b = rs_malloc(2 * n * sizeof *b);
    int rc = rs_h5_read(h, t->name, RS_F32, ndim, shape, b);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (!(b[i] <= b[n + i])) {
            rc = RS_FAIL("%s: dataset '%s': entry %zu has bounds [%g, %g] (a box needs lo <= hi, "
                         "no NaN)",
                         path, t->name, i, b[i], b[n + i]);
            break;
        }
        host_mask[i] = b[i] < b[n + i];
        *zeros += b[i] == b[n + i];
    }
    if (rc == 0) {
        t->box = be->alloc(2 * n * sizeof *b);
        be->to_device(t->box, b, 2 * n * sizeof *b);
    }
    free(b);
    return rc;
}

/* t's mask from the [sft] freeze_mask file onto the device (*mask stays NULL when the file does
 * not name t); *n_frozen counts its zeros. A float32 dataset of shape [2, the tensor's] holds
 * bounds instead (read_freeze_box). */
static int read_freeze_mask(rs_h5 *h, const char *path, const rs_backend *be, sft_tensor *t,
                            uint8_t **mask, size_t *n_frozen) {
    *mask = NULL;
    int exists = rs_h5_exists(h, t->name);
    if (exists < 0) return -1;
    if (!exists) return 0;
    rs_h5_dataset info;
    RS_TRY(rs_h5_info(h, t->name, &info));
    int ndim = t->cols ? 2 : 1;
    int64_t shape[2] = {t->rows, t->cols};
    if (info.kind == RS_H5_NUMBERS && info.dtype == RS_F32 && info.ndim == ndim + 1 &&
        info.shape[0] == 2 && info.shape[1] == shape[0] &&
        (ndim == 1 || info.shape[2] == shape[1])) {
        if (!be->clamp_f32)
            return RS_FAIL("%s: dataset '%s': bounds need the clamp_f32 op, which the %s backend "
                           "lacks",
                           path, t->name, be->name);
        uint8_t *host = rs_malloc(numel(t));
        size_t zeros = 0;
        int rc = read_freeze_box(h, path, be, t, host, &zeros);
        if (rc == 0) {
            *mask = be->alloc(numel(t));
            be->to_device(*mask, host, numel(t));
            *n_frozen += zeros;
        }
        free(host);
        return rc;
    }
    if (info.kind != RS_H5_NUMBERS || info.dtype != RS_U8 || info.ndim != ndim ||
        info.shape[0] != shape[0] || (ndim == 2 && info.shape[1] != shape[1]))
        return ndim == 2 ? RS_FAIL("%s: dataset '%s': expected uint8 of shape [%lld, %lld] (the "
                                   "tensor's, or float32 bounds [2, %lld, %lld])",
                                   path, t->name, (long long)shape[0], (long long)shape[1],
                                   (long long)shape[0], (long long)shape[1])
                         : RS_FAIL("%s: dataset '%s': expected uint8 of shape [%lld] (the "
                                   "tensor's, or float32 bounds [2, %lld])",
                                   path, t->name, (long long)shape[0], (long long)shape[0]);
    uint8_t *host = rs_malloc(numel(t));
    int rc = rs_h5_read(h, t->name, RS_U8, ndim, shape, host);
    size_t zeros = 0;
    for (size_t i = 0; rc == 0 && i < numel(t); i++) {
        if (host[i] > 1) {
            rc = RS_FAIL("%s: dataset '%s': value %d at index %zu (a mask holds 0 or 1)", path,
                         t->name, host[i], i);
            break;
        }
        zeros += host[i] == 0;
    }
    if (rc == 0) {
        *mask = be->alloc(numel(t));
        be->to_device(*mask, host, numel(t));
        *n_frozen += zeros;
    }
    free(host);
    return rc;
}

/* Every dataset of the freeze_mask file must name a tensor of the model (a typo would otherwise
 * leave that tensor trained in full without a word). */
static int check_mask_names(rs_h5 *h, const char *path, const tensor_list *l) {
    rs_h5_dataset *ds;
    int n, rc = 0;
    RS_TRY(rs_h5_list(h, &ds, &n));
    for (int i = 0; i < n && rc == 0; i++) {
        int found = 0;
        for (int j = 0; j < l->n && !found; j++) found = strcmp(ds[i].path, l->t[j].name) == 0;
        if (!found)
            rc = RS_FAIL("%s: dataset '%s' names no tensor of the model", path, ds[i].path);
    }
    rs_h5_free_list(ds, n);
    return rc;
}

/* The tensor the optimizer updates: its fp32 master, or the weights themselves (fp32). */
static float *param_of(const sft_tensor *t) { return t->master ? t->master : (float *)t->w; }

/* Every loaded value inside its bounds (else the first step would jump to them). */
static int check_boxes(const rs_backend *be, const tensor_list *l, const char *path) {
    for (int i = 0; i < l->n; i++) {
        const sft_tensor *t = &l->t[i];
        if (!t->box) continue;
        size_t n = numel(t);
        float *p = rs_malloc(n * sizeof *p), *b = rs_malloc(2 * n * sizeof *b);
        be->to_host(p, param_of(t), n * sizeof *p);
        be->to_host(b, t->box, 2 * n * sizeof *b);
        size_t bad = n;
        for (size_t k = 0; k < n && bad == n; k++)
            if (!(p[k] >= b[k] && p[k] <= b[n + k])) bad = k;
        int rc = bad == n ? 0
                          : RS_FAIL("%s: dataset '%s': entry %zu is %.9g as loaded, outside its "
                                    "bounds [%.9g, %.9g]",
                                    path, t->name, bad, p[bad], b[bad], b[n + bad]);
        free(p), free(b);
        RS_TRY(rc);
    }
    return 0;
}

/* The optimizer over every trainable tensor (all, or the linears with [sft] trainable =
 * linears: the others keep their loaded values and are written back unchanged), through its
 * master where it has one (QAT linears: copied from the model; mixed precision: every tensor,
 * read from the files). Matrices decay, vectors (norms, biases) do not, as transformers'
 * Trainer does. */
static int build_optimizer(rs_model *m, tensor_list *l, const sft_options *o, rs_optim *opt,
                           void **master_block, size_t *master_bytes) {
    const rs_backend *be = m->be;
    rs_h5 *h = NULL;
    if (o->freeze_mask[0]) RS_TRY(rs_h5_open(o->freeze_mask, &h));
    size_t frozen = 0, named = 0;
    rs_optim_init(opt, be, 0.9f, (float)o->beta2, 1e-8f, (float)o->weight_decay);
    size_t bytes = 0;
    for (int i = 0; i < l->n; i++)
        if (has_master(be, &l->t[i], o)) bytes += rs_align64(numel(&l->t[i]) * sizeof(float));
    *master_block = bytes ? be->alloc(bytes) : NULL;
    *master_bytes = bytes;
    char *at = *master_block;
    for (int i = 0; i < l->n; i++) {
        sft_tensor *t = &l->t[i];
        float *p = t->w;
        if (has_master(be, t, o)) {
            t->master = (float *)at, at += rs_align64(numel(t) * sizeof(float));
            if (!mixed_precision(be)) be->copy(t->master, t->w, numel(t) * sizeof(float));
            p = t->master;
        }
        if (o->linears_only && !t->linear) continue;
        if (h && read_freeze_mask(h, o->freeze_mask, be, t, &t->mask, &frozen) != 0) {
            rs_h5_close(h);
            return -1;
        }
        named += t->mask != NULL;
        rs_optim_add(opt, t->name, p, t->g, t->mask, numel(t), t->cols > 0);
    }
    if (h) {
        int rc = check_mask_names(h, o->freeze_mask, l);
        rs_h5_close(h);
        RS_TRY(rc);
        rs_info("sft: freeze mask %s: %zu tensors masked, %zu entries kept as loaded",
                o->freeze_mask, named, frozen);
    }
    rs_optim_alloc(opt);
    RS_TRY(mixed_precision(be) ? read_masters(o->model_dir, be, l) : 0);
    return check_boxes(be, l, o->freeze_mask);
}

/* QAT groups of qat_group columns: each must lie inside one row, as RTN's groups do. */
static int check_qat_groups(const tensor_list *l, const sft_options *o) {
    if (!o->qat || o->qat_group == 0) return 0;
    for (int i = 0; i < l->n; i++) {
        const sft_tensor *t = &l->t[i];
        if (t->linear && t->cols % o->qat_group != 0)
            return RS_FAIL("qat: groups of %d columns do not divide the %d columns of %s ([sft] "
                           "qat_group_size; resafe quantize --group)",
                           o->qat_group, t->cols, t->name);
    }
    return 0;
}

/* The model's weights from the masters, before every step: fake-quantized (QAT linears) or
 * rounded to the weight dtype (mixed precision). Groups of G columns along a row are the rows
 * of the [rows * cols / G, G] view (cols % G == 0, check_qat_groups). */
static void refresh_weights(rs_model *m, const tensor_list *l, const sft_options *o) {
    for (int i = 0; i < l->n; i++) {
        const sft_tensor *t = &l->t[i];
        if (!t->master) continue;
        if (o->qat && t->linear) {
            int g = o->qat_group ? o->qat_group : t->cols;
            m->be->fake_quant_rows(t->w, t->master, (int)(numel(t) / (size_t)g), g, o->qat_bits,
                                   o->qat_symmetric);
        } else
            m->be->cast_f32_to_weight(t->w, t->master, numel(t));
    }
}

/* ---------------------------------------------------------------- output directory */

/* from_dir/name into to_dir when it exists (the optional tokenizer and config files). */
static int copy_file(const char *from_dir, const char *to_dir, const char *name) {
    char *src = rs_path_join(from_dir, name);
    int rc = rs_path_exists(src) ? rs_copy_file_into(src, to_dir, name) : 0;
    free(src);
    return rc;
}

static int write_model_dir(rs_model *m, const tensor_list *l, const sft_options *o) {
    static const char *const files[] = {"config.json", "generation_config.json", "tokenizer.json",
                                        "tokenizer_config.json", "special_tokens_map.json",
                                        "chat_template.jinja", "tokenizer.model"};
    char *tmp = rs_tmp_name(o->output_dir);
    int rc = rs_mkdir_p(tmp);
    for (size_t i = 0; rc == 0 && i < sizeof files / sizeof *files; i++)
        rc = copy_file(o->model_dir, tmp, files[i]);
    rs_st_write_tensor *ts = rs_calloc((size_t)l->n, sizeof *ts);
    for (int i = 0; i < l->n; i++) {
        const sft_tensor *t = &l->t[i];
        float *host = rs_malloc(numel(t) * sizeof *host);
        m->be->to_host(host, t->master ? t->master : t->w, numel(t) * sizeof *host);
        ts[i] = (rs_st_write_tensor){t->name, RS_F32, t->cols ? 2 : 1, {t->rows, t->cols}, host};
    }
    char *st = rs_path_join(tmp, "model.safetensors");
    const char *keys[] = {"format"}, *values[] = {"pt"};
    if (rc == 0) rc = rs_st_write(st, ts, l->n, keys, values, 1);
    if (rc == 0) rc = rs_replace_dir(tmp, o->output_dir);
    if (rc != 0) rs_remove_tree(tmp);
    for (int i = 0; i < l->n; i++) free((void *)ts[i].data);
    free(ts), free(st), free(tmp);
    return rc;
}

/* ---------------------------------------------------------------- the run */

typedef struct {
    sft_options o;
    rs_model m;
    rs_tokenizer *tok;
    rs_example_set data;
    rs_model_grads grads;
    tensor_list tensors;
    void *master_block;
    rs_optim opt;
    rs_train_state *state;
    rs_batch_buf bb;
    rs_data_order order;
    rs_metrics_log log;
    rs_checkpoint ckpt;
    int64_t step;
    double last_print;
    int32_t *batch_idx;
    const rs_seq **batch_seqs;
    float *d_logp, *logp;
} sft_run;

static int load_inputs(sft_run *r, const rs_config *cfg) {
    const sft_options *o = &r->o;
    const rs_backend *be = rs_backend_by_name(rs_config_get_str(cfg, "model", "backend"));
    if (!be) return -1;
    if (mixed_precision(be) && !be->cast_f32_to_weight)
        return RS_FAIL("resafe sft: the %s backend keeps weights in %s and has no "
                       "cast_f32_to_weight op for mixed-precision training",
                       be->name, rs_dtype_name(be->weight_dtype));
    if (o->qat && !be->fake_quant_rows)
        return RS_FAIL("resafe sft: the %s backend has no fake_quant_rows op (qat)", be->name);
    RS_TRY(rs_model_load(o->model_dir, be, &r->m));
    r->tok = rs_tokenizer_load(o->model_dir);
    if (!r->tok) return -1;
    rs_encoder enc = {r->tok, RS_CHAT_NONE, o->system, -1, o->max_seq_len};
    RS_TRY(rs_chat_kind_of_config(cfg, o->model_dir, &enc.kind));
    if (r->m.cfg.n_eos > 0) enc.eos_id = r->m.cfg.eos_token_ids[0];
    RS_TRY(rs_examples_load(o->data_file, &enc, o->prompt_key, o->response_key, &r->data));
    if (r->data.n == 0) return RS_FAIL("%s: no examples", o->data_file);
    if (r->data.n_truncated)
        rs_warn("%s: %d responses cut to max_seq_len %d tokens", o->data_file,
                r->data.n_truncated, o->max_seq_len);
    return 0;
}

/* One line of device bytes: what a run of this size needs besides the CUDA context. */
static void print_plan(const sft_run *r, size_t master_bytes) {
    const double mib = 1024.0 * 1024.0;
    const rs_backend *be = r->m.be;
    size_t optim = 0; /* the moments m and v, as rs_optim_alloc lays them out */
    for (int i = 0; i < r->opt.n_params; i++)
        optim += 2 * rs_align64(r->opt.params[i].n * sizeof(float));
    size_t mask = 0; /* [sft] freeze_mask: a byte per entry, and 8 more with bounds */
    for (int i = 0; i < r->tensors.n; i++) {
        const sft_tensor *t = &r->tensors.t[i];
        mask += (t->mask ? numel(t) : 0) + (t->box ? 2 * numel(t) * sizeof(float) : 0);
    }
    char extra[64] = "";
    if (mask) snprintf(extra, sizeof extra, ", freeze mask %.1f MiB", mask / mib);
    rs_info("sft: %s%s on %s: weights %.1f MiB (%s), fp32 masters %.1f MiB, gradients %.1f MiB, "
            "optimizer %.1f MiB, activations %.1f MiB%s%s%s",
            r->o.qat ? "QAT, " : "", mixed_precision(be) ? "mixed precision" : "fp32", be->name,
            r->m.params_bytes / mib, rs_dtype_name(be->weight_dtype), master_bytes / mib,
            r->grads.n * sizeof(float) / mib, optim / mib, rs_train_state_bytes(r->state) / mib,
            extra, r->o.qat_act_bits ? ", fake-quantized activations" : "",
            r->o.qat_kv_bits ? ", fake-quantized KV" : "");
}

static int setup(sft_run *r) {
    sft_options *o = &r->o;
    RS_TRY(rs_model_grads_init(&r->m, &r->grads));
    list_tensors(&r->m, &r->grads, &r->tensors);
    RS_TRY(check_qat_groups(&r->tensors, o));
    size_t master_bytes;
    RS_TRY(build_optimizer(&r->m, &r->tensors, o, &r->opt, &r->master_block, &master_bytes));
    r->state = rs_train_state_new(&r->m, NULL, o->micro, r->data.max_len, o->recompute, 0);
    if (!r->state) return -1;
    RS_TRY(rs_train_state_set_fake_quant(r->state, o->qat_act_bits, o->qat_kv_bits));
    rs_batch_buf_init(&r->bb, o->micro, r->data.max_len);
    rs_data_order_init(&r->order, r->data.n, o->seed);
    int per_epoch = rs_batches_per_epoch(r->data.n, o->batch_size);
    o->sched.total_steps = o->max_steps > 0 ? o->max_steps : o->epochs * per_epoch;
    r->batch_idx = rs_malloc((size_t)o->batch_size * sizeof *r->batch_idx);
    r->batch_seqs = rs_malloc((size_t)o->micro * sizeof *r->batch_seqs);
    r->d_logp = rs_malloc((size_t)o->micro * sizeof *r->d_logp);
    r->logp = rs_malloc((size_t)o->micro * sizeof *r->logp);
    r->ckpt = (rs_checkpoint){.kind = "sft", .config_hash = o->config_hash,
                              .data_hash = o->data_hash, .total_steps = o->sched.total_steps,
                              .order = &r->order, .opt = &r->opt};
    rs_info("sft: %d examples (longest %d tokens), %d steps of %d, %zu parameters%s%s",
            r->data.n, r->data.max_len, o->sched.total_steps, o->batch_size, r->opt.n_total,
            o->linears_only ? " (the linears; the rest frozen)" : "", o->qat ? ", QAT" : "");
    print_plan(r, master_bytes);
    return 0;
}

static void free_run(sft_run *r) {
    rs_example_set_free(&r->data);
    if (r->tok) rs_tokenizer_free(r->tok);
    if (r->state) rs_train_state_free(r->state);
    rs_batch_buf_free(&r->bb);
    rs_data_order_free(&r->order);
    rs_metrics_close(&r->log);
    rs_optim_free(&r->opt);
    if (r->master_block) r->m.be->free(r->master_block);
    for (int i = 0; i < r->tensors.n; i++) {
        if (r->tensors.t[i].mask) r->m.be->free(r->tensors.t[i].mask);
        if (r->tensors.t[i].box) r->m.be->free(r->tensors.t[i].box);
    }
    free(r->tensors.t);
    if (r->grads.block) rs_model_grads_free(&r->m, &r->grads);
    if (r->m.be) rs_model_free(&r->m);
    free(r->batch_idx), free(r->batch_seqs), free(r->d_logp), free(r->logp);
    free_options(&r->o);
}

/* Forward and backward of one batch (in micro-batches); the mean NLL into *loss. */
static int batch_grad(sft_run *r, const int32_t *idx, int n, double *loss, long *n_tokens) {
    long total = 0;
    for (int i = 0; i < n; i++) total += r->data.seqs[idx[i]].n - r->data.seqs[idx[i]].n_prompt;
    double nll = 0;
    for (int a = 0; a < n; a += r->o.micro) {
        int k = n - a < r->o.micro ? n - a : r->o.micro;
        for (int i = 0; i < k; i++) r->batch_seqs[i] = &r->data.seqs[idx[a + i]];
        const rs_train_batch *b = rs_batch_fill(&r->bb, r->batch_seqs, k, NULL);
        RS_TRY(rs_train_forward(&r->m, NULL, r->state, b, r->logp));
        for (int i = 0; i < k; i++) {
            nll -= r->logp[i];
            r->d_logp[i] = (float)(-1.0 / (double)total);
        }
        RS_TRY(rs_train_backward(&r->m, NULL, r->state, b, r->d_logp, &r->grads));
    }
    *loss = nll / (double)total;
    *n_tokens = total;
    return 0;
}

static int save_checkpoint(sft_run *r) {
    r->ckpt.step = r->step;
    r->ckpt.metrics_bytes = r->log.bytes;
    return rs_checkpoint_save(r->o.ckpt_path, &r->ckpt);
}

static int one_step(sft_run *r) {
    const sft_options *o = &r->o;
    int n = rs_data_order_next(&r->order, o->batch_size, r->batch_idx);
    refresh_weights(&r->m, &r->tensors, o);
    if (o->linears_only)
        rs_model_grads_zero(&r->m, &r->grads); /* the frozen tensors' too (not accumulated) */
    else
        rs_optim_zero_grads(&r->opt);
    double loss;
    long tokens;
    RS_TRY(batch_grad(r, r->batch_idx, n, &loss, &tokens));
    if (rs_train_nan_injected((int)r->step)) loss = NAN;
    double norm = rs_optim_grad_norm(&r->opt);
    if (!isfinite(loss) || !isfinite(norm))
        return RS_FAIL("sft: step %lld: the loss is %g and the gradient norm %g: stopped without "
                       "updating; the last checkpoint (%s) is intact",
                       (long long)r->step + 1, loss, norm, o->ckpt_path);
    double lr = rs_lr_at(&o->sched, (int)r->step);
    rs_optim_step(&r->opt, lr, rs_clip_factor(norm, o->grad_clip));
    for (int i = 0; i < r->tensors.n; i++) {
        const sft_tensor *t = &r->tensors.t[i];
        if (t->box) r->m.be->clamp_f32(param_of(t), t->box, t->box + numel(t), numel(t));
    }
    r->step++;
    char line[512];
    snprintf(line, sizeof line,
             "{\"step\":%lld,\"epoch\":%lld,\"loss\":%.9g,\"tokens\":%ld,\"lr\":%.9g,"
             "\"grad_norm\":%.9g}",
             (long long)r->step, (long long)r->order.epoch, loss, tokens, lr, norm);
    RS_TRY(rs_metrics_write(&r->log, line));
    if (rs_now() - r->last_print >= 1.0 || r->step == o->sched.total_steps) {
        r->last_print = rs_now();
        rs_info("sft: step %lld/%d loss %.4f lr %.3g |g| %.3g", (long long)r->step,
                o->sched.total_steps, loss, lr, norm);
    }
    return 0;
}

static int step_cb(void *r) { return one_step(r); }
static int save_cb(void *r) { return save_checkpoint(r); }

/* Steps until the end or a signal; returns 0, -1, or the signal number. */
static int train(sft_run *r) {
    rs_train_loop loop = {"sft", r->o.ckpt_path, r->o.sched.total_steps, r->o.checkpoint_every,
                          &r->step, step_cb, save_cb, r, r->o.restart_hint};
    return rs_train_loop_run(&loop);
}

static int start_or_resume(sft_run *r, int resume, int force) {
    const sft_options *o = &r->o;
    int resuming = rs_train_stage_start(o->stage_dir, o->ckpt_path, resume, force);
    if (resuming < 0) return -1;
    if (resuming) {
        RS_TRY(rs_checkpoint_load(o->ckpt_path, &r->ckpt));
        r->step = r->ckpt.step;
        rs_info("sft: resuming %s at step %lld", o->ckpt_path, (long long)r->step);
    }
    return rs_metrics_open(&r->log, o->metrics_path, resume ? r->ckpt.metrics_bytes : 0);
}

static int run(const rs_config *cfg, int resume, int force, const char *restart_hint) {
    sft_run r;
    memset(&r, 0, sizeof r);
    int threads = (int)rs_config_get_int(cfg, "model", "threads");
    if (threads > 0) omp_set_num_threads(threads);
    int rc = read_options(cfg, &r.o);
    r.o.restart_hint = restart_hint;
    if (rc == 0) rc = load_inputs(&r, cfg);
    if (rc == 0) rc = setup(&r);
    if (rc == 0) rc = start_or_resume(&r, resume, force);
    if (rc == 0) {
        rs_train_catch_signals();
        rc = train(&r);
    }
    if (rc == 0) rc = save_checkpoint(&r);
    if (rc == 0) rc = write_model_dir(&r.m, &r.tensors, &r.o);
    if (rc == 0) rs_info("sft: wrote %s", r.o.output_dir);
    free_run(&r);
    return rc;
}

int rs_sft_run(const rs_config *cfg, int resume, int force) {
    return run(cfg, resume, force, NULL);
}

int rs_sft_run_once(const rs_config *cfg, const char *restart_hint) {
    return run(cfg, 0, 1, restart_hint);
}
