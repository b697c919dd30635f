/* test_window.c — event-time windows against brute-force computations:
 * exact per-window count/sum/min/max, lateness accounting, emit-on-close,
 * retention, session merging, the open-window cap, serialisation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "skio.h"
#include "window.h"

#if defined(__SANITIZE_ADDRESS__)
#define EVENTS 20000
#else
#define EVENTS 100000
#endif

static uint64_t rs = 99;
static uint64_t rnd(void) {
    uint64_t z = (rs += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static int64_t irand(int64_t lo, int64_t hi) { return lo + (int64_t)(rnd() % (uint64_t)(hi - lo + 1)); }

static int64_t fdiv(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

/* malloc'ed copies of the list and of the taken closed windows */
static size_t list(const window *w, window_agg **out) {
    *out = malloc((window_count(w) + 1) * sizeof **out);
    return window_list(w, *out);
}
static size_t take(window *w, window_agg **out) {
    size_t n = window_pending(w);
    *out = malloc((n + 1) * sizeof **out);
    return window_take_closed(w, *out, n);
}

static window *mk(int kind, int64_t size, int64_t hop, int64_t gap, int64_t late, uint32_t retain) {
    window_cfg c;
    window_cfg_init(&c, kind);
    c.size = size;
    c.hop = hop;
    c.gap = gap;
    c.lateness = late;
    c.retain = retain;
    tm_err e;
    window *w = window_new(&c, &e);
    if (!w) fail_msg("window_new: %s", e.msg);
    return w;
}

/* Brute force for fixed windows: windows indexed by start/step from base. */
typedef struct bf {
    int64_t base, step, size, late;
    size_t nw;
    uint64_t *count;
    double *sum, *min, *max;
    uint64_t late_count;
    double late_sum;
} bf;

static void brute_fixed(bf *b, const int64_t *t, const double *v, size_t n) {
    int64_t max_t = 0;
    int seen = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t wm = seen ? max_t - b->late : INT64_MIN;
        int missed = 0;
        for (int64_t s = fdiv(t[i], b->step) * b->step; s > t[i] - b->size; s -= b->step) {
            if (s + b->size <= wm) { missed = 1; continue; }
            size_t k = (size_t)((s - b->base) / b->step);
            assert_true(k < b->nw);
            if (!b->count[k]++) b->min[k] = b->max[k] = v[i];
            b->sum[k] += v[i];
            if (v[i] < b->min[k]) b->min[k] = v[i];
            if (v[i] > b->max[k]) b->max[k] = v[i];
        }
        if (missed) { b->late_count++; b->late_sum += v[i]; }
        if (!seen || t[i] > max_t) max_t = t[i];
        seen = 1;
    }
}

