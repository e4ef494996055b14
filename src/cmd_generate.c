/* resafe generate: text from a model directory, greedy or sampled, batched over prompts. */
#include <cJSON.h>
#include <errno.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/chat.h"
#include "resafe/cli.h"
#include "resafe/config.h"
#include "resafe/generate.h"
#include "resafe/tokenizer.h"

static const char *g_usage =
    "usage: resafe generate --model DIR (--prompt TEXT | --prompts-file FILE | --ids 1,2,3)\n"
    "                       [options]\n"
    "  --model DIR            Hugging Face model directory (config.json, *.safetensors)\n"
    "  --prompt TEXT          a prompt (repeatable)\n"
    "  --prompts-file FILE    one prompt per line (empty lines skipped)\n"
    "  --ids 1,2,3            token ids of a prompt; ';' separates prompts (repeatable)\n"
    "  --chat                 wrap text prompts in the model's chat template\n"
    "  --system TEXT          system message for --chat\n"
    "  --max-new-tokens N     default 128\n"
    "  --temperature T        0 = greedy (default)\n"
    "  --top-k K              0 = off (default)\n"
    "  --top-p P              1 = off (default)\n"
    "  --seed S               prompt i samples from seed S and index i (default 0)\n"
    "  --batch-size B         sequences generated at once (default 8; with --config or\n"
    "                         --set: [generate] batch_size)\n"
    "  --backend NAME         cpu, cuda or auto (default auto)\n"
    "  --format FMT           text (default) or jsonl: one object per prompt with index,\n"
    "                         prompt (text prompts), prompt_ids, ids (generated, the stop id\n"
    "                         included), text and stop (eos or length)\n"
    "  --config FILE.ini      take [model] and [generate] keys from a run config; the\n"
    "                         options above override it (README: config keys)\n"
    "  --set section.key=V    override one config key (repeatable; implies the defaults\n"
    "                         of every other key when no --config is given)\n"
    "  --no-chat              plain prompts even when the config says chat = true\n"
    "  -v, --verbose          debug log (memory plans, forward calls)\n";

typedef struct {
    const char *model_dir, *prompts_file, *system, *backend, *format;
    char **texts; /* --prompt values, then lines of --prompts-file */
    int n_texts;
    int32_t **ids; /* --ids prompts */
    int *id_lens, n_ids;
    int chat, verbose;
    int chat_kind_set;      /* chat_kind given by the config, not detected */
    rs_chat_kind chat_kind;
    char *backend_owned, *model_owned, *system_owned;
    rs_gen_params gen; /* the numeric options; the rest filled from the model */
} options;

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "resafe generate: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n%s", g_usage);
    return 2;
}

/* ---------------------------------------------------------------- argument parsing */

/* "1,2,3;4,5" -> prompts appended to o->ids. */
static int parse_ids(options *o, const char *arg) {
    char *copy = rs_strdup(arg), *save = NULL;
    for (char *seq = strtok_r(copy, ";", &save); seq; seq = strtok_r(NULL, ";", &save)) {
        int32_t *ids = rs_malloc((strlen(seq) + 1) * sizeof *ids);
        int n = 0;
        char *save2 = NULL;
        for (char *tok = strtok_r(seq, ", ", &save2); tok; tok = strtok_r(NULL, ", ", &save2)) {
            long v;
            if (rs_parse_long(tok, 0, INT32_MAX, &v) != 0) {
                free(ids), free(copy);
                return -1;
            }
            ids[n++] = (int32_t)v;
        }
        if (n == 0) {
            free(ids), free(copy);
            return -1;
        }
        o->ids = rs_realloc(o->ids, (size_t)(o->n_ids + 1) * sizeof *o->ids);
        o->id_lens = rs_realloc(o->id_lens, (size_t)(o->n_ids + 1) * sizeof *o->id_lens);
        o->ids[o->n_ids] = ids;
        o->id_lens[o->n_ids++] = n;
    }
    free(copy);
    return 0;
}

static void add_text(options *o, char *text) {
    o->texts = rs_realloc(o->texts, (size_t)(o->n_texts + 1) * sizeof *o->texts);
    o->texts[o->n_texts++] = text;
}

