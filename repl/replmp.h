/* replmp.h — msgpack values and events as Lua values, for the REPL.
 *
 * read() returns events as Lua tables of the shape projections see:
 *   { id = "uuid", stream = "...", type = "...", data = <value>,
 *     metadata = <table>, time = ms, position = N, version = N }
 * Maps become tables (string or number keys; nil values are dropped),
 * arrays become 1-based sequences, bin/ext become strings.  Input bytes
 * must already be validated (store records are; remote bodies are
 * validated by the caller).
 */
#ifndef TM_REPLMP_H
#define TM_REPLMP_H

#include <lua.h>
#include <stddef.h>

#include "buf.h"
#include "event.h"

/* Push the msgpack value at [p, end) and advance *p; -1 (nothing pushed)
 * on malformed bytes or nesting deeper than 64. */
int replmp_push(lua_State *L, const char **p, const char *end);
/* Push the event as a table (see above), every field set; -1 on
 * malformed data.  (Scans build their lazier tables in the prelude.) */
int replmp_push_event(lua_State *L, const tm_event *ev);
/* Append the value at idx as msgpack (tables with 1..n keys are arrays,
 * other tables maps; functions and userdata are errors).  0 / -1. */
int replmp_from_lua(lua_State *L, int idx, buf *out);

#endif
