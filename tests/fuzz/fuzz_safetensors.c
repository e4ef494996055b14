/* libFuzzer target: rs_st_parse on arbitrary bytes must refuse or accept without a crash, an
 * out-of-bounds read or a leak; an accepted file's tensors must lie inside the input. */
#include "resafe/safetensors.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    rs_st_set set;
    if (rs_st_parse("fuzz.safetensors", data, size, &set) != 0) {
        if (!rs_last_error()[0]) abort(); /* a refusal must say why */
        rs_st_close(&set);
        return 0;
    }
    for (int i = 0; i < set.n_tensors; i++) {
        const rs_st_tensor *t = &set.tensors[i];
        const uint8_t *p = t->data;
        if (p < data || p + t->nbytes > data + size) abort();
        if (rs_st_find(&set, t->name) != t) abort();
        size_t numel = (size_t)rs_st_numel(t);
        if (numel <= 4096) { /* touch every byte through the fp32 reader (ASan checks bounds) */
            float *v = malloc(numel ? numel * sizeof *v : 1);
            rs_st_read_f32(t, v, numel);
            free(v);
        }
    }
    rs_st_close(&set);
    return 0;
}
