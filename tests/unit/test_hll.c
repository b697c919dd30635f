/* test_hll.c — HyperLogLog: accuracy against exact distinct counts,
 * merge = union, order/duplicate independence, canonical bytes, and
 * rejection of corrupt or truncated serialisations. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hll.h"
#include "skio.h"

#if defined(__SANITIZE_ADDRESS__)
#define BIG 200000   /* sanitizer builds are ~10x slower */
#else
#define BIG 1000000
#endif

static void add_range(hll *h, long from, long to) {
    char key[32];
    for (long i = from; i < to; i++) {
        int n = snprintf(key, sizeof key, "user-%ld", i);
        hll_add(h, key, (size_t)n);
    }
}

static void check_close(hll *h, double exact, double tol) {
    double est = hll_estimate(h);
    double rel = fabs(est - exact) / exact;
    if (rel > tol) fail_msg("n=%.0f estimate %.1f off by %.2f%% (> %.2f%%)", exact, est, rel * 100,
                            tol * 100);
}

static void test_empty(void **st) {
    hll *h = hll_new();
    assert_int_equal(hll_count(h), 0);
    assert_true(hll_is_sparse(h));
    hll_free(h);
}

static void test_small_nearly_exact(void **st) {
    hll *h = hll_new();
    for (long n = 1; n <= 1000; n++) {
        add_range(h, n - 1, n);
        double est = hll_estimate(h);
        /* linear counting over m = 16384 registers: sigma is about
           n/sqrt(2m) (register collisions), so 3 sigma < max(2.5, 2% of n) */
        if (fabs(est - (double)n) > (n < 125 ? 2.5 : 0.02 * (double)n))
            fail_msg("n=%ld estimate %.2f", n, est);
    }
    hll_free(h);
}

static void test_accuracy(void **st) {
    long sizes[] = {1000, 10000, 100000, BIG};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        hll *h = hll_new();
        add_range(h, 0, sizes[i]);
        check_close(h, (double)sizes[i], 0.02);
        hll_free(h);
    }
    /* the 3-sigma bound (2.4%) across many independent sets of 20000 */
    int over2sigma = 0;
    for (int s = 0; s < 20; s++) {
        hll *h = hll_new();
        add_range(h, (long)s * 1000000, (long)s * 1000000 + 20000);
        check_close(h, 20000, 0.0243);
        double rel = fabs(hll_estimate(h) - 20000) / 20000;
        over2sigma += rel > 2 * 0.0081;
        hll_free(h);
    }
    assert_true(over2sigma <= 3); /* ~5% expected beyond 2 sigma */
}

static void test_duplicates_and_order(void **st) {
    hll *a = hll_new(), *b = hll_new();
    add_range(a, 0, 5000);
    add_range(a, 0, 5000);
    for (long i = 4999; i >= 0; i--) add_range(b, i, i + 1);
    buf x = BUF_INIT, y = BUF_INIT;
    hll_serialize(a, &x);
    hll_serialize(b, &y);
    assert_int_equal(x.len, y.len);
    assert_memory_equal(x.ptr, y.ptr, x.len);
    assert_int_equal(hll_add(a, "user-17", 7), 0); /* already present */
    buf_free(&x);
    buf_free(&y);
    hll_free(a);
    hll_free(b);
}

static void test_numbers(void **st) {
    hll *h = hll_new();
    hll_add_double(h, 0.0);
    assert_int_equal(hll_add_double(h, -0.0), 0);
    assert_int_equal(hll_add_double(h, 1.0), 1);
    assert_int_equal(hll_add(h, "1", 1), 1); /* the string "1" is another element */
    assert_int_equal(hll_count(h), 3);
    for (int i = 0; i < 100000; i++) hll_add_double(h, i * 0.5);
    check_close(h, 100001, 0.02);
    hll_free(h);
}

static void same_bytes(const hll *a, const hll *b) {
    buf x = BUF_INIT, y = BUF_INIT;
    hll_serialize(a, &x);
    hll_serialize(b, &y);
    assert_int_equal(x.len, y.len);
    assert_memory_equal(x.ptr, y.ptr, x.len);
    buf_free(&x);
    buf_free(&y);
}

static void test_merge_is_union(void **st) {
    struct { long a0, a1, b0, b1; } cases[] = {
        {0, 300, 200, 600},           /* sparse + sparse -> sparse */
        {0, 800, 500, 1400},          /* sparse + sparse -> dense */
        {0, 100, 50, 200000},         /* sparse + dense */
        {0, 200000, 100, 300},        /* dense + sparse */
        {0, 600000, 400000, BIG},     /* dense + dense */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        hll *a = hll_new(), *b = hll_new(), *u = hll_new();
        add_range(a, cases[i].a0, cases[i].a1);
        add_range(b, cases[i].b0, cases[i].b1);
        add_range(u, cases[i].a0 < cases[i].b0 ? cases[i].a0 : cases[i].b0,
                  cases[i].a1 > cases[i].b1 ? cases[i].a1 : cases[i].b1);
        hll_merge(a, b);
        same_bytes(a, u);
        assert_int_equal(hll_count(a), hll_count(u));
        hll_merge(a, a);
        same_bytes(a, u);
        hll_free(a);
        hll_free(b);
        hll_free(u);
    }
}

