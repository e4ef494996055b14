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
    const void *data; /* points into the mapped file */
    size_t nbytes;
    int file_index;   /* which shard */
} rs_st_tensor;

typedef struct {
    int n_files;
    char **paths;  /* [n_files] */
    void **maps;   /* [n_files] mmap base (NULL for empty mapping) */
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
 * across shards. Returns 0, or -1 with a message naming the file and the problem. */
int rs_st_open(const char *path, rs_st_set *set);
void rs_st_close(rs_st_set *set);
/* Binary search by name; NULL when absent. */
const rs_st_tensor *rs_st_find(const rs_st_set *set, const char *name);

/* Parse a header from memory (the whole file image: 8-byte length + JSON + data).
 * Used by rs_st_open and by the fuzz target. `label` names the file in messages.
 * On success tensors point into buf. */
int rs_st_parse(const char *label, const void *buf, size_t size, rs_st_set *set);

/* Copy a tensor to fp32 (F32/F16/BF16/F64 sources), checking numel. */
int rs_st_read_f32(const rs_st_tensor *t, float *dst, size_t numel);

/* Writing: tensors given as host buffers; written to a temporary name and renamed. */
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
