/* test_json.c — unit tests for engine/json.c: JSON -> msgpack -> JSON round
 * trips (numbers, strings, key order, canonical headers), parse errors with
 * offsets, limits, msgpack-only types on output, string escaping. */
#include <math.h>
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
#include "json.h"
#include "mp.h"

static int buf_write(void *data, const char *p, size_t n) {
    buf_append(data, p, n);
    return 0;
}

/* JSON -> msgpack (must validate) -> JSON; returns malloc'd text. */
static char *roundtrip(const char *in, size_t inlen, const mp_limits *lim) {
    buf mp = BUF_INIT, js = BUF_INIT;
    tm_err e;
    err_clear(&e);
    if (json_to_mp(in, inlen, lim, &mp, &e) != 0) fail_msg("json_to_mp(%s): %s", in, e.msg);
    if (mp_validate(mp.ptr, mp.len, lim, &e) != 0) fail_msg("mp_validate(%s): %s", in, e.msg);
    if (json_from_mp(mp.ptr, mp.len, &js, &e) != 0) fail_msg("json_from_mp(%s): %s", in, e.msg);
    buf_free(&mp);
    return buf_steal(&js, NULL);
}

static void check_rt(const char *in, const char *want) {
    char *got = roundtrip(in, strlen(in), NULL);
    if (strcmp(got, want) != 0) fail_msg("%s -> %s, want %s", in, got, want);
    /* the output is a fixed point */
    char *again = roundtrip(got, strlen(got), NULL);
    if (strcmp(again, want) != 0) fail_msg("%s -> %s (second pass), want %s", got, again, want);
    free(again);
    free(got);
}

static void test_roundtrip_scalars(void **st) {
    check_rt("null", "null");
    check_rt("true", "true");
    check_rt("false", "false");
    check_rt("0", "0");
    check_rt("-0", "0"); /* an integer literal: the integer 0 */
    check_rt("-0.0", "-0.0");
    check_rt("0.0", "0.0");
    check_rt("1", "1");
    check_rt("1.0", "1.0");
    check_rt("1.00", "1.0");
    check_rt("-1", "-1");
    check_rt("1.5", "1.5");
    check_rt("0.1", "0.1");
    check_rt("-2.5e-3", "-0.0025");
    check_rt("1E2", "100.0");
    check_rt("1e300", "1e+300");
    check_rt("1e15", "1e+15");
    check_rt("123456789012345.0", "123456789012345.0");
    check_rt("3.141592653589793", "3.141592653589793");
    check_rt("2.718281828459045", "2.718281828459045");
    check_rt("5e-324", "4.94065645841247e-324"); /* 15 digits suffice */
    check_rt("1.7976931348623157e308", "1.7976931348623157e+308");
    check_rt("0.30000000000000004", "0.30000000000000004");
    { /* overflows a double: refused (infinity would print back as null) */
        buf mp = BUF_INIT;
        tm_err e;
        assert_int_equal(json_to_mp("1e400", 5, NULL, &mp, &e), -1);
        assert_non_null(strstr(e.msg, "out of range"));
        assert_int_equal(json_to_mp("[-1e999]", 8, NULL, &mp, &e), -1);
        /* an unpaired low surrogate escape would decode to invalid UTF-8 */
        assert_int_equal(json_to_mp("\"\\udc00\"", 8, NULL, &mp, &e), -1);
        assert_non_null(strstr(e.msg, "surrogate"));
        assert_int_equal(json_to_mp("{\"\\udfff\":1}", 12, NULL, &mp, &e), -1);
        assert_int_equal(mp.len, 0);
        check_rt("\"\\ud83d\\ude00\"", "\"\xf0\x9f\x98\x80\""); /* a pair is fine */
        /* raw invalid UTF-8 that yajl lets through: an overlong form */
        assert_int_equal(json_to_mp("\"a\xc0\xa3\"", 5, NULL, &mp, &e), -1);
        assert_non_null(strstr(e.msg, "UTF-8"));
        buf_free(&mp);
    }
    check_rt("127", "127");
    check_rt("128", "128");
    check_rt("-32", "-32");
    check_rt("-33", "-33");
    check_rt("65536", "65536");
    check_rt("9223372036854775807", "9223372036854775807");
    check_rt("-9223372036854775808", "-9223372036854775808");
    check_rt("9223372036854775808", "9223372036854775808");    /* uint64 */
    check_rt("18446744073709551615", "18446744073709551615"); /* uint64 max */
    check_rt("18446744073709551616", "1.8446744073709552e+19");
    check_rt("-9223372036854775809", "-9.223372036854776e+18");
    check_rt("100000000000000000000000000000000000000000000000000000000000000000000000000000001",
             "1e+80");
    check_rt("  \t\n 42 \r\n", "42");
}

