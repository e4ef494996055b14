/* shard: slices of the global batch and strided prompt shards (see shard.h). */
#include "resafe/shard.h"

#include <string.h>

#include "resafe/core.h"

int rs_batch_shard(int n, int world, int rank, rs_shard *out) {
    if (world < 1 || rank < 0 || rank >= world)
        return RS_FAIL("rank %d is outside 0 .. %d", rank, world - 1);
    if (n < world)
        return RS_FAIL("a global batch of %d cannot be split over %d ranks: rank %d would get "
                       "nothing", n, world, rank);
    /* 64-bit products: n * world may pass 2^31 */
    int64_t lo = (int64_t)rank * n / world, hi = (int64_t)(rank + 1) * n / world;
    out->first = (int)lo;
    out->count = (int)(hi - lo);
    return 0;
}

double rs_shard_weight(int64_t local_units, int64_t global_units) {
    return global_units > 0 ? (double)local_units / (double)global_units : 0.0;
}

int rs_batch_check_world(int batch_size, int n_data, int world, const char *what) {
    int n = n_data < batch_size ? n_data : batch_size;
    if (n >= world) return 0;
    return RS_FAIL("%s = %d (%d examples) is a global batch of %d, fewer than the %d ranks: give "
                   "every rank at least one example (%s >= %d)", what, batch_size, n_data, n,
                   world, what, world);
}

void rs_chunk_shard(int n, int chunk, int world, int rank, rs_shard *out) {
    int64_t c = chunk > 0 ? ((int64_t)n + chunk - 1) / chunk : 0;
    int64_t lo = (int64_t)rank * c / world * chunk, hi = (int64_t)(rank + 1) * c / world * chunk;
    if (hi > n) hi = n;
    if (lo > hi) lo = hi;
    out->first = (int)lo;
    out->count = (int)(hi - lo);
}

int rs_prompt_shard_count(int n, int world, int rank) {
    return rank < n ? (n - rank + world - 1) / world : 0;
}

int rs_prompt_global_index(int world, int rank, int j) {
    return j * world + rank;
}

int rs_prompt_packed_slot(int n, int world, int i) {
    int rank = i % world, j = i / world;
    /* ranks below `rank` hold ceil((n - q) / world) each: the first n % world ranks one more */
    int full = n / world, extra = n % world;
    int before = rank * full + (rank < extra ? rank : extra);
    return before + j;
}

void rs_prompt_gather(int n, int world, size_t elem_size, const void *packed, void *out) {
    const char *src = packed;
    char *dst = out;
    for (int i = 0; i < n; i++)
        memcpy(dst + (size_t)i * elem_size,
               src + (size_t)rs_prompt_packed_slot(n, world, i) * elem_size, elem_size);
}
