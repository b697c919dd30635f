/* test_sandbox.c — the untrusted-script sandbox: escapes blocked, limits hold. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "sandbox.h"

/* Run chunk in a fresh sandbox; return 0 ok / -1 error with msg in err. */
static int run(sandbox *sb, const char *src, tm_err *err) {
    if (sandbox_load(sb, src, strlen(src), "t.lua", err) < 0) return -1;
    return sandbox_pcall(sb, 0, 0, NULL, err);
}

static sandbox *mk(size_t mem, double cpu) {
    sandbox_opts o = {.memory_limit = mem, .cpu_limit = cpu};
    tm_err err;
    sandbox *sb = sandbox_new(&o, &err);
    assert_non_null(sb);
    return sb;
}

/* Each expression must evaluate to nil (the capability is absent). */
static void test_no_dangerous_globals(void **st) {
    (void)st;
    sandbox *sb = mk(0, 0);
    tm_err err;
    const char *absent[] = {"io", "os", "package", "require", "debug", "ffi", "jit", "dofile",
                            "loadfile", "getfenv", "setfenv", "module", "string.dump",
                            "math.randomseed", NULL};
    for (int i = 0; absent[i]; i++) {
        char src[200];
        snprintf(src, sizeof src, "assert(%s == nil, '%s is reachable')", absent[i], absent[i]);
        if (run(sb, src, &err) != 0) fail_msg("%s: %s", absent[i], err.msg);
    }
    /* the string metatable does not lead to dump either */
    assert_int_equal(run(sb, "assert(('').dump == nil)", &err), 0);
    /* safe libraries are there */
    assert_int_equal(run(sb, "assert(string.format('%d', 3) == '3' and table.concat({1,2}) == '12'"
                             " and math.floor(1.5) == 1 and bit.band(3, 1) == 1 and tm)",
                         &err),
                     0);
    sandbox_free(sb);
}

static void test_bytecode_refused(void **st) {
    (void)st;
    sandbox *sb = mk(0, 0);
    tm_err err;
    /* a binary chunk through loadstring and load(reader) */
    assert_int_equal(run(sb, "local f, e = loadstring('\\27LJ\\2junk'); "
                             "assert(f == nil and e:find('binary'))",
                         &err),
                     0);
    assert_int_equal(run(sb, "local n = 0; local f, e = load(function() n = n + 1; "
                             "if n == 1 then return '\\27' elseif n == 2 then return 'LJ' end end); "
                             "assert(f == nil and e:find('binary'))",
                         &err),
                     0);
    /* text still loads */
    assert_int_equal(run(sb, "assert(loadstring('return 1 + 1')() == 2)", &err), 0);
    /* and the host refuses binary source too */
    assert_int_equal(sandbox_load(sb, "\033LJ", 3, "x.lua", &err), -1);
    sandbox_free(sb);
}

static void test_syntax_error_names_file_line(void **st) {
    (void)st;
    sandbox *sb = mk(0, 0);
    tm_err err;
    assert_int_equal(sandbox_load(sb, "local x = 1\nlocal = 2\n", 20, "proj.lua", &err), -1);
    assert_int_equal(err.code, TM_EINVAL);
    assert_non_null(strstr(err.msg, "proj.lua:2:"));
    sandbox_free(sb);
}

static void test_locked_globals(void **st) {
    (void)st;
    sandbox *sb = mk(0, 0);
    tm_err err;
    assert_int_equal(run(sb, "helper = function() return 7 end", &err), 0);
    sandbox_lock_globals(sb);
    assert_int_equal(run(sb, "assert(helper() == 7)", &err), 0);
    assert_int_equal(run(sb, "x = 1", &err), -1);
    assert_non_null(strstr(err.msg, "global 'x'"));
    assert_int_equal(run(sb, "helper = nil", &err), -1);
    assert_int_equal(run(sb, "rawset(_G, 'y', 1)", &err), -1);
    assert_int_equal(run(sb, "setmetatable(_G, nil)", &err), -1);
    assert_int_equal(run(sb, "assert(getmetatable(_G) == false)", &err), 0);
    sandbox_free(sb);
}

static void test_memory_bomb(void **st) {
    (void)st;
    sandbox *sb = mk(16u << 20, 0);
    tm_err err;
    assert_int_equal(run(sb, "local t = {} for i = 1, 1e9 do t[i] = {i} end", &err), -1);
    assert_non_null(strstr(err.msg, "memory"));
    assert_true(sandbox_memory(sb) <= (16u << 20));
    assert_int_equal(run(sb, "local s = string.rep('x', 1e9)", &err), -1);
    /* the state is still usable afterwards */
    assert_int_equal(run(sb, "local t = {} for i = 1, 1000 do t[i] = i end", &err), 0);
    sandbox_free(sb);
}

