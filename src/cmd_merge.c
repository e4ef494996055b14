/* resafe merge: fold the DPO adapter into the quantized model (rs_merge_run), one model directory
 * per merge mode. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/cli.h"
#include "resafe/core.h"
#include "resafe/pipeline.h"

static const char *g_usage =
    "usage: resafe merge [--config FILE.ini] [--set section.key=value]... [--mode M]\n"
    "                    [--quantized DIR] [--adapter FILE] [--out DIR] [-v]\n"
    "  Folds the adapter into the quantized model: M = grid (requantize onto the model's own\n"
    "  scales and zeros), refit (requantize from scratch by RTN), adapter (keep the LoRA beside\n"
    "  the packed weights: resafe_adapter.h5, applied at load), exact (the adapter's mean over\n"
    "  each quantization group folded into the zero points; exact for a group-constant adapter).\n"
    "  Defaults from the config: --quantized = [quant] model or <[run] out_dir>/quantize/model,\n"
    "  --adapter = <out_dir>/dpo/adapter.h5, the modes = [lora] merge plus [lora] merge_compare,\n"
    "  each written to <out_dir>/merge/<mode> (--out: one mode only). Without --config,\n"
    "  --quantized, --adapter and --out are required. Prints one stats line per mode.\n";

typedef struct {
    const char *config, *mode, *q_dir, *adapter, *out;
    int verbose;
} options;

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "resafe merge: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n%s", g_usage);
    return 2;
}

static int parse_args(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char **slot = strcmp(a, "--config") == 0      ? &o->config
                            : strcmp(a, "--mode") == 0      ? &o->mode
                            : strcmp(a, "--quantized") == 0 ? &o->q_dir
                            : strcmp(a, "--adapter") == 0   ? &o->adapter
                            : strcmp(a, "--out") == 0       ? &o->out
                                                            : NULL;
        if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
            o->verbose = 1;
        } else if (slot || strcmp(a, "--set") == 0) {
            if (i + 1 >= argc) return usage_error("%s needs a value", a);
            if (slot) *slot = argv[i + 1];
            i++;
        } else {
            return usage_error("unknown argument '%s'", a);
        }
    }
    if (!o->config && (!o->q_dir || !o->adapter || !o->out))
        return usage_error("%s", "--config FILE, or all of --quantized, --adapter and --out");
    rs_merge_mode m;
    if (o->mode && rs_merge_mode_from_name(o->mode, &m) != 0)
        return usage_error("--mode '%s': not grid, refit, adapter or exact", o->mode);
    return 0;
}

/* The modes to build: --mode, else [lora] merge then the merge_compare ones. Returns the count. */
static int list_modes(const rs_config *cfg, const options *o, rs_merge_mode *modes) {
    int n = 0;
    if (o->mode || !o->config) {
        if (rs_merge_mode_from_name(o->mode ? o->mode : "grid", &modes[0]) != 0) return -1;
        return 1;
    }
    if (rs_merge_mode_from_name(rs_config_get_str(cfg, "lora", "merge"), &modes[n++]) != 0)
        return RS_FAIL("[lora] merge: not grid, refit, adapter or exact");
    const char *cmp = rs_config_get_str(cfg, "lora", "merge_compare");
    if (strcmp(cmp, "none") == 0 || !cmp[0]) return n;
    char *list = rs_strdup(strcmp(cmp, "all") == 0 ? "grid,refit,adapter,exact" : cmp), *save;
    for (char *t = strtok_r(list, ", ", &save); t; t = strtok_r(NULL, ", ", &save)) {
        rs_merge_mode m;
        if (rs_merge_mode_from_name(t, &m) != 0) {
            free(list);
            return RS_FAIL("[lora] merge_compare: '%s' is not grid, refit, adapter or exact", t);
        }
        int seen = 0;
        for (int i = 0; i < n; i++) seen |= modes[i] == m;
        if (!seen) modes[n++] = m;
    }
    free(list);
    return n;
}

static void print_stats(rs_merge_mode m, const char *out, const rs_merge_stats *st) {
    printf("merge %s: kept %.1f%% of the delta's norm (relative error %.3g, |delta| %.4g), "
           "%ld codes changed -> %s\n",
           rs_merge_mode_name(m), 100.0 * st->kept_fraction, st->rel_error, st->delta_norm,
           st->n_codes_changed, out);
}

static int run(const rs_config *cfg, const options *o) {
    rs_run_paths p;
    memset(&p, 0, sizeof p);
    if (o->config) RS_TRY(rs_run_paths_init(cfg, &p));
    const char *q_dir = o->q_dir ? o->q_dir : p.q_dir;
    const char *adapter = o->adapter ? o->adapter : p.adapter;
    rs_merge_mode modes[4];
    int n = list_modes(cfg, o, modes), rc = n < 0 ? -1 : 0;
    if (rc == 0 && o->out && n > 1)
        rc = RS_FAIL("--out names one directory: give --mode too ([lora] merge_compare asks for %d "
                     "modes)", n);
    for (int i = 0; rc == 0 && i < n; i++) {
        const char *name = rs_merge_mode_name(modes[i]);
        char *out = o->out ? rs_strdup(o->out) : rs_path_join(p.merge_dir, name);
        rs_merge_stats st;
        int r = rs_merge_run(cfg, q_dir, adapter, modes[i], out, &st);
        if (r == 0) {
            print_stats(modes[i], out, &st);
        } else if (i > 0) { /* a compared mode the model's format cannot take: say so, go on */
            rs_warn("merge %s skipped: %s", rs_merge_mode_name(modes[i]), rs_last_error());
        } else {
            rc = -1;
        }
        free(out);
    }
    rs_run_paths_free(&p);
    return rc;
}

int cmd_merge(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return fputs(g_usage, stdout), 0;
    options o;
    int urc = parse_args(argc, argv, &o);
    if (urc) return urc;
    rs_config *cfg = o.config ? rs_config_load(o.config) : rs_config_new();
    int rc = cfg ? 0 : -1;
    if (rc == 0) rc = rs_config_apply_sets(cfg, argc, argv);
    if (o.verbose) rs_set_log_level(RS_LOG_DEBUG);
    if (rc == 0) rc = run(cfg, &o);
    rs_config_free(cfg);
    if (rc != 0) {
        fprintf(stderr, "resafe: error: %s\n", rs_last_error());
        return 1;
    }
    return 0;
}
