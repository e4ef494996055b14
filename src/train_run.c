/* train_run: `resafe train`, the whole pipeline of a run config, stage by stage like make
 * (include/resafe/pipeline.h, README "resafe train").
 *
 * Each stage builds its inputs record (config hash of the sections that decide it, the sha256
 * of the upstream stages' manifests, fingerprints of the files it reads: run_manifest.h) and is
 * skipped when its manifest holds the same inputs hash and its outputs are still there.
 * Otherwise its directory is emptied and it runs; pending.json records the inputs it runs for,
 * so that an interrupted dpo stage resumes from its checkpoint only for the same inputs. The
 * manifest is written last: a stage directory without one is never taken as complete. */
#include <cJSON.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/checkpoint.h"
#include "resafe/dpo.h"
#include "resafe/hf_config.h"
#include "resafe/pipeline.h"
#include "resafe/progress.h"
#include "resafe/quant_io.h"
#include "resafe/run_manifest.h"
#include "resafe/safetensors.h"

enum { ST_QUANTIZE, ST_TRIPLETS, ST_DPO, ST_MERGE, ST_EVAL, ST_REPORT, N_STAGES };
const char *const rs_train_stage_names[] = {"quantize", "triplets", "dpo",   "merge",
                                            "eval",     "report",   NULL};

typedef struct {
    const rs_config *cfg;
    rs_config *dpo_cfg; /* copy with [model] path = q_dir and [dpo] data_file = the patch set */
    rs_run_paths p;
    char *dir[N_STAGES]; /* <run>/<stage> */
    int n_modes;
    rs_merge_mode modes[4]; /* the chosen merge mode first, then the compared ones */
    int resume_dpo;
} train_run;

/* ---------------------------------------------------------------- config */

static rs_config *config_copy(const rs_config *cfg) {
    char *text = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&text, &n);
    if (!f) return RS_FAIL("cannot copy the config"), NULL;
    rs_config_print(cfg, f);
    fclose(f);
    rs_config *c = rs_config_parse("(config copy)", text);
    free(text);
    return c;
}

/* The merge modes to build: [lora] merge, then [lora] merge_compare's that apply. exact needs a
 * grouped INT format without AWQ's input scales; a compared exact merge of an adapter that was
 * not trained group-constant keeps only the delta's group means (the report says how much). With
 * a given [quant] model the format is not known here: exact is compared only for a group-constant
 * adapter then. */
static int merge_modes(const rs_config *cfg, train_run *r) {
    const char *chosen = rs_config_get_str(cfg, "lora", "merge");
    const char *cmp = rs_config_get_str(cfg, "lora", "merge_compare");
    const char *gc = rs_config_get_str(cfg, "lora", "group_constant");
    rs_merge_mode m;
    rs_merge_mode_from_name(chosen, &m);
    int group_constant = !strcmp(gc, "true") || (!strcmp(gc, "auto") && m == RS_MERGE_EXACT);
    /* exact folds a group constant into the zero points: not through AWQ's input scales */
    int given = rs_config_get_str(cfg, "quant", "model")[0] != '\0';
    const char *fmt = rs_config_get_str(cfg, "quant", "format");
    int awq = !given && !strcmp(rs_config_get_str(cfg, "quant", "method"), "awq");
    int exact_ok = !awq && (given ? group_constant : !strncmp(fmt, "int", 3));
    r->modes[0] = m, r->n_modes = 1;
    if (!strcmp(cmp, "none")) return 0;
    char *list = rs_strdup(!strcmp(cmp, "all") ? "grid,refit,adapter,exact" : cmp), *save = NULL;
    int rc = 0;
    for (char *t = strtok_r(list, ", ", &save); t && rc == 0; t = strtok_r(NULL, ", ", &save)) {
        if (rs_merge_mode_from_name(t, &m) != 0) {
            rc = RS_FAIL("[lora] merge_compare: '%s' is not all, none or a list of grid, refit, "
                         "adapter, exact", t);
            break;
        }
        int have = 0;
        for (int i = 0; i < r->n_modes; i++) have |= r->modes[i] == m;
        if (have || (m == RS_MERGE_EXACT && !exact_ok)) continue;
        r->modes[r->n_modes++] = m;
    }
    free(list);
    return rc;
}

/* ---------------------------------------------------------------- validation (writes nothing) */

