/* model_load: a Hugging Face model directory (config.json + safetensors) into one device
 * allocation of parameters. Every expected tensor is listed with the shape config.json implies
 * and checked before anything is allocated, so a bad checkpoint fails with one line naming the
 * tensor. */
#include "resafe/model.h"
#include "resafe/adapter.h"
#include "resafe/quant_io.h"
#include "resafe/safetensors.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* One expected tensor: its HF name, the shape the config implies, where its pointer goes. */
typedef struct {
    char name[96];
    int ndim;
    int64_t shape[2];
    void **slot;
    const rs_st_tensor *src;
} param_spec;

typedef struct {
    param_spec *items;
    int n, cap;
} spec_list;

RS_PRINTF(5, 6)
static void expect(spec_list *l, void **slot, int64_t d0, int64_t d1, const char *fmt, ...) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->items = rs_realloc(l->items, (size_t)l->cap * sizeof *l->items);
    }
    param_spec *s = &l->items[l->n++];
    memset(s, 0, sizeof *s);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->name, sizeof s->name, fmt, ap);
    va_end(ap);
    s->ndim = d1 > 0 ? 2 : 1;
    s->shape[0] = d0;
    s->shape[1] = d1;
    s->slot = slot;
}

/* The parameters of HF's *ForCausalLM for this config, in checkpoint naming. */
static void list_parameters(rs_model *m, spec_list *l, int quantized) {
    const rs_model_config *c = &m->cfg;
    int64_t D = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    int64_t Q = (int64_t)c->n_heads * c->head_dim, KV = (int64_t)c->n_kv_heads * c->head_dim;
    expect(l, &m->embed, V, D, "model.embed_tokens.weight");
    for (int i = 0; i < c->n_layers; i++) {
        rs_layer_weights *w = &m->layers[i];
        const char *p = "model.layers";
        expect(l, &w->attn_norm, D, 0, "%s.%d.input_layernorm.weight", p, i);
        if (!quantized) expect(l, &w->wq, Q, D, "%s.%d.self_attn.q_proj.weight", p, i);
        if (!quantized) expect(l, &w->wk, KV, D, "%s.%d.self_attn.k_proj.weight", p, i);
        if (!quantized) expect(l, &w->wv, KV, D, "%s.%d.self_attn.v_proj.weight", p, i);
        if (!quantized) expect(l, &w->wo, D, Q, "%s.%d.self_attn.o_proj.weight", p, i);
        if (c->attention_bias) {
            expect(l, &w->bq, Q, 0, "%s.%d.self_attn.q_proj.bias", p, i);
            expect(l, &w->bk, KV, 0, "%s.%d.self_attn.k_proj.bias", p, i);
            expect(l, &w->bv, KV, 0, "%s.%d.self_attn.v_proj.bias", p, i);
        }
        if (c->o_bias) expect(l, &w->bo, D, 0, "%s.%d.self_attn.o_proj.bias", p, i);
        expect(l, &w->mlp_norm, D, 0, "%s.%d.post_attention_layernorm.weight", p, i);
        if (!quantized) expect(l, &w->w_gate, F, D, "%s.%d.mlp.gate_proj.weight", p, i);
        if (!quantized) expect(l, &w->w_up, F, D, "%s.%d.mlp.up_proj.weight", p, i);
        if (!quantized) expect(l, &w->w_down, D, F, "%s.%d.mlp.down_proj.weight", p, i);
        if (c->mlp_bias) {
            expect(l, &w->b_gate, F, 0, "%s.%d.mlp.gate_proj.bias", p, i);
            expect(l, &w->b_up, F, 0, "%s.%d.mlp.up_proj.bias", p, i);
            expect(l, &w->b_down, D, 0, "%s.%d.mlp.down_proj.bias", p, i);
        }
    }
    expect(l, &m->final_norm, D, 0, "model.norm.weight");
    if (!c->tie_word_embeddings) expect(l, &m->lm_head, V, D, "lm_head.weight");
}

