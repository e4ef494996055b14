/* chat: the families' official chat templates, written out in C.
 *
 * Each render_* function follows its family's official Jinja template (quoted in
 * tests/py/test_chat.py, which checks us against transformers' apply_chat_template byte for
 * byte) statement by statement: the same role checks, the same whitespace trimming, the same
 * special-token strings. Jinja's `trim` filter and `str.strip()` strip Python's whitespace set
 * (str.isspace), which is wider than C's isspace, so we strip that set on UTF-8 code points.
 *
 * Choices where the official templates disagree or raise:
 *   gemma    Gemma 1/2 templates raise on a system message; we follow the Gemma 3 template,
 *            which prepends the system text + "\n\n" to the first user turn.
 *   mistral  the current Mistral-7B-Instruct v0.1/v0.2 (and Mixtral-8x7B v0.1) template:
 *            "<s> [INST] sys\n\nuser [/INST] answer</s> [INST] ..." (an optional leading system
 *            message goes into the first user turn).
 *   llama-3  the Meta-Llama-3-8B-Instruct template (not 3.1's date/tools preamble).
 *   chatml   the Qwen2-Instruct template, default system prompt "You are a helpful assistant."
 *   none     the contents concatenated, roles ignored. */
#include "resafe/chat.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name;
    rs_chat_kind kind;
} g_kind_names[] = {
    {"none", RS_CHAT_NONE},       {"llama-2", RS_CHAT_LLAMA2}, {"llama-3", RS_CHAT_LLAMA3},
    {"gemma", RS_CHAT_GEMMA},     {"mistral", RS_CHAT_MISTRAL}, {"chatml", RS_CHAT_CHATML},
    /* aliases people type */
    {"llama2", RS_CHAT_LLAMA2},   {"llama3", RS_CHAT_LLAMA3},  {"qwen2", RS_CHAT_CHATML},
};

int rs_chat_kind_from_name(const char *name, rs_chat_kind *out) {
    if (!name) return -1;
    for (size_t i = 0; i < sizeof g_kind_names / sizeof g_kind_names[0]; i++)
        if (strcmp(name, g_kind_names[i].name) == 0) {
            *out = g_kind_names[i].kind;
            return 0;
        }
    return -1;
}

const char *rs_chat_kind_name(rs_chat_kind kind) {
    for (size_t i = 0; i < sizeof g_kind_names / sizeof g_kind_names[0]; i++)
        if (g_kind_names[i].kind == kind) return g_kind_names[i].name;
    return "unknown";
}

/* ---------------------------------------------------------------- growing string */

typedef struct {
    char *data;
    size_t len, cap;
} strbuf;

static void sb_put(strbuf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        b->data = rs_realloc(b->data, cap);
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

static void sb_puts(strbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* ---------------------------------------------------------------- UTF-8 and Python whitespace */

/* Decode one well-formed UTF-8 sequence at s[0..n); returns its length, 0 if malformed. */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    if (n == 0) return 0;
    unsigned char c = s[0];
    size_t len;
    uint32_t v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if ((c & 0xe0) == 0xc0) {
        len = 2, v = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        len = 3, v = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
        len = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        v = (v << 6) | (s[i] & 0x3f);
    }
    if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) return 0;
    *cp = v;
    return len;
}

/* Offset of the first malformed byte, or -1 when s is valid UTF-8. */
static long utf8_invalid_at(const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s), i = 0;
    uint32_t cp;
    while (i < n) {
        size_t k = utf8_decode(p + i, n - i, &cp);
        if (k == 0) return (long)i;
        i += k;
    }
    return -1;
}

/* Python's str.isspace(): Unicode category Zs or bidirectional class WS, B or S. */
static int is_py_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 ||
           cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 ||
           cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

/* Append s[0..n) without leading and trailing Python whitespace, as str.strip() does. */
static void sb_put_stripped(strbuf *b, const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t start = 0, end = n;
    uint32_t cp;
    while (start < end) {
        size_t k = utf8_decode(p + start, end - start, &cp);
        if (k == 0 || !is_py_space(cp)) break;
        start += k;
    }
    while (end > start) {
        size_t back = 1; /* walk back to the lead byte of the last code point */
        while (back < 4 && end - back > start && (p[end - back] & 0xc0) == 0x80) back++;
        size_t k = utf8_decode(p + end - back, back, &cp);
        if (k != back || !is_py_space(cp)) break;
        end -= back;
    }
    sb_put(b, s + start, end - start);
}

/* ---------------------------------------------------------------- the families */

static int is_role(const rs_chat_message *m, const char *role) {
    return strcmp(m->role, role) == 0;
}

