/* repllua.c — the REPL's Lua state (see repl.h).
 *
 * Owns:
 *   - the session's sandbox (sandbox.h, the projections' sandbox: no io,
 *     package, debug, ffi, jit, string.dump, text-only loadstring, capped
 *     memory, a CPU watchdog) plus a read-only os subset (time, clock,
 *     date) and tm (sketches); memory cap REPL_MEM_LIMIT, CPU limit per
 *     command from --cpu-limit;
 *   - the built-in C functions the prelude (prelude.lua, compiled in) uses
 *     (scans and reads are in replscan.c, projections in replproj.c):
 *     listing, append, tail over SSE, HTTP, JSON encoding, output; the
 *     prelude also gets the ffi module and the projection runtime's
 *     msgpack decoder (proj_mp.h), never reachable from user code;
 *   - evaluation with the lua.c rules (expression first, "<eof>" means
 *     incomplete), tracebacks, and Ctrl-C.
 *
 * Ctrl-C: the SIGINT handler sets a flag and a count hook (as lua.c does);
 * interpreted Lua stops at the next instruction, C loops here poll the
 * flag per event.  JIT-compiled loops never run hooks (DESIGN.md), so a
 * second Ctrl-C within 2 s of the first, while the code still runs,
 * siglongjmps back to the prompt and abandons the whole Lua state (it is
 * not closed: its memory is leaked on purpose, it may be inconsistent) and
 * a fresh one replaces it; the user is told that globals were lost.
 */
#define _GNU_SOURCE
#include <lauxlib.h>
#include <lualib.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "json.h"
#include "mp.h"
#include "lsketch.h"
#include "luamp.h"
#include "proj_mp.h"
#include "repl.h"
#include "replhttp.h"
#include "replproj.h"

static const char prelude_src[] =
#include "repl_prelude.h"
    ;

#define REPL_MEM_LIMIT ((size_t)2 << 30) /* generous: the user owns the data */

/* ------------------------------------------------------------ interrupts */

static volatile sig_atomic_t g_intr;     /* Ctrl-C pending (read as int by the prelude) */
_Static_assert(sizeof(sig_atomic_t) == sizeof(int), "the prelude reads g_intr as an int");
static volatile sig_atomic_t g_running;  /* Lua code is running */
static volatile sig_atomic_t g_can_jump; /* g_jmp is armed */
static lua_State *volatile g_L;
static volatile double g_first_intr;
static sigjmp_buf g_jmp;

int repl_cancel_requested(void) { return g_intr; }
void repl_cancel_clear(void) { g_intr = 0; }
volatile sig_atomic_t *repl_cancel_flag(void) { return &g_intr; }
int repl_jump_hold(void) {
    int was = g_can_jump;
    g_can_jump = 0;
    return was;
}
void repl_jump_release(int held) { g_can_jump = held; }

static void (*volatile g_abort)(void);
void repl_set_abort(void (*fn)(void)) { g_abort = fn; }

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void intr_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    lua_pushstring(L, "interrupted"); /* no position: the same text everywhere */
    lua_error(L);
}

static pthread_t g_main_thread;

static void on_sigint(int sig) {
    (void)sig;
    if (!pthread_equal(pthread_self(), g_main_thread)) {
        /* a helper thread (LevelDB's, started later) took it: pass it on */
        pthread_kill(g_main_thread, SIGINT);
        return;
    }
    double now = mono();
    if (g_running && g_intr && g_can_jump && now - g_first_intr < 2.0) {
        g_can_jump = 0;
        siglongjmp(g_jmp, 1);
    }
    if (g_running && g_intr && !g_can_jump && g_abort && now - g_first_intr < 2.0) {
        g_abort(); /* threads of a parallel run that do not answer */
        return;
    }
    __atomic_store_n(&g_intr, 1, __ATOMIC_RELAXED); /* read by replay threads */
    g_first_intr = now;
    if (g_running && g_L)
        lua_sethook(g_L, intr_hook, LUA_MASKCOUNT, 1);
}

static void install_sigint(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: a Ctrl-C at the prompt ends readline() */
    sigaction(SIGINT, &sa, NULL);
}

/* --------------------------------------------------------- the allocator */

/* ------------------------------------------------------------ C builtins */

