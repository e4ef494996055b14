/* model: the Llama-family decoder (Llama-2/3, Mistral, Qwen2, Gemma), written once against the
 * backend ops (backend.h) and loaded from a Hugging Face model directory.
 *
 * Forward, per layer (HF LlamaDecoderLayer):
 *   h = x + W_o attn(rope(W_q n1(x) + b_q), rope(W_k n1(x) + b_k), W_v n1(x) + b_v)
 *   x = h + W_down (act(W_gate n2(h)) * W_up n2(h))
 * with n(x) = x / rms(x) * w  (Gemma: * (1 + w)), x0 = embed[ids] * embed_scale, and
 * logits = W_lm norm(x_L) (W_lm = embed when tied).
 *
 * Batches: tokens[b*T + t] with positions pos[b*T + t]; pos = -1 marks padding (any token id;
 * its output is unspecified). Sequence b of a call is sequence b of the KV cache; each token's
 * k/v go to cache row pos, and a query at position p attends to cache rows 0..p, so prompts of
 * different lengths are one right-padded prefill call, and a decode step is a call with T = 1.
 * Within a sequence, the positions of one call must increase; rows below them must have been
 * written by earlier calls (a sequence starts at position 0). */
#ifndef RESAFE_MODEL_H
#define RESAFE_MODEL_H

#include "resafe/backend.h"
#include "resafe/hf_config.h"

/* One decoder layer's parameters (device pointers into rs_model.params). Linear weights are
 * [out, in] as in HF; biases are NULL when the architecture has none. */
typedef struct {
    void *attn_norm, *mlp_norm; /* input_layernorm, post_attention_layernorm [hidden] */
    void *wq, *wk, *wv, *wo;    /* [n_heads*hd, hidden], [n_kv*hd, hidden] x2, [hidden, n_heads*hd] */
    void *bq, *bk, *bv, *bo;
    void *w_gate, *w_up, *w_down; /* [inter, hidden] x2, [hidden, inter] */
    void *b_gate, *b_up, *b_down;
    /* Quantized linears (quant.h, backend-resident): NULL = dense. A quantized linear has its
     * dense pointer NULL and goes through be->qmatmul / be->qmatmul_t. Order of rs_layer_qslot:
     * q, k, v, o, gate, up, down (the order of rs_lora_target and quant_methods.h). */
    struct rs_qweight *qwq, *qwk, *qwv, *qwo, *qw_gate, *qw_up, *qw_down;
} rs_layer_weights;

#define RS_N_LINEARS 7
/* The dense and quantized slots of linear i (0..6 = q, k, v, o, gate, up, down). */
static inline void **rs_layer_wslot(rs_layer_weights *w, int i) {
    void **s[RS_N_LINEARS] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->w_gate, &w->w_up, &w->w_down};
    return s[i];
}
static inline struct rs_qweight **rs_layer_qslot(rs_layer_weights *w, int i) {
    struct rs_qweight **s[RS_N_LINEARS] = {&w->qwq, &w->qwk,    &w->qwv,   &w->qwo,
                                           &w->qw_gate, &w->qw_up, &w->qw_down};
    return s[i];
}
/* HF module name of linear i ("self_attn.q_proj", ...). */
const char *rs_linear_name(int i);
/* [out, in] of linear i for this config. */
void rs_linear_shape(const rs_model_config *c, int i, int *out, int *in);

/* y = beta * y + x W^T + b through the dense or the quantized weight. */
static inline void rs_linear_fwd(const rs_backend *be, void *out, const void *x, const void *w,
                                 const struct rs_qweight *qw, const void *b, int n, int k, int m,
                                 float beta) {
    if (qw)
        be->qmatmul(out, x, qw, b, n, beta);
    else
        be->linear_fwd(out, x, w, b, n, k, m, beta);
}

/* Activation buffers of one forward call, planned in one device allocation for up to
 * max_tokens tokens (B*T) and max_logit_rows rows of logits. */
typedef struct {
    int max_tokens, max_logit_rows;
    rs_arena plan;              /* the device block and what each buffer got (for printing) */
    void *x, *xn;               /* residual stream and its normalised copy [tokens, hidden] */
    void *q, *att;              /* [tokens, n_heads*hd] */
    void *k, *v, *kv_packed;    /* [tokens, n_kv*hd]; kv_packed: real rows of a padded batch */
    void *gate, *up, *mlp;      /* [tokens, intermediate] */
    void *x_last;               /* [logit rows, hidden] the rows whose logits are wanted */
    void *logits_act;           /* [logit rows, vocab] in act dtype */
    float *logits;              /* [logit rows, vocab] fp32 */
    int32_t *ids, *pos, *cache_rows, *real_rows, *last_rows; /* device index arrays */
    int32_t *host_ints;         /* host staging for the five index arrays */
    float *lora_xa;             /* [tokens, rank] fp32: x A^T of an attached adapter (adapter.h) */
} rs_activations;

