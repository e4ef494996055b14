/* eval_internal: what src/eval.c (options, sets, the stage) and src/eval_model.c (one model's
 * metrics, the reference) share. */
#ifndef RESAFE_EVAL_INTERNAL_H
#define RESAFE_EVAL_INTERNAL_H

#include <stdio.h>

#include "resafe/chat.h"
#include "resafe/config.h"
#include "resafe/eval.h"
#include "resafe/gen_shard.h"
#include "resafe/generate.h"
#include "resafe/pipeline.h"
#include "resafe/progress.h"
#include "resafe/records.h"
#include "resafe/tokenizer.h"

typedef struct {
    char *prompt;   /* the text (held-out text for the heldout set) */
    char *category; /* NULL when the file has no category column */
    char *answer;   /* benign set only */
} eval_item;

typedef struct {
    const char *name; /* "harmful", "benign", "safe", "heldout" */
    const char *path;
    int present, n, has_category;
    eval_item *items;
} eval_set;

typedef struct {
    double temperature, top_p; /* as written in the config (the sampler takes floats) */
    int top_k;
} attack_setting;

typedef struct {
    const rs_config *cfg;
    const rs_backend *be;
    eval_set harmful, benign, safe, heldout;
    rs_judge judge;
    rs_answer_match match;
    int max_new_tokens, batch_size, chat, attack_samples;
    const char *system;
    uint64_t seed;
    int n_settings; /* 0: no decoding attacks */
    attack_setting *settings;
    rs_comm *comm; /* data parallel: generation split by prompt (gen_shard.h); NULL alone */
    int rank;      /* only rank 0 writes */
} eval_ctx;

/* A loaded model with its tokenizer, chat template and generation defaults. */
typedef struct {
    const char *dir;
    rs_model m;
    rs_tokenizer *tok;
    rs_chat_kind kind;
    rs_gen_params gen; /* greedy, [eval] max_new_tokens, [generate] batch_size */
    rs_comm *comm;     /* the context's */
} ev_model;

/* What the models are compared with, from the reference model. */
typedef struct {
    int vocab;
    /* harmful prompts: the reference's first response token (argmax), its probability, and its
     * logit gap (its logit minus the largest other logit) */
    int n_harmful;
    int32_t *first_tok;
    double *first_p, *first_gap;
    /* benign prompts: prompt + the reference's greedy response (teacher-forcing sequences) */
    int n_benign;
    int32_t **seq_ids;
    int *seq_len, *seq_prompt;
    FILE *logp; /* per response position, in order: the reference's logits (float [vocab]) and
                 * their log-sum-exp (double) */
    long n_positions;
} ev_reference;

int ev_model_open(const eval_ctx *c, const char *dir, ev_model *em);
void ev_model_close(ev_model *em);
int ev_encode_prompts(const eval_ctx *c, const ev_model *em, const eval_set *s, int32_t ***ids,
                      int **lens);
void ev_free_ids(int32_t **ids, int *lens, int n);
int ev_generate(ev_model *em, int32_t **ids, int *lens, int n, const rs_gen_params *p,
                rs_progress *bar, int64_t base, rs_gen_output *out);
char *ev_decode(const ev_model *em, const rs_gen_output *o, size_t *len);

int ev_reference_run(const eval_ctx *c, const char *dir, ev_reference *ref);
void ev_reference_free(ev_reference *ref);
/* Evaluate one model; *out is its eval.json object. Writes out_dir/<name>/responses.jsonl. */
int ev_model_run(const eval_ctx *c, const rs_eval_model *model, const ev_reference *ref,
                 const char *out_dir, struct cJSON **out);

#endif