/* The interrupt error: plain "interrupted", no position prefix. */
int repllua_interrupted(lua_State *L) {
    lua_pushstring(L, "interrupted");
    return lua_error(L);
}

repl *repllua_session(lua_State *L) {
    return (repl *)lua_touserdata(L, lua_upvalueindex(1));
}

/* Raise a Lua error for e and remember its exit status. */
int repllua_raise(lua_State *L, repl *r, const tm_err *e) {
    r->fail_code = e->code ? e->code : 1;
    lua_pushfstring(L, "%s", e->msg[0] ? e->msg : err_code_name(e->code));
    lua_pushinteger(L, r->fail_code);
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.fail_code");
    return lua_error(L);
}

static int t_last_position(lua_State *L) {
    repl *r = repllua_session(L);
    tm_err e;
    err_clear(&e);
    uint64_t pos;
    if (replsrc_last_position(r->src, &pos, &e) < 0) return repllua_raise(L, r, &e);
    lua_pushnumber(L, (lua_Number)pos);
    return 1;
}

typedef struct name_acc {
    lua_State *L;
    int n, with_version;
} name_acc;

static int add_name(void *ud, const char *name, size_t len, int64_t version) {
    name_acc *a = ud;
    if (a->with_version) {
        lua_createtable(a->L, 2, 0);
        lua_pushlstring(a->L, name, len);
        lua_rawseti(a->L, -2, 1);
        if (version >= 0) lua_pushnumber(a->L, (lua_Number)version);
        else lua_pushnil(a->L);
        lua_rawseti(a->L, -2, 2);
    } else {
        lua_pushlstring(a->L, name, len);
    }
    lua_rawseti(a->L, -2, ++a->n);
    return g_intr != 0;
}

/* T.streams() -> { {name, version}, ... };  T.categories() -> { name, ... } */
static int list_names(lua_State *L, int streams) {
    repl *r = repllua_session(L);
    tm_err e;
    err_clear(&e);
    lua_newtable(L);
    name_acc a = {L, 0, streams};
    int rc = streams ? replsrc_list_streams(r->src, add_name, &a, &e)
                     : replsrc_list_categories(r->src, add_name, &a, &e);
    if (rc < 0) return repllua_raise(L, r, &e);
    return 1;
}
static int t_streams(lua_State *L) { return list_names(L, 1); }
static int t_categories(lua_State *L) { return list_names(L, 0); }

/* T.json(v) -> JSON text, or nil + message for values JSON cannot hold. */
static int t_json(lua_State *L) {
    buf mp = BUF_INIT, out = BUF_INIT;
    tm_err e;
    err_clear(&e);
    lua_settop(L, 1);
    if (luamp_encode_opt(L, 1, "value", LUAMP_NAN, &mp, &e) < 0) { /* NaN prints as null */
        buf_free(&mp);
        lua_pushnil(L);
        lua_pushstring(L, e.msg);
        return 2;
    }
    if (json_from_mp(mp.ptr, mp.len, &out, &e) < 0) {
        buf_free(&mp);
        buf_free(&out);
        lua_pushnil(L);
        lua_pushstring(L, e.msg);
        return 2;
    }
    lua_pushlstring(L, out.ptr ? out.ptr : "", out.len);
    buf_free(&mp);
    buf_free(&out);
    return 1;
}

int repllua_push_json(lua_State *L, const char *text, size_t len, tm_err *err) {
    buf mp = BUF_INIT;
    mp_limits lim = mp_default_limits; /* a state may exceed 1 MiB: the reply bounds it */
    lim.max_size = len * 4 + 64;       /* (msgpack is at most 3 times the JSON) */
    int rc = json_to_mp(text ? text : "", len, &lim, &mp, err);
    if (rc == 0) rc = luamp_push(L, mp.ptr, mp.len, err);
    buf_free(&mp);
    return rc;
}

/* T.json_decode(text) -> value, or nil + message (replies, projection
 * states: the server's text is untrusted). */
static int t_json_decode(lua_State *L) {
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    tm_err e;
    err_clear(&e);
    if (repllua_push_json(L, s, n, &e) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, e.msg);
        return 2;
    }
    return 1;
}

static int t_write(lua_State *L) {
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    fwrite(s, 1, n, lua_toboolean(L, 2) ? stderr : stdout);
    return 0;
}

static int t_flush(lua_State *L) {
    fflush(stdout);
    return 0;
}

