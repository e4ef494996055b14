/* dpo_run: the `resafe dpo` training loop: masked-LoRA DPO with SNIP masks re-identified every
 * K steps, checkpoints, the metrics log, and the adapter outputs.
 *
 * Per step s (0-based): masks are (re-)identified first when s % K == 0 (from score_batches
 * batches drawn by an rng seeded with (seed, s), so a resumed run draws the same ones), then the
 * batch's gradient is accumulated in micro-batches, clipped by its global norm and applied by
 * AdamW honouring the masks. Outputs in <[run] out_dir>/dpo: adapter.h5, adapter_peft/ (not for
 * elementwise masks), metrics.jsonl, checkpoint.h5.
 *
 * Data parallel (world > 1, comm.h): every rank loads the same data; the reference log-probs
 * are split over the ranks by whole micro-batches and all-gathered (rs_dpo_reference_sharded:
 * the arrays of one process, bit for bit). Every rank draws the same global batch; rank r
 * computes the gradient of its slice (shard.h) as that slice's share of the global
 * mean, and the sum all-reduce gives every rank the global batch's gradient: in buckets of whole
 * layers (at least [dist] bucket_mb each), each started as soon as the step's last backward has
 * finished its layers (top first), so on nccl it overlaps the rest of backward. Clipping and
 * AdamW then run on identical numbers everywhere, so the adapters stay identical without being
 * broadcast. The SNIP weight gradients are
 * all-reduced per scoring batch (before |W * dW|), so every rank selects the same masks. The
 * stats are summed for the log; a stop signal seen by any rank stops all after the same step.
 * Rank 0 alone writes the metrics, checkpoints (the others wait at a barrier) and outputs. */
#include "resafe/checkpoint.h"
#include "resafe/comm.h"
#include "resafe/dist.h"
#include "resafe/dpo.h"
#include "resafe/memplan.h"
#include "resafe/patchset.h"
#include "resafe/pipeline.h"
#include "resafe/shard.h"
#include "resafe/snip.h"

#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *model_dir, *data_file;
    char *run_model, *run_patchset; /* the run's quantized model and patch set (data_file empty) */
    int is_patchset;                /* data_file is a patch set (HDF5), not JSONL */
    char *stage_dir, *ckpt_path, *metrics_path, *adapter_path, *peft_dir;
    rs_dpo_params dp;
    rs_lr_schedule sched;
    int batch_size, epochs, max_steps, max_seq_len, checkpoint_every;
    double weight_decay, grad_clip;
    int rank;
    float alpha, dropout;
    unsigned targets;
    rs_mask_mode mask_mode;
    rs_snip_params snip;
    int reidentify_every, score_batches, snip_nll;
    int group_constant; /* [lora] group_constant, auto resolved by [lora] merge */
    uint64_t seed, config_hash, data_hash;
} dpo_options;

static const char *const g_dpo_sections[] = {"dpo", "snip", "lora", NULL};

/* planning: no data needed, and a run's quantized model that does not exist yet is planned
 * from [model] path (the same architecture, dense). */
