/* dpo_tool: the train layer's library calls on token ids, for the Python tests that compare
 * them with a PyTorch reference.
 *
 *   dpo_tool grad  MODEL ADAPTER.h5 PAIRS.json OUT.h5
 *   dpo_tool steps MODEL ADAPTER.h5 PAIRS.json OUT.h5 N LR
 *   dpo_tool snip  MODEL ADAPTER.h5 PAIRS.json OUT.h5 N_BATCHES TAU global|per_layer RHO
 *   dpo_tool ref   MODEL ADAPTER.h5 PAIRS.json OUT.h5 COMM_DIR
 *
 * ADAPTER.h5: an adapter file (rs_adapter_load: attrs rank, alpha, dropout, targets,
 * mask_mode; lora/layers.<i>.<target>/A, B and masks). PAIRS.json: {"beta": b, "sft_weight":
 * w, "micro": m, "share_prompt": 0|1 (default 1: the packed path), "pairs": [{"chosen":
 * [ids], "chosen_prompt": k, "rejected": [ids],
 * "rejected_prompt": k, "ref_chosen": x, "ref_rejected": y}]} (ref_* optional: when absent the
 * tool computes them with the adapter off and writes them).
 * OUT.h5:
 *   grad   attrs loss, margin, accuracy, logp_chosen, logp_rejected; ref/chosen, ref/rejected;
 *          grad/layers.<i>.<target>/A, B  (the DPO gradient, mean over all pairs; for an adapter
 *          with attribute group_constant = 1, dA is tied: its group sums, broadcast)
 *   steps  N AdamW steps (beta1 0.9, beta2 0.999, eps 1e-8, no decay, no clipping), each on all
 *          pairs: flat/init, flat/final, flat/m, flat/v, flat/mask (the adapter's flat views)
 *          and the final adapter as lora/...
 *   snip   scores/layers.<i>.<target> [out, in]; the adapter's masks as masks/...; attrs
 *          n_selected, threshold. Batch b = pairs [b*n/N, (b+1)*n/N).
 *   ref    one rank of a job started with the launcher's variables (dist.h; world 1 without):
 *          the reference split over the ranks (rs_dpo_reference_sharded, file transport in
 *          COMM_DIR) into NaN-poisoned arrays: ref/chosen, ref/rejected as this rank holds them
 *          after the gather; attrs rank, world, first, count (the pairs it computed).
 * Errors: "resafe: error: ..." on stderr and exit status 1. */
#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/checkpoint.h"
#include "resafe/dist.h"
#include "resafe/dpo.h"
#include "resafe/shard.h"
#include "resafe/snip.h"

static int ids_of(const cJSON *a, rs_seq *s, int n_prompt) {
    int n = cJSON_GetArraySize(a);
    if (!cJSON_IsArray(a) || n < 2 || n_prompt < 1 || n_prompt >= n)
        return RS_FAIL("pairs: bad sequence (%d ids, prompt %d)", n, n_prompt);
    s->ids = rs_malloc((size_t)n * sizeof *s->ids);
    for (int i = 0; i < n; i++) s->ids[i] = (int32_t)cJSON_GetArrayItem(a, i)->valueint;
    s->n = n, s->n_prompt = n_prompt;
    return 0;
}

static int num(const cJSON *o, const char *key, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v)) return 0;
    *out = v->valuedouble;
    return 1;
}

