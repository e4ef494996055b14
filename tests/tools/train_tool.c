/* train_tool: one training forward + backward (model_train.h), for the Python tests that compare
 * against torch autograd.
 *
 *   train_tool MODEL_DIR BATCH.safetensors OUT.safetensors [options]
 *
 * BATCH: tokens, pos, targets I32 [B, T]; d_seq_logp F32 [B]; optionally shared prefixes
 *   (model_train.h): prefix_tokens, prefix_pos I32 [P, TP] and prefix_of I32 [B]; for --lora also
 *   lora.<layer>.<q_proj|...>.A F32 [rank, in] and .B F32 [out, rank] for every target, and the
 *   masks of --mode: .mask_A U8 [rank, in] and .mask_B U8 [out, rank] (factor), .mask_W U8
 *   [out, in] (elementwise); absent masks stay all ones.
 * OUT: seq_logp F32 [B], then the gradients:
 *   full-parameter mode: one per parameter, named as in the checkpoint;
 *   --lora: lora.<layer>.<name>.dA, .dB (and .dW with --want-dw); dropout_seeds I64 [layers, 7]
 *   with --dropout.
 * Options:
 *   --lora ALPHA        adapter mode (scale ALPHA / rank); base weights frozen
 *   --targets LIST      adapter targets (default all)
 *   --mode M            none | factor | elementwise (default none)
 *   --want-dw           accumulate dW of every targeted linear
 *   --disabled          the adapter is off in the forward (only dW is computed)
 *   --dropout P         adapter dropout, masks seeded by --seed S (default 1)
 *   --recompute [N]     recompute each layer in backward (N: only the first N layers)
 *   --qat-act BITS      fake-quantize the linears' inputs (rs_train_state_set_fake_quant)
 *   --qat-kv BITS       fake-quantize K and V
 *   --repeat N          run forward + backward N more times and print "seconds_per_step X"
 * RESAFE_BACKEND=cuda runs it on the GPU (default cpu).
 * Errors: "resafe: error: ..." on stderr, exit status 1. */
#include "resafe/model_train.h"
#include "resafe/safetensors.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    float alpha, dropout;
    int lora, want_dw, disabled, recompute, repeat, qat_act, qat_kv;
    unsigned targets;
    rs_mask_mode mode;
    uint64_t seed;
} options;

/* ---------------------------------------------------------------- reading */

static const rs_st_tensor *need(const rs_st_set *set, const char *name, rs_dtype dtype,
                                size_t numel) {
    const rs_st_tensor *t = rs_st_find(set, name);
    if (!t) {
        RS_FAIL("batch file: tensor '%s' is missing", name);
        return NULL;
    }
    if (t->dtype != dtype || (size_t)rs_st_numel(t) != numel) {
        RS_FAIL("batch file: tensor '%s' is %s of %lld values, want %s of %zu", name,
                rs_dtype_name(t->dtype), (long long)rs_st_numel(t), rs_dtype_name(dtype), numel);
        return NULL;
    }
    return t;
}

static int read_batch(const rs_st_set *set, rs_train_batch *bt, float **d_seq) {
    const rs_st_tensor *tok = rs_st_find(set, "tokens");
    if (!tok || tok->ndim != 2) return RS_FAIL("batch file: tokens must be I32 [B, T]");
    bt->B = (int)tok->shape[0], bt->T = (int)tok->shape[1];
    size_t n = (size_t)bt->B * bt->T;
    const char *names[3] = {"tokens", "pos", "targets"};
    int32_t *ints[3];
    for (int i = 0; i < 3; i++) {
        const rs_st_tensor *t = need(set, names[i], RS_I32, n);
        if (!t) return -1;
        ints[i] = rs_malloc(n * sizeof(int32_t));
        memcpy(ints[i], t->data, n * sizeof(int32_t));
    }
    bt->tokens = ints[0], bt->pos = ints[1], bt->targets = ints[2];
    const rs_st_tensor *pt = rs_st_find(set, "prefix_tokens");
    if (pt) {
        if (pt->ndim != 2) return RS_FAIL("batch file: prefix_tokens must be I32 [P, TP]");
        bt->n_prefix = (int)pt->shape[0], bt->T_prefix = (int)pt->shape[1];
        size_t np = (size_t)bt->n_prefix * bt->T_prefix;
        const char *pnames[3] = {"prefix_tokens", "prefix_pos", "prefix_of"};
        size_t sizes[3] = {np, np, (size_t)bt->B};
        int32_t *pints[3];
        for (int i = 0; i < 3; i++) {
            const rs_st_tensor *t = need(set, pnames[i], RS_I32, sizes[i]);
            if (!t) return -1;
            pints[i] = rs_malloc(sizes[i] * sizeof(int32_t) + 1);
            memcpy(pints[i], t->data, sizes[i] * sizeof(int32_t));
        }
        bt->prefix_tokens = pints[0], bt->prefix_pos = pints[1], bt->prefix_of = pints[2];
    }
    const rs_st_tensor *d = need(set, "d_seq_logp", RS_F32, (size_t)bt->B);
    if (!d) return -1;
    *d_seq = rs_malloc((size_t)bt->B * sizeof **d_seq);
    return rs_st_read_f32(d, *d_seq, (size_t)bt->B);
}

