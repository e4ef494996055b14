/* train: what every training loop shares (SFT, DPO): the learning-rate schedule, AdamW over a
 * list of fp32 tensors with optional masks, global gradient-norm clipping, (prompt, response)
 * sequences and their batches, the data order, the metrics log, the stop signal, and the
 * full-parameter SFT entry point.
 *
 * Everything numeric runs through backend ops (adamw, sum_squares, zero_f32), so the same loop
 * drives the cpu and the cuda backend. */
#ifndef RESAFE_TRAIN_H
#define RESAFE_TRAIN_H

#include "resafe/config.h"
#include "resafe/model_train.h"
#include "resafe/tokenizer.h"
#include "resafe/chat.h"

/* ---------------------------------------------------------------- learning-rate schedule */
typedef enum { RS_SCHED_CONSTANT = 0, RS_SCHED_LINEAR, RS_SCHED_COSINE } rs_sched_kind;

typedef struct {
    rs_sched_kind kind;
    double lr;         /* peak learning rate */
    int warmup_steps;  /* linear ramp */
    int total_steps;   /* optimizer steps of the whole run */
} rs_lr_schedule;

/* "constant", "linear", "cosine" -> kind; -1 when unknown (no message). */
int rs_sched_kind_from_name(const char *name, rs_sched_kind *out);
/* Learning rate of optimizer step s (0-based: the first update is s = 0).
 * Warm-up: lr * (s + 1) / warmup_steps for s < warmup_steps (the first step already moves,
 * unlike transformers' schedulers whose first step has lr 0). After it, with
 * p = (s - warmup) / max(1, total - warmup): linear lr * (1 - p), cosine lr * 0.5 (1 + cos(pi p)),
 * constant lr; never below 0. */
double rs_lr_at(const rs_lr_schedule *s, int step);

/* ---------------------------------------------------------------- AdamW over a parameter list */
#define RS_OPTIM_NAME 128
typedef struct {
    char name[RS_OPTIM_NAME]; /* the tensor's name in checkpoints, e.g. "lora/layers.0.q_proj/A" */
    float *p, *g;             /* device: the parameter and its (accumulated) gradient */
    float *m, *v;             /* device: Adam moments, owned by the optimizer (zeroed) */
    const uint8_t *mask;      /* device [n] or NULL: entries with 0 are frozen (p, m, v unchanged);
                               * read at every step, so masks may change in place */
    size_t n;
    int decay;                /* decoupled weight decay applies to this tensor */
} rs_optim_param;

typedef struct {
    const rs_backend *be;
    float beta1, beta2, eps, weight_decay;
    int step;                 /* optimizer steps taken (Adam's bias correction uses step + 1) */
    int n_params;
    rs_optim_param *params;
    void *block;              /* the moments: one device allocation */
    size_t n_total;           /* parameters counted */
} rs_optim;

/* AdamW with these hyper-parameters (torch.optim.AdamW semantics, as the backend op). */
void rs_optim_init(rs_optim *o, const rs_backend *be, float beta1, float beta2, float eps,
                   float weight_decay);
/* Register a tensor (before rs_optim_alloc). */
void rs_optim_add(rs_optim *o, const char *name, float *p, float *g, const uint8_t *mask,
                  size_t n, int decay);
/* Allocate the moments (zeroed) once every tensor is registered; prints the plan at debug. */
void rs_optim_alloc(rs_optim *o);
void rs_optim_free(rs_optim *o);
void rs_optim_zero_grads(rs_optim *o);
/* sqrt(sum of g^2) over every registered gradient (masked-out entries included: the backend
 * has no masked reduction; see the note in rs_optim_step). */
double rs_optim_grad_norm(const rs_optim *o);
/* Clip factor for a global norm: min(1, clip / (norm + 1e-6)) as torch's clip_grad_norm_;
 * clip <= 0 means no clipping (1). */
float rs_clip_factor(double norm, double clip);
/* One AdamW update of every tensor with learning rate lr; gradients are multiplied by
 * grad_scale first (the clip factor). Increments o->step. */
void rs_optim_step(rs_optim *o, double lr, float grad_scale);
const rs_optim_param *rs_optim_find(const rs_optim *o, const char *name);

/* ---------------------------------------------------------------- sequences and batches */
/* One training sequence: prompt tokens then response tokens; the loss (and a DPO log-prob)
 * covers the response tokens ids[n_prompt .. n) only. */
typedef struct {
    int32_t *ids;
    int n, n_prompt;
} rs_seq;

