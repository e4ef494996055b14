/* hf_config: config.json -> rs_model_config, read the way transformers 5.x reads it.
 *
 * A key absent from config.json takes the default of the family's config class (LlamaConfig,
 * MistralConfig, Qwen2Config, GemmaConfig), because that is what transformers builds: a Mistral
 * config without num_key_value_heads has 8 KV heads, a Gemma one has head_dim 256. Only the five
 * sizes no model can do without (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
 * num_attention_heads) are required. Types are checked as strictly as transformers' dataclass
 * validation: an integer key holding 64.0 or "64" is an error naming the key. */
#include "resafe/hf_config.h"

#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- families */

typedef struct {
    rs_arch arch;
    const char *architecture; /* "architectures"[0] */
    const char *model_type;
    int n_kv_heads;           /* default when the key is absent; 0 = num_attention_heads */
    int head_dim;             /* default when absent; 0 = hidden_size / num_attention_heads */
    int max_position_embeddings;
    int tie_word_embeddings;
    int bos, eos, pad;        /* -1 = None */
    const char *hidden_act;
} hf_family;

/* Defaults copied from the dataclass fields of transformers 5.23 configuration_<family>.py. */
static const hf_family g_families[] = {
    {RS_ARCH_LLAMA, "LlamaForCausalLM", "llama", 0, 0, 2048, 0, 1, 2, -1, "silu"},
    {RS_ARCH_MISTRAL, "MistralForCausalLM", "mistral", 8, 0, 4096 * 32, 0, 1, 2, -1, "silu"},
    {RS_ARCH_QWEN2, "Qwen2ForCausalLM", "qwen2", 32, 0, 32768, 0, -1, -1, -1, "silu"},
    {RS_ARCH_GEMMA, "GemmaForCausalLM", "gemma", 16, 256, 8192, 1, 2, 1, 0, "gelu_pytorch_tanh"},
};
#define N_FAMILIES (int)(sizeof g_families / sizeof g_families[0])

const char *rs_arch_name(rs_arch arch) {
    for (int i = 0; i < N_FAMILIES; i++)
        if (g_families[i].arch == arch) return g_families[i].architecture;
    return "unknown";
}

/* Sanity bounds: far above any real model of these families, low enough that products of two
 * sizes cannot overflow 64 bits and a corrupt file is caught before anything is allocated. */
#define MAX_VOCAB (1 << 24)
#define MAX_HIDDEN (1 << 17)
#define MAX_INTERMEDIATE (1 << 20)
#define MAX_LAYERS 1024
#define MAX_HEADS 1024
#define MAX_HEAD_DIM 4096
#define MAX_POSITIONS (1 << 26)

/* ---------------------------------------------------------------- typed JSON access */

static const char *json_type_name(const cJSON *v) {
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    return "an invalid value";
}

/* The member `key` of obj (case-sensitive, as Python reads it), NULL when absent. Two members
 * with the same name are an error: Python would silently keep the last one. */
static int json_member(const char *label, const cJSON *obj, const char *where, const char *key,
                       const cJSON **out) {
    *out = NULL;
    for (const cJSON *c = obj ? obj->child : NULL; c; c = c->next) {
        if (!c->string || strcmp(c->string, key) != 0) continue;
        if (*out) return RS_FAIL("%s: duplicate key '%s%s'", label, where, key);
        *out = c;
    }
    return 0;
}

/* Integer key: absent -> def, null -> null_value (when allow_null), else an integral number in
 * [lo, hi]. */
static int json_int(const char *label, const cJSON *obj, const char *where, const char *key,
                    int def, int allow_null, int null_value, int lo, int hi, int *out) {
    const cJSON *v;
    RS_TRY(json_member(label, obj, where, key, &v));
    if (!v) {
        *out = def;
        return 0;
    }
    if (cJSON_IsNull(v) && allow_null) {
        *out = null_value;
        return 0;
    }
    if (!cJSON_IsNumber(v))
        return RS_FAIL("%s: '%s%s' must be an integer, not %s", label, where, key,
                       json_type_name(v));
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d))
        return RS_FAIL("%s: '%s%s' must be an integer, got %g", label, where, key, d);
    if (d < lo || d > hi)
        return RS_FAIL("%s: '%s%s' = %.0f is out of range [%d, %d]", label, where, key, d, lo, hi);
    *out = (int)d;
    return 0;
}

