/* lora: the adapter's lifetime and target names (lora.h). Its forward and backward live inside
 * the model's linears, in model_train.c.
 *
 * One device allocation, in this order:
 *   params  every A then B of every targeted linear (fp32, each 64-byte aligned)
 *   grads   dA, dB at the same offsets as their parameters
 *   mask    factor mode: mask_A, mask_B at the same offsets again (uint8)
 *   dW      want_weight_grad: [out, in] fp32 per targeted linear
 *   mask_W  elementwise mode: [out, in] uint8 per targeted linear
 * so that the optimizer can treat params/grads/mask as three parallel flat arrays. */
#include "resafe/model_train.h"
#include "resafe/quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const g_target_names[RS_LORA_N_TARGETS] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
static const char *const g_target_short[RS_LORA_N_TARGETS] = {"q", "k", "v", "o",
                                                              "gate", "up", "down"};

const char *rs_lora_target_name(rs_lora_target t) {
    return (unsigned)t < RS_LORA_N_TARGETS ? g_target_names[t] : "?";
}

/* One name of a comma-separated list, surrounding spaces ignored. */
static int parse_one(const char *name, size_t len, unsigned *bits) {
    if (len == 3 && strncmp(name, "all", 3) == 0) {
        *bits |= (1u << RS_LORA_N_TARGETS) - 1;
        return 0;
    }
    for (int t = 0; t < RS_LORA_N_TARGETS; t++)
        if ((strlen(g_target_short[t]) == len && strncmp(name, g_target_short[t], len) == 0) ||
            (strlen(g_target_names[t]) == len && strncmp(name, g_target_names[t], len) == 0)) {
            *bits |= 1u << t;
            return 0;
        }
    return RS_FAIL("LoRA targets: unknown target '%.*s' (known: q, k, v, o, gate, up, down, all)",
                   (int)len, name);
}

int rs_lora_parse_targets(const char *list, unsigned *targets) {
    *targets = 0;
    unsigned bits = 0;
    const char *p = list;
    for (;;) {
        while (*p == ' ' || *p == '\t') p++;
        const char *end = p;
        while (*end && *end != ',') end++;
        size_t len = (size_t)(end - p);
        while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t')) len--;
        if (len == 0) return RS_FAIL("LoRA targets: empty name in '%s'", list);
        RS_TRY(parse_one(p, len, &bits));
        if (!*end) break;
        p = end + 1;
    }
    *targets = bits;
    return 0;
}

/* W [out, in] of target t in every layer (the linears of HF's decoder layer). */
static void target_shape(const rs_model_config *c, rs_lora_target t, int *in, int *out) {
    int D = c->hidden_size, F = c->intermediate_size;
    int Q = c->n_heads * c->head_dim, KV = c->n_kv_heads * c->head_dim;
    switch (t) {
    case RS_LORA_Q: *in = D, *out = Q; return;
    case RS_LORA_K:
    case RS_LORA_V: *in = D, *out = KV; return;
    case RS_LORA_O: *in = Q, *out = D; return;
    case RS_LORA_GATE:
    case RS_LORA_UP: *in = D, *out = F; return;
    default: *in = F, *out = D; return; /* down */
    }
}

static size_t align16(size_t n_floats) { return (n_floats + 15) & ~(size_t)15; }

/* Offsets (in floats) of every A and B in the flat params region, and the region sizes. */
typedef struct {
    size_t n_flat;       /* floats in params (= grads = mask bytes) */
    size_t n_dw;         /* floats of dW */
    size_t n_mask_w;     /* bytes of mask_W (each 64-aligned) */
} lora_layout;