/* Expected msgpack bytes of a JSON text. */
static void check_mp(const char *in, const void *want, size_t wlen) {
    buf mp = BUF_INIT;
    tm_err e;
    if (json_to_mp(in, strlen(in), NULL, &mp, &e) != 0) fail_msg("%s: %s", in, e.msg);
    assert_int_equal(mp.len, wlen);
    assert_memory_equal(mp.ptr, want, wlen);
    buf_free(&mp);
}

#define B(...) ((const unsigned char[]){__VA_ARGS__}), sizeof((const unsigned char[]){__VA_ARGS__})

static void test_number_encodings(void **st) {
    check_mp("1", B(0x01));
    check_mp("-1", B(0xff));
    check_mp("-0", B(0x00));
    check_mp("255", B(0xcc, 0xff));
    check_mp("-129", B(0xd1, 0xff, 0x7f));
    check_mp("9223372036854775808", B(0xcf, 0x80, 0, 0, 0, 0, 0, 0, 0));
    check_mp("-9223372036854775808", B(0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0));
    check_mp("1.0", B(0xcb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0));
    check_mp("-0.0", B(0xcb, 0x80, 0, 0, 0, 0, 0, 0, 0));
    check_mp("1e0", B(0xcb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0));
    check_mp("\"\"", B(0xa0));
    check_mp("[]", B(0x90));
    check_mp("{}", B(0x80));
    check_mp("{\"a\":[1,{}]}", B(0x81, 0xa1, 'a', 0x92, 0x01, 0x80));
}

static void test_roundtrip_strings(void **st) {
    check_rt("\"\"", "\"\"");
    check_rt("\"hello\"", "\"hello\"");
    check_rt("\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\"", "\"a\\\"b\\\\c/d\\b\\f\\n\\r\\t\"");
    check_rt("\"\\u0041\\u00e9\\u20AC\"", "\"A\xc3\xa9\xe2\x82\xac\"");
    check_rt("\"\\ud83d\\ude00\"", "\"\xf0\x9f\x98\x80\"");       /* surrogate pair */
    check_rt("\"\\uD834\\uDD1E\"", "\"\xf0\x9d\x84\x9e\"");       /* upper-case hex */
    check_rt("\"\\u0000x\\u001f\\u007f\"", "\"\\u0000x\\u001f\x7f\"");
    check_rt("\"\xc3\xa9t\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\"", "\"\xc3\xa9t\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\"");
    check_rt("\"\xf0\x9f\x8e\x89\"", "\"\xf0\x9f\x8e\x89\"");
    /* the NUL byte inside a JSON string survives (length-counted) */
    char *got = roundtrip("\"a\\u0000b\"", 10, NULL);
    assert_string_equal(got, "\"a\\u0000b\"");
    free(got);
}

static void test_roundtrip_containers(void **st) {
    check_rt("[]", "[]");
    check_rt("{}", "{}");
    check_rt("[1,[2,[3,[]]],{}]", "[1,[2,[3,[]]],{}]");
    check_rt("{\"b\":1,\"a\":2,\"c\":{\"z\":[],\"y\":null}}",
             "{\"b\":1,\"a\":2,\"c\":{\"z\":[],\"y\":null}}"); /* key order kept */
    check_rt(" { \"a\" : [ 1 , 2.5 , \"x\" , true , false , null ] } ",
             "{\"a\":[1,2.5,\"x\",true,false,null]}");
    check_rt("{\"\":\"\",\"k\\n\":\"v\"}", "{\"\":\"\",\"k\\n\":\"v\"}");
    /* duplicate keys are kept as written (no tree) */
    check_rt("{\"a\":1,\"a\":2}", "{\"a\":1,\"a\":2}");
}

/* Containers of every header width come out canonical: the same bytes as
 * msgpack-c's packer produces for the same structure. */
