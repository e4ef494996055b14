/* snip: which weight entries the patch may change (DESIGN.md section 4).
 *
 * Scores. For every targeted linear, S = mean over b of |W_eff * dL_b/dW| (elementwise), one
 * term per scoring batch b, with W_eff = W + scale * B A (times the elementwise mask in that
 * mode): the adapter as it is when the masks are (re-)identified. dL/dW comes from the model's
 * backward with the adapter's want_weight_grad switched on; the loss is whatever the caller's
 * gradient function accumulates (the DPO loss, or an NLL).
 *
 * Selection. tau is the FRACTION OF ENTRIES SELECTED (trainable, "safety-critical"): k =
 * floor(tau * N + 0.5) entries of the N in scope (every targeted entry of the model, or of one
 * layer with scope per_layer). The selected set is exactly the first k of a full sort by score,
 * descending, with ties broken by the lower global index (the order: layer, then target
 * q,k,v,o,gate,up,down, then row-major within the weight). Found without sorting: the k-th
 * largest score by a two-pass radix select on the float bits (scores are >= 0, so their bit
 * patterns order like the values), then every score above it and, in index order, as many equal
 * to it as k needs. A NaN score is an error.
 *
 * Masks from the selection M [out, in]:
 *   elementwise: the adapter's mask_W = M.
 *   factor (the paper's rule, entries outside the masks are frozen): row i of B trainable iff at
 *     least factor_threshold of row i of M is selected; column j of A trainable iff at least
 *     factor_threshold of column j of M is selected:
 *         mask_B[i, :] = (sum_j M[i, j] >= rho * in),  mask_A[:, j] = (sum_i M[i, j] >= rho * out)
 *     (rho = factor_threshold, default 0.5: a row/column trains when most of it is critical).
 *     Why rows of B and columns of A: dW[i, j] = sum_r dB[i, r] A[r, j] + B[i, r] dA[r, j], so a
 *     frozen row i of B keeps row i of B A from moving through B, and a frozen column j of A
 *     keeps column j from moving through A.
 * dW costs a full weight-gradient matmul per linear and backward: rs_snip_init takes the
 * adapter's dW buffers (made with want_weight_grad) and detaches them (lin->dW = NULL, so the
 * backward skips them), and only rs_snip_score attaches them while it scores.
 * Re-identification (every K steps) recomputes the scores with the current adapter and replaces
 * the masks in place; entries that become trainable resume with whatever moments they had. */
#ifndef RESAFE_SNIP_H
#define RESAFE_SNIP_H

#include "resafe/lora.h"
#include "resafe/model.h"

typedef enum { RS_SNIP_GLOBAL = 0, RS_SNIP_PER_LAYER } rs_snip_scope;

typedef struct {
    double tau;              /* fraction of entries selected, (0, 1] */
    rs_snip_scope scope;
    double factor_threshold; /* rho, (0, 1] */
} rs_snip_params;

/* What an identification found (logged, and written to the metrics). */
typedef struct {
    size_t n_total, n_selected;
    float threshold;         /* the k-th largest score (global scope; the smallest layer's
                              * threshold for per_layer) */
    double rows_B_trainable; /* fraction of B rows trainable (factor mode) */
    double cols_A_trainable; /* fraction of A columns trainable (factor mode) */
} rs_snip_report;

/* Gradient of the scoring loss on batch idx[0..n), accumulated into the adapter (dW included). */
typedef int (*rs_snip_grad_fn)(void *user, const int32_t *idx, int n);

/* Score buffers (fp32 device memory, one per targeted linear in one allocation) and a scratch
 * W_eff. */
typedef struct {
    rs_model *m;
    rs_lora *lora;
    int n_lin;            /* targeted linears, in global order */
    int *lin_layer;       /* [n_lin] */
    rs_lora_target *lin_target;
    float **score;        /* [n_lin] device [out * in] */
    float **dW;           /* [n_lin] the adapter's dW buffers, attached only while scoring */
    size_t *offset;       /* [n_lin + 1] global index of each linear's first entry */
    void *block, *w_eff;
    /* Data parallel: called on every linear's dW (n floats, device) after each scoring batch's
     * gradient and before |W_eff * dW| (not linear in dW), so every rank scores the global
     * batch's gradient and selects the same masks; NULL in one process. */
    int (*reduce)(void *user, float *dW, size_t n);
    void *reduce_user;
} rs_snip;

int rs_snip_init(rs_snip *s, rs_model *m, rs_lora *lora);
/* The device bytes rs_snip_init allocates for an adapter on `targets` of config c (memplan.h). */
size_t rs_snip_plan_bytes(const rs_model_config *c, unsigned targets, rs_dtype weight_dtype);
void rs_snip_free(rs_snip *s); /* re-attaches the dW buffers */
/* The model's frozen weight of a targeted linear (device, weight dtype). */
void *rs_snip_weight(rs_model *m, int layer, rs_lora_target t);
/* Scores from n_batches batches (batch b = idx[b][0..n[b])): zeroed first, then
 * score += |W_eff * dW_b| / n_batches per batch. The adapter's gradients are left dirty. */
int rs_snip_score(rs_snip *s, rs_snip_grad_fn fn, void *user, int32_t *const *idx, const int *n,
                  int n_batches);
/* The selection and masks from the current scores, installed into the adapter's masks. */
int rs_snip_select(rs_snip *s, const rs_snip_params *p, rs_snip_report *report);
/* Host copy of every score in global order (n_total floats, malloc'ed), for tests and logs. */
float *rs_snip_download(const rs_snip *s);

/* ---- the pieces, on host arrays (unit-tested on their own) */
size_t rs_snip_count(double tau, size_t n); /* floor(tau * n + 0.5), clamped to [0, n] */
/* selected[i] = 1 for the top k of scores[0..n) (ties: lower index first), else 0. -1 + message
 * for a NaN or negative score. */
int rs_snip_top_k(const float *scores, size_t n, size_t k, uint8_t *selected, float *threshold);
/* Factor masks from a selection M [out, in] (rule above). */
void rs_snip_decompose(const uint8_t *M, int out, int in, int rank, double rho, uint8_t *mask_A,
                       uint8_t *mask_B);

#endif
