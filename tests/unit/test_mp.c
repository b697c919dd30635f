/* test_mp.c — unit tests for engine/mp.c: every msgpack type through
 * mp_next, validation limits, truncation and hostile headers, mp_skip,
 * mp_map_find.  Truncated inputs are copied into exactly-sized heap blocks
 * so that AddressSanitizer (make SAN=1) catches any read past the end. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <msgpack.h>

#include "buf.h"
#include "bytes.h"
#include "mp.h"

/* ---- helpers ---- */

static int buf_write(void *data, const char *p, size_t n) {
    buf_append(data, p, n);
    return 0;
}

static void packer(msgpack_packer *pk, buf *b) { msgpack_packer_init(pk, b, buf_write); }

/* Exactly-sized heap copy: any over-read is an ASan error. */
static char *dup_exact(const void *p, size_t n) {
    char *q = malloc(n ? n : 1);
    assert_non_null(q);
    if (n) memcpy(q, p, n);
    return q;
}

/* The copy read by the last read_one: items borrow from it until the next
 * call (freed there and in the group teardown). */
static char *last_copy;

static void read_one(const void *bytes, size_t n, mp_item *it) {
    free(last_copy);
    char *copy = last_copy = dup_exact(bytes, n);
    const char *p = copy;
    assert_int_equal(mp_next(&p, copy + n, it), 0);
    assert_ptr_equal(p, copy + n);
    /* the same bytes validate and skip as one value */
    tm_err e;
    err_clear(&e);
    assert_int_equal(mp_validate(copy, n, NULL, &e), 0);
    p = copy;
    assert_int_equal(mp_skip(&p, copy + n), 0);
    assert_ptr_equal(p, copy + n);
}

static int teardown(void **st) {
    free(last_copy);
    last_copy = NULL;
    return 0;
}

#define B(...) ((const unsigned char[]){__VA_ARGS__}), sizeof((const unsigned char[]){__VA_ARGS__})

/* ---- scalars ---- */

static void test_nil_bool(void **st) {
    mp_item it;
    read_one(B(0xc0), &it);
    assert_int_equal(it.type, MP_NIL);
    read_one(B(0xc2), &it);
    assert_int_equal(it.type, MP_BOOL);
    assert_int_equal(it.v.b, 0);
    read_one(B(0xc3), &it);
    assert_int_equal(it.type, MP_BOOL);
    assert_int_equal(it.v.b, 1);
}

static void test_unsigned_widths(void **st) {
    mp_item it;
    read_one(B(0x00), &it);
    assert_int_equal(it.type, MP_UINT);
    assert_int_equal(it.v.u, 0);
    read_one(B(0x7f), &it);
    assert_int_equal(it.v.u, 127);
    read_one(B(0xcc, 0xff), &it);
    assert_int_equal(it.type, MP_UINT);
    assert_int_equal(it.v.u, 255);
    read_one(B(0xcd, 0x12, 0x34), &it);
    assert_int_equal(it.v.u, 0x1234);
    read_one(B(0xce, 0xde, 0xad, 0xbe, 0xef), &it);
    assert_int_equal(it.v.u, 0xdeadbeefu);
    read_one(B(0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff), &it);
    assert_int_equal(it.type, MP_UINT);
    assert_true(it.v.u == UINT64_MAX);
    read_one(B(0xcf, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08), &it);
    assert_true(it.v.u == 0x0102030405060708ull);
}

static void test_signed_widths(void **st) {
    mp_item it;
    read_one(B(0xff), &it);
    assert_int_equal(it.type, MP_INT);
    assert_true(it.v.i == -1);
    read_one(B(0xe0), &it);
    assert_true(it.v.i == -32);
    read_one(B(0xd0, 0x80), &it);
    assert_int_equal(it.type, MP_INT);
    assert_true(it.v.i == -128);
    read_one(B(0xd1, 0x80, 0x00), &it);
    assert_true(it.v.i == -32768);
    read_one(B(0xd2, 0x80, 0x00, 0x00, 0x00), &it);
    assert_true(it.v.i == INT32_MIN);
    read_one(B(0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0), &it);
    assert_int_equal(it.type, MP_INT);
    assert_true(it.v.i == INT64_MIN);
    read_one(B(0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xfe), &it);
    assert_true(it.v.i == -258);
    /* a signed encoding of a non-negative value reads as MP_UINT */
    read_one(B(0xd0, 0x05), &it);
    assert_int_equal(it.type, MP_UINT);
    assert_int_equal(it.v.u, 5);
    read_one(B(0xd3, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff), &it);
    assert_int_equal(it.type, MP_UINT);
    assert_true(it.v.u == INT64_MAX);
}

