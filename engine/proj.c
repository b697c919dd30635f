/* proj.c — a projection instance (see proj.h for the model and keys).
 *
 * Owns: loading and checking the script's definition, the batch of slots
 * handed to the Lua runtime (proj_rt.lua, embedded below with .incbin),
 * type interning, fault capture and rollback, dead letters, checkpoints
 * (dirty states -> store_batch), emitted events with derived ids, restore,
 * and the read-model queries.
 *
 * Invariants:
 *   - `position` only moves forward over events whose effects are all in
 *     the Lua states; after a fault it is reset to `cp_position`.
 *   - Slots reference the arena by offset (the arena may move while a
 *     batch is being filled); the batch is run before anything else reads
 *     the states (every reader calls proj_flush first).
 *   - The Lua stack is balanced on return from every public function.
 *   - A slot's fld[] is valid only when slot.fast is 1: then it holds the
 *     arena offsets of the values of the type's plan keys (locate_keys), and
 *     the runtime decodes nothing else of that payload.
 */
#define _GNU_SOURCE
#include "proj.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <msgpack/pack.h>

#include "bytes.h"
#include "json.h"
#include "luamp.h"
#include "lsketch.h"
#include "mp.h"
#include "proj_mp.h"
#include "record.h"
#include "sandbox.h"


/* The runtime's Lua source, embedded at build time. */
__asm__(".section .rodata\n"
        ".global proj_rt_lua\n"
        ".type proj_rt_lua, @object\n"
        "proj_rt_lua:\n"
        ".incbin \"engine/proj_rt.lua\"\n"
        ".byte 0\n"
        ".previous\n");
extern const char proj_rt_lua[];

#define PROJ_MAXKEYS 8

typedef struct proj_slot { /* keep in sync with proj_rt.lua */
    double position, version, time;
    uint32_t stream_off, stream_len, data_off, data_len, meta_off, meta_len, id_off, type_idx;
    int32_t fast;                 /* 1: fld located the type's plan keys (or no data) */
    uint32_t fld[PROJ_MAXKEYS];   /* arena offset + 1 of key i's value; 0 = absent */
} proj_slot;

/* The fast path's keys for one type (proj_rt.lua "plans"): the data keys
 * its partition function and handler read, located by C in each payload. */
typedef struct type_plan {
    unsigned n;
    char *key[PROJ_MAXKEYS];
    uint32_t len[PROJ_MAXKEYS];
} type_plan;

typedef struct type_entry {
    char *name;
    size_t len;
    uint32_t idx;
    int handled;
    type_plan *plan;            /* NULL = general path */
} type_entry;

typedef struct dead_letter {
    uint64_t position;
    char *type;
    char *error;
    int committed;
} dead_letter;

struct proj {
    char *name;
    sandbox *sb;
    lua_State *L;
    proj_opts o;
    int rt_ref;                 /* registry ref of the runtime table M */
    /* definition */
    proj_from_kind from;
    char **from_names;
    size_t *from_lens;
    size_t nfrom;
    int dashed;                 /* some from name holds a '-' (no category has one) */
    int partitioned, dead_letter_mode, has_any;
    uint64_t checkpoint_every, checkpoint_ms;
    /* types */
    type_entry *types;          /* open addressing, cap power of two */
    size_t types_cap, ntypes;
    char **type_names;          /* idx -> name */
    type_entry *last_te[2];     /* the last two types seen (a cheap first check: runs of one
                                   type, or two types taking turns); reset on rehash */
    size_t *type_lens;
    /* batch */
    proj_slot *slots;
    unsigned nslots, batch;
    buf arena;
    /* progress */
    uint64_t position, cp_position, events, cp_events, uncommitted;
    volatile int32_t cur_index;         /* written by the runtime per event, read by the watchdog */
    /* faults */
    int faulted;
    int one_shot;               /* proj_set_one_shot: no dirty set, no checkpoints */
    int none_stored;            /* no checkpoint at the start and no rollback since: a
                                   partition not in memory is not in the store either */
    proj_fault fault;
    dead_letter *dls;
    size_t ndl, capdl;
    /* checkpoint output */
    tm_event *emits;
    size_t nemits;
    buf emit_arena;
};

/* ------------------------------------------------------------ helpers */

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

void proj_emit_id(const char *name, uint64_t pos, uint32_t idx, uint8_t id[16]) {
    unsigned char tail[12];
    for (int i = 0; i < 8; i++) tail[i] = (unsigned char)(pos >> (56 - 8 * i));
    for (int i = 0; i < 4; i++) tail[8 + i] = (unsigned char)(idx >> (24 - 8 * i));
    uint64_t a = fnv1a(0xcbf29ce484222325ull, name, strlen(name) + 1);
    a = fnv1a(a, tail, sizeof tail);
    uint64_t b = fnv1a(0x84222325cbf29ce4ull ^ a, tail, sizeof tail);
    b = fnv1a(b, name, strlen(name) + 1);
    /* finalise (splitmix) so nearby positions differ in every bit */
    uint64_t h[2] = {a, b};
    for (int k = 0; k < 2; k++) {
        uint64_t x = h[k];
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
        h[k] = x ^ (x >> 31);
    }
    for (int i = 0; i < 8; i++) {
        id[i] = (uint8_t)(h[0] >> (56 - 8 * i));
        id[8 + i] = (uint8_t)(h[1] >> (56 - 8 * i));
    }
    id[6] = (uint8_t)((id[6] & 0x0f) | 0x80); /* UUID version 8 (custom) */
    id[8] = (uint8_t)((id[8] & 0x3f) | 0x80); /* RFC 4122 variant */
}

static void key_of(buf *k, const proj *p, const char *kind, const char *s, size_t n) {
    buf_reset(k);
    buf_printf(k, "proj/%s/%s", p->name, kind);
    if (s) buf_append(k, s, n);
}

/* Push the runtime's field `f`. */
static void rt_get(proj *p, const char *f) {
    lua_rawgeti(p->L, LUA_REGISTRYINDEX, p->rt_ref);
    lua_getfield(p->L, -1, f);
    lua_remove(p->L, -2);
}

/* ------------------------------------------------------------ backing (reads) */

static int b_get(proj *p, const char *k, size_t kl, char **v, size_t *vl, tm_err *err) {
    if (p->o.backing && p->o.backing->get)
        return p->o.backing->get(p->o.backing->ud, k, kl, v, vl, err);
    if (!p->o.st) return 0;
    return store_kv_get(p->o.st, k, kl, v, vl, err);
}

static int b_scan(proj *p, const char *prefix, size_t pl, proj_kv_fn each, void *ctx,
                  tm_err *err) {
    if (p->o.backing && p->o.backing->scan)
        return p->o.backing->scan(p->o.backing->ud, prefix, pl, each, ctx, err);
    if (!p->o.st) return 0;
    store_kv_iter *it = store_kv_scan(p->o.st, prefix, pl, NULL, 0, err);
    if (!it) return -1;
    const char *k, *v;
    size_t kl, vl;
    int r;
    while ((r = store_kv_next(it, &k, &kl, &v, &vl, err)) == 1)
        if (each(ctx, k, kl, v, vl)) break;
    store_kv_iter_free(it);
    return r < 0 ? -1 : 0;
}

