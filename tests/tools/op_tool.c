/* op_tool: run one backend op on inputs from a safetensors file, for the Python tests that check
 * the ops against PyTorch (tests/py/test_ops_grad.py).
 *
 *   op_tool OP IN.safetensors OUT.safetensors
 *
 * IN holds the op's tensors (F32; I32 for ids, positions and targets; U8 for masks) and its
 * scalars as __metadata__ strings (sizes, scale, beta, ...). Every output buffer of the op is
 * also an input, under the output's name, holding its initial content: NaN poison for values
 * the op overwrites, the running sum for gradients it accumulates into. An output (or optional
 * input, such as a mask) absent from IN is passed as NULL. OUT holds the op's output buffers
 * after the op, plus "out" (F64) for sum_squares. Runs on the cpu backend. */
#include "resafe/backend.h"
#include "resafe/safetensors.h"

#include <stdlib.h>
#include <string.h>

#define MAX_BUFS 32

typedef struct {
    char *name;
    rs_dtype dtype;
    int ndim;
    int64_t shape[RS_MAX_DIMS];
    size_t numel;
    void *data; /* our aligned copy: the mapped file's data need not be aligned */
} op_buf;

typedef struct {
    const rs_backend *be;
    rs_st_set in;
    int n_bufs;
    op_buf bufs[MAX_BUFS];
} op_ctx;

static void load_inputs(op_ctx *c, const char *path) {
    if (rs_st_open(path, &c->in) != 0) rs_die_last();
    RS_CHECK(c->in.n_tensors <= MAX_BUFS, "%s: %d tensors, at most %d", path, c->in.n_tensors, MAX_BUFS);
    for (int i = 0; i < c->in.n_tensors; i++) {
        const rs_st_tensor *t = &c->in.tensors[i];
        op_buf *b = &c->bufs[c->n_bufs++];
        b->name = rs_strdup(t->name);
        b->dtype = t->dtype;
        b->ndim = t->ndim;
        memcpy(b->shape, t->shape, sizeof b->shape);
        b->numel = (size_t)rs_st_numel(t);
        b->data = c->be->alloc(t->nbytes);
        memcpy(b->data, t->data, t->nbytes);
    }
}

static op_buf *find_buf(op_ctx *c, const char *name) {
    for (int i = 0; i < c->n_bufs; i++)
        if (strcmp(c->bufs[i].name, name) == 0) return &c->bufs[i];
    return NULL;
}

/* The tensor `name` as the op's argument: NULL when absent (and not required); its dtype and
 * element count must be what the op will read or write. */
static void *arg(op_ctx *c, const char *name, rs_dtype dtype, size_t numel, int required) {
    op_buf *b = find_buf(c, name);
    RS_CHECK(b || !required, "op_tool: input tensor '%s' missing", name);
    if (!b) return NULL;
    RS_CHECK(b->dtype == dtype, "op_tool: tensor '%s' is %s, want %s", name, rs_dtype_name(b->dtype),
             rs_dtype_name(dtype));
    RS_CHECK(b->numel == numel, "op_tool: tensor '%s' has %zu values, want %zu", name, b->numel, numel);
    return b->data;
}
static float *req_f32(op_ctx *c, const char *name, size_t numel) { return arg(c, name, RS_F32, numel, 1); }
static float *opt_f32(op_ctx *c, const char *name, size_t numel) { return arg(c, name, RS_F32, numel, 0); }
static int32_t *req_i32(op_ctx *c, const char *name, size_t numel) { return arg(c, name, RS_I32, numel, 1); }
static uint8_t *opt_u8(op_ctx *c, const char *name, size_t numel) { return arg(c, name, RS_U8, numel, 0); }

static const char *param(op_ctx *c, const char *key) {
    for (int i = 0; i < c->in.n_meta; i++)
        if (strcmp(c->in.meta_keys[i], key) == 0) return c->in.meta_values[i];
    RS_DIE("op_tool: metadata '%s' missing", key);
    return NULL;
}
static int iparam(op_ctx *c, const char *key) { return atoi(param(c, key)); }
/* strtof of Python's repr of a float32 value gives that value back exactly */
static float fparam(op_ctx *c, const char *key) { return strtof(param(c, key), NULL); }

