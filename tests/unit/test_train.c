/* train layer pieces on their own: schedule, AdamW list and masks, clipping, SNIP selection and
 * mask decomposition, DPO loss math, batches, data order, metrics log, JSONL errors. */
#include "resafe/checkpoint.h"
#include "resafe/dpo.h"
#include "resafe/snip.h"
#include "resafe/train.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- schedule */

TEST(test_lr_schedule_warmup_then_linear_cosine_constant) {
    rs_lr_schedule s = {RS_SCHED_COSINE, 1e-3, 4, 14};
    CHECK_NEAR(rs_lr_at(&s, 0), 0.25e-3, 1e-15); /* the first step already moves */
    CHECK_NEAR(rs_lr_at(&s, 3), 1e-3, 1e-15);
    CHECK_NEAR(rs_lr_at(&s, 4), 1e-3, 1e-15); /* decay starts at full lr */
    CHECK_NEAR(rs_lr_at(&s, 9), 0.5e-3, 1e-15); /* halfway: cos(pi/2) */
    CHECK_NEAR(rs_lr_at(&s, 14), 0, 1e-15);
    s.kind = RS_SCHED_LINEAR;
    CHECK_NEAR(rs_lr_at(&s, 9), 0.5e-3, 1e-15);
    CHECK_NEAR(rs_lr_at(&s, 11), 0.3e-3, 1e-15);
    CHECK_NEAR(rs_lr_at(&s, 100), 0, 1e-15);
    s.kind = RS_SCHED_CONSTANT;
    CHECK_NEAR(rs_lr_at(&s, 13), 1e-3, 1e-15);
    rs_sched_kind k;
    CHECK(rs_sched_kind_from_name("cosine", &k) == 0 && k == RS_SCHED_COSINE, "cosine");
    CHECK(rs_sched_kind_from_name("Cosine", &k) == -1, "names are exact");
}

/* ---------------------------------------------------------------- AdamW list */

/* AdamW in double as torch.optim.AdamW writes it (decoupled decay, bias correction). */
static void adamw_ref(double *p, double g, double *m, double *v, double lr, double wd, int t) {
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    *m = b1 * *m + (1 - b1) * g;
    *v = b2 * *v + (1 - b2) * g * g;
    double mh = *m / (1 - pow(b1, t)), vh = *v / (1 - pow(b2, t));
    *p -= lr * (mh / (sqrt(vh) + eps) + wd * *p);
}

TEST(test_optim_masked_entries_and_moments_bit_unchanged_unmasked_follow_adamw) {
    const rs_backend *be = rs_backend_cpu();
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    enum { N = 517 };
    float *p = be->alloc(N * 4), *g = be->alloc(N * 4), p0[N];
    uint8_t *mask = be->alloc(N);
    double pr[N], mr[N] = {0}, vr[N] = {0};
    for (int i = 0; i < N; i++) {
        p[i] = p0[i] = rs_rng_normal(&r);
        pr[i] = p[i];
        mask[i] = rs_rng_uniform(&r) < 0.6f;
    }
    rs_optim o;
    rs_optim_init(&o, be, 0.9f, 0.999f, 1e-8f, 0.01f);
    rs_optim_add(&o, "x", p, g, mask, N, 1);
    rs_optim_alloc(&o);
    for (int step = 1; step <= 10; step++) {
        for (int i = 0; i < N; i++) g[i] = rs_rng_normal(&r);
        float scale = step % 2 ? 1.0f : 0.5f;
        rs_optim_step(&o, 1e-2, scale);
        for (int i = 0; i < N; i++)
            if (mask[i]) adamw_ref(&pr[i], (double)(g[i] * scale), &mr[i], &vr[i], 1e-2, 0.01, step);
    }
    CHECK(o.step == 10, "step %d", o.step);
    const rs_optim_param *q = rs_optim_find(&o, "x");
    REQUIRE(q, "find");
    int moved = 0;
    for (int i = 0; i < N; i++) {
        if (!mask[i]) {
            CHECK(memcmp(&p[i], &p0[i], 4) == 0 && q->m[i] == 0 && q->v[i] == 0 &&
                      !signbit(q->m[i]) && !signbit(q->v[i]),
                  "masked entry %d moved", i);
        } else {
            moved += p[i] != p0[i];
            /* fp32 AdamW vs double: 10 steps of lr 1e-2, each exact to ~1e-7 relative */
            CHECK_NEAR(p[i], pr[i], 1e-5);
        }
    }
    CHECK(moved > N / 3, "only %d entries moved", moved);
    rs_optim_free(&o);
    be->free(p), be->free(g), be->free(mask);
}

