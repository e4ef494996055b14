/* pipeline: the run directory's paths (include/resafe/pipeline.h). */
#include "resafe/pipeline.h"

#include <stdlib.h>
#include <string.h>

#include "resafe/core.h"

int rs_run_paths_init(const rs_config *cfg, rs_run_paths *p) {
    memset(p, 0, sizeof *p);
    const char *run = rs_config_get_str(cfg, "run", "out_dir");
    const char *fp = rs_config_get_str(cfg, "model", "path");
    const char *q = rs_config_get_str(cfg, "quant", "model");
    if (!run[0]) return RS_FAIL("[run] out_dir is empty");
    p->run_dir = rs_strdup(run);
    p->fp_dir = rs_strdup(fp);
    p->q_given = q[0] != '\0';
    char *qdir = rs_path_join(run, "quantize");
    p->q_dir = p->q_given ? rs_strdup(q) : rs_path_join(qdir, "model");
    free(qdir);
    char *tdir = rs_path_join(run, "triplets");
    p->patchset = rs_path_join(tdir, "patchset.h5");
    free(tdir);
    p->dpo_dir = rs_path_join(run, "dpo");
    p->adapter = rs_path_join(p->dpo_dir, "adapter.h5");
    p->merge_dir = rs_path_join(run, "merge");
    p->eval_dir = rs_path_join(run, "eval");
    return 0;
}

void rs_run_paths_free(rs_run_paths *p) {
    free(p->run_dir), free(p->fp_dir), free(p->q_dir), free(p->patchset);
    free(p->dpo_dir), free(p->adapter), free(p->merge_dir), free(p->eval_dir);
    memset(p, 0, sizeof *p);
}
