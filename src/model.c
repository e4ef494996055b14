/* model: the activation plan, the KV cache and the forward pass of the Llama family
 * (equations in include/resafe/model.h). Loading lives in model_load.c. */
#include "resafe/model.h"
#include "resafe/adapter.h"
#include "resafe/quant.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- memory plans */

static void free_activations(rs_model *m) {
    if (m->act.plan.base) m->be->free(m->act.plan.base);
    free(m->act.host_ints);
    memset(&m->act, 0, sizeof m->act);
}

void rs_model_free(rs_model *m) {
    if (m->be) {
        rs_model_detach_adapter(m);
        free_activations(m);
        if (m->params) m->be->free(m->params);
        for (int i = 0; i < m->n_qweights; i++) m->be->qweight_free(&m->qweights[i]);
    }
    free(m->qweights);
    free(m->quant_desc);
    free(m->layers);
    memset(m, 0, sizeof *m);
}

typedef struct {
    const char *name;
    void **slot;
    size_t elems, elem_size;
} buffer_spec;

/* Sum of the 64-byte aligned sizes; -1 on size_t overflow. */
static int plan_bytes(const buffer_spec *bufs, int n, size_t *total) {
    *total = 0;
    for (int i = 0; i < n; i++) {
        size_t bytes;
        if (rs_mul_size(bufs[i].elems, bufs[i].elem_size, &bytes) != 0 ||
            rs_add_size(*total, rs_align64(bytes), total) != 0)
            return -1;
    }
    return 0;
}

/* Overflow-checked product of sizes (SIZE_MAX on overflow, which plan_bytes then rejects). */
static size_t mul(size_t a, size_t b) {
    size_t out;
    return rs_mul_size(a, b, &out) == 0 ? out : SIZE_MAX;
}

int rs_model_reserve(rs_model *m, int max_tokens, int max_logit_rows) {
    rs_activations *a = &m->act;
    if (max_tokens <= a->max_tokens && max_logit_rows <= a->max_logit_rows) return 0;
    if (max_tokens < a->max_tokens) max_tokens = a->max_tokens;
    if (max_logit_rows < a->max_logit_rows) max_logit_rows = a->max_logit_rows;
    free_activations(m);
    const rs_model_config *c = &m->cfg;
    size_t n = (size_t)max_tokens, r = (size_t)max_logit_rows, as = rs_dtype_size(m->be->act_dtype);
    size_t D = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    size_t Q = (size_t)c->n_heads * c->head_dim, KV = (size_t)c->n_kv_heads * c->head_dim;
    size_t lora_rank = m->adapter ? (size_t)m->adapter->rank : 0;
    buffer_spec bufs[] = {
        {"x (residual) [n, hidden]", &a->x, mul(n, D), as},
        {"xn (normed) [n, hidden]", &a->xn, mul(n, D), as},
        {"q [n, heads*hd]", &a->q, mul(n, Q), as},
        {"att [n, heads*hd]", &a->att, mul(n, Q), as},
        {"k [n, kv*hd]", &a->k, mul(n, KV), as},
        {"v [n, kv*hd]", &a->v, mul(n, KV), as},
        {"kv_packed [n, kv*hd]", &a->kv_packed, mul(n, KV), as},
        {"gate [n, inter]", &a->gate, mul(n, F), as},
        {"up [n, inter]", &a->up, mul(n, F), as},
        {"mlp [n, inter]", &a->mlp, mul(n, F), as},
        {"x_last [rows, hidden]", &a->x_last, mul(r, D), as},
        {"logits_act [rows, vocab]", &a->logits_act, mul(r, V), as},
        {"logits f32 [rows, vocab]", (void **)&a->logits, mul(r, V), sizeof(float)},
        {"ids [n]", (void **)&a->ids, n, sizeof(int32_t)},
        {"pos [n]", (void **)&a->pos, n, sizeof(int32_t)},
        {"cache_rows [n]", (void **)&a->cache_rows, n, sizeof(int32_t)},
        {"real_rows [n]", (void **)&a->real_rows, n, sizeof(int32_t)},
        {"last_rows [rows]", (void **)&a->last_rows, r, sizeof(int32_t)},
        {"lora_xa [n, rank] f32", (void **)&a->lora_xa, mul(n, lora_rank), sizeof(float)},
    };
    int n_bufs = (int)(sizeof bufs / sizeof bufs[0]);
    size_t total;
    if (plan_bytes(bufs, n_bufs, &total) != 0)
        return RS_FAIL("activations for %d tokens and %d rows of logits overflow the address space",
                       max_tokens, max_logit_rows);
    a->plan.base = m->be->alloc(total);
    a->plan.capacity = total;
    for (int i = 0; i < n_bufs; i++)
        *bufs[i].slot = rs_arena_alloc(&a->plan, bufs[i].name, bufs[i].elems * bufs[i].elem_size);
    a->host_ints = rs_malloc((4 * n + r) * sizeof(int32_t));
    a->max_tokens = max_tokens;
    a->max_logit_rows = max_logit_rows;
    rs_debug("activations planned for %d tokens, %d rows of logits (%s on %s):", max_tokens,
             max_logit_rows, rs_dtype_name(m->be->act_dtype), m->be->name);
    if (rs_get_log_level() >= RS_LOG_DEBUG) rs_arena_print_plan(&a->plan, stderr);
    return 0;
}

