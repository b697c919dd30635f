/* test_proj.c — projection instances: handlers, partitions, emits,
 * checkpoints through a real store, faults, dead letters, determinism. */
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
#include "proj.h"
#include "store.h"

static int wr(void *d, const char *p, size_t n) {
    buf_append(d, p, n);
    return 0;
}

/* An event with data {customer=C, amount=A}. */
typedef struct tev {
    tm_event ev;
    buf data;
    char stream[64];
    char type[64];
} tev;

static void mk(tev *t, uint64_t pos, const char *stream, const char *type, const char *cust,
               double amount) {
    memset(t, 0, sizeof *t);
    snprintf(t->stream, sizeof t->stream, "%s", stream);
    snprintf(t->type, sizeof t->type, "%s", type);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &t->data, wr);
    msgpack_pack_map(&pk, 2);
    msgpack_pack_str(&pk, 8);
    msgpack_pack_str_body(&pk, "customer", 8);
    msgpack_pack_str(&pk, strlen(cust));
    msgpack_pack_str_body(&pk, cust, strlen(cust));
    msgpack_pack_str(&pk, 6);
    msgpack_pack_str_body(&pk, "amount", 6);
    msgpack_pack_double(&pk, amount);
    t->ev.stream = t->stream;
    t->ev.stream_len = strlen(t->stream);
    t->ev.type = t->type;
    t->ev.type_len = strlen(t->type);
    t->ev.data = t->data.ptr;
    t->ev.data_len = t->data.len;
    t->ev.position = pos;
    t->ev.version = pos - 1;
    t->ev.time_ms = 1700000000000 + (int64_t)pos;
    for (int i = 0; i < 16; i++) t->ev.id[i] = (uint8_t)(pos * 7 + (uint64_t)i);
}

static proj *load(const char *src, store *st, tm_err *err) {
    proj_opts o = {.st = st, .batch = 4};
    return proj_new("t", src, strlen(src), "t.lua", &o, err);
}

static const char *EXAMPLE =
    "return {\n"
    "  from = { category = 'order' },\n"
    "  partition = function(e) return e.data.customer end,\n"
    "  init = function() return { orders = 0, revenue = 0 } end,\n"
    "  on = {\n"
    "    OrderPlaced = function(s, e) s.orders = s.orders + 1 end,\n"
    "    PaymentReceived = function(s, e) s.revenue = s.revenue + e.data.amount end,\n"
    "  },\n"
    "  queries = { big = function(states, args) local r = {} for k, s in pairs(states) do\n"
    "     if s.revenue >= args.min then r[#r + 1] = k end end table.sort(r) return r end },\n"
    "}\n";

/* Feed n synthetic events: customer c<i%3>, alternate types. */
static void feed_example(proj *p, uint64_t from, uint64_t n) {
    tm_err err;
    for (uint64_t i = from; i < from + n; i++) {
        tev t;
        char cust[16];
        snprintf(cust, sizeof cust, "c%llu", (unsigned long long)(i % 3));
        mk(&t, i, i % 5 == 4 ? "shipment-1" : "order-1", i % 2 ? "OrderPlaced" : "PaymentReceived",
           cust, 2.5);
        int rc = proj_feed(p, &t.ev, &err);
        buf_free(&t.data);
        if (rc != 0) fail_msg("feed %llu: %s", (unsigned long long)i, err.msg);
    }
    if (proj_flush(p, &err) != 0) fail_msg("flush: %s", err.msg);
}

/* Expected state of the example for events 1..n, built independently. */
static void expected_example(uint64_t n, buf *out) {
    double orders[3] = {0}, rev[3] = {0};
    int seen[3] = {0};
    for (uint64_t i = 1; i <= n; i++) {
        if (i % 5 == 4) continue; /* not in category order */
        int c = (int)(i % 3);
        seen[c] = 1;
        if (i % 2) orders[c] += 1;
        else rev[c] += 2.5;
    }
    msgpack_packer pk;
    msgpack_packer_init(&pk, out, wr);
    int cnt = seen[0] + seen[1] + seen[2];
    msgpack_pack_map(&pk, (size_t)cnt);
    for (int c = 0; c < 3; c++) {
        if (!seen[c]) continue;
        char k[16];
        snprintf(k, sizeof k, "c%d", c);
        msgpack_pack_str(&pk, 2);
        msgpack_pack_str_body(&pk, k, 2);
        msgpack_pack_map(&pk, 2);
        msgpack_pack_str(&pk, 6);
        msgpack_pack_str_body(&pk, "orders", 6);
        msgpack_pack_int64(&pk, (int64_t)orders[c]);
        msgpack_pack_str(&pk, 7);
        msgpack_pack_str_body(&pk, "revenue", 7);
        if (rev[c] == (double)(int64_t)rev[c]) msgpack_pack_int64(&pk, (int64_t)rev[c]);
        else msgpack_pack_double(&pk, rev[c]);
    }
}

static void assert_state(proj *p, uint64_t n) {
    buf got = BUF_INIT, want = BUF_INIT;
    tm_err err;
    if (proj_state(p, &got, &err) != 0) fail_msg("state: %s", err.msg);
    expected_example(n, &want);
    assert_int_equal(got.len, want.len);
    assert_memory_equal(got.ptr, want.ptr, want.len);
    buf_free(&got);
    buf_free(&want);
}

