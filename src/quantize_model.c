/* quantize_model: the driver that quantizes every targeted linear of a model (quant_methods.h),
 * and the pieces GPTQ and AWQ share (the integer grid, the output error, assembly).
 *
 * Sequential, as the GPTQ paper does (section 4, "the inputs of layer l are those produced by
 * the already quantized layers < l"): for layer l, the calibration texts run through the model
 * whose layers < l hold their dequantized weights (and stops after layer l: rs_model.
 * capture_layers), the inputs of layer l's four linear sites (q/k/v, o, gate/up, down) are
 * captured through rs_model.capture and summed into
 * H = sum x x^T and mean |x|; then layer l's seven linears are quantized from those statistics
 * and their dequantized weights replace the originals for the next layer. The original weights
 * are put back at the end. Texts are tokenized with the special tokens (BOS) and cut to
 * max_seq_len, and run one at a time (no padding rows reach the statistics). */
#include "qmeth_internal.h"

#include "resafe/snip.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void rs_quant_opts_default(rs_quant_opts *o) {
    memset(o, 0, sizeof *o);
    o->spec = (rs_qspec){.format = RS_QFMT_INT, .bits = 4, .group_size = 128, .symmetric = 0};
    o->method = RS_QMETHOD_RTN;
    o->max_seq_len = 512;
    o->gptq_damp = 0.01f;
    o->gptq_block = 128;
    o->awq_grid = 20;
    o->awq_clip = 1;
}

/* ---- the integer grid (qmeth_internal.h) */
rs_qgrid rs_qgrid_fit(const double *x, const uint8_t *mask, int n, int bits, int symmetric,
                      double clip) {
    rs_qgrid g = {1.0f, 0.0f, 0, (1 << bits) - 1};
    double lo = 0, hi = 0, amax = 0;
    for (int k = 0; k < n; k++) {
        if (mask && mask[k]) continue;
        lo = fmin(lo, x[k]), hi = fmax(hi, x[k]), amax = fmax(amax, fabs(x[k]));
    }
    if (symmetric) {
        int qmax = (1 << (bits - 1)) - 1;
        float s = (float)(amax * clip / qmax);
        g.scale = s > 0 && isfinite(s) ? s : 1.0f;
        g.zero = (float)(1 << (bits - 1));
        g.lo = 1;
        return g;
    }
    lo *= clip, hi *= clip;
    float s = (float)((hi - lo) / g.hi);
    g.scale = s > 0 && isfinite(s) ? s : 1.0f;
    double z = rint(-lo / g.scale);
    g.zero = (float)(z < 0 ? 0 : z > g.hi ? g.hi : z);
    return g;
}

int rs_qgrid_code(const rs_qgrid *g, double w) {
    double q = rint(w / g->scale) + g->zero;
    return q < g->lo ? g->lo : q > g->hi ? g->hi : (int)q;
}

float rs_qgrid_value(const rs_qgrid *g, int code) { return ((float)code - g->zero) * g->scale; }

/* sum_r a_r H a_r^T, a rows of [rows, in], H symmetric: each row as sum_i a_i (H_ii a_i +
 * 2 sum_{j<i} H_ij a_j), the lower triangle only (half the products of the full form). Blocks
 * of QF_ROWS rows in parallel, summed in row order afterwards (the same result for any thread
 * count). A block shares each pass over H (a 1408-wide linear's H is 15.9 MB) and runs its
 * rows' dot products side by side on a transposed copy of the rows (independent sums the
 * compiler vectorizes, instead of one serial chain per row: the AWQ scale search spends most
 * of its time here). */
#define QF_ROWS 16
static double quad_form(const double *a, int rows, const rs_calib_stats *st) {
    int in = st->in, nblk = (rows + QF_ROWS - 1) / QF_ROWS;
    double *per_row = rs_malloc((size_t)rows * sizeof *per_row), total = 0;
#pragma omp parallel
    {
        double *at = rs_malloc((size_t)in * QF_ROWS * sizeof *at);
#pragma omp for schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            int r0 = blk * QF_ROWS, nr = rows - r0 < QF_ROWS ? rows - r0 : QF_ROWS;
            for (int j = 0; j < in; j++)
                for (int q = 0; q < QF_ROWS; q++)
                    at[(size_t)j * QF_ROWS + q] = q < nr ? a[(size_t)(r0 + q) * in + j] : 0.0;
            double acc[QF_ROWS] = {0};
            for (int i = 0; i < in; i++) {
                const double *hi = st->H + (size_t)i * in, *ai = at + (size_t)i * QF_ROWS;
                double s[QF_ROWS] = {0};
                for (int j = 0; j < i; j++) {
                    double h = hi[j];
                    const double *aj = at + (size_t)j * QF_ROWS;
                    for (int q = 0; q < QF_ROWS; q++) s[q] += h * aj[q];
                }
                for (int q = 0; q < QF_ROWS; q++) acc[q] += ai[q] * (hi[i] * ai[q] + 2 * s[q]);
            }
            for (int q = 0; q < nr; q++) per_row[r0 + q] = acc[q];
        }
        free(at);
    }
    for (int r = 0; r < rows; r++) total += per_row[r];
    free(per_row);
    return total;
}

