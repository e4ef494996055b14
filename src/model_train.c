/* model_train: the training forward and backward of the Llama family (model_train.h).
 *
 * The forward reads like rs_model_forward (model.c) with Tq = Tk = T (no KV cache: the keys of
 * a right-padded sequence are its own rows) and keeps what the backward needs in one planned
 * arena; the backward walks the same ops in reverse:
 *   logprob_bwd <- lm_head <- final norm <- per layer, last to first:
 *     MLP:       down, glu, gate/up, mlp_norm (into the residual gradient)
 *     attention: o, attention, rope on dq/dk, q/k/v, attn_norm (into the residual gradient)
 *   <- embedding (Gemma's scale; tied: lm_head's gradient lands in the embedding's).
 * The adapter lives inside the linears: project() / project_bwd() add scale * B A drop(x), or
 * swap in the merged weight W + scale * (M ⊙ B A) in elementwise mode.
 * The logits, the largest activation, are never kept: forward and backward compute them in
 * chunks of rows (one extra lm_head matmul buys [tokens, vocab] of memory twice over). */
#include "resafe/model_train.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOGIT_CHUNK_ELEMS ((size_t)1 << 24) /* rows of logits per chunk: this / vocab */

/* What one layer's forward keeps for its backward. */
typedef struct {
    void *h;                      /* residual after attention [n, hidden] */
    void *xn1, *xn2;              /* normed inputs of attention and MLP [n, hidden] */
    float *rstd1, *rstd2;         /* their 1/rms [n] */
    void *q, *k, *v;              /* projections, q and k rotated [n, heads*hd], [n, kv*hd] */
    void *att;                    /* attention output [n, heads*hd] */
    float *att_lse;               /* its per-row statistics [heads, n] (attention_fwd_lse) */
    void *gate, *up, *mlp;        /* [n, inter] */
    float *xa[RS_LORA_N_TARGETS]; /* adapter x A^T [n, rank] */
} layer_acts;

struct rs_train_state {
    const rs_backend *be;
    int n_layers, max_tokens, chunk_rows;
    int recompute;            /* layers 0 .. recompute-1 recompute in backward (0 .. n_layers) */
    rs_arena plan;            /* the one device allocation */
    void **x;                 /* [n_layers + 1] each layer's input; x[n_layers] the final one */
    layer_acts *layer;        /* [n_acts]: one per layer that keeps its activations, [0] also
                                 shared by the recomputing layers (they run before layer
                                 `recompute` in the forward and after it in the backward) */
    int n_acts;
    void *xnf;                /* final norm output [n, hidden] */
    float *rstdf;             /* [n] */
    void *logits, *dlogits;   /* [chunk_rows, vocab] */
    float *logp, *lse, *dlogp; /* [n] */
    void *dres, *dxn;         /* residual-stream gradient, normed-input gradient [n, hidden] */
    void *datt, *dq, *dk, *dv; /* [n, heads*hd] x2, [n, kv*hd] x2 */
    void *dmlp, *dgate, *dup; /* [n, inter] */
    void *drop_x, *drop_dx;   /* adapter dropout: the dropped input and its gradient [n, max in] */
    void *w_eff;              /* elementwise: the merged weight [max out*in] (weight dtype) */
    float *dw_tmp;            /* elementwise: one backward's dW [max out*in] */
    int32_t *ids, *pos, *targets;             /* device [n] */
    int32_t *host_ids, *host_targets, *host_pos; /* host staging [n] */
    float *host_f;                            /* host staging [n] */
    /* shared prefixes (rs_train_batch n_prefix), planned when `prefixes`: the second attention
     * of a layer reads each sequence's keys and values joined behind its prefix's */
    int prefixes;
    void *kj, *vj;            /* joined keys, values [B, Tk, kv*hd] (room for n + 1 rows) */
    void *dkj, *dvj;          /* their gradients; row n (the plan's max tokens) stays zero */
    int32_t *join_rows;       /* device [n]: joined row -> row of k, v */
    int32_t *split_rows;      /* device [n]: a sequence's row of dk, dv <- row of dkj, dvj */
    int32_t *fold_rows;       /* device [n]: [n_cont][P*TP] a prefix row <- the dkj row of its
                                 c-th continuation */
    int32_t *host_rows;       /* host staging of the three [3n] */
    int P, TP, Tk, n_cont;    /* the staged batch's prefixes: P x TP rows ahead of B x T,
                                 joined length Tk, most continuations of a prefix */
    int joined;               /* the layer whose keys kj, vj hold (-1: none) */
    /* the adapter shape the plan has room for */
    int lora_rank, lora_elementwise, lora_dropout;
    unsigned lora_targets;
    rs_rng rng;
    uint64_t *dropout_seed;   /* [n_layers * RS_LORA_N_TARGETS] of the last forward */
    /* the last forward */
    int B, T, forward_done;
    const rs_lora *fwd_lora;  /* the adapter it ran with (NULL: none or disabled) */
    float fwd_dropout;        /* and its dropout (0: none) */
    int fwd_act_bits;         /* and its activation fake quantization (quantized att: no saved
                                 attention backward) */
    rs_layer_done_fn layer_done; /* rs_train_state_set_layer_hook */
    void *layer_done_user;
    int act_bits, kv_bits;    /* LLM-QAT fake quantization of linear inputs and of K, V (0: off) */
};

/* One forward or backward call: what every op helper needs. */
typedef struct {
    rs_model *m;
    const rs_backend *be;
    const rs_model_config *c;
    rs_train_state *s;
    const rs_lora *lora;   /* NULL: no adapter in this pass */
    int adapter_on;        /* the adapter is in the graph (lora->enabled during the forward) */
    int dropout_on;
    float dropout;         /* its probability, as the forward drew its masks */
    rs_model_grads *grads; /* backward, full-parameter mode */
    int n, B, T;           /* n rows: the P x TP prefix rows (np), then B x T */
    int P, TP, Tk, n_cont;
    size_t np;
} pass;

static size_t act_size(const pass *p) { return rs_dtype_size(p->be->act_dtype); }

/* Row r of a [rows, width] act buffer. */
static void *act_row(const pass *p, void *buf, size_t r, size_t width) {
    return (char *)buf + r * width * act_size(p);
}

/* ---------------------------------------------------------------- the linears */

typedef struct {
    const void *w, *b; /* W [out, in], bias [out] or NULL */
    float *dw, *db;    /* where this pass accumulates their gradients (NULL: not wanted) */
    int in, out;
    const struct rs_qweight *q; /* the quantized weight (w is then NULL), or NULL */
} linear_ref;

/* The adapter of target t in layer l, NULL when there is none. */
static rs_lora_linear *adapter(const pass *p, int l, rs_lora_target t) {
    if (!p->lora) return NULL;
    rs_lora_linear *a = &p->lora->lin[l * RS_LORA_N_TARGETS + (int)t];
    return a->in > 0 ? a : NULL;
}

/* Weights of target t in layer l, and the gradients this pass wants for them: all of them in
 * full-parameter mode; with an adapter the base is frozen and only a targeted linear's dW is
 * accumulated, when want_weight_grad. */
static linear_ref linear_at(const pass *p, int l, rs_lora_target t) {
    const rs_model_config *c = p->c;
    const rs_layer_weights *w = &p->m->layers[l];
    rs_layer_grads g = p->grads ? p->grads->layers[l] : (rs_layer_grads){0};
    int D = c->hidden_size, F = c->intermediate_size;
    int Q = c->n_heads * c->head_dim, KV = c->n_kv_heads * c->head_dim;
    linear_ref r;
    switch (t) {
    case RS_LORA_Q: r = (linear_ref){w->wq, w->bq, g.wq, g.bq, D, Q, w->qwq}; break;
    case RS_LORA_K: r = (linear_ref){w->wk, w->bk, g.wk, g.bk, D, KV, w->qwk}; break;
    case RS_LORA_V: r = (linear_ref){w->wv, w->bv, g.wv, g.bv, D, KV, w->qwv}; break;
    case RS_LORA_O: r = (linear_ref){w->wo, w->bo, g.wo, g.bo, Q, D, w->qwo}; break;
    case RS_LORA_GATE:
        r = (linear_ref){w->w_gate, w->b_gate, g.w_gate, g.b_gate, D, F, w->qw_gate};
        break;
    case RS_LORA_UP: r = (linear_ref){w->w_up, w->b_up, g.w_up, g.b_up, D, F, w->qw_up}; break;
    default: r = (linear_ref){w->w_down, w->b_down, g.w_down, g.b_down, F, D, w->qw_down}; break;
    }
    if (!p->grads) {
        rs_lora_linear *a = adapter(p, l, t);
        r.dw = a ? a->dW : NULL;
        r.db = NULL;
    }
    return r;
}

