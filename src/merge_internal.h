/* merge_internal: the per-linear folds of the merge stage (merge_fold.c), used by merge.c. */
#ifndef RESAFE_MERGE_INTERNAL_H
#define RESAFE_MERGE_INTERNAL_H

#include "resafe/backend.h"
#include "resafe/pipeline.h"
#include "resafe/quant.h"

typedef struct {
    double dd, rd, ee; /* ||delta||^2, <realized, delta>, ||realized - delta||^2 */
    long codes_changed;
} rs_merge_sums;

/* out = Q0 with delta folded in by mode (grid, refit or exact); host weights. */
int rs_merge_fold(rs_merge_mode mode, const rs_qweight *q0, const double *delta, rs_qweight *out);
/* 0, or -1 + "merge exact needs a grouped INT format" naming label. */
int rs_merge_exact_supported(const rs_qweight *q, const char *label);
/* Add one linear's sums (realized = dequant(q1) - dequant(q0); codes compared position-wise). */
void rs_merge_accumulate(const rs_qweight *q0, const rs_qweight *q1, const double *delta,
                         rs_merge_sums *s);

#endif
