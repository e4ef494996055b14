/* config: random valid INI files read back exactly (and again after printing); every kind of bad
 * value, unknown name and duplicate is rejected with one message naming file, line, section and
 * key; --set overrides follow the same rules. */
#include "resafe/config.h"
#include "resafe/core.h"
#include "test.h"

#include <string.h>

static int rand_int(rs_rng *r, int lo, int hi) { return lo + (int)(rs_rng_next(r) % (uint64_t)(hi - lo + 1)); }

typedef struct {
    int set;
    char text[168]; /* as written in the file (s plus quotes) */
    int64_t i;
    double f;
    char s[160]; /* expected string / enum value */
} expect;

static int enum_count(const char *allowed) {
    int n = 1;
    for (const char *p = allowed; *p; p++) n += *p == '|';
    return n;
}

static void enum_value(const char *allowed, int idx, char *out, size_t n) {
    const char *p = allowed;
    for (int k = 0; k < idx; k++) p = strchr(p, '|') + 1;
    const char *bar = strchr(p, '|');
    snprintf(out, n, "%.*s", bar ? (int)(bar - p) : (int)strlen(p), p);
}

/* A random valid value for k, spelled as a file would, with the value it must read as. */
static void random_value(rs_rng *r, const rs_config_key *k, expect *e) {
    static const char *yes[] = {"true", "yes", "on", "1", "TRUE", "Yes"};
    static const char *no[] = {"false", "no", "off", "0", "False", "OFF"};
    static const char *utf8[] = {"caf\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x99\x82", "x"};
    switch (k->type) {
    case RS_CFG_INT: {
        double span = k->max - k->min;
        e->i = (int64_t)k->min + (int64_t)(rs_rng_uniform(r) * (span > 1e6 ? 1e6 : span + 1));
        if (e->i > (int64_t)k->max) e->i = (int64_t)k->max;
        if (rs_rng_uniform(r) < 0.2f) e->i = (int64_t)(rs_rng_uniform(r) < 0.5f ? k->min : k->max);
        snprintf(e->text, sizeof e->text, "%lld", (long long)e->i);
        break;
    }
    case RS_CFG_FLOAT:
        e->f = k->min + (k->max - k->min) * (0.001 + 0.998 * rs_rng_uniform(r));
        if (rs_rng_uniform(r) < 0.2f) e->f = k->max;
        snprintf(e->text, sizeof e->text, "%.17g", e->f);
        e->f = strtod(e->text, NULL);
        break;
    case RS_CFG_BOOL:
        e->i = rand_int(r, 0, 1);
        snprintf(e->text, sizeof e->text, "%s", (e->i ? yes : no)[rand_int(r, 0, 5)]);
        break;
    case RS_CFG_ENUM:
        enum_value(k->allowed, rand_int(r, 0, enum_count(k->allowed) - 1), e->s, sizeof e->s);
        snprintf(e->text, sizeof e->text, "%s", e->s);
        break;
    case RS_CFG_STRING:
    case RS_CFG_PATH: {
        /* words of letters, '/', '.', '-' and some UTF-8; sometimes quoted to keep edge spaces */
        int n = rand_int(r, 0, 6), j = 0;
        for (int w = 0; w < n; w++) {
            if (w) e->s[j++] = rs_rng_uniform(r) < 0.8f ? ' ' : '/';
            int len = rand_int(r, 1, 8);
            for (int c = 0; c < len; c++) e->s[j++] = "abcXYZ.-_019"[rand_int(r, 0, 11)];
            if (k->type == RS_CFG_STRING && rs_rng_uniform(r) < 0.3f)
                j += snprintf(e->s + j, sizeof e->s - (size_t)j, "%s", utf8[rand_int(r, 0, 3)]);
        }
        e->s[j] = 0;
        if (n == 0 || rs_rng_uniform(r) < 0.2f) {
            if (rs_rng_uniform(r) < 0.5f && j + 2 < 100) { /* edge spaces kept by the quotes */
                memmove(e->s + 1, e->s, (size_t)j + 1);
                e->s[0] = ' ';
                strcat(e->s, " ");
            }
            snprintf(e->text, sizeof e->text, "\"%s\"", e->s);
        } else {
            snprintf(e->text, sizeof e->text, "%s", e->s);
        }
        break;
    }
    }
    e->set = 1;
}

