/* repllua.c — the REPL's Lua state (see repl.h).
 *
 * Owns:
 *   - the sandbox: LuaJIT with base, string, table, math, bit and a
 *     read-only os subset (time, clock, date); no io, package, debug, ffi,
 *     jit, string.dump, dofile/loadfile, and load/loadstring of text only;
 *     memory is capped by the allocator (REPL_MEM_LIMIT);
 *   - the built-in C functions the prelude (prelude.lua, compiled in) uses:
 *     scans over the event source (batches of slots + an arena that the
 *     prelude decodes through the FFI, which only the prelude can reach),
 *     reads, listing, append, tail, JSON encoding, output;
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
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "json.h"
#include "progress.h"
#include "repl.h"
#include "replhttp.h"
#include "replmp.h"
#include "replproj.h"

/* Weak: the REPL works (with exact fallbacks) without the sketch library. */
extern int luaopen_tidemark_sketch(lua_State *L) __attribute__((weak));

static const char prelude_src[] =
#include "repl_prelude.h"
    ;

#define REPL_MEM_LIMIT ((size_t)2 << 30)

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

static void on_sigint(int sig) {
    (void)sig;
    double now = mono();
    if (g_running && g_intr && g_can_jump && now - g_first_intr < 2.0) {
        g_can_jump = 0;
        siglongjmp(g_jmp, 1);
    }
    g_intr = 1;
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

/* LuaJIT's own allocator (much faster than malloc for the many small
 * objects a scan makes), wrapped to count and cap. */
typedef struct memcap {
    size_t used, limit;
    lua_Alloc inner;
    void *inner_ud;
} memcap;

static void *cap_alloc(void *ud, void *p, size_t osize, size_t nsize) {
    memcap *m = ud;
    if (nsize == 0) {
        m->used -= p ? osize : 0;
        return m->inner(m->inner_ud, p, osize, 0);
    }
    if (nsize > osize && m->used - (p ? osize : 0) + nsize > m->limit) return NULL;
    void *q = m->inner(m->inner_ud, p, osize, nsize);
    if (q) m->used = m->used - (p ? osize : 0) + nsize;
    return q;
}

/* ------------------------------------------------------------ C builtins */

/* The interrupt error: plain "interrupted", no position prefix. */
static int raise_interrupted(lua_State *L) {
    lua_pushstring(L, "interrupted");
    return lua_error(L);
}

static repl *session(lua_State *L) {
    return (repl *)lua_touserdata(L, lua_upvalueindex(1));
}

/* Raise a Lua error for e and remember its exit status. */
static int raise_err(lua_State *L, repl *r, const tm_err *e) {
    r->fail_code = e->code ? e->code : 1;
    lua_pushfstring(L, "%s", e->msg[0] ? e->msg : err_code_name(e->code));
    lua_pushinteger(L, r->fail_code);
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.fail_code");
    return lua_error(L);
}

static const char *opt_str(lua_State *L, int t, const char *k, size_t *len) {
    lua_getfield(L, t, k);
    const char *s = lua_isstring(L, -1) ? lua_tolstring(L, -1, len) : NULL;
    lua_pop(L, 1); /* strings in the selector table stay alive with it */
    return s;
}

static uint64_t opt_u64(lua_State *L, int t, const char *k, uint64_t dflt) {
    lua_getfield(L, t, k);
    uint64_t v = dflt;
    if (lua_type(L, -1) == LUA_TNUMBER) {
        double d = lua_tonumber(L, -1);
        v = d <= 0 ? 0 : d >= 1.8e19 ? UINT64_MAX : (uint64_t)d;
    }
    lua_pop(L, 1);
    return v;
}

static int opt_bool(lua_State *L, int t, const char *k) {
    lua_getfield(L, t, k);
    int b = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return b;
}

/* A selector table from the prelude:
 *   { kind = "all"|"stream"|"category"|"type", name = s, from = n,
 *     backward = b, limit = n, streams = {set}, types = {set} }
 * streams/types are sets (name -> true) filtered on this side. */
typedef struct scan_sel {
    replsrc_sel sel;
    int streams_idx, types_idx; /* stack indexes of the filter sets, 0 = none */
} scan_sel;

static void parse_sel(lua_State *L, int t, scan_sel *s) {
    memset(s, 0, sizeof *s);
    luaL_checktype(L, t, LUA_TTABLE);
    size_t kl = 0;
    const char *kind = opt_str(L, t, "kind", &kl);
    if (!kind || !strcmp(kind, "all")) s->sel.kind = REPLSRC_ALL;
    else if (!strcmp(kind, "stream")) s->sel.kind = REPLSRC_STREAM;
    else if (!strcmp(kind, "category")) s->sel.kind = REPLSRC_CATEGORY;
    else if (!strcmp(kind, "type")) s->sel.kind = REPLSRC_TYPE;
    else luaL_error(L, "bad selector kind '%s'", kind);
    s->sel.name = opt_str(L, t, "name", &s->sel.name_len);
    if (s->sel.kind != REPLSRC_ALL && !s->sel.name) luaL_error(L, "selector needs a name");
    s->sel.backward = opt_bool(L, t, "backward");
    s->sel.from = opt_u64(L, t, "from", s->sel.backward ? UINT64_MAX : 0);
    s->sel.limit = opt_u64(L, t, "limit", 0);
    lua_getfield(L, t, "streams");
    s->streams_idx = lua_istable(L, -1) ? lua_gettop(L) : 0;
    lua_getfield(L, t, "types");
    s->types_idx = lua_istable(L, -1) ? lua_gettop(L) : 0;
}

static int in_set(lua_State *L, int set, const char *s, size_t n) {
    lua_pushlstring(L, s, n);
    lua_rawget(L, set);
    int yes = !lua_isnil(L, -1);
    lua_pop(L, 1);
    return yes;
}

static int sel_match(lua_State *L, const scan_sel *s, const tm_event *ev) {
    if (s->streams_idx && !in_set(L, s->streams_idx, ev->stream, ev->stream_len)) return 0;
    if (s->types_idx && !in_set(L, s->types_idx, ev->type, ev->type_len)) return 0;
    return 1;
}

static int traceback(lua_State *L);

#define SCAN_BATCH 256

/* One event of a scan batch, read by the prelude through the FFI (the same
 * declaration is in prelude.lua).  Offsets are into the batch's arena. */
typedef struct replscan_slot {
    double position, version, time;
    uint32_t stream_off, stream_len, data_off, data_len, type_idx, pad;
} replscan_slot;

/* Event type names interned for the session: the prelude keeps the
 * strings in T.types[idx], so a scan never builds a type string per event.
 * Open addressing on FNV-1a; the table only grows (types are few). */
typedef struct intern {
    char **names;
    uint32_t *lens, *slots; /* slots: idx + 1, 0 = empty */
    uint32_t n, cap;
} intern;

static intern g_types;

static uint32_t fnv(const char *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 16777619u;
    return h;
}

static void intern_grow(intern *t) {
    uint32_t cap = t->cap ? t->cap * 2 : 256;
    uint32_t *slots = calloc(cap, sizeof *slots);
    for (uint32_t i = 0; i < t->n; i++) {
        uint32_t h = fnv(t->names[i], t->lens[i]) & (cap - 1);
        while (slots[h]) h = (h + 1) & (cap - 1);
        slots[h] = i + 1;
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    t->names = realloc(t->names, cap * sizeof *t->names);
    t->lens = realloc(t->lens, cap * sizeof *t->lens);
}

/* Index (1-based) of the type; a new one is also stored in the Lua table
 * at types_idx. */
static uint32_t intern_type(lua_State *L, int types_idx, const char *p, size_t n) {
    intern *t = &g_types;
    if ((t->n + 1) * 2 > t->cap) intern_grow(t);
    uint32_t h = fnv(p, n) & (t->cap - 1);
    for (;;) {
        uint32_t s = t->slots[h];
        if (!s) break;
        if (t->lens[s - 1] == n && !memcmp(t->names[s - 1], p, n)) return s;
        h = (h + 1) & (t->cap - 1);
    }
    t->names[t->n] = malloc(n ? n : 1);
    memcpy(t->names[t->n], p, n);
    t->lens[t->n] = (uint32_t)n;
    t->slots[h] = ++t->n;
    lua_pushlstring(L, p, n);
    lua_rawseti(L, types_idx, (int)t->n);
    return t->n;
}

/* (Re)fill T.types from the intern table (a fresh Lua state). */
static void intern_publish(lua_State *L, int types_idx) {
    for (uint32_t i = 0; i < g_types.n; i++) {
        lua_pushlstring(L, g_types.names[i], g_types.lens[i]);
        lua_rawseti(L, types_idx, (int)i + 1);
    }
}

/* T.scan(sel, handler [, label]) -> events scanned.  Runs handler(e) for
 * every selected event, with a progress bar on stderr when interactive.
 * Events go in batches of SCAN_BATCH: this loop copies each event's
 * stream and data bytes into an arena and fills a slot; the prelude's
 * runner (a Lua loop the JIT compiles, with the msgpack decoder and the
 * handler inlined) builds the event tables and calls the handler, so C
 * and Lua trade places once per batch.  stream, id and metadata are lazy.
 * A handler returning T.STOP ends the scan early. */
static int t_scan(lua_State *L) {
    repl *r = session(L);
    scan_sel s;
    parse_sel(L, 1, &s);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    const char *label = luaL_optstring(L, 3, "query");
    lua_pushcfunction(L, traceback);
    int msgh = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.types");
    int types = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.runner");
    int runner = lua_gettop(L);
    tm_err e;
    err_clear(&e);
    uint64_t last = 0;
    if (replsrc_last_position(r->src, &last, &e) < 0) return raise_err(L, r, &e);
    replsrc_iter *it = replsrc_read(r->src, &s.sel, &e);
    if (!it) return raise_err(L, r, &e);
    uint64_t start = s.sel.kind == REPLSRC_STREAM || s.sel.backward ? 0 : s.sel.from;
    uint64_t total = s.sel.kind == REPLSRC_STREAM || s.sel.backward || last < start ? 0 : last - start + 1;
    progress *pg = r->progress ? progress_new(stderr, label, total, "events", 0) : NULL;
    replscan_slot *slots = malloc(SCAN_BATCH * sizeof *slots);
    buf arena = BUF_INIT;
    uint64_t n = 0;
    tm_event ev;
    int rc, failed = 0, stopped = 0, inbatch = 0;
    for (;;) {
        rc = replsrc_next(it, &ev, &e);
        if (rc == 1 && g_intr) {
            failed = 2;
            break;
        }
        if (rc == 1) {
            if (pg && (n & 1023) == 0) progress_update(pg, total ? ev.position - start : 0, n);
            if (!sel_match(L, &s, &ev)) continue;
            n++;
            replscan_slot *x = &slots[inbatch++];
            x->position = (double)ev.position;
            x->version = (double)ev.version;
            x->time = (double)ev.time_ms;
            x->type_idx = intern_type(L, types, ev.type, ev.type_len);
            x->stream_off = (uint32_t)arena.len;
            x->stream_len = (uint32_t)ev.stream_len;
            buf_append(&arena, ev.stream, ev.stream_len);
            x->data_off = (uint32_t)arena.len;
            x->data_len = (uint32_t)ev.data_len;
            buf_append(&arena, ev.data, ev.data_len);
            if (inbatch < SCAN_BATCH) continue;
        }
        if (inbatch) { /* run the batch */
            lua_pushvalue(L, runner);
            lua_pushlightuserdata(L, slots);
            lua_pushlightuserdata(L, arena.ptr);
            lua_pushinteger(L, inbatch);
            lua_pushvalue(L, 2);
            int st = lua_pcall(L, 4, 1, msgh);
            lua_getfield(L, LUA_REGISTRYINDEX, "tm.batch_done");
            lua_call(L, 0, 0);
            if (st) {
                failed = 1;
                break;
            }
            stopped = lua_toboolean(L, -1);
            lua_pop(L, 1);
            inbatch = 0;
            buf_reset(&arena);
            if (stopped) break;
        }
        if (rc != 1) break;
    }
    progress_end(pg);
    replsrc_iter_free(it);
    free(slots);
    buf_free(&arena);
    if (failed == 1) return lua_error(L);
    if (failed == 2 || (rc < 0 && g_intr)) return raise_interrupted(L);
    if (rc < 0) return raise_err(L, r, &e);
    lua_pushnumber(L, (lua_Number)n);
    return 1;
}

/* T.read(sel) -> array of event tables (the selector should have a limit). */
static int t_read(lua_State *L) {
    repl *r = session(L);
    scan_sel s;
    parse_sel(L, 1, &s);
    tm_err e;
    err_clear(&e);
    replsrc_iter *it = replsrc_read(r->src, &s.sel, &e);
    if (!it) return raise_err(L, r, &e);
    lua_newtable(L);
    int out = lua_gettop(L), n = 0, rc;
    tm_event ev;
    while ((rc = replsrc_next(it, &ev, &e)) == 1) {
        if (g_intr) break;
        if (!sel_match(L, &s, &ev)) continue;
        if (replmp_push_event(L, &ev) < 0) {
            err_set(&e, TM_EIO, "malformed event at position %llu", (unsigned long long)ev.position);
            rc = -1;
            break;
        }
        lua_rawseti(L, out, ++n);
    }
    replsrc_iter_free(it);
    if (g_intr) return raise_interrupted(L);
    if (rc < 0) return raise_err(L, r, &e);
    return 1;
}

/* T.extra(position) -> id, metadata, stream of the event at that position
 * (the lazy fields of scanned events). */
static int t_extra(lua_State *L) {
    repl *r = session(L);
    lua_Number pos = luaL_checknumber(L, 1);
    replsrc_sel sel = {REPLSRC_ALL, NULL, 0, (uint64_t)pos, 0, 1};
    tm_err e;
    err_clear(&e);
    replsrc_iter *it = replsrc_read(r->src, &sel, &e);
    if (!it) return raise_err(L, r, &e);
    tm_event ev;
    int rc = replsrc_next(it, &ev, &e);
    if (rc < 0) {
        replsrc_iter_free(it);
        return raise_err(L, r, &e);
    }
    if (rc == 0 || ev.position != (uint64_t)pos) {
        replsrc_iter_free(it);
        return 0;
    }
    char id[37];
    event_id_format(ev.id, id);
    lua_pushstring(L, id);
    const char *p = ev.meta;
    if (ev.meta_len == 0) lua_newtable(L);
    else if (replmp_push(L, &p, ev.meta + ev.meta_len) < 0) lua_newtable(L);
    lua_pushlstring(L, ev.stream, ev.stream_len);
    replsrc_iter_free(it);
    return 3;
}

static int t_last_position(lua_State *L) {
    repl *r = session(L);
    tm_err e;
    err_clear(&e);
    uint64_t pos;
    if (replsrc_last_position(r->src, &pos, &e) < 0) return raise_err(L, r, &e);
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
    repl *r = session(L);
    tm_err e;
    err_clear(&e);
    lua_newtable(L);
    name_acc a = {L, 0, streams};
    int rc = streams ? replsrc_list_streams(r->src, add_name, &a, &e)
                     : replsrc_list_categories(r->src, add_name, &a, &e);
    if (rc < 0) return raise_err(L, r, &e);
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
    if (replmp_from_lua(L, 1, &mp) < 0) {
        buf_free(&mp);
        lua_pushnil(L);
        lua_pushstring(L, "value cannot be encoded as JSON");
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

/* T.json_decode(text) -> value (for replies and projection states). */
static int t_json_decode(lua_State *L) {
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    buf mp = BUF_INIT;
    tm_err e;
    err_clear(&e);
    if (json_to_mp(s, n, NULL, &mp, &e) < 0) {
        buf_free(&mp);
        lua_pushnil(L);
        lua_pushstring(L, e.msg);
        return 2;
    }
    const char *p = mp.ptr;
    int rc = replmp_push(L, &p, mp.ptr + mp.len);
    buf_free(&mp);
    if (rc < 0) return luaL_error(L, "bad JSON value");
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
    repl *r = session(L);
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
    session(L)->quit = 1;
    return 0;
}

static int t_set_fail(lua_State *L) {
    session(L)->fail_code = (int)luaL_checkinteger(L, 1);
    return 0;
}

/* T.http(method, path [, body [, content_type]]) -> status, body (remote only). */
static int t_http(lua_State *L) {
    repl *r = session(L);
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
        if (g_intr) return raise_interrupted(L);
        return raise_err(L, r, &e);
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
    repl *r = session(L);
    const char *path = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (!replsrc_is_remote(r->src)) return luaL_error(L, "not connected to a server");
    tm_err e;
    err_clear(&e);
    replhttp *h = replhttp_open(replsrc_where(r->src), "GET", path,
                                "Accept: text/event-stream\r\n", NULL, NULL, 0,
                                repl_cancel_requested, &e);
    if (!h) return g_intr ? 0 : raise_err(L, r, &e);
    if (replhttp_status(h) != 200) {
        int st = replhttp_status(h);
        replhttp_close(h);
        return luaL_error(L, "GET %s: HTTP %d", path, st);
    }
    buf in = BUF_INIT, data = BUF_INIT;
    size_t off = 0;
    int failed = 0;
    lua_pushcfunction(L, traceback);
    int msgh = lua_gettop(L);
    for (;;) {
        char *nl = in.ptr ? memchr(in.ptr + off, '\n', in.len - off) : NULL;
        if (!nl) {
            if (off) {
                memmove(in.ptr, in.ptr + off, in.len - off);
                in.len -= off;
                off = 0;
            }
            long got = replhttp_read(h, &in, &e);
            if (got <= 0) {
                if (got < 0 && !g_intr) failed = 2;
                break;
            }
            continue;
        }
        size_t ll = (size_t)(nl - (in.ptr + off));
        const char *line = in.ptr + off;
        off += ll + 1;
        if (ll && line[ll - 1] == '\r') ll--;
        if (ll == 0) { /* end of message */
            if (data.len) {
                lua_pushvalue(L, 2);
                lua_pushcfunction(L, t_json_decode);
                lua_pushlstring(L, data.ptr, data.len);
                lua_call(L, 1, 1);
                buf_reset(&data);
                if (lua_pcall(L, 1, 0, msgh)) {
                    failed = 1;
                    break;
                }
            }
        } else if (ll >= 5 && !memcmp(line, "data:", 5)) {
            size_t skip = ll > 5 && line[5] == ' ' ? 6 : 5;
            if (data.len) buf_putc(&data, '\n');
            buf_append(&data, line + skip, ll - skip);
        }
    }
    buf_free(&in);
    buf_free(&data);
    replhttp_close(h);
    if (failed == 1) return lua_error(L);
    if (failed == 2) return raise_err(L, r, &e);
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
    repl *r = session(L);
    size_t sl, tl;
    const char *stream = luaL_checklstring(L, 1, &sl);
    const char *type = luaL_checklstring(L, 2, &tl);
    tm_err e;
    err_clear(&e);
    buf data = BUF_INIT, meta = BUF_INIT;
    if (replmp_from_lua(L, 3, &data) < 0 ||
        (!lua_isnoneornil(L, 4) && replmp_from_lua(L, 4, &meta) < 0)) {
        buf_free(&data);
        buf_free(&meta);
        return luaL_error(L, "append: data and metadata must be plain values (tables, strings, numbers, booleans)");
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
            if (json_to_mp(reply.ptr, reply.len, NULL, &mp, &e) < 0 ||
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
    if (rc < 0) return raise_err(L, r, &e);
    lua_pushnumber(L, (lua_Number)pos);
    lua_pushnumber(L, (lua_Number)ver);
    return 2;
}

static const luaL_Reg t_funcs[] = {
    {"append", t_append},
    {"set_timing", t_set_timing},
    {"read_file", t_read_file},
    {"scan", t_scan},
    {"read", t_read},
    {"last_position", t_last_position},
    {"extra", t_extra},
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
static int traceback(lua_State *L) {
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

static int load_text(lua_State *L) {
    /* load(text_or_function [, name]) — text chunks only (no bytecode). */
    size_t n;
    const char *name = luaL_optstring(L, 2, "=(load)");
    const char *s;
    if (lua_isfunction(L, 1)) {
        buf acc = BUF_INIT;
        for (;;) {
            lua_pushvalue(L, 1);
            lua_call(L, 0, 1);
            if (lua_isnil(L, -1)) break;
            s = luaL_checklstring(L, -1, &n);
            if (n == 0) break;
            buf_append(&acc, s, n);
            lua_pop(L, 1);
        }
        lua_pushlstring(L, acc.ptr ? acc.ptr : "", acc.len);
        buf_free(&acc);
        lua_replace(L, 1);
    }
    s = luaL_checklstring(L, 1, &n);
    if (n && s[0] == '\033') {
        lua_pushnil(L);
        lua_pushstring(L, "loading bytecode is not allowed");
        return 2;
    }
    if (luaL_loadbuffer(L, s, n, name)) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    /* the chunk shares the caller's globals */
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_setfenv(L, -2);
    return 1;
}

static void strip_sandbox(lua_State *L) {
    static const char *const gone[] = {"io", "package", "debug", "ffi", "jit", "require",
                                       "module", "dofile", "loadfile", "newproxy", NULL};
    for (int i = 0; gone[i]; i++) {
        lua_pushnil(L);
        lua_setglobal(L, gone[i]);
    }
    /* `load` is the REPL's load(file) of a projection (prelude);
     * loadstring compiles text chunks (never bytecode) */
    lua_pushcfunction(L, load_text);
    lua_setglobal(L, "loadstring");
    lua_getglobal(L, "string");
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);
    /* os: only what cannot touch the system */
    lua_getglobal(L, "os");
    lua_createtable(L, 0, 4);
    static const char *const keep[] = {"time", "clock", "date", "difftime", NULL};
    for (int i = 0; keep[i]; i++) {
        lua_getfield(L, -2, keep[i]);
        lua_setfield(L, -2, keep[i]);
    }
    lua_setglobal(L, "os");
    lua_pop(L, 1);
}

static int open_state(lua_State *L) {
    repl *r = lua_touserdata(L, 1);
    luaL_openlibs(L);
    if (luaopen_tidemark_sketch) { /* the sketch library, when linked in */
        lua_pushcfunction(L, luaopen_tidemark_sketch);
        lua_call(L, 0, 1);
        lua_setglobal(L, "tm");
    }
    lua_newtable(L); /* T */
    lua_pushlightuserdata(L, r);
    luaL_openlib(L, NULL, t_funcs, 1);
    replproj_register(L, r);
    int tidx = lua_gettop(L);
    if (luaL_loadbuffer(L, prelude_src, sizeof prelude_src - 1, "=tidemark")) return lua_error(L);
    lua_pushvalue(L, tidx);
    lua_call(L, 1, 1); /* the prelude returns its show(...) function */
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
    intern_publish(L, lua_gettop(L));
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.types");
    strip_sandbox(L);
    return 0;
}

int repllua_open(repl *r) {
    lua_State *L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "tidemark repl: cannot create a Lua state\n");
        return -1;
    }
    memcap *m = calloc(1, sizeof *m); /* lives as long as the state (never
                                         freed after a hard abort) */
    m->inner = lua_getallocf(L, &m->inner_ud);
    m->limit = REPL_MEM_LIMIT;
    m->used = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024;
    lua_setallocf(L, cap_alloc, m);
    lua_pushcfunction(L, open_state);
    lua_pushlightuserdata(L, r);
    if (lua_pcall(L, 1, 0, 0)) {
        fprintf(stderr, "tidemark repl: prelude: %s\n", lua_tostring(L, -1));
        lua_close(L);
        return -1;
    }
    r->L = L;
    install_sigint();
    return 0;
}

void repllua_close(repl *r) {
    if (r->L) {
        void *m;
        lua_getallocf(r->L, &m);
        lua_close(r->L);
        free(m);
    }
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
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    g_L = L;
    if (sigsetjmp(g_jmp, 1)) {
        g_running = 0;
        g_can_jump = 0;
        g_intr = 0;
        fflush(stdout);
        fprintf(stderr,
                "\naborted: the code did not respond to Ctrl-C (a JIT-compiled loop?); "
                "the Lua state was reset, globals are lost\n");
        r->L = NULL; /* abandoned, not closed: it may be inconsistent */
        if (repllua_open(r) < 0) exit(4);
        r->fail_code = 1;
        return -2;
    }
    g_can_jump = 1;
    g_running = 1;
    if (g_intr) /* Ctrl-C arrived while compiling: honour it now */
        lua_sethook(L, intr_hook, LUA_MASKCOUNT, 1);
    int st = lua_pcall(L, nargs, nres, base);
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
    if (timing) printf("Time: %.3f ms\n", elapsed * 1000.0);
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