static void test_canonical_headers(void **st) {
    static const uint32_t counts[] = {0, 1, 15, 16, 17, 65535, 65536, 70000};
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        uint32_t n = counts[i];
        for (int is_map = 0; is_map < 2; is_map++) {
            buf js = BUF_INIT, want = BUF_INIT, got = BUF_INIT;
            msgpack_packer pk;
            msgpack_packer_init(&pk, &want, buf_write);
            /* wrap in an outer array with a trailing item so compaction
             * must also move bytes after the container */
            msgpack_pack_array(&pk, 3);
            msgpack_pack_str_with_body(&pk, "pre", 3);
            buf_putc(&js, '[');
            buf_puts(&js, "\"pre\",");
            buf_putc(&js, is_map ? '{' : '[');
            if (is_map) msgpack_pack_map(&pk, n);
            else msgpack_pack_array(&pk, n);
            for (uint32_t j = 0; j < n; j++) {
                if (j) buf_putc(&js, ',');
                if (is_map) {
                    buf_printf(&js, "\"k%u\":%u", j, j);
                    char k[16];
                    int kl = snprintf(k, sizeof k, "k%u", j);
                    msgpack_pack_str_with_body(&pk, k, (size_t)kl);
                    msgpack_pack_uint32(&pk, j);
                } else {
                    buf_printf(&js, "[%u]", j % 300);
                    msgpack_pack_array(&pk, 1);
                    msgpack_pack_uint32(&pk, j % 300);
                }
            }
            buf_putc(&js, is_map ? '}' : ']');
            buf_puts(&js, ",\"post\"]");
            msgpack_pack_str_with_body(&pk, "post", 4);
            mp_limits lim = {8, 1 << 20, 16 << 20};
            tm_err e;
            if (json_to_mp(js.ptr, js.len, &lim, &got, &e) != 0) fail_msg("%s", e.msg);
            assert_int_equal(got.len, want.len);
            assert_memory_equal(got.ptr, want.ptr, want.len);
            buf_free(&js);
            buf_free(&want);
            buf_free(&got);
        }
    }
}

/* Appending keeps what the buffer held; whitespace never changes bytes. */
static void test_append_and_determinism(void **st) {
    buf a = BUF_INIT, b = BUF_INIT;
    tm_err e;
    buf_puts(&a, "HEAD");
    buf_puts(&b, "HEAD");
    const char *x = "{\"a\":[1,2,{\"b\":\"c\"}],\"d\":1.5}";
    const char *y = "\n{ \"a\" : [ 1, 2, { \"b\" : \"c\" } ] , \"d\" : 1.50 }\n";
    assert_int_equal(json_to_mp(x, strlen(x), NULL, &a, &e), 0);
    assert_int_equal(json_to_mp(y, strlen(y), NULL, &b, &e), 0);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.ptr, b.ptr, a.len);
    assert_memory_equal(a.ptr, "HEAD", 4);
    assert_int_equal(mp_validate(a.ptr + 4, a.len - 4, NULL, &e), 0);
    /* on error the buffer is restored */
    size_t before = a.len;
    assert_int_equal(json_to_mp("[1,2", 4, NULL, &a, &e), -1);
    assert_int_equal(a.len, before);
    buf_free(&a);
    buf_free(&b);
}

/* ---- errors ---- */

static void check_err(const char *in, size_t len, const mp_limits *lim, const char *needle) {
    buf mp = BUF_INIT;
    tm_err e;
    err_clear(&e);
    int rc = json_to_mp(in, len, lim, &mp, &e);
    if (rc != -1) fail_msg("accepted: %.*s", (int)len, in);
    assert_int_equal(e.code, TM_EINVAL);
    assert_int_equal(mp.len, 0);
    if (!strstr(e.msg, needle)) fail_msg("'%s': message '%s' lacks '%s'", in, e.msg, needle);
    if (strchr(e.msg, '\n')) fail_msg("multi-line message: %s", e.msg);
    buf_free(&mp);
}

#define ERR(s, needle) check_err(s, sizeof(s) - 1, NULL, needle)

static void test_malformed(void **st) {
    ERR("", "at byte 0: parse error: premature EOF");
    ERR("   ", "at byte 3: parse error: premature EOF");
    ERR("[1,2", "at byte 4: parse error: premature EOF");
    ERR("[1 2]", "at byte 4: parse error: after array element, I expect ',' or ']'");
    ERR("[1]x", "at byte 4: parse error: trailing garbage");
    ERR("1 2", "trailing garbage");
    ERR("{\"a\":1,}", "at byte 8: parse error: invalid object key (must be a string)");
    ERR("{\"a\" 1}", "object key and value must be separated by a colon");
    ERR("{a:1}", "at byte 2: lexical error: invalid char in json text");
    ERR("[tru]", "lexical error");
    ERR("[1e]", "at byte 3: lexical error: malformed number, a digit is required after the exponent");
    ERR("-", "malformed number");
    ERR("01", "trailing garbage");
    ERR("\"abc", "premature EOF");
    ERR("\"a\\x\"", "lexical error: inside a string, '\\' occurs before a character which it may not");
    ERR("\"\xff\"", "at byte 2: lexical error: invalid bytes in UTF8 string");
    ERR("\"a\nb\"", "invalid character inside string");
    ERR("[1,]", "unallowed token");
    ERR("// c\n1", "lexical error"); /* comments are not JSON */
    ERR("NaN", "lexical error");
    ERR("\x00", "lexical error");
}