static uint64_t dropout_seed(const pass *p, int l, rs_lora_target t) {
    return p->s->dropout_seed[l * RS_LORA_N_TARGETS + (int)t];
}

/* The adapter's input: x, or drop(x) in the scratch buffer. */
static const void *adapter_input(const pass *p, int l, rs_lora_target t, const void *x, int in) {
    if (!p->dropout_on) return x;
    p->be->dropout(p->s->drop_x, x, (size_t)p->n * in, p->dropout, dropout_seed(p, l, t));
    return p->s->drop_x;
}

/* W + scale * (M ⊙ B A) into the state's scratch weight. */
static const void *merged_weight(const pass *p, const rs_lora_linear *a, const linear_ref *r) {
    const void *w = r->w;
    if (r->q) { /* quantized: dequantize into the scratch, merge in place */
        p->be->qdequantize(p->s->w_eff, r->q);
        w = p->s->w_eff;
    }
    p->be->lora_merge(p->s->w_eff, w, a->A, a->B, a->mask_W, r->out, r->in, p->lora->rank,
                      p->lora->scale);
    return p->s->w_eff;
}

/* out = beta * out + x W^T + b, plus the adapter of (l, t) when it is on. The adapter goes
 * first and the frozen product accumulates onto it: the adapter's rank-r product is bound by the
 * bytes of out (reading them as well costs a pass over out), the frozen one by its flops (its
 * read of out hides behind them). */
static void project(const pass *p, int l, rs_lora_target t, void *out, const void *x, float beta,
                    float *xa) {
    linear_ref r = linear_at(p, l, t);
    rs_lora_linear *a = p->adapter_on ? adapter(p, l, t) : NULL;
    if (a && p->lora->mask_mode == RS_MASK_ELEMENTWISE) {
        p->be->linear_fwd(out, x, merged_weight(p, a, &r), r.b, p->n, r.in, r.out, beta);
        return;
    }
    if (a) {
        p->be->lora_fwd(out, xa, adapter_input(p, l, t, x, r.in), a->A, a->B, p->n, r.in, r.out,
                        p->lora->rank, p->lora->scale, beta);
        beta = 1.0f;
    }
    rs_linear_fwd(p->be, out, x, r.w, r.q, r.b, p->n, r.in, r.out, beta);
}

/* Elementwise mode: the full weight gradient of this backward (scratch), turned into dA, dB;
 * dW for SNIP takes a second weight-gradient product (no fp32 add op to reuse the scratch). */
static void elementwise_bwd(const pass *p, const rs_lora_linear *a, const linear_ref *r, void *dx,
                            float beta, const void *dout, const void *x) {
    const rs_backend *be = p->be;
    const void *w_eff = merged_weight(p, a, r);
    be->zero_f32(p->s->dw_tmp, (size_t)r->out * r->in);
    be->linear_bwd(dx, p->s->dw_tmp, r->db, dout, x, w_eff, p->n, r->in, r->out, beta);
    be->lora_masked_grad(a->dA, a->dB, p->s->dw_tmp, a->mask_W, a->A, a->B, r->out, r->in,
                         p->lora->rank, p->lora->scale);
    if (r->dw) be->linear_bwd(NULL, r->dw, NULL, dout, x, w_eff, p->n, r->in, r->out, 0.0f);
}

/* dA, dB of scale * B A drop(x), and dx = beta * dx + its input gradient (dx may be NULL;
 * beta must be 1 with dropout). The dropout mask is regenerated from the forward's seed. */
static void adapter_bwd(const pass *p, int l, rs_lora_target t, const rs_lora_linear *a,
                        const linear_ref *r, void *dx, float beta, const void *dout, const void *x,
                        const float *xa) {
    const rs_backend *be = p->be;
    const rs_lora *lo = p->lora;
    if (!p->dropout_on) {
        be->lora_bwd(dx, a->dA, a->dB, dout, x, xa, a->A, a->B, p->n, r->in, r->out, lo->rank,
                     lo->scale, beta);
        return;
    }
    size_t n_in = (size_t)p->n * r->in;
    void *dxd = dx ? p->s->drop_dx : NULL;
    const void *xd = adapter_input(p, l, t, x, r->in);
    be->lora_bwd(dxd, a->dA, a->dB, dout, xd, xa, a->A, a->B, p->n, r->in, r->out, lo->rank,
                 lo->scale, 0.0f);
    if (!dx) return;
    be->dropout(dxd, dxd, n_in, p->dropout, dropout_seed(p, l, t));
    be->add_inplace(dx, dxd, n_in);
}

/* The frozen linear's part of project_bwd(): dx = beta * dx + dout W (dx NULL: not wanted), and
 * the weight / bias gradients the pass wants. */
static void frozen_bwd(const pass *p, const linear_ref *r, void *dx, float beta, const void *dout,
                       const void *x) {
    if (r->q) {
        /* frozen quantized weight: dx through qmatmul_t; dW (SNIP) and db need only x, dout */
        if (dx) p->be->qmatmul_t(dx, dout, r->q, p->n, beta);
        if (r->dw || r->db)
            p->be->linear_bwd(NULL, r->dw, r->db, dout, x, NULL, p->n, r->in, r->out, 0.0f);
    } else {
        p->be->linear_bwd(dx, r->dw, r->db, dout, x, r->w, p->n, r->in, r->out, beta);
    }
}

/* Backward of project(): dx = beta * dx + dout W_eff (dx NULL: not wanted) and the gradients
 * this pass wants. Without dropout the adapter's input gradient goes first and the frozen one
 * accumulates onto it, for project()'s reason (the rank-r product is bound by dx's bytes). */
static void project_bwd(const pass *p, int l, rs_lora_target t, void *dx, float beta,
                        const void *dout, const void *x, const float *xa) {
    linear_ref r = linear_at(p, l, t);
    rs_lora_linear *a = p->adapter_on ? adapter(p, l, t) : NULL;
    if (a && p->lora->mask_mode == RS_MASK_ELEMENTWISE) {
        elementwise_bwd(p, a, &r, dx, beta, dout, x);
        return;
    }
    const int adapter_first = a && !p->dropout_on;
    if (adapter_first) {
        adapter_bwd(p, l, t, a, &r, dx, beta, dout, x, xa);
        beta = 1.0f;
    }
    frozen_bwd(p, &r, dx, beta, dout, x);
    if (a && !adapter_first) adapter_bwd(p, l, t, a, &r, dx, 1.0f, dout, x, xa);
}

/* The targets that read one input: q, k, v (the first norm's output) and gate, up (the
 * second's). */
static const rs_lora_target QKV[3] = {RS_LORA_Q, RS_LORA_K, RS_LORA_V};
static const rs_lora_target GATE_UP[2] = {RS_LORA_GATE, RS_LORA_UP};

/* Whether the adapters of the count targets t (one input) run as one group (lora_fwd_group /
 * lora_bwd_group): every one on, factor or no masks, no dropout (each target's own mask would
 * make the inputs differ). Fills g (xa: the targets' saved x A^T). */
static int adapter_group(const pass *p, int l, const rs_lora_target *t, int count,
                         float *const *xa, rs_lora_group *g) {
    if (!p->adapter_on || p->dropout_on || p->lora->mask_mode == RS_MASK_ELEMENTWISE ||
        !p->be->lora_fwd_group || !p->be->lora_bwd_group || count > RS_LORA_GROUP_MAX)
        return 0;
    g->count = count;
    for (int i = 0; i < count; i++) {
        rs_lora_linear *a = adapter(p, l, t[i]);
        if (!a) return 0;
        g->m[i] = linear_at(p, l, t[i]).out;
        g->A[i] = a->A, g->B[i] = a->B, g->xa[i] = xa[i], g->dA[i] = a->dA, g->dB[i] = a->dB;
    }
    return 1;
}

/* project() (beta 0) of count targets that read the same x: the adapters first, as one group
 * where they can be, then each frozen product accumulates onto its output. */
static void project_shared(const pass *p, int l, const rs_lora_target *t, int count,
                           void *const *out, const void *x, float *const *xa) {
    rs_lora_group g;
    if (!adapter_group(p, l, t, count, xa, &g)) {
        for (int i = 0; i < count; i++) project(p, l, t[i], out[i], x, 0.0f, xa[i]);
        return;
    }
    p->be->lora_fwd_group(out, x, &g, p->n, linear_at(p, l, t[0]).in, p->lora->rank,
                          p->lora->scale, 0.0f);
    for (int i = 0; i < count; i++) {
        linear_ref r = linear_at(p, l, t[i]);
        rs_linear_fwd(p->be, out[i], x, r.w, r.q, r.b, p->n, r.in, r.out, 1.0f);
    }
}

/* Backward of project_shared(): dx = the sum of the targets' input gradients (dx NULL: not
 * wanted), the adapters' as one group where they can be, then the frozen ones accumulate. */