/* 1 = *rec (malloc'd) holds the record at pos, 0 absent, -1 error. */
static int b_record(proj *p, uint64_t pos, char **rec, size_t *len, tm_err *err) {
    if (p->o.backing && p->o.backing->record)
        return p->o.backing->record(p->o.backing->ud, pos, rec, len, err);
    if (!p->o.source) return 0;
    store_iter *it = store_read_all(p->o.source, pos, 0, 1, err);
    if (!it) return -1;
    tm_event ev;
    int r = store_iter_next(it, &ev, err);
    if (r == 1 && ev.position == pos) {
        const char *rp;
        size_t rl;
        store_iter_record(it, &rp, &rl);
        *rec = malloc(rl);
        memcpy(*rec, rp, rl);
        *len = rl;
    } else if (r >= 0) {
        r = 0;
    }
    store_iter_free(it);
    return r;
}

/* ------------------------------------------------------------ C functions for the runtime */

/* C.load(key, committed_blob) -> state or nil */
static int c_load(lua_State *L) {
    proj *p = lua_touserdata(L, lua_upvalueindex(1));
    size_t kl;
    const char *k = luaL_checklstring(L, 1, &kl);
    tm_err err;
    if (lua_type(L, 2) == LUA_TSTRING) {
        size_t n;
        const char *b = lua_tolstring(L, 2, &n);
        if (luamp_push(L, b, n, &err) < 0) return luaL_error(L, "state %s: %s", k, err.msg);
        return 1;
    }
    if (!(p->o.backing && p->o.backing->get) && !p->o.st) return 0; /* nothing stored */
    if (p->none_stored) return 0; /* a build from zero: every state it stored is in memory */
    buf key = BUF_INIT;
    key_of(&key, p, "s/", k, kl);
    char *v = NULL;
    size_t vl = 0;
    int rc = b_get(p, key.ptr, key.len, &v, &vl, &err);
    buf_free(&key);
    if (rc < 0) return luaL_error(L, "loading state '%s': %s", k, err.msg);
    if (rc == 0) return 0;
    if (mp_validate(v, vl, NULL, &err) < 0 || luamp_push(L, v, vl, &err) < 0) {
        free(v);
        return luaL_error(L, "stored state '%s' is corrupt: %s", k, err.msg);
    }
    free(v);
    return 1;
}

/* C.pack(value) -> msgpack string (snapshot of emitted data) */
static int c_pack(lua_State *L) {
    buf b = BUF_INIT;
    tm_err err;
    lua_settop(L, 1);
    if (luamp_encode(L, 1, "data", &b, &err) < 0) {
        buf_free(&b);
        return luaL_error(L, "tm.emit: %s", err.msg);
    }
    lua_pushlstring(L, b.ptr ? b.ptr : "", b.len);
    buf_free(&b);
    return 1;
}

/* C.fetch(position) -> stream, id, metadata of a stored event (for the
 * lazy fields of an event read after its batch), or nothing. */
static int c_fetch(lua_State *L) {
    proj *p = lua_touserdata(L, lua_upvalueindex(1));
    double pos = luaL_checknumber(L, 1);
    if (pos < 1) return 0;
    tm_err err;
    char *rec = NULL;
    size_t rl = 0;
    int r = b_record(p, (uint64_t)pos, &rec, &rl, &err);
    if (r < 0) return luaL_error(L, "reading event %f: %s", pos, err.msg);
    if (r == 0) return 0;
    tm_event ev;
    if (record_decode(rec, rl, &ev, &err) < 0) {
        free(rec);
        return luaL_error(L, "event %f: %s", pos, err.msg);
    }
    char id[37];
    event_id_format(ev.id, id);
    lua_pushlstring(L, ev.stream, ev.stream_len);
    lua_pushlstring(L, id, 36);
    if (ev.meta_len) {
        if (luamp_push(L, ev.meta, ev.meta_len, &err) < 0) {
            free(rec);
            return luaL_error(L, "event %f metadata: %s", pos, err.msg);
        }
    } else {
        lua_newtable(L);
    }
    free(rec);
    return 3;
}

/* ext(type, bytes) -> sketch (the decoder's ext values) */
static int c_ext(lua_State *L) {
    int t = (int)luaL_checkinteger(L, 1);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (lsketch_push_decoded(L, t, s, n) == 0) return 1;
    return luaL_error(L, "event holds an unknown msgpack ext type %d", t);
}

/* ------------------------------------------------------------ definition */

static int bad_def(proj *p, tm_err *err, const char *fmt, const char *a) {
    char m[256];
    snprintf(m, sizeof m, fmt, a);
    return err_set(err, TM_EINVAL, "projection %s: %s", p->name, m);
}

static int add_from(proj *p, const char *s, size_t n) {
    p->from_names = realloc(p->from_names, (p->nfrom + 1) * sizeof *p->from_names);
    p->from_lens = realloc(p->from_lens, (p->nfrom + 1) * sizeof *p->from_lens);
    p->from_names[p->nfrom] = malloc(n + 1);
    memcpy(p->from_names[p->nfrom], s, n);
    p->from_names[p->nfrom][n] = 0;
    p->from_lens[p->nfrom++] = n;
    if (memchr(s, '-', n)) p->dashed = 1;
    return 0;
}

/* def is at stack index d. */
static int read_from(proj *p, int d, tm_err *err) {
    lua_State *L = p->L;
    lua_getfield(L, d, "from");
    int f = lua_gettop(L);
    int rc = 0;
    if (lua_isnil(L, f) || (lua_isstring(L, f) && !strcmp(lua_tostring(L, f), "all"))) {
        p->from = PROJ_FROM_ALL;
    } else if (lua_istable(L, f)) {
        static const struct { const char *k; proj_from_kind kind; int many; } keys[] = {
            {"all", PROJ_FROM_ALL, 0},         {"stream", PROJ_FROM_STREAM, 0},
            {"streams", PROJ_FROM_STREAMS, 1}, {"category", PROJ_FROM_CATEGORY, 0},
            {"types", PROJ_FROM_TYPES, 1},     {"type", PROJ_FROM_TYPES, 0},
        };
        int found = 0;
        for (size_t i = 0; i < sizeof keys / sizeof *keys && rc == 0; i++) {
            lua_getfield(L, f, keys[i].k);
            if (!lua_isnil(L, -1)) {
                if (found++) rc = bad_def(p, err, "%s", "`from` must have exactly one selector");
                p->from = keys[i].kind;
                if (keys[i].kind == PROJ_FROM_ALL) {
                    /* from = { all = true } */
                } else if (!keys[i].many) {
                    if (lua_type(L, -1) != LUA_TSTRING)
                        rc = bad_def(p, err, "from.%s must be a string", keys[i].k);
                    else {
                        size_t n;
                        const char *s = lua_tolstring(L, -1, &n);
                        add_from(p, s, n);
                    }
                } else if (!lua_istable(L, -1) || lua_objlen(L, -1) == 0) {
                    rc = bad_def(p, err, "from.%s must be a non-empty list of strings", keys[i].k);
                } else {
                    size_t n = lua_objlen(L, -1);
                    for (size_t j = 1; j <= n && rc == 0; j++) {
                        lua_rawgeti(L, -1, (int)j);
                        if (lua_type(L, -1) != LUA_TSTRING)
                            rc = bad_def(p, err, "from.%s must be a list of strings", keys[i].k);
                        else {
                            size_t sl;
                            const char *s = lua_tolstring(L, -1, &sl);
                            add_from(p, s, sl);
                        }
                        lua_pop(L, 1);
                    }
                }
            }
            lua_pop(L, 1);
        }
        if (rc == 0 && !found)
            rc = bad_def(p, err, "%s",
                         "`from` needs one of all, stream, streams, category, types");
    } else {
        rc = bad_def(p, err, "%s", "`from` must be a table (or \"all\")");
    }
    lua_settop(L, f - 1);
    return rc;
}

