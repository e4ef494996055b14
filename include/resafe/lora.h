/* lora: low-rank adapters on the model's linear layers, with masks.
 *
 * W_eff = W + scale * (B A) for every targeted linear (scale = alpha / rank), A [rank, in]
 * Kaiming-uniform initialised, B [out, rank] zero: the adapter starts as the identity.
 * Masks (DESIGN.md section 4):
 *   RS_MASK_NONE        every entry of A and B trains.
 *   RS_MASK_FACTOR      the paper's update rule: entries of A and B whose mask byte is 0 are not
 *                       updated and their optimizer moments do not move (the optimizer honours
 *                       mask_A / mask_B). The weight mask M is decomposed into LoRA masks by the
 *                       train layer (snip.h documents the rule).
 *   RS_MASK_ELEMENTWISE the exact constraint W_eff = W + scale * (M ⊙ B A): the forward uses the
 *                       merged weight (backend lora_merge), the backward needs the full weight
 *                       gradient dW (which also gives SNIP scores) and turns it into dA, dB with
 *                       lora_masked_grad.
 * All buffers are fp32 device memory of the model's backend, in one allocation. */
#ifndef RESAFE_LORA_H
#define RESAFE_LORA_H

#include "resafe/backend.h"

typedef enum {
    RS_LORA_Q = 0,
    RS_LORA_K,
    RS_LORA_V,
    RS_LORA_O,
    RS_LORA_GATE,
    RS_LORA_UP,
    RS_LORA_DOWN,
    RS_LORA_N_TARGETS
} rs_lora_target;

typedef enum { RS_MASK_NONE = 0, RS_MASK_FACTOR, RS_MASK_ELEMENTWISE } rs_mask_mode;

typedef struct {
    int in, out;        /* the linear's shape: W [out, in] */
    float *A, *B;       /* [rank, in], [out, rank] */
    float *dA, *dB;     /* gradients, accumulated by the backward */
    uint8_t *mask_A;    /* [rank, in] factor mode (NULL otherwise) */
    uint8_t *mask_B;    /* [out, rank] factor mode */
    uint8_t *mask_W;    /* [out, in] elementwise mode */
    float *dW;          /* [out, in] full weight gradient dL/dW (= dL/dW_eff), accumulated, when
                         * want_weight_grad (elementwise mode turns each backward's dW into dA, dB
                         * in a scratch buffer of the train state, so it needs no dW here) */
} rs_lora_linear;

typedef struct rs_lora {
    int rank;
    float alpha, scale;     /* scale = alpha / rank */
    float dropout;          /* PEFT's lora_dropout, y = W x + scale * B A drop(x): the adapter's
                             * input elements are zeroed with this probability (kept ones scaled
                             * by 1/(1-p)) in rs_train_forward only; 0 = none. Masks come from the
                             * train state's rng (one seed per forward call, layer and target) and
                             * are regenerated in backward, not stored. Set it before
                             * rs_train_state_new, which plans the buffers. Not defined for
                             * elementwise masks (the adapter is merged into W): refused. */
    unsigned targets;       /* bit (1u << rs_lora_target) per targeted projection */
    rs_mask_mode mask_mode;
    int want_weight_grad;   /* also accumulate dW of every targeted linear (SNIP scores) */
    int enabled;            /* 0: the model runs without the adapter (reference log-probs) */
    int group_constant;     /* A is constant within each quantization group of its input columns
                             * ([lora] group_constant): a tied parameter A' [rank, n_groups],
                             * see rs_lora_tie_grads; then B A is constant within groups and the
                             * patch folds exactly into the zero points (merge exact) */
    int group_size;         /* the groups' width (0 = the whole row), when group_constant */
    int n_layers;
    rs_lora_linear *lin;    /* [n_layers * RS_LORA_N_TARGETS]; in == 0 for untargeted ones */
    const rs_backend *be;
    void *block;            /* the one device allocation */
    size_t block_bytes;
    /* Flat views for the optimizer (one adamw call for the whole adapter): every A and B lies in
     * flat_params[0, n_flat), its gradient at the same offset in flat_grads and, in factor mode,
     * its mask at the same offset in flat_mask (NULL otherwise). The gaps left by 64-byte
     * alignment are zero in all three, so AdamW leaves them zero. */
    float *flat_params, *flat_grads;
    uint8_t *flat_mask;
    size_t n_flat;
} rs_lora;

/* "q,k,v,o,gate,up,down" (any subset, or "all") -> target bits; -1 + message when unknown. */
int rs_lora_parse_targets(const char *list, unsigned *targets);
const char *rs_lora_target_name(rs_lora_target t); /* "q_proj", ..., "down_proj" */
static inline rs_lora_linear *rs_lora_at(rs_lora *l, int layer, rs_lora_target t) {
    return &l->lin[layer * RS_LORA_N_TARGETS + (int)t];
}

/* Group-constant adapters (group_constant set): the parameter is A' [rank, n_groups], stored
 * expanded in A. rs_lora_group_init makes A group-constant (every entry of a group takes the
 * value of the group's first column: the U(-1/sqrt(in), 1/sqrt(in)) init of A' keeps the variance
 * of A x, since each group sums group_size inputs), rs_lora_group_masks makes factor-mode
 * column masks of A group-constant (a group's columns train together when at least half of them
 * were selected), and rs_lora_tie_grads replaces dA by its group sum broadcast to every member
 * (the chain rule for the tied A'). AdamW is elementwise, so equal gradients, moments and values
 * within a group stay equal bit for bit. Call the tie once per optimizer step, on the whole
 * accumulated gradient (it is not idempotent). Host round trips: the adapter is small. */
void rs_lora_group_init(rs_lora *l);
void rs_lora_group_masks(rs_lora *l);
void rs_lora_tie_grads(rs_lora *l);

#endif
