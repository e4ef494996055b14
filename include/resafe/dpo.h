/* dpo: Direct Preference Optimization of a LoRA adapter (DESIGN.md section 4).
 *
 * Per pair i: z_i = (pi_w - ref_w) - (pi_l - ref_l) with pi = the sequence log-prob summed over
 * response tokens (rs_train_forward), ref = the same with the adapter switched off (computed
 * once, or read with the data), and
 *     L = mean_i [ -log sigmoid(beta z_i) ]  (+ sft_weight * mean_i [ -pi_w,i / |winner_i| ])
 * dL/dpi_w = -beta sigmoid(-beta z) / n  (- sft_weight / (n |winner|)),  dL/dpi_l = -dL/dpi_w's
 * DPO part: the backward of rs_train_forward turns these into dA, dB.
 *
 * Preference data: any source fills an rs_pref_set (token ids, optional reference log-probs):
 * a JSONL file (rs_pref_load_jsonl) or the patch set of `resafe triplets` (patchset.h). */
#ifndef RESAFE_DPO_H
#define RESAFE_DPO_H

#include "resafe/comm.h"
#include "resafe/train.h"

/* ---------------------------------------------------------------- data */
typedef struct {
    int n;
    rs_seq *chosen, *rejected;      /* [n] prompt + response tokens */
    float *ref_chosen, *ref_rejected; /* [n] reference log-probs (allocated; valid once has_ref) */
    int has_ref;
    int max_len;                    /* longest sequence */
    int n_truncated;                /* responses cut to max_seq_len */
} rs_pref_set;

/* JSONL, one object per line: {"prompt": str, "chosen": str, "rejected": str} and optionally
 * both "ref_chosen" and "ref_rejected" (numbers: precomputed reference log-probs; then every
 * line must have them). Blank lines are skipped. Errors name the file and line. */
int rs_pref_load_jsonl(const char *path, const rs_encoder *enc, rs_pref_set *set);
void rs_pref_free(rs_pref_set *set);
/* Cut responses so that no sequence is longer than max_len tokens (the JSONL path cuts while
 * encoding; a patch set is cut here): returns the number of sequences cut (their reference
 * log-probs, if any, no longer apply), or -1 + "label: pair i: ..." when a prompt leaves no room
 * for a response token. */
int rs_pref_truncate(rs_pref_set *set, int max_len, const char *label);
/* An empty set of n pairs, for callers that fill the ids themselves (tests, patch sets). */
void rs_pref_alloc(rs_pref_set *set, int n);

/* ---------------------------------------------------------------- loss */
typedef struct {
    double loss;                /* -log sigmoid(beta z) */
    double d_chosen, d_rejected;/* dloss/dpi_w, dloss/dpi_l */
    double reward_chosen;       /* beta (pi_w - ref_w) */
    double reward_rejected;     /* beta (pi_l - ref_l) */
} rs_dpo_pair;
/* Numerically stable for any z (softplus form; no overflow for |beta z| up to the double range). */
void rs_dpo_pair_loss(double beta, double pi_w, double pi_l, double ref_w, double ref_l,
                      rs_dpo_pair *out);

/* ---------------------------------------------------------------- trainer */
typedef struct {
    float beta;
    float sft_weight;
    int micro_pairs; /* pairs per forward (2 sequences each) */
    int recompute;
    int share_prompt; /* a pair's common prompt runs once (rs_batch_fill_pairs) */
} rs_dpo_params;

/* Means over the pairs of one batch (what the metrics log shows). */
typedef struct {
    int n_pairs;
    double loss, reward_chosen, reward_rejected, margin, accuracy, logp_chosen, logp_rejected;
} rs_dpo_stats;

typedef struct {
    rs_model *m;
    rs_lora *lora;
    rs_pref_set *data;
    rs_dpo_params p;
    rs_train_state *state;
    rs_batch_buf bb;
    float *logp, *d_logp; /* host [2 * micro_pairs] */
    const rs_seq **seqs;  /* [2 * micro_pairs] the sequences of a forward */
    /* Data parallel: a rank's idx is its slice of a global batch, and its gradient and stats are
     * that slice's share of the global batch's means (divided by the global pair count, or for
     * the NLL the global batch's response tokens), so the ranks' sums give a one-process run's
     * numbers: each pair's gradient scale is bit-identical to it. 0 = the call's own idx. */
    int global_pairs;
    long global_targets;
    /* Data parallel: set on the last backward of rs_dpo_accumulate (rs_train_state_set_layer_hook),
     * where each layer's adapter gradients become final, so their all-reduce can start while
     * backward goes on. NULL: none. */
    rs_layer_done_fn layer_done;
    void *layer_done_user;
    int told_shared;      /* the first packed batch was logged (share_prompt) */
} rs_dpo_trainer;

int rs_dpo_trainer_init(rs_dpo_trainer *t, rs_model *m, rs_lora *lora, rs_pref_set *data,
                        const rs_dpo_params *p);
void rs_dpo_trainer_free(rs_dpo_trainer *t);
/* Reference log-probs of every pair with the adapter switched off (data->has_ref set); the
 * trainer may have no adapter at all (lora NULL: `resafe triplets` computes the patch set's
 * reference this way, the same path and batches as `resafe dpo`). */
int rs_dpo_reference(rs_dpo_trainer *t);
/* The same over the ranks of a data-parallel job (comm NULL or of world 1: rs_dpo_reference):
 * rank r computes the pairs of rs_chunk_shard(n, micro_pairs, world, r) (whole micro-batches of
 * the one-process pass, so each forward sees the same sequences, padded to the same length) and
 * an all-gather gives every rank every pair's values, copied bytes: the arrays are those of one
 * process, bit for bit, whatever the world size. Every rank calls it; -1 + message (a peer's
 * failure included). */
int rs_dpo_reference_sharded(rs_dpo_trainer *t, rs_comm *comm);
/* DPO loss of pairs idx[0..n) (mean over them) and its gradient ACCUMULATED into the adapter's
 * dA, dB (and dW where the adapter asks for it); the caller zeroes them. stats may be NULL. */
int rs_dpo_accumulate(rs_dpo_trainer *t, const int32_t *idx, int n, rs_dpo_stats *stats);
/* NLL of the chosen responses of pairs idx[0..n), mean over their response tokens, gradient
 * accumulated the same way (the SNIP option `loss = nll`). *loss may be NULL. */
int rs_dpo_nll_accumulate(rs_dpo_trainer *t, const int32_t *idx, int n, double *loss);

/* `resafe dpo`: masked-LoRA DPO of [model] path on [dpo] data_file (JSONL, or a patch set when
 * it ends in .h5) with SNIP masks, outputs in <[run] out_dir>/dpo. With data_file empty it
 * trains the run's quantized model (rs_run_paths_init: q_dir) on the run's patch set. Returns
 * 0, -1 + message, or the number of the signal that interrupted it (after writing a
 * checkpoint). */
int rs_dpo_run(const rs_config *cfg, int resume, int force);
/* `resafe dpo --plan`: the memory plan of that run (memplan.h) for sequences of [dpo]
 * max_seq_len tokens on [model] backend (cuda planned in bf16 on any machine), from the model's
 * config.json alone: no weights or data are read. Says whether it fits where the free memory is
 * known. 0, or -1 + message. */
int rs_dpo_plan(const rs_config *cfg);

#endif