static int t_clock(lua_State *L) {
    lua_pushnumber(L, mono());
    return 1;
}

static int t_interrupted(lua_State *L) {
    lua_pushboolean(L, g_intr != 0);
    return 1;
}

/* T.intr_addr() -> lightuserdata: the address of the Ctrl-C flag, read by
 * the prelude's scan loop through the FFI (a volatile load per event,
 * which JIT-compiled code keeps doing, unlike hooks). */
static int t_intr_addr(lua_State *L) {
    lua_pushlightuserdata(L, (void *)&g_intr);
    return 1;
}

/* T.ack_interrupt(): a Ctrl-C was the normal end of something (tail):
 * clear the flag and the pending hook so the chunk goes on. */
static int t_ack_interrupt(lua_State *L) {
    lua_sethook(L, NULL, 0, 0);
    g_intr = 0;
    return 0;
}

static int t_sleep(lua_State *L) {
    double s = luaL_checknumber(L, 1);
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL); /* Ctrl-C cuts it short (EINTR) */
    return 0;
}

static int t_info(lua_State *L) {
    repl *r = repllua_session(L);
    lua_newtable(L);
    lua_pushboolean(L, replsrc_is_remote(r->src));
    lua_setfield(L, -2, "remote");
    lua_pushstring(L, replsrc_where(r->src));
    lua_setfield(L, -2, "where");
    lua_pushboolean(L, r->interactive);
    lua_setfield(L, -2, "interactive");
    return 1;
}

static int t_quit(lua_State *L) {
    repllua_session(L)->quit = 1;
    return 0;
}

static int t_set_fail(lua_State *L) {
    repllua_session(L)->fail_code = (int)luaL_checkinteger(L, 1);
    return 0;
}

/* T.http(method, path [, body [, content_type]]) -> status, body (remote only). */
static int t_http(lua_State *L) {
    repl *r = repllua_session(L);
    const char *method = luaL_checkstring(L, 1), *path = luaL_checkstring(L, 2);
    size_t bl = 0;
    const char *body = luaL_optlstring(L, 3, NULL, &bl);
    const char *ct = luaL_optstring(L, 4, NULL);
    if (!replsrc_is_remote(r->src)) return luaL_error(L, "not connected to a server");
    buf out = BUF_INIT;
    int status = 0;
    tm_err e;
    err_clear(&e);
    if (replhttp_request(replsrc_where(r->src), method, path, ct, body, bl, repl_cancel_requested,
                         &status, &out, &e) < 0) {
        buf_free(&out);
        if (g_intr) return repllua_interrupted(L);
        return repllua_raise(L, r, &e);
    }
    lua_pushinteger(L, status);
    lua_pushlstring(L, out.ptr ? out.ptr : "", out.len);
    buf_free(&out);
    return 2;
}

static int t_escape(lua_State *L) {
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    buf out = BUF_INIT;
    replhttp_escape(&out, s, n);
    lua_pushlstring(L, out.ptr ? out.ptr : "", out.len);
    buf_free(&out);
    return 1;
}

/* T.sse(path, fn): remote live feed; calls fn(event) per SSE message until
 * Ctrl-C (returns normally) or the server closes. */
static int t_sse(lua_State *L) {
    repl *r = repllua_session(L);
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (!replsrc_is_remote(r->src)) return luaL_error(L, "not connected to a server");
    tm_err e;
    err_clear(&e);
    replhttp *h = replhttp_open(replsrc_where(r->src), "GET", path,
                                "Accept: text/event-stream\r\n", NULL, NULL, 0,
                                repl_cancel_requested, &e);
    if (!h) return g_intr ? 0 : repllua_raise(L, r, &e);
    if (replhttp_status(h) != 200) {
        int st = replhttp_status(h);
        replhttp_close(h);
        return luaL_error(L, "GET %s: HTTP %d", path, st);
    }
    buf data = BUF_INIT;
    int failed = 0, rc;
    lua_pushcfunction(L, repllua_traceback);
    int msgh = lua_gettop(L);
    while ((rc = replhttp_sse_next(h, &data, &e)) == 1) {
        lua_pushvalue(L, 2);
        tm_err je; /* a message that is not JSON reaches fn as nil */
        if (repllua_push_json(L, data.ptr, data.len, &je) < 0) lua_pushnil(L);
        if (lua_pcall(L, 1, 0, msgh)) {
            failed = 1;
            break;
        }
    }
    if (rc < 0 && !g_intr) failed = 2;
    buf_free(&data);
    replhttp_close(h);
    if (failed == 1) return lua_error(L);
    if (failed == 2) return repllua_raise(L, r, &e);
    return 0;
}

