/* eval: safety and utility evaluation, and the report (stub until the stage lands). */
#include "resafe/core.h"
#include "resafe/pipeline.h"

int rs_eval_run(const rs_config *cfg, const rs_eval_model *models, int n_models,
                const char *reference_dir, const char *out_dir) {
    (void)cfg, (void)models, (void)n_models, (void)reference_dir, (void)out_dir;
    return RS_FAIL("resafe eval: not implemented yet");
}

int rs_report_write(const rs_config *cfg, const rs_run_paths *p) {
    (void)cfg, (void)p;
    return RS_FAIL("resafe report: not implemented yet");
}
