/* config: INI run configs read with inih and checked against the schema table below. */
#include "resafe/config.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "resafe/core.h"

/* ---------------------------------------------------------------- schema */

static const struct {
    const char *name, *doc;
} g_sections[] = {
    {"model", "The model to load and how to run it"},
    {"generate", "Text generation (`resafe generate`)"},
    {"quant", "Quantization of the full-precision model"},
    {"patch", "The patch set: FP winner / quantized loser responses to the same prompts"},
    {"dpo", "Masked-LoRA DPO on the quantized model (Q-resafe paper defaults)"},
    {"sft", "Supervised fine-tuning of all parameters, optionally quantization-aware (`resafe sft`)"},
    {"snip", "SNIP masks: which weight entries the patch may change"},
    {"lora", "The LoRA adapter on every quantized linear, and how it is merged back"},
    {"eval", "Attack success rate, utility and token flips of the patched model"},
    {"dist", "Data-parallel runs over NCCL"},
    {"run", "The run directory and process-wide settings"},
};
#define N_SECTIONS (int)(sizeof g_sections / sizeof g_sections[0])

#define MAX_SEED 9007199254740991.0 /* 2^53 - 1: exact as a double, the range's type */
#define INT_KEY(s, k, d, lo, hi, by, doc) {s, k, RS_CFG_INT, d, NULL, lo, hi, 0, by, doc}
#define FLOAT_KEY(s, k, d, lo, hi, by, doc) {s, k, RS_CFG_FLOAT, d, NULL, lo, hi, 0, by, doc}
#define POS_FLOAT_KEY(s, k, d, hi, by, doc) {s, k, RS_CFG_FLOAT, d, NULL, 0, hi, 1, by, doc}
#define BOOL_KEY(s, k, d, by, doc) {s, k, RS_CFG_BOOL, d, NULL, 0, 0, 0, by, doc}
#define STRING_KEY(s, k, d, by, doc) {s, k, RS_CFG_STRING, d, NULL, 0, 0, 0, by, doc}
#define PATH_KEY(s, k, d, by, doc) {s, k, RS_CFG_PATH, d, NULL, 0, 0, 0, by, doc}
#define ENUM_KEY(s, k, d, allowed, by, doc) {s, k, RS_CFG_ENUM, d, allowed, 0, 0, 0, by, doc}

#define LATER_QUANT "train, quantize"
#define LATER_PATCH "train, triplets"
#define DPO "dpo"
#define LATER_EVAL "train, eval"
#define MERGE "train, merge"
#define DIST "dpo, triplets, eval"