static int read_def(proj *p, int d, tm_err *err) {
    lua_State *L = p->L;
    if (!lua_istable(L, d)) return bad_def(p, err, "%s", "the script must return a table");
    if (read_from(p, d, err) < 0) return -1;
    lua_getfield(L, d, "on");
    if (!lua_istable(L, -1)) return bad_def(p, err, "%s", "`on` must be a table of handlers");
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        if (lua_type(L, -2) != LUA_TSTRING || !lua_isfunction(L, -1))
            return bad_def(p, err, "%s", "`on` maps event types (strings) to functions");
        lua_pop(L, 1);
    }
    lua_getfield(L, -1, "$any");
    p->has_any = lua_isfunction(L, -1);
    lua_pop(L, 2);
    lua_getfield(L, d, "init");
    if (!lua_isnil(L, -1) && !lua_isfunction(L, -1))
        return bad_def(p, err, "%s", "`init` must be a function");
    lua_pop(L, 1);
    lua_getfield(L, d, "partition");
    if (lua_isfunction(L, -1)) p->partitioned = 1;
    else if (lua_type(L, -1) == LUA_TSTRING && !strcmp(lua_tostring(L, -1), "stream"))
        p->partitioned = 1;
    else if (!lua_isnil(L, -1))
        return bad_def(p, err, "%s", "`partition` must be a function or \"stream\"");
    lua_pop(L, 1);
    lua_getfield(L, d, "queries");
    if (!lua_isnil(L, -1) && !lua_istable(L, -1))
        return bad_def(p, err, "%s", "`queries` must be a table of functions");
    lua_pop(L, 1);
    /* options: top-level or under `options` */
    lua_getfield(L, d, "options");
    int opt = lua_istable(L, -1) ? lua_gettop(L) : d;
    lua_getfield(L, opt, "checkpoint_every");
    if (lua_isnumber(L, -1) && lua_tonumber(L, -1) >= 1)
        p->checkpoint_every = (uint64_t)lua_tonumber(L, -1);
    lua_getfield(L, opt, "checkpoint_ms");
    if (lua_isnumber(L, -1) && lua_tonumber(L, -1) >= 1)
        p->checkpoint_ms = (uint64_t)lua_tonumber(L, -1);
    lua_getfield(L, opt, "on_error");
    if (lua_isstring(L, -1)) {
        const char *m = lua_tostring(L, -1);
        if (!strcmp(m, "dead_letter")) p->dead_letter_mode = 1;
        else if (strcmp(m, "fault"))
            return bad_def(p, err, "%s", "on_error must be \"fault\" or \"dead_letter\"");
    }
    lua_pop(L, 4);
    return 0;
}

/* ------------------------------------------------------------ life cycle */

static void sb_hard_limit(void *ud, double limit) {
    proj *p = ud;
    if (p->o.on_hard_limit) {
        p->o.on_hard_limit(p, p->o.ud);
        return;
    }
    char msg[700];
    uint64_t pos;
    const char *t;
    size_t tl;
    proj_current(p, &pos, &t, &tl);
    int n = snprintf(msg, sizeof msg,
                     "tidemark: projection %s faulted at position %llu (type %.*s): "
                     "CPU limit exceeded (%gs) in a JIT-compiled loop\n",
                     p->name, (unsigned long long)pos, (int)(tl < 256 ? tl : 256), t ? t : "?",
                     limit);
    if (n > 0) {
        ssize_t w = write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
        (void)w;
    }
    _exit(1);
}

static void proj_print(void *ud, const char *line, size_t len) {
    proj *p = ud;
    p->o.print(p->o.ud, line, len);
}

/* Names become store keys (proj/NAME/...): a safe, bounded alphabet. */
static int valid_name(const char *n) {
    size_t l = strlen(n);
    if (l == 0 || l > 128) return 0;
    for (size_t i = 0; i < l; i++) {
        char c = n[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.'))
            return 0;
    }
    return 1;
}

proj *proj_new(const char *name, const char *src, size_t len, const char *filename,
               const proj_opts *opts, tm_err *err) {
    if (!valid_name(name)) {
        err_set(err, TM_EINVAL,
                "bad projection name '%.200s' (1-128 characters of A-Z a-z 0-9 _ - .)", name);
        return NULL;
    }
    proj *p = calloc(1, sizeof *p);
    p->name = strdup(name);
    if (opts) p->o = *opts;
    p->batch = p->o.batch ? p->o.batch : 256;
    p->slots = malloc(p->batch * sizeof *p->slots);
    p->rt_ref = LUA_NOREF;
    p->cur_index = -1;
    sandbox_opts so = {.memory_limit = p->o.memory_limit, .cpu_limit = p->o.cpu_limit,
                       .grow_step = p->o.grow_step,
                       .on_hard_limit = sb_hard_limit, .ud = p,
                       .print = p->o.print ? proj_print : NULL};
    p->sb = sandbox_new(&so, err);
    if (!p->sb) goto fail;
    p->L = sandbox_lua(p->sb);
    lua_State *L = p->L;

    /* 1. the user's script -> definition table (tm.emit/link exist but
     * refuse to work until handlers run) */
    if (luaL_dostring(L, "local function no() error('tm.emit and tm.link may only be called "
                         "from a handler', 2) end tm.emit = no tm.link = no") != 0) {
        err_set(err, TM_EIO, "runtime: %s", lua_tostring(L, -1));
        goto fail;
    }
    if (sandbox_load(p->sb, src, len, filename, err) < 0) goto fail;
    buf tb = BUF_INIT;
    sandbox_enter(p->sb);
    int rc = sandbox_pcall(p->sb, 0, 1, &tb, err);
    sandbox_leave(p->sb);
    buf_free(&tb);
    if (rc < 0) goto fail;
    int d = lua_gettop(L);
    if (read_def(p, d, err) < 0) goto fail;

    /* 2. the runtime, with ffi and the C helpers */
    if (luaL_loadbuffer(L, proj_rt_lua, strlen(proj_rt_lua), "=proj_rt") != 0) {
        err_set(err, TM_EIO, "runtime: %s", lua_tostring(L, -1));
        goto fail;
    }
    sandbox_push_ffi(p->sb);
    lua_getglobal(L, "bit");
    lua_pushvalue(L, d);
    lua_getfield(L, LUA_REGISTRYINDEX, "tidemark.rngseed");
    lua_createtable(L, 0, 3);
    lua_pushlightuserdata(L, p);
    lua_pushcclosure(L, c_load, 1);
    lua_setfield(L, -2, "load");
    lua_pushcfunction(L, c_pack);
    lua_setfield(L, -2, "pack");
    lua_pushlightuserdata(L, p);
    lua_pushcclosure(L, c_fetch, 1);
    lua_setfield(L, -2, "fetch");
    /* the msgpack decoder (proj_mp.h); ext values are sketches */
    if (proj_mp_push(p->sb, c_ext, 0, err) < 0) goto fail;
    /* jit.util (bytecode inspection for the fast path's analysis) */
    sandbox_push_preloaded(p->sb, "jit.util");
    if (lua_pcall(L, 7, 1, 0) != 0) {
        err_set(err, TM_EIO, "runtime: %s", lua_tostring(L, -1));
        goto fail;
    }
    /* tm.emit / tm.link */
    lua_getglobal(L, "tm");
    lua_getfield(L, -2, "emit");
    lua_setfield(L, -2, "emit");
    lua_getfield(L, -2, "link");
    lua_setfield(L, -2, "link");
    lua_pop(L, 1);
    p->rt_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, 0);
    sandbox_lock_globals(p->sb);
    return p;
fail:
    proj_free(p);
    return NULL;
}

