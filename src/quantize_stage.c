/* quantize_stage: the [quant] keys as an rs_quantize_job (what `resafe quantize` runs), for the
 * quantize stage of `resafe train`.
 *
 *   format int2|int3|int4|int8  grouped integers, method rtn|awq|gptq (= --method M --bits N)
 *   format nf4|fp4              codebooks (= --method nf4|fp4), method must be rtn; group_size
 *                               left unset means blocks of 64, as the command's default
 * group_size, symmetric, and for awq/gptq calib_file / calib_column / calib_samples map to
 * --group, --sym, --calib, --calib-column, --calib-max.
 *   method qat                  format int2..int8 (= --bits), group_size (= --group, unset 128)
 *   method qlora                format nf4, group_size unset, symmetric false; or format
 *                               int2..int8 (= --bits: an integer base), group_size, symmetric
 * with calib_file, calib_column, response_column, max_seq_len, train_*, qat_* and qlora_* as the
 * training flags, [model] backend / threads / chat_template and [run] seed as --backend,
 * --threads, --chat-template and --seed. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/pipeline.h"
#include "resafe/quant_methods.h"

static int64_t get_int(const rs_config *cfg, const char *key) {
    return rs_config_get_int(cfg, "quant", key);
}

/* The training keys of qat and qlora. */
static void train_of_config(const rs_config *cfg, rs_quantize_job *j) {
    rs_qtrain_opts *t = &j->train;
    t->prompt_key = rs_config_get_str(cfg, "quant", "calib_column");
    t->response_key = rs_config_get_str(cfg, "quant", "response_column");
    t->chat_template = rs_config_get_str(cfg, "model", "chat_template");
    t->backend = rs_config_get_str(cfg, "model", "backend");
    t->threads = (int)rs_config_get_int(cfg, "model", "threads");
    t->steps = (int)get_int(cfg, "train_steps");
    t->epochs = (int)get_int(cfg, "train_epochs");
    t->batch_size = (int)get_int(cfg, "train_batch_size");
    t->micro_batch_size = (int)get_int(cfg, "train_micro_batch_size");
    double lr = rs_config_get_float(cfg, "quant", "train_lr");
    if (lr > 0) t->lr = lr;
    t->act_bits = (int)get_int(cfg, "qat_act_bits");
    t->kv_bits = (int)get_int(cfg, "qat_kv_bits");
    t->rank = (int)get_int(cfg, "qlora_rank");
    t->alpha = (float)rs_config_get_float(cfg, "quant", "qlora_alpha");
    t->targets = rs_config_get_str(cfg, "quant", "qlora_targets");
    t->merge = rs_config_get_str(cfg, "quant", "qlora_merge");
    j->q.seed = (uint64_t)rs_config_get_int(cfg, "run", "seed");
}

/* method qat / qlora: the format's bits, the training keys, the checks of the command. */
static int training_job(const rs_config *cfg, rs_quantize_job *j, const char *format,
                        const char *method) {
    int qlora = !strcmp(method, "qlora");
    int group_given = rs_config_is_set(cfg, "quant", "group_size");
    int int_fmt = !strncmp(format, "int", 3);
    if (qlora && strcmp(format, "nf4") && !int_fmt)
        return RS_FAIL("[quant] method qlora: the base is NF4 or an integer grid: set format = "
                       "nf4 or int2 .. int8 (not %s)", format);
    if (!qlora && strncmp(format, "int", 3))
        return RS_FAIL("[quant] method qat: format %s: needs an integer format (int2 .. int8)",
                       format);
    rs_quantize_job_set_method(j, method, int_fmt, group_given);
    if (int_fmt) j->q.spec.bits = format[3] - '0';
    if (group_given) j->q.spec.group_size = (int)get_int(cfg, "group_size");
    j->q.spec.symmetric = rs_config_get_bool(cfg, "quant", "symmetric");
    j->calib = rs_config_get_str(cfg, "quant", "calib_file");
    if (!j->calib[0]) return RS_FAIL("[quant] method %s needs [quant] calib_file", method);
    train_of_config(cfg, j);
    if (rs_quantize_job_check(j, int_fmt, qlora && group_given) != 0)
        return rs_fail_context("[quant]");
    if (rs_qspec_check(&j->q.spec) != 0) return rs_fail_context("[quant]");
    return 0;
}

/* The job of the config; strings point into cfg. */
static int job_of_config(const rs_config *cfg, rs_quantize_job *j) {
    rs_quantize_job_default(j);
    const char *format = rs_config_get_str(cfg, "quant", "format");
    const char *method = rs_config_get_str(cfg, "quant", "method");
    int group_given = rs_config_is_set(cfg, "quant", "group_size");
    j->q.max_seq_len = (int)get_int(cfg, "max_seq_len");
    if (!strcmp(method, "qat") || !strcmp(method, "qlora"))
        return training_job(cfg, j, format, method);
    if (!strcmp(format, "nf4") || !strcmp(format, "fp4")) {
        if (strcmp(method, "rtn"))
            return RS_FAIL("[quant] method %s: applies to integer formats only (format %s needs "
                           "method rtn)", method, format);
        rs_quantize_job_set_method(j, format, 0, group_given);
    } else {
        rs_quantize_job_set_method(j, method, 1, 1);
        j->q.spec.bits = format[3] - '0'; /* "int2" .. "int8" */
    }
    if (group_given || j->q.spec.format == RS_QFMT_INT)
        j->q.spec.group_size = (int)rs_config_get_int(cfg, "quant", "group_size");
    j->q.spec.symmetric = rs_config_get_bool(cfg, "quant", "symmetric");
    if (j->q.method != RS_QMETHOD_RTN) {
        j->calib = rs_config_get_str(cfg, "quant", "calib_file");
        if (!j->calib[0]) return RS_FAIL("[quant] method %s needs [quant] calib_file", method);
        j->calib_column = rs_config_get_str(cfg, "quant", "calib_column");
        j->calib_max = (int)rs_config_get_int(cfg, "quant", "calib_samples");
    }
    if (rs_qspec_check(&j->q.spec) != 0) return rs_fail_context("[quant]");
    return 0;
}

int rs_quantize_stage_check(const rs_config *cfg) {
    rs_quantize_job j;
    return job_of_config(cfg, &j);
}

int rs_quantize_stage(const rs_config *cfg, const char *fp_dir, const char *out_dir) {
    rs_quantize_job j;
    RS_TRY(job_of_config(cfg, &j));
    int threads = (int)rs_config_get_int(cfg, "model", "threads");
    if (threads > 0) omp_set_num_threads(threads);
    j.model = fp_dir;
    j.out = out_dir;
    rs_quant_sizes sizes;
    int rc = rs_quantize_job_run(&j, &sizes);
    if (rc != 0) return rc; /* -1, or the signal that stopped a training method */
    char name[64];
    rs_info("quantize: %s (%s), %d linears, %.2f MiB (fp16 dense %.2f MiB) -> %s",
            rs_qspec_name(&j.q.spec, name, sizeof name), j.method_name, sizes.n,
            sizes.bytes / 1048576.0, sizes.dense_bytes / 1048576.0, out_dir);
    return 0;
}
