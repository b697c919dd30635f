/* sandbox.c — the LuaJIT state for untrusted scripts (see sandbox.h).
 *
 * Owns: the capped allocator, the safe library subset, text-only load,
 * locked globals, the deterministic math.random, the CPU watchdog thread,
 * and protected calls of host C code (sandbox_protect).
 *
 * Invariants:
 *   - `used` is the sum of live allocation sizes the state asked for (its
 *     allocations go through LuaJIT's own allocator, wrapped); an
 *     allocation that would take it past `limit` returns NULL (shrinks and
 *     frees never fail).  Heap grown ahead (grow_step) is not counted.
 *   - The libraries io, os, package, debug, ffi and jit are never
 *     registered in the globals; `jit` is opened only to switch the JIT
 *     compiler on, and removed again.  The registry is unreachable from
 *     scripts (no debug library).
 *   - The watchdog touches the lua_State only through lua_sethook (which
 *     LuaJIT allows asynchronously, as luajit.c's SIGINT handler does) and
 *     only while holding `mu` with `busy` set; sandbox_leave clears the hook
 *     under the same mutex, so a hook never leaks into the next bracket.
 */
#define _GNU_SOURCE
#include "sandbox.h"

#include <lauxlib.h>
#include <lualib.h>
#include <luajit.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "lsketch.h"


struct sandbox {
    lua_State *L;
    lua_Alloc base_alloc;  /* LuaJIT's own allocator (much faster than malloc) */
    void *base_ud;
    size_t used, peak, limit;
    size_t grown;          /* grow_step: heap taken ahead so far (see grow_ahead) */
    int oom;
    sandbox_opts o;
    uint64_t rng;          /* xorshift64* state */
    uint64_t rng_seeded;   /* the seed-table value rng was derived from */
    /* watchdog */
    pthread_t wd;
    int wd_started, wd_stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int busy;               /* inside an enter/leave bracket */
    uint64_t gen;           /* bracket counter */
    clockid_t runner_clock; /* CPU clock of the thread inside the bracket */
    int hooked;             /* soft limit hit in this bracket */
    int exceeded;           /* soft limit hit in the last bracket */
    int protect_ref;        /* registry ref of the sandbox_protect trampoline */
};

/* ------------------------------------------------------------ allocator */

/* Growing ahead (grow_step).  LuaJIT maps its heap in 128 KiB pieces at an
 * address hint that every state in the process shares, so two states
 * growing at the same time take turns and neither's pieces ever merge: its
 * allocator then keeps a list of thousands of segments, which it walks on
 * every new piece and every few hundred large frees (~10% of a two-worker
 * replay's CPU, docs/benchmarks.md section 13).  Instead, the state takes
 * a whole step at once: blocks just below LuaJIT's direct-map threshold
 * come one per mapping from the top of its heap, so a run of them is one
 * segment; freeing them leaves free chunks that later allocations split.
 * Every GROW_PIN-th block stays allocated (freed with the state): a run of
 * free blocks that joined the top would be trimmed (past 2 MiB) at once.
 * Only the blocks' headers touch memory (one page in 30). */
#define GROW_BLOCK (120 * 1024)
#define GROW_PIN 16

static void grow_ahead(sandbox *sb, size_t bytes) {
    size_t n = bytes / GROW_BLOCK;
    void **b = malloc(n * sizeof *b);
    if (!b) return;
    size_t got = 0;
    while (got < n && (b[got] = sb->base_alloc(sb->base_ud, NULL, 0, GROW_BLOCK))) got++;
    for (size_t i = 0; i < got; i++)
        if (i % GROW_PIN != GROW_PIN - 1 && i + 1 < got)
            sb->base_alloc(sb->base_ud, b[i], GROW_BLOCK, 0);
    free(b);
}

