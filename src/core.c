/* core: errors, logging, memory, arena, dtypes, rng, files. */
#define _POSIX_C_SOURCE 200809L
#include "resafe/core.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- errors */

static _Thread_local char g_err[1024];
static _Thread_local char g_err_src[160];
static rs_log_level g_log_level = RS_LOG_INFO;

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* Messages are one line: names read from files can hold escaped newlines or other control
 * characters, shown as '?'. */
static void one_line(char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f) *s = '?';
}

int rs_fail_at(const char *src_file, int src_line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    one_line(g_err);
    snprintf(g_err_src, sizeof g_err_src, "%s:%d", base_name(src_file), src_line);
    return -1;
}

int rs_fail_context(const char *fmt, ...) {
    char buf[sizeof g_err];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return -1;
    size_t used = strlen(buf);
    if (used + 2 < sizeof buf) {
        memcpy(buf + used, ": ", 2);
        size_t room = sizeof buf - used - 3, len = strlen(g_err);
        if (len > room) len = room;
        memcpy(buf + used + 2, g_err, len);
        buf[used + 2 + len] = 0;
    }
    memcpy(g_err, buf, sizeof g_err);
    one_line(g_err);
    return -1;
}

const char *rs_last_error(void) { return g_err; }
const char *rs_last_error_src(void) { return g_err_src; }
void rs_clear_error(void) { g_err[0] = g_err_src[0] = 0; }

void rs_die_at(const char *src_file, int src_line, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    one_line(msg);
    fflush(stdout);
    fprintf(stderr, "resafe: error: %s [%s:%d]\n", msg, base_name(src_file), src_line);
    exit(1);
}

const char *rs_shown_text(const char *text, char *buf, size_t n) {
    size_t j = 0;
    for (const unsigned char *p = (const unsigned char *)text; *p && j + 4 < n; p++)
        buf[j++] = *p < 0x20 || *p == 0x7f ? '?' : (char)*p;
    if (text[j] && j + 4 >= n) memcpy(buf + j, "...", 3), j += 3;
    buf[j] = 0;
    return buf;
}

const char *rs_shape_text(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && used < cap; i++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (used < cap) snprintf(buf + used, cap - used, "]");
    return buf;
}

void rs_die_last(void) {
    fflush(stdout);
    fprintf(stderr, "resafe: error: %s [%s]\n", g_err[0] ? g_err : "unknown error",
            g_err_src[0] ? g_err_src : "?");
    exit(1);
}

/* ---------------------------------------------------------------- logging */

void rs_set_log_level(rs_log_level level) { g_log_level = level; }
rs_log_level rs_get_log_level(void) { return g_log_level; }

void rs_log(rs_log_level level, const char *fmt, ...) {
    static const char *tag[] = {"error", "warning", "info", "debug"};
    if (level > g_log_level) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "resafe: %s: ", tag[level]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* ---------------------------------------------------------------- memory */

void *rs_malloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    RS_CHECK(p, "out of memory allocating %zu bytes", bytes);
    return p;
}

void *rs_calloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    RS_CHECK(p, "out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

void *rs_realloc(void *p, size_t bytes) {
    void *q = realloc(p, bytes ? bytes : 1);
    RS_CHECK(q, "out of memory reallocating %zu bytes", bytes);
    return q;
}

char *rs_strdup(const char *s) { return rs_strndup(s, strlen(s)); }

char *rs_strndup(const char *s, size_t n) {
    char *d = rs_malloc(n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

int rs_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}

int rs_add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return -1;
    *out = a + b;
    return 0;
}

/* ---------------------------------------------------------------- arena */

void rs_arena_init(rs_arena *a, size_t capacity) {
    memset(a, 0, sizeof *a);
    capacity = rs_align64(capacity ? capacity : 64);
    a->base = aligned_alloc(64, capacity);
    RS_CHECK(a->base, "out of memory allocating an arena of %zu bytes", capacity);
    a->capacity = capacity;
}

void rs_arena_free(rs_arena *a) {
    free(a->base);
    memset(a, 0, sizeof *a);
}

void *rs_arena_alloc(rs_arena *a, const char *name, size_t bytes) {
    size_t need = rs_align64(bytes);
    RS_CHECK(a->used + need <= a->capacity,
             "arena plan too small: '%s' needs %zu bytes, %zu of %zu used", name, need, a->used,
             a->capacity);
    if (a->n_entries < RS_ARENA_MAX_NAMES) {
        snprintf(a->entries[a->n_entries].name, sizeof a->entries[0].name, "%s", name);
        a->entries[a->n_entries].offset = a->used;
        a->entries[a->n_entries].bytes = need;
        a->n_entries++;
    }
    void *p = a->base + a->used;
    a->used += need;
    return p;
}

void rs_arena_reset(rs_arena *a) {
    a->used = 0;
    a->n_entries = 0;
}

void rs_arena_print_plan(const rs_arena *a, FILE *f) {
    fprintf(f, "memory plan: %.2f MiB of %.2f MiB\n", a->used / 1048576.0, a->capacity / 1048576.0);
    for (int i = 0; i < a->n_entries; i++)
        fprintf(f, "  %-32s %12zu bytes\n", a->entries[i].name, a->entries[i].bytes);
}

/* ---------------------------------------------------------------- dtypes */

static const struct {
    const char *name;
    size_t size;
} g_dtypes[RS_DTYPE_COUNT] = {
    [RS_F32] = {"F32", 4}, [RS_F16] = {"F16", 2}, [RS_BF16] = {"BF16", 2}, [RS_F64] = {"F64", 8},
    [RS_I64] = {"I64", 8}, [RS_I32] = {"I32", 4}, [RS_I16] = {"I16", 2},  [RS_I8] = {"I8", 1},
    [RS_U8] = {"U8", 1},   [RS_BOOL] = {"BOOL", 1},
};

size_t rs_dtype_size(rs_dtype t) { return (unsigned)t < RS_DTYPE_COUNT ? g_dtypes[t].size : 0; }
const char *rs_dtype_name(rs_dtype t) {
    return (unsigned)t < RS_DTYPE_COUNT ? g_dtypes[t].name : "?";
}

int rs_dtype_from_name(const char *name, rs_dtype *out) {
    for (int i = 0; i < RS_DTYPE_COUNT; i++)
        if (strcmp(name, g_dtypes[i].name) == 0) {
            *out = (rs_dtype)i;
            return 0;
        }
    return -1;
}

int64_t rs_tensor_numel(const rs_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

rs_tensor rs_tensor_view(void *data, rs_dtype dtype, int ndim, const int64_t *shape) {
    rs_tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = dtype;
    t.ndim = ndim;
    for (int i = 0; i < ndim && i < RS_MAX_DIMS; i++) t.shape[i] = shape[i];
    t.data = data;
    return t;
}

float rs_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t rs_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                             /* nearest even */
    return (uint16_t)(u >> 16);
}

float rs_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else { /* subnormal: value = mant * 2^-24 */
            float f = ldexpf((float)mant, -24);
            return sign ? -f : f;
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t rs_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return sign | 0x7e00;        /* NaN */
    if (absu >= 0x477ff000u) return sign | 0x7c00;       /* overflow to inf (rounded) */
    if (absu < 0x38800000u) {                             /* subnormal or zero */
        float a;
        memcpy(&a, &absu, 4);
        return sign | (uint16_t)lrintf(a * 16777216.0f); /* 2^24, nearest even */
    }
    uint32_t exp = (absu >> 23) - 112, mant = absu & 0x7fffff;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return sign | (uint16_t)h;
}

int rs_convert_to_f32(float *dst, const void *src, rs_dtype dtype, size_t n) {
    switch (dtype) {
    case RS_F32: memcpy(dst, src, n * 4); return 0;
    case RS_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, (const uint8_t *)src + 8 * i, 8);
            dst[i] = (float)d;
        }
        return 0;
    case RS_BF16:
    case RS_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, (const uint8_t *)src + 2 * i, 2);
            dst[i] = dtype == RS_BF16 ? rs_bf16_to_f32(h) : rs_f16_to_f32(h);
        }
        return 0;
    default: return -1;
    }
}