static int t_set_timing(lua_State *L) {
    lua_pushboolean(L, lua_toboolean(L, 1));
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.timing");
    return 0;
}

/* T.read_file(path) -> text, or nil + message (load()/run() of projection
 * files and -f scripts; reading is all the REPL allows on files). */
static int t_read_file(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    FILE *f = fopen(path, "rb");
    if (!f) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", path, strerror(errno));
        return 2;
    }
    buf b = BUF_INIT;
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) buf_append(&b, tmp, n);
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        buf_free(&b);
        lua_pushnil(L);
        lua_pushfstring(L, "%s: read error", path);
        return 2;
    }
    lua_pushlstring(L, b.ptr ? b.ptr : "", b.len);
    buf_free(&b);
    return 1;
}

/* First element of the array under `key` in a msgpack map, as uint. */
static int first_uint(const buf *b, const char *key, uint64_t *out) {
    const char *v;
    size_t vl;
    mp_item it;
    if (mp_map_find(b->ptr, b->len, key, strlen(key), &v, &vl) != 1) return -1;
    const char *end = v + vl;
    if (mp_next(&v, end, &it) < 0 || it.type != MP_ARRAY || it.v.n < 1) return -1;
    if (mp_next(&v, end, &it) < 0 || it.type != MP_UINT) return -1;
    *out = it.v.u;
    return 0;
}

/* T.append(stream, type, data [, metadata]) -> position, version. */
static int t_append(lua_State *L) {
    repl *r = repllua_session(L);
    size_t sl, tl;
    const char *stream = luaL_checklstring(L, 1, &sl);
    const char *type = luaL_checklstring(L, 2, &tl);
    tm_err e;
    err_clear(&e);
    buf data = BUF_INIT, meta = BUF_INIT;
    if (luamp_encode_opt(L, 3, "data", LUAMP_NAN, &data, &e) < 0 ||
        (!lua_isnoneornil(L, 4) && luamp_encode_opt(L, 4, "metadata", LUAMP_NAN, &meta, &e) < 0)) {
        buf_free(&data);
        buf_free(&meta);
        return luaL_error(L, "append: %s", e.msg);
    }
    uint64_t pos = 0, ver = 0;
    int rc;
    if (!replsrc_is_remote(r->src)) {
        tm_event ev;
        memset(&ev, 0, sizeof ev);
        ev.stream = stream;
        ev.stream_len = sl;
        ev.type = type;
        ev.type_len = tl;
        ev.data = data.ptr;
        ev.data_len = data.len;
        ev.meta = meta.ptr;
        ev.meta_len = meta.len;
        rc = store_append(replsrc_store(r->src), &ev, 1, NULL, 0, &e);
        pos = ev.position;
        ver = ev.version;
    } else {
        buf body = BUF_INIT, reply = BUF_INIT, path = BUF_INIT, mp = BUF_INIT;
        /* {"type":..,"data":..,"metadata":..} as msgpack */
        buf_putc(&body, (char)(meta.len ? 0x83 : 0x82));
        buf_putc(&body, (char)0xa4);
        buf_puts(&body, "type");
        if (tl < 32) buf_putc(&body, (char)(0xa0 | tl));
        else {
            buf_putc(&body, (char)0xd9);
            buf_putc(&body, (char)tl);
        }
        buf_append(&body, type, tl);
        buf_putc(&body, (char)0xa4);
        buf_puts(&body, "data");
        buf_append(&body, data.ptr, data.len);
        if (meta.len) {
            buf_putc(&body, (char)0xa8);
            buf_puts(&body, "metadata");
            buf_append(&body, meta.ptr, meta.len);
        }
        buf_puts(&path, "/streams/");
        replhttp_escape(&path, stream, sl);
        int status = 0;
        rc = replhttp_request(replsrc_where(r->src), "POST", path.ptr, "application/msgpack",
                              body.ptr, body.len, repl_cancel_requested, &status, &reply, &e);
        if (rc == 0 && (status < 200 || status > 299)) {
            rc = err_set(&e, status == 409 ? TM_ECONFLICT : status >= 500 ? TM_EIO : TM_EINVAL,
                         "POST %s: HTTP %d: %.200s", path.ptr, status, reply.ptr ? reply.ptr : "");
        } else if (rc == 0) {
            if (json_to_mp(reply.ptr ? reply.ptr : "", reply.len, NULL, &mp, &e) < 0 ||
                first_uint(&mp, "positions", &pos) < 0 || first_uint(&mp, "versions", &ver) < 0)
                rc = err_set(&e, TM_EIO, "POST %s: unexpected reply", path.ptr);
        }
        buf_free(&body);
        buf_free(&reply);
        buf_free(&path);
        buf_free(&mp);
    }
    buf_free(&data);
    buf_free(&meta);
    if (rc < 0) return repllua_raise(L, r, &e);
    lua_pushnumber(L, (lua_Number)pos);
    lua_pushnumber(L, (lua_Number)ver);
    return 2;
}