static int plan_layout(const rs_lora *l, int want_dw, int elementwise, lora_layout *lay,
                       size_t *a_off, size_t *b_off, size_t *w_off) {
    memset(lay, 0, sizeof *lay);
    for (int i = 0; i < l->n_layers * RS_LORA_N_TARGETS; i++) {
        const rs_lora_linear *x = &l->lin[i];
        if (x->in == 0) continue;
        size_t a, b, w;
        if (rs_mul_size((size_t)l->rank, (size_t)x->in, &a) != 0 ||
            rs_mul_size((size_t)x->out, (size_t)l->rank, &b) != 0 ||
            rs_mul_size((size_t)x->out, (size_t)x->in, &w) != 0 || a > SIZE_MAX / 64 ||
            b > SIZE_MAX / 64 || w > SIZE_MAX / 64)
            return RS_FAIL("LoRA: rank %d adapters overflow the address space", l->rank);
        a_off[i] = lay->n_flat;
        b_off[i] = a_off[i] + align16(a);
        lay->n_flat = b_off[i] + align16(b);
        w_off[i] = want_dw ? lay->n_dw : 0;
        if (want_dw) lay->n_dw += align16(w);
        if (elementwise) lay->n_mask_w += rs_align64(w);
        if (lay->n_flat > SIZE_MAX / 64 || lay->n_dw > SIZE_MAX / 64 || lay->n_mask_w > SIZE_MAX / 8)
            return RS_FAIL("LoRA: rank %d adapters overflow the address space", l->rank);
    }
    return 0;
}

/* A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), B = 0, masks all ones
 * (every entry trainable until the SNIP masks arrive); the gaps stay zero. */
static void fill_initial(rs_lora *l, const size_t *a_off, const size_t *b_off, rs_rng *rng) {
    const rs_backend *be = l->be;
    float *host = rs_calloc(l->n_flat ? l->n_flat : 1, sizeof *host);
    uint8_t *ones = l->flat_mask ? rs_calloc(l->n_flat, 1) : NULL;
    for (int i = 0; i < l->n_layers * RS_LORA_N_TARGETS; i++) {
        rs_lora_linear *x = &l->lin[i];
        if (x->in == 0) continue;
        size_t na = (size_t)l->rank * x->in, nb = (size_t)x->out * l->rank;
        float bound = 1.0f / sqrtf((float)x->in);
        for (size_t j = 0; j < na; j++) host[a_off[i] + j] = (2.0f * rs_rng_uniform(rng) - 1.0f) * bound;
        if (ones) {
            memset(ones + a_off[i], 1, na);
            memset(ones + b_off[i], 1, nb);
        }
        if (x->mask_W) {
            size_t nw = (size_t)x->out * x->in;
            uint8_t *all = rs_malloc(nw);
            memset(all, 1, nw);
            be->to_device(x->mask_W, all, nw);
            free(all);
        }
    }
    be->to_device(l->flat_params, host, l->n_flat * sizeof *host);
    if (ones) be->to_device(l->flat_mask, ones, l->n_flat);
    free(host);
    free(ones);
}

static void place(rs_lora *l, const lora_layout *lay, const size_t *a_off, const size_t *b_off,
                  const size_t *w_off) {
    char *base = l->block;
    size_t flat_bytes = lay->n_flat * sizeof(float);
    l->flat_params = (float *)base;
    l->flat_grads = (float *)(base + flat_bytes);
    size_t at = 2 * flat_bytes;
    if (l->mask_mode == RS_MASK_FACTOR) {
        l->flat_mask = (uint8_t *)(base + at);
        at += rs_align64(lay->n_flat);
    }
    float *dw = (float *)(base + at);
    at += lay->n_dw * sizeof(float);
    uint8_t *mask_w = (uint8_t *)(base + at);
    for (int i = 0; i < l->n_layers * RS_LORA_N_TARGETS; i++) {
        rs_lora_linear *x = &l->lin[i];
        if (x->in == 0) continue;
        x->A = l->flat_params + a_off[i];
        x->B = l->flat_params + b_off[i];
        x->dA = l->flat_grads + a_off[i];
        x->dB = l->flat_grads + b_off[i];
        if (l->flat_mask) {
            x->mask_A = l->flat_mask + a_off[i];
            x->mask_B = l->flat_mask + b_off[i];
        }
        if (l->want_weight_grad) x->dW = dw + w_off[i];
        if (l->mask_mode == RS_MASK_ELEMENTWISE) {
            x->mask_W = mask_w;
            mask_w += rs_align64((size_t)x->out * x->in);
        }
    }
}

/* The one device allocation of the layout (the order of the header comment). */
static size_t block_bytes(const lora_layout *lay, rs_mask_mode mask_mode) {
    return 2 * lay->n_flat * sizeof(float) + lay->n_dw * sizeof(float) + lay->n_mask_w +
           (mask_mode == RS_MASK_FACTOR ? rs_align64(lay->n_flat) : 0);
}

