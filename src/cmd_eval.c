/* resafe eval: the evaluation stage on its own (rs_eval_run), and the report (rs_report_write). */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/cli.h"
#include "resafe/dist.h"
#include "resafe/core.h"
#include "resafe/eval.h"
#include "resafe/pipeline.h"
#include "resafe/progress.h"

static const char *g_usage =
    "usage: resafe eval --config FILE.ini [--set section.key=value]... [--model NAME=DIR]...\n"
    "                   [--reference DIR] [--out DIR] [--report | --report-only] [-v]\n"
    "  --config FILE.ini   run config: [eval] sets and metrics, [generate] chat/system/batch,\n"
    "                      [model] backend, [run] seed and out_dir\n"
    "  --set s.k=V         override one config key (repeatable)\n"
    "  --model NAME=DIR    a model to evaluate (repeatable; default: the run's models that\n"
    "                      exist: fp = [model] path, quantized, patched_merged = merge/<[lora]\n"
    "                      merge>, merge_<mode> for every other merge/<mode>)\n"
    "  --reference DIR     full-precision model for KL and token flips (default [model] path)\n"
    "  --out DIR           where eval.json and <name>/responses.jsonl go (default <run>/eval)\n"
    "  --report            also write report.md and results.json (README: resafe eval)\n"
    "  --report-only       write them from the eval.json already in the eval directory\n"
    "                      (evaluates nothing)\n"
    "  -v, --verbose       debug log\n";

typedef struct {
    const char *config, *reference, *out;
    int report, report_only, verbose;
    rs_eval_model *models;
    int n_models;
    char **owned;
    int n_owned;
} options;

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "resafe eval: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n%s", g_usage);
    return 2;
}

static const char *own(options *o, char *s) {
    o->owned = rs_realloc(o->owned, (size_t)(o->n_owned + 1) * sizeof *o->owned);
    return o->owned[o->n_owned++] = s;
}

static void add_model(options *o, const char *name, const char *dir) {
    o->models = rs_realloc(o->models, (size_t)(o->n_models + 1) * sizeof *o->models);
    o->models[o->n_models++] = (rs_eval_model){name, dir};
}

static int parse_args(options *o, int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return fputs(g_usage, stdout), -1;
        if (strcmp(a, "--report") == 0 || strcmp(a, "--report-only") == 0) {
            o->report = 1;
            o->report_only |= strcmp(a, "--report-only") == 0;
            continue;
        }
        if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
            o->verbose = 1;
            continue;
        }
        if (i + 1 >= argc) return usage_error("option '%s' needs a value (or is unknown)", a);
        const char *v = argv[++i];
        if (strcmp(a, "--config") == 0)
            o->config = v;
        else if (strcmp(a, "--set") == 0)
            continue; /* applied after loading */
        else if (strcmp(a, "--reference") == 0)
            o->reference = v;
        else if (strcmp(a, "--out") == 0)
            o->out = v;
        else if (strcmp(a, "--model") == 0) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v || !eq[1]) return usage_error("--model: '%s' is not NAME=DIR", v);
            const char *name = own(o, rs_strndup(v, (size_t)(eq - v)));
            for (const char *p = name; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                      (*p >= '0' && *p <= '9') || *p == '_' || *p == '-' || *p == '.'))
                    return usage_error("--model: name '%s' may hold only letters, digits, _ - .",
                                       name);
            add_model(o, name, eq + 1);
        } else {
            return usage_error("unknown option '%s'", a);
        }
    }
    if (!o->config) return usage_error("%s", "--config FILE is required");
    if (o->report_only && o->n_models)
        return usage_error("%s", "--report-only evaluates nothing: it takes no --model");
    return 0;
}

static const char *fmt_pct(const cJSON *m, const char *key, char *buf, size_t n) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, key);
    if (cJSON_IsNumber(v))
        snprintf(buf, n, "%.1f", 100.0 * v->valuedouble);
    else
        snprintf(buf, n, "-");
    return buf;
}

