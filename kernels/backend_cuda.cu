/* backend_cuda: the CUDA op table. Memory, copies and dtype conversions here; each op's kernel in
 * its own kernels/<op>.cu. One device (the current one, 0 unless the caller chose another), one
 * stream, one cuBLAS handle with a workspace allocated once: ops never allocate. */
#include "resafe/cuda_common.h"

extern "C" {
#include "resafe/cuda_qmm.h"
#include "resafe/quant.h"
}

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CUBLAS_WORKSPACE_BYTES ((size_t)32 << 20) /* cuBLAS's recommendation for Hopper */
#define STAGING_FLOATS ((size_t)1 << 21)          /* 8 MiB: upload_f32/download_f32 chunks */
#define SCRATCH_INITIAL_BYTES ((size_t)16 << 20)  /* op scratch at start; grows once if needed */
#define QMM_COUNTERS 16384                        /* split-K tile counters of the fused qmatmul */

/* The backend context: the one piece of state behind the op table (its signatures carry none). */
static struct {
    int tried; /* rs_backend_cuda() ran its probe */
    int usable;
    int device;
    int sync_after_launch; /* RESAFE_CUDA_SYNC=1 */
    cudaStream_t stream;
    cublasHandle_t cublas;
    void *cublas_workspace;
    float *staging; /* device fp32 buffer of STAGING_FLOATS */
    void *scratch;  /* the op scratch (training ops' temporaries), scratch_bytes long */
    size_t scratch_bytes;
    void *qscratch; /* the dequantized bf16 weight of a quantized linear, qscratch_bytes long */
    size_t qscratch_bytes;
    int *qmm_counters; /* QMM_COUNTERS ints, zero between fused qmatmul calls (qgemm.cu) */
    rs_backend table;
} g_cuda;

static void *op_scratch(size_t bytes);

/* ---------------------------------------------------------------- profile
 * RESAFE_CUDA_PROFILE=1: every op waits for the stream before and after itself and adds the
 * wall time to its row; at exit a table of ops by total time goes to stderr, with the time
 * between the first and the last op (the rest is host work between ops). The waits serialise
 * host and device, so the run is slower: a tool for finding where the time goes, not for
 * timing. RESAFE_CUDA_MEMSTATS=1 prints the peak of the memory allocated through the backend
 * at exit (no slowdown). */
#define PROF_MAX 64
static struct {
    int on, memstats, n;
    const char *name[PROF_MAX];
    double ms[PROF_MAX], max_ms[PROF_MAX];
    long calls[PROF_MAX];
    double first, last;
} g_prof;

static double prof_now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

static double prof_begin(void) {
    CUDA_CHECK(cudaStreamSynchronize(g_cuda.stream));
    double t = prof_now_ms();
    if (g_prof.first == 0.0) g_prof.first = t;
    return t;
}

static void prof_end(const char *name, double t0) {
    CUDA_CHECK(cudaStreamSynchronize(g_cuda.stream));
    double t = prof_now_ms();
    g_prof.last = t;
    int i = 0;
    while (i < g_prof.n && g_prof.name[i] != name) i++;
    if (i == g_prof.n) {
        if (g_prof.n == PROF_MAX) return;
        g_prof.name[g_prof.n++] = name;
    }
    g_prof.ms[i] += t - t0;
    if (t - t0 > g_prof.max_ms[i]) g_prof.max_ms[i] = t - t0;
    g_prof.calls[i]++;
}

#define PROF_BEGIN double prof_t0_ = g_prof.on ? prof_begin() : 0.0
#define PROF_END(name)                                                                             \
    do {                                                                                           \
        if (g_prof.on) prof_end(name, prof_t0_);                                                   \
    } while (0)

static size_t cuda_peak_bytes(void);

static void prof_report(void) {
    if (g_prof.memstats)
        fprintf(stderr, "cuda backend: peak memory allocated %zu bytes (%.2f GiB)\n",
                cuda_peak_bytes(), cuda_peak_bytes() / 1073741824.0);
    if (!g_prof.on || g_prof.n == 0) return;
    double total = 0.0;
    for (int i = 0; i < g_prof.n; i++) total += g_prof.ms[i];
    fprintf(stderr, "cuda profile: %.1f ms in ops, %.1f ms from the first op to the last\n",
            total, g_prof.last - g_prof.first);
    fprintf(stderr, "  %-18s %10s %8s %6s %9s\n", "op", "ms", "calls", "%", "max ms");
    int done[PROF_MAX] = {0};
    for (int k = 0; k < g_prof.n; k++) {
        int best = -1;
        for (int i = 0; i < g_prof.n; i++)
            if (!done[i] && (best < 0 || g_prof.ms[i] > g_prof.ms[best])) best = i;
        done[best] = 1;
        fprintf(stderr, "  %-18s %10.1f %8ld %6.1f %9.2f\n", g_prof.name[best], g_prof.ms[best],
                g_prof.calls[best], total > 0 ? 100.0 * g_prof.ms[best] / total : 0.0,
                g_prof.max_ms[best]);
    }
}

void rs_cuda_check_launch(cudaStream_t stream, const char *kernel, const char *file, int line) {
    cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess && g_cuda.sync_after_launch) err = cudaStreamSynchronize(stream);
    if (err != cudaSuccess)
        rs_die_at(file, line, "CUDA kernel %s failed: %s (%s)", kernel, cudaGetErrorString(err),
                  cudaGetErrorName(err));
}

/* ---------------------------------------------------------------- memory accounting
 * The size of every live allocation, in an open-addressing table keyed by pointer (allocations
 * happen at set-up, never in a step loop, so the table's cost does not matter). */
static struct {
    void **ptr;
    size_t *size;
    size_t cap, used, live, peak;
} g_mem;

static size_t mem_slot(void *p, size_t cap) {
    uintptr_t h = (uintptr_t)p >> 8;
    h ^= h >> 17, h *= 0x9E3779B97F4A7C15ull;
    return (size_t)(h & (cap - 1));
}

