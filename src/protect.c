/* protect: critical-weight protection for quantization (quant_methods.h; the paper's
 * quantization-without-fine-tuning variant). SNIP scores (Lee et al. 2019, "SNIP: Single-shot
 * network pruning based on connection sensitivity", eq. 3 without the normalisation):
 *   S = (1 / n) sum_b |W * dL_b/dW|,  L_b = -(1 / |T_b|) sum_{t in T_b} log p(y_t | y_<t)
 * per example b (prompt + target completion, loss on the target tokens T_b only, prompt masked),
 * from the fp32 model's full-parameter backward (model_train.h). Example b is tokenized as
 * encode(prompt, with BOS) ++ encode(" " + target, no specials) for raw text, or, with a chat
 * template, the user turn rendered with the generation prompt ++ encode(target) (see
 * encode_example), cut to max_seq_len.
 * Selection: the top k = floor(tau * N + 0.5) of all N targeted entries of the model, by
 * rs_snip_top_k (ties broken by the lower global index: layer, then q,k,v,o,gate,up,down, then
 * row-major). */
#include "resafe/chat.h"
#include "resafe/model_train.h"
#include "resafe/quant_methods.h"
#include "resafe/snip.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static float *grad_of(rs_model_grads *g, int l, int t) {
    rs_layer_grads *lg = &g->layers[l];
    float *p[7] = {lg->wq, lg->wk, lg->wv, lg->wo, lg->w_gate, lg->w_up, lg->w_down};
    return p[t];
}

static size_t linear_size(const rs_model *m, int t) {
    const rs_model_config *c = &m->cfg;
    size_t D = (size_t)c->hidden_size, Q = (size_t)c->n_heads * c->head_dim;
    size_t KV = (size_t)c->n_kv_heads * c->head_dim, F = (size_t)c->intermediate_size;
    size_t n[7] = {Q * D, KV * D, KV * D, D * Q, F * D, F * D, D * F};
    return n[t];
}

/* Raw: ids = encode(prompt, BOS) ++ encode(" " + target). Chat: ids = the template of one user
 * turn with the generation prompt ++ encode(target) (the response as the model generates it
 * after the assistant header). *n_prompt = the prompt's token count. */
static int encode_example(const rs_tokenizer *tok, rs_chat_kind chat, const char *text,
                          const char *target, int max_len, int32_t **ids, int *n, int *n_prompt) {
    size_t lt = strlen(target), lx = strlen(text);
    if (lx < lt + 1 || strcmp(text + lx - lt, target) != 0)
        return RS_FAIL("protect: the example text does not end with its target");
    int32_t *p, *t;
    int np, nt;
    if (chat == RS_CHAT_NONE) {
        RS_TRY(rs_tokenizer_encode(tok, text, lx - lt - 1, 1, &p, &np));
    } else {
        char *prompt = rs_strndup(text, lx - lt - 1);
        rs_chat_message msg = {"user", prompt};
        int rc = rs_chat_encode(tok, chat, &msg, 1, 1, &p, &np);
        free(prompt);
        RS_TRY(rc);
    }
    size_t skip = chat == RS_CHAT_NONE ? 0 : 1; /* the joining space belongs to raw text only */
    if (rs_tokenizer_encode(tok, text + lx - lt - 1 + skip, lt + 1 - skip, 0, &t, &nt) != 0) {
        free(p);
        return -1;
    }
    *ids = rs_malloc((size_t)(np + nt + 1) * sizeof **ids);
    memcpy(*ids, p, (size_t)np * sizeof *p);
    memcpy(*ids + np, t, (size_t)nt * sizeof *t);
    *n = np + nt < max_len ? np + nt : max_len;
    *n_prompt = np;
    free(p), free(t);
    return 0;
}

