/* progress.h — progress reporting for long work (import, replay, queries).
 *
 * On a terminal: one line redrawn in place (bar, percent, rate, ETA).
 * Elsewhere (a log, a pipe): a plain line at most every 2 s, so logs
 * stay readable.  Updates are throttled; calling progress_update per
 * item is cheap.  All output goes to the FILE given (stderr normally).
 */
#ifndef TM_PROGRESS_H
#define TM_PROGRESS_H

#include <stdint.h>
#include <stdio.h>

typedef struct progress progress;

/* total = size of the work in `done` units (bytes, events); 0 = unknown.
 * unit names what is counted in `items` ("events"). quiet = print nothing. */
progress *progress_new(FILE *out, const char *what, uint64_t total, const char *unit, int quiet);
/* done: work units so far (of total); items: things processed so far. */
void progress_update(progress *p, uint64_t done, uint64_t items);
/* Clear the progress line (on a terminal) and free p.  NULL is fine. */
void progress_end(progress *p);
/* Seconds since progress_new (monotonic). */
double progress_elapsed(const progress *p);

#endif