static void mem_track(void *p, size_t bytes) {
    if (2 * (g_mem.used + 1) > g_mem.cap) { /* grow: rehash into twice the slots */
        size_t cap = g_mem.cap ? 2 * g_mem.cap : 1024;
        void **ptr = (void **)rs_calloc(cap, sizeof *ptr);
        size_t *size = (size_t *)rs_calloc(cap, sizeof *size);
        for (size_t i = 0; i < g_mem.cap; i++) {
            if (!g_mem.ptr[i]) continue;
            size_t j = mem_slot(g_mem.ptr[i], cap);
            while (ptr[j]) j = (j + 1) & (cap - 1);
            ptr[j] = g_mem.ptr[i], size[j] = g_mem.size[i];
        }
        free(g_mem.ptr), free(g_mem.size);
        g_mem.ptr = ptr, g_mem.size = size, g_mem.cap = cap;
    }
    size_t j = mem_slot(p, g_mem.cap);
    while (g_mem.ptr[j]) j = (j + 1) & (g_mem.cap - 1);
    g_mem.ptr[j] = p, g_mem.size[j] = bytes, g_mem.used++;
    g_mem.live += bytes;
    if (g_mem.live > g_mem.peak) g_mem.peak = g_mem.live;
}

static void mem_untrack(void *p) {
    if (!g_mem.cap) return;
    size_t j = mem_slot(p, g_mem.cap);
    while (g_mem.ptr[j] && g_mem.ptr[j] != p) j = (j + 1) & (g_mem.cap - 1);
    if (!g_mem.ptr[j]) return;
    g_mem.live -= g_mem.size[j];
    g_mem.ptr[j] = NULL, g_mem.used--;
    /* re-insert the rest of the probe run (deletion in linear probing) */
    for (size_t k = (j + 1) & (g_mem.cap - 1); g_mem.ptr[k]; k = (k + 1) & (g_mem.cap - 1)) {
        void *q = g_mem.ptr[k];
        size_t sz = g_mem.size[k];
        g_mem.ptr[k] = NULL, g_mem.used--, g_mem.live -= sz;
        mem_track(q, sz);
    }
}

static size_t cuda_peak_bytes(void) { return g_mem.peak; }
static size_t cuda_live_bytes(void) { return g_mem.live; }

static int cuda_mem_info(size_t *free_bytes, size_t *total_bytes) {
    if (cudaMemGetInfo(free_bytes, total_bytes) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- memory */
/* Never NULL: a zero-byte request gets a real (1-byte) allocation, as malloc may. */
static void *cuda_alloc(size_t bytes) {
    void *p = NULL;
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        cudaGetLastError();
        cudaMemGetInfo(&free_b, &total_b);
        RS_DIE("cannot allocate %.1f MiB of GPU memory (%.1f MiB free of %.1f MiB): %s",
               bytes / 1048576.0, free_b / 1048576.0, total_b / 1048576.0,
               cudaGetErrorString(err));
    }
    mem_track(p, bytes ? bytes : 1);
    return p;
}

static void cuda_free(void *p) {
    if (!p) return;
    mem_untrack(p);
    CUDA_CHECK(cudaFree(p));
}

/* Copies return when complete, like memcpy: the host buffer may be reused at once. */
static void cuda_to_device(void *dst, const void *host_src, size_t bytes) {
    PROF_BEGIN;
    if (bytes) {
        CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, g_cuda.stream));
        CUDA_CHECK(cudaStreamSynchronize(g_cuda.stream));
    }
    PROF_END("to_device");
}

static void cuda_to_host(void *host_dst, const void *src, size_t bytes) {
    PROF_BEGIN;
    if (bytes) {
        CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, g_cuda.stream));
        CUDA_CHECK(cudaStreamSynchronize(g_cuda.stream));
    }
    PROF_END("to_host");
}

static void cuda_copy(void *dst, const void *src, size_t bytes) {
    PROF_BEGIN;
    if (bytes)
        CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g_cuda.stream));
    PROF_END("copy");
}

static void cuda_synchronize(void) { CUDA_CHECK(cudaStreamSynchronize(g_cuda.stream)); }

static void check_storage_dtype(rs_dtype t, const char *what) {
    RS_CHECK(t == RS_F32 || t == RS_BF16 || t == RS_F16,
             "cuda backend: %s of dtype %s is not supported (F32, BF16, F16 are)", what,
             (unsigned)t < RS_DTYPE_COUNT ? rs_dtype_name(t) : "?");
}

/* fp32 host values -> device dtype, converted on the device chunk by chunk through the staging
 * buffer (stream order keeps a chunk's copy behind the previous chunk's conversion). */
static void cuda_upload_f32(void *dst, rs_dtype dst_dtype, const float *host_src, size_t n) {
    check_storage_dtype(dst_dtype, "upload_f32 destination");
    if (dst_dtype == RS_F32) {
        cuda_to_device(dst, host_src, n * sizeof(float));
        return;
    }
    size_t elem = rs_dtype_size(dst_dtype);
    for (size_t off = 0; off < n; off += STAGING_FLOATS) {
        size_t chunk = n - off < STAGING_FLOATS ? n - off : STAGING_FLOATS;
        CUDA_CHECK(cudaMemcpyAsync(g_cuda.staging, host_src + off, chunk * sizeof(float),
                                   cudaMemcpyHostToDevice, g_cuda.stream));
        rs_cuda_convert_from_f32(g_cuda.stream, (char *)dst + off * elem, dst_dtype,
                                 g_cuda.staging, chunk);
    }
    CUDA_CHECK(cudaStreamSynchronize(g_cuda.stream));
}