static void test_packer_ints_roundtrip(void **st) {
    static const int64_t vals[] = {0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295LL,
                                   4294967296LL, INT64_MAX, -1, -32, -33, -128, -129,
                                   -32768, -32769, INT32_MIN, (int64_t)INT32_MIN - 1,
                                   INT64_MIN};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        buf b = BUF_INIT;
        msgpack_packer pk;
        packer(&pk, &b);
        msgpack_pack_int64(&pk, vals[i]);
        mp_item it;
        read_one(b.ptr, b.len, &it);
        if (vals[i] < 0) {
            assert_int_equal(it.type, MP_INT);
            assert_true(it.v.i == vals[i]);
        } else {
            assert_int_equal(it.type, MP_UINT);
            assert_true(it.v.u == (uint64_t)vals[i]);
        }
        buf_free(&b);
    }
}

static void test_floats(void **st) {
    mp_item it;
    read_one(B(0xca, 0x3f, 0xc0, 0x00, 0x00), &it); /* 1.5f */
    assert_int_equal(it.type, MP_FLOAT);
    assert_true(it.v.d == 1.5);
    read_one(B(0xcb, 0x40, 0x09, 0x21, 0xfb, 0x54, 0x44, 0x2d, 0x18), &it);
    assert_int_equal(it.type, MP_DOUBLE);
    assert_true(it.v.d == 3.141592653589793);
    read_one(B(0xcb, 0x80, 0, 0, 0, 0, 0, 0, 0), &it); /* -0.0 */
    assert_true(it.v.d == 0.0);
    assert_true(1.0 / it.v.d < 0);
    buf b = BUF_INIT;
    msgpack_packer pk;
    packer(&pk, &b);
    msgpack_pack_float(&pk, 0.1f);
    read_one(b.ptr, b.len, &it);
    assert_int_equal(it.type, MP_FLOAT);
    assert_true((float)it.v.d == 0.1f);
    buf_free(&b);
}

/* ---- str / bin / ext ---- */

static void check_bytes(const mp_item *it, mp_type t, const char *want, size_t n) {
    assert_int_equal(it->type, t);
    assert_int_equal(it->v.s.len, n);
    assert_memory_equal(it->v.s.ptr, want, n);
}

static void test_strings_all_widths(void **st) {
    static const size_t lens[] = {0, 1, 31, 32, 255, 256, 65535, 65536, 100000};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        size_t n = lens[i];
        char *s = malloc(n + 1);
        for (size_t j = 0; j < n; j++) s[j] = (char)('a' + j % 26);
        for (int kind = 0; kind < 2; kind++) {
            buf b = BUF_INIT;
            msgpack_packer pk;
            packer(&pk, &b);
            if (kind == 0) {
                msgpack_pack_str(&pk, n);
                msgpack_pack_str_body(&pk, s, n);
            } else {
                msgpack_pack_bin(&pk, n);
                msgpack_pack_bin_body(&pk, s, n);
            }
            unsigned c = (unsigned char)b.ptr[0];
            if (kind == 0) {
                if (n < 32) assert_int_equal(c & 0xe0, 0xa0);
                else if (n < 256) assert_int_equal(c, 0xd9);
                else if (n < 65536) assert_int_equal(c, 0xda);
                else assert_int_equal(c, 0xdb);
            }
            mp_item it;
            read_one(b.ptr, b.len, &it);
            check_bytes(&it, kind ? MP_BIN : MP_STR, s, n);
            buf_free(&b);
        }
        free(s);
    }
    /* explicit str16/str32 encodings of short strings are still valid */
    mp_item it;
    read_one(B(0xda, 0x00, 0x02, 'h', 'i'), &it);
    check_bytes(&it, MP_STR, "hi", 2);
    read_one(B(0xdb, 0x00, 0x00, 0x00, 0x02, 'h', 'i'), &it);
    check_bytes(&it, MP_STR, "hi", 2);
    read_one(B(0xc5, 0x00, 0x01, 0x00), &it);
    check_bytes(&it, MP_BIN, "\0", 1);
    read_one(B(0xc6, 0x00, 0x00, 0x00, 0x00), &it);
    check_bytes(&it, MP_BIN, "", 0);
}

