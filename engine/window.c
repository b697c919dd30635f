/* window.c — event-time windows with a watermark and allowed lateness.
 *
 * Design (the Dataflow model: Akidau et al., "The Dataflow Model", VLDB
 * 2015; the window kinds and grace periods of Flink and Kafka Streams):
 *  - Tumbling(size): windows [k*size, (k+1)*size).  Hopping(size, hop):
 *    windows [k*hop, k*hop + size), so an event lies in ceil(size/hop) of
 *    them.  Session(gap): each event opens [t, t + gap); overlapping
 *    intervals merge (strict overlap: events exactly `gap` apart are in
 *    different sessions), so a session is [first, last + gap).
 *  - Watermark wm = max event time seen - lateness.  After every add, open
 *    windows with end <= wm close, oldest first: each is appended to the
 *    pending queue (taken once by window_take_closed, capped at
 *    WINDOW_MAX_PENDING, oldest dropped and counted) and to the ring of the
 *    last `retain` closed windows.  closed_hwm is the largest end of any
 *    window closed so far.
 *  - Lateness: a tumbling/hopping window [s, e) is closed iff
 *    e <= max(wm, closed_hwm).  An event goes into each of its windows that
 *    is still open; if it misses one or more, it counts once as late
 *    (late count and sum).  A session event is late when its own interval
 *    is already closed (t + gap <= wm) or when it could touch a closed
 *    session (t < closed_hwm): closed sessions are never reopened.
 *  - Bounded memory: at most max_open open windows; creating one more
 *    closes the oldest early (closed_hwm then makes later events for it
 *    late, so a window never closes twice).  Retained and pending windows
 *    are capped as above.
 * Invariants: open windows are sorted by start, disjoint for sessions,
 * all with end > wm; every closed window precedes every open one; each
 * window has count >= 1 and finite min <= max.  Aggregates are exact.
 */
#include "window.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "skio.h"

typedef struct ring {
    window_agg *a;
    uint32_t cap, head, len;
} ring;

struct window {
    window_cfg cfg;
    int seen;            /* any event yet */
    int64_t max_t;       /* largest event time seen */
    int64_t closed_hwm;  /* largest end of a closed window, INT64_MIN if none */
    uint64_t late_count, dropped;
    double late_sum;
    window_agg *open;    /* sorted by start */
    size_t nopen, capopen;
    ring retained, pending;
};

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz);
    if (!p) tm_oom();
    return p;
}

/* --- ring of closed windows ------------------------------------------- */
static void ring_init(ring *r, uint32_t cap) {
    r->a = cap ? xcalloc(cap, sizeof(window_agg)) : NULL;
    r->cap = cap;
    r->head = r->len = 0;
}

/* Append; when full the oldest is dropped (returns 1). */
static int ring_push(ring *r, const window_agg *w) {
    if (!r->cap) return 1;
    int dropped = 0;
    if (r->len == r->cap) {
        r->head = (r->head + 1) % r->cap;
        r->len--;
        dropped = 1;
    }
    r->a[(r->head + r->len) % r->cap] = *w;
    r->len++;
    return dropped;
}

static const window_agg *ring_at(const ring *r, uint32_t i) { return &r->a[(r->head + i) % r->cap]; }

/* --- configuration ------------------------------------------------------ */
void window_cfg_init(window_cfg *cfg, int kind) {
    memset(cfg, 0, sizeof *cfg);
    cfg->kind = kind;
    cfg->retain = WINDOW_DEFAULT_RETAIN;
    cfg->max_open = WINDOW_DEFAULT_MAX_OPEN;
}

static int in_range(int64_t v, int64_t lo) { return v >= lo && v <= WINDOW_MAX_TIME; }

static int cfg_check(const window_cfg *c, tm_err *e) {
    if (c->lateness < 0 || c->lateness > WINDOW_MAX_TIME)
        return err_set(e, TM_EINVAL, "window: lateness must be in [0, 2^53] ms");
    if (c->retain > WINDOW_MAX_RETAIN)
        return err_set(e, TM_EINVAL, "window: retain must be <= %d", WINDOW_MAX_RETAIN);
    if (c->max_open < 1 || c->max_open > WINDOW_MAX_OPEN)
        return err_set(e, TM_EINVAL, "window: max_open must be in [1, %d]", WINDOW_MAX_OPEN);
    switch (c->kind) {
    case WINDOW_TUMBLING:
        if (!in_range(c->size, 1)) return err_set(e, TM_EINVAL, "window: size must be in [1, 2^53] ms");
        if (c->hop || c->gap) return err_set(e, TM_EINVAL, "window: tumbling takes only size");
        return 0;
    case WINDOW_HOPPING:
        if (!in_range(c->size, 1)) return err_set(e, TM_EINVAL, "window: size must be in [1, 2^53] ms");
        if (!in_range(c->hop, 1) || c->hop > c->size)
            return err_set(e, TM_EINVAL, "window: hop must be in [1, size] ms");
        if (c->size / c->hop > WINDOW_MAX_HOPS || (c->size / c->hop == WINDOW_MAX_HOPS && c->size % c->hop))
            return err_set(e, TM_EINVAL, "window: size/hop must be <= %d", WINDOW_MAX_HOPS);
        if (c->gap) return err_set(e, TM_EINVAL, "window: hopping takes size and hop");
        return 0;
    case WINDOW_SESSION:
        if (!in_range(c->gap, 1)) return err_set(e, TM_EINVAL, "window: gap must be in [1, 2^53] ms");
        if (c->size || c->hop) return err_set(e, TM_EINVAL, "window: session takes only gap");
        return 0;
    default:
        return err_set(e, TM_EINVAL, "window: unknown kind %d", c->kind);
    }
}

