/* test_kll.c — KLL quantiles: rank error of p50/p95/p99 (and a sweep)
 * against the exact sorted data for several distributions and orders,
 * merge, determinism (byte-identical state), round trip, corruption. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kll.h"
#include "skio.h"

#if defined(__SANITIZE_ADDRESS__)
#define N 200000
#else
#define N 1000000
#endif

static uint64_t rs = 42;
static double urand(void) { /* splitmix64 -> [0,1) */
    uint64_t z = (rs += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}
static double nrand(void) {
    double u = urand(), v = urand();
    return sqrt(-2 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

enum { D_UNIFORM, D_NORMAL, D_LOGNORMAL, D_ASC, D_DESC, D_TIES, D_COUNT };
static const char *dname[] = {"uniform", "normal", "lognormal", "ascending", "descending", "ties"};

static double *gen(int d, size_t n) {
    double *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) {
        switch (d) {
        case D_UNIFORM: x[i] = urand() * 1000; break;
        case D_NORMAL: x[i] = 100 + 15 * nrand(); break;
        case D_LOGNORMAL: x[i] = exp(2 * nrand()); break;   /* latency-like tail */
        case D_ASC: x[i] = (double)i; break;
        case D_DESC: x[i] = (double)(n - i); break;
        default: { double u = urand(); x[i] = floor(u * u * u * 50); break; } /* 50 values, skewed */
        }
    }
    return x;
}

/* |q - true rank of v|, where v's true rank is the interval
 * [#(< v), #(<= v)] / n (ties); one linear scan of the raw data. */
static double rank_err(const double *x, size_t n, double v, double q) {
    size_t below = 0, upto = 0;
    for (size_t i = 0; i < n; i++) {
        below += x[i] < v;
        upto += x[i] <= v;
    }
    double r0 = (double)below / (double)n, r1 = (double)upto / (double)n;
    if (q < r0) return r0 - q;
    if (q > r1) return q - r1;
    return 0;
}

static double max_err(kll *s, const double *sorted, size_t n, int sweep) {
    double qs[] = {0.5, 0.95, 0.99}, worst = 0;
    for (int i = 0; i < 3; i++) {
        double e = rank_err(sorted, n, kll_quantile(s, qs[i]), qs[i]);
        if (e > worst) worst = e;
    }
    for (int i = 1; sweep && i < 100; i += 4) { /* p1, p5, ..., p97 */
        double e = rank_err(sorted, n, kll_quantile(s, i / 100.0), i / 100.0);
        if (e > worst) worst = e;
    }
    return worst;
}

static void test_empty_and_small(void **st) {
    kll *s = kll_new(KLL_DEFAULT_K);
    assert_true(isnan(kll_quantile(s, 0.5)));
    assert_true(isnan(kll_min(s)));
    assert_int_equal(kll_count(s), 0);
    assert_int_equal(kll_add(s, NAN), -1);
    assert_int_equal(kll_count(s), 0);
    for (int i = 1; i <= 100; i++) kll_add(s, i); /* fewer than k: exact */
    assert_true(kll_quantile(s, 0.5) == 50);
    assert_true(kll_quantile(s, 0.99) == 99);
    assert_true(kll_quantile(s, 0) == 1);
    assert_true(kll_quantile(s, 1) == 100);
    assert_true(kll_rank(s, 25) == 0.25);
    assert_true(kll_rank(s, 0) == 0 && kll_rank(s, 1000) == 1);
    assert_true(kll_min(s) == 1 && kll_max(s) == 100);
    /* -0 is stored as 0: one canonical form whatever qsort does with ties */
    kll *z1 = kll_new(8), *z2 = kll_new(8);
    for (int i = 0; i < 100; i++) { kll_add(z1, i % 2 ? -0.0 : 0.0); kll_add(z2, 0.0); }
    buf b1 = BUF_INIT, b2 = BUF_INIT;
    kll_serialize(z1, &b1);
    kll_serialize(z2, &b2);
    assert_int_equal(b1.len, b2.len);
    assert_memory_equal(b1.ptr, b2.ptr, b1.len);
    buf_free(&b1);
    buf_free(&b2);
    kll_free(z1);
    kll_free(z2);
    assert_null(kll_new(2));
    assert_null(kll_new(KLL_MAX_K + 1));
    kll_free(s);
}

static void test_distributions(void **st) {
    for (int d = 0; d < D_COUNT; d++) {
        double *x = gen(d, N);
        kll *s = kll_new(KLL_DEFAULT_K);
        for (size_t i = 0; i < N; i++) kll_add(s, x[i]);
        assert_int_equal(kll_count(s), N);
        double mn = x[0], mx = x[0];
        for (size_t i = 0; i < N; i++) { if (x[i] < mn) mn = x[i]; if (x[i] > mx) mx = x[i]; }
        assert_true(kll_min(s) == mn && kll_max(s) == mx);
        double e = max_err(s, x, N, 1);
        print_message("# %-10s n=%d retained=%zu max rank error %.3f%%\n", dname[d], N,
                      kll_retained(s), e * 100);
        if (e > 0.01) fail_msg("%s: rank error %.3f%% > 1%%", dname[d], e * 100);
        assert_true(kll_retained(s) < 3 * KLL_DEFAULT_K + 64);
        /* rank() agrees with the truth too */
        double v = x[12345];
        double r = kll_rank(s, v);
        assert_true(rank_err(x, N, v, r) <= 0.01);
        kll_free(s);
        free(x);
    }
}

static void test_merge(void **st) {
    double *x = gen(D_LOGNORMAL, N);
    enum { PARTS = 10 };
    kll *parts[PARTS], *all = kll_new(KLL_DEFAULT_K);
    for (int p = 0; p < PARTS; p++) parts[p] = kll_new(KLL_DEFAULT_K);
    for (size_t i = 0; i < N; i++) kll_add(parts[i % PARTS], x[i]);
    for (int p = 0; p < PARTS; p++) kll_merge(all, parts[p]);
    assert_int_equal(kll_count(all), N);
    double mn = x[0], mx = x[0];
    for (size_t i = 0; i < N; i++) { if (x[i] < mn) mn = x[i]; if (x[i] > mx) mx = x[i]; }
    assert_true(kll_min(all) == mn && kll_max(all) == mx);
    double e = max_err(all, x, N, 1);
    print_message("# merged 10 parts: max rank error %.3f%%\n", e * 100);
    assert_true(e <= 0.01);
    /* merging is deterministic */
    kll *again = kll_new(KLL_DEFAULT_K);
    for (int p = 0; p < PARTS; p++) kll_merge(again, parts[p]);
    buf a = BUF_INIT, b = BUF_INIT;
    kll_serialize(all, &a);
    kll_serialize(again, &b);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.ptr, b.ptr, a.len);
    /* self-merge doubles every count */
    kll_merge(again, again);
    assert_int_equal(kll_count(again), 2 * (uint64_t)N);
    assert_true(rank_err(x, N, kll_quantile(again, 0.95), 0.95) <= 0.01);
    for (int p = 0; p < PARTS; p++) kll_free(parts[p]);
    kll_free(all);
    kll_free(again);
    buf_free(&a);
    buf_free(&b);
    free(x);
}

