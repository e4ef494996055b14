/* model_train: the training forward and backward of the Llama-family model (model.h), written
 * once against the backend ops and mirroring rs_model_forward in reverse order.
 *
 * A batch is B sequences of T tokens (right-padded): tokens[b*T + t], pos[b*T + t] (-1 =
 * padding), and targets[b*T + t] = the token to predict at position t (normally
 * tokens[b*T + t + 1]) or -1 where no loss is taken (prompt tokens, the last token, padding).
 * The forward returns each sequence's summed log-probability of its targets,
 *   seq_logp[b] = sum_t log p(targets[b,t] | tokens[b, 0..t]),
 * which is what both losses need: SFT (mean NLL over target tokens) and DPO (differences of
 * sequence log-probs). The backward takes dL/d seq_logp[b] and accumulates gradients into
 * either the full parameter gradients (SFT) or the adapter (LoRA A/B, and dW of targeted
 * linears when asked), never both.
 *
 * Activations are kept per layer in one planned arena (rs_train_plan); a layer that recomputes
 * keeps only its input and runs its forward again during backward. recompute = the number of
 * layers that do, the first ones (0: none; RS_RECOMPUTE_ALL or any count >= n_layers: all). The
 * recomputing layers share the buffers of the first layer that keeps its activations (or one
 * set when all recompute), so each one saves a layer's worth. */
#ifndef RESAFE_MODEL_TRAIN_H
#define RESAFE_MODEL_TRAIN_H

#include <limits.h>

#include "resafe/config.h"
#include "resafe/lora.h"
#include "resafe/model.h"

#define RS_RECOMPUTE_ALL INT_MAX

typedef struct {
    int B, T;
    const int32_t *tokens;  /* host [B*T] */
    const int32_t *pos;     /* host [B*T], -1 = padding */
    const int32_t *targets; /* host [B*T], -1 = no loss */
    /* Shared prefixes (n_prefix 0: none; the state must be planned for them): n_prefix
     * right-padded sequences of T_prefix tokens (positions 0, 1, ... then -1; no targets) that
     * sequences continue. Sequence b continues prefix prefix_of[b] (-1: none): its positions
     * start at that prefix's length L (pos[b*T] = L, ...) and its tokens attend to the prefix's
     * as if they were its own first L tokens, so its seq_logp is that of prefix + sequence,
     * while the prefix runs once for all its continuations (DPO: a pair's prompt, once for
     * chosen and rejected). */
    int n_prefix, T_prefix;
    const int32_t *prefix_tokens, *prefix_pos; /* host [n_prefix*T_prefix] */
    const int32_t *prefix_of;                  /* host [B] */
} rs_train_batch;

/* One layer's parameter gradients (NULL where the layer has no such bias). */
typedef struct {
    float *attn_norm, *mlp_norm, *wq, *wk, *wv, *wo, *bq, *bk, *bv, *bo;
    float *w_gate, *w_up, *w_down, *b_gate, *b_up, *b_down;
} rs_layer_grads;

/* Full-parameter gradients (fp32, in the checkpoint order of the model's parameters, each
 * tensor 64-byte aligned; the gaps are zero). */
typedef struct {
    float *block;           /* one device allocation of n floats (n_params plus alignment gaps) */
    size_t n;
    float *embed, *final_norm, *lm_head; /* lm_head == embed when tied */
    rs_layer_grads *layers; /* [n_layers] */
} rs_model_grads;

typedef struct rs_train_state rs_train_state; /* opaque: the activation arena and plan */

/* Plan activation memory for batches of up to max_B x max_T tokens (prints the plan at debug
 * level). recompute: how many layers (the first ones) keep only their input and recompute in
 * backward (0: none, RS_RECOMPUTE_ALL: every layer). prefixes: also plan for batches with
 * shared prefixes (rs_train_batch n_prefix), whose rows (prefixes' and sequences') and
 * sequences-with-their-prefixes (B x (L + T)) must each fit max_B x max_T tokens. */
rs_train_state *rs_train_state_new(rs_model *m, const rs_lora *lora, int max_B, int max_T,
                                   int recompute, int prefixes);
void rs_train_state_free(rs_train_state *s);
/* The adapter shape a train state makes room for (rank 0: none). */
typedef struct {
    int rank;
    unsigned targets;
    int elementwise, dropout;
} rs_train_adapter_shape;
/* The bytes rs_train_state_new allocates on the device (the arena, exactly, without
 * allocating it; memplan.h), and among them the logit chunks and log-prob buffers. */
int rs_train_state_plan_bytes(const rs_model_config *c, rs_dtype act_dtype, rs_dtype weight_dtype,
                              const rs_train_adapter_shape *lora, int max_B, int max_T,
                              int recompute, int prefixes, size_t *bytes, size_t *logit_bytes);
