/* snip: SNIP scores |W_eff * dL/dW| on the targeted weights, top-tau selection, and the masks
 * of the adapter (rules in include/resafe/snip.h). */
#include "resafe/snip.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- selection on host arrays */

size_t rs_snip_count(double tau, size_t n) {
    double k = floor(tau * (double)n + 0.5);
    if (!(k > 0)) return 0;
    return k >= (double)n ? n : (size_t)k;
}

/* Scores are >= 0 and not NaN: their IEEE bit patterns order as the values do. */
static uint32_t score_bits(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return b;
}

/* Bit pattern of the k-th largest score (1 <= k <= n): two passes of a 16-bit radix select. */
static uint32_t kth_largest_bits(const float *s, size_t n, size_t k) {
    size_t *hist = rs_calloc(65536, sizeof *hist);
    for (size_t i = 0; i < n; i++) hist[score_bits(s[i]) >> 16]++;
    uint32_t hi = 65535;
    for (;; hi--) {
        if (hist[hi] >= k) break;
        k -= hist[hi];
    }
    memset(hist, 0, 65536 * sizeof *hist);
    for (size_t i = 0; i < n; i++) {
        uint32_t b = score_bits(s[i]);
        if (b >> 16 == hi) hist[b & 0xffff]++;
    }
    uint32_t lo = 65535;
    for (;; lo--) {
        if (hist[lo] >= k) break;
        k -= hist[lo];
    }
    free(hist);
    return hi << 16 | lo;
}

int rs_snip_top_k(const float *scores, size_t n, size_t k, uint8_t *selected, float *threshold) {
    for (size_t i = 0; i < n; i++)
        if (!(scores[i] >= 0) || score_bits(scores[i]) > 0x7f800000u)
            return RS_FAIL("SNIP score %zu is %g (scores must be finite and >= 0: the gradients "
                           "were not finite)",
                           i, (double)scores[i]);
    if (k == 0 || n == 0) {
        memset(selected, 0, n);
        if (threshold) *threshold = INFINITY;
        return 0;
    }
    uint32_t t = kth_largest_bits(scores, n, k);
    size_t above = 0;
    for (size_t i = 0; i < n; i++) above += score_bits(scores[i]) > t;
    size_t equal_wanted = k - above; /* >= 1: the k-th largest itself */
    for (size_t i = 0; i < n; i++) {
        uint32_t b = score_bits(scores[i]);
        int take = b > t || (b == t && equal_wanted > 0);
        if (b == t && take) equal_wanted--;
        selected[i] = (uint8_t)take;
    }
    if (threshold) memcpy(threshold, &t, sizeof *threshold);
    return 0;
}

void rs_snip_decompose(const uint8_t *M, int out, int in, int rank, double rho, uint8_t *mask_A,
                       uint8_t *mask_B) {
    int *col = rs_calloc((size_t)in, sizeof *col);
    for (int i = 0; i < out; i++) {
        const uint8_t *row = M + (size_t)i * in;
        int count = 0;
        for (int j = 0; j < in; j++) count += row[j], col[j] += row[j];
        memset(mask_B + (size_t)i * rank, (double)count >= rho * in, (size_t)rank);
    }
    for (int r = 0; r < rank; r++)
        for (int j = 0; j < in; j++) mask_A[(size_t)r * in + j] = (double)col[j] >= rho * out;
    free(col);
}

/* ---------------------------------------------------------------- scores on the device */

void *rs_snip_weight(rs_model *m, int layer, rs_lora_target t) {
    rs_layer_weights *w = &m->layers[layer];
    switch (t) {
    case RS_LORA_Q: return w->wq;
    case RS_LORA_K: return w->wk;
    case RS_LORA_V: return w->wv;
    case RS_LORA_O: return w->wo;
    case RS_LORA_GATE: return w->w_gate;
    case RS_LORA_UP: return w->w_up;
    case RS_LORA_DOWN: return w->w_down;
    default: return NULL;
    }
}

