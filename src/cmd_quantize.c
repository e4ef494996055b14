/* resafe quantize: a model directory into a quantized model directory (or its dequantized HF
 * export), through rs_quantize_model (RTN, AWQ, GPTQ; NF4/FP4/INT8 are RTN formats), with
 * optional SNIP critical-weight protection. The command line fills an rs_quantize_job
 * (src/quantize_job.c, shared with the quantize stage of `resafe train`). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/cli.h"
#include "resafe/quant_io.h"
#include "resafe/quant_methods.h"

static const char *g_usage =
    "usage: resafe quantize --model DIR --method M --out DIR [options]\n"
    "  --model DIR            Hugging Face model directory (fp32/fp16/bf16 safetensors)\n"
    "  --method M             rtn | awq | gptq (grouped integer), nf4 | fp4 (bitsandbytes\n"
    "                         codebooks, absmax blocks of 64), int8 (per-row int8 + fp16\n"
    "                         outlier columns)\n"
    "  --bits N               2, 3, 4 or 8 for rtn/awq/gptq (default 4)\n"
    "  --group G              32, 64, 128 or 0 = whole row (default 128)\n"
    "  --sym                  symmetric codes (no zero points)\n"
    "  --threshold X          int8: |w| above X makes its column an outlier (default 6)\n"
    "  --calib FILE           calibration prompts (.txt, .csv, .jsonl); needed by awq, gptq\n"
    "  --calib-column C       CSV/JSONL column (default prompt)\n"
    "  --calib-max N          at most N calibration texts (default 128)\n"
    "  --max-seq-len N        calibration sequences cut to N tokens (default 512)\n"
    "  --act-order            gptq: columns in order of decreasing Hessian diagonal\n"
    "  --protect-tau T        keep the top T fraction of SNIP scores in fp16 (default 0 = off)\n"
    "  --protect-data FILE    safety calibration set for the scores (CSV/JSONL)\n"
    "  --protect-column C     its column (default prompt+target)\n"
    "  --protect-max N        at most N items (default 64)\n"
    "  --seed S               default 0\n"
    "  --out DIR              output directory (must not exist)\n"
    "  --export dequant       write a plain HF directory of W_eff = dequant(Q) instead\n"
    "  --export-dtype T       bf16 (default), f16 or f32 for --export dequant\n"
    "training methods: qat (LLM-QAT: full fine-tuning through fake quantization on RTN's grid\n"
    "  (--bits, --group, --sym), then RTN on that grid) and qlora (NF4 base + LoRA fine-tuning,\n"
    "  adapter merged; with --bits [--group] [--sym] the base is RTN's integer grid);\n"
    "  --calib is a JSONL file of {prompt, response}, the loss is on the response tokens\n"
    "  --calib-column C       JSONL member holding the prompt (default prompt)\n"
    "  --response-column R    JSONL member holding the response (default response)\n"
    "  --steps N              optimizer steps (default 0 = --epochs passes)\n"
    "  --epochs N             passes over the calibration set (default 1)\n"
    "  --lr X                 AdamW peak learning rate (qat 2e-5, qlora 2e-4), cosine decay\n"
    "  --batch N              examples per step (default 8)\n"
    "  --micro-batch N        examples per forward pass (default = --batch)\n"
    "  --chat-template T      auto (default), none, llama-2, llama-3, gemma, mistral, chatml\n"
    "  --backend B            cpu (default), cuda or auto: where the training runs\n"
    "  --threads N            CPU threads (default: OpenMP's)\n"
    "  --act-bits B, --kv-bits B   qat: fake-quantized activations / KV cache (resafe sft's\n"
    "                         qat_act_bits / qat_kv_bits; default 0 = off)\n"
    "  --save-trained DIR     qat: also keep the trained fp32 (master) model in DIR\n"
    "  --rank R, --alpha A    qlora: LoRA rank (default 64) and alpha (default 16)\n"
    "  --targets L            qlora: all (default) or a list such as q,v\n"
    "  --merge M              qlora: refit (default), grid or adapter (see README)\n"
    "  -v, --verbose          debug log\n";

typedef rs_quantize_job options;

/* What the command line set explicitly. */
typedef struct {
    int bits, group;
    const char *train_flag;            /* a training flag given */
    const char *qat_flag, *qlora_flag; /* a flag given that only qat / qlora takes */
} given;

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "resafe quantize: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n%s", g_usage);
    return 2;
}

/* --method into the spec's format and the driver's method. */
static int set_method(options *o, const given *g) {
    if (rs_quantize_job_set_method(o, o->method_name, g->bits, g->group) == 0) return 0;
    return usage_error("--method: '%s' is not rtn, awq, gptq, nf4, fp4, int8, qat or qlora",
                       o->method_name);
}

