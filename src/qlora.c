/* qlora: `resafe quantize --method qlora`, QLoRA (Dettmers et al. 2023, arXiv 2305.14314):
 * the base quantized to NF4, a LoRA adapter trained on top of the packed weights with the SFT
 * loss on the calibration set, then merged. With --bits B (the paper's QLoRA rows at 8, 3 and
 * 2 bits; NF4 has 4 only) the base is RTN's integer grid instead (--group, --sym as rtn).
 *
 *   1. <work>/base: the model as `resafe quantize --method nf4` writes it (absmax blocks of 64),
 *      or as `--method rtn --bits B --group G [--sym]` does, with "qlora" as the method in its
 *      metadata.
 *   2. LoRA on the targeted linears of the loaded base (PEFT's init: A Kaiming-uniform, B zero,
 *      no dropout, no masks); the base stays frozen and packed, forward and backward run through
 *      qmatmul / qmatmul_t (rs_train_forward / rs_train_backward with the adapter). Loss: mean
 *      NLL over the response tokens of a batch, as `resafe sft`; AdamW, cosine decay, clip 1.
 *   3. rs_merge_run (`resafe merge`) of the adapter into the base with train.merge: refit
 *      (default: W' = NF4(dequant(Q0) + (alpha/r) B A), absmax recomputed (an integer base:
 *      RTN with new scales and zeros): the usual merge-then-requantize, a plain quantized model
 *      every stage loads, trains on and merges into), grid (the codes re-rounded on Q0's
 *      absmax or scales), or adapter (QLoRA's own inference form, the
 *      adapter kept beside the quantized weights as resafe_adapter.h5: generate, triplets and eval
 *      apply it, but training does not see it and `resafe merge` refuses it, so it cannot be the
 *      quantized model of a `resafe train` run).
 * The output also holds the adapter (qlora_adapter.h5, inert: only resafe_adapter.h5 is
 * applied at load) and train_metrics.jsonl. No checkpoints: an interrupted run starts over. */
#include <cJSON.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/checkpoint.h"
#include "resafe/pipeline.h"
#include "resafe/quant_methods.h"
#include "resafe/train.h"

/* ---------------------------------------------------------------- the training */

static const char *const g_sections[] = {"sft", NULL};

typedef struct {
    const rs_quantize_job *j;
    rs_model m;
    rs_tokenizer *tok;
    rs_example_set data;
    rs_lora lora;
    int have_lora;
    rs_train_state *state;
    rs_optim opt;
    rs_batch_buf bb;
    rs_data_order order;
    rs_lr_schedule sched;
    rs_metrics_log log;
    int micro;
    int32_t *idx;
    const rs_seq **batch;
    float *logp, *d_logp;
} qlora_run;

static int load(qlora_run *r, const char *base, const rs_config *cfg) {
    const rs_qtrain_opts *t = &r->j->train;
    const rs_backend *be = rs_backend_by_name(t->backend);
    if (!be) return -1;
    RS_TRY(rs_model_load(base, be, &r->m));
    r->tok = rs_tokenizer_load(base);
    if (!r->tok) return -1;
    rs_encoder enc = {r->tok, RS_CHAT_NONE, NULL, -1, r->j->q.max_seq_len};
    RS_TRY(rs_chat_kind_of_config(cfg, base, &enc.kind));
    if (r->m.cfg.n_eos > 0) enc.eos_id = r->m.cfg.eos_token_ids[0];
    RS_TRY(rs_examples_load(r->j->calib, &enc, t->prompt_key, t->response_key, &r->data));
    if (r->data.n == 0) return RS_FAIL("%s: no examples", r->j->calib);
    if (r->data.n_truncated)
        rs_warn("%s: %d responses cut to --max-seq-len %d tokens", r->j->calib, r->data.n_truncated,
                r->j->q.max_seq_len);
    return 0;
}

