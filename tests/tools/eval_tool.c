/* eval_tool: the evaluation's text judges, for tests/py/test_eval.py.
 *   eval_tool judge [PHRASES_FILE] < lines    one JSON string per line -> 0/1 (refusal) per line
 *   eval_tool match MODE < lines              one JSON [response, answer] per line -> 0/1 */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/core.h"
#include "resafe/eval.h"

int main(int argc, char **argv) {
    if (argc < 2) return fprintf(stderr, "usage: eval_tool judge [FILE] | match MODE\n"), 2;
    int judge = strcmp(argv[1], "judge") == 0;
    rs_judge j;
    rs_answer_match m = RS_MATCH_CONTAINS;
    if (judge && rs_judge_init(&j, argc > 2 ? argv[2] : NULL) != 0) rs_die_last();
    if (!judge && (argc < 3 || rs_answer_match_from_name(argv[2], &m) != 0))
        return fprintf(stderr, "eval_tool: match needs contains|exact|last_number\n"), 2;
    size_t cap = 0;
    char *line = NULL;
    ssize_t n;
    while ((n = getline(&line, &cap, stdin)) > 0) {
        cJSON *v = cJSON_ParseWithLength(line, (size_t)n);
        if (!v) return fprintf(stderr, "eval_tool: bad JSON line\n"), 1;
        /* strings may hold NUL: the length comes from the JSON, the test sends none */
        if (judge) {
            printf("%d\n", rs_judge_is_refusal(&j, v->valuestring, strlen(v->valuestring)));
        } else {
            const char *r = cJSON_GetArrayItem(v, 0)->valuestring,
                       *a = cJSON_GetArrayItem(v, 1)->valuestring;
            printf("%d\n", rs_answer_correct(m, r, strlen(r), a));
        }
        cJSON_Delete(v);
    }
    free(line);
    if (judge) rs_judge_free(&j);
    return 0;
}
