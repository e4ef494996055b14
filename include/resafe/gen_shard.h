/* gen_shard: rs_generate over the ranks of a data-parallel job (patch-set generation and
 * evaluation, issue #8). Prompt i goes to rank i mod world (shard.h), draws from the seed of its
 * GLOBAL index (rs_gen_seed(seed, i), or seeds[i]) and a response does not depend on its batch
 * neighbours (generate.h), so the gathered responses are those of one process, byte for byte.
 * Every rank receives every response (an all-gather): what the callers compute from them
 * (judges, pairs, metrics) is then the same everywhere, and rank 0 alone writes it. */
#ifndef RESAFE_GEN_SHARD_H
#define RESAFE_GEN_SHARD_H

#include "resafe/comm.h"
#include "resafe/generate.h"

/* rs_generate's contract for out[n_prompts]; comm NULL or of world 1: rs_generate itself. The
 * progress callback sees this rank's prompts. -1 + message (a peer's failure included). */
int rs_generate_sharded(rs_comm *comm, rs_model *m, const int32_t *const *prompts,
                        const int *prompt_lens, int n_prompts, const rs_gen_params *p,
                        rs_gen_output *out);

#endif
