/* merge: fold the adapter into the quantized model (stub until the stage lands). */
#include <string.h>

#include "resafe/core.h"
#include "resafe/pipeline.h"

static const char *const g_modes[] = {"grid", "refit", "adapter", "exact"};

const char *rs_merge_mode_name(rs_merge_mode m) { return g_modes[m]; }

int rs_merge_mode_from_name(const char *name, rs_merge_mode *out) {
    for (int i = 0; i < 4; i++)
        if (strcmp(name, g_modes[i]) == 0) {
            *out = (rs_merge_mode)i;
            return 0;
        }
    return -1;
}

int rs_merge_run(const rs_config *cfg, const char *q_dir, const char *adapter_path,
                 rs_merge_mode mode, const char *out_dir, rs_merge_stats *st) {
    (void)cfg, (void)q_dir, (void)adapter_path, (void)mode, (void)out_dir, (void)st;
    return RS_FAIL("resafe merge: not implemented yet");
}