/* One numeric option; returns 0, or the usage exit code. */
static int parse_number(options *o, const char *flag, const char *v) {
    long n;
    if (strcmp(flag, "--max-new-tokens") == 0) {
        if (rs_parse_long(v, 0, 1 << 24, &n)) return usage_error("--max-new-tokens: '%s' is not an integer >= 0", v);
        o->gen.max_new_tokens = (int)n;
    } else if (strcmp(flag, "--top-k") == 0) {
        if (rs_parse_long(v, 0, INT32_MAX, &n)) return usage_error("--top-k: '%s' is not an integer >= 0", v);
        o->gen.top_k = (int)n;
    } else if (strcmp(flag, "--batch-size") == 0) {
        if (rs_parse_long(v, 1, 1 << 20, &n)) return usage_error("--batch-size: '%s' is not an integer >= 1", v);
        o->gen.batch_size = (int)n;
    } else if (strcmp(flag, "--seed") == 0) {
        char *end;
        errno = 0;
        o->gen.seed = strtoull(v, &end, 10);
        if (errno || end == v || *end || *v == '-') return usage_error("--seed: '%s' is not an integer >= 0", v);
    } else if (strcmp(flag, "--temperature") == 0) {
        if (rs_parse_float(v, 0, 1e6f, &o->gen.temperature)) return usage_error("--temperature: '%s' is not a number >= 0", v);
    } else if (strcmp(flag, "--top-p") == 0) {
        if (rs_parse_float(v, 1e-6f, 1, &o->gen.top_p)) return usage_error("--top-p: '%s' is not a number in (0, 1]", v);
    } else {
        return usage_error("unknown option '%s'", flag);
    }
    return 0;
}

/* --config FILE and --set s.k=v: the run config's [model] and [generate] keys become the
 * defaults that the other options override. Returns 0, 1 (input error, message recorded). */
static int apply_config(options *o, int argc, char **argv) {
    const char *path = NULL;
    int n_sets = 0;
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--config") == 0) path = argv[i + 1];
        n_sets += strcmp(argv[i], "--set") == 0;
    }
    if (!path && !n_sets) return 0;
    rs_config *cfg = path ? rs_config_load(path) : rs_config_new();
    if (!cfg) return 1;
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--set") == 0 && rs_config_set_arg(cfg, argv[i + 1]) != 0) {
            rs_config_free(cfg);
            return 1;
        }
    const char *model = rs_config_get_str(cfg, "model", "path"), *tmpl;
    if (model[0]) o->model_dir = o->model_owned = rs_strdup(model);
    o->backend = o->backend_owned = rs_strdup(rs_config_get_str(cfg, "model", "backend"));
    int threads = (int)rs_config_get_int(cfg, "model", "threads");
    if (threads > 0) omp_set_num_threads(threads);
    tmpl = rs_config_get_str(cfg, "model", "chat_template");
    if (strcmp(tmpl, "auto") != 0) o->chat_kind_set = rs_chat_kind_from_name(tmpl, &o->chat_kind) == 0;
    o->chat = rs_config_get_bool(cfg, "generate", "chat");
    const char *system = rs_config_get_str(cfg, "generate", "system_prompt");
    if (system[0]) o->system = o->system_owned = rs_strdup(system);
    o->gen.max_new_tokens = (int)rs_config_get_int(cfg, "generate", "max_new_tokens");
    o->gen.temperature = (float)rs_config_get_float(cfg, "generate", "temperature");
    o->gen.top_k = (int)rs_config_get_int(cfg, "generate", "top_k");
    o->gen.top_p = (float)rs_config_get_float(cfg, "generate", "top_p");
    o->gen.seed = (unsigned long long)rs_config_get_int(cfg, "generate", "seed");
    o->gen.batch_size = (int)rs_config_get_int(cfg, "generate", "batch_size");
    rs_config_free(cfg);
    return 0;
}

static int parse_args(options *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    o->backend = "auto";
    o->format = "text";
    o->gen.max_new_tokens = -1; /* -1: not given (model defaults fill in later) */
    o->gen.batch_size = 8;
    o->gen.top_p = 1.0f;
    if (apply_config(o, argc, argv) != 0) {
        fprintf(stderr, "resafe: error: %s\n", rs_last_error());
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return printf("%s", g_usage), -1;
        if (strcmp(a, "--chat") == 0) { o->chat = 1; continue; }
        if (strcmp(a, "--no-chat") == 0) { o->chat = 0; continue; }
        if ((strcmp(a, "--config") == 0 || strcmp(a, "--set") == 0) && i + 1 < argc) { i++; continue; }
        if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) { o->verbose = 1; continue; }
        if (i + 1 >= argc) return usage_error("option '%s' needs a value (or is unknown)", a);
        const char *v = argv[++i];
        if (strcmp(a, "--model") == 0) o->model_dir = v;
        else if (strcmp(a, "--prompt") == 0) add_text(o, rs_strdup(v));
        else if (strcmp(a, "--prompts-file") == 0) o->prompts_file = v;
        else if (strcmp(a, "--system") == 0) o->system = v;
        else if (strcmp(a, "--backend") == 0) o->backend = v;
        else if (strcmp(a, "--format") == 0) o->format = v;
        else if (strcmp(a, "--ids") == 0) {
            if (parse_ids(o, v) != 0) return usage_error("--ids: '%s' is not a list like 1,2,3;4,5", v);
        } else {
            int rc = parse_number(o, a, v);
            if (rc) return rc;
        }
    }
    if (!o->model_dir) return usage_error("%s", "--model is required");
    int n_sources = (o->n_texts > 0) + (o->prompts_file != NULL) + (o->n_ids > 0);
    if (n_sources != 1) return usage_error("%s", "give prompts with exactly one of --prompt, --prompts-file, --ids");
    if (o->chat && o->n_ids && !o->model_owned) return usage_error("%s", "--chat needs text prompts, not --ids");
    if (o->n_ids) o->chat = 0; /* ids are sent as they are */
    if (o->system && !o->chat && !o->system_owned) return usage_error("%s", "--system needs --chat");
    if (strcmp(o->format, "text") != 0 && strcmp(o->format, "jsonl") != 0)
        return usage_error("--format: '%s' is not text or jsonl", o->format);
    return 0;
}

