/* test_store.c — the event log: appends, expected versions, idempotency,
 * reads in every direction, reopen, concurrency, corruption detection,
 * store_check, the projection key-value namespace, refusing after a failed
 * write.  Each test gets a fresh temporary data directory.  Corruption is
 * injected by opening the LevelDB directory directly (the store closed). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <ftw.h>
#include <leveldb/c.h>
#include <msgpack.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "record.h"
#include "store.h"

typedef struct fx {
    char dir[64];
    store *s;
} fx;

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *f) {
    (void)st, (void)flag, (void)f;
    return remove(p);
}

static int setup(void **state) {
    fx *f = calloc(1, sizeof *f);
    strcpy(f->dir, "/tmp/tm_store_XXXXXX");
    if (!mkdtemp(f->dir)) return -1;
    tm_err err;
    f->s = store_open(f->dir, NULL, &err);
    if (!f->s) {
        fprintf(stderr, "open: %s\n", err.msg);
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fx *f = *state;
    store_close(f->s);
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void reopen(fx *f) {
    store_close(f->s);
    tm_err err;
    f->s = store_open(f->dir, NULL, &err);
    assert_non_null(f->s);
}

static tm_event mkev(const char *stream, const char *type, const char *data) {
    tm_event e;
    memset(&e, 0, sizeof e);
    e.stream = stream;
    e.stream_len = strlen(stream);
    e.type = type;
    e.type_len = strlen(type);
    e.data = data;
    e.data_len = strlen(data);
    return e;
}

/* msgpack {"n": <fixint>} */
static const char *num(int n) {
    static _Thread_local char b[64][4]; /* per thread: test_concurrent */
    static _Thread_local int k;
    char *p = b[k++ % 64];
    p[0] = (char)0x81;
    p[1] = (char)0xa1;
    p[2] = 'n';
    p[3] = (char)(n & 0x7f);
    return p;
}
static tm_event mkevn(const char *stream, const char *type, int n) {
    tm_event e = mkev(stream, type, "");
    e.data = num(n);
    e.data_len = 4;
    return e;
}

static void append1(store *s, const char *stream, const char *type, int n) {
    tm_event e = mkevn(stream, type, n);
    tm_err err;
    int rc = store_append(s, &e, 1, NULL, 0, &err);
    if (rc) fprintf(stderr, "append: %s\n", err.msg);
    assert_int_equal(rc, 0);
}

/* Collect an iterator: positions into pos[], returns count, asserts no error. */
static size_t collect(store_iter *it, uint64_t *pos, uint64_t *ver, size_t max) {
    assert_non_null(it);
    tm_event ev;
    tm_err err;
    size_t n = 0;
    int r;
    while ((r = store_iter_next(it, &ev, &err)) == 1) {
        assert_true(n < max);
        pos[n] = ev.position;
        if (ver) ver[n] = ev.version;
        n++;
    }
    if (r < 0) fprintf(stderr, "iter: %s\n", err.msg);
    assert_int_equal(r, 0);
    store_iter_free(it);
    return n;
}

static void assert_clean(store *s) {
    store_check_report rep;
    tm_err err;
    assert_int_equal(store_check(s, stderr, &rep, &err), 0);
    assert_int_equal(rep.problems, 0);
}

/* ---- record ---- */

static void test_crc32c_and_record(void **state) {
    (void)state;
    assert_int_equal(crc32c(0, "123456789", 9), 0xE3069283u);
    /* chaining equals one pass */
    assert_int_equal(crc32c(crc32c(0, "1234", 4), "56789", 5), 0xE3069283u);
    char big[1000];
    for (int i = 0; i < 1000; i++) big[i] = (char)(i * 7);
    assert_int_equal(crc32c(crc32c(0, big, 333), big + 333, 667), crc32c(0, big, 1000));
    /* every alignment and tail length against a bitwise reference */
    for (size_t off = 0; off < 9; off++)
        for (size_t n = 0; n < 70; n++) {
            uint32_t r = 0xffffffffu;
            for (size_t i = 0; i < n; i++) {
                r ^= (unsigned char)big[off + i];
                for (int k = 0; k < 8; k++) r = (r & 1) ? (r >> 1) ^ 0x82F63B78u : r >> 1;
            }
            assert_int_equal(crc32c(0, big + off, n), ~r);
        }

    tm_event e = mkev("order-1", "Placed", "\x81\xa1x\x05");
    memset(e.id, 0xab, 16);
    e.version = 7;
    e.time_ms = 1700000000123;
    buf b = BUF_INIT;
    record_encode(&e, &b);
    tm_event d;
    tm_err err;
    assert_int_equal(record_decode(b.ptr, b.len, &d, &err), 0);
    assert_int_equal(d.version, 7);
    assert_int_equal(d.time_ms, 1700000000123);
    assert_memory_equal(d.id, e.id, 16);
    assert_int_equal(d.stream_len, 7);
    assert_memory_equal(d.stream, "order-1", 7);
    assert_int_equal(d.data_len, 4);
    assert_memory_equal(d.data, "\x81\xa1x\x05", 4);
    assert_int_equal(d.meta_len, 1); /* empty map */
    for (size_t i = 0; i < b.len; i++) { /* every single-byte flip is caught */
        b.ptr[i] ^= 0x20;
        assert_int_equal(record_decode(b.ptr, b.len, &d, &err), -1);
        assert_int_equal(err.code, TM_EIO);
        b.ptr[i] ^= 0x20;
    }
    assert_int_equal(record_decode(b.ptr, b.len - 1, &d, &err), -1);
    buf_free(&b);
}

/* record_encode writes the smallest msgpack forms, byte for byte what the
 * msgpack-c packer writes, at every length / value boundary. */
static int ref_write(void *data, const char *p, size_t n) {
    buf_append((buf *)data, p, n);
    return 0;
}

static void ref_encode(const tm_event *ev, buf *out) {
    msgpack_packer pk;
    buf_append(out, "\0\0\0\0", 4);
    msgpack_packer_init(&pk, out, ref_write);
    msgpack_pack_array(&pk, 8);
    msgpack_pack_uint64(&pk, 1);
    msgpack_pack_bin(&pk, 16);
    msgpack_pack_bin_body(&pk, ev->id, 16);
    msgpack_pack_str(&pk, ev->stream_len);
    msgpack_pack_str_body(&pk, ev->stream, ev->stream_len);
    msgpack_pack_str(&pk, ev->type_len);
    msgpack_pack_str_body(&pk, ev->type, ev->type_len);
    msgpack_pack_uint64(&pk, ev->version);
    msgpack_pack_int64(&pk, ev->time_ms);
    if (ev->meta_len) buf_append(out, ev->meta, ev->meta_len);
    else msgpack_pack_map(&pk, 0);
    if (ev->data_len) buf_append(out, ev->data, ev->data_len);
    else msgpack_pack_nil(&pk);
    uint32_t c = crc32c(0, out->ptr + 4, out->len - 4);
    for (int i = 0; i < 4; i++) out->ptr[i] = (char)(c >> (8 * i));
}

static void test_record_encode_forms(void **state) {
    (void)state;
    static const uint64_t vers[] = {0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295ull,
                                    4294967296ull, UINT64_MAX};
    static const int64_t times[] = {0, 1, 127, 128, 1700000000123ll, -1, -32, -33, -128, -129,
                                    -32768, -32769, -2147483648ll, -2147483649ll, INT64_MIN,
                                    INT64_MAX, 4294967296ll};
    static const size_t lens[] = {1, 31, 32, 255, 256, 65535, 65536};
    char *name = malloc(70000);
    memset(name, 'n', 70000);
    buf a = BUF_INIT, b = BUF_INIT;
    for (size_t li = 0; li < sizeof lens / sizeof *lens; li++)
        for (size_t vi = 0; vi < sizeof vers / sizeof *vers; vi++)
            for (size_t ti = 0; ti < sizeof times / sizeof *times; ti++) {
                tm_event e = mkev("s", "T", "");
                memset(e.id, (int)(li + vi + ti), 16);
                e.stream = name;
                e.stream_len = lens[li];
                e.type_len = lens[(li + vi) % (sizeof lens / sizeof *lens)];
                e.type = name;
                e.version = vers[vi];
                e.time_ms = times[ti];
                if (ti % 2) {
                    e.meta = "\x81\xa1k\x01";
                    e.meta_len = 4;
                    e.data = "\x92\x01\x02";
                    e.data_len = 3;
                }
                buf_reset(&a);
                buf_reset(&b);
                buf_append(&a, "xy", 2); /* appends after existing bytes */
                record_encode(&e, &a);
                ref_encode(&e, &b);
                assert_int_equal(a.len, b.len + 2);
                assert_memory_equal(a.ptr + 2, b.ptr, b.len);
                assert_int_equal(a.ptr[a.len], '\0');
                tm_event d;
                tm_err err;
                assert_int_equal(record_decode(a.ptr + 2, a.len - 2, &d, &err), 0);
                assert_int_equal(d.version, e.version);
                assert_int_equal(d.time_ms, e.time_ms);
                assert_int_equal(d.stream_len, e.stream_len);
                assert_int_equal(d.type_len, e.type_len);
                assert_int_equal(d.data_len, e.data_len ? e.data_len : 1);
                if (a.len > 1024) continue;
                /* every truncation, with a checksum that matches it, is refused
                 * (copied to the heap so a read past the end is caught by ASan) */
                for (size_t l = 5; l < a.len - 2; l++) {
                    char *t = malloc(l);
                    memcpy(t, a.ptr + 2, l);
                    uint32_t c = crc32c(0, t + 4, l - 4);
                    for (int i = 0; i < 4; i++) t[i] = (char)(c >> (8 * i));
                    assert_int_equal(record_decode(t, l, &d, &err), -1);
                    assert_int_equal(err.code, TM_EIO);
                    free(t);
                }
            }
    buf_free(&a);
    buf_free(&b);
    free(name);
}