static void check_values(const rs_config *cfg, const rs_config_key *schema, int n, const expect *e,
                         const char *what) {
    for (int i = 0; i < n; i++) {
        const rs_config_key *k = &schema[i];
        CHECK(rs_config_is_set(cfg, k->section, k->key) == e[i].set, "%s: [%s] %s is_set", what,
              k->section, k->key);
        switch (k->type) {
        case RS_CFG_INT:
            CHECK(rs_config_get_int(cfg, k->section, k->key) == e[i].i, "%s: [%s] %s = %lld want %lld",
                  what, k->section, k->key, (long long)rs_config_get_int(cfg, k->section, k->key),
                  (long long)e[i].i);
            break;
        case RS_CFG_FLOAT:
            CHECK(rs_config_get_float(cfg, k->section, k->key) == e[i].f, "%s: [%s] %s = %.17g want %.17g",
                  what, k->section, k->key, rs_config_get_float(cfg, k->section, k->key), e[i].f);
            break;
        case RS_CFG_BOOL:
            CHECK(rs_config_get_bool(cfg, k->section, k->key) == e[i].i, "%s: [%s] %s", what,
                  k->section, k->key);
            break;
        default:
            CHECK(strcmp(rs_config_get_str(cfg, k->section, k->key), e[i].s) == 0,
                  "%s: [%s] %s = '%s' want '%s'", what, k->section, k->key,
                  rs_config_get_str(cfg, k->section, k->key), e[i].s);
        }
    }
}

/* The defaults, parsed independently of the library's converter. */
static void default_values(const rs_config_key *schema, int n, expect *e) {
    for (int i = 0; i < n; i++) {
        memset(&e[i], 0, sizeof e[i]);
        const char *d = schema[i].def;
        if (schema[i].type == RS_CFG_INT) e[i].i = strtoll(d, NULL, 10);
        if (schema[i].type == RS_CFG_FLOAT) e[i].f = strtod(d, NULL);
        if (schema[i].type == RS_CFG_BOOL) e[i].i = strcmp(d, "true") == 0;
        snprintf(e[i].s, sizeof e[i].s, "%s", d);
    }
}

TEST(test_config_defaults_are_valid_and_read_back) {
    int n;
    const rs_config_key *schema = rs_config_schema(&n);
    REQUIRE(n > 30, "schema has %d keys", n);
    expect *e = rs_calloc((size_t)n, sizeof *e);
    default_values(schema, n, e);
    rs_config *cfg = rs_config_new();
    check_values(cfg, schema, n, e, "defaults");
    rs_config_free(cfg);
    cfg = rs_config_parse("empty.ini", "; nothing\n\n");
    REQUIRE(cfg, "%s", rs_last_error());
    check_values(cfg, schema, n, e, "empty file");
    rs_config_free(cfg);
    /* the paper's settings (DESIGN.md section 4) */
    cfg = rs_config_new();
    CHECK(rs_config_get_int(cfg, "lora", "rank") == 128 && rs_config_get_float(cfg, "lora", "alpha") == 256,
          "lora");
    CHECK(rs_config_get_float(cfg, "dpo", "beta") == 0.01 && rs_config_get_float(cfg, "dpo", "lr") == 5e-6 &&
              rs_config_get_int(cfg, "dpo", "epochs") == 1,
          "dpo");
    CHECK(rs_config_get_float(cfg, "snip", "tau") == 0.6 && rs_config_get_int(cfg, "snip", "reidentify_every") == 1000,
          "snip");
    rs_config_free(cfg);
    free(e);
}

TEST(test_config_schema_names_are_unique_and_documented) {
    int n;
    const rs_config_key *schema = rs_config_schema(&n);
    for (int i = 0; i < n; i++) {
        CHECK(schema[i].doc && schema[i].doc[0] && schema[i].used_by, "[%s] %s undocumented",
              schema[i].section, schema[i].key);
        for (int j = 0; j < i; j++)
            CHECK(strcmp(schema[i].section, schema[j].section) != 0 || strcmp(schema[i].key, schema[j].key) != 0,
                  "[%s] %s declared twice", schema[i].section, schema[i].key);
    }
}

/* A random file setting a random subset of keys (sections in random order, random spacing and
 * comments). */