double rs_output_err2(const float *wq, const float *w, int rows, const rs_calib_stats *st) {
    size_t n = (size_t)rows * st->in;
    double *d = rs_malloc(n * sizeof *d);
    for (size_t k = 0; k < n; k++) d[k] = (double)(wq ? wq[k] : 0.0f) - w[k];
    double e = quad_form(d, rows, st);
    free(d);
    return e;
}

/* ---- assembly */
static void attach_critical(rs_qweight *q, const uint8_t *mask, const float *w) {
    int64_t n = 0;
    q->crit_row_ptr = rs_malloc((size_t)(q->rows + 1) * sizeof *q->crit_row_ptr);
    for (size_t k = 0; k < (size_t)q->rows * q->cols; k++) n += mask[k] != 0;
    q->crit_cols = rs_malloc((size_t)(n > 0 ? n : 1) * sizeof *q->crit_cols);
    q->crit_vals = rs_malloc((size_t)(n > 0 ? n : 1) * sizeof *q->crit_vals);
    n = 0;
    for (int r = 0; r < q->rows; r++) {
        q->crit_row_ptr[r] = n;
        for (int c = 0; c < q->cols; c++)
            if (mask[(size_t)r * q->cols + c]) {
                q->crit_cols[n] = c;
                q->crit_vals[n++] = rs_f32_to_f16(w[(size_t)r * q->cols + c]);
            }
    }
    q->crit_row_ptr[q->rows] = n;
    q->n_critical = n;
}

int rs_qweight_assemble(const rs_qspec *spec, int rows, int cols, const uint8_t *codes,
                        const float *scales, const float *zeros, const float *input_scale,
                        const uint8_t *mask, const float *w_orig, rs_qweight *out) {
    RS_TRY(rs_qweight_from_codes(spec, rows, cols, codes, scales, zeros, out));
    if (input_scale) {
        out->input_scale = rs_malloc((size_t)cols * sizeof *out->input_scale);
        memcpy(out->input_scale, input_scale, (size_t)cols * sizeof *input_scale);
    }
    if (mask) attach_critical(out, mask, w_orig);
    return 0;
}

/* ---- calibration capture */
enum { N_SITES = 4 };
static int site_of(int target) { return target < 3 ? 0 : target == 3 ? 1 : target < 6 ? 2 : 3; }

typedef struct {
    int layer;
    rs_calib_stats st[N_SITES];
} capture_ctx;

/* H += x^T x (its lower triangle: capture_layer mirrors it when the texts are done) and
 * mean_abs += |x| over the n rows of x; rows of H in parallel (each element's sum runs over
 * the tokens in order: deterministic). */
static void on_capture(void *user, int layer, int site, const void *x, int n, int in) {
    capture_ctx *c = user;
    if (layer != c->layer) return;
    rs_calib_stats *st = &c->st[site_of(site)];
    const float *xf = x;
#pragma omp parallel for schedule(static, 8)
    for (int i = 0; i < in; i++) {
        double *h = st->H + (size_t)i * in;
        for (int t = 0; t < n; t++) {
            const float *r = xf + (size_t)t * in;
            double ri = r[i];
            st->mean_abs[i] += fabs(ri);
            for (int j = 0; j <= i; j++) h[j] += ri * r[j];
        }
    }
    st->n_tokens += n;
}

typedef struct {
    int n;
    int32_t **ids;
    int *len;
} token_set;

static int tokenize_all(const rs_tokenizer *tok, const rs_calib_set *calib, int max_len,
                        token_set *ts) {
    ts->n = calib->n;
    ts->ids = rs_calloc((size_t)calib->n, sizeof *ts->ids);
    ts->len = rs_calloc((size_t)calib->n, sizeof *ts->len);
    for (int i = 0; i < calib->n; i++) {
        RS_TRY(rs_tokenizer_encode(tok, calib->texts[i], strlen(calib->texts[i]), 1, &ts->ids[i],
                                   &ts->len[i]));
        if (ts->len[i] > max_len) ts->len[i] = max_len;
    }
    return 0;
}