static void cuda_download_f32(float *host_dst, const void *src, rs_dtype src_dtype, size_t n) {
    check_storage_dtype(src_dtype, "download_f32 source");
    if (src_dtype == RS_F32) {
        cuda_to_host(host_dst, src, n * sizeof(float));
        return;
    }
    size_t elem = rs_dtype_size(src_dtype);
    for (size_t off = 0; off < n; off += STAGING_FLOATS) {
        size_t chunk = n - off < STAGING_FLOATS ? n - off : STAGING_FLOATS;
        rs_cuda_convert_to_f32(g_cuda.stream, g_cuda.staging, (const char *)src + off * elem,
                               src_dtype, chunk);
        CUDA_CHECK(cudaMemcpyAsync(host_dst + off, g_cuda.staging, chunk * sizeof(float),
                                   cudaMemcpyDeviceToHost, g_cuda.stream));
    }
    CUDA_CHECK(cudaStreamSynchronize(g_cuda.stream));
}

/* ---------------------------------------------------------------- forward ops: bf16 act and w */
static void cuda_embedding_fwd(void *out, const void *table, const int32_t *ids, int n, int dim,
                               float scale) {
    PROF_BEGIN;
    rs_cuda_embedding_fwd(g_cuda.stream, (bf16 *)out, (const bf16 *)table, ids, n, dim, scale);
    PROF_END("embedding_fwd");
}

static void cuda_rmsnorm_fwd(void *out, float *rstd, const void *x, const void *w, int n, int dim,
                             float eps, int add_one) {
    PROF_BEGIN;
    rs_cuda_rmsnorm_fwd(g_cuda.stream, (bf16 *)out, rstd, (const bf16 *)x, (const bf16 *)w, n, dim,
                        eps, add_one);
    PROF_END("rmsnorm_fwd");
}

static void cuda_linear_fwd(void *out, const void *x, const void *w, const void *bias, int n,
                            int k, int m, float beta) {
    PROF_BEGIN;
    rs_cuda_linear_fwd(g_cuda.stream, g_cuda.cublas, (bf16 *)out, (const bf16 *)x,
                       (const bf16 *)w, (const bf16 *)bias, n, k, m, beta);
    PROF_END("linear_fwd");
}

static void cuda_rope_fwd(void *x, const int32_t *pos, const float *inv_freq, int n_tok,
                          int n_heads, int head_dim) {
    PROF_BEGIN;
    rs_cuda_rope_fwd(g_cuda.stream, (bf16 *)x, pos, inv_freq, n_tok, n_heads, head_dim);
    PROF_END("rope_fwd");
}

/* Which attention kernels run: RESAFE_CUDA_ATTENTION = flash or unset (the default: the fused
 * FlashAttention-2 kernels of attention_flash.cu where the shape fits, Tq >= 16 and head_dim 64
 * or 128; else as gemm), gemm (the tensor-core path of attention_gemm.cu where the shape fits,
 * else fused), fused (the online-softmax kernels of attention.cu always). Read at every call,
 * so a test can compare the paths in one process. */
static const char *attention_mode(void) {
    const char *mode = getenv("RESAFE_CUDA_ATTENTION");
    return mode && mode[0] ? mode : "flash";
}

static int use_attention_gemm(int Tq, int Tk, int n_heads, int n_kv_heads, int head_dim) {
    if (strcmp(attention_mode(), "fused") == 0) return 0;
    return rs_cuda_attention_gemm_fits(Tq, Tk, n_heads, n_kv_heads, head_dim);
}

static int use_attention_flash(int Tq, int Tk, int n_heads, int n_kv_heads, int head_dim) {
    return strcmp(attention_mode(), "flash") == 0 &&
           rs_cuda_attention_flash_fits(Tq, Tk, n_heads, n_kv_heads, head_dim);
}

static void cuda_attention_fwd(void *out, const void *q, const void *k, const void *v,
                               const int32_t *q_pos, int B, int Tq, int Tk, int n_heads,
                               int n_kv_heads, int head_dim, float scale) {
    PROF_BEGIN;
    if (use_attention_flash(Tq, Tk, n_heads, n_kv_heads, head_dim)) {
        rs_cuda_attention_flash_fwd(g_cuda.stream, (bf16 *)out, NULL, (const bf16 *)q,
                                    (const bf16 *)k, (const bf16 *)v, q_pos, B, Tq, Tk, n_heads,
                                    n_kv_heads, head_dim, scale);
    } else if (use_attention_gemm(Tq, Tk, n_heads, n_kv_heads, head_dim)) {
        void *scratch = op_scratch(rs_cuda_attention_gemm_scratch_bytes(B, Tq, Tk, n_heads,
                                                                        n_kv_heads, head_dim, 0));
        rs_cuda_attention_gemm_fwd(g_cuda.stream, g_cuda.cublas, (bf16 *)out, (const bf16 *)q,
                                   (const bf16 *)k, (const bf16 *)v, q_pos, B, Tq, Tk, n_heads,
                                   n_kv_heads, head_dim, scale, scratch);
    } else {
        rs_cuda_attention_fwd(g_cuda.stream, (bf16 *)out, (const bf16 *)q, (const bf16 *)k,
                              (const bf16 *)v, q_pos, B, Tq, Tk, n_heads, n_kv_heads, head_dim,
                              scale);
    }
    PROF_END("attention_fwd");
}

static void cuda_glu_fwd(void *out, const void *gate, const void *up, size_t n,
                         rs_activation act) {
    PROF_BEGIN;
    rs_cuda_glu_fwd(g_cuda.stream, (bf16 *)out, (const bf16 *)gate, (const bf16 *)up, n, act);
    PROF_END("glu_fwd");
}

static void cuda_add_inplace(void *x, const void *y, size_t n) {
    PROF_BEGIN;
    rs_cuda_add_inplace(g_cuda.stream, (bf16 *)x, (const bf16 *)y, n);
    PROF_END("add_inplace");
}

static void cuda_scatter_rows(void *dst, const void *src, const int32_t *dst_rows, int n,
                              int dim) {
    PROF_BEGIN;
    rs_cuda_scatter_rows(g_cuda.stream, (bf16 *)dst, (const bf16 *)src, dst_rows, n, dim);
    PROF_END("scatter_rows");
}