static void test_handlers_and_partitions(void **st) {
    (void)st;
    tm_err err;
    proj *p = load(EXAMPLE, NULL, &err);
    if (!p) fail_msg("%s", err.msg);
    assert_true(proj_partitioned(p));
    assert_int_equal(proj_from(p), PROJ_FROM_CATEGORY);
    feed_example(p, 1, 23);
    assert_int_equal(proj_position(p), 23);
    assert_state(p, 23);
    /* named query with msgpack args {min = 10} */
    buf args = BUF_INIT, out = BUF_INIT;
    msgpack_packer pk;
    msgpack_packer_init(&pk, &args, wr);
    msgpack_pack_map(&pk, 1);
    msgpack_pack_str(&pk, 3);
    msgpack_pack_str_body(&pk, "min", 3);
    msgpack_pack_int(&pk, 1);
    assert_int_equal(proj_query(p, "big", args.ptr, args.len, &out, &err), 0);
    assert_true(out.len > 0 && ((unsigned char)out.ptr[0] & 0xf0) == 0x90);
    /* unknown query is an error */
    buf_reset(&out);
    assert_int_equal(proj_query(p, "nope", NULL, 0, &out, &err), -1);
    /* top by revenue */
    buf_reset(&out);
    assert_int_equal(proj_top(p, "revenue", 2, &out, &err), 0);
    assert_int_equal((unsigned char)out.ptr[0], 0x92);
    buf_free(&args);
    buf_free(&out);
    proj_free(p);
}

static void test_any_handler_and_event_fields(void **st) {
    (void)st;
    tm_err err;
    const char *src =
        "return { from = 'all', init = function() return { n = 0, types = {} } end,\n"
        "  on = { ['$any'] = function(s, e)\n"
        "    s.n = s.n + 1; s.types[e.type] = (s.types[e.type] or 0) + 1\n"
        "    assert(e.category == 'order' or e.category == 'shipment')\n"
        "    assert(#e.id == 36 and e.id:sub(9, 9) == '-')\n"
        "    assert(type(e.metadata) == 'table' and e.version == e.position - 1)\n"
        "    assert(e.time == 1700000000000 + e.position)\n"
        "    s.last_id = e.id\n"
        "  end } }\n";
    proj *p = load(src, NULL, &err);
    if (!p) fail_msg("%s", err.msg);
    feed_example(p, 1, 10);
    buf out = BUF_INIT;
    assert_int_equal(proj_state(p, &out, &err), 0);
    const char *v;
    size_t vl;
    assert_int_equal(mp_map_find(out.ptr, out.len, "n", 1, &v, &vl), 1);
    assert_int_equal((unsigned char)v[0], 10);
    buf_free(&out);
    proj_free(p);
}

static void test_bad_definitions(void **st) {
    (void)st;
    tm_err err;
    assert_null(load("return 42", NULL, &err));
    assert_null(load("return { on = 3 }", NULL, &err));
    assert_null(load("return { from = { nope = 1 }, on = {} }", NULL, &err));
    assert_null(load("return {\n on = {\n", NULL, &err));
    assert_non_null(strstr(err.msg, "t.lua:"));
    assert_null(load("return { on = {}, on_error = 'explode' }", NULL, &err));
}

static const char *EMITTER =
    "return { from = 'all', on = { OrderPlaced = function(s, e)\n"
    "  tm.emit('audit-' .. e.data.customer, 'Seen', { pos = e.position })\n"
    "  tm.link('linked', e) end } }\n";

static void test_emit_ids_deterministic(void **st) {
    (void)st;
    tm_err err;
    uint8_t ids[2][8][16];
    for (int run = 0; run < 2; run++) {
        proj *p = load(EMITTER, NULL, &err);
        if (!p) fail_msg("%s", err.msg);
        feed_example(p, 1, 8);
        tm_event *em;
        size_t n;
        assert_int_equal(proj_checkpoint(p, NULL, &em, &n, &err), 0);
        assert_int_equal(n, 8); /* 4 OrderPlaced x (emit + link) */
        for (size_t i = 0; i < n; i++) memcpy(ids[run][i], em[i].id, 16);
        assert_memory_equal(em[1].type, "$>", 2);
        proj_checkpoint_done(p);
        proj_free(p);
    }
    assert_memory_equal(ids[0], ids[1], sizeof ids[0]);
    /* distinct within a run, version 8 */
    assert_memory_not_equal(ids[0][0], ids[0][1], 16);
    assert_int_equal(ids[0][0][6] >> 4, 8);
    uint8_t a[16], b[16];
    proj_emit_id("x", 5, 0, a);
    proj_emit_id("x", 5, 1, b);
    assert_memory_not_equal(a, b, 16);
}

static char tmpdir[64];

static store *open_tmp(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/tm-proj-XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    tm_err err;
    store *s = store_open(tmpdir, NULL, &err);
    if (!s) fail_msg("store_open: %s", err.msg);
    return s;
}

static void rm_tmp(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    assert_int_equal(system(cmd), 0);
}