TEST(test_grad_norm_and_clip_factor) {
    const rs_backend *be = rs_backend_cpu();
    float *a = be->alloc(3 * 4), *b = be->alloc(2 * 4), *pa = be->alloc(12), *pb = be->alloc(8);
    a[0] = 1, a[1] = 2, a[2] = 2, b[0] = 0, b[1] = 4; /* norm sqrt(1+4+4+16) = 5 */
    rs_optim o;
    rs_optim_init(&o, be, 0.9f, 0.999f, 1e-8f, 0);
    rs_optim_add(&o, "a", pa, a, NULL, 3, 1);
    rs_optim_add(&o, "b", pb, b, NULL, 2, 0);
    rs_optim_alloc(&o);
    CHECK_NEAR(rs_optim_grad_norm(&o), 5.0, 1e-12);
    CHECK_NEAR(rs_clip_factor(5.0, 1.0), 1.0 / (5.0 + 1e-6), 1e-7);
    CHECK(rs_clip_factor(5.0, 10.0) == 1.0f, "no clip below the limit");
    CHECK(rs_clip_factor(5.0, 0) == 1.0f, "clip 0 is off");
    rs_optim_zero_grads(&o);
    CHECK(rs_optim_grad_norm(&o) == 0, "zeroed");
    rs_optim_free(&o);
    be->free(a), be->free(b), be->free(pa), be->free(pb);
}

/* ---------------------------------------------------------------- SNIP selection */

static const float *g_sort_scores;
static int by_score_then_index(const void *x, const void *y) {
    size_t i = *(const size_t *)x, j = *(const size_t *)y;
    float a = g_sort_scores[i], b = g_sort_scores[j];
    if (a != b) return a > b ? -1 : 1;
    return i < j ? -1 : i > j;
}

TEST(test_snip_top_k_equals_first_k_of_a_full_sort_ties_by_index) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    for (int trial = 0; trial < 40; trial++) {
        size_t n = 1 + rs_rng_next(&r) % 3000;
        float *s = rs_malloc(n * 4);
        int levels = trial % 3 == 0 ? 5 : 1 << 20; /* many ties, or few */
        for (size_t i = 0; i < n; i++) {
            s[i] = (float)(rs_rng_next(&r) % (uint64_t)levels) * 0.37f;
            if (trial % 4 == 1) s[i] = ldexpf(rs_rng_uniform(&r), -(int)(rs_rng_next(&r) % 120));
        }
        double tau = rs_rng_uniform(&r);
        size_t k = rs_snip_count(tau, n);
        uint8_t *sel = rs_malloc(n), *want = rs_calloc(n, 1);
        float t;
        REQUIRE(rs_snip_top_k(s, n, k, sel, &t) == 0, "%s", rs_last_error());
        size_t *order = rs_malloc(n * sizeof *order);
        for (size_t i = 0; i < n; i++) order[i] = i;
        g_sort_scores = s;
        qsort(order, n, sizeof *order, by_score_then_index);
        for (size_t i = 0; i < k; i++) want[order[i]] = 1;
        CHECK(memcmp(sel, want, n) == 0, "trial %d: n %zu k %zu: selection differs from the sort",
              trial, n, k);
        if (k > 0) CHECK(t == s[order[k - 1]], "threshold %g, k-th largest %g", t, s[order[k - 1]]);
        free(s), free(sel), free(want), free(order);
    }
}

