/* placeholder: replaced by the module that implements 'resafe config' */
#include <stdio.h>
#include "resafe/cli.h"
int cmd_config(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "resafe: error: 'config' is not implemented yet\n");
    return 1;
}