static void test_checkpoint_restore_round_trip(void **st) {
    (void)st;
    tm_err err;
    store *s = open_tmp();
    proj *p = load(EXAMPLE, s, &err);
    if (!p) fail_msg("%s", err.msg);
    feed_example(p, 1, 13);
    assert_int_equal(proj_commit(p, &err), 0);
    proj_free(p);

    /* a new instance resumes at 13 with the same state */
    p = load(EXAMPLE, s, &err);
    assert_int_equal(proj_restore(p, &err), 0);
    assert_int_equal(proj_position(p), 13);
    assert_state(p, 13);
    feed_example(p, 1, 30); /* 1..13 are skipped, 14..30 applied */
    assert_state(p, 30);
    assert_int_equal(proj_commit(p, &err), 0);
    proj_free(p);

    /* compare with a from-scratch in-memory run: byte-identical */
    proj *q = load(EXAMPLE, NULL, &err);
    feed_example(q, 1, 30);
    buf a = BUF_INIT, b = BUF_INIT;
    p = load(EXAMPLE, s, &err);
    assert_int_equal(proj_restore(p, &err), 0);
    assert_int_equal(proj_state(p, &a, &err), 0);
    assert_int_equal(proj_state(q, &b, &err), 0);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.ptr, b.ptr, a.len);
    buf_free(&a);
    buf_free(&b);
    proj_free(p);
    proj_free(q);
    store_close(s);
    rm_tmp();
}

static void test_emits_appended_idempotently(void **st) {
    (void)st;
    tm_err err;
    store *s = open_tmp();
    for (int run = 0; run < 2; run++) {
        proj *p = load(EMITTER, s, &err);
        if (!p) fail_msg("%s", err.msg);
        feed_example(p, 1, 8);
        if (proj_commit(p, &err) != 0) fail_msg("commit: %s", err.msg);
        proj_free(p);
    }
    /* the second run (no restore: as after a crash before the checkpoint)
     * re-emitted the same ids: the store holds them once */
    assert_int_equal(store_last_position(s), 8);
    store_close(s);
    rm_tmp();
}

static const char *FAULTY =
    "return { from = 'all', partition = function(e) return e.data.customer end,\n"
    "  init = function() return { n = 0 } end,\n"
    "  on = { OrderPlaced = function(s, e)\n"
    "    s.n = s.n + 1\n"
    "    if e.position == 7 then local t = nil; return t.boom end\n"
    "  end } }\n";

static void test_runtime_error_faults_without_partial_state(void **st) {
    (void)st;
    tm_err err;
    store *s = open_tmp();
    proj *p = load(FAULTY, s, &err);
    if (!p) fail_msg("%s", err.msg);
    tev t;
    int rc = 0;
    for (uint64_t i = 1; i <= 3; i++) {
        mk(&t, i, "order-1", "OrderPlaced", "c1", 1);
        assert_int_equal(proj_feed(p, &t.ev, &err), 0);
        buf_free(&t.data);
    }
    assert_int_equal(proj_commit(p, &err), 0); /* checkpoint at 3: c1.n = 3 */
    for (uint64_t i = 4; i <= 9 && rc == 0; i++) {
        mk(&t, i, "order-1", "OrderPlaced", "c1", 1);
        rc = proj_feed(p, &t.ev, &err);
        buf_free(&t.data);
    }
    if (rc == 0) rc = proj_flush(p, &err);
    assert_int_equal(rc, -1);
    const proj_fault *f = proj_fault_info(p);
    assert_non_null(f);
    assert_int_equal(f->position, 7);
    assert_string_equal(f->type, "OrderPlaced");
    assert_non_null(strstr(f->message, "t.lua:5:"));
    assert_non_null(strstr(f->traceback, "stack traceback"));
    assert_int_equal(proj_position(p), 3); /* back at the checkpoint */
    /* the in-memory model is the checkpointed one: n = 3, not 6 */
    buf out = BUF_INIT;
    assert_int_equal(proj_get(p, "c1", 2, &out, &err), 0);
    const char *v;
    size_t vl;
    assert_int_equal(mp_map_find(out.ptr, out.len, "n", 1, &v, &vl), 1);
    assert_int_equal((unsigned char)v[0], 3);
    buf_free(&out);
    proj_free(p);
    store_close(s);
    rm_tmp();
}

static void test_dead_letter_goes_on(void **st) {
    (void)st;
    tm_err err;
    char src[1024];
    snprintf(src, sizeof src, "%s", FAULTY);
    char *end = strrchr(src, '}');
    snprintf(end, sizeof src - (size_t)(end - src), ", on_error = 'dead_letter' }\n");
    proj *p = load(src, NULL, &err);
    if (!p) fail_msg("%s", err.msg);
    /* the runner's loop: re-feed from proj_position()+1 on PROJ_REPLAY */
    tev evs[10];
    for (uint64_t i = 1; i <= 10; i++) mk(&evs[i - 1], i, "order-1", "OrderPlaced", "c1", 1);
    int replays = 0;
    for (uint64_t i = 1; i <= 10;) {
        int rc = proj_feed(p, &evs[i - 1].ev, &err);
        if (i == 10 && rc == 0) rc = proj_flush(p, &err);
        if (rc == PROJ_REPLAY) {
            replays++;
            i = proj_position(p) + 1;
            continue;
        }
        assert_int_equal(rc, 0);
        i++;
    }
    assert_int_equal(replays, 1);
    buf out = BUF_INIT;
    assert_int_equal(proj_get(p, "c1", 2, &out, &err), 0);
    const char *v;
    size_t vl;
    assert_int_equal(mp_map_find(out.ptr, out.len, "n", 1, &v, &vl), 1);
    assert_int_equal((unsigned char)v[0], 9); /* all but the dead letter */
    for (int i = 0; i < 10; i++) buf_free(&evs[i].data);
    buf_free(&out);
    proj_free(p);
}