/* A, B and the masks of one adapter from the batch file into device memory. */
static int load_adapter(const rs_st_set *set, rs_lora *lora, int l, rs_lora_target t) {
    rs_lora_linear *a = rs_lora_at(lora, l, t);
    const rs_backend *be = lora->be;
    size_t na = (size_t)lora->rank * a->in, nb = (size_t)a->out * lora->rank, nw = (size_t)a->out * a->in;
    char name[128];
    struct {
        const char *suffix;
        rs_dtype dtype;
        size_t numel;
        void *dst;
        int required;
    } parts[] = {{"A", RS_F32, na, a->A, 1},           {"B", RS_F32, nb, a->B, 1},
                 {"mask_A", RS_U8, na, a->mask_A, 0}, {"mask_B", RS_U8, nb, a->mask_B, 0},
                 {"mask_W", RS_U8, nw, a->mask_W, 0}};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        snprintf(name, sizeof name, "lora.%d.%s.%s", l, rs_lora_target_name(t), parts[i].suffix);
        if (!parts[i].dst || (!parts[i].required && !rs_st_find(set, name))) continue;
        const rs_st_tensor *src = need(set, name, parts[i].dtype, parts[i].numel);
        if (!src) return -1;
        be->to_device(parts[i].dst, src->data, parts[i].numel * rs_dtype_size(parts[i].dtype));
    }
    return 0;
}

/* ---------------------------------------------------------------- writing */

typedef struct {
    rs_st_write_tensor *t;
    int n, cap;
    float **host; /* copies to free */
} out_list;

static void put(out_list *o, const char *name, rs_dtype dtype, int ndim, int64_t d0, int64_t d1,
                const void *host_data) {
    if (o->n == o->cap) {
        o->cap = o->cap ? 2 * o->cap : 64;
        o->t = rs_realloc(o->t, (size_t)o->cap * sizeof *o->t);
        o->host = rs_realloc(o->host, (size_t)o->cap * sizeof *o->host);
    }
    rs_st_write_tensor *t = &o->t[o->n];
    memset(t, 0, sizeof *t);
    t->name = rs_strdup(name);
    t->dtype = dtype;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->data = host_data;
    o->host[o->n++] = NULL;
}

/* A device fp32 gradient, copied to the host. */
static void put_grad(out_list *o, const rs_backend *be, const char *name, const float *dev,
                     int64_t d0, int64_t d1) {
    if (!dev) return;
    size_t n = (size_t)d0 * (size_t)(d1 > 0 ? d1 : 1);
    float *h = rs_malloc(n * sizeof *h);
    be->to_host(h, dev, n * sizeof *h);
    put(o, name, RS_F32, d1 > 0 ? 2 : 1, d0, d1, h);
    o->host[o->n - 1] = h;
}

static void put_model_grads(out_list *o, const rs_model *m, const rs_model_grads *g) {
    const rs_model_config *c = &m->cfg;
    const rs_backend *be = m->be;
    int64_t D = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    int64_t Q = (int64_t)c->n_heads * c->head_dim, KV = (int64_t)c->n_kv_heads * c->head_dim;
    char name[128];
    put_grad(o, be, "model.embed_tokens.weight", g->embed, V, D);
#define LAYER(field, suffix, d0, d1)                                                              \
    snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix);                                 \
    put_grad(o, be, name, g->layers[l].field, d0, d1)
    for (int l = 0; l < c->n_layers; l++) {
        LAYER(attn_norm, "input_layernorm.weight", D, 0);
        LAYER(mlp_norm, "post_attention_layernorm.weight", D, 0);
        LAYER(wq, "self_attn.q_proj.weight", Q, D);
        LAYER(wk, "self_attn.k_proj.weight", KV, D);
        LAYER(wv, "self_attn.v_proj.weight", KV, D);
        LAYER(wo, "self_attn.o_proj.weight", D, Q);
        LAYER(bq, "self_attn.q_proj.bias", Q, 0);
        LAYER(bk, "self_attn.k_proj.bias", KV, 0);
        LAYER(bv, "self_attn.v_proj.bias", KV, 0);
        LAYER(bo, "self_attn.o_proj.bias", D, 0);
        LAYER(w_gate, "mlp.gate_proj.weight", F, D);
        LAYER(w_up, "mlp.up_proj.weight", F, D);
        LAYER(w_down, "mlp.down_proj.weight", D, F);
        LAYER(b_gate, "mlp.gate_proj.bias", F, 0);
        LAYER(b_up, "mlp.up_proj.bias", F, 0);
        LAYER(b_down, "mlp.down_proj.bias", D, 0);
    }