/* The short table printed at the end. */
static void print_summary(const char *out_dir) {
    char *path = rs_path_join(out_dir, "eval.json"), *text;
    if (rs_read_file(path, &text, NULL) != 0) {
        free(path);
        return;
    }
    cJSON *root = cJSON_Parse(text);
    const cJSON *models = cJSON_GetObjectItemCaseSensitive(root, "models"), *m;
    printf("%-18s %8s %10s %10s %10s %10s %10s\n", "model", "ASR %", "benign %", "overref %", "ppl",
           "KL", "flips %");
    cJSON_ArrayForEach(m, models) {
        char a[32], b[32], s[32], f[32], ppl[32] = "-", kl[32] = "-";
        const cJSON *pv = cJSON_GetObjectItemCaseSensitive(m, "ppl");
        const cJSON *kv = cJSON_GetObjectItemCaseSensitive(m, "kl_to_fp");
        if (cJSON_IsNumber(pv)) snprintf(ppl, sizeof ppl, "%.3f", pv->valuedouble);
        if (cJSON_IsNumber(kv)) snprintf(kl, sizeof kl, "%.4g", kv->valuedouble);
        printf("%-18s %8s %10s %10s %10s %10s %10s\n", m->string, fmt_pct(m, "asr", a, sizeof a),
               fmt_pct(m, "benign_accuracy", b, sizeof b), fmt_pct(m, "over_refusal", s, sizeof s),
               ppl, kl, fmt_pct(m, "flip_rate", f, sizeof f));
    }
    printf("%s\n", path);
    cJSON_Delete(root);
    free(text), free(path);
}

/* --report-only: the evaluation it reports must exist and hold a "models" object. */
static int check_eval_json(const char *eval_dir) {
    char *path = rs_path_join(eval_dir, "eval.json"), *text = NULL;
    size_t n = 0;
    int rc = 0;
    if (!rs_path_exists(path)) {
        rc = RS_FAIL("eval: --report-only: %s does not exist (run resafe eval first)", path);
    } else if (rs_read_file(path, &text, &n) != 0) {
        rc = -1;
    } else {
        cJSON *root = cJSON_ParseWithLength(text, n);
        const char *at = cJSON_GetErrorPtr();
        if (!root)
            rc = RS_FAIL("%s: not valid JSON (near byte %ld)", path, at ? (long)(at - text) : 0L);
        else if (!cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(root, "models")))
            rc = RS_FAIL("%s: no \"models\" object (not written by resafe eval?)", path);
        cJSON_Delete(root);
    }
    free(text), free(path);
    return rc;
}

static int run(options *o, int argc, char **argv) {
    rs_config *cfg = rs_config_load(o->config);
    if (!cfg) return -1;
    int rc = 0;
    if (rc == 0) rc = rs_config_apply_sets(cfg, argc, argv);
    if (rc == 0) rc = cli_check_world(cfg, "eval", 1);
    rs_dist d = {.rank = 0};
    if (rc == 0) rc = rs_dist_from_config(cfg, &d);
    rs_run_paths p;
    memset(&p, 0, sizeof p);
    if (rc == 0) rc = rs_run_paths_init(cfg, &p);
    if (rc == 0) {
        cli_apply_run_settings(cfg, o->verbose);
        if (o->n_models == 0 && !o->report_only) {
            rs_eval_model *ms;
            int n;
            rs_eval_default_models(cfg, &p, &ms, &n);
            for (int i = 0; i < n; i++)
                add_model(o, own(o, (char *)ms[i].name), own(o, (char *)ms[i].dir));
            free(ms);
        }
        if (o->n_models == 0 && !o->report_only)
            rc = RS_FAIL("eval: no --model given and none of the run's models exist (%s, %s, %s/*)",
                         p.fp_dir[0] ? p.fp_dir : "[model] path is empty", p.q_dir, p.merge_dir);
    }
    const char *ref = o->reference;
    if (rc == 0 && !ref && p.fp_dir[0] && rs_path_is_dir(p.fp_dir)) ref = p.fp_dir;
    if (rc == 0 && o->out) {
        free(p.eval_dir);
        p.eval_dir = rs_strdup(o->out);
    }
    if (rc == 0 && o->report_only)
        rc = check_eval_json(p.eval_dir);
    else if (rc == 0)
        rc = rs_eval_run(cfg, o->models, o->n_models, ref, p.eval_dir);
    if (rc == 0 && o->report && d.rank == 0) rc = rs_report_write(cfg, &p);
    if (rc == 0 && d.rank == 0) print_summary(p.eval_dir);
    rs_run_paths_free(&p);
    rs_config_free(cfg);
    return rc;
}

int cmd_eval(int argc, char **argv) {
    options o;
    memset(&o, 0, sizeof o);
    int rc = parse_args(&o, argc, argv);
    if (rc == 0) {
        rc = run(&o, argc, argv) == 0 ? 0 : 1;
        if (rc) fprintf(stderr, "resafe: error: %s\n", rs_last_error());
    }
    for (int i = 0; i < o.n_owned; i++) free(o.owned[i]);
    free(o.owned), free(o.models);
    return rc < 0 ? 0 : rc;
}