/* Two runs with different table insertion orders give identical bytes. */
static void test_determinism(void **st) {
    (void)st;
    tm_err err;
    const char *src =
        "return { from = 'all', init = function() return { m = {} } end,\n"
        "  on = { ['$any'] = function(s, e)\n"
        "    local k = e.data.customer .. '-' .. (e.position % 7)\n"
        "    s.m[k] = (s.m[k] or 0) + e.data.amount; s.m[e.position] = true\n"
        "    s.h = s.h or tm.hll and nil\n"
        "  end } }\n";
    buf a = BUF_INIT, b = BUF_INIT;
    for (int run = 0; run < 2; run++) {
        proj *p = load(src, NULL, &err);
        if (!p) fail_msg("%s", err.msg);
        if (run == 0) feed_example(p, 1, 50);
        else {
            /* same events, different batching */
            proj_free(p);
            proj_opts o = {.batch = 7};
            p = proj_new("t", src, strlen(src), "t.lua", &o, &err);
            feed_example(p, 1, 50);
        }
        assert_int_equal(proj_state(p, run ? &b : &a, &err), 0);
        proj_free(p);
    }
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.ptr, b.ptr, a.len);
    buf_free(&a);
    buf_free(&b);
}

static void test_state_errors_name_the_path(void **st) {
    (void)st;
    tm_err err;
    const char *src = "return { from = 'all', on = { ['$any'] = function(s, e)\n"
                      "  s.x = { y = { function() end } } end } }\n";
    proj *p = load(src, NULL, &err);
    feed_example(p, 1, 1);
    buf out = BUF_INIT;
    assert_int_equal(proj_state(p, &out, &err), -1);
    assert_non_null(strstr(err.msg, "state.x.y[1]"));
    assert_non_null(strstr(err.msg, "function"));
    buf_free(&out);
    proj_free(p);
}

static void test_globals_locked_in_handlers(void **st) {
    (void)st;
    tm_err err;
    const char *src = "counter = 0\nreturn { from = 'all', on = { ['$any'] = function(s, e)\n"
                      "  counter = counter + 1 end } }\n";
    proj *p = load(src, NULL, &err);
    if (!p) fail_msg("%s", err.msg);
    tev t;
    mk(&t, 1, "order-1", "X", "c", 1);
    int rc = proj_feed(p, &t.ev, &err);
    if (rc == 0) rc = proj_flush(p, &err);
    buf_free(&t.data);
    assert_int_equal(rc, -1);
    assert_non_null(strstr(err.msg, "global 'counter'"));
    proj_free(p);
}

/* An event kept in state keeps its lazy fields after its batch: they are
 * read back from the source store; encoding the state materialises them. */
static void test_kept_event_reads_back(void **st) {
    (void)st;
    tm_err err;
    store *s = open_tmp();
    tev t[10];
    tm_event evs[10];
    for (int i = 0; i < 10; i++) {
        mk(&t[i], 0, i < 5 ? "order-7" : "order-8", "OrderPlaced", "c1", 1);
        evs[i] = t[i].ev;
    }
    assert_int_equal(store_append(s, evs, 10, NULL, 0, &err), 0);
    const char *src =
        "return { from = 'all', on = { OrderPlaced = function(s, e) s.first = s.first or e end },\n"
        "  queries = { first = function(m) return { m.first.stream, m.first.category, #m.first.id } end } }\n";
    proj_opts o = {.batch = 4, .source = s};
    proj *p = proj_new("t", src, strlen(src), "t.lua", &o, &err);
    if (!p) fail_msg("%s", err.msg);
    store_iter *it = store_read_all(s, 1, 0, 0, &err);
    tm_event ev;
    while (store_iter_next(it, &ev, &err) == 1) assert_int_equal(proj_feed(p, &ev, &err), 0);
    store_iter_free(it);
    assert_int_equal(proj_flush(p, &err), 0);
    buf out = BUF_INIT;
    assert_int_equal(proj_query(p, "first", NULL, 0, &out, &err), 0);
    /* ["order-7", "order", 36] */
    assert_int_equal(out.len, 1 + 8 + 6 + 1);
    assert_memory_equal(out.ptr + 2, "order-7", 7);
    buf_reset(&out);
    assert_int_equal(proj_state(p, &out, &err), 0);
    const char *v;
    size_t vl;
    assert_int_equal(mp_map_find(out.ptr, out.len, "first", 5, &v, &vl), 1);
    assert_int_equal(mp_map_find(v, vl, "stream", 6, &v, &vl), 1);
    buf_free(&out);
    for (int i = 0; i < 10; i++) buf_free(&t[i].data);
    proj_free(p);
    store_close(s);
    rm_tmp();
}