static int read_options(const rs_config *cfg, dpo_options *o, int planning) {
    memset(o, 0, sizeof *o);
    o->model_dir = rs_config_get_str(cfg, "model", "path");
    o->data_file = rs_config_get_str(cfg, "dpo", "data_file");
    if (!o->data_file[0]) { /* the run's patch set, on the run's quantized model */
        rs_run_paths p;
        RS_TRY(rs_run_paths_init(cfg, &p));
        char *q_config = rs_path_join(p.q_dir, "config.json");
        if (!planning || rs_path_exists(q_config) || !o->model_dir[0])
            o->model_dir = p.q_dir;
        else
            rs_info("dpo: the run's quantized model %s does not exist yet: planning [model] path "
                    "%s (its weights dense)", p.q_dir, o->model_dir);
        free(q_config);
        o->run_model = p.q_dir;
        o->data_file = o->run_patchset = p.patchset;
        p.q_dir = p.patchset = NULL;
        rs_run_paths_free(&p);
        o->is_patchset = 1;
        if (!planning && !rs_path_exists(o->data_file))
            return RS_FAIL("resafe dpo: [dpo] data_file is not set and the run's patch set %s does "
                           "not exist (run `resafe triplets` first, or set [dpo] data_file)",
                           o->data_file);
    } else {
        size_t n = strlen(o->data_file);
        o->is_patchset = n >= 3 && strcmp(o->data_file + n - 3, ".h5") == 0;
    }
    if (!o->model_dir[0]) return RS_FAIL("resafe dpo: [model] path is not set");
    o->stage_dir = rs_path_join(rs_config_get_str(cfg, "run", "out_dir"), "dpo");
    o->ckpt_path = rs_path_join(o->stage_dir, "checkpoint.h5");
    o->metrics_path = rs_path_join(o->stage_dir, "metrics.jsonl");
    o->adapter_path = rs_path_join(o->stage_dir, "adapter.h5");
    o->peft_dir = rs_path_join(o->stage_dir, "adapter_peft");
    o->dp.beta = (float)rs_config_get_float(cfg, "dpo", "beta");
    o->dp.sft_weight = (float)rs_config_get_float(cfg, "dpo", "sft_weight");
    o->dp.share_prompt = rs_config_get_bool(cfg, "dpo", "share_prompt");
    RS_TRY(rs_train_recompute_of_config(cfg, &o->dp.recompute));
    o->batch_size = (int)rs_config_get_int(cfg, "dpo", "batch_size");
    o->dp.micro_pairs = (int)rs_config_get_int(cfg, "dpo", "micro_batch_size");
    if (o->dp.micro_pairs == 0 || o->dp.micro_pairs > o->batch_size)
        o->dp.micro_pairs = o->batch_size;
    rs_sched_kind_from_name(rs_config_get_str(cfg, "dpo", "schedule"), &o->sched.kind);
    o->sched.lr = rs_config_get_float(cfg, "dpo", "lr");
    o->sched.warmup_steps = (int)rs_config_get_int(cfg, "dpo", "warmup_steps");
    o->epochs = (int)rs_config_get_int(cfg, "dpo", "epochs");
    o->max_steps = (int)rs_config_get_int(cfg, "dpo", "max_steps");
    o->max_seq_len = (int)rs_config_get_int(cfg, "dpo", "max_seq_len");
    o->weight_decay = rs_config_get_float(cfg, "dpo", "weight_decay");
    o->grad_clip = rs_config_get_float(cfg, "dpo", "grad_clip");
    o->rank = (int)rs_config_get_int(cfg, "lora", "rank");
    o->alpha = (float)rs_config_get_float(cfg, "lora", "alpha");
    o->dropout = (float)rs_config_get_float(cfg, "lora", "dropout");
    if (rs_lora_parse_targets(rs_config_get_str(cfg, "lora", "targets"), &o->targets) != 0)
        return rs_fail_context("[lora] targets");
    const char *mask = rs_config_get_str(cfg, "snip", "mask");
    o->mask_mode = strcmp(mask, "factor") == 0        ? RS_MASK_FACTOR
                   : strcmp(mask, "elementwise") == 0 ? RS_MASK_ELEMENTWISE
                                                      : RS_MASK_NONE;
    if (o->dropout > 0 && o->mask_mode == RS_MASK_ELEMENTWISE)
        return RS_FAIL("[lora] dropout: not defined with [snip] mask = elementwise (the adapter is "
                       "merged into the weight); set it to 0");
    const char *gc = rs_config_get_str(cfg, "lora", "group_constant");
    int exact = strcmp(rs_config_get_str(cfg, "lora", "merge"), "exact") == 0;
    o->group_constant = strcmp(gc, "auto") == 0 ? exact : strcmp(gc, "true") == 0;
    o->snip.tau = rs_config_get_float(cfg, "snip", "tau");
    o->snip.scope = strcmp(rs_config_get_str(cfg, "snip", "scope"), "per_layer") == 0
                        ? RS_SNIP_PER_LAYER
                        : RS_SNIP_GLOBAL;
    o->snip.factor_threshold = rs_config_get_float(cfg, "snip", "factor_threshold");
    o->reidentify_every = (int)rs_config_get_int(cfg, "snip", "reidentify_every");
    o->score_batches = (int)rs_config_get_int(cfg, "snip", "score_batches");
    o->snip_nll = strcmp(rs_config_get_str(cfg, "snip", "loss"), "nll") == 0;
    o->checkpoint_every = (int)rs_config_get_int(cfg, "run", "checkpoint_every");
    o->seed = (uint64_t)rs_config_get_int(cfg, "run", "seed");
    o->config_hash = rs_config_hash(cfg, g_dpo_sections);
    return planning ? 0 : rs_file_hash(o->data_file, &o->data_hash);
}

static void free_options(dpo_options *o) {
    free(o->run_model), free(o->run_patchset);
    free(o->stage_dir), free(o->ckpt_path), free(o->metrics_path), free(o->adapter_path);
    free(o->peft_dir);
}

/* ---------------------------------------------------------------- the run */

typedef struct {
    dpo_options o;
    rs_mem_plan_input plan_in; /* its cfg is the model's config.json, read before the weights */
    rs_mem_plan plan;
    rs_model m;
    rs_tokenizer *tok;
    rs_pref_set data;
    rs_lora lora;
    rs_snip snip;
    int have_snip;
    rs_dpo_trainer t;
    rs_optim opt;
    rs_data_order order;
    rs_metrics_log log;
    rs_checkpoint ckpt;
    int64_t step;
    double last_print;
    int32_t *batch_idx;
    rs_dist dist;
    rs_comm *comm; /* NULL in one process */
    /* Data parallel: the adapter gradients in buckets of whole layers, top layer first (the
     * order backward finishes them): bucket b is flat_grads[lo[b], hi[b]), final once backward
     * has done layer low[b]. next: buckets started this step, early: of them, during backward. */
    struct {
        int n, next, early;
        size_t *lo, *hi;
        int *low;
        char what[96];
    } gb;
} dpo_run;

/* A patch set: ids and stored reference log-probs. Responses longer than max_seq_len are cut as
 * the JSONL path cuts them; the stored references then no longer apply, and all of them are
 * recomputed (one code path, the same numbers as a run without stored references). */
