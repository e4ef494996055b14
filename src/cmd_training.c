/* The command line shared by the training commands (resafe sft, resafe dpo):
 *   --config FILE [--set section.key=value]... [--resume | --force] [--plan] [-v] */
#include <stdio.h>
#include <string.h>

#include "resafe/cli.h"
#include "resafe/dist.h"
#include "resafe/progress.h"
#include "resafe/core.h"

static int usage_error(const char *name, const char *usage, const char *fmt, const char *arg) {
    fprintf(stderr, "resafe %s: ", name);
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n%s", usage);
    return 2;
}

int cli_check_world(const rs_config *cfg, const char *command, int data_parallel) {
    rs_dist d;
    RS_TRY(rs_dist_from_config(cfg, &d));
    char who[96];
    if (d.world > 1 && !data_parallel) return rs_dist_require_single(&d, command);
    rs_debug("dist: %s", rs_dist_describe(&d, who, sizeof who));
    return 0;
}

/* Parse, load the config, apply --set, run. Exit codes: 0 done, 1 error, 2 usage,
 * 128 + signal when interrupted (a checkpoint was written). */
void cli_apply_run_settings(const rs_config *cfg, int verbose) {
    static const rs_log_level levels[] = {RS_LOG_ERROR, RS_LOG_WARN, RS_LOG_INFO, RS_LOG_DEBUG};
    static const char *const names[] = {"error", "warn", "info", "debug"};
    const char *level = rs_config_get_str(cfg, "run", "log_level");
    for (int i = 0; i < 4; i++)
        if (strcmp(level, names[i]) == 0) rs_set_log_level(levels[i]);
    if (verbose) rs_set_log_level(RS_LOG_DEBUG);
    rs_progress_set_mode_name(rs_config_get_str(cfg, "run", "progress"));
}

int cli_run_training(int argc, char **argv, const char *name, const char *usage,
                     int (*run)(const rs_config *cfg, int resume, int force),
                     int (*plan)(const rs_config *cfg)) {
    const char *path = NULL;
    int resume = 0, force = 0, verbose = 0, planning = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return fputs(usage, stdout), 0;
        if (strcmp(a, "--resume") == 0) resume = 1;
        else if (plan && strcmp(a, "--plan") == 0) planning = 1;
        else if (strcmp(a, "--force") == 0) force = 1;
        else if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) verbose = 1;
        else if (strcmp(a, "--config") == 0 || strcmp(a, "--set") == 0) {
            if (i + 1 >= argc) return usage_error(name, usage, "%s needs a value", a);
            if (a[2] == 'c') path = argv[i + 1];
            i++;
        } else {
            return usage_error(name, usage, "unknown argument '%s'", a);
        }
    }
    if (!path) return usage_error(name, usage, "%s", "--config FILE is required");
    if (resume && force)
        return usage_error(name, usage, "%s", "--resume and --force exclude each other");
    rs_config *cfg = rs_config_load(path);
    int rc = cfg ? 0 : -1;
    if (rc == 0) rc = rs_config_apply_sets(cfg, argc, argv);
    if (rc == 0) {
        cli_apply_run_settings(cfg, verbose);
        if (planning) rc = plan(cfg);
        else if (cli_check_world(cfg, name, strcmp(name, "dpo") == 0) != 0) rc = -1;
        else rc = run(cfg, resume, force);
    }
    rs_config_free(cfg);
    if (rc < 0) {
        fprintf(stderr, "resafe: error: %s\n", rs_last_error());
        return 1;
    }
    return rc > 0 ? 128 + rc : 0;
}