static void test_limits(void **st) {
    char d[200];
    /* depth: 64 nested arrays pass, 65 fail */
    memset(d, '[', 64);
    memset(d + 64, ']', 64);
    char *got = roundtrip(d, 128, NULL);
    assert_int_equal(strlen(got), 128);
    free(got);
    memset(d, '[', 65);
    memset(d + 65, ']', 65);
    check_err(d, 130, NULL, "at byte 65: nesting deeper than 64");
    /* maps nest too */
    buf m = BUF_INIT;
    for (int i = 0; i < 65; i++) buf_puts(&m, "{\"k\":");
    buf_puts(&m, "1");
    for (int i = 0; i < 65; i++) buf_putc(&m, '}');
    check_err(m.ptr, m.len, NULL, "nesting deeper than 64");
    buf_free(&m);
    /* a million '[' fails fast at the limit */
    size_t n = 1000000;
    char *deep = malloc(n);
    memset(deep, '[', n);
    check_err(deep, n, NULL, "nesting deeper than 64");
    free(deep);

    mp_limits lim = {4, 3, 1 << 20};
    got = roundtrip("[1,2,3]", 7, &lim);
    free(got);
    check_err("[1,2,3,4]", 9, &lim, "at byte 8: array of more than 3 items");
    got = roundtrip("{\"a\":1,\"b\":2,\"c\":[1,2,3]}", 25, &lim);
    free(got);
    check_err("{\"a\":1,\"b\":2,\"c\":3,\"d\":4}", 25, &lim, "object of more than 3 items");
    check_err("[[1,2,3,4]]", 11, &lim, "array of more than 3 items");

    /* size: the final (compact) size counts, exactly */
    mp_limits sz = {8, 100, 10};
    got = roundtrip("\"123456789\"", 11, &sz); /* 1 + 9 bytes */
    free(got);
    check_err("\"1234567890\"", 12, &sz, "size limit of 10 bytes");
    mp_limits sz4 = {8, 100, 4};
    got = roundtrip("[1,2,3]", 7, &sz4); /* 4 bytes, though written with a 5-byte header first */
    free(got);
    check_err("[1,2,3,4]", 9, &sz4, "size limit of 4 bytes");
    got = roundtrip("[[[]]]", 6, &(mp_limits){8, 100, 3});
    free(got);
    check_err("[[[[]]]]", 8, &(mp_limits){8, 100, 3}, "size limit of 3 bytes");
}

/* ---- msgpack-only values on output ---- */

static void check_from(const buf *mp, const char *want) {
    buf js = BUF_INIT;
    tm_err e;
    if (json_from_mp(mp->ptr, mp->len, &js, &e) != 0) fail_msg("%s", e.msg);
    assert_string_equal(js.ptr, want);
    buf_free(&js);
}

