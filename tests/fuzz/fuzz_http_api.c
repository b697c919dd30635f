/* fuzz_http_api.c — libFuzzer target: the HTTP API's route handlers
 * (engine/api.c) with arbitrary requests against a real store.
 *
 * No sockets: api.h takes a parsed request (what http.c copies out of
 * evhttp), so the input is cut into its fields:
 *
 *   byte 0        route (low 3 bits: append, append through the async path
 *                 http.c uses, read stream, read all, list streams,
 *                 categories, health); bit 3: msgpack Content-Type;
 *                 bit 4: no Expected-Version header
 *   then, split at NUL bytes: query, stream, Expected-Version, body (the
 *   body is everything after the third NUL, NULs included).
 *
 * The store lives in a temporary directory for the whole run (opened once,
 * lose-on-os-crash: no fsync), so appends accumulate and reads see them.
 *
 * Properties, for any request:
 *   - no crash, no out-of-bounds access, no leak (ASan/UBSan/LSan);
 *   - every reply has a status this API documents and a body that is one
 *     valid JSON value; an error reply is {"error":"...","code":<status>...};
 *   - a 201 append grows the log by the number of events it names (or not
 *     at all: an idempotent retry), and its first event can be read back
 *     from /all at the position the reply gave;
 *   - the sync and async append paths agree on the status class;
 *   - a stream name survives api_url_encode -> api_url_decode.
 */
#define _GNU_SOURCE
#include "fuzz_common.h"

#include <ftw.h>
#include <pthread.h>
#include <unistd.h>

#include "api.h"
#include "buf.h"
#include "err.h"
#include "json.h"
#include "store.h"

static store *st;
static char dir[64];

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static void cleanup(void) {
    if (st) store_close(st);
    st = NULL;
    if (dir[0]) nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void open_store(void) {
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/fuzz-http-XXXXXX", tmp && strlen(tmp) < 40 ? tmp : "/tmp");
    if (!mkdtemp(dir)) fuzz_fail("mkdtemp %s", dir);
    store_opts o;
    store_opts_default(&o);
    o.durability = STORE_LOSE_ON_OS_CRASH;
    o.cache_bytes = 4u << 20;
    tm_err e;
    char path[96];
    snprintf(path, sizeof path, "%s/data", dir);
    st = store_open(path, &o, &e);
    if (!st) fuzz_fail("store_open: %s", e.msg);
    atexit(cleanup);
    /* A little content so reads find something. */
    api_request rq = {.method = "POST", .path = "/streams/order-1", .stream = "order-1",
                      .stream_len = 7,
                      .body = "[{\"type\":\"OrderPlaced\",\"data\":{\"total\":1}},{\"type\":\"Paid\"}]"};
    rq.body_len = strlen(rq.body);
    api_reply rp;
    api_reply_init(&rp);
    api_append(st, &rq, &rp);
    if (rp.status != 201) fuzz_fail("seed append: %d %.*s", rp.status, (int)rp.body.len, rp.body.ptr);
    api_reply_free(&rp);
}

static int documented(int status) {
    static const int ok[] = {200, 201, 400, 404, 409, 413, 503};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        if (ok[i] == status) return 1;
    return 0;
}

static void check_reply(const api_reply *rp, int route) {
    fuzz_assert(documented(rp->status), "route %d: undocumented status %d: %.300s", route,
                rp->status, rp->body.ptr ? rp->body.ptr : "");
    fuzz_assert(rp->body.len > 0, "route %d: empty body (status %d)", route, rp->status);
    buf mp = BUF_INIT;
    tm_err e;
    mp_limits lim = mp_default_limits;
    lim.max_size = rp->body.len * 2 + 64;
    fuzz_assert(json_to_mp(rp->body.ptr, rp->body.len, &lim, &mp, &e) == 0,
                "route %d: reply is not JSON (%s): %.300s", route, e.msg, rp->body.ptr);
    buf_free(&mp);
    if (rp->status >= 400) {
        char code[32];
        snprintf(code, sizeof code, ",\"code\":%d", rp->status);
        fuzz_assert(rp->body.len > 10 && memcmp(rp->body.ptr, "{\"error\":\"", 10) == 0 &&
                        memmem(rp->body.ptr, rp->body.len, code, strlen(code)),
                    "route %d: bad error body: %.300s", route, rp->body.ptr);
    }
}

/* Read the first number after `key` in a JSON reply (0 if absent). */
static unsigned long long json_num(const buf *b, const char *key) {
    const char *p = memmem(b->ptr, b->len, key, strlen(key));
    return p ? strtoull(p + strlen(key), NULL, 10) : 0;
}

/* ---- the async append, as http.c drives it ---- */

typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    api_append_op *op;
} waiter;

static void async_done(void *ud, int rc, const tm_err *err) {
    waiter *w = ud;
    api_append_result(w->op, rc, err);
    pthread_mutex_lock(&w->mu);
    w->done = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static void append_async(const api_request *rq, api_reply *rp) {
    api_append_op *op = api_append_parse(rq, rp);
    if (!op) return;
    waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, op};
    if (api_append_start(st, op, async_done, &w, rp) != 0) {
        api_append_free(op);
        return;
    }
    pthread_mutex_lock(&w.mu);
    while (!w.done) pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    api_append_finish(st, op, rp);
    api_append_free(op);
}