static void project_bwd_shared(const pass *p, int l, const rs_lora_target *t, int count, void *dx,
                               const void *const *dout, const void *x, float *const *xa) {
    rs_lora_group g;
    if (!adapter_group(p, l, t, count, xa, &g)) {
        for (int i = 0; i < count; i++)
            project_bwd(p, l, t[i], dx, i == 0 ? 0.0f : 1.0f, dout[i], x, xa[i]);
        return;
    }
    p->be->lora_bwd_group(dx, dout, x, &g, p->n, linear_at(p, l, t[0]).in, p->lora->rank,
                          p->lora->scale, 0.0f);
    for (int i = 0; i < count; i++) {
        linear_ref r = linear_at(p, l, t[i]);
        frozen_bwd(p, &r, dx, 1.0f, dout[i], x);
    }
}

/* ---------------------------------------------------------------- forward */

/* LLM-QAT fake quantization, in place (straight-through: the backward does nothing, and every
 * later reader of the buffer, the weight gradient included, sees the quantized values).
 * Linear inputs: per token, symmetric; K (after RoPE) and V: per token and kv head,
 * asymmetric. */
static void quant_act(const pass *p, void *x, int width) {
    if (p->s->act_bits) p->be->fake_quant_groups(x, (size_t)p->n, width, p->s->act_bits, 1);
}

static void quant_kv(const pass *p, void *kv) {
    const rs_model_config *c = p->c;
    if (p->s->kv_bits)
        p->be->fake_quant_groups(kv, (size_t)p->n * c->n_kv_heads, c->head_dim, p->s->kv_bits, 0);
}

/* Queries q [B, Tq] over keys and values [B, Tk]: with the statistics the saved backward
 * reads when the backend offers that pair. */
static void attend(const pass *p, void *out, float *lse, const void *q, const void *k,
                   const void *v, const int32_t *pos, int B, int Tq, int Tk) {
    const rs_backend *be = p->be;
    const rs_model_config *c = p->c;
    if (be->attention_fwd_lse && be->attention_bwd_saved)
        be->attention_fwd_lse(out, lse, q, k, v, pos, B, Tq, Tk, c->n_heads, c->n_kv_heads,
                              c->head_dim, c->attn_scale);
    else
        be->attention_fwd(out, q, k, v, pos, B, Tq, Tk, c->n_heads, c->n_kv_heads, c->head_dim,
                          c->attn_scale);
}

/* Each sequence's keys and values of layer l behind its prefix's: kj, vj [B, Tk] (the rows
 * past a sequence's end are copies nobody attends). */
static void join_kv(const pass *p, int l, const layer_acts *a) {
    rs_train_state *s = p->s;
    int KV = p->c->n_kv_heads * p->c->head_dim;
    p->be->gather_rows(s->kj, a->k, s->join_rows, p->B * p->Tk, KV);
    p->be->gather_rows(s->vj, a->v, s->join_rows, p->B * p->Tk, KV);
    s->joined = l;
}

/* The attention of a layer: the sequences among themselves; with prefixes, the prefixes among
 * themselves (their rows first), then the sequences over their joined keys. */
static void attention_core_fwd(const pass *p, int l, layer_acts *a) {
    const rs_train_state *s = p->s;
    if (!p->P) {
        attend(p, a->att, a->att_lse, a->q, a->k, a->v, s->pos, p->B, p->T, p->T);
        return;
    }
    size_t Q = (size_t)p->c->n_heads * p->c->head_dim;
    attend(p, a->att, a->att_lse, a->q, a->k, a->v, s->pos, p->P, p->TP, p->TP);
    join_kv(p, l, a);
    attend(p, act_row(p, a->att, p->np, Q), a->att_lse + p->np * (size_t)p->c->n_heads,
           act_row(p, a->q, p->np, Q), s->kj, s->vj, s->pos + p->np, p->B, p->T, p->Tk);
}

/* h = x + W_o attention(rope(W_q n1(x)), rope(W_k n1(x)), W_v n1(x)) */
static void attention_fwd(const pass *p, int l, layer_acts *a, const void *x) {
    const rs_backend *be = p->be;
    const rs_model_config *c = p->c;
    const rs_layer_weights *w = &p->m->layers[l];
    rs_train_state *s = p->s;
    int n = p->n, D = c->hidden_size;
    be->rmsnorm_fwd(a->xn1, a->rstd1, x, w->attn_norm, n, D, c->rms_norm_eps, c->norm_add_one);
    quant_act(p, a->xn1, D);
    project_shared(p, l, QKV, 3, (void *const[]){a->q, a->k, a->v}, a->xn1,
                   (float *const[]){a->xa[RS_LORA_Q], a->xa[RS_LORA_K], a->xa[RS_LORA_V]});
    be->rope_fwd(a->q, s->pos, p->m->inv_freq, n, c->n_heads, c->head_dim);
    be->rope_fwd(a->k, s->pos, p->m->inv_freq, n, c->n_kv_heads, c->head_dim);
    quant_kv(p, a->k);
    quant_kv(p, a->v);
    attention_core_fwd(p, l, a);
    quant_act(p, a->att, c->n_heads * c->head_dim);
    be->copy(a->h, x, (size_t)n * D * act_size(p));
    project(p, l, RS_LORA_O, a->h, a->att, 1.0f, a->xa[RS_LORA_O]); /* beta 1: the residual */
}

/* x_out = h + W_down (act(W_gate n2(h)) * W_up n2(h)) */
static void mlp_fwd(const pass *p, int l, layer_acts *a, void *x_out) {
    const rs_backend *be = p->be;
    const rs_model_config *c = p->c;
    int n = p->n, D = c->hidden_size, F = c->intermediate_size;
    be->rmsnorm_fwd(a->xn2, a->rstd2, a->h, p->m->layers[l].mlp_norm, n, D, c->rms_norm_eps,
                    c->norm_add_one);
    quant_act(p, a->xn2, D);
    project_shared(p, l, GATE_UP, 2, (void *const[]){a->gate, a->up}, a->xn2,
                   (float *const[]){a->xa[RS_LORA_GATE], a->xa[RS_LORA_UP]});
    be->glu_fwd(a->mlp, a->gate, a->up, (size_t)n * F, c->hidden_act);
    quant_act(p, a->mlp, F);
    be->copy(x_out, a->h, (size_t)n * D * act_size(p));
    project(p, l, RS_LORA_DOWN, x_out, a->mlp, 1.0f, a->xa[RS_LORA_DOWN]);
}

static layer_acts *acts_of(const pass *p, int l) {
    const rs_train_state *s = p->s;
    return &s->layer[l < s->recompute ? 0 : l - s->recompute];
}

static void layer_fwd(const pass *p, int l) {
    layer_acts *a = acts_of(p, l);
    attention_fwd(p, l, a, p->s->x[l]);
    mlp_fwd(p, l, a, p->s->x[l + 1]);
}

/* logp[i] = log softmax(W_lm norm(x_L))[targets[i]], chunk by chunk of rows. */
static void logprob_fwd(const pass *p) {
    const rs_backend *be = p->be;
    const rs_model_config *c = p->c;
    rs_train_state *s = p->s;
    int D = c->hidden_size, V = c->vocab_size;
    be->rmsnorm_fwd(s->xnf, s->rstdf, s->x[c->n_layers], p->m->final_norm, p->n, D,
                    c->rms_norm_eps, c->norm_add_one);
    for (int r0 = 0; r0 < p->n; r0 += s->chunk_rows) {
        int rows = p->n - r0 < s->chunk_rows ? p->n - r0 : s->chunk_rows;
        be->linear_fwd(s->logits, act_row(p, s->xnf, (size_t)r0, (size_t)D), p->m->lm_head, NULL,
                       rows, D, V, 0.0f);
        be->logprob_fwd(s->logp + r0, s->lse + r0, s->logits, s->targets + r0, rows, V);
    }
}

/* ---------------------------------------------------------------- backward */

/* From the log-prob gradients to dres = d/dx_L, through lm_head and the final norm. */
static void logprob_bwd(const pass *p) {
    const rs_backend *be = p->be;
    const rs_model_config *c = p->c;
    rs_train_state *s = p->s;
    rs_model_grads *g = p->grads;
    int D = c->hidden_size, V = c->vocab_size;
    for (int r0 = 0; r0 < p->n; r0 += s->chunk_rows) {
        int rows = p->n - r0 < s->chunk_rows ? p->n - r0 : s->chunk_rows;
        const void *xnf = act_row(p, s->xnf, (size_t)r0, (size_t)D);
        be->linear_fwd(s->logits, xnf, p->m->lm_head, NULL, rows, D, V, 0.0f); /* recomputed */
        be->logprob_bwd(s->dlogits, s->dlogp + r0, s->logits, s->lse + r0, s->targets + r0, rows, V);
        be->linear_bwd(act_row(p, s->dxn, (size_t)r0, (size_t)D), g ? g->lm_head : NULL, NULL,
                       s->dlogits, xnf, p->m->lm_head, rows, D, V, 0.0f);
    }
    be->rmsnorm_bwd(s->dres, g ? g->final_norm : NULL, s->dxn, s->x[c->n_layers], p->m->final_norm,
                    s->rstdf, p->n, D, c->norm_add_one, 0.0f);
}