/* ---------------------------------------------------------------- the ops */

static void op_embedding_bwd(op_ctx *c) {
    int n = iparam(c, "n"), dim = iparam(c, "dim"), vocab = iparam(c, "vocab");
    c->be->embedding_bwd(opt_f32(c, "dtable", (size_t)vocab * dim), req_f32(c, "dout", (size_t)n * dim),
                         req_i32(c, "ids", n), n, dim, fparam(c, "scale"));
}

static void op_rmsnorm_fwd(op_ctx *c) {
    int n = iparam(c, "n"), dim = iparam(c, "dim");
    c->be->rmsnorm_fwd(req_f32(c, "out", (size_t)n * dim), opt_f32(c, "rstd", n), req_f32(c, "x", (size_t)n * dim),
                       req_f32(c, "w", dim), n, dim, fparam(c, "eps"), iparam(c, "add_one"));
}

static void op_rmsnorm_bwd(op_ctx *c) {
    int n = iparam(c, "n"), dim = iparam(c, "dim");
    size_t nd = (size_t)n * dim;
    c->be->rmsnorm_bwd(opt_f32(c, "dx", nd), opt_f32(c, "dw", dim), req_f32(c, "dout", nd), req_f32(c, "x", nd),
                       req_f32(c, "w", dim), req_f32(c, "rstd", n), n, dim, iparam(c, "add_one"),
                       fparam(c, "beta"));
}

static void op_linear_bwd(op_ctx *c) {
    int n = iparam(c, "n"), k = iparam(c, "k"), m = iparam(c, "m");
    c->be->linear_bwd(opt_f32(c, "dx", (size_t)n * k), opt_f32(c, "dw", (size_t)m * k), opt_f32(c, "dbias", m),
                      req_f32(c, "dout", (size_t)n * m), req_f32(c, "x", (size_t)n * k),
                      req_f32(c, "w", (size_t)m * k), n, k, m, fparam(c, "beta"));
}

static void rope_op(op_ctx *c, int backward) {
    int n_tok = iparam(c, "n_tok"), n_heads = iparam(c, "n_heads"), head_dim = iparam(c, "head_dim");
    float *x = req_f32(c, "x", (size_t)n_tok * n_heads * head_dim);
    int32_t *pos = req_i32(c, "pos", n_tok);
    float *inv_freq = req_f32(c, "inv_freq", head_dim / 2);
    (backward ? c->be->rope_bwd : c->be->rope_fwd)(x, pos, inv_freq, n_tok, n_heads, head_dim);
}
static void op_rope_fwd(op_ctx *c) { rope_op(c, 0); }
static void op_rope_bwd(op_ctx *c) { rope_op(c, 1); }

static void op_attention_bwd(op_ctx *c) {
    int B = iparam(c, "B"), Tq = iparam(c, "Tq"), Tk = iparam(c, "Tk"), n_heads = iparam(c, "n_heads");
    int n_kv = iparam(c, "n_kv_heads"), hd = iparam(c, "head_dim");
    size_t nq = (size_t)B * Tq * n_heads * hd, nk = (size_t)B * Tk * n_kv * hd;
    c->be->attention_bwd(opt_f32(c, "dq", nq), opt_f32(c, "dk", nk), opt_f32(c, "dv", nk), req_f32(c, "dout", nq),
                         req_f32(c, "q", nq), req_f32(c, "k", nk), req_f32(c, "v", nk),
                         req_i32(c, "q_pos", (size_t)B * Tq), B, Tq, Tk, n_heads, n_kv, hd, fparam(c, "scale"));
}

static void op_glu_bwd(op_ctx *c) {
    size_t n = (size_t)iparam(c, "n");
    c->be->glu_bwd(opt_f32(c, "dgate", n), opt_f32(c, "dup", n), req_f32(c, "dout", n), req_f32(c, "gate", n),
                   req_f32(c, "up", n), n, (rs_activation)iparam(c, "act"));
}

static void op_logprob_fwd(op_ctx *c) {
    int n = iparam(c, "n"), vocab = iparam(c, "vocab");
    c->be->logprob_fwd(opt_f32(c, "logp", n), opt_f32(c, "lse", n), req_f32(c, "logits", (size_t)n * vocab),
                       req_i32(c, "targets", n), n, vocab);
}