static int setup(qlora_run *r, const char *metrics) {
    const rs_qtrain_opts *t = &r->j->train;
    unsigned targets;
    if (rs_lora_parse_targets(t->targets, &targets) != 0) return rs_fail_context("--targets");
    rs_rng init;
    rs_rng_seed(&init, r->j->q.seed);
    RS_TRY(rs_lora_init(&r->lora, &r->m, t->rank, t->alpha, targets, RS_MASK_NONE, 0, &init));
    r->have_lora = 1;
    r->micro = t->micro_batch_size > 0 && t->micro_batch_size < t->batch_size ? t->micro_batch_size
                                                                              : t->batch_size;
    r->state = rs_train_state_new(&r->m, &r->lora, r->micro, r->data.max_len, 0, 0);
    if (!r->state) return -1;
    rs_optim_init(&r->opt, r->m.be, 0.9f, 0.999f, 1e-8f, 0.0f);
    rs_optim_add(&r->opt, "lora", r->lora.flat_params, r->lora.flat_grads, NULL, r->lora.n_flat, 1);
    rs_optim_alloc(&r->opt);
    rs_batch_buf_init(&r->bb, r->micro, r->data.max_len);
    rs_data_order_init(&r->order, r->data.n, r->j->q.seed);
    int per_epoch = rs_batches_per_epoch(r->data.n, t->batch_size);
    r->sched = (rs_lr_schedule){RS_SCHED_COSINE, t->lr, 0,
                                t->steps > 0 ? t->steps : t->epochs * per_epoch};
    r->idx = rs_malloc((size_t)t->batch_size * sizeof *r->idx);
    r->batch = rs_malloc((size_t)r->micro * sizeof *r->batch);
    r->logp = rs_malloc((size_t)r->micro * sizeof *r->logp);
    r->d_logp = rs_malloc((size_t)r->micro * sizeof *r->d_logp);
    rs_info("qlora: %d examples (longest %d tokens), %d steps of %d, LoRA rank %d alpha %g on "
            "%zu values",
            r->data.n, r->data.max_len, r->sched.total_steps, t->batch_size, t->rank, t->alpha,
            r->lora.n_flat);
    return rs_metrics_open(&r->log, metrics, 0);
}

static void free_run(qlora_run *r) {
    rs_example_set_free(&r->data);
    if (r->tok) rs_tokenizer_free(r->tok);
    if (r->state) rs_train_state_free(r->state);
    rs_optim_free(&r->opt);
    rs_batch_buf_free(&r->bb);
    rs_data_order_free(&r->order);
    rs_metrics_close(&r->log);
    if (r->have_lora) rs_lora_free(&r->lora);
    if (r->m.be) rs_model_free(&r->m);
    free(r->idx), free(r->batch), free(r->logp), free(r->d_logp);
}

/* Forward and backward of one batch in micro-batches: dA, dB of the mean response NLL. */
static int batch_grad(qlora_run *r, int n, double *loss, long *n_tokens) {
    long total = 0;
    for (int i = 0; i < n; i++)
        total += r->data.seqs[r->idx[i]].n - r->data.seqs[r->idx[i]].n_prompt;
    double nll = 0;
    for (int a = 0; a < n; a += r->micro) {
        int k = n - a < r->micro ? n - a : r->micro;
        for (int i = 0; i < k; i++)
            r->batch[i] = &r->data.seqs[r->idx[a + i]];
        const rs_train_batch *b = rs_batch_fill(&r->bb, r->batch, k, NULL);
        RS_TRY(rs_train_forward(&r->m, &r->lora, r->state, b, r->logp));
        for (int i = 0; i < k; i++) {
            nll -= r->logp[i];
            r->d_logp[i] = (float)(-1.0 / (double)total);
        }
        RS_TRY(rs_train_backward(&r->m, &r->lora, r->state, b, r->d_logp, NULL));
    }
    *loss = nll / (double)total;
    *n_tokens = total;
    return 0;
}

static int one_step(qlora_run *r, int step) {
    int n = rs_data_order_next(&r->order, r->j->train.batch_size, r->idx);
    rs_optim_zero_grads(&r->opt);
    double loss;
    long tokens;
    RS_TRY(batch_grad(r, n, &loss, &tokens));
    double norm = rs_optim_grad_norm(&r->opt);
    if (!isfinite(loss) || !isfinite(norm))
        return RS_FAIL("qlora: step %d: the loss is %g and the gradient norm %g", step + 1, loss,
                       norm);
    double lr = rs_lr_at(&r->sched, step);
    rs_optim_step(&r->opt, lr, rs_clip_factor(norm, 1.0));
    char line[256];
    snprintf(line, sizeof line,
             "{\"step\":%d,\"epoch\":%lld,\"loss\":%.9g,\"tokens\":%ld,\"lr\":%.9g,"
             "\"grad_norm\":%.9g}",
             step + 1, (long long)r->order.epoch, loss, tokens, lr, norm);
    return rs_metrics_write(&r->log, line);
}

/* The steps; 0, -1, or the signal that stopped them. */
static int train_steps(qlora_run *r) {
    double last = 0;
    for (int s = 0; s < r->sched.total_steps; s++) {
        int sig = rs_train_stop_signal();
        if (sig) return sig;
        RS_TRY(one_step(r, s));
        if (rs_now() - last >= 1.0 || s + 1 == r->sched.total_steps) {
            last = rs_now();
            rs_info("qlora: step %d/%d", s + 1, r->sched.total_steps);
        }
    }
    return 0;
}