/* dres: d/dx_out in, d/dh out (the residual passes straight through, norm_bwd adds to it). */
static void mlp_bwd(const pass *p, int l, const layer_acts *a) {
    const rs_backend *be = p->be;
    const rs_model_config *c = p->c;
    rs_train_state *s = p->s;
    int n = p->n, D = c->hidden_size, F = c->intermediate_size;
    project_bwd(p, l, RS_LORA_DOWN, s->dmlp, 0.0f, s->dres, a->mlp, a->xa[RS_LORA_DOWN]);
    be->glu_bwd(s->dgate, s->dup, s->dmlp, a->gate, a->up, (size_t)n * F, c->hidden_act);
    project_bwd_shared(p, l, GATE_UP, 2, s->dxn, (const void *const[]){s->dgate, s->dup}, a->xn2,
                       (float *const[]){a->xa[RS_LORA_GATE], a->xa[RS_LORA_UP]});
    be->rmsnorm_bwd(s->dres, p->grads ? p->grads->layers[l].mlp_norm : NULL, s->dxn, a->h,
                    p->m->layers[l].mlp_norm, a->rstd2, n, D, c->norm_add_one, 1.0f);
}

/* The backward of attend (the saved form unless LLM-QAT quantized the output afterwards). */
static void attend_bwd(const pass *p, void *dq, void *dk, void *dv, const void *dout,
                       const void *q, const void *k, const void *v, const void *out,
                       const float *lse, const int32_t *pos, int B, int Tq, int Tk) {
    const rs_backend *be = p->be;
    const rs_model_config *c = p->c;
    if (be->attention_fwd_lse && be->attention_bwd_saved && !p->s->fwd_act_bits)
        be->attention_bwd_saved(dq, dk, dv, dout, q, k, v, out, lse, pos, B, Tq, Tk, c->n_heads,
                                c->n_kv_heads, c->head_dim, c->attn_scale);
    else
        be->attention_bwd(dq, dk, dv, dout, q, k, v, pos, B, Tq, Tk, c->n_heads, c->n_kv_heads,
                          c->head_dim, c->attn_scale);
}

/* datt in; dq, dk, dv out (every row written; padding's 0). With prefixes: the sequences'
 * gradients over their joined keys, the prefixes' own, then the joined key rows go back where
 * they came from: a sequence's own rows, and a prefix row summed over its continuations. */
static void attention_core_bwd(const pass *p, int l, const layer_acts *a) {
    const rs_backend *be = p->be;
    rs_train_state *s = p->s;
    if (!p->P) {
        attend_bwd(p, s->dq, s->dk, s->dv, s->datt, a->q, a->k, a->v, a->att, a->att_lse, s->pos,
                   p->B, p->T, p->T);
        return;
    }
    size_t Q = (size_t)p->c->n_heads * p->c->head_dim, np = p->np;
    int KV = p->c->n_kv_heads * p->c->head_dim;
    if (s->joined != l) join_kv(p, l, a); /* the top layer's, and a recomputed one's, are there */
    attend_bwd(p, act_row(p, s->dq, np, Q), s->dkj, s->dvj, act_row(p, s->datt, np, Q),
               act_row(p, a->q, np, Q), s->kj, s->vj, act_row(p, a->att, np, Q),
               a->att_lse + np * (size_t)p->c->n_heads, s->pos + np, p->B, p->T, p->Tk);
    attend_bwd(p, s->dq, s->dk, s->dv, s->datt, a->q, a->k, a->v, a->att, a->att_lse, s->pos,
               p->P, p->TP, p->TP);
    be->gather_rows(act_row(p, s->dk, np, (size_t)KV), s->dkj, s->split_rows, p->B * p->T, KV);
    be->gather_rows(act_row(p, s->dv, np, (size_t)KV), s->dvj, s->split_rows, p->B * p->T, KV);
    for (int c = 0; c < p->n_cont; c++) { /* datt is free now: the scratch of the sums */
        const int32_t *rows = s->fold_rows + (size_t)c * np;
        be->gather_rows(s->datt, s->dkj, rows, (int)np, KV);
        be->add_inplace(s->dk, s->datt, np * (size_t)KV);
        be->gather_rows(s->datt, s->dvj, rows, (int)np, KV);
        be->add_inplace(s->dv, s->datt, np * (size_t)KV);
    }
}

/* dres: d/dh in, d/dx out. need_dx = 0 (the first layer under an adapter, whose input
 * gradient nobody needs) skips the input gradient. */
static void attention_bwd(const pass *p, int l, const layer_acts *a, const void *x, int need_dx) {
    const rs_backend *be = p->be;
    const rs_model_config *c = p->c;
    rs_train_state *s = p->s;
    int n = p->n, D = c->hidden_size;
    project_bwd(p, l, RS_LORA_O, s->datt, 0.0f, s->dres, a->att, a->xa[RS_LORA_O]);
    attention_core_bwd(p, l, a);
    be->rope_bwd(s->dq, s->pos, p->m->inv_freq, n, c->n_heads, c->head_dim);
    be->rope_bwd(s->dk, s->pos, p->m->inv_freq, n, c->n_kv_heads, c->head_dim);
    void *dxn = need_dx ? s->dxn : NULL;
    project_bwd_shared(p, l, QKV, 3, dxn, (const void *const[]){s->dq, s->dk, s->dv}, a->xn1,
                       (float *const[]){a->xa[RS_LORA_Q], a->xa[RS_LORA_K], a->xa[RS_LORA_V]});
    if (need_dx)
        be->rmsnorm_bwd(s->dres, p->grads ? p->grads->layers[l].attn_norm : NULL, s->dxn, x,
                        p->m->layers[l].attn_norm, a->rstd1, n, D, c->norm_add_one, 1.0f);
}

static void layer_bwd(const pass *p, int l) {
    if (l < p->s->recompute) layer_fwd(p, l); /* bit-identical to the forward's values */
    const layer_acts *a = acts_of(p, l);
    mlp_bwd(p, l, a);
    attention_bwd(p, l, a, p->s->x[l], l > 0 || p->grads != NULL);
}

/* ---------------------------------------------------------------- the memory plan */

typedef struct {
    const char *name;
    size_t elems, elem_size;
    int count;          /* copies (one per layer) */
    void **slot;        /* where copy i's pointer goes: (char *)slot + i * slot_stride */
    size_t slot_stride;
} buf_spec;

typedef struct {
    buf_spec items[64];
    int n;
} spec_list;

static void add(spec_list *l, const char *name, size_t elems, size_t elem_size, int count,
                void **slot, size_t slot_stride) {
    RS_CHECK(l->n < (int)(sizeof l->items / sizeof l->items[0]), "train plan: too many buffers");
    l->items[l->n++] = (buf_spec){name, elems, elem_size, count, slot, slot_stride};
}

/* Overflow-checked product (SIZE_MAX on overflow, which the total then rejects). */
static size_t mul(size_t a, size_t b) {
    size_t out;
    return rs_mul_size(a, b, &out) == 0 ? out : SIZE_MAX;
}

/* A per-layer buffer: copy i goes to layer[i].<field at offset>. */
static void add_layer(spec_list *l, rs_train_state *s, const char *name, size_t elems,
                      size_t elem_size, size_t field_offset) {
    add(l, name, elems, elem_size, s->n_acts, (void **)((char *)s->layer + field_offset),
        sizeof(layer_acts));
}

#define LAYER_FIELD(f) offsetof(layer_acts, f)

