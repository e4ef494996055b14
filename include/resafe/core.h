/* core: errors, logging, arena allocator, tensor views, rng. Depends on nothing. */
#ifndef RESAFE_CORE_H
#define RESAFE_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define RS_VERSION "0.1.0"

/* ---------------------------------------------------------------- errors
 * Library code never exits on bad input: it records one message with
 * rs_fail() and returns -1 (or NULL). The CLI prints the message once and
 * exits non-zero. Messages name the user's file and the problem, e.g.
 *   "model.safetensors: tensor 'x': data offsets [0, 99) exceed the 64-byte data section"
 * RS_CHECK is for conditions that are our own bugs or unrecoverable
 * (out of memory): it prints and exits. */

#if defined(__GNUC__)
#define RS_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define RS_PRINTF(a, b)
#endif

/* Record an error message (overwrites the previous one); returns -1. */
int rs_fail_at(const char *src_file, int src_line, const char *fmt, ...) RS_PRINTF(3, 4);
#define RS_FAIL(...) rs_fail_at(__FILE__, __LINE__, __VA_ARGS__)
/* Prefix the current message with "prefix: " (adds context on the way up). */
int rs_fail_context(const char *fmt, ...) RS_PRINTF(1, 2);
const char *rs_last_error(void);      /* the message, "" if none */
const char *rs_last_error_src(void);  /* "file.c:123" where it was raised */
void rs_clear_error(void);

/* Print "resafe: error: <msg> [src:line]" to stderr and exit(1). */
void rs_die_at(const char *src_file, int src_line, const char *fmt, ...) RS_PRINTF(3, 4);
#define RS_DIE(...) rs_die_at(__FILE__, __LINE__, __VA_ARGS__)
#define RS_CHECK(cond, ...)                                                                        \
    do {                                                                                           \
        if (!(cond)) rs_die_at(__FILE__, __LINE__, __VA_ARGS__);                                   \
    } while (0)
/* Text from a user's file as quoted in a one-line message: control bytes become '?', text
 * longer than the buffer is cut with "...". Returns buf. */
const char *rs_shown_text(const char *text, char *buf, size_t n);
/* "[2, 3, 4]" into buf, for messages. Returns buf. */
const char *rs_shape_text(char *buf, size_t cap, int ndim, const int64_t *shape);
/* Print the recorded error (rs_last_error) and exit(1). */
void rs_die_last(void);
/* Propagate failure of a call returning int (0 ok, -1 failed). */
#define RS_TRY(expr)                                                                               \
    do {                                                                                           \
        if ((expr) != 0) return -1;                                                                \
    } while (0)

/* ---------------------------------------------------------------- logging */
typedef enum { RS_LOG_ERROR = 0, RS_LOG_WARN = 1, RS_LOG_INFO = 2, RS_LOG_DEBUG = 3 } rs_log_level;
void rs_set_log_level(rs_log_level level); /* the one process-wide setting */
rs_log_level rs_get_log_level(void);
void rs_log(rs_log_level level, const char *fmt, ...) RS_PRINTF(2, 3);
#define rs_info(...) rs_log(RS_LOG_INFO, __VA_ARGS__)
#define rs_warn(...) rs_log(RS_LOG_WARN, __VA_ARGS__)
#define rs_debug(...) rs_log(RS_LOG_DEBUG, __VA_ARGS__)

/* ---------------------------------------------------------------- memory */
/* malloc/calloc/realloc that die with a clear message when memory runs out. */
void *rs_malloc(size_t bytes);
void *rs_calloc(size_t n, size_t size);
void *rs_realloc(void *p, size_t bytes);
char *rs_strdup(const char *s);
char *rs_strndup(const char *s, size_t n);
/* a*b and a+b with overflow detection: return 0 and set *out, or -1 on overflow. */
int rs_mul_size(size_t a, size_t b, size_t *out);
int rs_add_size(size_t a, size_t b, size_t *out);