typedef struct {
    rs_model_config cfg;
    const rs_backend *be;
    void *params;          /* the one device allocation holding every parameter */
    size_t params_bytes;
    size_t n_params;       /* parameter count (tied embeddings counted once) */
    void *embed;           /* [vocab, hidden] */
    void *final_norm;      /* [hidden] */
    void *lm_head;         /* [vocab, hidden]; == embed when tied */
    rs_layer_weights *layers; /* [n_layers] */
    float *inv_freq;       /* [head_dim/2] fp32 on the device, rope scaling applied */
    rs_activations act;    /* grown on demand by rs_model_reserve / rs_model_forward */
    /* Quantized linears (a quantized model directory, or rs_model_set_quantized): backend
     * copies owned by the model, pointed to by the layers' qw* slots. */
    int n_qweights;
    struct rs_qweight *qweights;
    char *quant_desc;      /* "int4-g128-asym rtn" style, NULL when dense */
    /* Optional calibration hook (quantization, quant_methods.h): rs_model_forward calls it with
     * the input x [n, in] (act dtype, backend memory; padded rows included) of each linear site
     * of each layer, site = the index of the first targeted linear reading it: 0 (q, k, v),
     * 3 (o), 4 (gate, up), 6 (down). NULL = off. */
    void (*capture)(void *user, int layer, int site, const void *x, int n, int in);
    void *capture_user;
    /* With capture set and 0 < capture_layers < n_layers, rs_model_forward runs only layers
     * < capture_layers and writes no logits (a capture of layer l needs nothing after it). */
    int capture_layers;
    /* An attached adapter (adapter.h: resafe_adapter.h5 of a merged directory), or NULL;
     * adapter_delta[layer * 7 + i]: its dense deltas for elementwise masks (weight dtype). */
    struct rs_lora *adapter;
    void **adapter_delta;
} rs_model;

/* KV cache: per layer, k and v of [batch, max_seq_len, n_kv_heads, head_dim] in act dtype
 * (appending a token writes one row), all in one device allocation. */
typedef struct {
    int batch, max_seq_len, n_layers;
    size_t layer_elems; /* batch * max_seq_len * n_kv_heads * head_dim */
    void *data;
    void **k, **v;      /* [n_layers] pointers into data */
} rs_kv_cache;

typedef enum {
    RS_LOGITS_LAST = 0, /* logits[B, vocab]: the last real (pos >= 0) token of each sequence */
    RS_LOGITS_ALL = 1,  /* logits[B*T, vocab]: every token (padded rows unspecified) */
} rs_logits_mode;

/* Load <dir>/config.json and the safetensors weights (F32/F16/BF16, converted to the backend's
 * weight dtype). Errors name the missing or mis-shaped tensor. */
int rs_model_load(const char *dir, const rs_backend *be, rs_model *m);
void rs_model_free(rs_model *m);
/* The bytes rs_model_load allocates on the device for config c's parameters (memplan.h);
 * quantized: without the 7 linears of each layer (their packed weights are the caller's sum). */
size_t rs_model_plan_bytes(const rs_model_config *c, rs_dtype weight_dtype, int quantized);

/* Replace the dense linears of m by quantized ones: qw[l * 7 + i] (host weights, copied to the
 * backend; NULL entries stay dense). The dense parameters stay allocated but unused. */
int rs_model_set_quantized(rs_model *m, const struct rs_qweight *const *qw, const char *desc);

/* Plan the activation buffers up front (forward grows them when a call needs more). */
int rs_model_reserve(rs_model *m, int max_tokens, int max_logit_rows);

int rs_kv_cache_init(const rs_model *m, int batch, int max_seq_len, rs_kv_cache *cache);
void rs_kv_cache_free(const rs_model *m, rs_kv_cache *cache);

/* Run tokens[B*T] at positions pos[B*T] (host arrays) through the model, writing their k/v
 * into the cache, and copy fp32 logits to the host array `logits` (see rs_logits_mode).
 * Returns 0, or -1 with a message for bad ids, positions or sizes.
 * _greedy: the same forward, but only ids[B] (host) come back: the argmax of each sequence's
 * last real token's logits (the first index on ties), computed on the device (backend
 * argmax_rows) so a greedy decoding step copies B ids instead of B x vocab floats. */
int rs_model_forward_greedy(rs_model *m, rs_kv_cache *cache, const int32_t *tokens,
                            const int32_t *pos, int B, int T, int32_t *ids);
int rs_model_forward(rs_model *m, rs_kv_cache *cache, const int32_t *tokens, const int32_t *pos,
                     int B, int T, rs_logits_mode mode, float *logits);

/* The factor the embedding rows are multiplied by (Gemma: sqrt(hidden) rounded to the
 * activation dtype, as HF does; others 1). Shared by the training forward and backward. */
float rs_model_embed_scale(const rs_model *m);

#endif
