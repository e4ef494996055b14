/* resafe triplets: the patch set stage (FP winner / quantized loser pairs) from a run config. */
#include <stdio.h>
#include <string.h>

#include "resafe/cli.h"
#include "resafe/dist.h"
#include "resafe/core.h"
#include "resafe/h5store.h"
#include "resafe/pipeline.h"
#include "resafe/progress.h"

static const char *g_usage =
    "usage: resafe triplets --config FILE.ini [--set section.key=value]... [--fp DIR]\n"
    "                       [--quantized DIR] [--out FILE] [-v]\n"
    "  Answers [patch] n_prompts prompts (harmful_file and benign_file mixed by\n"
    "  harmful_fraction) with the full-precision and the quantized model (same chat template\n"
    "  and decoding), keeps the pairs whose responses differ (winner = FP, loser = quantized)\n"
    "  with the quantized model's reference log-probs, and writes them as an HDF5 patch set.\n"
    "  --fp DIR          full-precision model (default [model] path)\n"
    "  --quantized DIR   quantized model (default [quant] model, else <out_dir>/quantize/model)\n"
    "  --out FILE        the patch set (default <[run] out_dir>/triplets/patchset.h5)\n"
    "  -v, --verbose     debug log\n";

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "resafe triplets: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n%s", g_usage);
    return 2;
}

typedef struct {
    const char *config, *fp, *q, *out;
    int verbose;
} options;

/* 0, 2 (usage error) or -1 (--help printed). */
static int parse_args(options *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return fputs(g_usage, stdout), -1;
        if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
            o->verbose = 1;
            continue;
        }
        const char **dst = strcmp(a, "--config") == 0      ? &o->config
                           : strcmp(a, "--fp") == 0        ? &o->fp
                           : strcmp(a, "--quantized") == 0 ? &o->q
                           : strcmp(a, "--out") == 0       ? &o->out
                                                           : NULL;
        if (!dst && strcmp(a, "--set") != 0) return usage_error("unknown argument '%s'", a);
        if (i + 1 >= argc) return usage_error("%s needs a value", a);
        i++;
        if (dst) *dst = argv[i];
    }
    if (!o->config) return usage_error("%s", "--config FILE is required");
    return 0;
}

/* The summary, from the file just written. */
static int print_summary(const char *path) {
    static const char *const keys[] = {"n_pairs",     "n_harmful_pairs", "n_benign_pairs",
                                       "n_identical", "n_too_long",      "n_prompts_asked",
                                       "n_complying_winners_dropped"};
    int64_t v[7];
    rs_h5 *h;
    RS_TRY(rs_h5_open(path, &h));
    for (int i = 0; i < 7; i++)
        if (rs_h5_get_attr_i64(h, NULL, keys[i], &v[i]) != 0) {
            rs_h5_close(h);
            return -1;
        }
    rs_h5_close(h);
    printf("%s: %lld pairs kept (%lld harmful, %lld benign); %lld identical pairs dropped, ",
           path, (long long)v[0], (long long)v[1], (long long)v[2], (long long)v[3]);
    if (v[6]) printf("%lld harmful pairs with a complying FP winner dropped, ", (long long)v[6]);
    printf("%lld prompts too long skipped, of %lld prompts asked\n", (long long)v[4],
           (long long)v[5]);
    return 0;
}

static int run(const options *o, int argc, char **argv) {
    rs_config *cfg = rs_config_load(o->config);
    if (!cfg) return -1;
    int rc = 0;
    if (rc == 0) rc = rs_config_apply_sets(cfg, argc, argv);
    rs_run_paths p;
    memset(&p, 0, sizeof p);
    rs_dist d = {.rank = 0};
    if (rc == 0) {
        cli_apply_run_settings(cfg, o->verbose);
        rc = cli_check_world(cfg, "triplets", 1);
        if (rc == 0) rc = rs_dist_from_config(cfg, &d);
        if (rc == 0) rc = rs_run_paths_init(cfg, &p);
    }
    const char *fp = o->fp ? o->fp : p.fp_dir, *q = o->q ? o->q : p.q_dir;
    const char *out = o->out ? o->out : p.patchset;
    if (rc == 0 && (!fp || !fp[0]))
        rc = RS_FAIL("%s: no full-precision model: set [model] path or give --fp DIR", o->config);
    if (rc == 0) rc = rs_triplets_run(cfg, fp, q, out);
    if (rc == 0 && d.rank == 0) rc = print_summary(out);
    rs_run_paths_free(&p);
    rs_config_free(cfg);
    return rc;
}

int cmd_triplets(int argc, char **argv) {
    options o;
    int rc = parse_args(&o, argc, argv);
    if (rc != 0) return rc < 0 ? 0 : rc;
    if (run(&o, argc, argv) != 0) {
        fprintf(stderr, "resafe: error: %s\n", rs_last_error());
        return 1;
    }
    return 0;
}
