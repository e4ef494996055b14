/* placeholder: replaced by the module that implements 'resafe generate' */
#include <stdio.h>
#include "resafe/cli.h"
int cmd_generate(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "resafe: error: 'generate' is not implemented yet\n");
    return 1;
}
