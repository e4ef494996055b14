/* checkpoint: the HDF5 files training writes: checkpoints (everything a run needs to continue
 * bit-identically) and adapters (the LoRA result, also exported in PEFT's format).
 *
 * Checkpoint layout (h5py-readable; written at a temporary name and renamed):
 *   attrs    kind ("sft" | "dpo"), format 1, resafe version, step, total_steps, config_hash and
 *            data_hash (hex strings), metrics_bytes, optim_step, epoch, cursor
 *   order/perm        I32 [n]  the current epoch's data order
 *   order/rng         I64 [4]  the data order's xoshiro state (bit pattern)
 *   dropout_rng       I64 [4]  the train state's rng (LoRA dropout masks), when given
 *   params/<name>     F32 [n]  every optimizer tensor, by its optimizer name (SFT: the HF
 *                              tensor names; DPO: "lora", the adapter's flat view)
 *   adam_m/<name>, adam_v/<name>   its moments
 *   masks/<layer.target>/mask_A|mask_B|mask_W   U8, the adapter's masks (DPO)
 *   ref/chosen, ref/rejected       F32 [pairs] reference log-probs (DPO)
 *
 * Adapter layout:
 *   attrs    rank, alpha, dropout, targets ("q_proj,v_proj"), mask_mode ("none" | "factor" |
 *            "elementwise"), config_hash (hex), base_model, format 1; group_constant (0/1) and
 *            group_size (0 = whole row) when A was trained constant within quantization groups
 *            (absent: 0)
 *   lora/layers.<i>.<target>/A [rank, in], B [out, rank] (F32); mask_A, mask_B or mask_W (U8) in
 *   the masked modes. */
#ifndef RESAFE_CHECKPOINT_H
#define RESAFE_CHECKPOINT_H

#include "resafe/h5store.h"
#include "resafe/train.h"

typedef struct {
    const char *kind;           /* "sft" or "dpo" */
    uint64_t config_hash, data_hash;
    int64_t step, total_steps;  /* optimizer steps done, of the run's total */
    int64_t metrics_bytes;      /* size of the metrics log after step `step` */
    rs_data_order *order;
    rs_rng *dropout_rng;        /* rs_train_state_rng, or NULL */
    rs_optim *opt;
    rs_lora *lora;              /* masks; NULL for SFT */
    float *ref_chosen, *ref_rejected; /* [n_ref] or NULL */
    int n_ref;
} rs_checkpoint;

/* Write everything c points at (device tensors are downloaded). */
int rs_checkpoint_save(const char *path, const rs_checkpoint *c);
/* Restore into the objects c points at, which must have the checkpoint's shapes: kind, hashes
 * (a different config or data file is an error naming both hashes), every tensor by name and
 * shape. Sets step, total_steps, metrics_bytes. */
int rs_checkpoint_load(const char *path, rs_checkpoint *c);

/* ---------------------------------------------------------------- adapters */
const char *rs_mask_mode_name(rs_mask_mode mode); /* "none", "factor", "elementwise" */
/* "q_proj,v_proj" (target names joined by ','); caller frees. */
char *rs_lora_targets_string(unsigned targets);

/* Save the adapter (A, B, masks) with its settings; base_model names the model directory. */
int rs_adapter_save(const char *path, const rs_lora *l, uint64_t config_hash,
                    const char *base_model);
/* Read the settings of an adapter file (to build the rs_lora with rs_lora_init). */
typedef struct {
    int rank;
    float alpha, dropout;
    unsigned targets;
    rs_mask_mode mask_mode;
    int group_constant, group_size; /* rs_lora's fields of the same names */
} rs_adapter_info;
int rs_adapter_info_read(const char *path, rs_adapter_info *info);
/* Load A, B and masks into l, which must match the file's rank, targets and shapes; sets
 * l->group_constant and l->group_size from the file. */
int rs_adapter_load(const char *path, rs_lora *l);
/* Datasets of every targeted linear under `group` ("lora"), for adapters and checkpoints. */
int rs_adapter_write_tensors(rs_h5 *h, const char *group, const rs_lora *l, int with_factors,
                             int with_masks);
int rs_adapter_read_tensors(rs_h5 *h, const char *group, rs_lora *l, int with_factors,
                            int with_masks);

/* PEFT export into directory dir (made or replaced atomically): adapter_model.safetensors with
 * base_model.model.model.layers.<i>.{self_attn,mlp}.<target>.lora_{A,B}.weight and
 * adapter_config.json (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules).
 * An elementwise-masked adapter has no PEFT form (its mask acts on B A): -1 + message. */
int rs_adapter_export_peft(const char *dir, const rs_lora *l, const char *base_model);

/* Replace directory `dir` by the finished directory `tmp` (rename; an existing `dir` is moved
 * aside first and removed after). */
int rs_replace_dir(const char *tmp, const char *dir);
/* rm -rf */
int rs_remove_tree(const char *path);

#endif