#undef LAYER
    put_grad(o, be, "model.norm.weight", g->final_norm, D, 0);
    if (!c->tie_word_embeddings) put_grad(o, be, "lm_head.weight", g->lm_head, V, D);
}

static void put_lora_grads(out_list *o, rs_lora *lora, const rs_train_state *s, int dropout,
                           uint64_t *seeds) {
    char name[128];
    for (int l = 0; l < lora->n_layers; l++)
        for (int t = 0; t < RS_LORA_N_TARGETS; t++) {
            rs_lora_linear *a = rs_lora_at(lora, l, (rs_lora_target)t);
            seeds[l * RS_LORA_N_TARGETS + t] = rs_train_dropout_seed(s, l, (rs_lora_target)t);
            if (a->in == 0) continue;
            const char *tn = rs_lora_target_name((rs_lora_target)t);
            snprintf(name, sizeof name, "lora.%d.%s.dA", l, tn);
            put_grad(o, lora->be, name, a->dA, lora->rank, a->in);
            snprintf(name, sizeof name, "lora.%d.%s.dB", l, tn);
            put_grad(o, lora->be, name, a->dB, a->out, lora->rank);
            snprintf(name, sizeof name, "lora.%d.%s.dW", l, tn);
            put_grad(o, lora->be, name, a->dW, a->out, a->in);
        }
    if (dropout) put(o, "dropout_seeds", RS_I64, 2, lora->n_layers, RS_LORA_N_TARGETS, seeds);
}

static void free_out(out_list *o) {
    for (int i = 0; i < o->n; i++) {
        free((char *)o->t[i].name);
        free(o->host[i]);
    }
    free(o->t), free(o->host);
}

/* ---------------------------------------------------------------- main */

/* --recompute [N]: every layer, or the first N when a count follows. */
static int recompute_arg(int argc, char **argv, int *i) {
    if (*i + 1 < argc && argv[*i + 1][0] >= '0' && argv[*i + 1][0] <= '9')
        return atoi(argv[++*i]);
    return RS_RECOMPUTE_ALL;
}

static int parse_options(int argc, char **argv, options *op) {
    *op = (options){.targets = (1u << RS_LORA_N_TARGETS) - 1, .seed = 1};
    for (int i = 4; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--recompute")) op->recompute = recompute_arg(argc, argv, &i);
        else if (!strcmp(a, "--want-dw")) op->want_dw = 1;
        else if (!strcmp(a, "--disabled")) op->disabled = 1;
        else if (!v) return RS_FAIL("option %s needs a value (or is unknown)", a);
        else if (!strcmp(a, "--lora")) op->lora = 1, op->alpha = strtof(v, NULL), i++;
        else if (!strcmp(a, "--dropout")) op->dropout = strtof(v, NULL), i++;
        else if (!strcmp(a, "--seed")) op->seed = strtoull(v, NULL, 10), i++;
        else if (!strcmp(a, "--repeat")) op->repeat = atoi(v), i++;
        else if (!strcmp(a, "--qat-act")) op->qat_act = atoi(v), i++;
        else if (!strcmp(a, "--qat-kv")) op->qat_kv = atoi(v), i++;
        else if (!strcmp(a, "--targets")) {
            RS_TRY(rs_lora_parse_targets(v, &op->targets));
            i++;
        } else if (!strcmp(a, "--mode")) {
            op->mode = !strcmp(v, "factor") ? RS_MASK_FACTOR
                       : !strcmp(v, "elementwise") ? RS_MASK_ELEMENTWISE : RS_MASK_NONE;
            if (op->mode == RS_MASK_NONE && strcmp(v, "none")) return RS_FAIL("unknown mode %s", v);
            i++;
        } else return RS_FAIL("unknown option %s", a);
    }
    return 0;
}