/* ---------------------------------------------------------------- prompts */

static int read_prompts_file(options *o) {
    char *data;
    RS_TRY(rs_read_file(o->prompts_file, &data, NULL));
    for (char *line = data, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        size_t len = next ? (size_t)(next - line) : strlen(line);
        if (next) next++;
        if (len && line[len - 1] == '\r') len--;
        if (len) add_text(o, rs_strndup(line, len));
    }
    free(data);
    return o->n_texts ? 0 : RS_FAIL("%s: no prompts (one per line)", o->prompts_file);
}

/* Text prompts -> ids: the chat template (no extra BOS, as apply_chat_template) or plain
 * encoding with the tokenizer's special tokens (BOS) as HF's add_special_tokens=True. */
static int encode_texts(options *o, const rs_tokenizer *tok) {
    rs_chat_kind kind = RS_CHAT_NONE;
    if (o->chat && o->chat_kind_set) kind = o->chat_kind;
    else if (o->chat) RS_TRY(rs_chat_detect(o->model_dir, &kind));
    o->ids = rs_calloc((size_t)o->n_texts, sizeof *o->ids);
    o->id_lens = rs_calloc((size_t)o->n_texts, sizeof *o->id_lens);
    for (int i = 0; i < o->n_texts; i++, o->n_ids++) {
        rs_chat_message msgs[2] = {{"system", o->system}, {"user", o->texts[i]}};
        int rc = o->chat ? rs_chat_encode(tok, kind, o->system ? msgs : msgs + 1, o->system ? 2 : 1,
                                          1, &o->ids[i], &o->id_lens[i])
                         : rs_tokenizer_encode(tok, o->texts[i], strlen(o->texts[i]), 1,
                                               &o->ids[i], &o->id_lens[i]);
        if (rc != 0) return rs_fail_context("prompt %d", i + 1);
        if (o->id_lens[i] == 0) return RS_FAIL("prompt %d encodes to no tokens", i + 1);
    }
    return 0;
}

static int check_ids(const options *o, int vocab) {
    for (int i = 0; i < o->n_ids; i++)
        for (int t = 0; t < o->id_lens[i]; t++)
            if (o->ids[i][t] >= vocab)
                return RS_FAIL("--ids: prompt %d: id %d outside the vocabulary [0, %d)", i + 1,
                               o->ids[i][t], vocab);
    return 0;
}

/* ---------------------------------------------------------------- output */

/* A JSON string of len bytes that may hold NUL (cJSON strings end at the first NUL): valid UTF-8
 * in, quotes, backslashes and control bytes escaped. */
static cJSON *json_string_n(const char *s, size_t len) {
    char *out = rs_malloc(6 * len + 3), *o = out;
    *o++ = '"';
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') *o++ = '\\', *o++ = (char)c;
        else if (c < 0x20) o += sprintf(o, "\\u%04x", c);
        else *o++ = (char)c;
    }
    *o++ = '"';
    *o = 0;
    cJSON *item = cJSON_CreateRaw(out);
    free(out);
    return item;
}

static cJSON *ids_array(const int32_t *ids, int n) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
    return a;
}