int rs_snip_init(rs_snip *s, rs_model *m, rs_lora *lora) {
    memset(s, 0, sizeof *s);
    if (m->n_qweights && !m->be->qdequantize)
        return RS_FAIL("SNIP: the %s backend cannot dequantize weights (qdequantize op missing)",
                       m->be->name);
    s->m = m, s->lora = lora;
    int max_lin = lora->n_layers * RS_LORA_N_TARGETS;
    s->lin_layer = rs_malloc((size_t)max_lin * sizeof *s->lin_layer);
    s->lin_target = rs_malloc((size_t)max_lin * sizeof *s->lin_target);
    s->score = rs_malloc((size_t)max_lin * sizeof *s->score);
    s->dW = rs_malloc((size_t)max_lin * sizeof *s->dW);
    s->offset = rs_malloc((size_t)(max_lin + 1) * sizeof *s->offset);
    size_t bytes = 0, max_w = 0;
    s->offset[0] = 0;
    for (int l = 0; l < lora->n_layers; l++)
        for (int t = 0; t < RS_LORA_N_TARGETS; t++) {
            rs_lora_linear *lin = rs_lora_at(lora, l, (rs_lora_target)t);
            if (lin->in == 0) continue;
            size_t n = (size_t)lin->out * lin->in;
            s->lin_layer[s->n_lin] = l, s->lin_target[s->n_lin] = (rs_lora_target)t;
            s->offset[s->n_lin + 1] = s->offset[s->n_lin] + n;
            s->n_lin++;
            bytes += rs_align64(n * sizeof(float));
            max_w = n > max_w ? n : max_w;
        }
    if (s->n_lin == 0) return RS_FAIL("SNIP: the adapter targets no linear layer");
    for (int i = 0; i < s->n_lin; i++) {
        rs_lora_linear *lin = rs_lora_at(lora, s->lin_layer[i], s->lin_target[i]);
        RS_CHECK(lin->dW, "bug: SNIP needs an adapter made with want_weight_grad (no dW buffers)");
        s->dW[i] = lin->dW;
        lin->dW = NULL;
    }
    lora->want_weight_grad = 0;
    const rs_backend *be = m->be;
    s->block = be->alloc(bytes);
    s->w_eff = be->alloc(max_w * rs_dtype_size(be->weight_dtype));
    char *at = s->block;
    for (int i = 0; i < s->n_lin; i++) {
        s->score[i] = (float *)at;
        at += rs_align64((s->offset[i + 1] - s->offset[i]) * sizeof(float));
    }
    rs_debug("SNIP: scores for %d linears, %zu entries (%.1f MiB)", s->n_lin, s->offset[s->n_lin],
             bytes / 1048576.0);
    return 0;
}

size_t rs_snip_plan_bytes(const rs_model_config *c, unsigned targets, rs_dtype weight_dtype) {
    size_t bytes = 0, max_w = 0;
    for (int t = 0; t < RS_LORA_N_TARGETS; t++) {
        if (!(targets & (1u << t))) continue;
        int out, in;
        rs_linear_shape(c, t, &out, &in);
        size_t n = (size_t)out * in;
        bytes += (size_t)c->n_layers * rs_align64(n * sizeof(float));
        max_w = n > max_w ? n : max_w;
    }
    return bytes + rs_align64(max_w * rs_dtype_size(weight_dtype)); /* the score block, w_eff */
}

static void attach_dW(rs_snip *s, int on) {
    for (int i = 0; i < s->n_lin; i++)
        rs_lora_at(s->lora, s->lin_layer[i], s->lin_target[i])->dW = on ? s->dW[i] : NULL;
    s->lora->want_weight_grad = on;
}

void rs_snip_free(rs_snip *s) {
    if (s->lora && s->dW) attach_dW(s, 1);
    if (s->block) s->m->be->free(s->block);
    if (s->w_eff) s->m->be->free(s->w_eff);
    free(s->lin_layer), free(s->lin_target), free(s->score), free(s->dW), free(s->offset);
    memset(s, 0, sizeof *s);
}

static rs_lora_linear *lin_of(const rs_snip *s, int i) {
    return rs_lora_at(s->lora, s->lin_layer[i], s->lin_target[i]);
}

/* score_i += weight * |W_eff * dW| for every targeted linear. */
static void accumulate_batch(rs_snip *s, float weight) {
    const rs_backend *be = s->m->be;
    rs_lora *l = s->lora;
    for (int i = 0; i < s->n_lin; i++) {
        rs_lora_linear *lin = lin_of(s, i);
        const uint8_t *mask = l->mask_mode == RS_MASK_ELEMENTWISE ? lin->mask_W : NULL;
        const void *w = rs_snip_weight(s->m, s->lin_layer[i], s->lin_target[i]);
        if (!w) { /* a quantized linear: W_eff = dequant(Q) + adapter */
            be->qdequantize(s->w_eff, *rs_layer_qslot(&s->m->layers[s->lin_layer[i]],
                                                      (int)s->lin_target[i]));
            w = s->w_eff;
        }
        be->lora_merge(s->w_eff, w, lin->A, lin->B, mask, lin->out, lin->in, l->rank, l->scale);
        be->snip_accumulate(s->score[i], s->w_eff, lin->dW, (size_t)lin->out * lin->in, weight);
    }
}