TEST(test_snip_count_rounds_half_up_and_rejects_nan_scores) {
    CHECK(rs_snip_count(0.6, 10) == 6, "0.6 of 10");
    CHECK(rs_snip_count(0.25, 2) == 1, "0.5 rounds up");
    CHECK(rs_snip_count(1.0, 7) == 7, "all");
    CHECK(rs_snip_count(1e-9, 7) == 0, "none");
    float s[3] = {1, NAN, 2};
    uint8_t sel[3];
    CHECK(rs_snip_top_k(s, 3, 1, sel, NULL) == -1, "NaN score accepted");
    CHECK(strstr(rs_last_error(), "finite") != NULL, "message: %s", rs_last_error());
}

TEST(test_snip_decompose_rows_of_B_and_columns_of_A_by_majority) {
    /* M [3, 4]: row 0 all, row 1 two of four (= 0.5: trains), row 2 one; columns 0: 3/3,
     * 1: 2/3, 2: 1/3, 3: 1/3 */
    const uint8_t M[12] = {1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0};
    uint8_t A[2 * 4], B[3 * 2];
    rs_snip_decompose(M, 3, 4, 2, 0.5, A, B);
    const uint8_t wantB[6] = {1, 1, 1, 1, 0, 0}, wantA[8] = {1, 1, 0, 0, 1, 1, 0, 0};
    CHECK(memcmp(B, wantB, 6) == 0, "B rows");
    CHECK(memcmp(A, wantA, 8) == 0, "A columns");
    rs_snip_decompose(M, 3, 4, 2, 1.0, A, B);
    CHECK(B[0] && !B[2] && !B[4] && A[0] && !A[1], "threshold 1: only full rows/columns");
}

/* ---------------------------------------------------------------- DPO loss */

/* A patch set's pairs are cut as the JSONL path cuts them: responses only, to max_len tokens;
 * a prompt that leaves no room is an error naming the pair. */
TEST(test_pref_truncate_cuts_responses_counts_them_and_refuses_full_prompts) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    int n = 12, max_len = 9, want_cut = 0, want_max = 0;
    rs_pref_set set;
    rs_pref_alloc(&set, n);
    for (int i = 0; i < n; i++) {
        int np = 1 + (int)(rs_rng_next(&r) % 8); /* 1 .. 8 < max_len */
        rs_seq *s[2] = {&set.chosen[i], &set.rejected[i]};
        int longest = 0;
        for (int k = 0; k < 2; k++) {
            int nr = 1 + (int)(rs_rng_next(&r) % 6);
            s[k]->n_prompt = np, s[k]->n = np + nr;
            s[k]->ids = malloc((size_t)s[k]->n * sizeof *s[k]->ids);
            for (int t = 0; t < s[k]->n; t++) s[k]->ids[t] = t;
            want_cut += s[k]->n > max_len;
            int kept = s[k]->n > max_len ? max_len : s[k]->n;
            longest = kept > longest ? kept : longest;
        }
        want_max = longest > want_max ? longest : want_max;
    }
    CHECK(rs_pref_truncate(&set, max_len, "x.h5") == want_cut, "cut count");
    CHECK(set.max_len == want_max && set.n_truncated == want_cut, "max_len %d", set.max_len);
    for (int i = 0; i < n; i++)
        CHECK(set.chosen[i].n <= max_len && set.rejected[i].n <= max_len, "pair %d", i);
    CHECK(rs_pref_truncate(&set, max_len, "x.h5") == 0, "a second cut changes nothing");
    set.chosen[3].n_prompt = set.rejected[3].n_prompt = max_len; /* (lengths only: ids unread) */
    set.chosen[3].n = set.rejected[3].n = max_len;
    CHECK(rs_pref_truncate(&set, max_len, "x.h5") == -1 &&
              strstr(rs_last_error(), "x.h5: pair 3") != NULL,
          "%s", rs_last_error());
    rs_pref_free(&set);
}