void proj_free(proj *p) {
    if (!p) return;
    sandbox_free(p->sb);
    for (size_t i = 0; i < p->nfrom; i++) free(p->from_names[i]);
    free(p->from_names);
    free(p->from_lens);
    for (size_t i = 0; i < p->types_cap; i++) {
        free(p->types[i].name);
        if (p->types[i].plan) {
            for (unsigned k = 0; k < p->types[i].plan->n; k++) free(p->types[i].plan->key[k]);
            free(p->types[i].plan);
        }
    }
    free(p->types);
    free(p->type_names);
    free(p->type_lens);
    for (size_t i = 0; i < p->ndl; i++) {
        free(p->dls[i].type);
        free(p->dls[i].error);
    }
    free(p->dls);
    free(p->slots);
    buf_free(&p->arena);
    free(p->fault.traceback);
    free(p->emits);
    buf_free(&p->emit_arena);
    free(p->name);
    free(p);
}

const char *proj_name(const proj *p) { return p->name; }
proj_from_kind proj_from(const proj *p) { return p->from; }
size_t proj_from_count(const proj *p) { return p->nfrom; }
const char *proj_from_name(const proj *p, size_t i, size_t *len) {
    if (i >= p->nfrom) return NULL;
    if (len) *len = p->from_lens[i];
    return p->from_names[i];
}

store_iter *proj_open_reader(store *s, const proj *p, uint64_t from, tm_err *err) {
    if (p->nfrom == 1) {
        const char *name = p->from_names[0];
        size_t len = p->from_lens[0];
        switch (p->from) {
        case PROJ_FROM_CATEGORY: return store_read_category(s, name, len, from, 0, err);
        case PROJ_FROM_TYPES: return store_read_type(s, name, len, from, 0, err);
        case PROJ_FROM_STREAM:
        case PROJ_FROM_STREAMS:
            /* versions, not positions: proj_feed skips what it has seen */
            return store_read_stream(s, name, len, 0, 0, 0, err);
        default: break;
        }
    }
    return store_read_all(s, from, 0, 0, err);
}
int proj_partitioned(const proj *p) { return p->partitioned; }
int proj_dead_letter_mode(const proj *p) { return p->dead_letter_mode; }
uint64_t proj_checkpoint_every(const proj *p) { return p->checkpoint_every; }
uint64_t proj_checkpoint_ms(const proj *p) { return p->checkpoint_ms; }
uint64_t proj_position(const proj *p) { return p->position; }
uint64_t proj_events(const proj *p) { return p->events; }
uint64_t proj_uncommitted(const proj *p) { return p->uncommitted; }
const proj_fault *proj_fault_info(const proj *p) { return p->faulted ? &p->fault : NULL; }

void proj_current(const proj *p, uint64_t *position, const char **type, size_t *type_len) {
    int32_t j = p->cur_index;
    if (j < 0 || (unsigned)j >= p->nslots) {
        if (position) *position = p->position;
        if (type) *type = NULL;
        if (type_len) *type_len = 0;
        return;
    }
    const proj_slot *s = &p->slots[j];
    if (position) *position = (uint64_t)s->position;
    if (type) *type = p->type_names[s->type_idx];
    if (type_len) *type_len = p->type_lens[s->type_idx];
}

static int name_in(const proj *p, const char *s, size_t n) {
    for (size_t i = 0; i < p->nfrom; i++)
        if (p->from_lens[i] == n && bytes_eq(p->from_names[i], s, n)) return 1;
    return 0;
}

/* s's category is one of the names: s is a name, or a name and a '-'.
 * Without a search for the dash: a name holding none matches only there
 * (a replay reader and every worker ask this of every event). */
static int category_in(const proj *p, const char *s, size_t n) {
    if (p->dashed) return name_in(p, s, event_category_len(s, n));
    for (size_t i = 0; i < p->nfrom; i++) {
        size_t l = p->from_lens[i];
        if (n >= l && (n == l || s[l] == '-') && bytes_eq(p->from_names[i], s, l)) return 1;
    }
    return 0;
}

int proj_selects(const proj *p, const tm_event *ev) {
    switch (p->from) {
    case PROJ_FROM_ALL: return 1;
    case PROJ_FROM_STREAM:
    case PROJ_FROM_STREAMS: return name_in(p, ev->stream, ev->stream_len);
    case PROJ_FROM_CATEGORY:
        return category_in(p, ev->stream, ev->stream_len);
    case PROJ_FROM_TYPES: return name_in(p, ev->type, ev->type_len);
    }
    return 0;
}

/* ------------------------------------------------------------ types */

/* The keys table at the top of the stack -> a plan (NULL if unusable). */
static type_plan *read_plan(lua_State *L) {
    size_t n = lua_objlen(L, -1);
    if (n > PROJ_MAXKEYS) return NULL;
    type_plan *pl = calloc(1, sizeof *pl);
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        size_t kl;
        const char *k = lua_tolstring(L, -1, &kl);
        pl->key[pl->n] = malloc(kl + 1);
        memcpy(pl->key[pl->n], k ? k : "", kl);
        pl->len[pl->n++] = (uint32_t)kl;
        lua_pop(L, 1);
    }
    return pl;
}

static type_entry *intern_type(proj *p, const char *t, size_t n) {
    if ((p->ntypes + 1) * 2 > p->types_cap) {
        size_t cap = p->types_cap ? p->types_cap * 2 : 64;
        type_entry *nt = calloc(cap, sizeof *nt);
        for (size_t i = 0; i < p->types_cap; i++) {
            if (!p->types[i].name) continue;
            size_t h = fnv1a(0xcbf29ce484222325ull, p->types[i].name, p->types[i].len) & (cap - 1);
            while (nt[h].name) h = (h + 1) & (cap - 1);
            nt[h] = p->types[i];
        }
        free(p->types);
        p->types = nt;
        p->last_te[0] = p->last_te[1] = NULL;
        p->types_cap = cap;
        p->type_names = realloc(p->type_names, cap * sizeof *p->type_names);
        p->type_lens = realloc(p->type_lens, cap * sizeof *p->type_lens);
    }
    size_t h = fnv1a(0xcbf29ce484222325ull, t, n) & (p->types_cap - 1);
    while (p->types[h].name) {
        if (p->types[h].len == n && bytes_eq(p->types[h].name, t, n)) return &p->types[h];
        h = (h + 1) & (p->types_cap - 1);
    }
    type_entry *e = &p->types[h];
    e->name = malloc(n + 1);
    memcpy(e->name, t, n);
    e->name[n] = 0;
    e->len = n;
    e->idx = (uint32_t)p->ntypes++;
    p->type_names[e->idx] = e->name;
    p->type_lens[e->idx] = n;
    lua_State *L = p->L;
    rt_get(p, "types");
    lua_pushlstring(L, t, n);
    lua_rawseti(L, -2, (int)e->idx);
    lua_pop(L, 1);
    rt_get(p, "handles");
    lua_pushlstring(L, t, n);
    lua_call(L, 1, 2);
    e->handled = lua_toboolean(L, -2);
    e->plan = e->handled && lua_istable(L, -1) ? read_plan(L) : NULL;
    lua_pop(L, 2);
    return e;
}

