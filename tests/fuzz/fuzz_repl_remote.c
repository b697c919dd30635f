/* fuzz_repl_remote.c — libFuzzer target: what `tidemark repl --url` reads
 * from a server it does not control: HTTP replies (repl/replhttp.c: status
 * line, headers, Content-Length, chunked and until-EOF bodies, Server-Sent
 * Events), the JSON pages of events and names behind read(), queries and
 * listings (repl/replsrc.c), and JSON replies decoded into Lua values
 * (repllua_push_json: T.json_decode, tail's messages).
 *
 * No network: replhttp_set_connect hands the client one end of a
 * socketpair whose other end already holds the next canned reply.  The
 * input is
 *
 *   byte 0        what the REPL does (low 3 bits): 0 read everything,
 *                 1 read stream "order-1" backwards, 2 read category
 *                 "order", 3 read type "T" from position 2, 4 list streams,
 *                 5 list categories, 6 tail (SSE), 7 one request whose body
 *                 is decoded as JSON; bit 3: limit reads to 3 events
 *   then          the server's replies, one per connection, separated by
 *                 NUL bytes; ops 0-5 first open the source (GET /health).
 *                 After the last reply the server keeps sending that one
 *                 again (a server that ignores from / after), up to
 *                 MAX_CONN connections; then connecting fails.
 *
 * Properties, for any replies:
 *   - no crash, no out-of-bounds access, no leak (ASan/UBSan/LSan), and
 *     every call returns (no endless paging);
 *   - an event has a stream and a type, and its data and metadata are each
 *     one whole valid msgpack value (the scan's FFI decoder trusts them
 *     unchecked), which read() can turn into a Lua table;
 *   - a read returns each event once: positions (versions for a stream)
 *     strictly increase, strictly decrease backwards, and a limit holds;
 *   - a stream listing never repeats a name (names strictly increase).
 */
#define _GNU_SOURCE
#include "fuzz_common.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "buf.h"
#include "err.h"
#include "luamp.h"
#include "mp.h"
#include "repl.h"
#include "replhttp.h"
#include "replsrc.h"

#define MAX_REPLIES 64
#define MAX_CONN 32
#define URL "http://fuzz.invalid:1"

static const char *g_rep[MAX_REPLIES];
static size_t g_replen[MAX_REPLIES];
static int g_nrep, g_next, g_nconn;
static int g_peer[MAX_CONN];
static lua_State *L;

static int fake_connect(const char *host, const char *port, tm_err *err) {
    (void)host, (void)port;
    if (g_nrep == 0 || g_nconn >= MAX_CONN) return err_set(err, TM_EIO, "fuzz: no server");
    int i = g_next < g_nrep ? g_next++ : g_nrep - 1;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) fuzz_fail("socketpair");
    int sz = 1 << 20;
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    for (size_t off = 0; off < g_replen[i];) {
        ssize_t w = write(sv[1], g_rep[i] + off, g_replen[i] - off);
        if (w <= 0) fuzz_fail("writing the canned reply");
        off += (size_t)w;
    }
    shutdown(sv[1], SHUT_WR); /* the reply ends; the request is still accepted */
    g_peer[g_nconn++] = sv[1];
    return sv[0];
}

/* The checks every event from replsrc_next must pass. */
static void check_event(const tm_event *ev) {
    tm_err e;
    mp_limits lim = mp_default_limits; /* the store's depth; any size */
    lim.max_size = SIZE_MAX;
    fuzz_assert(ev->stream && ev->type, "event without stream or type");
    if (ev->data_len)
        fuzz_assert(mp_validate(ev->data, ev->data_len, &lim, &e) == 0, "event data: %s", e.msg);
    if (ev->meta_len)
        fuzz_assert(mp_validate(ev->meta, ev->meta_len, &lim, &e) == 0, "event metadata: %s", e.msg);
    int top = lua_gettop(L);
    fuzz_assert(luamp_push_event_opt(L, ev, LUAMP_RAW_EXT, &e) == 0, "read() event: %s", e.msg);
    lua_settop(L, top);
}