int rs_lora_plan_bytes(const rs_model_config *c, int rank, unsigned targets,
                       rs_mask_mode mask_mode, int want_weight_grad, size_t *n_flat,
                       size_t *bytes) {
    rs_lora l = {.rank = rank, .targets = targets, .mask_mode = mask_mode,
                 .n_layers = c->n_layers};
    int n_lin = c->n_layers * RS_LORA_N_TARGETS;
    l.lin = rs_calloc((size_t)n_lin, sizeof *l.lin);
    for (int i = 0; i < n_lin; i++)
        if (targets & (1u << (i % RS_LORA_N_TARGETS)))
            target_shape(c, (rs_lora_target)(i % RS_LORA_N_TARGETS), &l.lin[i].in, &l.lin[i].out);
    size_t *off = rs_malloc(3 * (size_t)n_lin * sizeof *off);
    lora_layout lay;
    int rc = plan_layout(&l, want_weight_grad, mask_mode == RS_MASK_ELEMENTWISE, &lay, off,
                         off + n_lin, off + 2 * n_lin);
    free(off);
    free(l.lin);
    if (rc != 0) return -1;
    *n_flat = lay.n_flat;
    *bytes = block_bytes(&lay, mask_mode);
    return 0;
}

static int check_init_args(const rs_model *m, int rank, float alpha, unsigned targets,
                           rs_mask_mode mask_mode) {
    if (rank < 1 || rank > 65536) return RS_FAIL("LoRA: rank %d outside [1, 65536]", rank);
    if (!isfinite(alpha) || alpha <= 0.0f) return RS_FAIL("LoRA: alpha %g must be positive", alpha);
    if (targets == 0 || targets >= (1u << RS_LORA_N_TARGETS))
        return RS_FAIL("LoRA: target bits 0x%x name no projection (or unknown ones)", targets);
    if (mask_mode != RS_MASK_NONE && mask_mode != RS_MASK_FACTOR && mask_mode != RS_MASK_ELEMENTWISE)
        return RS_FAIL("LoRA: unknown mask mode %d", (int)mask_mode);
    if (!m->be || !m->layers) return RS_FAIL("LoRA: the model is not loaded");
    return 0;
}

int rs_lora_init(rs_lora *l, const rs_model *m, int rank, float alpha, unsigned targets,
                 rs_mask_mode mask_mode, int want_weight_grad, rs_rng *rng) {
    memset(l, 0, sizeof *l);
    RS_TRY(check_init_args(m, rank, alpha, targets, mask_mode));
    const rs_model_config *c = &m->cfg;
    *l = (rs_lora){.rank = rank, .alpha = alpha, .scale = alpha / (float)rank, .targets = targets,
                   .mask_mode = mask_mode, .want_weight_grad = want_weight_grad != 0,
                   .enabled = 1, .n_layers = c->n_layers, .be = m->be};
    int n_lin = c->n_layers * RS_LORA_N_TARGETS;
    l->lin = rs_calloc((size_t)n_lin, sizeof *l->lin);
    for (int i = 0; i < n_lin; i++)
        if (targets & (1u << (i % RS_LORA_N_TARGETS)))
            target_shape(c, (rs_lora_target)(i % RS_LORA_N_TARGETS), &l->lin[i].in, &l->lin[i].out);
    size_t *off = rs_malloc(3 * (size_t)n_lin * sizeof *off);
    lora_layout lay;
    if (plan_layout(l, l->want_weight_grad, mask_mode == RS_MASK_ELEMENTWISE, &lay, off,
                    off + n_lin, off + 2 * n_lin) != 0) {
        free(off);
        rs_lora_free(l);
        return -1;
    }
    l->n_flat = lay.n_flat;
    l->block_bytes = block_bytes(&lay, mask_mode);
    l->block = m->be->alloc(l->block_bytes);
    place(l, &lay, off, off + n_lin, off + 2 * n_lin);
    fill_initial(l, off, off + n_lin, rng);
    free(off);
    rs_lora_zero_grads(l);
    rs_debug("LoRA: rank %d, alpha %g, %zu trainable values (%.2f MiB in all on %s)", rank, alpha,
             l->n_flat, l->block_bytes / 1048576.0, m->be->name);
    return 0;
}