int rs_kv_cache_init(const rs_model *m, int batch, int max_seq_len, rs_kv_cache *cache) {
    memset(cache, 0, sizeof *cache);
    const rs_model_config *c = &m->cfg;
    if (batch < 1 || max_seq_len < 1)
        return RS_FAIL("KV cache: batch %d and length %d must be positive", batch, max_seq_len);
    if ((int64_t)batch * max_seq_len > INT32_MAX)
        return RS_FAIL("KV cache: %d sequences of %d positions exceed 2^31 rows", batch, max_seq_len);
    size_t layer_elems = mul(mul((size_t)batch, (size_t)max_seq_len), (size_t)c->n_kv_heads * c->head_dim);
    size_t layer_bytes = rs_align64(mul(layer_elems, rs_dtype_size(m->be->act_dtype)));
    size_t total = mul(mul(layer_bytes, 2), (size_t)c->n_layers);
    if (layer_elems == SIZE_MAX || total == SIZE_MAX)
        return RS_FAIL("KV cache: %d sequences of %d positions overflow the address space", batch,
                       max_seq_len);
    cache->batch = batch;
    cache->max_seq_len = max_seq_len;
    cache->n_layers = c->n_layers;
    cache->layer_elems = layer_elems;
    cache->data = m->be->alloc(total);
    cache->k = rs_malloc((size_t)c->n_layers * sizeof *cache->k);
    cache->v = rs_malloc((size_t)c->n_layers * sizeof *cache->v);
    for (int l = 0; l < c->n_layers; l++) {
        cache->k[l] = (char *)cache->data + (2 * (size_t)l) * layer_bytes;
        cache->v[l] = (char *)cache->data + (2 * (size_t)l + 1) * layer_bytes;
    }
    rs_debug("KV cache: %d x %d positions, %.2f MiB", batch, max_seq_len, total / 1048576.0);
    return 0;
}

void rs_kv_cache_free(const rs_model *m, rs_kv_cache *cache) {
    if (cache->data) m->be->free(cache->data);
    free(cache->k);
    free(cache->v);
    memset(cache, 0, sizeof *cache);
}

/* ---------------------------------------------------------------- inputs */

static int check_inputs(const rs_model *m, const rs_kv_cache *cache, const int32_t *tokens,
                        const int32_t *pos, int B, int T) {
    const rs_model_config *c = &m->cfg;
    if (B < 1 || T < 1 || B > cache->batch || (int64_t)B * T > INT32_MAX)
        return RS_FAIL("forward: batch %d x %d tokens does not fit a KV cache of %d sequences", B, T,
                       cache->batch);
    for (int b = 0; b < B; b++) {
        int prev = -1;
        for (int t = 0; t < T; t++) {
            int32_t p = pos[b * T + t], id = tokens[b * T + t];
            if (p == -1) continue;
            if (p < 0 || p >= cache->max_seq_len)
                return RS_FAIL("forward: sequence %d: position %d outside the KV cache's %d", b, p,
                               cache->max_seq_len);
            if (c->sliding_window > 0 && p >= c->sliding_window)
                return RS_FAIL("forward: sequence %d: position %d is past the sliding window (%d), "
                               "which is not supported", b, p, c->sliding_window);
            if (p <= prev)
                return RS_FAIL("forward: sequence %d: positions must increase (%d after %d)", b, p,
                               prev);
            if (id < 0 || id >= c->vocab_size)
                return RS_FAIL("forward: sequence %d: token id %d outside the vocabulary [0, %d)", b,
                               id, c->vocab_size);
            prev = p;
        }
    }
    return 0;
}