static void test_from_mp_types(void **st) {
    buf b = BUF_INIT;
    msgpack_packer pk;
    msgpack_packer_init(&pk, &b, buf_write);

    msgpack_pack_bin_with_body(&pk, "\x00\x01\x02", 3);
    check_from(&b, "{\"$bin\":\"AAEC\"}");
    buf_reset(&b);
    msgpack_pack_bin_with_body(&pk, "", 0);
    check_from(&b, "{\"$bin\":\"\"}");
    buf_reset(&b);
    msgpack_pack_bin_with_body(&pk, "f", 1);
    check_from(&b, "{\"$bin\":\"Zg==\"}");
    buf_reset(&b);
    msgpack_pack_bin_with_body(&pk, "fo", 2);
    check_from(&b, "{\"$bin\":\"Zm8=\"}");
    buf_reset(&b);
    msgpack_pack_bin_with_body(&pk, "foobar\xff\xfe", 8);
    check_from(&b, "{\"$bin\":\"Zm9vYmFy//4=\"}");
    buf_reset(&b);
    msgpack_pack_ext_with_body(&pk, "abcd", 4, 5);
    check_from(&b, "{\"$ext\":5,\"data\":\"YWJjZA==\"}");
    buf_reset(&b);
    msgpack_pack_ext_with_body(&pk, "xyz", 3, -1);
    check_from(&b, "{\"$ext\":-1,\"data\":\"eHl6\"}");
    buf_reset(&b);

    /* non-string keys are stringified JSON */
    msgpack_pack_map(&pk, 6);
    msgpack_pack_int64(&pk, 1);
    msgpack_pack_int64(&pk, 2);
    msgpack_pack_int64(&pk, -7);
    msgpack_pack_true(&pk);
    msgpack_pack_nil(&pk);
    msgpack_pack_nil(&pk);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_int64(&pk, 1);
    msgpack_pack_str_with_body(&pk, "q", 1);
    msgpack_pack_int64(&pk, 3);
    msgpack_pack_double(&pk, 2.5);
    msgpack_pack_false(&pk);
    msgpack_pack_bin_with_body(&pk, "f", 1);
    msgpack_pack_int64(&pk, 0);
    check_from(&b, "{\"1\":2,\"-7\":true,\"null\":null,\"[1,\\\"q\\\"]\":3,\"2.5\":false,"
                   "\"{\\\"$bin\\\":\\\"Zg==\\\"}\":0}");
    buf_reset(&b);

    /* floats */
    msgpack_pack_array(&pk, 8);
    msgpack_pack_float(&pk, 0.1f);
    msgpack_pack_float(&pk, 1.0f);
    msgpack_pack_float(&pk, 16777216.0f);
    msgpack_pack_float(&pk, 3.4028235e38f);
    msgpack_pack_double(&pk, NAN);
    msgpack_pack_double(&pk, INFINITY);
    msgpack_pack_float(&pk, -INFINITY);
    msgpack_pack_double(&pk, -1e-7);
    check_from(&b, "[0.1,1.0,16777216.0,3.4028235e+38,null,null,null,-1e-07]");
    buf_reset(&b);

    /* every integer width, signed encodings of positives */
    static const unsigned char ints[] = {0x96, 0xd0, 0x05, 0xd1, 0xff, 0x00, 0xd2, 0x00, 0x01, 0x00, 0x00,
                                         0xce, 0xff, 0xff, 0xff, 0xff, 0xcd, 0x01, 0x00, 0xe0};
    buf_append(&b, ints, sizeof ints);
    check_from(&b, "[5,-256,65536,4294967295,256,-32]");
    buf_reset(&b);

    /* the printer's nesting guard: 512 levels print, 513 do not */
    char nest[600];
    memset(nest, 0x91, sizeof nest);
    nest[512] = (char)0xc0;
    buf_append(&b, nest, 513);
    buf js0 = BUF_INIT;
    tm_err e0;
    assert_int_equal(json_from_mp(b.ptr, b.len, &js0, &e0), 0);
    assert_int_equal(js0.len, 512 * 2 + 4);
    buf_reset(&b);
    nest[512] = (char)0x91;
    nest[513] = (char)0xc0;
    buf_append(&b, nest, 514);
    buf_reset(&js0);
    assert_int_equal(json_from_mp(b.ptr, b.len, &js0, &e0), -1);
    assert_string_equal(e0.msg, "msgpack: nesting too deep");
    assert_int_equal(js0.len, 0);
    buf_free(&js0);
    buf_reset(&b);

    { /* keys that are maps whose keys are maps...: printed in linear size
         * (escaping once per level would double the text per level) */
        buf k = BUF_INIT, out = BUF_INIT;
        tm_err ek;
        for (int i = 0; i < 60; i++) buf_putc(&k, (char)0x81);
        for (int i = 0; i < 61; i++) buf_putc(&k, (char)0xc0);
        assert_int_equal(mp_validate(k.ptr, k.len, NULL, &ek), 0);
        assert_int_equal(json_from_mp(k.ptr, k.len, &out, &ek), 0);
        assert_true(out.len < 2000);
        buf_free(&k);
        buf_free(&out);
    }

    /* errors: truncated, invalid byte, trailing bytes; out unchanged */
    buf js = BUF_INIT;
    buf_puts(&js, "keep");
    tm_err e;
    assert_int_equal(json_from_mp("\x92\x01", 2, &js, &e), -1);
    assert_int_equal(json_from_mp("\xc1", 1, &js, &e), -1);
    assert_int_equal(json_from_mp("\x01\x02", 2, &js, &e), -1);
    assert_non_null(strstr(e.msg, "trailing"));
    assert_int_equal(json_from_mp("\x81\x92\x01", 3, &js, &e), -1); /* truncated key */
    assert_string_equal(js.ptr, "keep");
    buf_free(&js);
    buf_free(&b);
}

/* ---- json_put_string ---- */

static void check_str(const char *s, size_t n, const char *want) {
    buf b = BUF_INIT;
    json_put_string(&b, s, n);
    if (strcmp(b.ptr, want) != 0) fail_msg("got %s want %s", b.ptr, want);
    /* the same with 300 bytes before and after (the long-string path) */
    buf in = BUF_INIT, w = BUF_INIT;
    char pad[300];
    memset(pad, 'p', sizeof pad);
    buf_append(&in, pad, sizeof pad);
    buf_append(&in, s, n);
    buf_append(&in, pad, sizeof pad);
    buf_putc(&w, '"');
    buf_append(&w, pad, sizeof pad);
    buf_append(&w, want + 1, strlen(want) - 2);
    buf_append(&w, pad, sizeof pad);
    buf_putc(&w, '"');
    buf_reset(&b);
    json_put_string(&b, in.ptr, in.len);
    assert_int_equal(b.len, w.len);
    assert_memory_equal(b.ptr, w.ptr, w.len);
    buf_free(&in);
    buf_free(&w);
    buf_free(&b);
}