/* Split [p, end) at the next NUL: returns a malloc'd NUL-terminated copy. */
static char *field(const uint8_t **p, const uint8_t *end, size_t *len) {
    const uint8_t *z = memchr(*p, 0, (size_t)(end - *p));
    size_t n = z ? (size_t)(z - *p) : (size_t)(end - *p);
    char *s = malloc(n + 1);
    if (!s) abort();
    memcpy(s, *p, n);
    s[n] = '\0';
    *p = z ? z + 1 : end;
    if (len) *len = n;
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!st) open_store();
    if (size == 0) return 0;
    int sel = data[0];
    int route = sel & 7;
    const uint8_t *p = data + 1, *end = data + size;
    size_t qlen, slen, elen;
    char *query = field(&p, end, &qlen);
    char *stream = field(&p, end, &slen);
    char *expv = field(&p, end, &elen);
    char *body = fuzz_copy(p, (size_t)(end - p));   /* exact size: no NUL after it */
    size_t blen = (size_t)(end - p);

    char path[64];
    snprintf(path, sizeof path, "/streams/%.40s", stream);
    api_request rq = {
        .method = route <= 1 ? "POST" : "GET",
        .path = path,
        .query = (sel & 0x20) ? NULL : query,
        .stream = stream,
        .stream_len = slen,
        .content_type = (sel & 8) ? "application/msgpack" : "application/json",
        .expected_version = (sel & 16) ? NULL : expv,
        .body = body,
        .body_len = blen,
    };

    /* The stream name's percent-encoding round trip. */
    buf enc = BUF_INIT, dec = BUF_INIT;
    api_url_encode(&enc, stream, slen);
    fuzz_assert(api_url_decode(&dec, enc.ptr ? enc.ptr : "", enc.len, 0) == 0 && dec.len == slen &&
                    memcmp(dec.ptr, stream, slen) == 0,
                "url encode/decode round trip lost bytes");
    buf_free(&enc);
    buf_free(&dec);
    /* The query iterator terminates and never yields an unterminated key. */
    size_t pos = 0, n = 0;
    buf k = BUF_INIT, v = BUF_INIT;
    while (api_query_next(query, &pos, &k, &v)) {
        fuzz_assert(pos <= qlen && strlen(k.ptr) <= k.len, "query iterator overran");
        fuzz_assert(++n <= qlen, "query iterator does not advance");
    }
    buf_free(&k);
    buf_free(&v);

    uint64_t before = store_last_position(st);
    api_reply rp;
    api_reply_init(&rp);
    switch (route) {
    case 0: api_append(st, &rq, &rp); break;
    case 1: append_async(&rq, &rp); break;
    case 2: api_read_stream(st, &rq, &rp); break;
    case 3: api_read_all(st, &rq, &rp); break;
    case 4: api_list_streams(st, &rq, &rp); break;
    case 5: api_list_categories(st, &rq, &rp); break;
    default: api_health(st, &rp); break;
    }
    check_reply(&rp, route);

    if (route <= 1) {
        uint64_t after = store_last_position(st);
        if (rp.status == 201) {
            unsigned long long first = json_num(&rp.body, "\"first_position\":");
            unsigned long long last = json_num(&rp.body, "\"last_position\":");
            fuzz_assert(first >= 1 && last >= first && last <= after, "201 positions %llu..%llu, log at %llu",
                        first, last, (unsigned long long)after);
            fuzz_assert(after == before || after - before == last - first + 1,
                        "log grew by %llu for a 201 naming %llu events",
                        (unsigned long long)(after - before), last - first + 1);
            /* Read the first event back. */
            char q[64];
            snprintf(q, sizeof q, "from=%llu&limit=1", first);
            api_request rr = {.method = "GET", .path = "/all", .query = q, .body = "", .body_len = 0};
            api_reply r2;
            api_reply_init(&r2);
            api_read_all(st, &rr, &r2);
            check_reply(&r2, 3);
            char want[48];
            snprintf(want, sizeof want, "\"position\":%llu,", first);
            fuzz_assert(r2.status == 200 && memmem(r2.body.ptr, r2.body.len, want, strlen(want)),
                        "appended event %llu not readable: %.300s", first, r2.body.ptr);
            api_reply_free(&r2);
        } else {
            fuzz_assert(after == before, "a refused append (%d) changed the log", rp.status);
        }
        if (rp.status == 400) {
            /* The other path refuses the same request the same way (a 400
             * depends on the request alone, not on the store). */
            api_reply r3;
            api_reply_init(&r3);
            if (route == 0) append_async(&rq, &r3);
            else api_append(st, &rq, &r3);
            fuzz_assert(r3.status == 400, "sync/async paths disagree: 400 vs %d", r3.status);
            api_reply_free(&r3);
        }
    }
    api_reply_free(&rp);
    free(query);
    free(stream);
    free(expv);
    free(body);
    return 0;
}