/* Number key (integers accepted, as Python's float(int) would be): absent -> def. `present`
 * (may be NULL) reports whether the key was there. */
static int json_number(const char *label, const cJSON *obj, const char *where, const char *key,
                       double def, double *out, int *present) {
    const cJSON *v;
    RS_TRY(json_member(label, obj, where, key, &v));
    if (present) *present = v != NULL;
    if (!v) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v))
        return RS_FAIL("%s: '%s%s' must be a number, not %s", label, where, key,
                       json_type_name(v));
    if (!isfinite(v->valuedouble))
        return RS_FAIL("%s: '%s%s' must be a finite number", label, where, key);
    *out = v->valuedouble;
    return 0;
}

static int json_bool(const char *label, const cJSON *obj, const char *key, int def, int *out) {
    const cJSON *v;
    RS_TRY(json_member(label, obj, "", key, &v));
    if (!v) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v))
        return RS_FAIL("%s: '%s' must be true or false, not %s", label, key, json_type_name(v));
    *out = cJSON_IsTrue(v);
    return 0;
}

/* String key: absent -> def (may be NULL). */
static int json_string(const char *label, const cJSON *obj, const char *where, const char *key,
                       const char *def, const char **out) {
    const cJSON *v;
    RS_TRY(json_member(label, obj, where, key, &v));
    if (!v) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsString(v))
        return RS_FAIL("%s: '%s%s' must be a string, not %s", label, where, key,
                       json_type_name(v));
    *out = v->valuestring;
    return 0;
}

/* ---------------------------------------------------------------- architecture */

static const hf_family *family_by(const char *name, int by_model_type) {
    for (int i = 0; i < N_FAMILIES; i++)
        if (strcmp(name, by_model_type ? g_families[i].model_type : g_families[i].architecture) == 0)
            return &g_families[i];
    return NULL;
}

/* "architectures"[0] decides; "model_type" is the fallback and, when both are present, must
 * name the same family (transformers picks its config class by model_type, so a disagreement
 * means the file does not say which model it is). */
static int parse_family(const char *label, const cJSON *root, const hf_family **out) {
    char t[72];
    const cJSON *archs;
    const char *model_type;
    RS_TRY(json_member(label, root, "", "architectures", &archs));
    RS_TRY(json_string(label, root, "", "model_type", NULL, &model_type));
    const hf_family *by_arch = NULL, *by_type = NULL;
    if (archs && !cJSON_IsNull(archs)) {
        if (!cJSON_IsArray(archs))
            return RS_FAIL("%s: 'architectures' must be an array of strings, not %s", label,
                           json_type_name(archs));
        const cJSON *first = archs->child;
        if (first) {
            if (!cJSON_IsString(first))
                return RS_FAIL("%s: 'architectures'[0] must be a string, not %s", label,
                               json_type_name(first));
            by_arch = family_by(first->valuestring, 0);
            if (!by_arch)
                return RS_FAIL("%s: unsupported architecture '%s' (supported: LlamaForCausalLM, "
                               "MistralForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM)",
                               label, rs_shown_text(first->valuestring, t, sizeof t));
        }
    }
    if (model_type) {
        by_type = family_by(model_type, 1);
        if (!by_type && !by_arch)
            return RS_FAIL("%s: unsupported model_type '%s' (supported: llama, mistral, qwen2, "
                           "gemma)",
                           label, rs_shown_text(model_type, t, sizeof t));
    }
    if (by_arch && model_type && by_type != by_arch)
        return RS_FAIL("%s: 'architectures'[0] is '%s' but 'model_type' is '%s'", label,
                       by_arch->architecture, rs_shown_text(model_type, t, sizeof t));
    *out = by_arch ? by_arch : by_type;
    if (!*out) return RS_FAIL("%s: neither 'architectures' nor 'model_type' is given", label);
    return 0;
}

/* ---------------------------------------------------------------- sizes */