static int load_patchset(dpo_run *r) {
    const dpo_options *o = &r->o;
    RS_TRY(rs_patchset_load(o->data_file, &r->data));
    for (int i = 0; i < r->data.n; i++)
        for (int k = 0; k < 2; k++) {
            const rs_seq *s = k ? &r->data.rejected[i] : &r->data.chosen[i];
            for (int t = 0; t < s->n; t++)
                if (s->ids[t] >= r->plan_in.cfg.vocab_size)
                    return RS_FAIL("%s: pair %d: token id %d outside the vocabulary of %s (%d)",
                                   o->data_file, i, s->ids[t], o->model_dir,
                                   r->plan_in.cfg.vocab_size);
        }
    int cut = rs_pref_truncate(&r->data, o->max_seq_len, o->data_file);
    if (cut < 0) return -1;
    if (cut > 0) {
        r->data.has_ref = 0;
        rs_warn("%s: %d responses cut to max_seq_len %d tokens: the stored reference log-probs "
                "no longer apply; recomputing them for every pair",
                o->data_file, cut, o->max_seq_len);
    } else {
        rs_info("dpo: %d pairs and their reference log-probs from the patch set %s", r->data.n,
                o->data_file);
        rs_patchset_check_model(o->data_file, o->model_dir);
    }
    return 0;
}

static int load_data(dpo_run *r, const rs_config *cfg) {
    const dpo_options *o = &r->o;
    if (o->is_patchset) return load_patchset(r);
    r->tok = rs_tokenizer_load(o->model_dir);
    if (!r->tok) return -1;
    rs_encoder enc = {r->tok, RS_CHAT_NONE, NULL, -1, o->max_seq_len};
    RS_TRY(rs_chat_kind_of_config(cfg, o->model_dir, &enc.kind));
    if (r->plan_in.cfg.n_eos > 0) enc.eos_id = r->plan_in.cfg.eos_token_ids[0];
    return rs_pref_load_jsonl(o->data_file, &enc, &r->data);
}

/* The run's shape into a plan's input (its model already read by rs_mem_plan_load_model):
 * sequences of seq_len tokens (a run: its longest pair; a plan: max_seq_len). */
static void plan_shape(const dpo_options *o, const char *backend, int seq_len,
                       rs_mem_plan_input *in) {
    in->backend = backend;
    in->lora_rank = o->rank;
    in->lora_targets = o->targets;
    in->mask_mode = o->mask_mode;
    in->lora_dropout = o->dropout > 0;
    in->batch_seqs = 2 * o->dp.micro_pairs;
    in->seq_len = seq_len;
    in->recompute = o->dp.recompute;
    in->prefixes = o->dp.share_prompt;
}

#define SMALLER_RUN "lower [dpo] micro_batch_size (pairs per forward), [dpo] max_seq_len or [lora] rank"

static size_t plan_need(const rs_mem_plan *p, size_t held) {
    return p->total - (held < p->total ? held : p->total);
}

/* What to change when a plan does not fit (rs_mem_plan_check's hint; "" when it fits or the
 * free memory is unknown): the fewest recomputing layers whose plan fits the free memory
 * (less recompute: faster), else a smaller run. */
static const char *plan_hint(const rs_mem_plan_input *in, const rs_mem_plan *plan,
                             const rs_backend *be, size_t held, char *buf, size_t size) {
    size_t free_bytes;
    const int L = in->cfg.n_layers;
    if (rs_mem_plan_free_bytes(be, &free_bytes) != 0 || plan_need(plan, held) <= free_bytes)
        return "";
    if (in->recompute >= L) return "even [model] recompute = true does not fit: " SMALLER_RUN;
    rs_mem_plan_input k_in = *in;
    rs_mem_plan p;
    for (int k = in->recompute + 1; k <= L; k++) {
        k_in.recompute = k;
        if (rs_mem_plan_compute(&k_in, &p) != 0) break;
        if (plan_need(&p, held) > free_bytes) continue;
        if (k == L)
            snprintf(buf, size, "set [model] recompute = true%s (%.2f GiB), or " SMALLER_RUN,
                     in->recompute > 0 ? " with recompute_layers = 0 (every layer)" : "",
                     p.total / 1073741824.0);
        else
            snprintf(buf, size, "set [model] recompute = true and recompute_layers = %d (the "
                     "fewest recomputing layers that fit: %.2f GiB), or " SMALLER_RUN,
                     k, p.total / 1073741824.0);
        return buf;
    }
    return "even [model] recompute = true does not fit: " SMALLER_RUN;
}

/* The model's config and the data first, then the plan (printed, refused when it cannot fit),
 * and only then the weights. */
static int load_inputs(dpo_run *r, const rs_config *cfg) {
    const dpo_options *o = &r->o;
    const rs_backend *be = rs_backend_by_name(rs_config_get_str(cfg, "model", "backend"));
    if (!be) return -1;
    RS_TRY(rs_mem_plan_load_model(o->model_dir, &r->plan_in));
    RS_TRY(load_data(r, cfg));
    plan_shape(o, be->name, r->data.max_len, &r->plan_in);
    RS_TRY(rs_mem_plan_compute(&r->plan_in, &r->plan));
    rs_mem_plan_print("dpo", &r->plan_in, &r->plan);
    size_t held = be->live_bytes ? be->live_bytes() : 0;
    char hint[320];
    RS_TRY(rs_mem_plan_check("dpo", &r->plan, be, held,
                             plan_hint(&r->plan_in, &r->plan, be, held, hint, sizeof hint)));
    return rs_model_load(o->model_dir, be, &r->m);
}

/* A measured total against the plan's: a warning past 10% more (the plan missed something). */
static void check_against_plan(const char *what, size_t measured, size_t planned) {
    if (planned > 0 && (double)measured > 1.1 * (double)planned)
        rs_warn("dpo: %s %.1f MiB exceeds the memory plan's %.1f MiB by %.0f%% (the plan missed "
                "an allocation: please report it)",
                what, measured / 1048576.0, planned / 1048576.0,
                100.0 * ((double)measured / (double)planned - 1.0));
}