static const luaL_Reg t_funcs[] = {
    {"append", t_append},
    {"set_timing", t_set_timing},
    {"read_file", t_read_file},
    {"last_position", t_last_position},
    {"streams", t_streams},
    {"categories", t_categories},
    {"json", t_json},
    {"json_decode", t_json_decode},
    {"write", t_write},
    {"flush", t_flush},
    {"clock", t_clock},
    {"interrupted", t_interrupted},
    {"intr_addr", t_intr_addr},
    {"ack_interrupt", t_ack_interrupt},
    {"sleep", t_sleep},
    {"info", t_info},
    {"quit", t_quit},
    {"set_fail", t_set_fail},
    {"http", t_http},
    {"escape", t_escape},
    {"sse", t_sse},
    {NULL, NULL},
};

/* ------------------------------------------------------------ the state */

/* Message handler: message + a short traceback (at most 8 frames), unless
 * the message already carries one (re-raised from a scan). */
int repllua_traceback(lua_State *L) {
    lua_sethook(L, NULL, 0, 0); /* a pending Ctrl-C hook must not fire in here */
    if (!lua_checkstack(L, 40)) return 1; /* stack overflow: the bare message */
    const char *msg = lua_tostring(L, 1);
    if (!msg) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    if (strstr(msg, "\nstack traceback:") || !strcmp(msg, "interrupted")) {
        lua_pushstring(L, msg);
        return 1;
    }
    luaL_traceback(L, L, msg, 1);
    /* keep it short: cut after 8 frames, drop the REPL's own frames */
    size_t n;
    const char *tb = lua_tolstring(L, -1, &n);
    buf out = BUF_INIT;
    int frames = -1;
    for (const char *p = tb; p < tb + n;) {
        const char *e = memchr(p, '\n', (size_t)(tb + n - p));
        size_t ll = e ? (size_t)(e - p) : (size_t)(tb + n - p);
        int skip = frames >= 0 && (memmem(p, ll, "[C]: in function 'xpcall'", 25) ||
                                   memmem(p, ll, "[C]: in function 'pcall'", 24) ||
                                   memmem(p, ll, "[C]: ?", 6) || memmem(p, ll, "tidemark:", 9));
        if (!skip && frames < 8) {
            if (out.len) buf_putc(&out, '\n');
            buf_append(&out, p, ll);
        }
        if (!skip) frames++;
        p += ll + 1;
    }
    if (frames > 8) buf_puts(&out, "\n\t...");
    lua_pushlstring(L, out.ptr, out.len);
    buf_free(&out);
    return 1;
}

/* The sandbox (sandbox.h) has no os; the REPL adds the parts that cannot
 * touch the system: time, clock, date, difftime. */
static void add_os_subset(lua_State *L) {
    lua_pushcfunction(L, luaopen_os);
    lua_call(L, 0, 1);
    lua_createtable(L, 0, 4);
    static const char *const keep[] = {"time", "clock", "date", "difftime", NULL};
    for (int i = 0; keep[i]; i++) {
        lua_getfield(L, -2, keep[i]);
        lua_setfield(L, -2, keep[i]);
    }
    lua_setglobal(L, "os");
    lua_pop(L, 1);
}

/* What a query worker's state may call (replpar.c): no I/O, nothing of
 * the session but the lazy event fields. */
