/* h5store: HDF5 files for resafe's artifacts. Every HDF5 call is checked; a failure becomes one
 * RS_FAIL message naming the file and the dataset or attribute, with HDF5's innermost reason. */
#define _POSIX_C_SOURCE 200809L
#include "resafe/h5store.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct rs_h5 {
    hid_t file;
    char *path; /* final name, used in messages */
    char *tmp;  /* temporary name while writing, NULL for a file opened to read */
};

/* ---------------------------------------------------------------- errors */

/* Control characters in names read from a file are made one-line by rs_fail_at (core.c). */
#define H5_FAIL(...) RS_FAIL(__VA_ARGS__)

static herr_t keep_innermost(unsigned n, const H5E_error2_t *err, void *buf) {
    if (n == 0 && err->desc) snprintf(buf, 200, "%s", err->desc);
    return 0;
}

/* Record "<file>: <what>: <message> (HDF5: <reason>)". Call right after the failing HDF5 call:
 * the next HDF5 call clears its error stack. what may be NULL (the file itself). */
static int h5_fail(const rs_h5 *h, const char *what, const char *fmt, ...) RS_PRINTF(3, 4);
static int h5_fail(const rs_h5 *h, const char *what, const char *fmt, ...) {
    char msg[512], reason[200] = "";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, keep_innermost, reason);
    H5Eclear2(H5E_DEFAULT);
    return H5_FAIL("%s: %s%s%s%s%s%s", h->path, what ? what : "", what ? ": " : "", msg,
                   reason[0] ? " (HDF5: " : "", reason, reason[0] ? ")" : "");
}

/* "dataset 'a/b'" into buf, for the what of h5_fail. */
static const char *named(char *buf, size_t cap, const char *kind, const char *name) {
    snprintf(buf, cap, "%s '%s'", kind, name && *name ? name : "/");
    return buf;
}

static void silence_hdf5(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

/* ---------------------------------------------------------------- dtypes */

static hid_t file_type_of(rs_dtype t) {
    switch (t) {
    case RS_F32: return H5T_IEEE_F32LE;
    case RS_F64: return H5T_IEEE_F64LE;
    case RS_I8: return H5T_STD_I8LE;
    case RS_I16: return H5T_STD_I16LE;
    case RS_I32: return H5T_STD_I32LE;
    case RS_I64: return H5T_STD_I64LE;
    case RS_U8: return H5T_STD_U8LE;
    default: return H5I_INVALID_HID;
    }
}

static hid_t memory_type_of(rs_dtype t) {
    switch (t) {
    case RS_F32: return H5T_NATIVE_FLOAT;
    case RS_F64: return H5T_NATIVE_DOUBLE;
    case RS_I8: return H5T_NATIVE_INT8;
    case RS_I16: return H5T_NATIVE_INT16;
    case RS_I32: return H5T_NATIVE_INT32;
    case RS_I64: return H5T_NATIVE_INT64;
    case RS_U8: return H5T_NATIVE_UINT8;
    default: return H5I_INVALID_HID;
    }
}

/* Our dtype for a stored numeric type (any byte order), -1 when we have none. */
static int dtype_of_type(hid_t type, rs_dtype *out) {
    H5T_class_t cls = H5Tget_class(type);
    size_t size = H5Tget_size(type);
    if (cls == H5T_FLOAT && (size == 4 || size == 8)) {
        *out = size == 4 ? RS_F32 : RS_F64;
        return 0;
    }
    if (cls != H5T_INTEGER) return -1;
    H5T_sign_t sign = H5Tget_sign(type);
    if (sign == H5T_SGN_NONE && size == 1) *out = RS_U8;
    else if (sign == H5T_SGN_2 && size == 1) *out = RS_I8;
    else if (sign == H5T_SGN_2 && size == 2) *out = RS_I16;
    else if (sign == H5T_SGN_2 && size == 4) *out = RS_I32;
    else if (sign == H5T_SGN_2 && size == 8) *out = RS_I64;
    else return -1;
    return 0;
}

/* ---------------------------------------------------------------- files */

/* Library defaults plus: format 1.8 or later (attributes over 64 KB, readable by every current
 * HDF5), and closing the file closes whatever object is still open. */
static hid_t file_access_list(void) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0) return fapl;
    if (H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST) < 0 ||
        H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG) < 0) {
        H5Pclose(fapl);
        return H5I_INVALID_HID;
    }
    return fapl;
}

