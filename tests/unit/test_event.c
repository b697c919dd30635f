/* test_event.c — unit tests for engine/event.c: UUID generation (unique,
 * v4, per thread, across fork), parse/format, categories, name checks,
 * event_from_json / event_from_mp (happy paths and every error), and the
 * exact export format of event_to_json. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <msgpack.h>

#include "buf.h"
#include "event.h"
#include "json.h"
#include "mp.h"

/* ---- ids ---- */

static int cmp16(const void *a, const void *b) { return memcmp(a, b, 16); }

static void check_v4(const uint8_t id[16]) {
    assert_int_equal(id[6] >> 4, 4);
    assert_int_equal(id[8] >> 6, 2);
}

static void test_id_generate_unique(void **st) {
    enum { N = 20000 };
    uint8_t(*ids)[16] = malloc(sizeof *ids * N);
    for (int i = 0; i < N; i++) {
        event_id_generate(ids[i]);
        check_v4(ids[i]);
    }
    qsort(ids, N, 16, cmp16);
    for (int i = 1; i < N; i++) assert_true(memcmp(ids[i - 1], ids[i], 16) != 0);
    /* each of the 122 random bits is set in some ids and clear in others */
    uint8_t or_[16] = {0}, and_[16];
    memset(and_, 0xff, 16);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < 16; j++) or_[j] |= ids[i][j], and_[j] &= ids[i][j];
    for (int j = 0; j < 16; j++) {
        assert_int_equal(or_[j], j == 6 ? 0x4f : j == 8 ? 0xbf : 0xff);
        assert_int_equal(and_[j], j == 6 ? 0x40 : j == 8 ? 0x80 : 0x00);
    }
    free(ids);
}

enum { TN = 4, TPER = 5000 };
static uint8_t thread_ids[TN][TPER][16];

static void *gen_thread(void *arg) {
    uint8_t(*mine)[16] = arg;
    for (int i = 0; i < TPER; i++) event_id_generate(mine[i]);
    return NULL;
}

static void test_id_threads(void **st) {
    pthread_t t[TN];
    for (int i = 0; i < TN; i++) pthread_create(&t[i], NULL, gen_thread, thread_ids[i]);
    for (int i = 0; i < TN; i++) pthread_join(t[i], NULL);
    uint8_t(*all)[16] = (uint8_t(*)[16])thread_ids;
    qsort(all, TN * TPER, 16, cmp16);
    for (int i = 1; i < TN * TPER; i++) assert_true(memcmp(all[i - 1], all[i], 16) != 0);
}

/* A forked child must not repeat the parent's sequence. */
static void test_id_fork(void **st) {
    uint8_t a[16], child[16], parent[16];
    event_id_generate(a); /* parent generator is seeded */
    int fd[2];
    assert_int_equal(pipe(fd), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        uint8_t c[16];
        event_id_generate(c);
        ssize_t w = write(fd[1], c, 16);
        _exit(w == 16 ? 0 : 1);
    }
    close(fd[1]);
    assert_int_equal(read(fd[0], child, 16), 16);
    close(fd[0]);
    int status;
    waitpid(pid, &status, 0);
    event_id_generate(parent);
    assert_true(memcmp(child, parent, 16) != 0);
    check_v4(child);
}