static int parse_sizes(const char *label, const cJSON *root, const hf_family *fam,
                       rs_model_config *cfg) {
    /* required: transformers' own defaults (a 7B model) are never what a file without them means */
    static const char *required[] = {"vocab_size", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads"};
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        const cJSON *v;
        RS_TRY(json_member(label, root, "", required[i], &v));
        if (!v) return RS_FAIL("%s: missing required key '%s'", label, required[i]);
    }
    RS_TRY(json_int(label, root, "", "vocab_size", 0, 0, 0, 1, MAX_VOCAB, &cfg->vocab_size));
    RS_TRY(json_int(label, root, "", "hidden_size", 0, 0, 0, 1, MAX_HIDDEN, &cfg->hidden_size));
    RS_TRY(json_int(label, root, "", "intermediate_size", 0, 0, 0, 1, MAX_INTERMEDIATE,
                    &cfg->intermediate_size));
    RS_TRY(json_int(label, root, "", "num_hidden_layers", 0, 0, 0, 1, MAX_LAYERS, &cfg->n_layers));
    RS_TRY(json_int(label, root, "", "num_attention_heads", 0, 0, 0, 1, MAX_HEADS, &cfg->n_heads));
    /* absent -> the family default; null -> num_attention_heads (every __post_init__ does that) */
    int kv_default = fam->n_kv_heads ? fam->n_kv_heads : cfg->n_heads;
    RS_TRY(json_int(label, root, "", "num_key_value_heads", kv_default, 1, cfg->n_heads, 1,
                    MAX_HEADS, &cfg->n_kv_heads));
    int hd_default = fam->head_dim;
    RS_TRY(json_int(label, root, "", "head_dim", hd_default, 1, 0, 1, MAX_HEAD_DIM,
                    &cfg->head_dim));
    int derived = cfg->head_dim == 0;
    if (derived) cfg->head_dim = cfg->hidden_size / cfg->n_heads;
    /* LlamaConfig.validate_architecture insists on divisibility even with an explicit head_dim;
     * the other families need it only to derive head_dim. */
    if ((derived || fam->arch == RS_ARCH_LLAMA) && cfg->hidden_size % cfg->n_heads != 0)
        return RS_FAIL("%s: 'hidden_size' (%d) is not a multiple of 'num_attention_heads' (%d)",
                       label, cfg->hidden_size, cfg->n_heads);
    if (cfg->n_heads % cfg->n_kv_heads != 0)
        return RS_FAIL("%s: 'num_attention_heads' (%d) is not a multiple of 'num_key_value_heads' "
                       "(%d)",
                       label, cfg->n_heads, cfg->n_kv_heads);
    if (cfg->head_dim % 2 != 0)
        return RS_FAIL("%s: head_dim %d is odd; rotary embeddings rotate pairs of dimensions",
                       label, cfg->head_dim);
    RS_TRY(json_int(label, root, "", "max_position_embeddings", fam->max_position_embeddings, 0, 0,
                    1, MAX_POSITIONS, &cfg->max_position_embeddings));
    double eps;
    RS_TRY(json_number(label, root, "", "rms_norm_eps", 1e-6, &eps, NULL));
    if (!(eps >= 1e-30 && eps < 1)) /* and nonzero as a float */
        return RS_FAIL("%s: 'rms_norm_eps' = %g is outside [1e-30, 1)", label, eps);
    cfg->rms_norm_eps = (float)eps;
    return 0;
}

/* ---------------------------------------------------------------- rope */

/* The dict transformers standardises: rope_scaling when present and non-empty (it replaces
 * rope_parameters), else rope_parameters. Its rope_theta wins over the top-level rope_theta. */