static void test_ext_fixext(void **st) {
    static const size_t fix[] = {1, 2, 4, 8, 16};
    static const unsigned fixhdr[] = {0xd4, 0xd5, 0xd6, 0xd7, 0xd8};
    char payload[300];
    for (size_t j = 0; j < sizeof payload; j++) payload[j] = (char)j;
    for (size_t i = 0; i < 5; i++) {
        buf b = BUF_INIT;
        msgpack_packer pk;
        packer(&pk, &b);
        msgpack_pack_ext(&pk, fix[i], -5);
        msgpack_pack_ext_body(&pk, payload, fix[i]);
        assert_int_equal((unsigned char)b.ptr[0], fixhdr[i]);
        mp_item it;
        read_one(b.ptr, b.len, &it);
        check_bytes(&it, MP_EXT, payload, fix[i]);
        assert_int_equal(it.v.s.ext, -5);
        buf_free(&b);
    }
    static const size_t var[] = {0, 3, 255, 256, 300};
    for (size_t i = 0; i < 5; i++) {
        buf b = BUF_INIT;
        msgpack_packer pk;
        packer(&pk, &b);
        msgpack_pack_ext(&pk, var[i], 42);
        msgpack_pack_ext_body(&pk, payload, var[i]);
        mp_item it;
        read_one(b.ptr, b.len, &it);
        check_bytes(&it, MP_EXT, payload, var[i]);
        assert_int_equal(it.v.s.ext, 42);
        buf_free(&b);
    }
    mp_item it;
    read_one(B(0xc9, 0, 0, 0, 2, 0x7f, 'x', 'y'), &it); /* ext32 */
    check_bytes(&it, MP_EXT, "xy", 2);
    assert_int_equal(it.v.s.ext, 127);
    read_one(B(0xc8, 0, 1, 0x80, 'z'), &it); /* ext16, type -128 */
    check_bytes(&it, MP_EXT, "z", 1);
    assert_int_equal(it.v.s.ext, -128);
}

/* ---- containers ---- */

static void test_container_headers(void **st) {
    mp_item it;
    const char *p;
    static const unsigned char fa[] = {0x92, 0x01, 0x02};
    p = (const char *)fa;
    assert_int_equal(mp_next(&p, (const char *)fa + 3, &it), 0);
    assert_int_equal(it.type, MP_ARRAY);
    assert_int_equal(it.v.n, 2);
    assert_ptr_equal(p, (const char *)fa + 1); /* children not skipped */
    static const unsigned char a16[] = {0xdc, 0x00, 0x01, 0xc0};
    p = (const char *)a16;
    assert_int_equal(mp_next(&p, p + 4, &it), 0);
    assert_int_equal(it.type, MP_ARRAY);
    assert_int_equal(it.v.n, 1);
    static const unsigned char a32[] = {0xdd, 0x00, 0x00, 0x00, 0x01, 0xc0};
    p = (const char *)a32;
    assert_int_equal(mp_next(&p, p + 6, &it), 0);
    assert_int_equal(it.v.n, 1);
    static const unsigned char fm[] = {0x81, 0xa1, 'k', 0x01};
    p = (const char *)fm;
    assert_int_equal(mp_next(&p, p + 4, &it), 0);
    assert_int_equal(it.type, MP_MAP);
    assert_int_equal(it.v.n, 1);
    static const unsigned char m16[] = {0xde, 0x00, 0x01, 0xc0, 0xc0};
    p = (const char *)m16;
    assert_int_equal(mp_next(&p, p + 5, &it), 0);
    assert_int_equal(it.type, MP_MAP);
    static const unsigned char m32[] = {0xdf, 0, 0, 0, 1, 0xc0, 0xc0};
    p = (const char *)m32;
    assert_int_equal(mp_next(&p, p + 7, &it), 0);
    assert_int_equal(it.type, MP_MAP);
    assert_int_equal(it.v.n, 1);
    tm_err e;
    assert_int_equal(mp_validate((const char *)fa, 3, NULL, &e), 0);
    assert_int_equal(mp_validate((const char *)a16, 4, NULL, &e), 0);
    assert_int_equal(mp_validate((const char *)a32, 6, NULL, &e), 0);
    assert_int_equal(mp_validate((const char *)fm, 4, NULL, &e), 0);
    assert_int_equal(mp_validate((const char *)m16, 5, NULL, &e), 0);
    assert_int_equal(mp_validate((const char *)m32, 7, NULL, &e), 0);
    assert_int_equal(mp_validate("\x90", 1, NULL, &e), 0);
    assert_int_equal(mp_validate("\x80", 1, NULL, &e), 0);
}

/* A document holding every type, nested. */
static void pack_everything(buf *b) {
    msgpack_packer pk;
    packer(&pk, b);
    msgpack_pack_map(&pk, 9);
    msgpack_pack_str_with_body(&pk, "ints", 4);
    msgpack_pack_array(&pk, 10);
    msgpack_pack_int64(&pk, 1);
    msgpack_pack_int64(&pk, -1);
    msgpack_pack_int64(&pk, 200);
    msgpack_pack_int64(&pk, -200);
    msgpack_pack_int64(&pk, 60000);
    msgpack_pack_int64(&pk, -60000);
    msgpack_pack_int64(&pk, 4000000000LL);
    msgpack_pack_int64(&pk, -4000000000LL);
    msgpack_pack_uint64(&pk, UINT64_MAX);
    msgpack_pack_int64(&pk, INT64_MIN);
    msgpack_pack_str_with_body(&pk, "floats", 6);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_float(&pk, 2.5f);
    msgpack_pack_double(&pk, -1e300);
    msgpack_pack_str_with_body(&pk, "s", 1);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_str_with_body(&pk, "short", 5);
    char mid[40];
    memset(mid, 'm', sizeof mid);
    msgpack_pack_str_with_body(&pk, mid, sizeof mid);
    char big[300];
    memset(big, 'b', sizeof big);
    msgpack_pack_str_with_body(&pk, big, sizeof big);
    msgpack_pack_str_with_body(&pk, "bin", 3);
    msgpack_pack_bin_with_body(&pk, "\x00\x01\x02", 3);
    msgpack_pack_str_with_body(&pk, "ext", 3);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_ext_with_body(&pk, "abcd", 4, 7);
    msgpack_pack_ext_with_body(&pk, "abc", 3, -1);
    msgpack_pack_str_with_body(&pk, "misc", 4);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_nil(&pk);
    msgpack_pack_true(&pk);
    msgpack_pack_false(&pk);
    msgpack_pack_str_with_body(&pk, "nested", 6);
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_int64(&pk, 5); /* non-string key */
    msgpack_pack_array(&pk, 0);
    msgpack_pack_str_with_body(&pk, "empty", 5);
    msgpack_pack_map(&pk, 0);
    msgpack_pack_str_with_body(&pk, "last", 4);
    msgpack_pack_str_with_body(&pk, "x", 1);
}

