/* resafe: measure and repair the safety damage quantization does to LLMs. */
#include <stdio.h>
#include <string.h>

#include "resafe/cli.h"
#include "resafe/core.h"

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} g_commands[] = {
    {"generate", cmd_generate, "generate text from a model directory (greedy or sampled)"},
    {"inspect", cmd_inspect, "summarise a safetensors file, model directory or HDF5 file"},
    {"config", cmd_config, "check an INI run config, or print every key (--doc)"},
    {"sft", cmd_sft, "supervised fine-tuning of every parameter (optionally QAT)"},
    {"quantize", cmd_quantize, "quantize a model (rtn, awq, gptq, nf4, fp4, int8; SNIP protection)"},
    {"dpo", cmd_dpo, "masked-LoRA DPO with SNIP masks: the Q-resafe patch"},
    {"train", cmd_train, "the whole Q-resafe pipeline of a run config, resumable stage by stage"},
    {"triplets", cmd_triplets, "build the patch set: FP winner / quantized loser responses"},
    {"merge", cmd_merge, "fold the DPO adapter into the quantized model (grid, refit, adapter, exact)"},
    {"eval", cmd_eval, "attack success rate, utility and token flips of model states; the report"},
};

static void usage(FILE *f) {
    fprintf(f, "resafe %s: measure and repair the safety damage of LLM quantization\n\n"
               "usage: resafe <command> [options]   (resafe <command> --help for its options)\n\n"
               "commands:\n",
            RS_VERSION);
    for (size_t i = 0; i < sizeof g_commands / sizeof g_commands[0]; i++)
        fprintf(f, "  %-10s %s\n", g_commands[i].name, g_commands[i].help);
    fprintf(f, "  %-10s %s\n", "version", "print the version");
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "version") == 0 || strcmp(argv[1], "--version") == 0) {
        printf("resafe %s\n", RS_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof g_commands / sizeof g_commands[0]; i++)
        if (strcmp(argv[1], g_commands[i].name) == 0) return g_commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "resafe: error: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