static void test_partition_shorthand_numbers_and_init_key(void **st) {
    (void)st;
    tm_err err;
    const char *src =
        "return { from = { types = { 'OrderPlaced', 'PaymentReceived' } }, partition = 'stream',\n"
        "  init = function(k) return { key = k, n = 0 } end,\n"
        "  on = { ['$any'] = function(s, e) s.n = s.n + 1 end } }\n";
    proj *p = load(src, NULL, &err);
    if (!p) fail_msg("%s", err.msg);
    assert_int_equal(proj_from(p), PROJ_FROM_TYPES);
    feed_example(p, 1, 10); /* streams order-1 and shipment-1 */
    buf out = BUF_INIT;
    assert_int_equal(proj_partitions(p, &out, &err), 0);
    assert_int_equal((unsigned char)out.ptr[0], 0x92);
    buf_reset(&out);
    assert_int_equal(proj_get(p, "shipment-1", 10, &out, &err), 0);
    const char *v;
    size_t vl;
    assert_int_equal(mp_map_find(out.ptr, out.len, "n", 1, &v, &vl), 1);
    assert_int_equal((unsigned char)v[0], 2); /* positions 4 and 9 */
    assert_int_equal(mp_map_find(out.ptr, out.len, "key", 3, &v, &vl), 1);
    assert_memory_equal(v + 1, "shipment-1", 10);
    buf_free(&out);
    proj_free(p);

    /* numeric keys become strings: integers without a fraction */
    const char *num = "return { partition = function(e) return e.position % 2 + 0.5 * (e.position % 3 == 0 and 1 or 0) end,\n"
                      "  on = { ['$any'] = function(s, e) s.n = (s.n or 0) + 1 end } }\n";
    p = load(num, NULL, &err);
    if (!p) fail_msg("%s", err.msg);
    feed_example(p, 1, 6);
    buf keys = BUF_INIT;
    assert_int_equal(proj_partitions(p, &keys, &err), 0);
    /* keys: "0", "0.5", "1", "1.5" */
    assert_int_equal((unsigned char)keys.ptr[0], 0x94);
    assert_memory_equal(keys.ptr + 1, "\xa1" "0" "\xa3" "0.5" "\xa1" "1" "\xa3" "1.5", 10);
    buf_free(&keys);
    proj_free(p);
    assert_null(proj_new("bad/name", "return {on={}}", 14, "x.lua", NULL, &err));
}

static void test_emit_outside_handler_and_bad_partition(void **st) {
    (void)st;
    tm_err err;
    const char *src = "return { partition = function(e) return {} end, on = { ['$any'] = function() end } }";
    proj *p = load(src, NULL, &err);
    tev t;
    mk(&t, 1, "order-1", "X", "c", 1);
    int rc = proj_feed(p, &t.ev, &err);
    if (rc == 0) rc = proj_flush(p, &err);
    buf_free(&t.data);
    assert_int_equal(rc, -1);
    assert_non_null(strstr(err.msg, "partition(e) must return"));
    proj_free(p);
    p = load("tm.emit('a', 'b', {})\nreturn { on = {} }", NULL, &err);
    assert_null(p);
    assert_non_null(strstr(err.msg, "may only be called from a handler"));
}


/* ---- the fast path (reused events) must be unobservable ---- */

/* An event of type X with raw data bytes (may be empty) and metadata. */
static void mk_raw(tev *t, uint64_t pos, const char *data, size_t len, int meta) {
    memset(t, 0, sizeof *t);
    snprintf(t->stream, sizeof t->stream, "order-%llu", (unsigned long long)(pos % 3));
    snprintf(t->type, sizeof t->type, "X");
    buf_append(&t->data, data, len);
    t->ev.stream = t->stream;
    t->ev.stream_len = strlen(t->stream);
    t->ev.type = t->type;
    t->ev.type_len = 1;
    t->ev.data = len ? t->data.ptr : NULL;
    t->ev.data_len = len;
    if (meta) {
        t->ev.meta = "\x81\xa1k\x07"; /* {k=7} */
        t->ev.meta_len = 4;
    }
    t->ev.position = pos;
    t->ev.version = pos;
    t->ev.time_ms = 1700000000000 + (int64_t)pos;
    for (int i = 0; i < 16; i++) t->ev.id[i] = (uint8_t)(pos * 3 + (uint64_t)i);
}

/* Payloads chosen to hit every branch of the key locator. */
#define B(s) {s, sizeof s - 1}
static const struct { const char *p; size_t n; } PAYLOADS[] = {
    B("\x82\xa8" "customer" "\xa2" "c1" "\xa6" "amount" "\xcb\x40\x04\x00\x00\x00\x00\x00\x00"),
    B("\x83\xa6" "amount" "\x01" "\xa8" "customer" "\xa2" "c2" "\xa5" "extra" "\x93\x01\x02\x81\xa1x\x01"),
    B("\x83\xa8" "customer" "\xa2" "c1" "\xa8" "customer" "\xa2" "c2" "\xa6" "amount" "\x03"), /* dup */
    B(""),                                                        /* no data */
    B("\xa3" "abc"),                                              /* a string */
    B("\x92\x01\x02"),                                            /* an array */
    B("\x83\x01\xa1" "a" "\xa8" "customer" "\xa2" "c3" "\xa6" "amount" "\x01"), /* int key */
    B("\x82\xa8" "customer" "\xa2" "c1" "\xc4\x06" "amount" "\x07"),   /* bin key */
    B("\x83\xa8" "customer" "\xa2" "c1" "\xa6" "amount" "\xd0\xfe" "\xa5" "items"
      "\x92\x81\xa3" "sku" "\xa1" "a" "\x81\xa3" "sku" "\xa1" "b"),      /* nested */
    B("\x82\xa8" "customer" "\xa2" "c2" "\xa6" "amount" "\xca\x40\x20\x00\x00"), /* float32 */
    B("\x81\xa6" "amount" "\x05"),                                /* no customer */
    B("\x8a\xa1" "a" "\x01\xa1" "b" "\x02\xa1" "c" "\x03\xa1" "d" "\x04\xa1" "e" "\x05\xa1" "f"
      "\x06\xa1" "g" "\x07\xa1" "h" "\x08\xa8" "customer" "\xa2" "c3" "\xa6" "amount" "\x09"),
    B("\x82\xa8" "customer" "\x05" "\xa6" "amount" "\x02"),       /* numeric key */
};

