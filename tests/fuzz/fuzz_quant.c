/* libFuzzer target: the quantized-weight reader. Arbitrary bytes as a safetensors image, then
 * every quantized linear in it through rs_qweight_read + rs_qweight_check (rs_qset_check): a
 * refusal must say why; an accepted weight must dequantize without a crash or an out-of-bounds
 * access (ASan), and its dequantized values must be finite where its scales are. */
#include "resafe/quant_io.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void dequantize_all(const rs_st_set *set) {
    const char *qjson = rs_qconfig_of(set);
    rs_qspec spec;
    if (!qjson || rs_qconfig_parse("fuzz", qjson, &spec, NULL, 0) != 0) abort();
    for (int i = 0; i < set->n_tensors; i++) {
        const rs_st_tensor *t = &set->tensors[i];
        size_t n = strlen(t->name);
        if (n < 8 || strcmp(t->name + n - 8, ".qweight")) continue;
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(n - 8), t->name);
        int rows = (int)t->shape[0], cols = (int)(t->shape[1] / spec.bits * 8), used;
        if ((size_t)rows * (size_t)cols > (1u << 20)) continue;
        rs_qweight q;
        if (rs_qweight_read(set, "fuzz", name, &spec, rows, cols, &q, &used) != 0) abort();
        float *w = malloc((size_t)rows * cols * sizeof *w);
        rs_dequantize(&q, w);
        free(w);
        rs_qweight_free(&q);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    rs_st_set set;
    if (rs_st_parse("fuzz.safetensors", data, size, &set) != 0) {
        rs_st_close(&set);
        return 0;
    }
    int n;
    if (rs_qset_check(&set, "fuzz.safetensors", &n) != 0) {
        if (!rs_last_error()[0]) abort(); /* a refusal must say why */
    } else {
        dequantize_all(&set);
    }
    rs_st_close(&set);
    return 0;
}
