/* test_replay.c — parallel re-projection: the same bytes as one projection
 * fed every event (state, reads, persisted keys), for every worker count;
 * routing guesses checked (a wrong one falls back to one worker); faults
 * reported at the serial position and leaving proj/NAME/ untouched; cancel
 * and resume; the staging checkpoint. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <msgpack/pack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <leveldb/c.h>

#include "mp.h"
#include "proj.h"
#include "replay.h"
#include "store.h"

#define NEV 6000

static int wr(void *d, const char *p, size_t n) {
    buf_append(d, p, n);
    return 0;
}

static void pstr(msgpack_packer *pk, const char *s) {
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

/* A store with NEV events in streams order-<i%50> (and a few in other
 * categories); customers are strings, integers and floats. */
static store *make_store(char *dir) {
    strcpy(dir, "/tmp/test_replay.XXXXXX");
    assert_non_null(mkdtemp(dir));
    tm_err err;
    store_opts o;
    store_opts_default(&o);
    o.durability = STORE_LOSE_ON_OS_CRASH;
    store *s = store_open(dir, &o, &err);
    assert_non_null(s);
    for (int base = 0; base < NEV; base += 500) {
        tm_event evs[500];
        buf data[500], names[500];
        for (int j = 0; j < 500; j++) {
            int i = base + j;
            data[j] = (buf)BUF_INIT;
            names[j] = (buf)BUF_INIT;
            msgpack_packer pk;
            msgpack_packer_init(&pk, &data[j], wr);
            msgpack_pack_map(&pk, 3);
            pstr(&pk, "customer");
            if (i % 7 == 0) msgpack_pack_int64(&pk, i % 13);          /* number keys */
            else if (i % 11 == 0) msgpack_pack_double(&pk, 0.5 + i % 5); /* float keys */
            else {
                char c[16];
                snprintf(c, sizeof c, "c-%d", (i * 31) % 97);
                pstr(&pk, c);
            }
            pstr(&pk, "amount");
            msgpack_pack_double(&pk, (i % 100) + 0.25);
            pstr(&pk, "sku");
            char sku[16];
            snprintf(sku, sizeof sku, "sku-%d", i % 9);
            pstr(&pk, sku);
            buf_printf(&names[j], "%s-%d", i % 17 == 0 ? "audit" : "order", i % 50);
            memset(&evs[j], 0, sizeof evs[j]);
            evs[j].stream = names[j].ptr;
            evs[j].stream_len = names[j].len;
            evs[j].type = i % 3 == 0 ? "PaymentReceived" : "OrderPlaced";
            evs[j].type_len = strlen(evs[j].type);
            evs[j].data = data[j].ptr;
            evs[j].data_len = data[j].len;
            evs[j].time_ms = 1700000000000 + i;
        }
        assert_int_equal(store_append(s, evs, 500, NULL, 0, &err), 0);
        for (int j = 0; j < 500; j++) {
            buf_free(&data[j]);
            buf_free(&names[j]);
        }
    }
    return s;
}

static void rm_store(store *s, const char *dir) {
    store_close(s);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

static const char *EXAMPLE =
    "return {\n"
    "  from = { category = 'order' },\n"
    "  partition = function(e) return e.data.customer end,\n"
    "  init = function(k) return { orders = 0, revenue = 0, first = 0, skus = {} } end,\n"
    "  on = {\n"
    "    OrderPlaced = function(s, e)\n"
    "      s.orders = s.orders + 1\n"
    "      if s.first == 0 then s.first = e.position end\n"
    "      s.skus[#s.skus + 1] = e.data.sku\n"
    "      if #s.skus > 5 then table.remove(s.skus, 1) end\n"
    "    end,\n"
    "    PaymentReceived = function(s, e) s.revenue = s.revenue + e.data.amount * s.orders end,\n"
    "  },\n"
    "  queries = { big = function(states, args) local r = {} for k, s in pairs(states) do\n"
    "     if s.revenue >= args then r[#r + 1] = k end end table.sort(r) return r end },\n"
    "}\n";

/* The serial reference: one projection fed every event. */
typedef struct ref {
    buf state, parts, top, query, get;
} ref;

static void query_arg(buf *a) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, a, wr);
    msgpack_pack_int(&pk, 5000);
}

