/* chat_tool: drives rs_chat_* for tests/py/test_chat.py.
 *
 *   chat_tool render CASES.json             JSON array: {"text": ...} or {"error": ...} per case
 *   chat_tool encode TOKENIZER CASES.json   JSON array: {"ids": [...]} or {"error": ...} per case
 *   chat_tool detect MODEL_DIR              prints the family name; the error and rc 1 otherwise
 *
 * CASES.json is an array of {"kind": "llama-2", "add_generation_prompt": true,
 * "messages": [{"role": "user", "content": "..."}, ...]}: one process renders many cases. */
#include "resafe/chat.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    rs_chat_kind kind;
    int add_generation_prompt;
    int n_msgs;
    rs_chat_message *msgs; /* strings point into the parsed JSON */
} chat_case;

static int parse_case(const cJSON *c, chat_case *out) {
    const cJSON *kind = cJSON_GetObjectItemCaseSensitive(c, "kind");
    const cJSON *gen = cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt");
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(c, "messages");
    if (!cJSON_IsString(kind) || rs_chat_kind_from_name(kind->valuestring, &out->kind) != 0)
        return RS_FAIL("case: missing or unknown \"kind\"");
    if (!cJSON_IsArray(msgs)) return RS_FAIL("case: \"messages\" is not an array");
    out->add_generation_prompt = cJSON_IsTrue(gen);
    out->n_msgs = cJSON_GetArraySize(msgs);
    out->msgs = rs_calloc((size_t)out->n_msgs + 1, sizeof *out->msgs);
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, msgs) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        out->msgs[i].role = cJSON_IsString(role) ? role->valuestring : NULL;
        out->msgs[i].content = cJSON_IsString(content) ? content->valuestring : NULL;
        i++;
    }
    return 0;
}

static cJSON *run_case(const cJSON *c, const rs_tokenizer *tok) {
    cJSON *res = cJSON_CreateObject();
    chat_case cc = {0};
    rs_clear_error();
    if (parse_case(c, &cc) != 0) {
        cJSON_AddStringToObject(res, "error", rs_last_error());
    } else if (!tok) {
        char *text = rs_chat_render(cc.kind, cc.msgs, cc.n_msgs, cc.add_generation_prompt);
        if (text) cJSON_AddStringToObject(res, "text", text);
        else cJSON_AddStringToObject(res, "error", rs_last_error());
        free(text);
    } else {
        int32_t *ids = NULL;
        int n_ids = 0;
        if (rs_chat_encode(tok, cc.kind, cc.msgs, cc.n_msgs, cc.add_generation_prompt, &ids,
                           &n_ids) == 0) {
            cJSON *arr = cJSON_AddArrayToObject(res, "ids");
            for (int i = 0; i < n_ids; i++) cJSON_AddItemToArray(arr, cJSON_CreateNumber(ids[i]));
        } else {
            cJSON_AddStringToObject(res, "error", rs_last_error());
        }
        free(ids);
    }
    free(cc.msgs);
    return res;
}

static int run_cases(const char *cases_path, const rs_tokenizer *tok) {
    char *data = NULL;
    size_t size = 0;
    if (rs_read_file(cases_path, &data, &size) != 0) rs_die_last();
    cJSON *cases = cJSON_ParseWithLength(data, size);
    free(data);
    RS_CHECK(cJSON_IsArray(cases), "%s: not a JSON array of cases", cases_path);
    cJSON *results = cJSON_CreateArray();
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) cJSON_AddItemToArray(results, run_case(c, tok));
    char *out = cJSON_PrintUnformatted(results);
    fputs(out, stdout);
    fputc('\n', stdout);
    cJSON_free(out);
    cJSON_Delete(results);
    cJSON_Delete(cases);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "render") == 0) return run_cases(argv[2], NULL);
    if (argc == 4 && strcmp(argv[1], "encode") == 0) {
        rs_tokenizer *tok = rs_tokenizer_load(argv[2]);
        if (!tok) rs_die_last();
        int rc = run_cases(argv[3], tok);
        rs_tokenizer_free(tok);
        return rc;
    }
    if (argc == 3 && strcmp(argv[1], "detect") == 0) {
        rs_chat_kind kind;
        if (rs_chat_detect(argv[2], &kind) != 0) {
            fprintf(stderr, "%s\n", rs_last_error());
            return 1;
        }
        printf("%s\n", rs_chat_kind_name(kind));
        return 0;
    }
    fprintf(stderr, "usage: chat_tool render CASES.json | encode TOKENIZER CASES.json | "
                    "detect MODEL_DIR\n");
    return 2;
}
