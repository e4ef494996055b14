/* resafe sft: full-parameter supervised fine-tuning (optionally QAT) from a run config. */
#include "resafe/cli.h"
#include "resafe/train.h"

static const char *g_usage =
    "usage: resafe sft --config FILE.ini [--set section.key=value]... [--resume | --force] [-v]\n"
    "  Trains every parameter of [model] path on [sft] data_file (JSONL {prompt, response}:\n"
    "  the loss covers response tokens only) and writes a Hugging Face model directory to\n"
    "  [sft] output_dir (default <[run] out_dir>/sft/model). [sft] qat = true trains through\n"
    "  fake-quantized linear weights (qat_bits, qat_symmetric). cpu: fp32 throughout; cuda:\n"
    "  bf16 weights with fp32 masters, gradients and AdamW moments (mixed precision).\n"
    "  --resume   continue from <[run] out_dir>/sft/checkpoint.h5 (bit-identical)\n"
    "  --force    start over although a checkpoint exists\n"
    "  SIGINT/SIGTERM write a checkpoint at the next step boundary and exit 128 + signal.\n";

int cmd_sft(int argc, char **argv) {
    return cli_run_training(argc, argv, "sft", g_usage, rs_sft_run, NULL);
}