static int need_file(const rs_config *cfg, const char *section, const char *key, int required) {
    const char *path = rs_config_get_str(cfg, section, key);
    if (!path[0])
        return required ? RS_FAIL("[%s] %s is not set (resafe train needs it)", section, key) : 0;
    if (!rs_path_exists(path) || rs_path_is_dir(path))
        return RS_FAIL("[%s] %s: %s: no such file", section, key, path);
    return 0;
}

static int need_model_dir(const char *what, const char *dir, rs_model_config *mc) {
    if (!dir[0]) return RS_FAIL("%s is not set", what);
    char *cj = rs_path_join(dir, "config.json");
    int ok = rs_path_is_dir(dir) && rs_path_exists(cj);
    free(cj);
    if (!ok) return RS_FAIL("%s: %s: not a model directory (no config.json)", what, dir);
    if (rs_hf_config_load(dir, mc) != 0) return rs_fail_context("%s", what);
    return 0;
}

static int check_quantized(const char *dir, const char *fp_dir, const rs_model_config *fp) {
    rs_model_config qc;
    RS_TRY(need_model_dir("[quant] model", dir, &qc));
    rs_st_set set;
    if (rs_st_open(dir, &set) != 0) return rs_fail_context("[quant] model");
    int quantized = rs_qconfig_of(&set) != NULL;
    rs_st_close(&set);
    if (!quantized)
        return RS_FAIL("[quant] model: %s: not a quantized model directory (its safetensors have "
                       "no quantization_config; make one with resafe quantize)", dir);
    const char *names[] = {"vocab_size", "hidden_size", "num_hidden_layers"};
    int a[] = {fp->vocab_size, fp->hidden_size, fp->n_layers};
    int b[] = {qc.vocab_size, qc.hidden_size, qc.n_layers};
    for (int i = 0; i < 3; i++)
        if (a[i] != b[i])
            return RS_FAIL("[quant] model %s does not match [model] path %s: %s %d vs %d", dir,
                           fp_dir, names[i], b[i], a[i]);
    return 0;
}

static int validate(const rs_config *cfg, const rs_run_paths *p, train_run *r) {
    rs_model_config fp;
    RS_TRY(need_model_dir("[model] path", p->fp_dir, &fp));
    if (p->q_given) RS_TRY(check_quantized(p->q_dir, p->fp_dir, &fp));
    else {
        RS_TRY(rs_quantize_stage_check(cfg));
        RS_TRY(need_file(cfg, "quant", "calib_file", 0));
    }
    RS_TRY(need_file(cfg, "patch", "harmful_file", 1));
    RS_TRY(need_file(cfg, "patch", "benign_file", 1));
    RS_TRY(need_file(cfg, "eval", "harmful_file", 1));
    RS_TRY(need_file(cfg, "eval", "benign_file", 1));
    RS_TRY(need_file(cfg, "eval", "safe_file", 0));
    RS_TRY(need_file(cfg, "eval", "heldout_file", 0));
    RS_TRY(need_file(cfg, "eval", "refusal_phrases", 0));
    if (rs_path_exists(p->run_dir) && !rs_path_is_dir(p->run_dir))
        return RS_FAIL("[run] out_dir: %s: exists and is not a directory", p->run_dir);
    return merge_modes(cfg, r);
}

/* ---------------------------------------------------------------- inputs of each stage */

static const char *const g_sections[N_STAGES][4] = {
    {"quant", NULL},           {"patch", "generate", NULL}, {"dpo", "snip", "lora", NULL},
    {"lora", "quant", NULL},   {"eval", "generate", NULL},  {"eval", "lora", NULL}};
static const int g_upstream[N_STAGES][4] = {
    {-1}, {ST_QUANTIZE, -1}, {ST_QUANTIZE, ST_TRIPLETS, -1}, {ST_QUANTIZE, ST_DPO, -1},
    {ST_QUANTIZE, ST_MERGE, -1}, {ST_DPO, ST_MERGE, ST_EVAL, -1}};

/* What only the merge decides ([lora] merge_compare, and [lora] merge unless group_constant =
 * auto makes the adapter depend on it) set to fixed values, so that the dpo stage's inputs, its
 * checkpoint's config hash and the adapter's bytes do not change with them. */
static void neutralize_merge_keys(rs_config *c, const rs_config *cfg) {
    const char *merge = rs_config_get_str(cfg, "lora", "merge");
    int matters = !strcmp(rs_config_get_str(cfg, "lora", "group_constant"), "auto") &&
                  !strcmp(merge, "exact");
    rs_config_set(c, "lora", "merge", matters ? "exact" : "grid");
    rs_config_set(c, "lora", "merge_compare", "all");
}