static void serial(store *s, const char *src, store *persist_to, ref *out, int *faulted,
                   uint64_t *fault_pos) {
    tm_err err;
    proj_opts o = {.st = persist_to, .source = s};
    proj *p = proj_new("t", src, strlen(src), "t.lua", &o, &err);
    assert_non_null(p);
    int rc;
    do { /* PROJ_REPLAY (dead letters): again from the checkpoint */
        store_iter *it = store_read_all(s, proj_position(p) + 1, 0, 0, &err);
        tm_event ev;
        rc = 0;
        while (rc == 0 && store_iter_next(it, &ev, &err) == 1) rc = proj_feed(p, &ev, &err);
        store_iter_free(it);
        if (rc == 0) rc = proj_flush(p, &err);
    } while (rc == PROJ_REPLAY);
    if (faulted) {
        *faulted = rc != 0;
        if (rc) *fault_pos = proj_fault_info(p)->position;
    }
    if (rc == 0 && persist_to) assert_int_equal(proj_commit(p, &err), 0);
    if (out && rc == 0) {
        memset(out, 0, sizeof *out);
        assert_int_equal(proj_state(p, &out->state, &err), 0);
        if (src != EXAMPLE) goto done;
        assert_int_equal(proj_partitions(p, &out->parts, &err), 0);
        assert_int_equal(proj_top(p, "revenue", 7, &out->top, &err), 0);
        buf a = BUF_INIT;
        query_arg(&a);
        assert_int_equal(proj_query(p, "big", a.ptr, a.len, &out->query, &err), 0);
        buf_free(&a);
        assert_int_equal(proj_get(p, "c-3", 3, &out->get, &err), 0);
    }
done:
    proj_free(p);
}

static void ref_free(ref *r) {
    buf_free(&r->state);
    buf_free(&r->parts);
    buf_free(&r->top);
    buf_free(&r->query);
    buf_free(&r->get);
}

static void assert_same(const buf *a, const buf *b) {
    assert_true(a->len > 0);
    assert_int_equal(a->len, b->len);
    assert_memory_equal(a->ptr, b->ptr, a->len);
}

static replay *run_replay(store *s, const char *src, unsigned workers, int persist, tm_err *err,
                          int *rc) {
    replay_opts o = {.workers = workers, .persist = persist, .checkpoint_every = 700};
    replay *r = replay_new(s, "t", src, strlen(src), "t.lua", &o, err);
    assert_non_null(r);
    *rc = replay_run(r, err);
    return r;
}

static void test_parallel_equals_serial(void **st) {
    (void)st;
    char dir[64];
    store *s = make_store(dir);
    ref want;
    serial(s, EXAMPLE, NULL, &want, NULL, NULL);
    for (unsigned w = 1; w <= 5; w++) {
        tm_err err;
        int rc;
        replay *r = run_replay(s, EXAMPLE, w, 0, &err, &rc);
        assert_int_equal(rc, 0);
        assert_int_equal(replay_workers(r), w);
        if (w > 1) assert_non_null(strstr(replay_describe(r), "routed by data.customer"));
        ref got = {0};
        assert_int_equal(replay_state(r, &got.state, &err), 0);
        assert_int_equal(replay_partitions(r, &got.parts, &err), 0);
        assert_int_equal(replay_top(r, "revenue", 7, &got.top, &err), 0);
        buf a = BUF_INIT;
        query_arg(&a);
        assert_int_equal(replay_query(r, "big", a.ptr, a.len, &got.query, &err), 0);
        buf_free(&a);
        assert_int_equal(replay_get(r, "c-3", 3, &got.get, &err), 0);
        assert_same(&want.state, &got.state);
        assert_same(&want.parts, &got.parts);
        assert_same(&want.top, &got.top);
        assert_same(&want.query, &got.query);
        assert_same(&want.get, &got.get);
        ref_free(&got);
        replay_free(r);
    }
    ref_free(&want);
    rm_store(s, dir);
}