static void list_layer_buffers(spec_list *l, rs_train_state *s, const rs_model_config *c,
                               size_t act) {
    size_t n = (size_t)s->max_tokens, D = c->hidden_size, F = c->intermediate_size;
    size_t Q = (size_t)c->n_heads * c->head_dim, KV = (size_t)c->n_kv_heads * c->head_dim;
    add(l, "x layer inputs [n,hidden]", mul(n, D), act, s->n_layers + 1, (void **)s->x,
        sizeof(void *));
    add_layer(l, s, "h [n,hidden]", mul(n, D), act, LAYER_FIELD(h));
    add_layer(l, s, "xn1 [n,hidden]", mul(n, D), act, LAYER_FIELD(xn1));
    add_layer(l, s, "xn2 [n,hidden]", mul(n, D), act, LAYER_FIELD(xn2));
    add_layer(l, s, "rstd1 [n]", n, sizeof(float), LAYER_FIELD(rstd1));
    add_layer(l, s, "rstd2 [n]", n, sizeof(float), LAYER_FIELD(rstd2));
    add_layer(l, s, "q [n,heads*hd]", mul(n, Q), act, LAYER_FIELD(q));
    add_layer(l, s, "k [n,kv*hd]", mul(n, KV), act, LAYER_FIELD(k));
    add_layer(l, s, "v [n,kv*hd]", mul(n, KV), act, LAYER_FIELD(v));
    add_layer(l, s, "att [n,heads*hd]", mul(n, Q), act, LAYER_FIELD(att));
    add_layer(l, s, "att lse [heads,n]", mul(n, (size_t)c->n_heads), sizeof(float),
              LAYER_FIELD(att_lse));
    add_layer(l, s, "gate [n,inter]", mul(n, F), act, LAYER_FIELD(gate));
    add_layer(l, s, "up [n,inter]", mul(n, F), act, LAYER_FIELD(up));
    add_layer(l, s, "mlp [n,inter]", mul(n, F), act, LAYER_FIELD(mlp));
    static const char *const xa_names[RS_LORA_N_TARGETS] = {
        "xa q [n,rank]", "xa k [n,rank]", "xa v [n,rank]", "xa o [n,rank]",
        "xa gate [n,rank]", "xa up [n,rank]", "xa down [n,rank]"};
    for (int t = 0; t < RS_LORA_N_TARGETS; t++)
        if (!s->lora_elementwise && (s->lora_targets & (1u << t)))
            add_layer(l, s, xa_names[t], mul(n, (size_t)s->lora_rank), sizeof(float),
                      LAYER_FIELD(xa) + (size_t)t * sizeof(float *));
}

#define ONE(l, name, elems, size, field) add(l, name, elems, size, 1, (void **)&(field), 0)

static void list_step_buffers(spec_list *l, rs_train_state *s, const rs_model_config *c,
                              size_t act, size_t wsize) {
    size_t n = (size_t)s->max_tokens, D = c->hidden_size, F = c->intermediate_size;
    size_t Q = (size_t)c->n_heads * c->head_dim, KV = (size_t)c->n_kv_heads * c->head_dim;
    size_t V = c->vocab_size, C = (size_t)s->chunk_rows, f = sizeof(float), i32 = sizeof(int32_t);
    ONE(l, "xnf final norm [n,hidden]", mul(n, D), act, s->xnf);
    ONE(l, "rstdf [n]", n, f, s->rstdf);
    ONE(l, "logits chunk [rows,vocab]", mul(C, V), act, s->logits);
    ONE(l, "dlogits chunk [rows,vocab]", mul(C, V), act, s->dlogits);
    ONE(l, "logp [n]", n, f, s->logp);
    ONE(l, "lse [n]", n, f, s->lse);
    ONE(l, "dlogp [n]", n, f, s->dlogp);
    ONE(l, "dres [n,hidden]", mul(n, D), act, s->dres);
    ONE(l, "dxn [n,hidden]", mul(n, D), act, s->dxn);
    ONE(l, "datt [n,heads*hd]", mul(n, Q), act, s->datt);
    ONE(l, "dq [n,heads*hd]", mul(n, Q), act, s->dq);
    ONE(l, "dk [n,kv*hd]", mul(n, KV), act, s->dk);
    ONE(l, "dv [n,kv*hd]", mul(n, KV), act, s->dv);
    ONE(l, "dmlp [n,inter]", mul(n, F), act, s->dmlp);
    ONE(l, "dgate [n,inter]", mul(n, F), act, s->dgate);
    ONE(l, "dup [n,inter]", mul(n, F), act, s->dup);
    size_t max_in = D > Q ? D : Q, max_w = mul(D, Q > F ? Q : F);
    max_in = max_in > F ? max_in : F;
    if (s->lora_dropout) {
        ONE(l, "dropout x [n,max in]", mul(n, max_in), act, s->drop_x);
        ONE(l, "dropout dx [n,max in]", mul(n, max_in), act, s->drop_dx);
    }
    if (s->lora_elementwise) {
        ONE(l, "merged weight [max out*in]", max_w, wsize, s->w_eff);
        ONE(l, "dW scratch [max out*in]", max_w, f, s->dw_tmp);
    }
    ONE(l, "ids [n]", n, i32, s->ids);
    ONE(l, "pos [n]", n, i32, s->pos);
    ONE(l, "targets [n]", n, i32, s->targets);
    if (s->prefixes) {
        size_t rows = n + 1; /* + the zero row */
        ONE(l, "joined k [n+1,kv*hd]", mul(rows, KV), act, s->kj);
        ONE(l, "joined v [n+1,kv*hd]", mul(rows, KV), act, s->vj);
        ONE(l, "joined dk [n+1,kv*hd]", mul(rows, KV), act, s->dkj);
        ONE(l, "joined dv [n+1,kv*hd]", mul(rows, KV), act, s->dvj);
        ONE(l, "join rows [n]", n, i32, s->join_rows);
        ONE(l, "split rows [n]", n, i32, s->split_rows);
        ONE(l, "fold rows [n]", n, i32, s->fold_rows);
    }
}

/* The bytes of the listed buffers, each 64-byte aligned. */
static int plan_total(const rs_train_state *s, const spec_list *l, size_t *total) {
    *total = 0;
    for (int i = 0; i < l->n; i++) {
        size_t one = rs_align64(mul(l->items[i].elems, l->items[i].elem_size));
        if (l->items[i].elems == SIZE_MAX || one < l->items[i].elems ||
            rs_add_size(*total, mul(one, (size_t)l->items[i].count), total) != 0 ||
            *total == SIZE_MAX)
            return RS_FAIL("training activations for %d tokens overflow the address space",
                           s->max_tokens);
    }
    return 0;
}

/* Sizes, then one allocation carved in list order. */
static int allocate_plan(rs_train_state *s, const rs_backend *be, const spec_list *l) {
    size_t total;
    RS_TRY(plan_total(s, l, &total));
    s->plan.base = be->alloc(total);
    s->plan.capacity = total;
    for (int i = 0; i < l->n; i++) {
        const buf_spec *b = &l->items[i];
        size_t one = rs_align64(b->elems * b->elem_size);
        char name[48];
        snprintf(name, sizeof name, b->count > 1 ? "%s x%d" : "%s", b->name, b->count);
        char *base = rs_arena_alloc(&s->plan, name, one * (size_t)b->count);
        for (int j = 0; j < b->count; j++)
            *(void **)((char *)b->slot + (size_t)j * b->slot_stride) = base + (size_t)j * one;
    }
    return 0;
}

static int check_backend(const rs_backend *be) {
    if (!be->embedding_bwd || !be->rmsnorm_bwd || !be->linear_bwd || !be->rope_bwd ||
        !be->attention_bwd || !be->glu_bwd || !be->logprob_fwd || !be->logprob_bwd ||
        !be->zero_f32)
        return RS_FAIL("the %s backend cannot train yet (backward ops missing)", be->name);
    return 0;
}

static int check_adapter_plan(const rs_model *m, const rs_lora *lora) {
    const rs_backend *be = m->be;
    if (lora->be != be || lora->n_layers != m->cfg.n_layers)
        return RS_FAIL("LoRA adapter was made for another model (%d layers, backend %s)",
                       lora->n_layers, lora->be ? lora->be->name : "none");
    if (lora->dropout < 0.0f || !(lora->dropout < 1.0f))
        return RS_FAIL("LoRA dropout %g outside [0, 1)", lora->dropout);
    if (lora->dropout > 0.0f && lora->mask_mode == RS_MASK_ELEMENTWISE)
        return RS_FAIL("LoRA dropout is not defined with elementwise masks (the adapter is merged "
                       "into the weight): set dropout 0");
    if (lora->dropout > 0.0f && !be->dropout)
        return RS_FAIL("the %s backend has no dropout op: set LoRA dropout 0", be->name);
    if (!be->lora_fwd || !be->lora_bwd || !be->lora_merge || !be->lora_masked_grad)
        return RS_FAIL("the %s backend has no LoRA ops yet", be->name);
    if (m->n_qweights && lora->mask_mode == RS_MASK_ELEMENTWISE && !be->qdequantize)
        return RS_FAIL("the %s backend cannot merge an elementwise adapter into quantized "
                       "weights (no qdequantize op): use factor masks", be->name);
    return 0;
}