static void roundtrip(hll *h) {
    buf x = BUF_INIT, y = BUF_INIT;
    hll_serialize(h, &x);
    tm_err e;
    hll *d = hll_deserialize(x.ptr, x.len, &e);
    assert_non_null(d);
    assert_int_equal(hll_count(d), hll_count(h));
    assert_int_equal(hll_is_sparse(d), hll_is_sparse(h));
    hll_serialize(d, &y);
    assert_int_equal(x.len, y.len);
    assert_memory_equal(x.ptr, y.ptr, x.len);
    /* keeps working the same after decoding */
    hll *c = hll_clone(h);
    add_range(c, 7000000, 7000500);
    add_range(d, 7000000, 7000500);
    same_bytes(c, d);
    /* every truncation and every single-byte corruption is rejected */
    for (size_t n = 0; n < x.len; n++) assert_null(hll_deserialize(x.ptr, n, &e));
    size_t step = x.len > 2000 ? 97 : 1;
    for (size_t i = 0; i < x.len; i += step) {
        x.ptr[i] ^= 0x5a;
        assert_null(hll_deserialize(x.ptr, x.len, &e));
        x.ptr[i] ^= 0x5a;
    }
    buf_free(&x);
    buf_free(&y);
    hll_free(c);
    hll_free(d);
}

static void test_serialize(void **st) {
    hll *h = hll_new();
    roundtrip(h);
    add_range(h, 0, 500);
    assert_true(hll_is_sparse(h));
    roundtrip(h);
    add_range(h, 0, 50000);
    assert_false(hll_is_sparse(h));
    roundtrip(h);
    assert_true(hll_memory(h) <= 12400);
    hll_free(h);
}

/* Well-framed (valid checksum) but invalid bodies must be rejected too. */
static void test_invalid_bodies(void **st) {
    tm_err e;
    buf b = BUF_INIT;
    size_t s;
    /* sparse with a register value out of range (52) */
    s = skio_begin(&b, "TMHL", 1);
    skio_put_u64(&b, 0); skio_put_u64(&b, 1); skio_put_u64(&b, 3); skio_put_u64(&b, 52);
    skio_end(&b, s);
    assert_null(hll_deserialize(b.ptr, b.len, &e));
    /* sparse register index beyond 16383 */
    buf_reset(&b);
    s = skio_begin(&b, "TMHL", 1);
    skio_put_u64(&b, 0); skio_put_u64(&b, 2); skio_put_u64(&b, 16000); skio_put_u64(&b, 1);
    skio_put_u64(&b, 500); skio_put_u64(&b, 1);
    skio_end(&b, s);
    assert_null(hll_deserialize(b.ptr, b.len, &e));
    /* a valid sparse record is accepted (control) */
    buf_reset(&b);
    s = skio_begin(&b, "TMHL", 1);
    skio_put_u64(&b, 0); skio_put_u64(&b, 2); skio_put_u64(&b, 5); skio_put_u64(&b, 1);
    skio_put_u64(&b, 0); skio_put_u64(&b, 51);
    skio_end(&b, s);
    hll *h = hll_deserialize(b.ptr, b.len, &e);
    assert_non_null(h);
    hll_free(h);
    /* dense with too few non-zero registers (not canonical) */
    buf_reset(&b);
    s = skio_begin(&b, "TMHL", 1);
    skio_put_u64(&b, 1);
    char zero[HLL_DENSE_BYTES] = {0};
    zero[0] = 1;
    buf_append(&b, zero, sizeof zero);
    skio_end(&b, s);
    assert_null(hll_deserialize(b.ptr, b.len, &e));
    /* unknown encoding, wrong version */
    buf_reset(&b);
    s = skio_begin(&b, "TMHL", 1);
    skio_put_u64(&b, 2);
    skio_end(&b, s);
    assert_null(hll_deserialize(b.ptr, b.len, &e));
    buf_reset(&b);
    s = skio_begin(&b, "TMHL", 2);
    skio_put_u64(&b, 0); skio_put_u64(&b, 0);
    skio_end(&b, s);
    assert_null(hll_deserialize(b.ptr, b.len, &e));
    assert_int_equal(e.code, TM_EINVAL);
    buf_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_small_nearly_exact),
        cmocka_unit_test(test_accuracy),
        cmocka_unit_test(test_duplicates_and_order),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_merge_is_union),
        cmocka_unit_test(test_serialize),
        cmocka_unit_test(test_invalid_bodies),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
