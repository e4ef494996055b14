/* quant_io: quantized model directories (README "Quantized model directory").
 *
 * <dir>/config.json and the tokenizer files (copied from the source), <dir>/model.safetensors with
 * the dense tensors of every parameter that is not quantized (as the source had them) and, per
 * quantized linear <name> (e.g. model.layers.0.self_attn.q_proj):
 *   <name>.qweight      U8  [rows, row_bytes]   packed codes (layout: src/quant_pack.c)
 *   <name>.scales       F32 [rows, n_groups]
 *   <name>.zeros        F32 [rows, n_groups]    asymmetric INT only
 *   <name>.input_scale  F32 [cols]              AWQ only
 *   <name>.outlier_cols I32 [n_out], <name>.outlier_vals F16 [rows, n_out]   int8 with outliers
 *   <name>.crit_row_ptr I64 [rows + 1], <name>.crit_cols I32 [nnz], <name>.crit_vals F16 [nnz]
 *                                               protected (critical) entries, CSR
 * and in __metadata__ "quantization_config": {"quant_format", "bits", "group_size", "symmetric",
 * "outlier_threshold", "method", "packing", "packing_version"} (JSON text). Plus
 * <dir>/resafe_manifest.json (provenance; written by `resafe quantize`). */
#ifndef RESAFE_QUANT_IO_H
#define RESAFE_QUANT_IO_H

#include "resafe/model.h"
#include "resafe/quant.h"
#include "resafe/safetensors.h"

#define RS_QCONFIG_KEY "quantization_config"
#define RS_QPACKING_NAME "resafe-rowstream"

/* The quantization_config JSON text (caller frees). */
char *rs_qconfig_json(const rs_qspec *spec, const char *method);
/* Parse it back: 0, or -1 + one line naming file. method (may be NULL) receives the method. */
int rs_qconfig_parse(const char *file, const char *json, rs_qspec *spec, char *method, size_t n);
/* The quantization_config of a safetensors set's metadata, or NULL (a dense checkpoint). */
const char *rs_qconfig_of(const rs_st_set *set);

/* Read quantized linear `name` of shape [rows, cols] into host arrays, checking every tensor's
 * dtype and shape and then rs_qweight_check. *n_used: how many tensors it consumed. */
int rs_qweight_read(const rs_st_set *set, const char *file, const char *name, const rs_qspec *spec,
                    int rows, int cols, rs_qweight *out, int *n_used);

/* Validate every quantized linear of a standalone file (a tensor <name>.qweight marks one; its
 * width is taken as the full padded width, cols = row_bytes * 8 / bits, since no config.json is
 * at hand: the model loader checks exact shapes). n_linears: how many were checked. */
int rs_qset_check(const rs_st_set *set, const char *file, int *n_linears);
int rs_qfile_check(const char *path, int *n_linears);

/* Write out_dir/model.safetensors: the source's tensors, with the weight of every linear j
 * (layer-major, rs_layer_qslot order) for which qw[j] != NULL replaced by its quantized
 * tensors. Also copies config.json and the tokenizer files from src_dir. */
int rs_qmodel_write(const char *src_dir, const char *out_dir, const rs_model_config *cfg,
                    const rs_qweight *const *qw, const char *method);
/* Write out_dir as a plain HF directory (dtype F32, F16 or BF16): every quantized weight
 * replaced by its rs_dequantize, every other tensor converted. */
int rs_qmodel_write_dequant(const char *src_dir, const char *out_dir, const rs_model_config *cfg,
                            const rs_qweight *const *qw, rs_dtype dtype);
/* Copy config.json and tokenizer files of src_dir that exist into out_dir. */
int rs_copy_model_side_files(const char *src_dir, const char *out_dir);

#endif