static void shape_str(char *buf, size_t size, int ndim, const int64_t *shape) {
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < ndim && used < size; d++)
        used += (size_t)snprintf(buf + used, size - used, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (used < size) snprintf(buf + used, size - used, "]");
}

/* Find every expected tensor and check its shape and dtype; nothing is allocated yet. */
static int match_tensors(const char *dir, const rs_st_set *set, spec_list *l, int n_quant_tensors) {
    for (int i = 0; i < l->n; i++) {
        param_spec *s = &l->items[i];
        s->src = rs_st_find(set, s->name);
        char want[64], got[64];
        shape_str(want, sizeof want, s->ndim, s->shape);
        if (!s->src) return RS_FAIL("%s: tensor '%s' %s is missing", dir, s->name, want);
        const rs_st_tensor *t = s->src;
        shape_str(got, sizeof got, t->ndim, t->shape);
        int same = t->ndim == s->ndim;
        for (int d = 0; same && d < s->ndim; d++) same = t->shape[d] == s->shape[d];
        if (!same)
            return RS_FAIL("%s: tensor '%s' has shape %s, config.json implies %s", dir, s->name, got,
                           want);
        if (t->dtype != RS_F32 && t->dtype != RS_F16 && t->dtype != RS_BF16)
            return RS_FAIL("%s: tensor '%s' has dtype %s (supported: F32, F16, BF16)", dir, s->name,
                           rs_dtype_name(t->dtype));
    }
    if (set->n_tensors > l->n + n_quant_tensors)
        rs_warn("%s: %d tensors in the checkpoint are not parameters of the model (ignored)", dir,
                set->n_tensors - l->n - n_quant_tensors);
    return 0;
}

static size_t spec_numel(const param_spec *s) {
    return (size_t)s->shape[0] * (size_t)(s->ndim == 2 ? s->shape[1] : 1);
}

/* One device allocation: every parameter (64-byte aligned) then inv_freq. */
static int upload_parameters(rs_model *m, spec_list *l) {
    const rs_backend *be = m->be;
    size_t wsize = rs_dtype_size(be->weight_dtype), total = 0, max_numel = 0;
    for (int i = 0; i < l->n; i++) {
        size_t numel = spec_numel(&l->items[i]);
        total += rs_align64(numel * wsize);
        max_numel = numel > max_numel ? numel : max_numel;
        m->n_params += numel;
    }
    int half = m->cfg.head_dim / 2;
    total += rs_align64((size_t)half * sizeof(float));
    m->params = be->alloc(total);
    m->params_bytes = total;
    float *staging = rs_malloc(max_numel * sizeof *staging);
    size_t offset = 0;
    for (int i = 0; i < l->n; i++) {
        param_spec *s = &l->items[i];
        size_t numel = spec_numel(s);
        if (rs_st_read_f32(s->src, staging, numel) != 0) {
            free(staging);
            return rs_fail_context("tensor '%s'", s->name);
        }
        *s->slot = (char *)m->params + offset;
        be->upload_f32(*s->slot, be->weight_dtype, staging, numel);
        offset += rs_align64(numel * wsize);
    }
    rs_rope_inv_freq(&m->cfg, staging); /* staging holds vocab*hidden >= head_dim/2 floats */
    m->inv_freq = (float *)((char *)m->params + offset);
    be->to_device(m->inv_freq, staging, (size_t)half * sizeof(float));
    be->synchronize();
    free(staging);
    if (m->cfg.tie_word_embeddings) m->lm_head = m->embed;
    return 0;
}

size_t rs_model_plan_bytes(const rs_model_config *c, rs_dtype weight_dtype, int quantized) {
    rs_model m = {.cfg = *c};
    m.layers = rs_calloc((size_t)c->n_layers, sizeof *m.layers);
    spec_list specs = {0};
    list_parameters(&m, &specs, quantized);
    size_t wsize = rs_dtype_size(weight_dtype), total = 0;
    for (int i = 0; i < specs.n; i++) total += rs_align64(spec_numel(&specs.items[i]) * wsize);
    free(specs.items);
    free(m.layers);
    return total + rs_align64((size_t)(c->head_dim / 2) * sizeof(float)); /* inv_freq */
}