/* Handlers (type X) and whether the analysis must find them safe. */
static const struct { const char *part, *body; int fast; } PATTERNS[] = {
    {"function(e) return e.data and e.data.customer end",
     "s.n = (s.n or 0) + 1; s.sum = (s.sum or 0) + (e.data and e.data.amount or 0); "
     "s.t = e.type; s.pos = e.position; s.v = e.version; s.time = e.time", 1},
    {"function(e) return e.data and e.data.customer end",
     "local d = e.data; if d then s.sum = (s.sum or 0) + (d.amount or 0) end", 1},
    {"'stream'", "s.str = (s.str or '') .. e.stream .. '|' .. e.category .. ';' s.meta = e.metadata "
     "s.id = e.id", 1},
    {"function(e) return e.data and e.data.customer end",
     "local d = e.data if d then s.items = d.items; s.first = d.items and d.items[1]; "
     "s.c = d.customer end", 1},
    {"function(e) return type(e.data) == 'table' and e.data.customer or nil end", "s.n = 1", 0},
    {"function(e) return e.data and e.data.customer end",
     "if e.data.customer == 'c1' then s.c1 = (s.c1 or 0) + 1 end if e.data then s.has = true end "
     "for i = 1, 3 do s[i] = (s[i] or 0) + (e.data.amount or 0) * i end", 1},
    {"nil", "s.last = e.data", 0},
    {"nil", "s.events = s.events or {} s.events[#s.events + 1] = e", 0},
    {"nil", "if type(e.data) == 'table' then for k, v in pairs(e.data) do s[tostring(k)] = v end end", 0},
    {"nil", "local k = 'amount' s.v = type(e.data) == 'table' and e.data[k] or 0", 0},
    {"nil", "local g = function() return e.data end s.v = g()", 0},
    {"nil", "e.seen = (e.seen or 0) + 1 s.v = e.seen", 0},
    {"nil", "local d = e.data if type(d) == 'table' then d.customer = 'z' end s.v = d", 0},
};

static int run_pattern(size_t i, int reuse, buf *out, int *fast) {
    char src[2048];
    snprintf(src, sizeof src,
             "return { partition = %s, reuse_events = %s,\n"
             "  on = { X = function(s, e) %s end } }\n",
             PATTERNS[i].part, reuse ? "nil" : "false", PATTERNS[i].body);
    tm_err err;
    proj *p = load(src, NULL, &err);
    if (!p) fail_msg("pattern %zu: %s", i, err.msg);
    *fast = proj_type_fast(p, "X", 1);
    int rc = 0;
    size_t np = sizeof PAYLOADS / sizeof *PAYLOADS;
    for (uint64_t pos = 1; rc == 0 && pos <= 3 * np; pos++) {
        tev t;
        size_t k = (size_t)(pos * 7) % np;
        mk_raw(&t, pos, PAYLOADS[k].p, PAYLOADS[k].n, pos % 4 == 0);
        rc = proj_feed(p, &t.ev, &err);
        buf_free(&t.data);
    }
    if (rc == 0) rc = proj_flush(p, &err);
    if (rc == 0) rc = proj_state(p, out, &err);
    if (rc != 0) buf_append(out, err.msg, strlen(err.msg)); /* a fault must match too */
    proj_free(p);
    return rc;
}

static void test_fast_path_is_unobservable(void **st) {
    (void)st;
    for (size_t i = 0; i < sizeof PATTERNS / sizeof *PATTERNS; i++) {
        buf a = BUF_INIT, b = BUF_INIT;
        int fa, fb;
        int ra = run_pattern(i, 1, &a, &fa);
        int rb = run_pattern(i, 0, &b, &fb);
        if (fa != PATTERNS[i].fast) fail_msg("pattern %zu: fast path %d, expected %d", i, fa,
                                             PATTERNS[i].fast);
        assert_int_equal(fb, 0); /* reuse_events = false */
        assert_int_equal(ra, rb);
        if (a.len != b.len || memcmp(a.ptr, b.ptr, a.len))
            fail_msg("pattern %zu: states differ (%zu vs %zu bytes)", i, a.len, b.len);
        if (a.len <= 1) fail_msg("pattern %zu: empty state (%.*s)", i, (int)a.len, a.ptr);
        buf_free(&a);
        buf_free(&b);
    }
}