/* Host-side index arrays, uploaded: ids (padding -> 0), positions, the cache rows of the real
 * tokens, which rows of the batch are real, and the last real row of each sequence.
 * Returns the number of real tokens. */
static int stage_indices(rs_model *m, const rs_kv_cache *cache, const int32_t *tokens,
                         const int32_t *pos, int B, int T) {
    rs_activations *a = &m->act;
    int n = B * T, n_real = 0;
    int32_t *ids = a->host_ints, *cache_rows = ids + n, *real_rows = ids + 2 * n, *last = ids + 3 * n;
    for (int b = 0; b < B; b++) {
        last[b] = b * T; /* a sequence with no real token: unspecified logits from row 0 */
        for (int t = 0; t < T; t++) {
            int i = b * T + t;
            ids[i] = pos[i] >= 0 ? tokens[i] : 0;
            if (pos[i] < 0) continue;
            cache_rows[n_real] = b * cache->max_seq_len + pos[i];
            real_rows[n_real++] = i;
            last[b] = i;
        }
    }
    const rs_backend *be = m->be;
    be->to_device(a->ids, ids, (size_t)n * sizeof(int32_t));
    be->to_device(a->pos, pos, (size_t)n * sizeof(int32_t));
    be->to_device(a->cache_rows, cache_rows, (size_t)n_real * sizeof(int32_t));
    be->to_device(a->real_rows, real_rows, (size_t)n_real * sizeof(int32_t));
    be->to_device(a->last_rows, last, (size_t)B * sizeof(int32_t));
    return n_real;
}

/* ---------------------------------------------------------------- forward */

/* k or v rows of this call into the cache. Padded rows must not be written (their position
 * is -1), so a padded batch first packs its real rows together. */
static void write_cache(rs_model *m, void *cache_layer, const void *src, int n, int n_real) {
    const rs_backend *be = m->be;
    rs_activations *a = &m->act;
    int kv_dim = m->cfg.n_kv_heads * m->cfg.head_dim;
    if (n_real == n) {
        be->scatter_rows(cache_layer, src, a->cache_rows, n, kv_dim);
        return;
    }
    if (n_real == 0) return;
    be->gather_rows(a->kv_packed, src, a->real_rows, n_real, kv_dim);
    be->scatter_rows(cache_layer, a->kv_packed, a->cache_rows, n_real, kv_dim);
}

/* x += W_o attention(rope(q), rope(k), v), with q, k, v projections of norm(x). */
static void attention_block(rs_model *m, rs_kv_cache *cache, int l, int B, int T, int n_real) {
    const rs_backend *be = m->be;
    const rs_model_config *c = &m->cfg;
    const rs_layer_weights *w = &m->layers[l];
    rs_activations *a = &m->act;
    int n = B * T, D = c->hidden_size, hd = c->head_dim;
    int Q = c->n_heads * hd, KV = c->n_kv_heads * hd;
    be->rmsnorm_fwd(a->xn, NULL, a->x, w->attn_norm, n, D, c->rms_norm_eps, c->norm_add_one);
    if (m->capture) m->capture(m->capture_user, l, 0, a->xn, n, D);
    rs_linear_fwd(be, a->q, a->xn, w->wq, w->qwq, w->bq, n, D, Q, 0.0f);
    rs_linear_fwd(be, a->k, a->xn, w->wk, w->qwk, w->bk, n, D, KV, 0.0f);
    rs_linear_fwd(be, a->v, a->xn, w->wv, w->qwv, w->bv, n, D, KV, 0.0f);
    rs_model_adapter_fwd(m, l, 0, a->q, a->xn, n);
    rs_model_adapter_fwd(m, l, 1, a->k, a->xn, n);
    rs_model_adapter_fwd(m, l, 2, a->v, a->xn, n);
    be->rope_fwd(a->q, a->pos, m->inv_freq, n, c->n_heads, hd);
    be->rope_fwd(a->k, a->pos, m->inv_freq, n, c->n_kv_heads, hd);
    write_cache(m, cache->k[l], a->k, n, n_real);
    write_cache(m, cache->v[l], a->v, n, n_real);
    be->attention_fwd(a->att, a->q, cache->k[l], cache->v[l], a->pos, B, T, cache->max_seq_len,
                      c->n_heads, c->n_kv_heads, hd, c->attn_scale);
    if (m->capture) m->capture(m->capture_user, l, 3, a->att, n, Q);
    rs_linear_fwd(be, a->x, a->att, w->wo, w->qwo, w->bo, n, Q, D, 1.0f); /* beta = 1: residual */
    rs_model_adapter_fwd(m, l, 3, a->x, a->att, n);
}

