/* replpar.c — ad-hoc queries on every core (T.pscan, embedded mode).
 *
 * The prelude describes a query (fields as paths, functions by index) and
 * calls T.pscan(sel, description, functions, label).  This module
 *   - decides whether it runs in parallel (embedded store, more than one
 *     worker, a scan that may cover REPLPAR_MIN_EVENTS events unless
 *     --workers was given, every function without upvalues);
 *   - keeps a pool of worker Lua states for the session (repllua_open_worker:
 *     the prelude without the REPL's I/O, unknown globals raising
 *     REPLPAR_FALLBACK), rebuilds the query in each (T.pbuild) from the
 *     msgpack of the description and the functions' bytecode (lua_dump of
 *     functions compiled from the user's source in this process: trusted,
 *     never bytecode from outside);
 *   - splits the positions from the selector's start to the last one into
 *     one contiguous range per worker; each worker thread scans its range
 *     itself (replscan_run: its own store iterator, its own type names)
 *     and aggregates it, so reading runs on every core too; the calling
 *     thread draws the progress bar;
 *   - returns the workers' partial results (msgpack from each state,
 *     decoded here) in range order, for the prelude to merge; or nil, and
 *     the prelude runs the query serially, when a worker met something it
 *     cannot do (REPLPAR_FALLBACK) or a Lua error (the serial run then
 *     reports it exactly as without workers).
 * Ctrl-C: workers read the same flag per event; a worker stuck in a
 * JIT-compiled loop is sent SIGUSR2 on the second Ctrl-C (repl_set_abort),
 * jumps out of Lua and abandons its state (leaked, as the REPL does with
 * its own).  The CPU limit applies per worker state like per command.
 * Threads exist only during a T.pscan call; states live for the session.
 */
#define _GNU_SOURCE
#include <lauxlib.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "luamp.h"
#include "progress.h"
#include "repl.h"

#define MAX_WORKERS 16
#define REPLPAR_MIN_EVENTS 50000     /* fewer: the serial scan is as fast */

enum { PW_OK, PW_FALLBACK, PW_ERROR, PW_INTR, PW_EREAD };

typedef struct pworker {
    repl *r;
    sandbox *sb;                     /* kept for the session; NULL: make one */
    replscan_types *types;           /* its type names (index -> its T.types) */
    pthread_t th;
    uint64_t lo, hi;                 /* its range of positions */
    uint64_t at;                     /* where its scan is (atomic) */
    int status;                      /* PW_*, written by the worker */
    tm_err err;                      /* PW_EREAD */
    int abandoned;                   /* jumped out of Lua: sb is lost */
    volatile sig_atomic_t can_jump;  /* its jmp is armed: the runner (Lua) runs */
    volatile sig_atomic_t cpu_abort; /* the hard CPU limit sent the jump */
    sigjmp_buf jmp;
    buf out;                         /* the partial result (msgpack) or the error text */
} pworker;

static pworker g_w[MAX_WORKERS];
static unsigned g_nw;                /* workers of the running scan */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_done_cv = PTHREAD_COND_INITIALIZER;
static unsigned g_done;              /* workers finished (under g_mu) */
static int g_failed;                 /* some worker stopped: end every scan (atomic) */
static __thread pworker *t_self;     /* the worker running on this thread */

/* ------------------------------------------------------------ signals */

static void on_usr2(int sig) {
    (void)sig;
    pworker *w = t_self;
    if (w && w->can_jump) {
        w->can_jump = 0;
        siglongjmp(w->jmp, 1);
    }
}

/* Second Ctrl-C (signal context): every worker still in Lua jumps out. */
static void abort_workers(void) {
    for (unsigned i = 0; i < g_nw; i++)
        if (g_w[i].can_jump) pthread_kill(g_w[i].th, SIGUSR2);
}

/* The hard CPU limit of a worker's sandbox (watchdog thread). */
static void worker_hard_limit(void *ud, double limit) {
    (void)limit;
    pworker *w = ud;
    w->cpu_abort = 1;
    if (w->can_jump) pthread_kill(w->th, SIGUSR2);
}

static void install_usr2(void) {
    static int done;
    if (done) return;
    done = 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, NULL);
}

/* ------------------------------------------------------------ workers */

static void fail(pworker *w, int status, const char *msg) {
    w->status = status;
    buf_reset(&w->out);
    if (msg) buf_puts(&w->out, msg);
    __atomic_store_n(&g_failed, 1, __ATOMIC_RELAXED);
}

