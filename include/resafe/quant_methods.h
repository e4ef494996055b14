/* quant_methods: quantizing a whole model: calibration data, RTN / AWQ / GPTQ, SNIP-based
 * critical-weight protection (the paper's quantization without fine-tuning variant), and the
 * fine-tuning methods QAT (LLM-QAT) and QLoRA (see "training methods" below).
 *
 * The model is loaded in fp32 on the CPU backend (its weights are host fp32 there). Every
 * targeted linear (q,k,v,o,gate,up,down of every layer) becomes an rs_qweight; embeddings,
 * norms and lm_head stay in full precision. AWQ and GPTQ see the real inputs of each linear on
 * the calibration prompts, layer by layer (inputs of layer l computed with layers < l already
 * quantized, as the GPTQ paper does). */
#ifndef RESAFE_QUANT_METHODS_H
#define RESAFE_QUANT_METHODS_H

#include "resafe/chat.h"
#include "resafe/config.h"
#include "resafe/model.h"
#include "resafe/quant.h"
#include "resafe/tokenizer.h"

/* Calibration texts: a .txt file (one per line), .csv (column by name, RFC 4180 quoting) or
 * .jsonl (member by name; for a prompt/target pair give "prompt+target" to join two members
 * with a space). Errors name the file and line. */
typedef struct {
    int n;
    char **texts;
    char **targets; /* with "a+b" columns: the second member (protection data), else NULL */
} rs_calib_set;
int rs_calib_load(const char *path, const char *column, int max_items, rs_calib_set *out);
void rs_calib_free(rs_calib_set *c);

typedef enum { RS_QMETHOD_RTN = 0, RS_QMETHOD_AWQ, RS_QMETHOD_GPTQ } rs_qmethod;

typedef struct {
    rs_qspec spec;
    rs_qmethod method;
    int max_seq_len;       /* calibration sequences are cut to this many tokens */
    /* GPTQ */
    float gptq_damp;       /* fraction of the mean Hessian diagonal added (0.01) */
    int gptq_block;        /* lazy-batch block size (128) */
    int gptq_act_order;    /* quantize columns in order of decreasing Hessian diagonal */
    /* AWQ */
    int awq_grid;          /* points of the scale search s = mean|x|^alpha, alpha in [0, 1] (20) */
    int awq_clip;          /* also search the clipping ratio of each group */
    /* protection */
    float protect_tau;     /* fraction of each model's targeted entries kept in fp16 (0 = off) */
    uint64_t seed;
} rs_quant_opts;
void rs_quant_opts_default(rs_quant_opts *o);

/* Per targeted linear, in order layer-major then q,k,v,o,gate,up,down. */
typedef struct {
    int n;              /* n_layers * 7 */
    rs_qweight *w;      /* host weights */
    double *rel_error;  /* ||(W_q - W) X|| / ||W X|| on the calibration inputs (RTN: NaN if no
                           calibration data); for the report */
    size_t bytes, critical_bytes, dense_bytes; /* sizes: quantized, side matrix, fp16 original */
} rs_quant_result;

/* SNIP scores |W * dL/dW| of the fp32 model for every targeted weight on a safety calibration set
 * (prompt + target completion, loss on the target tokens only, through the training core's
 * backward), and the global top-tau mask. masks: [n_layers*7] host arrays [rows, cols]. */
/* The same with the prompt in a chat template (RS_CHAT_NONE = raw text, as rs_protect_masks):
 * the prompt is one user turn with the generation prompt, the target follows it. */
int rs_protect_masks_chat(rs_model *m, const rs_tokenizer *tok, const rs_calib_set *data,
                          rs_chat_kind chat, float tau, int max_seq_len, uint8_t **masks);
/* The scores behind the masks: host [N] in global order (layer, q..down, row-major), malloc'ed. */
int rs_protect_scores(rs_model *m, const rs_tokenizer *tok, const rs_calib_set *data,
                      rs_chat_kind chat, int max_seq_len, float **scores, size_t *n_scores);
int rs_protect_masks(rs_model *m, const rs_tokenizer *tok, const rs_calib_set *data, float tau,
                     int max_seq_len, uint8_t **masks);

/* Quantize every targeted linear of m (fp32, cpu backend). calib may be NULL for RTN; masks
 * (from rs_protect_masks) may be NULL. The model itself is left unchanged. */
int rs_quantize_model(rs_model *m, const rs_tokenizer *tok, const rs_calib_set *calib,
                      uint8_t *const *masks, const rs_quant_opts *o, rs_quant_result *out);
void rs_quant_result_free(rs_quant_result *r);

/* The training of the quantization-assisting methods (qat, qlora): supervised fine-tuning on
 * the calibration set, a JSONL file of {prompt, response} (members prompt_key / response_key),
 * rendered with the chat template as `resafe sft` renders it; the loss is the mean NLL over the
 * response tokens. AdamW (beta2 0.999, no weight decay), cosine decay without warm-up, global
 * gradient-norm clip 1. */