static void cuda_gather_rows(void *dst, const void *src, const int32_t *src_rows, int n, int dim) {
    PROF_BEGIN;
    rs_cuda_gather_rows(g_cuda.stream, (bf16 *)dst, (const bf16 *)src, src_rows, n, dim);
    PROF_END("gather_rows");
}

static void cuda_argmax_rows(int32_t *ids, const void *x, int rows, int dim) {
    PROF_BEGIN;
    rs_cuda_argmax_rows(g_cuda.stream, ids, (const bf16 *)x, rows, dim);
    PROF_END("argmax_rows");
}

static void cuda_act_to_f32(float *out, const void *x, size_t n) {
    PROF_BEGIN;
    rs_cuda_convert_to_f32(g_cuda.stream, out, x, RS_BF16, n);
    PROF_END("act_to_f32");
}

/* ---------------------------------------------------------------- training ops
 * The op scratch: one device buffer for the temporaries of the training ops (attention_bwd's row
 * statistics, LoRA's bf16 operands, column-sum and sum-of-squares partials). Ops run in order on
 * the one stream, so one buffer serves them all. Its size follows the model and batch, which are
 * fixed for a run: when an op needs more than any op before, the buffer grows to that size once
 * (wait for the stream, free, allocate, logged), in practice during the first step only. */
static void *op_scratch(size_t bytes) {
    if (bytes <= g_cuda.scratch_bytes) return g_cuda.scratch;
    CUDA_CHECK(cudaStreamSynchronize(g_cuda.stream)); /* earlier ops may still use the old one */
    cuda_free(g_cuda.scratch);
    g_cuda.scratch = cuda_alloc(bytes);
    g_cuda.scratch_bytes = bytes;
    rs_debug("cuda backend: op scratch grown to %.1f MiB", bytes / 1048576.0);
    return g_cuda.scratch;
}

static void cuda_embedding_bwd(float *dtable, const void *dout, const int32_t *ids, int n, int dim,
                               float scale) {
    PROF_BEGIN;
    rs_cuda_embedding_bwd(g_cuda.stream, dtable, (const bf16 *)dout, ids, n, dim, scale,
                          op_scratch(rs_cuda_embedding_bwd_scratch_bytes(n)));
    PROF_END("embedding_bwd");
}

static void cuda_rmsnorm_bwd(void *dx, float *dw, const void *dout, const void *x, const void *w,
                             const float *rstd, int n, int dim, int add_one, float beta) {
    PROF_BEGIN;
    void *scratch = dw ? op_scratch(rs_cuda_rmsnorm_bwd_scratch_bytes(n, dim)) : NULL;
    rs_cuda_rmsnorm_bwd(g_cuda.stream, (bf16 *)dx, dw, (const bf16 *)dout, (const bf16 *)x,
                        (const bf16 *)w, rstd, n, dim, add_one, beta, scratch);
    PROF_END("rmsnorm_bwd");
}

static void cuda_linear_bwd(void *dx, float *dw, float *dbias, const void *dout, const void *x,
                            const void *w, int n, int k, int m, float beta) {
    PROF_BEGIN;
    void *scratch = dbias ? op_scratch(rs_cuda_linear_bwd_scratch_bytes(n, m)) : NULL;
    rs_cuda_linear_bwd(g_cuda.stream, g_cuda.cublas, (bf16 *)dx, dw, dbias, (const bf16 *)dout,
                       (const bf16 *)x, (const bf16 *)w, n, k, m, beta, scratch);
    PROF_END("linear_bwd");
}

static void cuda_rope_bwd(void *dx, const int32_t *pos, const float *inv_freq, int n_tok,
                          int n_heads, int head_dim) {
    PROF_BEGIN;
    rs_cuda_rope_bwd(g_cuda.stream, (bf16 *)dx, pos, inv_freq, n_tok, n_heads, head_dim);
    PROF_END("rope_bwd");
}

