/* libFuzzer: bytes -> rs_hf_config_parse. An accepted config must satisfy the invariants the
 * model code relies on, and its rope frequencies must be finite and positive. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/core.h"
#include "resafe/hf_config.h"

/* A rejection is one printable line: no control bytes from the input leak into it. */
static void one_line(const char *msg) {
    if (!msg[0]) abort();
    for (const unsigned char *p = (const unsigned char *)msg; *p; p++)
        if (*p < 0x20 || *p == 0x7f) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = 0;
    rs_model_config c;
    if (rs_hf_config_parse("fuzz.json", text, &c) == 0) {
        if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.intermediate_size <= 0 ||
            c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 ||
            c.n_heads % c.n_kv_heads != 0 || c.head_dim <= 0 || c.head_dim % 2 != 0 ||
            c.n_eos < 0 || c.n_eos > RS_MAX_EOS || c.bos_token_id >= c.vocab_size ||
            c.pad_token_id >= c.vocab_size || !(c.rms_norm_eps > 0) || !(c.attn_scale > 0) ||
            !(c.embed_scale > 0))
            abort();
        for (int i = 0; i < c.n_eos; i++)
            if (c.eos_token_ids[i] < 0 || c.eos_token_ids[i] >= c.vocab_size) abort();
        float *inv = malloc(sizeof(float) * (size_t)(c.head_dim / 2));
        rs_rope_inv_freq(&c, inv);
        for (int i = 0; i < c.head_dim / 2; i++)
            if (!isfinite(inv[i]) || !(inv[i] > 0)) abort();
        free(inv);
    } else {
        one_line(rs_last_error());
    }
    free(text);
    return 0;
}
