/* run_manifest: stage manifests, input fingerprints, output lists (run_manifest.h). */
#include "resafe/run_manifest.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "resafe/core.h"
#include "resafe/sha256.h"

/* sha256 of the first and the last MiB of a large file. */
static int ends_sha256(const char *path, int64_t size, char hex[65]) {
    FILE *f = fopen(path, "rb");
    if (!f) return RS_FAIL("%s: cannot open for hashing", path);
    enum { MIB = 1 << 20 };
    uint8_t *buf = rs_malloc(MIB);
    rs_sha256 s;
    rs_sha256_init(&s);
    int ok = fread(buf, 1, MIB, f) == MIB;
    if (ok) rs_sha256_update(&s, buf, MIB);
    ok = ok && fseeko(f, (off_t)(size - MIB), SEEK_SET) == 0 && fread(buf, 1, MIB, f) == MIB;
    if (ok) rs_sha256_update(&s, buf, MIB);
    fclose(f);
    free(buf);
    if (!ok) return RS_FAIL("%s: read error while hashing", path);
    rs_sha256_hex(&s, hex);
    return 0;
}

static cJSON *file_fingerprint(const char *path, const struct stat *st) {
    char hex[65];
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "bytes", (double)st->st_size);
    int rc;
    if (st->st_size <= RS_FINGERPRINT_FULL_MAX) {
        rc = rs_sha256_file(path, hex);
        if (rc == 0) cJSON_AddStringToObject(o, "sha256", hex);
    } else {
        char ns[32];
        snprintf(ns, sizeof ns, "%lld.%09ld", (long long)st->st_mtim.tv_sec,
                 (long)st->st_mtim.tv_nsec);
        cJSON_AddStringToObject(o, "mtime_ns", ns);
        rc = ends_sha256(path, st->st_size, hex);
        if (rc == 0) cJSON_AddStringToObject(o, "ends_sha256", hex);
    }
    if (rc != 0) cJSON_Delete(o), o = NULL;
    return o;
}

static int skip_name(const char *name) {
    return name[0] == '.' || strstr(name, ".tmp.") != NULL;
}

/* Every regular file below dir into files, keyed by prefix + name, sorted. */
static int walk_dir(const char *dir, const char *prefix, cJSON *files) {
    struct dirent **list;
    int n = scandir(dir, &list, NULL, alphasort), rc = 0;
    if (n < 0) return RS_FAIL("%s: cannot list the directory", dir);
    for (int i = 0; i < n; i++) {
        const char *name = list[i]->d_name;
        if (rc == 0 && !skip_name(name)) {
            char *path = rs_path_join(dir, name), *key = rs_path_join(prefix, name);
            const char *k = prefix[0] ? key : name;
            struct stat st;
            if (stat(path, &st) != 0)
                rc = RS_FAIL("%s: cannot stat", path);
            else if (S_ISDIR(st.st_mode))
                rc = walk_dir(path, k, files);
            else if (S_ISREG(st.st_mode)) {
                cJSON *fp = file_fingerprint(path, &st);
                if (fp) cJSON_AddItemToObject(files, k, fp);
                else rc = -1;
            }
            free(path), free(key);
        }
        free(list[i]);
    }
    free(list);
    return rc;
}

cJSON *rs_fingerprint(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        RS_FAIL("%s: %s", path, strerror(errno));
        return NULL;
    }
    if (!S_ISDIR(st.st_mode)) return file_fingerprint(path, &st);
    cJSON *o = cJSON_CreateObject(), *files = cJSON_AddObjectToObject(o, "files");
    if (walk_dir(path, "", files) != 0) cJSON_Delete(o), o = NULL;
    return o;
}

void rs_json_sha256(const cJSON *j, char hex[65]) {
    char *text = cJSON_PrintUnformatted(j);
    rs_sha256 s;
    rs_sha256_init(&s);
    rs_sha256_update(&s, text, strlen(text));
    rs_sha256_hex(&s, hex);
    cJSON_free(text);
}

/* ---------------------------------------------------------------- outputs */

