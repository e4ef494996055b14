/* hf_config_tool: parse a model directory's config.json (or a .json file) and print what resafe
 * understood as one JSON object, rope inv_freq included, for tests/py/test_hf_config.py.
 *   build/tools/hf_config_tool MODEL_DIR | CONFIG.json */
#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/hf_config.h"

static const char *activation_name(rs_activation a) {
    return a == RS_ACT_SILU ? "silu" : a == RS_ACT_GELU_TANH ? "gelu_tanh" : "gelu";
}

static const char *rope_name(rs_rope_type t) {
    return t == RS_ROPE_LINEAR ? "linear" : t == RS_ROPE_LLAMA3 ? "llama3" : "default";
}

static int load(const char *path, rs_model_config *cfg) {
    if (rs_path_is_dir(path)) return rs_hf_config_load(path, cfg);
    char *text;
    size_t size;
    RS_TRY(rs_read_file(path, &text, &size));
    int rc = rs_hf_config_parse(path, text, cfg);
    free(text);
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: hf_config_tool MODEL_DIR | CONFIG.json\n");
        return 2;
    }
    rs_model_config c;
    if (load(argv[1], &c) != 0) rs_die_last();
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "arch", rs_arch_name(c.arch));
    cJSON_AddStringToObject(o, "model_type", c.model_type);
    cJSON_AddNumberToObject(o, "vocab_size", c.vocab_size);
    cJSON_AddNumberToObject(o, "hidden_size", c.hidden_size);
    cJSON_AddNumberToObject(o, "intermediate_size", c.intermediate_size);
    cJSON_AddNumberToObject(o, "n_layers", c.n_layers);
    cJSON_AddNumberToObject(o, "n_heads", c.n_heads);
    cJSON_AddNumberToObject(o, "n_kv_heads", c.n_kv_heads);
    cJSON_AddNumberToObject(o, "head_dim", c.head_dim);
    cJSON_AddNumberToObject(o, "max_position_embeddings", c.max_position_embeddings);
    cJSON_AddNumberToObject(o, "rms_norm_eps", c.rms_norm_eps);
    cJSON_AddNumberToObject(o, "rope_theta", c.rope_theta);
    cJSON_AddStringToObject(o, "rope_type", rope_name(c.rope_type));
    cJSON_AddNumberToObject(o, "rope_factor", c.rope_factor);
    cJSON_AddNumberToObject(o, "rope_low_freq_factor", c.rope_low_freq_factor);
    cJSON_AddNumberToObject(o, "rope_high_freq_factor", c.rope_high_freq_factor);
    cJSON_AddNumberToObject(o, "rope_original_max_position", c.rope_original_max_position);
    cJSON_AddBoolToObject(o, "tie_word_embeddings", c.tie_word_embeddings);
    cJSON_AddBoolToObject(o, "attention_bias", c.attention_bias);
    cJSON_AddBoolToObject(o, "o_bias", c.o_bias);
    cJSON_AddBoolToObject(o, "mlp_bias", c.mlp_bias);
    cJSON_AddStringToObject(o, "hidden_act", activation_name(c.hidden_act));
    cJSON_AddBoolToObject(o, "norm_add_one", c.norm_add_one);
    cJSON_AddNumberToObject(o, "embed_scale", c.embed_scale);
    cJSON_AddNumberToObject(o, "attn_scale", c.attn_scale);
    cJSON_AddNumberToObject(o, "sliding_window", c.sliding_window);
    cJSON_AddNumberToObject(o, "bos_token_id", c.bos_token_id);
    cJSON_AddNumberToObject(o, "pad_token_id", c.pad_token_id);
    cJSON *eos = cJSON_AddArrayToObject(o, "eos_token_ids");
    for (int i = 0; i < c.n_eos; i++) cJSON_AddItemToArray(eos, cJSON_CreateNumber(c.eos_token_ids[i]));
    float *inv = rs_malloc(sizeof(float) * (size_t)(c.head_dim / 2));
    rs_rope_inv_freq(&c, inv);
    cJSON *arr = cJSON_AddArrayToObject(o, "inv_freq");
    for (int i = 0; i < c.head_dim / 2; i++) cJSON_AddItemToArray(arr, cJSON_CreateNumber(inv[i]));
    free(inv);
    char *s = cJSON_PrintUnformatted(o);
    puts(s);
    cJSON_free(s);
    cJSON_Delete(o);
    return 0;
}
