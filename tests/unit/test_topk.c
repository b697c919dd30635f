/* test_topk.c — Space-Saving top-k: exactness below capacity, the true
 * heavy hitters of a zipf stream, the error bounds against exact counts,
 * merge, deterministic ties, round trip and corrupt input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "skio.h"
#include "topk.h"

#if defined(__SANITIZE_ADDRESS__)
#define EVENTS 200000
#else
#define EVENTS 1000000
#endif
#define KEYS 100000

static uint64_t rs = 7;
static double urand(void) {
    uint64_t z = (rs += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}

/* A zipf(s = 1.1) stream of key ids over KEYS keys. */
static int *zipf_stream(size_t n) {
    double *cdf = malloc(KEYS * sizeof *cdf), acc = 0;
    for (int i = 0; i < KEYS; i++) cdf[i] = (acc += 1.0 / pow(i + 1, 1.1));
    int *ids = malloc(n * sizeof *ids);
    for (size_t j = 0; j < n; j++) {
        double u = urand() * acc;
        size_t lo = 0, hi = KEYS - 1;
        while (lo < hi) { size_t m = (lo + hi) / 2; if (cdf[m] < u) lo = m + 1; else hi = m; }
        /* scramble the id so rank is not key order */
        ids[j] = (int)((lo * 7919) % KEYS);
    }
    free(cdf);
    return ids;
}

static int keyname(char *b, int id) { return sprintf(b, "key-%d", id); }

static void add_id(topk *t, int id) {
    char b[32];
    assert_int_equal(topk_add(t, b, (size_t)keyname(b, id), 1, NULL), 0);
}

/* Every monitored key respects count - error <= true <= count, error <=
 * total/capacity; every key heavier than total/capacity is monitored. */
static void check_bounds(const topk *t, const long *truth) {
    double bound = topk_total(t) / topk_capacity(t);
    char b[32];
    for (int id = 0; id < KEYS; id++) {
        topk_item it;
        int n = keyname(b, id);
        if (topk_get(t, b, (size_t)n, &it)) {
            if (!((double)truth[id] <= it.count && it.count - it.error <= (double)truth[id]))
                fail_msg("key %d: true %ld not in [%g, %g]", id, truth[id], it.count - it.error,
                         it.count);
            assert_true(it.error <= bound + 1e-9);
        } else if ((double)truth[id] > bound) {
            fail_msg("key %d with weight %ld > %g not monitored", id, truth[id], bound);
        }
    }
}

static const long *g_truth;
static int cmp_ids(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    if (g_truth[x] != g_truth[y]) return g_truth[x] > g_truth[y] ? -1 : 1;
    return x - y;
}

/* The top n reported keys are exactly the n truly heaviest, in order. */
static void check_top(const topk *t, const long *truth, size_t n) {
    int *ids = malloc(KEYS * sizeof *ids);
    for (int i = 0; i < KEYS; i++) ids[i] = i;
    g_truth = truth;
    qsort(ids, KEYS, sizeof *ids, cmp_ids);
    topk_item *it = calloc(n, sizeof *it);
    assert_int_equal(topk_top(t, n, it), n);
    for (size_t i = 0; i < n; i++) {
        char b[32];
        int len = keyname(b, ids[i]);
        if ((size_t)len != it[i].len || memcmp(b, it[i].key, it[i].len) != 0)
            fail_msg("rank %zu: want %s (%ld), got %.*s (%g)", i, b, truth[ids[i]], (int)it[i].len,
                     it[i].key, it[i].count);
    }
    free(it);
    free(ids);
}

