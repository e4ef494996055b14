/* qmm_tool: the CUDA quantized matmul paths against a float64 reference, and their timings.
 *
 *   qmm_tool check FMT BITS GROUP SYM SEED M N K [awq] [floatzero] [crit]
 *       Random W [N, K] quantized by RTN (FMT int|nf4|fp4|int8o), random x [M, K] and dout
 *       [M, N] (bf16 values); prints one line of relative errors (max |y - ref| / max |ref|)
 *       of the fused kernel and of the dequantize-then-cuBLAS path against the float64 product
 *       with rs_dequantize's effective weight, for beta 0 (output poisoned with NaN first) and
 *       beta 1 with a bias, and of the input gradient (qmatmul_t). awq: a random input_scale;
 *       floatzero: zero points moved off the integers (float_zeros); crit: ~1% critical entries.
 *       Also "dequant D": the scratch path's dequantizer (rs_cuda_qdequant_last_kernel), and
 *       "dqhash H", "dqhash1 H1": 52-bit hashes of the dequantized bf16 weight's bytes by that
 *       dequantizer and by dequantizer 1 (the former default; which ran: "dqkernel1 D1").
 *   qmm_tool bench FMT BITS GROUP SYM N K M[,M...] [sweep] [dgrad]
 *       One JSON line per M: microseconds of cuBLAS bf16 on the dense weight, of the fused
 *       kernel (heuristic launch; with sweep also every NT x split-K), of the scratch path, of
 *       the dequantizer alone (first M only) and (dgrad) of the input gradient against cuBLAS's.
 *       Each timing is a CUDA graph of many calls cycling through enough weight copies to
 *       defeat the 50 MB L2.
 *   qmm_tool roofline
 *       Device-to-device copy bandwidth (GB/s) and cuBLAS bf16 GEMM TFLOP/s (8192^3).
 *   qmm_tool probe N K M[,M...]
 *       W4 g128: the fused kernel's timing probes (what bounds it), one JSON line each.
 *   qmm_tool attn B T H HKV D
 *       The causal attention forward and backward (the backend ops, a training shape: B
 *       sequences of T tokens, H query and HKV kv heads of width D) under each
 *       RESAFE_CUDA_ATTENTION mode (gemm, flash, fused): one JSON line per mode, microseconds
 *       per call (stream events around 10 calls after 2 warm-up calls).
 * Env RESAFE_QMM_PROBE=depth,probe,blocks_per_sm,reduce sets a probe launch (rs_cuda_qmm_probe)
 * before any command: check then tests it (e.g. "1,1,0,0", the load-only probe: wrong values).
 * Exit 77 when there is no GPU (tests skip). */
#include "resafe/backend.h"
#include "resafe/core.h"
#include "resafe/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef RS_HAVE_CUDA
#include "resafe/cuda_qmm.h"
#include <cuda_runtime.h>

static const rs_backend *g_be;

static void spec_from_args(char **a, rs_qspec *sp) {
    memset(sp, 0, sizeof *sp);
    if (strcmp(a[0], "nf4") == 0)
        sp->format = RS_QFMT_NF4;
    else if (strcmp(a[0], "fp4") == 0)
        sp->format = RS_QFMT_FP4;
    else if (strcmp(a[0], "int8o") == 0)
        sp->format = RS_QFMT_INT8_OUTLIER;
    else
        RS_CHECK(strcmp(a[0], "int") == 0, "qmm_tool: unknown format %s", a[0]);
    sp->bits = atoi(a[1]);
    sp->group_size = atoi(a[2]);
    sp->symmetric = atoi(a[3]);
    if (sp->format == RS_QFMT_NF4 || sp->format == RS_QFMT_FP4) sp->bits = 4, sp->group_size = 64;
    if (sp->format == RS_QFMT_INT8_OUTLIER)
        sp->bits = 8, sp->group_size = 0, sp->outlier_threshold = 2.5f;
    if (rs_qspec_check(sp) != 0) rs_die_last();
}

static float bf16_round(float v) { return rs_bf16_to_f32(rs_f32_to_bf16(v)); }

static void fill_normal(rs_rng *r, float *v, size_t n, float scale, int round_bf16) {
    for (size_t i = 0; i < n; i++) {
        v[i] = rs_rng_normal(r) * scale;
        if (round_bf16) v[i] = bf16_round(v[i]);
    }
}

static void *dev_upload(const float *h, size_t n) {
    void *d = g_be->alloc(n * 2);
    g_be->upload_f32(d, RS_BF16, h, n);
    return d;
}

static double max_abs(const double *v, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(v[i]));
    return m;
}