static void op_logprob_bwd(op_ctx *c) {
    int n = iparam(c, "n"), vocab = iparam(c, "vocab");
    c->be->logprob_bwd(req_f32(c, "dlogits", (size_t)n * vocab), req_f32(c, "dlogp", n),
                       req_f32(c, "logits", (size_t)n * vocab), req_f32(c, "lse", n), req_i32(c, "targets", n),
                       n, vocab);
}

static void op_lora_fwd(op_ctx *c) {
    int n = iparam(c, "n"), k = iparam(c, "k"), m = iparam(c, "m"), r = iparam(c, "r");
    c->be->lora_fwd(req_f32(c, "y", (size_t)n * m), req_f32(c, "xa", (size_t)n * r), req_f32(c, "x", (size_t)n * k),
                    req_f32(c, "A", (size_t)r * k), req_f32(c, "B", (size_t)m * r), n, k, m, r, fparam(c, "scale"),
                    fparam(c, "beta"));
}

static void op_lora_bwd(op_ctx *c) {
    int n = iparam(c, "n"), k = iparam(c, "k"), m = iparam(c, "m"), r = iparam(c, "r");
    c->be->lora_bwd(opt_f32(c, "dx", (size_t)n * k), opt_f32(c, "dA", (size_t)r * k), opt_f32(c, "dB", (size_t)m * r),
                    req_f32(c, "dy", (size_t)n * m), req_f32(c, "x", (size_t)n * k), req_f32(c, "xa", (size_t)n * r),
                    req_f32(c, "A", (size_t)r * k), req_f32(c, "B", (size_t)m * r), n, k, m, r,
                    fparam(c, "scale"), fparam(c, "beta"));
}

static void op_lora_merge(op_ctx *c) {
    int m = iparam(c, "m"), k = iparam(c, "k"), r = iparam(c, "r");
    c->be->lora_merge(req_f32(c, "w_eff", (size_t)m * k), req_f32(c, "w", (size_t)m * k), req_f32(c, "A", (size_t)r * k),
                      req_f32(c, "B", (size_t)m * r), opt_u8(c, "mask", (size_t)m * k), m, k, r, fparam(c, "scale"));
}

static void op_lora_masked_grad(op_ctx *c) {
    int m = iparam(c, "m"), k = iparam(c, "k"), r = iparam(c, "r");
    c->be->lora_masked_grad(opt_f32(c, "dA", (size_t)r * k), opt_f32(c, "dB", (size_t)m * r),
                            req_f32(c, "dw", (size_t)m * k), opt_u8(c, "mask", (size_t)m * k),
                            req_f32(c, "A", (size_t)r * k), req_f32(c, "B", (size_t)m * r), m, k, r,
                            fparam(c, "scale"));
}

static void op_adamw(op_ctx *c) {
    size_t n = (size_t)iparam(c, "n");
    c->be->adamw(req_f32(c, "p", n), req_f32(c, "g", n), req_f32(c, "m", n), req_f32(c, "v", n), opt_u8(c, "mask", n),
                 n, fparam(c, "lr"), fparam(c, "beta1"), fparam(c, "beta2"), fparam(c, "eps"),
                 fparam(c, "weight_decay"), iparam(c, "step"), fparam(c, "grad_scale"));
}

static void op_sum_squares(op_ctx *c) {
    size_t n = (size_t)iparam(c, "n");
    RS_CHECK(c->n_bufs < MAX_BUFS, "op_tool: too many tensors");
    op_buf *out = &c->bufs[c->n_bufs++];
    *out = (op_buf){.name = rs_strdup("out"), .dtype = RS_F64, .ndim = 1, .shape = {1}, .numel = 1,
                    .data = c->be->alloc(sizeof(double))};
    c->be->sum_squares(out->data, req_f32(c, "x", n), opt_u8(c, "mask", n), n);
}

static void op_snip_accumulate(op_ctx *c) {
    size_t n = (size_t)iparam(c, "n");
    c->be->snip_accumulate(req_f32(c, "score", n), req_f32(c, "w", n), req_f32(c, "dw", n), n, fparam(c, "weight"));
}