window *window_new(const window_cfg *cfg, tm_err *e) {
    if (cfg_check(cfg, e) < 0) return NULL;
    window *w = xcalloc(1, sizeof *w);
    w->cfg = *cfg;
    w->closed_hwm = INT64_MIN;
    ring_init(&w->retained, cfg->retain);
    ring_init(&w->pending, WINDOW_MAX_PENDING);
    return w;
}

void window_free(window *w) {
    if (!w) return;
    free(w->open);
    free(w->retained.a);
    free(w->pending.a);
    free(w);
}

const window_cfg *window_config(const window *w) { return &w->cfg; }

/* --- open windows --------------------------------------------------------- */
static int64_t wm_of(const window *w) { return w->seen ? w->max_t - w->cfg.lateness : INT64_MIN; }

static void close_front(window *w) {
    window_agg a = w->open[0];
    a.closed = 1;
    if (a.end > w->closed_hwm) w->closed_hwm = a.end;
    ring_push(&w->retained, &a);
    w->dropped += (uint64_t)ring_push(&w->pending, &a);
    memmove(w->open, w->open + 1, (w->nopen - 1) * sizeof *w->open);
    w->nopen--;
}

static void close_due(window *w) {
    int64_t wm = wm_of(w);
    while (w->nopen && w->open[0].end <= wm) close_front(w);
}

/* First open window with start >= s. */
static size_t find_start(const window *w, int64_t s) {
    size_t lo = 0, hi = w->nopen;
    while (lo < hi) {
        size_t m = (lo + hi) / 2;
        if (w->open[m].start < s) lo = m + 1;
        else hi = m;
    }
    return lo;
}

static void insert_at(window *w, size_t i, int64_t s, int64_t end, double v) {
    if (w->nopen == w->capopen) {
        w->capopen = w->capopen ? w->capopen * 2 : 8;
        w->open = realloc(w->open, w->capopen * sizeof *w->open);
        if (!w->open) tm_oom();
    }
    memmove(w->open + i + 1, w->open + i, (w->nopen - i) * sizeof *w->open);
    w->open[i] = (window_agg){s, end, 1, v, v, v, 0};
    w->nopen++;
}

static void agg_add(window_agg *a, double v) {
    a->count++;
    a->sum += v;
    if (v < a->min) a->min = v;
    if (v > a->max) a->max = v;
}

static int64_t floordiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

static int64_t horizon(const window *w) {
    int64_t wm = wm_of(w);
    return wm > w->closed_hwm ? wm : w->closed_hwm;
}

/* Add v to the fixed-size window [s, s + size); 1 if added, 0 if closed. */
static int add_fixed(window *w, int64_t s, double v) {
    int64_t end = s + w->cfg.size;
    if (end <= horizon(w)) return 0;
    size_t i = find_start(w, s);
    if (i < w->nopen && w->open[i].start == s) {
        agg_add(&w->open[i], v);
        return 1;
    }
    if (w->nopen == w->cfg.max_open) {
        close_front(w);
        if (end <= horizon(w)) return 0;
        i = find_start(w, s);
    }
    insert_at(w, i, s, end, v);
    return 1;
}

static int add_session(window *w, int64_t t, double v) {
    int64_t end = t + w->cfg.gap;
    if (end <= wm_of(w) || t < w->closed_hwm) return 0;
    /* open sessions overlapping [t, end): a contiguous run [i, j) */
    size_t i = find_start(w, t);
    while (i > 0 && w->open[i - 1].end > t) i--;
    size_t j = i;
    while (j < w->nopen && w->open[j].start < end) j++;
    if (i == j) {
        if (w->nopen == w->cfg.max_open) {
            close_front(w);
            if (t < w->closed_hwm) return 0;
            i = find_start(w, t);
        }
        insert_at(w, i, t, end, v);
        return 1;
    }
    window_agg *a = &w->open[i];
    for (size_t k = i + 1; k < j; k++) {
        const window_agg *b = &w->open[k];
        a->count += b->count;
        a->sum += b->sum;
        if (b->min < a->min) a->min = b->min;
        if (b->max > a->max) a->max = b->max;
        if (b->end > a->end) a->end = b->end;
    }
    memmove(w->open + i + 1, w->open + j, (w->nopen - j) * sizeof *w->open);
    w->nopen -= j - i - 1;
    if (t < a->start) a->start = t;
    if (end > a->end) a->end = end;
    agg_add(a, v);
    return 1;
}