static int parse_train_value(options *o, const char *flag, const char *v, int *rc) {
    rs_qtrain_opts *t = &o->train;
    long n;
    float f;
    struct {
        const char *flag;
        int *dst;
        long lo, hi;
    } ints[] = {
        {"--steps", &t->steps, 0, 1000000000}, {"--epochs", &t->epochs, 1, 10000},
        {"--batch", &t->batch_size, 1, 65536}, {"--micro-batch", &t->micro_batch_size, 1, 65536},
        {"--threads", &t->threads, 0, 4096},   {"--act-bits", &t->act_bits, 0, 16},
        {"--kv-bits", &t->kv_bits, 0, 16},     {"--rank", &t->rank, 1, 65536}};
    *rc = 0;
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++)
        if (!strcmp(flag, ints[i].flag)) {
            if (rs_parse_long(v, ints[i].lo, ints[i].hi, &n))
                *rc = usage_error("%s: out of range or not an integer", flag);
            else
                *ints[i].dst = (int)n;
            return 1;
        }
    if (!strcmp(flag, "--lr")) { /* a double, as the config's [quant] train_lr */
        char *end;
        double x = strtod(v, &end);
        if (end == v || *end || !(x > 0 && x <= 1))
            *rc = usage_error("--lr: '%s' is not in (0, 1]", v);
        else
            t->lr = x;
        return 1;
    }
    if (!strcmp(flag, "--alpha")) {
        if (rs_parse_float(v, 1e-30f, 1e6f, &f))
            *rc = usage_error("--alpha: '%s' is not > 0", v);
        else
            t->alpha = f;
        return 1;
    }
    const char **strs[] = {&t->response_key, &t->chat_template, &t->backend,
                           &t->targets,      &t->merge,         &t->save_trained};
    const char *names[] = {"--response-column", "--chat-template", "--backend",
                           "--targets",         "--merge",         "--save-trained"};
    for (size_t i = 0; i < sizeof strs / sizeof *strs; i++)
        if (!strcmp(flag, names[i])) {
            *strs[i] = v;
            return 1;
        }
    return 0;
}

static int parse_value(options *o, const char *flag, const char *v, given *g) {
    long n;
    float f;
    int rc;
    if (parse_train_value(o, flag, v, &rc)) {
        g->train_flag = flag;
        if (!strcmp(flag, "--act-bits") || !strcmp(flag, "--kv-bits") ||
            !strcmp(flag, "--save-trained"))
            g->qat_flag = flag;
        if (!strcmp(flag, "--rank") || !strcmp(flag, "--alpha") || !strcmp(flag, "--targets") ||
            !strcmp(flag, "--merge"))
            g->qlora_flag = flag;
        return rc;
    }
    if (!strcmp(flag, "--model"))
        o->model = v;
    else if (!strcmp(flag, "--out"))
        o->out = v;
    else if (!strcmp(flag, "--method"))
        o->method_name = v;
    else if (!strcmp(flag, "--calib"))
        o->calib = v;
    else if (!strcmp(flag, "--calib-column"))
        o->calib_column = o->train.prompt_key = v;
    else if (!strcmp(flag, "--protect-data"))
        o->protect_data = v;
    else if (!strcmp(flag, "--protect-column"))
        o->protect_column = v;
    else if (!strcmp(flag, "--export"))
        o->export_kind = v;
    else if (!strcmp(flag, "--export-dtype"))
        o->export_dtype = v;
    else if (!strcmp(flag, "--bits")) {
        if (rs_parse_long(v, 1, 16, &n)) return usage_error("--bits: '%s' is not 2, 3, 4 or 8", v);
        o->q.spec.bits = (int)n, g->bits = 1;
    } else if (!strcmp(flag, "--group")) {
        if (rs_parse_long(v, 0, 1 << 20, &n)) return usage_error("--group: '%s' is not an integer", v);
        o->q.spec.group_size = (int)n, g->group = 1;
    } else if (!strcmp(flag, "--threshold")) {
        if (rs_parse_float(v, 0.0f, 1e30f, &f)) return usage_error("--threshold: '%s' is not >= 0", v);
        o->q.spec.outlier_threshold = f;
    } else if (!strcmp(flag, "--calib-max") || !strcmp(flag, "--protect-max")) {
        if (rs_parse_long(v, 1, 1 << 24, &n)) return usage_error("%s needs an integer >= 1", flag);
        *(flag[2] == 'c' ? &o->calib_max : &o->protect_max) = (int)n;
    } else if (!strcmp(flag, "--max-seq-len")) {
        if (rs_parse_long(v, 2, 1 << 20, &n)) return usage_error("--max-seq-len: '%s' is not >= 2", v);
        o->q.max_seq_len = (int)n;
    } else if (!strcmp(flag, "--protect-tau")) {
        if (rs_parse_float(v, 0.0f, 1.0f, &f))
            return usage_error("--protect-tau: '%s' is not in [0, 1]", v);
        o->q.protect_tau = f;
    } else if (!strcmp(flag, "--seed")) {
        if (rs_parse_long(v, 0, INT32_MAX, &n))
            return usage_error("--seed: '%s' is not an integer >= 0", v);
        o->q.seed = (uint64_t)n;
    } else
        return usage_error("unknown option '%s'", flag);
    return 0;
}