static char *random_file(rs_rng *r, const rs_config_key *schema, int n, expect *e) {
    size_t cap = 1 << 16, used = 0;
    char *text = rs_malloc(cap);
    const char *sections[32];
    int n_sections = 0;
    for (int i = 0; i < n; i++) {
        int seen = 0;
        for (int s = 0; s < n_sections; s++) seen |= strcmp(sections[s], schema[i].section) == 0;
        if (!seen) sections[n_sections++] = schema[i].section;
    }
    for (int s = n_sections - 1; s > 0; s--) { /* shuffle */
        int j = rand_int(r, 0, s);
        const char *t = sections[s];
        sections[s] = sections[j];
        sections[j] = t;
    }
    for (int s = 0; s < n_sections; s++) {
        if (rs_rng_uniform(r) < 0.2f) continue; /* section absent */
        used += (size_t)snprintf(text + used, cap - used, "%s[%s]%s\n", rs_rng_uniform(r) < 0.5f ? "\n" : "",
                                 sections[s], rs_rng_uniform(r) < 0.3f ? "  ; comment" : "");
        for (int i = 0; i < n; i++) {
            if (strcmp(schema[i].section, sections[s]) != 0 || rs_rng_uniform(r) < 0.3f) continue;
            random_value(r, &schema[i], &e[i]);
            const char *sp = rs_rng_uniform(r) < 0.5f ? " " : "";
            used += (size_t)snprintf(text + used, cap - used, "%s%s=%s%s%s\n", schema[i].key, sp, sp,
                                     e[i].text, rs_rng_uniform(r) < 0.2f ? "   ; why" : "");
            if (rs_rng_uniform(r) < 0.1f) used += (size_t)snprintf(text + used, cap - used, "# note\n");
        }
    }
    return text;
}

TEST(test_config_random_files_read_back_and_survive_printing) {
    int n;
    const rs_config_key *schema = rs_config_schema(&n);
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    expect *e = rs_calloc((size_t)n, sizeof *e);
    for (int trial = 0; trial < 200; trial++) {
        default_values(schema, n, e);
        char *text = random_file(&r, schema, n, e);
        rs_config *cfg = rs_config_parse("random.ini", text);
        REQUIRE(cfg, "%s\n%s", rs_last_error(), text);
        check_values(cfg, schema, n, e, "parsed");
        /* the printed effective values parse back to the same values */
        char *printed = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&printed, &len);
        rs_config_print(cfg, f);
        fclose(f);
        rs_config *again = rs_config_parse("printed.ini", printed);
        REQUIRE(again, "%s\n%s", rs_last_error(), printed);
        for (int i = 0; i < n; i++) e[i].set = 1; /* printing writes every key */
        check_values(again, schema, n, e, "printed");
        rs_config_free(again);
        rs_config_free(cfg);
        free(printed);
        free(text);
    }
    free(e);
}

/* Parse text expected to fail; the message must contain every needle. */
static void expect_error(const char *text, const char *n1, const char *n2, const char *n3) {
    rs_config *cfg = rs_config_parse("bad.ini", text);
    CHECK(cfg == NULL, "accepted:\n%s", text);
    rs_config_free(cfg);
    const char *msg = rs_last_error();
    const char *needles[] = {n1, n2, n3};
    for (int i = 0; i < 3; i++)
        if (needles[i]) CHECK(strstr(msg, needles[i]) != NULL, "'%s' missing from: %s", needles[i], msg);
    CHECK(strchr(msg, '\n') == NULL, "message spans lines: %s", msg);
}

TEST(test_config_bad_values_name_file_line_section_and_key) {
    int n;
    const rs_config_key *schema = rs_config_schema(&n);
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed() + 1);
    char text[4096], where[128], sect[80];
    for (int trial = 0; trial < 300; trial++) {
        const rs_config_key *k = &schema[rand_int(&r, 0, n - 1)];
        const char *bad = NULL, *why = NULL;
        char num[64];
        switch (k->type) {
        case RS_CFG_INT:
            snprintf(num, sizeof num, "%.0f", rs_rng_uniform(&r) < 0.5f ? k->max + 1 : k->min - 1);
            bad = rs_rng_uniform(&r) < 0.5f ? num : "1.5";
            why = bad == num ? "out of range" : "not an integer";
            break;
        case RS_CFG_FLOAT:
            snprintf(num, sizeof num, "%.17g", rs_rng_uniform(&r) < 0.5f ? k->max * 1.5 + 1 : k->min - 1);
            bad = k->min_open && rs_rng_uniform(&r) < 0.3f ? "0" : rs_rng_uniform(&r) < 0.5f ? num : "1x";
            why = strcmp(bad, "1x") == 0 ? "not a finite number" : "out of range";
            if (strcmp(bad, "0") == 0) CHECK(k->min == 0, "open minimum is not 0");
            break;
        case RS_CFG_BOOL: bad = "maybe", why = "true/false"; break;
        case RS_CFG_ENUM: bad = "no-such-value", why = "is not one of"; break;
        case RS_CFG_STRING:
        case RS_CFG_PATH: bad = "\xc3\x28", why = "UTF-8"; break;
        }
        /* good lines before the bad one, so the line number is not trivially 1 or 2 */
        int pad = rand_int(&r, 0, 5), used = 0;
        for (int i = 0; i < pad; i++) used += snprintf(text + used, sizeof text - (size_t)used, "; pad\n");
        snprintf(text + used, sizeof text - (size_t)used, "[%s]\n%s = %s\n", k->section, k->key, bad);
        snprintf(where, sizeof where, "bad.ini:%d: ", pad + 2);
        snprintf(sect, sizeof sect, "[%s] %s: ", k->section, k->key);
        expect_error(text, where, sect, why);
    }
}

