/* optim: learning-rate schedules, AdamW over a list of fp32 tensors, gradient-norm clipping.
 * The arithmetic is the backend's (adamw, sum_squares, zero_f32); this file keeps the list. */
#include "resafe/train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- schedule */

int rs_sched_kind_from_name(const char *name, rs_sched_kind *out) {
    static const char *names[] = {"constant", "linear", "cosine"};
    for (int i = 0; i < 3; i++)
        if (strcmp(name, names[i]) == 0) return *out = (rs_sched_kind)i, 0;
    return -1;
}

double rs_lr_at(const rs_lr_schedule *s, int step) {
    if (step < 0) step = 0;
    if (step < s->warmup_steps) return s->lr * (double)(step + 1) / (double)s->warmup_steps;
    int decay_steps = s->total_steps - s->warmup_steps;
    double p = (double)(step - s->warmup_steps) / (double)(decay_steps > 1 ? decay_steps : 1);
    if (p > 1) p = 1;
    double f = 1;
    if (s->kind == RS_SCHED_LINEAR) f = 1 - p;
    else if (s->kind == RS_SCHED_COSINE) f = 0.5 * (1 + cos(M_PI * p));
    return f > 0 ? s->lr * f : 0;
}

/* ---------------------------------------------------------------- AdamW */

void rs_optim_init(rs_optim *o, const rs_backend *be, float beta1, float beta2, float eps,
                   float weight_decay) {
    memset(o, 0, sizeof *o);
    o->be = be;
    o->beta1 = beta1, o->beta2 = beta2, o->eps = eps, o->weight_decay = weight_decay;
}

void rs_optim_add(rs_optim *o, const char *name, float *p, float *g, const uint8_t *mask,
                  size_t n, int decay) {
    RS_CHECK(!o->block, "bug: rs_optim_add after rs_optim_alloc");
    RS_CHECK(strlen(name) < RS_OPTIM_NAME, "bug: parameter name '%s' too long", name);
    o->params = rs_realloc(o->params, (size_t)(o->n_params + 1) * sizeof *o->params);
    rs_optim_param *q = &o->params[o->n_params++];
    memset(q, 0, sizeof *q);
    snprintf(q->name, sizeof q->name, "%s", name);
    q->p = p, q->g = g, q->mask = mask, q->n = n, q->decay = decay;
}

void rs_optim_alloc(rs_optim *o) {
    size_t total = 0;
    for (int i = 0; i < o->n_params; i++) total += 2 * rs_align64(o->params[i].n * sizeof(float));
    o->block = o->be->alloc(total ? total : 64);
    char *at = o->block;
    o->n_total = 0;
    for (int i = 0; i < o->n_params; i++) {
        rs_optim_param *q = &o->params[i];
        size_t bytes = rs_align64(q->n * sizeof(float));
        q->m = (float *)at, at += bytes;
        q->v = (float *)at, at += bytes;
        o->be->zero_f32(q->m, q->n);
        o->be->zero_f32(q->v, q->n);
        o->n_total += q->n;
    }
    rs_debug("optimizer: AdamW over %d tensors, %zu parameters, moments %.1f MiB", o->n_params,
             o->n_total, total / 1048576.0);
}

void rs_optim_free(rs_optim *o) {
    if (o->block) o->be->free(o->block);
    free(o->params);
    memset(o, 0, sizeof *o);
}

void rs_optim_zero_grads(rs_optim *o) {
    for (int i = 0; i < o->n_params; i++) o->be->zero_f32(o->params[i].g, o->params[i].n);
}

double rs_optim_grad_norm(const rs_optim *o) {
    double total = 0;
    for (int i = 0; i < o->n_params; i++) {
        double s = 0;
        o->be->sum_squares(&s, o->params[i].g, o->params[i].mask, o->params[i].n);
        total += s;
    }
    return sqrt(total);
}

float rs_clip_factor(double norm, double clip) {
    if (clip <= 0 || !(norm > clip)) return 1.0f;
    return (float)(clip / (norm + 1e-6));
}

/* Masked-out entries of a factor-mode adapter still have gradients; they are left out of the
 * norm the clip factor is taken from (rs_optim_grad_norm) and never applied. */
void rs_optim_step(rs_optim *o, double lr, float grad_scale) {
    int step = o->step + 1;
    for (int i = 0; i < o->n_params; i++) {
        rs_optim_param *q = &o->params[i];
        o->be->adamw(q->p, q->g, q->m, q->v, q->mask, q->n, (float)lr, o->beta1, o->beta2, o->eps,
                     q->decay ? o->weight_decay : 0.0f, step, grad_scale);
    }
    o->step = step;
}

const rs_optim_param *rs_optim_find(const rs_optim *o, const char *name) {
    for (int i = 0; i < o->n_params; i++)
        if (strcmp(o->params[i].name, name) == 0) return &o->params[i];
    return NULL;
}