static void print_result(const options *o, const rs_tokenizer *tok, int i, const rs_gen_output *r) {
    size_t text_len = 0; /* decoded text may hold NUL bytes (a <0x00> byte-fallback token) */
    char *text = tok ? rs_tokenizer_decode_n(tok, r->ids, r->n_ids, 1, &text_len) : NULL;
    if (strcmp(o->format, "jsonl") == 0) {
        cJSON *obj = cJSON_CreateObject();
        cJSON_AddNumberToObject(obj, "index", i);
        if (o->n_texts) cJSON_AddStringToObject(obj, "prompt", o->texts[i]);
        cJSON_AddItemToObject(obj, "prompt_ids", ids_array(o->ids[i], o->id_lens[i]));
        cJSON_AddItemToObject(obj, "ids", ids_array(r->ids, r->n_ids));
        if (text) cJSON_AddItemToObject(obj, "text", json_string_n(text, text_len));
        else cJSON_AddNullToObject(obj, "text");
        cJSON_AddStringToObject(obj, "stop", r->hit_eos ? "eos" : "length");
        char *line = cJSON_PrintUnformatted(obj);
        printf("%s\n", line);
        cJSON_free(line);
        cJSON_Delete(obj);
    } else {
        if (o->n_ids > 1) printf("### %d\n", i + 1);
        if (text) {
            fwrite(text, 1, text_len, stdout);
            putchar('\n');
        } else { /* no tokenizer in the model directory: the ids */
            for (int t = 0; t < r->n_ids; t++) printf("%s%d", t ? " " : "", r->ids[t]);
            printf("\n");
        }
    }
    free(text);
}

typedef struct {
    double start;
    int every, next; /* a line each time `every` more prompts are done (a batch's worth) */
} progress_state;

static void progress(void *user, int done, int total, long long tokens) {
    progress_state *s = user;
    if (done < s->next && done < total) return;
    s->next = (done / s->every + 1) * s->every;
    double dt = rs_now() - s->start;
    fprintf(stderr, "generate: %d/%d prompts, %lld tokens, %.1f tokens/s\n", done, total, tokens,
            dt > 0 ? tokens / dt : 0.0);
}

/* ---------------------------------------------------------------- main */

static void free_options(options *o) {
    for (int i = 0; i < o->n_texts; i++) free(o->texts[i]);
    for (int i = 0; i < o->n_ids; i++) free(o->ids[i]);
    free(o->texts), free(o->ids), free(o->id_lens);
    free(o->backend_owned), free(o->model_owned), free(o->system_owned);
}

/* Everything after parsing; returns 0 or -1 with the message recorded. */
static int run(options *o) {
    const rs_backend *be = rs_backend_by_name(o->backend);
    if (!be) return -1;
    rs_model m;
    RS_TRY(rs_model_load(o->model_dir, be, &m));
    rs_tokenizer *tok = NULL;
    char *tok_path = rs_path_join(o->model_dir, "tokenizer.json");
    int need_tok = o->n_texts > 0 || o->prompts_file, have_tok = rs_path_exists(tok_path);
    free(tok_path);
    int rc = 0;
    if (need_tok || have_tok) {
        tok = rs_tokenizer_load(o->model_dir);
        if (!tok && need_tok) rc = -1;
        if (!tok && !need_tok) rs_warn("%s (responses printed as ids)", rs_last_error());
    }
    if (rc == 0 && o->prompts_file) rc = read_prompts_file(o);
    if (rc == 0) rc = o->n_texts ? encode_texts(o, tok) : check_ids(o, m.cfg.vocab_size);
    rs_gen_params p;
    if (rc == 0) rc = rs_gen_params_init(&p, o->model_dir, &m.cfg);
    rs_gen_output *out = rs_calloc((size_t)(o->n_ids ? o->n_ids : 1), sizeof *out);
    if (rc == 0) {
        if (o->gen.max_new_tokens >= 0) p.max_new_tokens = o->gen.max_new_tokens;
        p.temperature = o->gen.temperature, p.top_k = o->gen.top_k, p.top_p = o->gen.top_p;
        p.seed = o->gen.seed, p.batch_size = o->gen.batch_size;
        progress_state ps = {rs_now(), p.batch_size, p.batch_size};
        if (o->n_ids > p.batch_size) p.progress = progress, p.progress_user = &ps;
        double t0 = rs_now();
        rc = rs_generate(&m, (const int32_t *const *)o->ids, o->id_lens, o->n_ids, &p, out);
        if (rc == 0) {
            long long n_new = 0;
            for (int i = 0; i < o->n_ids; i++) n_new += out[i].n_ids;
            rs_debug("generate: %d prompts, %lld new tokens in %.6f s", o->n_ids, n_new,
                     rs_now() - t0);
        }
        for (int i = 0; rc == 0 && i < o->n_ids; i++) print_result(o, tok, i, &out[i]);
        if (rc == 0) rs_gen_output_free(out, o->n_ids);
    }
    free(out);
    if (tok) rs_tokenizer_free(tok);
    rs_model_free(&m);
    return rc;
}

int cmd_generate(int argc, char **argv) {
    options o;
    int rc = parse_args(&o, argc, argv);
    if (rc != 0) {
        free_options(&o);
        return rc < 0 ? 0 : rc;
    }
    if (o.verbose) rs_set_log_level(RS_LOG_DEBUG);
    rc = run(&o);
    free_options(&o);
    if (rc != 0) {
        fprintf(stderr, "resafe: error: %s\n", rs_last_error());
        return 1;
    }
    return 0;
}