static void op_zero_f32(op_ctx *c) {
    size_t n = (size_t)iparam(c, "n");
    c->be->zero_f32(req_f32(c, "x", n), n);
}

static void op_fake_quant_rows(op_ctx *c) {
    int rows = iparam(c, "rows"), cols = iparam(c, "cols");
    c->be->fake_quant_rows(req_f32(c, "w_q", (size_t)rows * cols), req_f32(c, "w", (size_t)rows * cols), rows, cols,
                           iparam(c, "bits"), iparam(c, "symmetric"));
}

static void op_fake_quant_groups(op_ctx *c) {
    int n_groups = iparam(c, "n_groups"), group = iparam(c, "group");
    c->be->fake_quant_groups(req_f32(c, "x", (size_t)n_groups * group), (size_t)n_groups, group,
                             iparam(c, "bits"), iparam(c, "symmetric"));
}

/* Each op and the buffers it writes (comma-separated), which go to OUT when present. */
static const struct {
    const char *name;
    void (*run)(op_ctx *c);
    const char *outputs;
} g_ops[] = {
    {"embedding_bwd", op_embedding_bwd, "dtable"},
    {"rmsnorm_fwd", op_rmsnorm_fwd, "out,rstd"},
    {"rmsnorm_bwd", op_rmsnorm_bwd, "dx,dw"},
    {"linear_bwd", op_linear_bwd, "dx,dw,dbias"},
    {"rope_fwd", op_rope_fwd, "x"},
    {"rope_bwd", op_rope_bwd, "x"},
    {"attention_bwd", op_attention_bwd, "dq,dk,dv"},
    {"glu_bwd", op_glu_bwd, "dgate,dup"},
    {"logprob_fwd", op_logprob_fwd, "logp,lse"},
    {"logprob_bwd", op_logprob_bwd, "dlogits"},
    {"lora_fwd", op_lora_fwd, "y,xa"},
    {"lora_bwd", op_lora_bwd, "dx,dA,dB"},
    {"lora_merge", op_lora_merge, "w_eff"},
    {"lora_masked_grad", op_lora_masked_grad, "dA,dB"},
    {"adamw", op_adamw, "p,m,v"},
    {"sum_squares", op_sum_squares, "out"},
    {"snip_accumulate", op_snip_accumulate, "score"},
    {"zero_f32", op_zero_f32, "x"},
    {"fake_quant_rows", op_fake_quant_rows, "w_q"},
    {"fake_quant_groups", op_fake_quant_groups, "x"},
};

static int is_output(const char *outputs, const char *name) {
    size_t len = strlen(name);
    for (const char *p = outputs; p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
        if (strncmp(p, name, len) == 0 && (p[len] == ',' || p[len] == 0)) return 1;
    return 0;
}

static void write_outputs(op_ctx *c, const char *outputs, const char *path) {
    rs_st_write_tensor out[MAX_BUFS];
    int n = 0;
    for (int i = 0; i < c->n_bufs; i++) {
        op_buf *b = &c->bufs[i];
        if (!is_output(outputs, b->name)) continue;
        out[n] = (rs_st_write_tensor){.name = b->name, .dtype = b->dtype, .ndim = b->ndim, .data = b->data};
        memcpy(out[n++].shape, b->shape, sizeof b->shape);
    }
    if (rs_st_write(path, out, n, NULL, NULL, 0) != 0) rs_die_last();
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: op_tool OP IN.safetensors OUT.safetensors\n");
        return 2;
    }
    size_t n_ops = sizeof g_ops / sizeof g_ops[0], which = 0;
    while (which < n_ops && strcmp(g_ops[which].name, argv[1]) != 0) which++;
    if (which == n_ops) return fprintf(stderr, "op_tool: unknown op '%s'\n", argv[1]), 2;
    op_ctx c = {.be = rs_backend_cpu()};
    load_inputs(&c, argv[2]);
    g_ops[which].run(&c);
    write_outputs(&c, g_ops[which].outputs, argv[3]);
    for (int i = 0; i < c.n_bufs; i++) {
        c.be->free(c.bufs[i].data);
        free(c.bufs[i].name);
    }
    rs_st_close(&c.in);
    return 0;
}
