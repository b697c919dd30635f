/* test_luamp.c — msgpack <-> Lua values (luamp.h): the plain functions'
 * rules that projections rely on (NaN refused, unknown ext an error,
 * sorted map keys) and what the _opt variants change for the REPL
 * (LUAMP_NAN, LUAMP_RAW_EXT), on a plain luaL_newstate(). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <math.h>
#include <string.h>

#include "luamp.h"
#include "mp.h"

static lua_State *L;

static int setup(void **st) {
    L = luaL_newstate();
    luaL_openlibs(L);
    return 0;
}

static int teardown(void **st) {
    lua_close(L);
    return 0;
}

/* Push the value of a Lua expression. */
static void push_expr(const char *expr) {
    char chunk[512];
    snprintf(chunk, sizeof chunk, "return %s", expr);
    if (luaL_dostring(L, chunk)) fail_msg("lua: %s", lua_tostring(L, -1));
}

static void test_encode_sorted_keys(void **st) {
    buf b = BUF_INIT;
    tm_err e;
    err_clear(&e);
    push_expr("{ b = 1, a = true, [2] = 'x' }");
    assert_int_equal(luamp_encode(L, -1, "state", &b, &e), 0);
    /* map of 3: 2 -> "x", "a" -> true, "b" -> 1 */
    const char want[] = "\x83\x02\xa1x\xa1\x61\xc3\xa1\x62\x01";
    assert_int_equal(b.len, sizeof want - 1);
    assert_memory_equal(b.ptr, want, sizeof want - 1);
    lua_settop(L, 0);
    buf_free(&b);
}

static void test_nan(void **st) {
    buf b = BUF_INIT;
    tm_err e;
    err_clear(&e);
    push_expr("{ x = 0/0 }");
    assert_int_equal(luamp_encode(L, -1, "state", &b, &e), -1);
    assert_non_null(strstr(e.msg, "state.x: cannot store NaN"));
    assert_int_equal(b.len, 0);
    assert_int_equal(lua_gettop(L), 1);
    err_clear(&e);
    assert_int_equal(luamp_encode_opt(L, -1, "value", LUAMP_NAN, &b, &e), 0);
    assert_int_equal(b.len, 1 + 2 + 9); /* fixmap, "x", float64 */
    assert_int_equal((unsigned char)b.ptr[3], 0xcb);
    lua_settop(L, 0);
    assert_int_equal(luamp_push(L, b.ptr, b.len, &e), 0);
    lua_getfield(L, -1, "x");
    assert_true(isnan(lua_tonumber(L, -1)));
    lua_settop(L, 0);
    buf_free(&b);
}

static void test_ext(void **st) {
    tm_err e;
    err_clear(&e);
    /* {"t": ext 5 "ab"} (fixext 2) */
    const char mp[] = "\x81\xa1t\xd5\x05\x61\x62";
    assert_int_equal(luamp_push(L, mp, sizeof mp - 1, &e), -1);
    assert_non_null(strstr(e.msg, "ext type 5"));
    assert_int_equal(lua_gettop(L), 0);
    err_clear(&e);
    assert_int_equal(luamp_push_opt(L, mp, sizeof mp - 1, LUAMP_RAW_EXT, &e), 0);
    lua_getfield(L, -1, "t");
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    assert_non_null(s);
    assert_int_equal(n, 2);
    assert_memory_equal(s, "ab", 2);
    lua_settop(L, 0);
}

static void test_event_raw_ext(void **st) {
    tm_err e;
    err_clear(&e);
    tm_event ev;
    memset(&ev, 0, sizeof ev);
    ev.stream = "order-1";
    ev.stream_len = 7;
    ev.type = "T";
    ev.type_len = 1;
    ev.data = "\xc7\x03\x07xyz"; /* ext 8, type 7, "xyz" */
    ev.data_len = 6;
    ev.position = 3;
    assert_int_equal(luamp_push_event(L, &ev, &e), -1);
    assert_int_equal(lua_gettop(L), 0);
    assert_int_equal(luamp_push_event_opt(L, &ev, LUAMP_RAW_EXT, &e), 0);
    lua_getfield(L, -1, "data");
    assert_string_equal(lua_tostring(L, -1), "xyz");
    lua_getfield(L, -2, "category");
    assert_string_equal(lua_tostring(L, -1), "order");
    lua_getfield(L, -3, "position");
    assert_int_equal(lua_tointeger(L, -1), 3);
    lua_settop(L, 0);
}

/* A msgpack map key as (rank, number, bytes): the order luamp.h promises. */
typedef struct mkey {
    int rank; /* 0 number, 1 string, 2 boolean */
    double num;
    const char *s;
    size_t len;
} mkey;

static mkey key_of(const mp_item *it) {
    mkey k = {0};
    switch (it->type) {
    case MP_UINT: k.num = (double)it->v.u; break;
    case MP_INT: k.num = (double)it->v.i; break;
    case MP_FLOAT:
    case MP_DOUBLE: k.num = it->v.d; break;
    case MP_STR: k.rank = 1, k.s = it->v.s.ptr, k.len = it->v.s.len; break;
    case MP_BOOL: k.rank = 2, k.num = it->v.b; break;
    default: fail_msg("unexpected key type %d", (int)it->type);
    }
    return k;
}

static int mkey_less(const mkey *a, const mkey *b) {
    if (a->rank != b->rank) return a->rank < b->rank;
    if (a->rank != 1) return a->num < b->num;
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(a->s, b->s, n);
    return c ? c < 0 : a->len < b->len;
}

