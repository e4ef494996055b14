/* gen_shard: generation split over the ranks by prompt and all-gathered (see gen_shard.h). */
#include "resafe/gen_shard.h"

#include <stdlib.h>
#include <string.h>

#include "resafe/core.h"
#include "resafe/shard.h"

/* This rank's responses as one blob: per response n_ids, hit_eos (int32 each), then the ids. */
static void *pack(const rs_gen_output *out, int k, size_t *bytes) {
    size_t n = 0;
    for (int j = 0; j < k; j++)
        n += (2 + (size_t)out[j].n_ids) * sizeof(int32_t);
    int32_t *blob = rs_malloc(n ? n : 1), *w = blob;
    for (int j = 0; j < k; j++) {
        *w++ = out[j].n_ids, *w++ = out[j].hit_eos;
        memcpy(w, out[j].ids, (size_t)out[j].n_ids * sizeof *w);
        w += out[j].n_ids;
    }
    *bytes = n;
    return blob;
}

/* Rank r's blob back into out[] at its prompts' global indices. */
static int unpack(const uint8_t *blob, size_t bytes, int n, int world, int r, rs_gen_output *out) {
    const int32_t *p = (const int32_t *)blob, *end = (const int32_t *)(blob + bytes);
    for (int j = 0; j < rs_prompt_shard_count(n, world, r); j++) {
        if (end - p < 2 || p[0] < 0 || end - p - 2 < p[0])
            return RS_FAIL("generation: rank %d's responses are cut short", r);
        rs_gen_output *o = &out[rs_prompt_global_index(world, r, j)];
        o->n_ids = p[0], o->hit_eos = p[1];
        o->ids = rs_malloc((size_t)(o->n_ids ? o->n_ids : 1) * sizeof *o->ids);
        memcpy(o->ids, p + 2, (size_t)o->n_ids * sizeof *o->ids);
        p += 2 + o->n_ids;
    }
    return p == end ? 0 : RS_FAIL("generation: rank %d sent more responses than its prompts", r);
}

int rs_generate_sharded(rs_comm *comm, rs_model *m, const int32_t *const *prompts,
                        const int *prompt_lens, int n_prompts, const rs_gen_params *p,
                        rs_gen_output *out) {
    int world = comm ? rs_comm_world(comm) : 1;
    if (world == 1) return rs_generate(m, prompts, prompt_lens, n_prompts, p, out);
    int rank = rs_comm_rank(comm), k = rs_prompt_shard_count(n_prompts, world, rank);
    const int32_t **ids = rs_malloc((size_t)(k ? k : 1) * sizeof *ids);
    int *lens = rs_malloc((size_t)(k ? k : 1) * sizeof *lens);
    uint64_t *seeds = rs_malloc((size_t)(k ? k : 1) * sizeof *seeds);
    for (int j = 0; j < k; j++) {
        int i = rs_prompt_global_index(world, rank, j);
        ids[j] = prompts[i], lens[j] = prompt_lens[i];
        seeds[j] = p->seeds ? p->seeds[i] : rs_gen_seed(p->seed, i);
    }
    rs_gen_params q = *p;
    q.seeds = seeds;
    rs_gen_output *mine = rs_calloc((size_t)(k ? k : 1), sizeof *mine);
    int rc = k ? rs_generate(m, ids, lens, k, &q, mine) : 0;
    size_t bytes = 0, *sizes = rs_calloc((size_t)world, sizeof *sizes);
    void *blob = rc == 0 ? pack(mine, k, &bytes) : NULL, *all = NULL;
    if (rc == 0) rc = rs_comm_all_gather(comm, blob, bytes, &all, sizes, "generated responses");
    memset(out, 0, (size_t)n_prompts * sizeof *out);
    for (int r = 0, at = 0; rc == 0 && r < world; at += (int)sizes[r], r++)
        rc = unpack((const uint8_t *)all + at, sizes[r], n_prompts, world, r, out);
    if (rc != 0) rs_gen_output_free(out, n_prompts); /* nothing half-filled */
    rs_gen_output_free(mine, k);
    free(mine), free(blob), free(all), free(sizes), free(ids), free(lens), free(seeds);
    return rc;
}
