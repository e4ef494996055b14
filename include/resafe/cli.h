/* cli: one file per subcommand (src/cmd_<name>.c), dispatched by src/main.c.
 * Each returns the process exit code (0 ok, 1 error, 2 usage). */
#ifndef RESAFE_CLI_H
#define RESAFE_CLI_H

#include "resafe/config.h"

int cmd_generate(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_config(int argc, char **argv);
int cmd_sft(int argc, char **argv);
int cmd_dpo(int argc, char **argv);
int cmd_quantize(int argc, char **argv);
int cmd_train(int argc, char **argv);    /* src/cmd_train.c */
int cmd_triplets(int argc, char **argv); /* src/cmd_triplets.c */
int cmd_merge(int argc, char **argv);    /* src/cmd_merge.c */
int cmd_eval(int argc, char **argv);     /* src/cmd_eval.c */

/* [run] log_level (debug when verbose) and [run] progress, for the commands that take a run
 * config (src/cmd_training.c). */
void cli_apply_run_settings(const rs_config *cfg, int verbose);

/* Rank and world of this process ([dist] launcher); -1 + message when the launcher's variables
 * are malformed, or when world > 1 and `command` does not run data parallel (data_parallel 0:
 * world copies of one job would race on the same outputs). src/cmd_training.c. */
int cli_check_world(const rs_config *cfg, const char *command, int data_parallel);

/* The training commands' shared command line (src/cmd_training.c). plan (NULL: the command
 * has no --plan): what --plan runs instead of run (a dry run). */
int cli_run_training(int argc, char **argv, const char *name, const char *usage,
                     int (*run)(const rs_config *cfg, int resume, int force),
                     int (*plan)(const rs_config *cfg));

#endif
