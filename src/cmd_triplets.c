/* resafe triplets (stub until the stage lands). */
#include <stdio.h>

#include "resafe/cli.h"

int cmd_triplets(int argc, char **argv) {
    (void)argc, (void)argv;
    fprintf(stderr, "resafe triplets: not implemented yet\n");
    return 1;
}