static const rs_config_key g_schema[] = {
    PATH_KEY("model", "path", "", "all",
             "Hugging Face model directory (config.json, safetensors weights, tokenizer.json)"),
    ENUM_KEY("model", "chat_template", "auto", "auto|none|llama-2|llama-3|gemma|mistral|chatml",
             "all", "prompt format; auto picks it from tokenizer_config.json, none sends raw text"),
    ENUM_KEY("model", "backend", "auto", "auto|cpu|cuda", "all",
             "where the model runs; auto is cuda when a GPU is present"),
    INT_KEY("model", "threads", "0", 0, 4096, "all", "CPU threads (0 = OpenMP's default)"),
    BOOL_KEY("model", "recompute", "false", "sft, dpo",
             "training: keep only each layer's input and recompute the layer in backward"),
    INT_KEY("model", "recompute_layers", "0", 0, 1048576, "sft, dpo",
            "with recompute = true: only the first N layers recompute (the rest keep their "
            "activations: faster, more memory); 0 = every layer"),

    INT_KEY("generate", "max_new_tokens", "256", 1, 1048576, "generate",
            "tokens generated after the prompt at most"),
    FLOAT_KEY("generate", "temperature", "0", 0, 100, "generate",
              "sampling temperature; 0 = greedy"),
    INT_KEY("generate", "top_k", "0", 0, 16777216, "generate, triplets",
            "sample among the k most likely tokens (0 = all)"),
    POS_FLOAT_KEY("generate", "top_p", "1", 1, "generate, triplets",
                  "nucleus sampling: smallest set of tokens with this much probability"),
    INT_KEY("generate", "seed", "0", 0, MAX_SEED, "generate, triplets", "sampling seed"),
    BOOL_KEY("generate", "chat", "true", "generate, triplets, eval",
             "wrap the prompt in the chat template ([model] chat_template)"),
    STRING_KEY("generate", "system_prompt", "", "generate, triplets, eval",
               "system message for chat prompts (empty = none)"),
    INT_KEY("generate", "batch_size", "16", 1, 65536, "generate, triplets, eval",
            "sequences generated together (KV-cache slots refilled as responses end)"),

    ENUM_KEY("quant", "format", "int4", "int2|int3|int4|int8|nf4|fp4", LATER_QUANT,
             "weight format: grouped integers, or nf4/fp4 codebooks (absmax blocks of 64)"),
    INT_KEY("quant", "group_size", "128", 0, 1048576, LATER_QUANT,
            "weights sharing a scale along the input dimension (0 = one group per row)"),
    BOOL_KEY("quant", "symmetric", "false", LATER_QUANT,
             "symmetric integer grid (no zero point)"),
    ENUM_KEY("quant", "method", "rtn", "rtn|awq|gptq|qat|qlora", LATER_QUANT,
             "quantization method: PTQ rtn; PTQ + calibration awq, gptq; QAT qat (format int*); "
             "LoRA-QAT qlora (format nf4, or int* for an integer base); all but rtn read "
             "calib_file"),
    PATH_KEY("quant", "calib_file", "", LATER_QUANT,
             "calibration data: prompts for awq/gptq (CSV or JSONL); qat/qlora: JSONL of "
             "{prompt, response} to fine-tune on"),
    INT_KEY("quant", "calib_samples", "128", 1, 1000000, LATER_QUANT,
            "calibration prompts used (awq, gptq; qat/qlora train on the whole file)"),
    STRING_KEY("quant", "calib_column", "prompt", LATER_QUANT,
               "CSV column / JSONL member of calib_file holding the text (qat/qlora: the prompt)"),
    STRING_KEY("quant", "response_column", "response", LATER_QUANT,
               "qat/qlora: JSONL member of calib_file holding the response (the loss is on it)"),
    INT_KEY("quant", "max_seq_len", "512", 2, 1048576, LATER_QUANT,
            "calibration / fine-tuning sequences cut to this many tokens"),
    INT_KEY("quant", "train_steps", "0", 0, 1000000000, LATER_QUANT,
            "qat/qlora: optimizer steps (0 = train_epochs passes over calib_file)"),
    INT_KEY("quant", "train_epochs", "1", 1, 10000, LATER_QUANT,
            "qat/qlora: passes over calib_file when train_steps is 0"),
    FLOAT_KEY("quant", "train_lr", "0", 0, 1, LATER_QUANT,
              "qat/qlora: AdamW peak learning rate, cosine decay (0 = qat 2e-5, qlora 2e-4)"),
    INT_KEY("quant", "train_batch_size", "8", 1, 65536, LATER_QUANT,
            "qat/qlora: examples per optimizer step"),
    INT_KEY("quant", "train_micro_batch_size", "0", 0, 65536, LATER_QUANT,
            "qat/qlora: examples per forward pass (0 = train_batch_size)"),
    INT_KEY("quant", "qat_act_bits", "0", 0, 16, LATER_QUANT,
            "qat: fake-quantized activations, bits (0 = off; [sft] qat_act_bits)"),
    INT_KEY("quant", "qat_kv_bits", "0", 0, 16, LATER_QUANT,
            "qat: fake-quantized KV cache, bits (0 = off; [sft] qat_kv_bits)"),
    INT_KEY("quant", "qlora_rank", "64", 1, 65536, LATER_QUANT, "qlora: LoRA rank r"),
    POS_FLOAT_KEY("quant", "qlora_alpha", "16", 1e6, LATER_QUANT,
              "qlora: LoRA alpha; the update is (alpha / r) * B A"),
    STRING_KEY("quant", "qlora_targets", "all", LATER_QUANT,
               "qlora: linears that get an adapter: all, or a comma list such as q_proj,v_proj"),
    ENUM_KEY("quant", "qlora_merge", "refit", "refit|grid", LATER_QUANT,
             "qlora: how the adapter is merged into the base (resafe merge's modes)"),
    PATH_KEY("quant", "model", "", "train, triplets, dpo, merge, eval",
             "an existing quantized model directory to patch instead of quantizing [model] path "
             "(empty = <out_dir>/quantize/model)"),

    PATH_KEY("patch", "harmful_file", "", LATER_PATCH, "harmful prompts (CSV or JSONL)"),
    PATH_KEY("patch", "benign_file", "", LATER_PATCH, "benign prompts (CSV or JSONL)"),
    FLOAT_KEY("patch", "harmful_fraction", "0.5", 0, 1, LATER_PATCH,
              "share of patch-set prompts drawn from harmful_file"),
    INT_KEY("patch", "n_prompts", "512", 1, 10000000, LATER_PATCH,
            "prompts answered by both models (identical pairs are then dropped)"),
    INT_KEY("patch", "min_pairs", "1", 1, 10000000, LATER_PATCH,
            "fewer differing FP/quantized responses than this: no patch set (too few pairs to "
            "patch without overfitting them; the stage fails with that message)"),
    ENUM_KEY("patch", "harmful_winner", "any", "any|refusal", LATER_PATCH,
             "harmful prompts' pairs: any = every differing pair (the paper); refusal = only those "
             "whose FP winner the [eval] refusal judge calls a refusal (a pair whose FP response "
             "complies would teach compliance; dropped and counted)"),
    INT_KEY("patch", "max_new_tokens", "128", 1, 65536, LATER_PATCH, "response length at most"),
    FLOAT_KEY("patch", "temperature", "0", 0, 100, LATER_PATCH,
              "decoding of both responses; 0 = greedy (the paper's setting)"),
    STRING_KEY("patch", "harmful_column", "prompt", LATER_PATCH,
               "CSV column / JSONL member of harmful_file holding the prompt (AdvBench: goal)"),
    STRING_KEY("patch", "benign_column", "prompt", LATER_PATCH,
               "CSV column / JSONL member of benign_file holding the prompt"),
    STRING_KEY("patch", "category_column", "category", LATER_PATCH,
               "column holding a prompt's category, when the file has it (else the file's kind)"),

    POS_FLOAT_KEY("dpo", "beta", "0.01", 100, DPO, "DPO inverse temperature beta (paper: 0.01)"),
    POS_FLOAT_KEY("dpo", "lr", "5e-6", 1, DPO, "AdamW learning rate (paper: 5e-6)"),
    INT_KEY("dpo", "epochs", "1", 1, 10000, DPO, "passes over the patch set (paper: 1)"),
    INT_KEY("dpo", "batch_size", "8", 1, 65536, DPO, "triplets per optimizer step"),
    INT_KEY("dpo", "max_steps", "0", 0, 1000000000, DPO,
            "stop after this many steps (0 = when the epochs end)"),
    INT_KEY("dpo", "warmup_steps", "0", 0, 1000000000, DPO, "linear learning-rate warm-up"),
    FLOAT_KEY("dpo", "weight_decay", "0", 0, 1, DPO, "AdamW decoupled weight decay"),
    FLOAT_KEY("dpo", "grad_clip", "1", 0, 1e6, DPO, "global gradient-norm clip (0 = off)"),
    FLOAT_KEY("dpo", "sft_weight", "0", 0, 1000, DPO,
              "weight of an added -log p(winner) per response token term (0 = plain DPO)"),
    PATH_KEY("dpo", "data_file", "", DPO,
             "preference pairs: JSONL {prompt, chosen, rejected[, ref_chosen, ref_rejected]} or a "
             "patch set (.h5); empty = the run's patch set, trained on the run's quantized model"),
    INT_KEY("dpo", "micro_batch_size", "0", 0, 65536, DPO,
            "pairs per forward pass, gradients accumulated over a step (0 = batch_size)"),
    BOOL_KEY("dpo", "share_prompt", "true", DPO,
             "run a pair's prompt once for chosen and rejected (both attend to its keys): the "
             "same loss on fewer tokens; false runs them as two whole sequences"),
    ENUM_KEY("dpo", "schedule", "linear", "constant|linear|cosine", DPO,
             "learning-rate decay after the warm-up"),
    INT_KEY("dpo", "max_seq_len", "1024", 2, 1048576, DPO,
            "prompt + response tokens at most (longer responses are cut)"),

    PATH_KEY("sft", "data_file", "", "sft", "training examples, JSONL {prompt, response}"),
    STRING_KEY("sft", "prompt_key", "prompt", "sft", "JSONL member holding the prompt"),
    STRING_KEY("sft", "response_key", "response", "sft", "JSONL member holding the response"),
    STRING_KEY("sft", "system_prompt", "", "sft",
               "system message of every example's chat (empty = none)"),
    PATH_KEY("sft", "output_dir", "", "sft",
             "the trained Hugging Face model directory (empty = <run out_dir>/sft/model)"),
    POS_FLOAT_KEY("sft", "lr", "1e-4", 1, "sft", "AdamW peak learning rate"),
    ENUM_KEY("sft", "schedule", "cosine", "constant|linear|cosine", "sft",
             "learning-rate decay after the warm-up"),
    INT_KEY("sft", "warmup_steps", "0", 0, 1000000000, "sft", "linear learning-rate warm-up"),
    INT_KEY("sft", "epochs", "1", 1, 10000, "sft", "passes over the data"),
    INT_KEY("sft", "max_steps", "0", 0, 1000000000, "sft",
            "stop after this many steps (0 = when the epochs end)"),
    INT_KEY("sft", "batch_size", "8", 1, 65536, "sft", "examples per optimizer step"),
    INT_KEY("sft", "micro_batch_size", "0", 0, 65536, "sft",
            "examples per forward pass, gradients accumulated over a step (0 = batch_size)"),
    ENUM_KEY("sft", "trainable", "all", "all|linears", "sft",
             "tensors the optimizer updates: every one, or only the seven projection weights of "
             "each layer (embeddings, norms, lm_head and biases stay as loaded)"),
    PATH_KEY("sft", "freeze_mask", "", "sft",
             "HDF5 file of uint8 masks named as the model's tensors (1 = trained, 0 = kept as "
             "loaded), or of float32 bounds [2, the tensor's shape] (lower, upper: every update "
             "is clamped into them; lo == hi keeps the entry); a tensor it does not name is "
             "trained in full (empty = no mask)"),
    FLOAT_KEY("sft", "weight_decay", "0", 0, 1, "sft",
              "AdamW decoupled weight decay (matrices only, not norms or biases)"),
    FLOAT_KEY("sft", "adam_beta2", "0.999", 0, 0.999999, "sft", "AdamW second-moment decay"),
    FLOAT_KEY("sft", "grad_clip", "1", 0, 1e6, "sft", "global gradient-norm clip (0 = off)"),
    INT_KEY("sft", "max_seq_len", "1024", 2, 1048576, "sft",
            "prompt + response tokens at most (longer responses are cut)"),
    BOOL_KEY("sft", "qat", "false", "sft",
             "quantization-aware: forward with fake-quantized linear weights (straight-through)"),
    INT_KEY("sft", "qat_bits", "4", 2, 8, "sft", "QAT grid bits"),
    BOOL_KEY("sft", "qat_symmetric", "true", "sft",
             "QAT grid: symmetric (no zero point) or asymmetric"),
    INT_KEY("sft", "qat_group_size", "0", 0, 1048576, "sft",
            "QAT grid: columns per scale (0 = one grid per row); must divide every linear's "
            "columns"),
    INT_KEY("sft", "qat_act_bits", "0", 0, 8, "sft",
            "LLM-QAT: fake-quantize each linear's input per token, symmetric (0 = off, else 2..8)"),
    INT_KEY("sft", "qat_kv_bits", "0", 0, 8, "sft",
            "LLM-QAT: fake-quantize K (after RoPE) and V per token and head, asymmetric (0 = off)"),

    FLOAT_KEY("snip", "tau", "0.6", 0, 1, DPO,
                  "fraction of entries marked safety-critical and trainable (paper: 0.6)"),
    INT_KEY("snip", "reidentify_every", "1000", 1, 1000000000, DPO,
            "K: masks are re-identified every K steps (paper: 1000)"),
    ENUM_KEY("snip", "scope", "global", "global|per_layer", DPO,
             "one score threshold for the whole model, or one per layer"),
    ENUM_KEY("snip", "mask", "factor", "none|factor|elementwise", DPO,
             "factor: row/column masks on B and A (the paper's rule); elementwise: mask on B*A; "
             "none: plain LoRA"),
    POS_FLOAT_KEY("snip", "factor_threshold", "0.5", 1, DPO,
              "factor mode: a B row / A column trains when this fraction of its W row / column "
              "is selected"),
    ENUM_KEY("snip", "loss", "dpo", "dpo|nll", DPO,
             "loss whose gradient scores the weights: DPO, or the NLL of the chosen responses"),
    INT_KEY("snip", "score_batches", "4", 1, 1000000, DPO,
            "patch-set batches averaged for the scores |W * dL/dW|"),

    INT_KEY("lora", "rank", "128", 1, 65536, DPO, "adapter rank r (paper: 128)"),
    POS_FLOAT_KEY("lora", "alpha", "256", 1e6, DPO,
                  "scale alpha; the update is (alpha / r) * B A (paper: 256)"),
    FLOAT_KEY("lora", "dropout", "0", 0, 0.99, DPO,
              "dropout on the adapter's input during training (factor and none masks)"),
    STRING_KEY("lora", "targets", "all", DPO,
               "linears that get an adapter: all, or a comma list such as q_proj,v_proj"),
    ENUM_KEY("lora", "merge", "grid", "grid|refit|adapter|exact", MERGE,
             "fold the patch into the quantized model: grid (Q0's scales), refit, adapter, exact"),
    STRING_KEY("lora", "merge_compare", "all", MERGE,
               "merge modes also built and evaluated for the report: all, none, or a comma list"),
    ENUM_KEY("lora", "group_constant", "auto", "auto|true|false", DPO,
             "train A constant within each quantization group, so that the patch folds exactly "
             "into the zero points (auto: true when merge = exact)"),

    PATH_KEY("eval", "harmful_file", "", LATER_EVAL, "harmful prompts for the attack success rate"),
    PATH_KEY("eval", "benign_file", "", LATER_EVAL, "benign tasks with checkable answers"),
    INT_KEY("eval", "n_prompts", "0", 0, 10000000, LATER_EVAL, "prompts per file (0 = all)"),
    INT_KEY("eval", "max_new_tokens", "128", 1, 65536, LATER_EVAL, "response length at most"),
    ENUM_KEY("eval", "judge", "keyword", "keyword", LATER_EVAL,
             "refusal judge: keyword = refusal phrases in the response"),
    BOOL_KEY("eval", "decoding_attacks", "false", LATER_EVAL,
             "also run the decoding-attack grid (temperature, top-k, top-p)"),
    STRING_KEY("eval", "harmful_column", "prompt", LATER_EVAL,
               "column / member of harmful_file holding the prompt (AdvBench: goal)"),
    STRING_KEY("eval", "benign_column", "prompt", LATER_EVAL,
               "column / member of benign_file holding the task"),
    STRING_KEY("eval", "answer_column", "answer", LATER_EVAL,
               "column / member of benign_file holding the expected answer"),
    STRING_KEY("eval", "category_column", "category", LATER_EVAL,
               "column holding a prompt's category, when the file has it"),
    ENUM_KEY("eval", "answer_match", "contains", "contains|exact|last_number", LATER_EVAL,
             "benign accuracy: the answer appears in the response, equals it, or equals the "
             "response's last number (an answer's text after '####' counts as the answer)"),
    PATH_KEY("eval", "safe_file", "", LATER_EVAL,
             "safe prompts that look unsafe, for the over-refusal rate (XSTest style; empty = skip)"),
    STRING_KEY("eval", "safe_column", "prompt", LATER_EVAL,
               "column / member of safe_file holding the prompt"),
    STRING_KEY("eval", "safe_filter", "", LATER_EVAL,
               "keep only safe_file rows whose column equals a value, as column=value "
               "(XSTest: label=safe)"),
    PATH_KEY("eval", "heldout_file", "", LATER_EVAL,
             "held-out text for perplexity (txt, CSV or JSONL; empty = skip)"),
    STRING_KEY("eval", "heldout_column", "text", LATER_EVAL,
               "column / member of heldout_file holding the text"),
    PATH_KEY("eval", "refusal_phrases", "", LATER_EVAL,
             "refusal phrases, one per line (empty = the standard AdvBench prefix list)"),
    STRING_KEY("eval", "attack_temperatures", "0.5,0.7,1.0", LATER_EVAL,
               "decoding attack: temperatures tried (each alone, top-k and top-p off)"),
    STRING_KEY("eval", "attack_top_k", "20,50,200", LATER_EVAL,
               "decoding attack: top-k values tried (temperature 1)"),
    STRING_KEY("eval", "attack_top_p", "0.7,0.9,0.95", LATER_EVAL,
               "decoding attack: top-p values tried (temperature 1)"),
    INT_KEY("eval", "attack_samples", "1", 1, 1000, LATER_EVAL,
            "samples per prompt and attack setting"),

    ENUM_KEY("dist", "launcher", "auto", "auto|none|mpi|slurm",
             "train, sft, dpo, triplets, eval",
             "where rank and world size come from: auto = OpenMPI's variables, else SLURM's "
             "inside an srun step, else one process; mpi/slurm require theirs; none = one process"),
    ENUM_KEY("dist", "transport", "auto", "auto|file|nccl", DIST,
             "how ranks exchange data: nccl (GPUs), file (a shared directory; CPU ranks); auto = "
             "nccl on the cuda backend when built with NCCL, else file"),
    PATH_KEY("dist", "comm_dir", "", DIST,
             "directory every rank shares: the file transport's parts, heartbeats, exit markers "
             "(empty = <[run] out_dir>/.dist)"),
    PATH_KEY("dist", "nccl_id_file", "", DIST,
             "shared-filesystem file through which rank 0 hands the NCCL unique id to the others "
             "(empty = <comm_dir>/nccl_id)"),
    POS_FLOAT_KEY("dist", "id_timeout_s", "120", 86400, DIST,
                  "seconds a rank waits for rank 0's id in nccl_id_file before it gives up"),
    POS_FLOAT_KEY("dist", "timeout_s", "600", 86400, DIST,
                  "seconds any one collective waits for the other ranks before failing with the "
                  "ranks that did not arrive"),
    POS_FLOAT_KEY("dist", "bucket_mb", "64", 65536, DIST,
                  "MiB of gradient per all-reduce call; dpo's buckets are whole layers of at "
                  "least this much, each started as backward finishes it"),

    PATH_KEY("run", "out_dir", "runs/default", "all",
             "run directory: every stage's outputs and manifests"),
    INT_KEY("run", "seed", "1234", 0, MAX_SEED, "all",
            "seed of the run's random choices (data order, initialisation)"),
    INT_KEY("run", "checkpoint_every", "100", 0, 1000000000, "sft, dpo",
            "training checkpoint every N steps (0 = only at the end and when interrupted)"),
    ENUM_KEY("run", "log_level", "info", "error|warn|info|debug", "all", "messages shown"),
    ENUM_KEY("run", "progress", "auto", "auto|bar|lines|off", "all",
             "progress of long stages: a bar on a terminal, plain lines in logs (auto picks)"),
};
#define N_KEYS (int)(sizeof g_schema / sizeof g_schema[0])