static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    sandbox *sb = ud;
    size_t old = ptr ? osize : 0;
    if (nsize == 0) {
        sb->base_alloc(sb->base_ud, ptr, osize, 0);
        sb->used -= old < sb->used ? old : sb->used;
        return NULL;
    }
    if (nsize > old && sb->used + (nsize - old) > sb->limit) {
        sb->oom = 1;
        return NULL;
    }
    /* one to two steps ahead of `used` (the heap is larger: headers, holes) */
    if (sb->o.grow_step && sb->used + nsize + sb->o.grow_step > sb->grown) {
        sb->grown += sb->o.grow_step;
        grow_ahead(sb, sb->o.grow_step);
    }
    void *p = sb->base_alloc(sb->base_ud, ptr, osize, nsize);
    if (!p) return NULL;
    sb->used = sb->used - old + nsize;
    if (sb->used > sb->peak) sb->peak = sb->used;
    return p;
}

/* ------------------------------------------------------------ safe base */

static sandbox *self(lua_State *L) {
    return lua_touserdata(L, lua_upvalueindex(1));
}

static int sb_print(lua_State *L) {
    sandbox *sb = self(L);
    int n = lua_gettop(L);
    luaL_Buffer b;
    lua_getglobal(L, "tostring");
    luaL_buffinit(L, &b);
    for (int i = 1; i <= n; i++) {
        lua_pushvalue(L, n + 1);
        lua_pushvalue(L, i);
        lua_call(L, 1, 1);
        if (!lua_isstring(L, -1)) return luaL_error(L, "'tostring' must return a string to 'print'");
        if (i > 1) luaL_addchar(&b, '\t');
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    if (sb->o.print) sb->o.print(sb->o.ud, s, len);
    else fprintf(stderr, "[lua] %.*s\n", (int)len, s);
    return 0;
}

/* Load text (never bytecode) as a chunk; returns like loadstring. */
static int load_text(lua_State *L, const char *s, size_t len, const char *name) {
    if (len > 0 && s[0] == LUA_SIGNATURE[0]) {
        lua_pushnil(L);
        lua_pushliteral(L, "attempt to load a binary chunk (only source text is allowed)");
        return 2;
    }
    if (luaL_loadbuffer(L, s, len, name) != 0) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    return 1;
}

static int sb_loadstring(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    const char *name = luaL_optstring(L, 2, s);
    return load_text(L, s, len, name);
}

/* load(string | function [, chunkname]): the pieces are gathered first so
 * the binary-chunk check sees the first byte. */
static int sb_load(lua_State *L) {
    if (lua_type(L, 1) == LUA_TSTRING) return sb_loadstring(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    const char *name = luaL_optstring(L, 2, "=(load)");
    luaL_Buffer b;
    lua_settop(L, 2);
    luaL_buffinit(L, &b);
    for (;;) {
        lua_pushvalue(L, 1);
        lua_call(L, 0, 1);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            break;
        }
        if (!lua_isstring(L, -1)) return luaL_error(L, "reader function must return a string");
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    return load_text(L, s, len, name);
}

static int sb_rawset(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    if (lua_rawequal(L, 1, LUA_GLOBALSINDEX))
        return luaL_error(L, "rawset on the globals table is not allowed");
    luaL_checkany(L, 2);
    luaL_checkany(L, 3);
    lua_settop(L, 3);
    lua_rawset(L, 1);
    return 1;
}

static int sb_collectgarbage(lua_State *L) {
    const char *opt = luaL_optstring(L, 1, "collect");
    if (!strcmp(opt, "count")) {
        lua_pushnumber(L, (lua_Number)lua_gc(L, LUA_GCCOUNT, 0) +
                              (lua_Number)lua_gc(L, LUA_GCCOUNTB, 0) / 1024.0);
        return 1;
    }
    if (!strcmp(opt, "collect")) {
        lua_gc(L, LUA_GCCOLLECT, 0);
        lua_pushinteger(L, 0);
        return 1;
    }
    if (!strcmp(opt, "step")) {
        lua_pushboolean(L, lua_gc(L, LUA_GCSTEP, (int)luaL_optinteger(L, 2, 0)));
        return 1;
    }
    return luaL_error(L, "collectgarbage('%s') is not allowed in a projection", opt);
}

/* math.random: xorshift64* seeded from the seed table's [1] (the host
 * stores the current event's position there), so the sequence an event
 * sees depends only on the event, never on history or wall clock. */
static uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static double rng_next(sandbox *sb) {
    uint64_t x = sb->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    sb->rng = x;
    return (double)((x * 0x2545f4914f6cdd1dull) >> 11) / 9007199254740992.0;
}

static int sb_random(lua_State *L) {
    sandbox *sb = self(L);
    lua_rawgeti(L, lua_upvalueindex(2), 1);
    uint64_t seed = (uint64_t)lua_tonumber(L, -1);
    lua_pop(L, 1);
    if (seed != sb->rng_seeded || sb->rng == 0) {
        sb->rng_seeded = seed;
        sb->rng = mix64(seed) | 1;
    }
    double r = rng_next(sb);
    switch (lua_gettop(L)) {
    case 0:
        lua_pushnumber(L, r);
        return 1;
    case 1: {
        double u = luaL_checknumber(L, 1);
        luaL_argcheck(L, 1 <= u, 1, "interval is empty");
        lua_pushnumber(L, (lua_Number)((long long)(r * u) + 1));
        return 1;
    }
    case 2: {
        double l = luaL_checknumber(L, 1), u = luaL_checknumber(L, 2);
        luaL_argcheck(L, l <= u, 2, "interval is empty");
        lua_pushnumber(L, (lua_Number)((long long)(r * (u - l + 1)) + (long long)l));
        return 1;
    }
    default:
        return luaL_error(L, "wrong number of arguments");
    }
}

static void open_lib(lua_State *L, lua_CFunction f, const char *name) {
    lua_pushcfunction(L, f);
    lua_pushstring(L, name);
    lua_call(L, 1, 0);
}

static void set_global_nil(lua_State *L, const char *name) {
    lua_pushnil(L);
    lua_setglobal(L, name);
}

static void set_closure(lua_State *L, int tbl, const char *name, lua_CFunction f, sandbox *sb) {
    lua_pushlightuserdata(L, sb);
    lua_pushcclosure(L, f, 1);
    lua_setfield(L, tbl, name);
}

/* The script-visible seed table: sandbox_seed and the projection runtime
 * write [1]; math.random reads it. */
static const char SEED_KEY[] = "tidemark.rngseed";

static int setup(lua_State *L) {
    sandbox *sb = lua_touserdata(L, 1);
    open_lib(L, luaopen_base, "");
    open_lib(L, luaopen_string, LUA_STRLIBNAME);
    open_lib(L, luaopen_table, LUA_TABLIBNAME);
    open_lib(L, luaopen_math, LUA_MATHLIBNAME);
    open_lib(L, luaopen_bit, LUA_BITLIBNAME);
    open_lib(L, luaopen_jit, LUA_JITLIBNAME); /* switches the JIT compiler on */
    lua_pushcfunction(L, luaopen_ffi); /* kept in the registry for the host */
    lua_call(L, 0, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "tidemark.ffi");

    static const char *const drop[] = {"dofile", "loadfile", "getfenv", "setfenv", "module",
                                       "require", "package", "jit", "ffi", "io", "os",
                                       "debug", "gcinfo", NULL};
    for (int i = 0; drop[i]; i++) set_global_nil(L, drop[i]);

    lua_pushvalue(L, LUA_GLOBALSINDEX);
    int g = lua_gettop(L);
    set_closure(L, g, "print", sb_print, sb);
    lua_pushcfunction(L, sb_load);
    lua_setfield(L, g, "load");
    lua_pushcfunction(L, sb_loadstring);
    lua_setfield(L, g, "loadstring");
    lua_pushcfunction(L, sb_rawset);
    lua_setfield(L, g, "rawset");
    lua_pushcfunction(L, sb_collectgarbage);
    lua_setfield(L, g, "collectgarbage");

    lua_getglobal(L, LUA_STRLIBNAME);
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);

    lua_getglobal(L, LUA_MATHLIBNAME);
    lua_pushnil(L);
    lua_setfield(L, -2, "randomseed");
    lua_pushlightuserdata(L, sb);
    lua_createtable(L, 1, 0);
    lua_pushinteger(L, 0);
    lua_rawseti(L, -2, 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, SEED_KEY);
    lua_pushcclosure(L, sb_random, 2);
    lua_setfield(L, -2, "random");
    lua_pop(L, 1);

    /* tm: the sketch library when linked, plus whatever the host adds. */
    lua_pushcfunction(L, luaopen_tidemark_sketch);
    lua_call(L, 0, 1);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
    }
    lua_setglobal(L, "tm");
    return 0;
}