/* Host code allocating past the cap: an error, not an abort. */
static int host_fill(lua_State *L, void *ud) {
    int *calls = ud;
    (*calls)++;
    assert_int_equal(lua_gettop(L), 2); /* the trampoline's &ctx, then our argument */
    assert_int_equal((int)lua_tonumber(L, 2), 42);
    lua_newtable(L);
    for (int i = 1; i <= 1000000; i++) { /* all kept: live */
        lua_createtable(L, 1000, 0);
        lua_rawseti(L, 3, i);
    }
    return 7;
}

static int host_ok(lua_State *L, void *ud) {
    (void)ud;
    lua_createtable(L, 100, 0);
    return lua_gettop(L) == 2 ? 5 : -1; /* &ctx, the table */
}

static void test_protect(void **st) {
    (void)st;
    sandbox *sb = mk(16u << 20, 0);
    lua_State *L = sandbox_lua(sb);
    tm_err err;
    int calls = 0, top = lua_gettop(L);
    lua_pushnumber(L, 42);
    assert_int_equal(sandbox_protect(sb, host_fill, &calls, 1, &err), -1);
    assert_int_equal(calls, 1);
    assert_non_null(strstr(err.msg, "memory limit exceeded (16 MiB)"));
    assert_int_equal(lua_gettop(L), top);
    assert_int_equal(sandbox_protect(sb, host_ok, NULL, 0, &err), 5);
    assert_int_equal(lua_gettop(L), top);
    assert_int_equal(run(sb, "local t = {} for i = 1, 1000 do t[i] = i end", &err), 0);
    sandbox_free(sb);
}

static void test_cpu_limit_interpreted(void **st) {
    (void)st;
    sandbox *sb = mk(0, 0.2);
    tm_err err;
    /* a loop with a call to a C function that is not compiled: the hook fires.
     * pcall inside the script cannot swallow it. */
    sandbox_enter(sb);
    int rc = run(sb, "while true do pcall(function() local x = {} ; "
                     "for i = 1, 100 do x[i] = tostring(i) end end) end",
                 &err);
    sandbox_leave(sb);
    assert_int_equal(rc, -1);
    assert_non_null(strstr(err.msg, "CPU limit"));
    assert_true(sandbox_cpu_exceeded(sb));
    /* next bracket is clean */
    sandbox_enter(sb);
    assert_int_equal(run(sb, "local n = 0 for i = 1, 1000 do n = n + i end", &err), 0);
    sandbox_leave(sb);
    assert_false(sandbox_cpu_exceeded(sb));
    sandbox_free(sb);
}

static int hard_hits;
static void on_hard(void *ud, double limit) {
    (void)ud;
    (void)limit;
    hard_hits++;
}

/* A loop the hook cannot stop is reported on the watchdog thread.  The
 * callback here only counts (the default exits the process, tested from
 * the CLI in tests/e2e/test_project.py); the loop is bounded so the test
 * ends. */
static void test_cpu_limit_hard_callback(void **st) {
    (void)st;
    sandbox_opts o = {.cpu_limit = 0.1, .grace = 0.1, .on_hard_limit = on_hard};
    tm_err err;
    sandbox *sb = sandbox_new(&o, &err);
    assert_non_null(sb);
    hard_hits = 0;
    sandbox_enter(sb);
    /* a JIT-compiled loop never calls the hook (bounded: ~1 s) */
    int rc = run(sb, "local n = 0 for i = 1, 1.5e9 do n = n + i end", &err);
    sandbox_leave(sb);
    (void)rc;
    assert_true(hard_hits >= 1);
    sandbox_free(sb);
}

static void test_random_deterministic(void **st) {
    (void)st;
    sandbox *a = mk(0, 0), *b = mk(0, 0);
    tm_err err;
    const char *src = "return math.random(1, 1000000), math.random()";
    double va[2], vb[2];
    sandbox *sbs[2] = {a, b};
    double *out[2] = {va, vb};
    for (int i = 0; i < 2; i++) {
        sandbox_seed(sbs[i], 42);
        assert_int_equal(sandbox_load(sbs[i], src, strlen(src), "r.lua", &err), 0);
        assert_int_equal(sandbox_pcall(sbs[i], 0, 2, NULL, &err), 0);
        out[i][0] = lua_tonumber(sandbox_lua(sbs[i]), -2);
        out[i][1] = lua_tonumber(sandbox_lua(sbs[i]), -1);
        lua_pop(sandbox_lua(sbs[i]), 2);
    }
    assert_true(va[0] == vb[0] && va[1] == vb[1]);
    assert_true(va[0] >= 1 && va[0] <= 1000000);
    sandbox_free(a);
    sandbox_free(b);
}