/* max |got - ref| / max |ref| (NaN or Inf anywhere gives Inf) */
static double rel_err(const float *got, const double *ref, size_t n) {
    double e = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        e = fmax(e, fabs(got[i] - ref[i]));
    }
    double m = max_abs(ref, n);
    return m > 0.0 ? e / m : e;
}

static uint64_t fnv52(const void *p, size_t bytes) { /* FNV-1a, 52 bits: survives a float parse */
    const uint8_t *b = p;
    uint64_t hash = 1469598103934665603ull;
    for (size_t i = 0; i < bytes; i++)
        hash = (hash ^ b[i]) * 1099511628211ull;
    return hash & ((1ull << 52) - 1);
}

/* y = beta * out0 + x W^T (+ bias) on the device through the configured path; *hash: y's. */
static double run_fwd(rs_qmm_path path, const rs_qweight *dq, const float *x, const float *out0,
                      const float *bias, int M, float beta, const double *ref, uint64_t *hash) {
    const int N = dq->rows, K = dq->cols;
    size_t ny = (size_t)M * N;
    void *dx = dev_upload(x, (size_t)M * K), *dy = dev_upload(out0, ny);
    void *db = bias ? dev_upload(bias, (size_t)N) : NULL;
    rs_cuda_qmm_configure(path, 0, 0);
    g_be->qmatmul(dy, dx, dq, db, M, beta);
    float *y = rs_malloc(ny * sizeof *y);
    g_be->download_f32(y, dy, RS_BF16, ny);
    double e = rel_err(y, ref, ny);
    *hash = fnv52(y, ny * sizeof *y);
    free(y);
    g_be->free(dx), g_be->free(dy);
    if (db) g_be->free(db);
    return e;
}

/* The backend's dequantized weight (nw bf16 values) by dequantizer `which` (see
 * rs_cuda_qdequant_select; -1 the environment's), hashed: FNV-1a over its bytes, 52 bits.
 * *ran: the dequantizer that ran (rs_cuda_qdequant_last_kernel). */
static uint64_t dequant_hash(const rs_qweight *dq, size_t nw, int which, int *ran) {
    size_t bytes = nw * 2;
    uint8_t *h = rs_malloc(bytes);
    memset(h, 0xff, bytes); /* NaN: a value the dequantizer did not write shows */
    void *d = g_be->alloc(bytes);
    g_be->to_device(d, h, bytes);
    rs_cuda_qdequant_select(which);
    g_be->qdequantize(d, dq);
    *ran = rs_cuda_qdequant_last_kernel();
    rs_cuda_qdequant_select(-1);
    g_be->to_host(h, d, bytes);
    uint64_t hash = fnv52(h, bytes);
    g_be->free(d), free(h);
    return hash;
}

