/* backend selection: the cpu backend always, the cuda backend when compiled in and a GPU exists. */
#include "resafe/backend.h"

#include <string.h>

#ifndef RS_HAVE_CUDA
const rs_backend *rs_backend_cuda(void) { return NULL; }
#endif

const rs_backend *rs_backend_by_name(const char *name) {
    if (strcmp(name, "cpu") == 0) return rs_backend_cpu();
    if (strcmp(name, "cuda") == 0 || strcmp(name, "auto") == 0) {
        const rs_backend *b = rs_backend_cuda();
        if (b) return b;
        if (strcmp(name, "auto") == 0) return rs_backend_cpu();
#ifdef RS_HAVE_CUDA
        RS_FAIL("backend 'cuda': no usable CUDA device found");
#else
        RS_FAIL("backend 'cuda': this resafe was built without CUDA (nvcc was not found)");
#endif
        return NULL;
    }
    RS_FAIL("unknown backend '%s' (allowed: cpu, cuda, auto)", name);
    return NULL;
}