static void same(const kll *a, const kll *b) {
    buf x = BUF_INIT, y = BUF_INIT;
    kll_serialize(a, &x);
    kll_serialize(b, &y);
    assert_int_equal(x.len, y.len);
    assert_memory_equal(x.ptr, y.ptr, x.len);
    buf_free(&x);
    buf_free(&y);
}

static void test_determinism_and_roundtrip(void **st) {
    double *x = gen(D_NORMAL, 100000);
    kll *a = kll_new(KLL_DEFAULT_K), *b = kll_new(KLL_DEFAULT_K);
    for (size_t i = 0; i < 50000; i++) { kll_add(a, x[i]); kll_add(b, x[i]); }
    same(a, b);
    buf ser = BUF_INIT;
    kll_serialize(a, &ser);
    tm_err e;
    kll *d = kll_deserialize(ser.ptr, ser.len, &e);
    assert_non_null(d);
    same(a, d);
    assert_true(kll_quantile(a, 0.99) == kll_quantile(d, 0.99));
    assert_int_equal(kll_count(d), 50000);
    /* decoded state continues exactly like the original */
    for (size_t i = 50000; i < 100000; i++) { kll_add(a, x[i]); kll_add(d, x[i]); }
    same(a, d);
    /* every truncation, sampled byte flips */
    for (size_t n = 0; n < ser.len; n += 1) assert_null(kll_deserialize(ser.ptr, n, &e));
    for (size_t i = 0; i < ser.len; i += 7) {
        ser.ptr[i] ^= 0x21;
        assert_null(kll_deserialize(ser.ptr, ser.len, &e));
        ser.ptr[i] ^= 0x21;
    }
    /* an empty sketch round-trips */
    kll *z = kll_new(64);
    buf_reset(&ser);
    kll_serialize(z, &ser);
    kll *z2 = kll_deserialize(ser.ptr, ser.len, &e);
    assert_non_null(z2);
    same(z, z2);
    kll_free(z);
    kll_free(z2);
    kll_free(a);
    kll_free(b);
    kll_free(d);
    buf_free(&ser);
    free(x);
}