static int cmd_check(int argc, char **argv) {
    RS_CHECK(argc >= 10,
             "usage: qmm_tool check FMT BITS GROUP SYM SEED M N K [awq] [floatzero] [crit]");
    rs_qspec sp;
    spec_from_args(argv + 2, &sp);
    uint64_t seed = strtoull(argv[6], NULL, 10);
    int M = atoi(argv[7]), N = atoi(argv[8]), K = atoi(argv[9]), awq = 0, fz = 0, crit = 0;
    for (int i = 10; i < argc; i++) {
        if (strcmp(argv[i], "awq") == 0)
            awq = 1;
        else if (strcmp(argv[i], "floatzero") == 0)
            fz = 1;
        else if (strcmp(argv[i], "crit") == 0)
            crit = 1;
        else
            RS_DIE("qmm_tool: unknown option %s", argv[i]);
    }
    rs_rng r;
    rs_rng_seed(&r, seed);
    size_t nw = (size_t)N * K;
    float *w = rs_malloc(nw * sizeof *w), *x = rs_malloc((size_t)M * K * sizeof *x);
    float *dout = rs_malloc((size_t)M * N * sizeof *dout),
          *bias = rs_malloc((size_t)N * sizeof *bias);
    float *out0 = rs_malloc((size_t)M * N * sizeof *out0),
          *nan0 = rs_malloc((size_t)M * N * sizeof *nan0);
    fill_normal(&r, w, nw, 0.05f, 0);
    if (sp.format == RS_QFMT_INT8_OUTLIER)
        for (size_t i = 0; i < nw; i += 97)
            w[i] *= 80.0f; /* some outlier columns */
    fill_normal(&r, x, (size_t)M * K, 1.0f, 1);
    fill_normal(&r, dout, (size_t)M * N, 1.0f, 1);
    fill_normal(&r, bias, (size_t)N, 1.0f, 1);
    fill_normal(&r, out0, (size_t)M * N, 1.0f, 1);
    for (size_t i = 0; i < (size_t)M * N; i++)
        nan0[i] = NAN;
    float *in_scale = NULL;
    if (awq) {
        in_scale = rs_malloc((size_t)K * sizeof *in_scale);
        for (int k = 0; k < K; k++)
            in_scale[k] = 0.5f + 1.5f * rs_rng_uniform(&r);
    }
    uint8_t *protect = NULL;
    if (crit) {
        protect = rs_malloc(nw);
        for (size_t i = 0; i < nw; i++)
            protect[i] = rs_rng_uniform(&r) < 0.01f;
    }
    if (fz) sp.float_zeros = 1;
    rs_qweight q;
    if (rs_quantize_rtn(w, N, K, &sp, protect, in_scale, &q) != 0) rs_die_last();
    if (fz && q.zeros)
        for (size_t i = 0; i < (size_t)N * q.n_groups; i++)
            q.zeros[i] += 0.25f + 0.5f * rs_rng_uniform(&r);
    float *weff = rs_malloc(nw * sizeof *weff);
    if (rs_dequantize(&q, weff) != 0) rs_die_last();

    double *ref0 = rs_malloc((size_t)M * N * sizeof *ref0),
           *ref1 = rs_malloc((size_t)M * N * sizeof *ref1);
    double *refdx = rs_malloc((size_t)M * K * sizeof *refdx);
#pragma omp parallel for collapse(2)
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0.0;
            for (int k = 0; k < K; k++)
                s += (double)x[(size_t)m * K + k] * weff[(size_t)n * K + k];
            ref0[(size_t)m * N + n] = s;
            ref1[(size_t)m * N + n] = s + bias[n] + out0[(size_t)m * N + n];
        }
#pragma omp parallel for collapse(2)
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) {
            double s = 0.0;
            for (int n = 0; n < N; n++)
                s += (double)dout[(size_t)m * N + n] * weff[(size_t)n * K + k];
            refdx[(size_t)m * K + k] = s;
        }

    rs_qweight dq;
    if (g_be->qweight_upload(&dq, &q) != 0) rs_die_last();
    int sup = rs_cuda_qmm_fused_supported(&dq);
    uint64_t fh0, fh1, sh;
    double f0 = run_fwd(RS_QMM_FUSED, &dq, x, nan0, NULL, M, 0.0f, ref0, &fh0);
    double s0 = run_fwd(RS_QMM_SCRATCH, &dq, x, nan0, NULL, M, 0.0f, ref0, &sh);
    double f1 = run_fwd(RS_QMM_FUSED, &dq, x, out0, bias, M, 1.0f, ref1, &fh1);
    const int fkernel = rs_cuda_qmm_last_kernel();
    double s1 = run_fwd(RS_QMM_SCRATCH, &dq, x, out0, bias, M, 1.0f, ref1, &sh);
    const int dequant = rs_cuda_qdequant_last_kernel();
    /* the dequantized bf16 weight itself (buffer poisoned with NaN first) by the dequantizer the
     * run chose and by dequantizer 1: FNV-1a hashes of its bytes, 52 bits so that they
     * survive a float parse, for bit-exact comparisons */
    int ran, ran1;
    uint64_t dqhash = dequant_hash(&dq, nw, -1, &ran), dqhash1 = dequant_hash(&dq, nw, 1, &ran1);
    void *ddout = dev_upload(dout, (size_t)M * N), *ddx;
    float *nanx = rs_malloc((size_t)M * K * sizeof *nanx),
          *gx = rs_malloc((size_t)M * K * sizeof *gx);
    for (size_t i = 0; i < (size_t)M * K; i++)
        nanx[i] = NAN;
    ddx = dev_upload(nanx, (size_t)M * K);
    g_be->qmatmul_t(ddx, ddout, &dq, M, 0.0f);
    g_be->download_f32(gx, ddx, RS_BF16, (size_t)M * K);
    double dg = rel_err(gx, refdx, (size_t)M * K);
    printf("supported %d fused0 %.4e scratch0 %.4e fused1 %.4e scratch1 %.4e dgrad %.4e "
           "dequant %d dqhash %llu dqhash1 %llu dqkernel1 %d fkernel %d fhash0 %llu fhash1 %llu\n",
           sup, f0, s0, f1, s1, dg, dequant, (unsigned long long)dqhash,
           (unsigned long long)dqhash1, ran1, sup ? fkernel : 0, (unsigned long long)fh0,
           (unsigned long long)fh1);
    g_be->free(ddout), g_be->free(ddx);
    g_be->qweight_free(&dq);
    rs_qweight_free(&q);
    free(w), free(x), free(dout), free(bias), free(out0), free(nan0), free(in_scale), free(protect);
    free(weff), free(ref0), free(ref1), free(refdx), free(nanx), free(gx);
    return 0;
}