/* Host buffers for batches of up to max_B sequences of max_T tokens (and as many prefix
 * tokens: rs_batch_fill_pairs). */
typedef struct {
    int max_B, max_T;
    int32_t *tokens, *pos, *targets;
    int32_t *prefix_tokens, *prefix_pos, *prefix_of;
    rs_train_batch batch;
} rs_batch_buf;

void rs_batch_buf_init(rs_batch_buf *bb, int max_B, int max_T);
void rs_batch_buf_free(rs_batch_buf *bb);
/* Right-padded batch of n sequences (T = the longest): targets[t] = ids[t + 1] for the positions
 * that predict a response token (t = n_prompt - 1 .. n - 2), -1 elsewhere; padding has pos -1.
 * Returns the batch (pointing into bb) and the number of target tokens in *n_targets. */
const rs_train_batch *rs_batch_fill(rs_batch_buf *bb, const rs_seq *const *seqs, int n,
                                    long *n_targets);
/* The pairs seqs[i], seqs[k + i] (i < k; DPO: chosen, rejected) as rs_batch_fill's 2k
 * sequences, but each pair's common start as one shared prefix (model_train.h) that both
 * continue: the longest common start of the two that ends before the last prompt token of
 * either (that token stays in each sequence: its row predicts the sequence's first response
 * token), none where that is empty. Same targets, so the same seq_logp. NULL when the packed
 * batch would not fit max_B x max_T tokens or would not have fewer rows than rs_batch_fill's
 * (the caller then uses that); a state planned with prefixes (rs_train_state_new) for max_B x
 * max_T takes every batch this returns. */
const rs_train_batch *rs_batch_fill_pairs(rs_batch_buf *bb, const rs_seq *const *seqs, int k);

/* Encoding of (prompt, response) text, the way generation will later see the prompt:
 * prompt = the chat template's rendering of one user turn with the generation prompt (exactly
 * what `resafe generate --chat` feeds the model); response = the rest of the template's rendering
 * of the full conversation (the template writes the end-of-turn token). With RS_CHAT_NONE the
 * prompt is the text with the tokenizer's specials (BOS) and the response is the text plus the
 * model's first EOS id. max_len > 0 truncates the response so that n <= max_len; a prompt that
 * leaves no room for one response token is an error (-1 + message; the caller names the record).
 * system may be NULL. */
typedef struct {
    const rs_tokenizer *tok;
    rs_chat_kind kind;
    const char *system;
    int32_t eos_id;  /* appended with RS_CHAT_NONE (-1: none) */
    int max_len;
} rs_encoder;
int rs_encode_example(const rs_encoder *e, const char *prompt, const char *response, rs_seq *out,
                      int *truncated);
void rs_seq_free(rs_seq *s);
/* The (prompt, response) examples of a JSONL file (objects with prompt_key and response_key
 * strings), encoded by enc; a bad record fails naming path:line. n_truncated: responses cut to
 * enc->max_len. Empty files are the caller's to refuse. */
typedef struct {
    rs_seq *seqs;
    int n, cap, max_len, n_truncated;
} rs_example_set;
int rs_examples_load(const char *path, const rs_encoder *enc, const char *prompt_key,
                     const char *response_key, rs_example_set *out);
void rs_example_set_free(rs_example_set *s);
/* The template of [model] chat_template, detected from model_dir when it is auto. */
int rs_chat_kind_of_config(const rs_config *cfg, const char *model_dir, rs_chat_kind *kind);

/* ---------------------------------------------------------------- data order
 * Each epoch is a fresh permutation of 0..n-1 drawn from the order's own rng; a batch takes the
 * next batch_size entries; an epoch ends when fewer than batch_size remain (they are dropped,
 * as drop_last), except that a data set smaller than one batch is one batch. Everything here
 * goes into checkpoints. */
typedef struct {
    int n;
    int32_t *perm;   /* [n] the current epoch's order */
    int64_t epoch;   /* epochs started - 1 */
    int64_t cursor;  /* next entry of perm */
    rs_rng rng;
} rs_data_order;

void rs_data_order_init(rs_data_order *d, int n, uint64_t seed);
void rs_data_order_free(rs_data_order *d);
int rs_batches_per_epoch(int n, int batch_size);
/* Next batch: writes its indices to out (batch_size of them, or n when n < batch_size) and
 * returns how many. */
int rs_data_order_next(rs_data_order *d, int batch_size, int32_t *out);

/* ---------------------------------------------------------------- JSONL data files */
struct cJSON;
/* Call fn for every non-blank line of a JSONL file, parsed (an object, else an error naming the
 * file and line). fn gets the 1-based line number for its own messages. */
