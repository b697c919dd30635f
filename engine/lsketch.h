/* lsketch.h — the analytics library's Lua face (sketches and windows).
 *
 * luaopen_tidemark_sketch pushes a table (installed as the global `tm`
 * fields in the sandbox: tm.hll(), tm.quantiles(), tm.topk(k),
 * tm.window.tumbling{...}, ...).  Each sketch is a full userdata whose
 * metatable has __index methods and the integer field `__tm_ext`: its
 * msgpack ext type.  That is how state encoding stores sketches:
 *   encode: lsketch_is_sketch() -> ext type + lsketch_serialize() bytes
 *   decode: msgpack ext (type, bytes) -> lsketch_push_decoded()
 * Serialised bytes are deterministic (same sketch -> same bytes) and
 * versioned; decode validates them (they may come from a corrupt disk).
 */
#ifndef TM_LSKETCH_H
#define TM_LSKETCH_H

#include <lua.h>

#include "buf.h"

enum { LSKETCH_EXT_HLL = 1, LSKETCH_EXT_QUANTILES = 2, LSKETCH_EXT_TOPK = 3,
       LSKETCH_EXT_WINDOW = 4 };

int luaopen_tidemark_sketch(lua_State *L);
/* ext type of the sketch at idx, or 0 if the value is not one of ours. */
int lsketch_ext_type(lua_State *L, int idx);
/* Append the serialised bytes of the sketch at idx to out; 0 / -1. */
int lsketch_serialize(lua_State *L, int idx, buf *out);
/* Push the sketch decoded from (type, p, n); 0, or -1 with nothing pushed
 * when the bytes are invalid. */
int lsketch_push_decoded(lua_State *L, int ext_type, const char *p, size_t n);

#endif