/* ---------------------------------------------------------------- timing */
#define CU(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        RS_CHECK(e_ == cudaSuccess, "qmm_tool: %s: %s", #call, cudaGetErrorString(e_));            \
    } while (0)

typedef void (*op_fn)(void *ctx, int i);

/* Microseconds per call of op(ctx, i), i = 0..reps-1, captured into one CUDA graph on the
 * backend's stream (launch overhead excluded, as a decode loop with graphs would see it). */
static double time_op(op_fn op, void *ctx, int reps) {
    cudaStream_t s = (cudaStream_t)rs_cuda_stream_handle();
    for (int i = 0; i < 3; i++)
        op(ctx, i); /* warm: scratch growth, cuBLAS heuristics */
    g_be->synchronize();
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < reps; i++)
        op(ctx, i);
    CU(cudaStreamEndCapture(s, &graph));
    CU(cudaGraphInstantiate(&exec, graph, 0));
    CU(cudaGraphLaunch(exec, s));
    CU(cudaStreamSynchronize(s));
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    float best = 1e30f;
    for (int t = 0; t < 3; t++) {
        CU(cudaEventRecord(a, s));
        CU(cudaGraphLaunch(exec, s));
        CU(cudaEventRecord(b, s));
        CU(cudaEventSynchronize(b));
        float ms;
        CU(cudaEventElapsedTime(&ms, a, b));
        if (ms < best) best = ms;
    }
    CU(cudaEventDestroy(a));
    CU(cudaEventDestroy(b));
    CU(cudaGraphExecDestroy(exec));
    CU(cudaGraphDestroy(graph));
    return best * 1000.0 / reps;
}

#define MAX_COPIES 64
typedef struct {
    int n_copies, M, N, K;
    rs_qweight q[MAX_COPIES];
    void *w[MAX_COPIES]; /* dense bf16 */
    void *x, *y, *dy, *dx;
    rs_qmm_path path;
} bench_ctx;

static void op_dense(void *c_, int i) {
    bench_ctx *c = c_;
    g_be->linear_fwd(c->y, c->x, c->w[i % c->n_copies], NULL, c->M, c->K, c->N, 0.0f);
}
static void op_q(void *c_, int i) {
    bench_ctx *c = c_;
    g_be->qmatmul(c->y, c->x, &c->q[i % c->n_copies], NULL, c->M, 0.0f);
}
static void op_dense_dgrad(void *c_, int i) {
    bench_ctx *c = c_;
    g_be->linear_bwd(c->dx, NULL, NULL, c->dy, c->x, c->w[i % c->n_copies], c->M, c->K, c->N, 0.0f);
}
static void op_q_dgrad(void *c_, int i) {
    bench_ctx *c = c_;
    g_be->qmatmul_t(c->dx, c->dy, &c->q[i % c->n_copies], c->M, 0.0f);
}

static void op_dequant(void *c_, int i) { /* the scratch path's first half alone */
    bench_ctx *c = c_;
    g_be->qdequantize(c->w[i % c->n_copies], &c->q[i % c->n_copies]);
}

static int reps_for(double flops) { /* about 20 ms of work at 500 TFLOP/s, 20..400 calls */
    double r = 20e-3 * 500e12 / (flops > 1 ? flops : 1);
    return r < 20 ? 20 : r > 400 ? 400 : (int)r;
}