static void run_fixed(int kind, int64_t size, int64_t hop, int64_t late, int64_t jitter) {
    size_t n = EVENTS;
    int64_t *t = malloc(n * sizeof *t);
    double *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) {
        t[i] = -50000 + (int64_t)i * 7 + irand(-jitter, jitter); /* crosses 0: floor division */
        v[i] = (double)irand(-1000, 1000) / 4;
    }
    int64_t step = kind == WINDOW_HOPPING ? hop : size;
    bf b = {0};
    b.step = step;
    b.size = size;
    b.late = late;
    b.base = fdiv(-50000 - jitter - size, step) * step;
    b.nw = (size_t)((7 * (int64_t)n + 2 * jitter + 2 * size) / step + 4);
    b.count = calloc(b.nw, sizeof *b.count);
    b.sum = calloc(b.nw, sizeof(double));
    b.min = calloc(b.nw, sizeof(double));
    b.max = calloc(b.nw, sizeof(double));
    brute_fixed(&b, t, v, n);

    window *w = mk(kind, size, kind == WINDOW_HOPPING ? hop : 0, 0, late, 100000);
    size_t emitted = 0;
    int64_t last_end = INT64_MIN;
    for (size_t i = 0; i < n; i++) {
        assert_true(window_add(w, t[i], v[i], NULL) >= 0);
        if (i % 1000 == 999) { /* emit-on-close: each window once, in order */
            window_agg c[WINDOW_MAX_PENDING];
            size_t nc = window_take_closed(w, c, WINDOW_MAX_PENDING);
            for (size_t j = 0; j < nc; j++) {
                assert_true(c[j].closed && c[j].end > last_end);
                last_end = c[j].end;
            }
            emitted += nc;
        }
    }
    uint64_t lc;
    double ls;
    window_late(w, &lc, &ls);
    assert_int_equal(lc, b.late_count);
    assert_true(ls == b.late_sum);
    if (jitter > late) assert_true(lc > 0); /* the data did exercise lateness */
    int64_t wm;
    assert_true(window_watermark(w, &wm));
    window_agg *a;
    size_t na = list(w, &a), j = 0, closed = 0;
    for (size_t k = 0; k < b.nw; k++) {
        if (!b.count[k]) continue;
        assert_true(j < na);
        assert_int_equal(a[j].start, b.base + (int64_t)k * step);
        assert_int_equal(a[j].end, a[j].start + size);
        assert_int_equal(a[j].count, b.count[k]);
        assert_true(a[j].sum == b.sum[k] && a[j].min == b.min[k] && a[j].max == b.max[k]);
        assert_int_equal(a[j].closed, a[j].end <= wm);
        closed += a[j].closed;
        j++;
    }
    assert_int_equal(j, na);
    window_agg *c;
    size_t nc = take(w, &c);
    free(c);
    assert_int_equal(emitted + nc, closed);
    assert_int_equal(take(w, &c), 0);
    free(c);
    free(a);
    window_free(w);
    free(b.count); free(b.sum); free(b.min); free(b.max);
    free(t);
    free(v);
}

static void test_tumbling_brute(void **st) {
    run_fixed(WINDOW_TUMBLING, 1000, 0, 0, 0);       /* in order */
    run_fixed(WINDOW_TUMBLING, 1000, 0, 300, 200);   /* disorder within lateness */
    run_fixed(WINDOW_TUMBLING, 1000, 0, 100, 2000);  /* many late events */
    run_fixed(WINDOW_TUMBLING, 3, 0, 10, 40);        /* tiny windows */
}

static void test_hopping_brute(void **st) {
    run_fixed(WINDOW_HOPPING, 1000, 250, 0, 0);
    run_fixed(WINDOW_HOPPING, 1000, 250, 500, 400);
    run_fixed(WINDOW_HOPPING, 900, 300, 100, 1500);
    run_fixed(WINDOW_HOPPING, 1000, 1000, 50, 100);  /* hop = size: tumbling */
}

static void test_lateness_story(void **st) {
    window *w = mk(WINDOW_TUMBLING, 10, 0, 0, 5, 16);
    int64_t wm;
    assert_false(window_watermark(w, &wm));
    assert_int_equal(window_add(w, 3, 1, NULL), 1);
    assert_int_equal(window_add(w, 14, 2, NULL), 1); /* wm = 9: [0,10) still open */
    assert_true(window_watermark(w, &wm) && wm == 9);
    assert_int_equal(window_add(w, 8, 4, NULL), 1);  /* accepted within lateness */
    window_agg *c;
    assert_int_equal(take(w, &c), 0);
    free(c);
    assert_int_equal(window_add(w, 16, 8, NULL), 1); /* wm = 11: [0,10) closes */
    assert_int_equal(take(w, &c), 1);
    assert_true(c[0].start == 0 && c[0].end == 10 && c[0].count == 2 && c[0].sum == 5 &&
                c[0].min == 1 && c[0].max == 4 && c[0].closed);
    free(c);
    assert_int_equal(take(w, &c), 0); /* retrievable once */
    free(c);
    assert_int_equal(window_add(w, 7, 16, NULL), 0); /* late */
    uint64_t lc;
    double ls;
    window_late(w, &lc, &ls);
    assert_true(lc == 1 && ls == 16);
    window_agg *a;
    assert_int_equal(list(w, &a), 2); /* closed [0,10) still queryable + [10,20) */
    assert_true(a[0].closed && a[0].count == 2 && !a[1].closed && a[1].count == 2 && a[1].sum == 10);
    free(a);
    tm_err e;
    assert_int_equal(window_add(w, 1, NAN, &e), -1);
    assert_int_equal(window_add(w, 1, INFINITY, &e), -1);
    assert_int_equal(window_add(w, WINDOW_MAX_TIME + 1, 1, &e), -1);
    window_free(w);
}