typedef int (*rs_jsonl_fn)(void *user, const struct cJSON *obj, const char *path, int line);
int rs_jsonl_each(const char *path, rs_jsonl_fn fn, void *user);
/* The string member `key` of obj, or -1 + "path:line: ..." when missing or not a string. */
int rs_json_get_string(const struct cJSON *obj, const char *key, const char *path, int line,
                       const char **out);

/* ---------------------------------------------------------------- run helpers */
/* FNV-1a 64 of bytes, chained from h (start with RS_FNV_INIT). */
#define RS_FNV_INIT 0xcbf29ce484222325ull
uint64_t rs_fnv1a(uint64_t h, const void *data, size_t n);
/* Hash of the config keys that decide a run's numbers: every key of the listed sections
 * (NULL-terminated) plus [model] path and chat_template and [run] seed. Keys that only say
 * where or how often things are written ([run] out_dir, checkpoint_every, log_level, [model]
 * threads, backend) are left out, so a resumed run may change them. */
uint64_t rs_config_hash(const rs_config *cfg, const char *const *sections);
/* Hash of a file's bytes (the training data); -1 + message when unreadable. */
int rs_file_hash(const char *path, uint64_t *out);

/* SIGINT/SIGTERM set a flag that the loops read at step boundaries (the one piece of
 * process-wide state here besides the log level: a signal handler can do nothing else); a
 * second signal ends the process at once. */
void rs_train_catch_signals(void);
int rs_train_stop_signal(void); /* the signal number caught, 0 when none */

/* The step loop both training commands share: step_fn until *step reaches total_steps, a
 * checkpoint (save_fn) every checkpoint_every steps, and on SIGINT/SIGTERM a final checkpoint
 * and a warning naming ckpt_path; with restart_hint set (a run whose stage directory its caller
 * deletes), no final checkpoint and a warning ending in restart_hint instead. Returns 0, -1
 * (message recorded), or the signal number. */
typedef struct {
    const char *stage;     /* "sft", "dpo": the message prefix */
    const char *ckpt_path;
    int total_steps, checkpoint_every;
    const int64_t *step;   /* advanced by step_fn */
    int (*step_fn)(void *user);
    int (*save_fn)(void *user);
    void *user;
    const char *restart_hint; /* NULL: the checkpoint and "continue with --resume" */
} rs_train_loop;
int rs_train_loop_run(const rs_train_loop *loop);
/* Create stage_dir and check the checkpoint against the flags: --resume needs one, and one
 * that exists needs --resume or --force. Returns 1 when resuming, 0 when starting, -1. */
int rs_train_stage_start(const char *stage_dir, const char *ckpt_path, int resume, int force);

/* Test hook: RESAFE_TEST_NAN_STEP=s makes the loss of optimizer step s (0-based) NaN, so the
 * tests can check that a non-finite loss stops the run cleanly. */
int rs_train_nan_injected(int step);

/* Metrics log (JSONL): one line per step, appended and flushed. Opening for a resumed run cuts
 * the file back to keep_bytes (the size the checkpoint recorded); a fresh run truncates. */
typedef struct {
    FILE *f;
    char *path;
    int64_t bytes; /* size after the last line */
} rs_metrics_log;
int rs_metrics_open(rs_metrics_log *l, const char *path, int64_t keep_bytes);
/* Append one line (a JSON object without the newline). */
int rs_metrics_write(rs_metrics_log *l, const char *json_line);
void rs_metrics_close(rs_metrics_log *l);

/* ---------------------------------------------------------------- SFT */
/* `resafe sft`: full-parameter supervised fine-tuning (optionally QAT: weights, and LLM-QAT's
 * activations and KV) of [model] path on [sft] data_file, on any backend (mixed precision with
 * fp32 masters where the backend's weights are not fp32), written as a Hugging Face model
 * directory. resume: continue from the stage's
 * checkpoint; force: start over even if one exists. Returns 0, -1 + message, or the number of
 * the signal that interrupted it (after writing a checkpoint). */
int rs_sft_run(const rs_config *cfg, int resume, int force);
/* rs_sft_run for a caller that deletes [run] out_dir afterwards (resafe quantize --method qat):
 * starts over (force), and an interrupted run writes no checkpoint and says that it must be
 * started again (restart_hint, e.g. "nothing kept: run the command again"). */
int rs_sft_run_once(const rs_config *cfg, const char *restart_hint);

#endif
