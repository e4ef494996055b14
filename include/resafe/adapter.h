/* adapter: a LoRA adapter file used without training state (README "Adapter at load").
 *
 * A model directory holding resafe_adapter.h5 (written by `resafe merge --mode adapter`) gets it
 * attached by rs_model_load: every adapted linear then computes
 *     y = W x (+ b) + scale * B (A x)                (masks none / factor: the masks only froze
 *                                                      training, the adapter is B A)
 *     y = W x (+ b) + (scale * (M ⊙ B A)) x          (elementwise: a dense delta per linear, in
 *                                                      weight dtype, precomputed at load)
 * in rs_model_forward (prefill and KV-cache decode alike), on every backend (lora_fwd /
 * linear_fwd). Training (model_train.h) does not see an attached adapter. */
#ifndef RESAFE_ADAPTER_H
#define RESAFE_ADAPTER_H

#include "resafe/lora.h"
#include "resafe/model.h"

#define RS_ADAPTER_FILE "resafe_adapter.h5"

/* Read adapter `path` for a model of configuration cfg into l (buffers of backend be): one line
 * naming the file when it was made for another model (layers, shapes, attributes). */
int rs_adapter_load_for(const char *path, const rs_model_config *cfg, const rs_backend *be,
                        rs_lora *l);
/* delta [out, in] = scale * (mask_W ⊙) B A of linear lin of a host adapter (cpu backend). */
void rs_adapter_delta(const rs_lora *l, const rs_lora_linear *lin, double *delta);

/* Attach / detach (rs_model_free detaches). */
int rs_model_attach_adapter(rs_model *m, const char *path);
void rs_model_detach_adapter(rs_model *m);
/* y[n, out] += the adapter's term for linear i (rs_layer_qslot order) of `layer`, from its
 * input x[n, in]; nothing without an adapter or for a linear it does not target. */
void rs_model_adapter_fwd(rs_model *m, int layer, int i, void *y, const void *x, int n);

#endif