static void test_retention_and_cap(void **st) {
    window *w = mk(WINDOW_TUMBLING, 10, 0, 0, 0, 3);
    for (int64_t t = 0; t < 100; t += 5) window_add(w, t, 1, NULL);
    window_agg *a;
    size_t n = list(w, &a);
    assert_int_equal(n, 4); /* 3 retained closed + the open [90,100) */
    assert_true(a[0].start == 60 && a[3].start == 90 && !a[3].closed && a[2].closed);
    free(a);
    assert_int_equal(take(w, &a), 9); /* emission is not capped by retain */
    free(a);
    window_free(w);
    /* the open cap: huge lateness, max_open 2 -> the oldest closes early */
    window_cfg c;
    window_cfg_init(&c, WINDOW_TUMBLING);
    c.size = 10;
    c.lateness = 1000000;
    c.max_open = 2;
    w = window_new(&c, NULL);
    window_add(w, 5, 1, NULL);
    window_add(w, 15, 1, NULL);
    window_add(w, 25, 1, NULL); /* closes [0,10) early */
    assert_int_equal(window_open_count(w), 2);
    assert_int_equal(window_add(w, 6, 1, NULL), 0); /* that window is closed: late */
    assert_int_equal(window_add(w, 16, 1, NULL), 1);
    assert_int_equal(take(w, &a), 1);
    assert_true(a[0].start == 0 && a[0].count == 1);
    free(a);
    window_free(w);
}

static void test_session(void **st) {
    window *w = mk(WINDOW_SESSION, 0, 0, 10, 100, 16);
    window_add(w, 0, 1, NULL);
    window_add(w, 18, 2, NULL);
    window_agg *a;
    assert_int_equal(list(w, &a), 2);
    free(a);
    window_add(w, 9, 4, NULL); /* [9,19) bridges [0,10) and [18,28) */
    assert_int_equal(list(w, &a), 1);
    assert_true(a[0].start == 0 && a[0].end == 28 && a[0].count == 3 && a[0].sum == 7 &&
                a[0].min == 1 && a[0].max == 4);
    free(a);
    window_add(w, 38, 1, NULL); /* [38,48) */
    window_add(w, 28, 1, NULL); /* [28,38): touches [0,28) and [38,48) but does not overlap */
    assert_int_equal(list(w, &a), 3);
    free(a);
    window_add(w, 200, 1, NULL); /* wm = 100: all three close */
    assert_int_equal(take(w, &a), 3);
    free(a);
    /* wm = 100, closed sessions end at 28, 38, 48 */
    assert_int_equal(window_add(w, 85, 5, NULL), 0);  /* [85,95) would be closed already: late */
    assert_int_equal(window_add(w, 45, 5, NULL), 0);  /* could touch the closed [38,48): late */
    assert_int_equal(window_add(w, 95, 5, NULL), 1);  /* [95,105) still open: accepted */
    uint64_t lc;
    double ls;
    window_late(w, &lc, &ls);
    assert_true(lc == 2 && ls == 10);
    window_free(w);
}

/* Sessions vs brute force: shuffled within the lateness, nothing is late,
 * so the sessions equal those of the sorted times split at gaps >= gap. */
