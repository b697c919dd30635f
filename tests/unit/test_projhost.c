/* test_projhost.c — projections in a worker process: results, checkpoints
 * committed by the host, resume, faults, and a runaway worker that dies
 * without taking the host down.  Workers are forked (no exec). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <msgpack/pack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mp.h"
#include "projhost.h"

static char dir[64];

static int wr(void *d, const char *p, size_t n) {
    buf_append(d, p, n);
    return 0;
}

/* n events in order-<i/2>, customer c<i%3>, amount 2 */
static store *filled(int n) {
    snprintf(dir, sizeof dir, "/tmp/tm-ph-XXXXXX");
    assert_non_null(mkdtemp(dir));
    tm_err err;
    store *s = store_open(dir, NULL, &err);
    assert_non_null(s);
    for (int i = 0; i < n; i++) {
        buf d = BUF_INIT;
        msgpack_packer pk;
        msgpack_packer_init(&pk, &d, wr);
        msgpack_pack_map(&pk, 2);
        msgpack_pack_str(&pk, 8);
        msgpack_pack_str_body(&pk, "customer", 8);
        char c[8];
        snprintf(c, sizeof c, "c%d", i % 3);
        msgpack_pack_str(&pk, strlen(c));
        msgpack_pack_str_body(&pk, c, strlen(c));
        msgpack_pack_str(&pk, 6);
        msgpack_pack_str_body(&pk, "amount", 6);
        msgpack_pack_int(&pk, 2);
        char stream[32];
        snprintf(stream, sizeof stream, "order-%d", i / 2);
        tm_event ev = {0};
        ev.stream = stream;
        ev.stream_len = strlen(stream);
        ev.type = i % 2 ? "PaymentReceived" : "OrderPlaced";
        ev.type_len = strlen(ev.type);
        ev.data = d.ptr;
        ev.data_len = d.len;
        if (store_append(s, &ev, 1, NULL, 0, &err) < 0) fail_msg("append: %s", err.msg);
        buf_free(&d);
    }
    return s;
}