static void test_fast_path_faults_like_general_path(void **st) {
    (void)st;
    /* the example's handlers take the fast path */
    tm_err err;
    proj *p = load(EXAMPLE, NULL, &err);
    assert_non_null(p);
    assert_int_equal(proj_type_fast(p, "OrderPlaced", 11), 1);
    assert_int_equal(proj_type_fast(p, "PaymentReceived", 15), 1);
    assert_int_equal(proj_type_fast(p, "OrderShipped", 12), -1);
    proj_free(p);
    /* an unknown ext type in a field nobody reads still faults (the full
     * decode would), and a missing payload gives the same Lua error */
    static const char ext[] = "\x82\xa8" "customer" "\xa2" "c1" "\xa1" "z" "\xd4\x63\x00";
    const char *src = "return { partition = function(e) return e.data.customer end,\n"
                      "  reuse_events = %s, on = { X = function(s, e) s.n = 1 end } }\n";
    for (int k = 0; k < 2; k++) {
        char msg[2][600];
        for (int reuse = 0; reuse < 2; reuse++) {
            char s[400];
            snprintf(s, sizeof s, src, reuse ? "nil" : "false");
            p = load(s, NULL, &err);
            assert_non_null(p);
            assert_int_equal(proj_type_fast(p, "X", 1), reuse);
            tev t;
            mk_raw(&t, 1, k ? ext : "", k ? sizeof ext - 1 : 0, 0);
            int rc = proj_feed(p, &t.ev, &err);
            if (rc == 0) rc = proj_flush(p, &err);
            buf_free(&t.data);
            assert_int_equal(rc, -1);
            snprintf(msg[reuse], sizeof msg[reuse], "%s", err.msg);
            proj_free(p);
        }
        assert_string_equal(msg[0], msg[1]);
    }
}

/* A handler that changes its state in place and then fails must leave no
 * trace, even on the partition's first event since the checkpoint. */
static void test_failing_handler_changes_are_discarded(void **st) {
    (void)st;
    const char *src =
        "return { partition = function(e) return e.data.customer end, on_error = 'dead_letter',\n"
        "  on = { X = function(s, e) s.n = (s.n or 0) + 1\n"
        "    if e.data.amount > 3 then error('too big') end end } }\n";
    tm_err err;
    proj *p = load(src, NULL, &err);
    assert_non_null(p);
    static const char big[] = "\x82\xa8" "customer" "\xa2" "c1" "\xa6" "amount" "\x07";
    static const char ok[] = "\x82\xa8" "customer" "\xa2" "c1" "\xa6" "amount" "\x01";
    int rc = 0;
    for (uint64_t pos = 1; pos <= 3; pos++) {
        tev t;
        mk_raw(&t, pos, pos == 1 ? big : ok, sizeof ok - 1, 0);
        rc = proj_feed(p, &t.ev, &err);
        if (rc == PROJ_REPLAY) { /* re-feed from the checkpoint (nothing before) */
            buf_free(&t.data);
            pos = proj_position(p);
            continue;
        }
        buf_free(&t.data);
        assert_int_equal(rc, 0);
    }
    rc = proj_flush(p, &err);
    if (rc == PROJ_REPLAY) {
        for (uint64_t pos = proj_position(p) + 1; pos <= 3; pos++) {
            tev t;
            mk_raw(&t, pos, pos == 1 ? big : ok, sizeof ok - 1, 0);
            rc = proj_feed(p, &t.ev, &err);
            buf_free(&t.data);
            assert_int_equal(rc, 0);
        }
        rc = proj_flush(p, &err);
    }
    assert_int_equal(rc, 0);
    buf out = BUF_INIT;
    assert_int_equal(proj_get(p, "c1", 2, &out, &err), 0);
    /* {n = 2}: the two good events only */
    assert_int_equal(out.len, 4);
    assert_memory_equal(out.ptr, "\x81\xa1n\x02", 4);
    buf_free(&out);
    proj_free(p);
}

/* One-shot: the same model without a dirty set; no checkpoints; a fault
 * rolls back to the empty model. */
static void test_one_shot(void **st) {
    (void)st;
    tm_err err;
    proj *p = load(EXAMPLE, NULL, &err);
    assert_non_null(p);
    assert_int_equal(proj_set_one_shot(p, &err), 0);
    feed_example(p, 1, 40);
    assert_state(p, 40);
    assert_int_equal(proj_commit(p, &err), -1);
    assert_int_equal(err.code, TM_EINVAL);
    assert_int_equal(proj_set_one_shot(p, &err), -1); /* events were fed */
    assert_state(p, 40);
    proj_free(p);

    p = load(FAULTY, NULL, &err);
    assert_non_null(p);
    assert_int_equal(proj_set_one_shot(p, &err), 0);
    int rc = 0;
    for (uint64_t i = 1; i <= 9 && rc == 0; i++) {
        tev t;
        mk(&t, i, "order-1", "OrderPlaced", i % 2 ? "c1" : "c2", 1);
        rc = proj_feed(p, &t.ev, &err);
        buf_free(&t.data);
    }
    if (rc == 0) rc = proj_flush(p, &err);
    assert_int_equal(rc, -1);
    assert_non_null(proj_fault_info(p));
    assert_int_equal(proj_position(p), 0);
    buf out = BUF_INIT;
    assert_int_equal(proj_state(p, &out, &err), 0);
    assert_int_equal(out.len, 1);
    assert_int_equal((unsigned char)out.ptr[0], 0x80); /* {} */
    buf_free(&out);
    proj_free(p);

    char src[1024];
    snprintf(src, sizeof src, "%s", FAULTY);
    char *end = strrchr(src, '}');
    snprintf(end, sizeof src - (size_t)(end - src), ", on_error = 'dead_letter' }\n");
    p = load(src, NULL, &err);
    assert_non_null(p);
    assert_int_equal(proj_set_one_shot(p, &err), -1); /* dead letters need checkpoints */
    proj_free(p);
}

