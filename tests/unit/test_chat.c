/* chat: each family's rendering of one conversation against the string its model card documents,
 * Python-whitespace trimming on random text, the role rules on random role sequences, detection
 * from the files transformers writes. (tests/py/test_chat.py checks against transformers.) */
#include "resafe/chat.h"
#include "test.h"

#include <string.h>

static const rs_chat_message g_conv[] = {
    {"system", "SYS"},
    {"user", " Hi "},
    {"assistant", " Hello! "},
    {"user", "Bye\n"},
};
#define N_CONV ((int)(sizeof g_conv / sizeof g_conv[0]))

static void check_render(rs_chat_kind kind, int gen, const char *want) {
    char *got = rs_chat_render(kind, g_conv, N_CONV, gen);
    CHECK(got && strcmp(got, want) == 0, "%s gen=%d:\n got  [%s]\n want [%s]\n error: %s",
          rs_chat_kind_name(kind), gen, got ? got : "(null)", want, rs_last_error());
    free(got);
}

TEST(test_chat_each_family_renders_its_documented_format) {
    check_render(RS_CHAT_LLAMA2, 1,
                 "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\n Hi [/INST] Hello! </s>"
                 "<s>[INST] Bye [/INST]");
    check_render(RS_CHAT_LLAMA3, 1,
                 "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n");
    check_render(RS_CHAT_LLAMA3, 0,
                 "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>");
    check_render(RS_CHAT_GEMMA, 1,
                 "<bos><start_of_turn>user\nSYS\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
                 "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n");
    check_render(RS_CHAT_MISTRAL, 1,
                 "<s> [INST] SYS\n\n Hi  [/INST]  Hello! </s> [INST] Bye\n [/INST]");
    check_render(RS_CHAT_CHATML, 1,
                 "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n"
                 "<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\nBye\n<|im_end|>\n"
                 "<|im_start|>assistant\n");
    check_render(RS_CHAT_NONE, 1, "SYS Hi  Hello! Bye\n");
    /* Qwen's default system prompt when the conversation has none */
    char *got = rs_chat_render(RS_CHAT_CHATML, g_conv + 1, 1, 0);
    CHECK(got && strcmp(got, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                             "<|im_start|>user\n Hi <|im_end|>\n") == 0,
          "%s", got ? got : rs_last_error());
    free(got);
}

TEST(test_chat_kind_names_round_trip) {
    for (int k = RS_CHAT_NONE; k <= RS_CHAT_CHATML; k++) {
        rs_chat_kind back;
        REQUIRE(rs_chat_kind_from_name(rs_chat_kind_name((rs_chat_kind)k), &back) == 0, "%d", k);
        CHECK(back == (rs_chat_kind)k, "%d -> %s -> %d", k, rs_chat_kind_name((rs_chat_kind)k),
              (int)back);
    }
    rs_chat_kind k;
    CHECK(rs_chat_kind_from_name("llama3", &k) == 0 && k == RS_CHAT_LLAMA3, "alias llama3");
    CHECK(rs_chat_kind_from_name("vicuna", &k) == -1, "unknown name accepted");
    CHECK(rs_chat_kind_from_name(NULL, &k) == -1, "NULL name accepted");
}

/* Python's str.isspace() code points, listed one by one (chat.c uses ranges). */
static const uint32_t g_py_spaces[] = {0x09,   0x0a,   0x0b,   0x0c,   0x0d,   0x1c,   0x1d,
                                       0x1e,   0x1f,   0x20,   0x85,   0xa0,   0x1680, 0x2000,
                                       0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007,
                                       0x2008, 0x2009, 0x200a, 0x2028, 0x2029, 0x202f, 0x205f,
                                       0x3000};
/* Characters that are not str.isspace() although they look or behave like spaces. */
static const uint32_t g_not_spaces[] = {'x',    0x200b, 0x2060, 0xfeff, 0x180e,
                                        0xe9,   0x65e5, 0x1f600, 0x7f,  0x01};

static size_t put_utf8(char *out, uint32_t cp) {
    if (cp < 0x80) return out[0] = (char)cp, 1;
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | cp >> 6), out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | cp >> 12), out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | cp >> 18), out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f)), out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