static void test_invalid_bodies(void **st) {
    tm_err e;
    buf b = BUF_INIT;
    /* count disagrees with the weights held */
    size_t s = skio_begin(&b, "TMKL", 1);
    skio_put_u64(&b, 200); skio_put_u64(&b, 3); skio_put_u64(&b, 1); skio_put_u64(&b, 1);
    skio_put_f64(&b, 1); skio_put_f64(&b, 2);
    skio_put_u64(&b, 2); skio_put_f64(&b, 1); skio_put_f64(&b, 2);
    skio_end(&b, s);
    assert_null(kll_deserialize(b.ptr, b.len, &e));
    /* the same with a consistent count is accepted (control) */
    buf_reset(&b);
    s = skio_begin(&b, "TMKL", 1);
    skio_put_u64(&b, 200); skio_put_u64(&b, 2); skio_put_u64(&b, 1); skio_put_u64(&b, 1);
    skio_put_f64(&b, 1); skio_put_f64(&b, 2);
    skio_put_u64(&b, 2); skio_put_f64(&b, 1); skio_put_f64(&b, 2);
    skio_end(&b, s);
    kll *ok = kll_deserialize(b.ptr, b.len, &e);
    assert_non_null(ok);
    assert_true(kll_quantile(ok, 0.5) == 1);
    kll_free(ok);
    /* a value outside [min, max], a NaN, a bad k */
    double bad_vals[][3] = {{1, 2, 3}, {1, 2, NAN}};
    for (int i = 0; i < 2; i++) {
        buf_reset(&b);
        s = skio_begin(&b, "TMKL", 1);
        skio_put_u64(&b, 200); skio_put_u64(&b, 1); skio_put_u64(&b, 1); skio_put_u64(&b, 1);
        skio_put_f64(&b, bad_vals[i][0]); skio_put_f64(&b, bad_vals[i][1]);
        skio_put_u64(&b, 1); skio_put_f64(&b, bad_vals[i][2]);
        skio_end(&b, s);
        assert_null(kll_deserialize(b.ptr, b.len, &e));
    }
    buf_reset(&b);
    s = skio_begin(&b, "TMKL", 1);
    skio_put_u64(&b, 3); skio_put_u64(&b, 0); skio_put_u64(&b, 1); skio_put_u64(&b, 1);
    skio_put_u64(&b, 0);
    skio_end(&b, s);
    assert_null(kll_deserialize(b.ptr, b.len, &e));
    /* level 0 over its capacity (state unreachable by adds) */
    buf_reset(&b);
    s = skio_begin(&b, "TMKL", 1);
    skio_put_u64(&b, 8); skio_put_u64(&b, 9); skio_put_u64(&b, 1); skio_put_u64(&b, 1);
    skio_put_f64(&b, 0); skio_put_f64(&b, 8);
    skio_put_u64(&b, 9);
    for (int i = 0; i < 9; i++) skio_put_f64(&b, i);
    skio_end(&b, s);
    assert_null(kll_deserialize(b.ptr, b.len, &e));
    buf_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty_and_small),
        cmocka_unit_test(test_distributions),
        cmocka_unit_test(test_merge),
        cmocka_unit_test(test_determinism_and_roundtrip),
        cmocka_unit_test(test_invalid_bodies),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
