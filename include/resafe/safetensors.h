/* safetensors: read (mmap, sharded index) and write (atomic) Hugging Face safetensors files.
 * Format: 8-byte little-endian header length N, N bytes of JSON header
 * {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
 * then the data section; offsets are relative to the data section. */
#ifndef RESAFE_SAFETENSORS_H
#define RESAFE_SAFETENSORS_H

#include "resafe/core.h"

typedef struct {
    char *name;
    rs_dtype dtype;
    int ndim;
    int64_t shape[RS_MAX_DIMS];
    const void *data; /* points into the mapped file; not necessarily aligned to the element
                       * size (files from other writers): read through memcpy/rs_st_read_f32 */
    size_t nbytes;
    int file_index;   /* which shard */
} rs_st_tensor;

typedef struct {
    int n_files;
    char **paths;  /* [n_files] */
    void **maps;   /* [n_files] mmap base (NULL when not ours to unmap: rs_st_parse) */
    size_t *sizes; /* [n_files] */
    int n_tensors;
    rs_st_tensor *tensors; /* sorted by name */
    int n_meta;            /* __metadata__ of the first file (string values only) */
    char **meta_keys, **meta_values;
} rs_st_set;

/* Open one .safetensors file, or a model directory (model.safetensors, or the shards named by
 * model.safetensors.index.json, whose weight_map must agree with the shards' contents).
 * Validates everything: header length, JSON, dtypes, shapes (product overflow), offsets inside
 * the data section, offsets consistent with shape*dtype size, no overlaps, no duplicate names
 * across shards. As the reference reader does, the tensors of a file must tile its data section
 * exactly (no gap, no bytes left over). `path` may also name an index .json file directly.
 * Returns 0, or -1 with a message naming the file and the problem (set is then empty; closing
 * it is harmless). */
int rs_st_open(const char *path, rs_st_set *set);
void rs_st_close(rs_st_set *set);
/* Binary search by name; NULL when absent. */
const rs_st_tensor *rs_st_find(const rs_st_set *set, const char *name);
/* Number of elements (1 for a 0-d tensor); cannot overflow: checked when the file was read. */
int64_t rs_st_numel(const rs_st_tensor *t);

/* Parse a header from memory (the whole file image: 8-byte length + JSON + data).
 * Used by rs_st_open and by the fuzz target. `label` names the file in messages.
 * On success tensors point into buf, which must outlive the set. */
int rs_st_parse(const char *label, const void *buf, size_t size, rs_st_set *set);

/* Copy a tensor to fp32 (F32/F16/BF16/F64 sources), checking numel. */
int rs_st_read_f32(const rs_st_tensor *t, float *dst, size_t numel);

/* Writing: tensors given as host buffers; written to a temporary name and renamed. Data is laid
 * out like the reference writer (larger dtypes first, then by name; header padded with spaces to
 * a multiple of 8) so every tensor is aligned to its element size. Names must be unique. */
typedef struct {
    const char *name;
    rs_dtype dtype;
    int ndim;
    int64_t shape[RS_MAX_DIMS];
    const void *data;
} rs_st_write_tensor;
int rs_st_write(const char *path, const rs_st_write_tensor *tensors, int n,
                const char *const *meta_keys, const char *const *meta_values, int n_meta);

#endif
