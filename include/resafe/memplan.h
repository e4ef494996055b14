/* memplan: the device memory a LoRA training run needs, by part, computed from the model's
 * config.json and the run's shape before anything is allocated (STYLE.md: memory is planned).
 *
 * Each part is the sum the allocating code itself would make, through the same functions:
 *   weights      rs_model_plan_bytes (every parameter in the backend's weight dtype, 64-byte
 *                aligned; a quantized model's 7 linears per layer at their packed size instead)
 *   adapter      rs_lora_plan_bytes (A, B, their gradients, masks, dW when SNIP needs it) and
 *                rs_snip_plan_bytes (the fp32 scores of every targeted weight)
 *   optimizer    AdamW's two fp32 moments per trainable value (optim.c rs_optim_alloc)
 *   activations  rs_train_state_plan_bytes (what each layer keeps for its backward, or only
 *                the layer inputs with recompute; the backward's buffers; the logit chunks)
 *   workspace    the backend's own buffers: none on cpu; on cuda the cuBLAS workspace, upload
 *                staging, the op scratch at the size the run's largest op grows it to, and a
 *                quantized model's dequantization scratch (kernels/backend_cuda.cu)
 * The plan is exact on cpu up to allocator rounding; on cuda the workspace is an estimate
 * (its op scratch follows the kernels' own sizing), and neither counts the CUDA context. */
#ifndef RESAFE_MEMPLAN_H
#define RESAFE_MEMPLAN_H

#include "resafe/lora.h"
#include "resafe/model.h"

typedef struct {
    const char *backend;     /* "cpu" or "cuda": whose dtypes and workspace */
    rs_model_config cfg;
    size_t quant_bytes;      /* the quantized linears' packed bytes; 0: a dense model */
    int lora_rank;
    unsigned lora_targets;
    rs_mask_mode mask_mode;  /* factor/elementwise: SNIP scores and dW buffers too */
    int lora_dropout;        /* dropout > 0: the dropped-input buffers */
    int batch_seqs;          /* sequences per forward (DPO: 2 x the micro-batch's pairs) */
    int seq_len;             /* tokens per sequence (the longest one) */
    int recompute;
    int prefixes;            /* shared prefixes planned too (DPO's share_prompt) */
} rs_mem_plan_input;

typedef struct {
    rs_dtype act_dtype, weight_dtype;
    size_t weights, adapter, optimizer, activations, workspace, total;
    size_t logits;           /* of activations: the logit chunks and log-prob buffers */
} rs_mem_plan;

/* The backend a plan is for, by [model] backend name, without starting it: "cpu", "cuda", or
 * "auto" (cuda when a GPU is usable here, else cpu). NULL + message for other names. */
const char *rs_mem_plan_backend_name(const char *name);
/* cfg from <dir>/config.json, quant_bytes from the safetensors headers when the directory has
 * weights and they are quantized (a directory with only config.json plans a dense model). */
int rs_mem_plan_load_model(const char *dir, rs_mem_plan_input *in);
int rs_mem_plan_compute(const rs_mem_plan_input *in, rs_mem_plan *out);
/* One info line: "<who>: memory plan on <backend> (...): weights ... MiB in all". */
void rs_mem_plan_print(const char *who, const rs_mem_plan_input *in, const rs_mem_plan *p);
/* Free device memory: the environment variable RESAFE_PLAN_FREE_BYTES when set (a byte count,
 * optionally with a K/M/G/T binary suffix; for tests and for leaving room to other processes),
 * else be->mem_info (be may be NULL). 0 and *free_bytes, or -1 when unknown (cpu). */
int rs_mem_plan_free_bytes(const rs_backend *be, size_t *free_bytes);
/* Refuse a plan that does not fit: -1 + one line (the plan, the free memory, then hint: what
 * to change) when p->total - held exceeds the free memory (held: bytes of the plan already
 * allocated, e.g. the backend's workspace at start); 0 when it fits or free memory is unknown. */
int rs_mem_plan_check(const char *who, const rs_mem_plan *p, const rs_backend *be, size_t held,
                      const char *hint);

#endif