static uint64_t dpo_config_hash(const rs_config *cfg) {
    rs_config *c = config_copy(cfg);
    if (!c) return 0;
    neutralize_merge_keys(c, cfg);
    uint64_t h = rs_config_hash(c, g_sections[ST_DPO]);
    rs_config_free(c);
    return h;
}

static int add_file(cJSON *files, const char *role, const char *path) {
    cJSON *fp = rs_fingerprint(path);
    if (!fp) return rs_fail_context("%s", role);
    cJSON_AddItemToObject(files, role, fp);
    return 0;
}

static int add_config_file(cJSON *files, const rs_config *cfg, const char *s, const char *k) {
    const char *path = rs_config_get_str(cfg, s, k);
    if (!path[0]) return 0;
    char role[64];
    snprintf(role, sizeof role, "%s.%s", s, k);
    return add_file(files, role, path);
}

static int stage_files(const train_run *r, int s, cJSON *files) {
    const rs_config *cfg = r->cfg;
    const rs_run_paths *p = &r->p;
    switch (s) {
    case ST_QUANTIZE:
        RS_TRY(add_file(files, "fp_model", p->fp_dir));
        if (strcmp(rs_config_get_str(cfg, "quant", "method"), "rtn"))
            RS_TRY(add_config_file(files, cfg, "quant", "calib_file"));
        return 0;
    case ST_TRIPLETS:
        RS_TRY(add_file(files, "fp_model", p->fp_dir));
        RS_TRY(add_file(files, "q_model", p->q_dir));
        RS_TRY(add_config_file(files, cfg, "patch", "harmful_file"));
        if (!strcmp(rs_config_get_str(cfg, "patch", "harmful_winner"), "refusal"))
            RS_TRY(add_config_file(files, cfg, "eval", "refusal_phrases"));
        return add_config_file(files, cfg, "patch", "benign_file");
    case ST_DPO:
        RS_TRY(add_file(files, "q_model", p->q_dir));
        return add_file(files, "patchset", p->patchset);
    case ST_MERGE:
        RS_TRY(add_file(files, "q_model", p->q_dir));
        return add_file(files, "adapter", p->adapter);
    case ST_EVAL: {
        RS_TRY(add_file(files, "fp_model", p->fp_dir));
        RS_TRY(add_file(files, "q_model", p->q_dir));
        const char *keys[] = {"harmful_file", "benign_file", "safe_file", "heldout_file",
                              "refusal_phrases"};
        for (int i = 0; i < 5; i++) RS_TRY(add_config_file(files, cfg, "eval", keys[i]));
        return 0;
    }
    default: return 0;
    }
}

/* The inputs record of stage s (NULL + message when an input is unreadable). */
static cJSON *stage_inputs(const train_run *r, int s) {
    cJSON *in = cJSON_CreateObject();
    uint64_t h = s == ST_DPO ? dpo_config_hash(r->cfg) : rs_config_hash(r->cfg, g_sections[s]);
    char hex[65];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
    cJSON_AddStringToObject(in, "config", hex);
    cJSON_AddStringToObject(in, "resafe_version", RS_VERSION); /* a new version reruns */
    if (s == ST_MERGE || s == ST_EVAL || s == ST_REPORT) {
        cJSON *modes = cJSON_AddArrayToObject(in, "merge_modes");
        for (int i = 0; i < r->n_modes; i++)
            cJSON_AddItemToArray(modes, cJSON_CreateString(rs_merge_mode_name(r->modes[i])));
    }
    cJSON *up = cJSON_AddObjectToObject(in, "upstream");
    for (const int *u = g_upstream[s]; *u >= 0; u++) {
        if (*u == ST_QUANTIZE && r->p.q_given) continue;
        if (rs_manifest_sha256(r->dir[*u], hex) != 0) {
            RS_FAIL("train: %s: the %s stage has no manifest", rs_train_stage_names[s],
                    rs_train_stage_names[*u]);
            cJSON_Delete(in);
            return NULL;
        }
        cJSON_AddStringToObject(up, rs_train_stage_names[*u], hex);
    }
    if (stage_files(r, s, cJSON_AddObjectToObject(in, "files")) != 0) {
        cJSON_Delete(in);
        return NULL;
    }
    return in;
}