#define FFFD "\xef\xbf\xbd"

static void test_put_string(void **st) {
    check_str("", 0, "\"\"");
    check_str("plain text", 10, "\"plain text\"");
    check_str("\"\\/\b\f\n\r\t", 8, "\"\\\"\\\\/\\b\\f\\n\\r\\t\"");
    check_str("\x01\x1f\x7f", 3, "\"\\u0001\\u001f\x7f\"");
    check_str("a\0b", 3, "\"a\\u0000b\"");
    check_str("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9, "\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"");
    /* invalid UTF-8 -> U+FFFD, one per maximal invalid subpart */
    check_str("\xff", 1, "\"" FFFD "\"");
    check_str("a\xc3", 2, "\"a" FFFD "\"");              /* truncated 2-byte */
    check_str("\xe2\x82", 2, "\"" FFFD "\"");             /* truncated 3-byte */
    check_str("\xf0\x9f\x98z", 4, "\"" FFFD "z\"");      /* truncated 4-byte */
    check_str("\xc0\xaf", 2, "\"" FFFD FFFD "\"");        /* overlong */
    check_str("\xe0\x80\xaf", 3, "\"" FFFD FFFD FFFD "\""); /* overlong 3-byte */
    check_str("\xed\xa0\x80", 3, "\"" FFFD FFFD FFFD "\""); /* surrogate */
    check_str("\xf4\x90\x80\x80", 4, "\"" FFFD FFFD FFFD FFFD "\""); /* > U+10FFFF */
    check_str("\x80x", 2, "\"" FFFD "x\"");               /* lone continuation */
    check_str("\xf4\x8f\xbf\xbf", 4, "\"\xf4\x8f\xbf\xbf\"");    /* U+10FFFF ok */
    check_str("\xef\xbf\xbd", 3, "\"" FFFD "\"");

    assert_true(json_utf8_valid("", 0));
    assert_true(json_utf8_valid("abc\xc3\xa9\xf0\x9f\x98\x80", 9));
    assert_false(json_utf8_valid("\xc3", 1));
    assert_false(json_utf8_valid("\xed\xa0\x80", 3));
    assert_false(json_utf8_valid("\xc1\xbf", 2));
    assert_false(json_utf8_valid("\xf5\x80\x80\x80", 4));
}

/* ---- number conversions against libc ---- */

static uint64_t rs = 12345;
static uint64_t rnd(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}

/* The reference printer: fewest of 15..17 digits that read back, as the
 * slow path does; then ".0" if it looks like an integer. */
static void ref_print(double d, char *s) {
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(s, 40, "%.*g", prec, d);
        if (strtod(s, NULL) == d) break;
    }
    if (!strchr(s, '.') && !strchr(s, 'e') && !strchr(s, 'n') && !strchr(s, 'i')) strcat(s, ".0");
}

static double mp_double(const buf *mp) {
    assert_int_equal(mp->len, 9);
    assert_int_equal((unsigned char)mp->ptr[0], 0xcb);
    uint64_t u = 0;
    for (int i = 1; i < 9; i++) u = u << 8 | (unsigned char)mp->ptr[i];
    double d;
    memcpy(&d, &u, 8);
    return d;
}