static const luaL_Reg t_worker_funcs[] = {
    {"json", t_json},   {"json_decode", t_json_decode}, {"clock", t_clock},
    {"intr_addr", t_intr_addr}, {NULL, NULL},
};

/* In a worker: the REPL's I/O and unknown globals are not there; touching
 * them raises T.PAR_FALLBACK and the query runs serially. */
static int t_fallback(lua_State *L) {
    lua_pushstring(L, REPLPAR_FALLBACK);
    return lua_error(L);
}

static void strict_table(lua_State *L, int idx) {
    lua_newtable(L);
    lua_pushcfunction(L, t_fallback);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, t_fallback);
    lua_setfield(L, -2, "__newindex");
    lua_setmetatable(L, idx);
}

static void worker_lockdown(lua_State *L, int tidx) {
    static const char *const io[] = {"scan", "read", "write", "flush", "append", "streams",
                                     "categories", "last_position", "sse", "http", "sleep",
                                     "proj", "quit", "read_file", NULL};
    for (int i = 0; io[i]; i++) {
        lua_pushnil(L);
        lua_setfield(L, tidx, io[i]);
    }
    strict_table(L, tidx);
    lua_pushcfunction(L, t_fallback);
    lua_setglobal(L, "print");
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    strict_table(L, lua_gettop(L));
    lua_pop(L, 1);
}

static int open_state(lua_State *L) {
    repl *r = lua_touserdata(L, 1);
    sandbox *sb = lua_touserdata(L, 2);
    int worker = lua_toboolean(L, 3);
    add_os_subset(L);
    lua_pushcfunction(L, luaopen_tidemark_sketch);
    lua_call(L, 0, 1);
    lua_setglobal(L, "tm");
    lua_newtable(L); /* T */
    lua_pushlightuserdata(L, r);
    luaL_openlib(L, NULL, worker ? t_worker_funcs : t_funcs, 1);
    if (worker) {
        lua_pushcfunction(L, t_fallback);
        lua_setfield(L, -2, "write"); /* the prelude keeps it in a local */
    }
    replscan_register(L, r);
    if (!worker) {
        replproj_register(L, r);
        replpar_register(L, r);
    }
    int tidx = lua_gettop(L);
    if (luaL_loadbuffer(L, prelude_src, sizeof prelude_src - 1, "=tidemark")) return lua_error(L);
    lua_pushvalue(L, tidx);
    sandbox_push_ffi(sb); /* for the prelude only; never a global */
    /* the projection runtime's msgpack decoder: ext values as their payload
     * strings (the REPL shows foreign data), NaN map keys dropped */
    tm_err e;
    err_clear(&e);
    if (proj_mp_push(sb, NULL, PROJ_MP_DROP_NAN_KEYS, &e) < 0) return luaL_error(L, "%s", e.msg);
    lua_call(L, 3, 1); /* the prelude returns its show(...) function */
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.show");
    lua_getfield(L, tidx, "dot");
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.dot");
    lua_getfield(L, tidx, "complete");
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.complete");
    lua_getfield(L, tidx, "runner");
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.runner");
    lua_getfield(L, tidx, "batch_done");
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.batch_done");
    lua_getfield(L, tidx, "types");
    replscan_publish_types(L, lua_gettop(L));
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.types");
    if (worker) {
        lua_getfield(L, tidx, "pbuild");
        lua_setfield(L, LUA_REGISTRYINDEX, "tm.pbuild");
        worker_lockdown(L, tidx);
    }
    return 0;
}

static void print_line(void *ud, const char *line, size_t len) {
    (void)ud;
    fwrite(line, 1, len, stdout);
    fputc('\n', stdout);
}

/* The CPU limit's hard stage (a JIT-compiled loop ran past the limit and
 * the grace period), on the watchdog thread: it may not touch the Lua
 * state, so it does what a user would: Ctrl-C twice, which makes the main
 * thread abandon the state (see on_sigint). */
static volatile sig_atomic_t g_cpu_abort;

static void on_hard_limit(void *ud, double limit) {
    (void)ud;
    (void)limit;
    g_cpu_abort = 1;
    pthread_kill(g_main_thread, SIGINT);
    struct timespec ts = {0, 100 * 1000 * 1000};
    nanosleep(&ts, NULL);
    pthread_kill(g_main_thread, SIGINT);
}

