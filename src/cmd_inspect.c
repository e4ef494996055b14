/* resafe inspect: summarise a model directory, safetensors file, HDF5 file, config.json or
 * tokenizer.json. Every reader validates fully, so inspect doubles as a file checker. */
#include <stdlib.h>
#include <string.h>

#include "resafe/adapter.h"
#include "resafe/chat.h"
#include "resafe/checkpoint.h"
#include "resafe/cli.h"
#include "resafe/h5store.h"
#include "resafe/quant_io.h"
#include "resafe/hf_config.h"
#include "resafe/safetensors.h"
#include "resafe/tokenizer.h"

typedef enum { AS_AUTO, AS_MODEL_DIR, AS_SAFETENSORS, AS_HDF5, AS_CONFIG, AS_TOKENIZER, AS_QUANT } inspect_kind;

static void usage(FILE *f) {
    fprintf(f, "usage: resafe inspect PATH [--as model|safetensors|hdf5|config|tokenizer|quant] [--all]\n"
               "  PATH: a Hugging Face model directory, a .safetensors file (or its sharded\n"
               "  .index.json), an HDF5 file (.h5/.hdf5), a config.json or a tokenizer.json.\n"
               "  --all lists every tensor of a model directory (default: the first 16).\n");
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static inspect_kind guess_kind(const char *path) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (rs_path_is_dir(path)) return AS_MODEL_DIR;
    if (ends_with(path, ".safetensors") || ends_with(path, ".safetensors.index.json"))
        return AS_SAFETENSORS;
    if (ends_with(path, ".h5") || ends_with(path, ".hdf5")) return AS_HDF5;
    if (strcmp(base, "tokenizer.json") == 0) return AS_TOKENIZER;
    if (ends_with(path, ".json")) return AS_CONFIG;
    return AS_AUTO;
}

static void print_shape(const int64_t *shape, int ndim) {
    printf("[");
    for (int d = 0; d < ndim; d++) printf("%s%lld", d ? ", " : "", (long long)shape[d]);
    printf("]");
}

static void print_tensor_list(const rs_st_set *set, int limit) {
    for (int i = 0; i < set->n_tensors && (limit < 0 || i < limit); i++) {
        const rs_st_tensor *t = &set->tensors[i];
        printf("  %-56s %-5s ", t->name, rs_dtype_name(t->dtype));
        print_shape(t->shape, t->ndim);
        printf("\n");
    }
    if (limit >= 0 && set->n_tensors > limit)
        printf("  ... %d more (--all lists them)\n", set->n_tensors - limit);
}

static void print_st_totals(const rs_st_set *set) {
    int64_t params = 0;
    size_t bytes = 0;
    int per_dtype[RS_DTYPE_COUNT] = {0};
    for (int i = 0; i < set->n_tensors; i++) {
        params += rs_st_numel(&set->tensors[i]);
        bytes += set->tensors[i].nbytes;
        per_dtype[set->tensors[i].dtype]++;
    }
    printf("tensors: %d in %d file%s, %lld parameters, %.2f MiB (", set->n_tensors, set->n_files,
           set->n_files == 1 ? "" : "s", (long long)params, bytes / 1048576.0);
    const char *sep = "";
    for (int d = 0; d < RS_DTYPE_COUNT; d++)
        if (per_dtype[d]) {
            printf("%s%d %s", sep, per_dtype[d], rs_dtype_name((rs_dtype)d));
            sep = ", ";
        }
    printf(")\n");
}

static int inspect_safetensors(const char *path) {
    rs_st_set set;
    RS_TRY(rs_st_open(path, &set));
    printf("%s: safetensors\n", path);
    print_st_totals(&set);
    for (int i = 0; i < set.n_meta; i++)
        printf("metadata: %s = %s\n", set.meta_keys[i], set.meta_values[i]);
    print_tensor_list(&set, -1);
    rs_st_close(&set);
    return 0;
}