static void test_numbers_vs_libc(void **st) {
    char text[64], ref[40];
    for (int i = 0; i < 60000; i++) {
        /* a random decimal: up to 18 digits, a point somewhere, maybe an exponent */
        int nd = 1 + (int)(rnd() % 18), w = 0;
        if (rnd() & 1) text[w++] = '-';
        int point = (int)(rnd() % (unsigned)nd);
        for (int j = 0; j < nd; j++) {
            text[w++] = (char)('0' + (j == 0 && point > 0 ? 1 + rnd() % 9 : rnd() % 10));
            if (j == point) text[w++] = '.';
        }
        if (text[w - 1] == '.') text[w++] = '0';
        if (rnd() % 3 == 0) w += snprintf(text + w, 16, "e%d", (int)(rnd() % 60) - 30);
        text[w] = '\0';
        buf mp = BUF_INIT, js = BUF_INIT;
        tm_err e;
        if (json_to_mp(text, (size_t)w, NULL, &mp, &e) != 0) fail_msg("%s: %s", text, e.msg);
        double got = mp_double(&mp), want = strtod(text, NULL);
        if (memcmp(&got, &want, 8) != 0) fail_msg("%s parsed as %.17g, libc %.17g", text, got, want);
        /* and printed back exactly as the reference printer does */
        assert_int_equal(json_from_mp(mp.ptr, mp.len, &js, &e), 0);
        ref_print(want, ref);
        if (isfinite(want) && strcmp(js.ptr, ref) != 0)
            fail_msg("%.17g printed %s, reference %s", want, js.ptr, ref);
        buf_free(&mp);
        buf_free(&js);
    }
    /* random bit patterns print to text that reads back to the same bits */
    for (int i = 0; i < 40000; i++) {
        uint64_t u = rnd();
        double d;
        memcpy(&d, &u, 8);
        if (!isfinite(d)) continue;
        buf mp = BUF_INIT, js = BUF_INIT;
        msgpack_packer pk;
        msgpack_packer_init(&pk, &mp, buf_write);
        msgpack_pack_double(&pk, d);
        tm_err e;
        assert_int_equal(json_from_mp(mp.ptr, mp.len, &js, &e), 0);
        double back = strtod(js.ptr, NULL);
        assert_memory_equal(&back, &d, 8);
        ref_print(d, ref);
        assert_string_equal(js.ptr, ref);
        buf_free(&mp);
        buf_free(&js);
    }
}

/* ---- deterministic fuzz: random documents are fixed points ---- */

static void gen(buf *b, int depth) {
    static const char *atoms[] = {"null", "true", "false", "0", "-1", "1.5", "1e-9", "-0.0",
                                  "18446744073709551615", "-9223372036854775808",
                                  "\"\"", "\"x\\u00e9\\ud83d\\ude00\\n\"", "123456789", "0.1"};
    uint64_t r = rnd() % 10;
    if (depth > 4 || r < 5) {
        buf_puts(b, atoms[rnd() % (sizeof atoms / sizeof atoms[0])]);
        return;
    }
    int n = (int)(rnd() % 7);
    int is_map = r >= 8;
    buf_putc(b, is_map ? '{' : '[');
    for (int i = 0; i < n; i++) {
        if (i) buf_putc(b, ',');
        if (is_map) buf_printf(b, "\"k%d\":", (int)(rnd() % 100));
        gen(b, depth + 1);
    }
    buf_putc(b, is_map ? '}' : ']');
}

/* The fast path against yajl alone: for valid JSON, corrupted JSON and
 * near-misses of every construct, both give the same result, the same
 * bytes and the same error message. */
static uint64_t dx_state = 88172645463325252ull;
static unsigned dx_rand(unsigned n) {
    dx_state ^= dx_state << 13;
    dx_state ^= dx_state >> 7;
    dx_state ^= dx_state << 17;
    return (unsigned)(dx_state % n);
}

static void dx_value(buf *b, int depth) {
    static const char *atoms[] = {"0", "-0", "1", "-1", "12345678901234567890", "-9223372036854775808",
                                  "1.5", "-0.0", "1e5", "1E-5", "2.5e+300", "0.1", "true", "false",
                                  "null", "\"\"", "\"abc\"", "\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\"",
                                  "\"\\u00e9\\ud83d\\ude00\"", "\"h\xc3\xa9llo\"", "\"\xf0\x9f\x98\x80\"",
                                  "\"x\x7fy\"", "\"\xed\xa0\x80\"", "\"\xc0\xaf\""};
    unsigned k = dx_rand(depth > 4 ? 10 : 14);
    if (k < 10) {
        buf_puts(b, atoms[dx_rand(sizeof atoms / sizeof *atoms)]);
        return;
    }
    int map = k >= 12;
    unsigned n = dx_rand(5);
    buf_putc(b, map ? '{' : '[');
    for (unsigned i = 0; i < n; i++) {
        if (i) buf_puts(b, dx_rand(4) ? "," : " ,\n");
        if (dx_rand(3) == 0) buf_puts(b, " \t");
        if (map) {
            buf_puts(b, dx_rand(6) ? "\"k\"" : "\"k\\n\"");
            buf_puts(b, dx_rand(3) ? ":" : " : ");
        }
        dx_value(b, depth + 1);
    }
    buf_putc(b, map ? '}' : ']');
}

