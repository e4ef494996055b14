/* placeholder: the CPU backend (replaced by the model/backend module) */
#include "resafe/backend.h"
const rs_backend *rs_backend_cpu(void) { return NULL; }
