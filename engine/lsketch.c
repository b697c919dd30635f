/* lsketch.c — Lua bindings of the analytics library (see lsketch.h).
 *
 * Owns the Lua face of hll.c, kll.c, topk.c and window.c: constructors in
 * the table luaopen_tidemark_sketch returns, one metatable per kind
 * ("tidemark.hll", "tidemark.quantiles", "tidemark.topk",
 * "tidemark.window") holding __index (methods), __gc, __tostring,
 * __tm_ext (the msgpack ext type) and __metatable (so scripts cannot read
 * or replace it).  A sketch is a full userdata holding one pointer to its
 * C object; the userdata is created BEFORE the C object so that a Lua
 * memory error cannot leak it, and __gc frees it.  lsketch_ext_type
 * recognises our sketches by metatable identity, never by a field a
 * script could forge.  Argument errors raise luaL_argerror.
 *
 * Element hashing for hll:add: strings hash their bytes; numbers hash
 * their IEEE-754 double bits (hll_add_double: 0 == -0, all NaNs equal),
 * with another seed, so 1 and "1" are different elements.  Booleans and
 * other types are argument errors.
 */
#include "lsketch.h"

#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hll.h"
#include "kll.h"
#include "topk.h"
#include "window.h"

typedef struct lsk {
    int kind; /* LSKETCH_EXT_* */
    void *p;  /* hll * / kll * / topk * / window *, NULL once collected */
} lsk;

static const char *const MT[] = {NULL, "tidemark.hll", "tidemark.quantiles", "tidemark.topk",
                                 "tidemark.window"};
#define NKINDS 4

static void kind_free(int kind, void *p) {
    switch (kind) {
    case LSKETCH_EXT_HLL: hll_free(p); break;
    case LSKETCH_EXT_QUANTILES: kll_free(p); break;
    case LSKETCH_EXT_TOPK: topk_free(p); break;
    case LSKETCH_EXT_WINDOW: window_free(p); break;
    }
}

/* Sketch memory is malloc'ed, invisible to the Lua GC.  Charging a
 * sketch's nominal footprint as a GC step when it is created keeps
 * garbage sketches (say, one made per event) collected in proportion to
 * the C memory they hold. */
static void charge(lua_State *L, size_t bytes) {
    if (bytes >= 1024) lua_gc(L, LUA_GCSTEP, (int)(bytes >> 10));
}

/* Push a new empty box of the given kind (metatable set). */
static lsk *push_box(lua_State *L, int kind) {
    lsk *b = lua_newuserdata(L, sizeof *b);
    b->kind = kind;
    b->p = NULL;
    luaL_getmetatable(L, MT[kind]);
    lua_setmetatable(L, -2);
    return b;
}

static void *check(lua_State *L, int idx, int kind) {
    lsk *b = luaL_checkudata(L, idx, MT[kind]);
    if (!b->p) luaL_argerror(L, idx, "sketch already freed");
    return b->p;
}

/* An integer-valued number in [lo, hi] at idx, else an argument error. */
static int64_t check_int(lua_State *L, int idx, int64_t lo, int64_t hi, const char *what) {
    double d = luaL_checknumber(L, idx);
    if (!(d >= (double)lo && d <= (double)hi) || d != floor(d)) {
        char msg[128];
        snprintf(msg, sizeof msg, "%s must be an integer in [%lld, %lld]", what, (long long)lo,
                 (long long)hi);
        luaL_argerror(L, idx, msg);
    }
    return (int64_t)d;
}

/* --- hll -------------------------------------------------------------------- */
static int l_hll_new(lua_State *L) {
    charge(L, HLL_DENSE_BYTES);
    lsk *b = push_box(L, LSKETCH_EXT_HLL);
    b->p = hll_new();
    return 1;
}

static int l_hll_add(lua_State *L) {
    hll *h = check(L, 1, LSKETCH_EXT_HLL);
    int changed;
    if (lua_type(L, 2) == LUA_TNUMBER) {
        changed = hll_add_double(h, lua_tonumber(L, 2));
    } else if (lua_type(L, 2) == LUA_TSTRING) {
        size_t n;
        const char *s = lua_tolstring(L, 2, &n);
        changed = hll_add(h, s, n);
    } else {
        return luaL_argerror(L, 2, "string or number expected");
    }
    lua_pushboolean(L, changed);
    return 1;
}

