/* resafe config: validate an INI run config, or print the documentation of every key. */
#include <stdio.h>
#include <string.h>

#include "resafe/cli.h"
#include "resafe/config.h"
#include "resafe/core.h"

static const char *g_usage =
    "usage: resafe config --check FILE.ini [--set section.key=value]...\n"
    "       resafe config --doc\n";

static int usage_error(const char *fmt, const char *arg) {
    fputs("resafe: error: ", stderr);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    fputs(g_usage, stderr);
    return 2;
}

static int check(const char *path, int n_sets, char **sets) {
    rs_config *cfg = rs_config_load(path);
    if (!cfg) rs_die_last();
    for (int i = 0; i < n_sets; i++)
        if (rs_config_set_arg(cfg, sets[i]) != 0) {
            rs_fail_context("--set");
            rs_config_free(cfg);
            rs_die_last();
        }
    printf("ok\n; effective values of %s (unset keys show their default)\n", path);
    rs_config_print(cfg, stdout);
    rs_config_free(cfg);
    return 0;
}

int cmd_config(int argc, char **argv) {
    const char *file = NULL;
    int doc = 0, n_sets = 0;
    char *sets[64];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(g_usage, stdout);
            return 0;
        } else if (strcmp(a, "--doc") == 0) {
            doc = 1;
        } else if (strcmp(a, "--check") == 0 || strcmp(a, "--set") == 0) {
            if (i + 1 >= argc) return usage_error("%s needs a value", a);
            if (a[2] == 'c') {
                if (file) return usage_error("%s: only one file can be checked", a);
                file = argv[++i];
            } else {
                if (n_sets == (int)(sizeof sets / sizeof sets[0]))
                    return usage_error("%s: too many overrides", a);
                sets[n_sets++] = argv[++i];
            }
        } else {
            return usage_error("unknown argument '%s'", a);
        }
    }
    if (doc && (file || n_sets)) return usage_error("%s cannot be combined with --check", "--doc");
    if (doc) {
        rs_config_print_doc(stdout);
        return 0;
    }
    if (!file) return usage_error("%s", "nothing to do: give --check FILE.ini or --doc");
    return check(file, n_sets, sets);
}