/* The alternation rule of the llama-2, mistral and gemma templates: after the optional leading
 * system message, even positions are user turns and odd positions are not. */
static int check_alternation(const char *family, const rs_chat_message *msgs, int first, int n) {
    for (int i = first; i < n; i++) {
        int even = (i - first) % 2 == 0;
        if (is_role(&msgs[i], "user") != even)
            return RS_FAIL("%s chat template: conversation roles must alternate "
                           "user/assistant/user/assistant/... after an optional leading system "
                           "message, but message %d is '%s'",
                           family, i, msgs[i].role);
    }
    return 0;
}

static int render_none(strbuf *b, const rs_chat_message *msgs, int n) {
    for (int i = 0; i < n; i++) sb_puts(b, msgs[i].content);
    return 0;
}

/* meta-llama/Llama-2-7b-chat-hf: the system block joins the first user turn, the whole turn is
 * strip()ped (so whitespace in the middle of the system block survives), roles other than
 * user/assistant at odd positions are silently dropped; no generation prompt. */
static int render_llama2(strbuf *b, const rs_chat_message *msgs, int n) {
    int first = is_role(&msgs[0], "system") ? 1 : 0;
    RS_TRY(check_alternation("llama-2", msgs, first, n));
    strbuf turn = {0};
    for (int i = first; i < n; i++) {
        turn.len = 0;
        if (i == first && first == 1) {
            sb_puts(&turn, "<<SYS>>\n");
            sb_puts(&turn, msgs[0].content);
            sb_puts(&turn, "\n<</SYS>>\n\n");
        }
        sb_puts(&turn, msgs[i].content);
        if (is_role(&msgs[i], "user")) {
            sb_puts(b, "<s>[INST] ");
            sb_put_stripped(b, turn.data, turn.len);
            sb_puts(b, " [/INST]");
        } else if (is_role(&msgs[i], "assistant")) {
            sb_puts(b, " ");
            sb_put_stripped(b, turn.data, turn.len);
            sb_puts(b, " </s>");
        }
    }
    free(turn.data);
    return 0;
}