int rs_snip_score(rs_snip *s, rs_snip_grad_fn fn, void *user, int32_t *const *idx, const int *n,
                  int n_batches) {
    const rs_backend *be = s->m->be;
    for (int i = 0; i < s->n_lin; i++) be->zero_f32(s->score[i], s->offset[i + 1] - s->offset[i]);
    attach_dW(s, 1);
    int rc = 0;
    for (int b = 0; b < n_batches && rc == 0; b++) {
        for (int i = 0; i < s->n_lin; i++) {
            rs_lora_linear *lin = lin_of(s, i);
            be->zero_f32(lin->dW, (size_t)lin->out * lin->in);
        }
        rc = fn(user, idx[b], n[b]);
        for (int i = 0; i < s->n_lin && rc == 0 && s->reduce; i++)
            rc = s->reduce(s->reduce_user, s->dW[i], s->offset[i + 1] - s->offset[i]);
        if (rc == 0) accumulate_batch(s, 1.0f / (float)n_batches);
    }
    attach_dW(s, 0);
    be->synchronize();
    return rc;
}

float *rs_snip_download(const rs_snip *s) {
    size_t n = s->offset[s->n_lin];
    float *host = rs_malloc((n ? n : 1) * sizeof *host);
    for (int i = 0; i < s->n_lin; i++)
        s->m->be->to_host(host + s->offset[i], s->score[i],
                          (s->offset[i + 1] - s->offset[i]) * sizeof(float));
    return host;
}

/* Install the selection M (global order) as the adapter's masks. */
static void install_masks(rs_snip *s, const uint8_t *M, double rho, rs_snip_report *r) {
    const rs_backend *be = s->m->be;
    rs_lora *l = s->lora;
    size_t rows = 0, rows_on = 0, cols = 0, cols_on = 0;
    for (int i = 0; i < s->n_lin; i++) {
        rs_lora_linear *lin = lin_of(s, i);
        const uint8_t *Mi = M + s->offset[i];
        if (l->mask_mode == RS_MASK_ELEMENTWISE) {
            be->to_device(lin->mask_W, Mi, (size_t)lin->out * lin->in);
            continue;
        }
        size_t na = (size_t)l->rank * lin->in, nb = (size_t)lin->out * l->rank;
        uint8_t *mA = rs_malloc(na), *mB = rs_malloc(nb);
        rs_snip_decompose(Mi, lin->out, lin->in, l->rank, rho, mA, mB);
        for (int row = 0; row < lin->out; row++) rows_on += mB[(size_t)row * l->rank];
        for (int j = 0; j < lin->in; j++) cols_on += mA[j];
        rows += (size_t)lin->out, cols += (size_t)lin->in;
        be->to_device(lin->mask_A, mA, na);
        be->to_device(lin->mask_B, mB, nb);
        free(mA), free(mB);
    }
    r->rows_B_trainable = rows ? (double)rows_on / (double)rows : 1;
    r->cols_A_trainable = cols ? (double)cols_on / (double)cols : 1;
}

int rs_snip_select(rs_snip *s, const rs_snip_params *p, rs_snip_report *report) {
    if (s->lora->mask_mode == RS_MASK_NONE)
        return RS_FAIL("bug: SNIP selection on an adapter without masks");
    size_t n = s->offset[s->n_lin];
    float *scores = rs_snip_download(s);
    uint8_t *M = rs_malloc(n ? n : 1);
    memset(report, 0, sizeof *report);
    report->n_total = n;
    report->threshold = INFINITY;
    int rc = 0;
    for (int i = 0; i < s->n_lin && rc == 0;) {
        int j = i + 1; /* the scope: [i, j) linears */
        if (p->scope == RS_SNIP_GLOBAL) j = s->n_lin;
        else
            while (j < s->n_lin && s->lin_layer[j] == s->lin_layer[i]) j++;
        size_t a = s->offset[i], len = s->offset[j] - a, k = rs_snip_count(p->tau, len);
        float t;
        rc = rs_snip_top_k(scores + a, len, k, M + a, &t);
        report->n_selected += k;
        if (t < report->threshold) report->threshold = t;
        i = j;
    }
    if (rc == 0) install_masks(s, M, p->factor_threshold, report);
    s->m->be->synchronize();
    free(scores), free(M);
    return rc;
}