int window_add(window *w, int64_t t, double v, tm_err *e) {
    if (t < -WINDOW_MAX_TIME || t > WINDOW_MAX_TIME)
        return err_set(e, TM_EINVAL, "window: time out of range (|t| <= 2^53 ms)");
    if (!isfinite(v)) return err_set(e, TM_EINVAL, "window: value must be a finite number");
    int added = 0, missed = 0;
    if (w->cfg.kind == WINDOW_SESSION) {
        added = add_session(w, t, v);
        missed = !added;
    } else {
        int64_t step = w->cfg.kind == WINDOW_HOPPING ? w->cfg.hop : w->cfg.size;
        int64_t last = floordiv(t, step) * step;
        int64_t first = last;
        while (first - step > t - w->cfg.size) first -= step; /* <= WINDOW_MAX_HOPS steps */
        for (int64_t s = first; s <= last; s += step) {
            if (add_fixed(w, s, v)) added++;
            else missed++;
        }
    }
    if (missed) {
        w->late_count++;
        w->late_sum += v;
    }
    if (!w->seen || t > w->max_t) w->max_t = t;
    w->seen = 1;
    close_due(w);
    return added;
}

/* --- queries ---------------------------------------------------------------- */
static int cmp_start(const void *a, const void *b) {
    const window_agg *x = a, *y = b;
    if (x->start != y->start) return x->start < y->start ? -1 : 1;
    return (x->end > y->end) - (x->end < y->end);
}

size_t window_count(const window *w) { return w->retained.len + w->nopen; }

size_t window_list(const window *w, window_agg *out) {
    size_t j = 0;
    for (uint32_t i = 0; i < w->retained.len; i++) out[j++] = *ring_at(&w->retained, i);
    for (size_t i = 0; i < w->nopen; i++) out[j++] = w->open[i];
    qsort(out, j, sizeof *out, cmp_start);
    return j;
}

size_t window_pending(const window *w) { return w->pending.len; }

size_t window_take_closed(window *w, window_agg *out, size_t max) {
    ring *r = &w->pending;
    size_t n = r->len < max ? r->len : max;
    for (size_t i = 0; i < n; i++) out[i] = *ring_at(r, (uint32_t)i);
    if (n) r->head = (r->head + (uint32_t)n) % r->cap;
    r->len -= (uint32_t)n;
    return n;
}

size_t window_open_count(const window *w) { return w->nopen; }

int window_watermark(const window *w, int64_t *wm) {
    if (!w->seen) return 0;
    *wm = wm_of(w);
    return 1;
}

int window_max_time(const window *w, int64_t *t) {
    if (!w->seen) return 0;
    *t = w->max_t;
    return 1;
}

void window_late(const window *w, uint64_t *count, double *sum) {
    *count = w->late_count;
    *sum = w->late_sum;
}

uint64_t window_dropped(const window *w) { return w->dropped; }

/* --- serialisation ---------------------------------------------------------
 * body: kind, size, hop, gap, lateness, retain, max_open, seen, [max_t],
 * closed_hwm, late_count, late_sum, dropped, then three window lists
 * (open, retained, pending), each: count, then start, end - start, count,
 * sum, min, max per window. */
static void put_list(buf *out, const window_agg *a, size_t n, const ring *r) {
    skio_put_u64(out, n);
    for (size_t i = 0; i < n; i++) {
        const window_agg *x = r ? ring_at(r, (uint32_t)i) : &a[i];
        skio_put_i64(out, x->start);
        skio_put_u64(out, (uint64_t)(x->end - x->start));
        skio_put_u64(out, x->count);
        skio_put_f64(out, x->sum);
        skio_put_f64(out, x->min);
        skio_put_f64(out, x->max);
    }
}

void window_serialize(const window *w, buf *out) {
    size_t start = skio_begin(out, "TMWN", 1);
    const window_cfg *c = &w->cfg;
    skio_put_u64(out, (uint64_t)c->kind);
    skio_put_i64(out, c->size);
    skio_put_i64(out, c->hop);
    skio_put_i64(out, c->gap);
    skio_put_i64(out, c->lateness);
    skio_put_u64(out, c->retain);
    skio_put_u64(out, c->max_open);
    skio_put_u64(out, (uint64_t)w->seen);
    if (w->seen) skio_put_i64(out, w->max_t);
    skio_put_i64(out, w->closed_hwm);
    skio_put_u64(out, w->late_count);
    skio_put_f64(out, w->late_sum);
    skio_put_u64(out, w->dropped);
    put_list(out, w->open, w->nopen, NULL);
    put_list(out, NULL, w->retained.len, &w->retained);
    put_list(out, NULL, w->pending.len, &w->pending);
    skio_end(out, start);
}