static void test_id_parse_format(void **st) {
    uint8_t id[16];
    char s[37];
    assert_int_equal(event_id_parse("123e4567-e89b-12d3-a456-426614174000", 36, id), 0);
    static const uint8_t want[16] = {0x12, 0x3e, 0x45, 0x67, 0xe8, 0x9b, 0x12, 0xd3,
                                     0xa4, 0x56, 0x42, 0x66, 0x14, 0x17, 0x40, 0x00};
    assert_memory_equal(id, want, 16);
    event_id_format(id, s);
    assert_string_equal(s, "123e4567-e89b-12d3-a456-426614174000");
    /* case-insensitive in, lowercase out */
    assert_int_equal(event_id_parse("ABCDEF01-2345-6789-ABCD-EF0123456789", 36, id), 0);
    event_id_format(id, s);
    assert_string_equal(s, "abcdef01-2345-6789-abcd-ef0123456789");
    assert_int_equal(event_id_parse("00000000-0000-0000-0000-000000000000", 36, id), 0);
    event_id_format(id, s);
    assert_string_equal(s, "00000000-0000-0000-0000-000000000000");
    /* round trip of generated ids */
    for (int i = 0; i < 100; i++) {
        uint8_t g[16], back[16];
        event_id_generate(g);
        event_id_format(g, s);
        assert_int_equal(strlen(s), 36);
        assert_int_equal(event_id_parse(s, 36, back), 0);
        assert_memory_equal(g, back, 16);
    }
    /* rejects */
    uint8_t keep[16];
    memset(keep, 0xaa, 16);
    memcpy(id, keep, 16);
    const char *bad[] = {
        "123e4567-e89b-12d3-a456-42661417400",    /* 35 */
        "123e4567-e89b-12d3-a456-4266141740000",  /* 37 */
        "123e4567e89b12d3a456426614174000",       /* no hyphens */
        "123e4567-e89b-12d3-a456_426614174000",   /* wrong separator */
        "123e4567-e89b-12d3a-456-426614174000",   /* hyphen moved */
        "123e4567-e89b-12d3-a456-42661417400g",   /* not hex */
        "{23e4567-e89b-12d3-a456-42661417400}",
        "123e4567-e89b-12d3-a456- 26614174000",
        "",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(event_id_parse(bad[i], strlen(bad[i]), id), -1);
        assert_memory_equal(id, keep, 16); /* untouched on failure */
    }
}

/* ---- names ---- */

static void test_category(void **st) {
    assert_int_equal(event_category_len("order-17", 8), 5);
    assert_int_equal(event_category_len("order", 5), 5);
    assert_int_equal(event_category_len("a-b-c", 5), 1);
    assert_int_equal(event_category_len("-x", 2), 0);
    assert_int_equal(event_category_len("", 0), 0);
    assert_int_equal(event_category_len("order-17", 5), 5); /* only len bytes are looked at */
    assert_int_equal(event_category_len("ab-", 2), 2);
}

static int names(const char *s, size_t sl, const char *t, size_t tl, tm_err *e) {
    tm_event ev = {0};
    ev.stream = s;
    ev.stream_len = sl;
    ev.type = t;
    ev.type_len = tl;
    err_clear(e);
    return event_check_names(&ev, e);
}

static void test_check_names(void **st) {
    tm_err e;
    char big[300];
    memset(big, 'x', sizeof big);
    assert_int_equal(names("order-1", 7, "Placed", 6, &e), 0);
    assert_int_equal(names("\xc3\xa9v\xc3\xa9nement", 11, "T", 1, &e), 0);
    assert_int_equal(names(big, 256, big, 256, &e), 0);
    assert_int_equal(names(big, 257, "T", 1, &e), -1);
    assert_int_equal(e.code, TM_EINVAL);
    assert_string_equal(e.msg, "stream name is 257 bytes, longer than 256");
    assert_int_equal(names("s", 1, big, 257, &e), -1);
    assert_string_equal(e.msg, "event type is 257 bytes, longer than 256");
    assert_int_equal(names("", 0, "T", 1, &e), -1);
    assert_string_equal(e.msg, "stream name is empty");
    assert_int_equal(names(NULL, 0, "T", 1, &e), -1);
    assert_int_equal(names("s", 1, "", 0, &e), -1);
    assert_string_equal(e.msg, "event type is empty");
    assert_int_equal(names("a\0b", 3, "T", 1, &e), -1);
    assert_string_equal(e.msg, "stream name contains a NUL byte");
    assert_int_equal(names("s", 1, "T\0", 2, &e), -1);
    assert_string_equal(e.msg, "event type contains a NUL byte");
    assert_int_equal(names("a\xff", 2, "T", 1, &e), -1);
    assert_string_equal(e.msg, "stream name is not valid UTF-8");
    assert_int_equal(names("s", 1, "\xed\xa0\x80", 3, &e), -1);
    assert_string_equal(e.msg, "event type is not valid UTF-8");
    /* a NUL or a bad byte anywhere in longer names (word-at-a-time scan) */
    for (size_t len = 1; len <= 24; len++)
        for (size_t at = 0; at < len; at++) {
            char n[24];
            memset(n, 'a' + (int)(len % 26), sizeof n);
            assert_int_equal(names(n, len, n, len, &e), 0);
            n[at] = '\0';
            assert_int_equal(names(n, len, "T", 1, &e), -1);
            assert_string_equal(e.msg, "stream name contains a NUL byte");
            n[at] = '\xff';
            assert_int_equal(names("s", 1, n, len, &e), -1);
            assert_string_equal(e.msg, "event type is not valid UTF-8");
            n[at] = '\x7f'; /* DEL and 0x01 are ASCII: accepted */
            assert_int_equal(names(n, len, n, len, &e), 0);
            n[at] = '\x01';
            assert_int_equal(names(n, len, n, len, &e), 0);
            if (at + 1 < len) { /* valid 2-byte UTF-8 through the slow path */
                n[at] = '\xc3';
                n[at + 1] = '\xa9';
                assert_int_equal(names(n, len, n, len, &e), 0);
            }
        }
}