TEST(test_dpo_pair_loss_matches_log_sigmoid_and_its_derivative) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    for (int i = 0; i < 200; i++) {
        double beta = 0.01 + rs_rng_uniform(&r), pw = -50 * rs_rng_uniform(&r),
               pl = -50 * rs_rng_uniform(&r), rw = -50 * rs_rng_uniform(&r),
               rl = -50 * rs_rng_uniform(&r);
        rs_dpo_pair out;
        rs_dpo_pair_loss(beta, pw, pl, rw, rl, &out);
        double z = (pw - rw) - (pl - rl);
        CHECK_NEAR(out.loss, -log(1 / (1 + exp(-beta * z))), 1e-12);
        double h = 1e-6, lp, lm;
        rs_dpo_pair tmp;
        rs_dpo_pair_loss(beta, pw + h, pl, rw, rl, &tmp), lp = tmp.loss;
        rs_dpo_pair_loss(beta, pw - h, pl, rw, rl, &tmp), lm = tmp.loss;
        CHECK_NEAR(out.d_chosen, (lp - lm) / (2 * h), 1e-7);
        CHECK(out.d_rejected == -out.d_chosen, "antisymmetric");
        CHECK_NEAR(out.reward_chosen - out.reward_rejected, beta * z, 1e-12);
    }
    rs_dpo_pair big;
    rs_dpo_pair_loss(1, -1e6, 0, 0, 0, &big); /* z = -1e6: loss ~ 1e6, no overflow */
    CHECK_NEAR(big.loss, 1e6, 1e-6);
    CHECK_NEAR(big.d_chosen, -1, 1e-12);
    rs_dpo_pair_loss(1, 1e6, 0, 0, 0, &big);
    CHECK(big.loss >= 0 && big.loss < 1e-300 && big.d_chosen <= 0, "z = 1e6: loss %g", big.loss);
}

/* ---------------------------------------------------------------- batches and data order */

TEST(test_batch_targets_cover_response_tokens_only) {
    int32_t a[] = {1, 5, 6, 7, 8}, b[] = {1, 9, 10};
    rs_seq sa = {a, 5, 3}, sb = {b, 3, 1};
    const rs_seq *seqs[] = {&sa, &sb};
    rs_batch_buf bb;
    rs_batch_buf_init(&bb, 2, 6);
    long n_targets;
    const rs_train_batch *bt = rs_batch_fill(&bb, seqs, 2, &n_targets);
    CHECK(bt->B == 2 && bt->T == 5, "shape %d x %d", bt->B, bt->T);
    const int32_t want_t[] = {-1, -1, 7, 8, -1, 9, 10, -1, -1, -1};
    const int32_t want_p[] = {0, 1, 2, 3, 4, 0, 1, 2, -1, -1};
    CHECK(memcmp(bt->targets, want_t, sizeof want_t) == 0, "targets");
    CHECK(memcmp(bt->pos, want_p, sizeof want_p) == 0, "positions");
    CHECK(n_targets == 4, "n_targets %ld", n_targets);
    rs_batch_buf_free(&bb);
}

/* A packed pair batch holds, sequence by sequence, the same tokens, positions and targets as
 * rs_batch_fill's: prefix rows then own rows, read back through prefix_of; the prefix is the
 * pair's common start up to before the last prompt token, and no prefix row has a target. */
