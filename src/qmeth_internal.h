/* qmeth_internal: the pieces shared by the calibrated quantizers (gptq.c, awq.c) and their
 * driver (quantize_model.c). Not a public interface. */
#ifndef RESAFE_QMETH_INTERNAL_H
#define RESAFE_QMETH_INTERNAL_H

#include "resafe/quant_methods.h"

/* The integer grid of one group (RS_QFMT_INT): code = clamp(rint(w / scale) + zero, lo, hi),
 * value = (code - zero) * scale (fp32, as rs_dequantize computes it). Asymmetric: zero the
 * integer zero point, [lo, hi] = [0, 2^bits - 1]. Symmetric: zero = 2^(bits-1) (the code
 * offset of quant.h), [lo, hi] = [1, 2^bits - 1]. */
typedef struct {
    float scale, zero;
    int lo, hi;
} rs_qgrid;

/* Grid of the entries x[0..n) (stride 1) not masked (mask may be NULL), with the range shrunk
 * by clip (1 = none): asymmetric over [min(x, 0), max(x, 0)], symmetric over max |x|. A group
 * with nothing left, or of zeros, gets scale 1. */
rs_qgrid rs_qgrid_fit(const double *x, const uint8_t *mask, int n, int bits, int symmetric,
                      double clip);
int rs_qgrid_code(const rs_qgrid *g, double w);
float rs_qgrid_value(const rs_qgrid *g, int code);

/* Calibration statistics of one linear's input: H = sum_x x x^T [in, in] over the calibration
 * tokens (double), mean_abs[in] = mean |x|, n_tokens. */
typedef struct {
    int in;
    long n_tokens;
    double *H;
    double *mean_abs;
} rs_calib_stats;

/* Output error ||(Wq - W) X||^2 = sum_r d_r H d_r^T (d_r = row r of Wq - W), and ||W X||^2. */
double rs_output_err2(const float *wq, const float *w, int rows, const rs_calib_stats *st);

/* Quantize one linear W [rows, cols] with calibration statistics into out (host). mask
 * (optional): protected entries, kept in fp16 in the critical side matrix. */
int rs_gptq_linear(const float *w, int rows, int cols, const rs_calib_stats *st,
                   const uint8_t *mask, const rs_quant_opts *o, rs_qweight *out);
int rs_awq_linear(const float *w, int rows, int cols, const rs_calib_stats *st, const uint8_t *mask,
                  const rs_quant_opts *o, rs_qweight *out);

/* Build the rs_qweight from codes/scales/zeros and attach the protected entries (fp16 of
 * w_orig at mask) and input_scale (may be NULL). */
int rs_qweight_assemble(const rs_qspec *spec, int rows, int cols, const uint8_t *codes,
                        const float *scales, const float *zeros, const float *input_scale,
                        const uint8_t *mask, const float *w_orig, rs_qweight *out);

#endif
