/* proj_mp.c — loads the projection runtime's msgpack decoder (see proj_mp.h).
 *
 * Owns: the decoder's Lua source (proj_mp.lua, embedded below with
 * .incbin) and building one decode function per Lua state from the
 * sandbox's ffi module and table.new.  Nothing here runs per event.
 */
#include "proj_mp.h"

#include <lauxlib.h>
#include <string.h>

/* The decoder's Lua source, embedded at build time. */
__asm__(".section .rodata\n"
        ".global proj_mp_lua\n"
        ".type proj_mp_lua, @object\n"
        "proj_mp_lua:\n"
        ".incbin \"engine/proj_mp.lua\"\n"
        ".byte 0\n"
        ".previous\n");
extern const char proj_mp_lua[];

int proj_mp_push(sandbox *sb, lua_CFunction ext, unsigned flags, tm_err *err) {
    lua_State *L = sandbox_lua(sb);
    if (luaL_loadbuffer(L, proj_mp_lua, strlen(proj_mp_lua), "=proj_mp") != 0) {
        err_set(err, TM_EIO, "msgpack decoder: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return -1;
    }
    sandbox_push_ffi(sb);
    sandbox_push_preloaded(sb, "table.new");
    if (ext) lua_pushcfunction(L, ext);
    else lua_pushnil(L);
    lua_pushboolean(L, (flags & PROJ_MP_DROP_NAN_KEYS) != 0);
    if (lua_pcall(L, 4, 1, 0) != 0) {
        err_set(err, TM_EIO, "msgpack decoder: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return -1;
    }
    return 0;
}