TEST(test_chat_trim_removes_exactly_pythons_whitespace_on_random_text) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    for (int iter = 0; iter < 2000; iter++) {
        char content[512], core[256];
        size_t n = 0, n_core = 0;
        int lead = (int)(rs_rng_next(&r) % 4), trail = (int)(rs_rng_next(&r) % 4);
        int mid = 1 + (int)(rs_rng_next(&r) % 8);
        for (int i = 0; i < lead; i++)
            n += put_utf8(content + n, g_py_spaces[rs_rng_next(&r) % N_OF(g_py_spaces)]);
        for (int i = 0; i < mid; i++) { /* the core starts and ends with a non-space */
            int edge = i == 0 || i == mid - 1, space = !edge && rs_rng_next(&r) % 2;
            uint32_t cp = space ? g_py_spaces[rs_rng_next(&r) % N_OF(g_py_spaces)]
                                : g_not_spaces[rs_rng_next(&r) % N_OF(g_not_spaces)];
            size_t k = put_utf8(core + n_core, cp);
            n_core += k;
        }
        memcpy(content + n, core, n_core);
        n += n_core;
        for (int i = 0; i < trail; i++)
            n += put_utf8(content + n, g_py_spaces[rs_rng_next(&r) % N_OF(g_py_spaces)]);
        content[n] = core[n_core] = 0;

        rs_chat_message m = {"user", content};
        char *got = rs_chat_render(RS_CHAT_LLAMA3, &m, 1, 0);
        char want[600];
        snprintf(want, sizeof want,
                 "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n%s<|eot_id|>", core);
        REQUIRE(got, "%s", rs_last_error());
        CHECK(strcmp(got, want) == 0, "iteration %d: content [%s] rendered [%s]", iter, content,
              got);
        free(got);
    }
}

/* The templates' role rule, written independently: after an optional leading system message,
 * even positions are "user" and odd positions are not; mistral also wants them "assistant". */
static int roles_allowed(rs_chat_kind kind, const rs_chat_message *m, int n) {
    if (kind == RS_CHAT_LLAMA3 || kind == RS_CHAT_CHATML || kind == RS_CHAT_NONE) return 1;
    int first = strcmp(m[0].role, "system") == 0;
    for (int i = first; i < n; i++) {
        int want_user = (i - first) % 2 == 0, is_user = strcmp(m[i].role, "user") == 0;
        if (want_user != is_user) return 0;
        if (kind == RS_CHAT_MISTRAL && !is_user && strcmp(m[i].role, "assistant") != 0) return 0;
    }
    return 1;
}

TEST(test_chat_role_rules_hold_on_random_role_sequences) {
    static const char *roles[] = {"system", "user", "assistant", "tool"};
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed() + 1);
    int n_ok = 0, n_refused = 0;
    for (int iter = 0; iter < 3000; iter++) {
        rs_chat_message m[8];
        int n = 1 + (int)(rs_rng_next(&r) % 8);
        for (int i = 0; i < n; i++) {
            /* mostly alternating, so both outcomes are common */
            int alt = rs_rng_next(&r) % 5 != 0;
            m[i].role = alt ? (i % 2 == 0 ? "user" : "assistant") : roles[rs_rng_next(&r) % 4];
            m[i].content = "c";
        }
        rs_chat_kind kind = (rs_chat_kind)(rs_rng_next(&r) % (RS_CHAT_CHATML + 1));
        rs_clear_error();
        char *got = rs_chat_render(kind, m, n, (int)(rs_rng_next(&r) % 2));
        int allowed = roles_allowed(kind, m, n);
        CHECK((got != NULL) == allowed, "%s: %d messages, first roles %s %s: rendered=%d",
              rs_chat_kind_name(kind), n, m[0].role, n > 1 ? m[1].role : "-", got != NULL);
        if (!got) CHECK(strstr(rs_last_error(), rs_chat_kind_name(kind)) != NULL, "message [%s]",
                        rs_last_error());
        n_ok += got != NULL;
        n_refused += got == NULL;
        free(got);
    }
    CHECK(n_ok > 500 && n_refused > 300, "ok %d refused %d: the test lost its power", n_ok,
          n_refused);
}

TEST(test_chat_render_refuses_bad_input_with_a_message) {
    rs_chat_message m[2] = {{"user", "hi"}, {"assistant", NULL}};
    for (int k = RS_CHAT_NONE; k <= RS_CHAT_CHATML; k++) {
        rs_clear_error();
        CHECK(rs_chat_render((rs_chat_kind)k, m, 0, 1) == NULL &&
                  strstr(rs_last_error(), "no messages"),
              "empty conversation: %s", rs_last_error());
        rs_clear_error();
        CHECK(rs_chat_render((rs_chat_kind)k, m, 2, 1) == NULL &&
                  strstr(rs_last_error(), "content"),
              "NULL content: %s", rs_last_error());
    }
    rs_chat_message bad[1] = {{"user", "ok \xc3\x28 ok"}};
    CHECK(rs_chat_render(RS_CHAT_CHATML, bad, 1, 0) == NULL && strstr(rs_last_error(), "UTF-8"),
          "invalid UTF-8: %s", rs_last_error());
    bad[0].content = "\xed\xa0\x80"; /* a UTF-16 surrogate encoded as UTF-8 */
    CHECK(rs_chat_render(RS_CHAT_CHATML, bad, 1, 0) == NULL, "surrogate accepted");
    CHECK(rs_chat_render((rs_chat_kind)99, m, 1, 0) == NULL, "unknown kind rendered");
    rs_chat_message sys_only[1] = {{"system", "s"}};
    char *got = rs_chat_render(RS_CHAT_GEMMA, sys_only, 1, 1);
    CHECK(got && strcmp(got, "<bos><start_of_turn>model\n") == 0, "gemma system only: %s",
          got ? got : rs_last_error());
    free(got);
    got = rs_chat_render(RS_CHAT_LLAMA2, sys_only, 1, 1);
    CHECK(got && got[0] == 0, "llama-2 system only renders nothing");
    free(got);
}

