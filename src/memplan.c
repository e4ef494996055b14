/* memplan: the memory plan of a LoRA training run (memplan.h). */
#include "resafe/memplan.h"
#include "resafe/model_train.h"
#include "resafe/quant_io.h"
#include "resafe/safetensors.h"
#include "resafe/snip.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *rs_mem_plan_backend_name(const char *name) {
    if (strcmp(name, "cpu") == 0 || strcmp(name, "cuda") == 0) return name;
    if (strcmp(name, "auto") == 0) return rs_backend_cuda() ? "cuda" : "cpu";
    RS_FAIL("unknown backend '%s' (allowed: cpu, cuda, auto)", name);
    return NULL;
}

/* Packed bytes of the tensors of the 7 linears of every layer ("model.layers.<i>.<linear>."). */
static size_t linear_tensor_bytes(const rs_st_set *set) {
    size_t bytes = 0;
    for (int t = 0; t < set->n_tensors; t++) {
        const char *name = set->tensors[t].name;
        if (strncmp(name, "model.layers.", 13) != 0) continue;
        const char *dot = strchr(name + 13, '.');
        for (int i = 0; dot && i < RS_N_LINEARS; i++) {
            size_t n = strlen(rs_linear_name(i));
            if (strncmp(dot + 1, rs_linear_name(i), n) == 0 && dot[1 + n] == '.') {
                bytes += set->tensors[t].nbytes;
                break;
            }
        }
    }
    return bytes;
}

int rs_mem_plan_load_model(const char *dir, rs_mem_plan_input *in) {
    RS_TRY(rs_hf_config_load(dir, &in->cfg));
    in->quant_bytes = 0;
    char *single = rs_path_join(dir, "model.safetensors");
    char *index = rs_path_join(dir, "model.safetensors.index.json");
    int has_weights = rs_path_exists(single) || rs_path_exists(index);
    free(single), free(index);
    if (!has_weights) return 0; /* config.json alone: a dense model */
    rs_st_set set;
    RS_TRY(rs_st_open(dir, &set));
    if (rs_qconfig_of(&set)) in->quant_bytes = linear_tensor_bytes(&set);
    rs_st_close(&set);
    return 0;
}

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

/* The CUDA op scratch the run grows to: the largest of the training ops' temporaries. Mirrors
 * kernels/attention_gemm.cu (scratch_layout, chunk_heads: 256 MiB of scores per chunk, 10 bytes
 * per score in backward), kernels/attention_bwd.cu (3 fp32 statistics per query row) and
 * kernels/lora.cu (rs_cuda_lora_scratch_bytes). */
static size_t cuda_op_scratch(const rs_mem_plan_input *in) {
    const rs_model_config *c = &in->cfg;
    size_t B = (size_t)in->batch_seqs, T = (size_t)in->seq_len, n = B * T;
    size_t H = (size_t)c->n_heads, Hkv = (size_t)c->n_kv_heads, D = (size_t)c->head_dim;
    size_t group = H / Hkv, per_head = group * T * T * 10, att;
    if (T >= 16 && D % 8 == 0 && per_head <= ((size_t)1 << 30)) { /* the GEMM attention path */
        size_t ch = ((size_t)256 << 20) / per_head;
        ch = ch < 1 ? 1 : ch > Hkv ? Hkv : ch;
        size_t sc = ch * group * T * T, kv = Hkv * T * D;
        att = align256(B * 4) + 2 * align256(kv * 2) + 2 * align256(sc * 4) + align256(sc * 2) +
              2 * align256(ch * T * D * 4);
    } else {
        att = n * H * 3 * sizeof(float);
    }
    size_t lora = 0, r = (size_t)in->lora_rank;
    for (int t = 0; t < RS_N_LINEARS && r > 0; t++) {
        if (!(in->lora_targets & (1u << t))) continue;
        int out, inp;
        rs_linear_shape(c, t, &out, &inp);
        size_t one = align256(r * (size_t)inp * 2) + align256((size_t)out * r * 2) +
                     2 * align256(n * r * 2) + align256(n * r * 4);
        lora = one > lora ? one : lora;
    }
    size_t scratch = (size_t)16 << 20; /* SCRATCH_INITIAL_BYTES */
    scratch = att > scratch ? att : scratch;
    return lora > scratch ? lora : scratch;
}

/* The largest linear [out * in] (a quantized model dequantizes one at a time into bf16). */
static size_t max_linear_elems(const rs_model_config *c) {
    size_t best = 0;
    for (int i = 0; i < RS_N_LINEARS; i++) {
        int out, in;
        rs_linear_shape(c, i, &out, &in);
        size_t n = (size_t)out * in;
        best = n > best ? n : best;
    }
    return best;
}

static size_t workspace_bytes(const rs_mem_plan_input *in) {
    if (strcmp(in->backend, "cuda") != 0) return 0; /* cpu ops use host temporaries */
    size_t ws = ((size_t)32 << 20) + ((size_t)8 << 20); /* cuBLAS workspace, upload staging */
    ws += cuda_op_scratch(in);
    if (in->quant_bytes) ws += max_linear_elems(&in->cfg) * 2;
    return ws;
}

