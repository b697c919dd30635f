/* replproj.h — projections from the REPL in embedded mode.
 *
 * load(file) runs a projection over history inside the REPL process (in
 * memory: nothing is written to the data directory) and keeps it for
 * status / state / query until the REPL exits; run(file) does the same
 * once and returns the final state.  Projections a server persisted in
 * the directory (proj/NAME/... keys, proj.h) are listed and readable too.
 * Remote mode does all of this over HTTP in the prelude instead.
 */
#ifndef TM_REPLPROJ_H
#define TM_REPLPROJ_H

#include <lua.h>

#include "repl.h"

/* Set T.proj (the table at the top of the stack is T) for an embedded
 * session; nothing for a remote one. */
void replproj_register(lua_State *L, repl *r);
/* Free every projection loaded in this session. */
void replproj_close(void);

#endif