static void do_read(replsrc *src, replsrc_kind kind, const char *name, uint64_t from, int backward,
                    uint64_t limit) {
    replsrc_sel sel = {kind, name, name ? strlen(name) : 0, from, backward, limit};
    tm_err e;
    replsrc_iter *it = replsrc_read(src, &sel, &e);
    if (!it) return;
    tm_event ev;
    uint64_t n = 0, prev = 0;
    int rc;
    while ((rc = replsrc_next(it, &ev, &e)) == 1) {
        check_event(&ev);
        uint64_t cur = kind == REPLSRC_STREAM ? ev.version : ev.position;
        if (n)
            fuzz_assert(backward ? cur < prev : cur > prev, "event %llu after %llu",
                        (unsigned long long)cur, (unsigned long long)prev);
        prev = cur;
        n++;
        fuzz_assert(!limit || n <= limit, "more than the limit of %llu events",
                    (unsigned long long)limit);
    }
    replsrc_iter_free(it);
}

typedef struct names {
    buf last;
    int n;
    int ordered; /* streams: names must strictly increase */
} names;

static int on_name(void *ud, const char *name, size_t len, int64_t version) {
    names *a = ud;
    (void)version;
    if (a->ordered && a->n) {
        size_t m = len < a->last.len ? len : a->last.len;
        int c = memcmp(name, a->last.ptr, m);
        fuzz_assert(c > 0 || (c == 0 && len > a->last.len), "stream name repeated or out of order");
    }
    buf_reset(&a->last);
    buf_append(&a->last, name, len);
    a->n++;
    return 0;
}

static void do_list(replsrc *src, int categories) {
    names a = {BUF_INIT, 0, !categories};
    tm_err e;
    if (categories) replsrc_list_categories(src, on_name, &a, &e);
    else replsrc_list_streams(src, on_name, &a, &e);
    buf_free(&a.last);
}

static void push_json(const char *p, size_t n) {
    tm_err e;
    int top = lua_gettop(L);
    if (repllua_push_json(L, p, n, &e) == 0) fuzz_assert(lua_gettop(L) == top + 1, "stack");
    else fuzz_assert(lua_gettop(L) == top, "stack after an error");
    lua_settop(L, top);
}

static void do_tail(void) {
    tm_err e;
    replhttp *h = replhttp_open(URL, "GET", "/all/live", "Accept: text/event-stream\r\n", NULL,
                                NULL, 0, NULL, &e);
    if (!h) return;
    buf data = BUF_INIT;
    while (replhttp_sse_next(h, &data, &e) == 1) {
        fuzz_assert(data.len > 0, "an empty SSE message was delivered");
        push_json(data.ptr, data.len);
    }
    buf_free(&data);
    replhttp_close(h);
}

static void do_request(void) {
    tm_err e;
    buf body = BUF_INIT;
    int status = 0;
    if (replhttp_request(URL, "GET", "/projections/p", NULL, NULL, 0, NULL, &status, &body, &e) == 0)
        push_json(body.ptr ? body.ptr : "", body.len);
    buf_free(&body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!L) {
        L = luaL_newstate();
        luaL_openlibs(L);
        replhttp_set_connect(fake_connect);
    }
    if (size < 1 || size > 65536) return 0;
    char *in = fuzz_copy(data, size);
    int op = in[0] & 7;
    uint64_t limit = in[0] & 8 ? 3 : 0;
    g_nrep = g_next = g_nconn = 0;
    const char *p = in + 1, *end = in + size;
    while (g_nrep < MAX_REPLIES) {
        const char *z = memchr(p, 0, (size_t)(end - p));
        g_rep[g_nrep] = p;
        g_replen[g_nrep++] = (size_t)((z ? z : end) - p);
        if (!z) break;
        p = z + 1;
    }

    if (op == 6) {
        do_tail();
    } else if (op == 7) {
        do_request();
    } else {
        tm_err e;
        replsrc *src = replsrc_open_remote(URL, &e);
        if (src) {
            switch (op) {
            case 0: do_read(src, REPLSRC_ALL, NULL, 0, 0, limit); break;
            case 1: do_read(src, REPLSRC_STREAM, "order-1", UINT64_MAX, 1, limit); break;
            case 2: do_read(src, REPLSRC_CATEGORY, "order", 0, 0, limit); break;
            case 3: do_read(src, REPLSRC_TYPE, "T", 2, 0, limit); break;
            case 4: do_list(src, 0); break;
            case 5: do_list(src, 1); break;
            }
            replsrc_close(src);
        }
    }
    for (int i = 0; i < g_nconn; i++) close(g_peer[i]);
    free(in);
    return 0;
}