static void test_everything_validates_and_skips(void **st) {
    buf b = BUF_INIT;
    pack_everything(&b);
    tm_err e;
    err_clear(&e);
    assert_int_equal(mp_validate(b.ptr, b.len, NULL, &e), 0);
    const char *p = b.ptr;
    assert_int_equal(mp_skip(&p, b.ptr + b.len), 0);
    assert_ptr_equal(p, b.ptr + b.len);
    size_t used = 0;
    /* prefix mode accepts trailing bytes */
    buf_append(&b, "\xc0\xc0", 2);
    assert_int_equal(mp_validate_prefix(b.ptr, b.len, NULL, &used, &e), 0);
    assert_int_equal(used, b.len - 2);
    assert_int_equal(mp_validate(b.ptr, b.len, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "2 trailing bytes"));
    buf_free(&b);
}

/* Every proper prefix of a valid value is rejected by every entry point,
 * without reading past the prefix (ASan checks that). */
static void test_truncation_every_byte(void **st) {
    buf b = BUF_INIT;
    pack_everything(&b);
    for (size_t k = 0; k < b.len; k++) {
        char *c = dup_exact(b.ptr, k);
        tm_err e;
        err_clear(&e);
        size_t used = 0;
        assert_int_equal(mp_validate(c, k, NULL, &e), -1);
        assert_int_equal(e.code, TM_EINVAL);
        assert_non_null(strstr(e.msg, "truncated"));
        assert_int_equal(mp_validate_prefix(c, k, NULL, &used, &e), -1);
        const char *p = c;
        assert_int_equal(mp_skip(&p, c + k), -1);
        assert_ptr_equal(p, c); /* cursor untouched on failure */
        free(c);
    }
    buf_free(&b);
}

/* Truncating each scalar form at every byte makes mp_next fail. */
static void test_mp_next_truncation(void **st) {
    static const unsigned char *vals[] = {
        (const unsigned char *)"\xcc\x01", (const unsigned char *)"\xcd\x01\x02",
        (const unsigned char *)"\xce\x01\x02\x03\x04",
        (const unsigned char *)"\xcf\x01\x02\x03\x04\x05\x06\x07\x08",
        (const unsigned char *)"\xd3\x01\x02\x03\x04\x05\x06\x07\x08",
        (const unsigned char *)"\xca\x01\x02\x03\x04",
        (const unsigned char *)"\xcb\x01\x02\x03\x04\x05\x06\x07\x08",
        (const unsigned char *)"\xa3xyz", (const unsigned char *)"\xd9\x02xy",
        (const unsigned char *)"\xda\x00\x02xy", (const unsigned char *)"\xdb\x00\x00\x00\x02xy",
        (const unsigned char *)"\xc4\x02xy", (const unsigned char *)"\xc5\x00\x02xy",
        (const unsigned char *)"\xc6\x00\x00\x00\x02xy", (const unsigned char *)"\xc7\x02\x01xy",
        (const unsigned char *)"\xc8\x00\x02\x01xy",
        (const unsigned char *)"\xc9\x00\x00\x00\x02\x01xy", (const unsigned char *)"\xd4\x01x",
        (const unsigned char *)"\xd5\x01xy", (const unsigned char *)"\xdc\x00\x00",
        (const unsigned char *)"\xdf\x00\x00\x00\x00",
    };
    static const size_t lens[] = {2, 3, 5, 9, 9, 5, 9, 4, 4, 5, 7, 4, 5, 7, 5, 6, 8, 3, 4, 3, 5};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        mp_item it;
        char *full = dup_exact(vals[i], lens[i]);
        const char *p = full;
        assert_int_equal(mp_next(&p, full + lens[i], &it), 0);
        assert_ptr_equal(p, full + lens[i]);
        free(full);
        for (size_t k = 0; k < lens[i]; k++) {
            char *c = dup_exact(vals[i], k);
            p = c;
            assert_int_equal(mp_next(&p, c + k, &it), -1);
            assert_ptr_equal(p, c);
            free(c);
        }
    }
}

