/* sandbox.h — a LuaJIT state for untrusted projection scripts.
 *
 * One sandbox = one lua_State with:
 *   - a memory cap enforced by its allocator (allocation past the cap fails,
 *     LuaJIT raises "not enough memory", the script sees a normal error);
 *   - only a safe library subset in the globals: base (no dofile, loadfile,
 *     getfenv, setfenv; load/loadstring accept source text only; rawset
 *     refuses the globals table; collectgarbage only "count"/"collect"/"step";
 *     print goes to the sandbox's print callback), coroutine, string (no
 *     string.dump), table, math (math.random is a deterministic PRNG that the
 *     host reseeds per event; no math.randomseed), bit, and `tm`.  No io, os,
 *     package, require, debug, ffi, jit.  The JIT compiler is on.
 *   - a CPU watchdog (when cpu_limit > 0): the host brackets work with
 *     sandbox_enter / sandbox_leave; if the running thread spends more than
 *     cpu_limit seconds of CPU inside one bracket, the watchdog sets a count
 *     hook that raises "CPU limit exceeded" (interpreted code, with a Lua
 *     traceback).  A JIT-compiled loop never calls the hook (measured fact,
 *     DESIGN.md), so if the bracket is still open `grace` seconds later the
 *     watchdog calls on_hard_limit on its own thread; the default prints a
 *     line to stderr and _exit(1)s the process.  Hence the rule: a sandbox
 *     with a CPU limit must live in a process that may die (the one-shot CLI
 *     or a projection worker process).
 *   - globals locked by sandbox_lock_globals: afterwards any assignment to a
 *     global raises an error (state belongs in the projection state).
 *
 * Trusted host code (the projection runtime) may get the ffi module with
 * sandbox_push_ffi; it is never reachable from the script's globals.
 * Not thread-safe: one thread drives a sandbox (the watchdog only sets hooks).
 */
#ifndef TM_SANDBOX_H
#define TM_SANDBOX_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"

typedef struct sandbox sandbox;

typedef struct sandbox_opts {
    size_t memory_limit;  /* bytes; 0 = SANDBOX_DEFAULT_MEMORY */
    double cpu_limit;     /* seconds of CPU per enter/leave bracket; 0 = none */
    double grace;         /* seconds after the soft limit before the hard one;
                             0 = max(0.5, min(cpu_limit, 5)) */
    /* Called on the watchdog thread when a bracket overran cpu_limit + grace
     * (a JIT-compiled loop).  NULL = print "CPU limit exceeded" and _exit(1).
     * It must not touch the lua_State (another thread is running it). */
    void (*on_hard_limit)(void *ud, double cpu_limit);
    void *ud;
    /* print() output, one call per print() with the line (no newline).
     * NULL = stderr with a "[lua] " prefix. */
    void (*print)(void *ud, const char *line, size_t len);
    /* 0, or keep the heap grown ahead of use in runs of this many bytes of
     * contiguous address space: for states that grow at the same time in
     * one process (a parallel replay's workers), whose heaps would
     * otherwise interleave in 128 KiB pieces (see sandbox.c). */
    size_t grow_step;
} sandbox_opts;

#define SANDBOX_DEFAULT_MEMORY ((size_t)256 << 20)

sandbox *sandbox_new(const sandbox_opts *opts, tm_err *err);
void sandbox_free(sandbox *sb);
lua_State *sandbox_lua(sandbox *sb);

/* Compile source text (never bytecode) and push the chunk.  Syntax errors
 * come back as TM_EINVAL "FILE:LINE: message" (chunkname = FILE). */
int sandbox_load(sandbox *sb, const char *src, size_t len, const char *chunkname, tm_err *err);

/* lua_pcall with a message handler that appends a traceback; on error the
 * message (with traceback when trace is non-NULL, into *trace) fills err
 * (TM_EINVAL) and the stack is restored to below the function. */
int sandbox_pcall(sandbox *sb, int nargs, int nresults, buf *trace, tm_err *err);

/* Host C code that allocates in the Lua state (encoding a large state,
 * say) run protected: fn(L, ud) sees the nargs values on top of the stack
 * as its indexes 2..nargs+1 (they are consumed).  A Lua error inside (the
 * memory cap) returns -1 with err "memory limit exceeded (N MiB)" or the
 * message (TM_EINVAL) instead of aborting the process; otherwise fn's
 * result.  Pushing the call allocates nothing, so it works at the cap. */
typedef int (*sandbox_fn)(lua_State *L, void *ud);
int sandbox_protect(sandbox *sb, sandbox_fn fn, void *ud, int nargs, tm_err *err);

/* After setup: every later assignment to a global raises an error. */
void sandbox_lock_globals(sandbox *sb);

/* CPU watchdog bracket.  Nested calls are not allowed. */
void sandbox_enter(sandbox *sb);
void sandbox_leave(sandbox *sb);
/* 1 if the last bracket hit the soft CPU limit (the error came from us). */
int sandbox_cpu_exceeded(const sandbox *sb);

/* Bytes currently allocated by the state, and the peak. */
size_t sandbox_memory(const sandbox *sb);
/* 1 if an allocation was refused since the last call (clears the flag). */
int sandbox_take_oom(sandbox *sb);

/* Push the ffi module (trusted host code only). */
void sandbox_push_ffi(sandbox *sb);
/* Push a module LuaJIT preloads but the script never sees ("table.new",
 * "jit.util"), or nil when this LuaJIT has none (trusted host code only). */
void sandbox_push_preloaded(sandbox *sb, const char *name);

/* Reseed math.random (deterministic xorshift; the host seeds per event). */
void sandbox_seed(sandbox *sb, uint64_t seed);

#endif
