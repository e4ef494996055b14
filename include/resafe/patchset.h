/* patchset: the patch set file (HDF5) that `resafe triplets` writes (src/triplets.c) and
 * `resafe dpo` trains on (src/patchset.c reads it). Layout, version 1 (README "Patch set (HDF5)"):
 *
 *   prompt_ids, winner_ids, loser_ids          I32 [total]  token ids of all pairs, concatenated
 *   prompt_offsets, winner_offsets, loser_offsets  I64 [n+1] pair i = ids[off[i] .. off[i+1])
 *   prompt, winner_text, loser_text            strings [n]  prompt as in its file; responses decoded
 *   source                                     strings [n]  "harmful" or "benign"
 *   category                                   strings [n]  the category column, else the source
 *   source_row                                 I64 [n]      0-based data row in the source file
 *   ref_winner, ref_loser                      F32 [n]      reference log-probs (quantized model,
 *                                                           no adapter), summed over the response
 *   root attributes: format = "resafe-patchset", format_version = 1, counts and provenance.
 *
 * prompt ids are what both models were fed (chat template applied); a response is the generated
 * ids, the stop id included when it was reached. Sequence i for DPO = prompt + response. */
#ifndef RESAFE_PATCHSET_H
#define RESAFE_PATCHSET_H

#include "resafe/dpo.h"

#define RS_PATCHSET_FORMAT "resafe-patchset"
#define RS_PATCHSET_VERSION 1

/* Fill set from a patch set: chosen = prompt + winner, rejected = prompt + loser (n_prompt = the
 * prompt's length), ref_chosen/ref_rejected from the stored reference (has_ref = 1). Every
 * dataset is checked (presence, dtype, shapes, offsets from 0, non-decreasing, ending at the ids'
 * length, non-empty prompts and responses, ids >= 0, finite references <= 0); a bad file gives
 * -1 + one line naming the file and the dataset. */
int rs_patchset_load(const char *path, rs_pref_set *set);
/* Warn when model_dir is not the quantized model the patch set's reference was computed on
 * (its 'quantized_model' attribute, compared as real paths): the stored reference log-probs are
 * then another model's. Nothing is refused: a copied or moved model is the same model. */
void rs_patchset_check_model(const char *path, const char *model_dir);

#endif
