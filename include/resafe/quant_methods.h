/* quant_methods: quantizing a whole model: calibration data, RTN / AWQ / GPTQ, and SNIP-based
 * critical-weight protection (the paper's quantization without fine-tuning variant).
 *
 * The model is loaded in fp32 on the CPU backend (its weights are host fp32 there). Every
 * targeted linear (q,k,v,o,gate,up,down of every layer) becomes an rs_qweight; embeddings,
 * norms and lm_head stay in full precision. AWQ and GPTQ see the real inputs of each linear on
 * the calibration prompts, layer by layer (inputs of layer l computed with layers < l already
 * quantized, as the GPTQ paper does). */
#ifndef RESAFE_QUANT_METHODS_H
#define RESAFE_QUANT_METHODS_H

#include "resafe/chat.h"
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

/* ---------------------------------------------------------------- a whole quantization run
 * What `resafe quantize` does and the quantize stage of `resafe train` reuses: load `model`
 * (fp32, CPU; an already quantized model is an error), optional protection masks and
 * calibration data, rs_quantize_model, then `out` (which must not exist): the quantized
 * directory (or, with export_kind "dequant", a plain HF directory) plus resafe_manifest.json,
 * written to out.tmp.<pid> and renamed. */
typedef struct {
    const char *model, *out;
    const char *method_name;  /* rtn|awq|gptq|nf4|fp4|int8: also written into the metadata */
    const char *calib, *calib_column;          /* calib NULL: none */
    int calib_max;
    const char *protect_data, *protect_column; /* with q.protect_tau > 0 */
    int protect_max;
    const char *export_kind;  /* NULL or "dequant" */
    const char *export_dtype; /* "bf16", "f16", "f32" */
    rs_quant_opts q;
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
/* Run it; sizes (may be NULL) receives the size report. 0, or -1 + message. */
int rs_quantize_job_run(const rs_quantize_job *j, rs_quant_sizes *sizes);

#endif
