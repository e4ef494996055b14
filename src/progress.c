/* progress: the per-stage progress display (include/resafe/progress.h). */
#include "resafe/progress.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "resafe/core.h"

static rs_progress_mode g_mode = RS_PROGRESS_AUTO;

void rs_progress_set_mode(rs_progress_mode mode) { g_mode = mode; }

int rs_progress_mode_from_name(const char *name, rs_progress_mode *out) {
    static const char *names[] = {"auto", "bar", "lines", "off"};
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0) {
            *out = (rs_progress_mode)i;
            return 0;
        }
    return -1;
}

void rs_progress_set_mode_name(const char *name) {
    rs_progress_mode m;
    if (rs_progress_mode_from_name(name, &m) == 0) g_mode = m;
}

static void eta_text(double s, char *buf, size_t n) {
    if (s < 0 || s > 360000) {
        snprintf(buf, n, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

static void show(rs_progress *p, int final) {
    double now = rs_now(), el = now - p->t0;
    double rate = el > 0 ? (double)p->tokens / el : 0;
    double eta = (p->total > 0 && p->done > 0) ? el * (double)(p->total - p->done) / (double)p->done
                                               : -1;
    char et[32], tok[48] = "";
    eta_text(final ? el : eta, et, sizeof et);
    if (p->tokens > 0) snprintf(tok, sizeof tok, "  %.0f tok/s", rate);
    if (p->bar) {
        char bar[25];
        int w = 24, f = p->total > 0 ? (int)((double)w * (double)p->done / (double)p->total) : 0;
        for (int i = 0; i < w; i++) bar[i] = i < f ? '#' : '.';
        bar[w] = '\0';
        fprintf(stderr, "\r%-10s [%s] %lld/%lld %s%s  %s %s\033[K", p->stage, bar,
                (long long)p->done, (long long)p->total, p->unit, tok, final ? "in" : "ETA", et);
        if (final) fputc('\n', stderr);
    } else {
        int pct = p->total > 0 ? (int)(100.0 * (double)p->done / (double)p->total) : 0;
        fprintf(stderr, "resafe: %s: %lld/%lld %s (%d%%)%s%s, %s %s\n", p->stage,
                (long long)p->done, (long long)p->total, p->unit, pct, p->tokens > 0 ? "," : "",
                tok[0] ? tok + 1 : "", final ? "took" : "ETA", et);
    }
    fflush(stderr);
    p->last_print = now;
}

void rs_progress_start(rs_progress *p, const char *stage, const char *unit, int64_t total) {
    memset(p, 0, sizeof *p);
    snprintf(p->stage, sizeof p->stage, "%s", stage);
    snprintf(p->unit, sizeof p->unit, "%s", unit);
    p->total = total;
    p->t0 = p->last_print = rs_now();
    if (g_mode == RS_PROGRESS_OFF || rs_get_log_level() < RS_LOG_INFO) return;
    p->active = 1;
    p->bar = g_mode == RS_PROGRESS_BAR || (g_mode == RS_PROGRESS_AUTO && isatty(2));
    if (p->bar) show(p, 0);
}

void rs_progress_update(rs_progress *p, int64_t done, long long tokens) {
    p->done = done;
    p->tokens = tokens;
    if (!p->active) return;
    double now = rs_now();
    if (p->bar ? now - p->last_print >= 0.2 : now - p->last_print >= 10.0) show(p, 0);
}

void rs_progress_end(rs_progress *p) {
    if (p->active) show(p, 1);
    p->active = 0;
}