TEST(test_pair_batch_shares_prompts_and_keeps_every_target) {
    rs_rng r;
    rs_rng_seed(&r, rs_test_seed());
    for (int trial = 0; trial < 40; trial++) {
        int k = 1 + (int)(rs_rng_next(&r) % 4), max_T = 0, lcp_want[4];
        rs_seq seq[8];
        const rs_seq *seqs[8];
        for (int i = 0; i < k; i++) {
            int np = 1 + (int)(rs_rng_next(&r) % 6), diff = rs_rng_next(&r) % 4 == 0;
            for (int s = 0; s < 2; s++) {
                rs_seq *q = &seq[s * k + i];
                q->n_prompt = np;
                q->n = np + 1 + (int)(rs_rng_next(&r) % 7);
                q->ids = rs_malloc((size_t)q->n * sizeof *q->ids);
                for (int t = 0; t < q->n; t++) /* the rejected prompt differs at np / 2 */
                    q->ids[t] = t >= np                       ? (int32_t)(rs_rng_next(&r) % 50)
                                : s && diff && t == np / 2 ? 1000 + i
                                                              : 100 * i + t;
                max_T = q->n > max_T ? q->n : max_T;
                seqs[s * k + i] = q;
            }
            lcp_want[i] = diff ? np / 2 : np - 1; /* the first differing prompt token */
        }
        rs_batch_buf bb, bw;
        rs_batch_buf_init(&bb, 2 * k, max_T);
        rs_batch_buf_init(&bw, 2 * k, max_T);
        const rs_train_batch *w = rs_batch_fill(&bw, seqs, 2 * k, NULL);
        const rs_train_batch *p = rs_batch_fill_pairs(&bb, seqs, k);
        int shared = 0, TP = 1, T = 1;
        for (int i = 0; i < k; i++) {
            shared += lcp_want[i] > 0;
            TP = lcp_want[i] > TP ? lcp_want[i] : TP;
            for (int s = 0; s < 2; s++) {
                int own = seqs[s * k + i]->n - lcp_want[i];
                T = own > T ? own : T;
            }
        }
        long rows_w = (long)w->B * w->T, rows = (long)shared * TP + 2L * k * T;
        /* not packed exactly when nothing is shared or packing would not save rows */
        CHECK(!p == (shared == 0 || rows >= rows_w), "trial %d: packed %d, %d shared, rows %ld "
              "against %ld", trial, p != NULL, shared, rows, rows_w);
        if (!p) goto next;
        CHECK(p->B == 2 * k && p->n_prefix == shared, "trial %d: %d x %d, %d prefixes", trial,
              p->B, p->T, p->n_prefix);
        CHECK((long)p->n_prefix * p->T_prefix + (long)p->B * p->T < rows_w, "no rows saved");
        for (int b = 0; b < 2 * k; b++) {
            int pre = p->prefix_of[b], i = b % k, L = 0;
            CHECK((pre >= 0) == (lcp_want[i] > 0), "sequence %d: prefix %d", b, pre);
            if (pre >= 0) {
                CHECK(p->prefix_of[i] == pre && p->prefix_of[k + i] == pre, "pair %d split", i);
                while (L < p->T_prefix && p->prefix_pos[pre * p->T_prefix + L] >= 0) L++;
                CHECK(L == lcp_want[i], "pair %d: prefix of %d tokens, want %d", i, L, lcp_want[i]);
            }
            for (int g = 0; g < w->T; g++) { /* g: the index in the whole sequence */
                int32_t wt = w->tokens[b * w->T + g], wp = w->pos[b * w->T + g];
                int32_t wg = w->targets[b * w->T + g];
                if (wp < 0) continue;
                int32_t tok, pos, tg;
                if (g < L) {
                    tok = p->prefix_tokens[pre * p->T_prefix + g];
                    pos = p->prefix_pos[pre * p->T_prefix + g], tg = -1;
                } else {
                    int j = b * p->T + (g - L);
                    tok = p->tokens[j], pos = p->pos[j], tg = p->targets[j];
                }
                CHECK(tok == wt && pos == wp && tg == wg, "trial %d seq %d token %d: (%d %d %d) "
                      "want (%d %d %d)", trial, b, g, tok, pos, tg, wt, wp, wg);
            }
            for (int t = seqs[b]->n - L; t < p->T; t++)
                CHECK(p->pos[b * p->T + t] == -1 && p->targets[b * p->T + t] == -1, "padding");
        }
    next:
        rs_batch_buf_free(&bb), rs_batch_buf_free(&bw);
        for (int s = 0; s < 2 * k; s++) rs_seq_free(&seq[s]);
    }
}