static void test_exact_below_capacity(void **st) {
    topk *t = topk_new(3, 10);
    const char *keys[] = {"b", "a", "c", "a", "d", "b", "e", "c"};
    for (size_t i = 0; i < 8; i++) topk_add(t, keys[i], 1, 1, NULL);
    topk_add(t, "z", 1, 2.5, NULL);
    topk_item it[10];
    assert_int_equal(topk_top(t, 10, it), 6);
    /* z 2.5, then a b c (2 each, by key), then d e */
    const char *want[] = {"z", "a", "b", "c", "d", "e"};
    double wc[] = {2.5, 2, 2, 2, 1, 1};
    for (int i = 0; i < 6; i++) {
        assert_int_equal(it[i].len, 1);
        assert_memory_equal(it[i].key, want[i], 1);
        assert_true(it[i].count == wc[i] && it[i].error == 0);
    }
    assert_true(topk_total(t) == 10.5);
    tm_err e;
    assert_int_equal(topk_add(t, "x", 1, 0, &e), -1);
    assert_int_equal(topk_add(t, "x", 1, -1, &e), -1);
    assert_int_equal(topk_add(t, "x", 1, NAN, &e), -1);
    char big[TOPK_MAX_KEY + 1];
    memset(big, 'x', sizeof big);
    assert_int_equal(topk_add(t, big, sizeof big, 1, &e), -1);
    assert_int_equal(topk_add(t, big, TOPK_MAX_KEY, 1, &e), 0);
    assert_null(topk_new(0, 10));
    assert_null(topk_new(11, 10));
    assert_null(topk_new(1, TOPK_MAX_CAPACITY + 1));
    topk_free(t);
}

static void test_replacement(void **st) {
    /* capacity 2: a a b c -> c replaces b (min 1) with count 2 error 1 */
    topk *t = topk_new(2, 2);
    topk_add(t, "a", 1, 1, NULL);
    topk_add(t, "a", 1, 1, NULL);
    topk_add(t, "b", 1, 1, NULL);
    topk_add(t, "c", 1, 1, NULL);
    topk_item it[2];
    assert_int_equal(topk_top(t, 2, it), 2);
    assert_memory_equal(it[0].key, "a", 1);
    assert_memory_equal(it[1].key, "c", 1);
    assert_true(it[1].count == 2 && it[1].error == 1);
    /* ties at the minimum: the victim is the last in rank order (largest key) */
    topk_add(t, "d", 1, 1, NULL); /* a=2, c=2 tie: evict c */
    assert_int_equal(topk_top(t, 2, it), 2);
    assert_memory_equal(it[0].key, "d", 1);
    assert_true(it[0].count == 3 && it[0].error == 2);
    assert_memory_equal(it[1].key, "a", 1);
    topk_free(t);
}

static void test_zipf(void **st) {
    int *ids = zipf_stream(EVENTS);
    long *truth = calloc(KEYS, sizeof *truth);
    topk *t = topk_new(20, 200);
    for (size_t i = 0; i < EVENTS; i++) {
        truth[ids[i]]++;
        add_id(t, ids[i]);
    }
    assert_true(topk_total(t) == EVENTS);
    assert_int_equal(topk_size(t), 200);
    check_bounds(t, truth);
    check_top(t, truth, 20);
    topk_free(t);
    free(truth);
    free(ids);
}

static void test_merge(void **st) {
    int *ids = zipf_stream(EVENTS);
    long *truth = calloc(KEYS, sizeof *truth);
    enum { P = 4 };
    topk *part[P], *all = topk_new(20, 200);
    for (int p = 0; p < P; p++) part[p] = topk_new(20, 200);
    for (size_t i = 0; i < EVENTS; i++) {
        truth[ids[i]]++;
        add_id(part[i % P], ids[i]);
    }
    for (int p = 0; p < P; p++) topk_merge(all, part[p]);
    assert_true(topk_total(all) == EVENTS);
    check_bounds(all, truth);
    check_top(all, truth, 10);
    /* determinism of merge */
    topk *again = topk_new(20, 200);
    for (int p = 0; p < P; p++) topk_merge(again, part[p]);
    buf a = BUF_INIT, b = BUF_INIT;
    topk_serialize(all, &a);
    topk_serialize(again, &b);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.ptr, b.ptr, a.len);
    /* self-merge doubles counts */
    topk_merge(again, again);
    assert_true(topk_total(again) == 2.0 * EVENTS);
    for (int p = 0; p < P; p++) topk_free(part[p]);
    topk_free(all);
    topk_free(again);
    buf_free(&a);
    buf_free(&b);
    free(truth);
    free(ids);
}