const rs_config_key *rs_config_schema(int *n_keys) {
    *n_keys = N_KEYS;
    return g_schema;
}

const char *rs_config_type_name(rs_config_type type) {
    static const char *names[] = {"int", "float", "bool", "string", "path", "enum"};
    return (unsigned)type < sizeof names / sizeof names[0] ? names[type] : "?";
}

/* ---------------------------------------------------------------- values */

typedef struct {
    int set;    /* given by a file or rs_config_set */
    int line;   /* file line that set it (0 = not from this file) */
    char *text; /* as written (continuation lines joined), NULL = default */
    int64_t i;  /* int, bool, enum index */
    double f;
    char *s; /* string, path, enum */
} cfg_value;

struct rs_config {
    cfg_value v[N_KEYS];
};

static int find_key(const char *section, const char *key) {
    for (int i = 0; i < N_KEYS; i++)
        if (strcmp(g_schema[i].section, section) == 0 && strcmp(g_schema[i].key, key) == 0) return i;
    return -1;
}

static int section_known(const char *section) {
    for (int i = 0; i < N_SECTIONS; i++)
        if (strcmp(g_sections[i].name, section) == 0) return 1;
    return 0;
}

/* Edit distance with adjacent transpositions (optimal string alignment), case-insensitive: a
 * typo suggestion ("qaunt" -> "quant" is one edit). Names over 63 characters are never close. */