/* A state with its shape and pointer tables, nothing on the device yet. */
static rs_train_state *new_state(const rs_model_config *c, const rs_train_adapter_shape *lora,
                                 int max_tokens, int recompute, int prefixes) {
    rs_train_state *s = rs_calloc(1, sizeof *s);
    s->n_layers = c->n_layers;
    s->prefixes = prefixes != 0;
    s->max_tokens = max_tokens;
    s->recompute = recompute < 0 ? 0 : recompute > c->n_layers ? c->n_layers : recompute;
    s->n_acts = s->recompute < c->n_layers ? c->n_layers - s->recompute : 1;
    size_t rows = LOGIT_CHUNK_ELEMS / (size_t)c->vocab_size;
    s->chunk_rows = rows < 1 ? 1 : rows > (size_t)s->max_tokens ? s->max_tokens : (int)rows;
    s->lora_rank = lora->rank;
    s->lora_targets = lora->targets;
    s->lora_elementwise = lora->elementwise != 0;
    s->lora_dropout = lora->dropout != 0;
    s->x = rs_calloc((size_t)c->n_layers + 1, sizeof *s->x);
    s->layer = rs_calloc(s->n_acts > 0 ? (size_t)s->n_acts : 1, sizeof *s->layer);
    s->dropout_seed = rs_calloc((size_t)c->n_layers * RS_LORA_N_TARGETS, sizeof *s->dropout_seed);
    return s;
}

static void list_buffers(spec_list *l, rs_train_state *s, const rs_model_config *c,
                         rs_dtype act_dtype, rs_dtype weight_dtype) {
    size_t act = rs_dtype_size(act_dtype);
    list_layer_buffers(l, s, c, act);
    list_step_buffers(l, s, c, act, rs_dtype_size(weight_dtype));
}

/* The logit chunks and log-prob buffers (the plan counts them apart), by where they go. */
static int is_logit_buffer(const rs_train_state *s, void **slot) {
    return slot == (void **)&s->logits || slot == (void **)&s->dlogits ||
           slot == (void **)&s->logp || slot == (void **)&s->lse || slot == (void **)&s->dlogp;
}

int rs_train_state_plan_bytes(const rs_model_config *c, rs_dtype act_dtype, rs_dtype weight_dtype,
                              const rs_train_adapter_shape *lora, int max_B, int max_T,
                              int recompute, int prefixes, size_t *bytes, size_t *logit_bytes) {
    if (max_B < 1 || max_T < 1 || (int64_t)max_B * max_T > INT32_MAX)
        return RS_FAIL("train state: batch %d x %d tokens must be positive and below 2^31", max_B,
                       max_T);
    rs_train_state *s = new_state(c, lora, max_B * max_T, recompute, prefixes);
    spec_list specs = {.n = 0};
    list_buffers(&specs, s, c, act_dtype, weight_dtype);
    int rc = plan_total(s, &specs, bytes);
    *logit_bytes = 0;
    for (int i = 0; i < specs.n && rc == 0; i++)
        if (is_logit_buffer(s, specs.items[i].slot))
            *logit_bytes += rs_align64(specs.items[i].elems * specs.items[i].elem_size);
    rs_train_state_free(s);
    return rc;
}

/* Row max_tokens of the joined gradients, the source of every row that gets none: zero bytes
 * (zero_f32 over the bytes: 0.0f and a zero bf16 are both all-zero). Nothing else writes it. */
static int zero_joined_padding(rs_train_state *s, const rs_model_config *c) {
    size_t bytes = (size_t)c->n_kv_heads * c->head_dim * rs_dtype_size(s->be->act_dtype);
    if (bytes % sizeof(float))
        return RS_FAIL("train state: %zu-byte key rows cannot be zeroed as floats", bytes);
    for (int i = 0; i < 2; i++) {
        char *base = i ? s->dvj : s->dkj;
        s->be->zero_f32((float *)(base + (size_t)s->max_tokens * bytes), bytes / sizeof(float));
    }
    return 0;
}

rs_train_state *rs_train_state_new(rs_model *m, const rs_lora *lora, int max_B, int max_T,
                                   int recompute, int prefixes) {
    const rs_backend *be = m->be;
    if (max_B < 1 || max_T < 1 || (int64_t)max_B * max_T > INT32_MAX) {
        RS_FAIL("train state: batch %d x %d tokens must be positive and below 2^31", max_B, max_T);
        return NULL;
    }
    if (check_backend(be) != 0 || (lora && check_adapter_plan(m, lora) != 0)) return NULL;
    if (m->adapter)
        rs_warn("training ignores the adapter attached at load (resafe_adapter.h5): it trains and "
                "scores the model without it");
    if (m->n_qweights && (!be->qmatmul || !be->qmatmul_t)) {
        RS_FAIL("the %s backend cannot train a quantized model (qmatmul ops missing)", be->name);
        return NULL;
    }
    rs_train_adapter_shape shape = {0};
    if (lora)
        shape = (rs_train_adapter_shape){lora->rank, lora->targets,
                                         lora->mask_mode == RS_MASK_ELEMENTWISE,
                                         lora->dropout > 0.0f};
    rs_train_state *s = new_state(&m->cfg, &shape, max_B * max_T, recompute, prefixes);
    s->be = be;
    spec_list specs = {.n = 0};
    list_buffers(&specs, s, &m->cfg, be->act_dtype, be->weight_dtype);
    if (allocate_plan(s, be, &specs) != 0 ||
        (s->prefixes && zero_joined_padding(s, &m->cfg) != 0)) {
        rs_train_state_free(s);
        return NULL;
    }
    s->host_ids = rs_malloc(3 * (size_t)s->max_tokens * sizeof *s->host_ids);
    s->host_targets = s->host_ids + s->max_tokens;
    s->host_pos = s->host_targets + s->max_tokens;
    if (s->prefixes) s->host_rows = rs_malloc(3 * (size_t)s->max_tokens * sizeof *s->host_rows);
    s->host_f = rs_malloc((size_t)s->max_tokens * sizeof *s->host_f);
    rs_rng_seed(&s->rng, 0);
    char label[48];
    rs_debug("training activations for %d x %d tokens, recompute %s (%s on %s):", max_B, max_T,
             rs_train_recompute_label(s->recompute, s->n_layers, label, sizeof label),
             rs_dtype_name(be->act_dtype), be->name);
    if (rs_get_log_level() >= RS_LOG_DEBUG) rs_arena_print_plan(&s->plan, stderr);
    return s;
}

void rs_train_state_free(rs_train_state *s) {
    if (!s) return;
    if (s->plan.base) s->be->free(s->plan.base); /* NULL be: a plan that allocated nothing */
    free(s->x);
    free(s->layer);
    free(s->dropout_seed);
    free(s->host_ids);
    free(s->host_rows);
    free(s->host_f);
    free(s);
}

size_t rs_train_state_bytes(const rs_train_state *s) { return s->plan.capacity; }

int rs_train_recompute_of_config(const rs_config *cfg, int *layers) {
    int64_t n = rs_config_get_int(cfg, "model", "recompute_layers");
    if (!rs_config_get_bool(cfg, "model", "recompute")) {
        *layers = 0;
        if (n > 0)
            return RS_FAIL("[model] recompute_layers = %lld needs recompute = true (or "
                           "recompute_layers = 0)",
                           (long long)n);
        return 0;
    }
    *layers = n > 0 ? (int)n : RS_RECOMPUTE_ALL;
    return 0;
}

const char *rs_train_recompute_label(int recompute, int n_layers, char *buf, size_t size) {
    if (recompute <= 0) return "off";
    if (recompute >= n_layers) return "on";
    snprintf(buf, size, "%d of %d layers", recompute, n_layers);
    return buf;
}

int rs_train_state_set_fake_quant(rs_train_state *s, int act_bits, int kv_bits) {
    if ((act_bits && (act_bits < 2 || act_bits > 8)) || (kv_bits && (kv_bits < 2 || kv_bits > 8)))
        return RS_FAIL("fake quantization: %d activation bits and %d KV bits (0 = off, else 2..8)",
                       act_bits, kv_bits);
    if ((act_bits || kv_bits) && !s->be->fake_quant_groups)
        return RS_FAIL("the %s backend has no fake_quant_groups op (activation/KV QAT)",
                       s->be->name);
    s->act_bits = act_bits, s->kv_bits = kv_bits;
    return 0;
}
rs_rng *rs_train_state_rng(rs_train_state *s) { return &s->rng; }

void rs_train_state_set_layer_hook(rs_train_state *s, rs_layer_done_fn fn, void *user) {
    s->layer_done = fn;
    s->layer_done_user = user;
}

uint64_t rs_train_dropout_seed(const rs_train_state *s, int layer, rs_lora_target t) {
    if (layer < 0 || layer >= s->n_layers || (unsigned)t >= RS_LORA_N_TARGETS) return 0;
    return s->dropout_seed[layer * RS_LORA_N_TARGETS + (int)t];
}

/* ---------------------------------------------------------------- batches */

/* Right-padded sequences: sequence b's real tokens are t < len_b at positions first + t, then
 * padding (pos -1, no target); first is its prefix's length (0 without one). The attention
 * relies on it: key j of a sequence (joined behind its prefix) is its row j. */
