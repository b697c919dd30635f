/* test_lsketch.c — the Lua face of the sketches: a plain luaL_newstate()
 * with luaopen_tidemark_sketch installed as the global `tm`, Lua snippets
 * checked with assert(), argument errors, and the state-encoding hooks
 * (ext type, serialise, decode) round-tripping every kind. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <string.h>

#include "lsketch.h"
#include "skio.h"

static lua_State *L;

static int setup(void **st) {
    L = luaL_newstate();
    luaL_openlibs(L);
    lua_pushcfunction(L, luaopen_tidemark_sketch);
    lua_call(L, 0, 1);
    lua_setglobal(L, "tm");
    return 0;
}

static int teardown(void **st) {
    lua_close(L);
    return 0;
}

static void run(const char *chunk) {
    if (luaL_dostring(L, chunk)) fail_msg("lua: %s", lua_tostring(L, -1));
    lua_settop(L, 0);
}

/* The chunk must raise an error whose message contains want. */
static void run_err(const char *chunk, const char *want) {
    if (!luaL_dostring(L, chunk)) fail_msg("expected an error from: %s", chunk);
    const char *msg = lua_tostring(L, -1);
    if (!msg || !strstr(msg, want)) fail_msg("error %s lacks '%s'", msg ? msg : "(nil)", want);
    lua_settop(L, 0);
}

static void test_hll(void **st) {
    run("local h = tm.hll()\n"
        "assert(h:count() == 0)\n"
        "for i = 1, 100000 do h:add('u' .. i) end\n"
        "for i = 1, 100000 do h:add('u' .. i) end\n"
        "local c = h:count()\n"
        "assert(math.abs(c - 100000) < 2000, c)\n"
        "local g = tm.hll()\n"
        "assert(g:add(1) == true and g:add(1) == false and g:add(-0.0) == true)\n"
        "assert(g:add('1') == true)\n"            /* '1' differs from 1 */
        "assert(g:count() == 3)\n"
        "assert(g:add(0) == false)\n"             /* 0 == -0 */
        "local a, b = tm.hll(), tm.hll()\n"
        "for i = 1, 3000 do a:add(i) end\n"
        "for i = 2001, 5000 do b:add(i) end\n"
        "assert(a:merge(b) == a)\n"
        "assert(math.abs(a:count() - 5000) < 100, a:count())\n"
        "assert(tostring(a):match('^hll%(~%d+ distinct'))\n"
        "assert(getmetatable(a) == 'tidemark.sketch')\n");
    run_err("tm.hll():add(true)", "string or number expected");
    run_err("tm.hll():add()", "string or number expected");
    run_err("tm.hll():merge(tm.quantiles())", "tidemark.hll expected");
    run_err("tm.hll().count(5)", "tidemark.hll expected");
    run_err("setmetatable(tm.hll(), {})", "");
}

static void test_quantiles(void **st) {
    run("local q = tm.quantiles()\n"
        "assert(q:quantile(0.5) == nil and q:count() == 0 and q:min() == nil)\n"
        "for i = 1, 100000 do q:add(i) end\n"
        "local p50, p99 = q:quantile(0.5), q:quantile(0.99)\n"
        "assert(math.abs(p50 - 50000) <= 1000, p50)\n"
        "assert(math.abs(p99 - 99000) <= 1000, p99)\n"
        "assert(q:count() == 100000 and q:min() == 1 and q:max() == 100000)\n"
        "assert(q:quantile(0) == 1 and q:quantile(1) == 100000)\n"
        "assert(math.abs(q:rank(25000) - 0.25) < 0.01)\n"
        "local r = tm.quantiles(64)\n"
        "for i = 100001, 200000 do r:add(i) end\n"
        "q:merge(r)\n"
        "assert(q:count() == 200000 and q:max() == 200000)\n"
        "assert(math.abs(q:quantile(0.5) - 100000) <= 2000)\n"
        "assert(tostring(q):match('^quantiles%(n=200000'))\n");
    run_err("tm.quantiles(3)", "k must be an integer");
    run_err("tm.quantiles():add(0/0)", "NaN");
    run_err("tm.quantiles():add('x')", "number expected");
    run_err("tm.quantiles():quantile(1.5)", "q must be in [0, 1]");
}