/* Train the adapter on base and save it: 0, -1, or a signal number. */
static int train(const rs_quantize_job *j, const char *base, const char *work,
                 const char *adapter) {
    /* [model] path names the fp model: the adapter's config hash must not see the work dir */
    rs_config *cfg = rs_qtrain_config(j, j->model, work);
    if (!cfg) return -1;
    qlora_run r;
    memset(&r, 0, sizeof r);
    r.j = j;
    char *metrics = rs_path_join(work, "train_metrics.jsonl");
    int threads = j->train.threads;
    if (threads > 0) omp_set_num_threads(threads);
    int rc = load(&r, base, cfg);
    if (rc == 0) rc = setup(&r, metrics);
    if (rc == 0) {
        rs_train_catch_signals();
        rc = train_steps(&r);
    }
    if (rc == 0) rc = rs_adapter_save(adapter, &r.lora, rs_config_hash(cfg, g_sections), j->model);
    free_run(&r);
    free(metrics);
    rs_config_free(cfg);
    return rc;
}

/* ---------------------------------------------------------------- the output */

typedef struct {
    const rs_quantize_job *j;
} manifest_edit;

/* The merge's record names the work directory's files: name the output's instead, so that
 * the same inputs give the same bytes. */
static void edit_merge_stats(void *stats, void *user) {
    const rs_quantize_job *j = ((manifest_edit *)user)->j;
    cJSON_ReplaceItemInObject(stats, "adapter", cJSON_CreateString("qlora_adapter.h5"));
    char base[1024], spec[64];
    snprintf(base, sizeof base, "%s of %s", rs_qspec_name(&j->q.spec, spec, sizeof spec),
             j->model);
    cJSON_ReplaceItemInObject(stats, "base", cJSON_CreateString(base));
}

static void edit_manifest(void *manifest, void *user) {
    const rs_quantize_job *j = ((manifest_edit *)user)->j;
    cJSON *m = manifest;
    edit_merge_stats(cJSON_GetObjectItemCaseSensitive(m, "merge"), user);
    cJSON_ReplaceItemInObject(m, "method", cJSON_CreateString("qlora"));
    cJSON_DeleteItemFromObject(m, "calibration");
    cJSON_AddItemToObject(m, "calibration", rs_qtrain_calib_entry(j));
    cJSON_DeleteItemFromObject(m, "training");
    cJSON_AddItemToObject(m, "training", rs_qtrain_manifest(j));
}

static int finish(const rs_quantize_job *j, const char *work, const char *merged,
                  const char *adapter) {
    char *metrics = rs_path_join(work, "train_metrics.jsonl");
    int rc = rs_copy_file_into(adapter, merged, "qlora_adapter.h5");
    if (rc == 0) rc = rs_copy_file_into(metrics, merged, "train_metrics.jsonl");
    manifest_edit e = {j};
    char *man = rs_path_join(merged, "resafe_manifest.json");
    char *stats = rs_path_join(merged, "merge_stats.json");
    if (rc == 0) rc = rs_json_file_edit(man, edit_manifest, &e);
    if (rc == 0) rc = rs_json_file_edit(stats, edit_merge_stats, &e);
    free(man), free(stats);
    if (rc == 0 && rs_path_exists(j->out))
        rc = RS_FAIL("%s: already exists (choose a new --out)", j->out);
    if (rc == 0 && rename(merged, j->out) != 0)
        rc = RS_FAIL("%s: cannot rename %s into place", j->out, merged);
    free(metrics);
    return rc;
}

int rs_qlora_job_run(const rs_quantize_job *j, rs_quant_sizes *sizes) {
    RS_TRY(rs_qtrain_precheck(j));
    rs_merge_mode mode;
    if (rs_merge_mode_from_name(j->train.merge, &mode) != 0 || mode == RS_MERGE_EXACT)
        return RS_FAIL("--merge: '%s' is not refit, grid or adapter", j->train.merge);
    char *work = rs_tmp_name(j->out), *base = rs_path_join(work, "base");
    char *adapter = rs_path_join(work, "adapter.h5"), *merged = rs_path_join(work, "merged");
    rs_quantize_job q0 = *j; /* the base: nf4, or rtn with the job's bits, group and sym */
    if (j->q.spec.format == RS_QFMT_NF4)
        rs_quantize_job_set_method(&q0, "nf4", 0, 0);
    else
        rs_quantize_job_set_method(&q0, "rtn", 1, 1);
    q0.method_name = "qlora";
    q0.out = base;
    q0.calib = NULL;
    int rc = rs_mkdir_p(work);
    if (rc == 0) rc = rs_quantize_job_run(&q0, sizes);
    if (rc == 0) rc = train(j, base, work, adapter);
    rs_merge_stats st;
    if (rc == 0) rc = rs_merge_run(NULL, base, adapter, mode, merged, &st);
    if (rc == 0)
        rs_info("qlora: merged (%s): delta norm %.4g, kept %.1f%%", j->train.merge, st.delta_norm,
                100.0 * st.kept_fraction);
    if (rc == 0) rc = finish(j, work, merged, adapter);
    if (rs_path_exists(work)) rs_remove_tree(work);
    free(work), free(base), free(adapter), free(merged);
    return rc;
}
