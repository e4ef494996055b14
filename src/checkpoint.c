/* checkpoint: everything a training run needs to continue bit-identically, in one HDF5 file
 * written atomically (layout in include/resafe/checkpoint.h). */
#include "resafe/checkpoint.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define CKPT_FORMAT 1

static void hex64(uint64_t x, char *out, size_t n) { snprintf(out, n, "%016" PRIx64, x); }

/* A device fp32 tensor through a host copy. */
static int write_f32(rs_h5 *h, const rs_backend *be, const char *prefix, const char *name,
                     const float *dev, size_t n) {
    char path[RS_OPTIM_NAME + 32];
    snprintf(path, sizeof path, "%s/%s", prefix, name);
    float *host = rs_malloc((n ? n : 1) * sizeof *host);
    be->to_host(host, dev, n * sizeof *host);
    int64_t shape[1] = {(int64_t)n};
    int rc = rs_h5_write(h, path, RS_F32, 1, shape, host);
    free(host);
    return rc;
}

static int read_f32(rs_h5 *h, const rs_backend *be, const char *prefix, const char *name,
                    float *dev, size_t n) {
    char path[RS_OPTIM_NAME + 32];
    snprintf(path, sizeof path, "%s/%s", prefix, name);
    float *host = rs_malloc((n ? n : 1) * sizeof *host);
    int64_t shape[1] = {(int64_t)n};
    int rc = rs_h5_read(h, path, RS_F32, 1, shape, host);
    if (rc == 0) be->to_device(dev, host, n * sizeof *host);
    free(host);
    return rc;
}

static int write_attrs(rs_h5 *h, const rs_checkpoint *c) {
    char cfg[32], data[32];
    hex64(c->config_hash, cfg, sizeof cfg);
    hex64(c->data_hash, data, sizeof data);
    RS_TRY(rs_h5_set_attr_str(h, NULL, "kind", c->kind));
    RS_TRY(rs_h5_set_attr_i64(h, NULL, "format", CKPT_FORMAT));
    RS_TRY(rs_h5_set_attr_str(h, NULL, "resafe_version", RS_VERSION));
    RS_TRY(rs_h5_set_attr_str(h, NULL, "config_hash", cfg));
    RS_TRY(rs_h5_set_attr_str(h, NULL, "data_hash", data));
    RS_TRY(rs_h5_set_attr_i64(h, NULL, "step", c->step));
    RS_TRY(rs_h5_set_attr_i64(h, NULL, "total_steps", c->total_steps));
    RS_TRY(rs_h5_set_attr_i64(h, NULL, "metrics_bytes", c->metrics_bytes));
    RS_TRY(rs_h5_set_attr_i64(h, NULL, "optim_step", c->opt->step));
    RS_TRY(rs_h5_set_attr_i64(h, NULL, "epoch", c->order->epoch));
    return rs_h5_set_attr_i64(h, NULL, "cursor", c->order->cursor);
}

static int write_body(rs_h5 *h, const rs_checkpoint *c) {
    const rs_optim *o = c->opt;
    int64_t n_order[1] = {c->order->n}, four[1] = {4};
    int64_t rng[4];
    memcpy(rng, c->order->rng.s, sizeof rng);
    RS_TRY(rs_h5_write(h, "order/perm", RS_I32, 1, n_order, c->order->perm));
    RS_TRY(rs_h5_write(h, "order/rng", RS_I64, 1, four, rng));
    if (c->dropout_rng) {
        memcpy(rng, c->dropout_rng->s, sizeof rng);
        RS_TRY(rs_h5_write(h, "dropout_rng", RS_I64, 1, four, rng));
    }
    for (int i = 0; i < o->n_params; i++) {
        const rs_optim_param *q = &o->params[i];
        RS_TRY(write_f32(h, o->be, "params", q->name, q->p, q->n));
        RS_TRY(write_f32(h, o->be, "adam_m", q->name, q->m, q->n));
        RS_TRY(write_f32(h, o->be, "adam_v", q->name, q->v, q->n));
    }
    if (c->lora && c->lora->mask_mode != RS_MASK_NONE)
        RS_TRY(rs_adapter_write_tensors(h, "masks", c->lora, 0, 1));
    if (c->ref_chosen) {
        int64_t n_ref[1] = {c->n_ref};
        RS_TRY(rs_h5_write(h, "ref/chosen", RS_F32, 1, n_ref, c->ref_chosen));
        RS_TRY(rs_h5_write(h, "ref/rejected", RS_F32, 1, n_ref, c->ref_rejected));
    }
    return 0;
}

int rs_checkpoint_save(const char *path, const rs_checkpoint *c) {
    rs_h5 *h;
    RS_TRY(rs_h5_create(path, &h));
    if (write_attrs(h, c) != 0 || write_body(h, c) != 0) {
        rs_h5_close(h);
        return rs_fail_context("writing checkpoint");
    }
    return rs_h5_commit(h);
}

/* ---------------------------------------------------------------- loading */