static void cleanup(store *s) {
    store_close(s);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

static const char *EXAMPLE =
    "return { from = { category = 'order' },\n"
    "  partition = function(e) return e.data.customer end,\n"
    "  init = function() return { orders = 0, revenue = 0 } end,\n"
    "  on = { OrderPlaced = function(s, e) s.orders = s.orders + 1 end,\n"
    "         PaymentReceived = function(s, e) s.revenue = s.revenue + e.data.amount end },\n"
    "  queries = { n = function(m) local k = 0 for _ in pairs(m) do k = k + 1 end return k end } }\n";

static uint64_t field(const buf *m, const char *part, const char *f) {
    const char *v;
    size_t vl;
    assert_int_equal(mp_map_find(m->ptr, m->len, part, strlen(part), &v, &vl), 1);
    assert_int_equal(mp_map_find(v, vl, f, strlen(f), &v, &vl), 1);
    mp_item it;
    assert_int_equal(mp_next(&v, v + vl, &it), 0);
    return it.v.u;
}

static void test_run_checkpoint_resume(void **st) {
    (void)st;
    tm_err err;
    store *s = filled(60);
    projhost_opts o = {.cpu_limit = 5, .batch = 16};
    projhost *h = projhost_start(s, "ex", EXAMPLE, strlen(EXAMPLE), "ex.lua", &o, &err);
    if (!h) fail_msg("%s", err.msg);
    if (projhost_catch_up(h, &err) != 0) fail_msg("%s", err.msg);
    assert_int_equal(projhost_get_status(h)->position, 60);
    buf m = BUF_INIT;
    assert_int_equal(projhost_state_mp(h, &m, &err), 0);
    assert_int_equal(field(&m, "c0", "orders"), 10);
    assert_int_equal(field(&m, "c1", "revenue"), 20);
    buf q = BUF_INIT;
    assert_int_equal(projhost_query(h, "n", NULL, 0, &q, &err), 0);
    assert_int_equal((unsigned char)q.ptr[0], 3);
    projhost_free(h);

    /* more events; a new worker resumes from the committed checkpoint */
    store_close(s);
    s = store_open(dir, NULL, &err);
    h = projhost_start(s, "ex", EXAMPLE, strlen(EXAMPLE), "ex.lua", &o, &err);
    if (!h) fail_msg("%s", err.msg);
    assert_int_equal(projhost_get_status(h)->position, 60);
    assert_int_equal(projhost_catch_up(h, &err), 0);
    buf m2 = BUF_INIT;
    assert_int_equal(projhost_state_mp(h, &m2, &err), 0);
    assert_int_equal(m.len, m2.len);
    assert_memory_equal(m.ptr, m2.ptr, m.len);
    projhost_free(h);
    buf_free(&m);
    buf_free(&m2);
    buf_free(&q);
    cleanup(s);
}

/* projhost_feed applies without committing (bounded by max_events); the
 * live partition read sees it, the store does not until a checkpoint; a
 * worker that goes away between checkpoints resumes from the last one. */
/* Background checkpoints: feeding goes on while one is in flight, the keys
 * touched after it stay dirty for the next one, and a new worker resumes
 * from the last one that landed. */
static void test_background_checkpoint(void **st) {
    (void)st;
    tm_err err;
    store *s = filled(60);
    projhost_opts o = {.cpu_limit = 5, .batch = 16};
    projhost *h = projhost_start(s, "ex", EXAMPLE, strlen(EXAMPLE), "ex.lua", &o, &err);
    if (!h) fail_msg("%s", err.msg);
    assert_int_equal(projhost_feed(h, 30, &err), PROJHOST_MORE);
    assert_int_equal(projhost_get_status(h)->position, 30);
    assert_int_equal(projhost_checkpoint_async(h, &err), 0);
    assert_int_equal(projhost_uncommitted(h), 0);
    /* every partition is touched again while the commit may be in flight */
    assert_int_equal(projhost_feed(h, 15, &err), PROJHOST_MORE);
    assert_int_equal(projhost_uncommitted(h), 15);
    projhost_wait_commit(h);
    assert_int_equal(projhost_get_status(h)->checkpoint_position, 30);
    assert_int_equal(projhost_checkpoint_async(h, &err), 0); /* at 45 */
    assert_int_equal(projhost_feed(h, 0, &err), 0);          /* to 60, not committed */
    buf m = BUF_INIT;
    assert_int_equal(projhost_state_mp(h, &m, &err), 0);
    assert_int_equal(field(&m, "c0", "orders"), 10);
    projhost_free(h); /* waits for the checkpoint at 45 */

    /* a new worker: from the checkpoint at 45, with 45 events' states */
    h = projhost_start(s, "ex", EXAMPLE, strlen(EXAMPLE), "ex.lua", &o, &err);
    if (!h) fail_msg("%s", err.msg);
    assert_int_equal(projhost_get_status(h)->position, 45);
    buf m45 = BUF_INIT;
    assert_int_equal(projhost_state_mp(h, &m45, &err), 0);
    /* events 0..44: OrderPlaced at even i, customer c(i%3): c0 at i = 0,6,..,42 */
    assert_int_equal(field(&m45, "c0", "orders"), 8);
    /* PaymentReceived (amount 2) at odd i; c1 at i = 1,7,..,43 */
    assert_int_equal(field(&m45, "c1", "revenue"), 16);
    assert_int_equal(projhost_catch_up(h, &err), 0);
    buf m60 = BUF_INIT;
    assert_int_equal(projhost_state_mp(h, &m60, &err), 0);
    assert_int_equal(m60.len, m.len);
    assert_memory_equal(m60.ptr, m.ptr, m.len);
    projhost_free(h);
    buf_free(&m);
    buf_free(&m45);
    buf_free(&m60);
    cleanup(s);
}

static void test_feed_without_checkpoint(void **st) {
    (void)st;
    tm_err err;
    store *s = filled(60);
    projhost_opts o = {.cpu_limit = 5, .batch = 16};
    char *src = malloc(strlen(EXAMPLE) + 64);
    sprintf(src, "return { checkpoint_ms = 250, checkpoint_every = 1000000,%s",
            EXAMPLE + strlen("return {"));
    projhost *h = projhost_start(s, "ex", src, strlen(src), "ex.lua", &o, &err);
    if (!h) fail_msg("%s", err.msg);
    const projhost_status *hs = projhost_get_status(h);
    assert_int_equal(hs->checkpoint_ms, 250);
    assert_int_equal(hs->checkpoint_every, 1000000);
    assert_int_equal(projhost_feed(h, 20, &err), PROJHOST_MORE);
    assert_int_equal(hs->position, 20);
    assert_int_equal(projhost_uncommitted(h), 20);
    assert_int_equal(projhost_feed(h, 0, &err), 0);
    assert_int_equal(hs->position, 60);
    assert_int_equal(hs->checkpoint_position, 0);
    assert_int_equal(projhost_uncommitted(h), 60);
    buf v = BUF_INIT;
    assert_int_equal(projhost_partition(h, "c0", 2, &v, &err), 1);
    const char *f;
    size_t fl;
    mp_item it;
    assert_int_equal(mp_map_find(v.ptr, v.len, "orders", 6, &f, &fl), 1);
    assert_int_equal(mp_next(&f, f + fl, &it), 0);
    assert_int_equal(it.v.u, 10);
    buf_reset(&v);
    assert_int_equal(projhost_partition(h, "nope", 4, &v, &err), 0); /* never created */
    assert_int_equal(v.len, 0);
    buf q = BUF_INIT;
    assert_int_equal(projhost_query(h, "n", NULL, 0, &q, &err), 0);
    assert_int_equal((unsigned char)q.ptr[0], 3);
    char *sv = NULL;
    size_t svl;
    assert_int_equal(store_kv_get(s, "proj/ex/s/c0", 12, &sv, &svl, &err), 0); /* not stored */
    projhost_free(h); /* "crash" between checkpoints */

    h = projhost_start(s, "ex", src, strlen(src), "ex.lua", &o, &err);
    if (!h) fail_msg("%s", err.msg);
    hs = projhost_get_status(h);
    assert_int_equal(hs->position, 0);
    assert_int_equal(projhost_feed(h, 30, &err), PROJHOST_MORE);
    assert_int_equal(projhost_checkpoint(h, &err), 0);
    assert_int_equal(hs->checkpoint_position, 30);
    assert_int_equal(projhost_uncommitted(h), 0);
    assert_int_equal(store_kv_get(s, "proj/ex/s/c0", 12, &sv, &svl, &err), 1);
    free(sv);
    projhost_free(h);
    h = projhost_start(s, "ex", src, strlen(src), "ex.lua", &o, &err);
    if (!h) fail_msg("%s", err.msg);
    assert_int_equal(projhost_get_status(h)->position, 30); /* from the checkpoint */
    assert_int_equal(projhost_catch_up(h, &err), 0);
    assert_int_equal(projhost_get_status(h)->checkpoint_position, 60);
    buf_reset(&q);
    buf_reset(&v);
    assert_int_equal(projhost_partition(h, "c1", 2, &v, &err), 1);
    assert_int_equal(mp_map_find(v.ptr, v.len, "revenue", 7, &f, &fl), 1);
    assert_int_equal(mp_next(&f, f + fl, &it), 0);
    assert_int_equal(it.v.u, 20);
    projhost_free(h);
    buf_free(&v);
    buf_free(&q);
    free(src);
    cleanup(s);
}

static void test_fault_reported(void **st) {
    (void)st;
    tm_err err;
    store *s = filled(10);
    const char *src = "return { on = { PaymentReceived = function(s, e)\n"
                      "  if e.position == 6 then error('nope') end end } }\n";
    projhost_opts o = {.cpu_limit = 5};
    projhost *h = projhost_start(s, "bad", src, strlen(src), "bad.lua", &o, &err);
    assert_non_null(h);
    assert_int_equal(projhost_catch_up(h, &err), -1);
    const projhost_status *ps = projhost_get_status(h);
    assert_int_equal(ps->state, PROJHOST_FAULTED);
    assert_int_equal(ps->fault_position, 6);
    assert_string_equal(ps->fault_type, "PaymentReceived");
    assert_non_null(strstr(ps->message, "bad.lua:2: nope"));
    assert_non_null(ps->traceback);
    projhost_free(h);
    cleanup(s);
}

/* A JIT-compiled endless loop: the worker's watchdog ends the worker; the
 * host (this process) carries on and reports it. */
static void test_runaway_worker_dies_host_lives(void **st) {
    (void)st;
    tm_err err;
    store *s = filled(10);
    const char *src = "return { on = { OrderPlaced = function(s, e)\n"
                      "  local n = 0 while true do n = n + 1 end end } }\n";
    projhost_opts o = {.cpu_limit = 0.3};
    projhost *h = projhost_start(s, "spin", src, strlen(src), "spin.lua", &o, &err);
    assert_non_null(h);
    assert_int_equal(projhost_catch_up(h, &err), -1);
    const projhost_status *ps = projhost_get_status(h);
    assert_true(ps->state == PROJHOST_FAULTED || ps->state == PROJHOST_DEAD);
    assert_non_null(strstr(ps->message, "CPU limit"));
    /* the host still works: another projection runs fine */
    projhost *g = projhost_start(s, "ex", EXAMPLE, strlen(EXAMPLE), "ex.lua", &o, &err);
    assert_non_null(g);
    assert_int_equal(projhost_catch_up(g, &err), 0);
    projhost_free(g);
    projhost_free(h);
    cleanup(s);
}

static void test_syntax_error(void **st) {
    (void)st;
    tm_err err;
    store *s = filled(1);
    projhost *h = projhost_start(s, "x", "return {", 8, "x.lua", NULL, &err);
    assert_null(h);
    assert_non_null(strstr(err.msg, "x.lua:"));
    cleanup(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_run_checkpoint_resume),
        cmocka_unit_test(test_feed_without_checkpoint),
        cmocka_unit_test(test_background_checkpoint),
        cmocka_unit_test(test_fault_reported),
        cmocka_unit_test(test_runaway_worker_dies_host_lives),
        cmocka_unit_test(test_syntax_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
