/* quant_check: validation of a quantized weight read from a file (every array against the
 * geometry its spec implies), so a malformed file fails with one line instead of a crash. */
#include "resafe/quant.h"

#include <math.h>
#include <stdlib.h>

static int f16_finite(uint16_t h) { return (h & 0x7c00) != 0x7c00; }

static int check_codes(const rs_qweight *q, const char *label) {
    size_t rb = rs_qpack_row_bytes(q->cols, q->spec.bits);
    for (int r = 0; r < q->rows; r++)
        if (!rs_qpack_row_padding_zero(q->packed + (size_t)r * rb, q->cols, q->spec.bits))
            return RS_FAIL("%s.qweight: row %d has nonzero padding codes", label, r);
    return 0;
}

static int check_scales(const rs_qweight *q, const char *label) {
    size_t ng = (size_t)q->rows * q->n_groups;
    int codebook = q->spec.format == RS_QFMT_NF4 || q->spec.format == RS_QFMT_FP4;
    float qmax = (float)((1 << q->spec.bits) - 1);
    for (size_t i = 0; i < ng; i++) {
        if (!isfinite(q->scales[i]) || (codebook && q->scales[i] < 0.0f))
            return RS_FAIL("%s.scales: entry %zu is %g (must be finite%s)", label, i, q->scales[i],
                           codebook ? " and >= 0" : "");
        if (q->zeros && q->spec.float_zeros && !isfinite(q->zeros[i]))
            return RS_FAIL("%s.zeros: entry %zu is %g (must be finite)", label, i, q->zeros[i]);
        if (q->zeros && !q->spec.float_zeros &&
            (!(q->zeros[i] >= 0.0f && q->zeros[i] <= qmax) || q->zeros[i] != rintf(q->zeros[i])))
            return RS_FAIL("%s.zeros: entry %zu is %g (must be an integer in [0, %g])", label, i,
                           q->zeros[i], qmax);
    }
    if (q->input_scale)
        for (int c = 0; c < q->cols; c++)
            if (!isfinite(q->input_scale[c]) || !(q->input_scale[c] > 0.0f))
                return RS_FAIL("%s.input_scale: entry %d is %g (must be positive and finite)",
                               label, c, q->input_scale[c]);
    return 0;
}

static int check_outliers(const rs_qweight *q, const char *label) {
    if (q->n_outlier_cols < 0 || q->n_outlier_cols > q->cols)
        return RS_FAIL("%s.outlier_cols: %d columns for a weight of %d", label, q->n_outlier_cols,
                       q->cols);
    if (q->n_outlier_cols && q->spec.format != RS_QFMT_INT8_OUTLIER)
        return RS_FAIL("%s.outlier_cols: outlier columns only exist in the int8 format", label);
    for (int j = 0; j < q->n_outlier_cols; j++) {
        int c = q->outlier_cols[j];
        if (c < 0 || c >= q->cols || (j && c <= q->outlier_cols[j - 1]))
            return RS_FAIL("%s.outlier_cols: entry %d (%d) is out of range or not ascending", label,
                           j, c);
    }
    for (size_t i = 0; i < (size_t)q->rows * q->n_outlier_cols; i++)
        if (!f16_finite(q->outlier_vals[i]))
            return RS_FAIL("%s.outlier_vals: entry %zu is not finite", label, i);
    return 0;
}

static int check_critical(const rs_qweight *q, const char *label) {
    if (!q->crit_row_ptr)
        return q->n_critical ? RS_FAIL("%s: critical entries without row_ptr", label) : 0;
    if (q->crit_row_ptr[0] != 0 || q->crit_row_ptr[q->rows] != q->n_critical)
        return RS_FAIL("%s.crit_row_ptr: must start at 0 and end at %lld", label,
                       (long long)q->n_critical);
    for (int r = 0; r < q->rows; r++) {
        int64_t a = q->crit_row_ptr[r], b = q->crit_row_ptr[r + 1];
        if (b < a || b > q->n_critical || b - a > q->cols)
            return RS_FAIL("%s.crit_row_ptr: not monotone or out of range at row %d", label, r);
        for (int64_t k = a; k < b; k++) {
            int c = q->crit_cols[k];
            if (c < 0 || c >= q->cols || (k > a && c <= q->crit_cols[k - 1]))
                return RS_FAIL("%s.crit_cols: entry %lld (%d) of row %d is out of range or not "
                               "ascending",
                               label, (long long)k, c, r);
            if (!f16_finite(q->crit_vals[k]))
                return RS_FAIL("%s.crit_vals: entry %lld is not finite", label, (long long)k);
        }
    }
    return 0;
}

int rs_qweight_check(const rs_qweight *q, const char *label) {
    rs_qweight want;
    if (rs_qweight_init(&want, &q->spec, q->rows, q->cols) != 0)
        return rs_fail_context("%s", label);
    if (want.group_size != q->group_size || want.n_groups != q->n_groups ||
        want.packed_bytes != q->packed_bytes)
        return RS_FAIL(
            "%s: geometry (group %d, %d groups, %zu packed bytes) does not match the spec "
            "(group %d, %d groups, %zu bytes)",
            label, q->group_size, q->n_groups, q->packed_bytes, want.group_size, want.n_groups,
            want.packed_bytes);
    int need_zeros = q->spec.format == RS_QFMT_INT && !q->spec.symmetric;
    if (!q->packed || !q->scales || (need_zeros && !q->zeros))
        return RS_FAIL("%s: missing %s", label,
                       !q->packed   ? "qweight"
                       : !q->scales ? "scales"
                                    : "zeros");
    if (!need_zeros && q->zeros)
        return RS_FAIL("%s.zeros: present for a format without zero points", label);
    if (check_codes(q, label) || check_scales(q, label) || check_outliers(q, label) ||
        check_critical(q, label))
        return -1;
    return 0;
}