/* Locate the plan's keys in the payload (a map with string keys).  Returns
 * 1 with s->fld filled, or 0 when the general path must decode it (not a
 * map, a key that is not a string, an ext value the full decode would
 * check, malformed bytes): the fast path must observe exactly what the full
 * decode would. */
static int locate_keys(const type_plan *pl, const char *d, size_t len, uint32_t base,
                       proj_slot *s) {
    for (unsigned i = 0; i < pl->n; i++) s->fld[i] = 0;
    if (len == 0) return 1;
    const char *q = d, *end = d + len;
    mp_item it;
    if (mp_next(&q, end, &it) < 0 || it.type != MP_MAP) return 0;
    for (uint32_t e = 0; e < it.v.n; e++) {
        mp_item k;
        if (mp_next(&q, end, &k) < 0 || (k.type != MP_STR && k.type != MP_BIN)) return 0;
        const char *v = q;
        /* skip the value, refusing ext values anywhere inside it */
        uint64_t pending = 1;
        while (pending) {
            mp_item x;
            if (mp_next(&q, end, &x) < 0 || x.type == MP_EXT) return 0;
            pending--;
            if (x.type == MP_ARRAY) pending += x.v.n;
            else if (x.type == MP_MAP) pending += 2 * (uint64_t)x.v.n;
            if (pending > (uint64_t)(end - q)) return 0;
        }
        for (unsigned i = 0; i < pl->n; i++)
            if (pl->len[i] == k.v.s.len && bytes_eq(pl->key[i], k.v.s.ptr, k.v.s.len)) {
                s->fld[i] = base + (uint32_t)(v - d) + 1; /* the last duplicate wins, as in Lua */
                break;
            }
    }
    return q == end;
}

int proj_type_fast(proj *p, const char *type, size_t len) {
    type_entry *te = intern_type(p, type, len);
    if (!te->handled) return -1;
    return te->plan != NULL;
}

/* ------------------------------------------------------------ running */

static int is_dead_letter(const proj *p, uint64_t pos) {
    for (size_t i = 0; i < p->ndl; i++)
        if (p->dls[i].position == pos) return 1;
    return 0;
}

/* Discard every effect since the last checkpoint. */
static void rollback(proj *p) {
    p->none_stored = 0; /* states dropped here may be in the store */
    rt_get(p, "rollback");
    lua_call(p->L, 0, 0);
    p->position = p->cp_position;
    p->events = p->cp_events;
    p->uncommitted = 0;
    p->nslots = 0;
    buf_reset(&p->arena);
}

/* Drop the runtime's own frames from a traceback (the script's frames are
 * what its author can act on). */
static void trim_trace(buf *t) {
    if (!t->ptr) return;
    size_t w = 0;
    char *line = t->ptr, *end = t->ptr + t->len;
    while (line < end) {
        char *nl = memchr(line, '\n', (size_t)(end - line));
        size_t n = nl ? (size_t)(nl - line) + 1 : (size_t)(end - line);
        if (!memmem(line, n, "proj_rt:", 8) && !memmem(line, n, "proj_mp:", 8) &&
            !memmem(line, n, "[C]: in function 'error'", 24)) {
            memmove(t->ptr + w, line, n);
            w += n;
        }
        line += n;
    }
    while (w && t->ptr[w - 1] == '\n') w--;
    t->len = w;
    t->ptr[w] = 0;
}

static int run_batch(proj *p, tm_err *err) {
    if (p->nslots == 0) return 0;
    if (p->faulted) return err_set(err, TM_EINVAL, "projection %s is faulted", p->name);
    lua_State *L = p->L;
    unsigned n = p->nslots;
    p->cur_index = 0;
    rt_get(p, "run");
    lua_pushlightuserdata(L, p->slots);
    lua_pushlightuserdata(L, p->arena.ptr ? p->arena.ptr : (char *)p->slots);
    lua_pushinteger(L, (lua_Integer)n);
    lua_pushlightuserdata(L, (void *)&p->cur_index);
    buf trace = BUF_INIT;
    sandbox_enter(p->sb);
    int rc = sandbox_pcall(p->sb, 4, 0, &trace, err);
    sandbox_leave(p->sb);
    if (rc == 0) {
        p->cur_index = -1;
        buf_free(&trace);
        p->position = (uint64_t)p->slots[n - 1].position;
        p->events += n;
        p->uncommitted += n;
        p->nslots = 0;
        buf_reset(&p->arena);
        return 0;
    }
    /* which event? */
    int j = p->cur_index;
    p->cur_index = -1;
    if (j < 0 || (unsigned)j >= n) j = 0;
    const proj_slot *s = &p->slots[j];
    uint64_t pos = (uint64_t)s->position;
    const char *tname = p->type_names[s->type_idx];
    size_t tlen = p->type_lens[s->type_idx];
    if (sandbox_cpu_exceeded(p->sb) && !strstr(err->msg, "CPU limit"))
        err_set(err, TM_EINVAL, "CPU limit exceeded (%gs)", p->o.cpu_limit);
    if (p->dead_letter_mode) {
        if (p->ndl == p->capdl) {
            p->capdl = p->capdl ? p->capdl * 2 : 8;
            p->dls = realloc(p->dls, p->capdl * sizeof *p->dls);
        }
        dead_letter *dl = &p->dls[p->ndl++];
        dl->position = pos;
        dl->type = strndup(tname, tlen);
        dl->error = strdup(err->msg);
        dl->committed = 0;
        buf_free(&trace);
        rollback(p);
        return PROJ_REPLAY;
    }
    p->faulted = 1;
    p->fault.position = pos;
    snprintf(p->fault.type, sizeof p->fault.type, "%.*s", (int)tlen, tname);
    snprintf(p->fault.message, sizeof p->fault.message, "%s", err->msg);
    free(p->fault.traceback);
    trim_trace(&trace);
    p->fault.traceback = buf_steal(&trace, NULL);
    err_set(err, TM_EINVAL, "projection %s faulted at position %llu (type %s): %s", p->name,
            (unsigned long long)pos, p->fault.type, p->fault.message);
    rollback(p);
    return -1;
}

int proj_flush(proj *p, tm_err *err) { return run_batch(p, err); }

int proj_set_one_shot(proj *p, tm_err *err) {
    if (p->dead_letter_mode)
        return err_set(err, TM_EINVAL, "projection %s: dead-letter mode needs checkpoints",
                       p->name);
    if (p->events || p->position || p->nslots)
        return err_set(err, TM_EINVAL, "projection %s: one-shot must be set before events",
                       p->name);
    rt_get(p, "one_shot");
    lua_call(p->L, 0, 0);
    p->one_shot = 1;
    return 0;
}