static void print_model_config(const rs_model_config *c) {
    printf("architecture: %s (model_type %s)\n", rs_arch_name(c->arch), c->model_type);
    printf("layers %d, hidden %d, intermediate %d, heads %d (kv %d, head_dim %d), vocab %d\n",
           c->n_layers, c->hidden_size, c->intermediate_size, c->n_heads, c->n_kv_heads,
           c->head_dim, c->vocab_size);
    static const char *rope_names[] = {"default", "linear", "llama3"};
    printf("rope: theta %g, scaling %s", c->rope_theta, rope_names[c->rope_type]);
    if (c->rope_type != RS_ROPE_DEFAULT) printf(" (factor %g)", c->rope_factor);
    printf("; rms_norm_eps %g; tied embeddings %s; qkv bias %s\n", c->rms_norm_eps,
           c->tie_word_embeddings ? "yes" : "no", c->attention_bias ? "yes" : "no");
}

static int inspect_config(const char *path) {
    char *text;
    rs_model_config cfg;
    RS_TRY(rs_read_file(path, &text, NULL));
    int rc = rs_hf_config_parse(path, text, &cfg);
    free(text);
    RS_TRY(rc);
    printf("%s: Hugging Face config\n", path);
    print_model_config(&cfg);
    return 0;
}

static int inspect_tokenizer(const char *path) {
    rs_tokenizer *tok = rs_tokenizer_load(path);
    if (!tok) return -1;
    int n = rs_tokenizer_vocab_size(tok), n_special = 0;
    for (int i = 0; i < n; i++) n_special += rs_tokenizer_is_special(tok, i) == 1;
    printf("%s: tokenizer, %d tokens (%d special)\n", path, n, n_special);
    rs_tokenizer_free(tok);
    return 0;
}

/* resafe_adapter.h5 of a `resafe merge --mode adapter` directory: validated for this model
 * (adapter.h), as rs_model_load will attach it. */
static int inspect_adapter(const char *dir, const rs_model_config *cfg) {
    char *path = rs_path_join(dir, RS_ADAPTER_FILE);
    int rc = 0;
    if (rs_path_exists(path)) {
        rs_lora l;
        rc = rs_adapter_load_for(path, cfg, rs_backend_cpu(), &l);
        if (rc == 0) {
            char *targets = rs_lora_targets_string(l.targets);
            printf("adapter: %s, applied at load (rank %d, alpha %g, %s mask, %s%s)\n",
                   RS_ADAPTER_FILE, l.rank, l.alpha, rs_mask_mode_name(l.mask_mode), targets,
                   l.group_constant ? ", group-constant" : "");
            free(targets);
            rs_lora_free(&l);
        }
    }
    free(path);
    return rc;
}

static int inspect_model_dir(const char *dir, int all) {
    rs_model_config cfg;
    rs_st_set set;
    RS_TRY(rs_hf_config_load(dir, &cfg));
    RS_TRY(rs_st_open(dir, &set));
    printf("%s: model directory\n", dir);
    print_model_config(&cfg);
    print_st_totals(&set);
    print_tensor_list(&set, all ? -1 : 16);
    rs_st_close(&set);
    RS_TRY(inspect_adapter(dir, &cfg));
    char *tok_path = rs_path_join(dir, "tokenizer.json");
    if (rs_path_exists(tok_path)) {
        int rc = inspect_tokenizer(tok_path);
        free(tok_path);
        RS_TRY(rc);
        rs_chat_kind kind;
        if (rs_chat_detect(dir, &kind) == 0)
            printf("chat template: %s\n", rs_chat_kind_name(kind));
        else
            printf("chat template: none detected (set [model] chat_template)\n");
    } else {
        printf("tokenizer: none (no tokenizer.json)\n");
        free(tok_path);
    }
    return 0;
}

