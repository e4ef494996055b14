/* resafe eval (stub until the stage lands). */
#include <stdio.h>

#include "resafe/cli.h"

int cmd_eval(int argc, char **argv) {
    (void)argc, (void)argv;
    fprintf(stderr, "resafe eval: not implemented yet\n");
    return 1;
}