TEST(test_config_unknown_names_suggest_the_closest) {
    int n;
    const rs_config_key *schema = rs_config_schema(&n);
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed() + 2);
    char text[512], key[80], want[256];
    for (int trial = 0; trial < 200; trial++) {
        const rs_config_key *k = &schema[rand_int(&r, 0, n - 1)];
        size_t len = strlen(k->key);
        snprintf(key, sizeof key, "%s", k->key);
        if (len >= 4) { /* one substituted letter: the typo suggestion must find the key */
            size_t at = (size_t)rand_int(&r, 0, (int)len - 1);
            key[at] = key[at] == 'q' ? 'z' : 'q';
        } else {
            snprintf(key, sizeof key, "%sx", k->key);
        }
        int clash = 0; /* the typo may itself be a key (or closer to another one) */
        for (int i = 0; i < n; i++)
            if (strcmp(schema[i].section, k->section) == 0 && strcmp(schema[i].key, key) == 0) clash = 1;
        if (clash) continue;
        snprintf(text, sizeof text, "[%s]\n\n%s = 1\n", k->section, key);
        rs_config *cfg = rs_config_parse("typo.ini", text);
        CHECK(cfg == NULL, "unknown key %s accepted", key);
        rs_config_free(cfg);
        snprintf(want, sizeof want, "typo.ini:3: [%s] unknown key '%s' (did you mean '", k->section, key);
        CHECK(strstr(rs_last_error(), want) != NULL, "%s", rs_last_error());
    }
    expect_error("[quant]\nformat = int4\n[qaunt]\nbits = 4\n", "bad.ini:4: unknown section [qaunt]",
                 "did you mean [quant]?", NULL);
    expect_error("[generate]\nrank = 4\n", "bad.ini:2: [generate] unknown key 'rank'", "belongs in [lora]",
                 NULL);
    expect_error("[dpo]\nlearning_rate = 1\n", "unknown key 'learning_rate'", "keys in [dpo]:", " lr ");
    expect_error("rank = 4\n[lora]\n", "bad.ini:1: key 'rank' comes before any [section]", NULL, NULL);
}

TEST(test_config_structure_errors) {
    expect_error("[lora]\nrank = 8\nalpha = 4\nrank = 16\n", "bad.ini:4: [lora] rank: duplicate key",
                 "first set on line 2", NULL);
    expect_error("[lora]\nrank = 8\n[dpo]\nbeta=0.1\n[lora]\nrank = 16\n", "bad.ini:6: [lora] rank: duplicate",
                 NULL, NULL);
    expect_error("[lora]\nrank 8\n", "bad.ini:2: syntax error", NULL, NULL);
    expect_error("[lora\nrank = 8\n", "bad.ini:1: syntax error", NULL, NULL);
    /* the first error wins, whichever kind */
    expect_error("[lora]\nrank = x\nnot a pair\n", "bad.ini:2: [lora] rank", NULL, NULL);
    expect_error("[lora]\nnot a pair\nrank = x\n", "bad.ini:2: syntax error", NULL, NULL);
    expect_error("[lora]\nalpha = 2\n  rank = 8\n", "bad.ini:3: [lora] alpha", "only string values", NULL);
    char long_line[400];
    snprintf(long_line, sizeof long_line, "[run]\nout_dir = %0250d\n", 7);
    expect_error(long_line, "bad.ini:2: line longer than", NULL, NULL);
}

TEST(test_config_strings_continue_on_indented_lines) {
    rs_config *cfg = rs_config_parse("ok.ini",
                                     "\xef\xbb\xbf[generate]\nsystem_prompt = Be brief.\n"
                                     "   Refuse harm. ; a comment\n; between\n\tThird line;not a comment\n"
                                     "chat = off\n[lora]\ntargets = \"q_proj,v_proj \"\n");
    REQUIRE(cfg, "%s", rs_last_error());
    CHECK(strcmp(rs_config_get_str(cfg, "generate", "system_prompt"), "Be brief.\nRefuse harm.\nThird line;not a comment") == 0,
          "'%s'", rs_config_get_str(cfg, "generate", "system_prompt"));
    CHECK(rs_config_get_bool(cfg, "generate", "chat") == 0, "chat");
    CHECK(strcmp(rs_config_get_str(cfg, "lora", "targets"), "q_proj,v_proj ") == 0, "quotes");
    rs_config_free(cfg);
}

