/* progress: one progress display per long stage (generation, training, evaluation).
 *
 * On a terminal (stderr is a tty, [run] progress = auto or bar) a single line is redrawn:
 *   "triplets  [#########.......]  412/1024 prompts  1830 tok/s  ETA 0:41"
 * otherwise (logs) a plain line is printed at most every 10 seconds and at the end:
 *   "triplets: 412/1024 prompts (40%), 1830 tok/s, ETA 41 s"
 * Nothing is printed with [run] progress = off or when the log level is below info. */
#ifndef RESAFE_PROGRESS_H
#define RESAFE_PROGRESS_H

#include <stdint.h>

typedef enum { RS_PROGRESS_AUTO = 0, RS_PROGRESS_BAR, RS_PROGRESS_LINES, RS_PROGRESS_OFF } rs_progress_mode;

/* Process-wide display mode (set once from [run] progress by the command). */
void rs_progress_set_mode(rs_progress_mode mode);
/* "auto|bar|lines|off" -> mode; -1 when unknown. */
int rs_progress_mode_from_name(const char *name, rs_progress_mode *out);
/* rs_progress_set_mode by name ([run] progress); an unknown name changes nothing. */
void rs_progress_set_mode_name(const char *name);

typedef struct {
    char stage[32], unit[16];
    int64_t total, done;
    long long tokens;
    double t0, last_print;
    int bar;     /* redrawn line */
    int active;  /* something is shown */
} rs_progress;

/* Start a display for `total` items of `unit` ("prompts", "steps"); total 0 = unknown. */
void rs_progress_start(rs_progress *p, const char *stage, const char *unit, int64_t total);
/* Items done so far and tokens processed so far (for tok/s; 0 when not meaningful). */
void rs_progress_update(rs_progress *p, int64_t done, long long tokens);
/* Final line (the bar is completed and ended with a newline). */
void rs_progress_end(rs_progress *p);

#endif