static int read_pairs(const char *path, rs_pref_set *set, rs_dpo_params *p) {
    char *text;
    RS_TRY(rs_read_file(path, &text, NULL));
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!root) return RS_FAIL("%s: not JSON", path);
    double beta = 0.1, sft = 0, micro = 1000, share = 1;
    num(root, "beta", &beta), num(root, "sft_weight", &sft), num(root, "micro", &micro);
    num(root, "share_prompt", &share);
    *p = (rs_dpo_params){(float)beta, (float)sft, (int)micro, 0, share != 0};
    const cJSON *pairs = cJSON_GetObjectItemCaseSensitive(root, "pairs");
    int n = cJSON_GetArraySize(pairs), n_ref = 0, rc = 0;
    rs_pref_alloc(set, n);
    for (int i = 0; i < n && rc == 0; i++) {
        const cJSON *q = cJSON_GetArrayItem(pairs, i);
        double kc = 0, kr = 0, rw, rl;
        num(q, "chosen_prompt", &kc), num(q, "rejected_prompt", &kr);
        rc = ids_of(cJSON_GetObjectItemCaseSensitive(q, "chosen"), &set->chosen[i], (int)kc);
        if (rc == 0)
            rc = ids_of(cJSON_GetObjectItemCaseSensitive(q, "rejected"), &set->rejected[i], (int)kr);
        if (rc == 0 && num(q, "ref_chosen", &rw) && num(q, "ref_rejected", &rl)) {
            set->ref_chosen[i] = (float)rw, set->ref_rejected[i] = (float)rl;
            n_ref++;
        }
        for (int k = 0; rc == 0 && k < 2; k++) {
            int len = k ? set->rejected[i].n : set->chosen[i].n;
            if (len > set->max_len) set->max_len = len;
        }
    }
    set->has_ref = n > 0 && n_ref == n;
    cJSON_Delete(root);
    return rc;
}

static int load_adapter(const char *path, const rs_model *m, rs_lora *l) {
    rs_adapter_info info;
    RS_TRY(rs_adapter_info_read(path, &info));
    rs_rng rng;
    rs_rng_seed(&rng, 1);
    RS_TRY(rs_lora_init(l, m, info.rank, info.alpha, info.targets, info.mask_mode, 1, &rng));
    l->dropout = info.dropout;
    return rs_adapter_load(path, l);
}

static int write_f32(rs_h5 *h, const char *name, const float *dev, size_t n, const rs_backend *be) {
    float *host = rs_malloc((n ? n : 1) * sizeof *host);
    be->to_host(host, dev, n * sizeof *host);
    int64_t shape[1] = {(int64_t)n};
    int rc = rs_h5_write(h, name, RS_F32, 1, shape, host);
    free(host);
    return rc;
}

/* The gradient of every targeted linear under grad/. */
static int write_grads(rs_h5 *h, const rs_lora *l) {
    for (int layer = 0; layer < l->n_layers; layer++)
        for (int t = 0; t < RS_LORA_N_TARGETS; t++) {
            const rs_lora_linear *x = &l->lin[layer * RS_LORA_N_TARGETS + t];
            if (x->in == 0) continue;
            char name[128];
            const char *tn = rs_lora_target_name((rs_lora_target)t);
            snprintf(name, sizeof name, "grad/layers.%d.%s/A", layer, tn);
            RS_TRY(write_f32(h, name, x->dA, (size_t)l->rank * x->in, l->be));
            snprintf(name, sizeof name, "grad/layers.%d.%s/B", layer, tn);
            RS_TRY(write_f32(h, name, x->dB, (size_t)x->out * l->rank, l->be));
        }
    return 0;
}

static int all_pairs(int n, int32_t **idx) {
    *idx = rs_malloc((size_t)(n ? n : 1) * sizeof **idx);
    for (int i = 0; i < n; i++) (*idx)[i] = i;
    return n;
}

static int cmd_grad(rs_dpo_trainer *t, rs_h5 *h) {
    int32_t *idx;
    int n = all_pairs(t->data->n, &idx);
    rs_lora_zero_grads(t->lora);
    rs_dpo_stats st;
    int rc = rs_dpo_accumulate(t, idx, n, &st);
    free(idx);
    RS_TRY(rc);
    rs_lora_tie_grads(t->lora); /* group-constant adapters: dA' broadcast (no-op otherwise) */
    RS_TRY(rs_h5_set_attr_f64(h, NULL, "loss", st.loss));
    RS_TRY(rs_h5_set_attr_f64(h, NULL, "margin", st.margin));
    RS_TRY(rs_h5_set_attr_f64(h, NULL, "accuracy", st.accuracy));
    RS_TRY(rs_h5_set_attr_f64(h, NULL, "logp_chosen", st.logp_chosen));
    RS_TRY(rs_h5_set_attr_f64(h, NULL, "logp_rejected", st.logp_rejected));
    return write_grads(h, t->lora);
}