/* ---------------------------------------------------------------- the stages' work */

static int write_merge_json(const train_run *r, const rs_merge_stats *st) {
    cJSON *m = cJSON_CreateObject(), *modes = cJSON_AddObjectToObject(m, "modes");
    cJSON_AddStringToObject(m, "chosen", rs_merge_mode_name(r->modes[0]));
    for (int i = 0; i < r->n_modes; i++) {
        cJSON *o = cJSON_AddObjectToObject(modes, rs_merge_mode_name(r->modes[i]));
        char *dir = rs_path_join(r->p.merge_dir, rs_merge_mode_name(r->modes[i]));
        cJSON_AddStringToObject(o, "dir", dir);
        free(dir);
        cJSON_AddNumberToObject(o, "delta_norm", st[i].delta_norm);
        cJSON_AddNumberToObject(o, "kept_fraction", st[i].kept_fraction);
        cJSON_AddNumberToObject(o, "rel_error", st[i].rel_error);
        cJSON_AddNumberToObject(o, "n_codes_changed", (double)st[i].n_codes_changed);
    }
    char *text = cJSON_Print(m), *path = rs_path_join(r->p.merge_dir, "merge.json");
    cJSON_Delete(m);
    int rc = rs_write_file_atomic(path, text, strlen(text));
    cJSON_free(text);
    free(path);
    return rc;
}

static int run_merge(const train_run *r) {
    rs_merge_stats st[4];
    memset(st, 0, sizeof st);
    RS_TRY(rs_mkdir_p(r->p.merge_dir));
    for (int i = 0; i < r->n_modes; i++) {
        int sig = rs_train_stop_signal();
        if (sig) return sig;
        const char *name = rs_merge_mode_name(r->modes[i]);
        char *out = rs_path_join(r->p.merge_dir, name);
        rs_info("merge: %s%s -> %s", name, i == 0 ? " (the chosen mode)" : "", out);
        int rc = rs_merge_run(r->cfg, r->p.q_dir, r->p.adapter, r->modes[i], out, &st[i]);
        free(out);
        if (rc != 0) return rs_fail_context("merge %s", name);
    }
    return write_merge_json(r, st);
}

static int run_eval(const train_run *r) {
    rs_eval_model models[3 + 4];
    char *dirs[4], names[4][32];
    int n = 0;
    models[n++] = (rs_eval_model){"fp", r->p.fp_dir};
    models[n++] = (rs_eval_model){"quantized", r->p.q_dir};
    for (int i = 0; i < r->n_modes; i++) {
        const char *mode = rs_merge_mode_name(r->modes[i]);
        dirs[i] = rs_path_join(r->p.merge_dir, mode);
        snprintf(names[i], sizeof names[i], "merge_%s", mode);
        models[n++] = (rs_eval_model){i == 0 ? "patched_merged" : names[i], dirs[i]};
    }
    int rc = rs_mkdir_p(r->p.eval_dir);
    if (rc == 0) rc = rs_eval_run(r->cfg, models, n, r->p.fp_dir, r->p.eval_dir);
    for (int i = 0; i < r->n_modes; i++) free(dirs[i]);
    return rc;
}

static int run_stage(train_run *r, int s) {
    const rs_run_paths *p = &r->p;
    switch (s) {
    case ST_QUANTIZE: {
        RS_TRY(rs_mkdir_p(r->dir[s]));
        return rs_quantize_stage(r->cfg, p->fp_dir, p->q_dir);
    }
    case ST_TRIPLETS:
        RS_TRY(rs_mkdir_p(r->dir[s]));
        return rs_triplets_run(r->cfg, p->fp_dir, p->q_dir, p->patchset);
    case ST_DPO: return rs_dpo_run(r->dpo_cfg, r->resume_dpo, !r->resume_dpo);
    case ST_MERGE: return run_merge(r);
    case ST_EVAL: return run_eval(r);
    default: RS_TRY(rs_mkdir_p(r->dir[s])); return rs_report_write(r->cfg, p);
    }
}

/* ---------------------------------------------------------------- outputs and cleaning */

/* The report writes next to the evaluation (eval dir): its outputs are the eval dir's files
 * that the eval manifest does not list with the same bytes, plus <run>/report. */