static void cuda_attention_bwd(void *dq, void *dk, void *dv, const void *dout, const void *q,
                               const void *k, const void *v, const int32_t *q_pos, int B, int Tq,
                               int Tk, int n_heads, int n_kv_heads, int head_dim, float scale) {
    PROF_BEGIN;
    if (use_attention_flash(Tq, Tk, n_heads, n_kv_heads, head_dim)) {
        void *ws = op_scratch(rs_cuda_attention_flash_bwd_scratch_bytes(B, Tq, n_heads));
        rs_cuda_attention_flash_bwd(g_cuda.stream, (bf16 *)dq, (bf16 *)dk, (bf16 *)dv,
                                    (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k,
                                    (const bf16 *)v, NULL, NULL, q_pos, B, Tq, Tk, n_heads,
                                    n_kv_heads, head_dim, scale, ws);
    } else if (use_attention_gemm(Tq, Tk, n_heads, n_kv_heads, head_dim)) {
        void *ws = op_scratch(rs_cuda_attention_gemm_scratch_bytes(B, Tq, Tk, n_heads, n_kv_heads,
                                                                   head_dim, 1));
        rs_cuda_attention_gemm_bwd(g_cuda.stream, g_cuda.cublas, (bf16 *)dq, (bf16 *)dk,
                                   (bf16 *)dv, (const bf16 *)dout, (const bf16 *)q,
                                   (const bf16 *)k, (const bf16 *)v, q_pos, B, Tq, Tk, n_heads,
                                   n_kv_heads, head_dim, scale, ws);
    } else {
        void *scratch = op_scratch(rs_cuda_attention_bwd_scratch_bytes(B, Tq, n_heads));
        rs_cuda_attention_bwd(g_cuda.stream, (bf16 *)dq, (bf16 *)dk, (bf16 *)dv,
                              (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k,
                              (const bf16 *)v, q_pos, B, Tq, Tk, n_heads, n_kv_heads, head_dim,
                              scale, scratch);
    }
    PROF_END("attention_bwd");
}

/* The saved-statistics pair (backend.h: attention_fwd_lse, attention_bwd_saved): the flash
 * forward also writes each row's log-sum-exp and the backward skips its statistics pass (Dsum
 * from the saved bf16 output), unless RESAFE_CUDA_FLASH_SAVED=0 or flash does not take the
 * shape: then the plain ops (lse unwritten and unread: both sides decide alike). */
static int flash_saved(int Tq, int Tk, int n_heads, int n_kv_heads, int head_dim) {
    const char *e = getenv("RESAFE_CUDA_FLASH_SAVED");
    return !(e && strcmp(e, "0") == 0) && use_attention_flash(Tq, Tk, n_heads, n_kv_heads, head_dim);
}

static void cuda_attention_fwd_lse(void *out, float *lse, const void *q, const void *k,
                                   const void *v, const int32_t *q_pos, int B, int Tq, int Tk,
                                   int n_heads, int n_kv_heads, int head_dim, float scale) {
    if (!flash_saved(Tq, Tk, n_heads, n_kv_heads, head_dim)) {
        cuda_attention_fwd(out, q, k, v, q_pos, B, Tq, Tk, n_heads, n_kv_heads, head_dim, scale);
        return;
    }
    PROF_BEGIN;
    rs_cuda_attention_flash_fwd(g_cuda.stream, (bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k,
                                (const bf16 *)v, q_pos, B, Tq, Tk, n_heads, n_kv_heads, head_dim,
                                scale);
    PROF_END("attention_fwd");
}

static void cuda_attention_bwd_saved(void *dq, void *dk, void *dv, const void *dout,
                                     const void *q, const void *k, const void *v, const void *out,
                                     const float *lse, const int32_t *q_pos, int B, int Tq,
                                     int Tk, int n_heads, int n_kv_heads, int head_dim,
                                     float scale) {
    if (!flash_saved(Tq, Tk, n_heads, n_kv_heads, head_dim)) {
        cuda_attention_bwd(dq, dk, dv, dout, q, k, v, q_pos, B, Tq, Tk, n_heads, n_kv_heads,
                           head_dim, scale);
        return;
    }
    PROF_BEGIN;
    void *ws = op_scratch(rs_cuda_attention_flash_bwd_scratch_bytes(B, Tq, n_heads));
    rs_cuda_attention_flash_bwd(g_cuda.stream, (bf16 *)dq, (bf16 *)dk, (bf16 *)dv,
                                (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k,
                                (const bf16 *)v, (const bf16 *)out, lse, q_pos, B, Tq, Tk,
                                n_heads, n_kv_heads, head_dim, scale, ws);
    PROF_END("attention_bwd");
}

static void cuda_glu_bwd(void *dgate, void *dup, const void *dout, const void *gate,
                         const void *up, size_t n, rs_activation act) {
    PROF_BEGIN;
    rs_cuda_glu_bwd(g_cuda.stream, (bf16 *)dgate, (bf16 *)dup, (const bf16 *)dout,
                    (const bf16 *)gate, (const bf16 *)up, n, act);
    PROF_END("glu_bwd");
}

static void cuda_logprob_fwd(float *logp, float *lse, const void *logits, const int32_t *targets,
                             int n, int vocab) {
    PROF_BEGIN;
    rs_cuda_logprob_fwd(g_cuda.stream, logp, lse, (const bf16 *)logits, targets, n, vocab);
    PROF_END("logprob_fwd");
}

static void cuda_logprob_bwd(void *dlogits, const float *dlogp, const void *logits,
                             const float *lse, const int32_t *targets, int n, int vocab) {
    PROF_BEGIN;
    rs_cuda_logprob_bwd(g_cuda.stream, (bf16 *)dlogits, dlogp, (const bf16 *)logits, lse, targets,
                        n, vocab);
    PROF_END("logprob_bwd");
}

static void cuda_lora_fwd(void *y, float *xa, const void *x, const float *A, const float *B, int n,
                          int k, int m, int r, float scale, float beta) {
    PROF_BEGIN;
    void *scratch = op_scratch(rs_cuda_lora_scratch_bytes(n, k, m, r));
    rs_cuda_lora_fwd(g_cuda.stream, g_cuda.cublas, (bf16 *)y, xa, (const bf16 *)x, A, B, n, k, m,
                     r, scale, beta, scratch);
    PROF_END("lora_fwd");
}

/* The group ops: batched in lora.cu (the default: the DPO step 1.5% faster on an H100,
 * 2026-12-07); RESAFE_CUDA_LORA_GROUP=0 runs the single ops in turn, as the CPU backend does. */
static int lora_group_batched(void) {
    const char *e = getenv("RESAFE_CUDA_LORA_GROUP");
    return !(e && strcmp(e, "0") == 0);
}

static void cuda_lora_fwd_group(void *const *y, const void *x, const rs_lora_group *g, int n,
                                int k, int r, float scale, float beta) {
    if (!lora_group_batched()) {
        for (int i = 0; i < g->count; i++)
            cuda_lora_fwd(y[i], g->xa[i], x, g->A[i], g->B[i], n, k, g->m[i], r, scale, beta);
        return;
    }
    PROF_BEGIN;
    void *scratch = op_scratch(rs_cuda_lora_group_scratch_bytes(n, k, r, g));
    rs_cuda_lora_fwd_group(g_cuda.stream, g_cuda.cublas, (bf16 *const *)y, (const bf16 *)x, g,
                           n, k, r, scale, beta, scratch);
    PROF_END("lora_fwd_group");
}

static void cuda_lora_bwd(void *dx, float *dA, float *dB, const void *dy, const void *x,
                          const float *xa, const float *A, const float *B, int n, int k, int m,
                          int r, float scale, float beta) {
    PROF_BEGIN;
    void *scratch = op_scratch(rs_cuda_lora_scratch_bytes(n, k, m, r));
    rs_cuda_lora_bwd(g_cuda.stream, g_cuda.cublas, (bf16 *)dx, dA, dB, (const bf16 *)dy,
                     (const bf16 *)x, xa, A, B, n, k, m, r, scale, beta, scratch);
    PROF_END("lora_bwd");
}

static void cuda_lora_bwd_group(void *dx, const void *const *dy, const void *x,
                                const rs_lora_group *g, int n, int k, int r, float scale,
                                float beta) {
    if (!lora_group_batched()) {
        for (int i = 0; i < g->count; i++)
            cuda_lora_bwd(dx, g->dA[i], g->dB[i], dy[i], x, g->xa[i], g->A[i], g->B[i], n, k,
                          g->m[i], r, scale, i == 0 ? beta : 1.0f);
        return;
    }
    PROF_BEGIN;
    void *scratch = op_scratch(rs_cuda_lora_group_scratch_bytes(n, k, r, g));
    rs_cuda_lora_bwd_group(g_cuda.stream, g_cuda.cublas, (bf16 *)dx, (const bf16 *const *)dy,
                           (const bf16 *)x, g, n, k, r, scale, beta, scratch);
    PROF_END("lora_bwd_group");
}

static void cuda_lora_merge(void *w_eff, const void *w, const float *A, const float *B,
                            const uint8_t *mask, int m, int k, int r, float scale) {
    PROF_BEGIN;
    rs_cuda_lora_merge(g_cuda.stream, (bf16 *)w_eff, (const bf16 *)w, A, B, mask, m, k, r, scale);
    PROF_END("lora_merge");
}

static void cuda_lora_masked_grad(float *dA, float *dB, const float *dw, const uint8_t *mask,
                                  const float *A, const float *B, int m, int k, int r,
                                  float scale) {
    PROF_BEGIN;
    rs_cuda_lora_masked_grad(g_cuda.stream, dA, dB, dw, mask, A, B, m, k, r, scale);
    PROF_END("lora_masked_grad");
}

static void cuda_adamw(float *p, const float *g, float *m, float *v, const uint8_t *mask, size_t n,
                       float lr, float beta1, float beta2, float eps, float weight_decay, int step,
                       float grad_scale) {
    PROF_BEGIN;
    rs_cuda_adamw(g_cuda.stream, p, g, m, v, mask, n, lr, beta1, beta2, eps, weight_decay, step,
                  grad_scale);
    PROF_END("adamw");
}

static void cuda_sum_squares(double *out, const float *x, const uint8_t *mask, size_t n) {
    PROF_BEGIN;
    rs_cuda_sum_squares(g_cuda.stream, out, x, mask, n,
                        op_scratch(rs_cuda_sum_squares_scratch_bytes()));
    PROF_END("sum_squares");
}

static void cuda_snip_accumulate(float *score, const void *w, const float *dw, size_t n,
                                 float weight) {
    PROF_BEGIN;
    rs_cuda_snip_accumulate(g_cuda.stream, score, (const bf16 *)w, dw, n, weight);
    PROF_END("snip_accumulate");
}

static void cuda_zero_f32(float *x, size_t n) {
    PROF_BEGIN;
    rs_cuda_zero_f32(g_cuda.stream, x, n);
    PROF_END("zero_f32");
}

static void cuda_clamp_f32(float *x, const float *lo, const float *hi, size_t n) {
    PROF_BEGIN;
    rs_cuda_clamp_f32(g_cuda.stream, x, lo, hi, n);
    PROF_END("clamp_f32");
}

static void cuda_fake_quant_rows(void *w_q, const float *w, int rows, int cols, int bits,
                                 int symmetric) {
    PROF_BEGIN;
    rs_cuda_fake_quant_rows(g_cuda.stream, (bf16 *)w_q, w, rows, cols, bits, symmetric);
    PROF_END("fake_quant_rows");
}

static void cuda_fake_quant_groups(void *x, size_t n_groups, int group, int bits, int symmetric) {
    PROF_BEGIN;
    rs_cuda_fake_quant_groups(g_cuda.stream, (bf16 *)x, n_groups, group, bits, symmetric);
    PROF_END("fake_quant_groups");
}

static void cuda_cast_f32_to_weight(void *dst, const float *src, size_t n) {
    PROF_BEGIN;
    rs_cuda_convert_from_f32(g_cuda.stream, dst, RS_BF16, src, n);
    PROF_END("cast_f32_to_weight");
}

static void cuda_dropout(void *out, const void *x, size_t n, float p, uint64_t seed) {
    PROF_BEGIN;
    rs_cuda_dropout(g_cuda.stream, (bf16 *)out, (const bf16 *)x, n, p, seed);
    PROF_END("dropout");
}

/* ---------------------------------------------------------------- quantized linears
 * Baseline: dequantize into a bf16 scratch the size of the largest quantized weight seen (grown,
 * never shrunk), then cuBLAS. The scratch is separate from the op scratch so that the GEMM's own
 * temporaries never alias it. */
static bf16 *dequant_scratch(const rs_qweight *q) {
    size_t bytes = (size_t)q->rows * (size_t)q->cols * sizeof(bf16);
    if (bytes > g_cuda.qscratch_bytes) {
        CUDA_CHECK(cudaStreamSynchronize(g_cuda.stream));
        cuda_free(g_cuda.qscratch);
        g_cuda.qscratch = cuda_alloc(bytes);
        g_cuda.qscratch_bytes = bytes;
        rs_debug("cuda backend: dequant scratch grown to %.1f MiB", bytes / 1048576.0);
    }
    bf16 *w = (bf16 *)g_cuda.qscratch;
    rs_cuda_qdequantize(g_cuda.stream, w, q);
    return w;
}

/* Which path qmatmul takes (cuda_qmm.h): set from the environment at start, or by
 * rs_cuda_qmm_configure. */
static struct {
    rs_qmm_path path;
    int max_m, nt, splits;
} g_qmm = {RS_QMM_AUTO, RS_QMM_FUSED_MAX_M, 0, 0};

extern "C" void rs_cuda_qmm_configure(rs_qmm_path path, int nt, int splits) {
    g_qmm.path = path;
    g_qmm.nt = nt;
    g_qmm.splits = splits;
}

extern "C" int rs_cuda_qmm_fused_supported(const rs_qweight *q) { return rs_cuda_qmm_supported(q); }

extern "C" void *rs_cuda_stream_handle(void) { return (void *)g_cuda.stream; }

static void qmm_read_env(void) {
    const char *path = getenv("RESAFE_CUDA_QMATMUL"), *max_m = getenv("RESAFE_CUDA_QMM_MAX_M");
    if (path && strcmp(path, "fused") == 0) g_qmm.path = RS_QMM_FUSED;
    else if (path && strcmp(path, "scratch") == 0) g_qmm.path = RS_QMM_SCRATCH;
    else if (path && *path && strcmp(path, "auto") != 0)
        rs_warn("RESAFE_CUDA_QMATMUL=%s: want fused, scratch or auto; using auto", path);
    if (max_m && *max_m) {
        char *end;
        long v = strtol(max_m, &end, 10);
        if (*end || v < 0 || v > 1000000)
            rs_warn("RESAFE_CUDA_QMM_MAX_M=%s: want a row count; using %d", max_m, g_qmm.max_m);
        else
            g_qmm.max_m = (int)v;
    }
}

static int qmm_use_fused(const rs_qweight *w, int n) {
    if (g_qmm.path == RS_QMM_SCRATCH || !rs_cuda_qmm_supported(w)) return 0;
    return g_qmm.path == RS_QMM_FUSED || n <= g_qmm.max_m;
}

static void cuda_qmatmul(void *out, const void *x, const rs_qweight *w, const void *bias, int n,
                         float beta) {
    PROF_BEGIN;
    if (qmm_use_fused(w, n)) {
        size_t ws_bytes = rs_cuda_qmm_workspace_bytes(w, x, n, g_qmm.nt, g_qmm.splits);
        void *ws = ws_bytes ? op_scratch(ws_bytes) : NULL;
        rs_cuda_qmm(g_cuda.stream, (bf16 *)out, (const bf16 *)x, w, (const bf16 *)bias, n, beta,
                    ws, g_cuda.qmm_counters, QMM_COUNTERS, g_qmm.nt, g_qmm.splits);
        PROF_END("qmatmul_fused");
        return;
    }
    const bf16 *wd = dequant_scratch(w);
    rs_cuda_linear_fwd(g_cuda.stream, g_cuda.cublas, (bf16 *)out, (const bf16 *)x, wd,
                       (const bf16 *)bias, n, w->cols, w->rows, beta);
    PROF_END("qmatmul");
}

static void cuda_qmatmul_t(void *dx, const void *dout, const rs_qweight *w, int n, float beta) {
    PROF_BEGIN;
    const bf16 *wd = dequant_scratch(w);
    rs_cuda_linear_bwd(g_cuda.stream, g_cuda.cublas, (bf16 *)dx, NULL, NULL, (const bf16 *)dout,
                       NULL, wd, n, w->cols, w->rows, beta, NULL);
    PROF_END("qmatmul_t");
}

static void cuda_qdequantize(void *w, const rs_qweight *q) {
    PROF_BEGIN;
    rs_cuda_qdequantize(g_cuda.stream, (bf16 *)w, q);
    PROF_END("qdequantize");
}

static void *dev_copy(const void *host, size_t bytes) {
    if (!host) return NULL;
    void *d = cuda_alloc(bytes);
    cuda_to_device(d, host, bytes);
    return d;
}

static int cuda_qweight_upload(rs_qweight *dst, const rs_qweight *h) {
    size_t ng = (size_t)h->rows * h->n_groups;
    *dst = *h;
    dst->packed = (uint8_t *)dev_copy(h->packed, h->packed_bytes);
    dst->scales = (float *)dev_copy(h->scales, ng * sizeof(float));
    dst->zeros = (float *)dev_copy(h->zeros, ng * sizeof(float));
    dst->input_scale = (float *)dev_copy(h->input_scale, (size_t)h->cols * sizeof(float));
    dst->outlier_cols =
        (int32_t *)dev_copy(h->outlier_cols, (size_t)h->n_outlier_cols * sizeof(int32_t));
    dst->outlier_vals = (uint16_t *)dev_copy(
        h->outlier_vals, (size_t)h->rows * h->n_outlier_cols * sizeof(uint16_t));
    dst->crit_row_ptr =
        (int64_t *)dev_copy(h->crit_row_ptr, (size_t)(h->rows + 1) * sizeof(int64_t));
    dst->crit_cols = (int32_t *)dev_copy(h->crit_cols, (size_t)h->n_critical * sizeof(int32_t));
    dst->crit_vals = (uint16_t *)dev_copy(h->crit_vals, (size_t)h->n_critical * sizeof(uint16_t));
    return 0;
}

static void cuda_qweight_free(rs_qweight *w) {
    if (!w) return;
    cuda_free(w->packed), cuda_free(w->scales), cuda_free(w->zeros), cuda_free(w->input_scale);
    cuda_free(w->outlier_cols), cuda_free(w->outlier_vals), cuda_free(w->crit_row_ptr);
    cuda_free(w->crit_cols), cuda_free(w->crit_vals);
    memset(w, 0, sizeof *w);
}

static size_t cuda_workspace_bytes(void) {
    return CUBLAS_WORKSPACE_BYTES + STAGING_FLOATS * sizeof(float) + g_cuda.scratch_bytes +
           g_cuda.qscratch_bytes + QMM_COUNTERS * sizeof(int);
}

/* ---------------------------------------------------------------- set-up */
/* 0 when a usable device is present (compute capability 8.0+ for bf16), else -1 with a debug log:
 * a machine without a GPU is normal, not an error. */
static int cuda_probe(void) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        cudaGetLastError(); /* clear it: the CPU backend carries on */
        rs_debug("cuda backend: no CUDA device (%s)",
                 err != cudaSuccess ? cudaGetErrorString(err) : "device count is 0");
        return -1;
    }
    if (cudaGetDevice(&g_cuda.device) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, g_cuda.device) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    if (prop.major < 8) {
        rs_info("cuda backend: %s has compute capability %d.%d; bf16 kernels need 8.0 or newer",
                prop.name, prop.major, prop.minor);
        return -1;
    }
    rs_info("cuda backend: device %d, %s (sm_%d%d, %d SMs, %.1f GiB)", g_cuda.device, prop.name,
            prop.major, prop.minor, prop.multiProcessorCount,
            prop.totalGlobalMem / 1073741824.0);
    return 0;
}

static void cuda_init(void) {
    const char *sync = getenv("RESAFE_CUDA_SYNC");
    g_cuda.sync_after_launch = sync && strcmp(sync, "1") == 0;
    const char *prof = getenv("RESAFE_CUDA_PROFILE"), *mem = getenv("RESAFE_CUDA_MEMSTATS");
    g_prof.on = prof && strcmp(prof, "1") == 0;
    g_prof.memstats = mem && strcmp(mem, "1") == 0;
    if (g_prof.on || g_prof.memstats) atexit(prof_report);
    qmm_read_env();
    CUDA_CHECK(cudaStreamCreateWithFlags(&g_cuda.stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&g_cuda.cublas));
    CUBLAS_CHECK(cublasSetStream(g_cuda.cublas, g_cuda.stream));
    g_cuda.cublas_workspace = cuda_alloc(CUBLAS_WORKSPACE_BYTES);
    CUBLAS_CHECK(cublasSetWorkspace(g_cuda.cublas, g_cuda.cublas_workspace,
                                    CUBLAS_WORKSPACE_BYTES));
    g_cuda.staging = (float *)cuda_alloc(STAGING_FLOATS * sizeof(float));
    g_cuda.scratch = cuda_alloc(SCRATCH_INITIAL_BYTES);
    g_cuda.scratch_bytes = SCRATCH_INITIAL_BYTES;
    g_cuda.qmm_counters = (int *)cuda_alloc(QMM_COUNTERS * sizeof(int));
    CUDA_CHECK(cudaMemsetAsync(g_cuda.qmm_counters, 0, QMM_COUNTERS * sizeof(int), g_cuda.stream));

    rs_backend *b = &g_cuda.table;
    memset(b, 0, sizeof *b);
    b->name = "cuda";
    b->act_dtype = RS_BF16;
    b->weight_dtype = RS_BF16;
    b->free_rows = 256;
    b->alloc = cuda_alloc;
    b->free = cuda_free;
    b->to_device = cuda_to_device;
    b->to_host = cuda_to_host;
    b->copy = cuda_copy;
    b->synchronize = cuda_synchronize;
    b->upload_f32 = cuda_upload_f32;
    b->download_f32 = cuda_download_f32;
    b->peak_bytes = cuda_peak_bytes;
    b->live_bytes = cuda_live_bytes;
    b->workspace_bytes = cuda_workspace_bytes;
    b->mem_info = cuda_mem_info;
    b->embedding_fwd = cuda_embedding_fwd;
    b->rmsnorm_fwd = cuda_rmsnorm_fwd;
    b->linear_fwd = cuda_linear_fwd;
    b->rope_fwd = cuda_rope_fwd;
    b->attention_fwd = cuda_attention_fwd;
    b->glu_fwd = cuda_glu_fwd;
    b->add_inplace = cuda_add_inplace;
    b->scatter_rows = cuda_scatter_rows;
    b->gather_rows = cuda_gather_rows;
    b->act_to_f32 = cuda_act_to_f32;
    b->argmax_rows = cuda_argmax_rows;
    b->dropout = cuda_dropout;
    b->embedding_bwd = cuda_embedding_bwd;
    b->rmsnorm_bwd = cuda_rmsnorm_bwd;
    b->linear_bwd = cuda_linear_bwd;
    b->rope_bwd = cuda_rope_bwd;
    b->attention_bwd = cuda_attention_bwd;
    b->attention_fwd_lse = cuda_attention_fwd_lse;
    b->attention_bwd_saved = cuda_attention_bwd_saved;
    b->glu_bwd = cuda_glu_bwd;
    b->logprob_fwd = cuda_logprob_fwd;
    b->logprob_bwd = cuda_logprob_bwd;
    b->lora_fwd = cuda_lora_fwd;
    b->lora_bwd = cuda_lora_bwd;
    b->lora_fwd_group = cuda_lora_fwd_group;
    b->lora_bwd_group = cuda_lora_bwd_group;
    b->lora_merge = cuda_lora_merge;
    b->lora_masked_grad = cuda_lora_masked_grad;
    b->adamw = cuda_adamw;
    b->sum_squares = cuda_sum_squares;
    b->snip_accumulate = cuda_snip_accumulate;
    b->zero_f32 = cuda_zero_f32;
    b->clamp_f32 = cuda_clamp_f32;
    b->fake_quant_rows = cuda_fake_quant_rows;
    b->cast_f32_to_weight = cuda_cast_f32_to_weight;
    b->fake_quant_groups = cuda_fake_quant_groups;
    b->qmatmul = cuda_qmatmul;
    b->qmatmul_t = cuda_qmatmul_t;
    b->qweight_upload = cuda_qweight_upload;
    b->qweight_free = cuda_qweight_free;
    b->qdequantize = cuda_qdequantize;
}

extern "C" const rs_backend *rs_backend_cuda(void) {
    if (!g_cuda.tried) {
        g_cuda.tried = 1;
        if (cuda_probe() == 0) {
            cuda_init();
            g_cuda.usable = 1;
        }
    }
    return g_cuda.usable ? &g_cuda.table : NULL;
}
