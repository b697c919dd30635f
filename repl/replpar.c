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
 *   - runs the scan (replscan_run) on the calling thread, handing batches
 *     round-robin to the worker threads through bounded queues;
 *   - returns the workers' partial results (msgpack from each state,
 *     decoded here), in worker order, for the prelude to merge; or nil,
 *     and the prelude runs the query serially, when a worker met something
 *     it cannot do (REPLPAR_FALLBACK) or a Lua error (the serial run then
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
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "luamp.h"
#include "repl.h"

#define MAX_WORKERS 16
#define QMAX 4                       /* batches queued per worker */
#define REPLPAR_MIN_EVENTS 50000     /* fewer: the serial scan is as fast */

typedef struct pbatch {
    struct pbatch *next;
    unsigned n;
    int end;
    replscan_slot slots[REPLSCAN_BATCH];
    buf arena;
    buf types;                       /* type names new to the worker: [u32 idx][u32 len][bytes]... */
} pbatch;

enum { PW_OK, PW_FALLBACK, PW_ERROR, PW_INTR };

typedef struct pworker {
    sandbox *sb;                     /* kept for the session; NULL: make one */
    pthread_t th;
    pthread_cond_t cv;               /* queue non-empty */
    int cv_ready;
    pbatch *qhead, *qtail;           /* under g_mu */
    unsigned qlen;
    uint32_t types_sent;
    int status;                      /* PW_*, written by the worker */
    int abandoned;                   /* jumped out of Lua: sb is lost */
    volatile sig_atomic_t can_jump;  /* its jmp is armed (the SIGUSR2 handler) */
    volatile sig_atomic_t cpu_abort; /* the hard CPU limit sent the jump */
    sigjmp_buf jmp;
    buf out;                         /* the partial result (msgpack) or the error text */
} pworker;

static pworker g_w[MAX_WORKERS];
static unsigned g_nw;                /* workers of the running scan */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_space = PTHREAD_COND_INITIALIZER; /* a queue has room */
static pbatch *g_pool;
static volatile int g_failed;        /* some worker stopped: end the scan */
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

/* ------------------------------------------------------------ queues */

static pbatch *batch_get(void) {
    pthread_mutex_lock(&g_mu);
    pbatch *b = g_pool;
    if (b) g_pool = b->next;
    pthread_mutex_unlock(&g_mu);
    if (!b && !(b = calloc(1, sizeof *b))) tm_oom();
    b->next = NULL;
    b->n = 0;
    b->end = 0;
    buf_reset(&b->arena);
    buf_reset(&b->types);
    return b;
}

static void batch_put(pbatch *b) {
    pthread_mutex_lock(&g_mu);
    b->next = g_pool;
    g_pool = b;
    pthread_mutex_unlock(&g_mu);
}

/* Queue b for w; waits for room, polling Ctrl-C.  0, or -1 when the scan
 * should stop (a worker failed or Ctrl-C) and b was not queued. */
static int push(pworker *w, pbatch *b, int must) {
    pthread_mutex_lock(&g_mu);
    while (w->qlen >= QMAX) {
        if (!must && (g_failed || repl_cancel_requested())) {
            pthread_mutex_unlock(&g_mu);
            return -1;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&g_space, &g_mu, &ts);
    }
    if (w->qtail) w->qtail->next = b;
    else w->qhead = b;
    w->qtail = b;
    w->qlen++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&g_mu);
    return 0;
}

static pbatch *pop(pworker *w) {
    pthread_mutex_lock(&g_mu);
    while (!w->qhead) pthread_cond_wait(&w->cv, &g_mu);
    pbatch *b = w->qhead;
    w->qhead = b->next;
    if (!w->qhead) w->qtail = NULL;
    w->qlen--;
    pthread_cond_broadcast(&g_space);
    pthread_mutex_unlock(&g_mu);
    return b;
}

/* ------------------------------------------------------------ workers */

static void put_u32(buf *b, uint32_t v) { buf_append(b, &v, 4); }