/* x += W_down (act(W_gate norm(x)) * W_up norm(x)) */
static void mlp_block(rs_model *m, int l, int n) {
    const rs_backend *be = m->be;
    const rs_model_config *c = &m->cfg;
    const rs_layer_weights *w = &m->layers[l];
    rs_activations *a = &m->act;
    int D = c->hidden_size, F = c->intermediate_size;
    be->rmsnorm_fwd(a->xn, NULL, a->x, w->mlp_norm, n, D, c->rms_norm_eps, c->norm_add_one);
    if (m->capture) m->capture(m->capture_user, l, 4, a->xn, n, D);
    rs_linear_fwd(be, a->gate, a->xn, w->w_gate, w->qw_gate, w->b_gate, n, D, F, 0.0f);
    rs_linear_fwd(be, a->up, a->xn, w->w_up, w->qw_up, w->b_up, n, D, F, 0.0f);
    rs_model_adapter_fwd(m, l, 4, a->gate, a->xn, n);
    rs_model_adapter_fwd(m, l, 5, a->up, a->xn, n);
    be->glu_fwd(a->mlp, a->gate, a->up, (size_t)n * F, c->hidden_act);
    if (m->capture) m->capture(m->capture_user, l, 6, a->mlp, n, F);
    rs_linear_fwd(be, a->x, a->mlp, w->w_down, w->qw_down, w->b_down, n, F, D, 1.0f);
    rs_model_adapter_fwd(m, l, 6, a->x, a->mlp, n);
}

/* logits = W_lm norm(x) for every row, or for the last real row of each sequence. */
static void logits_block(rs_model *m, int B, int T, rs_logits_mode mode, float *host_logits) {
    const rs_backend *be = m->be;
    const rs_model_config *c = &m->cfg;
    rs_activations *a = &m->act;
    int D = c->hidden_size, V = c->vocab_size, rows = B * T;
    const void *x = a->x;
    if (mode == RS_LOGITS_LAST) {
        be->gather_rows(a->x_last, a->x, a->last_rows, B, D);
        x = a->x_last;
        rows = B;
    }
    be->rmsnorm_fwd(a->xn, NULL, x, m->final_norm, rows, D, c->rms_norm_eps, c->norm_add_one);
    be->linear_fwd(a->logits_act, a->xn, m->lm_head, NULL, rows, D, V, 0.0f);
    be->act_to_f32(a->logits, a->logits_act, (size_t)rows * V);
    be->synchronize();
    be->to_host(host_logits, a->logits, (size_t)rows * V * sizeof(float));
}

/* The argmax of the last real row of each sequence, on the device, into host ids[B]. */
static void argmax_block(rs_model *m, int B, int T, int32_t *host_ids) {
    const rs_backend *be = m->be;
    const rs_model_config *c = &m->cfg;
    rs_activations *a = &m->act;
    int D = c->hidden_size, V = c->vocab_size;
    (void)T;
    be->gather_rows(a->x_last, a->x, a->last_rows, B, D);
    be->rmsnorm_fwd(a->xn, NULL, a->x_last, m->final_norm, B, D, c->rms_norm_eps, c->norm_add_one);
    be->linear_fwd(a->logits_act, a->xn, m->lm_head, NULL, B, D, V, 0.0f);
    be->argmax_rows(a->ids, a->logits_act, B, V); /* ids [n >= B] is free after the embedding */
    be->to_host(host_ids, a->ids, (size_t)B * sizeof(int32_t));
}

/* Gemma multiplies by sqrt(hidden) rounded to the activation dtype, as HF does. */
float rs_model_embed_scale(const rs_model *m) {
    float v = m->cfg.embed_scale;
    rs_dtype t = m->be->act_dtype;
    if (t == RS_BF16) return rs_bf16_to_f32(rs_f32_to_bf16(v));
    if (t == RS_F16) return rs_f16_to_f32(rs_f32_to_f16(v));
    return v;
}