/* ---- hostile input ---- */

static void expect_invalid(const void *bytes, size_t n, const mp_limits *lim, const char *needle) {
    char *c = dup_exact(bytes, n);
    tm_err e;
    err_clear(&e);
    assert_int_equal(mp_validate(c, n, lim, &e), -1);
    assert_int_equal(e.code, TM_EINVAL);
    if (!strstr(e.msg, needle)) fail_msg("message '%s' lacks '%s'", e.msg, needle);
    free(c);
}

static void test_hostile_headers(void **st) {
    expect_invalid(B(0xdb, 0xff, 0xff, 0xff, 0xff, 'a', 'b'), NULL, "truncated at byte 0");
    expect_invalid(B(0xc6, 0xff, 0xff, 0xff, 0xff, 'a'), NULL, "truncated at byte 0");
    expect_invalid(B(0xc9, 0xff, 0xff, 0xff, 0xff, 1, 'a'), NULL, "truncated at byte 0");
    expect_invalid(B(0xda, 0xff, 0xff), NULL, "truncated");
    expect_invalid(B(0x91, 0xdb, 0xff, 0xff, 0xff, 0xfa), NULL, "truncated at byte 1");
    /* huge counts: items limit first, then "not enough bytes" */
    expect_invalid(B(0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0), NULL, "exceeds limit");
    expect_invalid(B(0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0), NULL, "exceeds limit");
    mp_limits big = {64, UINT32_MAX, 1 << 20};
    expect_invalid(B(0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0), &big, "claims 4294967295 items");
    expect_invalid(B(0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0, 0xc0), &big, "truncated");
    expect_invalid(B(0xdc, 0x00, 0x03, 0xc0, 0xc0), NULL, "truncated");
    /* the never-used byte */
    expect_invalid(B(0xc1), NULL, "invalid byte 0xc1 at byte 0");
    expect_invalid(B(0x92, 0x01, 0xc1), NULL, "invalid byte 0xc1 at byte 2");
    const char *p = "\xc1";
    mp_item it;
    assert_int_equal(mp_next(&p, p + 1, &it), -1);
    p = "\x91\xc1";
    assert_int_equal(mp_skip(&p, p + 2), -1);
    /* empty input */
    expect_invalid("", 0, NULL, "truncated at byte 0");
    p = "";
    assert_int_equal(mp_next(&p, p, &it), -1);
    assert_int_equal(mp_skip(&p, p), -1);
}

static void test_deep_nesting(void **st) {
    /* 1e6 nested one-element arrays: no recursion, rejected at the limit */
    size_t n = 1000000;
    char *deep = malloc(n + 1);
    memset(deep, 0x91, n);
    deep[n] = (char)0xc0;
    tm_err e;
    assert_int_equal(mp_validate(deep, n + 1, &(mp_limits){64, 1 << 20, 4 << 20}, &e), -1);
    assert_non_null(strstr(e.msg, "nesting deeper than 64 at byte 64"));
    /* mp_skip has no depth limit and no recursion */
    const char *p = deep;
    assert_int_equal(mp_skip(&p, deep + n + 1), 0);
    assert_ptr_equal(p, deep + n + 1);
    p = deep;
    assert_int_equal(mp_skip(&p, deep + n), -1);
    free(deep);

    /* exactly max_depth levels pass, one more fails (also for empty containers) */
    char d[70];
    memset(d, 0x91, 63);
    d[63] = (char)0x90;
    assert_int_equal(mp_validate(d, 64, NULL, &e), 0);
    memset(d, 0x91, 64);
    d[64] = (char)0x90;
    assert_int_equal(mp_validate(d, 65, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "nesting deeper than 64 at byte 64"));
    /* maps: key nil, value nested */
    char m[130];
    for (int i = 0; i < 64; i++) {
        m[2 * i] = (char)0x81;
        m[2 * i + 1] = (char)0xc0;
    }
    m[128] = (char)0xc0;
    assert_int_equal(mp_validate(m, 129, NULL, &e), 0);
    m[128] = (char)0x80;
    assert_int_equal(mp_validate(m, 129, NULL, &e), -1);
    /* a large custom depth uses a heap stack */
    mp_limits deeplim = {100000, 1 << 20, 1 << 20};
    char *dd = malloc(100001);
    memset(dd, 0x91, 100000);
    dd[100000] = 0x01;
    assert_int_equal(mp_validate(dd, 100001, &deeplim, &e), 0);
    deeplim.max_depth = 99999;
    assert_int_equal(mp_validate(dd, 100001, &deeplim, &e), -1);
    free(dd);
    /* an unbounded depth limit does not allocate by the limit */
    mp_limits nolim = {UINT32_MAX, UINT32_MAX, SIZE_MAX};
    dd = malloc(1000);
    memset(dd, 0x91, 999);
    dd[999] = 0x01;
    assert_int_equal(mp_validate(dd, 1000, &nolim, &e), 0);
    assert_int_equal(mp_validate(dd, 999, &nolim, &e), -1);
    free(dd);
    /* depth 0: scalars only */
    mp_limits flat = {0, 10, 100};
    assert_int_equal(mp_validate("\x01", 1, &flat, &e), 0);
    assert_int_equal(mp_validate("\x90", 1, &flat, &e), -1);
}