/* score += |W * dL/dW| / n_examples for one example; *used = 0 when it has no target token. */
static int score_example(rs_model *m, rs_train_state *s, rs_model_grads *g, const int32_t *ids,
                         int n, int n_prompt, double weight, float *scores, int *used) {
    int32_t *pos = rs_malloc((size_t)n * sizeof *pos), *tg = rs_malloc((size_t)n * sizeof *tg);
    int n_tgt = 0;
    for (int t = 0; t < n; t++) {
        pos[t] = t;
        tg[t] = t + 1 < n && t + 1 >= n_prompt ? ids[t + 1] : -1;
        n_tgt += tg[t] >= 0;
    }
    *used = n_tgt > 0;
    int rc = 0;
    if (n_tgt > 0) {
        rs_train_batch b = {.B = 1, .T = n, .tokens = ids, .pos = pos, .targets = tg};
        float logp, d = -1.0f / n_tgt; /* L = -logp / |T| */
        rs_model_grads_zero(m, g);
        rc = rs_train_forward(m, NULL, s, &b, &logp);
        if (rc == 0) rc = rs_train_backward(m, NULL, s, &b, &d, g);
        m->be->synchronize();
        size_t off = 0;
        for (int l = 0; rc == 0 && l < m->cfg.n_layers; l++)
            for (int t = 0; t < 7; t++) {
                const float *w = rs_snip_weight(m, l, (rs_lora_target)t), *gr = grad_of(g, l, t);
                size_t k = linear_size(m, t);
                for (size_t e = 0; e < k; e++)
                    scores[off + e] += (float)(fabs((double)w[e] * gr[e]) * weight);
                off += k;
            }
    }
    free(pos), free(tg);
    return rc;
}

int rs_protect_scores(rs_model *m, const rs_tokenizer *tok, const rs_calib_set *data,
                      rs_chat_kind chat, int max_seq_len, float **scores, size_t *n_scores) {
    if (strcmp(m->be->name, "cpu") != 0 || m->be->weight_dtype != RS_F32)
        return RS_FAIL("protect: the model must be loaded in fp32 on the cpu backend");
    if (!data || data->n == 0 || !data->targets)
        return RS_FAIL("protect: the safety data needs prompt+target examples");
    size_t N = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int t = 0; t < 7; t++) N += linear_size(m, t);
    float *sc = rs_calloc(N, sizeof *sc);
    rs_train_state *s = rs_train_state_new(m, NULL, 1, max_seq_len, 0, 0);
    rs_model_grads g;
    int rc = s ? rs_model_grads_init(m, &g) : -1, used_total = 0, have_grads = rc == 0;
    for (int i = 0; rc == 0 && i < data->n; i++) {
        int32_t *ids = NULL;
        int n = 0, np = 0, used = 0;
        if (!data->targets[i]) {
            rc = RS_FAIL("protect: example %d has no target", i + 1);
            break;
        }
        rc =
            encode_example(tok, chat, data->texts[i], data->targets[i], max_seq_len, &ids, &n, &np);
        if (rc == 0) rc = score_example(m, s, &g, ids, n, np, 1.0 / data->n, sc, &used);
        if (rc == 0) free(ids), used_total += used;
    }
    if (have_grads) rs_model_grads_free(m, &g);
    if (s) rs_train_state_free(s);
    if (rc == 0 && used_total < data->n)
        rs_warn("protect: %d of %d examples had no target token within max_seq_len",
                data->n - used_total, data->n);
    if (rc != 0) {
        free(sc);
        return -1;
    }
    *scores = sc, *n_scores = N;
    return 0;
}

int rs_protect_masks(rs_model *m, const rs_tokenizer *tok, const rs_calib_set *data, float tau,
                     int max_seq_len, uint8_t **masks) {
    return rs_protect_masks_chat(m, tok, data, RS_CHAT_NONE, tau, max_seq_len, masks);
}

int rs_protect_masks_chat(rs_model *m, const rs_tokenizer *tok, const rs_calib_set *data,
                          rs_chat_kind chat, float tau, int max_seq_len, uint8_t **masks) {
    if (!(tau > 0 && tau <= 1))
        return RS_FAIL("protect: tau must be in (0, 1], got %g", (double)tau);
    float *sc, thr;
    size_t N;
    RS_TRY(rs_protect_scores(m, tok, data, chat, max_seq_len, &sc, &N));
    uint8_t *sel = rs_malloc(N);
    int rc = rs_snip_top_k(sc, N, rs_snip_count(tau, N), sel, &thr);
    size_t off = 0;
    for (int l = 0; rc == 0 && l < m->cfg.n_layers; l++)
        for (int t = 0; t < 7; t++) {
            size_t k = linear_size(m, t);
            masks[l * 7 + t] = rs_malloc(k);
            memcpy(masks[l * 7 + t], sel + off, k);
            off += k;
        }
    free(sc), free(sel);
    return rc;
}