/* ------------------------------------------------------------ watchdog */

static double mono_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double cpu_of(clockid_t c) {
    struct timespec t;
    if (clock_gettime(c, &t) != 0) return 0;
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void cpu_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    /* Keep firing on every instruction until the bracket ends, so a pcall
     * in the script cannot swallow the error and carry on. */
    lua_sethook(L, cpu_hook, LUA_MASKCOUNT, 1);
    sandbox *sb = NULL;
    lua_getfield(L, LUA_REGISTRYINDEX, "tidemark.sandbox");
    sb = lua_touserdata(L, -1);
    lua_pop(L, 1);
    luaL_error(L, "CPU limit exceeded (%gs)", sb ? sb->o.cpu_limit : 0.0);
}

static void default_hard_limit(void *ud, double limit) {
    (void)ud;
    char msg[160];
    int n = snprintf(msg, sizeof msg,
                     "tidemark: projection fault: CPU limit exceeded (%gs) in a JIT-compiled loop\n",
                     limit);
    if (n > 0) {
        ssize_t w = write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
        (void)w;
    }
    _exit(1);
}

static void *watchdog(void *arg) {
    sandbox *sb = arg;
    double limit = sb->o.cpu_limit, grace = sb->o.grace;
    double period = limit / 10;
    if (period < 0.005) period = 0.005;
    if (period > 0.1) period = 0.1;
    uint64_t seen = 0;
    double cpu0 = 0, soft_at = 0;
    pthread_mutex_lock(&sb->mu);
    while (!sb->wd_stop) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        double when = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9 + period;
        ts.tv_sec = (time_t)when;
        ts.tv_nsec = (long)((when - (double)ts.tv_sec) * 1e9);
        pthread_cond_timedwait(&sb->cv, &sb->mu, &ts);
        if (sb->wd_stop) break;
        if (!sb->busy) continue;
        if (sb->gen != seen) { /* a new bracket: start measuring */
            seen = sb->gen;
            cpu0 = cpu_of(sb->runner_clock);
            soft_at = 0;
            continue;
        }
        if (!sb->hooked) {
            if (cpu_of(sb->runner_clock) - cpu0 >= limit) {
                sb->hooked = 1;
                soft_at = mono_now();
                lua_sethook(sb->L, cpu_hook, LUA_MASKCOUNT, 1);
            }
        } else if (mono_now() - soft_at >= grace) {
            void (*hard)(void *, double) = sb->o.on_hard_limit ? sb->o.on_hard_limit
                                                                : default_hard_limit;
            pthread_mutex_unlock(&sb->mu);
            hard(sb->o.ud, limit);
            pthread_mutex_lock(&sb->mu);
            seen = 0; /* if it returns: do not fire again for this bracket */
            sb->gen++;
        }
    }
    pthread_mutex_unlock(&sb->mu);
    return NULL;
}