/* meta-llama/Meta-Llama-3-8B-Instruct: any role, contents trimmed. */
static int render_llama3(strbuf *b, const rs_chat_message *msgs, int n, int add_generation_prompt) {
    for (int i = 0; i < n; i++) {
        if (i == 0) sb_puts(b, "<|begin_of_text|>");
        sb_puts(b, "<|start_header_id|>");
        sb_puts(b, msgs[i].role);
        sb_puts(b, "<|end_header_id|>\n\n");
        sb_put_stripped(b, msgs[i].content, strlen(msgs[i].content));
        sb_puts(b, "<|eot_id|>");
    }
    if (add_generation_prompt) sb_puts(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    return 0;
}

/* google/gemma-3 (text part): the system text, untrimmed, + "\n\n" prefixes the first user
 * turn; assistant is called "model"; other roles at odd positions keep their name. */
static int render_gemma(strbuf *b, const rs_chat_message *msgs, int n, int add_generation_prompt) {
    int first = is_role(&msgs[0], "system") ? 1 : 0;
    RS_TRY(check_alternation("gemma", msgs, first, n));
    sb_puts(b, "<bos>");
    for (int i = first; i < n; i++) {
        sb_puts(b, "<start_of_turn>");
        sb_puts(b, is_role(&msgs[i], "assistant") ? "model" : msgs[i].role);
        sb_puts(b, "\n");
        if (i == first && first == 1) {
            sb_puts(b, msgs[0].content);
            sb_puts(b, "\n\n");
        }
        sb_put_stripped(b, msgs[i].content, strlen(msgs[i].content));
        sb_puts(b, "<end_of_turn>\n");
    }
    if (add_generation_prompt) sb_puts(b, "<start_of_turn>model\n");
    return 0;
}

/* mistralai/Mistral-7B-Instruct-v0.2 (current template): no trimming, no generation prompt. */
static int render_mistral(strbuf *b, const rs_chat_message *msgs, int n) {
    int first = is_role(&msgs[0], "system") ? 1 : 0;
    RS_TRY(check_alternation("mistral", msgs, first, n));
    sb_puts(b, "<s>");
    for (int i = first; i < n; i++) {
        if (is_role(&msgs[i], "user")) {
            sb_puts(b, " [INST] ");
            if (i == first && first == 1) {
                sb_puts(b, msgs[0].content);
                sb_puts(b, "\n\n");
            }
            sb_puts(b, msgs[i].content);
            sb_puts(b, " [/INST]");
        } else if (is_role(&msgs[i], "assistant")) {
            sb_puts(b, " ");
            sb_puts(b, msgs[i].content);
            sb_puts(b, "</s>");
        } else {
            return RS_FAIL("mistral chat template: only user and assistant roles are supported, "
                           "with the exception of an initial optional system message, but message "
                           "%d is '%s'",
                           i, msgs[i].role);
        }
    }
    return 0;
}

/* Qwen/Qwen2-7B-Instruct: any role, nothing trimmed, a default system turn when none leads. */
static int render_chatml(strbuf *b, const rs_chat_message *msgs, int n, int add_generation_prompt) {
    for (int i = 0; i < n; i++) {
        if (i == 0 && !is_role(&msgs[0], "system"))
            sb_puts(b, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n");
        sb_puts(b, "<|im_start|>");
        sb_puts(b, msgs[i].role);
        sb_puts(b, "\n");
        sb_puts(b, msgs[i].content);
        sb_puts(b, "<|im_end|>\n");
    }
    if (add_generation_prompt) sb_puts(b, "<|im_start|>assistant\n");
    return 0;
}

static int check_messages(const rs_chat_message *msgs, int n_msgs) {
    /* transformers refuses an empty conversation before any template runs */
    if (!msgs || n_msgs <= 0) return RS_FAIL("chat template: the conversation has no messages");
    for (int i = 0; i < n_msgs; i++) {
        if (!msgs[i].role || !msgs[i].content)
            return RS_FAIL("chat template: message %d has no %s", i,
                           msgs[i].role ? "content" : "role");
        long bad = utf8_invalid_at(msgs[i].role);
        if (bad >= 0)
            return RS_FAIL("chat template: message %d: role is not valid UTF-8 (byte %ld)", i, bad);
        bad = utf8_invalid_at(msgs[i].content);
        if (bad >= 0)
            return RS_FAIL("chat template: message %d ('%s'): content is not valid UTF-8 "
                           "(byte %ld)",
                           i, msgs[i].role, bad);
    }
    return 0;
}

char *rs_chat_render(rs_chat_kind kind, const rs_chat_message *msgs, int n_msgs,
                     int add_generation_prompt) {
    if (check_messages(msgs, n_msgs) != 0) return NULL;
    strbuf b = {0};
    sb_puts(&b, ""); /* an empty rendering is "", not NULL */
    int rc;
    switch (kind) {
    case RS_CHAT_NONE: rc = render_none(&b, msgs, n_msgs); break;
    case RS_CHAT_LLAMA2: rc = render_llama2(&b, msgs, n_msgs); break;
    case RS_CHAT_LLAMA3: rc = render_llama3(&b, msgs, n_msgs, add_generation_prompt); break;
    case RS_CHAT_GEMMA: rc = render_gemma(&b, msgs, n_msgs, add_generation_prompt); break;
    case RS_CHAT_MISTRAL: rc = render_mistral(&b, msgs, n_msgs); break;
    case RS_CHAT_CHATML: rc = render_chatml(&b, msgs, n_msgs, add_generation_prompt); break;
    default: rc = RS_FAIL("chat template: unknown kind %d", (int)kind); break;
    }
    if (rc != 0) {
        free(b.data);
        return NULL;
    }
    return b.data;
}

int rs_chat_encode(const rs_tokenizer *tok, rs_chat_kind kind, const rs_chat_message *msgs,
                   int n_msgs, int add_generation_prompt, int32_t **ids, int *n_ids) {
    *ids = NULL;
    *n_ids = 0;
    if (!tok) return RS_FAIL("chat encode: no tokenizer");
    char *text = rs_chat_render(kind, msgs, n_msgs, add_generation_prompt);
    if (!text) return -1;
    /* The templates write BOS themselves, and transformers tokenizes the rendering with
     * add_special_tokens=False; raw text ("none") gets the tokenizer's usual specials. */
    int rc = rs_tokenizer_encode(tok, text, strlen(text), kind == RS_CHAT_NONE, ids, n_ids);
    free(text);
    return rc;
}

/* ---------------------------------------------------------------- detection */

/* Distinctive markers, most specific first: llama-3 and chatml templates never contain the
 * later markers' text, while "[INST]" also appears in llama-2 templates. */
static const struct {
    const char *marker;
    rs_chat_kind kind;
} g_markers[] = {
    {"<|start_header_id|>", RS_CHAT_LLAMA3}, {"<|im_start|>", RS_CHAT_CHATML},
    {"<start_of_turn>", RS_CHAT_GEMMA},      {"<<SYS>>", RS_CHAT_LLAMA2},
    {"[INST]", RS_CHAT_MISTRAL},
};

/* Later versions of a family that render differently from the template we write. */
static const struct {
    const char *marker;
    rs_chat_kind kind;
    const char *what;
} g_variants[] = {
    {"Cutting Knowledge Date", RS_CHAT_LLAMA3, "a Llama-3.1+ template (date/tools preamble)"},
    {"You are Qwen, created by Alibaba Cloud", RS_CHAT_CHATML, "a Qwen2.5+ template"},
    {"<think>", RS_CHAT_CHATML, "a reasoning (<think>) template"},
    {"[AVAILABLE_TOOLS]", RS_CHAT_MISTRAL, "a Mistral v0.3+ template"},
    {"[SYSTEM_PROMPT]", RS_CHAT_MISTRAL, "a Mistral v0.3+ template"},
};

/* The template out of a tokenizer_config.json / chat_template.json text: "chat_template" is a
 * string or a list of {"name", "template"} (the one named "default", else the first).
 * 0 with *tmpl malloc'ed or NULL when the file has none; -1 with a message on bad JSON. */
static int template_from_config(const char *label, const char *json, size_t len, char **tmpl) {
    *tmpl = NULL;
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) return RS_FAIL("%s: not valid JSON", label);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "chat_template");
    if (cJSON_IsString(t)) {
        *tmpl = rs_strdup(t->valuestring);
    } else if (cJSON_IsArray(t)) {
        const cJSON *pick = NULL, *item;
        cJSON_ArrayForEach(item, t) {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(item, "name");
            const cJSON *body = cJSON_GetObjectItemCaseSensitive(item, "template");
            if (!cJSON_IsString(body)) continue;
            if (!pick) pick = body;
            if (cJSON_IsString(name) && strcmp(name->valuestring, "default") == 0) {
                pick = body;
                break;
            }
        }
        if (pick) *tmpl = rs_strdup(pick->valuestring);
    }
    cJSON_Delete(root);
    return 0;
}