static int report_outputs(const train_run *r, cJSON *outs) {
    cJSON *all = cJSON_CreateArray(), *em = rs_manifest_load(r->dir[ST_EVAL]), *o;
    const cJSON *eouts = cJSON_GetObjectItemCaseSensitive(em, "outputs");
    int rc = rs_outputs_add(r->p.run_dir, "eval", all);
    cJSON *listed = rc == 0 ? all : NULL;
    cJSON_ArrayForEach(o, listed) {
        const char *path = cJSON_GetObjectItemCaseSensitive(o, "path")->valuestring;
        const char *sha = cJSON_GetObjectItemCaseSensitive(o, "sha256")->valuestring;
        int eval_owns = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, eouts) {
            const cJSON *ep = cJSON_GetObjectItemCaseSensitive(e, "path");
            const cJSON *es = cJSON_GetObjectItemCaseSensitive(e, "sha256");
            if (cJSON_IsString(ep) && cJSON_IsString(es) && !strcmp(ep->valuestring, path) &&
                !strcmp(es->valuestring, sha))
                eval_owns = 1;
        }
        if (!eval_owns) cJSON_AddItemToArray(outs, cJSON_Duplicate(o, 1));
    }
    if (rc == 0) rc = rs_outputs_add(r->p.run_dir, "report", outs);
    cJSON_Delete(all);
    cJSON_Delete(em);
    return rc;
}

static int stage_outputs(const train_run *r, int s, cJSON *outs) {
    if (s == ST_REPORT) return report_outputs(r, outs);
    const char *rel = s == ST_QUANTIZE ? "quantize/model" : rs_train_stage_names[s];
    return rs_outputs_add(r->p.run_dir, rel, outs);
}

/* Remove what an earlier attempt of stage s left (all of it, except the dpo checkpoint and
 * metrics log when resuming: rs_dpo_run continues from them). */
static int clean_stage(const train_run *r, int s) {
    int rc = 0;
    if (s == ST_REPORT) { /* its files in the eval dir, as its last manifest lists them */
        cJSON *m = rs_manifest_load(r->dir[s]), *o;
        cJSON_ArrayForEach(o, cJSON_GetObjectItemCaseSensitive(m, "outputs")) {
            const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "path");
            if (!cJSON_IsString(p)) continue;
            char *path = rs_path_join(r->p.run_dir, p->valuestring);
            if (rc == 0) rc = rs_remove_tree(path);
            free(path);
        }
        cJSON_Delete(m);
    }
    if (rc != 0 || !(s == ST_DPO && r->resume_dpo)) return rc ? rc : rs_remove_tree(r->dir[s]);
    char *manifest = rs_path_join(r->dir[s], "manifest.json");
    rc = rs_remove_tree(manifest);
    free(manifest);
    return rc;
}

static int pending_matches(const char *dir, const char *hash) {
    char *path = rs_path_join(dir, "pending.json"), *text;
    size_t n;
    int same = 0;
    if (rs_path_exists(path) && rs_read_file(path, &text, &n) == 0) {
        cJSON *j = cJSON_ParseWithLength(text, n);
        const cJSON *h = cJSON_GetObjectItemCaseSensitive(j, "inputs_hash");
        same = cJSON_IsString(h) && !strcmp(h->valuestring, hash);
        cJSON_Delete(j);
        free(text);
    }
    rs_clear_error();
    free(path);
    return same;
}

static int write_pending(const char *dir, const char *hash) {
    char *path = rs_path_join(dir, "pending.json"), text[128];
    snprintf(text, sizeof text, "{\"inputs_hash\": \"%s\"}\n", hash);
    int rc = rs_mkdir_p(dir);
    if (rc == 0) rc = rs_write_file_atomic(path, text, strlen(text));
    free(path);
    return rc;
}

static int remove_pending(const char *dir) {
    char *path = rs_path_join(dir, "pending.json");
    int rc = rs_remove_tree(path);
    free(path);
    return rc;
}

/* ---------------------------------------------------------------- one stage */

/* Test hook: RESAFE_TEST_STOP_AFTER=<stage> raises SIGTERM after that stage's work, before its
 * manifest (as if the run were killed there). */
static int test_stop_after(int s) {
    const char *v = getenv("RESAFE_TEST_STOP_AFTER");
    return v && !strcmp(v, rs_train_stage_names[s]);
}

static void header(int s, const char *fmt, const char *arg) {
    printf("train [%d/%d] %s: ", s + 1, N_STAGES, rs_train_stage_names[s]);
    printf(fmt, arg);
    putchar('\n');
    fflush(stdout);
}