static void test_collectgarbage_restricted(void **st) {
    (void)st;
    sandbox *sb = mk(0, 0);
    tm_err err;
    assert_int_equal(run(sb, "assert(collectgarbage('count') > 0)", &err), 0);
    assert_int_equal(run(sb, "collectgarbage('stop')", &err), -1);
    assert_int_equal(run(sb, "collectgarbage('setpause', 1000)", &err), -1);
    sandbox_free(sb);
}

static char printed[256];
static void cap(void *ud, const char *s, size_t n) {
    (void)ud;
    snprintf(printed, sizeof printed, "%.*s", (int)n, s);
}

static void test_print_captured(void **st) {
    (void)st;
    sandbox_opts o = {.print = cap};
    tm_err err;
    sandbox *sb = sandbox_new(&o, &err);
    assert_int_equal(run(sb, "print('a', 1, true)", &err), 0);
    assert_string_equal(printed, "a\t1\ttrue");
    sandbox_free(sb);
}

static void test_traceback(void **st) {
    (void)st;
    sandbox *sb = mk(0, 0);
    tm_err err;
    buf tb = BUF_INIT;
    const char *src = "local function inner() error('boom') end\nlocal function outer() inner() end\nouter()";
    assert_int_equal(sandbox_load(sb, src, strlen(src), "tb.lua", &err), 0);
    assert_int_equal(sandbox_pcall(sb, 0, 0, &tb, &err), -1);
    assert_non_null(strstr(err.msg, "tb.lua:1: boom"));
    assert_non_null(strstr(tb.ptr, "stack traceback"));
    assert_non_null(strstr(tb.ptr, "outer"));
    buf_free(&tb);
    sandbox_free(sb);
}

/* grow_step (heap taken ahead in contiguous runs): not counted as used, the
 * cap still holds, and two states growing in turns each compute the same
 * as one growing alone. */
static void test_grow_step(void **st) {
    (void)st;
    const char *build = "t = {} for i = 1, 100000 do t['k' .. i] = {n = i} end";
    tm_err err;
    sandbox_opts plain = {.memory_limit = 64u << 20};
    sandbox_opts grow = {.memory_limit = 64u << 20, .grow_step = 8u << 20};
    sandbox *a = sandbox_new(&plain, &err), *b = sandbox_new(&grow, &err),
            *c = sandbox_new(&grow, &err);
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    /* the same allocations, the same count (the runs ahead are not in it) */
    if (run(a, build, &err) != 0) fail_msg("%s", err.msg);
    assert_int_equal(run(b, build, &err), 0);
    assert_true(sandbox_memory(a) > (8u << 20)); /* past the first step */
    assert_int_equal(sandbox_memory(b), sandbox_memory(a));
    /* b and c grow in turns: each one's table intact */
    for (int round = 0; round < 10; round++) {
        char src[160];
        snprintf(src, sizeof src, "for i = 1, 10000 do t['r%d.' .. i] = {n = i} end", round);
        if (run(b, src, &err) != 0) fail_msg("round %d: %s", round, err.msg);
        assert_int_equal(run(c, round ? src : "t = {}", &err), 0);
    }
    assert_int_equal(run(b, "local n = 0 for _ in pairs(t) do n = n + 1 end "
                            "assert(n == 200000, n)", &err), 0);
    assert_int_equal(run(c, "local n = 0 for _ in pairs(t) do n = n + 1 end "
                            "assert(n == 90000, n)", &err), 0);
    /* the cap holds with the heap ahead of it */
    assert_int_equal(run(c, "local u = {} for i = 1, 1e9 do u[i] = {i} end", &err), -1);
    assert_non_null(strstr(err.msg, "memory"));
    assert_true(sandbox_memory(c) <= (64u << 20));
    sandbox_free(a);
    sandbox_free(b);
    sandbox_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_dangerous_globals),
        cmocka_unit_test(test_bytecode_refused),
        cmocka_unit_test(test_syntax_error_names_file_line),
        cmocka_unit_test(test_locked_globals),
        cmocka_unit_test(test_memory_bomb),
        cmocka_unit_test(test_grow_step),
        cmocka_unit_test(test_protect),
        cmocka_unit_test(test_cpu_limit_interpreted),
        cmocka_unit_test(test_cpu_limit_hard_callback),
        cmocka_unit_test(test_random_deterministic),
        cmocka_unit_test(test_collectgarbage_restricted),
        cmocka_unit_test(test_print_captured),
        cmocka_unit_test(test_traceback),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
