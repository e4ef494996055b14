/* sampler: the next token from one row of logits, with transformers' warpers in their order:
 * temperature, top-k (ties with the k-th value kept), top-p (nucleus), then a draw. */
#include "resafe/generate.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    float value;
    int32_t id;
    double prob;
} scored;

/* Descending by value, then ascending id, so the order (and every draw) is reproducible. */
static int by_value_desc(const void *pa, const void *pb) {
    const scored *a = pa, *b = pb;
    if (a->value != b->value) return a->value > b->value ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

void rs_sampler_init(rs_sampler *s, int vocab) {
    s->vocab = vocab;
    s->n_kept = 0;
    s->ids = rs_malloc((size_t)vocab * sizeof *s->ids);
    s->probs = rs_malloc((size_t)vocab * sizeof *s->probs);
    s->pairs = rs_malloc((size_t)vocab * sizeof(scored));
}

void rs_sampler_free(rs_sampler *s) {
    free(s->ids);
    free(s->probs);
    free(s->pairs);
    s->ids = NULL, s->probs = NULL, s->pairs = NULL;
}

/* Top-p, HF TopPLogitsWarper: sorted ascending, a token goes when the cumulative probability up
 * to and including it is <= 1 - top_p; the most probable token always stays. Walking the
 * descending order, the ascending cumulative sum at token r is 1 - (mass of tokens above r). */
static int nucleus(const scored *p, int n, float top_p) {
    double above = 0;
    int kept = 1;
    for (int r = 1; r < n; r++) {
        above += p[r - 1].prob;
        if (1.0 - above <= 1.0 - (double)top_p) break;
        kept = r + 1;
    }
    return kept;
}

void rs_sampler_filter(rs_sampler *s, const float *logits, float temperature, int top_k,
                       float top_p) {
    int V = s->vocab;
    scored *pairs = s->pairs;
    for (int i = 0; i < V; i++) pairs[i] = (scored){logits[i] / temperature, i, 0.0};
    qsort(pairs, (size_t)V, sizeof *pairs, by_value_desc);
    int n = V;
    if (top_k > 0 && top_k < V) { /* HF removes values < the k-th largest: ties survive */
        n = top_k;
        while (n < V && pairs[n].value == pairs[top_k - 1].value) n++;
    }
    /* softmax over the survivors in double (the draw below is fp32) */
    double sum = 0, kept = 0;
    for (int r = 0; r < n; r++) sum += (pairs[r].prob = exp((double)pairs[r].value - pairs[0].value));
    for (int r = 0; r < n; r++) pairs[r].prob /= sum;
    if (top_p < 1.0f) n = nucleus(pairs, n, top_p);
    for (int r = 0; r < n; r++) kept += pairs[r].prob;
    for (int r = 0; r < n; r++) {
        s->ids[r] = pairs[r].id;
        s->probs[r] = (float)(pairs[r].prob / kept);
    }
    s->n_kept = n;
}

static int32_t argmax(const float *logits, int V) {
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

int32_t rs_sampler_next(rs_sampler *s, const float *logits, const rs_gen_params *p, rs_rng *rng) {
    if (p->temperature <= 0.0f) return argmax(logits, s->vocab);
    rs_sampler_filter(s, logits, p->temperature, p->top_k, p->top_p);
    float u = rs_rng_uniform(rng), cum = 0;
    for (int r = 0; r < s->n_kept; r++) {
        cum += s->probs[r];
        if (u < cum) return s->ids[r];
    }
    return s->ids[s->n_kept - 1]; /* u within rounding of 1 */
}
