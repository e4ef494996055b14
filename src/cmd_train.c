/* resafe train (stub until the stage lands). */
#include <stdio.h>

#include "resafe/cli.h"

int cmd_train(int argc, char **argv) {
    (void)argc, (void)argv;
    fprintf(stderr, "resafe train: not implemented yet\n");
    return 1;
}