/* ---- event_from_json ---- */

static void mp_of(const char *json, buf *out) {
    tm_err e;
    if (json_to_mp(json, strlen(json), NULL, out, &e) != 0) fail_msg("%s", e.msg);
}

static void assert_mp_is(const char *p, size_t n, const char *json) {
    buf want = BUF_INIT;
    mp_of(json, &want);
    assert_int_equal(n, want.len);
    assert_memory_equal(p, want.ptr, n);
    buf_free(&want);
}

static void test_from_json_full(void **st) {
    const char *line =
        "{\"stream\":\"order-1\",\"type\":\"OrderPlaced\",\"data\":{\"total\":12.5,\"items\":[1,2]},"
        "\"metadata\":{\"correlation_id\":\"c1\"},\"id\":\"123E4567-e89b-12d3-a456-426614174000\","
        "\"time\":1700000000000,\"position\":99,\"version\":\"ignored\"}";
    buf scratch = BUF_INIT;
    buf_puts(&scratch, "keep");
    tm_event ev;
    tm_err e;
    err_clear(&e);
    if (event_from_json(line, strlen(line), NULL, 0, NULL, &scratch, &ev, &e) != 0)
        fail_msg("%s", e.msg);
    assert_memory_equal(scratch.ptr, "keep", 4); /* appended, not reset */
    assert_int_equal(ev.stream_len, 7);
    assert_memory_equal(ev.stream, "order-1", 7);
    assert_int_equal(ev.type_len, 11);
    assert_memory_equal(ev.type, "OrderPlaced", 11);
    assert_mp_is(ev.data, ev.data_len, "{\"total\":12.5,\"items\":[1,2]}");
    assert_mp_is(ev.meta, ev.meta_len, "{\"correlation_id\":\"c1\"}");
    assert_int_equal(ev.has_id, 1);
    char s[37];
    event_id_format(ev.id, s);
    assert_string_equal(s, "123e4567-e89b-12d3-a456-426614174000");
    assert_true(ev.time_ms == 1700000000000LL);
    assert_int_equal(ev.position, 0); /* ignored on input */
    assert_int_equal(ev.version, 0);
    /* pointers are into scratch */
    assert_true(ev.stream > scratch.ptr && ev.stream < scratch.ptr + scratch.len);
    assert_true(ev.data > scratch.ptr && ev.data + ev.data_len <= scratch.ptr + scratch.len);
    buf_free(&scratch);
}