/* Run stage s when needed. 0 done or up to date, -1, or a signal number. */
static int do_stage(train_run *r, int s, int forced, const char *forced_why) {
    cJSON *in = stage_inputs(r, s);
    if (!in) return -1;
    char hash[65];
    rs_json_sha256(in, hash);
    const char *why = forced_why;
    if (!forced && rs_manifest_current(r->dir[s], r->p.run_dir, hash, &why)) {
        header(s, "%s", "up to date");
        cJSON_Delete(in);
        return 0;
    }
    char *ckpt = rs_path_join(r->dir[ST_DPO], "checkpoint.h5");
    r->resume_dpo = s == ST_DPO && !forced && pending_matches(r->dir[s], hash) &&
                    rs_path_exists(ckpt);
    free(ckpt);
    header(s, r->resume_dpo ? "resuming from its checkpoint (%s)" : "running (%s)", why);
    int rc = clean_stage(r, s);
    if (rc == 0) rc = write_pending(r->dir[s], hash);
    double t0 = rs_now();
    if (rc == 0) rc = run_stage(r, s);
    if (rc == 0 && test_stop_after(s)) raise(SIGTERM), rc = rs_train_stop_signal();
    cJSON *outs = cJSON_CreateArray();
    if (rc == 0) rc = stage_outputs(r, s, outs);
    if (rc == 0) rc = rs_manifest_write(r->dir[s], rs_train_stage_names[s], in, outs);
    if (rc == 0) rc = remove_pending(r->dir[s]);
    if (rc == 0) {
        char t[32];
        snprintf(t, sizeof t, "%.1f", rs_now() - t0);
        header(s, "done in %s s", t);
    }
    cJSON_Delete(outs);
    cJSON_Delete(in);
    return rc;
}

/* ---------------------------------------------------------------- the before/after table */

/* A number under one of the names in obj, or inside an object there ({"greedy": x} or
 * {"value": x}); NAN when absent. */
static double metric(const cJSON *obj, const char *const *names) {
    for (; *names; names++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, *names);
        if (cJSON_IsNumber(v)) return v->valuedouble;
        const char *inner[] = {"greedy", "value", "overall", "mean", "rate"};
        for (int i = 0; cJSON_IsObject(v) && i < 5; i++) {
            const cJSON *w = cJSON_GetObjectItemCaseSensitive(v, inner[i]);
            if (cJSON_IsNumber(w)) return w->valuedouble;
        }
    }
    return NAN;
}

static const cJSON *model_entry(const cJSON *root, const char *name) {
    const cJSON *models = cJSON_GetObjectItemCaseSensitive(root, "models"), *m;
    if (cJSON_IsObject(models)) return cJSON_GetObjectItemCaseSensitive(models, name);
    const cJSON *list = cJSON_IsArray(models) ? models : NULL;
    cJSON_ArrayForEach(m, list) {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(m, "name");
        if (cJSON_IsString(n) && !strcmp(n->valuestring, name)) return m;
    }
    return cJSON_GetObjectItemCaseSensitive(root, name);
}

/* Rates are fractions in results.json, shown as percentages like report.md. */
static void print_cell(double v, int pct) {
    if (isnan(v)) printf("  %12s", "-");
    else if (pct) printf("  %11.1f%%", 100.0 * v);
    else printf("  %12.3f", v);
}

/* The table of <eval>/results.json (else eval.json): ASR, benign accuracy, perplexity and
 * over-refusal of fp, quantized, patched_merged and the compared merges. */