TEST(test_data_order_epochs_are_permutations_and_seeded) {
    rs_data_order a, b;
    rs_data_order_init(&a, 10, 7);
    rs_data_order_init(&b, 10, 7);
    CHECK(rs_batches_per_epoch(10, 3) == 3 && rs_batches_per_epoch(2, 3) == 1, "batches/epoch");
    int32_t x[3], y[3];
    int seen[10] = {0};
    for (int i = 0; i < 3; i++) {
        CHECK(rs_data_order_next(&a, 3, x) == 3, "size");
        rs_data_order_next(&b, 3, y);
        CHECK(memcmp(x, y, sizeof x) == 0, "same seed, same order");
        for (int j = 0; j < 3; j++) seen[x[j]]++;
    }
    for (int i = 0; i < 10; i++) CHECK(seen[i] <= 1, "index %d twice in an epoch", i);
    CHECK(a.epoch == 0, "epoch %lld", (long long)a.epoch);
    rs_data_order_next(&a, 3, x); /* one left over: dropped, a new epoch starts */
    CHECK(a.epoch == 1 && a.cursor == 3, "epoch %lld cursor %lld", (long long)a.epoch,
          (long long)a.cursor);
    rs_data_order c;
    rs_data_order_init(&c, 2, 7);
    CHECK(rs_data_order_next(&c, 5, x) == 2 && rs_data_order_next(&c, 5, x) == 2,
          "a set smaller than a batch is one batch");
    rs_data_order_free(&a), rs_data_order_free(&b), rs_data_order_free(&c);
}

/* ---------------------------------------------------------------- logs and data files */

TEST(test_metrics_log_resume_cuts_back_to_the_checkpoint) {
    char *path = rs_path_join(rs_test_tmpdir(), "metrics.jsonl");
    rs_metrics_log l;
    REQUIRE(rs_metrics_open(&l, path, 0) == 0, "%s", rs_last_error());
    rs_metrics_write(&l, "{\"step\":1}");
    int64_t keep = l.bytes;
    rs_metrics_write(&l, "{\"step\":2}");
    rs_metrics_close(&l);
    REQUIRE(rs_metrics_open(&l, path, keep) == 0, "%s", rs_last_error());
    rs_metrics_write(&l, "{\"step\":2,\"again\":1}");
    rs_metrics_close(&l);
    char *text;
    REQUIRE(rs_read_file(path, &text, NULL) == 0, "read");
    CHECK(strcmp(text, "{\"step\":1}\n{\"step\":2,\"again\":1}\n") == 0, "got '%s'", text);
    free(text);
    CHECK(rs_metrics_open(&l, path, 1000) == -1, "a log shorter than the checkpoint's is an error");
    free(path);
}

static int count_lines(void *user, const struct cJSON *obj, const char *path, int line) {
    const char *s;
    RS_TRY(rs_json_get_string(obj, "prompt", path, line, &s));
    (*(int *)user)++;
    return 0;
}

TEST(test_jsonl_errors_name_file_and_line) {
    char *path = rs_path_join(rs_test_tmpdir(), "data.jsonl");
    struct {
        const char *text, *want;
    } cases[] = {
        {"{\"prompt\": \"a\"}\n\n{\"prompt\": \"b\"}\n", NULL},
        {"{\"prompt\": \"a\"}\n[1, 2]\n", "data.jsonl:2: not a JSON object"},
        {"{\"prompt\": \"a\"} x\n", "data.jsonl:1: not a JSON object"},
        {"{\"prompt\": 3}\n", "data.jsonl:1: \"prompt\" is not a string"},
        {"\n{\"other\": \"a\"}\n", "data.jsonl:2: no \"prompt\" member"},
        {"{\"prompt\": \"a\"\n", "data.jsonl:1: not a JSON object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        REQUIRE(rs_write_file_atomic(path, cases[i].text, strlen(cases[i].text)) == 0, "write");
        int n = 0, rc = rs_jsonl_each(path, count_lines, &n);
        if (!cases[i].want) CHECK(rc == 0 && n == 2, "case %zu: rc %d n %d: %s", i, rc, n, rs_last_error());
        else CHECK(rc == -1 && strstr(rs_last_error(), cases[i].want), "case %zu: %s", i, rs_last_error());
    }
    free(path);
}