int rs_mem_plan_compute(const rs_mem_plan_input *in, rs_mem_plan *p) {
    memset(p, 0, sizeof *p);
    int cuda = strcmp(in->backend, "cuda") == 0;
    p->act_dtype = p->weight_dtype = cuda ? RS_BF16 : RS_F32; /* backend.h */
    const rs_model_config *c = &in->cfg;
    p->weights = rs_model_plan_bytes(c, p->weight_dtype, in->quant_bytes > 0) + in->quant_bytes;
    size_t n_flat = 0;
    int masked = in->mask_mode != RS_MASK_NONE;
    rs_train_adapter_shape shape = {0};
    if (in->lora_rank > 0) {
        RS_TRY(rs_lora_plan_bytes(c, in->lora_rank, in->lora_targets, in->mask_mode, masked,
                                  &n_flat, &p->adapter));
        if (masked) p->adapter += rs_snip_plan_bytes(c, in->lora_targets, p->weight_dtype);
        p->optimizer = 2 * rs_align64(n_flat * sizeof(float));
        shape = (rs_train_adapter_shape){in->lora_rank, in->lora_targets,
                                         in->mask_mode == RS_MASK_ELEMENTWISE, in->lora_dropout};
    }
    RS_TRY(rs_train_state_plan_bytes(c, p->act_dtype, p->weight_dtype, &shape, in->batch_seqs,
                                     in->seq_len, in->recompute, in->prefixes, &p->activations,
                                     &p->logits));
    p->workspace = workspace_bytes(in);
    p->total = p->weights + p->adapter + p->optimizer + p->activations + p->workspace;
    return 0;
}

void rs_mem_plan_print(const char *who, const rs_mem_plan_input *in, const rs_mem_plan *p) {
    const double m = 1048576.0;
    const char *w = p->weight_dtype == RS_BF16 ? "bf16" : "fp32";
    const char *a = p->act_dtype == RS_BF16 ? "bf16" : "fp32";
    char label[48];
    rs_info("%s: memory plan on %s (%s weights, %s activations) for %d x %d tokens: weights %.1f "
            "MiB%s, adapter (A, B, gradients, masks, SNIP) %.1f MiB, optimizer state %.1f MiB, "
            "activations %.1f MiB (recompute %s; logits and log-probs %.1f MiB), backend "
            "workspace %.1f MiB; %.1f MiB in all (%.2f GiB)",
            who, in->backend, w, a,
            in->batch_seqs, in->seq_len, p->weights / m, in->quant_bytes ? " (quantized)" : "",
            p->adapter / m, p->optimizer / m, p->activations / m,
            rs_train_recompute_label(in->recompute, in->cfg.n_layers, label, sizeof label),
            p->logits / m, p->workspace / m, p->total / m, p->total / (m * 1024));
}

/* "123", "20G", "512M": bytes with an optional binary suffix; 0 or -1. */
static int parse_bytes(const char *s, size_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || errno != 0 || s[0] == '-') return -1;
    int shift = *end == 'K' ? 10 : *end == 'M' ? 20 : *end == 'G' ? 30 : *end == 'T' ? 40 : 0;
    if (shift) end++;
    if (*end != '\0' || (shift && v > (~0ull >> shift))) return -1;
    *out = (size_t)(v << shift);
    return 0;
}

int rs_mem_plan_free_bytes(const rs_backend *be, size_t *free_bytes) {
    const char *env = getenv("RESAFE_PLAN_FREE_BYTES");
    if (env && env[0]) {
        if (parse_bytes(env, free_bytes) == 0) return 0;
        rs_warn("RESAFE_PLAN_FREE_BYTES=%s is not a byte count (e.g. 80G): ignored", env);
    }
    size_t total;
    if (be && be->mem_info && be->mem_info(free_bytes, &total) == 0) return 0;
    return -1;
}

/* "12.55 GiB" from 1 GiB up, else "3.2 MiB". */
static const char *human(char *buf, size_t n, size_t bytes) {
    if (bytes >= ((size_t)1 << 30))
        snprintf(buf, n, "%.2f GiB", bytes / 1073741824.0);
    else
        snprintf(buf, n, "%.1f MiB", bytes / 1048576.0);
    return buf;
}

int rs_mem_plan_check(const char *who, const rs_mem_plan *p, const rs_backend *be, size_t held,
                      const char *hint) {
    size_t free_bytes;
    if (rs_mem_plan_free_bytes(be, &free_bytes) != 0) return 0;
    size_t need = p->total > held ? p->total - held : 0;
    if (need <= free_bytes) return 0;
    char b[7][32];
    return RS_FAIL("%s: the memory plan needs %s (weights %s, adapter %s, optimizer %s, "
                   "activations %s, workspace %s) but only %s are free on %s: %s",
                   who, human(b[0], 32, need), human(b[1], 32, p->weights),
                   human(b[2], 32, p->adapter), human(b[3], 32, p->optimizer),
                   human(b[4], 32, p->activations), human(b[5], 32, p->workspace),
                   human(b[6], 32, free_bytes), be ? be->name : "the device", hint);
}