static int find_rope_dict(const char *label, const cJSON *root, const cJSON **dict,
                          const char **where) {
    char t[72];
    const cJSON *scaling, *params;
    RS_TRY(json_member(label, root, "", "rope_scaling", &scaling));
    RS_TRY(json_member(label, root, "", "rope_parameters", &params));
    *dict = NULL;
    *where = "";
    if (scaling && !cJSON_IsNull(scaling)) {
        if (!cJSON_IsObject(scaling))
            return RS_FAIL("%s: 'rope_scaling' must be an object or null, not %s", label,
                           json_type_name(scaling));
        if (scaling->child) {
            *dict = scaling;
            *where = "rope_scaling.";
            return 0;
        }
    }
    if (params && !cJSON_IsNull(params)) {
        if (!cJSON_IsObject(params))
            return RS_FAIL("%s: 'rope_parameters' must be an object or null, not %s", label,
                           json_type_name(params));
        *dict = params;
        *where = "rope_parameters.";
    }
    if (*dict) /* nested per layer type ({"full_attention": {...}, ...}) */
        for (const cJSON *c = (*dict)->child; c; c = c->next)
            if (cJSON_IsObject(c))
                return RS_FAIL("%s: per-layer-type rope parameters ('%s%s') are not supported",
                               label, *where, rs_shown_text(c->string ? c->string : "", t, sizeof t));
    return 0;
}

static int parse_rope(const char *label, const cJSON *root, rs_model_config *cfg) {
    const cJSON *d;
    const char *where;
    RS_TRY(find_rope_dict(label, root, &d, &where));
    double theta;
    RS_TRY(json_number(label, root, "", "rope_theta", 10000.0, &theta, NULL));
    if (d) RS_TRY(json_number(label, d, where, "rope_theta", theta, &theta, NULL));
    if (!(theta >= 1 && theta <= 1e30))
        return RS_FAIL("%s: rope_theta = %g is outside [1, 1e30]", label, theta);
    cfg->rope_theta = (float)theta;

    double partial;
    RS_TRY(json_number(label, root, "", "partial_rotary_factor", 1.0, &partial, NULL));
    if (d) RS_TRY(json_number(label, d, where, "partial_rotary_factor", partial, &partial, NULL));
    if (partial != 1.0)
        return RS_FAIL("%s: partial_rotary_factor %g is not supported (only 1)", label, partial);

    const char *type = "default";
    char t[72];
    if (d) {
        RS_TRY(json_string(label, d, where, "type", type, &type));
        RS_TRY(json_string(label, d, where, "rope_type", type, &type)); /* rope_type wins */
    }
    cfg->rope_factor = 1.0f;
    cfg->rope_low_freq_factor = cfg->rope_high_freq_factor = 0.0f;
    cfg->rope_original_max_position = 0;
    if (strcmp(type, "default") == 0) {
        cfg->rope_type = RS_ROPE_DEFAULT;
        return 0;
    }
    if (strcmp(type, "linear") != 0 && strcmp(type, "llama3") != 0)
        return RS_FAIL("%s: rope type '%s' is not supported (supported: default, linear, llama3)",
                       label, rs_shown_text(type, t, sizeof t));
    cfg->rope_type = strcmp(type, "linear") == 0 ? RS_ROPE_LINEAR : RS_ROPE_LLAMA3;
    double factor;
    int have;
    RS_TRY(json_number(label, d, where, "factor", 0, &factor, &have));
    if (!have) return RS_FAIL("%s: rope type '%s' needs '%sfactor'", label, type, where);
    if (!(factor >= 1e-6 && factor <= 1e6))
        return RS_FAIL("%s: '%sfactor' = %g is outside [1e-6, 1e6]", label, where, factor);
    cfg->rope_factor = (float)factor;
    if (cfg->rope_type == RS_ROPE_LINEAR) return 0;

    double lo, hi;
    RS_TRY(json_number(label, d, where, "low_freq_factor", 0, &lo, &have));
    if (!have) return RS_FAIL("%s: rope type 'llama3' needs '%slow_freq_factor'", label, where);
    RS_TRY(json_number(label, d, where, "high_freq_factor", 0, &hi, &have));
    if (!have) return RS_FAIL("%s: rope type 'llama3' needs '%shigh_freq_factor'", label, where);
    /* (hi - lo) divides: keep it well away from 0 */
    if (!(lo >= 1e-6 && hi <= 1e6 && hi - lo >= 1e-6))
        return RS_FAIL("%s: llama3 rope needs 1e-6 <= low_freq_factor < high_freq_factor <= 1e6, "
                       "got %g and %g",
                       label, lo, hi);
    cfg->rope_low_freq_factor = (float)lo;
    cfg->rope_high_freq_factor = (float)hi;
    /* standardize_rope_params: a top-level original_max_position_embeddings wins, then the
     * dict's, then max_position_embeddings */
    int orig;
    RS_TRY(json_int(label, d, where, "original_max_position_embeddings",
                    cfg->max_position_embeddings, 0, 0, 1, MAX_POSITIONS, &orig));
    RS_TRY(json_int(label, root, "", "original_max_position_embeddings", orig, 0, 0, 1,
                    MAX_POSITIONS, &orig));
    cfg->rope_original_max_position = orig;
    return 0;
}

