/* pipeline: the stages of `resafe train` (DESIGN.md sections 1 and 4) and the run directory.
 *
 *   <out_dir>/quantize/model/      the quantized model ([quant] keys), unless [quant] model names one
 *   <out_dir>/triplets/patchset.h5 the patch set with the reference log-probs
 *   <out_dir>/dpo/adapter.h5       the masked-LoRA DPO adapter (+ checkpoint.h5, metrics.jsonl)
 *   <out_dir>/merge/<mode>/        the patched quantized model per merge mode; merge.json (stats)
 *   <out_dir>/eval/                eval.json, report.md, per-model responses, plots
 *   <out_dir>/<stage>/manifest.json  written last: the stage is complete and these were its inputs
 *
 * Every stage writes to temporary names and renames when complete; a stage directory without a
 * manifest is never taken as complete. */
#ifndef RESAFE_PIPELINE_H
#define RESAFE_PIPELINE_H

#include <stdint.h>

#include "resafe/config.h"

typedef struct {
    char *run_dir;   /* [run] out_dir */
    char *fp_dir;    /* [model] path: the full-precision model */
    char *q_dir;     /* [quant] model when set, else <run>/quantize/model */
    int q_given;     /* [quant] model was set: no quantize stage */
    char *patchset;  /* <run>/triplets/patchset.h5 */
    char *dpo_dir;   /* <run>/dpo */
    char *adapter;   /* <run>/dpo/adapter.h5 */
    char *merge_dir; /* <run>/merge (one model directory per mode inside) */
    char *eval_dir;  /* <run>/eval */
} rs_run_paths;

int rs_run_paths_init(const rs_config *cfg, rs_run_paths *p);
void rs_run_paths_free(rs_run_paths *p);

/* ---------------------------------------------------------------- quantize stage
 * [quant] keys applied to fp_dir (as `resafe quantize`), written to out_dir (temp + rename;
 * out_dir must not exist). The mapping is in src/quantize_stage.c. */
int rs_quantize_stage(const rs_config *cfg, const char *fp_dir, const char *out_dir);
/* The [quant] keys' own consistency (nf4/fp4 need rtn, awq/gptq need calib_file, a valid
 * spec), without touching any file: 0, or -1 + message. */
int rs_quantize_stage_check(const rs_config *cfg);

/* ---------------------------------------------------------------- triplets stage (patch set)
 * Prompts from [patch] harmful_file / benign_file (columns from [patch] *_column), mixed by
 * harmful_fraction into n_prompts (drawn with [run] seed); both models answer with the same chat
 * template ([model] chat_template, [generate] system_prompt) and decoding ([patch] temperature,
 * max_new_tokens); identical responses are counted and dropped; the reference log-probs of the
 * quantized model (no adapter) are computed for both responses. Written to out_path (HDF5, temp
 * + rename); layout in the README ("Patch set"). Fails with one line when the two models differ
 * in vocabulary or shapes. */
int rs_triplets_run(const rs_config *cfg, const char *fp_dir, const char *q_dir,
                    const char *out_path);

/* ---------------------------------------------------------------- merge stage */
typedef enum { RS_MERGE_GRID = 0, RS_MERGE_REFIT, RS_MERGE_ADAPTER, RS_MERGE_EXACT } rs_merge_mode;
const char *rs_merge_mode_name(rs_merge_mode m); /* "grid", ... */
int rs_merge_mode_from_name(const char *name, rs_merge_mode *out); /* -1 (no message) if unknown */

typedef struct {
    /* delta = the adapter's intended change of every adapted weight (scale * (M ⊙) B A),
     * realized = dequant(merged) - dequant(Q0) (the adapter itself for mode adapter) */
    double delta_norm;    /* ||delta|| over every adapted linear */
    double kept_fraction; /* <realized, delta> / ||delta||^2: the share of the delta that survived */
    double rel_error;     /* ||realized - delta|| / ||delta|| */
    long n_codes_changed; /* quantized codes that differ from Q0's */
} rs_merge_stats;

/* Fold the adapter (adapter_path) into the quantized model q_dir with `mode`, writing a model
 * directory out_dir (temp + rename) that every command loads like any quantized model (mode
 * adapter: q_dir's tensors plus resafe_adapter.h5, applied at load). */
int rs_merge_run(const rs_config *cfg, const char *q_dir, const char *adapter_path,
                 rs_merge_mode mode, const char *out_dir, rs_merge_stats *st);

/* ---------------------------------------------------------------- eval stage */
typedef struct {
    const char *name; /* "fp", "quantized", "patched_merged", "merge_grid", ... */
    const char *dir;  /* model directory */
} rs_eval_model;

/* Evaluate every model on the [eval] sets: ASR (keyword judge; greedy, and with [eval]
 * decoding_attacks the worst case per prompt over the attack grid), per-category ASR, benign
 * accuracy, perplexity on heldout_file, KL to the reference model on the benign prompts,
 * over-refusal on safe_file, and first-response-token flips versus the reference.
 * reference_dir: the full-precision model (NULL: no KL or flips). Writes out_dir/eval.json and
 * out_dir/<name>/responses.jsonl (temp + rename). */
int rs_eval_run(const rs_config *cfg, const rs_eval_model *models, int n_models,
                const char *reference_dir, const char *out_dir);

/* The run's report: <eval_dir>/report.md and results.json from <eval_dir>/eval.json, the merge
 * stats (<merge_dir>/<mode>/merge_stats.json) and the DPO metrics (<dpo_dir>/metrics.jsonl);
 * missing pieces are notes in the report (README: resafe eval). The run's default model list:
 * rs_eval_default_models in eval.h. */
int rs_report_write(const rs_config *cfg, const rs_run_paths *p);

/* ---------------------------------------------------------------- resafe train */
/* Run every stage whose manifest is missing or whose inputs changed (from_stage: start there
 * regardless, NULL = first needed; force: every stage). Stages, in order: quantize, triplets,
 * dpo, merge, eval, report (README "resafe train"; manifests: run_manifest.h). Returns 0,
 * -1 + message, or the signal number that interrupted it (at a stage boundary, or inside dpo
 * after its checkpoint). */
int rs_train_run(const rs_config *cfg, const char *from_stage, int force);
/* The same, stopping after stage to_stage (NULL = the last): `resafe train --to STAGE`. */
int rs_train_run_until(const rs_config *cfg, const char *from_stage, const char *to_stage,
                       int force);
/* The stage names in order, NULL-terminated. */
extern const char *const rs_train_stage_names[];

#endif