/* Read one window; 0 when well-formed for this configuration. */
static int get_agg(skio_rd *rd, const window_cfg *c, window_agg *a, int closed) {
    a->start = skio_i64(rd);
    uint64_t len = skio_u64(rd);
    a->count = skio_u64(rd);
    a->sum = skio_f64(rd);
    a->min = skio_f64(rd);
    a->max = skio_f64(rd);
    a->closed = closed;
    if (rd->bad || a->start < -WINDOW_MAX_TIME || a->start > WINDOW_MAX_TIME ||
        len > 3 * (uint64_t)WINDOW_MAX_TIME || a->count < 1 ||
        !isfinite(a->min) || !isfinite(a->max) || a->min > a->max)
        return -1;
    a->end = a->start + (int64_t)len;
    if (c->kind == WINDOW_SESSION) return (int64_t)len >= c->gap ? 0 : -1;
    int64_t step = c->kind == WINDOW_HOPPING ? c->hop : c->size;
    if ((int64_t)len != c->size || floordiv(a->start, step) * step != a->start) return -1;
    return 0;
}

window *window_deserialize(const char *p, size_t n, tm_err *e) {
    skio_rd rd;
    if (skio_open(&rd, p, n, "TMWN", 1, e) < 0) return NULL;
    window_cfg c;
    memset(&c, 0, sizeof c);
    c.kind = (int)skio_u64(&rd);
    c.size = skio_i64(&rd);
    c.hop = skio_i64(&rd);
    c.gap = skio_i64(&rd);
    c.lateness = skio_i64(&rd);
    uint64_t retain = skio_u64(&rd), max_open = skio_u64(&rd);
    window *w = NULL;
    if (rd.bad || retain > WINDOW_MAX_RETAIN || max_open > WINDOW_MAX_OPEN) goto bad;
    c.retain = (uint32_t)retain;
    c.max_open = (uint32_t)max_open;
    if (!(w = window_new(&c, NULL))) goto bad;
    uint64_t seen = skio_u64(&rd);
    if (seen > 1) goto bad;
    w->seen = (int)seen;
    if (seen) w->max_t = skio_i64(&rd);
    w->closed_hwm = skio_i64(&rd);
    w->late_count = skio_u64(&rd);
    w->late_sum = skio_f64(&rd);
    w->dropped = skio_u64(&rd);
    /* sums may be +-inf (overflow) or even NaN (a session merging +inf and
       -inf sums): reachable states, so accepted */
    if (rd.bad || (seen && (w->max_t < -WINDOW_MAX_TIME || w->max_t > WINDOW_MAX_TIME)))
        goto bad;
    if (w->closed_hwm != INT64_MIN && (!seen || w->closed_hwm < -WINDOW_MAX_TIME ||
                                       w->closed_hwm > 3 * WINDOW_MAX_TIME))
        goto bad;
    int64_t wm = wm_of(w);
    /* open windows: sorted, disjoint sessions, all still open */
    uint64_t no = skio_u64(&rd);
    if (no > c.max_open) goto bad;
    for (uint64_t i = 0; i < no; i++) {
        window_agg a;
        if (get_agg(&rd, &c, &a, 0) < 0 || a.end <= wm || a.end <= w->closed_hwm) goto bad;
        if (i > 0) {
            const window_agg *prev = &w->open[w->nopen - 1];
            if (a.start <= prev->start) goto bad;
            if (c.kind == WINDOW_SESSION && a.start < prev->end) goto bad;
        }
        if (c.kind == WINDOW_SESSION && a.start < w->closed_hwm) goto bad;
        insert_at(w, w->nopen, a.start, a.end, 0);
        w->open[w->nopen - 1] = a;
    }
    ring *rings[2] = {&w->retained, &w->pending};
    for (int r = 0; r < 2; r++) {
        uint64_t nr = skio_u64(&rd);
        if (nr > rings[r]->cap) goto bad;
        for (uint64_t i = 0; i < nr; i++) {
            window_agg a;
            if (get_agg(&rd, &c, &a, 1) < 0 || a.end > w->closed_hwm) goto bad;
            ring_push(rings[r], &a);
        }
    }
    if (skio_close(&rd, "window", e) < 0) {
        window_free(w);
        return NULL;
    }
    return w;
bad:
    window_free(w);
    skio_fail(&rd);
    skio_close(&rd, "window", e);
    return NULL;
}
