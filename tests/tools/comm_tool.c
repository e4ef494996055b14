/* comm_tool: the nccl transport on one GPU, for tests/py/test_dist_gpu.py.
 *   comm_tool nccl-identity DIR N SEED BUCKET_BYTES
 * A communicator of world 1 over NCCL (ncclCommInitRank with nranks 1, its id through the file
 * exchange in DIR), N random floats (bits: any finite value) uploaded, all-reduced in buckets of
 * BUCKET_BYTES (several ncclAllReduce calls when smaller than 4 N) and downloaded: a sum over one
 * rank is the identity, so the bytes must come back unchanged. Prints "identity N ok" and exits
 * 0; 1 + a message otherwise; 77 when this build has no nccl transport or no GPU. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resafe/backend.h"
#include "resafe/comm.h"
#include "resafe/core.h"

int main(int argc, char **argv) {
    if (argc != 6 || strcmp(argv[1], "nccl-identity") != 0) {
        fprintf(stderr, "usage: comm_tool nccl-identity DIR N SEED BUCKET_BYTES\n");
        return 2;
    }
    if (!rs_comm_have_nccl()) return puts("this build has no nccl transport"), 77;
    size_t n = (size_t)strtoull(argv[3], NULL, 10);
    rs_dist d = {.rank = 0, .world = 1, .local_rank = 0, .source = "single"};
    snprintf(d.run_id, sizeof d.run_id, "comm-tool-%s", argv[4]);
    d.t_start = 0;
    rs_comm_options o = {RS_COMM_NCCL, argv[2], "",
                         60.0,         60.0,    (size_t)strtoull(argv[5], NULL, 10)};
    rs_comm *c;
    if (rs_comm_init(&c, &d, &o) != 0) /* first: it selects the GPU */
        return fprintf(stderr, "comm_tool: %s\n", rs_last_error()), 1;
    const rs_backend *be = rs_backend_cuda();
    if (!be) return rs_comm_abort(c), puts("no CUDA device"), 77;
    rs_rng g;
    rs_rng_seed(&g, strtoull(argv[4], NULL, 10));
    float *host = rs_malloc((n + 1) * sizeof *host), *back = rs_malloc((n + 1) * sizeof *back);
    for (size_t i = 0; i < n; i++)
        host[i] = rs_rng_normal(&g) * (float)(1 << (i % 20));
    float *dev = be->alloc((n + 1) * sizeof *dev);
    be->to_device(dev, host, n * sizeof *host);
    int rc = rs_comm_all_reduce_device_f32(c, be, dev, n, "identity");
    memset(back, 0xff, (n + 1) * sizeof *back); /* NaN poison: a missed copy cannot pass */
    if (rc == 0) be->to_host(back, dev, n * sizeof *back);
    if (rc == 0 && memcmp(back, host, n * sizeof *host) != 0) {
        size_t i = 0;
        while (back[i] == host[i])
            i++;
        rc = RS_FAIL("entry %zu: %.9g came back as %.9g", i, host[i], back[i]);
    }
    if (rc == 0)
        rc = rs_comm_finalize(c);
    else
        rs_comm_abort(c);
    be->free(dev);
    free(host), free(back);
    if (rc != 0) return fprintf(stderr, "comm_tool: %s\n", rs_last_error()), 1;
    printf("identity %zu ok\n", n);
    return 0;
}