static void test_from_json_minimal(void **st) {
    buf scratch = BUF_INIT;
    tm_event ev;
    tm_err e;
    const char *line = " {\"type\":\"T\",\"stream\":\"s\"} ";
    assert_int_equal(event_from_json(line, strlen(line), NULL, 0, NULL, &scratch, &ev, &e), 0);
    assert_int_equal(ev.data_len, 1);
    assert_int_equal((unsigned char)ev.data[0], 0xc0); /* nil */
    assert_int_equal(ev.meta_len, 0);
    assert_int_equal(ev.has_id, 0);
    assert_true(ev.time_ms == 0);
    /* nulls mean absent for the optional keys; data may be any value */
    line = "{\"stream\":\"s\",\"type\":\"T\",\"data\":[1,\"x\"],\"metadata\":null,\"id\":null,"
           "\"time\":null}";
    assert_int_equal(event_from_json(line, strlen(line), NULL, 0, NULL, &scratch, &ev, &e), 0);
    assert_mp_is(ev.data, ev.data_len, "[1,\"x\"]");
    assert_int_equal(ev.meta_len, 0);
    assert_int_equal(ev.has_id, 0);
    line = "{\"stream\":\"s\",\"type\":\"T\",\"data\":7}";
    assert_int_equal(event_from_json(line, strlen(line), NULL, 0, NULL, &scratch, &ev, &e), 0);
    assert_mp_is(ev.data, ev.data_len, "7");
    buf_free(&scratch);
}

static void test_from_json_stream_param(void **st) {
    buf scratch = BUF_INIT;
    tm_event ev;
    tm_err e;
    const char *nos = "{\"type\":\"T\"}";
    assert_int_equal(event_from_json(nos, strlen(nos), "acct-9", 6, NULL, &scratch, &ev, &e), 0);
    assert_int_equal(ev.stream_len, 6);
    assert_memory_equal(ev.stream, "acct-9", 6);
    const char *same = "{\"type\":\"T\",\"stream\":\"acct-9\"}";
    assert_int_equal(event_from_json(same, strlen(same), "acct-9", 6, NULL, &scratch, &ev, &e), 0);
    assert_memory_equal(ev.stream, "acct-9", 6);
    const char *other = "{\"type\":\"T\",\"stream\":\"acct-8\"}";
    assert_int_equal(event_from_json(other, strlen(other), "acct-9", 6, NULL, &scratch, &ev, &e),
                     -1);
    assert_string_equal(e.msg, "event: \"stream\" is \"acct-8\" but the request's stream differs");
    assert_int_equal(event_from_json(nos, strlen(nos), NULL, 0, NULL, &scratch, &ev, &e), -1);
    assert_string_equal(e.msg, "event: missing \"stream\"");
    /* a stream parameter is checked like any name */
    assert_int_equal(event_from_json(nos, strlen(nos), "a\xff", 2, NULL, &scratch, &ev, &e), -1);
    assert_string_equal(e.msg, "event: stream name is not valid UTF-8");
    buf_free(&scratch);
}

static void json_err(const char *line, const mp_limits *lim, const char *want) {
    buf scratch = BUF_INIT;
    buf_puts(&scratch, "prefix");
    tm_event ev;
    tm_err e;
    err_clear(&e);
    if (event_from_json(line, strlen(line), NULL, 0, lim, &scratch, &ev, &e) != -1)
        fail_msg("accepted: %s", line);
    assert_int_equal(e.code, TM_EINVAL);
    if (strcmp(e.msg, want) != 0 && !(want[0] == '~' && strstr(e.msg, want + 1)))
        fail_msg("%s: got '%s' want '%s'", line, e.msg, want);
    assert_int_equal(scratch.len, 6); /* nothing left behind */
    buf_free(&scratch);
}

#define ST "\"stream\":\"s\","
#define TY "\"type\":\"T\""