static int check_rows(const rs_model_config *c, const char *what, int b, const int32_t *tokens,
                      const int32_t *pos, const int32_t *targets, int T, int first, int *len) {
    int n = 0;
    while (n < T && pos[n] == first + n) n++;
    for (int t = n; t < T; t++)
        if (pos[t] != -1)
            return RS_FAIL("train batch: %s %d: position %d at token %d (training needs right "
                           "padding: positions %d, %d, ... then -1)", what, b, pos[t], t, first,
                           first + 1);
    for (int t = 0; t < T; t++) {
        if (t < n && (tokens[t] < 0 || tokens[t] >= c->vocab_size))
            return RS_FAIL("train batch: %s %d: token id %d outside the vocabulary [0, %d)", what,
                           b, tokens[t], c->vocab_size);
        int tg = targets ? targets[t] : -1;
        if (tg < -1 || tg >= c->vocab_size || (t >= n && tg != -1))
            return RS_FAIL("train batch: %s %d: target %d at token %d (ids in [0, %d) on real "
                           "tokens, -1 elsewhere)", what, b, tg, t, c->vocab_size);
    }
    if (c->sliding_window > 0 && first + n > c->sliding_window)
        return RS_FAIL("train batch: %s %d: %d tokens exceed the sliding window (%d), which is "
                       "not supported", what, b, first + n, c->sliding_window);
    *len = n;
    return 0;
}

/* The staged batch's prefix layout (rs_train_batch): P x TP rows, the joined length Tk (a
 * sequence's prefix and its own tokens), the most continuations of one prefix. */
typedef struct {
    int P, TP, Tk, n_cont;
} prefix_layout;

static int prefix_len(const rs_train_batch *bt, int p) {
    const int32_t *pos = bt->prefix_pos + (size_t)p * bt->T_prefix;
    int n = 0;
    while (n < bt->T_prefix && pos[n] >= 0) n++;
    return n;
}

static int check_prefixes(const rs_model_config *c, const rs_train_state *s,
                          const rs_train_batch *bt, prefix_layout *lay) {
    memset(lay, 0, sizeof *lay);
    if (!bt->n_prefix) return 0;
    if (!s->prefixes)
        return RS_FAIL("train batch: shared prefixes, but the state was planned without them");
    if (bt->n_prefix < 0 || bt->T_prefix < 1 || !bt->prefix_tokens || !bt->prefix_pos ||
        !bt->prefix_of)
        return RS_FAIL("train batch: %d prefixes of %d tokens (need a positive count and length "
                       "and their tokens, positions and prefix_of)", bt->n_prefix, bt->T_prefix);
    lay->P = bt->n_prefix, lay->TP = bt->T_prefix;
    int64_t rows = (int64_t)bt->n_prefix * bt->T_prefix + (int64_t)bt->B * bt->T;
    if (rows > s->max_tokens)
        return RS_FAIL("train batch: %d x %d prefix and %d x %d sequence tokens (the state was "
                       "planned for %d tokens)", bt->n_prefix, bt->T_prefix, bt->B, bt->T,
                       s->max_tokens);
    for (int p = 0; p < bt->n_prefix; p++) {
        size_t o = (size_t)p * bt->T_prefix;
        int len;
        RS_TRY(check_rows(c, "prefix", p, bt->prefix_tokens + o, bt->prefix_pos + o, NULL,
                          bt->T_prefix, 0, &len));
        if (len < 1) return RS_FAIL("train batch: prefix %d is empty", p);
        int conts = 0;
        for (int b = 0; b < bt->B; b++) conts += bt->prefix_of[b] == p;
        lay->n_cont = conts > lay->n_cont ? conts : lay->n_cont;
    }
    for (int b = 0; b < bt->B; b++)
        if (bt->prefix_of[b] < -1 || bt->prefix_of[b] >= bt->n_prefix)
            return RS_FAIL("train batch: sequence %d continues prefix %d (of %d)", b,
                           bt->prefix_of[b], bt->n_prefix);
    if ((int64_t)lay->n_cont * lay->P * lay->TP > s->max_tokens)
        return RS_FAIL("train batch: %d continuations of a prefix (%d x %d tokens) exceed the "
                       "plan's %d tokens", lay->n_cont, lay->P, lay->TP, s->max_tokens);
    return 0;
}

static int check_batch(const rs_model *m, const rs_train_state *s, const rs_train_batch *bt,
                       prefix_layout *lay) {
    if (bt->B < 1 || bt->T < 1 || (int64_t)bt->B * bt->T > s->max_tokens)
        return RS_FAIL("train batch: %d x %d tokens (the state was planned for %d tokens)", bt->B,
                       bt->T, s->max_tokens);
    RS_TRY(check_prefixes(&m->cfg, s, bt, lay));
    for (int b = 0; b < bt->B; b++) {
        size_t o = (size_t)b * bt->T;
        int pre = lay->P ? bt->prefix_of[b] : -1, first = pre >= 0 ? prefix_len(bt, pre) : 0, len;
        RS_TRY(check_rows(&m->cfg, "sequence", b, bt->tokens + o, bt->pos + o, bt->targets + o,
                          bt->T, first, &len));
        lay->Tk = first + len > lay->Tk ? first + len : lay->Tk;
    }
    if (lay->P && (int64_t)bt->B * lay->Tk > s->max_tokens)
        return RS_FAIL("train batch: %d sequences of up to %d tokens with their prefixes (the "
                       "state was planned for %d tokens)", bt->B, lay->Tk, s->max_tokens);
    return 0;
}

/* The row tables of the joined keys (the state's join_rows, split_rows, fold_rows). */
static void stage_prefix_rows(rs_train_state *s, const rs_train_batch *bt,
                              const prefix_layout *lay) {
    int B = bt->B, T = bt->T, Tk = lay->Tk, zero = s->max_tokens;
    size_t np = (size_t)lay->P * lay->TP;
    int32_t *join = s->host_rows, *split = join + (size_t)B * Tk, *fold = split + (size_t)B * T;
    for (size_t i = 0; i < (size_t)lay->n_cont * np; i++) fold[i] = zero;
    int *seen = rs_calloc((size_t)lay->P, sizeof *seen);
    for (int b = 0; b < B; b++) {
        int pre = bt->prefix_of[b], L = pre >= 0 ? prefix_len(bt, pre) : 0, len = 0;
        while (len < T && bt->pos[(size_t)b * T + len] >= 0) len++;
        for (int j = 0; j < Tk; j++)
            join[(size_t)b * Tk + j] = j < L          ? (int32_t)((size_t)pre * lay->TP + j)
                                       : j - L < len ? (int32_t)(np + (size_t)b * T + (j - L))
                                                     : 0; /* never attended */
        for (int t = 0; t < T; t++) split[(size_t)b * T + t] = t < len ? b * Tk + L + t : zero;
        if (pre >= 0) {
            int32_t *f = fold + (size_t)seen[pre]++ * np + (size_t)pre * lay->TP;
            for (int j = 0; j < L; j++) f[j] = b * Tk + j;
        }
    }
    free(seen);
    const rs_backend *be = s->be;
    be->to_device(s->join_rows, join, (size_t)B * Tk * sizeof *join);
    be->to_device(s->split_rows, split, (size_t)B * T * sizeof *split);
    be->to_device(s->fold_rows, fold, (size_t)lay->n_cont * np * sizeof *fold);
}

/* ids, pos and targets of every row (the prefixes' first), and the prefix tables. */
static void stage_batch(rs_train_state *s, const rs_train_batch *bt, const prefix_layout *lay) {
    size_t np = (size_t)lay->P * lay->TP, n = np + (size_t)bt->B * bt->T;
    for (size_t i = 0; i < n; i++) {
        int pre = i < np;
        size_t j = pre ? i : i - np;
        int32_t pos = pre ? bt->prefix_pos[j] : bt->pos[j];
        s->host_ids[i] = pos >= 0 ? (pre ? bt->prefix_tokens[j] : bt->tokens[j]) : 0;
        s->host_targets[i] = pre ? -1 : bt->targets[j];
        s->host_pos[i] = pos;
    }
    const rs_backend *be = s->be;
    be->to_device(s->ids, s->host_ids, n * sizeof(int32_t));
    be->to_device(s->pos, s->host_pos, n * sizeof(int32_t));
    be->to_device(s->targets, s->host_targets, n * sizeof(int32_t));
    s->P = lay->P, s->TP = lay->TP, s->Tk = lay->Tk, s->n_cont = lay->n_cont, s->joined = -1;
    if (lay->P) stage_prefix_rows(s, bt, lay);
}