static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void test_session_brute(void **st) {
    size_t n = EVENTS / 4;
    int64_t *t = malloc(n * sizeof *t), *s = malloc(n * sizeof *s);
    int64_t now = 0;
    for (size_t i = 0; i < n; i++) {
        now += irand(0, 1) ? irand(0, 40) : irand(0, 150); /* gap 50: frequent splits */
        t[i] = now;
    }
    for (size_t i = 0; i + 1 < n; i++) /* local disorder: swap neighbours */
        if (irand(0, 2) == 0) { int64_t x = t[i]; t[i] = t[i + 1]; t[i + 1] = x; }
    memcpy(s, t, n * sizeof *t);
    qsort(s, n, sizeof *s, cmp64);
    window *w = mk(WINDOW_SESSION, 0, 0, 50, 1000, 100000);
    for (size_t i = 0; i < n; i++) assert_int_equal(window_add(w, t[i], (double)(t[i] % 7), NULL), 1);
    uint64_t lc;
    double ls;
    window_late(w, &lc, &ls);
    assert_int_equal(lc, 0);
    window_agg *a;
    size_t na = list(w, &a), j = 0;
    for (size_t i = 0; i < n;) {
        size_t k = i + 1;
        double sum = (double)(s[i] % 7);
        while (k < n && s[k] - s[k - 1] < 50) sum += (double)(s[k++] % 7);
        assert_true(j < na);
        assert_int_equal(a[j].start, s[i]);
        assert_int_equal(a[j].end, s[k - 1] + 50);
        assert_int_equal(a[j].count, k - i);
        assert_true(a[j].sum == sum);
        j++;
        i = k;
    }
    assert_int_equal(j, na);
    free(a);
    window_free(w);
    free(t);
    free(s);
}

static void same(const window *x, const window *y) {
    buf a = BUF_INIT, b = BUF_INIT;
    window_serialize(x, &a);
    window_serialize(y, &b);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.ptr, b.ptr, a.len);
    buf_free(&a);
    buf_free(&b);
}

static void roundtrip_kind(window *w, window *twin, int kind) {
    tm_err e;
    for (int round = 0; round < 5; round++) {
        for (int i = 0; i < 500; i++) {
            int64_t t = round * 5000 + i * 10 + irand(-300, 300);
            double v = (double)irand(0, 100);
            window_add(w, t, v, NULL);
            window_add(twin, t, v, NULL);
        }
        if (round == 2) { window_agg *c; take(w, &c); free(c); take(twin, &c); free(c); }
        buf ser = BUF_INIT;
        window_serialize(w, &ser);
        window *d = window_deserialize(ser.ptr, ser.len, &e);
        if (!d) fail_msg("kind %d: %s", kind, e.msg);
        same(w, d);
        window_free(twin);
        twin = d; /* continue with the decoded copy: must stay identical */
        if (round == 4) {
            for (size_t n = 0; n < ser.len; n++) assert_null(window_deserialize(ser.ptr, n, &e));
            for (size_t i = 0; i < ser.len; i += 5) {
                ser.ptr[i] ^= 0x10;
                assert_null(window_deserialize(ser.ptr, ser.len, &e));
                ser.ptr[i] ^= 0x10;
            }
        }
        buf_free(&ser);
    }
    same(w, twin);
    window_free(twin);
}

static void test_roundtrip(void **st) {
    window *a = mk(WINDOW_TUMBLING, 100, 0, 0, 150, 8), *b = mk(WINDOW_TUMBLING, 100, 0, 0, 150, 8);
    roundtrip_kind(a, b, WINDOW_TUMBLING);
    window_free(a);
    a = mk(WINDOW_HOPPING, 100, 20, 0, 150, 8), b = mk(WINDOW_HOPPING, 100, 20, 0, 150, 8);
    roundtrip_kind(a, b, WINDOW_HOPPING);
    window_free(a);
    a = mk(WINDOW_SESSION, 0, 0, 15, 150, 8), b = mk(WINDOW_SESSION, 0, 0, 15, 150, 8);
    roundtrip_kind(a, b, WINDOW_SESSION);
    window_free(a);
    /* an empty window round-trips */
    a = mk(WINDOW_SESSION, 0, 0, 15, 0, 0);
    buf ser = BUF_INIT;
    window_serialize(a, &ser);
    b = window_deserialize(ser.ptr, ser.len, NULL);
    assert_non_null(b);
    same(a, b);
    window_free(a);
    window_free(b);
    buf_free(&ser);
}