/* ------------------------------------------------------------ protected host code */

typedef struct protect_call {
    sandbox_fn fn;
    void *ud;
    int rc;
} protect_call;

static int protect_tramp(lua_State *L) {
    protect_call *c = lua_touserdata(L, 1);
    c->rc = c->fn(L, c->ud);
    return 0;
}

/* The error at the top of the stack (rc from lua_pcall) into err; pops it. */
static void pcall_error(sandbox *sb, int rc, tm_err *err) {
    lua_State *L = sb->L;
    size_t len = 0;
    const char *m = lua_tolstring(L, -1, &len);
    if (!m) m = "(error)";
    const char *nl = memchr(m, '\n', len);
    size_t first = nl ? (size_t)(nl - m) : len;
    if (rc == LUA_ERRMEM || (sb->oom && strstr(m, "not enough memory")))
        err_set(err, TM_EINVAL, "memory limit exceeded (%zu MiB)", sb->limit >> 20);
    else
        err_set(err, TM_EINVAL, "%.*s", (int)(first < 480 ? first : 480), m);
    lua_pop(L, 1);
}

int sandbox_protect(sandbox *sb, sandbox_fn fn, void *ud, int nargs, tm_err *err) {
    lua_State *L = sb->L;
    protect_call c = {fn, ud, 0};
    lua_rawgeti(L, LUA_REGISTRYINDEX, sb->protect_ref);
    lua_insert(L, -(nargs + 1));
    lua_pushlightuserdata(L, &c);
    lua_insert(L, -(nargs + 1)); /* fn, &c, args... */
    int rc = lua_pcall(L, nargs + 1, 0, 0);
    if (rc == 0) return c.rc;
    pcall_error(sb, rc, err);
    if (sb->oom) lua_gc(L, LUA_GCCOLLECT, 0);
    sb->oom = 0;
    return -1;
}