static int add_output(const char *run_dir, const char *rel, cJSON *outputs) {
    char *path = rs_path_join(run_dir, rel), hex[65];
    struct stat st;
    int rc = stat(path, &st) == 0 ? 0 : RS_FAIL("%s: output missing", path);
    if (rc == 0 && S_ISDIR(st.st_mode)) {
        struct dirent **list;
        int n = scandir(path, &list, NULL, alphasort);
        if (n < 0) rc = RS_FAIL("%s: cannot list the directory", path);
        for (int i = 0; i < n; i++) {
            const char *name = list[i]->d_name;
            if (rc == 0 && !skip_name(name) && strcmp(name, "manifest.json") &&
                strcmp(name, "pending.json")) {
                char *sub = rs_path_join(rel, name);
                rc = add_output(run_dir, sub, outputs);
                free(sub);
            }
            free(list[i]);
        }
        if (n >= 0) free(list);
    } else if (rc == 0 && S_ISREG(st.st_mode)) {
        rc = rs_sha256_file(path, hex);
        if (rc == 0) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "path", rel);
            cJSON_AddNumberToObject(o, "bytes", (double)st.st_size);
            cJSON_AddStringToObject(o, "sha256", hex);
            cJSON_AddItemToArray(outputs, o);
        }
    }
    free(path);
    return rc;
}

int rs_outputs_add(const char *run_dir, const char *rel, cJSON *outputs) {
    return add_output(run_dir, rel, outputs);
}

/* ---------------------------------------------------------------- manifests */

int rs_manifest_write(const char *stage_dir, const char *stage, const cJSON *inputs,
                      const cJSON *outputs) {
    char hex[65];
    rs_json_sha256(inputs, hex);
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "stage", stage);
    cJSON_AddStringToObject(m, "version", RS_VERSION);
    cJSON_AddItemToObject(m, "inputs", cJSON_Duplicate(inputs, 1));
    cJSON_AddStringToObject(m, "inputs_hash", hex);
    cJSON_AddItemToObject(m, "outputs", cJSON_Duplicate(outputs, 1));
    char *text = cJSON_Print(m), *path = rs_path_join(stage_dir, "manifest.json");
    cJSON_Delete(m);
    size_t n = strlen(text);
    int rc = rs_mkdir_p(stage_dir);
    if (rc == 0) {
        char *withnl = rs_malloc(n + 2);
        memcpy(withnl, text, n);
        withnl[n] = '\n';
        rc = rs_write_file_atomic(path, withnl, n + 1);
        free(withnl);
    }
    cJSON_free(text);
    free(path);
    return rc;
}

cJSON *rs_manifest_load(const char *stage_dir) {
    char *path = rs_path_join(stage_dir, "manifest.json"), *text;
    size_t size;
    cJSON *m = NULL;
    if (rs_path_exists(path) && rs_read_file(path, &text, &size) == 0) {
        m = cJSON_ParseWithLength(text, size);
        free(text);
    }
    rs_clear_error();
    free(path);
    return m;
}

int rs_manifest_sha256(const char *stage_dir, char hex[65]) {
    char *path = rs_path_join(stage_dir, "manifest.json");
    int rc = rs_path_exists(path) ? rs_sha256_file(path, hex) : -1;
    rs_clear_error();
    free(path);
    return rc;
}

int rs_manifest_current(const char *stage_dir, const char *run_dir, const char *inputs_hash,
                        const char **why) {
    cJSON *m = rs_manifest_load(stage_dir);
    *why = "no manifest: never run, or interrupted";
    if (!m) return 0;
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(m, "inputs_hash");
    const cJSON *outs = cJSON_GetObjectItemCaseSensitive(m, "outputs");
    int ok = cJSON_IsString(h) && cJSON_IsArray(outs);
    if (!ok) *why = "unreadable manifest";
    if (ok && strcmp(h->valuestring, inputs_hash) != 0) ok = 0, *why = "inputs changed";
    const cJSON *o, *list = ok ? outs : NULL;
    cJSON_ArrayForEach(o, list) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "path");
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(o, "bytes");
        struct stat st;
        char *path = cJSON_IsString(p) ? rs_path_join(run_dir, p->valuestring) : NULL;
        if (!path || !cJSON_IsNumber(b) || stat(path, &st) != 0 ||
            (double)st.st_size != b->valuedouble)
            ok = 0, *why = "an output is missing or changed size";
        free(path);
        if (!ok) break;
    }
    cJSON_Delete(m);
    return ok;
}