/* Every key under prefix, as one buffer of k=v records. */
static void dump(store *s, const char *prefix, buf *out) {
    tm_err err;
    store_kv_iter *it = store_kv_scan(s, prefix, strlen(prefix), NULL, 0, &err);
    assert_non_null(it);
    const char *k, *v;
    size_t kl, vl;
    while (store_kv_next(it, &k, &kl, &v, &vl, &err) == 1) {
        buf_append(out, k, kl);
        buf_putc(out, '=');
        buf_append(out, v, vl);
        buf_putc(out, '\n');
    }
    store_kv_iter_free(it);
}

static void dump_states(store *s, buf *out) { dump(s, "proj/t/s/", out); }

static void test_persisted_states_equal_serial(void **st) {
    (void)st;
    char d1[64], d2[64];
    store *a = make_store(d1), *b = make_store(d2);
    serial(a, EXAMPLE, a, NULL, NULL, NULL);
    tm_err err;
    int rc;
    /* the server knows "t": the swap records which source built the model */
    store_batch *sb = store_batch_new();
    store_batch_put(sb, "projmgr/v/t", 11, "0000000000000001", 16);
    assert_int_equal(store_batch_commit(b, sb, &err), 0);
    store_batch_free(sb);
    replay *r = run_replay(b, EXAMPLE, 3, 1, &err, &rc);
    assert_int_equal(rc, 0);
    replay_free(r);
    char *v = NULL;
    size_t vl = 0;
    assert_int_equal(store_kv_get(b, "projmgr/v/t", 11, &v, &vl, &err), 1);
    uint64_t h = 1469598103934665603ull;
    for (const char *c = EXAMPLE; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
    assert_int_equal(vl, 16);
    assert_memory_equal(v, hex, 16);
    free(v);
    buf x = BUF_INIT, y = BUF_INIT, stage = BUF_INIT;
    dump_states(a, &x);
    dump_states(b, &y);
    assert_same(&x, &y);
    dump(b, "replay/", &stage);
    assert_int_equal(stage.len, 0); /* staging dropped after the swap */
    /* the swapped-in checkpoint lets a serial projection continue */
    proj_opts o = {.st = b, .source = b};
    proj *p = proj_new("t", EXAMPLE, strlen(EXAMPLE), "t.lua", &o, &err);
    assert_int_equal(proj_restore(p, &err), 0);
    assert_int_equal(proj_position(p), NEV);
    proj_free(p);
    buf_free(&x);
    buf_free(&y);
    buf_free(&stage);
    rm_store(a, d1);
    rm_store(b, d2);
}

/* The first `partition =` is a decoy: the router guesses data.customer,
 * the real key is data.sku.  The check catches it; one worker redoes it. */
static void test_wrong_guess_falls_back(void **st) {
    (void)st;
    const char *src =
        "local decoy = { partition = function(e) return e.data.customer end }\n"
        "return { from = 'all', partition = function(e) return e.data.sku end,\n"
        "  on = { OrderPlaced = function(s, e) s.n = (s.n or 0) + 1; s.last = e.position end } }\n";
    char dir[64];
    store *s = make_store(dir);
    ref want;
    serial(s, src, NULL, &want, NULL, NULL);
    tm_err err;
    int rc;
    replay *r = run_replay(s, src, 3, 0, &err, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(replay_workers(r), 1);
    assert_non_null(strstr(replay_describe(r), "guess did not hold"));
    buf got = BUF_INIT;
    assert_int_equal(replay_state(r, &got, &err), 0);
    assert_same(&want.state, &got);
    replay_free(r);
    /* persisted: the first barrier sees a state key written by a worker
     * that does not own it (a resumed run would not hold it in memory) */
    r = run_replay(s, src, 3, 1, &err, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(replay_workers(r), 1);
    assert_non_null(strstr(replay_describe(r), "guess did not hold"));
    buf_reset(&got);
    assert_int_equal(replay_state(r, &got, &err), 0);
    assert_same(&want.state, &got);
    replay_free(r);
    char d2[64];
    store *t = make_store(d2);
    serial(t, src, t, NULL, NULL, NULL);
    buf x = BUF_INIT, y = BUF_INIT;
    dump_states(s, &x);
    dump_states(t, &y);
    assert_same(&y, &x);
    buf_free(&x);
    buf_free(&y);
    rm_store(t, d2);
    buf_free(&got);
    ref_free(&want);
    rm_store(s, dir);
}

static void test_forms_and_single_worker_reasons(void **st) {
    (void)st;
    char dir[64];
    store *s = make_store(dir);
    struct {
        const char *src, *desc;
    } cases[] = {
        {"return { partition = 'stream', on = { OrderPlaced = function(s, e) s.n = (s.n or 0) + 1 end } }",
         "routed by stream"},
        {"return { partition = function(ev) return ev.category end, -- a comment\n"
         " on = { OrderPlaced = function(s, e) s.n = (s.n or 0) + 1 end } }",
         "routed by category"},
        {"return { partition = function(e) return e.data[\"sku\"] end,\n"
         " on = { ['$any'] = function(s, e) s.n = (s.n or 0) + 1 end } }",
         "routed by data.sku"},
        {"return { on = { OrderPlaced = function(s, e) s.n = (s.n or 0) + 1 end } }",
         "1 worker: the projection has no partition"},
        {"--[[ partition = 'stream' ]]\nreturn { partition = function(e) return e.data.sku .. '!' end,\n"
         " on = { OrderPlaced = function(s, e) s.n = (s.n or 0) + 1 end } }",
         "1 worker: partition function not recognised"},
        {"return { partition = 'stream', on_error = 'dead_letter',\n"
         " on = { OrderPlaced = function(s, e) if e.position % 97 == 0 then error('bad') end\n"
         "   s.n = (s.n or 0) + 1 end } }",
         "1 worker: on_error"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        ref want;
        serial(s, cases[i].src, NULL, &want, NULL, NULL);
        tm_err err;
        int rc;
        replay *r = run_replay(s, cases[i].src, 4, 0, &err, &rc);
        assert_int_equal(rc, 0);
        if (!strstr(replay_describe(r), cases[i].desc))
            fail_msg("case %zu: '%s' lacks '%s'", i, replay_describe(r), cases[i].desc);
        buf got = BUF_INIT;
        assert_int_equal(replay_state(r, &got, &err), 0);
        assert_same(&want.state, &got);
        buf_free(&got);
        replay_free(r);
        ref_free(&want);
    }
    rm_store(s, dir);
}

/* A fault: reported at the position a serial run stops at; proj/t/
 * keeps the old model; nothing staged survives as resumable. */
static void test_fault_keeps_old_model(void **st) {
    (void)st;
    const char *bad =
        "return { from = { category = 'order' }, partition = function(e) return e.data.customer end,\n"
        "  on = { OrderPlaced = function(s, e)\n"
        "    if e.position == 4001 or e.position == 2999 or e.position == 5003 then error('boom at ' .. e.position) end\n"
        "    s.n = (s.n or 0) + 1 end } }\n";
    char dir[64];
    store *s = make_store(dir);
    serial(s, EXAMPLE, s, NULL, NULL, NULL); /* the old model, persisted */
    buf before = BUF_INIT, after = BUF_INIT;
    dump(s, "proj/t/", &before);
    int faulted;
    uint64_t pos = 0;
    serial(s, bad, NULL, NULL, &faulted, &pos);
    assert_true(faulted);
    for (unsigned w = 1; w <= 3; w++) {
        tm_err err;
        int rc;
        replay *r = run_replay(s, bad, w, 1, &err, &rc);
        assert_int_equal(rc, -1);
        assert_non_null(replay_fault(r));
        assert_int_equal(replay_fault(r)->position, pos);
        assert_non_null(strstr(err.msg, "boom at"));
        replay_free(r);
        buf_reset(&after);
        dump(s, "proj/t/", &after);
        assert_same(&before, &after);
    }
    buf_free(&before);
    buf_free(&after);
    rm_store(s, dir);
}

/* Rewrite replay/t/meta without its "shard" key, as a tidemark from
 * before the mapping's version wrote it. */
static void drop_shard(store *s) {
    tm_err err;
    char *v = NULL;
    size_t vl = 0;
    assert_int_equal(store_kv_get(s, "replay/t/meta", 13, &v, &vl, &err), 1);
    static const char *keep[] = {"events", "position", "source", "workers"};
    buf b = BUF_INIT;
    buf_putc(&b, (char)(0x80 | 4));
    for (int i = 0; i < 4; i++) {
        const char *x;
        size_t xl;
        assert_int_equal(mp_map_find(v, vl, keep[i], strlen(keep[i]), &x, &xl), 1);
        buf_putc(&b, (char)(0xa0 | strlen(keep[i])));
        buf_puts(&b, keep[i]);
        buf_append(&b, x, xl);
    }
    const char *x;
    size_t xl;
    assert_int_equal(mp_map_find(v, vl, "shard", 5, &x, &xl), 1);
    free(v);
    store_batch *sb = store_batch_new();
    store_batch_put(sb, "replay/t/meta", 13, b.ptr, b.len);
    assert_int_equal(store_batch_commit(s, sb, &err), 0);
    store_batch_free(sb);
    buf_free(&b);
}

static void test_cancel_and_resume(void **st) {
    (void)st;
    char dir[64];
    store *s = make_store(dir);
    ref want;
    serial(s, EXAMPLE, NULL, &want, NULL, NULL);
    for (unsigned w = 1; w <= 3; w += 2) {
        volatile sig_atomic_t stop = 1; /* stops at the first check */
        replay_opts o = {.workers = w, .persist = 1, .checkpoint_every = 300, .cancel = &stop};
        tm_err err;
        replay *r = replay_new(s, "t", EXAMPLE, strlen(EXAMPLE), "t.lua", &o, &err);
        assert_int_equal(replay_run(r, &err), REPLAY_CANCELLED);
        uint64_t at = replay_position(r);
        assert_true(at > 0 && at < NEV);
        replay_free(r);
        buf staged = BUF_INIT;
        dump(s, "replay/t/meta", &staged);
        assert_true(staged.len > 0);
        buf_free(&staged);
        /* a different script cannot resume it */
        const char *other = "return { partition = 'stream', on = { X = function() end } }";
        replay_opts o2 = {.resume = 1};
        r = replay_new(s, "t", other, strlen(other), "t.lua", &o2, &err);
        assert_int_equal(replay_run(r, &err), -1);
        assert_int_equal(err.code, TM_EINVAL);
        replay_free(r);
        if (w > 1) { /* staged by a tidemark that split partitions by another hash */
            drop_shard(s);
            r = replay_new(s, "t", EXAMPLE, strlen(EXAMPLE), "t.lua", &o2, &err);
            assert_int_equal(replay_run(r, &err), -1);
            assert_int_equal(err.code, TM_EINVAL);
            assert_non_null(strstr(err.msg, "older tidemark"));
            replay_free(r);
            /* start over, cancelled again at once, so the resume below has a stage */
            r = replay_new(s, "t", EXAMPLE, strlen(EXAMPLE), "t.lua", &o, &err);
            assert_int_equal(replay_run(r, &err), REPLAY_CANCELLED);
            replay_free(r);
        }
        /* resume: the worker count comes from the checkpoint */
        replay_opts o3 = {.workers = 2, .resume = 1, .checkpoint_every = 300};
        r = replay_new(s, "t", EXAMPLE, strlen(EXAMPLE), "t.lua", &o3, &err);
        assert_int_equal(replay_run(r, &err), 0);
        assert_int_equal(replay_workers(r), w);
        buf got = BUF_INIT;
        assert_int_equal(replay_state(r, &got, &err), 0);
        assert_same(&want.state, &got);
        buf_free(&got);
        replay_free(r);
        /* nothing left to resume */
        r = replay_new(s, "t", EXAMPLE, strlen(EXAMPLE), "t.lua", &o3, &err);
        assert_int_equal(replay_run(r, &err), -1);
        assert_int_equal(err.code, TM_ENOTFOUND);
        replay_free(r);
    }
    ref_free(&want);
    rm_store(s, dir);
}

/* Flip the last byte of the record at pos in its log block (format 3:
 * key = the block's last position, value = count, then length-prefixed
 * records). */
static void corrupt_record(const char *dir, uint64_t pos) {
    leveldb_options_t *o = leveldb_options_create();
    char *e = NULL;
    leveldb_t *db = leveldb_open(o, dir, &e);
    assert_null(e);
    leveldb_readoptions_t *ro = leveldb_readoptions_create();
    leveldb_iterator_t *it = leveldb_create_iterator(db, ro);
    char k[9] = {0x7f};
    for (int i = 0; i < 8; i++) k[1 + i] = (char)(pos >> (56 - 8 * i));
    leveldb_iter_seek(it, k, 9);
    assert_true(leveldb_iter_valid(it));
    size_t kl, vl;
    const char *key = leveldb_iter_key(it, &kl);
    char bk[9];
    memcpy(bk, key, 9);
    uint64_t last = 0;
    for (int i = 0; i < 8; i++) last = last << 8 | (unsigned char)bk[1 + i];
    const char *v = leveldb_iter_value(it, &vl);
    char *nv = malloc(vl);
    memcpy(nv, v, vl);
    leveldb_iter_destroy(it);
    const char *p = nv + 1, *end = nv + vl;
    uint64_t n = (unsigned char)nv[0], len = 0;
    for (uint64_t at = last - n + 1; at <= pos; at++) {
        assert_int_equal(buf_get_varint(&p, end, &len), 0);
        if (at < pos) p += len;
    }
    nv[(p - nv) + len - 1] ^= 1;
    leveldb_writeoptions_t *wo = leveldb_writeoptions_create();
    leveldb_put(db, wo, bk, 9, nv, vl, &e);
    assert_null(e);
    free(nv);
    leveldb_writeoptions_destroy(wo);
    leveldb_readoptions_destroy(ro);
    leveldb_close(db);
    leveldb_options_destroy(o);
}

/* A damaged record stops the run with the read error naming its position,
 * whether one worker reads it or a worker decodes what the reader routed;
 * it is not a projection fault. */
static void test_corrupt_record_stops_the_run(void **st) {
    (void)st;
    char dir[64];
    store *s = make_store(dir);
    store_close(s);
    corrupt_record(dir, 3001);
    tm_err err;
    s = store_open(dir, NULL, &err);
    assert_non_null(s);
    for (unsigned w = 1; w <= 3; w++) {
        int rc;
        replay *r = run_replay(s, EXAMPLE, w, w == 2, &err, &rc);
        assert_int_equal(rc, -1);
        assert_int_equal(err.code, TM_EIO);
        assert_non_null(strstr(err.msg, "position 3001"));
        assert_null(replay_fault(r));
        replay_free(r);
    }
    rm_store(s, dir);
}

static void test_shard(void **st) {
    (void)st;
    int seen[4] = {0};
    for (int i = 0; i < 1000; i++) {
        char k[16];
        int n = snprintf(k, sizeof k, "c-%d", i);
        unsigned j = replay_shard(k, (size_t)n, 4);
        assert_true(j < 4);
        assert_int_equal(j, replay_shard(k, (size_t)n, 4));
        seen[j]++;
    }
    for (int j = 0; j < 4; j++) assert_true(seen[j] > 150);
    assert_int_equal(replay_shard("x", 1, 1), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shard),
        cmocka_unit_test(test_parallel_equals_serial),
        cmocka_unit_test(test_persisted_states_equal_serial),
        cmocka_unit_test(test_wrong_guess_falls_back),
        cmocka_unit_test(test_forms_and_single_worker_reasons),
        cmocka_unit_test(test_fault_keeps_old_model),
        cmocka_unit_test(test_cancel_and_resume),
        cmocka_unit_test(test_corrupt_record_stops_the_run),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