/* ------------------------------------------------------------ public */

sandbox *sandbox_new(const sandbox_opts *opts, tm_err *err) {
    sandbox *sb = calloc(1, sizeof *sb);
    if (!sb) {
        err_set(err, TM_EIO, "out of memory");
        return NULL;
    }
    if (opts) sb->o = *opts;
    sb->limit = sb->o.memory_limit ? sb->o.memory_limit : SANDBOX_DEFAULT_MEMORY;
    if (sb->o.cpu_limit > 0 && sb->o.grace <= 0) {
        double g = sb->o.cpu_limit < 5 ? sb->o.cpu_limit : 5;
        sb->o.grace = g < 0.5 ? 0.5 : g;
    }
    pthread_mutex_init(&sb->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&sb->cv, &ca);
    pthread_condattr_destroy(&ca);
    /* LuaJIT's built-in allocator, wrapped for accounting (GC64 builds also
     * accept lua_newstate with a plain allocator, but malloc is far slower
     * for Lua's allocation pattern). */
    sb->L = luaL_newstate();
    if (!sb->L) {
        err_set(err, TM_EIO, "cannot create a Lua state");
        sandbox_free(sb);
        return NULL;
    }
    lua_State *L = sb->L;
    sb->base_alloc = lua_getallocf(L, &sb->base_ud);
    sb->used = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
    sb->grown = sb->used;
    lua_setallocf(L, sb_alloc, sb);
    lua_pushlightuserdata(L, sb);
    lua_setfield(L, LUA_REGISTRYINDEX, "tidemark.sandbox");
    lua_pushcfunction(L, protect_tramp); /* made once: calling it then allocates nothing */
    sb->protect_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushcfunction(L, setup);
    lua_pushlightuserdata(L, sb);
    if (lua_pcall(L, 1, 0, 0) != 0) {
        err_set(err, TM_EIO, "sandbox setup: %s", lua_tostring(L, -1));
        sandbox_free(sb);
        return NULL;
    }
    if (sb->o.cpu_limit > 0) {
        if (pthread_create(&sb->wd, NULL, watchdog, sb) != 0) {
            err_set(err, TM_EIO, "cannot start the CPU watchdog thread");
            sandbox_free(sb);
            return NULL;
        }
        sb->wd_started = 1;
    }
    return sb;
}

void sandbox_free(sandbox *sb) {
    if (!sb) return;
    if (sb->wd_started) {
        pthread_mutex_lock(&sb->mu);
        sb->wd_stop = 1;
        pthread_cond_signal(&sb->cv);
        pthread_mutex_unlock(&sb->mu);
        pthread_join(sb->wd, NULL);
    }
    if (sb->L) lua_close(sb->L);
    pthread_mutex_destroy(&sb->mu);
    pthread_cond_destroy(&sb->cv);
    free(sb);
}

lua_State *sandbox_lua(sandbox *sb) { return sb->L; }

int sandbox_load(sandbox *sb, const char *src, size_t len, const char *chunkname, tm_err *err) {
    lua_State *L = sb->L;
    if (len > 0 && src[0] == LUA_SIGNATURE[0])
        return err_set(err, TM_EINVAL, "%s: binary chunks are not allowed", chunkname);
    char name[300];
    snprintf(name, sizeof name, "@%s", chunkname);
    int rc = luaL_loadbuffer(L, src, len, name);
    if (rc != 0) {
        err_set(err, TM_EINVAL, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "load failed");
        lua_pop(L, 1);
        return -1;
    }
    return 0;
}

/* Message handler: the error plus a traceback (the script has no debug
 * library, but the host may use it).  Skipped when memory ran out. */
