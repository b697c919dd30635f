/* fuzz_repl_line.c — libFuzzer target: the REPL's handling of the lines a
 * user (or a piped script) types, other than Lua itself: dot commands
 * (T.dot in repl/prelude.lua, reached through repllua_dot) and tab
 * completion (T.complete, reached through repllua_complete) — both parse
 * whatever the line holds.
 *
 * One REPL session for the whole run: the real Lua state of repllua_open
 * (sandbox, prelude) on an embedded store in a temporary directory holding
 * a few events, so listings and completion find names.  The input is cut
 * into lines at '\n' (at most 16); for each line:
 *   - completion of the word that ends the line (split at readline's word
 *     break characters, as replline.c sets them);
 *   - when the line is a dot command by the REPL's rule (its first
 *     non-blank character is '.' followed by a letter: replline.c), the
 *     command.  `.load` is skipped: it reads the file it names.
 * Output goes to /dev/null; .format and .timing are reset per input.
 *
 * Properties, for any line:
 *   - no crash, no out-of-bounds access, no leak (ASan/UBSan/LSan);
 *   - completion never raises (the REPL would swallow the error and offer
 *     nothing) and returns a table of strings;
 *   - a dot command succeeds or fails with a message for the user, never
 *     with a Lua runtime error in the prelude's own code ("tidemark:LINE:
 *     attempt to ...", "... bad argument ...").
 */
#define _GNU_SOURCE
#include "fuzz_common.h"

#include <ftw.h>
#include <lauxlib.h>
#include <lua.h>
#include <unistd.h>

#include "buf.h"
#include "err.h"
#include "repl.h"
#include "replsrc.h"
#include "store.h"

#define MAX_LINES 16
#define WORD_BREAK " \t\n()[]{},;=+-*/<>~^%#&|" /* replline.c */

static repl r;
static char dir[64];

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static void cleanup(void) {
    if (r.src) replsrc_close(r.src);
    if (dir[0]) nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void setup(void) {
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/fuzz-repl-XXXXXX", tmp && strlen(tmp) < 40 ? tmp : "/tmp");
    if (!mkdtemp(dir)) fuzz_fail("mkdtemp %s", dir);
    atexit(cleanup);
    char path[96];
    snprintf(path, sizeof path, "%s/data", dir);
    store_opts o;
    store_opts_default(&o);
    o.durability = STORE_LOSE_ON_OS_CRASH;
    tm_err e;
    store *st = store_open(path, &o, &e);
    if (!st) fuzz_fail("store_open: %s", e.msg);
    store_close(st);
    r.src = replsrc_open_local(path, &e);
    if (!r.src) fuzz_fail("replsrc_open_local: %s", e.msg);
    if (!freopen("/dev/null", "w", stdout)) fuzz_fail("stdout");
    if (repllua_open(&r) < 0) fuzz_fail("repllua_open");
    static const char init[] =
        "append('order-1', 'OrderPlaced', {n = 1}) append('order-2', 'Paid', {}) "
        "append('user-7', 'Seen', {who = 'x'}, {correlation_id = 'c'})";
    if (repllua_eval(&r, init, sizeof init - 1, "=init", 0) != REPLLUA_OK) fuzz_fail("init");
}

/* The prelude's function registered as `name` (repllua.c keeps T.dot and
 * T.complete in the registry for the C side). */
static int call(const char *name, const char *a, const char *b, int nres) {
    lua_State *L = r.L;
    lua_getfield(L, LUA_REGISTRYINDEX, name);
    lua_pushstring(L, a);
    if (b) lua_pushstring(L, b);
    return lua_pcall(L, b ? 2 : 1, nres, 0);
}

static void complete(const char *line) {
    lua_State *L = r.L;
    size_t n = strlen(line), w = n;
    while (w > 0 && !strchr(WORD_BREAK, line[w - 1])) w--;
    int st = call("tm.complete", line, line + w, 1);
    fuzz_assert(st == 0, "completion of '%s' raised: %s", line, lua_tostring(L, -1));
    fuzz_assert(lua_istable(L, -1), "completion of '%s' returned a %s", line, luaL_typename(L, -1));
    int k = (int)lua_objlen(L, -1);
    for (int i = 1; i <= k; i++) {
        lua_rawgeti(L, -1, i);
        fuzz_assert(lua_type(L, -1) == LUA_TSTRING, "completion of '%s': a candidate is a %s",
                    line, luaL_typename(L, -1));
        lua_pop(L, 1);
    }
    lua_settop(L, 0);
}

static int is_dot(const char *line) {
    while (*line == ' ' || *line == '\t') line++;
    return line[0] == '.' && ((line[1] >= 'a' && line[1] <= 'z') || (line[1] >= 'A' && line[1] <= 'Z'));
}

/* A Lua runtime error raised in the prelude's own code: "tidemark:LINE:
 * attempt to ..." or "tidemark:LINE: bad argument ..." (the prelude's
 * chunk is named "=tidemark"; messages meant for the user carry no
 * position, and may quote the user's words). */
static int prelude_bug(const char *m) {
    if (strncmp(m, "tidemark:", 9)) return 0;
    const char *p = m + 9;
    if (*p < '0' || *p > '9') return 0;
    while (*p >= '0' && *p <= '9') p++;
    return !strncmp(p, ": attempt to ", 13) || !strncmp(p, ": bad argument ", 15);
}

static void dot(const char *line) {
    lua_State *L = r.L;
    if (!is_dot(line) || strstr(line, "load")) return;
    if (call("tm.dot", line, NULL, 0) != 0) {
        const char *m = lua_tostring(L, -1);
        fuzz_assert(m, "dot command '%s' raised a non-string error", line);
        fuzz_assert(!prelude_bug(m), "dot command '%s' failed inside the prelude: %s", line, m);
    }
    lua_settop(L, 0);
    r.quit = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!r.L) setup();
    if (size > 4096) return 0;
    char *in = fuzz_copy(data, size);
    call("tm.dot", ".format table", NULL, 0);
    call("tm.dot", ".timing off", NULL, 0);
    lua_settop(r.L, 0);
    char *p = in, *end = in + size;
    for (int i = 0; i < MAX_LINES && p <= end; i++) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = (size_t)((nl ? nl : end) - p);
        char *line = strndup(p, n); /* a NUL ends the line, as in a C string */
        complete(line);
        dot(line);
        free(line);
        if (!nl) break;
        p = nl + 1;
    }
    free(in);
    return 0;
}
