/* test_sse.c — the SSE hub against a real store and a fake sink: matching,
 * exact message bytes, named (multiplexed) messages, resume without gap or
 * duplicate while commits interleave, paused catch-up, slow consumers,
 * close_all, projection publishing.  Also the workq pool and the api
 * query-string helpers (transport-free pieces of the HTTP server). */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <ftw.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api.h"
#include "sse.h"
#include "store.h"
#include "workq.h"

/* ---- fake connection ---- */

typedef struct conn {
    buf out;          /* everything written */
    size_t unsent;    /* what the fake socket has not taken */
    int hold;         /* 1: never drain (a stalled client) */
    int ended;
} conn;

static void f_write(void *c_, const sse_piece *p, int n) {
    conn *c = c_;
    assert_false(c->ended);
    for (int i = 0; i < n; i++) {
        buf_append(&c->out, p[i].p, p[i].n);
        if (c->hold) c->unsent += p[i].n;
    }
}
static size_t f_pending(void *c_) { return ((conn *)c_)->unsent; }
static void f_end(void *c_) { ((conn *)c_)->ended = 1; }
static int scheduled;
static void f_schedule(void *ud) { (void)ud; scheduled++; }
static const sse_sink sink = {f_write, f_pending, f_end, f_schedule};

typedef struct fx {
    char dir[64];
    store *s;
    sse_hub *h;
} fx;

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *f) {
    (void)st, (void)flag, (void)f;
    return remove(p);
}