static int edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return 1000;
    int d[64][64];
    for (size_t i = 0; i <= la; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++)
        for (size_t j = 1; j <= lb; j++) {
            int ca = tolower((unsigned char)a[i - 1]), cb = tolower((unsigned char)b[j - 1]);
            int best = d[i - 1][j - 1] + (ca != cb);
            if (d[i - 1][j] + 1 < best) best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
            if (i > 1 && j > 1 && ca == tolower((unsigned char)b[j - 2]) &&
                tolower((unsigned char)a[i - 2]) == cb && d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    return d[la][lb];
}

static int close_enough(int dist, const char *name) {
    int len = (int)strlen(name);
    return dist <= (len < 6 ? 1 : len / 3);
}

/* " (did you mean 'rank'?)", " ('rank' belongs in [lora])" or "". */
static void suggest_key(const char *section, const char *key, char *out, size_t n) {
    int best = -1, best_d = 1000;
    for (int i = 0; i < N_KEYS; i++) {
        if (strcmp(g_schema[i].section, section) != 0) continue;
        int d = edit_distance(key, g_schema[i].key);
        if (d < best_d) best_d = d, best = i;
    }
    out[0] = 0;
    if (best >= 0 && close_enough(best_d, g_schema[best].key)) {
        snprintf(out, n, " (did you mean '%s'?)", g_schema[best].key);
        return;
    }
    for (int i = 0; i < N_KEYS; i++)
        if (strcmp(g_schema[i].key, key) == 0) {
            snprintf(out, n, " ('%s' belongs in [%s])", key, g_schema[i].section);
            return;
        }
    size_t used = (size_t)snprintf(out, n, " (keys in [%s]:", section);
    for (int i = 0; i < N_KEYS && used < n; i++)
        if (strcmp(g_schema[i].section, section) == 0)
            used += (size_t)snprintf(out + used, n - used, " %s", g_schema[i].key);
    if (used < n) snprintf(out + used, n - used, ")");
}

static void suggest_section(const char *section, char *out, size_t n) {
    int best = -1, best_d = 1000;
    for (int i = 0; i < N_SECTIONS; i++) {
        int d = edit_distance(section, g_sections[i].name);
        if (d < best_d) best_d = d, best = i;
    }
    if (close_enough(best_d, g_sections[best].name)) {
        snprintf(out, n, " (did you mean [%s]?)", g_sections[best].name);
        return;
    }
    size_t used = (size_t)snprintf(out, n, " (sections:");
    for (int i = 0; i < N_SECTIONS && used < n; i++)
        used += (size_t)snprintf(out + used, n - used, " %s", g_sections[i].name);
    if (used < n) snprintf(out + used, n - used, ")");
}

static int valid_utf8(const unsigned char *s) {
    while (*s) {
        int extra = *s < 0x80 ? 0 : (*s & 0xe0) == 0xc0 ? 1 : (*s & 0xf0) == 0xe0 ? 2
                  : (*s & 0xf8) == 0xf0 ? 3 : -1;
        if (extra < 0) return 0;
        uint32_t cp = extra == 0 ? *s : *s & (0x3f >> extra);
        for (int k = 1; k <= extra; k++) {
            if ((s[k] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[k] & 0x3f);
        }
        static const uint32_t min_cp[] = {0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[extra] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        s += extra + 1;
    }
    return 1;
}

static void format_range(const rs_config_key *k, char *out, size_t n) {
    if (k->type == RS_CFG_INT)
        snprintf(out, n, "%.0f .. %.0f", k->min, k->max);
    else
        snprintf(out, n, "%c%g, %g]", k->min_open ? '(' : '[', k->min, k->max);
}

static int parse_bool(const char *t, int *out) {
    static const char *yes[] = {"true", "yes", "on", "1"}, *no[] = {"false", "no", "off", "0"};
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(t, yes[i]) == 0) return *out = 1, 0;
        if (strcasecmp(t, no[i]) == 0) return *out = 0, 0;
    }
    return -1;
}

/* Index of `t` among the '|'-separated `allowed`, -1 if absent. */
static int enum_index(const char *allowed, const char *t) {
    size_t len = strlen(t);
    int idx = 0;
    for (const char *p = allowed;; idx++) {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        if (n == len && strncmp(p, t, n) == 0) return idx;
        if (!bar) return -1;
        p = bar + 1;
    }
}

static void enum_list(const char *allowed, char *out, size_t n) {
    size_t j = 0;
    for (const char *p = allowed; *p && j + 3 < n; p++) {
        if (*p == '|') {
            out[j++] = ',';
            out[j++] = ' ';
        } else {
            out[j++] = *p;
        }
    }
    out[j] = 0;
}

/* "# ..." after a value is part of it for inih: say so when a value fails because of it. */
static const char *hash_hint(const char *text) {
    return strstr(text, " #") ? " (a comment after a value starts with ' ;', not '#')" : "";
}

/* Convert `text` for key k into *v (text copied). -1 + a message without location. */
static int convert(const rs_config_key *k, const char *text, cfg_value *v) {
    char range[96], t[72];
    switch (k->type) {
    case RS_CFG_INT: {
        char *end;
        errno = 0;
        long long x = strtoll(text, &end, 10);
        if (end == text || *end)
            return RS_FAIL("'%s' is not an integer%s", rs_shown_text(text, t, sizeof t), hash_hint(text));
        if (errno == ERANGE || (double)x < k->min || (double)x > k->max) {
            format_range(k, range, sizeof range);
            return RS_FAIL("%s is out of range %s", rs_shown_text(text, t, sizeof t), range);
        }
        v->i = x;
        break;
    }
    case RS_CFG_FLOAT: {
        char *end;
        double x = strtod(text, &end);
        if (end == text || *end || !isfinite(x))
            return RS_FAIL("'%s' is not a finite number%s", rs_shown_text(text, t, sizeof t),
                           hash_hint(text));
        if (x < k->min || x > k->max || (k->min_open && x == k->min)) {
            format_range(k, range, sizeof range);
            return RS_FAIL("%s is out of range %s", rs_shown_text(text, t, sizeof t), range);
        }
        v->f = x;
        break;
    }
    case RS_CFG_BOOL: {
        int b;
        if (parse_bool(text, &b) != 0)
            return RS_FAIL("'%s' is not a boolean (true/false, yes/no, on/off, 1/0)%s",
                           rs_shown_text(text, t, sizeof t), hash_hint(text));
        v->i = b;
        break;
    }
    case RS_CFG_ENUM: {
        int idx = enum_index(k->allowed, text);
        if (idx < 0) {
            enum_list(k->allowed, range, sizeof range);
            return RS_FAIL("'%s' is not one of: %s%s", rs_shown_text(text, t, sizeof t), range,
                           hash_hint(text));
        }
        v->i = idx;
        free(v->s);
        v->s = rs_strdup(text);
        break;
    }
    case RS_CFG_STRING:
    case RS_CFG_PATH: {
        if (!valid_utf8((const unsigned char *)text)) return RS_FAIL("value is not valid UTF-8");
        size_t n = strlen(text);
        int quoted = n >= 2 && text[0] == '"' && text[n - 1] == '"';
        free(v->s);
        v->s = quoted ? rs_strndup(text + 1, n - 2) : rs_strdup(text);
        break;
    }
    }
    char *copy = rs_strdup(text);
    free(v->text);
    v->text = copy;
    return 0;
}

rs_config *rs_config_new(void) {
    rs_config *cfg = rs_calloc(1, sizeof *cfg);
    for (int i = 0; i < N_KEYS; i++) {
        /* a default the schema cannot parse is our bug (the unit tests parse every one) */
        RS_CHECK(convert(&g_schema[i], g_schema[i].def, &cfg->v[i]) == 0,
                 "config schema: [%s] %s: default: %s", g_schema[i].section, g_schema[i].key,
                 rs_last_error());
        free(cfg->v[i].text);
        cfg->v[i].text = NULL;
    }
    return cfg;
}

void rs_config_free(rs_config *cfg) {
    if (!cfg) return;
    for (int i = 0; i < N_KEYS; i++) {
        free(cfg->v[i].text);
        free(cfg->v[i].s);
    }
    free(cfg);
}

/* ---------------------------------------------------------------- parsing */

typedef struct {
    rs_config *cfg;
    const char *label;
    const char *pos;  /* next unread byte of the text */
    const char *line; /* start of the line inih is working on */
    int lineno;
    int err_line;    /* line of the first error we raised (0 = none) */
    int last_key;    /* schema index set by the previous handler call (-1 = none) */
    char *last_section;
} parse_state;

/* inih's line source: hands out one line at a time, so the handler knows the line number and
 * sees the raw line (indentation marks continuations). inih reads lines into a fixed buffer:
 * a longer line is an error here rather than being split silently. */
static char *read_line(char *buf, int size, void *stream) {
    parse_state *st = stream;
    if (st->err_line || !*st->pos) return NULL;
    const char *nl = strchr(st->pos, '\n');
    size_t len = nl ? (size_t)(nl - st->pos) + 1 : strlen(st->pos);
    st->lineno++;
    st->line = st->pos;
    if (*st->pos == '[') st->last_key = -1; /* a section header ends any continuation */
    if (len + 1 > (size_t)size) {
        st->err_line = st->lineno;
        RS_FAIL("%s:%d: line longer than %d characters (continue a long string on indented lines)",
                st->label, st->lineno, size - 2);
        return NULL;
    }
    memcpy(buf, st->pos, len);
    buf[len] = 0;
    st->pos += len;
    return buf;
}

static int handler_fail(parse_state *st) {
    st->err_line = st->lineno;
    return 0;
}

/* Line is indented: inih then reads it as a continuation of the previous key's value. */
static int line_is_indented(const parse_state *st) {
    const unsigned char *p = (const unsigned char *)st->line;
    if (st->lineno == 1 && p[0] == 0xef && p[1] == 0xbb && p[2] == 0xbf) p += 3; /* BOM */
    return *p == ' ' || *p == '\t';
}

static int continue_value(parse_state *st, int idx, const char *value) {
    const rs_config_key *k = &g_schema[idx];
    cfg_value *v = &st->cfg->v[idx];
    if (k->type != RS_CFG_STRING) {
        RS_FAIL("%s:%d: [%s] %s: an indented line continues the previous value, and only string "
                "values may span lines (remove the indentation)",
                st->label, st->lineno, k->section, k->key);
        return handler_fail(st);
    }
    /* inih strips " ;comment" from key lines but not from continuation lines: strip it here
     * too, so a comment means the same on every line (inih's rule: ';' after any isspace) */
    size_t b = strlen(value);
    for (size_t i = 1; i < b; i++)
        if (value[i] == ';' && isspace((unsigned char)value[i - 1])) {
            b = i;
            break;
        }
    while (b > 0 && isspace((unsigned char)value[b - 1])) b--;
    size_t a = strlen(v->text);
    char *joined = rs_malloc(a + b + 2);
    memcpy(joined, v->text, a);
    size_t j = a;
    if (a) joined[j++] = '\n';
    memcpy(joined + j, value, b);
    joined[j + b] = 0;
    int rc = convert(k, joined, v);
    free(joined);
    if (rc != 0) {
        rs_fail_context("%s:%d: [%s] %s", st->label, st->lineno, k->section, k->key);
        return handler_fail(st);
    }
    return 1;
}

static int on_key(void *user, const char *section, const char *name, const char *value) {
    parse_state *st = user;
    if (st->err_line) return 0;
    if (!name || !value) return 1; /* a section header (libraries built to report them) */
    char hint[256], t[72];
    if (!section[0]) {
        RS_FAIL("%s:%d: key '%s' comes before any [section]", st->label, st->lineno,
                rs_shown_text(name, t, sizeof t));
        return handler_fail(st);
    }
    if (!section_known(section)) {
        suggest_section(section, hint, sizeof hint);
        RS_FAIL("%s:%d: unknown section [%s]%s", st->label, st->lineno, rs_shown_text(section, t, sizeof t),
                hint);
        return handler_fail(st);
    }
    int idx = find_key(section, name);
    int same_section = st->last_section && strcmp(st->last_section, section) == 0;
    if (idx >= 0 && idx == st->last_key && same_section && line_is_indented(st))
        return continue_value(st, idx, value);
    free(st->last_section);
    st->last_section = rs_strdup(section);
    st->last_key = idx;
    if (idx < 0) {
        suggest_key(section, name, hint, sizeof hint);
        RS_FAIL("%s:%d: [%s] unknown key '%s'%s", st->label, st->lineno, section,
                rs_shown_text(name, t, sizeof t), hint);
        return handler_fail(st);
    }
    cfg_value *v = &st->cfg->v[idx];
    if (v->line) {
        RS_FAIL("%s:%d: [%s] %s: duplicate key (first set on line %d)", st->label, st->lineno,
                section, name, v->line);
        return handler_fail(st);
    }
    if (convert(&g_schema[idx], value, v) != 0) {
        rs_fail_context("%s:%d: [%s] %s", st->label, st->lineno, section, name);
        return handler_fail(st);
    }
    v->set = 1;
    v->line = st->lineno;
    return 1;
}

rs_config *rs_config_parse(const char *label, const char *text) {
    rs_config *cfg = rs_config_new();
    parse_state st = {cfg, label, text, text, 0, 0, -1, NULL};
    int rc = ini_parse_stream(read_line, &st, on_key, &st);
    free(st.last_section);
    if (rc > 0 && (!st.err_line || rc < st.err_line)) /* inih's own error came first */
        RS_FAIL("%s:%d: syntax error: expected '[section]', 'key = value' or a comment", label,
                rc);
    else if (rc < 0 && !st.err_line)
        RS_FAIL("%s: cannot parse (inih error %d)", label, rc);
    if (rc != 0 || st.err_line) {
        rs_config_free(cfg);
        return NULL;
    }
    return cfg;
}

rs_config *rs_config_load(const char *path) {
    if (rs_path_is_dir(path)) {
        RS_FAIL("%s: is a directory, not an INI file", path);
        return NULL;
    }
    char *text;
    size_t size;
    if (rs_read_file(path, &text, &size) != 0) return NULL;
    rs_config *cfg = NULL;
    if (strlen(text) != size)
        RS_FAIL("%s: contains a NUL byte (not a text file)", path);
    else
        cfg = rs_config_parse(path, text);
    free(text);
    return cfg;
}

/* ---------------------------------------------------------------- overrides and getters */

int rs_config_set(rs_config *cfg, const char *section, const char *key, const char *value) {
    char hint[256], t[72];
    if (!section_known(section)) {
        suggest_section(section, hint, sizeof hint);
        return RS_FAIL("unknown section [%s]%s", rs_shown_text(section, t, sizeof t), hint);
    }
    int idx = find_key(section, key);
    if (idx < 0) {
        suggest_key(section, key, hint, sizeof hint);
        return RS_FAIL("[%s] unknown key '%s'%s", section, rs_shown_text(key, t, sizeof t), hint);
    }
    /* convert into a scratch value so a rejected override leaves the config unchanged */
    cfg_value tmp = {0};
    if (convert(&g_schema[idx], value, &tmp) != 0) {
        free(tmp.s);
        return rs_fail_context("[%s] %s", section, key);
    }
    cfg_value *v = &cfg->v[idx];
    free(v->text);
    free(v->s);
    *v = tmp;
    v->set = 1;
    return 0;
}

int rs_config_set_arg(rs_config *cfg, const char *assignment) {
    const char *dot = strchr(assignment, '.'), *eq = strchr(assignment, '=');
    char t[72];
    if (!dot || !eq || dot > eq || dot == assignment || eq == dot + 1)
        return RS_FAIL("'%s': expected section.key=value", rs_shown_text(assignment, t, sizeof t));
    char *section = rs_strndup(assignment, (size_t)(dot - assignment));
    char *key = rs_strndup(dot + 1, (size_t)(eq - dot - 1));
    int rc = rs_config_set(cfg, section, key, eq + 1);
    free(section);
    free(key);
    return rc;
}

int rs_config_apply_sets(rs_config *cfg, int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--set") == 0 && rs_config_set_arg(cfg, argv[++i]) != 0)
            return rs_fail_context("--set");
    return 0;
}

static const cfg_value *get(const rs_config *cfg, const char *section, const char *key,
                            rs_config_type want, int also_path_enum) {
    int idx = find_key(section, key);
    RS_CHECK(idx >= 0, "bug: config key [%s] %s is not in the schema", section, key);
    rs_config_type t = g_schema[idx].type;
    int ok = t == want || (also_path_enum && (t == RS_CFG_PATH || t == RS_CFG_ENUM));
    RS_CHECK(ok, "bug: config key [%s] %s is a %s, not a %s", section, key, rs_config_type_name(t),
             rs_config_type_name(want));
    return &cfg->v[idx];
}

int64_t rs_config_get_int(const rs_config *cfg, const char *section, const char *key) {
    return get(cfg, section, key, RS_CFG_INT, 0)->i;
}
double rs_config_get_float(const rs_config *cfg, const char *section, const char *key) {
    return get(cfg, section, key, RS_CFG_FLOAT, 0)->f;
}
int rs_config_get_bool(const rs_config *cfg, const char *section, const char *key) {
    return (int)get(cfg, section, key, RS_CFG_BOOL, 0)->i;
}
const char *rs_config_get_str(const rs_config *cfg, const char *section, const char *key) {
    return get(cfg, section, key, RS_CFG_STRING, 1)->s;
}
int rs_config_is_set(const rs_config *cfg, const char *section, const char *key) {
    int idx = find_key(section, key);
    RS_CHECK(idx >= 0, "bug: config key [%s] %s is not in the schema", section, key);
    return cfg->v[idx].set;
}

/* ---------------------------------------------------------------- printing */

/* Shortest %g spelling that reads back as the same double. */
static void format_double(double x, char *out, size_t n) {
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, n, "%.*g", prec, x);
        if (strtod(out, NULL) == x) return;
    }
}