/* A sandbox with the prelude: the session's, or a query worker's (none
 * of the REPL's I/O).  SIGINT must reach the main thread only: the
 * sandbox's watchdog thread inherits the mask it is created with. */
static sandbox *make_state(repl *r, void (*hard)(void *, double), void *ud, int worker,
                           tm_err *err) {
    sandbox_opts o;
    memset(&o, 0, sizeof o);
    o.memory_limit = REPL_MEM_LIMIT;
    o.cpu_limit = r->cpu_limit;
    o.on_hard_limit = hard;
    o.ud = ud;
    o.print = print_line;
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    sandbox *sb = sandbox_new(&o, err);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!sb) return NULL;
    lua_State *L = sandbox_lua(sb);
    lua_pushcfunction(L, open_state);
    lua_pushlightuserdata(L, r);
    lua_pushlightuserdata(L, sb);
    lua_pushboolean(L, worker);
    if (lua_pcall(L, 3, 0, 0)) {
        err_set(err, TM_EINVAL, "prelude: %s", lua_tostring(L, -1));
        sandbox_free(sb);
        return NULL;
    }
    return sb;
}

sandbox *repllua_open_worker(repl *r, void (*on_hard_limit)(void *, double), void *ud,
                             tm_err *err) {
    return make_state(r, on_hard_limit, ud, 1, err);
}

int repllua_open(repl *r) {
    tm_err e;
    err_clear(&e);
    g_main_thread = pthread_self();
    sandbox *sb = make_state(r, on_hard_limit, r, 0, &e);
    if (!sb) {
        fprintf(stderr, "tidemark repl: cannot create a Lua state: %s\n", e.msg);
        return -1;
    }
    r->sb = sb;
    r->L = sandbox_lua(sb);
    install_sigint();
    return 0;
}

void repllua_close(repl *r) {
    replpar_close();
    if (r->sb) sandbox_free(r->sb);
    r->sb = NULL;
    r->L = NULL;
}

/* ------------------------------------------------------------ evaluation */

static int incomplete(lua_State *L) {
    size_t n;
    const char *msg = lua_tolstring(L, -1, &n);
    /* LuaJIT: "... near '<eof>'" (lua.c checks the same suffix) */
    return msg && ((n >= 7 && !strcmp(msg + n - 7, "'<eof>'")) ||
                   (n >= 5 && !strcmp(msg + n - 5, "<eof>")));
}

static void print_error(repl *r, const char *msg) {
    fflush(stdout);
    fprintf(stderr, "error: %s%s\n", msg ? msg : "(no message)",
            /* LuaJIT's answer when a stack overflow leaves no room for the handler */
            msg && !strcmp(msg, "error in error handling") ? " (stack overflow?)" : "");
    fflush(stderr);
    (void)r;
}

/* Run the function at the top (below it: nothing of ours) with nargs
 * arguments under interrupt handling.  Returns the lua_pcall status, or
 * -2 after a hard abort (the state was replaced). */
static int protected_call(repl *r, int nargs, int nres) {
    lua_State *L = r->L;
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, repllua_traceback);
    lua_insert(L, base);
    g_L = L;
    if (sigsetjmp(g_jmp, 1)) {
        g_running = 0;
        g_can_jump = 0;
        g_intr = 0;
        fflush(stdout);
        if (g_cpu_abort)
            fprintf(stderr, "\naborted: CPU limit exceeded (%gs) in a JIT-compiled loop; "
                            "the Lua state was reset, globals are lost\n", r->cpu_limit);
        else
            fprintf(stderr,
                    "\naborted: the code did not respond to Ctrl-C (a JIT-compiled loop?); "
                    "the Lua state was reset, globals are lost\n");
        g_cpu_abort = 0;
        /* abandoned, not closed: it may be inconsistent (its watchdog
         * thread stays idle) */
        r->L = NULL;
        r->sb = NULL;
        if (repllua_open(r) < 0) exit(4);
        r->fail_code = 1;
        return -2;
    }
    g_can_jump = 1;
    g_running = 1;
    if (g_intr) /* Ctrl-C arrived while compiling: honour it now */
        lua_sethook(L, intr_hook, LUA_MASKCOUNT, 1);
    sandbox_enter(r->sb);
    int st = lua_pcall(L, nargs, nres, base);
    sandbox_leave(r->sb);
    g_running = 0;
    g_can_jump = 0;
    lua_sethook(L, NULL, 0, 0);
    lua_remove(L, base);
    return st;
}

