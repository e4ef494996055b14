/* Buffers for the GPU op tests (test_backend_gpu.c, test_backend_gpu_train.c): random inputs
 * rounded to bf16 so both backends see the same values, NaN-poisoned outputs, uploads and
 * downloads through a backend's fp32 conversions. */
#ifndef RESAFE_GPU_TEST_BUFFERS_H
#define RESAFE_GPU_TEST_BUFFERS_H

#include <math.h>
#include <stdlib.h>

#include "resafe/backend.h"

static inline float round_bf16(float x) { return rs_bf16_to_f32(rs_f32_to_bf16(x)); }

/* n normal values of mean mu and standard deviation sd, rounded to bf16. */
static inline float *random_bf16(rs_rng *r, size_t n, float mu, float sd) {
    float *x = rs_malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = round_bf16(mu + sd * rs_rng_normal(r));
    return x;
}

static inline float *nan_array(size_t n) {
    float *x = rs_malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = NAN;
    return x;
}

/* Device buffer of n values of dtype t, filled from fp32 host values. */
static inline void *upload(const rs_backend *be, rs_dtype t, const float *host, size_t n) {
    void *p = be->alloc((n ? n : 1) * rs_dtype_size(t));
    be->upload_f32(p, t, host, n);
    return p;
}

/* Device buffer of n values of dtype t, filled with NaN (an output to be written). */
static inline void *upload_nan(const rs_backend *be, rs_dtype t, size_t n) {
    float *h = nan_array(n);
    void *p = upload(be, t, h, n);
    free(h);
    return p;
}

static inline void *upload_bytes(const rs_backend *be, const void *host, size_t bytes) {
    void *p = be->alloc(bytes ? bytes : 1);
    be->to_device(p, host, bytes);
    return p;
}

static inline float *download(const rs_backend *be, const void *p, rs_dtype t, size_t n) {
    float *h = rs_malloc((n ? n : 1) * sizeof(float));
    be->download_f32(h, p, t, n);
    return h;
}

#endif