/* ---------------------------------------------------------------- layers */

static int parse_activation(const char *label, const cJSON *root, const hf_family *fam,
                            rs_model_config *cfg) {
    const char *act;
    RS_TRY(json_string(label, root, "", "hidden_act", fam->hidden_act, &act));
    char t[72];
    /* GemmaConfig.__post_init__ turns the legacy "gelu" into "gelu_pytorch_tanh"; the
     * "hidden_activation" key of older Gemma releases is ignored by transformers 5.x. */
    if (strcmp(act, "silu") == 0 || strcmp(act, "swish") == 0)
        cfg->hidden_act = RS_ACT_SILU;
    else if (strcmp(act, "gelu_pytorch_tanh") == 0 || strcmp(act, "gelu_new") == 0)
        cfg->hidden_act = RS_ACT_GELU_TANH;
    else if (strcmp(act, "gelu") == 0)
        cfg->hidden_act = fam->arch == RS_ARCH_GEMMA ? RS_ACT_GELU_TANH : RS_ACT_GELU;
    else
        return RS_FAIL("%s: hidden_act '%s' is not supported (supported: silu, swish, gelu, "
                       "gelu_pytorch_tanh, gelu_new)",
                       label, rs_shown_text(act, t, sizeof t));
    return 0;
}

/* Which linears carry biases, per family, as the modeling files build them. */
static int parse_biases(const char *label, const cJSON *root, const hf_family *fam,
                        rs_model_config *cfg) {
    int attn = 0, mlp = 0;
    switch (fam->arch) {
    case RS_ARCH_LLAMA:
        RS_TRY(json_bool(label, root, "attention_bias", 0, &attn));
        RS_TRY(json_bool(label, root, "mlp_bias", 0, &mlp));
        cfg->attention_bias = cfg->o_bias = attn;
        cfg->mlp_bias = mlp;
        break;
    case RS_ARCH_GEMMA: /* attention_bias covers q, k, v and o; the MLP never has biases */
        RS_TRY(json_bool(label, root, "attention_bias", 0, &attn));
        cfg->attention_bias = cfg->o_bias = attn;
        cfg->mlp_bias = 0;
        break;
    case RS_ARCH_QWEN2: /* q, k, v always biased, o never; the config keys are not read */
        cfg->attention_bias = 1;
        cfg->o_bias = cfg->mlp_bias = 0;
        break;
    case RS_ARCH_MISTRAL:
        cfg->attention_bias = cfg->o_bias = cfg->mlp_bias = 0;
        break;
    }
    return 0;
}

/* Qwen2: sliding_window counts only with use_sliding_window, and only for layers marked
 * "sliding_attention" (layer_types, or by default the layers from max_window_layers on). */
static int qwen2_has_sliding_layer(const char *label, const cJSON *root, int n_layers, int *out) {
    const cJSON *types;
    RS_TRY(json_member(label, root, "", "layer_types", &types));
    if (types && !cJSON_IsNull(types)) {
        if (!cJSON_IsArray(types) || cJSON_GetArraySize(types) != n_layers)
            return RS_FAIL("%s: 'layer_types' must be an array of %d strings", label, n_layers);
        *out = 0;
        for (const cJSON *t = types->child; t; t = t->next) {
            if (!cJSON_IsString(t) || (strcmp(t->valuestring, "full_attention") != 0 &&
                                       strcmp(t->valuestring, "sliding_attention") != 0))
                return RS_FAIL("%s: 'layer_types' entries must be \"full_attention\" or "
                               "\"sliding_attention\"",
                               label);
            if (strcmp(t->valuestring, "sliding_attention") == 0) *out = 1;
        }
        return 0;
    }
    int max_window_layers;
    RS_TRY(json_int(label, root, "", "max_window_layers", 28, 0, 0, 0, 1 << 30,
                    &max_window_layers));
    *out = max_window_layers < n_layers;
    return 0;
}