static int l_hll_count(lua_State *L) {
    lua_pushnumber(L, (lua_Number)hll_count(check(L, 1, LSKETCH_EXT_HLL)));
    return 1;
}

static int l_hll_merge(lua_State *L) {
    hll *h = check(L, 1, LSKETCH_EXT_HLL);
    hll_merge(h, check(L, 2, LSKETCH_EXT_HLL));
    lua_settop(L, 1);
    return 1;
}

static int l_hll_tostring(lua_State *L) {
    hll *h = check(L, 1, LSKETCH_EXT_HLL);
    lua_pushfstring(L, "hll(~%d distinct, %s)", (int)hll_count(h), hll_is_sparse(h) ? "sparse" : "dense");
    return 1;
}

static const luaL_Reg hll_methods[] = {
    {"add", l_hll_add}, {"count", l_hll_count}, {"merge", l_hll_merge}, {NULL, NULL}};

/* --- quantiles ---------------------------------------------------------------- */
static int l_q_new(lua_State *L) {
    int64_t k = lua_isnoneornil(L, 1) ? KLL_DEFAULT_K : check_int(L, 1, KLL_MIN_K, KLL_MAX_K, "k");
    charge(L, (size_t)k * 3 * sizeof(double));
    lsk *b = push_box(L, LSKETCH_EXT_QUANTILES);
    b->p = kll_new((unsigned)k);
    return 1;
}

static int l_q_add(lua_State *L) {
    kll *s = check(L, 1, LSKETCH_EXT_QUANTILES);
    double x = luaL_checknumber(L, 2);
    if (isnan(x)) return luaL_argerror(L, 2, "NaN cannot be added");
    kll_add(s, x);
    return 0;
}

static void push_num_or_nil(lua_State *L, double d) {
    if (isnan(d)) lua_pushnil(L);
    else lua_pushnumber(L, d);
}

static int l_q_quantile(lua_State *L) {
    kll *s = check(L, 1, LSKETCH_EXT_QUANTILES);
    double q = luaL_checknumber(L, 2);
    if (!(q >= 0 && q <= 1)) return luaL_argerror(L, 2, "q must be in [0, 1]");
    push_num_or_nil(L, kll_quantile(s, q));
    return 1;
}

static int l_q_rank(lua_State *L) {
    kll *s = check(L, 1, LSKETCH_EXT_QUANTILES);
    double x = luaL_checknumber(L, 2);
    if (isnan(x)) return luaL_argerror(L, 2, "number expected, got NaN");
    push_num_or_nil(L, kll_rank(s, x));
    return 1;
}

static int l_q_count(lua_State *L) {
    lua_pushnumber(L, (lua_Number)kll_count(check(L, 1, LSKETCH_EXT_QUANTILES)));
    return 1;
}

static int l_q_min(lua_State *L) {
    push_num_or_nil(L, kll_min(check(L, 1, LSKETCH_EXT_QUANTILES)));
    return 1;
}

static int l_q_max(lua_State *L) {
    push_num_or_nil(L, kll_max(check(L, 1, LSKETCH_EXT_QUANTILES)));
    return 1;
}

static int l_q_merge(lua_State *L) {
    kll *s = check(L, 1, LSKETCH_EXT_QUANTILES);
    kll_merge(s, check(L, 2, LSKETCH_EXT_QUANTILES));
    lua_settop(L, 1);
    return 1;
}

static int l_q_tostring(lua_State *L) {
    kll *s = check(L, 1, LSKETCH_EXT_QUANTILES);
    if (!kll_count(s)) {
        lua_pushstring(L, "quantiles(n=0)");
        return 1;
    }
    char b[160];
    snprintf(b, sizeof b, "quantiles(n=%llu, p50=%.6g, p99=%.6g)", (unsigned long long)kll_count(s),
             kll_quantile(s, 0.5), kll_quantile(s, 0.99));
    lua_pushstring(L, b);
    return 1;
}

static const luaL_Reg q_methods[] = {
    {"add", l_q_add},     {"quantile", l_q_quantile}, {"rank", l_q_rank},   {"count", l_q_count},
    {"min", l_q_min},     {"max", l_q_max},           {"merge", l_q_merge}, {NULL, NULL}};