static void test_from_json_errors(void **st) {
    json_err("[]", NULL, "event must be a JSON object");
    json_err("1", NULL, "event must be a JSON object");
    json_err("\"x\"", NULL, "event must be a JSON object");
    json_err("null", NULL, "event must be a JSON object");
    json_err("", NULL, "invalid JSON at byte 0: parse error: premature EOF");
    json_err("{\"stream\":\"s\",", NULL, "~invalid JSON at byte 14");
    json_err("{" ST TY "} {}", NULL, "~trailing garbage");
    json_err("{" ST TY ",\"colour\":1}", NULL, "event: unknown key \"colour\"");
    json_err("{" ST TY ",\"a\\nb\":1}", NULL, "event: unknown key \"a?b\"");
    json_err("{" ST TY ",\"type\":\"U\"}", NULL, "event: duplicate key \"type\"");
    json_err("{" ST TY ",\"data\":1,\"data\":2}", NULL, "event: duplicate key \"data\"");
    json_err("{\"stream\":1," TY "}", NULL, "event: \"stream\" must be a string");
    json_err("{" ST "\"type\":null}", NULL, "event: \"type\" must be a string");
    json_err("{" ST "\"data\":{}}", NULL, "event: missing \"type\"");
    json_err("{" TY "}", NULL, "event: missing \"stream\"");
    json_err("{" ST TY ",\"metadata\":[]}", NULL, "event: \"metadata\" must be an object");
    json_err("{" ST TY ",\"metadata\":\"x\"}", NULL, "event: \"metadata\" must be an object");
    json_err("{" ST TY ",\"id\":\"nope\"}", NULL,
             "event: \"id\" must be a UUID string (8-4-4-4-12 hex digits)");
    json_err("{" ST TY ",\"id\":\"123e4567e89b12d3a456426614174000\"}", NULL,
             "~\"id\" must be a UUID");
    json_err("{" ST TY ",\"id\":12}", NULL, "~\"id\" must be a UUID");
    json_err("{" ST TY ",\"time\":-1}", NULL,
             "event: \"time\" must be a non-negative integer (milliseconds)");
    json_err("{" ST TY ",\"time\":1.5}", NULL, "~\"time\" must be");
    json_err("{" ST TY ",\"time\":1e3}", NULL, "~\"time\" must be");
    json_err("{" ST TY ",\"time\":\"2024\"}", NULL, "~\"time\" must be");
    json_err("{" ST TY ",\"time\":9223372036854775808}", NULL, "~\"time\" must be");
    json_err("{\"stream\":\"\"," TY "}", NULL, "event: stream name is empty");
    json_err("{\"stream\":\"a\\u0000\"," TY "}", NULL, "event: stream name contains a NUL byte");
    json_err("{" ST "\"type\":\"\"}", NULL, "event: event type is empty");
    /* limits apply to data and metadata themselves */
    mp_limits lim = {2, 3, 32};
    json_err("{" ST TY ",\"data\":[[[1]]]}", &lim, "~nesting deeper than");
    json_err("{" ST TY ",\"metadata\":{\"a\":{\"b\":{}}}}", &lim, "~nesting deeper than");
    json_err("{" ST TY ",\"data\":[1,2,3,4]}", &lim, "event data: msgpack: array of 4 items exceeds limit of 3 at byte 0");
    json_err("{" ST TY ",\"data\":\"0123456789012345678901234567890123456789\"}", &lim,
             "event data: msgpack: value exceeds size limit of 32 bytes");
    json_err("{" ST TY ",\"metadata\":{\"k\":\"0123456789012345678901234567890123456789\"}}",
             &lim, "event metadata: msgpack: value exceeds size limit of 32 bytes");
    /* ... and exactly at the limits they pass */
    buf scratch = BUF_INIT;
    tm_event ev;
    tm_err e;
    const char *ok = "{" ST TY ",\"data\":[[1,2,3]],\"metadata\":{\"a\":{\"b\":1}}}";
    if (event_from_json(ok, strlen(ok), NULL, 0, &lim, &scratch, &ev, &e) != 0)
        fail_msg("%s", e.msg);
    /* limits at their maximum do not overflow */
    mp_limits huge = {UINT32_MAX, UINT32_MAX, SIZE_MAX};
    if (event_from_json(ok, strlen(ok), NULL, 0, &huge, &scratch, &ev, &e) != 0)
        fail_msg("%s", e.msg);
    buf_free(&scratch);
}

/* ---- event_from_mp ---- */

static int buf_write(void *data, const char *p, size_t n) {
    buf_append(data, p, n);
    return 0;
}