/* The memory the run holds, by part, from the backend's accounting (backend.h live_bytes),
 * next to the plan made before allocating. */
static void print_memory_held(const rs_backend *be, size_t weights, size_t adapter, size_t acts,
                              size_t optim, int recompute, int n_layers, size_t planned) {
    const double g = 1048576.0;
    char label[48];
    size_t ws = be->workspace_bytes ? be->workspace_bytes() : 0, live = be->live_bytes();
    rs_info("dpo: memory on %s: weights %.1f MiB, adapter (A, B, gradients, masks, SNIP) %.1f "
            "MiB, optimizer state %.1f MiB, activations %.1f MiB (recompute %s), backend "
            "workspace %.1f MiB; %.1f MiB in all (planned %.1f MiB)",
            be->name, weights / g, adapter / g, optim / g, acts / g,
            rs_train_recompute_label(recompute, n_layers, label, sizeof label),
            ws / g, live / g, planned / g);
    check_against_plan("memory held after setup", live, planned);
}

static int snip_reduce(void *user, float *dW, size_t n) {
    dpo_run *r = user;
    return rs_comm_all_reduce_device_f32(r->comm, r->m.be, dW, n, "SNIP weight gradients");
}

/* ---------------------------------------------------------------- gradient buckets */

/* Buckets of whole layers of at least [dist] bucket_mb from the top layer down (flat_grads is
 * laid out layer by layer, lora.c), so the first bucket is final first. */
static void plan_grad_buckets(dpo_run *r) {
    const rs_lora *l = &r->lora;
    const int L = l->n_layers;
    size_t *start = rs_malloc((size_t)(L + 1) * sizeof *start);
    start[L] = l->n_flat;
    for (int layer = L - 1; layer >= 0; layer--) {
        start[layer] = start[layer + 1];
        for (int t = RS_LORA_N_TARGETS - 1; t >= 0; t--) {
            const rs_lora_linear *x = &l->lin[layer * RS_LORA_N_TARGETS + t];
            if (x->in) start[layer] = (size_t)(x->dA - l->flat_grads);
        }
    }
    r->gb.lo = rs_malloc((size_t)L * sizeof *r->gb.lo);
    r->gb.hi = rs_malloc((size_t)L * sizeof *r->gb.hi);
    r->gb.low = rs_malloc((size_t)L * sizeof *r->gb.low);
    const size_t want = rs_comm_bucket_bytes(r->comm) / sizeof(float);
    size_t hi = l->n_flat;
    for (int layer = L - 1; layer >= 0; layer--)
        if (layer == 0 || hi - start[layer] >= want) {
            if (hi > start[layer]) {
                r->gb.lo[r->gb.n] = start[layer], r->gb.hi[r->gb.n] = hi;
                r->gb.low[r->gb.n++] = layer;
            }
            hi = start[layer];
        }
    free(start);
    rs_debug("dpo: the adapter gradients (%zu floats) all-reduced in %d buckets of whole layers, "
             "each started as backward finishes it",
             l->n_flat, r->gb.n);
}

static int start_bucket(dpo_run *r, int b) {
    char what[160];
    snprintf(what, sizeof what, "%s, layers %d.. [%zu, %zu)", r->gb.what, r->gb.low[b],
             r->gb.lo[b], r->gb.hi[b]);
    return rs_comm_all_reduce_device_f32_async(r->comm, r->m.be, r->lora.flat_grads + r->gb.lo[b],
                                               r->gb.hi[b] - r->gb.lo[b], what);
}

/* rs_train_backward's hook on the step's last backward: layer and those above are final. */
static int grad_layer_done(void *user, int layer) {
    dpo_run *r = user;
    for (; r->gb.next < r->gb.n && r->gb.low[r->gb.next] >= layer; r->gb.next++, r->gb.early++)
        RS_TRY(start_bucket(r, r->gb.next));
    return 0;
}

/* The rest (all of them on a rank whose slice was empty), then the wait. */
static int finish_grad_buckets(dpo_run *r) {
    for (; r->gb.next < r->gb.n; r->gb.next++)
        RS_TRY(start_bucket(r, r->gb.next));
    RS_TRY(rs_comm_wait_device(r->comm, r->gb.what));
    rs_debug("%s: %d of %d buckets all-reduced during backward", r->gb.what, r->gb.early,
             r->gb.n);
    return 0;
}