static int cmd_bench(int argc, char **argv) {
    RS_CHECK(argc >= 9, "usage: qmm_tool bench FMT BITS GROUP SYM N K M[,M...] [sweep] [dgrad]");
    rs_qspec sp;
    spec_from_args(argv + 2, &sp);
    int N = atoi(argv[6]), K = atoi(argv[7]), sweep = 0, dgrad = 0;
    for (int i = 9; i < argc; i++) {
        if (strcmp(argv[i], "sweep") == 0)
            sweep = 1;
        else if (strcmp(argv[i], "dgrad") == 0)
            dgrad = 1;
    }
    int ms[32], n_m = 0, max_m = 1;
    for (char *tok = strtok(argv[8], ","); tok && n_m < 32; tok = strtok(NULL, ","))
        ms[n_m] = atoi(tok), max_m = ms[n_m] > max_m ? ms[n_m] : max_m, n_m++;
    rs_rng r;
    rs_rng_seed(&r, 1234);
    size_t nw = (size_t)N * K;
    float *w = rs_malloc(nw * sizeof *w);
    fill_normal(&r, w, nw, 0.05f, 0);
    rs_qweight q;
    if (rs_quantize_rtn(w, N, K, &sp, NULL, NULL, &q) != 0) rs_die_last();
    bench_ctx *c = rs_calloc(1, sizeof *c);
    c->N = N, c->K = K;
    double dense_bytes = (double)nw * 2.0;
    c->n_copies = (int)ceil(256e6 / dense_bytes);
    if (c->n_copies > MAX_COPIES) c->n_copies = MAX_COPIES;
    if (c->n_copies < 2) c->n_copies = 2;
    for (int i = 0; i < c->n_copies; i++) {
        if (g_be->qweight_upload(&c->q[i], &q) != 0) rs_die_last();
        c->w[i] = dev_upload(w, nw);
    }
    size_t qbytes = rs_qweight_bytes(&q);
    float *xh = rs_malloc((size_t)max_m * (K > N ? K : N) * sizeof *xh);
    fill_normal(&r, xh, (size_t)max_m * (K > N ? K : N), 1.0f, 1);
    c->x = dev_upload(xh, (size_t)max_m * K);
    c->dy = dev_upload(xh, (size_t)max_m * N);
    c->y = g_be->alloc((size_t)max_m * N * 2);
    c->dx = g_be->alloc((size_t)max_m * K * 2);
    int sup = rs_cuda_qmm_fused_supported(&c->q[0]);
    for (int mi = 0; mi < n_m; mi++) {
        int M = c->M = ms[mi];
        double flops = 2.0 * M * (double)N * K;
        int reps = reps_for(flops);
        double t_dense = time_op(op_dense, c, reps);
        rs_cuda_qmm_configure(RS_QMM_SCRATCH, 0, 0);
        double t_scratch = time_op(op_q, c, reps);
        double t_fused = -1.0, t_best = -1.0;
        int best_nt = 0, best_split = 0;
        if (sup &&
            M <= 256) { /* the fused kernel is for few rows; past 256 it is not a contender */
            rs_cuda_qmm_configure(RS_QMM_FUSED, 0, 0);
            t_fused = time_op(op_q, c, reps);
            if (sweep) {
                static const int nts[] = {1, 2, 4}, splits[] = {1, 2, 4, 8, 16, 32};
                for (int a = 0; a < 3; a++)
                    for (int b = 0; b < 6; b++) {
                        if (splits[b] > (K + 127) / 128) continue;
                        rs_cuda_qmm_configure(RS_QMM_FUSED, nts[a], splits[b]);
                        double t = time_op(op_q, c, reps);
                        if (t_best < 0 || t < t_best)
                            t_best = t, best_nt = nts[a], best_split = splits[b];
                    }
            }
        }
        rs_cuda_qmm_configure(RS_QMM_AUTO, 0, 0);
        double t_auto = time_op(op_q, c, reps);
        double t_dd = -1.0, t_qd = -1.0, t_deq = -1.0;
        if (mi == 0) t_deq = time_op(op_dequant, c, reps_for(nw * 4.0)); /* overwrites dense W */
        if (dgrad) {
            t_dd = time_op(op_dense_dgrad, c, reps);
            t_qd = time_op(op_q_dgrad, c, reps);
        }
        printf("{\"N\": %d, \"K\": %d, \"M\": %d, \"bits\": %d, \"group\": %d, "
               "\"fused_supported\": %d, "
               "\"qbytes\": %zu, \"dense_bytes\": %.0f, \"us_cublas\": %.3f, \"us_scratch\": %.3f, "
               "\"us_fused\": %.3f, \"us_auto\": %.3f, \"us_best\": %.3f, \"best_nt\": %d, "
               "\"best_split\": %d, \"us_cublas_dgrad\": %.3f, \"us_q_dgrad\": %.3f, "
               "\"us_dequant\": %.3f}\n",
               N, K, M, sp.bits, q.group_size, sup, qbytes, dense_bytes, t_dense, t_scratch,
               t_fused, t_auto, t_best, best_nt, best_split, t_dd, t_qd, t_deq);
        fflush(stdout);
    }
    for (int i = 0; i < c->n_copies; i++)
        g_be->qweight_free(&c->q[i]), g_be->free(c->w[i]);
    g_be->free(c->x), g_be->free(c->y), g_be->free(c->dy), g_be->free(c->dx);
    rs_qweight_free(&q);
    free(w), free(xh), free(c);
    return 0;
}