/* A string value as a file would spell it: quoted when edge spaces or quotes would otherwise be
 * lost, continuation lines indented. */
static void print_string(const char *s, FILE *f) {
    size_t n = strlen(s);
    /* a leading ';' would read as a comment after "key = " */
    int quote = n == 0 || isspace((unsigned char)s[0]) || isspace((unsigned char)s[n - 1]) ||
                s[0] == ';' || (n >= 2 && s[0] == '"' && s[n - 1] == '"');
    if (quote) fputc('"', f);
    for (const char *p = s; *p; p++) {
        fputc(*p, f);
        if (*p == '\n') fputs("    ", f);
    }
    if (quote) fputc('"', f);
}

void rs_config_print(const rs_config *cfg, FILE *f) {
    for (int s = 0; s < N_SECTIONS; s++) {
        fprintf(f, "%s[%s]\n", s ? "\n" : "", g_sections[s].name);
        for (int i = 0; i < N_KEYS; i++) {
            const rs_config_key *k = &g_schema[i];
            const cfg_value *v = &cfg->v[i];
            if (strcmp(k->section, g_sections[s].name) != 0) continue;
            char num[64];
            fprintf(f, "%s = ", k->key);
            switch (k->type) {
            case RS_CFG_INT: fprintf(f, "%lld", (long long)v->i); break;
            case RS_CFG_FLOAT:
                format_double(v->f, num, sizeof num);
                fputs(num, f);
                break;
            case RS_CFG_BOOL: fputs(v->i ? "true" : "false", f); break;
            case RS_CFG_ENUM: fputs(v->s, f); break;
            case RS_CFG_STRING:
            case RS_CFG_PATH: print_string(v->s, f); break;
            }
            fputs(v->set ? "\n" : "  ; default\n", f);
        }
    }
}

