/* replmp.c — msgpack <-> Lua for the REPL (see replmp.h).
 *
 * Owns decoding for read(), tail, JSON replies and projection values: one
 * pass over validated bytes with mp_next, tables preallocated; and the
 * encoding of Lua values for append() and JSON output.  Recursion
 * depth is bounded (64, the store's own limit) so hostile nesting cannot
 * exhaust the C stack.
 */
#include "replmp.h"

#include <lauxlib.h>
#include <math.h>
#include <msgpack.h>
#include <string.h>

#define MAXDEPTH 64

static int push_value(lua_State *L, const char **p, const char *end, int depth) {
    mp_item it;
    if (depth > MAXDEPTH || mp_next(p, end, &it) < 0) return -1;
    switch (it.type) {
    case MP_NIL: lua_pushnil(L); break;
    case MP_BOOL: lua_pushboolean(L, it.v.b); break;
    case MP_UINT: lua_pushnumber(L, (lua_Number)it.v.u); break;
    case MP_INT: lua_pushnumber(L, (lua_Number)it.v.i); break;
    case MP_FLOAT:
    case MP_DOUBLE: lua_pushnumber(L, it.v.d); break;
    case MP_STR:
    case MP_BIN:
    case MP_EXT: lua_pushlstring(L, it.v.s.ptr, it.v.s.len); break;
    case MP_ARRAY:
        lua_createtable(L, (int)(it.v.n < 1u << 20 ? it.v.n : 0), 0);
        for (uint32_t i = 0; i < it.v.n; i++) {
            if (push_value(L, p, end, depth + 1) < 0) return lua_pop(L, 1), -1;
            lua_rawseti(L, -2, (int)i + 1);
        }
        break;
    case MP_MAP:
        lua_createtable(L, 0, (int)(it.v.n < 1u << 20 ? it.v.n : 0));
        for (uint32_t i = 0; i < it.v.n; i++) {
            if (push_value(L, p, end, depth + 1) < 0) return lua_pop(L, 1), -1;
            if (push_value(L, p, end, depth + 1) < 0) return lua_pop(L, 2), -1;
            if (lua_isnil(L, -2) || lua_isnil(L, -1) ||
                (lua_type(L, -2) == LUA_TNUMBER && isnan(lua_tonumber(L, -2)))) {
                lua_pop(L, 2);
                continue;
            }
            lua_rawset(L, -3);
        }
        break;
    }
    return 0;
}

int replmp_push(lua_State *L, const char **p, const char *end) {
    luaL_checkstack(L, MAXDEPTH * 2 + 8, "msgpack value too deep");
    return push_value(L, p, end, 0);
}

#define SETS(k, s, n) (lua_pushlstring(L, (s), (n)), lua_setfield(L, -2, k))
#define SETN(k, v) (lua_pushnumber(L, (lua_Number)(v)), lua_setfield(L, -2, k))

int replmp_push_event(lua_State *L, const tm_event *ev) {
    char id[37];
    luaL_checkstack(L, MAXDEPTH * 2 + 8, "msgpack value too deep");
    lua_createtable(L, 0, 8);
    event_id_format(ev->id, id);
    SETS("id", id, 36);
    SETS("stream", ev->stream, ev->stream_len);
    SETS("type", ev->type, ev->type_len);
    SETN("time", ev->time_ms);
    SETN("position", ev->position);
    SETN("version", ev->version);
    const char *p = ev->data;
    if (ev->data_len) {
        if (push_value(L, &p, ev->data + ev->data_len, 0) < 0) return lua_pop(L, 1), -1;
    } else {
        lua_pushnil(L);
    }
    lua_setfield(L, -2, "data");
    p = ev->meta;
    if (ev->meta_len) {
        if (push_value(L, &p, ev->meta + ev->meta_len, 0) < 0) return lua_pop(L, 1), -1;
    } else {
        lua_createtable(L, 0, 0);
    }
    lua_setfield(L, -2, "metadata");
    return 0;
}

/* ---- Lua -> msgpack ---- */

static int buf_write(void *data, const char *p, size_t n) {
    buf_append((buf *)data, p, n);
    return 0;
}

/* 1..n array length of the table at idx, or -1 when it is not a sequence. */
static long seq_len(lua_State *L, int idx) {
    long n = 0, max = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER) return lua_pop(L, 1), -1;
        double d = lua_tonumber(L, -1);
        if (d < 1 || d != floor(d)) return lua_pop(L, 1), -1;
        if (d > max) max = (long)d;
        n++;
    }
    return max == n ? n : -1;
}

static int pack(lua_State *L, int idx, msgpack_packer *pk, int depth) {
    if (depth > MAXDEPTH) return -1;
    if (idx < 0) idx = lua_gettop(L) + idx + 1;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: return msgpack_pack_nil(pk), 0;
    case LUA_TBOOLEAN:
        return lua_toboolean(L, idx) ? msgpack_pack_true(pk) : msgpack_pack_false(pk), 0;
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        if (d == floor(d) && d >= -9.2e18 && d <= 9.2e18) msgpack_pack_int64(pk, (int64_t)d);
        else msgpack_pack_double(pk, d);
        return 0;
    }
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        msgpack_pack_str(pk, n);
        msgpack_pack_str_body(pk, s, n);
        return 0;
    }
    case LUA_TTABLE: {
        luaL_checkstack(L, 4, NULL);
        long n = seq_len(L, idx);
        if (n > 0) {
            msgpack_pack_array(pk, (size_t)n);
            for (long i = 1; i <= n; i++) {
                lua_rawgeti(L, idx, (int)i);
                int r = pack(L, -1, pk, depth + 1);
                lua_pop(L, 1);
                if (r < 0) return -1;
            }
            return 0;
        }
        size_t cnt = 0;
        lua_pushnil(L);
        while (lua_next(L, idx)) lua_pop(L, 1), cnt++;
        msgpack_pack_map(pk, cnt);
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            if (pack(L, -2, pk, depth + 1) < 0 || pack(L, -1, pk, depth + 1) < 0)
                return lua_pop(L, 2), -1;
            lua_pop(L, 1);
        }
        return 0;
    }
    default: return -1;
    }
}

int replmp_from_lua(lua_State *L, int idx, buf *out) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, out, buf_write);
    return pack(L, idx, &pk, 0);
}