static rs_h5 *new_handle(const char *path) {
    rs_h5 *h = rs_calloc(1, sizeof *h);
    h->file = H5I_INVALID_HID;
    h->path = rs_strdup(path);
    return h;
}

static void free_handle(rs_h5 *h) {
    free(h->path);
    free(h->tmp);
    free(h);
}

/* A creation list of class cls (file, group or dataset) that records no modification times:
 * without it two runs writing the same content give files that differ in their timestamps,
 * and resumed runs must be byte-identical to uninterrupted ones. */
static hid_t untimed_list(hid_t cls) {
    hid_t list = H5Pcreate(cls);
    if (list >= 0 && H5Pset_obj_track_times(list, 0) < 0) {
        H5Pclose(list);
        return H5I_INVALID_HID;
    }
    return list;
}

int rs_h5_create(const char *path, rs_h5 **out) {
    silence_hdf5();
    rs_h5 *h = new_handle(path);
    h->tmp = rs_tmp_name(path);
    hid_t fapl = file_access_list(), fcpl = untimed_list(H5P_FILE_CREATE);
    if (fapl >= 0 && fcpl >= 0) h->file = H5Fcreate(h->tmp, H5F_ACC_TRUNC, fcpl, fapl);
    if (fcpl >= 0) H5Pclose(fcpl);
    if (h->file < 0) {
        h5_fail(h, NULL, "cannot create %s", h->tmp);
        if (fapl >= 0) H5Pclose(fapl);
        free_handle(h);
        return -1;
    }
    H5Pclose(fapl);
    *out = h;
    return 0;
}

int rs_h5_open(const char *path, rs_h5 **out) {
    silence_hdf5();
    if (access(path, R_OK) != 0) return H5_FAIL("%s: cannot open: %s", path, strerror(errno));
    rs_h5 *h = new_handle(path);
    hid_t fapl = file_access_list();
    if (fapl >= 0) h->file = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    if (h->file < 0) {
        h5_fail(h, NULL, "not a readable HDF5 file");
        if (fapl >= 0) H5Pclose(fapl);
        free_handle(h);
        return -1;
    }
    H5Pclose(fapl);
    *out = h;
    return 0;
}

/* Make the closed temporary durable before it takes the final name. */
static int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int rs_h5_commit(rs_h5 *h) {
    if (!h->tmp) {
        H5_FAIL("%s: commit of a file opened for reading", h->path);
        rs_h5_close(h);
        return -1;
    }
    int rc = 0;
    if (H5Fclose(h->file) < 0) rc = h5_fail(h, NULL, "cannot finish writing %s", h->tmp);
    h->file = H5I_INVALID_HID;
    if (rc == 0 && (fsync_path(h->tmp) != 0 || rename(h->tmp, h->path) != 0))
        rc = H5_FAIL("%s: cannot move %s into place: %s", h->path, h->tmp, strerror(errno));
    if (rc != 0) remove(h->tmp);
    free_handle(h);
    return rc;
}

void rs_h5_close(rs_h5 *h) {
    if (!h) return;
    if (h->file >= 0) H5Fclose(h->file);
    if (h->tmp) remove(h->tmp); /* not committed: an unfinished file must not look finished */
    free_handle(h);
}

const char *rs_h5_path(const rs_h5 *h) { return h->path; }

/* ---------------------------------------------------------------- paths */