/* ---------------------------------------------------------------- rng */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void rs_rng_seed(rs_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t rs_rng_next(rs_rng *r) {
    uint64_t *s = r->s, result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float rs_rng_uniform(rs_rng *r) { return (float)(rs_rng_next(r) >> 40) * (1.0f / 16777216.0f); }

float rs_rng_normal(rs_rng *r) {
    float u1 = rs_rng_uniform(r), u2 = rs_rng_uniform(r);
    if (u1 < 1e-12f) u1 = 1e-12f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
}

/* ---------------------------------------------------------------- files */

int rs_read_file(const char *path, char **data, size_t *size) {
    if (rs_path_is_dir(path)) return RS_FAIL("%s: is a directory, not a file", path);
    FILE *f = fopen(path, "rb");
    if (!f) return RS_FAIL("%s: cannot open: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return RS_FAIL("%s: cannot seek: %s", path, strerror(errno));
    }
    long n = ftell(f);
    if (n < 0) {
        fclose(f);
        return RS_FAIL("%s: cannot read size (is it a directory?)", path);
    }
    rewind(f);
    char *buf = rs_malloc((size_t)n + 1);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return RS_FAIL("%s: short read", path);
    }
    fclose(f);
    buf[n] = 0;
    *data = buf;
    if (size) *size = (size_t)n;
    return 0;
}

char *rs_tmp_name(const char *path) {
    static _Atomic unsigned counter; /* two writers in one process get different names */
    size_t n = strlen(path) + 48;
    char *t = rs_malloc(n);
    snprintf(t, n, "%s.tmp.%ld.%u", path, (long)getpid(), counter++);
    return t;
}

int rs_write_file_atomic(const char *path, const void *data, size_t size) {
    char *tmp = rs_tmp_name(path);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        RS_FAIL("%s: cannot create: %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    int ok = fwrite(data, 1, size, f) == size;
    ok = (fflush(f) == 0) && ok;
    ok = (fsync(fileno(f)) == 0) && ok;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        RS_FAIL("%s: write failed: %s", path, strerror(errno));
        remove(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}

int rs_copy_file(const char *src, const char *dst) {
    char *data;
    size_t size;
    RS_TRY(rs_read_file(src, &data, &size));
    int rc = rs_write_file_atomic(dst, data, size);
    free(data);
    return rc;
}

int rs_copy_file_into(const char *src, const char *dir, const char *name) {
    char *dst = rs_path_join(dir, name);
    int rc = rs_copy_file(src, dst);
    free(dst);
    return rc;
}

int rs_path_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int rs_path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

char *rs_path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = rs_malloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int rs_mkdir_p(const char *path) {
    char *p = rs_strdup(path);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            RS_FAIL("%s: cannot create directory: %s", p, strerror(errno));
            free(p);
            return -1;
        }
        *s = '/';
    }
    int rc = 0;
    if (mkdir(p, 0755) != 0 && errno != EEXIST) rc = RS_FAIL("%s: cannot create directory: %s", p, strerror(errno));
    free(p);
    return rc;
}

int rs_parse_long(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int rs_parse_float(const char *s, float lo, float hi, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) return -1;
    *out = v;
    return 0;
}

double rs_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