static int inspect_hdf5(const char *path) {
    rs_h5 *h;
    rs_h5_dataset *sets;
    int n, n_attrs;
    char **attrs;
    RS_TRY(rs_h5_open(path, &h));
    if (rs_h5_list(h, &sets, &n) != 0) {
        rs_h5_close(h);
        return -1;
    }
    printf("%s: HDF5, %d datasets\n", path, n);
    if (rs_h5_attr_names(h, "/", &attrs, &n_attrs) == 0) {
        for (int i = 0; i < n_attrs; i++) {
            char *s;
            int64_t iv;
            double dv;
            if (rs_h5_get_attr_str(h, "/", attrs[i], &s) == 0) {
                printf("attribute: %s = %s\n", attrs[i], s);
                free(s);
            } else if (rs_h5_get_attr_i64(h, "/", attrs[i], &iv) == 0) {
                printf("attribute: %s = %lld\n", attrs[i], (long long)iv);
            } else if (rs_h5_get_attr_f64(h, "/", attrs[i], &dv) == 0) {
                printf("attribute: %s = %g\n", attrs[i], dv);
            }
            free(attrs[i]);
        }
        free(attrs);
    }
    rs_clear_error();
    for (int i = 0; i < n; i++) {
        printf("  %-56s %-7s ", sets[i].path,
               sets[i].kind == RS_H5_STRINGS ? "strings"
               : sets[i].kind == RS_H5_OTHER ? "other"
                                              : rs_dtype_name(sets[i].dtype));
        print_shape(sets[i].shape, sets[i].ndim);
        printf("\n");
    }
    rs_h5_free_list(sets, n);
    rs_h5_close(h);
    return 0;
}

/* A quantized safetensors file: every quantized linear validated (quant_io.h). */
static int inspect_quant(const char *path) {
    int n;
    RS_TRY(rs_qfile_check(path, &n));
    printf("%s: quantized safetensors, %d quantized linears, all valid\n", path, n);
    return 0;
}

static int parse_kind(const char *s, inspect_kind *out) {
    static const struct {
        const char *name;
        inspect_kind kind;
    } names[] = {{"model", AS_MODEL_DIR},   {"safetensors", AS_SAFETENSORS}, {"hdf5", AS_HDF5},
                 {"config", AS_CONFIG},     {"tokenizer", AS_TOKENIZER},
                 {"quant", AS_QUANT}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(s, names[i].name) == 0) {
            *out = names[i].kind;
            return 0;
        }
    return -1;
}

int cmd_inspect(int argc, char **argv) {
    const char *path = NULL;
    inspect_kind kind = AS_AUTO;
    int all = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--all") == 0) {
            all = 1;
        } else if (strcmp(argv[i], "--as") == 0 && i + 1 < argc) {
            if (parse_kind(argv[++i], &kind) != 0) {
                fprintf(stderr, "resafe: error: inspect --as: unknown kind '%s'\n", argv[i]);
                usage(stderr);
                return 2;
            }
        } else if (argv[i][0] == '-' || path) {
            fprintf(stderr, "resafe: error: inspect: unexpected argument '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        } else {
            path = argv[i];
        }
    }
    if (!path) {
        usage(stderr);
        return 2;
    }
    if (kind == AS_AUTO) kind = guess_kind(path);
    if (kind == AS_AUTO && !rs_path_exists(path)) {
        RS_FAIL("%s: no such file or directory", path);
        rs_die_last();
    }
    int rc;
    switch (kind) {
    case AS_MODEL_DIR: rc = inspect_model_dir(path, all); break;
    case AS_SAFETENSORS: rc = inspect_safetensors(path); break;
    case AS_HDF5: rc = inspect_hdf5(path); break;
    case AS_CONFIG: rc = inspect_config(path); break;
    case AS_TOKENIZER: rc = inspect_tokenizer(path); break;
    case AS_QUANT: rc = inspect_quant(path); break;
    default:
        rc = RS_FAIL("%s: cannot tell what this file is (use --as model|safetensors|hdf5|config|"
                     "tokenizer)", path);
    }
    if (rc != 0) rs_die_last();
    return 0;
}