TEST(test_config_set_validates_like_the_file) {
    int n;
    const rs_config_key *schema = rs_config_schema(&n);
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed() + 3);
    rs_config *cfg = rs_config_new();
    expect *e = rs_calloc((size_t)n, sizeof *e);
    default_values(schema, n, e);
    char arg[256];
    for (int trial = 0; trial < 300; trial++) {
        int i = rand_int(&r, 0, n - 1);
        const rs_config_key *k = &schema[i];
        expect candidate = e[i];
        random_value(&r, k, &candidate);
        if (k->type == RS_CFG_STRING || k->type == RS_CFG_PATH) /* --set takes the text as is */
            snprintf(candidate.text, sizeof candidate.text, "%s", candidate.s);
        snprintf(arg, sizeof arg, "%s.%s=%s", k->section, k->key, candidate.text);
        REQUIRE(rs_config_set_arg(cfg, arg) == 0, "%s: %s", arg, rs_last_error());
        e[i] = candidate;
        /* a rejected override leaves the previous value */
        const char *bad = k->type == RS_CFG_INT || k->type == RS_CFG_FLOAT ? "zz" :
                          k->type == RS_CFG_BOOL ? "perhaps" : k->type == RS_CFG_ENUM ? "nope" : "\xff";
        CHECK(rs_config_set(cfg, k->section, k->key, bad) == -1, "[%s] %s = %s accepted", k->section, k->key, bad);
        snprintf(arg, sizeof arg, "[%s] %s: ", k->section, k->key);
        CHECK(strncmp(rs_last_error(), arg, strlen(arg)) == 0, "%s", rs_last_error());
    }
    check_values(cfg, schema, n, e, "after --set");
    CHECK(rs_config_set(cfg, "lora", "rnak", "3") == -1 && strstr(rs_last_error(), "did you mean 'rank'"),
          "%s", rs_last_error());
    CHECK(rs_config_set(cfg, "lroa", "rank", "3") == -1 && strstr(rs_last_error(), "[lora]"), "%s", rs_last_error());
    CHECK(rs_config_set_arg(cfg, "lora=3") == -1 && strstr(rs_last_error(), "section.key=value"), "%s",
          rs_last_error());
    CHECK(rs_config_set_arg(cfg, ".rank=3") == -1, "empty section accepted");
    rs_config_free(cfg);
    free(e);
}

TEST(test_config_doc_lists_every_key) {
    char *doc = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&doc, &len);
    rs_config_print_doc(f);
    fclose(f);
    int n;
    const rs_config_key *schema = rs_config_schema(&n);
    char row[128];
    const char *section_at = NULL;
    for (int i = 0; i < n; i++) {
        snprintf(row, sizeof row, "### [%s]", schema[i].section);
        section_at = strstr(doc, row);
        CHECK(section_at != NULL, "no heading for [%s]", schema[i].section);
        if (!section_at) continue;
        snprintf(row, sizeof row, "| `%s` | %s |", schema[i].key, rs_config_type_name(schema[i].type));
        const char *at = strstr(section_at, row);
        const char *next = strstr(section_at + 4, "### [");
        CHECK(at && (!next || at < next), "[%s] %s missing from its table", schema[i].section, schema[i].key);
    }
    free(doc);
}

TEST(test_config_load_reports_missing_and_binary_files) {
    char *path = rs_path_join(rs_test_tmpdir(), "run.ini");
    CHECK(rs_config_load(path) == NULL && strstr(rs_last_error(), path), "%s", rs_last_error());
    const char bin[] = "[lora]\nrank = 4\0\nrank = 5\n";
    REQUIRE(rs_write_file_atomic(path, bin, sizeof bin - 1) == 0, "%s", rs_last_error());
    CHECK(rs_config_load(path) == NULL && strstr(rs_last_error(), "NUL"), "%s", rs_last_error());
    REQUIRE(rs_write_file_atomic(path, "[lora]\nrank = 4\n", 16) == 0, "%s", rs_last_error());
    rs_config *cfg = rs_config_load(path);
    REQUIRE(cfg, "%s", rs_last_error());
    CHECK(rs_config_get_int(cfg, "lora", "rank") == 4, "rank");
    rs_config_free(cfg);
    CHECK(rs_config_load(rs_test_tmpdir()) == NULL && strstr(rs_last_error(), "directory"), "%s", rs_last_error());
    free(path);
}