/* Markdown table cell: '|' escaped, newlines shown as \n. */
static void print_cell(const char *s, FILE *f) {
    for (; *s; s++) {
        if (*s == '|') fputs("\\|", f);
        else if (*s == '\n') fputs("\\n", f);
        else fputc(*s, f);
    }
}

void rs_config_print_doc(FILE *f) {
    fputs("Every key of a resafe INI run config (`resafe config --doc`). Unset keys take the "
          "default.\n",
          f);
    for (int s = 0; s < N_SECTIONS; s++) {
        fprintf(f, "\n### [%s]\n\n%s.\n\n", g_sections[s].name, g_sections[s].doc);
        fputs("| key | type | default | allowed | used by | description |\n"
              "|---|---|---|---|---|---|\n",
              f);
        for (int i = 0; i < N_KEYS; i++) {
            const rs_config_key *k = &g_schema[i];
            if (strcmp(k->section, g_sections[s].name) != 0) continue;
            char allowed[160] = "";
            if (k->type == RS_CFG_INT || k->type == RS_CFG_FLOAT) format_range(k, allowed, sizeof allowed);
            else if (k->type == RS_CFG_BOOL) snprintf(allowed, sizeof allowed, "true, false");
            else if (k->type == RS_CFG_ENUM) enum_list(k->allowed, allowed, sizeof allowed);
            fprintf(f, "| `%s` | %s | ", k->key, rs_config_type_name(k->type));
            if (k->def[0]) {
                fputc('`', f);
                print_cell(k->def, f);
                fputc('`', f);
            } else {
                fputs("(empty)", f);
            }
            fputs(" | ", f);
            print_cell(allowed, f);
            fprintf(f, " | %s | ", k->used_by);
            print_cell(k->doc, f);
            fputs(" |\n", f);
        }
    }
}