/* The adapter of a forward call: checked against what the plan has room for. */
static int check_adapter_fits(const rs_train_state *s, const rs_lora *lora) {
    if (!s->lora_rank)
        return RS_FAIL("train forward: the state was planned without an adapter (pass it to "
                       "rs_train_state_new)");
    if (lora->rank > s->lora_rank || (lora->targets & ~s->lora_targets) ||
        (lora->mask_mode == RS_MASK_ELEMENTWISE) != s->lora_elementwise ||
        (lora->dropout > 0.0f && !s->lora_dropout))
        return RS_FAIL("train forward: the adapter (rank %d, targets 0x%x, mask mode %d, dropout "
                       "%g) differs from the one the state was planned for", lora->rank,
                       lora->targets, (int)lora->mask_mode, lora->dropout);
    return 0;
}

/* One seed per layer and target for this call, from the state's rng. */
static void draw_dropout_seeds(rs_train_state *s) {
    uint64_t base = rs_rng_next(&s->rng);
    for (int i = 0; i < s->n_layers * RS_LORA_N_TARGETS; i++) {
        uint64_t z = base + (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ull; /* splitmix64 */
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        s->dropout_seed[i] = z ^ (z >> 31);
    }
}

/* A pass over the staged batch (B x T sequences behind the state's staged prefixes). */
static pass make_pass(rs_model *m, rs_train_state *s, const rs_lora *lora, int B, int T) {
    size_t np = (size_t)s->P * s->TP;
    return (pass){.m = m, .be = m->be, .c = &m->cfg, .s = s, .lora = lora,
                  .n = (int)(np + (size_t)B * T), .B = B, .T = T, .P = s->P, .TP = s->TP,
                  .Tk = s->Tk, .n_cont = s->n_cont, .np = np};
}

/* ---------------------------------------------------------------- forward and backward */

int rs_train_forward(rs_model *m, const rs_lora *lora, rs_train_state *s,
                     const rs_train_batch *batch, float *seq_logp) {
    s->forward_done = 0;
    if (lora && !lora->enabled) lora = NULL;
    prefix_layout lay;
    RS_TRY(check_batch(m, s, batch, &lay));
    if (lora) RS_TRY(check_adapter_fits(s, lora));
    int B = batch->B, T = batch->T;
    stage_batch(s, batch, &lay);
    pass p = make_pass(m, s, lora, B, T);
    int n = p.n;
    size_t np = p.np;
    p.adapter_on = lora != NULL;
    p.dropout_on = lora && lora->dropout > 0.0f;
    p.dropout = p.dropout_on ? lora->dropout : 0.0f;
    memset(s->dropout_seed, 0, (size_t)s->n_layers * RS_LORA_N_TARGETS * sizeof *s->dropout_seed);
    if (p.dropout_on) draw_dropout_seeds(s);
    m->be->embedding_fwd(s->x[0], m->embed, s->ids, n, m->cfg.hidden_size, rs_model_embed_scale(m));
    for (int l = 0; l < m->cfg.n_layers; l++) layer_fwd(&p, l);
    logprob_fwd(&p);
    m->be->synchronize();
    m->be->to_host(s->host_f, s->logp, (size_t)n * sizeof(float));
    for (int b = 0; b < B; b++) {
        double sum = 0;
        for (int t = 0; t < T; t++)
            if (batch->targets[b * T + t] >= 0) sum += s->host_f[np + (size_t)b * T + t];
        seq_logp[b] = (float)sum;
    }
    s->B = B, s->T = T, s->forward_done = 1, s->fwd_lora = lora, s->fwd_dropout = p.dropout;
    s->fwd_act_bits = s->act_bits;
    return 0;
}

static int check_backward_args(const rs_train_state *s, const rs_lora *lora,
                               const rs_train_batch *batch, const rs_model_grads *grads) {
    if (!s->forward_done) return RS_FAIL("train backward: no forward to go back through");
    if (batch->B != s->B || batch->T != s->T || batch->n_prefix != s->P ||
        (s->P && batch->T_prefix != s->TP))
        return RS_FAIL("train backward: batch %d x %d (prefixes %d x %d), but the forward ran "
                       "%d x %d (%d x %d)", batch->B, batch->T, batch->n_prefix,
                       batch->T_prefix, s->B, s->T, s->P, s->TP);
    if ((grads != NULL) == (lora != NULL))
        return RS_FAIL("train backward: pass either full-parameter gradients or an adapter");
    if (s->fwd_lora && s->fwd_lora != lora)
        return RS_FAIL("train backward: the forward ran with an adapter: its gradients need the "
                       "same adapter");
    return 0;
}

int rs_train_backward(rs_model *m, rs_lora *lora, rs_train_state *s,
                      const rs_train_batch *batch, const float *d_seq_logp,
                      rs_model_grads *grads) {
    RS_TRY(check_backward_args(s, lora, batch, grads));
    int B = s->B, T = s->T;
    pass p = make_pass(m, s, lora, B, T);
    int n = p.n;
    for (int i = 0; i < n; i++) /* a target's row is a sequence's (prefix rows have none) */
        s->host_f[i] = s->host_targets[i] >= 0 ? d_seq_logp[((size_t)i - p.np) / (size_t)T] : 0.0f;
    m->be->to_device(s->dlogp, s->host_f, (size_t)n * sizeof(float));
    p.grads = grads;
    p.adapter_on = s->fwd_lora != NULL;
    p.dropout = s->fwd_dropout;
    p.dropout_on = p.dropout > 0.0f;
    logprob_bwd(&p);
    for (int l = m->cfg.n_layers - 1; l >= 0; l--) {
        layer_bwd(&p, l);
        if (s->layer_done) RS_TRY(s->layer_done(s->layer_done_user, l));
    }
    if (grads)
        m->be->embedding_bwd(grads->embed, s->dres, s->ids, n, m->cfg.hidden_size,
                             rs_model_embed_scale(m));
    m->be->synchronize();
    return 0;
}

/* ---------------------------------------------------------------- full-parameter gradients */

typedef struct {
    float *base; /* NULL: only count */
    size_t used;
} grad_cursor;

/* The next tensor of numel floats (64-byte aligned), or NULL when the parameter is absent. */
static float *take(grad_cursor *g, const void *param, size_t numel) {
    if (!param) return NULL;
    float *p = g->base ? g->base + g->used : NULL;
    g->used += (numel + 15) & ~(size_t)15;
    return p;
}

/* Checkpoint order, as model_load.c lists the parameters. */
static void lay_out_grads(const rs_model *m, rs_model_grads *g, grad_cursor *cur) {
    const rs_model_config *c = &m->cfg;
    size_t D = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    size_t Q = (size_t)c->n_heads * c->head_dim, KV = (size_t)c->n_kv_heads * c->head_dim;
    g->embed = take(cur, m->embed, V * D);
    for (int l = 0; l < c->n_layers; l++) {
        const rs_layer_weights *w = &m->layers[l];
        rs_layer_grads *d = &g->layers[l];
        d->attn_norm = take(cur, w->attn_norm, D);
        d->wq = take(cur, w->wq, Q * D);
        d->wk = take(cur, w->wk, KV * D);
        d->wv = take(cur, w->wv, KV * D);
        d->wo = take(cur, w->wo, D * Q);
        d->bq = take(cur, w->bq, Q);
        d->bk = take(cur, w->bk, KV);
        d->bv = take(cur, w->bv, KV);
        d->bo = take(cur, w->bo, D);
        d->mlp_norm = take(cur, w->mlp_norm, D);
        d->w_gate = take(cur, w->w_gate, F * D);
        d->w_up = take(cur, w->w_up, F * D);
        d->w_down = take(cur, w->w_down, D * F);
        d->b_gate = take(cur, w->b_gate, F);
        d->b_up = take(cur, w->b_up, F);
        d->b_down = take(cur, w->b_down, D);
    }
    g->final_norm = take(cur, m->final_norm, D);
    g->lm_head = c->tie_word_embeddings ? g->embed : take(cur, m->lm_head, V * D);
}

int rs_model_grads_init(const rs_model *m, rs_model_grads *g) {
    memset(g, 0, sizeof *g);
    if (!m->be->zero_f32) return RS_FAIL("the %s backend has no zero_f32 op", m->be->name);
    g->layers = rs_calloc((size_t)m->cfg.n_layers, sizeof *g->layers);
    grad_cursor cur = {NULL, 0};
    lay_out_grads(m, g, &cur);
    g->n = cur.used;
    g->block = m->be->alloc(g->n * sizeof(float));
    cur = (grad_cursor){g->block, 0};
    lay_out_grads(m, g, &cur);
    rs_model_grads_zero(m, g);
    return 0;
}

void rs_model_grads_zero(const rs_model *m, rs_model_grads *g) { m->be->zero_f32(g->block, g->n); }

void rs_model_grads_free(const rs_model *m, rs_model_grads *g) {
    if (g->block) m->be->free(g->block);
    free(g->layers);
    memset(g, 0, sizeof *g);
}