static void test_items_limit(void **st) {
    mp_limits lim = {8, 3, 1000};
    tm_err e;
    assert_int_equal(mp_validate("\x93\x01\x02\x03", 4, &lim, &e), 0);
    assert_int_equal(mp_validate("\x94\x01\x02\x03\x04", 5, &lim, &e), -1);
    assert_non_null(strstr(e.msg, "array of 4 items exceeds limit of 3 at byte 0"));
    /* maps count pairs */
    assert_int_equal(mp_validate("\x83\x01\x01\x02\x02\x03\x03", 7, &lim, &e), 0);
    assert_int_equal(mp_validate("\x91\x84\x01\x01\x02\x02\x03\x03\x04\x04", 10, &lim, &e), -1);
    assert_non_null(strstr(e.msg, "map of 4 items exceeds limit of 3 at byte 1"));
    /* the limit is per container, not total */
    assert_int_equal(mp_validate("\x93\x93\x01\x02\x03\x93\x01\x02\x03\x01", 10, &lim, &e), 0);
}

static void test_size_limit(void **st) {
    mp_limits lim = {8, 1000, 10};
    tm_err e;
    /* str of 9 bytes payload + 1 header = 10 bytes: fits exactly */
    assert_int_equal(mp_validate("\xa9" "123456789", 10, &lim, &e), 0);
    assert_int_equal(mp_validate("\xaa" "1234567890", 11, &lim, &e), -1);
    assert_non_null(strstr(e.msg, "size limit of 10"));
    /* an array whose elements run past the limit */
    assert_int_equal(mp_validate("\x9b\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b", 12, &lim, &e),
                     -1);
    assert_non_null(strstr(e.msg, "size limit"));
    /* prefix mode: a small value followed by many bytes is fine */
    size_t used;
    char tail[100];
    memset(tail, 0, sizeof tail);
    tail[0] = (char)0x92;
    assert_int_equal(mp_validate_prefix(tail, sizeof tail, &lim, &used, &e), 0);
    assert_int_equal(used, 3);
    /* but a value that itself exceeds the limit is not */
    tail[0] = (char)0xdc;
    tail[1] = 0;
    tail[2] = 20;
    assert_int_equal(mp_validate_prefix(tail, sizeof tail, &lim, &used, &e), -1);
    assert_non_null(strstr(e.msg, "size limit"));
    /* default limits */
    assert_int_equal(mp_default_limits.max_depth, 64);
    assert_int_equal(mp_default_limits.max_items, 1 << 20);
    assert_int_equal(mp_default_limits.max_size, 1 << 20);
    size_t big = (1 << 20) + 1;
    char *s = calloc(1, big);
    s[0] = (char)0xdb;
    uint32_t pl = (uint32_t)(big - 5);
    s[1] = (char)(pl >> 24), s[2] = (char)(pl >> 16), s[3] = (char)(pl >> 8), s[4] = (char)pl;
    assert_int_equal(mp_validate(s, big, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "size limit"));
    pl--;
    s[4] = (char)pl;
    assert_int_equal(mp_validate(s, big - 1, NULL, &e), 0);
    free(s);
}

static void test_null_err_ok(void **st) {
    assert_int_equal(mp_validate("\xc1", 1, NULL, NULL), -1);
    assert_int_equal(mp_validate("\x01", 1, NULL, NULL), 0);
}

/* ---- mp_map_find ---- */

/* bytes_eq against memcmp: every length up to 40 (each of its word-load
 * paths and the memcmp one), a difference at every position, and
 * unaligned starts. */
static void test_bytes_eq(void **st) {
    (void)st;
    char a[64], b[64];
    for (size_t off = 0; off < 3; off++)
        for (size_t n = 0; n <= 40; n++) {
            for (size_t i = 0; i < n; i++) a[off + i] = b[1 + i] = (char)('a' + (i * 7) % 26);
            assert_true(bytes_eq(a + off, b + 1, n));
            for (size_t i = 0; i < n; i++) {
                b[1 + i] ^= 0x20;
                assert_false(bytes_eq(a + off, b + 1, n));
                assert_int_equal(bytes_eq(a + off, b + 1, n), memcmp(a + off, b + 1, n) == 0);
                b[1 + i] ^= 0x20;
            }
        }
}