/* --- topk --------------------------------------------------------------------- */
static int l_topk_new(lua_State *L) {
    int64_t k = check_int(L, 1, 1, TOPK_MAX_CAPACITY, "k");
    int64_t dflt = k * 4 < 32 ? 32 : k * 4;
    if (dflt > TOPK_MAX_CAPACITY) dflt = TOPK_MAX_CAPACITY;
    int64_t cap = lua_isnoneornil(L, 2) ? dflt : check_int(L, 2, k, TOPK_MAX_CAPACITY, "capacity");
    charge(L, (size_t)cap * 64);
    lsk *b = push_box(L, LSKETCH_EXT_TOPK);
    b->p = topk_new((unsigned)k, (unsigned)cap);
    return 1;
}

static int l_topk_add(lua_State *L) {
    topk *t = check(L, 1, LSKETCH_EXT_TOPK);
    size_t n;
    const char *key = luaL_checklstring(L, 2, &n);
    double w = luaL_optnumber(L, 3, 1);
    if (n > TOPK_MAX_KEY) return luaL_argerror(L, 2, "key longer than 1024 bytes");
    if (!(w > 0) || !isfinite(w)) return luaL_argerror(L, 3, "weight must be a positive finite number");
    topk_add(t, key, n, w, NULL);
    return 0;
}

static void push_item(lua_State *L, const topk_item *it) {
    lua_createtable(L, 0, 3);
    lua_pushlstring(L, it->key, it->len);
    lua_setfield(L, -2, "key");
    lua_pushnumber(L, it->count);
    lua_setfield(L, -2, "count");
    lua_pushnumber(L, it->error);
    lua_setfield(L, -2, "error");
}