/* Well-framed bodies describing impossible states are rejected. */
static void put_hdr(buf *b, int kind, int64_t size, int64_t gap) {
    skio_put_u64(b, (uint64_t)kind); skio_put_i64(b, size); skio_put_i64(b, 0); skio_put_i64(b, gap);
    skio_put_i64(b, 0); skio_put_u64(b, 4); skio_put_u64(b, 16);
    skio_put_u64(b, 1); skio_put_i64(b, 25); skio_put_i64(b, INT64_MIN);
    skio_put_u64(b, 0); skio_put_f64(b, 0); skio_put_u64(b, 0);
}
static void put_win(buf *b, int64_t s, uint64_t len, uint64_t cnt, double mn, double mx) {
    skio_put_i64(b, s); skio_put_u64(b, len); skio_put_u64(b, cnt);
    skio_put_f64(b, mn + mx); skio_put_f64(b, mn); skio_put_f64(b, mx);
}

static void test_invalid_bodies(void **st) {
    struct { int kind; int64_t size, gap; int64_t s1; uint64_t l1; int64_t s2; uint64_t l2; uint64_t c2; int ok; } cases[] = {
        {WINDOW_TUMBLING, 10, 0, 20, 10, 30, 10, 1, 1},  /* control */
        {WINDOW_TUMBLING, 10, 0, 30, 10, 20, 10, 1, 0},  /* unsorted */
        {WINDOW_TUMBLING, 10, 0, 20, 10, 25, 10, 1, 0},  /* misaligned */
        {WINDOW_TUMBLING, 10, 0, 20, 10, 30, 11, 1, 0},  /* wrong length */
        {WINDOW_TUMBLING, 10, 0, 20, 10, 30, 10, 0, 0},  /* empty window */
        {WINDOW_TUMBLING, 10, 0, 10, 10, 30, 10, 1, 0},  /* should have closed (end <= wm 25) */
        {WINDOW_SESSION, 0, 10, 20, 10, 28, 10, 1, 0},   /* overlapping sessions */
        {WINDOW_SESSION, 0, 10, 20, 10, 30, 10, 1, 1},   /* control */
        {WINDOW_SESSION, 0, 10, 20, 5, 30, 10, 1, 0},    /* shorter than gap */
        {0, 10, 0, 20, 10, 30, 10, 1, 0},                /* unknown kind */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        buf b = BUF_INIT;
        size_t s = skio_begin(&b, "TMWN", 1);
        put_hdr(&b, cases[i].kind, cases[i].size, cases[i].gap);
        skio_put_u64(&b, 2);
        put_win(&b, cases[i].s1, cases[i].l1, 1, 1, 2);
        put_win(&b, cases[i].s2, cases[i].l2, cases[i].c2, 1, 2);
        skio_put_u64(&b, 0);
        skio_put_u64(&b, 0);
        skio_end(&b, s);
        tm_err e;
        window *w = window_deserialize(b.ptr, b.len, &e);
        if (cases[i].ok && !w) fail_msg("case %zu rejected: %s", i, e.msg);
        if (!cases[i].ok && w) fail_msg("case %zu accepted", i);
        window_free(w);
        buf_free(&b);
    }
}

static void test_config(void **st) {
    window_cfg c;
    tm_err e;
    window_cfg_init(&c, WINDOW_TUMBLING);
    assert_null(window_new(&c, &e)); /* size 0 */
    c.size = 10;
    c.lateness = -1;
    assert_null(window_new(&c, &e));
    window_cfg_init(&c, WINDOW_HOPPING);
    c.size = 10;
    c.hop = 20;
    assert_null(window_new(&c, &e)); /* hop > size */
    c.size = 100000;
    c.hop = 10;
    assert_null(window_new(&c, &e)); /* 10000 windows per event */
    c.hop = 100;
    window *w = window_new(&c, &e);
    assert_non_null(w);
    window_free(w);
    window_cfg_init(&c, WINDOW_SESSION);
    assert_null(window_new(&c, &e));
    c.gap = 5;
    c.max_open = 0;
    assert_null(window_new(&c, &e));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tumbling_brute),
        cmocka_unit_test(test_hopping_brute),
        cmocka_unit_test(test_lateness_story),
        cmocka_unit_test(test_retention_and_cap),
        cmocka_unit_test(test_session),
        cmocka_unit_test(test_session_brute),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_invalid_bodies),
        cmocka_unit_test(test_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