/* A quantized directory (quant_io.h): read every linear's quantized tensors (host, validated). */
static int read_quantized(const char *dir, const rs_st_set *set, const char *qjson, rs_model *m,
                          rs_qweight **qw, int *n_tensors) {
    rs_qspec spec;
    char method[64], file[512];
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    if (rs_qconfig_parse(file, qjson, &spec, method, sizeof method) != 0) return -1;
    int n = m->cfg.n_layers * RS_N_LINEARS;
    *qw = rs_calloc((size_t)n, sizeof **qw);
    for (int j = 0; j < n; j++) {
        char name[128];
        int out, in, used;
        snprintf(name, sizeof name, "model.layers.%d.%s", j / RS_N_LINEARS, rs_linear_name(j % RS_N_LINEARS));
        rs_linear_shape(&m->cfg, j % RS_N_LINEARS, &out, &in);
        if (rs_qweight_read(set, file, name, &spec, out, in, &(*qw)[j], &used) != 0) return -1;
        *n_tensors += used;
    }
    char desc[160], sname[64];
    snprintf(desc, sizeof desc, "%s %s", rs_qspec_name(&spec, sname, sizeof sname), method);
    m->quant_desc = rs_strdup(desc);
    return 0;
}

static int attach_quantized(rs_model *m, rs_qweight *qw) {
    int n = m->cfg.n_layers * RS_N_LINEARS;
    const rs_qweight **ptrs = rs_malloc((size_t)n * sizeof *ptrs);
    for (int j = 0; j < n; j++) ptrs[j] = &qw[j];
    char *desc = m->quant_desc;
    m->quant_desc = NULL;
    int rc = rs_model_set_quantized(m, ptrs, desc);
    free(desc);
    free(ptrs);
    return rc;
}

static void free_host_qweights(rs_qweight *qw, int n) {
    if (!qw) return;
    for (int j = 0; j < n; j++) rs_qweight_free(&qw[j]);
    free(qw);
}

int rs_model_load(const char *dir, const rs_backend *be, rs_model *m) {
    memset(m, 0, sizeof *m);
    m->be = be;
    if (rs_hf_config_load(dir, &m->cfg) != 0) return -1;
    if (m->cfg.head_dim % 2 != 0)
        return RS_FAIL("%s/config.json: head_dim %d is odd (rotary embedding needs pairs)", dir,
                       m->cfg.head_dim);
    rs_st_set set;
    if (rs_st_open(dir, &set) != 0) return -1;
    m->layers = rs_calloc((size_t)m->cfg.n_layers, sizeof *m->layers);
    const char *qjson = rs_qconfig_of(&set);
    rs_qweight *qw = NULL;
    int n_quant_tensors = 0, rc = 0;
    if (qjson) rc = read_quantized(dir, &set, qjson, m, &qw, &n_quant_tensors);
    spec_list specs = {0};
    list_parameters(m, &specs, qjson != NULL);
    if (rc == 0) rc = match_tensors(dir, &set, &specs, n_quant_tensors);
    if (rc == 0) rc = upload_parameters(m, &specs);
    if (rc == 0 && qw) rc = attach_quantized(m, qw);
    free_host_qweights(qw, m->cfg.n_layers * RS_N_LINEARS);
    free(specs.items);
    rs_st_close(&set);
    char *adapter = rs_path_join(dir, RS_ADAPTER_FILE);
    if (rc == 0 && rs_path_exists(adapter)) rc = rs_model_attach_adapter(m, adapter);
    free(adapter);
    if (rc != 0) {
        rs_model_free(m);
        return -1;
    }
    rs_info("%s: %s, %d layers, hidden %d, %zu parameters (%.1f MiB on %s)%s%s", dir,
            rs_arch_name(m->cfg.arch), m->cfg.n_layers, m->cfg.hidden_size, m->n_params,
            m->params_bytes / 1048576.0, be->name, m->quant_desc ? ", quantized " : "",
            m->quant_desc ? m->quant_desc : "");
    return 0;
}