static int setup(dpo_run *r) {
    dpo_options *o = &r->o;
    const rs_backend *be = r->m.be;
    size_t live0 = be->live_bytes ? be->live_bytes() : 0, live1, live2;
    rs_rng init;
    rs_rng_seed(&init, o->seed);
    RS_TRY(rs_lora_init(&r->lora, &r->m, o->rank, o->alpha, o->targets, o->mask_mode,
                        o->mask_mode != RS_MASK_NONE, &init));
    r->lora.dropout = o->dropout;
    if (o->group_constant)
        RS_TRY(rs_lora_setup_group_constant(&r->lora, &r->m, o->mask_mode, o->model_dir));
    if (o->mask_mode != RS_MASK_NONE) {
        RS_TRY(rs_snip_init(&r->snip, &r->m, &r->lora));
        r->have_snip = 1;
        if (r->comm) r->snip.reduce = snip_reduce, r->snip.reduce_user = r;
    }
    if (r->comm) plan_grad_buckets(r);
    live1 = be->live_bytes ? be->live_bytes() : 0;
    RS_TRY(rs_dpo_trainer_init(&r->t, &r->m, &r->lora, &r->data, &o->dp));
    rs_rng_seed(rs_train_state_rng(r->t.state), o->seed ^ 0xd0d0d0d0d0d0d0d0ull);
    live2 = be->live_bytes ? be->live_bytes() : 0;
    rs_optim_init(&r->opt, r->m.be, 0.9f, 0.999f, 1e-8f, (float)o->weight_decay);
    rs_optim_add(&r->opt, "lora", r->lora.flat_params, r->lora.flat_grads, r->lora.flat_mask,
                 r->lora.n_flat, 1);
    rs_optim_alloc(&r->opt);
    if (be->live_bytes) {
        size_t live3 = be->live_bytes(), ws = be->workspace_bytes ? be->workspace_bytes() : 0;
        print_memory_held(be, live0 > ws ? live0 - ws : live0, live1 - live0, live2 - live1,
                          live3 - live2, o->dp.recompute, r->m.cfg.n_layers, r->plan.total);
    }
    RS_TRY(rs_batch_check_world(o->batch_size, r->data.n, r->dist.world, "[dpo] batch_size"));
    rs_data_order_init(&r->order, r->data.n, o->seed);
    int per_epoch = rs_batches_per_epoch(r->data.n, o->batch_size);
    o->sched.total_steps = o->max_steps > 0 ? o->max_steps : o->epochs * per_epoch;
    r->batch_idx = rs_malloc((size_t)o->batch_size * sizeof *r->batch_idx);
    r->ckpt = (rs_checkpoint){.kind = "dpo", .config_hash = o->config_hash,
                              .data_hash = o->data_hash, .total_steps = o->sched.total_steps,
                              .order = &r->order, .dropout_rng = rs_train_state_rng(r->t.state),
                              .opt = &r->opt, .lora = &r->lora, .ref_chosen = r->data.ref_chosen,
                              .ref_rejected = r->data.ref_rejected, .n_ref = r->data.n};
    rs_info("dpo: %d pairs (longest %d tokens), %d steps of %d, LoRA rank %d on %zu values, "
            "%s masks",
            r->data.n, r->data.max_len, o->sched.total_steps, o->batch_size, o->rank,
            r->lora.n_flat, rs_mask_mode_name(o->mask_mode));
    return 0;
}

static void free_run(dpo_run *r) {
    rs_dpo_trainer_free(&r->t);
    if (r->have_snip) rs_snip_free(&r->snip);
    if (r->lora.block) rs_lora_free(&r->lora);
    rs_pref_free(&r->data);
    if (r->tok) rs_tokenizer_free(r->tok);
    rs_data_order_free(&r->order);
    rs_metrics_close(&r->log);
    rs_optim_free(&r->opt);
    if (r->m.be) rs_model_free(&r->m);
    free(r->batch_idx);
    free(r->gb.lo), free(r->gb.hi), free(r->gb.low);
    free_options(&r->o);
}

/* ---------------------------------------------------------------- SNIP */

/* This rank's slice of the global batch idx[0..n) (all of it in one process), with the trainer
 * set to take the global batch's means. */
static void take_slice(dpo_run *r, const int32_t *idx, int n, rs_shard *sh) {
    *sh = (rs_shard){0, n};
    if (r->dist.world > 1) rs_batch_shard(n, r->dist.world, r->dist.rank, sh); /* n >= world */
    long targets = 0;
    for (int i = 0; i < n; i++)
        targets += r->data.chosen[idx[i]].n - r->data.chosen[idx[i]].n_prompt;
    r->t.global_pairs = n;
    r->t.global_targets = targets;
}

static int snip_grad(void *user, const int32_t *idx, int n) {
    dpo_run *r = user;
    rs_shard sh;
    take_slice(r, idx, n, &sh);
    if (r->o.snip_nll) return rs_dpo_nll_accumulate(&r->t, idx + sh.first, sh.count, NULL);
    return rs_dpo_accumulate(&r->t, idx + sh.first, sh.count, NULL);
}

/* FNV-1a of every mask byte (factor: the flat A/B masks; elementwise: each mask_W), logged at
 * -v so the ranks' masks can be compared. */
static uint64_t mask_hash(dpo_run *r) {
    const rs_backend *be = r->m.be;
    uint64_t h = 1469598103934665603ull;
    size_t cap = 0;
    uint8_t *host = NULL;
    for (int i = -1; i < r->snip.n_lin; i++) {
        rs_lora_linear *lin = i < 0 ? NULL : rs_lora_at(&r->lora, r->snip.lin_layer[i],
                                                          r->snip.lin_target[i]);
        const uint8_t *dev = i < 0 ? r->lora.flat_mask : lin->mask_W;
        size_t n = i < 0 ? r->lora.n_flat : (size_t)lin->out * lin->in;
        if (!dev || (i >= 0 && r->lora.mask_mode != RS_MASK_ELEMENTWISE)) continue;
        if (n > cap) host = rs_realloc(host, cap = n);
        be->to_host(host, dev, n);
        for (size_t k = 0; k < n; k++) h = (h ^ host[k]) * 1099511628211ull;
    }
    free(host);
    return h;
}