size_t rs_train_state_bytes(const rs_train_state *s);
/* [model] recompute and recompute_layers as a layer count for rs_train_state_new: 0 (recompute
 * off), RS_RECOMPUTE_ALL (on, recompute_layers 0) or recompute_layers. -1 + message when
 * recompute_layers is set without recompute = true. */
int rs_train_recompute_of_config(const rs_config *cfg, int *layers);
/* "off", "on" (every layer) or "K of L layers", for plan and memory lines. */
const char *rs_train_recompute_label(int recompute, int n_layers, char *buf, size_t size);
/* LLM-QAT (Liu et al. 2023) fake quantization in every later rs_train_forward, with the
 * straight-through estimator in the backward (0 = off, the default; else 2..8 bits):
 *   act_bits: the input of each of the seven linears of every layer (q/k/v, o, gate/up, down;
 *             not lm_head), per token, symmetric;
 *   kv_bits:  K (after RoPE) and V, per token and kv head (head_dim values), asymmetric.
 * Grids as fake_quant_rows (backend.h). -1 + message for bad bits or a backend without the op. */
int rs_train_state_set_fake_quant(rs_train_state *s, int act_bits, int kv_bits);
/* The rng the LoRA dropout masks are drawn from (seeded with 0 by rs_train_state_new): seed it,
 * or save and restore it with a checkpoint to resume bit-identically. */
rs_rng *rs_train_state_rng(rs_train_state *s);
/* Called by rs_train_backward once layer l's backward is enqueued (top layer first, so the
 * adapter gradients of layers l and above are then final for this backward): data parallel
 * starts their all-reduce while the layers below run. Non-zero fails the backward. fn NULL: no
 * hook (the default). */
typedef int (*rs_layer_done_fn)(void *user, int layer);
void rs_train_state_set_layer_hook(rs_train_state *s, rs_layer_done_fn fn, void *user);
/* The dropout seed the last rs_train_forward used for one adapter (0 when dropout was off):
 * the backend dropout op's mask is a function of this seed alone (tests reproduce it). */
uint64_t rs_train_dropout_seed(const rs_train_state *s, int layer, rs_lora_target t);

/* Forward for training: seq_logp[B] (host). lora may be NULL (or lora->enabled == 0): the plain
 * model (reference log-probs). Keeps what backward needs. */
int rs_train_forward(rs_model *m, const rs_lora *lora, rs_train_state *s,
                     const rs_train_batch *batch, float *seq_logp);
/* Backward of the last rs_train_forward: d_seq_logp[B] (host) = dL/d seq_logp.
 * grads != NULL: full-parameter gradients accumulated into grads (lora must be NULL).
 * lora != NULL: dA, dB (and dW where requested) accumulated; base weights frozen. When the
 * forward ran without it (NULL or disabled), only dW is accumulated (SNIP on the base model).
 * The batch must be the forward's (its arrays were staged then; only B and T are checked).
 * The forward's activations stay valid: backward may run again with another d_seq_logp. */
int rs_train_backward(rs_model *m, rs_lora *lora, rs_train_state *s,
                      const rs_train_batch *batch, const float *d_seq_logp,
                      rs_model_grads *grads);

int rs_model_grads_init(const rs_model *m, rs_model_grads *g); /* zeroed */
void rs_model_grads_zero(const rs_model *m, rs_model_grads *g);
void rs_model_grads_free(const rs_model *m, rs_model_grads *g);

/* Adapter lifetime: allocate A, B (A Kaiming-uniform from rng as PEFT does: U(-1/sqrt(in),
 * 1/sqrt(in)); B zero), their gradients, and masks for mask_mode. */
int rs_lora_init(rs_lora *l, const rs_model *m, int rank, float alpha, unsigned targets,
                 rs_mask_mode mask_mode, int want_weight_grad, rs_rng *rng);
/* The bytes rs_lora_init allocates on the device for config c (one block; memplan.h), and
 * the trainable values n_flat (with the alignment gaps, as the optimizer holds them). */
int rs_lora_plan_bytes(const rs_model_config *c, int rank, unsigned targets,
                       rs_mask_mode mask_mode, int want_weight_grad, size_t *n_flat,
                       size_t *bytes);
void rs_lora_free(rs_lora *l);
/* [lora] group_constant: tie A within the quantization groups of m's INT format (lora.h,
 * rs_lora_group_init). A dense model: a warning, nothing tied; nf4/fp4/int8 or elementwise masks:
 * -1 + message. label names the model in messages. */
int rs_lora_setup_group_constant(rs_lora *l, const rs_model *m, rs_mask_mode mask_mode,
                                 const char *label);
void rs_lora_zero_grads(rs_lora *l);

#endif
