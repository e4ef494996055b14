/* resafe dpo: masked-LoRA DPO with SNIP masks (the Q-resafe patch) from a run config. */
#include "resafe/cli.h"
#include "resafe/dpo.h"

static const char *g_usage =
    "usage: resafe dpo --config FILE.ini [--set section.key=value]... [--resume | --force]\n"
    "                  [--plan] [-v]\n"
    "  Trains a LoRA adapter ([lora]) on [model] path with DPO ([dpo]) on the preference pairs\n"
    "  of [dpo] data_file (JSONL {prompt, chosen, rejected}, optionally ref_chosen and\n"
    "  ref_rejected; or a patch set .h5 of `resafe triplets`), updating only the SNIP-selected\n"
    "  entries ([snip]). With [dpo] data_file empty: the run's patch set\n"
    "  (<[run] out_dir>/triplets/patchset.h5) on the run's quantized model ([quant] model, else\n"
    "  <[run] out_dir>/quantize/model) instead of [model] path. Writes, in\n"
    "  <[run] out_dir>/dpo: adapter.h5, adapter_peft/ (PEFT format), metrics.jsonl (one line\n"
    "  per step), checkpoint.h5.\n"
    "  --resume   continue from the checkpoint (bit-identical)\n"
    "  --force    start over although a checkpoint exists\n"
    "  --plan     print the memory plan (weights, adapter, optimizer, activations, workspace)\n"
    "             for sequences of [dpo] max_seq_len tokens on [model] backend and exit: only\n"
    "             the model's config.json is read (plan a GPU run anywhere with\n"
    "             --set model.backend=cuda). A run prints the same plan first and refuses to\n"
    "             start when it exceeds the device's free memory (RESAFE_PLAN_FREE_BYTES=N\n"
    "             overrides what the device reports).\n"
    "  SIGINT/SIGTERM write a checkpoint at the next step boundary and exit 128 + signal.\n";

int cmd_dpo(int argc, char **argv) {
    return cli_run_training(argc, argv, "dpo", g_usage, rs_dpo_run, rs_dpo_plan);
}