int proj_feed(proj *p, const tm_event *ev, tm_err *err) {
    if (p->faulted) return err_set(err, TM_EINVAL, "projection %s is faulted", p->name);
    if (ev->position <= p->position) return 0; /* already applied */
    if (!proj_selects(p, ev) || (p->ndl && is_dead_letter(p, ev->position))) {
        /* not ours: only the position moves (when nothing is pending, so
         * position never runs ahead of unapplied events) */
        if (p->nslots == 0) p->position = ev->position;
        return 0;
    }
    type_entry *te = p->last_te[0]; /* skip the hash for the last two types */
    if (!te || te->len != ev->type_len || !bytes_eq(te->name, ev->type, ev->type_len)) {
        te = p->last_te[1];
        if (!te || te->len != ev->type_len || !bytes_eq(te->name, ev->type, ev->type_len))
            te = intern_type(p, ev->type, ev->type_len);
        p->last_te[1] = p->last_te[0];
        p->last_te[0] = te;
    }
    if (!te->handled) {
        if (p->nslots == 0) p->position = ev->position;
        return 0;
    }
    uint32_t ti = te->idx;
    proj_slot *s = &p->slots[p->nslots++];
    buf *a = &p->arena;
    s->position = (double)ev->position;
    s->version = (double)ev->version;
    s->time = (double)ev->time_ms;
    s->type_idx = ti;
    /* one reservation, then plain copies: stream, data, meta, id */
    buf_reserve(a, ev->stream_len + ev->data_len + ev->meta_len + 16);
    char *at = a->ptr + a->len;
    s->stream_off = (uint32_t)a->len;
    s->stream_len = (uint32_t)ev->stream_len;
    if (ev->stream_len) memcpy(at, ev->stream, ev->stream_len);
    at += ev->stream_len;
    s->data_off = (uint32_t)(at - a->ptr);
    s->data_len = (uint32_t)ev->data_len;
    if (ev->data_len) memcpy(at, ev->data, ev->data_len);
    at += ev->data_len;
    s->meta_off = (uint32_t)(at - a->ptr);
    s->meta_len = (uint32_t)ev->meta_len;
    if (ev->meta_len) memcpy(at, ev->meta, ev->meta_len);
    at += ev->meta_len;
    s->id_off = (uint32_t)(at - a->ptr);
    memcpy(at, ev->id, 16);
    a->len = (size_t)(at + 16 - a->ptr);
    a->ptr[a->len] = '\0'; /* as buf_append leaves it */
    s->fast = te->plan ? locate_keys(te->plan, ev->data, ev->data_len, s->data_off, s) : 0;
    if (p->nslots == p->batch) return run_batch(p, err);
    return 0;
}

/* ------------------------------------------------------------ checkpoints */

static int wr(void *data, const char *p, size_t n) {
    buf_append(data, p, n);
    return 0;
}

static void pack_str(msgpack_packer *pk, const char *s, size_t n) {
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

typedef struct dirty_ctx {
    proj *p;
    proj_put_fn put;
    void *ud;
    tm_err *err;
    buf key, val;   /* owned by write_states: freed even when an error unwinds */
} dirty_ctx;

/* Every dirty state to put (or into `committed`); runs under
 * sandbox_protect (encoding allocates in the capped heap). */
static int encode_dirty(lua_State *L, void *ud) {
    dirty_ctx *c = ud;
    proj *p = c->p;
    proj_put_fn put = c->put;
    tm_err *err = c->err;
    rt_get(p, "dirty");
    int dt = lua_gettop(L);
    rt_get(p, "states");
    int st = lua_gettop(L);
    rt_get(p, "committed");
    int ct = lua_gettop(L);
    buf *key = &c->key, *val = &c->val;
    int rc = 0;
    lua_pushnil(L);
    while (rc == 0 && lua_next(L, dt)) {
        lua_pop(L, 1);
        size_t kl;
        const char *k = lua_tolstring(L, -1, &kl);
        lua_pushvalue(L, -1);
        lua_rawget(L, st);
        buf_reset(val);
        char what[300];
        snprintf(what, sizeof what, "state[%.*s]", (int)(kl < 200 ? kl : 200), k);
        if (luamp_encode(L, lua_gettop(L), what, val, err) < 0) rc = -1;
        lua_pop(L, 1);
        if (rc < 0) break;
        if (put) {
            key_of(key, p, "s/", k, kl);
            put(c->ud, key->ptr, key->len, val->ptr, val->len);
        } else {
            lua_pushvalue(L, -1);
            lua_pushlstring(L, val->ptr, val->len);
            lua_rawset(L, ct);
        }
    }
    if (rc < 0) lua_pop(L, 1); /* the key left by the interrupted lua_next */
    lua_settop(L, dt - 1);
    return rc;
}

void proj_checkpoint_record(buf *out, uint64_t dead_letters, uint64_t events, uint64_t position) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, out, wr);
    msgpack_pack_map(&pk, 3);
    pack_str(&pk, "dead_letters", 12);
    msgpack_pack_uint64(&pk, dead_letters);
    pack_str(&pk, "events", 6);
    msgpack_pack_uint64(&pk, events);
    pack_str(&pk, "position", 8);
    msgpack_pack_uint64(&pk, position);
}

/* Encode the dirty states and the checkpoint into b (or the runtime's
 * in-memory `committed` table when b is NULL). */
static int write_states(proj *p, proj_put_fn put, void *ud, tm_err *err) {
    dirty_ctx c = {.p = p, .put = put, .ud = ud, .err = err, .key = BUF_INIT, .val = BUF_INIT};
    int rc = sandbox_protect(p->sb, encode_dirty, &c, 0, err);
    buf key = c.key, val = c.val;
    if (rc == 0 && put) {
        for (size_t i = 0; i < p->ndl; i++) {
            dead_letter *dl = &p->dls[i];
            if (dl->committed) continue;
            char pos[32];
            snprintf(pos, sizeof pos, "%020llu", (unsigned long long)dl->position);
            key_of(&key, p, "dl/", pos, strlen(pos));
            buf_reset(&val);
            msgpack_packer pk;
            msgpack_packer_init(&pk, &val, wr);
            msgpack_pack_map(&pk, 3);
            pack_str(&pk, "error", 5);
            pack_str(&pk, dl->error, strlen(dl->error));
            pack_str(&pk, "position", 8);
            msgpack_pack_uint64(&pk, dl->position);
            pack_str(&pk, "type", 4);
            pack_str(&pk, dl->type, strlen(dl->type));
            put(ud, key.ptr, key.len, val.ptr, val.len);
        }
        buf_reset(&val);
        proj_checkpoint_record(&val, p->ndl, p->events, p->position);
        key_of(&key, p, "cp", NULL, 0);
        put(ud, key.ptr, key.len, val.ptr, val.len);
    }
    buf_free(&key);
    buf_free(&val);
    return rc;
}

