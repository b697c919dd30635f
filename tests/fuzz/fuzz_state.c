/* fuzz_state.c — libFuzzer target: decoding projection state (luamp.h,
 * lsketch.h), the bytes a projection reads back from disk at restore.
 *
 * Properties, for any bytes:
 *   - mp_validate then luamp_push never crash, never read outside the input
 *     (sketch ext values go through lsketch_push_decoded, which validates);
 *   - a decoded value re-encodes (luamp_encode), and decoding that encoding
 *     and encoding again gives the same bytes (the encoding is canonical:
 *     rebuilds are byte-identical).
 */
#include "fuzz_common.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "buf.h"
#include "err.h"
#include "lsketch.h"
#include "luamp.h"
#include "mp.h"

static lua_State *L;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!L) {
        L = luaL_newstate();
        luaL_openlibs(L);
        luaopen_tidemark_sketch(L);
        lua_setglobal(L, "tm");
    }
    char *p = fuzz_copy(data, size);
    tm_err e;
    err_clear(&e);
    if (mp_validate(p, size, NULL, &e) == 0 && luamp_push(L, p, size, &e) == 0) {
        buf a = BUF_INIT, b = BUF_INIT;
        if (luamp_encode(L, -1, "state", &a, &e) == 0) {
            lua_settop(L, 0);
            if (luamp_push(L, a.ptr, a.len, &e) != 0) {
                fprintf(stderr, "re-decoding our own encoding failed: %s\n", e.msg);
                abort();
            }
            if (luamp_encode(L, -1, "state", &b, &e) != 0 || a.len != b.len ||
                memcmp(a.ptr, b.ptr, a.len) != 0) {
                fprintf(stderr, "state encoding is not canonical\n");
                abort();
            }
        }
        buf_free(&a);
        buf_free(&b);
    }
    lua_settop(L, 0);
    lua_gc(L, LUA_GCSTEP, 0);
    free(p);
    return 0;
}
