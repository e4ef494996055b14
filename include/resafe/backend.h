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

struct rs_qweight; /* quant.h */

/* The adapters of projections that read the same input x [n, k] (q/k/v, gate/up), for
 * lora_fwd_group / lora_bwd_group: each with its own A [r, k], B [m, r] (fp32), saved
 * xa = x A^T [n, r] (fp32) and, for the backward, gradients dA, dB (accumulated). */
#define RS_LORA_GROUP_MAX 3
typedef struct {
    int count; /* 1..RS_LORA_GROUP_MAX */
    int m[RS_LORA_GROUP_MAX];
    const float *A[RS_LORA_GROUP_MAX], *B[RS_LORA_GROUP_MAX];
    float *xa[RS_LORA_GROUP_MAX], *dA[RS_LORA_GROUP_MAX], *dB[RS_LORA_GROUP_MAX];
} rs_lora_group;

typedef struct rs_backend {
    const char *name;
    rs_dtype act_dtype;    /* activations */
    rs_dtype weight_dtype; /* frozen weights */
    /* Token rows a forward call carries at about the cost of one: a GPU decoding step is bound
     * by reading the weights, so padding up to this many rows is nearly free (generation pads
     * prefill chunks within it); 0 on cpu, where every row costs its arithmetic. */
    int free_rows;

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
    /* Memory accounting. peak_bytes: the most bytes ever held through alloc at once (what the
     * run's own buffers need; a CUDA context and library internals are not counted, as
     * torch.cuda.max_memory_allocated does not count them). live_bytes: held now.
     * workspace_bytes: the backend's own buffers among them (cuBLAS workspace, op scratch).
     * mem_info (NULL where unknown, e.g. cpu): free and total device bytes now; 0 on success. */
    size_t (*peak_bytes)(void);
    size_t (*live_bytes)(void);
    size_t (*workspace_bytes)(void);
    int (*mem_info)(size_t *free_bytes, size_t *total_bytes);

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
    /* Dropout with a counter-based random stream, identical on every backend:
     *   out[i] = keep(i) ? x[i] / (1 - p) : 0,  keep(i) = (z_i >> 40) * 2^-24 >= p,
     * z_i = the (i+1)-th output of splitmix64 started from state `seed` (mix of seed + (i+1) *
     * 0x9e3779b97f4a7c15). No state is kept: the backward is the same call with the same seed
     * on the gradient. out may equal x. p in [0, 1). */
    void (*dropout)(void *out, const void *x, size_t n, float p, uint64_t seed);
    /* Copy rows of token activations: dst[dst_rows[i], :] = src[i, :] for i < n (used to write
     * new k/v rows into the cache); dst_rows on device as int32. */
    void (*scatter_rows)(void *dst, const void *src, const int32_t *dst_rows, int n, int dim);
    /* dst[i, :] = src[src_rows[i], :] */
    void (*gather_rows)(void *dst, const void *src, const int32_t *src_rows, int n, int dim);
    /* act -> fp32 logits for the sampler (may just copy on cpu). */
    void (*act_to_f32)(float *out, const void *x, size_t n);
    /* ids[r] = the index of the largest value of act row r of x [rows, dim] (the first one on
     * ties; NaN is never larger, so a row starting with NaN gives 0 as the host's argmax loop
     * does). ids is a device int32 buffer. Greedy decoding downloads B ids instead of B x vocab
     * logits. */
    void (*argmax_rows)(int32_t *ids, const void *x, int rows, int dim);

    /* ---- backward ops (training). Each mirrors its forward op. Activation gradients are in
     * act dtype; gradients of parameters are fp32 and ACCUMULATED (+=) so that gradient
     * accumulation over micro-batches and tied embeddings need no extra buffers. An output
     * pointer that is NULL is not computed. "beta" on an activation gradient: 0 overwrites,
     * 1 accumulates (residual branches). Ops with backward support being NULL in a backend
     * means that backend cannot train yet. */

    /* dtable[ids[i], :] += dout[i, :] * scale  (fp32 [vocab, dim]); a negative id (padding)
     * adds nothing */
    void (*embedding_bwd)(float *dtable, const void *dout, const int32_t *ids, int n, int dim,
                          float scale);
    /* From out = x * rstd * (w or 1 + w): dx = beta*dx + d/dx, dw += d/dw (fp32, may be NULL).
     * rstd as saved by rmsnorm_fwd. */
    void (*rmsnorm_bwd)(void *dx, float *dw, const void *dout, const void *x, const void *w,
                        const float *rstd, int n, int dim, int add_one, float beta);
    /* From out[n, m] = x W^T + b: dx[n, k] = beta*dx + dout W (may be NULL),
     * dw[m, k] += dout^T x (fp32, may be NULL), dbias[m] += sum_rows dout (fp32, may be NULL). */
    void (*linear_bwd)(void *dx, float *dw, float *dbias, const void *dout, const void *x,
                       const void *w, int n, int k, int m, float beta);
    /* Rotary backward in place on dx[n_tok, n_heads, head_dim]: the inverse rotation;
     * padded positions (-1) untouched. */
    void (*rope_bwd)(void *dx, const int32_t *pos, const float *inv_freq, int n_tok, int n_heads,
                     int head_dim);
    /* Causal GQA attention backward (recomputes the probabilities from q, k): dq overwritten
     * [B,Tq,H,D]; dk, dv overwritten [B,Tk,Hkv,D] (summed over the heads sharing a kv head;
     * keys no query attends get 0). Padded queries (q_pos -1) contribute nothing. */
    void (*attention_bwd)(void *dq, void *dk, void *dv, const void *dout, const void *q,
                          const void *k, const void *v, const int32_t *q_pos, int B, int Tq,
                          int Tk, int n_heads, int n_kv_heads, int head_dim, float scale);
    /* Optional (NULL: not offered), a pair: the training forward that also saves what its
     * backward needs, and that backward. attention_fwd_lse is attention_fwd plus lse
     * [B, n_heads, Tq] fp32 (the backend's own per-row statistics; it may leave lse unwritten
     * when it falls back to attention_fwd); attention_bwd_saved is attention_bwd given that
     * forward's unchanged output out and its lse (the same q, k, v). */
    void (*attention_fwd_lse)(void *out, float *lse, const void *q, const void *k,
                              const void *v, const int32_t *q_pos, int B, int Tq, int Tk,
                              int n_heads, int n_kv_heads, int head_dim, float scale);
    void (*attention_bwd_saved)(void *dq, void *dk, void *dv, const void *dout, const void *q,
                                const void *k, const void *v, const void *out, const float *lse,
                                const int32_t *q_pos, int B, int Tq, int Tk, int n_heads,
                                int n_kv_heads, int head_dim, float scale);
    /* From out = act(gate) * up: dgate, dup overwritten. */
    void (*glu_bwd)(void *dgate, void *dup, const void *dout, const void *gate, const void *up,
                    size_t n, rs_activation act);
    /* Token log-probabilities from logits[n, vocab] (act dtype): logp[i] =
     * log_softmax(logits[i])[targets[i]] and lse[i] = logsumexp(logits[i]) (fp32, device);
     * targets[i] < 0 gives logp[i] = 0 (prompt tokens, padding). */
    void (*logprob_fwd)(float *logp, float *lse, const void *logits, const int32_t *targets,
                        int n, int vocab);
    /* dlogits[i, :] = dlogp[i] * (onehot(targets[i]) - softmax(logits[i])) (overwritten; rows
     * with targets < 0 are zero). */
    void (*logprob_bwd)(void *dlogits, const float *dlogp, const void *logits, const float *lse,
                        const int32_t *targets, int n, int vocab);

    /* ---- LoRA (trainable A [r, k], B [m, r] in fp32; W frozen)
     * y[n, m] = beta * y + scale * (x A^T) B^T (beta 0: y is not read); xa[n, r] (fp32) keeps
     * x A^T for backward. */
    void (*lora_fwd)(void *y, float *xa, const void *x, const float *A, const float *B, int n,
                     int k, int m, int r, float scale, float beta);
    /* dx = beta*dx + scale * (dy B) A (may be NULL); dA += scale * (dy B)^T x;
     * dB += scale * dy^T xa. */
    void (*lora_bwd)(void *dx, float *dA, float *dB, const void *dy, const void *x,
                     const float *xa, const float *A, const float *B, int n, int k, int m, int r,
                     float scale, float beta);
    /* lora_fwd of every adapter of g on the shared x: y[i] = beta y[i] + scale (x A_i^T) B_i^T,
     * g->xa[i] = x A_i^T. The CUDA backend can do the x A^T of all of them in one product. */
    void (*lora_fwd_group)(void *const *y, const void *x, const rs_lora_group *g, int n, int k,
                           int r, float scale, float beta);
    /* lora_bwd of every adapter of g: dx = beta dx + scale sum_i (dy_i B_i) A_i (dx may be NULL),
     * g->dA[i] += scale (dy_i B_i)^T x, g->dB[i] += scale dy_i^T g->xa[i]. */
    void (*lora_bwd_group)(void *dx, const void *const *dy, const void *x, const rs_lora_group *g,
                           int n, int k, int r, float scale, float beta);
    /* Elementwise mode: w_eff[m, k] = w + scale * (mask ⊙ (B A)) in weight dtype
     * (mask uint8 [m, k]; NULL = all ones). */
    void (*lora_merge)(void *w_eff, const void *w, const float *A, const float *B,
                       const uint8_t *mask, int m, int k, int r, float scale);
    /* Elementwise mode backward from the full weight gradient dw[m, k] (fp32):
     * G = scale * (mask ⊙ dw); dA += B^T G; dB += G A^T. */
    void (*lora_masked_grad)(float *dA, float *dB, const float *dw, const uint8_t *mask,
                             const float *A, const float *B, int m, int k, int r, float scale);

    /* ---- optimizer and scores (fp32) */
    /* AdamW with decoupled weight decay and bias correction (step >= 1):
     *   m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
     *   p -= lr * ( (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps) + wd * p )
     * Entries with mask[i] == 0 are not touched at all (p, m, v unchanged); mask NULL = all.
     * grad_scale multiplies g first (gradient clipping / accumulation averaging). */
    void (*adamw)(float *p, const float *g, float *m, float *v, const uint8_t *mask, size_t n,
                  float lr, float beta1, float beta2, float eps, float weight_decay, int step,
                  float grad_scale);
    /* Sum of squares of x[n] (fp32) into *out (host), for gradient norms; entries with
     * mask[i] == 0 are left out (the frozen entries of a factor-masked adapter are not part of
     * the update the norm clips); mask NULL = all. */
    void (*sum_squares)(double *out, const float *x, const uint8_t *mask, size_t n);
    /* SNIP: score[i] += weight * |w[i] * dw[i]| (w in weight dtype, dw fp32). */
    void (*snip_accumulate)(float *score, const void *w, const float *dw, size_t n, float weight);
    /* Zero n fp32 values (gradient buffers). */
    void (*zero_f32)(float *x, size_t n);
    /* x[i] = min(max(x[i], lo[i]), hi[i]) for n fp32 values (a box-constrained update; lo[i] <=
     * hi[i], neither NaN). */
    void (*clamp_f32)(float *x, const float *lo, const float *hi, size_t n);
    /* QAT (LLM-QAT style straight-through fake quantization): w_q[rows, cols] (weight dtype) =
     * dequant(quant(w)) per row on RTN's INT grid (quant.c, the grid the export stores; a QAT
     * weight with groups of G columns is the [rows * cols / G, G] view), `bits` in 2..8;
     * symmetric: scale = max|w| / (2^(bits-1) - 1) (1 if 0), q in [-(2^(bits-1)-1),
     * 2^(bits-1)-1]; asymmetric: lo = min(0, min w), hi = max(0, max w), scale = (hi - lo) /
     * (2^bits - 1) (1 if 0), zero = clamp(round(-lo / scale), 0, 2^bits-1), q in [0, 2^bits-1].
     * Round half to even. */
    void (*fake_quant_rows)(void *w_q, const float *w, int rows, int cols, int bits,
                            int symmetric);
    /* Mixed-precision training: dst[n] (weight dtype) = src[n] (fp32 master), rounded to
     * nearest even (a copy on cpu, where weights are fp32; dst == src allowed there). */
    void (*cast_f32_to_weight)(void *dst, const float *src, size_t n);
    /* LLM-QAT activation / KV fake quantization, in place on x (act dtype): each of n_groups runs
     * of `group` consecutive values (a token's row, or one head of it) onto its own min-max grid:
     * fake_quant_rows's formulas but with lo = min x, hi = max x (not widened to hold zero) and
     * the zero point not clamped, computed in fp32 from the act values and rounded to act dtype
     * once (cuda = bf16 of cpu's result on the same inputs). A constant run is left unchanged.
     * Straight-through estimator: the backward is the identity, so there is no backward op. */
    void (*fake_quant_groups)(void *x, size_t n_groups, int group, int bits, int symmetric);

    /* ---- quantized linears (quant.h). w is a backend-resident rs_qweight, m = w->rows,
     * k = w->cols. The cpu backend dequantizes and multiplies (the reference); cuda fuses. */
    /* out[n, m] = beta*out + x[n, k] dequant(W)^T (+ bias[m]) */
    void (*qmatmul)(void *out, const void *x, const struct rs_qweight *w, const void *bias, int n,
                    float beta);
    /* dx[n, k] = beta*dx + dout[n, m] dequant(W)  (the input gradient; W stays frozen) */
    void (*qmatmul_t)(void *dx, const void *dout, const struct rs_qweight *w, int n, float beta);
    /* Copy a host rs_qweight into backend memory (arrays allocated here); free releases them. */
    int (*qweight_upload)(struct rs_qweight *dst, const struct rs_qweight *host);
    void (*qweight_free)(struct rs_qweight *w);
    /* w[m, k] = dequant(W) in weight dtype (elementwise LoRA merge and SNIP on quantized
     * weights need the dense W_eff). */
    void (*qdequantize)(void *w, const struct rs_qweight *q);
} rs_backend;

/* The backends compiled into this binary. */
const rs_backend *rs_backend_cpu(void);
/* NULL when resafe was built without CUDA or no GPU is present. */
const rs_backend *rs_backend_cuda(void);
/* CUDA builds only: the cuda backend's stream (a cudaStream_t), on which every op runs in order,
 * for code that orders its own stream's work after the backend's (comm_nccl.c) and for
 * benchmarks that time or capture it. */
void *rs_cuda_stream_handle(void);
/* "cpu", "cuda" or "auto" (cuda when available). NULL + message if unknown/unavailable. */
const rs_backend *rs_backend_by_name(const char *name);

#endif
