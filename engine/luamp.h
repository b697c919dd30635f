/* luamp.h — msgpack <-> Lua values (projection state, query results, events).
 *
 * Encoding is deterministic: the same Lua value always gives the same
 * bytes, whatever the table insertion history or pairs() order:
 *   - a table whose keys are exactly 1..n (n >= 1) is an array;
 *   - any other table (including the empty table) is a map whose keys are
 *     sorted: numbers first (ascending), then strings (bytewise), then
 *     false, true;
 *   - an integer-valued number in int64 range is a msgpack integer (in its
 *     smallest form); other numbers are float64; NaN is refused
 *     (LUAMP_NAN: float64 NaN, for the REPL's JSON and appends);
 *   - strings are msgpack str; booleans and nil as such;
 *   - a sketch userdata (lsketch.h) is msgpack ext of its type with
 *     lsketch_serialize bytes; other userdata, functions, threads and
 *     cyclic or over-deep (LUAMP_MAX_DEPTH) tables are errors naming the
 *     path ("state.a.b[3]: cannot store a function").
 *   - tables carrying a metatable field __tm_materialize (lazy event
 *     tables) are materialised by calling it before encoding.
 * Decoding pushes plain Lua values: maps and arrays become tables, bin
 * becomes a string, ext becomes a sketch (lsketch_push_decoded) or an
 * error (LUAMP_RAW_EXT: its payload string, the REPL's view of events),
 * integers beyond 2^53 lose precision (Lua numbers are doubles); map
 * pairs with a nil or NaN key are dropped.
 */
#ifndef TM_LUAMP_H
#define TM_LUAMP_H

#include <lua.h>
#include <stddef.h>

#include "buf.h"
#include "err.h"
#include "event.h"

#define LUAMP_MAX_DEPTH 64

/* Options of the *_opt variants; 0 is what the plain functions do (and
 * what projections use). */
#define LUAMP_NAN     1u /* encode: a NaN number (not a key) is float64 NaN
                            instead of an error */
#define LUAMP_RAW_EXT 2u /* decode: every ext value becomes its payload as a
                            string (never a sketch, never an error) */

/* Append the msgpack of the value at idx to out.  `what` names the root in
 * error paths ("state").  On error out may hold a partial value: the
 * caller truncates it (out->len is restored by this function). */
int luamp_encode(lua_State *L, int idx, const char *what, buf *out, tm_err *err);
int luamp_encode_opt(lua_State *L, int idx, const char *what, unsigned flags, buf *out,
                     tm_err *err);

/* Push the Lua value of the msgpack value at [p, p+n) (one whole value,
 * validated by the caller or trusted).  -1 with nothing pushed on error. */
int luamp_push(lua_State *L, const char *p, size_t n, tm_err *err);
int luamp_push_opt(lua_State *L, const char *p, size_t n, unsigned flags, tm_err *err);

/* Push the full event table {id=, stream=, type=, data=, metadata=, time=,
 * position=, version=, category=} (the slow path: REPL, queries, tests;
 * the projection replay path builds events in its own batch runtime). */
int luamp_push_event(lua_State *L, const tm_event *ev, tm_err *err);
int luamp_push_event_opt(lua_State *L, const tm_event *ev, unsigned flags, tm_err *err);

#endif
