/* resafe merge (stub until the stage lands). */
#include <stdio.h>

#include "resafe/cli.h"

int cmd_merge(int argc, char **argv) {
    (void)argc, (void)argv;
    fprintf(stderr, "resafe merge: not implemented yet\n");
    return 1;
}
