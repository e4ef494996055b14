/* cli: one file per subcommand (src/cmd_<name>.c), dispatched by src/main.c.
 * Each returns the process exit code (0 ok, 1 error, 2 usage). */
#ifndef RESAFE_CLI_H
#define RESAFE_CLI_H

int cmd_generate(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_config(int argc, char **argv);

#endif