static void test_topk(void **st) {
    run("local t = tm.topk(3)\n"
        "for i = 1, 1000 do t:add('k' .. (i % 20)) end\n"
        "t:add('heavy', 500) t:add('mid', 100.5)\n"
        "local top = t:top()\n"
        "assert(#top == 3)\n"
        "assert(top[1].key == 'heavy' and top[1].count == 500)\n"
        "assert(top[2].key == 'mid' and top[2].count == 100.5)\n"
        "assert(top[3].key == 'k0' and top[3].error == 0 and top[3].count == 50)\n"
        "assert(#t:top(5) == 5 and #t:top(0) == 0)\n"
        "assert(t:total() == 1600.5)\n"
        "local c, e = t:get('heavy')\n"
        "assert(c == 500 and e == 0 and t:get('nope') == nil)\n"
        "local u = tm.topk(2, 2)\n"
        "u:add('b') u:add('a') u:add('c')\n"          /* c replaces b (ties: last by key) */
        "local x = u:top()\n"
        "assert(x[1].key == 'c' and x[1].count == 2 and x[1].error == 1, x[1].key)\n"
        "assert(x[2].key == 'a' and x[2].count == 1)\n"
        "local m = tm.topk(3) m:add('heavy', 10)\n"
        "t:merge(m)\n"
        "assert(t:top(1)[1].count == 510)\n"
        "t:add(12) assert(t:get('12'))\n");
    run_err("tm.topk(0)", "k must be an integer");
    run_err("tm.topk(10, 5)", "capacity must be an integer");
    run_err("tm.topk(3):add('x', -1)", "weight must be a positive");
    run_err("tm.topk(3):add('x', 0/0)", "weight must be a positive");
    run_err("tm.topk(3):add(string.rep('x', 1025))", "key longer");
    run_err("tm.topk(3):add({})", "string expected");
}

static void test_window(void **st) {
    run("local w = tm.window.tumbling{size = 10, lateness = 5}\n"
        "assert(w:watermark() == nil)\n"
        "assert(w:add(3, 1) == 1) w:add(14, 2) w:add(8, 4)\n"
        "assert(w:watermark() == 9)\n"
        "assert(#w:closed() == 0)\n"
        "w:add(16, 8)\n"
        "local c = w:closed()\n"
        "assert(#c == 1 and c[1].start == 0 and c[1]['end'] == 10 and c[1].count == 2)\n"
        "assert(c[1].sum == 5 and c[1].min == 1 and c[1].max == 4 and c[1].closed == true)\n"
        "assert(#w:closed() == 0)\n"
        "assert(w:add(7, 16) == 0)\n"
        "local l = w:late() assert(l.count == 1 and l.sum == 16)\n"
        "local ws = w:windows()\n"
        "assert(#ws == 2 and ws[1].closed and not ws[2].closed and ws[2].sum == 10)\n"
        "w:add(17)\n"                                     /* value defaults to 1 */
        "assert(w:windows()[2].sum == 11)\n"
        "local h = tm.window.hopping{size = 10, hop = 5}\n"
        "assert(h:add(12, 1) == 2)\n"
        "local hw = h:windows()\n"
        "assert(#hw == 2 and hw[1].start == 5 and hw[2].start == 10)\n"
        "local s = tm.window.session{gap = 10, lateness = 100}\n"
        "s:add(0) s:add(18) s:add(9)\n"
        "local sw = s:windows()\n"
        "assert(#sw == 1 and sw[1].start == 0 and sw[1]['end'] == 28 and sw[1].count == 3)\n"
        "assert(tostring(s):match('^window.session'))\n"
        "local r = tm.window.tumbling{size = 10, retain = 2}\n"
        "for t = 0, 99, 5 do r:add(t) end\n"
        "assert(#r:windows() == 3 and #r:closed() == 9)\n");
    run("local r = tm.rate{over = 10000}\n"            /* 1 s buckets, 10 s span */
        "assert(r:rate() == 0)\n"
        "for t = 0, 19999, 100 do r:add(t, 2) end\n"  /* 10 events/s, value 2 */
        "local n, s = r:rate()\n"
        "assert(n == 10 and s == 20, n)\n"
        "assert(r:rate(2000) == 10)\n"
        "for t = 20000, 20999, 10 do r:add(t) end\n"  /* a burst: 100 events in 1 s */
        "assert(r:rate(1000) == 100)\n"
        "assert(r:rate() == (9 * 10 + 100) / 10)\n"
        "assert(#r:windows() == 11)\n");
    run_err("tm.rate{over = 1500}", "multiple of 'bucket'");
    run_err("tm.window.session{gap = 5}:rate()", "rate needs a tumbling window");
    run_err("tm.window.tumbling{}", "size");
    run_err("tm.window.tumbling{size = 10, lateness_ms = 5}", "unknown option 'lateness_ms'");
    run_err("tm.window.tumbling{size = 1.5}", "field 'size' must be an integer");
    run_err("tm.window.hopping{size = 10, hop = 20}", "hop must be");
    run_err("tm.window.session{gap = 0}", "field 'gap'");
    run_err("tm.window.tumbling(10)", "table expected");
    run_err("tm.window.tumbling{size = 10}:add(1.5)", "time (ms) must be an integer");
    run_err("tm.window.tumbling{size = 10}:add(1, 1/0)", "finite");
}