static int cmd_steps(rs_dpo_trainer *t, rs_h5 *h, int steps, double lr) {
    rs_lora *l = t->lora;
    rs_optim o;
    rs_optim_init(&o, l->be, 0.9f, 0.999f, 1e-8f, 0);
    rs_optim_add(&o, "lora", l->flat_params, l->flat_grads, l->flat_mask, l->n_flat, 1);
    rs_optim_alloc(&o);
    int rc = write_f32(h, "flat/init", l->flat_params, l->n_flat, l->be);
    int32_t *idx;
    int n = all_pairs(t->data->n, &idx);
    for (int s = 0; s < steps && rc == 0; s++) {
        rs_optim_zero_grads(&o);
        rc = rs_dpo_accumulate(t, idx, n, NULL);
        if (rc == 0) rs_optim_step(&o, lr, 1.0f);
    }
    free(idx);
    if (rc == 0) rc = write_f32(h, "flat/final", l->flat_params, l->n_flat, l->be);
    if (rc == 0) rc = write_f32(h, "flat/m", o.params[0].m, l->n_flat, l->be);
    if (rc == 0) rc = write_f32(h, "flat/v", o.params[0].v, l->n_flat, l->be);
    if (rc == 0 && l->flat_mask) {
        uint8_t *mask = rs_malloc(l->n_flat);
        l->be->to_host(mask, l->flat_mask, l->n_flat);
        int64_t shape[1] = {(int64_t)l->n_flat};
        rc = rs_h5_write(h, "flat/mask", RS_U8, 1, shape, mask);
        free(mask);
    }
    if (rc == 0) rc = rs_adapter_write_tensors(h, "lora", l, 1, 1);
    rs_optim_free(&o);
    return rc;
}

static int snip_grad(void *user, const int32_t *idx, int n) {
    return rs_dpo_accumulate(user, idx, n, NULL);
}

static int cmd_snip(rs_dpo_trainer *t, rs_h5 *h, int n_batches, rs_snip_params *p) {
    rs_snip s;
    RS_TRY(rs_snip_init(&s, t->m, t->lora));
    int n = t->data->n;
    int32_t *all, **idx = rs_malloc((size_t)n_batches * sizeof *idx);
    int *ns = rs_malloc((size_t)n_batches * sizeof *ns);
    all_pairs(n, &all);
    for (int b = 0; b < n_batches; b++) {
        int a = b * n / n_batches, e = (b + 1) * n / n_batches;
        idx[b] = all + a, ns[b] = e - a;
    }
    rs_snip_report rep;
    int rc = rs_snip_score(&s, snip_grad, t, idx, ns, n_batches);
    if (rc == 0) rc = rs_snip_select(&s, p, &rep);
    float *scores = rc == 0 ? rs_snip_download(&s) : NULL;
    for (int i = 0; rc == 0 && i < s.n_lin; i++) {
        char name[128];
        rs_lora_linear *x = rs_lora_at(t->lora, s.lin_layer[i], s.lin_target[i]);
        snprintf(name, sizeof name, "scores/layers.%d.%s", s.lin_layer[i],
                 rs_lora_target_name(s.lin_target[i]));
        int64_t shape[2] = {x->out, x->in};
        rc = rs_h5_write(h, name, RS_F32, 2, shape, scores + s.offset[i]);
    }
    if (rc == 0) rc = rs_adapter_write_tensors(h, "masks", t->lora, 0, 1);
    if (rc == 0) rc = rs_h5_set_attr_i64(h, NULL, "n_selected", (int64_t)rep.n_selected);
    if (rc == 0) rc = rs_h5_set_attr_f64(h, NULL, "threshold", rep.threshold);
    free(scores), free(all), free(idx), free(ns);
    rs_snip_free(&s);
    return rc;
}

