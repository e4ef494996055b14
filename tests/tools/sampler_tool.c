/* sampler_tool: the candidate set of rs_sampler_filter for one row of logits, for the Python
 * test that compares it with transformers' logits warpers.
 *
 *   sampler_tool LOGITS.f32 TEMPERATURE TOP_K TOP_P
 *
 * LOGITS.f32: raw fp32 values (the vocabulary is their count). Prints one JSON object:
 * {"ids": [...], "probs": [...]}, most probable first. */
#include "resafe/generate.h"

#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: sampler_tool LOGITS.f32 TEMPERATURE TOP_K TOP_P\n");
        return 2;
    }
    char *data;
    size_t size;
    if (rs_read_file(argv[1], &data, &size) != 0) rs_die_last();
    int vocab = (int)(size / sizeof(float));
    if (vocab < 1) RS_DIE("%s: no logits", argv[1]);
    rs_sampler s;
    rs_sampler_init(&s, vocab);
    rs_sampler_filter(&s, (const float *)data, strtof(argv[2], NULL), atoi(argv[3]),
                      strtof(argv[4], NULL));
    printf("{\"ids\": [");
    for (int r = 0; r < s.n_kept; r++) printf("%s%d", r ? ", " : "", s.ids[r]);
    printf("], \"probs\": [");
    for (int r = 0; r < s.n_kept; r++) printf("%s%.9g", r ? ", " : "", s.probs[r]);
    printf("]}\n");
    rs_sampler_free(&s);
    free(data);
    return 0;
}