/* The flags that only some methods take. */
static int check_method_flags(const options *o, const given *g) {
    rs_qtrain_kind k = o->train.kind;
    if (k == RS_QTRAIN_NONE && g->train_flag)
        return usage_error("%s applies to --method qat and qlora only", g->train_flag);
    if (k != RS_QTRAIN_QAT && g->qat_flag)
        return usage_error("%s applies to --method qat only", g->qat_flag);
    if (k != RS_QTRAIN_QLORA && g->qlora_flag)
        return usage_error("%s applies to --method qlora only", g->qlora_flag);
    if (rs_quantize_job_check(o, g->bits, g->group) != 0)
        return usage_error("%s", rs_last_error());
    return 0;
}

static int check_options(options *o, const given *g) {
    if (!o->model || !o->out || !o->method_name)
        return usage_error("%s", "--model, --method and --out are required");
    int rc = check_method_flags(o, g);
    if (rc) return rc;
    if ((o->q.method == RS_QMETHOD_AWQ || o->q.method == RS_QMETHOD_GPTQ) && !o->calib)
        return usage_error("--method %s needs --calib FILE", o->method_name);
    if (o->q.protect_tau > 0.0f && !o->protect_data)
        return usage_error("%s", "--protect-tau needs --protect-data FILE");
    if (o->export_kind && strcmp(o->export_kind, "dequant"))
        return usage_error("--export: '%s' (only 'dequant')", o->export_kind);
    if (strcmp(o->export_dtype, "bf16") && strcmp(o->export_dtype, "f16") &&
        strcmp(o->export_dtype, "f32"))
        return usage_error("--export-dtype: '%s' is not bf16, f16 or f32", o->export_dtype);
    if (rs_qspec_check(&o->q.spec) != 0) {
        fprintf(stderr, "resafe quantize: %s\n%s", rs_last_error(), g_usage);
        return 2;
    }
    return 0;
}

static int parse_args(options *o, int *verbose, int argc, char **argv) {
    rs_quantize_job_default(o);
    given g = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(g_usage, stdout);
            return -1;
        }
        if (!strcmp(a, "-v") || !strcmp(a, "--verbose"))
            *verbose = 1;
        else if (!strcmp(a, "--sym"))
            o->q.spec.symmetric = 1;
        else if (!strcmp(a, "--act-order"))
            o->q.gptq_act_order = 1;
        else if (strncmp(a, "--", 2) || i + 1 >= argc)
            return usage_error(
                strncmp(a, "--", 2) ? "unexpected argument '%s'" : "%s needs a value", a);
        else {
            int rc = parse_value(o, a, argv[++i], &g);
            if (rc) return rc;
        }
    }
    if (!o->method_name) return usage_error("%s", "--method is required");
    int rc = set_method(o, &g);
    return rc ? rc : check_options(o, &g);
}

/* ---------------------------------------------------------------- the run */

static int fail(void) {
    fflush(stdout);
    fprintf(stderr, "resafe: error: %s\n", rs_last_error());
    return 1;
}

static void size_report(const options *o, const rs_quant_sizes *r) {
    char name[64];
    double mib = 1048576.0;
    printf("quantized %s (%s): %d linears\n", rs_qspec_name(&o->q.spec, name, sizeof name),
           o->method_name, r->n);
    printf("  quantized bytes   %zu (%.2f MiB; fp16 dense %.2f MiB, ratio %.3f)\n", r->bytes,
           r->bytes / mib, r->dense_bytes / mib,
           r->dense_bytes ? (double)r->bytes / r->dense_bytes : 0.0);
    printf("  critical side     %zu bytes (%.2f%% of the quantized bytes, tau %g)\n",
           r->critical_bytes, r->bytes ? 100.0 * r->critical_bytes / r->bytes : 0.0,
           o->q.protect_tau);
}

static int run(const options *o) {
    rs_quant_sizes sizes;
    int rc = rs_quantize_job_run(o, &sizes);
    if (rc > 0) {
        fprintf(stderr, "resafe quantize: interrupted by signal %d; nothing written\n", rc);
        return 128 + rc;
    }
    if (rc != 0) return fail();
    size_report(o, &sizes);
    printf("wrote %s%s\n", o->out, o->export_kind ? " (dequantized export)" : "");
    return 0;
}

int cmd_quantize(int argc, char **argv) {
    options o;
    int verbose = 0;
    int rc = parse_args(&o, &verbose, argc, argv);
    if (rc != 0) return rc < 0 ? 0 : rc;
    if (verbose) rs_set_log_level(RS_LOG_DEBUG);
    return run(&o);
}