/* ext type + serialise + decode: the decoded sketch answers the same and
 * re-serialises to the same bytes; corrupt bytes are refused. */
static void roundtrip(const char *make, int want_type, const char *probe) {
    char chunk[1024];
    snprintf(chunk, sizeof chunk, "return %s", make);
    if (luaL_dostring(L, chunk)) fail_msg("lua: %s", lua_tostring(L, -1));
    assert_int_equal(lsketch_ext_type(L, -1), want_type);
    buf a = BUF_INIT, b = BUF_INIT;
    assert_int_equal(lsketch_serialize(L, -1, &a), 0);
    assert_int_equal(lsketch_push_decoded(L, want_type, a.ptr, a.len), 0);
    assert_int_equal(lsketch_ext_type(L, -1), want_type);
    assert_int_equal(lsketch_serialize(L, -1, &b), 0);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.ptr, b.ptr, a.len);
    /* same answers from Lua: probe(orig, decoded) */
    lua_setglobal(L, "decoded");
    lua_setglobal(L, "orig");
    run(probe);
    int top = lua_gettop(L);
    a.ptr[a.len / 2] ^= 1;
    assert_int_equal(lsketch_push_decoded(L, want_type, a.ptr, a.len), -1);
    assert_int_equal(lsketch_push_decoded(L, want_type, a.ptr, a.len - 1), -1);
    a.ptr[a.len / 2] ^= 1;
    assert_int_equal(lsketch_push_decoded(L, want_type % 4 + 1, a.ptr, a.len), -1); /* wrong type */
    assert_int_equal(lsketch_push_decoded(L, 9, a.ptr, a.len), -1);
    assert_int_equal(lua_gettop(L), top); /* nothing pushed on failure */
    buf_free(&a);
    buf_free(&b);
}

static void test_state_encoding(void **st) {
    roundtrip("(function() local h = tm.hll() for i = 1, 5000 do h:add(i) end return h end)()",
              LSKETCH_EXT_HLL, "assert(orig:count() == decoded:count())");
    roundtrip("(function() local q = tm.quantiles() for i = 1, 50000 do q:add(i % 977) end return q end)()",
              LSKETCH_EXT_QUANTILES,
              "for _, p in ipairs{0.5, 0.95, 0.99} do assert(orig:quantile(p) == decoded:quantile(p)) end\n"
              "orig:add(5) decoded:add(5) assert(orig:count() == decoded:count())");
    roundtrip("(function() local t = tm.topk(5) for i = 1, 5000 do t:add('k' .. (i * i % 101)) end return t end)()",
              LSKETCH_EXT_TOPK,
              "local a, b = orig:top(), decoded:top()\n"
              "for i = 1, 5 do assert(a[i].key == b[i].key and a[i].count == b[i].count) end");
    roundtrip("(function() local w = tm.window.session{gap = 5, lateness = 20}\n"
              "for i = 1, 500 do w:add(i * 3 + (i % 7) * 4, i) end return w end)()",
              LSKETCH_EXT_WINDOW,
              "local a, b = orig:windows(), decoded:windows()\n"
              "assert(#a == #b and #a > 0)\n"
              "for i = 1, #a do assert(a[i].start == b[i].start and a[i].sum == b[i].sum) end\n"
              "assert(#orig:closed() == #decoded:closed())\n"
              "assert(orig:late().count == decoded:late().count)");
    /* not a sketch: a table with a forged metatable, a number, other userdata */
    run("forged = setmetatable({}, {__tm_ext = 1})");
    lua_getglobal(L, "forged");
    assert_int_equal(lsketch_ext_type(L, -1), 0);
    buf x = BUF_INIT;
    assert_int_equal(lsketch_serialize(L, -1, &x), -1);
    lua_pushnumber(L, 3);
    assert_int_equal(lsketch_ext_type(L, -1), 0);
    lua_getglobal(L, "io");
    lua_getfield(L, -1, "stdout");
    assert_int_equal(lsketch_ext_type(L, -1), 0);
    lua_settop(L, 0);
    buf_free(&x);
}

/* Decoding into a fresh state that never ran luaopen still works. */
static void test_decode_fresh_state(void **st) {
    run("h = tm.hll() h:add('a') h:add('b')");
    lua_getglobal(L, "h");
    buf a = BUF_INIT;
    assert_int_equal(lsketch_serialize(L, -1, &a), 0);
    lua_State *M = luaL_newstate();
    luaL_openlibs(M);
    assert_int_equal(lsketch_push_decoded(M, LSKETCH_EXT_HLL, a.ptr, a.len), 0);
    lua_setglobal(M, "h");
    assert_int_equal(luaL_dostring(M, "assert(h:count() == 2) h:add('c') assert(h:count() == 3)"), 0);
    lua_close(M);
    buf_free(&a);
    lua_settop(L, 0);
}