static int parse_sliding_window(const char *label, const cJSON *root, const hf_family *fam,
                                rs_model_config *cfg) {
    cfg->sliding_window = 0;
    if (fam->arch == RS_ARCH_MISTRAL)
        return json_int(label, root, "", "sliding_window", 4096, 1, 0, 1, MAX_POSITIONS,
                        &cfg->sliding_window);
    if (fam->arch != RS_ARCH_QWEN2) return 0;
    int use = 0, window = 0, sliding = 0;
    RS_TRY(json_bool(label, root, "use_sliding_window", 0, &use));
    RS_TRY(json_int(label, root, "", "sliding_window", 4096, 1, 0, 1, MAX_POSITIONS, &window));
    RS_TRY(qwen2_has_sliding_layer(label, root, cfg->n_layers, &sliding));
    cfg->sliding_window = use && sliding ? window : 0;
    return 0;
}

static int parse_token_ids(const char *label, const cJSON *root, const hf_family *fam,
                           rs_model_config *cfg) {
    /* -1 is accepted as "none" (older converted Llama configs write pad_token_id: -1) */
    int hi = cfg->vocab_size - 1;
    RS_TRY(json_int(label, root, "", "bos_token_id", fam->bos, 1, -1, -1, hi, &cfg->bos_token_id));
    RS_TRY(json_int(label, root, "", "pad_token_id", fam->pad, 1, -1, -1, hi, &cfg->pad_token_id));
    /* a family default can exceed a tiny vocabulary: no such token then */
    if (cfg->bos_token_id > hi) cfg->bos_token_id = -1;
    if (cfg->pad_token_id > hi) cfg->pad_token_id = -1;
    const cJSON *eos;
    RS_TRY(json_member(label, root, "", "eos_token_id", &eos));
    cfg->n_eos = 0;
    if (!eos) {
        if (fam->eos >= 0 && fam->eos <= hi) cfg->eos_token_ids[cfg->n_eos++] = fam->eos;
        return 0;
    }
    if (cJSON_IsNull(eos)) return 0;
    if (!cJSON_IsArray(eos)) {
        int id;
        RS_TRY(json_int(label, root, "", "eos_token_id", 0, 0, 0, -1, hi, &id));
        if (id >= 0) cfg->eos_token_ids[cfg->n_eos++] = id;
        return 0;
    }
    for (const cJSON *e = eos->child; e; e = e->next) {
        if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble) ||
            e->valuedouble != floor(e->valuedouble))
            return RS_FAIL("%s: 'eos_token_id' must be an integer or a list of integers", label);
        if (e->valuedouble < 0 || e->valuedouble > hi)
            return RS_FAIL("%s: 'eos_token_id' %.0f is outside the vocabulary [0, %d]", label,
                           e->valuedouble, hi);
        if (cfg->n_eos == RS_MAX_EOS)
            return RS_FAIL("%s: 'eos_token_id' lists more than %d ids", label, RS_MAX_EOS);
        cfg->eos_token_ids[cfg->n_eos++] = (int)e->valuedouble;
    }
    return 0;
}

/* ---------------------------------------------------------------- entry points */

static int parse_root(const char *label, const cJSON *root, rs_model_config *cfg) {
    const hf_family *fam;
    RS_TRY(parse_family(label, root, &fam));
    cfg->arch = fam->arch;
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", fam->model_type);
    RS_TRY(parse_sizes(label, root, fam, cfg));
    RS_TRY(parse_rope(label, root, cfg));
    RS_TRY(json_bool(label, root, "tie_word_embeddings", fam->tie_word_embeddings,
                     &cfg->tie_word_embeddings));
    RS_TRY(parse_biases(label, root, fam, cfg));
    RS_TRY(parse_activation(label, root, fam, cfg));
    RS_TRY(parse_sliding_window(label, root, fam, cfg));
    RS_TRY(parse_token_ids(label, root, fam, cfg));
    int gemma = fam->arch == RS_ARCH_GEMMA;
    cfg->norm_add_one = gemma;
    /* GemmaModel: embed_scale = hidden_size**0.5 (Python double), stored as a float32 tensor */
    cfg->embed_scale = gemma ? (float)sqrt((double)cfg->hidden_size) : 1.0f;
    /* every family's attention: self.scaling = head_dim**-0.5 (Gemma 1 ignores
     * query_pre_attn_scalar, which only Gemma 2 and later read) */
    cfg->attn_scale = (float)pow((double)cfg->head_dim, -0.5);
    return 0;
}

