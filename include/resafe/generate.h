/* generate: batched generation with the KV cache: greedy, or sampled with temperature, top-k
 * and top-p (transformers' semantics: logits / temperature, then top-k, then top-p, then a
 * draw from the softmax of what is left).
 *
 * Continuous batching: the KV cache has batch_size slots (fewer when there are fewer prompts),
 * each sized for the longest prompt + max_new_tokens. Slots take prompts in order; when a
 * response ends, its slot takes the next waiting prompt at once. Every forward call advances
 * every busy slot: a decoding slot feeds its last token (T = 1 when no slot prefills), a slot
 * with prompt tokens not yet cached feeds the next chunk of them, right-padded to the call's T
 * (model.h: the cache row is the position, so sequences of one call may be anywhere). T is
 * the longest chunk whose padding stays within a quarter of the call's real tokens, or whose
 * rows stay within the backend's free_rows (backend.h): a new prompt beside decoding slots is
 * fed over several calls instead of padding every decoding slot to its length (on cpu, one
 * token a call). A slot's first token is drawn after the call that cached its prompt's last
 * token.
 *
 * Each prompt draws from its own rs_rng, seeded from (seed, prompt index) or from seeds[i], so
 * its tokens depend on neither the batch size nor its neighbours. A response ends at a stop id
 * (included in the output, as transformers does) or after max_new_tokens. Outputs keep the
 * order of the prompts. */
#ifndef RESAFE_GENERATE_H
#define RESAFE_GENERATE_H

#include "resafe/model.h"

typedef struct {
    int max_new_tokens;   /* default 128 */
    float temperature;    /* <= 0: greedy (argmax, first index on ties); default 0 */
    int top_k;            /* 0: off */
    float top_p;          /* >= 1: off */
    uint64_t seed;        /* prompt i draws from rs_rng seeded with rs_gen_seed(seed, i) */
    const uint64_t *seeds;/* optional [n_prompts] per-prompt seeds (e.g. global indices of a shard) */
    int batch_size;       /* KV-cache slots (sequences generated at once); default 8 */
    int n_eos;            /* stop ids */
    int32_t eos_ids[RS_MAX_EOS];
    /* optional: called after each forward call that ended a response, with the responses done
     * so far (in any order of prompts) and the tokens generated */
    void (*progress)(void *user, int prompts_done, int n_prompts, long long tokens);
    void *progress_user;
} rs_gen_params;

typedef struct {
    int32_t *ids; /* generated tokens (malloc'ed) */
    int n_ids;
    int hit_eos;  /* 1 when the last id is a stop id */
} rs_gen_output;

/* Defaults, with the stop ids from <model_dir>/generation_config.json's eos_token_id (an int
 * or a list) when that file exists, else from config.json (cfg). -1 + message for a malformed
 * generation_config.json. model_dir may be NULL (config ids only). */
int rs_gen_params_init(rs_gen_params *p, const char *model_dir, const rs_model_config *cfg);

/* Generate for n_prompts prompts (prompts[i] of prompt_lens[i] >= 1 ids); out[n_prompts] is
 * filled (free with rs_gen_output_free). -1 + message on bad input (then out holds nothing). */
int rs_generate(rs_model *m, const int32_t *const *prompts, const int *prompt_lens, int n_prompts,
                const rs_gen_params *p, rs_gen_output *out);
void rs_gen_output_free(rs_gen_output *out, int n);

/* The seed of prompt i's generator. */
uint64_t rs_gen_seed(uint64_t seed, int prompt_index);

/* ---- sampling (one logits row), exposed for tests and for callers with their own loop */
typedef struct {
    int vocab;
    int n_kept;
    int32_t *ids; /* [vocab] candidates, most probable first; the first n_kept survive */
    float *probs; /* [vocab] their probabilities after filtering (sum to 1 over n_kept) */
    void *pairs;  /* sort scratch */
} rs_sampler;

void rs_sampler_init(rs_sampler *s, int vocab);
void rs_sampler_free(rs_sampler *s);
/* Filter logits[vocab] (temperature > 0): fills s->ids / s->probs / s->n_kept. */
void rs_sampler_filter(rs_sampler *s, const float *logits, float temperature, int top_k,
                       float top_p);
/* The next token: argmax when p->temperature <= 0, else a draw from rs_sampler_filter's set. */
int32_t rs_sampler_next(rs_sampler *s, const float *logits, const rs_gen_params *p, rs_rng *rng);

#endif