static void write_text(const char *dir, const char *name, const char *text) {
    char *path = rs_path_join(dir, name);
    REQUIRE(rs_write_file_atomic(path, text, strlen(text)) == 0, "%s", rs_last_error());
    free(path);
}

static char *fresh_dir(const char *name) {
    char *dir = rs_path_join(rs_test_tmpdir(), name);
    RS_CHECK(rs_mkdir_p(dir) == 0, "%s", rs_last_error());
    return dir;
}

TEST(test_chat_detect_reads_string_list_and_jinja_file) {
    rs_chat_kind kind = RS_CHAT_NONE;
    char *d = fresh_dir("string");
    write_text(d, "tokenizer_config.json",
               "{\"bos_token\": \"<s>\", \"chat_template\": \"{% for m in messages %}"
               "{{ '<|im_start|>' + m['role'] + '\\n' }}{% endfor %}\"}");
    CHECK(rs_chat_detect(d, &kind) == 0 && kind == RS_CHAT_CHATML, "string: %s", rs_last_error());
    free(d);

    d = fresh_dir("list");
    write_text(d, "tokenizer_config.json",
               "{\"chat_template\": [{\"name\": \"rag\", \"template\": \"<|im_start|>\"},"
               " {\"name\": \"default\", \"template\": \"{{ '<start_of_turn>' }}\"}]}");
    CHECK(rs_chat_detect(d, &kind) == 0 && kind == RS_CHAT_GEMMA, "list: %s", rs_last_error());
    free(d);

    d = fresh_dir("jinja"); /* chat_template.jinja wins over tokenizer_config.json */
    write_text(d, "tokenizer_config.json", "{\"chat_template\": \"[INST]\"}");
    write_text(d, "chat_template.jinja", "{{ bos_token + '[INST] <<SYS>>' }}");
    CHECK(rs_chat_detect(d, &kind) == 0 && kind == RS_CHAT_LLAMA2, "jinja: %s", rs_last_error());
    free(d);

    d = fresh_dir("llama3");
    write_text(d, "chat_template.jinja", "{{ '<|start_header_id|>' }}{{ '<|im_start|>' }}");
    CHECK(rs_chat_detect(d, &kind) == 0 && kind == RS_CHAT_LLAMA3, "llama3: %s", rs_last_error());
    free(d);
}

TEST(test_chat_detect_fails_with_a_message_naming_the_ini_setting) {
    rs_chat_kind kind;
    char *d = fresh_dir("base");
    write_text(d, "tokenizer_config.json", "{\"bos_token\": \"<s>\"}");
    CHECK(rs_chat_detect(d, &kind) == -1 && strstr(rs_last_error(), "[model] chat_template"),
          "no template: %s", rs_last_error());
    free(d);
    d = fresh_dir("unknown");
    write_text(d, "tokenizer_config.json", "{\"chat_template\": \"### {{ messages }}\"}");
    CHECK(rs_chat_detect(d, &kind) == -1 && strstr(rs_last_error(), "no known family") &&
              strstr(rs_last_error(), "[model] chat_template"),
          "unknown template: %s", rs_last_error());
    free(d);
    d = fresh_dir("broken");
    write_text(d, "tokenizer_config.json", "{\"chat_template\": ");
    CHECK(rs_chat_detect(d, &kind) == -1 && strstr(rs_last_error(), "JSON"), "broken: %s",
          rs_last_error());
    free(d);
    char *missing = rs_path_join(rs_test_tmpdir(), "no_such_model");
    CHECK(rs_chat_detect(missing, &kind) == -1 && strstr(rs_last_error(), "no_such_model"),
          "missing dir: %s", rs_last_error());
    free(missing);
}

TEST(test_chat_encode_without_tokenizer_fails_cleanly) {
    int32_t *ids = (int32_t *)1;
    int n = 7;
    CHECK(rs_chat_encode(NULL, RS_CHAT_LLAMA3, g_conv, N_CONV, 1, &ids, &n) == -1 && !ids && n == 0,
          "encode with no tokenizer");
}