/* qmm_tool probe N K M[,M...]: W4 g128 asymmetric, the fused kernel's timing probes (load-only,
 * tiled addresses, pipeline depth, blocks per SM, split-K reduction kernel), one JSON line each,
 * to say what bounds the kernel. Not results: probes with "tiled" compute wrong values. */
static int cmd_probe(int argc, char **argv) {
    RS_CHECK(argc >= 5, "usage: qmm_tool probe N K M[,M...]");
    rs_qspec sp;
    char *spec[] = {"int", "4", "128", "0"};
    spec_from_args(spec, &sp);
    int N = atoi(argv[2]), K = atoi(argv[3]);
    rs_rng r;
    rs_rng_seed(&r, 4321);
    size_t nw = (size_t)N * K;
    float *w = rs_malloc(nw * sizeof *w);
    fill_normal(&r, w, nw, 0.05f, 0);
    rs_qweight q;
    if (rs_quantize_rtn(w, N, K, &sp, NULL, NULL, &q) != 0) rs_die_last();
    bench_ctx *c = rs_calloc(1, sizeof *c);
    c->N = N, c->K = K;
    c->n_copies = (int)ceil(256e6 / (double)rs_qweight_bytes(&q));
    if (c->n_copies > MAX_COPIES) c->n_copies = MAX_COPIES;
    for (int i = 0; i < c->n_copies; i++)
        if (g_be->qweight_upload(&c->q[i], &q) != 0) rs_die_last();
    float *xh = rs_malloc((size_t)64 * K * sizeof *xh);
    fill_normal(&r, xh, (size_t)64 * K, 1.0f, 1);
    c->x = dev_upload(xh, (size_t)64 * K);
    c->y = g_be->alloc((size_t)64 * N * 2);
    /* depth, probe bits (1 load only, 2 tiled, 4 no shared-memory X, 8 / 16 the wgmma kernel
     * with 2 / 4 warpgroups per block, 32 X staged in shared memory up to 16 rows: qmm_xs_kernel,
     * its PIPE 1 with depth 2; 64 the register-X qmm_kernel where qmm_xs_kernel is the default:
     * up to 4 rows), blocks per SM, reduce in
     * the last block (see rs_cuda_qmm_probe), split-K count (0: the plan's); rows: 1 only up
     * to 16 rows, 2 only past 16, 0 both. "previous" = the launch before this probe existed. */
    static const struct {
        const char *name;
        int depth, probe, bps, reduce, splits, rows;
    } v[] = {{"default", 0, 0, 0, 0, 0, 0},
             {"reduce_last_block", 0, 0, 0, 1, 0, 0},
             {"bps2", 0, 0, 2, 0, 0, 1},
             {"bps4", 0, 0, 4, 0, 0, 1},
             {"bps8", 0, 0, 8, 0, 0, 1},
             {"depth2", 2, 0, 0, 0, 0, 1},
             {"previous", 4, 4, 2, 1, 0, 0},
             {"regx_depth1", 1, 4, 0, 0, 0, 0},
             {"regx_depth1_bps8", 1, 4, 8, 0, 0, 1},
             {"loadonly", 1, 1, 0, 0, 0, 1},
             {"tiled_loadonly", 1, 3, 0, 0, 0, 1},
             {"loadonly_depth2", 2, 1, 0, 0, 0, 1},
             {"loadonly_depth4", 4, 1, 0, 0, 0, 1},
             {"tiled_loadonly_depth4", 4, 3, 0, 0, 0, 1},
             {"tiled", 1, 2, 0, 0, 0, 1},
             {"split8", 0, 0, 0, 0, 8, 2},
             {"split16", 0, 0, 0, 0, 16, 2},
             {"wg2", 0, 8, 0, 0, 0, 0},
             {"wg4", 0, 16, 0, 0, 0, 0},
             {"wg2_depth4", 4, 8, 0, 0, 0, 0},
             {"wg4_depth4", 4, 16, 0, 0, 0, 0},
             {"wg4_split1", 0, 16, 0, 0, 1, 0},
             {"wg4_split4", 0, 16, 0, 0, 4, 0},
             {"xs", 0, 32, 0, 0, 0, 1},
             {"xs_pipe", 2, 32, 0, 0, 0, 1},
             {"xs_bps4", 0, 32, 4, 0, 0, 1},
             {"xs_bps6", 0, 32, 6, 0, 0, 1},
             {"xs_pipe_bps4", 2, 32, 4, 0, 0, 1},
             {"xs_pipe_bps6", 2, 32, 6, 0, 0, 1},
             {"regx", 0, 64, 0, 0, 0, 1}};
    for (char *tok = strtok(argv[4], ","); tok; tok = strtok(NULL, ",")) {
        int M = c->M = atoi(tok);
        RS_CHECK(M >= 1 && M <= 64, "qmm_tool probe: M %s: want 1..64 rows", tok);
        int reps = 200;
        for (size_t i = 0; i < sizeof v / sizeof *v; i++) {
            if ((v[i].rows == 1 && M > 16) || (v[i].rows == 2 && M <= 16)) continue;
            rs_cuda_qmm_configure(RS_QMM_FUSED, 2, v[i].splits);
            rs_cuda_qmm_probe(v[i].depth, v[i].probe, v[i].bps, v[i].reduce);
            double t = time_op(op_q, c, reps);
            printf("{\"N\": %d, \"K\": %d, \"M\": %d, \"probe\": \"%s\", \"us\": %.3f, "
                   "\"tb_s\": %.3f}\n",
                   N, K, M, v[i].name, t, rs_qweight_bytes(&q) / (t * 1e-6) / 1e12);
            fflush(stdout);
        }
    }
    rs_cuda_qmm_probe(0, 0, 0, 0);
    rs_cuda_qmm_configure(RS_QMM_AUTO, 0, 0);
    for (int i = 0; i < c->n_copies; i++)
        g_be->qweight_free(&c->q[i]);
    g_be->free(c->x), g_be->free(c->y);
    rs_qweight_free(&q);
    free(w), free(xh), free(c);
    return 0;
}