/* The adapter: rank from the first target's A, then every A, B and mask from the batch file. */
static int make_adapter(const rs_st_set *set, const rs_model *m, const options *op, rs_lora *lora) {
    int first = 0;
    while (!(op->targets & (1u << first))) first++;
    char name[128];
    snprintf(name, sizeof name, "lora.0.%s.A", rs_lora_target_name((rs_lora_target)first));
    const rs_st_tensor *a = rs_st_find(set, name);
    if (!a || a->ndim != 2) return RS_FAIL("batch file: '%s' [rank, in] is missing", name);
    rs_rng rng;
    rs_rng_seed(&rng, 7);
    RS_TRY(rs_lora_init(lora, m, (int)a->shape[0], op->alpha, op->targets, op->mode, op->want_dw,
                        &rng));
    lora->dropout = op->dropout;
    lora->enabled = !op->disabled;
    for (int l = 0; l < lora->n_layers; l++)
        for (int t = 0; t < RS_LORA_N_TARGETS; t++)
            if (op->targets & (1u << t)) RS_TRY(load_adapter(set, lora, l, (rs_lora_target)t));
    return 0;
}

static int step(rs_model *m, rs_lora *lora, rs_train_state *s, const rs_train_batch *bt,
                const float *d_seq, rs_model_grads *g, float *seq_logp) {
    RS_TRY(rs_train_forward(m, lora, s, bt, seq_logp));
    return rs_train_backward(m, lora, s, bt, d_seq, lora ? NULL : g);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: train_tool MODEL_DIR BATCH.safetensors OUT.safetensors [options]\n");
        return 2;
    }
    if (getenv("RESAFE_DEBUG")) rs_set_log_level(RS_LOG_DEBUG);
    options op;
    rs_model m;
    rs_st_set set;
    rs_train_batch bt = {0};
    float *d_seq = NULL;
    /* RESAFE_BACKEND selects the backend (default cpu): the GPU tests run the same tool on cuda. */
    const char *be_name = getenv("RESAFE_BACKEND");
    const rs_backend *be = rs_backend_by_name(be_name ? be_name : "cpu");
    if (!be || parse_options(argc, argv, &op) != 0 || rs_model_load(argv[1], be, &m) != 0 ||
        rs_st_open(argv[2], &set) != 0 || read_batch(&set, &bt, &d_seq) != 0)
        rs_die_last();
    rs_lora lora = {0};
    rs_model_grads g = {0};
    if (op.lora ? make_adapter(&set, &m, &op, &lora) != 0 : rs_model_grads_init(&m, &g) != 0)
        rs_die_last();
    rs_lora *lp = op.lora ? &lora : NULL;
    /* with prefixes: room for the prefixes' rows and for each sequence behind its prefix */
    rs_train_state *s = bt.n_prefix ? rs_train_state_new(&m, lp, bt.B + bt.n_prefix,
                                                         bt.T + bt.T_prefix, op.recompute, 1)
                                    : rs_train_state_new(&m, lp, bt.B, bt.T, op.recompute, 0);
    if (s) rs_rng_seed(rs_train_state_rng(s), op.seed);
    if (s && rs_train_state_set_fake_quant(s, op.qat_act, op.qat_kv) != 0) rs_die_last();
    float *seq_logp = rs_malloc((size_t)bt.B * sizeof *seq_logp);
    if (!s || step(&m, lp, s, &bt, d_seq, &g, seq_logp) != 0) rs_die_last();
    out_list out = {0};
    uint64_t *seeds = rs_calloc((size_t)m.cfg.n_layers * RS_LORA_N_TARGETS, sizeof *seeds);
    put(&out, "seq_logp", RS_F32, 1, bt.B, 0, seq_logp);
    if (op.lora) put_lora_grads(&out, &lora, s, op.dropout > 0, seeds);
    else put_model_grads(&out, &m, &g);
    if (rs_st_write(argv[3], out.t, out.n, NULL, NULL, 0) != 0) rs_die_last();
    if (op.repeat > 0) {
        double t0 = rs_now();
        for (int i = 0; i < op.repeat; i++)
            if (step(&m, lp, s, &bt, d_seq, &g, seq_logp) != 0) rs_die_last();
        printf("seconds_per_step %.6f\n", (rs_now() - t0) / op.repeat);
    }
    free_out(&out);
    free(seeds), free(seq_logp), free(d_seq);
    free((void *)bt.tokens), free((void *)bt.pos), free((void *)bt.targets);
    free((void *)bt.prefix_tokens), free((void *)bt.prefix_pos), free((void *)bt.prefix_of);
    rs_train_state_free(s);
    if (op.lora) rs_lora_free(&lora);
    else rs_model_grads_free(&m, &g);
    rs_st_close(&set);
    rs_model_free(&m);
    return 0;
}
