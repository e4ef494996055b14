/* adapter_apply: an adapter file applied to a model without training state: loaded for a model
 * configuration (the merge stage, on the host) and attached to a loaded model so that its
 * inference forward computes y = W x + scale * B (A x) ("Adapter at load", README). */
#include "resafe/adapter.h"

#include <stdlib.h>
#include <string.h>

#include "resafe/checkpoint.h"
#include "resafe/model_train.h"

/* A model shell with just the configuration: enough for rs_lora_init's shapes. */
int rs_adapter_load_for(const char *path, const rs_model_config *cfg, const rs_backend *be,
                        rs_lora *l) {
    memset(l, 0, sizeof *l);
    rs_adapter_info info;
    RS_TRY(rs_adapter_info_read(path, &info));
    /* An adapter of a deeper model has datasets past our last layer: a different model. */
    rs_h5 *h;
    RS_TRY(rs_h5_open(path, &h));
    int deeper = 0;
    for (int t = 0; t < RS_LORA_N_TARGETS; t++) {
        char probe[96];
        snprintf(probe, sizeof probe, "lora/layers.%d.%s", cfg->n_layers,
                 rs_lora_target_name((rs_lora_target)t));
        if (info.targets & (1u << t)) deeper |= rs_h5_exists(h, probe) == 1;
    }
    rs_h5_close(h);
    if (deeper)
        return RS_FAIL("%s: the adapter has more layers than the model (%d): made for another "
                       "model", path, cfg->n_layers);
    rs_model shell;
    memset(&shell, 0, sizeof shell);
    shell.cfg = *cfg;
    shell.be = be;
    shell.layers = rs_calloc((size_t)cfg->n_layers, sizeof *shell.layers);
    rs_rng rng;
    rs_rng_seed(&rng, 0);
    int rc = rs_lora_init(l, &shell, info.rank, info.alpha, info.targets, info.mask_mode, 0, &rng);
    free(shell.layers);
    if (rc != 0) return -1;
    l->dropout = info.dropout;
    if (rs_adapter_load(path, l) != 0) {
        rs_lora_free(l);
        return rs_fail_context("%s: the adapter does not fit the model (%d layers, hidden %d)",
                               path, cfg->n_layers, cfg->hidden_size);
    }
    return 0;
}

/* delta = scale * (mask_W ⊙) B A of one linear of a host (cpu backend) adapter, in double. */
void rs_adapter_delta(const rs_lora *l, const rs_lora_linear *lin, double *delta) {
    int out = lin->out, in = lin->in, r = l->rank;
    for (int i = 0; i < out; i++) {
        double *d = delta + (size_t)i * in;
        for (int c = 0; c < in; c++) d[c] = 0.0;
        for (int k = 0; k < r; k++) {
            double b = lin->B[(size_t)i * r + k];
            const float *a = lin->A + (size_t)k * in;
            for (int c = 0; c < in; c++) d[c] += b * a[c];
        }
        for (int c = 0; c < in; c++) {
            d[c] *= l->scale;
            if (lin->mask_W && !lin->mask_W[(size_t)i * in + c]) d[c] = 0.0;
        }
    }
}

/* Elementwise masks act on B A, which the factored forward cannot express: one dense
 * scale * (M ⊙ B A) per adapted linear in weight dtype, added by a second linear. */
static int dense_deltas(rs_model *m, const char *path) {
    const rs_backend *be = m->be;
    rs_lora host;
    RS_TRY(rs_adapter_load_for(path, &m->cfg, rs_backend_cpu(), &host));
    int n = m->cfg.n_layers * RS_LORA_N_TARGETS;
    m->adapter_delta = rs_calloc((size_t)n, sizeof *m->adapter_delta);
    for (int j = 0; j < n; j++) {
        const rs_lora_linear *lin = &host.lin[j];
        if (lin->in == 0) continue;
        size_t numel = (size_t)lin->out * lin->in;
        double *d = rs_malloc(numel * sizeof *d);
        float *f = rs_malloc(numel * sizeof *f);
        rs_adapter_delta(&host, lin, d);
        for (size_t i = 0; i < numel; i++) f[i] = (float)d[i];
        m->adapter_delta[j] = be->alloc(numel * rs_dtype_size(be->weight_dtype));
        be->upload_f32(m->adapter_delta[j], be->weight_dtype, f, numel);
        free(d), free(f);
    }
    rs_lora_free(&host);
    return 0;
}

int rs_model_attach_adapter(rs_model *m, const char *path) {
    if (m->adapter) return RS_FAIL("%s: the model already has an adapter", path);
    rs_lora *l = rs_calloc(1, sizeof *l);
    if (rs_adapter_load_for(path, &m->cfg, m->be, l) != 0) {
        free(l);
        return -1;
    }
    m->adapter = l;
    if (l->mask_mode == RS_MASK_ELEMENTWISE) RS_TRY(dense_deltas(m, path));
    m->be->synchronize();
    if (m->act.max_tokens) { /* re-plan: the forward needs a scratch for x A^T */
        int t = m->act.max_tokens, r = m->act.max_logit_rows;
        m->act.max_tokens = m->act.max_logit_rows = 0;
        RS_TRY(rs_model_reserve(m, t, r));
    }
    char *targets = rs_lora_targets_string(l->targets);
    rs_info("%s: adapter attached (rank %d, alpha %g, %s mask, %s)", path, l->rank, l->alpha,
            rs_mask_mode_name(l->mask_mode), targets);
    free(targets);
    return 0;
}

void rs_model_detach_adapter(rs_model *m) {
    if (m->adapter_delta) {
        for (int j = 0; j < m->cfg.n_layers * RS_LORA_N_TARGETS; j++)
            if (m->adapter_delta[j]) m->be->free(m->adapter_delta[j]);
        free(m->adapter_delta);
        m->adapter_delta = NULL;
    }
    if (m->adapter) {
        rs_lora_free(m->adapter);
        free(m->adapter);
        m->adapter = NULL;
    }
}

void rs_model_adapter_fwd(rs_model *m, int layer, int i, void *y, const void *x, int n) {
    rs_lora *l = m->adapter;
    if (!l || !l->enabled) return;
    const rs_lora_linear *lin = rs_lora_at(l, layer, (rs_lora_target)i);
    if (lin->in == 0) return;
    if (m->adapter_delta)
        m->be->linear_fwd(y, x, m->adapter_delta[layer * RS_LORA_N_TARGETS + i], NULL, n, lin->in,
                          lin->out, 1.0f);
    else
        m->be->lora_fwd(y, m->act.lora_xa, x, lin->A, lin->B, n, lin->in, lin->out, l->rank,
                        l->scale, 1.0f);
}
