/* hf_config: the model architecture from a Hugging Face config.json.
 * Families: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM. */
#ifndef RESAFE_HF_CONFIG_H
#define RESAFE_HF_CONFIG_H

#include "resafe/backend.h"

typedef enum { RS_ARCH_LLAMA = 0, RS_ARCH_MISTRAL, RS_ARCH_QWEN2, RS_ARCH_GEMMA } rs_arch;
typedef enum { RS_ROPE_DEFAULT = 0, RS_ROPE_LINEAR, RS_ROPE_LLAMA3 } rs_rope_type;

#define RS_MAX_EOS 8
typedef struct {
    rs_arch arch;
    char model_type[32];     /* "llama", "mistral", "qwen2", "gemma" */
    int vocab_size;
    int hidden_size;
    int intermediate_size;
    int n_layers;
    int n_heads;
    int n_kv_heads;          /* absent: the family default (Llama: n_heads, Mistral 8, Qwen2 32,
                                Gemma 16); null: n_heads */
    int head_dim;            /* explicit head_dim, else hidden_size / n_heads (Gemma: 256) */
    int max_position_embeddings;
    float rms_norm_eps;
    float rope_theta;
    rs_rope_type rope_type;
    float rope_factor;                /* linear and llama3 */
    float rope_low_freq_factor;       /* llama3 */
    float rope_high_freq_factor;      /* llama3 */
    int rope_original_max_position;   /* llama3 original_max_position_embeddings */
    int tie_word_embeddings;
    int attention_bias;      /* q,k,v biases (Qwen2 always; Llama attention_bias) */
    int mlp_bias;            /* gate/up/down biases (Llama mlp_bias) */
    int o_bias;              /* o_proj bias (Llama attention_bias) */
    rs_activation hidden_act;/* silu (Llama family) or gelu_tanh (Gemma) */
    int norm_add_one;        /* Gemma: x * (1 + w) */
    float embed_scale;       /* Gemma: sqrt(hidden_size); others 1 */
    float attn_scale;        /* head_dim^-0.5 (Gemma 1 ignores query_pre_attn_scalar, like
                                transformers) */
    int sliding_window;      /* 0 = none (Mistral/Qwen2 may set one; we refuse contexts past it).
                                Qwen2: only with use_sliding_window and a sliding layer */
    int bos_token_id;        /* -1 when none (absent: the family default, e.g. Llama 1) */
    int pad_token_id;        /* -1 when none */
    int n_eos;
    int eos_token_ids[RS_MAX_EOS];
} rs_model_config;

/* Parse config.json text; `label` names the file in messages. Unknown architectures, missing
 * required keys, wrong JSON types and inconsistent sizes (hidden_size % n_heads, n_heads %
 * n_kv_heads, non-positive sizes, absurd sizes) are errors naming the key. Absent optional keys
 * take the defaults of the family's transformers config class. rope_scaling (4.x) and
 * rope_parameters (5.x) are both read; rope types other than default/linear/llama3 are errors.
 * On failure *cfg is zeroed and -1 returned with the message recorded. */
int rs_hf_config_parse(const char *label, const char *json_text, rs_model_config *cfg);
/* Read <dir>/config.json. */
int rs_hf_config_load(const char *model_dir, rs_model_config *cfg);
/* inv_freq[head_dim/2] with the configured rope scaling, as transformers computes it (in float32,
 * op for op). */
void rs_rope_inv_freq(const rs_model_config *cfg, float *inv_freq);
const char *rs_arch_name(rs_arch arch);

#endif