/* The error at the top of L: which kind of stop it is. */
static void lua_failed(pworker *w, lua_State *L) {
    size_t n = 0;
    const char *m = lua_tolstring(L, -1, &n);
    if (m && n >= sizeof REPLPAR_FALLBACK - 1 &&
        !memcmp(m, REPLPAR_FALLBACK, sizeof REPLPAR_FALLBACK - 1))
        fail(w, PW_FALLBACK, NULL);
    else if (m && !strcmp(m, "interrupted"))
        fail(w, PW_INTR, NULL);
    else if (sandbox_cpu_exceeded(w->sb) || (m && strstr(m, "not enough memory")))
        fail(w, PW_ERROR, m); /* would fail the same way serially: say so now */
    else
        fail(w, PW_FALLBACK, NULL); /* the serial run reports it as usual */
    lua_pop(L, 1);
}

/* In the worker's state (a C function: upvalue 1 is the session, for
 * replscan_run): scan the worker's range with the query's handler. */
static int scan_range(lua_State *L) {
    pworker *w = lua_touserdata(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.psel");
    int sel = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.ph");
    int handler = lua_gettop(L);
    /* the jump (SIGUSR2) is armed only while Lua runs: never out of the
     * store's C code, which may hold its locks */
    replscan_opts o = {.from = w->lo, .to = w->hi, .types = w->types, .at = &w->at,
                       .stop = &g_failed, .in_lua = &w->can_jump};
    uint64_t n = 0;
    int rc = replscan_run(L, sel, handler, &o, &n, &w->err);
    if (rc == REPLSCAN_ELUA) return lua_error(L);
    if (rc == REPLSCAN_EINTR) return repllua_interrupted(L);
    if (rc == REPLSCAN_EREAD) w->status = PW_EREAD;
    return 0;
}

static void worker_done(void) {
    pthread_mutex_lock(&g_mu);
    g_done++;
    pthread_cond_signal(&g_done_cv);
    pthread_mutex_unlock(&g_mu);
}

static int encode_partial(lua_State *L) {
    pworker *w = lua_touserdata(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.pc");
    lua_call(L, 0, 1);
    tm_err e;
    err_clear(&e);
    buf_reset(&w->out);
    if (luamp_encode_opt(L, -1, "partial", LUAMP_NAN, &w->out, &e) < 0) {
        lua_pushstring(L, REPLPAR_FALLBACK); /* cannot travel: serially */
        return lua_error(L);
    }
    return 0;
}

static void *worker_main(void *arg) {
    pworker *w = arg;
    t_self = w;
    lua_State *L = sandbox_lua(w->sb);
    if (sigsetjmp(w->jmp, 1)) {
        /* out of Lua by SIGUSR2: the state may be inconsistent */
        w->abandoned = 1;
        sandbox_leave(w->sb); /* its watchdog must not fire again */
        fail(w, w->cpu_abort ? PW_ERROR : PW_INTR,
             w->cpu_abort ? "CPU limit exceeded in a JIT-compiled loop (a query worker)" : NULL);
        worker_done();
        return NULL;
    }
    sandbox_enter(w->sb);
    lua_pushlightuserdata(L, w->r);
    lua_pushcclosure(L, scan_range, 1);
    lua_pushlightuserdata(L, w);
    if (lua_pcall(L, 1, 0, 0)) lua_failed(w, L);
    else if (w->status == PW_EREAD) __atomic_store_n(&g_failed, 1, __ATOMIC_RELAXED);
    else if (!__atomic_load_n(&g_failed, __ATOMIC_RELAXED)) {
        lua_pushcfunction(L, encode_partial);
        lua_pushlightuserdata(L, w);
        if (lua_pcall(L, 1, 0, 0)) lua_failed(w, L);
    }
    sandbox_leave(w->sb);
    worker_done();
    return NULL;
}

/* ------------------------------------------------------------ setup */

static int dump_writer(lua_State *L, const void *p, size_t n, void *ud) {
    (void)L;
    buf_append(ud, p, n);
    return 0;
}

/* Bytecode of every function in fns (stack index), or -1 when one cannot
 * travel (a C function, or one with upvalues: its locals stay here). */
static int dump_functions(lua_State *L, int fns, buf *codes, size_t *nf) {
    *nf = lua_objlen(L, fns);
    for (size_t i = 0; i < *nf; i++) {
        lua_rawgeti(L, fns, (int)i + 1);
        lua_Debug ar;
        if (!lua_isfunction(L, -1) || lua_iscfunction(L, -1)) {
            lua_pop(L, 1);
            return -1;
        }
        lua_pushvalue(L, -1);
        lua_getinfo(L, ">u", &ar);
        if (ar.nups > 0) {
            lua_pop(L, 1);
            return -1;
        }
        int st = lua_dump(L, dump_writer, &codes[i]);
        lua_pop(L, 1);
        if (st) return -1;
    }
    return 0;
}

/* In worker w's state: T.pbuild(sel, description, functions) -> handler
 * and collector, kept in the registry (tm.ph, tm.pc).  0 / -1. */
static int build_in(pworker *w, const buf *sel, const buf *desc, const buf *codes, size_t nf) {
    lua_State *L = sandbox_lua(w->sb);
    lua_settop(L, 0);
    tm_err e;
    err_clear(&e);
    if (luamp_push(L, sel->ptr, sel->len, &e) < 0) return -1;
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.psel");
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.pbuild");
    lua_newtable(L);
    if (luamp_push(L, desc->ptr, desc->len, &e) < 0) {
        lua_settop(L, 0);
        return -1;
    }
    lua_createtable(L, (int)nf, 0);
    for (size_t i = 0; i < nf; i++) {
        /* trusted: lua_dump of source this process compiled */
        if (luaL_loadbuffer(L, codes[i].ptr, codes[i].len, "=query")) {
            lua_settop(L, 0);
            return -1;
        }
        lua_rawseti(L, -2, (int)i + 1);
    }
    if (lua_pcall(L, 3, 2, 0)) {
        lua_settop(L, 0);
        return -1;
    }
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.pc");
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.ph");
    lua_settop(L, 0);
    return 0;
}

static void drop_query(pworker *w) {
    if (!w->sb || w->abandoned) return;
    lua_State *L = sandbox_lua(w->sb);
    lua_settop(L, 0);
    lua_pushnil(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.ph");
    lua_pushnil(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.pc");
    lua_pushnil(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "tm.psel");
    lua_gc(L, LUA_GCCOLLECT, 0);
}

static unsigned worker_count(const repl *r) {
    long c = r->workers > 0 ? r->workers : (long)tm_cores();
    return c > MAX_WORKERS ? MAX_WORKERS : (unsigned)c;
}

/* Worth it?  An index scan of a stream is short; so is a small store. */
static uint64_t sel_from(lua_State *L, int sel) {
    lua_getfield(L, sel, "from");
    double from = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : 0;
    lua_pop(L, 1);
    return from < 1 ? 1 : from >= 1.8e19 ? UINT64_MAX : (uint64_t)from;
}

static int worth_it(lua_State *L, repl *r, int sel) {
    lua_getfield(L, sel, "kind");
    const char *kind = lua_tostring(L, -1);
    int stream = kind && !strcmp(kind, "stream");
    lua_pop(L, 1);
    if (stream) return 0;
    if (r->workers > 0) return 1;
    lua_getfield(L, sel, "from");
    double from = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : 0;
    lua_pop(L, 1);
    uint64_t last = 0;
    tm_err e;
    if (replsrc_last_position(r->src, &last, &e) < 0) return 0;
    return (double)last - from >= REPLPAR_MIN_EVENTS;
}

/* ------------------------------------------------------------ the scan */

/* Contiguous ranges of positions from..last, one per worker. */
static void split(unsigned nw, uint64_t from, uint64_t last) {
    uint64_t span = last >= from ? last - from + 1 : 0;
    for (unsigned i = 0; i < nw; i++) {
        pworker *w = &g_w[i];
        w->lo = from + span * i / nw;
        w->hi = from + span * (i + 1) / nw - 1;
        if (w->hi < w->lo) w->hi = w->lo; /* an empty range: its scan finds nothing */
        w->at = w->lo;
    }
}

/* Wait for the workers, drawing one progress bar for all of them. */
static void wait_workers(repl *r, const char *label, uint64_t from, uint64_t last) {
    uint64_t total = last >= from ? last - from + 1 : 0;
    progress *pg = r->progress ? progress_new(stderr, label, total, "events", 0) : NULL;
    pthread_mutex_lock(&g_mu);
    while (g_done < g_nw) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&g_done_cv, &g_mu, &ts);
        if (pg) {
            uint64_t done = 0;
            for (unsigned i = 0; i < g_nw; i++)
                done += __atomic_load_n(&g_w[i].at, __ATOMIC_RELAXED) - g_w[i].lo;
            progress_update(pg, done, done);
        }
    }
    pthread_mutex_unlock(&g_mu);
    progress_end(pg);
}

/* Push the partial results, or nil (run serially); raise errors. */
static int finish(lua_State *L, repl *r) {
    int intr = 0, fallback = 0, abandoned = 0;
    pworker *bad = NULL, *eread = NULL;
    for (unsigned i = 0; i < g_nw; i++) {
        pworker *w = &g_w[i];
        if (w->abandoned) abandoned = 1;
        if (w->status == PW_INTR) intr = 1;
        else if (w->status == PW_FALLBACK) fallback = 1;
        else if (w->status == PW_ERROR && !bad) bad = w;
        else if (w->status == PW_EREAD && !eread) eread = w;
    }
    if (abandoned)
        fprintf(stderr, "\naborted: a query worker did not respond (a JIT-compiled loop?); "
                        "its Lua state was dropped\n");
    if (bad) {
        lua_pushlstring(L, bad->out.ptr, bad->out.len);
        return lua_error(L);
    }
    if (intr || repl_cancel_requested()) return repllua_interrupted(L);
    if (eread) return repllua_raise(L, r, &eread->err);
    if (fallback) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, (int)g_nw, 0);
    for (unsigned i = 0; i < g_nw; i++) {
        tm_err de;
        if (luamp_push(L, g_w[i].out.ptr, g_w[i].out.len, &de) < 0) {
            lua_pushnil(L);
            return 1;
        }
        lua_rawseti(L, -2, (int)i + 1);
    }
    r->ran_workers = (int)g_nw;
    return 1;
}

static void free_codes(buf *codes, size_t nf) {
    for (size_t i = 0; i < nf; i++) buf_free(&codes[i]);
    free(codes);
}

/* T.pscan(sel, description, functions [, label]) -> partials | nil */
static int t_pscan(lua_State *L) {
    repl *r = repllua_session(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    luaL_checktype(L, 3, LUA_TTABLE);
    const char *label = luaL_optstring(L, 4, "query");
    unsigned nw = worker_count(r);
    if (replsrc_is_remote(r->src) || nw < 2 || !worth_it(L, r, 1)) return 0;
    size_t nf = lua_objlen(L, 3);
    buf *codes = calloc(nf ? nf : 1, sizeof *codes);
    if (!codes) tm_oom();
    buf desc = BUF_INIT;
    tm_err e;
    err_clear(&e);
    if (dump_functions(L, 3, codes, &nf) < 0 || luamp_encode(L, 2, "query", &desc, &e) < 0) {
        free_codes(codes, nf);
        buf_free(&desc);
        return 0;
    }
    buf sel = BUF_INIT;
    if (luamp_encode(L, 1, "selector", &sel, &e) < 0) {
        free_codes(codes, nf);
        buf_free(&desc);
        return 0;
    }
    install_usr2();
    unsigned ok = 0;
    for (; ok < nw; ok++) {
        pworker *w = &g_w[ok];
        if (!w->sb) {
            w->sb = repllua_open_worker(r, worker_hard_limit, w, &e);
            if (!w->sb) break;
            replscan_types_free(w->types); /* its indexes were the lost state's */
            w->types = replscan_types_new();
        }
        w->r = r;
        w->status = PW_OK;
        w->abandoned = 0;
        w->cpu_abort = 0;
        if (build_in(w, &sel, &desc, codes, nf) < 0) break;
    }
    free_codes(codes, nf);
    buf_free(&desc);
    buf_free(&sel);
    if (ok < nw) {
        for (unsigned i = 0; i < ok; i++) drop_query(&g_w[i]);
        return 0; /* cannot build it there: serially */
    }
    uint64_t last = 0, from = sel_from(L, 1);
    if (replsrc_last_position(r->src, &last, &e) < 0) return repllua_raise(L, r, &e);
    g_nw = nw;
    g_failed = 0;
    g_done = 0;
    split(nw, from, last);
    int held = repl_jump_hold(); /* threads: no longjmp out of here */
    repl_set_abort(abort_workers);
    for (unsigned i = 0; i < nw; i++) tm_thread(&g_w[i].th, worker_main, &g_w[i], "a query worker");
    wait_workers(r, label, from, last);
    for (unsigned i = 0; i < nw; i++) pthread_join(g_w[i].th, NULL);
    repl_set_abort(NULL);
    repl_jump_release(held);
    for (unsigned i = 0; i < nw; i++)
        if (g_w[i].abandoned) g_w[i].sb = NULL; /* leaked on purpose */
    for (unsigned i = 0; i < nw; i++) drop_query(&g_w[i]);
    return finish(L, r);
}

static const luaL_Reg funcs[] = {
    {"pscan", t_pscan},
    {NULL, NULL},
};

void replpar_register(lua_State *L, repl *r) {
    lua_pushlightuserdata(L, r);
    luaL_openlib(L, NULL, funcs, 1);
}

void replpar_close(void) {
    for (unsigned i = 0; i < MAX_WORKERS; i++) {
        pworker *w = &g_w[i];
        if (w->sb) sandbox_free(w->sb);
        w->sb = NULL;
        replscan_types_free(w->types);
        w->types = NULL;
        buf_free(&w->out);
    }
}