/* Turn the runtime's pending outputs into events with derived ids. */
static int collect_emits(proj *p, tm_err *err) {
    lua_State *L = p->L;
    free(p->emits);
    p->emits = NULL;
    p->nemits = 0;
    buf_reset(&p->emit_arena);
    rt_get(p, "take_outs");
    lua_call(L, 0, 1);
    int o = lua_gettop(L);
    size_t n = lua_objlen(L, o);
    if (n == 0) {
        lua_pop(L, 1);
        return 0;
    }
    p->emits = calloc(n, sizeof *p->emits);
    /* first pass: copy bytes into the arena (offsets), second: pointers */
    size_t (*offs)[4] = malloc(n * sizeof *offs);
    uint64_t last_pos = 0;
    uint32_t idx = 0;
    for (size_t i = 0; i < n; i++) {
        lua_rawgeti(L, o, (int)i + 1);
        tm_event *ev = &p->emits[i];
        size_t sl, tl, dl, ml = 0;
        lua_rawgeti(L, -1, 1);
        const char *s = lua_tolstring(L, -1, &sl);
        offs[i][0] = p->emit_arena.len;
        buf_append(&p->emit_arena, s, sl);
        ev->stream_len = sl;
        lua_pop(L, 1);
        lua_rawgeti(L, -1, 2);
        s = lua_tolstring(L, -1, &tl);
        offs[i][1] = p->emit_arena.len;
        buf_append(&p->emit_arena, s, tl);
        ev->type_len = tl;
        lua_pop(L, 1);
        lua_rawgeti(L, -1, 3);
        s = lua_tolstring(L, -1, &dl);
        offs[i][2] = p->emit_arena.len;
        buf_append(&p->emit_arena, s, dl);
        ev->data_len = dl;
        lua_pop(L, 1);
        lua_rawgeti(L, -1, 4);
        offs[i][3] = p->emit_arena.len;
        if (lua_type(L, -1) == LUA_TSTRING) {
            s = lua_tolstring(L, -1, &ml);
            buf_append(&p->emit_arena, s, ml);
        }
        ev->meta_len = ml;
        lua_pop(L, 1);
        lua_rawgeti(L, -1, 5);
        uint64_t pos = (uint64_t)lua_tonumber(L, -1);
        lua_pop(L, 2);
        idx = pos == last_pos ? idx + 1 : 0;
        last_pos = pos;
        proj_emit_id(p->name, pos, idx, ev->id);
        ev->has_id = 1;
    }
    lua_pop(L, 1);
    for (size_t i = 0; i < n; i++) {
        tm_event *ev = &p->emits[i];
        ev->stream = p->emit_arena.ptr + offs[i][0];
        ev->type = p->emit_arena.ptr + offs[i][1];
        ev->data = p->emit_arena.ptr + offs[i][2];
        ev->meta = ev->meta_len ? p->emit_arena.ptr + offs[i][3] : NULL;
    }
    free(offs);
    p->nemits = n;
    (void)err;
    return 0;
}

static void batch_put(void *ud, const char *k, size_t kl, const char *v, size_t vl) {
    store_batch_put(ud, k, kl, v, vl);
}

int proj_checkpoint(proj *p, store_batch *b, tm_event **emits, size_t *nemits, tm_err *err) {
    return proj_checkpoint_to(p, b ? batch_put : NULL, b, emits, nemits, err);
}

int proj_checkpoint_to(proj *p, proj_put_fn put, void *ud, tm_event **emits, size_t *nemits,
                       tm_err *err) {
    if (p->one_shot)
        return err_set(err, TM_EINVAL, "projection %s: a one-shot run keeps no checkpoints",
                       p->name);
    int rc = run_batch(p, err);
    if (rc != 0) return rc;
    if (write_states(p, put, ud, err) < 0) return -1;
    if (collect_emits(p, err) < 0) return -1;
    if (emits) *emits = p->emits;
    if (nemits) *nemits = p->nemits;
    return 0;
}

void proj_checkpoint_done(proj *p) {
    rt_get(p, "clear_dirty");
    lua_call(p->L, 0, 0);
    for (size_t i = 0; i < p->ndl; i++) p->dls[i].committed = 1;
    p->cp_position = p->position;
    p->cp_events = p->events;
    p->uncommitted = 0;
}

/* Append emitted events idempotently: all at once, or one by one when a
 * retry after a crash finds some of them stored already. */
static int append_emits(proj *p, tm_err *err) {
    if (!p->nemits || !p->o.st) return 0;
    if (store_append(p->o.st, p->emits, p->nemits, NULL, 0, err) == 0) return 0;
    if (err->code != TM_ECONFLICT) return -1;
    for (size_t i = 0; i < p->nemits; i++)
        if (store_append(p->o.st, &p->emits[i], 1, NULL, 0, err) < 0) return -1;
    return 0;
}

int proj_commit(proj *p, tm_err *err) {
    store_batch *b = p->o.st ? store_batch_new() : NULL;
    int rc = proj_checkpoint(p, b, NULL, NULL, err);
    if (rc == 0) rc = append_emits(p, err);
    if (rc == 0 && b) rc = store_batch_commit(p->o.st, b, err);
    if (rc == 0) proj_checkpoint_done(p);
    store_batch_free(b);
    return rc;
}

static int add_dl(void *ctx, const char *k, size_t kl, const char *v, size_t vl) {
    proj *p = ctx;
    (void)v;
    (void)vl;
    if (kl < 20) return 0;
    if (p->ndl == p->capdl) {
        p->capdl = p->capdl ? p->capdl * 2 : 8;
        p->dls = realloc(p->dls, p->capdl * sizeof *p->dls);
    }
    dead_letter *dl = &p->dls[p->ndl++];
    char num[21];
    memcpy(num, k + kl - 20, 20);
    num[20] = 0;
    dl->position = strtoull(num, NULL, 10);
    dl->type = strdup("");
    dl->error = strdup("");
    dl->committed = 1;
    return 0;
}

int proj_restore(proj *p, tm_err *err) {
    buf key = BUF_INIT;
    key_of(&key, p, "cp", NULL, 0);
    char *v = NULL;
    size_t vl = 0;
    int rc = b_get(p, key.ptr, key.len, &v, &vl, err);
    buf_free(&key);
    if (rc == 0) p->none_stored = 1; /* never checkpointed: nothing of it is stored */
    if (rc <= 0) return rc;
    const char *val;
    size_t len;
    mp_item it;
    if (mp_validate(v, vl, NULL, err) < 0) goto corrupt;
    if (mp_map_find(v, vl, "position", 8, &val, &len) == 1) {
        if (mp_next(&val, val + len, &it) < 0 || it.type != MP_UINT) goto corrupt;
        p->position = p->cp_position = it.v.u;
    }
    if (mp_map_find(v, vl, "events", 6, &val, &len) == 1) {
        if (mp_next(&val, val + len, &it) == 0 && it.type == MP_UINT)
            p->events = p->cp_events = it.v.u;
    }
    free(v);
    /* dead letters: keep their positions so replays skip them */
    key_of(&key, p, "dl/", NULL, 0);
    rc = b_scan(p, key.ptr, key.len, add_dl, p, err);
    buf_free(&key);
    return rc;
corrupt:
    free(v);
    return err_set(err, TM_EIO, "projection %s: corrupt checkpoint record", p->name);
}

int proj_reset(proj *p, tm_err *err) {
    if (!p->o.st) return 0;
    buf key = BUF_INIT;
    buf_printf(&key, "proj/%s/", p->name);
    int rc = store_kv_delete_prefix(p->o.st, key.ptr, key.len, err);
    buf_free(&key);
    return rc;
}

/* ------------------------------------------------------------ reading */

struct load_ctx {
    proj *p;
    int st;        /* stack index of the states table */
    size_t plen;   /* key prefix length */
    tm_err *err;
    int failed;
};

static int load_one(void *ctx, const char *k, size_t kl, const char *v, size_t vl) {
    struct load_ctx *c = ctx;
    lua_State *L = c->p->L;
    lua_pushlstring(L, k + c->plen, kl - c->plen);
    lua_pushvalue(L, -1);
    lua_rawget(L, c->st);
    int have = !lua_isnil(L, -1);
    lua_pop(L, 1);
    if (have) {
        lua_pop(L, 1);
        return 0;
    }
    if (mp_validate(v, vl, NULL, c->err) < 0 || luamp_push(L, v, vl, c->err) < 0) {
        lua_pop(L, 1);
        err_prefix(c->err, "projection %s: stored state", c->p->name);
        c->failed = 1;
        return 1;
    }
    lua_rawset(L, c->st);
    return 0;
}