/* Scores from score_batches batches drawn with an rng of (seed, step), then the masks. */
static int identify_masks(dpo_run *r) {
    const dpo_options *o = &r->o;
    int n_b = o->score_batches, bs = r->data.n < o->batch_size ? r->data.n : o->batch_size;
    rs_data_order pick;
    rs_data_order_init(&pick, r->data.n, o->seed ^ (0x5a1f0000ull + (uint64_t)r->step));
    int32_t **idx = rs_malloc((size_t)n_b * sizeof *idx);
    int *ns = rs_malloc((size_t)n_b * sizeof *ns);
    for (int b = 0; b < n_b; b++) {
        idx[b] = rs_malloc((size_t)bs * sizeof **idx);
        ns[b] = rs_data_order_next(&pick, bs, idx[b]);
    }
    double t0 = rs_now();
    int rc = rs_snip_score(&r->snip, snip_grad, r, idx, ns, n_b);
    rs_snip_report rep;
    if (rc == 0) rc = rs_snip_select(&r->snip, &o->snip, &rep);
    if (rc == 0) rs_lora_group_masks(&r->lora);
    if (rc == 0 && rs_get_log_level() >= RS_LOG_DEBUG)
        rs_debug("dpo: step %lld: masks hash %016llx (rank %d of %d)", (long long)r->step,
                 (unsigned long long)mask_hash(r), r->dist.rank, r->dist.world);
    if (rc == 0 && rep.n_selected == 0)
        rs_warn("dpo: step %lld: [snip] tau = %g selects no entry: nothing is trainable, the "
                "adapter's delta stays zero", (long long)r->step, o->snip.tau);
    if (rc == 0 && o->mask_mode == RS_MASK_FACTOR)
        rs_info("dpo: step %lld: SNIP masks (%.1f s): %zu of %zu weight entries selected "
                "(threshold %.3g); B rows trainable %.1f%%, A columns %.1f%%",
                (long long)r->step, rs_now() - t0, rep.n_selected, rep.n_total,
                (double)rep.threshold, 100 * rep.rows_B_trainable, 100 * rep.cols_A_trainable);
    else if (rc == 0)
        rs_info("dpo: step %lld: SNIP masks (%.1f s): %zu of %zu weight entries selected "
                "(threshold %.3g)",
                (long long)r->step, rs_now() - t0, rep.n_selected, rep.n_total,
                (double)rep.threshold);
    for (int b = 0; b < n_b; b++) free(idx[b]);
    free(idx), free(ns);
    rs_data_order_free(&pick);
    return rc;
}

/* ---------------------------------------------------------------- steps */

/* Rank 0 writes; the others wait for it (they hold the same state), so a checkpoint that a
 * later step's failure leaves behind is whole. */
static int save_checkpoint(dpo_run *r) {
    int rc = 0;
    if (r->dist.rank == 0) {
        r->ckpt.step = r->step;
        r->ckpt.metrics_bytes = r->log.bytes;
        rc = rs_checkpoint_save(r->o.ckpt_path, &r->ckpt);
    }
    if (rc != 0 || !r->comm) return rc;
    return rs_comm_barrier(r->comm, "the checkpoint");
}

static int write_metrics(dpo_run *r, const rs_dpo_stats *s, double lr, double norm) {
    if (r->dist.rank != 0) return 0;
    char line[768];
    snprintf(line, sizeof line,
             "{\"step\":%lld,\"epoch\":%lld,\"loss\":%.9g,\"reward_chosen\":%.9g,"
             "\"reward_rejected\":%.9g,\"margin\":%.9g,\"accuracy\":%.9g,\"logp_chosen\":%.9g,"
             "\"logp_rejected\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g}",
             (long long)r->step, (long long)r->order.epoch, s->loss, s->reward_chosen,
             s->reward_rejected, s->margin, s->accuracy, s->logp_chosen, s->logp_rejected, lr,
             norm);
    return rs_metrics_write(&r->log, line);
}

/* Data parallel: SIGINT/SIGTERM are held back until the next step's reduce, where every rank
 * learns of them and hands them to the train loop's handler at the same step (a rank that
 * stopped alone would leave the others waiting in a collective it never joins). Process-wide,
 * as signal handlers are; a second signal ends the process at once, as in the train loop. */
static volatile sig_atomic_t g_held_signal;
static struct sigaction g_loop_int, g_loop_term;

static void hold_signal(int sig) {
    if (g_held_signal) {
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    g_held_signal = sig;
}

static void hold_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = hold_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &g_loop_int);
    sigaction(SIGTERM, &sa, &g_loop_term);
}

/* The train loop's own handler sets its stop flag. */
static void release_signal(int sig) {
    const struct sigaction *a = sig == SIGINT ? &g_loop_int : &g_loop_term;
    if (a->sa_handler != SIG_DFL && a->sa_handler != SIG_IGN) a->sa_handler(sig);
}

/* The global batch's gradient and stats on every rank, and a stop signal seen anywhere. */
static int reduce_step(dpo_run *r, rs_dpo_stats *st) {
    char what[96];
    RS_TRY(finish_grad_buckets(r));
    double v[8] = {st->loss, st->reward_chosen, st->reward_rejected, st->margin, st->accuracy,
                   st->logp_chosen, st->logp_rejected, g_held_signal != 0};
    snprintf(what, sizeof what, "dpo step %lld stats", (long long)r->step + 1);
    RS_TRY(rs_comm_all_reduce_sum_f64(r->comm, v, 8, what));
    st->loss = v[0], st->reward_chosen = v[1], st->reward_rejected = v[2], st->margin = v[3];
    st->accuracy = v[4], st->logp_chosen = v[5], st->logp_rejected = v[6];
    st->n_pairs = r->t.global_pairs;
    /* the train loop stops at the step boundary where its own flag is set: set it everywhere */
    if (v[7] > 0 && !rs_train_stop_signal())
        release_signal(g_held_signal ? g_held_signal : SIGTERM);
    return 0;
}