static int msgh(lua_State *L) {
    sandbox *sb = self(L);
    if (!lua_isstring(L, 1)) {
        if (lua_isnoneornil(L, 1)) lua_pushliteral(L, "(error object is nil)");
        else lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        lua_replace(L, 1);
    }
    if (sb->oom) return 1;
    /* luaL_traceback is LuaJIT 2.1 API (5.2-compatible). */
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

int sandbox_pcall(sandbox *sb, int nargs, int nresults, buf *trace, tm_err *err) {
    lua_State *L = sb->L;
    int base = lua_gettop(L) - nargs;
    lua_pushlightuserdata(L, sb);
    lua_pushcclosure(L, msgh, 1);
    lua_insert(L, base);
    int rc = lua_pcall(L, nargs, nresults, base);
    if (rc == 0) {
        lua_remove(L, base);
        return 0;
    }
    if (trace) {
        size_t len = 0;
        const char *m = lua_tolstring(L, -1, &len);
        if (m) buf_append(trace, m, len);
    }
    pcall_error(sb, rc, err);
    lua_settop(L, base - 1);
    if (sb->oom) lua_gc(L, LUA_GCCOLLECT, 0); /* Lua 5.1 has no emergency GC */
    sb->oom = 0;
    return -1;
}

static int locked_newindex(lua_State *L) {
    const char *k = lua_tostring(L, 2);
    return luaL_error(L, "assignment to global '%s': globals are read-only in a projection "
                         "(keep data in the state or in locals)",
                      k ? k : "?");
}

void sandbox_lock_globals(sandbox *sb) {
    lua_State *L = sb->L;
    /* Move every global into a backing table; the globals table becomes an
     * empty proxy that reads through and refuses writes. */
    lua_newtable(L);
    int back = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, LUA_GLOBALSINDEX)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, back);
    }
    lua_pushnil(L);
    while (lua_next(L, back)) {
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        lua_pushnil(L);
        lua_rawset(L, LUA_GLOBALSINDEX);
    }
    lua_pushvalue(L, LUA_GLOBALSINDEX); /* _G keeps naming the (proxy) globals */
    lua_setfield(L, back, "_G");
    lua_createtable(L, 0, 3);
    lua_pushvalue(L, back);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, locked_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, LUA_GLOBALSINDEX);
    lua_pop(L, 1);
}

void sandbox_enter(sandbox *sb) {
    if (!sb->wd_started) return;
    pthread_mutex_lock(&sb->mu);
    pthread_getcpuclockid(pthread_self(), &sb->runner_clock);
    sb->busy = 1;
    sb->hooked = 0;
    sb->gen++;
    pthread_mutex_unlock(&sb->mu);
}

void sandbox_leave(sandbox *sb) {
    if (!sb->wd_started) return;
    pthread_mutex_lock(&sb->mu);
    sb->busy = 0;
    sb->exceeded = sb->hooked;
    if (sb->hooked) lua_sethook(sb->L, NULL, 0, 0);
    sb->hooked = 0;
    pthread_mutex_unlock(&sb->mu);
}

int sandbox_cpu_exceeded(const sandbox *sb) { return sb->exceeded; }

size_t sandbox_memory(const sandbox *sb) { return sb->used; }

int sandbox_take_oom(sandbox *sb) {
    int o = sb->oom;
    sb->oom = 0;
    return o;
}

void sandbox_push_ffi(sandbox *sb) {
    lua_getfield(sb->L, LUA_REGISTRYINDEX, "tidemark.ffi");
}

void sandbox_push_preloaded(sandbox *sb, const char *name) {
    lua_State *L = sb->L;
    lua_getfield(L, LUA_REGISTRYINDEX, "_PRELOAD");
    lua_getfield(L, -1, name);
    lua_remove(L, -2);
    if (lua_isfunction(L, -1)) {
        lua_call(L, 0, 1);
    } else {
        lua_pop(L, 1);
        lua_pushnil(L);
    }
}

void sandbox_seed(sandbox *sb, uint64_t seed) {
    lua_getfield(sb->L, LUA_REGISTRYINDEX, SEED_KEY);
    lua_pushnumber(sb->L, (lua_Number)seed);
    lua_rawseti(sb->L, -2, 1);
    lua_pop(sb->L, 1);
}
