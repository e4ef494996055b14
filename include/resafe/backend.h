/* backend: the op table the model is written against.
 *
 * The model never loops over elements: it calls these ops. Two backends implement the table:
 *   cpu  - the reference (src/backend_cpu.c): fp32 everything, plain loops, OpenMP.
 *   cuda - the hot path (kernels/): bf16 activations and frozen weights, fp32 accumulation,
 *          fp32 trainable parameters and optimizer state.
 *
 * Conventions
 *  - All pointers are device pointers of the backend (host memory for cpu).
 *  - "act" buffers hold activations in the backend's act_dtype (F32 on cpu, BF16 on cuda);
 *    "w" buffers hold frozen weights in the backend's weight_dtype; float* buffers are fp32
 *    on every backend (norm statistics, logits handed to the sampler, trainable params).
 *  - Row-major. A linear weight is [out, in] as in Hugging Face; linear computes y = x W^T + b.
 *  - Token-major activations: x[n_tokens, dim]. Attention q is [B, Tq, n_heads, head_dim],
 *    k/v are [B, Tk, n_kv_heads, head_dim] (the KV cache layout: appending a token is one row).
 *  - Positions: q_pos[b*Tq + t] is the absolute position of query t of sequence b, or -1 for a
 *    padded query (its output row is written as zeros). Query at position p attends to keys
 *    0..p of its own sequence (causal), so padding never needs a separate mask.
 */
#ifndef RESAFE_BACKEND_H
#define RESAFE_BACKEND_H

#include "resafe/core.h"

typedef enum { RS_ACT_SILU = 0, RS_ACT_GELU_TANH = 1, RS_ACT_GELU = 2 } rs_activation;

typedef struct rs_backend {
    const char *name;
    rs_dtype act_dtype;    /* activations */
    rs_dtype weight_dtype; /* frozen weights */

    /* ---- memory */
    void *(*alloc)(size_t bytes); /* dies on failure */
    void (*free)(void *p);
    void (*to_device)(void *dst, const void *host_src, size_t bytes);
    void (*to_host)(void *host_dst, const void *src, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes); /* device to device */
    void (*synchronize)(void);
    /* Upload n fp32 host values into a device buffer of dtype dst_dtype (act or weight). */
    void (*upload_f32)(void *dst, rs_dtype dst_dtype, const float *host_src, size_t n);
    /* Download n values of dtype src_dtype into fp32 host memory. */
    void (*download_f32)(float *host_dst, const void *src, rs_dtype src_dtype, size_t n);

    /* ---- forward ops */
    /* out[i, :] = table[ids[i], :] * scale   (Gemma scales by sqrt(dim); others pass 1) */
    void (*embedding_fwd)(void *out, const void *table, const int32_t *ids, int n, int dim,
                          float scale);
    /* out = x / rms(x) * (w or 1 + w); rstd[n] (fp32, may be NULL) keeps 1/rms for backward. */
    void (*rmsnorm_fwd)(void *out, float *rstd, const void *x, const void *w, int n, int dim,
                        float eps, int add_one);
    /* out[n, m] = x[n, k] W[m, k]^T (+ bias[m] if bias != NULL); beta = 1 accumulates into out. */
    void (*linear_fwd)(void *out, const void *x, const void *w, const void *bias, int n, int k,
                       int m, float beta);
    /* Rotary embedding in place on x[n_tok, n_heads, head_dim] (Hugging Face rotate_half
     * layout: pairs (i, i + head_dim/2)). pos[n_tok] (-1 = padded: untouched);
     * inv_freq[head_dim/2] fp32 host-computed with any rope scaling already applied. */
    void (*rope_fwd)(void *x, const int32_t *pos, const float *inv_freq, int n_tok, int n_heads,
                     int head_dim);
    /* Causal GQA attention, see the header comment for layouts and positions.
     * scale multiplies q.k (1/sqrt(head_dim) unless the model says otherwise). */
    void (*attention_fwd)(void *out, const void *q, const void *k, const void *v,
                          const int32_t *q_pos, int B, int Tq, int Tk, int n_heads,
                          int n_kv_heads, int head_dim, float scale);
    /* out[n, f] = act(gate) * up */
    void (*glu_fwd)(void *out, const void *gate, const void *up, size_t n, rs_activation act);
    /* x += y (residual) */
    void (*add_inplace)(void *x, const void *y, size_t n);
    /* Copy rows of token activations: dst[dst_rows[i], :] = src[i, :] for i < n (used to write
     * new k/v rows into the cache); dst_rows on device as int32. */
    void (*scatter_rows)(void *dst, const void *src, const int32_t *dst_rows, int n, int dim);
    /* dst[i, :] = src[src_rows[i], :] */
    void (*gather_rows)(void *dst, const void *src, const int32_t *src_rows, int n, int dim);
    /* act -> fp32 logits for the sampler (may just copy on cpu). */
    void (*act_to_f32)(float *out, const void *x, size_t n);
} rs_backend;

/* The backends compiled into this binary. */
const rs_backend *rs_backend_cpu(void);
/* NULL when resafe was built without CUDA or no GPU is present. */
const rs_backend *rs_backend_cuda(void);
/* "cpu", "cuda" or "auto" (cuda when available). NULL + message if unknown/unavailable. */
const rs_backend *rs_backend_by_name(const char *name);

#endif