static void test_map_find(void **st) {
    buf b = BUF_INIT;
    msgpack_packer pk;
    packer(&pk, &b);
    msgpack_pack_map(&pk, 5);
    msgpack_pack_int64(&pk, 7); /* int key: skipped */
    msgpack_pack_str_with_body(&pk, "seven", 5);
    msgpack_pack_array(&pk, 2); /* array key: skipped whole */
    msgpack_pack_str_with_body(&pk, "type", 4);
    msgpack_pack_int64(&pk, 1);
    msgpack_pack_str_with_body(&pk, "wrong", 5);
    msgpack_pack_str_with_body(&pk, "typ", 3);
    msgpack_pack_int64(&pk, 2);
    msgpack_pack_str_with_body(&pk, "type", 4);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_int64(&pk, 3);
    msgpack_pack_map(&pk, 0);
    msgpack_pack_str_with_body(&pk, "", 0);
    msgpack_pack_nil(&pk);
    const char *v;
    size_t vl;
    assert_int_equal(mp_map_find(b.ptr, b.len, "type", 4, &v, &vl), 1);
    assert_int_equal(vl, 3);
    assert_memory_equal(v, "\x92\x03\x80", 3);
    assert_int_equal(mp_map_find(b.ptr, b.len, "typ", 3, &v, &vl), 1);
    assert_int_equal(vl, 1);
    assert_int_equal(*v, 2);
    assert_int_equal(mp_map_find(b.ptr, b.len, "", 0, &v, &vl), 1);
    assert_int_equal((unsigned char)*v, 0xc0);
    assert_int_equal(mp_map_find(b.ptr, b.len, "types", 5, &v, &vl), 0);
    assert_int_equal(mp_map_find(b.ptr, b.len, "seven", 5, &v, &vl), 0); /* a value, not a key */
    /* truncated maps are malformed at every cut before the match */
    for (size_t k = 0; k < b.len; k++) {
        char *c = dup_exact(b.ptr, k);
        int r = mp_map_find(c, k, "", 0, &v, &vl);
        assert_int_equal(r, -1);
        free(c);
    }
    /* not a map */
    assert_int_equal(mp_map_find("\x90", 1, "a", 1, &v, &vl), -1);
    assert_int_equal(mp_map_find("\x80", 1, "a", 1, &v, &vl), 0);
    buf_free(&b);
}

/* The walk without calls (fixmap, fixstr keys, fixstr and fixint values)
 * against the general one: the same answers for a map16 header, a str8
 * key, negative fixints, and truncation at every byte. */
static void test_map_find_fast_forms(void **st) {
    (void)st;
    static const char fix[] = "\x84\xa1n\xff\xa2id\xa3" "c-7\xd9\x01k\x7f\xa1x\x92\x01\xa1y";
    static const char big[] = "\xde\x00\x04\xa1n\xff\xa2id\xa3" "c-7\xd9\x01k\x7f\xa1x\x92\x01\xa1y";
    const char *maps[] = {fix, big};
    size_t lens[] = {sizeof fix - 1, sizeof big - 1};
    for (int m = 0; m < 2; m++) {
        const char *v;
        size_t vl;
        assert_int_equal(mp_map_find(maps[m], lens[m], "n", 1, &v, &vl), 1);
        assert_int_equal(vl, 1);
        assert_int_equal((unsigned char)*v, 0xff);
        assert_int_equal(mp_map_find(maps[m], lens[m], "id", 2, &v, &vl), 1);
        assert_int_equal(vl, 4);
        assert_memory_equal(v, "\xa3" "c-7", 4);
        assert_int_equal(mp_map_find(maps[m], lens[m], "k", 1, &v, &vl), 1); /* a str8 key */
        assert_int_equal(vl, 1);
        assert_int_equal(*v, 0x7f);
        assert_int_equal(mp_map_find(maps[m], lens[m], "x", 1, &v, &vl), 1);
        assert_int_equal(vl, 4);
        assert_int_equal(mp_map_find(maps[m], lens[m], "y", 1, &v, &vl), 0);
        for (size_t k = 0; k < lens[m]; k++) {
            char *c = dup_exact(maps[m], k);
            assert_int_equal(mp_map_find(c, k, "x", 1, &v, &vl), -1);
            free(c);
        }
    }
}