void rs_lora_free(rs_lora *l) {
    if (l->block) l->be->free(l->block);
    free(l->lin);
    memset(l, 0, sizeof *l);
}

void rs_lora_zero_grads(rs_lora *l) {
    l->be->zero_f32(l->flat_grads, l->n_flat);
    for (int i = 0; i < l->n_layers * RS_LORA_N_TARGETS; i++)
        if (l->lin[i].dW) l->be->zero_f32(l->lin[i].dW, (size_t)l->lin[i].out * l->lin[i].in);
}

/* ---------------------------------------------------------------- group-constant A (lora.h) */

typedef enum { GROUP_FIRST, GROUP_SUM, GROUP_MAJORITY } group_op;

/* Per row of a [rank, in] array: every group's members set to its first value, its sum, or (a
 * 0/1 mask) whether at least half of it is 1. */
static void group_rows_f32(float *a, int rank, int in, int gs, group_op op) {
    for (int r = 0; r < rank; r++)
        for (int c0 = 0; c0 < in; c0 += gs) {
            float *g = a + (size_t)r * in + c0;
            int n = c0 + gs < in ? gs : in - c0;
            float v = g[0];
            if (op == GROUP_SUM) {
                double s = 0.0;
                for (int c = 0; c < n; c++) s += g[c];
                v = (float)s;
            }
            for (int c = 0; c < n; c++) g[c] = v;
        }
}

static void group_rows_u8(uint8_t *a, int rank, int in, int gs) {
    for (int r = 0; r < rank; r++)
        for (int c0 = 0; c0 < in; c0 += gs) {
            uint8_t *g = a + (size_t)r * in + c0;
            int n = c0 + gs < in ? gs : in - c0, on = 0;
            for (int c = 0; c < n; c++) on += g[c] != 0;
            for (int c = 0; c < n; c++) g[c] = 2 * on >= n;
        }
}

/* Apply op to A (or dA, or mask_A) of every targeted linear through a host copy. */
static void group_apply(rs_lora *l, group_op op, int which) {
    if (!l->group_constant) return;
    for (int i = 0; i < l->n_layers * RS_LORA_N_TARGETS; i++) {
        rs_lora_linear *x = &l->lin[i];
        if (x->in == 0) continue;
        int gs = l->group_size > 0 && l->group_size < x->in ? l->group_size : x->in;
        size_t n = (size_t)l->rank * x->in;
        if (which == 2) {
            if (!x->mask_A) continue;
            uint8_t *h = rs_malloc(n);
            l->be->to_host(h, x->mask_A, n);
            group_rows_u8(h, l->rank, x->in, gs);
            l->be->to_device(x->mask_A, h, n);
            free(h);
            continue;
        }
        float *dev = which == 0 ? x->A : x->dA, *h = rs_malloc(n * sizeof *h);
        l->be->to_host(h, dev, n * sizeof *h);
        group_rows_f32(h, l->rank, x->in, gs, op);
        l->be->to_device(dev, h, n * sizeof *h);
        free(h);
    }
}

void rs_lora_group_init(rs_lora *l) { group_apply(l, GROUP_FIRST, 0); }
void rs_lora_tie_grads(rs_lora *l) { group_apply(l, GROUP_SUM, 1); }
void rs_lora_group_masks(rs_lora *l) { group_apply(l, GROUP_MAJORITY, 2); }

int rs_lora_setup_group_constant(rs_lora *l, const rs_model *m, rs_mask_mode mask_mode,
                                 const char *label) {
    if (!m->n_qweights) {
        rs_warn("[lora] group_constant ignored: %s is not quantized (no groups)", label);
        return 0;
    }
    const rs_qspec *spec = &m->qweights[0].spec;
    char name[64];
    if (spec->format != RS_QFMT_INT)
        return RS_FAIL("[lora] group_constant needs a grouped INT format; %s is %s", label,
                       rs_qspec_name(spec, name, sizeof name));
    if (mask_mode == RS_MASK_ELEMENTWISE)
        return RS_FAIL("[lora] group_constant needs [snip] mask = factor or none (an elementwise "
                       "mask on B A is not constant within groups)");
    l->group_constant = 1;
    l->group_size = spec->group_size;
    rs_lora_group_init(l);
    rs_info("LoRA: A constant within each quantization group (%s)",
            rs_qspec_name(spec, name, sizeof name));
    return 0;
}
