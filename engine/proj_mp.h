/* proj_mp.h — the projection runtime's msgpack decoder, as a Lua function.
 *
 * proj_mp.lua decodes validated msgpack straight from C memory through the
 * FFI, written so that LuaJIT compiles it into the calling loop's trace.
 * The projection runtime (proj_rt.lua) decodes event payloads with it; the
 * REPL's scan loop (repl/prelude.lua) uses the same function.
 *
 * The pushed function is decode(p, i) -> value, j: p a `const uint8_t *`
 * cdata over msgpack bytes, i the 0-based offset of one value, j the offset
 * just after it.  Bytes must be validated first (mp_validate; the store's
 * records are): decode does not check lengths, and raises "malformed
 * msgpack in event" on a byte that starts no value.  Maps and arrays become
 * tables, str/bin strings, numbers Lua numbers; see proj_mp.lua for the
 * exact rules.  Values that leave Lua again are encoded by luamp.h.
 */
#ifndef TM_PROJ_MP_H
#define TM_PROJ_MP_H

#include <lua.h>

#include "err.h"
#include "sandbox.h"

/* Map pairs whose key is NaN are dropped (default: storing such a key
 * raises Lua's "table index is NaN", which faults a projection). */
#define PROJ_MP_DROP_NAN_KEYS 1u

/* Push decode for sb's Lua state.  ext(type, payload) is called for
 * msgpack ext values and returns (pushes) their Lua value (NULL: the
 * payload as a string).  0, or -1 with nothing pushed. */
int proj_mp_push(sandbox *sb, lua_CFunction ext, unsigned flags, tm_err *err);

#endif
