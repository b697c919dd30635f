/* replscan.c — the REPL's reads over the event source: the batched scan
 * that runs queries (T.scan), plain reads (T.read) and the lazy fields of
 * scanned events (T.extra).
 *
 * Owns: selector tables from the prelude, the session's interned event
 * type names (the prelude keeps the strings in T.types[idx], so a scan
 * never builds a type string per event), and the batch layout shared with
 * prelude.lua (replscan_slot).  Invariants: a batch's slots and arena are
 * valid only during the runner call; T.batch_done is called after every
 * batch (also on errors) so that no event reads them later.
 */
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "progress.h"
#include "repl.h"
#include "luamp.h"

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
struct replscan_types {
    char **names;
    uint32_t *lens, *slots; /* slots: idx + 1, 0 = empty */
    uint32_t n, cap;
};
typedef struct replscan_types intern;

static intern g_types; /* the session's (the main thread's) */

replscan_types *replscan_types_new(void) {
    intern *t = calloc(1, sizeof *t);
    if (!t) tm_oom();
    return t;
}

void replscan_types_free(replscan_types *t) {
    if (!t) return;
    for (uint32_t i = 0; i < t->n; i++) free(t->names[i]);
    free(t->names);
    free(t->lens);
    free(t->slots);
    free(t);
}

static uint32_t fnv(const char *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 16777619u;
    return h;
}