static void test_from_mp(void **st) {
    buf b = BUF_INIT;
    msgpack_packer pk;
    msgpack_packer_init(&pk, &b, buf_write);
    static const uint8_t raw[16] = {1, 2, 3, 4, 5, 6, 0x47, 8, 0x89, 10, 11, 12, 13, 14, 15, 16};
    msgpack_pack_map(&pk, 6);
    msgpack_pack_str_with_body(&pk, "type", 4);
    msgpack_pack_str_with_body(&pk, "Paid", 4);
    msgpack_pack_str_with_body(&pk, "data", 4);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_str_with_body(&pk, "amount", 6);
    msgpack_pack_int64(&pk, 42);
    msgpack_pack_str_with_body(&pk, "id", 2);
    msgpack_pack_bin_with_body(&pk, raw, 16);
    msgpack_pack_str_with_body(&pk, "time", 4);
    msgpack_pack_uint64(&pk, 5);
    msgpack_pack_str_with_body(&pk, "metadata", 8);
    msgpack_pack_map(&pk, 0);
    msgpack_pack_str_with_body(&pk, "version", 7);
    msgpack_pack_int64(&pk, 3);
    tm_event ev;
    tm_err e;
    assert_int_equal(event_from_mp(b.ptr, b.len, "pay-1", 5, &ev, &e), 0);
    assert_memory_equal(ev.stream, "pay-1", 5);
    assert_memory_equal(ev.type, "Paid", 4);
    assert_true(ev.data > b.ptr && ev.data < b.ptr + b.len); /* points into the input */
    assert_int_equal(ev.data_len, 9);
    assert_int_equal(ev.has_id, 1);
    assert_memory_equal(ev.id, raw, 16);
    assert_true(ev.time_ms == 5);
    assert_int_equal(ev.meta_len, 1);
    assert_int_equal(ev.version, 0);
    /* a string id works too; stream required without a parameter */
    buf_reset(&b);
    msgpack_pack_map(&pk, 3);
    msgpack_pack_str_with_body(&pk, "stream", 6);
    msgpack_pack_str_with_body(&pk, "x", 1);
    msgpack_pack_str_with_body(&pk, "type", 4);
    msgpack_pack_str_with_body(&pk, "T", 1);
    msgpack_pack_str_with_body(&pk, "id", 2);
    msgpack_pack_str_with_body(&pk, "123e4567-e89b-12d3-a456-426614174000", 36);
    assert_int_equal(event_from_mp(b.ptr, b.len, NULL, 0, &ev, &e), 0);
    assert_int_equal(ev.id[0], 0x12);
    assert_int_equal((unsigned char)ev.data[0], 0xc0);
    /* every truncation is an error, never an over-read */
    for (size_t k = 0; k < b.len; k++) {
        char *c = malloc(k ? k : 1);
        memcpy(c, b.ptr, k);
        assert_int_equal(event_from_mp(c, k, NULL, 0, &ev, &e), -1);
        free(c);
    }
    /* trailing bytes */
    buf_putc(&b, (char)0xc0);
    assert_int_equal(event_from_mp(b.ptr, b.len, NULL, 0, &ev, &e), -1);
    assert_string_equal(e.msg, "event: trailing bytes after the map");
    /* wrong shapes */
    assert_int_equal(event_from_mp("\x90", 1, NULL, 0, &ev, &e), -1);
    assert_string_equal(e.msg, "event must be a map");
    assert_int_equal(event_from_mp("\x81\x01\x02", 3, NULL, 0, &ev, &e), -1);
    assert_string_equal(e.msg, "event keys must be strings");
    assert_int_equal(event_from_mp("\x81\xa2id\xc4\x03" "abc", 9, "s", 1, &ev, &e), -1);
    assert_string_equal(e.msg, "event: \"id\" must be a UUID string (8-4-4-4-12 hex digits) or 16 bytes");
    assert_int_equal(event_from_mp("\x81\xa4time\xff", 7, "s", 1, &ev, &e), -1);
    assert_int_equal(event_from_mp("\x81\xa4type\xc1", 7, "s", 1, &ev, &e), -1);
    assert_string_equal(e.msg, "event: malformed msgpack");
    buf_free(&b);
}

/* Data and metadata are held to the caller's limits exactly, whether the
 * check comes from the parse (small objects) or from mp_validate. */