/* Arena: one allocation, bump-pointer sub-allocations, named so the plan can be printed. */
#define RS_ARENA_MAX_NAMES 256
typedef struct {
    uint8_t *base;
    size_t capacity, used;
    int n_entries;
    struct {
        char name[48];
        size_t offset, bytes;
    } entries[RS_ARENA_MAX_NAMES];
} rs_arena;
void rs_arena_init(rs_arena *a, size_t capacity); /* allocates capacity bytes (64-byte aligned) */
void rs_arena_free(rs_arena *a);
/* Returns 64-byte aligned memory; dies if the plan was too small (a bug, not user input). */
void *rs_arena_alloc(rs_arena *a, const char *name, size_t bytes);
void rs_arena_reset(rs_arena *a);
void rs_arena_print_plan(const rs_arena *a, FILE *f);
/* Round up to a multiple of 64, used when sizing plans. */
static inline size_t rs_align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* ---------------------------------------------------------------- dtypes and tensor views */
typedef enum {
    RS_F32 = 0,
    RS_F16,
    RS_BF16,
    RS_F64,
    RS_I64,
    RS_I32,
    RS_I16,
    RS_I8,
    RS_U8,
    RS_BOOL,
    RS_DTYPE_COUNT
} rs_dtype;
size_t rs_dtype_size(rs_dtype t);
const char *rs_dtype_name(rs_dtype t); /* safetensors spelling: "F32", "BF16", ... */
int rs_dtype_from_name(const char *name, rs_dtype *out); /* 0 ok, -1 unknown (no message) */

#define RS_MAX_DIMS 8
typedef struct {
    rs_dtype dtype;
    int ndim;
    int64_t shape[RS_MAX_DIMS];
    void *data;
} rs_tensor;
int64_t rs_tensor_numel(const rs_tensor *t);
rs_tensor rs_tensor_view(void *data, rs_dtype dtype, int ndim, const int64_t *shape);

/* Scalar conversions used by readers and the CPU backend. */
float rs_bf16_to_f32(uint16_t h);
uint16_t rs_f32_to_bf16(float f); /* round to nearest even; NaN stays NaN */
float rs_f16_to_f32(uint16_t h);
uint16_t rs_f32_to_f16(float f);
/* Convert n elements of src (dtype F32/F16/BF16/F64) to f32. Returns -1 for other dtypes. */
int rs_convert_to_f32(float *dst, const void *src, rs_dtype dtype, size_t n);

/* ---------------------------------------------------------------- rng
 * xoshiro256** seeded through splitmix64: small state, saved in checkpoints. */
typedef struct {
    uint64_t s[4];
} rs_rng;
void rs_rng_seed(rs_rng *r, uint64_t seed);
uint64_t rs_rng_next(rs_rng *r);
float rs_rng_uniform(rs_rng *r); /* [0, 1) with 24 random bits */
float rs_rng_normal(rs_rng *r);  /* Box-Muller */

/* ---------------------------------------------------------------- files */
/* Read a whole file into a NUL-terminated buffer. -1 with message on failure. */
int rs_read_file(const char *path, char **data, size_t *size);
/* Write bytes to path atomically: path.tmp.<pid>, fsync, rename. */
int rs_write_file_atomic(const char *path, const void *data, size_t size);
/* Copy a file to dst (rs_write_file_atomic), or to dir/name. -1 with message on failure. */
int rs_copy_file(const char *src, const char *dst);
int rs_copy_file_into(const char *src, const char *dir, const char *name);
/* Make a temporary sibling name for path ("<path>.tmp.<pid>"); caller frees. */
char *rs_tmp_name(const char *path);
int rs_path_is_dir(const char *path);
int rs_path_exists(const char *path);
/* dir + "/" + name; caller frees. */
char *rs_path_join(const char *dir, const char *name);
/* Create a directory and its parents (like mkdir -p). */
int rs_mkdir_p(const char *path);

/* Command-line numbers: the whole string must parse and lie in [lo, hi]; 0, or -1 (no message:
 * the caller names the option). */
int rs_parse_long(const char *s, long lo, long hi, long *out);
int rs_parse_float(const char *s, float lo, float hi, float *out);

/* Monotonic seconds, for progress and timing. */
double rs_now(void);

#endif