/* Mutation fuzzing behind a valid frame: flip body bytes, fix the
 * checksum, decode.  Whatever is accepted must re-serialise to the very
 * same bytes (canonical form) and survive use. */
static uint64_t fz = 1;
static uint64_t fzrand(void) {
    fz ^= fz << 13; fz ^= fz >> 7; fz ^= fz << 17;
    return fz;
}

static void reframe(char *p, size_t n) {
    uint32_t c = (uint32_t)skio_hash64(p, n - 4, SKIO_CHECK_SEED);
    p[n - 4] = (char)(c >> 24); p[n - 3] = (char)(c >> 16);
    p[n - 2] = (char)(c >> 8); p[n - 1] = (char)c;
}

static void fuzz_kind(const char *make, int type, const char *use, int rounds) {
    char chunk[512];
    snprintf(chunk, sizeof chunk, "return %s", make);
    if (luaL_dostring(L, chunk)) fail_msg("lua: %s", lua_tostring(L, -1));
    buf orig = BUF_INIT, m = BUF_INIT, again = BUF_INIT;
    assert_int_equal(lsketch_serialize(L, -1, &orig), 0);
    lua_settop(L, 0);
    int accepted = 0;
    for (int r = 0; r < rounds; r++) {
        buf_reset(&m);
        buf_append(&m, orig.ptr, orig.len);
        int flips = 1 + (int)(fzrand() % 3);
        for (int f = 0; f < flips; f++) {
            size_t at = 5 + (size_t)(fzrand() % (m.len - 9));
            m.ptr[at] = fzrand() % 2 ? (char)(fzrand() & 0xff) : (char)(m.ptr[at] ^ (1 << (fzrand() % 8)));
        }
        size_t n = m.len;
        if (fzrand() % 8 == 0) n = 9 + (size_t)(fzrand() % (m.len - 8)); /* truncated body */
        reframe(m.ptr, n);
        if (lsketch_push_decoded(L, type, m.ptr, n) < 0) continue;
        accepted++;
        buf_reset(&again);
        assert_int_equal(lsketch_serialize(L, -1, &again), 0);
        if (again.len != n || memcmp(again.ptr, m.ptr, n) != 0)
            fail_msg("type %d: accepted bytes re-serialise differently (round %d)", type, r);
        lua_setglobal(L, "s");
        run(use);
    }
    print_message("# type %d: %d of %d mutants accepted (all canonical)\n", type, accepted, rounds);
    buf_free(&orig);
    buf_free(&m);
    buf_free(&again);
}

static void test_fuzz_decode(void **st) {
    fuzz_kind("(function() local h = tm.hll() for i = 1, 300 do h:add(i) end return h end)()",
              LSKETCH_EXT_HLL, "s:add('x') assert(s:count() >= 0)", 3000);
    fuzz_kind("(function() local h = tm.hll() for i = 1, 3000 do h:add(i) end return h end)()",
              LSKETCH_EXT_HLL, "s:add('x') assert(s:count() >= 0)", 300);
    fuzz_kind("(function() local q = tm.quantiles(8) for i = 1, 200 do q:add(i % 13) end return q end)()",
              LSKETCH_EXT_QUANTILES, "s:add(1) s:quantile(0.5) s:rank(3) s:merge(s) s:add(2)", 3000);
    fuzz_kind("(function() local t = tm.topk(2, 4) for i = 1, 50 do t:add('k' .. i % 7) end return t end)()",
              LSKETCH_EXT_TOPK, "s:add('k1') s:add('zz', 3) s:top(4) s:merge(s)", 3000);
    fuzz_kind("(function() local w = tm.window.hopping{size = 20, hop = 5, lateness = 7, retain = 3}\n"
              "for i = 1, 60 do w:add(i * 3 - (i % 4) * 5, i) end return w end)()",
              LSKETCH_EXT_WINDOW, "s:add(170, 1) s:add(100, 2) s:windows() s:closed() s:late()", 3000);
    fuzz_kind("(function() local w = tm.window.session{gap = 4, lateness = 9, retain = 2}\n"
              "for i = 1, 40 do w:add(i * 3 - (i % 4) * 5, i) end return w end)()",
              LSKETCH_EXT_WINDOW, "s:add(130, 1) s:add(100, 2) s:add(120) s:windows() s:closed()", 3000);
    lua_settop(L, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hll),
        cmocka_unit_test(test_quantiles),
        cmocka_unit_test(test_topk),
        cmocka_unit_test(test_window),
        cmocka_unit_test(test_state_encoding),
        cmocka_unit_test(test_decode_fresh_state),
        cmocka_unit_test(test_fuzz_decode),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
