/* quant: quantized weight formats, packing, RTN, dequantization (DESIGN.md section 3).
 *
 * A quantized linear weight W [rows = out, cols = in] is stored as
 *   - integer codes, grouped along the input dimension (group_size 32/64/128, or 0 = the whole
 *     row, "per-channel"), bits 2, 3, 4 or 8:
 *       asymmetric: w = (q - zero) * scale,  q in [0, 2^bits - 1], zero an integer in that range
 *       symmetric:  w = q * scale,           q in [-(2^(bits-1) - 1), 2^(bits-1) - 1]
 *   - codebook formats NF4 / FP4 (bitsandbytes): blocks of 64 consecutive entries of a row,
 *     w = codebook[q] * absmax(block); q in [0, 15];
 *   - int8 with outliers (LLM.int8-style): int8 per-row absmax for the ordinary columns, the
 *     outlier columns (any |w| above a threshold) kept in fp16 beside.
 * Optional extras of any format:
 *   - input_scale [cols] (AWQ): the quantized matrix is of W * diag(input_scale), and the layer
 *     computes y = (x / input_scale) W_q^T;
 *   - critical entries (SNIP protection): a sparse CSR side matrix of fp16 values that REPLACE the
 *     quantized entries at their positions (those entries were left out of the scale search).
 *
 * Codes are held packed (layout in src/quant_pack.c, chosen for the CUDA kernels, documented
 * there); rs_qweight_unpack gives the canonical [rows, cols] code view for tests and export.
 * All arrays live in the memory of the backend that owns the weight (host memory for cpu). */
#ifndef RESAFE_QUANT_H
#define RESAFE_QUANT_H

#include "resafe/core.h"

typedef enum {
    RS_QFMT_INT = 0,     /* grouped integer, bits 2/3/4/8, symmetric or asymmetric */
    RS_QFMT_NF4,         /* bitsandbytes NormalFloat4, absmax blocks of 64 */
    RS_QFMT_FP4,         /* bitsandbytes FP4 (e2m1), absmax blocks of 64 */
    RS_QFMT_INT8_OUTLIER /* int8 per-row absmax + fp16 outlier columns */
} rs_qformat;

typedef struct {
    rs_qformat format;
    int bits;                /* 2, 3, 4, 8 for RS_QFMT_INT; 4 for NF4/FP4; 8 for INT8_OUTLIER */
    int group_size;          /* RS_QFMT_INT: 32, 64, 128, or 0 = whole row; NF4/FP4: 64 */
    int symmetric;           /* RS_QFMT_INT only */
    float outlier_threshold; /* RS_QFMT_INT8_OUTLIER: |w| above it makes a column an outlier */
    int float_zeros;         /* asymmetric INT: zero points may be any finite value, not only
                              * integers in [0, 2^bits - 1] (`resafe merge --mode exact` folds a
                              * group constant into them); quantization_config "zero_point":
                              * "float" */
} rs_qspec;

typedef struct rs_qweight {
    rs_qspec spec;
    int rows, cols;
    int group_size;         /* effective: cols when spec.group_size == 0, 64 for NF4/FP4 */
    int n_groups;           /* per row: ceil(cols / group_size) */
    uint8_t *packed;        /* packed codes */
    size_t packed_bytes;
    float *scales;          /* [rows, n_groups] (absmax per block for NF4/FP4, per row for int8) */
    float *zeros;           /* [rows, n_groups] integer zero points as floats; NULL if symmetric */
    float *input_scale;     /* [cols] AWQ scales, or NULL */
    int n_outlier_cols;     /* INT8_OUTLIER */
    int32_t *outlier_cols;  /* [n_outlier_cols] ascending */
    uint16_t *outlier_vals; /* [rows, n_outlier_cols] fp16 */
    int64_t n_critical;     /* protected entries (CSR) */
    int64_t *crit_row_ptr;  /* [rows + 1] */
    int32_t *crit_cols;     /* [n_critical], ascending within a row */
    uint16_t *crit_vals;    /* [n_critical] fp16 */
} rs_qweight;

/* "int4-g128-asym" style names for messages and manifests. */
const char *rs_qspec_name(const rs_qspec *spec, char *buf, size_t n);
/* Validate a spec (bits/group/format combinations): 0, or -1 + message. */
int rs_qspec_check(const rs_qspec *spec);

/* Round-to-nearest quantization of a host fp32 matrix into a host rs_qweight. NaN/Inf in w is
 * an error naming the row and column. protect (optional, [rows, cols] uint8): entries kept
 * exactly (fp16) in the critical side matrix and left out of their group's scale/zero.
 * input_scale (optional, [cols]): quantize W * diag(input_scale) (AWQ). */
int rs_quantize_rtn(const float *w, int rows, int cols, const rs_qspec *spec,
                    const uint8_t *protect, const float *input_scale, rs_qweight *out);
/* Build from canonical codes (GPTQ computes its own codes and scales): codes [rows, cols]
 * (unsigned code values as stored: symmetric codes offset by 2^(bits-1)), scales/zeros
 * [rows, n_groups]. Copies everything. */
int rs_qweight_from_codes(const rs_qspec *spec, int rows, int cols, const uint8_t *codes,
                          const float *scales, const float *zeros, rs_qweight *out);
/* The effective fp32 weight [rows, cols] (input_scale divided back out, critical entries and
 * outliers in place): what the quantized layer multiplies by. Host weights only. */
int rs_dequantize(const rs_qweight *q, float *w);
/* Canonical codes [rows, cols] from the packed store (host). */
void rs_qweight_unpack(const rs_qweight *q, uint8_t *codes);
void rs_qweight_free(rs_qweight *q); /* host weights */
/* Bytes of the quantized representation (packed codes, scales, zeros, extras) and of the
 * critical side matrix alone, for the size report. */
size_t rs_qweight_bytes(const rs_qweight *q);
size_t rs_qweight_critical_bytes(const rs_qweight *q);

/* ---- additions (quant branch) */
/* bitsandbytes' published codebooks, indexed by code. */
extern const float rs_nf4_codebook[16];
extern const float rs_fp4_codebook[16];
/* The INT8_OUTLIER threshold in effect (outlier_threshold <= 0 means the default 6.0). */
float rs_qspec_threshold(const rs_qspec *spec);
/* Zero *q and fill spec, rows, cols, group_size, n_groups, packed_bytes (no arrays). */
int rs_qweight_init(rs_qweight *q, const rs_qspec *spec, int rows, int cols);
/* Row r of the effective weight (what rs_dequantize gives) into out[cols]; codes: cols bytes of
 * scratch. Host weights only. */
void rs_dequantize_row(const rs_qweight *q, int r, uint8_t *codes, float *out);
/* Validate a host weight's arrays (geometry, code range and padding, finite scales, integer
 * zeros in range, positive input_scale, outlier columns and CSR sorted and in range, finite fp16
 * values): 0, or -1 + one line naming `label` and the offending array. */
int rs_qweight_check(const rs_qweight *q, const char *label);

/* Packing (src/quant_pack.c documents the layout): per row a little-endian bit stream of codes,
 * padded to a multiple of 32 codes. */
#define RS_QPACK_VERSION 1
size_t rs_qpack_row_bytes(int cols, int bits);
void rs_qpack_row(uint8_t *dst, const uint8_t *codes, int cols, int bits);
void rs_qunpack_row(uint8_t *codes, const uint8_t *src, int cols, int bits);
int rs_qpack_row_padding_zero(const uint8_t *src, int cols, int bits);

#endif