/* ---- append ---- */

static void test_append_single(void **state) {
    fx *f = *state;
    tm_event e = mkev("order-1", "Placed", "\x81\xa1x\x05");
    tm_err err;
    assert_int_equal(store_last_position(f->s), 0);
    assert_int_equal(store_append(f->s, &e, 1, NULL, 0, &err), 0);
    assert_int_equal(e.position, 1);
    assert_int_equal(e.version, 0);
    assert_true(e.time_ms > 1600000000000);
    static const uint8_t zero[16];
    assert_memory_not_equal(e.id, zero, 16);
    assert_int_equal(store_last_position(f->s), 1);
    int64_t v;
    assert_int_equal(store_stream_version(f->s, "order-1", 7, &v, &err), 1);
    assert_int_equal(v, 0);
    assert_int_equal(store_stream_version(f->s, "order-2", 7, &v, &err), 0);

    store_iter *it = store_read_all(f->s, 0, 0, 0, &err);
    tm_event r;
    assert_int_equal(store_iter_next(it, &r, &err), 1);
    assert_int_equal(r.position, 1);
    assert_memory_equal(r.id, e.id, 16);
    assert_int_equal(r.time_ms, e.time_ms);
    assert_int_equal(r.data_len, 4);
    assert_memory_equal(r.data, "\x81\xa1x\x05", 4);
    const char *rec;
    size_t rl;
    store_iter_record(it, &rec, &rl);
    tm_event r2;
    assert_int_equal(record_decode(rec, rl, &r2, &err), 0);
    assert_int_equal(r2.version, 0);
    assert_int_equal(store_iter_next(it, &r, &err), 0);
    store_iter_free(it);

    /* explicit time and metadata are kept */
    tm_event e2 = mkev("order-1", "Paid", "\xc0");
    e2.time_ms = 42;
    e2.meta = "\x81\xa1k\xa1v";
    e2.meta_len = 5;
    assert_int_equal(store_append(f->s, &e2, 1, NULL, 0, &err), 0);
    it = store_read_stream(f->s, "order-1", 7, 1, 0, 0, &err);
    assert_int_equal(store_iter_next(it, &r, &err), 1);
    assert_int_equal(r.time_ms, 42);
    assert_int_equal(r.meta_len, 5);
    assert_memory_equal(r.meta, "\x81\xa1k\xa1v", 5);
    assert_int_equal(r.version, 1);
    assert_int_equal(r.position, 2);
    store_iter_free(it);
    assert_clean(f->s);
}

static void test_append_multi(void **state) {
    fx *f = *state;
    tm_err err;
    tm_event a[3] = {mkevn("a-1", "T", 1), mkevn("a-1", "T", 2), mkevn("a-1", "U", 3)};
    assert_int_equal(store_append(f->s, a, 3, NULL, 0, &err), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(a[i].position, i + 1);
        assert_int_equal(a[i].version, i);
    }
    /* several streams, interleaved */
    tm_event b[4] = {mkevn("b-1", "T", 1), mkevn("a-1", "T", 2), mkevn("b-1", "T", 3),
                     mkevn("c", "T", 4)};
    store_expect x[2] = {{"a-1", 3, 2}, {"b-1", 3, STORE_NO_STREAM}};
    assert_int_equal(store_append(f->s, b, 4, x, 2, &err), 0);
    assert_int_equal(b[0].position, 4);
    assert_int_equal(b[0].version, 0);
    assert_int_equal(b[1].version, 3);
    assert_int_equal(b[2].version, 1);
    assert_int_equal(b[3].version, 0);
    assert_int_equal(b[3].position, 7);
    int64_t v;
    assert_int_equal(store_stream_version(f->s, "b-1", 3, &v, &err), 1);
    assert_int_equal(v, 1);
    assert_clean(f->s);
}

static void expect_conflict(store *s, const char *stream, int64_t version, int64_t current) {
    tm_event e = mkevn(stream, "T", 9);
    store_expect x = {stream, strlen(stream), version};
    tm_err err;
    uint64_t last = store_last_position(s);
    assert_int_equal(store_append(s, &e, 1, &x, 1, &err), -1);
    assert_int_equal(err.code, TM_ECONFLICT);
    assert_int_equal(err.current_version, current);
    assert_non_null(strstr(err.msg, stream));
    assert_int_equal(store_last_position(s), last);
}

static void expect_ok(store *s, const char *stream, int64_t version) {
    tm_event e = mkevn(stream, "T", 9);
    store_expect x = {stream, strlen(stream), version};
    tm_err err;
    assert_int_equal(store_append(s, &e, 1, &x, 1, &err), 0);
}

static void test_expected_versions(void **state) {
    fx *f = *state;
    expect_conflict(f->s, "s-1", STORE_EXISTS, -1);
    expect_conflict(f->s, "s-1", 0, -1);
    expect_ok(f->s, "s-1", STORE_NO_STREAM);           /* v0 */
    expect_conflict(f->s, "s-1", STORE_NO_STREAM, 0);
    expect_ok(f->s, "s-1", STORE_EXISTS);              /* v1 */
    expect_ok(f->s, "s-1", 1);                         /* v2 */
    expect_conflict(f->s, "s-1", 1, 2);
    expect_conflict(f->s, "s-1", 3, 2);
    expect_ok(f->s, "s-1", STORE_ANY);                 /* v3 */
    expect_ok(f->s, "s-2", STORE_ANY);
    /* an expectation on a stream the request does not write */
    tm_event e = mkevn("s-3", "T", 1);
    store_expect x = {"s-1", 3, 2};
    tm_err err;
    assert_int_equal(store_append(f->s, &e, 1, &x, 1, &err), -1);
    assert_int_equal(err.code, TM_ECONFLICT);
    assert_int_equal(err.current_version, 3);
    x.version = 3;
    assert_int_equal(store_append(f->s, &e, 1, &x, 1, &err), 0);
    /* invalid expectation value */
    x.version = -7;
    assert_int_equal(store_append(f->s, &e, 1, &x, 1, &err), -1);
    assert_int_equal(err.code, TM_EINVAL);
    /* the cache is right after reopen too */
    reopen(f);
    expect_conflict(f->s, "s-1", 2, 3);
    expect_ok(f->s, "s-1", 3);
    expect_conflict(f->s, "s-9", STORE_EXISTS, -1);
    assert_clean(f->s);
}

