/* placeholder: replaced by the module that implements 'resafe inspect' */
#include <stdio.h>
#include "resafe/cli.h"
int cmd_inspect(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "resafe: error: 'inspect' is not implemented yet\n");
    return 1;
}
