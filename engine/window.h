/* window.h — event-time windows with a watermark (tumbling, hopping,
 * session), aggregating count / sum / min / max of the values added.
 *
 * Times are integer milliseconds (|t| <= 2^53).  The watermark is the
 * largest event time seen minus the allowed lateness.  A window [start,
 * end) is open until the watermark reaches end; then it closes: it is
 * queued once for window_take_closed (emit-on-close) and kept queryable
 * among the last `retain` closed windows.  An event that belongs to a
 * window already closed is LATE: it is counted (window_late) instead of
 * being dropped silently.  State is a deterministic function of the input
 * sequence and serialises canonically.  See window.c for the details.
 */
#ifndef TM_WINDOW_H
#define TM_WINDOW_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"

enum { WINDOW_TUMBLING = 1, WINDOW_HOPPING = 2, WINDOW_SESSION = 3 };

#define WINDOW_MAX_TIME (1LL << 53)   /* |time|, sizes, lateness */
#define WINDOW_MAX_HOPS 1000          /* hopping: size / hop */
#define WINDOW_MAX_OPEN 100000        /* limit for cfg.max_open */
#define WINDOW_MAX_RETAIN 100000      /* limit for cfg.retain */
#define WINDOW_MAX_PENDING 4096       /* closed, not yet taken: oldest dropped */
#define WINDOW_DEFAULT_RETAIN 16
#define WINDOW_DEFAULT_MAX_OPEN 4096

typedef struct window_cfg {
    int kind;          /* WINDOW_* */
    int64_t size;      /* tumbling, hopping: window length (ms, >= 1) */
    int64_t hop;       /* hopping: step (1..size, size/hop <= WINDOW_MAX_HOPS) */
    int64_t gap;       /* session: inactivity gap that ends a session */
    int64_t lateness;  /* allowed lateness (>= 0) */
    uint32_t retain;   /* closed windows kept queryable */
    uint32_t max_open; /* open windows; beyond it the oldest closes early */
} window_cfg;

typedef struct window_agg {
    int64_t start, end; /* [start, end) */
    uint64_t count;
    double sum, min, max;
    int closed;
} window_agg;

typedef struct window window;

/* Fill cfg with defaults for kind (sizes left 0 for the caller). */
void window_cfg_init(window_cfg *cfg, int kind);
window *window_new(const window_cfg *cfg, tm_err *e);
void window_free(window *w);
const window_cfg *window_config(const window *w);

/* Add value v (finite) at event time t.  Returns the number of windows the
 * event went into (0: late), or -1 + e for a bad time or value. */
int window_add(window *w, int64_t t, double v, tm_err *e);

/* Open and retained closed windows: window_count() of them, written to
 * out (room for window_count()) sorted by start; returns the count. */
size_t window_count(const window *w);
size_t window_list(const window *w, window_agg *out);
/* Windows closed and not yet taken (emit-on-close), at most
 * WINDOW_MAX_PENDING. */
size_t window_pending(const window *w);
/* Move up to max of them, oldest first, to out; returns how many. */
size_t window_take_closed(window *w, window_agg *out, size_t max);
size_t window_open_count(const window *w);

/* 1 and *wm when at least one event was seen, else 0. */
int window_watermark(const window *w, int64_t *wm);
/* 1 and *t = the largest event time seen, else 0. */
int window_max_time(const window *w, int64_t *t);
void window_late(const window *w, uint64_t *count, double *sum);
uint64_t window_dropped(const window *w); /* closed windows lost to the pending cap */

/* Canonical serialisation (magic "TMWN", v1). */
void window_serialize(const window *w, buf *out);
window *window_deserialize(const char *p, size_t n, tm_err *e);

#endif
