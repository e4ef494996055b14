/* triplets: the patch set (stub until the stage lands). */
#include "resafe/core.h"
#include "resafe/pipeline.h"

int rs_triplets_run(const rs_config *cfg, const char *fp_dir, const char *q_dir,
                    const char *out_path) {
    (void)cfg, (void)fp_dir, (void)q_dir, (void)out_path;
    return RS_FAIL("resafe triplets: not implemented yet");
}
