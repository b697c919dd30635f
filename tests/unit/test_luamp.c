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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_sorted_keys),
        cmocka_unit_test(test_nan),
        cmocka_unit_test(test_ext),
        cmocka_unit_test(test_event_raw_ext),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