/* "a/b/c": no empty, "." or ".." components. The root is not a dataset or group to create. */
static int check_path(const rs_h5 *h, const char *kind, const char *path) {
    if (!path || !*path) return H5_FAIL("%s: empty %s name", h->path, kind);
    for (const char *s = path;;) {
        const char *slash = strchr(s, '/');
        size_t len = slash ? (size_t)(slash - s) : strlen(s);
        if (len == 0 || (len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.'))
            return H5_FAIL("%s: %s name '%s' has an empty, '.' or '..' component", h->path, kind, path);
        if (!slash) return 0;
        s = slash + 1;
    }
}

static int is_root(const char *object) { return !object || !*object || strcmp(object, "/") == 0; }

/* Each prefix must exist in turn (HDF5 1.10's H5Lexists fails on a missing parent). */
static int path_exists(hid_t file, const char *path) {
    char *p = rs_strdup(path);
    int exists = 1;
    for (char *s = p; exists;) {
        char *slash = strchr(s, '/');
        if (slash) *slash = 0;
        exists = H5Lexists(file, p, H5P_DEFAULT) > 0;
        if (!slash) break;
        *slash = '/';
        s = slash + 1;
    }
    free(p);
    H5Eclear2(H5E_DEFAULT);
    return exists;
}

int rs_h5_exists(rs_h5 *h, const char *object) {
    if (is_root(object)) return 1;
    if (check_path(h, "object", object) != 0) return 0;
    return path_exists(h->file, object);
}

static int check_writing(const rs_h5 *h, const char *what) {
    return h->tmp ? 0 : H5_FAIL("%s: %s: the file is open for reading only", h->path, what);
}

/* Create the missing parent groups of path ("a/b/c" -> "a", "a/b"), untimed (HDF5's own
 * intermediate-group creation would record times). */
static int make_parents(rs_h5 *h, const char *what, const char *path) {
    char *p = rs_strdup(path);
    int rc = 0;
    hid_t gcpl = untimed_list(H5P_GROUP_CREATE);
    if (gcpl < 0) rc = h5_fail(h, what, "cannot create a property list");
    for (char *s = p + (p[0] == '/'); rc == 0 && (s = strchr(s, '/')) != NULL; s++) {
        *s = 0;
        if (!path_exists(h->file, p)) {
            hid_t g = H5Gcreate2(h->file, p, H5P_DEFAULT, gcpl, H5P_DEFAULT);
            if (g < 0) rc = h5_fail(h, what, "cannot create parent group '%s'", p);
            else H5Gclose(g);
        }
        *s = '/';
    }
    if (gcpl >= 0) H5Pclose(gcpl);
    free(p);
    return rc;
}

int rs_h5_create_group(rs_h5 *h, const char *group) {
    char what[300];
    named(what, sizeof what, "group", group);
    RS_TRY(check_writing(h, what));
    RS_TRY(check_path(h, "group", group));
    if (path_exists(h->file, group)) {
        hid_t obj = H5Oopen(h->file, group, H5P_DEFAULT);
        int is_group = obj >= 0 && H5Iget_type(obj) == H5I_GROUP;
        if (obj >= 0) H5Oclose(obj);
        H5Eclear2(H5E_DEFAULT);
        return is_group ? 0 : H5_FAIL("%s: %s exists and is not a group", h->path, what);
    }
    RS_TRY(make_parents(h, what, group));
    hid_t gcpl = untimed_list(H5P_GROUP_CREATE), g = H5I_INVALID_HID;
    if (gcpl >= 0) g = H5Gcreate2(h->file, group, H5P_DEFAULT, gcpl, H5P_DEFAULT);
    int rc = g < 0 ? h5_fail(h, what, "cannot create") : 0;
    if (g >= 0) H5Gclose(g);
    if (gcpl >= 0) H5Pclose(gcpl);
    return rc;
}

/* ---------------------------------------------------------------- writing datasets */

/* Scalar for ndim 0, else simple with these dims (zero-length dims are allowed). */
static hid_t make_space(int ndim, const int64_t *shape) {
    if (ndim == 0) return H5Screate(H5S_SCALAR);
    hsize_t dims[RS_MAX_DIMS];
    for (int i = 0; i < ndim; i++) dims[i] = (hsize_t)shape[i];
    return H5Screate_simple(ndim, dims, NULL);
}

/* Create dataset of file type ftype and space, write data (memory type mtype) unless empty. */
static int create_and_write(rs_h5 *h, const char *what, const char *name, hid_t ftype, hid_t mtype,
                            hid_t space, const void *data, int has_data) {
    if (path_exists(h->file, name)) return H5_FAIL("%s: %s already exists", h->path, what);
    RS_TRY(make_parents(h, what, name));
    hid_t dcpl = untimed_list(H5P_DATASET_CREATE), ds = H5I_INVALID_HID;
    if (dcpl >= 0) ds = H5Dcreate2(h->file, name, ftype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    int rc = 0;
    if (ds < 0) rc = h5_fail(h, what, "cannot create");
    else if (has_data && H5Dwrite(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
        rc = h5_fail(h, what, "cannot write");
    if (ds >= 0) H5Dclose(ds);
    if (dcpl >= 0) H5Pclose(dcpl);
    return rc;
}

int rs_h5_write(rs_h5 *h, const char *dataset, rs_dtype dtype, int ndim, const int64_t *shape,
                const void *data) {
    char what[300];
    named(what, sizeof what, "dataset", dataset);
    RS_TRY(check_writing(h, what));
    RS_TRY(check_path(h, "dataset", dataset));
    if (file_type_of(dtype) < 0)
        return H5_FAIL("%s: %s: dtype %s is not stored in HDF5 files", h->path, what, rs_dtype_name(dtype));
    if (ndim < 0 || ndim > RS_MAX_DIMS) return H5_FAIL("%s: %s: %d dimensions", h->path, what, ndim);
    size_t numel = 1;
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0 || rs_mul_size(numel, (size_t)shape[i], &numel) != 0)
            return H5_FAIL("%s: %s: bad shape entry %lld", h->path, what, (long long)shape[i]);
    if (numel && !data) return H5_FAIL("%s: %s: no data", h->path, what);
    hid_t space = make_space(ndim, shape);
    if (space < 0) return h5_fail(h, what, "cannot make a dataspace");
    int rc = create_and_write(h, what, dataset, file_type_of(dtype), memory_type_of(dtype), space, data,
                              numel > 0);
    H5Sclose(space);
    return rc;
}

/* Variable-length UTF-8 string type, the one h5py writes for str. */
static hid_t utf8_string_type(void) {
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t >= 0 && (H5Tset_size(t, H5T_VARIABLE) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0)) {
        H5Tclose(t);
        return H5I_INVALID_HID;
    }
    return t;
}

int rs_h5_write_strings(rs_h5 *h, const char *dataset, const char *const *strings, int64_t n) {
    char what[300];
    named(what, sizeof what, "dataset", dataset);
    RS_TRY(check_writing(h, what));
    RS_TRY(check_path(h, "dataset", dataset));
    if (n < 0) return H5_FAIL("%s: %s: negative string count", h->path, what);
    for (int64_t i = 0; i < n; i++)
        if (!strings[i]) return H5_FAIL("%s: %s: string %lld is NULL", h->path, what, (long long)i);
    hid_t type = utf8_string_type(), space = make_space(1, &n);
    int rc = type < 0 || space < 0 ? h5_fail(h, what, "cannot make a string type")
                                   : create_and_write(h, what, dataset, type, type, space, strings, n > 0);
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    return rc;
}

/* ---------------------------------------------------------------- describing datasets */

/* Kind, dtype and shape of an open dataset. */
static void describe(hid_t ds, rs_h5_dataset *info) {
    hid_t type = H5Dget_type(ds), space = H5Dget_space(ds);
    memset(info, 0, sizeof *info);
    info->kind = RS_H5_OTHER;
    H5S_class_t sclass = space >= 0 ? H5Sget_simple_extent_type(space) : H5S_NO_CLASS;
    int ndim = sclass == H5S_SIMPLE ? H5Sget_simple_extent_ndims(space) : 0;
    if ((sclass == H5S_SCALAR || sclass == H5S_SIMPLE) && ndim >= 0 && ndim <= RS_MAX_DIMS && type >= 0) {
        hsize_t dims[RS_MAX_DIMS];
        if (ndim > 0) H5Sget_simple_extent_dims(space, dims, NULL);
        info->ndim = ndim;
        for (int i = 0; i < ndim; i++) info->shape[i] = (int64_t)dims[i];
        if (H5Tget_class(type) == H5T_STRING) info->kind = ndim <= 1 ? RS_H5_STRINGS : RS_H5_OTHER;
        else if (dtype_of_type(type, &info->dtype) == 0) info->kind = RS_H5_NUMBERS;
    }
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    H5Eclear2(H5E_DEFAULT);
}

static hid_t open_dataset(rs_h5 *h, const char *what, const char *dataset) {
    if (check_path(h, "dataset", dataset) != 0) return H5I_INVALID_HID;
    if (!path_exists(h->file, dataset)) {
        H5_FAIL("%s: %s does not exist", h->path, what);
        return H5I_INVALID_HID;
    }
    hid_t ds = H5Dopen2(h->file, dataset, H5P_DEFAULT);
    if (ds < 0) h5_fail(h, what, "cannot open as a dataset");
    return ds;
}

int rs_h5_info(rs_h5 *h, const char *dataset, rs_h5_dataset *info) {
    char what[300];
    hid_t ds = open_dataset(h, named(what, sizeof what, "dataset", dataset), dataset);
    if (ds < 0) return -1;
    describe(ds, info);
    H5Dclose(ds);
    return 0;
}

typedef struct {
    rs_h5_dataset *items;
    int n, cap;
} dataset_list;

/* H5Lvisit callback: every hard link to a dataset becomes an entry. */
static herr_t collect_dataset(hid_t root, const char *name, const H5L_info_t *link, void *data) {
    if (link->type != H5L_TYPE_HARD) return 0;
    hid_t obj = H5Oopen(root, name, H5P_DEFAULT);
    if (obj < 0) return 0;
    if (H5Iget_type(obj) == H5I_DATASET) {
        dataset_list *list = data;
        if (list->n == list->cap) {
            list->cap = list->cap ? 2 * list->cap : 16;
            list->items = rs_realloc(list->items, (size_t)list->cap * sizeof *list->items);
        }
        describe(obj, &list->items[list->n]);
        list->items[list->n++].path = rs_strdup(name);
    }
    H5Oclose(obj);
    return 0;
}

int rs_h5_list(rs_h5 *h, rs_h5_dataset **datasets, int *n) {
    dataset_list list = {0};
    if (H5Lvisit(h->file, H5_INDEX_NAME, H5_ITER_INC, collect_dataset, &list) < 0) {
        rs_h5_free_list(list.items, list.n);
        return h5_fail(h, NULL, "cannot list datasets");
    }
    *datasets = list.items;
    *n = list.n;
    return 0;
}

void rs_h5_free_list(rs_h5_dataset *datasets, int n) {
    for (int i = 0; i < n; i++) free(datasets[i].path);
    free(datasets);
}

/* ---------------------------------------------------------------- reading datasets */

/* The dataset must be numbers of exactly this dtype and shape. */
static int check_layout(const rs_h5 *h, const char *what, const rs_h5_dataset *info, rs_dtype dtype,
                        int ndim, const int64_t *shape) {
    char have[200], want[200];
    if (info->kind != RS_H5_NUMBERS)
        return H5_FAIL("%s: %s holds %s, not numbers", h->path, what,
                       info->kind == RS_H5_STRINGS ? "strings" : "a type resafe does not read");
    if (info->dtype != dtype)
        return H5_FAIL("%s: %s holds %s, expected %s", h->path, what, rs_dtype_name(info->dtype),
                       rs_dtype_name(dtype));
    int same = info->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = info->shape[i] == shape[i];
    if (!same)
        return H5_FAIL("%s: %s has shape %s, expected %s", h->path, what,
                       rs_shape_text(have, sizeof have, info->ndim, info->shape),
                       rs_shape_text(want, sizeof want, ndim, shape));
    return 0;
}

int rs_h5_read(rs_h5 *h, const char *dataset, rs_dtype dtype, int ndim, const int64_t *shape, void *dst) {
    char what[300];
    hid_t ds = open_dataset(h, named(what, sizeof what, "dataset", dataset), dataset);
    if (ds < 0) return -1;
    rs_h5_dataset info;
    describe(ds, &info);
    int rc = check_layout(h, what, &info, dtype, ndim, shape);
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) numel *= shape[i];
    if (rc == 0 && numel > 0 && H5Dread(ds, memory_type_of(dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, dst) < 0)
        rc = h5_fail(h, what, "cannot read");
    H5Dclose(ds);
    return rc;
}

/* Variable-length strings: HDF5 allocates each one; copy it into our memory and free it. */
static int read_vlen_strings(rs_h5 *h, const char *what, hid_t ds, hid_t mtype, char **out, int64_t n) {
    char **raw = rs_calloc((size_t)n, sizeof *raw);
    int rc = H5Dread(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw) < 0 ? h5_fail(h, what, "cannot read") : 0;
    for (int64_t i = 0; i < n; i++) {
        if (rc == 0) out[i] = rs_strdup(raw[i] ? raw[i] : "");
        if (raw[i]) H5free_memory(raw[i]);
    }
    free(raw);
    return rc;
}

/* Fixed-length strings (numpy 'S' arrays): NUL-padded cells of the type's size. */
static int read_fixed_strings(rs_h5 *h, const char *what, hid_t ds, hid_t mtype, char **out, int64_t n) {
    size_t cell = H5Tget_size(mtype), total;
    if (cell == 0 || rs_mul_size(cell, (size_t)n, &total) != 0)
        return H5_FAIL("%s: %s: bad string size", h->path, what);
    char *buf = rs_malloc(total);
    int rc = H5Dread(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0 ? h5_fail(h, what, "cannot read") : 0;
    for (int64_t i = 0; i < n && rc == 0; i++) {
        const char *s = buf + (size_t)i * cell;
        out[i] = rs_strndup(s, strnlen(s, cell));
    }
    free(buf);
    return rc;
}

int rs_h5_read_strings(rs_h5 *h, const char *dataset, char ***strings, int64_t *n) {
    char what[300];
    hid_t ds = open_dataset(h, named(what, sizeof what, "dataset", dataset), dataset);
    if (ds < 0) return -1;
    rs_h5_dataset info;
    describe(ds, &info);
    if (info.kind != RS_H5_STRINGS) {
        H5Dclose(ds);
        return H5_FAIL("%s: %s does not hold a list of strings", h->path, what);
    }
    int64_t count = info.ndim == 0 ? 1 : info.shape[0];
    hid_t ftype = H5Dget_type(ds), mtype = ftype >= 0 ? H5Tget_native_type(ftype, H5T_DIR_ASCEND) : -1;
    char **out = rs_calloc((size_t)count, sizeof *out);
    int rc;
    if (mtype < 0) rc = h5_fail(h, what, "cannot read the string type");
    else if (H5Tis_variable_str(mtype) > 0) rc = read_vlen_strings(h, what, ds, mtype, out, count);
    else rc = read_fixed_strings(h, what, ds, mtype, out, count);
    if (mtype >= 0) H5Tclose(mtype);
    if (ftype >= 0) H5Tclose(ftype);
    H5Dclose(ds);
    if (rc != 0) {
        rs_h5_free_strings(out, count);
        return -1;
    }
    *strings = out;
    *n = count;
    return 0;
}

void rs_h5_free_strings(char **strings, int64_t n) {
    if (!strings) return;
    for (int64_t i = 0; i < n; i++) free(strings[i]);
    free(strings);
}

/* ---------------------------------------------------------------- attributes */

static hid_t open_object(rs_h5 *h, const char *object) {
    if (is_root(object)) return H5Oopen(h->file, "/", H5P_DEFAULT);
    if (check_path(h, "object", object) != 0) return H5I_INVALID_HID;
    if (!path_exists(h->file, object)) {
        H5_FAIL("%s: object '%s' does not exist", h->path, object);
        return H5I_INVALID_HID;
    }
    hid_t obj = H5Oopen(h->file, object, H5P_DEFAULT);
    if (obj < 0) h5_fail(h, NULL, "cannot open object '%s'", object);
    return obj;
}

/* "attribute 'name' of 'object'" for messages. */
static const char *attr_what(char *buf, size_t cap, const char *object, const char *name) {
    snprintf(buf, cap, "attribute '%s' of '%s'", name ? name : "", is_root(object) ? "/" : object);
    return buf;
}

/* Replace attribute name of object with a scalar of file type ftype holding *value. */
static int set_attr(rs_h5 *h, const char *object, const char *name, hid_t ftype, hid_t mtype,
                    const void *value) {
    char what[400];
    attr_what(what, sizeof what, object, name);
    RS_TRY(check_writing(h, what));
    if (!name || !*name) return H5_FAIL("%s: %s: empty attribute name", h->path, what);
    hid_t obj = open_object(h, object);
    if (obj < 0) return -1;
    int rc = 0;
    if (H5Aexists(obj, name) > 0 && H5Adelete(obj, name) < 0) rc = h5_fail(h, what, "cannot replace");
    hid_t space = rc == 0 ? H5Screate(H5S_SCALAR) : H5I_INVALID_HID, attr = H5I_INVALID_HID;
    if (space >= 0) attr = H5Acreate2(obj, name, ftype, space, H5P_DEFAULT, H5P_DEFAULT);
    if (rc == 0 && attr < 0) rc = h5_fail(h, what, "cannot create");
    if (rc == 0 && H5Awrite(attr, mtype, value) < 0) rc = h5_fail(h, what, "cannot write");
    if (attr >= 0) H5Aclose(attr);
    if (space >= 0) H5Sclose(space);
    H5Oclose(obj);
    return rc;
}

int rs_h5_set_attr_str(rs_h5 *h, const char *object, const char *name, const char *value) {
    if (!value) return H5_FAIL("%s: attribute '%s': NULL string", h->path, name ? name : "");
    hid_t type = utf8_string_type();
    if (type < 0) return h5_fail(h, NULL, "cannot make a string type");
    int rc = set_attr(h, object, name, type, type, &value);
    H5Tclose(type);
    return rc;
}

int rs_h5_set_attr_i64(rs_h5 *h, const char *object, const char *name, int64_t value) {
    return set_attr(h, object, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &value);
}

int rs_h5_set_attr_f64(rs_h5 *h, const char *object, const char *name, double value) {
    return set_attr(h, object, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value);
}

/* An open attribute holding one value, its type and class; *obj and *attr to be closed. */
typedef struct {
    hid_t obj, attr, type;
    H5T_class_t cls;
    char what[400];
} attr_handle;

static int open_attr(rs_h5 *h, const char *object, const char *name, attr_handle *a) {
    attr_what(a->what, sizeof a->what, object, name);
    a->attr = a->type = H5I_INVALID_HID;
    a->obj = open_object(h, object);
    if (a->obj < 0) return -1;
    if (!name || H5Aexists(a->obj, name) <= 0) {
        H5Oclose(a->obj);
        H5Eclear2(H5E_DEFAULT);
        return H5_FAIL("%s: %s does not exist", h->path, a->what);
    }
    a->attr = H5Aopen(a->obj, name, H5P_DEFAULT);
    hid_t space = a->attr >= 0 ? H5Aget_space(a->attr) : H5I_INVALID_HID;
    a->type = a->attr >= 0 ? H5Aget_type(a->attr) : H5I_INVALID_HID;
    hssize_t npoints = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
    if (space >= 0) H5Sclose(space);
    int rc = a->type < 0 ? h5_fail(h, a->what, "cannot open") : 0;
    if (rc == 0 && npoints != 1) rc = H5_FAIL("%s: %s holds %lld values, not one", h->path, a->what, (long long)npoints);
    a->cls = rc == 0 ? H5Tget_class(a->type) : H5T_NO_CLASS;
    if (rc != 0) {
        if (a->type >= 0) H5Tclose(a->type);
        if (a->attr >= 0) H5Aclose(a->attr);
        H5Oclose(a->obj);
    }
    return rc;
}

static void close_attr(attr_handle *a) {
    H5Tclose(a->type);
    H5Aclose(a->attr);
    H5Oclose(a->obj);
}

/* A string attribute: variable length (h5py str) or fixed length (numpy bytes). */
static int read_string_attr(rs_h5 *h, attr_handle *a, char **value) {
    hid_t mtype = H5Tget_native_type(a->type, H5T_DIR_ASCEND);
    if (mtype < 0) return h5_fail(h, a->what, "cannot read the string type");
    int rc = 0;
    if (H5Tis_variable_str(mtype) > 0) {
        char *raw = NULL;
        if (H5Aread(a->attr, mtype, &raw) < 0) rc = h5_fail(h, a->what, "cannot read");
        else *value = rs_strdup(raw ? raw : "");
        if (raw) H5free_memory(raw);
    } else {
        size_t cell = H5Tget_size(mtype);
        char *buf = rs_calloc(cell + 1, 1);
        if (H5Aread(a->attr, mtype, buf) < 0) rc = h5_fail(h, a->what, "cannot read");
        else *value = rs_strndup(buf, strnlen(buf, cell));
        free(buf);
    }
    H5Tclose(mtype);
    return rc;
}

int rs_h5_get_attr_str(rs_h5 *h, const char *object, const char *name, char **value) {
    attr_handle a;
    RS_TRY(open_attr(h, object, name, &a));
    int rc = a.cls == H5T_STRING ? read_string_attr(h, &a, value)
                                 : H5_FAIL("%s: %s is not a string", h->path, a.what);
    close_attr(&a);
    return rc;
}

int rs_h5_get_attr_i64(rs_h5 *h, const char *object, const char *name, int64_t *value) {
    attr_handle a;
    RS_TRY(open_attr(h, object, name, &a));
    int rc = 0;
    if (a.cls != H5T_INTEGER) {
        rc = H5_FAIL("%s: %s is not an integer", h->path, a.what);
    } else if (H5Tget_sign(a.type) == H5T_SGN_NONE && H5Tget_size(a.type) >= 8) {
        uint64_t u; /* HDF5 would clip a value above INT64_MAX silently */
        if (H5Aread(a.attr, H5T_NATIVE_UINT64, &u) < 0) rc = h5_fail(h, a.what, "cannot read");
        else if (u > (uint64_t)INT64_MAX) rc = H5_FAIL("%s: %s = %llu does not fit int64", h->path, a.what, (unsigned long long)u);
        else *value = (int64_t)u;
    } else if (H5Aread(a.attr, H5T_NATIVE_INT64, value) < 0) {
        rc = h5_fail(h, a.what, "cannot read");
    }
    close_attr(&a);
    return rc;
}

int rs_h5_get_attr_f64(rs_h5 *h, const char *object, const char *name, double *value) {
    attr_handle a;
    RS_TRY(open_attr(h, object, name, &a));
    int rc = 0;
    if (a.cls != H5T_FLOAT && a.cls != H5T_INTEGER) rc = H5_FAIL("%s: %s is not a number", h->path, a.what);
    else if (H5Aread(a.attr, H5T_NATIVE_DOUBLE, value) < 0) rc = h5_fail(h, a.what, "cannot read");
    close_attr(&a);
    return rc;
}

int rs_h5_has_attr(rs_h5 *h, const char *object, const char *name) {
    hid_t obj = open_object(h, object);
    if (obj < 0) return -1;
    htri_t has = name && *name ? H5Aexists(obj, name) : 0;
    H5Oclose(obj);
    if (has < 0) return h5_fail(h, NULL, "cannot look up attribute '%s'", name);
    return has > 0;
}

typedef struct {
    char **names;
    int n, cap;
} name_list;

static herr_t collect_attr_name(hid_t obj, const char *name, const H5A_info_t *info, void *data) {
    (void)obj;
    (void)info;
    name_list *list = data;
    if (list->n == list->cap) {
        list->cap = list->cap ? 2 * list->cap : 8;
        list->names = rs_realloc(list->names, (size_t)list->cap * sizeof *list->names);
    }
    list->names[list->n++] = rs_strdup(name);
    return 0;
}

int rs_h5_attr_names(rs_h5 *h, const char *object, char ***names, int *n) {
    hid_t obj = open_object(h, object);
    if (obj < 0) return -1;
    name_list list = {0};
    herr_t rc = H5Aiterate2(obj, H5_INDEX_NAME, H5_ITER_INC, NULL, collect_attr_name, &list);
    if (rc < 0) h5_fail(h, NULL, "cannot list the attributes of '%s'", is_root(object) ? "/" : object);
    H5Oclose(obj);
    if (rc < 0) {
        rs_h5_free_strings(list.names, list.n);
        return -1;
    }
    *names = list.names;
    *n = list.n;
    return 0;
}
