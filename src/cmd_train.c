/* resafe train --config FILE [--set section.key=value]... [--from STAGE] [--to STAGE] [--force]
 *              [--plan] [-v] */
#include <stdio.h>
#include <string.h>

#include "resafe/cli.h"
#include "resafe/core.h"
#include "resafe/dpo.h"
#include "resafe/pipeline.h"

static const char *g_usage =
    "usage: resafe train --config FILE [--set section.key=value]... [--from STAGE] [--to STAGE]\n"
    "                    [--force] [--plan] [-v]\n"
    "  Runs the Q-resafe pipeline into [run] out_dir: quantize, triplets, dpo, merge, eval,\n"
    "  report. A stage whose manifest matches its inputs is skipped; an interrupted run\n"
    "  continues where it stopped (dpo from its checkpoint) when the command is run again.\n"
    "  --config FILE      the run config (INI)\n"
    "  --set s.k=v        override one key (repeatable)\n"
    "  --from STAGE       rerun STAGE and every stage after it\n"
    "  --to STAGE         stop after STAGE\n"
    "  --force            rerun every stage (no resume)\n"
    "  --plan             print the dpo stage's memory plan and exit (as `resafe dpo --plan`:\n"
    "                     the run's quantized model, or [model] path's dense weights before it\n"
    "                     exists; nothing is run)\n"
    "  -v, --verbose      debug log\n";

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "resafe train: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n%s", g_usage);
    return 2;
}

/* Exit codes: 0 done, 1 error, 2 usage, 128 + signal when interrupted. */
int cmd_train(int argc, char **argv) {
    const char *path = NULL, *from = NULL, *to = NULL;
    int force = 0, verbose = 0, planning = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return fputs(g_usage, stdout), 0;
        if (!strcmp(a, "--force")) force = 1;
        else if (!strcmp(a, "--plan")) planning = 1;
        else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) verbose = 1;
        else if (!strcmp(a, "--config") || !strcmp(a, "--set") || !strcmp(a, "--from") ||
                   !strcmp(a, "--to")) {
            if (i + 1 >= argc) return usage_error("%s needs a value", a);
            if (!strcmp(a, "--config")) path = argv[i + 1];
            if (!strcmp(a, "--from")) from = argv[i + 1];
            if (!strcmp(a, "--to")) to = argv[i + 1];
            i++;
        } else
            return usage_error("unknown argument '%s'", a);
    }
    if (!path) return usage_error("%s", "--config FILE is required");
    rs_config *cfg = rs_config_load(path);
    int rc = cfg ? 0 : -1;
    for (int i = 1; rc == 0 && i + 1 < argc; i++)
        if (!strcmp(argv[i], "--set") && rs_config_set_arg(cfg, argv[++i]) != 0)
            rc = rs_fail_context("--set");
        else if (!strcmp(argv[i], "--config") || !strcmp(argv[i], "--from") ||
                 !strcmp(argv[i], "--to"))
            i++;
    if (rc == 0) {
        cli_apply_run_settings(cfg, verbose);
        /* the dpo stage trains the run's quantized model on the run's patch set */
        if (planning) rc = rs_config_set(cfg, "dpo", "data_file", "") == 0 ? rs_dpo_plan(cfg) : -1;
        else if (cli_check_world(cfg, "train", 0) != 0) rc = -1;
        else rc = rs_train_run_until(cfg, from, to, force);
    }
    rs_config_free(cfg);
    if (rc < 0) {
        fflush(stdout);
        fprintf(stderr, "resafe: error: %s\n", rs_last_error());
        return 1;
    }
    return rc > 0 ? 128 + rc : 0;
}