static int l_topk_top(lua_State *L) {
    topk *t = check(L, 1, LSKETCH_EXT_TOPK);
    int64_t n = lua_isnoneornil(L, 2) ? topk_k(t) : check_int(L, 2, 0, TOPK_MAX_CAPACITY, "n");
    if ((size_t)n > topk_size(t)) n = (int64_t)topk_size(t);
    /* scratch as a userdata: collected even if a lua_* call below raises */
    topk_item *it = lua_newuserdata(L, ((size_t)n + 1) * sizeof *it);
    size_t got = topk_top(t, (size_t)n, it);
    lua_createtable(L, (int)got, 0);
    for (size_t i = 0; i < got; i++) {
        push_item(L, &it[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

static int l_topk_get(lua_State *L) {
    topk *t = check(L, 1, LSKETCH_EXT_TOPK);
    size_t n;
    const char *key = luaL_checklstring(L, 2, &n);
    topk_item it;
    if (!topk_get(t, key, n, &it)) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushnumber(L, it.count);
    lua_pushnumber(L, it.error);
    return 2;
}

static int l_topk_total(lua_State *L) {
    lua_pushnumber(L, topk_total(check(L, 1, LSKETCH_EXT_TOPK)));
    return 1;
}

static int l_topk_merge(lua_State *L) {
    topk *t = check(L, 1, LSKETCH_EXT_TOPK);
    topk_merge(t, check(L, 2, LSKETCH_EXT_TOPK));
    lua_settop(L, 1);
    return 1;
}

static int l_topk_tostring(lua_State *L) {
    topk *t = check(L, 1, LSKETCH_EXT_TOPK);
    lua_pushfstring(L, "topk(k=%d, capacity=%d, keys=%d, total=%f)", (int)topk_k(t),
                    (int)topk_capacity(t), (int)topk_size(t), topk_total(t));
    return 1;
}

static const luaL_Reg topk_methods[] = {{"add", l_topk_add},     {"top", l_topk_top},
                                        {"get", l_topk_get},     {"total", l_topk_total},
                                        {"merge", l_topk_merge}, {NULL, NULL}};

/* --- window ------------------------------------------------------------------- */
/* Read an optional integer field of the options table at idx. */
static int64_t opt_field(lua_State *L, int idx, const char *name, int64_t dflt, int64_t lo,
                         int64_t hi) {
    lua_getfield(L, idx, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return dflt;
    }
    double d = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : NAN;
    if (!(d >= (double)lo && d <= (double)hi) || d != floor(d)) {
        char msg[160];
        snprintf(msg, sizeof msg, "field '%s' must be an integer in [%lld, %lld]", name,
                 (long long)lo, (long long)hi);
        luaL_argerror(L, idx, msg);
    }
    lua_pop(L, 1);
    return (int64_t)d;
}

/* Reject option names outside allowed (catches typos like "lateness_ms"). */
static void check_fields(lua_State *L, int idx, const char *const *allowed) {
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        int ok = 0;
        if (lua_type(L, -1) == LUA_TSTRING)
            for (const char *const *a = allowed; *a && !ok; a++) ok = strcmp(lua_tostring(L, -1), *a) == 0;
        if (!ok) {
            const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "?";
            luaL_argerror(L, idx, lua_pushfstring(L, "unknown option '%s'", k));
        }
    }
}

static int window_new_lua(lua_State *L, int kind) {
    static const char *const fixed[] = {"size", "lateness", "retain", "max_open", NULL};
    static const char *const hopping[] = {"size", "hop", "lateness", "retain", "max_open", NULL};
    static const char *const session[] = {"gap", "lateness", "retain", "max_open", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    check_fields(L, 1, kind == WINDOW_TUMBLING ? fixed : kind == WINDOW_HOPPING ? hopping : session);
    window_cfg c;
    window_cfg_init(&c, kind);
    const int64_t T = WINDOW_MAX_TIME;
    if (kind != WINDOW_SESSION) c.size = opt_field(L, 1, "size", 0, 1, T);
    if (kind == WINDOW_HOPPING) c.hop = opt_field(L, 1, "hop", 0, 1, T);
    if (kind == WINDOW_SESSION) c.gap = opt_field(L, 1, "gap", 0, 1, T);
    c.lateness = opt_field(L, 1, "lateness", 0, 0, T);
    c.retain = (uint32_t)opt_field(L, 1, "retain", WINDOW_DEFAULT_RETAIN, 0, WINDOW_MAX_RETAIN);
    c.max_open = (uint32_t)opt_field(L, 1, "max_open", WINDOW_DEFAULT_MAX_OPEN, 1, WINDOW_MAX_OPEN);
    tm_err e;
    err_clear(&e);
    charge(L, 4096);
    lsk *b = push_box(L, LSKETCH_EXT_WINDOW);
    if (!(b->p = window_new(&c, &e))) return luaL_argerror(L, 1, e.msg);
    return 1;
}

static int l_win_tumbling(lua_State *L) { return window_new_lua(L, WINDOW_TUMBLING); }
static int l_win_hopping(lua_State *L) { return window_new_lua(L, WINDOW_HOPPING); }
static int l_win_session(lua_State *L) { return window_new_lua(L, WINDOW_SESSION); }

static int l_win_add(lua_State *L) {
    window *w = check(L, 1, LSKETCH_EXT_WINDOW);
    int64_t t = check_int(L, 2, -WINDOW_MAX_TIME, WINDOW_MAX_TIME, "time (ms)");
    double v = luaL_optnumber(L, 3, 1);
    if (!isfinite(v)) return luaL_argerror(L, 3, "value must be a finite number");
    lua_pushinteger(L, window_add(w, t, v, NULL));
    return 1;
}

static void push_agg(lua_State *L, const window_agg *a) {
    lua_createtable(L, 0, 7);
    lua_pushnumber(L, (lua_Number)a->start);
    lua_setfield(L, -2, "start");
    lua_pushnumber(L, (lua_Number)a->end);
    lua_setfield(L, -2, "end");
    lua_pushnumber(L, (lua_Number)a->count);
    lua_setfield(L, -2, "count");
    lua_pushnumber(L, a->sum);
    lua_setfield(L, -2, "sum");
    lua_pushnumber(L, a->min);
    lua_setfield(L, -2, "min");
    lua_pushnumber(L, a->max);
    lua_setfield(L, -2, "max");
    lua_pushboolean(L, a->closed);
    lua_setfield(L, -2, "closed");
}

/* Push an array of windows from n entries of a scratch userdata (so a
 * raising lua_* call leaks nothing). */
static void push_aggs(lua_State *L, const window_agg *a, size_t n) {
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        push_agg(L, &a[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
}

static int l_win_windows(lua_State *L) {
    window *w = check(L, 1, LSKETCH_EXT_WINDOW);
    window_agg *a = lua_newuserdata(L, (window_count(w) + 1) * sizeof *a);
    push_aggs(L, a, window_list(w, a));
    return 1;
}

static int l_win_closed(lua_State *L) {
    window *w = check(L, 1, LSKETCH_EXT_WINDOW);
    size_t n = window_pending(w);
    window_agg *a = lua_newuserdata(L, (n + 1) * sizeof *a);
    push_aggs(L, a, window_take_closed(w, a, n));
    return 1;
}

static int l_win_late(lua_State *L) {
    uint64_t c;
    double s;
    window_late(check(L, 1, LSKETCH_EXT_WINDOW), &c, &s);
    lua_createtable(L, 0, 2);
    lua_pushnumber(L, (lua_Number)c);
    lua_setfield(L, -2, "count");
    lua_pushnumber(L, s);
    lua_setfield(L, -2, "sum");
    return 1;
}

static int l_win_watermark(lua_State *L) {
    int64_t wm;
    if (window_watermark(check(L, 1, LSKETCH_EXT_WINDOW), &wm)) lua_pushnumber(L, (lua_Number)wm);
    else lua_pushnil(L);
    return 1;
}

/* w:rate([span_ms]) -> events per second, value sum per second over the
 * last span_ms of event time (tumbling only): the windows whose start is
 * after max_time - span.  Resolution is one window (bucket).  span
 * defaults to size * retain (what tm.rate{over=} configures). */
static int l_win_rate(lua_State *L) {
    window *w = check(L, 1, LSKETCH_EXT_WINDOW);
    const window_cfg *c = window_config(w);
    if (c->kind != WINDOW_TUMBLING) return luaL_argerror(L, 1, "rate needs a tumbling window");
    int64_t dflt = c->size * (int64_t)(c->retain ? c->retain : 1);
    int64_t span = lua_isnoneornil(L, 2) ? dflt : check_int(L, 2, 1, WINDOW_MAX_TIME, "span (ms)");
    int64_t now;
    double count = 0, sum = 0;
    if (window_max_time(w, &now)) {
        window_agg *a = lua_newuserdata(L, (window_count(w) + 1) * sizeof *a);
        size_t n = window_list(w, a);
        for (size_t i = 0; i < n; i++)
            if (a[i].start > now - span && a[i].start <= now) {
                count += (double)a[i].count;
                sum += a[i].sum;
            }
    }
    lua_pushnumber(L, count * 1000.0 / (double)span);
    lua_pushnumber(L, sum * 1000.0 / (double)span);
    return 2;
}

static int l_win_tostring(lua_State *L) {
    window *w = check(L, 1, LSKETCH_EXT_WINDOW);
    const window_cfg *c = window_config(w);
    const char *kind = c->kind == WINDOW_TUMBLING ? "tumbling" : c->kind == WINDOW_HOPPING ? "hopping" : "session";
    uint64_t lc;
    double ls;
    window_late(w, &lc, &ls);
    lua_pushfstring(L, "window.%s(open=%d, late=%d)", kind, (int)window_open_count(w), (int)lc);
    return 1;
}

static const luaL_Reg win_methods[] = {{"add", l_win_add},         {"windows", l_win_windows},
                                       {"closed", l_win_closed},   {"late", l_win_late},
                                       {"watermark", l_win_watermark}, {"rate", l_win_rate},
                                       {NULL, NULL}};

/* tm.rate{over = 60000, bucket = 1000, lateness = 0}: a tumbling window of
 * bucket-sized windows retaining `over` worth of them; r:add(t[, v]) and
 * r:rate() -> events/s, sum/s over the last `over` ms of event time. */
static int l_rate_new(lua_State *L) {
    static const char *const opts[] = {"over", "bucket", "lateness", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    check_fields(L, 1, opts);
    int64_t bucket = opt_field(L, 1, "bucket", 1000, 1, WINDOW_MAX_TIME);
    int64_t over = opt_field(L, 1, "over", 60000, 1, WINDOW_MAX_TIME);
    if (over % bucket || over / bucket > WINDOW_MAX_RETAIN)
        return luaL_argerror(L, 1, "'over' must be a multiple of 'bucket', at most 100000 buckets");
    window_cfg c;
    window_cfg_init(&c, WINDOW_TUMBLING);
    c.size = bucket;
    c.retain = (uint32_t)(over / bucket);
    c.lateness = opt_field(L, 1, "lateness", 0, 0, WINDOW_MAX_TIME);
    charge(L, (size_t)c.retain * sizeof(window_agg));
    lsk *b = push_box(L, LSKETCH_EXT_WINDOW);
    tm_err e;
    if (!(b->p = window_new(&c, &e))) return luaL_argerror(L, 1, e.msg);
    return 1;
}

/* --- metatables, module ----------------------------------------------------------- */
static int l_gc(lua_State *L) {
    lsk *b = lua_touserdata(L, 1); /* only our metatables carry this __gc */
    if (b) {
        kind_free(b->kind, b->p);
        b->p = NULL;
    }
    return 0;
}

static void ensure_metatables(lua_State *L) {
    static const luaL_Reg *const methods[] = {NULL, hll_methods, q_methods, topk_methods, win_methods};
    static const lua_CFunction tostr[] = {NULL, l_hll_tostring, l_q_tostring, l_topk_tostring,
                                          l_win_tostring};
    for (int k = 1; k <= NKINDS; k++) {
        if (!luaL_newmetatable(L, MT[k])) {
            lua_pop(L, 1);
            continue;
        }
        lua_newtable(L);
        luaL_register(L, NULL, methods[k]);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, tostr[k]);
        lua_setfield(L, -2, "__tostring");
        lua_pushinteger(L, k);
        lua_setfield(L, -2, "__tm_ext");
        lua_pushstring(L, "tidemark.sketch");
        lua_setfield(L, -2, "__metatable");
        lua_pop(L, 1);
    }
}

int luaopen_tidemark_sketch(lua_State *L) {
    static const luaL_Reg ctors[] = {
        {"hll", l_hll_new}, {"quantiles", l_q_new}, {"topk", l_topk_new}, {"rate", l_rate_new},
        {NULL, NULL}};
    static const luaL_Reg windows[] = {
        {"tumbling", l_win_tumbling}, {"hopping", l_win_hopping}, {"session", l_win_session},
        {NULL, NULL}};
    ensure_metatables(L);
    lua_newtable(L);
    luaL_register(L, NULL, ctors);
    lua_newtable(L);
    luaL_register(L, NULL, windows);
    lua_setfield(L, -2, "window");
    return 1;
}

int lsketch_ext_type(lua_State *L, int idx) {
    if (lua_type(L, idx) != LUA_TUSERDATA || !lua_getmetatable(L, idx)) return 0;
    int found = 0;
    for (int k = 1; k <= NKINDS && !found; k++) {
        luaL_getmetatable(L, MT[k]);
        if (lua_rawequal(L, -1, -2)) found = k;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return found;
}

int lsketch_serialize(lua_State *L, int idx, buf *out) {
    int kind = lsketch_ext_type(L, idx);
    if (!kind) return -1;
    lsk *b = lua_touserdata(L, idx);
    if (!b->p) return -1;
    switch (kind) {
    case LSKETCH_EXT_HLL: hll_serialize(b->p, out); break;
    case LSKETCH_EXT_QUANTILES: kll_serialize(b->p, out); break;
    case LSKETCH_EXT_TOPK: topk_serialize(b->p, out); break;
    case LSKETCH_EXT_WINDOW: window_serialize(b->p, out); break;
    }
    return 0;
}

int lsketch_push_decoded(lua_State *L, int ext_type, const char *p, size_t n) {
    if (ext_type < 1 || ext_type > NKINDS) return -1;
    ensure_metatables(L);
    charge(L, n);
    lsk *b = push_box(L, ext_type);
    tm_err e;
    switch (ext_type) {
    case LSKETCH_EXT_HLL: b->p = hll_deserialize(p, n, &e); break;
    case LSKETCH_EXT_QUANTILES: b->p = kll_deserialize(p, n, &e); break;
    case LSKETCH_EXT_TOPK: b->p = topk_deserialize(p, n, &e); break;
    case LSKETCH_EXT_WINDOW: b->p = window_deserialize(p, n, &e); break;
    }
    if (!b->p) {
        lua_pop(L, 1);
        return -1;
    }
    return 0;
}