static void test_from_json_limits(void **st) {
    for (unsigned lim_d = 1; lim_d <= 4; lim_d++)
        for (unsigned lim_i = 1; lim_i <= 10; lim_i += 3)
            for (size_t lim_s = 8; lim_s <= 400; lim_s = lim_s * 2 + 3)
                for (unsigned d = 0; d <= 5; d++)
                    for (unsigned n = 0; n <= 11; n += 2)
                        for (int in_meta = 0; in_meta < 2; in_meta++) {
                            mp_limits lim = {lim_d, lim_i, lim_s};
                            /* d nested arrays around an array of n strings */
                            buf v = BUF_INIT, line = BUF_INIT, mp = BUF_INIT, scratch = BUF_INIT;
                            buf_puts(&v, in_meta ? "{\"k\":" : "");
                            for (unsigned i = 0; i < d; i++) buf_putc(&v, '[');
                            buf_putc(&v, '[');
                            for (unsigned i = 0; i < n; i++) buf_puts(&v, i ? ",\"abcdefg\"" : "\"abcdefg\"");
                            buf_putc(&v, ']');
                            for (unsigned i = 0; i < d; i++) buf_putc(&v, ']');
                            buf_puts(&v, in_meta ? "}" : "");
                            buf_printf(&line, "{\"stream\":\"s\",\"type\":\"T\",\"%s\":%s}",
                                       in_meta ? "metadata" : "data", v.ptr);
                            tm_err e1, e2;
                            int want = json_to_mp(v.ptr, v.len, &lim, &mp, &e1);
                            tm_event ev;
                            int got = event_from_json(line.ptr, line.len, NULL, 0, &lim, &scratch,
                                                      &ev, &e2);
                            if (want != got)
                                fail_msg("limits %u/%u/%zu: %s: alone %d, in an event %d (%s)", lim_d,
                                         lim_i, lim_s, line.ptr, want, got, got ? e2.msg : "");
                            buf_free(&v);
                            buf_free(&line);
                            buf_free(&mp);
                            buf_free(&scratch);
                        }
}

/* ---- event_to_json ---- */

static void test_to_json(void **st) {
    buf data = BUF_INIT, meta = BUF_INIT, out = BUF_INIT;
    mp_of("{\"total\":12.5,\"n\":1,\"f\":1.0}", &data);
    tm_event ev = {0};
    event_id_parse("123e4567-e89b-12d3-a456-426614174000", 36, ev.id);
    ev.stream = "order-1";
    ev.stream_len = 7;
    ev.type = "OrderPlaced";
    ev.type_len = 11;
    ev.data = data.ptr;
    ev.data_len = data.len;
    ev.time_ms = 1700000000000LL;
    ev.position = 1;
    ev.version = 0;
    tm_err e;
    assert_int_equal(event_to_json(&ev, &out, &e), 0);
    assert_string_equal(out.ptr,
                        "{\"stream\":\"order-1\",\"type\":\"OrderPlaced\","
                        "\"data\":{\"total\":12.5,\"n\":1,\"f\":1.0},\"metadata\":{},"
                        "\"id\":\"123e4567-e89b-12d3-a456-426614174000\",\"time\":1700000000000,"
                        "\"position\":1,\"version\":0}");
    /* with metadata, escapes, large numbers; appended to what out holds */
    mp_of("{\"correlation_id\":\"c\\\"1\"}", &meta);
    ev.meta = meta.ptr;
    ev.meta_len = meta.len;
    ev.stream = "a\"b\n";
    ev.stream_len = 4;
    ev.position = UINT64_MAX;
    ev.version = 18;
    ev.time_ms = -5;
    ev.data_len = 0; /* no data: null */
    buf_reset(&out);
    buf_puts(&out, "> ");
    assert_int_equal(event_to_json(&ev, &out, &e), 0);
    assert_string_equal(out.ptr,
                        "> {\"stream\":\"a\\\"b\\n\",\"type\":\"OrderPlaced\",\"data\":null,"
                        "\"metadata\":{\"correlation_id\":\"c\\\"1\"},"
                        "\"id\":\"123e4567-e89b-12d3-a456-426614174000\",\"time\":-5,"
                        "\"position\":18446744073709551615,\"version\":18}");
    /* broken data: error, out unchanged */
    ev.data = "\x92\x01";
    ev.data_len = 2;
    buf_reset(&out);
    buf_puts(&out, "x");
    assert_int_equal(event_to_json(&ev, &out, &e), -1);
    assert_string_equal(out.ptr, "x");
    /* numbers at every digit-count boundary, ids of every byte value,
     * an explicit empty metadata map: against snprintf / event_id_format */
    static const uint64_t nums[] = {0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 1001, 9999, 10000,
                                    123456789, 1000000000000ull, 9999999999999999999ull,
                                    10000000000000000000ull, UINT64_MAX};
    ev.data = "\xc0";
    ev.data_len = 1;
    ev.meta = "\x80";
    ev.meta_len = 1;
    ev.stream = "s";
    ev.stream_len = 1;
    for (size_t i = 0; i < sizeof nums / sizeof *nums; i++) {
        for (int k = 0; k < 16; k++) ev.id[k] = (uint8_t)(i * 16 + (size_t)k * 17);
        ev.position = nums[i];
        ev.version = nums[(i + 3) % (sizeof nums / sizeof *nums)];
        ev.time_ms = i % 2 ? -(int64_t)(nums[i] >> 1) : (int64_t)(nums[i] >> 1);
        if (i == 0) ev.time_ms = INT64_MIN;
        char id[37], want[400];
        event_id_format(ev.id, id);
        snprintf(want, sizeof want,
                 "{\"stream\":\"s\",\"type\":\"OrderPlaced\",\"data\":null,\"metadata\":{},"
                 "\"id\":\"%s\",\"time\":%lld,\"position\":%llu,\"version\":%llu}",
                 id, (long long)ev.time_ms, (unsigned long long)ev.position,
                 (unsigned long long)ev.version);
        buf_reset(&out);
        assert_int_equal(event_to_json(&ev, &out, &e), 0);
        assert_string_equal(out.ptr, want);
    }
    buf_free(&data);
    buf_free(&meta);
    buf_free(&out);
}