static void dx_compare(const char *in, size_t len, const mp_limits *lim) {
    buf a = BUF_INIT, b = BUF_INIT;
    tm_err ea, eb;
    err_clear(&ea);
    err_clear(&eb);
    buf_puts(&a, "pre");
    buf_puts(&b, "pre");
    json_set_fast_path(1);
    int ra = json_to_mp(in, len, lim, &a, &ea);
    json_set_fast_path(0);
    int rb = json_to_mp(in, len, lim, &b, &eb);
    json_set_fast_path(1);
    if (ra != rb) fail_msg("fast %d, yajl %d for '%.*s'", ra, rb, (int)len, in);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.ptr, b.ptr, a.len);
    if (ra < 0) {
        assert_int_equal(ea.code, eb.code);
        assert_string_equal(ea.msg, eb.msg);
    }
    buf_free(&a);
    buf_free(&b);
}

static void test_fast_path_vs_yajl(void **st) {
    static const char *fixed[] = {"", " ", "{}", "[]", " {} ", "{\"a\":1,}", "[1,]", "[1 2]", "01",
                                  "-", "1.", "1e", "1e+", ".5", "+1", "tru", "truex", "nul", "[",
                                  "{\"a\"}", "{\"a\":}", "{,}", "\"\\u12\"", "\"\\x\"", "\"a\nb\"",
                                  "\xef\xbb\xbf{}", "{}\f", "\f{}", "[1]x", "1 2", "\"abc",
                                  "[\"\\", "{\"a\":1}{}", "[-01]", "[1.5.3]", "\v1"};
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++) dx_compare(fixed[i], strlen(fixed[i]), NULL);
    mp_limits tight = mp_default_limits;
    tight.max_depth = 3;
    tight.max_items = 3;
    tight.max_size = 40;
    buf b = BUF_INIT;
    for (int round = 0; round < 4000; round++) {
        buf_reset(&b);
        if (dx_rand(4) == 0) buf_puts(&b, " \r\n");
        dx_value(&b, 0);
        dx_compare(b.ptr, b.len, round % 3 ? NULL : &tight);
        /* a few corruptions of the same text */
        for (int m = 0; m < 3 && b.len; m++) {
            char *t = malloc(b.len + 1);
            memcpy(t, b.ptr, b.len);
            size_t at = dx_rand((unsigned)b.len);
            static const char repl[] = "{}[]\",:\\ 0-.eE\x01\x80\xff\n";
            size_t tl = b.len;
            switch (dx_rand(3)) {
            case 0: t[at] = repl[dx_rand(sizeof repl - 1)]; break;
            case 1: memmove(t + at, t + at + 1, tl - at - 1), tl--; break;
            default: tl = at; break; /* truncated */
            }
            dx_compare(t, tl, round % 3 ? NULL : &tight);
            free(t);
        }
    }
    buf_free(&b);
}

static void test_fuzz_fixed_point(void **st) {
    for (int i = 0; i < 2000; i++) {
        buf doc = BUF_INIT;
        gen(&doc, 0);
        char *once = roundtrip(doc.ptr, doc.len, NULL);
        char *twice = roundtrip(once, strlen(once), NULL);
        assert_string_equal(once, twice);
        /* and the msgpack is byte-identical both times */
        buf m1 = BUF_INIT, m2 = BUF_INIT;
        tm_err e;
        assert_int_equal(json_to_mp(doc.ptr, doc.len, NULL, &m1, &e), 0);
        assert_int_equal(json_to_mp(once, strlen(once), NULL, &m2, &e), 0);
        assert_int_equal(m1.len, m2.len);
        assert_memory_equal(m1.ptr, m2.ptr, m1.len);
        /* truncating the text anywhere inside is an error, never a crash */
        size_t cut = doc.len > 1 ? rnd() % (doc.len - 1) + 1 : 0;
        buf m3 = BUF_INIT;
        if (cut && cut < doc.len) {
            char *t = malloc(cut);
            memcpy(t, doc.ptr, cut);
            int rc = json_to_mp(t, cut, NULL, &m3, &e);
            /* a number cut short can still be a whole value */
            if (rc == 0) assert_int_equal(mp_validate(m3.ptr, m3.len, NULL, &e), 0);
            free(t);
        }
        buf_free(&m1);
        buf_free(&m2);
        buf_free(&m3);
        free(once);
        free(twice);
        buf_free(&doc);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_scalars),
        cmocka_unit_test(test_number_encodings),
        cmocka_unit_test(test_roundtrip_strings),
        cmocka_unit_test(test_roundtrip_containers),
        cmocka_unit_test(test_canonical_headers),
        cmocka_unit_test(test_append_and_determinism),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_from_mp_types),
        cmocka_unit_test(test_put_string),
        cmocka_unit_test(test_numbers_vs_libc),
        cmocka_unit_test(test_fuzz_fixed_point),
        cmocka_unit_test(test_fast_path_vs_yajl),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