static int take_fail_code(lua_State *L) {
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.fail_code");
    int c = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : 1;
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.fail_code");
    return c;
}

static repllua_result call_and_show(repl *r, double t0) {
    lua_State *L = r->L;
    int st = protected_call(r, 0, LUA_MULTRET);
    if (st == -2) return REPLLUA_ERROR;
    L = r->L;
    if (st) {
        const char *m = lua_tostring(L, -1);
        print_error(r, m);
        r->fail_code = take_fail_code(L);
        if (m && !strcmp(m, "interrupted")) r->fail_code = 130;
        lua_settop(L, 0);
        g_intr = 0;
        return REPLLUA_ERROR;
    }
    int nres = lua_gettop(L);
    double elapsed = mono() - t0;
    if (nres > 0) {
        lua_getfield(L, LUA_REGISTRYINDEX, "tm.show");
        lua_insert(L, 1);
        st = protected_call(r, nres, 0);
        if (st == -2) return REPLLUA_ERROR;
        L = r->L;
        if (st) {
            print_error(r, lua_tostring(L, -1));
            r->fail_code = take_fail_code(L);
            lua_settop(L, 0);
            return REPLLUA_ERROR;
        }
    }
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.timing");
    int timing = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (timing && r->ran_workers)
        printf("Time: %.3f ms (%d workers)\n", elapsed * 1000.0, r->ran_workers);
    else if (timing)
        printf("Time: %.3f ms\n", elapsed * 1000.0);
    fflush(stdout);
    lua_settop(L, 0);
    g_intr = 0;
    return REPLLUA_OK;
}

repllua_result repllua_eval(repl *r, const char *code, size_t len, const char *chunkname,
                            int allow_incomplete) {
    lua_State *L = r->L;
    lua_settop(L, 0);
    g_intr = 0; /* a new command: forget older Ctrl-Cs */
    r->ran_workers = 0;
    double t0 = mono();
    /* skip a #! line in scripts */
    if (len > 1 && code[0] == '#' && code[1] == '!') {
        const char *nl = memchr(code, '\n', len);
        size_t skip = nl ? (size_t)(nl - code) : len;
        code += skip;
        len -= skip;
    }
    buf src = BUF_INIT;
    buf_puts(&src, "return ");
    buf_append(&src, code, len);
    int st = luaL_loadbuffer(L, src.ptr, src.len, chunkname);
    buf_free(&src);
    if (st) {
        lua_pop(L, 1);
        st = luaL_loadbuffer(L, code, len, chunkname);
        if (st == LUA_ERRSYNTAX && allow_incomplete && incomplete(L)) {
            lua_settop(L, 0);
            return REPLLUA_INCOMPLETE;
        }
        if (st) {
            print_error(r, lua_tostring(L, -1));
            r->fail_code = 1;
            lua_settop(L, 0);
            return REPLLUA_ERROR;
        }
    }
    return call_and_show(r, t0);
}

repllua_result repllua_dot(repl *r, const char *line) {
    lua_State *L = r->L;
    lua_settop(L, 0);
    g_intr = 0;
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.dot");
    lua_pushstring(L, line);
    int st = protected_call(r, 1, 0);
    if (st == -2) return REPLLUA_ERROR;
    L = r->L;
    if (st) {
        print_error(r, lua_tostring(L, -1));
        r->fail_code = take_fail_code(L);
        lua_settop(L, 0);
        g_intr = 0;
        return REPLLUA_ERROR;
    }
    lua_settop(L, 0);
    g_intr = 0;
    return REPLLUA_OK;
}

void repllua_complete(repl *r, const char *line, const char *word,
                      void (*fn)(void *ud, const char *cand), void *ud) {
    lua_State *L = r->L;
    int top = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.complete");
    lua_pushstring(L, line);
    lua_pushstring(L, word);
    if (lua_pcall(L, 2, 1, 0) == 0 && lua_istable(L, -1)) {
        int n = (int)lua_objlen(L, -1);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, i);
            if (lua_isstring(L, -1)) fn(ud, lua_tostring(L, -1));
            lua_pop(L, 1);
        }
    }
    lua_settop(L, top);
}