/* Test hook: RESAFE_TEST_SIGTERM_AT="R:S" makes rank R signal itself in step S (1-based) after
 * the step's reduce: a SIGTERM that reaches one rank when the others have passed the point where
 * they could learn of it in this step. */
static void test_signal(const dpo_run *r) {
    const char *at = getenv("RESAFE_TEST_SIGTERM_AT");
    int rank, step;
    if (at && sscanf(at, "%d:%d", &rank, &step) == 2 && rank == r->dist.rank &&
        step == r->step + 1)
        raise(SIGTERM);
}

static int one_step(dpo_run *r) {
    const dpo_options *o = &r->o;
    double t0 = rs_now();
    if (r->have_snip && r->step % o->reidentify_every == 0) RS_TRY(identify_masks(r));
    int n = rs_data_order_next(&r->order, o->batch_size, r->batch_idx);
    rs_optim_zero_grads(&r->opt);
    rs_dpo_stats st;
    rs_shard sh;
    take_slice(r, r->batch_idx, n, &sh);
    if (r->comm) { /* the gradient all-reduce starts inside the last backward */
        r->gb.next = r->gb.early = 0;
        snprintf(r->gb.what, sizeof r->gb.what, "dpo step %lld gradients", (long long)r->step + 1);
        r->t.layer_done = grad_layer_done, r->t.layer_done_user = r;
    }
    int rc = rs_dpo_accumulate(&r->t, r->batch_idx + sh.first, sh.count, &st);
    r->t.layer_done = NULL;
    RS_TRY(rc);
    if (r->comm) RS_TRY(reduce_step(r, &st));
    test_signal(r);
    rs_lora_tie_grads(&r->lora);
    if (rs_train_nan_injected((int)r->step)) st.loss = NAN;
    double norm = rs_optim_grad_norm(&r->opt);
    if (!isfinite(st.loss) || !isfinite(norm))
        return RS_FAIL("dpo: step %lld: the loss is %g and the gradient norm %g: stopped without "
                       "updating; the last checkpoint (%s) is intact",
                       (long long)r->step + 1, st.loss, norm, o->ckpt_path);
    double lr = rs_lr_at(&o->sched, (int)r->step);
    rs_optim_step(&r->opt, lr, rs_clip_factor(norm, o->grad_clip));
    r->step++;
    RS_TRY(write_metrics(r, &st, lr, norm));
    /* the gradient norm waited for the device, so this is the step's time up to the update */
    rs_debug("dpo: step %lld took %.4f s", (long long)r->step, rs_now() - t0);
    if (r->step == 1 && r->m.be->peak_bytes) {
        rs_debug("dpo: after the first step %.1f MiB held, peak %.1f MiB (the op scratch grows "
                 "once, in the first step; planned %.1f MiB)",
                 r->m.be->live_bytes() / 1048576.0, r->m.be->peak_bytes() / 1048576.0,
                 r->plan.total / 1048576.0);
        check_against_plan("the peak of the first step", r->m.be->peak_bytes(), r->plan.total);
    }
    if (rs_now() - r->last_print >= 1.0 || r->step == o->sched.total_steps) {
        r->last_print = rs_now();
        rs_info("dpo: step %lld/%d loss %.4f acc %.2f margin %.4g lr %.3g |g| %.3g",
                (long long)r->step, o->sched.total_steps, st.loss, st.accuracy, st.margin, lr,
                norm);
    }
    return 0;
}

static int step_cb(void *r) { return one_step(r); }
static int save_cb(void *r) { return save_checkpoint(r); }

/* Steps until the end or a signal; returns 0, -1, or the signal number. */
static int train(dpo_run *r) {
    rs_train_loop loop = {"dpo", r->o.ckpt_path, r->o.sched.total_steps, r->o.checkpoint_every,
                          &r->step, step_cb, save_cb, r, NULL};
    return rs_train_loop_run(&loop);
}

/* Which pairs this rank computed the reference of, and an FNV-1a hash of the whole gathered
 * arrays (every rank's must match one process's: the tests compare them). */
static void log_reference_share(const dpo_run *r) {
    rs_shard s;
    rs_chunk_shard(r->data.n, r->t.p.micro_pairs, r->dist.world, r->dist.rank, &s);
    uint64_t h = 1469598103934665603ull;
    for (int k = 0; k < 2; k++) {
        const uint8_t *b = (const uint8_t *)(k ? r->data.ref_rejected : r->data.ref_chosen);
        for (size_t i = 0; i < (size_t)r->data.n * sizeof(float); i++)
            h = (h ^ b[i]) * 1099511628211ull;
    }
    rs_debug("dpo: reference of pairs [%d, %d) computed here, hash of all %016llx (rank %d of %d)",
             s.first, s.first + s.count, (unsigned long long)h, r->dist.rank, r->dist.world);
}