/* The reference over the launcher's ranks; *mine = the pairs this rank computed. */
static int cmd_ref(rs_dpo_trainer *t, const char *comm_dir, rs_dist *d, rs_shard *mine) {
    RS_TRY(rs_dist_from_env(RS_LAUNCHER_AUTO, d));
    rs_comm_options o = {RS_COMM_FILE, comm_dir, "", 60.0, 30.0, (size_t)1 << 20};
    rs_comm *c;
    RS_TRY(rs_comm_init(&c, d, &o));
    rs_pref_set *set = t->data;
    for (int i = 0; i < set->n; i++) set->ref_chosen[i] = set->ref_rejected[i] = NAN;
    set->has_ref = 0;
    rs_chunk_shard(set->n, t->p.micro_pairs, d->world, d->rank, mine);
    int rc = rs_dpo_reference_sharded(t, c);
    if (rc == 0)
        rc = rs_comm_finalize(c);
    else
        rs_comm_abort(c);
    return rc;
}

static int run(int argc, char **argv) {
    if (argc < 6) return RS_FAIL("usage: dpo_tool grad|steps|snip|ref MODEL ADAPTER PAIRS OUT ...");
    const char *cmd = argv[1];
    rs_model m;
    RS_TRY(rs_model_load(argv[2], rs_backend_cpu(), &m));
    rs_lora l;
    rs_pref_set set;
    rs_dpo_params p;
    rs_dpo_trainer t;
    memset(&t, 0, sizeof t), memset(&l, 0, sizeof l), memset(&set, 0, sizeof set);
    int rc = load_adapter(argv[3], &m, &l);
    if (rc == 0) rc = read_pairs(argv[4], &set, &p);
    if (rc == 0) rc = rs_dpo_trainer_init(&t, &m, &l, &set, &p);
    int is_ref = strcmp(cmd, "ref") == 0;
    rs_dist d = {0};
    rs_shard mine = {0, 0};
    if (rc == 0 && is_ref)
        rc = argc >= 7 ? cmd_ref(&t, argv[6], &d, &mine) : RS_FAIL("ref: give COMM_DIR");
    else if (rc == 0 && !set.has_ref)
        rc = rs_dpo_reference(&t);
    rs_h5 *h = NULL;
    if (rc == 0) rc = rs_h5_create(argv[5], &h);
    if (rc == 0) {
        int64_t shape[1] = {set.n};
        rc = rs_h5_write(h, "ref/chosen", RS_F32, 1, shape, set.ref_chosen);
        if (rc == 0) rc = rs_h5_write(h, "ref/rejected", RS_F32, 1, shape, set.ref_rejected);
    }
    if (rc == 0 && is_ref) {
        const char *keys[] = {"rank", "world", "first", "count"};
        int64_t vals[] = {d.rank, d.world, mine.first, mine.count};
        for (int k = 0; k < 4 && rc == 0; k++) rc = rs_h5_set_attr_i64(h, NULL, keys[k], vals[k]);
    } else if (rc == 0 && strcmp(cmd, "grad") == 0)
        rc = cmd_grad(&t, h);
    else if (rc == 0 && strcmp(cmd, "steps") == 0 && argc >= 8)
        rc = cmd_steps(&t, h, atoi(argv[6]), atof(argv[7]));
    else if (rc == 0 && strcmp(cmd, "snip") == 0 && argc >= 10) {
        rs_snip_params sp = {atof(argv[7]),
                             strcmp(argv[8], "per_layer") == 0 ? RS_SNIP_PER_LAYER : RS_SNIP_GLOBAL,
                             atof(argv[9])};
        rc = cmd_snip(&t, h, atoi(argv[6]), &sp);
    } else if (rc == 0)
        rc = RS_FAIL("unknown command or missing arguments: %s", cmd);
    if (rc == 0) rc = rs_h5_commit(h), h = NULL;
    rs_h5_close(h);
    rs_dpo_trainer_free(&t);
    rs_pref_free(&set);
    rs_lora_free(&l);
    rs_model_free(&m);
    return rc;
}

int main(int argc, char **argv) {
    if (run(argc, argv) != 0) rs_die_last();
    return 0;
}