static int check_hash(rs_h5 *h, const char *path, const char *name, uint64_t want,
                      const char *what) {
    char *got = NULL, w[32];
    RS_TRY(rs_h5_get_attr_str(h, NULL, name, &got));
    hex64(want, w, sizeof w);
    int rc = strcmp(got, w) == 0
                 ? 0
                 : RS_FAIL("%s: written for a different %s (%s %s, now %s): resume with the same "
                           "settings, or start over with --force",
                           path, what, name, got, w);
    free(got);
    return rc;
}

static int read_attrs(rs_h5 *h, const char *path, rs_checkpoint *c) {
    char *kind = NULL;
    int64_t format, optim_step, epoch, cursor;
    RS_TRY(rs_h5_get_attr_str(h, NULL, "kind", &kind));
    int rc = strcmp(kind, c->kind) == 0
                 ? 0
                 : RS_FAIL("%s: a '%s' checkpoint, not a '%s' one", path, kind, c->kind);
    free(kind);
    RS_TRY(rc);
    RS_TRY(rs_h5_get_attr_i64(h, NULL, "format", &format));
    if (format != CKPT_FORMAT)
        return RS_FAIL("%s: checkpoint format %lld (this resafe reads %d)", path, (long long)format,
                       CKPT_FORMAT);
    RS_TRY(check_hash(h, path, "config_hash", c->config_hash, "config"));
    RS_TRY(check_hash(h, path, "data_hash", c->data_hash, "data file"));
    RS_TRY(rs_h5_get_attr_i64(h, NULL, "step", &c->step));
    RS_TRY(rs_h5_get_attr_i64(h, NULL, "total_steps", &c->total_steps));
    RS_TRY(rs_h5_get_attr_i64(h, NULL, "metrics_bytes", &c->metrics_bytes));
    RS_TRY(rs_h5_get_attr_i64(h, NULL, "optim_step", &optim_step));
    RS_TRY(rs_h5_get_attr_i64(h, NULL, "epoch", &epoch));
    RS_TRY(rs_h5_get_attr_i64(h, NULL, "cursor", &cursor));
    if (c->step < 0 || c->step > c->total_steps || optim_step != c->step || c->metrics_bytes < 0 ||
        epoch < 0 || cursor < 0 || cursor > c->order->n)
        return RS_FAIL("%s: inconsistent attributes (step %lld of %lld, optimizer step %lld, "
                       "cursor %lld of %d)",
                       path, (long long)c->step, (long long)c->total_steps, (long long)optim_step,
                       (long long)cursor, c->order->n);
    c->opt->step = (int)optim_step;
    c->order->epoch = epoch, c->order->cursor = cursor;
    return 0;
}

/* The permutation must be one: every index once. */
static int check_perm(const char *path, const int32_t *perm, int n) {
    uint8_t *seen = rs_calloc((size_t)(n ? n : 1), 1);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        if (perm[i] < 0 || perm[i] >= n || seen[perm[i]])
            rc = RS_FAIL("%s: order/perm is not a permutation of 0..%d", path, n - 1);
        else
            seen[perm[i]] = 1;
    }
    free(seen);
    return rc;
}

static int read_body(rs_h5 *h, const char *path, rs_checkpoint *c) {
    rs_optim *o = c->opt;
    int64_t n_order[1] = {c->order->n}, four[1] = {4}, rng[4];
    RS_TRY(rs_h5_read(h, "order/perm", RS_I32, 1, n_order, c->order->perm));
    RS_TRY(check_perm(path, c->order->perm, c->order->n));
    RS_TRY(rs_h5_read(h, "order/rng", RS_I64, 1, four, rng));
    memcpy(c->order->rng.s, rng, sizeof rng);
    if (c->dropout_rng) {
        RS_TRY(rs_h5_read(h, "dropout_rng", RS_I64, 1, four, rng));
        memcpy(c->dropout_rng->s, rng, sizeof rng);
    }
    for (int i = 0; i < o->n_params; i++) {
        rs_optim_param *q = &o->params[i];
        RS_TRY(read_f32(h, o->be, "params", q->name, q->p, q->n));
        RS_TRY(read_f32(h, o->be, "adam_m", q->name, q->m, q->n));
        RS_TRY(read_f32(h, o->be, "adam_v", q->name, q->v, q->n));
    }
    if (c->lora && c->lora->mask_mode != RS_MASK_NONE)
        RS_TRY(rs_adapter_read_tensors(h, "masks", c->lora, 0, 1));
    if (c->ref_chosen) {
        int64_t n_ref[1] = {c->n_ref};
        RS_TRY(rs_h5_read(h, "ref/chosen", RS_F32, 1, n_ref, c->ref_chosen));
        RS_TRY(rs_h5_read(h, "ref/rejected", RS_F32, 1, n_ref, c->ref_rejected));
    }
    return 0;
}

int rs_checkpoint_load(const char *path, rs_checkpoint *c) {
    rs_h5 *h;
    RS_TRY(rs_h5_open(path, &h));
    int rc = read_attrs(h, path, c);
    if (rc == 0) rc = read_body(h, path, c);
    rs_h5_close(h);
    return rc;
}