static int start_or_resume(dpo_run *r, int resume, int force) {
    const dpo_options *o = &r->o;
    /* rank 0 looks at the run directory; the others take its verdict (a failure there is
     * rank 0's error, and the others see it exit) */
    int resuming = r->dist.rank == 0 ? rs_train_stage_start(o->stage_dir, o->ckpt_path, resume,
                                                            force)
                                     : 0;
    if (resuming < 0) return -1;
    if (r->comm) RS_TRY(rs_comm_broadcast(r->comm, &resuming, sizeof resuming, 0, "dpo start"));
    if (resuming) {
        RS_TRY(rs_checkpoint_load(o->ckpt_path, &r->ckpt));
        r->data.has_ref = 1;
        r->step = r->ckpt.step;
        rs_info("dpo: resuming %s at step %lld", o->ckpt_path, (long long)r->step);
    } else if (!r->data.has_ref) {
        double t0 = rs_now();
        RS_TRY(rs_dpo_reference_sharded(&r->t, r->comm));
        rs_info("dpo: reference log-probs of %d pairs (adapter off) in %.1f s%s", r->data.n,
                rs_now() - t0, r->comm ? ", split over the ranks" : "");
        if (rs_get_log_level() >= RS_LOG_DEBUG) log_reference_share(r);
    }
    if (r->dist.rank != 0) return 0;
    return rs_metrics_open(&r->log, o->metrics_path, resume ? r->ckpt.metrics_bytes : 0);
}

static int write_outputs(dpo_run *r) {
    const dpo_options *o = &r->o;
    if (r->dist.rank != 0) return 0;
    RS_TRY(rs_adapter_save(o->adapter_path, &r->lora, o->config_hash, o->model_dir));
    if (o->mask_mode != RS_MASK_ELEMENTWISE)
        RS_TRY(rs_adapter_export_peft(o->peft_dir, &r->lora, o->model_dir));
    int peft = o->mask_mode != RS_MASK_ELEMENTWISE;
    rs_info("dpo: wrote %s%s%s", o->adapter_path, peft ? " and " : "", peft ? o->peft_dir : "");
    return 0;
}

/* The communicator of a data-parallel run (before the backend starts: nccl picks the GPU). */
static int start_comm(dpo_run *r, const rs_config *cfg) {
    RS_TRY(rs_dist_from_config(cfg, &r->dist));
    if (r->dist.world == 1) return 0;
    if (r->o.dropout > 0)
        return RS_FAIL("rank %d of %d: [lora] dropout = %g does not run data parallel yet (each "
                       "rank would draw other dropout masks than one process); set it to 0",
                       r->dist.rank, r->dist.world, r->o.dropout);
    RS_TRY(rs_comm_from_config(cfg, &r->dist, rs_config_get_str(cfg, "model", "backend"),
                               &r->comm));
    rs_info("dpo: data parallel over %d ranks (%s transport)", r->dist.world,
            rs_comm_transport_name(r->comm));
    return 0;
}

int rs_dpo_run(const rs_config *cfg, int resume, int force) {
    dpo_run r;
    memset(&r, 0, sizeof r);
    int threads = (int)rs_config_get_int(cfg, "model", "threads");
    if (threads > 0) omp_set_num_threads(threads);
    int rc = read_options(cfg, &r.o, 0);
    if (rc == 0) rc = start_comm(&r, cfg);
    if (rc == 0) rc = load_inputs(&r, cfg);
    if (rc == 0) rc = setup(&r);
    if (rc == 0) rc = start_or_resume(&r, resume, force);
    if (rc == 0) {
        rs_train_catch_signals();
        if (r.comm) hold_signals();
        rc = train(&r);
    }
    if (rc == 0) rc = save_checkpoint(&r);
    if (rc == 0) rc = write_outputs(&r);
    if (r.comm && rc >= 0) rc = rs_comm_finalize(r.comm) == 0 ? rc : -1; /* after a signal too */
    else if (r.comm) rs_comm_abort(r.comm);
    free_run(&r);
    return rc;
}

int rs_dpo_plan(const rs_config *cfg) {
    dpo_options o;
    rs_mem_plan_input in;
    rs_mem_plan plan;
    memset(&o, 0, sizeof o);
    memset(&in, 0, sizeof in);
    const char *backend = rs_mem_plan_backend_name(rs_config_get_str(cfg, "model", "backend"));
    int rc = backend ? read_options(cfg, &o, 1) : -1;
    if (rc == 0) rc = rs_mem_plan_load_model(o.model_dir, &in);
    if (rc == 0) {
        plan_shape(&o, backend, o.max_seq_len, &in);
        rc = rs_mem_plan_compute(&in, &plan);
    }
    if (rc == 0) {
        rs_mem_plan_print("dpo", &in, &plan);
        /* the device's free memory only where that backend runs here (cpu: unknown) */
        const rs_backend *be = strcmp(backend, "cuda") == 0 ? rs_backend_cuda() : NULL;
        size_t free_bytes, held = be && be->live_bytes ? be->live_bytes() : 0;
        const double g = 1073741824.0;
        char hint[320];
        if (rs_mem_plan_free_bytes(be, &free_bytes) != 0)
            rs_info("dpo: free memory on %s unknown here: nothing checked", backend);
        else if (rs_mem_plan_check("dpo", &plan, be, held,
                                   plan_hint(&in, &plan, be, held, hint, sizeof hint)) == 0)
            rs_info("dpo: the plan fits: %.2f GiB free", free_bytes / g);
        else
            rs_warn("%s", rs_last_error());
        rs_info("dpo: planned for sequences of max_seq_len %d tokens; a run plans for its longest "
                "pair, at most that",
                o.max_seq_len);
    }
    free_options(&o);
    return rc;
}