/* transformers reads chat_template.jinja in preference to tokenizer_config.json, and older
 * processors keep the template in chat_template.json; so do we. 0 with *tmpl and *source
 * malloc'ed (*tmpl NULL when no file has one), -1 with a message on an unreadable file. */
static int find_template(const char *model_dir, char **tmpl, char **source) {
    static const char *files[] = {"chat_template.jinja", "tokenizer_config.json",
                                  "chat_template.json"};
    *tmpl = *source = NULL;
    for (int i = 0; i < 3 && !*tmpl; i++) {
        char *path = rs_path_join(model_dir, files[i]);
        char *data = NULL;
        size_t size = 0;
        int rc = 0;
        if (rs_path_exists(path)) {
            rc = rs_read_file(path, &data, &size);
            if (rc == 0 && i == 0) *tmpl = rs_strdup(data);
            else if (rc == 0) rc = template_from_config(path, data, size, tmpl);
            free(data);
        }
        if (rc != 0 || !*tmpl) {
            free(path);
            if (rc != 0) return -1;
        } else {
            *source = path;
        }
    }
    return 0;
}

int rs_chat_detect(const char *model_dir, rs_chat_kind *out) {
    if (!rs_path_is_dir(model_dir))
        return RS_FAIL("%s: not a model directory (cannot detect its chat template)", model_dir);
    char *source = NULL, *tmpl = NULL;
    RS_TRY(find_template(model_dir, &tmpl, &source));
    if (!tmpl)
        return RS_FAIL("%s: no chat template found (looked for chat_template.jinja and "
                       "\"chat_template\" in tokenizer_config.json and chat_template.json); name "
                       "the family in the INI: [model] chat_template = llama-2 | llama-3 | gemma | "
                       "mistral | chatml | none",
                       model_dir);
    int found = -1;
    for (size_t i = 0; i < sizeof g_markers / sizeof g_markers[0] && found < 0; i++)
        if (strstr(tmpl, g_markers[i].marker)) {
            *out = g_markers[i].kind;
            found = 0;
        }
    if (found == 0) {
        for (size_t i = 0; i < sizeof g_variants / sizeof g_variants[0]; i++)
            if (g_variants[i].kind == *out && strstr(tmpl, g_variants[i].marker))
                rs_warn("%s: chat template looks like %s, which renders differently from "
                        "resafe's %s template (the family's original format)",
                        source, g_variants[i].what, rs_chat_kind_name(*out));
        rs_debug("%s: chat template family %s", source, rs_chat_kind_name(*out));
    } else {
        RS_FAIL("%s: the chat template matches no known family (llama-2, llama-3, gemma, mistral, "
                "chatml); name one in the INI: [model] chat_template = <family> or none",
                source);
    }
    free(source);
    free(tmpl);
    return found;
}