/* Large maps (past the small-map path) come out in key order, every pair
 * once, and decode back to the same table: keys of every rank, string keys
 * sharing a long prefix, ties in the 8 bytes after it (differing late, by
 * length, by a trailing NUL), keys past 31 and 255 bytes, a nested large
 * map. */
static void test_encode_large_map_order(void **st) {
    static const char gen[] =
        "math.randomseed(7)\n"
        "local t = { [true] = 1, [false] = 2, [-1e300] = 3, [0.5] = 4, [-3] = 5, [7] = 6,\n"
        "  [2^40] = 7, ['customer-'] = 8, ['customer-ab'] = 9, ['customer-ab\\0'] = 10,\n"
        "  ['customer-abcdefgh'] = 11, ['customer-abcdefgh1'] = 12, ['customer-abcdefgg9'] = 13,\n"
        "  [string.rep('customer-x', 4)] = 14, [string.rep('customer-y', 30)] = 15 }\n"
        "local inner = {}\n"
        "for i = 1, 100 do inner['k' .. i] = i end\n"
        "t['customer-nested'] = inner\n"
        "for i = 1, 3000 do\n"
        "  t['customer-' .. math.random(1, 100000)] = { orders = i, revenue = i / 4 }\n"
        "  t[math.random(-5000, 5000) / 8] = i\n"
        "end\n"
        "return t\n";
    if (luaL_dostring(L, gen)) fail_msg("lua: %s", lua_tostring(L, -1));
    int t = lua_gettop(L);
    size_t want = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        lua_pop(L, 1);
        want++;
    }
    buf b = BUF_INIT;
    tm_err e;
    err_clear(&e);
    assert_int_equal(luamp_encode(L, t, "state", &b, &e), 0);
    assert_int_equal(lua_gettop(L), t);
    const char *p = b.ptr, *end = b.ptr + b.len;
    mp_item it;
    assert_int_equal(mp_next(&p, end, &it), 0);
    assert_int_equal(it.type, MP_MAP);
    assert_int_equal(it.v.n, want);
    mkey prev = {0};
    for (uint32_t i = 0; i < it.v.n; i++) {
        mp_item k;
        assert_int_equal(mp_next(&p, end, &k), 0);
        mkey cur = key_of(&k);
        if (i > 0 && !mkey_less(&prev, &cur)) fail_msg("key %u out of order", i);
        prev = cur;
        if (cur.rank == 1 && cur.len == 15 && !memcmp(cur.s, "customer-nested", 15)) {
            /* the nested large map is in order too */
            mp_item m;
            assert_int_equal(mp_next(&p, end, &m), 0);
            assert_int_equal(m.type, MP_MAP);
            mkey ip = {0};
            for (uint32_t j = 0; j < m.v.n; j++) {
                mp_item ik;
                assert_int_equal(mp_next(&p, end, &ik), 0);
                mkey ic = key_of(&ik);
                if (j > 0 && !mkey_less(&ip, &ic)) fail_msg("nested key %u out of order", j);
                ip = ic;
                assert_int_equal(mp_skip(&p, end), 0);
            }
            continue;
        }
        assert_int_equal(mp_skip(&p, end), 0);
    }
    assert_ptr_equal(p, end);
    /* the same table back: every key with its value */
    assert_int_equal(luamp_push(L, b.ptr, b.len, &e), 0);
    lua_setglobal(L, "got");
    lua_pushvalue(L, t);
    lua_setglobal(L, "orig");
    static const char cmp[] =
        "local function same(a, b)\n"
        "  if type(a) ~= 'table' then return a == b end\n"
        "  for k, v in pairs(a) do if not same(v, b[k]) then return false end end\n"
        "  for k in pairs(b) do if a[k] == nil then return false end end\n"
        "  return true\n"
        "end\n"
        "return same(orig, got)\n";
    if (luaL_dostring(L, cmp)) fail_msg("lua: %s", lua_tostring(L, -1));
    assert_true(lua_toboolean(L, -1));
    /* encoding again gives the same bytes */
    buf b2 = BUF_INIT;
    lua_getglobal(L, "got");
    assert_int_equal(luamp_encode(L, -1, "state", &b2, &e), 0);
    assert_int_equal(b2.len, b.len);
    assert_memory_equal(b2.ptr, b.ptr, b.len);
    lua_settop(L, 0);
    buf_free(&b);
    buf_free(&b2);
}

/* A bad value in a large map: the error names its path, and the output and
 * the stack are as on entry. */
static void test_encode_large_map_error(void **st) {
    push_expr("(function() local t = {} for i = 1, 100 do t['p' .. i] = { n = i } end"
              " t.p50.f = print return t end)()");
    buf b = BUF_INIT;
    buf_puts(&b, "keep");
    tm_err e;
    err_clear(&e);
    assert_int_equal(luamp_encode(L, -1, "state", &b, &e), -1);
    assert_non_null(strstr(e.msg, "state.p50.f: cannot store a function"));
    assert_int_equal(b.len, 4);
    assert_int_equal(lua_gettop(L), 1);
    lua_settop(L, 0);
    buf_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_sorted_keys),
        cmocka_unit_test(test_encode_large_map_order),
        cmocka_unit_test(test_encode_large_map_error),
        cmocka_unit_test(test_nan),
        cmocka_unit_test(test_ext),
        cmocka_unit_test(test_event_raw_ext),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