static void print_results(const train_run *r) {
    const char *files[] = {"results.json", "eval.json"};
    for (int f = 0; f < 2; f++) {
        char *path = rs_path_join(r->p.eval_dir, files[f]), *text;
        size_t n;
        if (!rs_path_exists(path) || rs_read_file(path, &text, &n) != 0) {
            free(path);
            continue;
        }
        cJSON *root = cJSON_ParseWithLength(text, n);
        free(text);
        static const char *const asr[] = {"asr", "asr_greedy", "attack_success_rate", NULL};
        static const char *const acc[] = {"benign_accuracy", "accuracy", "utility", NULL};
        static const char *const ppl[] = {"ppl", "perplexity", NULL};
        static const char *const over[] = {"over_refusal", "over_refusal_rate", NULL};
        printf("\n%-16s  %12s  %12s  %12s  %12s\n", "model", "ASR", "benign acc", "ppl",
               "over-refusal");
        const char *names[3 + 4] = {"fp", "quantized", "patched_merged"};
        char extra[4][32];
        int nn = 3;
        for (int i = 1; i < r->n_modes; i++) {
            snprintf(extra[i], sizeof extra[i], "merge_%s", rs_merge_mode_name(r->modes[i]));
            names[nn++] = extra[i];
        }
        for (int i = 0; i < nn && root; i++) {
            const cJSON *m = model_entry(root, names[i]);
            if (!m) continue;
            printf("%-16s", names[i]);
            print_cell(metric(m, asr), 1), print_cell(metric(m, acc), 1);
            print_cell(metric(m, ppl), 0), print_cell(metric(m, over), 1);
            putchar('\n');
        }
        printf("results: %s\n", path);
        cJSON_Delete(root);
        free(path);
        break;
    }
    rs_clear_error();
    char *report = rs_path_join(r->p.eval_dir, "report.md");
    if (rs_path_exists(report)) printf("report: %s\n", report);
    free(report);
    fflush(stdout);
}

/* ---------------------------------------------------------------- resafe train */

static void free_run(train_run *r) {
    for (int s = 0; s < N_STAGES; s++) free(r->dir[s]);
    if (r->dpo_cfg) rs_config_free(r->dpo_cfg);
    rs_run_paths_free(&r->p);
}

static int setup(train_run *r, const rs_config *cfg) {
    memset(r, 0, sizeof *r);
    r->cfg = cfg;
    RS_TRY(rs_run_paths_init(cfg, &r->p));
    RS_TRY(validate(cfg, &r->p, r));
    for (int s = 0; s < N_STAGES; s++)
        r->dir[s] = rs_path_join(r->p.run_dir, rs_train_stage_names[s]);
    r->dpo_cfg = config_copy(cfg);
    if (!r->dpo_cfg) return -1;
    if (rs_config_get_str(cfg, "dpo", "data_file")[0])
        rs_warn("train: [dpo] data_file is ignored: the dpo stage trains on the run's patch set");
    neutralize_merge_keys(r->dpo_cfg, cfg);
    RS_TRY(rs_config_set(r->dpo_cfg, "model", "path", r->p.q_dir));
    return rs_config_set(r->dpo_cfg, "dpo", "data_file", r->p.patchset);
}

static int stage_index(const char *name) {
    for (int s = 0; s < N_STAGES; s++)
        if (!strcmp(name, rs_train_stage_names[s])) return s;
    return -1;
}

int rs_train_run(const rs_config *cfg, const char *from_stage, int force) {
    return rs_train_run_until(cfg, from_stage, NULL, force);
}

int rs_train_run_until(const rs_config *cfg, const char *from_stage, const char *to_stage,
                       int force) {
    int from = from_stage ? stage_index(from_stage) : N_STAGES;
    int to = to_stage ? stage_index(to_stage) : N_STAGES - 1;
    if (from < 0 || to < 0)
        return RS_FAIL("%s %s: not a stage (quantize, triplets, dpo, merge, eval, report)",
                       from < 0 ? "--from" : "--to", from < 0 ? from_stage : to_stage);
    train_run r;
    int rc = setup(&r, cfg);
    if (rc != 0) {
        free_run(&r);
        return rc;
    }
    rs_progress_set_mode_name(rs_config_get_str(cfg, "run", "progress"));
    int threads = (int)rs_config_get_int(cfg, "model", "threads");
    if (threads > 0) omp_set_num_threads(threads);
    rs_train_catch_signals();
    printf("train: run directory %s\n", r.p.run_dir);
    for (int s = 0; s <= to && rc == 0; s++) {
        int sig = rs_train_stop_signal();
        if (sig) {
            rs_warn("train: interrupted (signal %d) before the %s stage; run the same command "
                    "again to continue",
                    sig, rs_train_stage_names[s]);
            rc = sig;
            break;
        }
        if (s == ST_QUANTIZE && r.p.q_given) {
            header(s, "skipped ([quant] model = %s)", r.p.q_dir);
            continue;
        }
        int forced = force || s >= from;
        rc = do_stage(&r, s, forced, force ? "--force" : "--from");
        if (rc > 0)
            rs_warn("train: interrupted (signal %d) in the %s stage; run the same command again "
                    "to continue",
                    rc, rs_train_stage_names[s]);
    }
    if (rc == 0 && to == N_STAGES - 1) print_results(&r);
    free_run(&r);
    return rc;
}