static void same(const topk *x, const topk *y) {
    buf a = BUF_INIT, b = BUF_INIT;
    topk_serialize(x, &a);
    topk_serialize(y, &b);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.ptr, b.ptr, a.len);
    buf_free(&a);
    buf_free(&b);
}

static void test_roundtrip(void **st) {
    int *ids = zipf_stream(40000);
    topk *t = topk_new(5, 50), *u = topk_new(5, 50);
    for (size_t i = 0; i < 20000; i++) { add_id(t, ids[i]); add_id(u, ids[i]); }
    same(t, u);
    buf ser = BUF_INIT;
    topk_serialize(t, &ser);
    tm_err e;
    topk *d = topk_deserialize(ser.ptr, ser.len, &e);
    assert_non_null(d);
    same(t, d);
    assert_int_equal(topk_k(d), 5);
    for (size_t i = 20000; i < 40000; i++) { add_id(t, ids[i]); add_id(d, ids[i]); }
    same(t, d);
    for (size_t n = 0; n < ser.len; n++) assert_null(topk_deserialize(ser.ptr, n, &e));
    for (size_t i = 0; i < ser.len; i += 3) {
        ser.ptr[i] ^= 0x40;
        assert_null(topk_deserialize(ser.ptr, ser.len, &e));
        ser.ptr[i] ^= 0x40;
    }
    /* well-framed but invalid: out of order, duplicate, error > count */
    struct { const char *k1; double c1, e1; const char *k2; double c2, e2; int ok; } cases[] = {
        {"a", 5, 0, "b", 3, 1, 1},
        {"a", 3, 0, "b", 5, 0, 0},
        {"b", 3, 0, "a", 3, 0, 0},
        {"a", 3, 0, "a", 2, 0, 0},
        {"a", 3, 4, "b", 2, 0, 0},
        {"a", 3, 0, "b", -2, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        buf b = BUF_INIT;
        size_t s = skio_begin(&b, "TMTK", 1);
        skio_put_u64(&b, 2); skio_put_u64(&b, 4); skio_put_f64(&b, 10); skio_put_u64(&b, 2);
        skio_put_bytes(&b, cases[i].k1, 1); skio_put_f64(&b, cases[i].c1); skio_put_f64(&b, cases[i].e1);
        skio_put_bytes(&b, cases[i].k2, 1); skio_put_f64(&b, cases[i].c2); skio_put_f64(&b, cases[i].e2);
        skio_end(&b, s);
        topk *x = topk_deserialize(b.ptr, b.len, &e);
        if (cases[i].ok && !x) fail_msg("case %zu: %s", i, e.msg);
        if (!cases[i].ok && x) fail_msg("case %zu accepted", i);
        topk_free(x);
        buf_free(&b);
    }
    topk_free(t);
    topk_free(u);
    topk_free(d);
    buf_free(&ser);
    free(ids);
}

/* Heavy churn through a tiny table: every monitored key stays findable. */
static void test_churn(void **st) {
    topk *t = topk_new(4, 8);
    char b[32];
    for (int i = 0; i < 20000; i++) {
        int id = (int)(urand() * 64);
        add_id(t, id);
        topk_item it[8];
        size_t n = topk_top(t, 8, it);
        assert_true(n == 8 || i < 8);
        for (size_t j = 0; j < n; j++) {
            topk_item g;
            memcpy(b, it[j].key, it[j].len);
            assert_int_equal(topk_get(t, b, it[j].len, &g), 1);
            assert_true(g.count == it[j].count);
        }
    }
    topk_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact_below_capacity),
        cmocka_unit_test(test_replacement),
        cmocka_unit_test(test_zipf),
        cmocka_unit_test(test_merge),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_churn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