/* Load every stored partition not yet in memory (partitioned queries). */
static int load_all(proj *p, tm_err *err) {
    lua_State *L = p->L;
    if (!p->partitioned) return 0;
    rt_get(p, "states");
    int st = lua_gettop(L);
    /* in-memory checkpoints */
    rt_get(p, "committed");
    int ct = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, ct)) {
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        lua_rawget(L, st);
        int have = !lua_isnil(L, -1);
        lua_pop(L, 1);
        if (!have) {
            rt_get(p, "get");
            lua_pushvalue(L, -2);
            if (lua_pcall(L, 1, 0, 0) != 0) {
                err_set(err, TM_EIO, "%s", lua_tostring(L, -1));
                lua_settop(L, st - 1);
                return -1;
            }
        }
    }
    buf key = BUF_INIT;
    key_of(&key, p, "s/", NULL, 0);
    struct load_ctx c = {p, st, key.len, err, 0};
    int rc = b_scan(p, key.ptr, key.len, load_one, &c, err);
    buf_free(&key);
    if (rc < 0 || c.failed) {
        lua_settop(L, st - 1);
        return -1;
    }
    lua_settop(L, st - 1);
    return 0;
}

typedef struct enc_ctx {
    const char *what;
    buf *out;
    tm_err *err;
    int done;           /* luamp_encode returned (else a Lua error unwound it) */
} enc_ctx;

static int encode_top(lua_State *L, void *ud) {
    enc_ctx *c = ud;
    int rc = luamp_encode(L, 2, c->what, c->out, c->err);
    c->done = 1;
    return rc;
}

/* Pop the value on top of the stack and append its msgpack to out, under
 * sandbox_protect: a model too large for the memory cap to encode is an
 * error, not an abort. */
static int encode_protected(proj *p, const char *what, buf *out, tm_err *err) {
    size_t len0 = out->len;
    enc_ctx c = {what, out, err, 0};
    /* Lua 5.1 has no emergency collection: after hitting the cap (the
     * garbage of the run is collected then) it is tried once more */
    lua_pushvalue(p->L, -1);
    int rc = sandbox_protect(p->sb, encode_top, &c, 1, err);
    if (rc < 0 && !c.done && strstr(err->msg, "memory limit")) {
        out->len = len0;
        lua_pushvalue(p->L, -1);
        rc = sandbox_protect(p->sb, encode_top, &c, 1, err);
    }
    lua_pop(p->L, 1);
    if (rc < 0) {
        out->len = len0;
        if (!c.done) err_prefix(err, "projection %s: encoding the %s", p->name, what);
    }
    return rc;
}

/* Call runtime function f with the nargs values on the stack, encode its
 * one result to out. */
static int call_encode(proj *p, const char *f, int nargs, const char *what, buf *out,
                       tm_err *err) {
    lua_State *L = p->L;
    rt_get(p, f);
    lua_insert(L, -(nargs + 1));
    sandbox_enter(p->sb);
    int rc = sandbox_pcall(p->sb, nargs, 1, NULL, err);
    sandbox_leave(p->sb);
    if (rc < 0) return -1;
    return encode_protected(p, what, out, err);
}

static int prepare_read(proj *p, tm_err *err) {
    if (p->nslots && run_batch(p, err) != 0) return -1;
    return load_all(p, err);
}

int proj_state(proj *p, buf *out, tm_err *err) {
    if (prepare_read(p, err) < 0) return -1;
    return call_encode(p, "view", 0, "state", out, err);
}

int proj_state_pairs(proj *p, proj_kv_fn each, void *ctx, tm_err *err) {
    if (!p->partitioned)
        return err_set(err, TM_EINVAL, "projection %s is not partitioned", p->name);
    buf b = BUF_INIT;
    if (proj_state(p, &b, err) < 0) {
        buf_free(&b);
        return -1;
    }
    const char *q = b.ptr, *end = b.ptr + b.len;
    mp_item it;
    int rc = mp_next(&q, end, &it) == 0 && it.type == MP_MAP ? 0 : -1;
    for (uint32_t i = 0; rc == 0 && i < it.v.n; i++) {
        mp_item k;
        if (mp_next(&q, end, &k) < 0 || k.type != MP_STR) {
            rc = -1;
            break;
        }
        const char *v = q;
        if (mp_skip(&q, end) < 0) rc = -1;
        else if (each(ctx, k.v.s.ptr, k.v.s.len, v, (size_t)(q - v))) break;
    }
    buf_free(&b);
    if (rc < 0) return err_set(err, TM_EIO, "projection %s: unreadable state map", p->name);
    return 0;
}

int proj_get(proj *p, const char *key, size_t klen, buf *out, tm_err *err) {
    if (p->nslots && run_batch(p, err) != 0) return -1;
    lua_pushlstring(p->L, key, klen);
    return call_encode(p, "get", 1, "state", out, err);
}

int proj_peek(proj *p, const char *key, size_t klen, buf *out, tm_err *err) {
    if (p->nslots && run_batch(p, err) != 0) return -1;
    lua_pushlstring(p->L, key, klen);
    return call_encode(p, "peek", 1, "state", out, err);
}

int proj_peek_many(proj *p, const char *const *keys, const size_t *klens, size_t n, buf *out,
                   tm_err *err) {
    if (p->nslots && run_batch(p, err) != 0) return -1;
    size_t len0 = out->len;
    msgpack_packer pk;
    msgpack_packer_init(&pk, out, wr);
    msgpack_pack_array(&pk, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        lua_pushlstring(p->L, keys[i], klens[i]);
        if (call_encode(p, "peek", 1, "state", out, err) < 0) {
            out->len = len0;
            return -1;
        }
    }
    return 0;
}

int proj_partitions(proj *p, buf *out, tm_err *err) {
    if (prepare_read(p, err) < 0) return -1;
    return call_encode(p, "keys", 0, "keys", out, err);
}

int proj_range(proj *p, const char *from, const char *to, uint64_t limit, buf *out,
               tm_err *err) {
    if (prepare_read(p, err) < 0) return -1;
    lua_State *L = p->L;
    if (from) lua_pushstring(L, from);
    else lua_pushnil(L);
    if (to) lua_pushstring(L, to);
    else lua_pushnil(L);
    if (limit) lua_pushnumber(L, (lua_Number)limit);
    else lua_pushnil(L);
    return call_encode(p, "range", 3, "range", out, err);
}

int proj_prefix(proj *p, const char *prefix, uint64_t limit, buf *out, tm_err *err) {
    if (prepare_read(p, err) < 0) return -1;
    lua_pushstring(p->L, prefix);
    if (limit) lua_pushnumber(p->L, (lua_Number)limit);
    else lua_pushnil(p->L);
    return call_encode(p, "prefix", 2, "prefix", out, err);
}

int proj_top(proj *p, const char *field, uint64_t n, buf *out, tm_err *err) {
    if (prepare_read(p, err) < 0) return -1;
    lua_pushstring(p->L, field);
    lua_pushnumber(p->L, (lua_Number)(n ? n : 10));
    return call_encode(p, "top", 2, "top", out, err);
}

int proj_query(proj *p, const char *name, const char *args, size_t alen, buf *out,
               tm_err *err) {
    if (prepare_read(p, err) < 0) return -1;
    lua_State *L = p->L;
    lua_pushstring(L, name);
    if (args && alen) {
        if (luamp_push(L, args, alen, err) < 0) {
            lua_pop(L, 1);
            return -1;
        }
    } else {
        lua_pushnil(L);
    }
    return call_encode(p, "query", 2, "result", out, err);
}