static int setup(void **state) {
    fx *f = calloc(1, sizeof *f);
    strcpy(f->dir, "/tmp/tm_sse_XXXXXX");
    if (!mkdtemp(f->dir)) return -1;
    tm_err err;
    store_opts o;
    store_opts_default(&o);
    o.durability = STORE_LOSE_ON_OS_CRASH;
    f->s = store_open(f->dir, &o, &err);
    if (!f->s) return -1;
    f->h = sse_hub_new(f->s, &sink, NULL, 1 << 20);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fx *f = *state;
    sse_hub_free(f->h);
    store_close(f->s);
    nftw(f->dir, rm_one, 8, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void append(fx *f, const char *stream, const char *type) {
    tm_event ev;
    memset(&ev, 0, sizeof ev);
    ev.stream = stream;
    ev.stream_len = strlen(stream);
    ev.type = type;
    ev.type_len = strlen(type);
    ev.data = "\x81\xa1k\x01";  /* {"k":1} */
    ev.data_len = 4;
    tm_err err;
    assert_int_equal(store_append(f->s, &ev, 1, NULL, 0, &err), 0);
}

static void commit(fx *f) {
    while (sse_hub_commit(f->h, store_last_position(f->s))) {
    }
}

/* The ids of the data messages in c->out, as "1,2,3"; event names too when named. */
static void ids(conn *c, char *out, size_t cap) {
    out[0] = '\0';
    const char *p = c->out.ptr ? c->out.ptr : "";
    size_t used = 0;
    const char *line;
    while ((line = strstr(p, "id: "))) {
        if (line != c->out.ptr && line[-1] != '\n') { p = line + 1; continue; }
        unsigned long long id = strtoull(line + 4, NULL, 10);
        used += (size_t)snprintf(out + used, cap - used, "%s%llu", used ? "," : "", id);
        const char *nl = strchr(line, '\n');
        if (nl && strncmp(nl + 1, "event: ", 7) == 0) {
            const char *e = nl + 8, *enl = strchr(e, '\n');
            used += (size_t)snprintf(out + used, cap - used, "=%.*s", (int)(enl - e), e);
        }
        p = line + 4;
    }
}

static sse_client *client(fx *f, conn *c, uint64_t after, int named, const char *spec,
                          const char *type) {
    sse_client *cl = sse_client_new(f->h, c, after, named);
    tm_err err;
    const char *s = spec;
    while (s && *s) {
        const char *comma = strchr(s, ',');
        size_t n = comma ? (size_t)(comma - s) : strlen(s);
        assert_int_equal(sse_client_subscribe(cl, s, n, type, type ? strlen(type) : 0, &err), 0);
        s = comma ? comma + 1 : NULL;
    }
    sse_client_start(cl);
    return cl;
}

static void test_live_matching_and_bytes(void **state) {
    fx *f = *state;
    conn all = {0}, ord = {0}, typ = {0}, str = {0};
    client(f, &all, sse_hub_position(f->h), 0, "all", NULL);
    client(f, &ord, sse_hub_position(f->h), 0, "category:order", NULL);
    client(f, &typ, sse_hub_position(f->h), 0, "all", "Paid");
    client(f, &str, sse_hub_position(f->h), 0, "stream:order-2", NULL);
    append(f, "order-1", "Placed");
    append(f, "user-1", "Paid");
    append(f, "order-2", "Paid");
    commit(f);
    char b[256];
    ids(&all, b, sizeof b);
    assert_string_equal(b, "1,2,3");
    ids(&ord, b, sizeof b);
    assert_string_equal(b, "1,3");
    ids(&typ, b, sizeof b);
    assert_string_equal(b, "2,3");
    ids(&str, b, sizeof b);
    assert_string_equal(b, "3");
    /* The exact message format. */
    const char *m = strstr(str.out.ptr, "id: 3\n");
    assert_non_null(m);
    assert_memory_equal(m, "id: 3\ndata: {\"stream\":\"order-2\",\"type\":\"Paid\",\"data\":{\"k\":1}", 59);
    assert_non_null(strstr(m, "\"position\":3,\"version\":0}\n\n"));
    assert_int_equal(sse_hub_nclients(f->h), 4);
    sse_hub_close_all(f->h, "test over");  /* before the conns leave scope */
    buf_free(&all.out); buf_free(&ord.out); buf_free(&typ.out); buf_free(&str.out);
}

static void test_named_multiplex(void **state) {
    fx *f = *state;
    conn c = {0};
    client(f, &c, sse_hub_position(f->h), 1, "stream:order-1,type:Paid,projection:rev", NULL);
    append(f, "order-1", "Placed");
    append(f, "order-1", "Paid");
    append(f, "user-1", "Paid");
    commit(f);
    sse_hub_publish(f->h, "projection:rev", 14, "{\"total\":5}", 11);
    sse_hub_publish(f->h, "projection:other", 16, "{}", 2);
    char b[256];
    ids(&c, b, sizeof b);
    assert_string_equal(b, "1=stream:order-1,2=stream:order-1,2=type:Paid,3=type:Paid");
    assert_non_null(strstr(c.out.ptr, "event: projection:rev\ndata: {\"total\":5}\n\n"));
    assert_null(strstr(c.out.ptr, "projection:other"));
    sse_hub_close_all(f->h, "test over");  /* before the conns leave scope */
    buf_free(&c.out);
}

static void test_resume_no_gap_no_duplicate(void **state) {
    fx *f = *state;
    for (int i = 0; i < 5000; i++) append(f, i % 2 ? "order-1" : "user-1", "E");
    commit(f);
    /* A client resuming after 100, while more events are appended but the
     * hub has not been told yet (commits pending). */
    for (int i = 0; i < 10; i++) append(f, "order-2", "E");
    conn c = {0}, s = {0};
    client(f, &c, 100, 0, "all", NULL);
    client(f, &s, 0, 0, "stream:order-1", NULL);
    for (int round = 0; round < 50 && scheduled; round++) {
        scheduled = 0;
        sse_hub_run(f->h);
    }
    append(f, "order-1", "Late");
    commit(f);
    char *b = malloc(100000);
    ids(&c, b, 100000);
    buf expect = BUF_INIT;
    for (int p = 101; p <= 5011; p++) buf_printf(&expect, "%s%d", p > 101 ? "," : "", p);
    assert_string_equal(b, expect.ptr);
    ids(&s, b, 100000);
    buf_reset(&expect);
    for (int p = 2; p <= 5000; p += 2) buf_printf(&expect, "%s%d", p > 2 ? "," : "", p);
    buf_puts(&expect, ",5011");
    assert_string_equal(b, expect.ptr);
    sse_hub_close_all(f->h, "test over");  /* before the conns leave scope */
    free(b);
    buf_free(&expect);
    buf_free(&c.out);
    buf_free(&s.out);
}

static void test_catchup_pauses_and_resumes(void **state) {
    fx *f = *state;
    for (int i = 0; i < 8000; i++) append(f, "order-1", "E");
    commit(f);
    conn c = {0};
    c.hold = 1;   /* nothing drains: catch-up must stop at half the buffer */
    scheduled = 0;
    sse_client *cl = client(f, &c, 0, 0, "all", NULL);
    for (int round = 0; round < 50 && scheduled; round++) {
        scheduled = 0;
        sse_hub_run(f->h);
    }
    assert_true(c.unsent > (1u << 19) && c.unsent < (1u << 19) + 1000);
    assert_false(c.ended);
    size_t before = c.out.len;
    scheduled = 0;
    sse_hub_run(f->h);
    assert_int_equal(c.out.len, before);       /* paused */
    c.unsent = 0;                              /* the socket took it all */
    sse_client_drained(cl);
    assert_true(scheduled > 0);
    c.hold = 0;
    for (int round = 0; round < 50 && scheduled; round++) {
        scheduled = 0;
        sse_hub_run(f->h);
    }
    char *b = malloc(100000);
    ids(&c, b, 100000);
    buf expect = BUF_INIT;
    for (int p = 1; p <= 8000; p++) buf_printf(&expect, "%s%d", p > 1 ? "," : "", p);
    assert_string_equal(b, expect.ptr);
    sse_hub_close_all(f->h, "test over");  /* before the conns leave scope */
    free(b);
    buf_free(&expect);
    buf_free(&c.out);
}

static void test_slow_consumer_closed(void **state) {
    fx *f = *state;
    conn slow = {0}, ok = {0};
    slow.hold = 1;
    client(f, &slow, sse_hub_position(f->h), 0, "all", NULL);
    client(f, &ok, sse_hub_position(f->h), 0, "all", NULL);
    for (int i = 0; i < 12000; i++) append(f, "order-1", "E");   /* ~1.8 MB of messages */
    commit(f);
    assert_true(slow.ended);
    assert_non_null(strstr(slow.out.ptr, "event: close\ndata: {\"reason\":\"slow consumer"));
    assert_true(slow.out.len < (1u << 20) + 4096);   /* bounded */
    assert_false(ok.ended);
    assert_int_equal(sse_hub_nclients(f->h), 1);
    append(f, "order-1", "After");
    commit(f);   /* the ended client is not touched again (f_write asserts) */
    sse_hub_close_all(f->h, "test over");  /* before the conns leave scope */
    buf_free(&slow.out);
    buf_free(&ok.out);
}

static void test_close_all_and_gone(void **state) {
    fx *f = *state;
    conn a = {0}, b = {0};
    client(f, &a, 0, 0, "all", NULL);
    sse_client *cb = client(f, &b, 0, 0, "all", NULL);
    sse_client_gone(cb);
    assert_int_equal(sse_hub_nclients(f->h), 1);
    sse_hub_close_all(f->h, "server shutting down");
    assert_true(a.ended);
    assert_false(b.ended);
    assert_non_null(strstr(a.out.ptr, "event: close\ndata: {\"reason\":\"server shutting down\""));
    assert_int_equal(sse_hub_nclients(f->h), 0);
    buf_free(&a.out);
    buf_free(&b.out);
}

static void test_bad_specs(void **state) {
    fx *f = *state;
    conn c = {0};
    sse_client *cl = sse_client_new(f->h, &c, 0, 1);
    tm_err err;
    assert_int_equal(sse_client_subscribe(cl, "bogus", 5, NULL, 0, &err), -1);
    assert_int_equal(err.code, TM_EINVAL);
    assert_int_equal(sse_client_subscribe(cl, "stream:", 7, NULL, 0, &err), -1);
    assert_int_equal(sse_client_subscribe(cl, "stream:a\nb", 10, NULL, 0, &err), -1);
    assert_int_equal(sse_client_subscribe(cl, "all", 3, NULL, 0, &err), 0);
    sse_client_gone(cl);
    assert_int_equal(sse_hub_nclients(f->h), 0);
}

/* ---- workq ---- */

typedef struct tjob {
    workq_job job;
    int ran;
    int *done_count;
} tjob;
static _Atomic int notified;
static void tj_run(workq_job *j) { ((tjob *)j)->ran = 1; }
static void tj_done(workq_job *j) { (*((tjob *)j)->done_count)++; }
static void tj_notify(void *ud) { (void)ud; atomic_fetch_add(&notified, 1); }

static void test_workq(void **state) {
    (void)state;
    workq *q = workq_new(4, tj_notify, NULL);
    assert_non_null(q);
    int done = 0;
    tjob jobs[100];
    for (int i = 0; i < 100; i++) {
        jobs[i] = (tjob){{NULL, tj_run, tj_done}, 0, &done};
        workq_submit(q, &jobs[i].job);
    }
    for (int t = 0; t < 2000 && done < 100; t++) {
        workq_complete(q);
        if (done < 100) usleep(1000);
    }
    assert_int_equal(done, 100);
    assert_int_equal(workq_inflight(q), 0);
    assert_true(atomic_load(&notified) >= 1);
    for (int i = 0; i < 100; i++) assert_int_equal(jobs[i].ran, 1);
    /* workq_free finishes what is queued. */
    for (int i = 0; i < 10; i++) {
        jobs[i] = (tjob){{NULL, tj_run, tj_done}, 0, &done};
        workq_submit(q, &jobs[i].job);
    }
    workq_free(q);
    assert_int_equal(done, 110);
}

/* ---- query strings ---- */

static void test_query_helpers(void **state) {
    (void)state;
    buf v = BUF_INIT, k = BUF_INIT;
    const char *q = "sub=stream%3Aorder-1&sub=all&limit=10&x&name=a+b%21";
    assert_int_equal(api_query_get(q, "limit", &v), 1);
    assert_string_equal(v.ptr, "10");
    assert_int_equal(api_query_get(q, "name", &v), 1);
    assert_string_equal(v.ptr, "a b!");
    assert_int_equal(api_query_get(q, "x", &v), 1);
    assert_int_equal(v.len, 0);
    assert_int_equal(api_query_get(q, "nope", &v), 0);
    assert_int_equal(api_query_get(NULL, "nope", &v), 0);
    size_t pos = 0;
    int subs = 0;
    while (api_query_next(q, &pos, &k, &v))
        if (strcmp(k.ptr, "sub") == 0) subs++;
    assert_int_equal(subs, 2);
    assert_int_equal(api_url_decode(&v, "caf%C3%A9-1", 11, 0), 0);
    assert_string_equal(v.ptr, "caf\xc3\xa9-1");
    assert_int_equal(api_url_decode(&v, "bad%2", 5, 0), -1);
    assert_int_equal(api_url_decode(&v, "bad%zz", 6, 0), -1);
    assert_int_equal(api_url_decode(&v, "a+b", 3, 0), 0);
    assert_string_equal(v.ptr, "a+b");
    buf_reset(&v);
    api_url_encode(&v, "caf\xc3\xa9 1/x", 9);
    assert_string_equal(v.ptr, "caf%C3%A9%201%2Fx");
    buf_free(&v);
    buf_free(&k);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_live_matching_and_bytes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_named_multiplex, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resume_no_gap_no_duplicate, setup, teardown),
        cmocka_unit_test_setup_teardown(test_catchup_pauses_and_resumes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_slow_consumer_closed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_all_and_gone, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_specs, setup, teardown),
        cmocka_unit_test(test_workq),
        cmocka_unit_test(test_query_helpers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