typedef struct {
    void *a, *b, *c;
    size_t bytes;
    int n;
} roof_ctx;
static void op_copy(void *c_, int i) {
    roof_ctx *c = c_;
    (void)i;
    g_be->copy(c->b, c->a, c->bytes);
}
static void op_gemm(void *c_, int i) {
    roof_ctx *c = c_;
    (void)i;
    g_be->linear_fwd(c->c, c->a, c->b, NULL, c->n, c->n, c->n, 0.0f);
}

static int cmd_roofline(void) {
    roof_ctx c = {0};
    c.bytes = (size_t)1 << 30;
    c.a = g_be->alloc(c.bytes), c.b = g_be->alloc(c.bytes);
    double us = time_op(op_copy, &c, 10);
    double gbs = 2.0 * c.bytes / (us * 1e-6) / 1e9;
    g_be->free(c.a), g_be->free(c.b);
    c.n = 8192;
    size_t nn = (size_t)c.n * c.n;
    float *h = rs_malloc(nn * sizeof *h);
    rs_rng r;
    rs_rng_seed(&r, 5);
    fill_normal(&r, h, nn, 1.0f, 1);
    c.a = dev_upload(h, nn), c.b = dev_upload(h, nn), c.c = g_be->alloc(nn * 2);
    double us_g = time_op(op_gemm, &c, 10);
    double tflops = 2.0 * c.n * (double)c.n * c.n / (us_g * 1e-6) / 1e12;
    printf("{\"copy_gb_s\": %.1f, \"cublas_tflops\": %.1f}\n", gbs, tflops);
    g_be->free(c.a), g_be->free(c.b), g_be->free(c.c);
    free(h);
    return 0;
}

