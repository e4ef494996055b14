/* h5store: a small HDF5 store for resafe's artifacts (patch sets, adapters, masks, optimizer
 * state, checkpoints): one file per artifact, datasets named after tensors at slash paths
 * ("lora/layers.0.q_proj/A", intermediate groups made on the way), attributes for config and
 * provenance. Files are plain HDF5 (format 1.8+), readable with h5py and h5dump.
 *
 * A file being written lives at rs_tmp_name(path) until rs_h5_commit renames it into place;
 * rs_h5_close without a commit removes it, so an interrupted run never leaves a file that looks
 * finished. Every failure records one message naming the file and the dataset or attribute
 * (HDF5's own error stack printing is switched off; its innermost reason is appended). */
#ifndef RESAFE_H5STORE_H
#define RESAFE_H5STORE_H

#include "resafe/core.h"

typedef struct rs_h5 rs_h5; /* an open file */

typedef enum {
    RS_H5_NUMBERS = 0, /* dtype F32, F64, I8, I16, I32, I64 or U8 */
    RS_H5_STRINGS,     /* 1-d (or scalar) strings, variable or fixed length */
    RS_H5_OTHER        /* anything else (compound, enum/bool, f16, > RS_MAX_DIMS dims, ...) */
} rs_h5_kind;

typedef struct {
    char *path; /* "group/name" without a leading '/'; set by rs_h5_list only */
    rs_h5_kind kind;
    rs_dtype dtype; /* meaningful for RS_H5_NUMBERS */
    int ndim;       /* 0 for a scalar */
    int64_t shape[RS_MAX_DIMS];
} rs_h5_dataset;

/* ---- files */
/* Create path for writing (at a temporary name; see rs_h5_commit). *out on success. */
int rs_h5_create(const char *path, rs_h5 **out);
/* Open an existing file read-only. */
int rs_h5_open(const char *path, rs_h5 **out);
/* Finish a file being written: close it, fsync, rename it to its final name. Frees h, also on
 * failure (then the temporary is removed). */
int rs_h5_commit(rs_h5 *h);
/* Close h and free it; a file being written and not committed is discarded. NULL is fine. */
void rs_h5_close(rs_h5 *h);
const char *rs_h5_path(const rs_h5 *h); /* the final path, as given */

/* ---- writing (files from rs_h5_create). Paths are relative to the root: "a/b/c". Writing a
 * dataset that exists is an error. */
int rs_h5_create_group(rs_h5 *h, const char *group); /* with parents; existing is fine */
/* Numbers: dtype F32, F64, I8, I16, I32, I64 or U8; ndim 0 (scalar) .. RS_MAX_DIMS; C order. */
int rs_h5_write(rs_h5 *h, const char *dataset, rs_dtype dtype, int ndim, const int64_t *shape,
                const void *data);
/* A 1-d dataset of n variable-length UTF-8 strings (h5py reads it with .asstr()). */
int rs_h5_write_strings(rs_h5 *h, const char *dataset, const char *const *strings, int64_t n);

/* ---- reading (also works on a file being written) */
int rs_h5_exists(rs_h5 *h, const char *object); /* 1 exists, 0 not (or a malformed path) */
/* Kind, dtype and shape of one dataset (info->path is set to NULL). */
int rs_h5_info(rs_h5 *h, const char *dataset, rs_h5_dataset *info);
/* All datasets of the file, depth first, by name; free with rs_h5_free_list. */
int rs_h5_list(rs_h5 *h, rs_h5_dataset **datasets, int *n);
void rs_h5_free_list(rs_h5_dataset *datasets, int n);
/* Read a numeric dataset into dst; its dtype and shape must be exactly dtype and shape. */
int rs_h5_read(rs_h5 *h, const char *dataset, rs_dtype dtype, int ndim, const int64_t *shape,
               void *dst);
/* Read a string dataset: *strings[*n], each NUL-terminated; free with rs_h5_free_strings. */
int rs_h5_read_strings(rs_h5 *h, const char *dataset, char ***strings, int64_t *n);
void rs_h5_free_strings(char **strings, int64_t n);

/* ---- attributes, on the root (object NULL, "" or "/") or any group or dataset. Setting one
 * that exists replaces it. Strings are stored as variable-length UTF-8 scalars, like h5py. */
int rs_h5_set_attr_str(rs_h5 *h, const char *object, const char *name, const char *value);
int rs_h5_set_attr_i64(rs_h5 *h, const char *object, const char *name, int64_t value);
int rs_h5_set_attr_f64(rs_h5 *h, const char *object, const char *name, double value);
/* Getters check the stored type: a string, an integer (any width, fits int64), a number. */
int rs_h5_get_attr_str(rs_h5 *h, const char *object, const char *name, char **value); /* free */
int rs_h5_get_attr_i64(rs_h5 *h, const char *object, const char *name, int64_t *value);
int rs_h5_get_attr_f64(rs_h5 *h, const char *object, const char *name, double *value);
int rs_h5_has_attr(rs_h5 *h, const char *object, const char *name); /* 1, 0, or -1 (error) */
/* Names of the object's attributes, by name; free with rs_h5_free_strings(names, n). */
int rs_h5_attr_names(rs_h5 *h, const char *object, char ***names, int *n);

#endif