/* ---- deterministic fuzz: validator agrees with mp_skip, never crashes ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void test_fuzz(void **st) {
    buf base = BUF_INIT;
    pack_everything(&base);
    int valid = 0;
    for (int iter = 0; iter < 20000; iter++) {
        size_t n;
        char *c;
        if (iter & 1) { /* random bytes biased to headers */
            n = 1 + rnd() % 40;
            c = malloc(n);
            for (size_t i = 0; i < n; i++) {
                uint64_t r = rnd();
                c[i] = (char)((r & 3) == 0 ? (0xc0 + (r >> 8) % 32) : (r >> 8));
            }
        } else { /* mutate a valid document */
            n = base.len;
            c = dup_exact(base.ptr, n);
            int muts = 1 + (int)(rnd() % 3);
            for (int m = 0; m < muts; m++) c[rnd() % n] = (char)rnd();
            if (rnd() % 4 == 0) n = rnd() % n; /* and truncate */
            char *t = dup_exact(c, n);
            free(c);
            c = t;
        }
        tm_err e;
        size_t used = 0;
        int rv = mp_validate_prefix(c, n, NULL, &used, &e);
        const char *p = c;
        int rs = mp_skip(&p, c + n);
        if (rv == 0) {
            valid++;
            assert_int_equal(rs, 0);
            assert_int_equal((size_t)(p - c), used);
            assert_int_equal(mp_validate(c, used, NULL, &e), 0);
        }
        free(c);
    }
    assert_true(valid > 100); /* the fuzz did exercise the success path */
    buf_free(&base);
}

/* mp_validate's shortcut for flat maps/arrays of scalars agrees with the
 * general walk (mp_validate_prefix takes no shortcut) on such values,
 * their corruptions and truncations, under tight and default limits. */
static void test_flat_shortcut(void **st) {
    static const unsigned char heads[] = {0x00, 0x7f, 0xe0, 0xff, 0xc0, 0xc1, 0xc2, 0xc3, 0xca,
                                          0xcb, 0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd1, 0xd2, 0xd3,
                                          0xd4, 0xd9, 0xda, 0xa0, 0xa5, 0xbf, 0x80, 0x91, 0xc4};
    int accepted = 0;
    for (int iter = 0; iter < 30000; iter++) {
        unsigned char c[400];
        size_t n = 0;
        int is_map = rnd() & 1;
        unsigned items = (unsigned)(rnd() % 16);
        c[n++] = (unsigned char)((is_map ? 0x80 : 0x90) | items);
        for (unsigned i = 0; i < (is_map ? 2 * items : items) && n < 300; i++) {
            unsigned char h = heads[rnd() % sizeof heads];
            if (h == 0xa5 || h == 0xbf || h == 0xa0) h = (unsigned char)(0xa0 | (rnd() % 32));
            c[n++] = h;
            size_t extra = 0;
            if ((h & 0xe0) == 0xa0) extra = h & 0x1f;
            else if (h == 0xd9) {
                c[n++] = (unsigned char)(rnd() % 40);
                extra = c[n - 1];
            } else if (h >= 0xca && h <= 0xd3) {
                static const unsigned char sz[] = {4, 8, 1, 2, 4, 8, 1, 2, 4, 8};
                extra = sz[h - 0xca];
            } else if (h == 0xd4) extra = 2;
            else if (h == 0xda) extra = 2 + (rnd() % 3);
            else if (h == 0xc4) extra = 1 + (rnd() % 3);
            for (size_t k = 0; k < extra; k++) c[n++] = (unsigned char)rnd();
        }
        switch (rnd() % 6) {
        case 0: c[rnd() % n] = (unsigned char)rnd(); break;
        case 1: n = rnd() % n; break;
        case 2: c[n++] = (unsigned char)rnd(); break;
        default: break;
        }
        mp_limits lim = mp_default_limits;
        if (rnd() % 3 == 0) {
            lim.max_depth = (unsigned)(rnd() % 3);
            lim.max_items = (uint32_t)(rnd() % 17);
            lim.max_size = rnd() % 300;
        }
        char *t = dup_exact((const char *)c, n);
        tm_err e;
        size_t used = 0;
        int general = mp_validate_prefix(t, n, &lim, &used, &e) == 0 && used == n;
        int got = mp_validate(t, n, &lim, &e) == 0;
        if (general != got) fail_msg("iter %d: general %d, mp_validate %d (len %zu)", iter, general, got, n);
        accepted += got;
        free(t);
    }
    assert_true(accepted > 1000);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nil_bool),
        cmocka_unit_test(test_unsigned_widths),
        cmocka_unit_test(test_signed_widths),
        cmocka_unit_test(test_packer_ints_roundtrip),
        cmocka_unit_test(test_floats),
        cmocka_unit_test(test_strings_all_widths),
        cmocka_unit_test(test_ext_fixext),
        cmocka_unit_test(test_container_headers),
        cmocka_unit_test(test_everything_validates_and_skips),
        cmocka_unit_test(test_truncation_every_byte),
        cmocka_unit_test(test_mp_next_truncation),
        cmocka_unit_test(test_hostile_headers),
        cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_items_limit),
        cmocka_unit_test(test_size_limit),
        cmocka_unit_test(test_null_err_ok),
        cmocka_unit_test(test_bytes_eq),
        cmocka_unit_test(test_map_find),
        cmocka_unit_test(test_map_find_fast_forms),
        cmocka_unit_test(test_fuzz),
        cmocka_unit_test(test_flat_shortcut),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