typedef enum { RS_QTRAIN_NONE = 0, RS_QTRAIN_QAT, RS_QTRAIN_QLORA } rs_qtrain_kind;
typedef struct {
    rs_qtrain_kind kind;
    const char *prompt_key, *response_key;
    const char *chat_template; /* [model] chat_template: auto, none, llama-2, ... */
    const char *backend;       /* [model] backend for the training: cpu, cuda, auto */
    int steps;                 /* optimizer steps (0 = epochs over the data) */
    int epochs, batch_size, micro_batch_size, threads; /* sequences: q.max_seq_len */
    double lr;
    int act_bits, kv_bits;     /* qat: passed to [sft] qat_act_bits / qat_kv_bits (0 = off) */
    /* qlora */
    int rank;
    float alpha;
    const char *targets;       /* [lora] targets syntax: all, or q,v,... */
    const char *merge;         /* refit, grid or adapter (resafe merge's modes) */
    const char *save_trained;  /* qat: also keep the trained fp32 model there (NULL: no) */
} rs_qtrain_opts;

/* ---------------------------------------------------------------- a whole quantization run
 * What `resafe quantize` does and the quantize stage of `resafe train` reuses: load `model`
 * (fp32, CPU; an already quantized model is an error), optional protection masks and
 * calibration data, rs_quantize_model, then `out` (which must not exist): the quantized
 * directory (or, with export_kind "dequant", a plain HF directory) plus resafe_manifest.json,
 * written to out.tmp.<pid> and renamed. */
typedef struct {
    const char *model, *out;
    const char *method_name;  /* rtn|awq|gptq|nf4|fp4|int8|qat|qlora: also in the metadata */
    const char *calib, *calib_column;          /* calib NULL: none */
    int calib_max;
    const char *protect_data, *protect_column; /* with q.protect_tau > 0 */
    int protect_max;
    const char *export_kind;  /* NULL or "dequant" */
    const char *export_dtype; /* "bf16", "f16", "f32" */
    rs_quant_opts q;
    rs_qtrain_opts train;     /* qat, qlora */
} rs_quantize_job;

typedef struct {
    int n; /* linears quantized */
    size_t bytes, critical_bytes, dense_bytes;
} rs_quant_sizes;

/* The command's defaults: int4 g128 asymmetric, calib column "prompt" (128 items), protect
 * column "prompt+target" (64 items), export bf16. */
void rs_quantize_job_default(rs_quantize_job *j);
/* Method name into format and method: nf4/fp4 default to 4 bits and blocks of 64, int8 to
 * 8 bits per row symmetric, unless bits/group were given. -1 (no message) when unknown. */
int rs_quantize_job_set_method(rs_quantize_job *j, const char *name, int bits_given,
                               int group_given);
/* Run it; sizes (may be NULL) receives the size report. 0, -1 + message, or (qat, qlora) the
 * number of the signal that stopped the training (nothing written). */
int rs_quantize_job_run(const rs_quantize_job *j, rs_quant_sizes *sizes);
/* The arguments a method refuses (calib for qat/qlora, bits and group for qlora, ...):
 * 0, or -1 + one line. bits_given / group_given: the user set them. */
int rs_quantize_job_check(const rs_quantize_job *j, int bits_given, int group_given);

/* ---------------------------------------------------------------- training methods
 * qat (src/qat_method.c): LLM-QAT. Full-parameter SFT with straight-through fake quantization
 * of the seven projections (`resafe sft` with [sft] qat = true: fp32 masters, RTN's grid of
 * spec.bits / spec.symmetric / spec.group_size as qat_group_size), then RTN of the trained
 * masters on that grid, the one the training's forward used; the export is checked to equal
 * fake_quant_rows of the masters' [rows * cols / G, G] view as numbers (groups that differ are
 * counted in the manifest and warned about). A group that does not divide a projection's
 * columns is refused by resafe sft before its first step.
 * qlora (src/qlora.c): QLoRA. The base quantized to NF4 (as --method nf4), a LoRA adapter
 * trained on top of the packed weights with the SFT loss, then merged (rs_merge_run) with
 * train.merge. Both write `out` like every other method, with train_metrics.jsonl and the
 * training settings in resafe_manifest.json. */
int rs_qat_job_run(const rs_quantize_job *j, rs_quant_sizes *sizes);
int rs_qlora_job_run(const rs_quantize_job *j, rs_quant_sizes *sizes);
/* Shared by both: the in-memory rs_config of the training (the [model] and [run] keys, and
 * [sft] prompt/response keys and hyper-parameters). out_dir: the [run] out_dir. NULL + message. */
rs_config *rs_qtrain_config(const rs_quantize_job *j, const char *model_dir,
                           const char *out_dir);
/* Before any training: out (and save_trained) must not exist, the model must be an fp model
 * directory, the calibration file must exist. 0, or -1 + one line. */
int rs_qtrain_precheck(const rs_quantize_job *j);
/* The manifest's "calibration" object of a training method: file, prompt and response keys,
 * sha256 (cJSON *). */
void *rs_qtrain_calib_entry(const rs_quantize_job *j);
/* The "training" object of the manifest (cJSON *, as void * to keep cJSON out of this header). */
void *rs_qtrain_manifest(const rs_quantize_job *j);
/* A JSON object file (a manifest): read, fn(object, user) edits it, written back atomically. */
int rs_json_file_edit(const char *path, void (*fn)(void *json, void *user), void *user);
/* Write the quantized model of res (tensors not quantized and side files from tensor_dir) into
 * j->out (temporary name, renamed), with the manifest of j (source j->model). extra_fn (may be
 * NULL) edits the manifest before it is written; extra_files (NULL-terminated pairs of
 * source path, name in out) are copied in. */
int rs_quantize_job_write(const rs_quantize_job *j, const char *tensor_dir, const rs_model *m,
                          const rs_quant_result *res, void (*extra_fn)(void *, void *),
                          void *user, const char *const *extra_files);

#endif
