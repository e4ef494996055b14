/* qat_method: `resafe quantize --method qat`, LLM-QAT (Liu et al. 2023, arXiv 2305.17888):
 * full-parameter fine-tuning on the calibration set through straight-through fake quantization,
 * then the quantized export of the trained weights.
 *
 * The training is `resafe sft` with [sft] qat = true (sft.c: fp32 masters take the gradients,
 * the forward sees fake_quant_rows(master) on RTN's INT grid: qat_bits, symmetric or not, one
 * grid per group of qat_group_size = --group columns, or per row for 0), run from an in-memory
 * config into a work directory next to the output. The export is RTN of the trained masters on
 * the same grid, so the exported model's weights are the QAT forward's: each linear's dequantized
 * export is compared with fake_quant_rows of the [rows * cols / G, G] view of its master as
 * numbers (bit for bit but for the sign of zero: the symmetric fake quant writes rint(-0.3) *
 * scale = -0 where the export's (code - 2^(bits-1)) * scale is +0, the same number in every
 * product and sum); groups that differ (none, unless the two formulas drift apart) are warned
 * about and counted in the manifest. */
#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/checkpoint.h"
#include "resafe/quant_methods.h"
#include "resafe/train.h"

typedef struct {
    int n_linears, group_size; /* 0: per row */
    long rows, rows_differing; /* rows of the view: groups, or whole rows */
} grid_check;

static void add_grid_check(void *manifest, void *user) {
    const grid_check *g = user;
    cJSON *o = cJSON_AddObjectToObject(manifest, "qat_grid_check");
    cJSON_AddNumberToObject(o, "linears", g->n_linears);
    cJSON_AddNumberToObject(o, "group_size", g->group_size);
    cJSON_AddNumberToObject(o, "rows", (double)g->rows);
    cJSON_AddNumberToObject(o, "rows_differing", (double)g->rows_differing);
}

/* Groups (rows of the [rows * cols / G, G] view; G = cols per row) where dequant(export) !=
 * fake_quant_rows(master) (cpu backend, host weights). sft refused a G not dividing cols. */
static void check_grid(rs_model *m, const rs_quant_result *res, const rs_qspec *spec,
                       grid_check *g) {
    memset(g, 0, sizeof *g);
    g->n_linears = res->n;
    g->group_size = spec->group_size;
    for (int k = 0; k < res->n; k++) {
        const rs_qweight *q = &res->w[k];
        const float *w = *rs_layer_wslot(&m->layers[k / RS_N_LINEARS], k % RS_N_LINEARS);
        size_t n = (size_t)q->rows * q->cols;
        int G = spec->group_size ? spec->group_size : q->cols, n_views = (int)(n / (size_t)G);
        float *fq = rs_malloc(n * sizeof *fq), *dq = rs_malloc(n * sizeof *dq);
        rs_backend_cpu()->fake_quant_rows(fq, w, n_views, G, spec->bits, spec->symmetric);
        rs_dequantize(q, dq);
        for (int r = 0; r < n_views; r++) {
            int differ = 0;
            for (int c = 0; c < G; c++) /* as numbers: fake quant's -0 is the export's +0 */
                differ |= fq[(size_t)r * G + c] != dq[(size_t)r * G + c];
            g->rows_differing += differ;
        }
        g->rows += n_views;
        free(fq), free(dq);
    }
}

static int set_int(rs_config *c, const char *key, long v) {
    char buf[32];
    snprintf(buf, sizeof buf, "%ld", v);
    return rs_config_set(c, "sft", key, buf);
}

/* The QAT fine-tuning: 0, -1 + message, or the number of the signal that stopped it. */
static int train(const rs_quantize_job *j, const char *work, const char *trained) {
    rs_config *c = rs_qtrain_config(j, j->model, work);
    if (!c) return -1;
    int rc = rs_config_set(c, "sft", "qat", "true");
    if (rc == 0) rc = set_int(c, "qat_bits", j->q.spec.bits);
    if (rc == 0) rc = rs_config_set(c, "sft", "qat_symmetric", j->q.spec.symmetric ? "1" : "0");
    if (rc == 0) rc = set_int(c, "qat_group_size", j->q.spec.group_size);
    if (rc == 0) rc = rs_config_set(c, "sft", "output_dir", trained);
    /* LLM-QAT's activation and KV-cache quantization: resafe sft's keys, when it has them */
    if (rc == 0 && j->train.act_bits > 0 && set_int(c, "qat_act_bits", j->train.act_bits) != 0)
        rc = RS_FAIL("--act-bits: this resafe's sft has no activation quantization ([sft] "
                     "qat_act_bits)");
    if (rc == 0 && j->train.kv_bits > 0 && set_int(c, "qat_kv_bits", j->train.kv_bits) != 0)
        rc = RS_FAIL("--kv-bits: this resafe's sft has no KV-cache quantization ([sft] "
                     "qat_kv_bits)");
    /* the work directory goes with the job: nothing to resume */
    if (rc == 0)
        rc = rs_sft_run_once(c, "nothing is kept (resafe quantize has no checkpoints): "
                                "run the command again");
    rs_config_free(c);
    return rc;
}

/* RTN of the trained masters on the training's grid, checked, written to j->out. */
static int export(const rs_quantize_job *j, const char *work, const char *trained,
                  rs_quant_sizes *sizes) {
    rs_model m;
    RS_TRY(rs_model_load(trained, rs_backend_cpu(), &m));
    rs_quant_opts q = j->q;
    rs_quant_result res = {0};
    int rc = rs_quantize_model(&m, NULL, NULL, NULL, &q, &res);
    grid_check g;
    if (rc == 0) {
        check_grid(&m, &res, &q.spec, &g);
        if (g.rows_differing)
            rs_warn("qat: %ld of %ld %s of the export differ from the QAT forward's weights",
                    g.rows_differing, g.rows, g.group_size ? "groups" : "rows");
    }
    char *metrics = rs_path_join(work, "sft/metrics.jsonl");
    const char *extra[] = {metrics, "train_metrics.jsonl", NULL};
    if (rc == 0) rc = rs_quantize_job_write(j, trained, &m, &res, add_grid_check, &g, extra);
    if (rc == 0 && sizes)
        *sizes = (rs_quant_sizes){res.n, res.bytes, res.critical_bytes, res.dense_bytes};
    free(metrics);
    if (res.w) rs_quant_result_free(&res);
    rs_model_free(&m);
    return rc;
}

int rs_qat_job_run(const rs_quantize_job *j, rs_quant_sizes *sizes) {
    RS_TRY(rs_qtrain_precheck(j));
    char *work = rs_tmp_name(j->out);
    const char *keep = j->train.save_trained;
    char *trained = keep ? rs_strdup(keep) : rs_path_join(work, "trained");
    int rc = rs_mkdir_p(work);
    if (rc == 0) rc = train(j, work, trained);
    if (rc == 0) rc = export(j, work, trained, sizes);
    if (rc != 0 && keep && rs_path_exists(trained)) rs_remove_tree(trained);
    if (rs_path_exists(work)) rs_remove_tree(work);
    free(trained), free(work);
    return rc;
}
