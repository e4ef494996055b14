/* sampler: draws follow the filtered distribution; greedy takes the first maximum. */
#include "resafe/generate.h"
#include "test.h"

#include <string.h>

TEST(test_generate_sampler_draws_follow_the_filtered_probabilities) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    int V = 37, draws = 40000;
    float logits[37];
    for (int i = 0; i < V; i++) logits[i] = 1.5f * rs_rng_normal(&r);
    rs_gen_params p;
    memset(&p, 0, sizeof p);
    p.temperature = 0.8f, p.top_k = 10, p.top_p = 0.9f;
    rs_sampler s;
    rs_sampler_init(&s, V);
    rs_sampler_filter(&s, logits, p.temperature, p.top_k, p.top_p);
    float prob_of[37] = {0};
    for (int k = 0; k < s.n_kept; k++) prob_of[s.ids[k]] = s.probs[k];
    int count[37] = {0};
    rs_rng draw;
    rs_rng_seed(&draw, rs_test_seed() + 1);
    for (int i = 0; i < draws; i++) count[rs_sampler_next(&s, logits, &p, &draw)]++;
    for (int i = 0; i < V; i++) {
        double want = prob_of[i] * draws, sd = sqrt(draws * prob_of[i] * (1 - prob_of[i]));
        /* 5 standard deviations (+1 for the discreteness): a false alarm is ~1e-6 per token */
        CHECK(fabs(count[i] - want) <= 5 * sd + 1, "token %d: %d draws, expected %.1f", i, count[i], want);
        if (prob_of[i] == 0) CHECK(count[i] == 0, "filtered token %d drawn %d times", i, count[i]);
    }
    CHECK(s.n_kept >= 1 && s.n_kept <= 10, "kept %d of top-10", s.n_kept);
    rs_sampler_free(&s);
}

TEST(test_generate_greedy_takes_the_first_maximum) {
    float logits[6] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, 2.0f};
    rs_gen_params p;
    memset(&p, 0, sizeof p);
    rs_sampler s;
    rs_sampler_init(&s, 6);
    rs_rng r;
    rs_rng_seed(&r, 1);
    CHECK(rs_sampler_next(&s, logits, &p, &r) == 1, "argmax should be the first of the tied maxima");
    rs_sampler_free(&s);
}