static void test_idempotent(void **state) {
    fx *f = *state;
    tm_err err;
    tm_event a[2] = {mkevn("o-1", "T", 1), mkevn("o-2", "T", 2)};
    memset(a[0].id, 0x11, 16);
    memset(a[1].id, 0x22, 16);
    a[0].has_id = a[1].has_id = 1;
    append1(f->s, "x-1", "T", 0); /* position 1 */
    assert_int_equal(store_append(f->s, a, 2, NULL, 0, &err), 0);
    assert_int_equal(a[0].position, 2);
    assert_int_equal(a[1].position, 3);
    int64_t t0 = a[0].time_ms;

    /* the same request again: original positions, nothing written */
    tm_event b[2] = {mkevn("o-1", "T", 1), mkevn("o-2", "T", 2)};
    memcpy(b[0].id, a[0].id, 16);
    memcpy(b[1].id, a[1].id, 16);
    b[0].has_id = b[1].has_id = 1;
    store_expect x = {"o-1", 3, STORE_NO_STREAM}; /* retries ignore expectations */
    assert_int_equal(store_append(f->s, b, 2, &x, 1, &err), 0);
    assert_int_equal(b[0].position, 2);
    assert_int_equal(b[1].position, 3);
    assert_int_equal(b[0].version, 0);
    assert_int_equal(b[0].time_ms, t0);
    assert_int_equal(store_last_position(f->s), 3);

    /* same id, other content */
    tm_event c = mkevn("o-1", "T", 5);
    memcpy(c.id, a[0].id, 16);
    c.has_id = 1;
    assert_int_equal(store_append(f->s, &c, 1, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_ECONFLICT);
    c = mkevn("o-9", "T", 1); /* other stream */
    memcpy(c.id, a[0].id, 16);
    c.has_id = 1;
    assert_int_equal(store_append(f->s, &c, 1, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_ECONFLICT);

    /* mixed: one stored id and one new */
    tm_event m[2] = {mkevn("o-1", "T", 1), mkevn("o-3", "T", 3)};
    memcpy(m[0].id, a[0].id, 16);
    memset(m[1].id, 0x33, 16);
    m[0].has_id = m[1].has_id = 1;
    assert_int_equal(store_append(f->s, m, 2, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_ECONFLICT);
    m[1].has_id = 0; /* mixed with a generated id */
    assert_int_equal(store_append(f->s, m, 2, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_ECONFLICT);
    assert_int_equal(store_last_position(f->s), 3);

    /* a generated id can be retried too */
    tm_event g = mkevn("g-1", "T", 7);
    assert_int_equal(store_append(f->s, &g, 1, NULL, 0, &err), 0);
    assert_int_equal(g.position, 4);
    tm_event g2 = mkevn("g-1", "T", 7);
    memcpy(g2.id, g.id, 16);
    g2.has_id = 1;
    assert_int_equal(store_append(f->s, &g2, 1, NULL, 0, &err), 0);
    assert_int_equal(g2.position, 4);
    g2.data = num(8);
    assert_int_equal(store_append(f->s, &g2, 1, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_ECONFLICT);

    /* duplicate ids inside one request */
    tm_event d[2] = {mkevn("d-1", "T", 1), mkevn("d-1", "T", 2)};
    memset(d[0].id, 0x44, 16);
    memset(d[1].id, 0x44, 16);
    d[0].has_id = d[1].has_id = 1;
    assert_int_equal(store_append(f->s, d, 2, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_EINVAL);

    /* the id index survives reopening */
    reopen(f);
    tm_event b2[2] = {mkevn("o-1", "T", 1), mkevn("o-2", "T", 2)};
    memcpy(b2[0].id, a[0].id, 16);
    memcpy(b2[1].id, a[1].id, 16);
    b2[0].has_id = b2[1].has_id = 1;
    assert_int_equal(store_append(f->s, b2, 2, NULL, 0, &err), 0);
    assert_int_equal(b2[1].position, 3);
    assert_int_equal(store_append(f->s, &g2, 1, NULL, 0, &err), -1);
    g2.data = num(7);
    assert_int_equal(store_append(f->s, &g2, 1, NULL, 0, &err), 0);
    assert_int_equal(g2.position, 4);
    assert_int_equal(store_last_position(f->s), 4);
    assert_clean(f->s);
}

static void test_invalid_input(void **state) {
    fx *f = *state;
    tm_err err;
    tm_event e[2] = {mkevn("ok-1", "T", 1), mkev("", "T", "\xc0")};
    assert_int_equal(store_append(f->s, e, 2, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_EINVAL);
    assert_non_null(strstr(err.msg, "event 1"));
    e[1] = mkev("ok-2", "", "\xc0");
    assert_int_equal(store_append(f->s, e, 2, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_EINVAL);
    e[1] = mkev("ok-2", "T", "\x82\xa1"); /* truncated msgpack */
    assert_int_equal(store_append(f->s, e, 2, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_EINVAL);
    assert_non_null(strstr(err.msg, "event 1"));
    e[1] = mkev("ok-2", "T", "\xc0\xc0"); /* two values */
    assert_int_equal(store_append(f->s, e, 2, NULL, 0, &err), -1);
    e[1] = mkev("ok-2", "T", "\xc0");
    e[1].meta = "\x91\x01"; /* an array, not a map */
    e[1].meta_len = 2;
    assert_int_equal(store_append(f->s, e, 2, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_EINVAL);
    assert_non_null(strstr(err.msg, "map"));
    char *big = malloc((1 << 20) + 10);
    big[0] = (char)0xc6; /* bin32 of 1 MiB + 5 */
    uint32_t n = (1 << 20) + 5;
    big[1] = (char)(n >> 24), big[2] = (char)(n >> 16), big[3] = (char)(n >> 8), big[4] = (char)n;
    memset(big + 5, 'x', n);
    e[1] = mkev("ok-2", "T", "");
    e[1].data = big;
    e[1].data_len = n + 5;
    assert_int_equal(store_append(f->s, e, 2, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_EINVAL);
    assert_non_null(strstr(err.msg, "limit"));
    free(big);
    char longname[300];
    memset(longname, 'a', 299);
    longname[299] = 0;
    e[1] = mkev(longname, "T", "\xc0");
    assert_int_equal(store_append(f->s, e, 2, NULL, 0, &err), -1);
    assert_int_equal(store_append(f->s, e, 0, NULL, 0, &err), -1);
    assert_int_equal(store_last_position(f->s), 0);
    store_iter *it = store_read_all(f->s, 0, 0, 0, &err);
    uint64_t pos[4];
    assert_int_equal(collect(it, pos, NULL, 4), 0);
    assert_clean(f->s);
}

/* ---- reads ---- */

/* 12 events over several commits:
 *  pos: 1 order-1 Placed   2 order-2 Placed  3 user-1 Joined  4 order-1 Paid
 *       5 order-1 Shipped  6 order-2 Paid    7..10 order-1 Note (one request)
 *       11 user-1 Left     12 order-2 Note */
static void fill(store *s) {
    append1(s, "order-1", "Placed", 1);
    append1(s, "order-2", "Placed", 2);
    append1(s, "user-1", "Joined", 3);
    tm_event b[3] = {mkevn("order-1", "Paid", 4), mkevn("order-1", "Shipped", 5),
                     mkevn("order-2", "Paid", 6)};
    tm_err err;
    assert_int_equal(store_append(s, b, 3, NULL, 0, &err), 0);
    tm_event c[4] = {mkevn("order-1", "Note", 7), mkevn("order-1", "Note", 8),
                     mkevn("order-1", "Note", 9), mkevn("order-1", "Note", 10)};
    assert_int_equal(store_append(s, c, 4, NULL, 0, &err), 0);
    append1(s, "user-1", "Left", 11);
    append1(s, "order-2", "Note", 12);
}

#define CHECK_SEQ(it, ...)                                                              \
    do {                                                                                \
        uint64_t want_[] = {__VA_ARGS__}, got_[64];                                     \
        size_t n_ = collect((it), got_, NULL, 64);                                      \
        assert_int_equal(n_, sizeof want_ / sizeof want_[0]);                           \
        for (size_t i_ = 0; i_ < n_; i_++) assert_int_equal(got_[i_], want_[i_]);       \
    } while (0)

static void test_reads(void **state) {
    fx *f = *state;
    tm_err err;
    store *s = f->s;
    fill(s);
    assert_int_equal(store_last_position(s), 12);
    CHECK_SEQ(store_read_all(s, 0, 0, 0, &err), 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12);
    CHECK_SEQ(store_read_all(s, 5, 0, 3, &err), 5, 6, 7);
    CHECK_SEQ(store_read_all(s, 11, 0, 0, &err), 11, 12);
    CHECK_SEQ(store_read_all(s, UINT64_MAX, 1, 3, &err), 12, 11, 10);
    CHECK_SEQ(store_read_all(s, 3, 1, 0, &err), 3, 2, 1);
    uint64_t none[1];
    assert_int_equal(collect(store_read_all(s, 13, 0, 0, &err), none, NULL, 1), 0);

    /* stream: order-1 versions 0..6 at positions 1,4,5,7,8,9,10 */
    CHECK_SEQ(store_read_stream(s, "order-1", 7, 0, 0, 0, &err), 1, 4, 5, 7, 8, 9, 10);
    CHECK_SEQ(store_read_stream(s, "order-1", 7, 2, 0, 3, &err), 5, 7, 8);
    CHECK_SEQ(store_read_stream(s, "order-1", 7, 4, 0, 0, &err), 8, 9, 10);
    CHECK_SEQ(store_read_stream(s, "order-1", 7, 3, 0, 0, &err), 7, 8, 9, 10);
    CHECK_SEQ(store_read_stream(s, "order-1", 7, UINT64_MAX, 1, 0, &err), 10, 9, 8, 7, 5, 4, 1);
    CHECK_SEQ(store_read_stream(s, "order-1", 7, 3, 1, 0, &err), 7, 5, 4, 1);
    CHECK_SEQ(store_read_stream(s, "order-1", 7, 4, 1, 2, &err), 8, 7);
    CHECK_SEQ(store_read_stream(s, "order-1", 7, 100, 1, 1, &err), 10);
    assert_int_equal(collect(store_read_stream(s, "order-1", 7, 7, 0, 0, &err), none, NULL, 1), 0);
    assert_int_equal(collect(store_read_stream(s, "order", 5, 0, 0, 0, &err), none, NULL, 1), 0);
    assert_int_equal(collect(store_read_stream(s, "order-", 6, 0, 1, 0, &err), none, NULL, 1), 0);
    uint64_t pos[8], ver[8];
    size_t n = collect(store_read_stream(s, "order-2", 7, 0, 0, 0, &err), pos, ver, 8);
    assert_int_equal(n, 3);
    for (size_t i = 0; i < n; i++) assert_int_equal(ver[i], i);

    /* category and type */
    CHECK_SEQ(store_read_category(s, "order", 5, 0, 0, &err), 1, 2, 4, 5, 6, 7, 8, 9, 10, 12);
    CHECK_SEQ(store_read_category(s, "order", 5, 6, 0, &err), 6, 7, 8, 9, 10, 12);
    CHECK_SEQ(store_read_category(s, "order", 5, 8, 2, &err), 8, 9);
    CHECK_SEQ(store_read_category(s, "order", 5, 11, 0, &err), 12);
    CHECK_SEQ(store_read_category(s, "user", 4, 0, 0, &err), 3, 11);
    assert_int_equal(collect(store_read_category(s, "orde", 4, 0, 0, &err), none, NULL, 1), 0);
    assert_int_equal(collect(store_read_category(s, "order", 5, 13, 0, &err), none, NULL, 1), 0);
    CHECK_SEQ(store_read_type(s, "Note", 4, 0, 0, &err), 7, 8, 9, 10, 12);
    CHECK_SEQ(store_read_type(s, "Note", 4, 9, 0, &err), 9, 10, 12);
    CHECK_SEQ(store_read_type(s, "Paid", 4, 0, 1, &err), 4);
    CHECK_SEQ(store_read_type(s, "Placed", 6, 2, 0, &err), 2);

    /* a snapshot: events appended after the iterator starts are not seen */
    store_iter *it = store_read_all(s, 0, 0, 0, &err);
    append1(s, "late-1", "T", 1);
    uint64_t all[16];
    assert_int_equal(collect(it, all, NULL, 16), 12);
    assert_clean(s);
}

typedef struct names {
    char got[16][64];
    int64_t ver[16];
    int n;
} names;

static int name_cb(void *ud, const char *name, size_t len, int64_t version) {
    names *nm = ud;
    snprintf(nm->got[nm->n], 64, "%.*s", (int)len, name);
    nm->ver[nm->n++] = version;
    return 0;
}

static void test_list_names(void **state) {
    fx *f = *state;
    tm_err err;
    fill(f->s);
    append1(f->s, "order", "T", 1);
    append1(f->s, "order-1x", "T", 1);
    names nm = {0};
    assert_int_equal(store_list_streams(f->s, NULL, 0, 0, name_cb, &nm, &err), 0);
    assert_int_equal(nm.n, 5);
    assert_string_equal(nm.got[0], "order");
    assert_string_equal(nm.got[1], "order-1");
    assert_int_equal(nm.ver[1], 6);
    assert_string_equal(nm.got[2], "order-1x");
    assert_string_equal(nm.got[3], "order-2");
    assert_int_equal(nm.ver[3], 2);
    assert_string_equal(nm.got[4], "user-1");
    memset(&nm, 0, sizeof nm);
    assert_int_equal(store_list_streams(f->s, "order-1", 7, 2, name_cb, &nm, &err), 0);
    assert_int_equal(nm.n, 2);
    assert_string_equal(nm.got[0], "order-1x");
    assert_string_equal(nm.got[1], "order-2");
    memset(&nm, 0, sizeof nm);
    assert_int_equal(store_list_categories(f->s, name_cb, &nm, &err), 0);
    assert_int_equal(nm.n, 2);
    assert_string_equal(nm.got[0], "order");
    assert_string_equal(nm.got[1], "user");
}

static void test_reopen(void **state) {
    fx *f = *state;
    tm_err err;
    fill(f->s);
    reopen(f);
    assert_int_equal(store_last_position(f->s), 12);
    tm_event e = mkevn("order-1", "More", 1);
    store_expect x = {"order-1", 7, 6};
    assert_int_equal(store_append(f->s, &e, 1, &x, 1, &err), 0);
    assert_int_equal(e.position, 13);
    assert_int_equal(e.version, 7);
    CHECK_SEQ(store_read_stream(f->s, "order-1", 7, 5, 0, 0, &err), 9, 10, 13);
    CHECK_SEQ(store_read_category(f->s, "order", 5, 10, 0, &err), 10, 12, 13);
    assert_clean(f->s);
    /* a missing directory without create_if_missing */
    store_opts o;
    store_opts_default(&o);
    o.create_if_missing = 0;
    char missing[128];
    snprintf(missing, sizeof missing, "%s/nope", f->dir);
    assert_null(store_open(missing, &o, &err));
    assert_int_equal(err.code, TM_ENOTFOUND);
    /* the directory is locked while open */
    assert_null(store_open(f->dir, NULL, &err));
    assert_int_equal(err.code, TM_EIO);
    assert_non_null(strstr(err.msg, "in use"));
}

/* ---- concurrency ---- */

#define NTHREADS 16
#define PER_THREAD 40

typedef struct worker {
    store *s;
    int id;
    int ok;
} worker;

static void *work(void *arg) {
    worker *w = arg;
    char stream[32];
    snprintf(stream, sizeof stream, "c-%d", w->id % 4);
    for (int i = 0; i < PER_THREAD; i++) {
        tm_event e[2] = {mkevn(stream, "A", i), mkevn("shared", "B", i)};
        tm_err err;
        if (store_append(w->s, e, (i % 3) ? 1 : 2, NULL, 0, &err) == 0) w->ok++;
    }
    return NULL;
}

static void *work_one(void *arg) {
    worker *w = arg;
    char stream[32];
    snprintf(stream, sizeof stream, "one-%d", w->id);
    for (int i = 0; i < PER_THREAD; i++) {
        tm_event e = mkevn(stream, "A", i);
        tm_err err;
        if (store_append(w->s, &e, 1, NULL, 0, &err) == 0) w->ok++;
    }
    return NULL;
}

/* Optimistic writers on one stream: each reads the head and appends with it
 * as the expected version; exactly the winners are stored. */
static void *work_exact(void *arg) {
    worker *w = arg;
    for (int i = 0; i < PER_THREAD; i++) {
        int64_t v = -1;
        tm_err err;
        if (store_stream_version(w->s, "race", 4, &v, &err) == 0) v = STORE_NO_STREAM;
        tm_event e = mkevn("race", "R", w->id);
        store_expect x = {"race", 4, v};
        if (store_append(w->s, &e, 1, &x, 1, &err) == 0) w->ok++;
        else assert_int_equal(err.code, TM_ECONFLICT);
    }
    return NULL;
}

static void test_concurrent(void **state) {
    fx *f = *state;
    pthread_t th[NTHREADS];
    worker w[NTHREADS];
    uint64_t expected = 0;
    for (int i = 0; i < NTHREADS; i++) {
        w[i] = (worker){f->s, i, 0};
        pthread_create(&th[i], NULL, work, &w[i]);
    }
    for (int i = 0; i < NTHREADS; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < NTHREADS; i++) {
        assert_int_equal(w[i].ok, PER_THREAD);
        for (int k = 0; k < PER_THREAD; k++) expected += (k % 3) ? 1 : 2;
    }
    assert_int_equal(store_last_position(f->s), expected);
    tm_err err;
    uint64_t *pos = malloc(sizeof(uint64_t) * 4096), *ver = malloc(sizeof(uint64_t) * 4096);
    assert_int_equal(collect(store_read_all(f->s, 0, 0, 0, &err), pos, NULL, 4096), expected);
    for (uint64_t i = 0; i < expected; i++) assert_int_equal(pos[i], i + 1);
    size_t total = 0;
    const char *streams[] = {"c-0", "c-1", "c-2", "c-3", "shared"};
    for (int s = 0; s < 5; s++) {
        size_t n = collect(store_read_stream(f->s, streams[s], strlen(streams[s]), 0, 0, 0, &err),
                           pos, ver, 4096);
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(ver[i], i);
            if (i) assert_true(pos[i] > pos[i - 1]);
        }
        total += n;
    }
    assert_int_equal(total, expected);

    for (int i = 0; i < NTHREADS; i++) {
        w[i] = (worker){f->s, i, 0};
        pthread_create(&th[i], NULL, work_exact, &w[i]);
    }
    int wins = 0;
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(th[i], NULL);
        wins += w[i].ok;
    }
    assert_true(wins >= 1);
    int64_t head;
    assert_int_equal(store_stream_version(f->s, "race", 4, &head, &err), 1);
    assert_int_equal(head + 1, wins);
    assert_int_equal(collect(store_read_stream(f->s, "race", 4, 0, 0, 0, &err), pos, ver, 4096),
                     (size_t)wins);
    free(pos);
    free(ver);
    assert_clean(f->s);
}

/* Group commits are counted (store_commits): every request of a lone
 * writer is its own commit, synced in the durable mode; concurrent
 * one-event appends share commits (the commit delay gathers them), and
 * every one of them is acknowledged and stored exactly once. */
static void test_commit_counts(void **state) {
    fx *f = *state;
    uint64_t synced = 7;
    assert_int_equal(store_commits(f->s, &synced), 0);
    assert_int_equal(synced, 0);
    tm_err err;
    for (int i = 0; i < 20; i++) {
        tm_event e = mkevn("lone", "A", i);
        assert_int_equal(store_append(f->s, &e, 1, NULL, 0, &err), 0);
    }
    assert_int_equal(store_commits(f->s, &synced), 20);
    assert_int_equal(synced, 20);
    pthread_t th[NTHREADS];
    worker w[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        w[i] = (worker){f->s, i, 0};
        assert_int_equal(pthread_create(&th[i], NULL, work_one, &w[i]), 0);
    }
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(w[i].ok, PER_THREAD);
    }
    uint64_t appends = (uint64_t)NTHREADS * PER_THREAD;
    assert_int_equal(store_last_position(f->s), 20 + appends);
    uint64_t c = store_commits(f->s, &synced) - 20;
    assert_int_equal(synced, c + 20);
    assert_true(c >= 1 && c < appends);
    /* after the crowd, a lone writer again: one commit per append */
    for (int i = 0; i < 5; i++) {
        tm_event e = mkevn("lone", "A", 20 + i);
        assert_int_equal(store_append(f->s, &e, 1, NULL, 0, &err), 0);
    }
    assert_int_equal(store_commits(f->s, NULL), 20 + c + 5);
    assert_clean(f->s);
}

typedef struct commits {
    int calls;
    uint64_t last;
} commits;

static void on_commit(void *ud, uint64_t last) {
    commits *c = ud;
    c->calls++;
    c->last = last;
}

static void test_on_commit(void **state) {
    fx *f = *state;
    commits c = {0};
    store_on_commit(f->s, on_commit, &c);
    append1(f->s, "a", "T", 1);
    append1(f->s, "a", "T", 2);
    assert_int_equal(c.calls, 2);
    assert_int_equal(c.last, 2);
    expect_conflict(f->s, "a", STORE_NO_STREAM, 1); /* nothing written, no callback */
    assert_int_equal(c.calls, 2);
}


static void raw_put(const char *dir, const char *k, size_t kl, const char *v, size_t vl, int del);
static int check_text(store *s, char **text, store_check_report *rep);

/* More commits than the journal holds: streams are folded into runs; reads
 * span runs and journal in both directions, across reopen. */
static void test_fold(void **state) {
    fx *f = *state;
    tm_err err;
    store_opts o;
    store_opts_default(&o);
    o.durability = STORE_LOSE_ON_OS_CRASH;
    store_close(f->s);
    f->s = store_open(f->dir, &o, &err);
    assert_non_null(f->s);
    const char *sn[3] = {"f-0", "f-1", "g-2"};
    uint64_t count[3] = {0};
    for (int i = 0; i < 1300; i++) {
        int k = i % 7 == 0 ? 2 : i % 2;
        append1(f->s, sn[k], "T", i);
        count[k]++;
        if (i == 700) {
            store_close(f->s);
            f->s = store_open(f->dir, &o, &err);
            assert_non_null(f->s);
        }
    }
    tm_event b[40];
    for (int i = 0; i < 40; i++) b[i] = mkevn(sn[i % 3], "U", i);
    assert_int_equal(store_append(f->s, b, 40, NULL, 0, &err), 0);
    for (int i = 0; i < 40; i++) count[i % 3]++;
    uint64_t *pos = malloc(8 * 2000), *ver = malloc(8 * 2000);
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < 3; k++) {
            const char *nm = sn[k];
            int64_t head;
            assert_int_equal(store_stream_version(f->s, nm, 3, &head, &err), 1);
            assert_int_equal(head + 1, count[k]);
            size_t n = collect(store_read_stream(f->s, nm, 3, 0, 0, 0, &err), pos, ver, 2000);
            assert_int_equal(n, count[k]);
            for (size_t i = 0; i < n; i++) {
                assert_int_equal(ver[i], i);
                if (i) assert_true(pos[i] > pos[i - 1]);
            }
            uint64_t fwd[2000];
            memcpy(fwd, pos, n * 8);
            for (uint64_t from = 0; from < n + 2; from += 37) {
                size_t m = collect(store_read_stream(f->s, nm, 3, from, 0, 50, &err), pos, ver, 2000);
                size_t want = from >= n ? 0 : (n - from < 50 ? n - from : 50);
                assert_int_equal(m, want);
                for (size_t i = 0; i < m; i++) assert_int_equal(pos[i], fwd[from + i]);
                m = collect(store_read_stream(f->s, nm, 3, from, 1, 0, &err), pos, ver, 2000);
                size_t top = from >= n ? n - 1 : from;
                assert_int_equal(m, top + 1);
                for (size_t i = 0; i < m; i++) assert_int_equal(pos[i], fwd[top - i]);
            }
        }
        {
            names nm = {0};
            assert_int_equal(store_list_streams(f->s, NULL, 0, 0, name_cb, &nm, &err), 0);
            assert_int_equal(nm.n, 3);
            for (int k = 0; k < 3; k++) {
                assert_string_equal(nm.got[k], sn[k]);
                assert_int_equal(nm.ver[k] + 1, count[k]);
            }
            memset(&nm, 0, sizeof nm);
            assert_int_equal(store_list_streams(f->s, "f-0", 3, 1, name_cb, &nm, &err), 0);
            assert_int_equal(nm.n, 1);
            assert_string_equal(nm.got[0], "f-1");
        }
        assert_clean(f->s);
        /* expectations see folded + journal heads after reopen */
        store_close(f->s);
        f->s = store_open(f->dir, &o, &err);
        assert_non_null(f->s);
        expect_conflict(f->s, "f-1", 0, (int64_t)count[1] - 1);
        expect_ok(f->s, "f-1", (int64_t)count[1] - 1);
        count[1]++;
    }
    /* delete the folded run holding f-0 version 0: check and reads notice */
    store_close(f->s);
    f->s = NULL;
    char sk[16] = "sf-0";
    memset(sk + 4, 0, 9);
    raw_put(f->dir, sk, 13, NULL, 0, 1);
    f->s = store_open(f->dir, &o, &err);
    assert_non_null(f->s);
    store_check_report rep;
    char *text;
    assert_true(check_text(f->s, &text, &rep) > 0);
    assert_non_null(strstr(text, "f-0"));
    free(text);
    tm_event ev;
    store_iter *it = store_read_stream(f->s, "f-0", 3, 0, 0, 0, &err);
    assert_int_equal(store_iter_next(it, &ev, &err), -1);
    assert_int_equal(err.code, TM_EIO);
    store_iter_free(it);
    free(pos);
    free(ver);
}

/* ---- corruption and check ---- */

static leveldb_t *raw_open(const char *dir) {
    leveldb_options_t *o = leveldb_options_create();
    char *e = NULL;
    leveldb_t *db = leveldb_open(o, dir, &e);
    leveldb_options_destroy(o);
    assert_null(e);
    return db;
}

static void raw_put(const char *dir, const char *k, size_t kl, const char *v, size_t vl, int del) {
    leveldb_t *db = raw_open(dir);
    leveldb_writeoptions_t *wo = leveldb_writeoptions_create();
    char *e = NULL;
    if (del) leveldb_delete(db, wo, k, kl, &e);
    else leveldb_put(db, wo, k, kl, v, vl, &e);
    assert_null(e);
    leveldb_writeoptions_destroy(wo);
    leveldb_close(db);
}

/* Open a memstream for store_check's report. */
static int check_text(store *s, char **text, store_check_report *rep) {
    size_t len;
    FILE *m = open_memstream(text, &len);
    tm_err err;
    assert_int_equal(store_check(s, m, rep, &err), 0);
    fclose(m);
    return (int)rep->problems;
}

static void test_check_clean(void **state) {
    fx *f = *state;
    fill(f->s);
    store_check_report rep;
    char *text;
    assert_int_equal(check_text(f->s, &text, &rep), 0);
    assert_string_equal(text, "");
    free(text);
    assert_int_equal(rep.events, 12);
    assert_int_equal(rep.streams, 3);
    assert_int_equal(rep.categories, 2);
    assert_int_equal(rep.types, 6);
    assert_int_equal(rep.ids, 12);
}

/* The raw value under key k (malloc'ed, *vl its length). */
static char *raw_get(const char *dir, const char *k, size_t kl, size_t *vl) {
    leveldb_t *db = raw_open(dir);
    leveldb_readoptions_t *ro = leveldb_readoptions_create();
    char *e = NULL;
    char *v = leveldb_get(db, ro, k, kl, vl, &e);
    assert_null(e);
    assert_non_null(v);
    leveldb_readoptions_destroy(ro);
    leveldb_close(db);
    return v;
}

static void test_corrupt_record(void **state) {
    fx *f = *state;
    tm_err err;
    fill(f->s);
    store_close(f->s);
    f->s = NULL;
    /* position 5 is the second record of the block of the commit 4..6
     * (key: its last position; value: count, then length-prefixed
     * records): break that record's checksum */
    char k[9] = {0x7f, 0, 0, 0, 0, 0, 0, 0, 6};
    size_t vl;
    char *v = raw_get(f->dir, k, 9, &vl);
    assert_int_equal(v[0], 3);
    size_t at = 1 + 1 + (unsigned char)v[1]; /* past record 4 */
    size_t len5 = (unsigned char)v[at];
    assert_true(at + 1 + len5 < vl);
    v[at + len5] ^= 1; /* the last byte of record 5 */
    raw_put(f->dir, k, 9, v, vl, 0);
    reopen(f);

    store_iter *it = store_read_all(f->s, 0, 0, 0, &err);
    tm_event ev;
    int r, n = 0;
    while ((r = store_iter_next(it, &ev, &err)) == 1) n++;
    store_iter_free(it);
    assert_int_equal(r, -1);
    assert_int_equal(n, 4);
    assert_int_equal(err.code, TM_EIO);
    assert_non_null(strstr(err.msg, "position 5"));
    it = store_read_stream(f->s, "order-1", 7, 0, 0, 0, &err);
    assert_int_equal(store_iter_next(it, &ev, &err), 1);
    assert_int_equal(store_iter_next(it, &ev, &err), 1);
    assert_int_equal(store_iter_next(it, &ev, &err), -1);
    assert_non_null(strstr(err.msg, "position 5"));
    store_iter_free(it);
    it = store_read_type(f->s, "Shipped", 7, 0, 0, &err);
    assert_int_equal(store_iter_next(it, &ev, &err), -1);
    store_iter_free(it);

    store_check_report rep;
    char *text;
    assert_true(check_text(f->s, &text, &rep) > 0);
    assert_non_null(strstr(text, "position 5"));
    free(text);

    /* a block whose count claims more records than it holds */
    store_close(f->s);
    f->s = NULL;
    v[at + len5] ^= 1;
    v[0] = 4;
    raw_put(f->dir, k, 9, v, vl, 0);
    free(v);
    reopen(f);
    it = store_read_all(f->s, 0, 0, 0, &err);
    n = 0;
    while ((r = store_iter_next(it, &ev, &err)) == 1) n++;
    store_iter_free(it);
    assert_int_equal(r, -1);
    assert_int_equal(err.code, TM_EIO);
    assert_non_null(strstr(err.msg, "malformed log block"));
    assert_true(check_text(f->s, &text, &rep) > 0);
    assert_non_null(strstr(text, "malformed block"));
    free(text);
}

static void test_check_broken_indexes(void **state) {
    fx *f = *state;
    fill(f->s);
    store_close(f->s);
    f->s = NULL;
    /* delete the type run holding position 3 ("Joined") */
    char k[32] = "tJoined";
    memset(k + 7, 0, 9);
    k[15] = 3;
    raw_put(f->dir, k, 16, NULL, 0, 1);
    reopen(f);
    store_check_report rep;
    char *text;
    assert_true(check_text(f->s, &text, &rep) > 0);
    assert_non_null(strstr(text, "Joined"));
    free(text);

    /* the stream journal entry of position 3 (user-1 version 0) rewritten to
     * point at position 2, with a valid checksum; and position 11 deleted */
    store_close(f->s);
    f->s = NULL;
    char gk[9] = {'g', 0, 0, 0, 0, 0, 0, 0, 3};
    char gv[4 + 10] = {0, 0, 0, 0, 6, 'u', 's', 'e', 'r', '-', '1', 0, 1, 2};
    uint32_t c = crc32c(0, gv + 4, 10);
    memcpy(gv, &c, 4); /* little-endian machine */
    leveldb_t *db = raw_open(f->dir);
    leveldb_writeoptions_t *wo = leveldb_writeoptions_create();
    char *e = NULL;
    leveldb_put(db, wo, gk, 9, gv, sizeof gv, &e);
    char ek[9] = {0x7f, 0, 0, 0, 0, 0, 0, 0, 11};
    leveldb_delete(db, wo, ek, 9, &e);
    assert_null(e);
    leveldb_writeoptions_destroy(wo);
    leveldb_close(db);
    reopen(f);
    assert_true(check_text(f->s, &text, &rep) >= 3);
    assert_non_null(strstr(text, "user-1"));
    assert_non_null(strstr(text, "11"));
    free(text);
    /* reads report the broken index rather than a wrong event */
    tm_err err;
    tm_event ev;
    store_iter *it = store_read_stream(f->s, "user-1", 6, 0, 0, 0, &err);
    assert_int_equal(store_iter_next(it, &ev, &err), -1);
    assert_int_equal(err.code, TM_EIO);
    store_iter_free(it);
    it = store_read_all(f->s, 10, 0, 0, &err);
    assert_int_equal(store_iter_next(it, &ev, &err), 1);
    assert_int_equal(store_iter_next(it, &ev, &err), -1);
    assert_non_null(strstr(err.msg, "position 11"));
    store_iter_free(it);
}

/* ---- key-value namespace ---- */

static void test_kv(void **state) {
    fx *f = *state;
    tm_err err;
    fill(f->s);
    store_batch *b = store_batch_new();
    store_batch_put(b, "p1/a", 4, "1", 1);
    store_batch_put(b, "p1/b", 4, "2", 1);
    store_batch_put(b, "p1/c", 4, "3", 1);
    store_batch_put(b, "p2/a", 4, "x", 1);
    store_batch_put(b, "e", 1, "not an event", 12);
    assert_int_equal(store_batch_commit(f->s, b, &err), 0);
    store_batch_clear(b);
    store_batch_del(b, "p1/b", 4);
    store_batch_put(b, "p1/a", 4, "one", 3);
    assert_int_equal(store_batch_commit(f->s, b, &err), 0);
    store_batch_free(b);
    char *v;
    size_t vl;
    assert_int_equal(store_kv_get(f->s, "p1/a", 4, &v, &vl, &err), 1);
    assert_int_equal(vl, 3);
    assert_memory_equal(v, "one", 3);
    free(v);
    assert_int_equal(store_kv_get(f->s, "p1/b", 4, &v, &vl, &err), 0);
    store_kv_iter *it = store_kv_scan(f->s, "p1/", 3, NULL, 0, &err);
    const char *k, *val;
    size_t kl;
    assert_int_equal(store_kv_next(it, &k, &kl, &val, &vl, &err), 1);
    assert_int_equal(kl, 4);
    assert_memory_equal(k, "p1/a", 4);
    assert_int_equal(store_kv_next(it, &k, &kl, &val, &vl, &err), 1);
    assert_memory_equal(k, "p1/c", 4);
    assert_memory_equal(val, "3", 1);
    assert_int_equal(store_kv_next(it, &k, &kl, &val, &vl, &err), 0);
    store_kv_iter_free(it);
    it = store_kv_scan(f->s, "p1/", 3, "p1/b", 4, &err);
    assert_int_equal(store_kv_next(it, &k, &kl, &val, &vl, &err), 1);
    assert_memory_equal(k, "p1/c", 4);
    store_kv_iter_free(it);
    assert_int_equal(store_kv_delete_prefix(f->s, "p1/", 3, &err), 0);
    assert_int_equal(store_kv_get(f->s, "p1/a", 4, &v, &vl, &err), 0);
    assert_int_equal(store_kv_get(f->s, "p2/a", 4, &v, &vl, &err), 1);
    free(v);
    /* the log is untouched by the namespace */
    assert_int_equal(store_last_position(f->s), 12);
    assert_clean(f->s);
}

/* Leader commit: 16 threads, one- and two-event requests, some rejected by
 * expected versions.  Every caller's result is its own (position, version,
 * id read back match the event it wrote), positions are gapless, each
 * stream's versions are contiguous in position order, rejected requests
 * get their own conflict and write nothing. */
#define LC_THREADS 16
#define LC_CALLS 150

typedef struct lc_res {
    uint64_t pos, ver;
    uint8_t id[16];
    int ok; /* 1 appended, -1 rejected as expected */
} lc_res;

typedef struct lc_worker {
    store *s;
    int t;
    lc_res res[LC_CALLS][2];
    int bad;
} lc_worker;

/* msgpack [t, i, k] with t < 128, i < 65536, k < 2 */
static void lc_data(char *b, int t, int i, int k) {
    b[0] = (char)0x93;
    b[1] = (char)t;
    b[2] = (char)0xcd;
    b[3] = (char)(i >> 8);
    b[4] = (char)i;
    b[5] = (char)k;
}

static void *lc_work(void *arg) {
    lc_worker *w = arg;
    char sa[16], sb[16], da[6], db[6];
    snprintf(sa, sizeof sa, "lc-%d", w->t % 5);
    snprintf(sb, sizeof sb, "lc-%d", (w->t + 1) % 5);
    for (int i = 0; i < LC_CALLS; i++) {
        lc_data(da, w->t, i, 0);
        lc_data(db, w->t, i, 1);
        tm_event e[2] = {mkev(sa, "A", ""), mkev(sb, "B", "")};
        e[0].data = da;
        e[0].data_len = 6;
        e[1].data = db;
        e[1].data_len = 6;
        size_t n = i % 4 == 1 ? 2 : 1;
        store_expect x = {sa, strlen(sa), STORE_NO_STREAM};
        int reject = i > 0 && i % 10 == 0; /* sa exists once this thread wrote to it */
        tm_err err;
        int rc = store_append(w->s, e, n, reject ? &x : NULL, reject ? 1 : 0, &err);
        if (reject) {
            if (rc != -1 || err.code != TM_ECONFLICT || err.current_version < 0 ||
                !strstr(err.msg, sa))
                w->bad++;
            w->res[i][0].ok = w->res[i][1].ok = -1;
            continue;
        }
        if (rc != 0) {
            w->bad++;
            continue;
        }
        for (size_t k = 0; k < n; k++) {
            w->res[i][k].ok = 1;
            w->res[i][k].pos = e[k].position;
            w->res[i][k].ver = e[k].version;
            memcpy(w->res[i][k].id, e[k].id, 16);
        }
        if (n == 2 && e[1].position != e[0].position + 1) w->bad++;
    }
    return NULL;
}

static void test_leader_commit(void **state) {
    fx *f = *state;
    static lc_worker w[LC_THREADS];
    pthread_t th[LC_THREADS];
    for (int t = 0; t < LC_THREADS; t++) {
        memset(&w[t], 0, sizeof w[t]);
        w[t].s = f->s;
        w[t].t = t;
        assert_int_equal(pthread_create(&th[t], NULL, lc_work, &w[t]), 0);
    }
    uint64_t expected = 0;
    for (int t = 0; t < LC_THREADS; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(w[t].bad, 0);
        for (int i = 0; i < LC_CALLS; i++)
            for (int k = 0; k < 2; k++) expected += w[t].res[i][k].ok == 1;
    }
    assert_int_equal(store_last_position(f->s), expected);
    /* every stored event is exactly one caller's, with that caller's result */
    int64_t next_ver[5] = {0, 0, 0, 0, 0};
    tm_err err;
    store_iter *it = store_read_all(f->s, 0, 0, 0, &err);
    assert_non_null(it);
    tm_event ev;
    uint64_t n = 0;
    int r;
    while ((r = store_iter_next(it, &ev, &err)) == 1) {
        n++;
        assert_int_equal(ev.position, n);
        assert_int_equal(ev.data_len, 6);
        const unsigned char *d = (const unsigned char *)ev.data;
        int t = d[1], i = d[3] << 8 | d[4], k = d[5];
        assert_true(t < LC_THREADS && i < LC_CALLS && k < 2);
        lc_res *res = &w[t].res[i][k];
        assert_int_equal(res->ok, 1);
        res->ok = 2; /* seen once */
        assert_int_equal(res->pos, ev.position);
        assert_int_equal(res->ver, ev.version);
        assert_memory_equal(res->id, ev.id, 16);
        /* a generated id: the position in bytes 0-5, version 8, variant 10 */
        uint64_t idpos = 0;
        for (int k = 0; k < 6; k++) idpos = idpos << 8 | ev.id[k];
        assert_int_equal(idpos, ev.position);
        assert_int_equal(ev.id[6] & 0xf0, 0x80);
        assert_int_equal(ev.id[8] & 0xc0, 0x80);
        int sn = ev.stream[3] - '0';
        assert_int_equal((int64_t)ev.version, next_ver[sn]);
        next_ver[sn]++;
    }
    assert_int_equal(r, 0);
    store_iter_free(it);
    assert_int_equal(n, expected);
    for (int sn = 0; sn < 5; sn++) {
        char name[16];
        snprintf(name, sizeof name, "lc-%d", sn);
        int64_t head;
        assert_int_equal(store_stream_version(f->s, name, strlen(name), &head, &err), 1);
        assert_int_equal(head + 1, next_ver[sn]);
    }
    assert_clean(f->s);
}

/* The log per format: a new store is format 3 (blocks under 0x7f, one per
 * commit here); a format 2 store (one record per key under 0x7f) and a
 * format 1 store (the same under 'e') keep working as such, and an unknown
 * format is refused. */
static size_t count_prefix(const char *dir, unsigned char prefix) {
    leveldb_t *db = raw_open(dir);
    leveldb_readoptions_t *ro = leveldb_readoptions_create();
    leveldb_iterator_t *it = leveldb_create_iterator(db, ro);
    size_t n = 0;
    for (leveldb_iter_seek_to_first(it); leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t kl;
        const char *k = leveldb_iter_key(it, &kl);
        n += kl == 9 && (unsigned char)k[0] == prefix;
    }
    leveldb_iter_destroy(it);
    leveldb_readoptions_destroy(ro);
    leveldb_close(db);
    return n;
}

static void test_formats(void **state) {
    fx *f = *state;
    fill(f->s);
    store_close(f->s);
    f->s = NULL;
    assert_int_equal(count_prefix(f->dir, 0x7f), 7);
    assert_int_equal(count_prefix(f->dir, 'e'), 0);
    size_t vl;
    char *v = raw_get(f->dir, "mformat", 7, &vl);
    assert_true(vl == 1 && v[0] == '3');
    free(v);
    leveldb_options_t *o = leveldb_options_create();
    leveldb_options_set_create_if_missing(o, 1);
    leveldb_writeoptions_t *wo = leveldb_writeoptions_create();
    char *e = NULL;
    leveldb_t *db;
    char dir1[64];
    for (char fmt = '1'; fmt <= '2'; fmt++) {
        unsigned char prefix = fmt == '1' ? 'e' : 0x7f;
        strcpy(dir1, "/tmp/tm_store1_XXXXXX");
        assert_non_null(mkdtemp(dir1));
        db = leveldb_open(o, dir1, &e);
        assert_null(e);
        leveldb_put(db, wo, "mformat", 7, &fmt, 1, &e);
        assert_null(e);
        leveldb_close(db);
        tm_err err;
        store *s1 = store_open(dir1, NULL, &err);
        assert_non_null(s1);
        fill(s1);
        CHECK_SEQ(store_read_stream(s1, "order-1", 7, 0, 0, 0, &err), 1, 4, 5, 7, 8, 9, 10);
        CHECK_SEQ(store_read_stream(s1, "order-1", 7, 10, 1, 0, &err), 10, 9, 8, 7, 5, 4, 1);
        CHECK_SEQ(store_read_all(s1, 11, 0, 0, &err), 11, 12);
        CHECK_SEQ(store_read_all(s1, 3, 1, 0, &err), 3, 2, 1);
        assert_clean(s1);
        store_close(s1);
        s1 = store_open(dir1, NULL, &err); /* reopened: the last position found in the log */
        assert_non_null(s1);
        assert_int_equal(store_last_position(s1), 12);
        append1(s1, "order-3", "Placed", 13);
        assert_int_equal(store_last_position(s1), 13);
        assert_clean(s1);
        store_close(s1);
        assert_int_equal(count_prefix(dir1, prefix), 13); /* one record per key */
        assert_int_equal(count_prefix(dir1, fmt == '1' ? 0x7f : 'e'), 0);
        v = raw_get(dir1, "mformat", 7, &vl);
        assert_true(vl == 1 && v[0] == fmt);
        free(v);
        if (fmt == '1') nftw(dir1, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    }
    tm_err err;
    /* an unknown format */
    db = leveldb_open(o, dir1, &e);
    assert_null(e);
    leveldb_put(db, wo, "mformat", 7, "4", 1, &e);
    leveldb_close(db);
    assert_null(store_open(dir1, NULL, &err));
    assert_int_equal(err.code, TM_EIO);
    assert_non_null(strstr(err.msg, "unsupported store format"));
    leveldb_writeoptions_destroy(wo);
    leveldb_options_destroy(o);
    nftw(dir1, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    reopen(f);
    assert_int_equal(store_last_position(f->s), 12);
}

/* Format 3 packs a commit's records into blocks of up to 64 records and
 * about 4 KiB: a batch of 1000 (some records larger than a block) reads
 * back in every direction and by index, its generated ids are found
 * inside blocks, and check is clean, before and after a reopen. */
static void test_blocks(void **state) {
    fx *f = *state;
    tm_err err;
    enum { N = 1000, BIG = 5000 };
    static char big[8][8 + BIG];
    tm_event evs[N];
    char names[10][16];
    for (int i = 0; i < 10; i++) snprintf(names[i], sizeof names[i], "blk-%d", i);
    for (int i = 0; i < N; i++) {
        evs[i] = mkevn(names[i % 10], i % 3 ? "A" : "B", i);
        if (i % 125 == 7) { /* {"s": <5000 bytes>}: a record on its own */
            char *b = big[i / 125];
            b[0] = (char)0x81;
            b[1] = (char)0xa1;
            b[2] = 's';
            b[3] = (char)0xda;
            b[4] = (char)(BIG >> 8);
            b[5] = (char)(BIG & 0xff);
            memset(b + 6, 'a' + i % 26, BIG);
            evs[i].data = b;
            evs[i].data_len = 6 + BIG;
        }
    }
    append1(f->s, "first", "T", 0);
    assert_int_equal(store_append(f->s, evs, N, NULL, 0, &err), 0);
    assert_int_equal(store_last_position(f->s), N + 1);
    for (int round = 0; round < 2; round++) {
        store *s = f->s;
        uint64_t got[N + 1];
        size_t n = collect(store_read_all(s, 0, 0, 0, &err), got, NULL, N + 1);
        assert_int_equal(n, N + 1);
        for (size_t i = 0; i < n; i++) assert_int_equal(got[i], i + 1);
        n = collect(store_read_all(s, 0, 1, 0, &err), got, NULL, N + 1);
        assert_int_equal(n, 0); /* backward from 0: nothing */
        n = collect(store_read_all(s, N + 1, 1, 0, &err), got, NULL, N + 1);
        assert_int_equal(n, N + 1);
        for (size_t i = 0; i < n; i++) assert_int_equal(got[i], N + 1 - i);
        CHECK_SEQ(store_read_all(s, 500, 0, 3, &err), 500, 501, 502);
        n = collect(store_read_stream(s, "blk-3", 5, 0, 0, 0, &err), got, NULL, N + 1);
        assert_int_equal(n, N / 10);
        for (size_t i = 0; i < n; i++) assert_int_equal(got[i], 2 + 3 + 10 * i);
        n = collect(store_read_stream(s, "blk-3", 5, 99, 1, 0, &err), got, NULL, N + 1);
        assert_int_equal(n, N / 10);
        for (size_t i = 0; i < n; i++) assert_int_equal(got[i], 2 + 3 + 10 * (99 - i));
        n = collect(store_read_type(s, "B", 1, 0, 0, &err), got, NULL, N + 1);
        assert_int_equal(n, (N + 2) / 3);
        /* every record's content, and the big ones */
        store_iter *it = store_read_all(s, 2, 0, 0, &err);
        tm_event ev;
        for (int i = 0; i < N; i++) {
            assert_int_equal(store_iter_next(it, &ev, &err), 1);
            assert_int_equal(ev.data_len, evs[i].data_len);
            assert_memory_equal(ev.data, evs[i].data, ev.data_len);
            assert_int_equal(ev.stream_len, evs[i].stream_len);
        }
        assert_int_equal(store_iter_next(it, &ev, &err), 0);
        store_iter_free(it);
        /* a retry of stored events with their generated ids: found in their blocks */
        tm_event again[3];
        int at[3] = {2, 300, N + 1};
        for (int j = 0; j < 3; j++) {
            again[j] = evs[at[j] - 2];
            it = store_read_all(s, (uint64_t)at[j], 0, 1, &err);
            assert_int_equal(store_iter_next(it, &ev, &err), 1);
            store_iter_free(it);
            memcpy(again[j].id, ev.id, 16);
            again[j].has_id = 1;
            assert_int_equal(store_append(s, &again[j], 1, NULL, 0, &err), 0);
            assert_int_equal(again[j].position, at[j]);
        }
        assert_int_equal(store_last_position(s), N + 1);
        assert_clean(s);
        reopen(f);
    }
    store_close(f->s);
    f->s = NULL;
    size_t keys = count_prefix(f->dir, 0x7f);
    assert_true(keys >= 1 + N / 64 && keys < 100);
    reopen(f);
    append1(f->s, "last", "T", 1);
    assert_int_equal(store_last_position(f->s), N + 2);
}


/* ---- a failed write ---- */

static void test_failed_write(void **state) {
    fx *f = *state;
    tm_err err;
    append1(f->s, "a", "T", 1);
    /* Make every further file write fail (EFBIG) */
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, SIG_IGN);
    lim = old;
    lim.rlim_cur = 1;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    tm_event e = mkevn("a", "T", 2);
    int rc = store_append(f->s, &e, 1, NULL, 0, &err);
    setrlimit(RLIMIT_FSIZE, &old);
    assert_int_equal(rc, -1);
    assert_int_equal(err.code, TM_EIO);
    /* refusing from now on, even though writes would work again */
    e = mkevn("a", "T", 3);
    assert_int_equal(store_append(f->s, &e, 1, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_EIO);
    assert_non_null(strstr(err.msg, "reopen"));
    store_batch *b = store_batch_new();
    store_batch_put(b, "k", 1, "v", 1);
    assert_int_equal(store_batch_commit(f->s, b, &err), -1);
    store_batch_free(b);
    assert_int_equal(store_last_position(f->s), 1);
    reopen(f);
    assert_int_equal(store_last_position(f->s), 1);
    append1(f->s, "a", "T", 4);
    assert_int_equal(store_last_position(f->s), 2);
    assert_clean(f->s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c_and_record),
        cmocka_unit_test(test_record_encode_forms),
        cmocka_unit_test_setup_teardown(test_append_single, setup, teardown),
        cmocka_unit_test_setup_teardown(test_append_multi, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expected_versions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idempotent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_input, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_list_names, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_counts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_leader_commit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_formats, setup, teardown),
        cmocka_unit_test_setup_teardown(test_blocks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fold, setup, teardown),
        cmocka_unit_test_setup_teardown(test_on_commit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_check_clean, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_record, setup, teardown),
        cmocka_unit_test_setup_teardown(test_check_broken_indexes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kv, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_write, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