/* New type names into the worker's T.types (registry tm.types). */
static void add_types(lua_State *L, const pbatch *b) {
    const char *p = b->types.ptr, *end = p + b->types.len;
    if (p == end) return;
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.types");
    while (p < end) {
        uint32_t idx, len;
        memcpy(&idx, p, 4);
        memcpy(&len, p + 4, 4);
        lua_pushlstring(L, p + 8, len);
        lua_rawseti(L, -2, (int)idx);
        p += 8 + len;
    }
    lua_pop(L, 1);
}

static void fail(pworker *w, int status, const char *msg) {
    w->status = status;
    buf_reset(&w->out);
    if (msg) buf_puts(&w->out, msg);
    g_failed = 1;
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

static int run_batch(pworker *w, lua_State *L, pbatch *b) {
    add_types(L, b);
    lua_pushcfunction(L, repllua_traceback);
    int msgh = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.runner");
    lua_pushlightuserdata(L, b->slots);
    lua_pushlightuserdata(L, b->arena.ptr);
    lua_pushinteger(L, (lua_Integer)b->n);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.ph");
    int st = lua_pcall(L, 4, 0, msgh);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.batch_done");
    lua_call(L, 0, 0);
    if (st) {
        lua_failed(w, L);
        lua_pop(L, 1);
        return -1;
    }
    lua_pop(L, 1);
    return 0;
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
    int dead = 0; /* failed: only drain the queue */
    if (sigsetjmp(w->jmp, 1)) {
        /* out of Lua by SIGUSR2: the state may be inconsistent */
        w->abandoned = 1;
        sandbox_leave(w->sb); /* its watchdog must not fire again */
        fail(w, w->cpu_abort ? PW_ERROR : PW_INTR,
             w->cpu_abort ? "CPU limit exceeded in a JIT-compiled loop (a query worker)" : NULL);
        dead = 1;
        for (;;) {
            pbatch *b = pop(w);
            int end = b->end;
            batch_put(b);
            if (end) return NULL;
        }
    }
    sandbox_enter(w->sb);
    w->can_jump = 1;
    for (;;) {
        pbatch *b = pop(w);
        int end = b->end;
        if (!end && !dead && g_failed) dead = 1;
        if (!end && !dead && run_batch(w, L, b) < 0) dead = 1;
        batch_put(b);
        if (end) break;
    }
    if (!dead) {
        lua_pushcfunction(L, encode_partial);
        lua_pushlightuserdata(L, w);
        if (lua_pcall(L, 1, 0, 0)) lua_failed(w, L);
    }
    w->can_jump = 0;
    sandbox_leave(w->sb);
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
static int build_in(pworker *w, const buf *desc, const buf *codes, size_t nf) {
    lua_State *L = sandbox_lua(w->sb);
    lua_settop(L, 0);
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.pbuild");
    lua_newtable(L);
    tm_err e;
    err_clear(&e);
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
    lua_getfield(L, LUA_REGISTRYINDEX, "tm.types");
    replscan_publish_types(L, lua_gettop(L));
    lua_settop(L, 0);
    w->types_sent = replscan_ntypes();
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
    lua_gc(L, LUA_GCCOLLECT, 0);
}

static unsigned worker_count(const repl *r) {
    long c = r->workers;
    if (c <= 0) { /* the cores this process may run on (taskset, cgroups' cpusets) */
        cpu_set_t set;
        c = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set)
                                                         : sysconf(_SC_NPROCESSORS_ONLN);
    }
    if (c < 1) c = 1;
    return c > MAX_WORKERS ? MAX_WORKERS : (unsigned)c;
}

/* Worth it?  An index scan of a stream is short; so is a small store. */
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

typedef struct feed {
    unsigned next;                   /* the worker of the next batch */
} feed;

static int to_workers(void *ud, lua_State *L, const replscan_slot *slots, unsigned n,
                      const char *arena, size_t len) {
    (void)L;
    feed *f = ud;
    if (g_failed) return -1;
    pworker *w = &g_w[f->next];
    f->next = (f->next + 1) % g_nw;
    pbatch *b = batch_get();
    b->n = n;
    memcpy(b->slots, slots, n * sizeof *slots);
    buf_append(&b->arena, arena, len);
    uint32_t nt = replscan_ntypes();
    for (uint32_t i = w->types_sent + 1; i <= nt; i++) {
        size_t tl;
        const char *t = replscan_type(i, &tl);
        put_u32(&b->types, i);
        put_u32(&b->types, (uint32_t)tl);
        buf_append(&b->types, t, tl);
    }
    w->types_sent = nt;
    if (push(w, b, 0) < 0) {
        batch_put(b);
        return -1;
    }
    return 0;
}

/* Push the partial results, or nil (run serially); raise errors. */
static int finish(lua_State *L, repl *r, int scan_rc, const tm_err *e) {
    int intr = scan_rc == REPLSCAN_EINTR, fallback = 0, abandoned = 0;
    pworker *bad = NULL;
    for (unsigned i = 0; i < g_nw; i++) {
        pworker *w = &g_w[i];
        if (w->abandoned) abandoned = 1;
        if (w->status == PW_INTR) intr = 1;
        else if (w->status == PW_FALLBACK) fallback = 1;
        else if (w->status == PW_ERROR && !bad) bad = w;
    }
    if (abandoned)
        fprintf(stderr, "\naborted: a query worker did not respond (a JIT-compiled loop?); "
                        "its Lua state was dropped\n");
    if (bad) {
        lua_pushlstring(L, bad->out.ptr, bad->out.len);
        return lua_error(L);
    }
    if (intr || repl_cancel_requested()) return repllua_interrupted(L);
    if (scan_rc == REPLSCAN_EREAD) return repllua_raise(L, r, e);
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
    install_usr2();
    unsigned ok = 0;
    for (; ok < nw; ok++) {
        pworker *w = &g_w[ok];
        if (!w->sb) {
            if (!w->cv_ready) pthread_cond_init(&w->cv, NULL);
            w->cv_ready = 1;
            w->sb = repllua_open_worker(r, worker_hard_limit, w, &e);
            if (!w->sb) break;
        }
        w->status = PW_OK;
        w->abandoned = 0;
        w->cpu_abort = 0;
        w->qhead = w->qtail = NULL;
        w->qlen = 0;
        if (build_in(w, &desc, codes, nf) < 0) break;
    }
    free_codes(codes, nf);
    buf_free(&desc);
    if (ok < nw) {
        for (unsigned i = 0; i < ok; i++) drop_query(&g_w[i]);
        return 0; /* cannot build it there: serially */
    }
    g_nw = nw;
    g_failed = 0;
    int held = repl_jump_hold(); /* threads: no longjmp out of here */
    repl_set_abort(abort_workers);
    for (unsigned i = 0; i < nw; i++) tm_thread(&g_w[i].th, worker_main, &g_w[i], "a query worker");
    feed f = {0};
    uint64_t n = 0;
    int top = lua_gettop(L);
    int rc = replscan_run(L, 1, label, to_workers, &f, &n, &e);
    lua_settop(L, top);
    for (unsigned i = 0; i < nw; i++) {
        pbatch *b = batch_get();
        b->end = 1;
        push(&g_w[i], b, 1);
    }
    for (unsigned i = 0; i < nw; i++) pthread_join(g_w[i].th, NULL);
    repl_set_abort(NULL);
    repl_jump_release(held);
    for (unsigned i = 0; i < nw; i++)
        if (g_w[i].abandoned) g_w[i].sb = NULL; /* leaked on purpose */
    for (unsigned i = 0; i < nw; i++) drop_query(&g_w[i]);
    return finish(L, r, rc, &e);
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
        buf_free(&w->out);
    }
    while (g_pool) {
        pbatch *b = g_pool;
        g_pool = b->next;
        buf_free(&b->arena);
        buf_free(&b->types);
        free(b);
    }
}
