/* repl.h — the REPL session shared by the repl/ modules.
 *
 *   repl.c       cli_repl: options, modes (-e, -f, stdin, interactive), the loop
 *   repllua.c    the Lua state (sandbox.h), built-in C functions, the scan
 *                loop, evaluation, Ctrl-C handling, the prelude (prelude.lua:
 *                printing, queries, built-ins, dot commands, completion)
 *   replscan.c   the batched scan behind queries, reads, lazy event fields
 *   replpar.c    aggregate queries on every core (worker Lua states, one
 *                range of positions each, partial states merged)
 *   replproj.c   projections in embedded mode (proj.h)
 *   replline.c   line editing with libedit: history file, completion
 *   replsrc.c    the event source (embedded store or remote server)
 *   replhttp.c   the HTTP client for remote mode
 * msgpack <-> Lua values are engine/luamp.h's (LUAMP_RAW_EXT for events,
 * LUAMP_NAN for JSON and appends); scans decode with engine/proj_mp.h.
 *
 * One session per process.  The struct is a plain value owned by cli_repl.
 */
#ifndef TM_REPL_H
#define TM_REPL_H

#include <signal.h>

#include <lua.h>

#include "replsrc.h"
#include "sandbox.h"

typedef struct repl {
    replsrc *src;       /* where events come from (never NULL while running) */
    lua_State *L;       /* the session's Lua state (replaced after a hard abort) */
    sandbox *sb;        /* owns L */
    double cpu_limit;   /* CPU seconds per command, 0 = none */
    int interactive;    /* reading lines from a terminal with a prompt */
    int progress;       /* draw progress bars on stderr (stderr is a terminal) */
    int fail_code;      /* exit status of the last failure (1 = Lua error) */
    int quit;           /* .quit was asked */
    int workers;        /* --workers: query workers, 0 = one per core (auto) */
    int ran_workers;    /* workers the last query ran on (0 = serial), for .timing */
} repl;

typedef enum repllua_result {
    REPLLUA_OK = 0,
    REPLLUA_INCOMPLETE = 1,   /* the chunk needs more lines */
    REPLLUA_ERROR = 2,        /* printed; r->fail_code says the exit status */
} repllua_result;

/* Create the Lua state and run the prelude.  0 / -1 (message printed). */
/* The error a query worker's state raises where the query cannot run
 * there (the prelude's T.PAR_FALLBACK): the REPL runs it serially. */
#define REPLPAR_FALLBACK "\0serial"
/* A query worker's state (replpar.c): the sandbox with the prelude but
 * none of the REPL's I/O; unknown globals raise REPLPAR_FALLBACK. */
sandbox *repllua_open_worker(repl *r, void (*on_hard_limit)(void *, double), void *ud,
                             tm_err *err);
int repllua_open(repl *r);
void repllua_close(repl *r);
/* Evaluate a chunk: first as an expression ("return " .. code), then as
 * statements; print the results in the current format.  With
 * allow_incomplete, a chunk that ends too early returns INCOMPLETE and
 * prints nothing.  Ctrl-C interrupts it. */
repllua_result repllua_eval(repl *r, const char *code, size_t len, const char *chunkname,
                            int allow_incomplete);
/* Run a dot command line (".help", ".format json" ...). */
repllua_result repllua_dot(repl *r, const char *line);
/* Names for completion of `word` (a Lua expression prefix like "string.fo"
 * or a dot command line): calls fn for each candidate full replacement. */
void repllua_complete(repl *r, const char *line, const char *word,
                      void (*fn)(void *ud, const char *cand), void *ud);

/* For modules adding C built-ins to the prelude's table T (repllua.c);
 * their upvalue 1 is the session (a light userdata). */
repl *repllua_session(lua_State *L);
/* Raise a Lua error for e and remember its exit status. */
int repllua_raise(lua_State *L, repl *r, const tm_err *e);
/* Push the Lua value of JSON text (a server's reply: untrusted); -1 with
 * nothing pushed and e set when it is not JSON or nests too deep. */
int repllua_push_json(lua_State *L, const char *text, size_t len, tm_err *e);
/* Raise the plain "interrupted" error. */
int repllua_interrupted(lua_State *L);
/* Message handler: the message plus a short traceback. */
int repllua_traceback(lua_State *L);

/* replscan.c: T.scan, T.read, T.extra into the table at the top of the
 * stack; T.types filled with the session's interned type names. */
void replscan_register(lua_State *L, repl *r);
void replscan_publish_types(lua_State *L, int types_idx);

/* The batched scan behind queries (replscan.c), shared with the parallel
 * scan (replpar.c).  Interned event type names: a batch carries each
 * event's type as an index into the scanning state's T.types; one table
 * per Lua state that scans (NULL: the session's). */
typedef struct replscan_types replscan_types;
replscan_types *replscan_types_new(void);
void replscan_types_free(replscan_types *t);
typedef struct replscan_opts {
    const char *label;       /* progress bar on stderr when interactive; NULL = none */
    uint64_t from, to;       /* narrow to positions from..to (0 = the selector's / the end) */
    replscan_types *types;   /* NULL = the session's */
    uint64_t *at;            /* the position reached, stored as the scan goes (atomic) */
    const int *stop;         /* ends the scan between batches once set (atomic); may be NULL */
    volatile sig_atomic_t *in_lua; /* 1 while a batch runs in Lua; may be NULL */
} replscan_opts;
enum { REPLSCAN_DONE = 0, REPLSCAN_ELUA = -1, REPLSCAN_EINTR = -2, REPLSCAN_EREAD = -3 };
/* Run handler (stack index) over the selector table at sel_idx (the
 * prelude's selector), batch by batch through the prelude's runner.
 * Returns REPLSCAN_* (ELUA: the error, with its traceback, is on the
 * stack; EREAD: e set); *count = events selected.  Leaves values on the
 * stack.  Call it from a C function whose upvalue 1 is the session
 * (repllua_session). */
int replscan_run(lua_State *L, int sel_idx, int handler, const replscan_opts *o,
                 uint64_t *count, tm_err *e);

/* Ctrl-C: 1 while an interrupt is pending (polled by long C loops). */
int repl_cancel_requested(void);
void repl_cancel_clear(void);
/* The flag itself, for C loops that take one (replay_opts.cancel). */
volatile sig_atomic_t *repl_cancel_flag(void);
/* Around C work that owns threads or resources (a parallel run): a second
 * Ctrl-C must not jump out of it (it would leave them behind), only the
 * first one's cancel counts.  repl_jump_hold returns what to pass back. */
int repl_jump_hold(void);
void repl_jump_release(int held);
/* Called (in the SIGINT handler: async-signal-safe code only) for a
 * second Ctrl-C within 2 s while the jump is held; NULL = none. */
void repl_set_abort(void (*fn)(void));

/* replpar.c: T.pscan, ad-hoc queries on every core (embedded mode). */
void replpar_register(lua_State *L, repl *r);
void replpar_close(void);

/* replline.c — the prompt (line editing) when r->interactive, else lines
 * from a pipe; returns the exit status. */
int replline_run(repl *r);

#endif