typedef struct pairs_seen {
    buf keys;      /* "k1,k2," */
    buf map;       /* the pairs re-encoded as one map */
    size_t n;
} pairs_seen;

static int see_pair(void *ctx, const char *k, size_t kl, const char *v, size_t vl) {
    pairs_seen *ps = ctx;
    buf_append(&ps->keys, k, kl);
    buf_putc(&ps->keys, ',');
    msgpack_packer pk;
    msgpack_packer_init(&pk, &ps->map, wr);
    msgpack_pack_str(&pk, kl);
    msgpack_pack_str_body(&pk, k, kl);
    buf_append(&ps->map, v, vl);
    ps->n++;
    return 0;
}

/* proj_state_pairs hands out exactly the pairs of proj_state's map; maps
 * larger than luamp's small-map size sort the same way. */
static void test_state_pairs(void **st) {
    (void)st;
    tm_err err;
    const char *src =
        "return { partition = function(e) return e.data.customer end,\n"
        "  on = { X = function(s, e) for i = 40, 1, -1 do s['k' .. i] = i; s[i + 0.5] = true end\n"
        "    s[false] = 1; s[true] = 2 end } }\n";
    proj *p = load(src, NULL, &err);
    assert_non_null(p);
    static const char a[] = "\x81\xa8" "customer" "\xa2" "cb";
    static const char b[] = "\x81\xa8" "customer" "\xa2" "ca";
    for (uint64_t pos = 1; pos <= 2; pos++) {
        tev t;
        mk_raw(&t, pos, pos == 1 ? a : b, sizeof a - 1, 0);
        assert_int_equal(proj_feed(p, &t.ev, &err), 0);
        buf_free(&t.data);
    }
    buf whole = BUF_INIT;
    assert_int_equal(proj_state(p, &whole, &err), 0);
    pairs_seen ps = {BUF_INIT, BUF_INIT, 0};
    msgpack_packer pk;
    msgpack_packer_init(&pk, &ps.map, wr);
    msgpack_pack_map(&pk, 2);
    assert_int_equal(proj_state_pairs(p, see_pair, &ps, &err), 0);
    assert_int_equal(ps.n, 2);
    assert_string_equal(ps.keys.ptr, "ca,cb,");
    assert_int_equal(ps.map.len, whole.len);
    assert_memory_equal(ps.map.ptr, whole.ptr, whole.len);
    /* the state: 82 numbers (ascending), then 40 strings (bytewise), false, true */
    const char *q = whole.ptr, *e = whole.ptr + whole.len;
    mp_item it;
    assert_int_equal(mp_next(&q, e, &it), 0);
    assert_int_equal(mp_next(&q, e, &it), 0); /* "ca" */
    assert_int_equal(mp_next(&q, e, &it), 0);
    assert_int_equal(it.type, MP_MAP);
    assert_int_equal(it.v.n, 82);
    double last = -1;
    char lastk[16] = "";
    for (uint32_t i = 0; i < it.v.n; i++) {
        mp_item k;
        assert_int_equal(mp_next(&q, e, &k), 0);
        if (i < 40) {
            assert_int_equal(k.type, MP_DOUBLE);
            assert_true(k.v.d > last);
            last = k.v.d;
        } else if (i < 80) {
            assert_int_equal(k.type, MP_STR);
            char kk[16];
            snprintf(kk, sizeof kk, "%.*s", (int)k.v.s.len, k.v.s.ptr);
            assert_true(strcmp(kk, lastk) > 0);
            snprintf(lastk, sizeof lastk, "%s", kk);
        } else {
            assert_int_equal(k.type, MP_BOOL);
            assert_int_equal(k.v.b, i == 81);
        }
        assert_int_equal(mp_skip(&q, e), 0);
    }
    buf_free(&whole);
    buf_free(&ps.keys);
    buf_free(&ps.map);
    proj_free(p);

    const char *flat = "return { on = { X = function(s) end } }";
    p = proj_new("t", flat, strlen(flat), "t.lua", NULL, &err);
    assert_non_null(p);
    assert_int_equal(proj_state_pairs(p, see_pair, &ps, &err), -1); /* not partitioned */
    proj_free(p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_handlers_and_partitions),
        cmocka_unit_test(test_any_handler_and_event_fields),
        cmocka_unit_test(test_bad_definitions),
        cmocka_unit_test(test_emit_ids_deterministic),
        cmocka_unit_test(test_checkpoint_restore_round_trip),
        cmocka_unit_test(test_emits_appended_idempotently),
        cmocka_unit_test(test_runtime_error_faults_without_partial_state),
        cmocka_unit_test(test_dead_letter_goes_on),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_state_errors_name_the_path),
        cmocka_unit_test(test_globals_locked_in_handlers),
        cmocka_unit_test(test_kept_event_reads_back),
        cmocka_unit_test(test_partition_shorthand_numbers_and_init_key),
        cmocka_unit_test(test_emit_outside_handler_and_bad_partition),
        cmocka_unit_test(test_fast_path_is_unobservable),
        cmocka_unit_test(test_fast_path_faults_like_general_path),
        cmocka_unit_test(test_failing_handler_changes_are_discarded),
        cmocka_unit_test(test_one_shot),
        cmocka_unit_test(test_state_pairs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