static void token_set_free(token_set *ts) {
    for (int i = 0; i < ts->n; i++) free(ts->ids[i]);
    free(ts->ids), free(ts->len);
}

/* Statistics of layer l's inputs over every calibration sequence. */
static int capture_layer(rs_model *m, const token_set *ts, int max_len, int l, capture_ctx *c) {
    int dims[N_SITES] = {m->cfg.hidden_size, m->cfg.n_heads * m->cfg.head_dim, m->cfg.hidden_size,
                         m->cfg.intermediate_size};
    c->layer = l;
    for (int s = 0; s < N_SITES; s++) {
        c->st[s].in = dims[s];
        c->st[s].n_tokens = 0;
        memset(c->st[s].H, 0, (size_t)dims[s] * dims[s] * sizeof(double));
        memset(c->st[s].mean_abs, 0, (size_t)dims[s] * sizeof(double));
    }
    rs_kv_cache cache;
    RS_TRY(rs_kv_cache_init(m, 1, max_len, &cache));
    float *logits = rs_malloc((size_t)m->cfg.vocab_size * sizeof *logits);
    int32_t *pos = rs_malloc((size_t)max_len * sizeof *pos);
    for (int t = 0; t < max_len; t++) pos[t] = t;
    m->capture = on_capture, m->capture_user = c, m->capture_layers = l + 1;
    int rc = 0;
    for (int i = 0; rc == 0 && i < ts->n; i++)
        if (ts->len[i] > 0)
            rc =
                rs_model_forward(m, &cache, ts->ids[i], pos, 1, ts->len[i], RS_LOGITS_LAST, logits);
    m->capture = NULL, m->capture_user = NULL, m->capture_layers = 0;
    for (int s = 0; s < N_SITES; s++) {
        double *H = c->st[s].H;
        int d = dims[s];
        for (int i = 0; i < d; i++) {
            c->st[s].mean_abs[i] /= c->st[s].n_tokens > 0 ? (double)c->st[s].n_tokens : 1.0;
            for (int j = 0; j < i; j++) H[(size_t)j * d + i] = H[(size_t)i * d + j];
        }
    }
    free(logits), free(pos);
    rs_kv_cache_free(m, &cache);
    return rc;
}

/* ---- the driver */
static void linear_shape(const rs_model *m, int t, int *rows, int *cols) {
    const rs_model_config *c = &m->cfg;
    int D = c->hidden_size, Q = c->n_heads * c->head_dim, KV = c->n_kv_heads * c->head_dim;
    int F = c->intermediate_size;
    int r[7] = {Q, KV, KV, D, F, F, D}, k[7] = {D, D, D, Q, D, D, F};
    *rows = r[t], *cols = k[t];
}

static int quantize_linear(const float *w, int rows, int cols, const rs_calib_stats *st,
                           const uint8_t *mask, const rs_quant_opts *o, rs_qweight *q) {
    if (o->method == RS_QMETHOD_GPTQ) return rs_gptq_linear(w, rows, cols, st, mask, o, q);
    if (o->method == RS_QMETHOD_AWQ) return rs_awq_linear(w, rows, cols, st, mask, o, q);
    return rs_quantize_rtn(w, rows, cols, &o->spec, mask, NULL, q);
}

static int check_model(const rs_model *m, const rs_calib_set *calib, const rs_quant_opts *o) {
    if (strcmp(m->be->name, "cpu") != 0 || m->be->weight_dtype != RS_F32 ||
        m->be->act_dtype != RS_F32)
        return RS_FAIL("quantize: the model must be loaded in fp32 on the cpu backend");
    if (o->method != RS_QMETHOD_RTN && (!calib || calib->n == 0))
        return RS_FAIL("quantize: AWQ and GPTQ need calibration texts");
    if (o->max_seq_len < 1) return RS_FAIL("quantize: max_seq_len must be >= 1");
    return rs_qspec_check(&o->spec);
}

typedef struct {
    float **orig; /* [n] the model's original weights while dequantized ones stand in */
    capture_ctx cap;
    token_set ts;
    float *wq;
} driver;