static void intern_grow(intern *t) {
    uint32_t cap = t->cap ? t->cap * 2 : 256;
    uint32_t *slots = calloc(cap, sizeof *slots);
    if (!slots) tm_oom();
    for (uint32_t i = 0; i < t->n; i++) {
        uint32_t h = fnv(t->names[i], t->lens[i]) & (cap - 1);
        while (slots[h]) h = (h + 1) & (cap - 1);
        slots[h] = i + 1;
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    char **names = realloc(t->names, cap * sizeof *t->names);
    if (!names) tm_oom();
    t->names = names;
    uint32_t *lens = realloc(t->lens, cap * sizeof *t->lens);
    if (!lens) tm_oom();
    t->lens = lens;
}

/* Index (1-based) of the type; a new one is also stored in the Lua table
 * at types_idx. */
static uint32_t intern_type(intern *t, lua_State *L, int types_idx, const char *p, size_t n) {
    if ((t->n + 1) * 2 > t->cap) intern_grow(t);
    uint32_t h = fnv(p, n) & (t->cap - 1);
    for (;;) {
        uint32_t s = t->slots[h];
        if (!s) break;
        if (t->lens[s - 1] == n && !memcmp(t->names[s - 1], p, n)) return s;
        h = (h + 1) & (t->cap - 1);
    }
    t->names[t->n] = malloc(n ? n : 1);
    if (!t->names[t->n]) tm_oom();
    memcpy(t->names[t->n], p, n);
    t->lens[t->n] = (uint32_t)n;
    t->slots[h] = ++t->n;
    lua_pushlstring(L, p, n);
    lua_rawseti(L, types_idx, (int)t->n);
    return t->n;
}

/* (Re)fill T.types from the intern table (a fresh Lua state). */
void replscan_publish_types(lua_State *L, int types_idx) {
    for (uint32_t i = 0; i < g_types.n; i++) {
        lua_pushlstring(L, g_types.names[i], g_types.lens[i]);
        lua_rawseti(L, types_idx, (int)i + 1);
    }
}

/* One batch through the prelude's runner: 0 go on, 1 the handler
 * stopped the scan, -1 a Lua error (left on the stack). */
static int run_batch(lua_State *L, int msgh, int runner, int handler, const replscan_opts *o,
                     const replscan_slot *slots, int n, const char *arena) {
    lua_pushvalue(L, runner);
    lua_pushlightuserdata(L, (void *)slots);
    lua_pushlightuserdata(L, (void *)arena);
    lua_pushinteger(L, n);
    lua_pushvalue(L, handler);
    if (o->in_lua) *o->in_lua = 1;
    int st = lua_pcall(L, 4, 1, msgh);
    if (o->in_lua) *o->in_lua = 0;
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.batch_done");
    lua_call(L, 0, 0);
    if (st) return -1;
    int stopped = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return stopped;
}

/* The batched scan: copies each selected event's stream and data bytes
 * into an arena, fills a slot, and runs every SCAN_BATCH events (see
 * t_scan), with a progress bar on stderr when interactive. */
int replscan_run(lua_State *L, int sel_idx, int handler, const replscan_opts *o,
                 uint64_t *count, tm_err *e) {
    repl *r = repllua_session(L);
    lua_pushcfunction(L, repllua_traceback);
    int msgh = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.runner");
    int runner = lua_gettop(L);
    scan_sel s;
    parse_sel(L, sel_idx, &s);
    intern *tt = o->types ? o->types : &g_types;
    if (o->from > s.sel.from && !s.sel.backward) s.sel.from = o->from;
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.types");
    int types = lua_gettop(L);
    uint64_t last = 0;
    *count = 0;
    if (replsrc_last_position(r->src, &last, e) < 0) return REPLSCAN_EREAD;
    replsrc_iter *it = replsrc_read(r->src, &s.sel, e);
    if (!it) return REPLSCAN_EREAD;
    uint64_t start = s.sel.kind == REPLSRC_STREAM || s.sel.backward ? 0 : s.sel.from;
    uint64_t total = s.sel.kind == REPLSRC_STREAM || s.sel.backward || last < start ? 0 : last - start + 1;
    progress *pg = r->progress && o->label ? progress_new(stderr, o->label, total, "events", 0)
                                           : NULL;
    replscan_slot *slots = malloc(SCAN_BATCH * sizeof *slots);
    if (!slots) tm_oom();
    buf arena = BUF_INIT;
    uint64_t n = 0;
    tm_event ev;
    int rc, status = REPLSCAN_DONE, inbatch = 0;
    for (;;) {
        rc = replsrc_next(it, &ev, e);
        if (rc == 1 && repl_cancel_requested()) {
            status = REPLSCAN_EINTR;
            break;
        }
        if (rc == 1 && o->to && ev.position > o->to && s.sel.kind != REPLSRC_STREAM) {
            rc = 0; /* the end of this scan's range */
        } else if (rc == 1) {
            if ((n & 1023) == 0) {
                if (pg) progress_update(pg, total ? ev.position - start : 0, n);
                if (o->at) __atomic_store_n(o->at, ev.position, __ATOMIC_RELAXED);
            }
            if (!sel_match(L, &s, &ev)) continue;
            n++;
            replscan_slot *x = &slots[inbatch++];
            x->position = (double)ev.position;
            x->version = (double)ev.version;
            x->time = (double)ev.time_ms;
            x->type_idx = intern_type(tt, L, types, ev.type, ev.type_len);
            x->stream_off = (uint32_t)arena.len;
            x->stream_len = (uint32_t)ev.stream_len;
            buf_append(&arena, ev.stream, ev.stream_len);
            x->data_off = (uint32_t)arena.len;
            x->data_len = (uint32_t)ev.data_len;
            buf_append(&arena, ev.data, ev.data_len);
            if (inbatch < SCAN_BATCH) continue;
        }
        if (inbatch) {
            if (o->stop && __atomic_load_n(o->stop, __ATOMIC_RELAXED)) break;
            int st = run_batch(L, msgh, runner, handler, o, slots, inbatch, arena.ptr);
            inbatch = 0;
            buf_reset(&arena);
            if (st < 0) {
                status = REPLSCAN_ELUA;
                break;
            }
            if (st > 0) break;
        }
        if (rc != 1) break;
    }
    progress_end(pg);
    replsrc_iter_free(it);
    free(slots);
    buf_free(&arena);
    *count = n;
    if (status != REPLSCAN_DONE) return status;
    if (rc < 0) return repl_cancel_requested() ? REPLSCAN_EINTR : REPLSCAN_EREAD;
    return REPLSCAN_DONE;
}

/* T.scan(sel, handler [, label]) -> events scanned.  Runs handler(e) for
 * every selected event.  Events go in batches of SCAN_BATCH: C fills
 * the batch, the prelude's runner (a Lua loop the JIT compiles, with the
 * msgpack decoder and the handler inlined) builds the event tables and
 * calls the handler, so C and Lua trade places once per batch.  stream,
 * id and metadata are lazy.  A handler returning T.STOP ends the scan. */
static int t_scan(lua_State *L) {
    repl *r = repllua_session(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    replscan_opts o = {.label = luaL_optstring(L, 3, "query")};
    tm_err e;
    err_clear(&e);
    uint64_t n = 0;
    int rc = replscan_run(L, 1, 2, &o, &n, &e);
    if (rc == REPLSCAN_ELUA) return lua_error(L);
    if (rc == REPLSCAN_EINTR) return repllua_interrupted(L);
    if (rc == REPLSCAN_EREAD) return repllua_raise(L, r, &e);
    lua_pushnumber(L, (lua_Number)n);
    return 1;
}


/* T.read(sel) -> array of event tables (the selector should have a limit). */
static int t_read(lua_State *L) {
    repl *r = repllua_session(L);
    scan_sel s;
    parse_sel(L, 1, &s);
    tm_err e;
    err_clear(&e);
    replsrc_iter *it = replsrc_read(r->src, &s.sel, &e);
    if (!it) return repllua_raise(L, r, &e);
    lua_newtable(L);
    int out = lua_gettop(L), n = 0, rc;
    tm_event ev;
    while ((rc = replsrc_next(it, &ev, &e)) == 1) {
        if (repl_cancel_requested()) break;
        if (!sel_match(L, &s, &ev)) continue;
        tm_err de;
        if (luamp_push_event_opt(L, &ev, LUAMP_RAW_EXT, &de) < 0) {
            err_set(&e, TM_EIO, "malformed event at position %llu: %s",
                    (unsigned long long)ev.position, de.msg);
            rc = -1;
            break;
        }
        lua_rawseti(L, out, ++n);
    }
    replsrc_iter_free(it);
    if (repl_cancel_requested()) return repllua_interrupted(L);
    if (rc < 0) return repllua_raise(L, r, &e);
    return 1;
}

/* T.extra(position) -> id, metadata, stream of the event at that position
 * (the lazy fields of scanned events). */
static int t_extra(lua_State *L) {
    repl *r = repllua_session(L);
    lua_Number pos = luaL_checknumber(L, 1);
    replsrc_sel sel = {REPLSRC_ALL, NULL, 0, (uint64_t)pos, 0, 1};
    tm_err e;
    err_clear(&e);
    replsrc_iter *it = replsrc_read(r->src, &sel, &e);
    if (!it) return repllua_raise(L, r, &e);
    tm_event ev;
    int rc = replsrc_next(it, &ev, &e);
    if (rc < 0) {
        replsrc_iter_free(it);
        return repllua_raise(L, r, &e);
    }
    if (rc == 0 || ev.position != (uint64_t)pos) {
        replsrc_iter_free(it);
        return 0;
    }
    char id[37];
    event_id_format(ev.id, id);
    lua_pushstring(L, id);
    if (ev.meta_len == 0) lua_newtable(L);
    else if (luamp_push_opt(L, ev.meta, ev.meta_len, LUAMP_RAW_EXT, &e) < 0) lua_newtable(L);
    lua_pushlstring(L, ev.stream, ev.stream_len);
    replsrc_iter_free(it);
    return 3;
}

static const luaL_Reg funcs[] = {
    {"scan", t_scan},
    {"read", t_read},
    {"extra", t_extra},
    {NULL, NULL},
};

void replscan_register(lua_State *L, repl *r) {
    lua_pushlightuserdata(L, r);
    luaL_openlib(L, NULL, funcs, 1);
}