/* The layers a forward runs: all, or those a capture asked for (rs_model.capture_layers). */
static int capture_stop(const rs_model *m) {
    int k = m->capture_layers, n = m->cfg.n_layers;
    return m->capture && k > 0 && k < n ? k : n;
}

/* Everything up to the final hidden states a->x (or layer capture_layers' output). */
static int forward_layers(rs_model *m, rs_kv_cache *cache, const int32_t *tokens,
                          const int32_t *pos, int B, int T, int logit_rows) {
    RS_TRY(check_inputs(m, cache, tokens, pos, B, T));
    int n = B * T;
    RS_TRY(rs_model_reserve(m, n, logit_rows));
    int n_real = stage_indices(m, cache, tokens, pos, B, T);
    const rs_model_config *c = &m->cfg;
    m->be->embedding_fwd(m->act.x, m->embed, m->act.ids, n, c->hidden_size,
                         rs_model_embed_scale(m));
    for (int l = 0; l < capture_stop(m); l++) {
        attention_block(m, cache, l, B, T, n_real);
        mlp_block(m, l, n);
    }
    return 0;
}

int rs_model_forward(rs_model *m, rs_kv_cache *cache, const int32_t *tokens, const int32_t *pos,
                     int B, int T, rs_logits_mode mode, float *logits) {
    RS_TRY(forward_layers(m, cache, tokens, pos, B, T, mode == RS_LOGITS_ALL ? B * T : B));
    if (capture_stop(m) == m->cfg.n_layers) logits_block(m, B, T, mode, logits);
    else m->be->synchronize(); /* the capture's statistics are complete on return */
    return 0;
}

int rs_model_forward_greedy(rs_model *m, rs_kv_cache *cache, const int32_t *tokens,
                            const int32_t *pos, int B, int T, int32_t *ids) {
    if (!m->be->argmax_rows) return RS_FAIL("the %s backend has no argmax_rows", m->be->name);
    RS_TRY(forward_layers(m, cache, tokens, pos, B, T, B));
    argmax_block(m, B, T, ids);
    return 0;
}

const char *rs_linear_name(int i) {
    static const char *names[RS_N_LINEARS] = {"self_attn.q_proj", "self_attn.k_proj",
                                              "self_attn.v_proj", "self_attn.o_proj",
                                              "mlp.gate_proj",    "mlp.up_proj",
                                              "mlp.down_proj"};
    return i >= 0 && i < RS_N_LINEARS ? names[i] : "?";
}

void rs_linear_shape(const rs_model_config *c, int i, int *out, int *in) {
    int D = c->hidden_size, F = c->intermediate_size;
    int Q = c->n_heads * c->head_dim, KV = c->n_kv_heads * c->head_dim;
    static const int which[RS_N_LINEARS][2] = {{0, 1}, {2, 1}, {2, 1}, {1, 0}, {3, 1}, {3, 1}, {1, 3}};
    int dims[4] = {Q, D, KV, F};
    *out = dims[which[i][0]];
    *in = dims[which[i][1]];
}

int rs_model_set_quantized(rs_model *m, const struct rs_qweight *const *qw, const char *desc) {
    const rs_backend *be = m->be;
    if (!be->qmatmul || !be->qweight_upload)
        return RS_FAIL("the %s backend has no quantized matmul", be->name);
    if (m->n_qweights) return RS_FAIL("model is already quantized");
    int n = m->cfg.n_layers * RS_N_LINEARS;
    m->qweights = rs_calloc((size_t)n, sizeof *m->qweights);
    for (int j = 0; j < n; j++) {
        if (!qw[j]) continue;
        int out, in;
        rs_linear_shape(&m->cfg, j % RS_N_LINEARS, &out, &in);
        if (qw[j]->rows != out || qw[j]->cols != in)
            return RS_FAIL("quantized layers.%d.%s is [%d, %d], the model needs [%d, %d]",
                           j / RS_N_LINEARS, rs_linear_name(j % RS_N_LINEARS), qw[j]->rows,
                           qw[j]->cols, out, in);
        rs_layer_weights *w = &m->layers[j / RS_N_LINEARS];
        if (be->qweight_upload(&m->qweights[j], qw[j]) != 0) return -1;
        m->n_qweights = j + 1;
        *rs_layer_qslot(w, j % RS_N_LINEARS) = &m->qweights[j];
        *rs_layer_wslot(w, j % RS_N_LINEARS) = NULL;
    }
    m->n_qweights = n;
    if (desc) m->quant_desc = rs_strdup(desc);
    return 0;
}