static int quantize_layer(rs_model *m, driver *d, int l, uint8_t *const *masks,
                          const rs_quant_opts *o, rs_quant_result *out) {
    for (int t = 0; t < 7; t++) {
        int i = l * 7 + t, rows, cols;
        linear_shape(m, t, &rows, &cols);
        float *w = rs_snip_weight(m, l, (rs_lora_target)t);
        const rs_calib_stats *st = d->ts.n > 0 ? &d->cap.st[site_of(t)] : NULL;
        RS_TRY(quantize_linear(w, rows, cols, st, masks ? masks[i] : NULL, o, &out->w[i]));
        RS_TRY(rs_dequantize(&out->w[i], d->wq));
        out->rel_error[i] =
            st ? sqrt(rs_output_err2(d->wq, w, rows, st) / rs_output_err2(NULL, w, rows, st)) : NAN;
        out->bytes += rs_qweight_bytes(&out->w[i]);
        out->critical_bytes += rs_qweight_critical_bytes(&out->w[i]);
        out->dense_bytes += (size_t)rows * cols * 2;
        d->orig[i] = rs_malloc((size_t)rows * cols * sizeof(float));
        memcpy(d->orig[i], w, (size_t)rows * cols * sizeof(float));
    }
    for (int t = 0; t < 7; t++) { /* layer l quantized for the layers after it */
        int rows, cols;
        linear_shape(m, t, &rows, &cols);
        RS_TRY(rs_dequantize(&out->w[l * 7 + t], rs_snip_weight(m, l, (rs_lora_target)t)));
    }
    return 0;
}

static void driver_init(rs_model *m, driver *d, int n) {
    memset(d, 0, sizeof *d);
    d->orig = rs_calloc((size_t)n, sizeof *d->orig);
    int D = m->cfg.hidden_size, Q = m->cfg.n_heads * m->cfg.head_dim, F = m->cfg.intermediate_size;
    int dims[N_SITES] = {D, Q, D, F}, big = D > Q ? D : Q;
    big = big > F ? big : F;
    for (int s = 0; s < N_SITES; s++) {
        d->cap.st[s].H = rs_malloc((size_t)dims[s] * dims[s] * sizeof(double));
        d->cap.st[s].mean_abs = rs_malloc((size_t)dims[s] * sizeof(double));
    }
    d->wq = rs_malloc((size_t)big * big * sizeof *d->wq);
}

/* Put the original weights back and free the driver. */
static void driver_finish(rs_model *m, driver *d, int n) {
    for (int i = 0; i < n; i++) {
        if (!d->orig[i]) continue;
        int rows, cols;
        linear_shape(m, i % 7, &rows, &cols);
        memcpy(rs_snip_weight(m, i / 7, (rs_lora_target)(i % 7)), d->orig[i],
               (size_t)rows * cols * sizeof(float));
        free(d->orig[i]);
    }
    free(d->orig);
    for (int s = 0; s < N_SITES; s++) free(d->cap.st[s].H), free(d->cap.st[s].mean_abs);
    token_set_free(&d->ts);
    free(d->wq);
}

int rs_quantize_model(rs_model *m, const rs_tokenizer *tok, const rs_calib_set *calib,
                      uint8_t *const *masks, const rs_quant_opts *o, rs_quant_result *out) {
    memset(out, 0, sizeof *out);
    RS_TRY(check_model(m, calib, o));
    int n = m->cfg.n_layers * 7, rc = 0;
    out->n = n;
    out->w = rs_calloc((size_t)n, sizeof *out->w);
    out->rel_error = rs_malloc((size_t)n * sizeof *out->rel_error);
    driver d;
    driver_init(m, &d, n);
    if (calib && calib->n > 0) rc = tokenize_all(tok, calib, o->max_seq_len, &d.ts);
    for (int l = 0; rc == 0 && l < m->cfg.n_layers; l++) {
        if (d.ts.n > 0) rc = capture_layer(m, &d.ts, o->max_seq_len, l, &d.cap);
        if (rc == 0) rc = quantize_layer(m, &d, l, masks, o, out);
        if (rc == 0) rs_info("quantize: layer %d/%d done", l + 1, m->cfg.n_layers);
    }
    driver_finish(m, &d, n);
    if (rc != 0) rs_quant_result_free(out);
    return rc;
}

void rs_quant_result_free(rs_quant_result *r) {
    for (int i = 0; r->w && i < r->n; i++) rs_qweight_free(&r->w[i]);
    free(r->w), free(r->rel_error);
    memset(r, 0, sizeof *r);
}