/* export -> import gives the same event back (position/version aside) */
static void test_json_roundtrip(void **st) {
    const char *line =
        "{\"stream\":\"\xc3\xa9-1\",\"type\":\"T\\u00e9\",\"data\":{\"b\":[1,-2,3.5,null],\"a\":"
        "{\"$bin\":\"AA==\"}},\"metadata\":{\"x\":true},\"id\":\"00000000-0000-4000-8000-"
        "000000000001\",\"time\":12,\"position\":3,\"version\":2}";
    buf scratch = BUF_INIT, out = BUF_INIT;
    tm_event ev;
    tm_err e;
    assert_int_equal(event_from_json(line, strlen(line), NULL, 0, NULL, &scratch, &ev, &e), 0);
    ev.position = 3;
    ev.version = 2;
    assert_int_equal(event_to_json(&ev, &out, &e), 0);
    assert_string_equal(out.ptr,
                        "{\"stream\":\"\xc3\xa9-1\",\"type\":\"T\xc3\xa9\",\"data\":{\"b\":[1,-2,3.5,"
                        "null],\"a\":{\"$bin\":\"AA==\"}},\"metadata\":{\"x\":true},\"id\":"
                        "\"00000000-0000-4000-8000-000000000001\",\"time\":12,\"position\":3,"
                        "\"version\":2}");
    buf_free(&scratch);
    buf_free(&out);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_id_generate_unique),
        cmocka_unit_test(test_id_threads),
        cmocka_unit_test(test_id_fork),
        cmocka_unit_test(test_id_parse_format),
        cmocka_unit_test(test_category),
        cmocka_unit_test(test_check_names),
        cmocka_unit_test(test_from_json_full),
        cmocka_unit_test(test_from_json_minimal),
        cmocka_unit_test(test_from_json_stream_param),
        cmocka_unit_test(test_from_json_errors),
        cmocka_unit_test(test_from_mp),
        cmocka_unit_test(test_to_json),
        cmocka_unit_test(test_from_json_limits),
        cmocka_unit_test(test_json_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