/* 1-based line and column of a byte offset, for JSON syntax errors. */
static void text_position(const char *text, size_t offset, int *line, int *col) {
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < offset && text[i]; i++) {
        if (text[i] == '\n') {
            ++*line;
            *col = 1;
        } else {
            ++*col;
        }
    }
}

int rs_hf_config_parse(const char *label, const char *json_text, rs_model_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json_text, &end, 1);
    if (!root) {
        int line, col;
        size_t off = end && end >= json_text ? (size_t)(end - json_text) : 0;
        text_position(json_text, off, &line, &col);
        return RS_FAIL("%s: invalid JSON at line %d, column %d", label, line, col);
    }
    int rc = cJSON_IsObject(root)
                 ? parse_root(label, root, cfg)
                 : RS_FAIL("%s: top level must be a JSON object, not %s", label,
                           json_type_name(root));
    cJSON_Delete(root);
    if (rc != 0) memset(cfg, 0, sizeof *cfg);
    return rc;
}

int rs_hf_config_load(const char *model_dir, rs_model_config *cfg) {
    if (!rs_path_is_dir(model_dir)) return RS_FAIL("%s: not a model directory", model_dir);
    char *path = rs_path_join(model_dir, "config.json");
    char *text = NULL;
    size_t size = 0;
    int rc = -1;
    if (rs_path_is_dir(path))
        RS_FAIL("%s: is a directory", path);
    else if (rs_read_file(path, &text, &size) == 0)
        rc = strlen(text) == size ? rs_hf_config_parse(path, text, cfg)
                                  : RS_FAIL("%s: contains a NUL byte", path);
    free(text);
    free(path);
    return rc;
}

/* ---------------------------------------------------------------- rope frequencies */

/* Mirrors transformers' float32 arithmetic step by step (torch casts Python scalars to the
 * tensor's float32 before each op; `a / t` is t.reciprocal() * a). */
void rs_rope_inv_freq(const rs_model_config *cfg, float *inv_freq) {
    int dim = cfg->head_dim, half = dim / 2;
    float base = cfg->rope_theta;
    for (int i = 0; i < half; i++) {
        float expo = (float)(2 * i) / (float)dim;
        float p = (float)pow((double)base, (double)expo);
        inv_freq[i] = 1.0f / p;
    }
    if (cfg->rope_type == RS_ROPE_LINEAR) {
        for (int i = 0; i < half; i++) inv_freq[i] /= cfg->rope_factor;
    } else if (cfg->rope_type == RS_ROPE_LLAMA3) {
        /* Llama 3.1: long wavelengths are divided by factor, short ones kept, the band between
         * interpolated (_compute_llama3_parameters) */
        double old_len = cfg->rope_original_max_position;
        double lo = cfg->rope_low_freq_factor, hi = cfg->rope_high_freq_factor;
        float low_freq_wavelen = (float)(old_len / lo), high_freq_wavelen = (float)(old_len / hi);
        float factor = cfg->rope_factor, two_pi = (float)(2 * M_PI);
        for (int i = 0; i < half; i++) {
            float f = inv_freq[i];
            float wavelen = (1.0f / f) * two_pi;
            float scaled = wavelen > low_freq_wavelen ? f / factor : f;
            float smooth = ((1.0f / wavelen) * (float)old_len - (float)lo) / (float)(hi - lo);
            float smoothed = (1.0f - smooth) * scaled / factor + smooth * scaled;
            int medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
            inv_freq[i] = medium ? smoothed : scaled;
        }
    }
}