/* ---------------------------------------------------------------- attention timing */
static int cmd_attn(int argc, char **argv) {
    RS_CHECK(argc == 7, "usage: qmm_tool attn B T H HKV D");
    const int B = atoi(argv[2]), T = atoi(argv[3]), H = atoi(argv[4]), Hkv = atoi(argv[5]);
    const int D = atoi(argv[6]);
    RS_CHECK(B > 0 && T > 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && D > 0 && D % 8 == 0,
             "qmm_tool attn: bad shape B=%d T=%d H=%d HKV=%d D=%d", B, T, H, Hkv, D);
    const size_t nq = (size_t)B * T * H * D, nkv = (size_t)B * T * Hkv * D;
    float *h = malloc(nq * sizeof(float));
    int32_t *pos = malloc((size_t)B * T * sizeof(int32_t));
    RS_CHECK(h && pos, "qmm_tool attn: out of memory");
    rs_rng r;
    rs_rng_seed(&r, 9);
    void *buf[7];
    for (int i = 0; i < 7; i++) { /* q, k, v, out, dout, dq, dk (dv below) */
        size_t n = i == 1 || i == 2 || i == 6 ? nkv : nq;
        fill_normal(&r, h, n, 1.0f, 1);
        buf[i] = dev_upload(h, n);
    }
    void *dv = g_be->alloc(nkv * 2);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) pos[(size_t)b * T + t] = t;
    void *dpos = g_be->alloc((size_t)B * T * sizeof(int32_t));
    g_be->to_device(dpos, pos, (size_t)B * T * sizeof(int32_t));
    const float scale = 1.0f / sqrtf((float)D);
    cudaStream_t s = (cudaStream_t)rs_cuda_stream_handle();
    cudaEvent_t e0, e1, e2;
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    CU(cudaEventCreate(&e2));
    const char *modes[3] = {"gemm", "flash", "fused"};
    for (int mi = 0; mi < 3; mi++) {
        setenv("RESAFE_CUDA_ATTENTION", modes[mi], 1);
        float ms_f = 0, ms_b = 0;
        for (int rep = 0; rep < 3; rep++) { /* 0: warm-up, the best of 1..2 */
            const int n = rep == 0 ? 2 : 10;
            CU(cudaEventRecord(e0, s));
            for (int i = 0; i < n; i++)
                g_be->attention_fwd(buf[3], buf[0], buf[1], buf[2], dpos, B, T, T, H, Hkv, D,
                                    scale);
            CU(cudaEventRecord(e1, s));
            for (int i = 0; i < n; i++)
                g_be->attention_bwd(buf[5], buf[6], dv, buf[4], buf[0], buf[1], buf[2], dpos, B,
                                    T, T, H, Hkv, D, scale);
            CU(cudaEventRecord(e2, s));
            CU(cudaEventSynchronize(e2));
            float a, b;
            CU(cudaEventElapsedTime(&a, e0, e1));
            CU(cudaEventElapsedTime(&b, e1, e2));
            if (rep == 1 || (rep == 2 && a < ms_f)) ms_f = a;
            if (rep == 1 || (rep == 2 && b < ms_b)) ms_b = b;
        }
        const double flops = 2.0 * 2.0 * B * H * (double)T * (T + 1) / 2.0 * D; /* causal */
        printf("{\"mode\": \"%s\", \"B\": %d, \"T\": %d, \"H\": %d, \"Hkv\": %d, \"D\": %d, "
               "\"fwd_us\": %.1f, \"bwd_us\": %.1f, \"fwd_tflops\": %.1f, "
               "\"bwd_tflops\": %.1f}\n",
               modes[mi], B, T, H, Hkv, D, ms_f * 100.0, ms_b * 100.0,
               flops / (ms_f * 1e-4) / 1e12, 2.5 * flops / (ms_b * 1e-4) / 1e12);
    }
    unsetenv("RESAFE_CUDA_ATTENTION");
    CU(cudaEventDestroy(e0));
    CU(cudaEventDestroy(e1));
    CU(cudaEventDestroy(e2));
    for (int i = 0; i < 7; i++) g_be->free(buf[i]);
    g_be->free(dv), g_be->free(dpos);
    free(h), free(pos);
    return 0;
}

int main(int argc, char **argv) {
    RS_CHECK(argc >= 2, "usage: qmm_tool check|bench|roofline|probe|attn ...");
    g_be = rs_backend_cuda();
    if (!g_be) {
        fprintf(stderr, "qmm_tool: no CUDA device\n");
        return 77;
    }
    /* RESAFE_QMM_PROBE=depth,probe,blocks_per_sm,reduce: check (or bench) a probe launch
     * (rs_cuda_qmm_probe) */
    const char *pr = getenv("RESAFE_QMM_PROBE");
    if (pr && pr[0]) {
        int d = 0, b = 0, bps = 0, red = 0;
        RS_CHECK(sscanf(pr, "%d,%d,%d,%d", &d, &b, &bps, &red) == 4,
                 "qmm_tool: RESAFE_QMM_PROBE=%s: expected depth,probe,blocks_per_sm,reduce", pr);
        rs_cuda_qmm_probe(d, b, bps, red);
    }
    if (strcmp(argv[1], "check") == 0) return cmd_check(argc, argv);
    if (strcmp(argv[1], "bench") == 0) return cmd_bench(argc, argv);
    if (strcmp(argv[1], "roofline") == 0) return cmd_roofline();
    if (strcmp(argv[1], "probe") == 0) return cmd_probe(argc, argv);
    if (strcmp(argv[1], "attn") == 0) return cmd_attn(argc, argv);
    RS_DIE("qmm_tool: unknown command %s", argv[1]);
    return 1;
}
#else
int main(void) {
    fprintf(stderr, "qmm_tool: built without CUDA\n");
    return 77;
}
#endif
