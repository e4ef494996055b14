/* shard: which part of the work a rank of a data-parallel job takes, as pure index maps (no
 * communication: the NCCL build adds the all-reduce and the gather's transport, issue #8).
 *
 * Training batches. Every rank holds the same rs_data_order (same seed) and draws the same GLOBAL
 * batch of [dpo] batch_size (or [sft] batch_size) entries; rank r takes a contiguous slice of it.
 * The order, the step count and the checkpoint (order/perm, order/rng, epoch, cursor) are those of
 * a one-process run whatever the world size, so a checkpoint written at world 2 resumes at world 1
 * or 4 with the same global batches.
 *
 * A global batch of n entries over `world` ranks: rank r takes [r n / world, (r + 1) n / world)
 * (integer division), so slices differ in size by at most one and need not be equal: a batch
 * size that does not divide by the world still runs, and a run may resume on any world size up
 * to the batch. The all-reduce must then weight each rank by its share: a rank whose loss is the
 * mean over its n_r entries multiplies its gradient by n_r / n (rs_shard_weight) before the SUM
 * all-reduce, which gives exactly the mean over the global batch (a plain average of the ranks'
 * means would weight entries of the smaller slices more). A loss that is a mean over tokens (SFT)
 * weights by tokens: local target tokens / global target tokens (the global count is one more
 * all-reduce of an integer). A world larger than the batch would leave ranks without data: an
 * error. SNIP scoring batches (drawn from their own order at re-identification) are sliced the
 * same way, and the ranks' score sums all-reduced, so every rank selects identical masks.
 *
 * Prompts (patch-set generation, evaluation). Prompt i goes to rank i mod world, as its
 * (i / world)-th prompt: strided rather than in blocks, because prompt files are often grouped
 * (by category, by length) and strides spread each group, and so the work, over the ranks. The
 * gather takes the ranks' results packed in rank order (rank 0's, then rank 1's, ...) and puts
 * them back in the prompts' order. */
#ifndef RESAFE_SHARD_H
#define RESAFE_SHARD_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int first, count; /* the slice [first, first + count) of the global batch */
} rs_shard;

/* Rank `rank`'s slice of a global batch of n entries; -1 + message when n < world (a rank would
 * get nothing) or rank is outside 0 .. world - 1. */
int rs_batch_shard(int n, int world, int rank, rs_shard *out);
/* The factor a rank's gradient (a mean over its local_units) takes before the SUM all-reduce:
 * local_units / global_units. */
double rs_shard_weight(int64_t local_units, int64_t global_units);
/* The global batch size the ranks share must let every rank have data: -1 + a message naming
 * the setting when min(batch_size, n_data) < world. `what` names the batch size ("[dpo]
 * batch_size"). */
int rs_batch_check_world(int batch_size, int n_data, int world, const char *what);

/* Work a one-process run does in chunks (the micro-batches of the DPO reference pass): n items
 * in c = ceil(n / chunk) chunks of `chunk` (the last one shorter), rank r takes the whole chunks
 * [r c / world, (r + 1) c / world) as the items [first, first + count), so every chunk it
 * computes holds the same items as one process's and the shares, in rank order, are the items
 * in order. A rank past the chunks gets count 0 (world > c is no error: it only waits). */
void rs_chunk_shard(int n, int chunk, int world, int rank, rs_shard *out);

/* Prompts of rank `rank` out of n: how many, and the global index of its j-th. */
int rs_prompt_shard_count(int n, int world, int rank);
int rs_prompt_global_index(int world, int rank, int j);
/* Where prompt i's result sits in the packed rank-order concatenation of every rank's results. */
int rs_prompt_packed_slot(int n, int world, int i);
/* out[i] = packed[rs_prompt_packed_slot(n, world, i)] for elements of elem_size bytes. */
void rs_prompt_gather(int n, int world, size_t elem_size, const void *packed, void *out);

#endif
