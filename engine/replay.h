/* replay.h — re-projection of history on every core.
 *
 * A replay runs one projection script from position 0 (or from its own
 * checkpoint, when resuming) over every stored event it selects:
 *   - one reader (the calling thread) reads and decodes each record once
 *     (the narrowest store read for the projection's `from`, or a scan of
 *     the log when that category or type holds 4/5 of it), works out the
 *     partition key in C and hands the decoded event to the worker that
 *     owns hash(key) (chunks of events through bounded queues);
 *   - N workers, each a thread with its own projection instance (its own
 *     lua_State), run the handlers of their partitions in position order.
 * Partitions are disjoint, so the read model is the union of the workers'
 * states, merged in the order luamp.h encodes maps: the result is
 * byte-identical to one projection fed every event (`tidemark project`).
 *
 * Routing.  The router recognises `partition = "stream"` and functions of
 * the forms `function(e) return e.stream | e.category | e.type |
 * e.data.a.b... end` (e.data["a"] too) in the script's source.  Whatever
 * it computes is only a guess: every worker still runs the real
 * partition(), and each worker's partition keys must hash to that worker
 * (checked on every state written at a barrier, and on the whole result at
 * the end); if one does not (a wrong guess), the replay is redone on one
 * worker and says so.  A fault under a guessed route is confirmed the same
 * way (a misrouted event would see a wrong state).  Projections without `partition`, with a partition
 * function the router does not recognise, or with on_error = "dead_letter"
 * run on one worker (the reader feeds it inline); replay_describe says why.
 *
 * Persisting (opts.persist).  The new read model is built apart, under
 * the staging prefix ("replay/NAME/"), while proj/NAME/ keeps its old
 * state:
 *   STAGE meta          {position=, workers=, events=, source=} global checkpoint
 *   STAGE w/J/cp        worker J's projection checkpoint
 *   STAGE s/KEY         partition states (each written by its owner)
 *   STAGE dl/POS        dead letters
 * Every `checkpoint_every` events the reader sends a barrier at position P
 * to every worker; each writes its dirty states and checkpoint into its own
 * buffer and waits; the reader commits all of them plus `meta` = P in ONE
 * store batch, then lets the workers go on.  So meta P is written only
 * when every worker has checkpointed up to P, atomically: a replay
 * interrupted anywhere (cancel, crash, kill -9) resumes from P with each
 * worker's state exactly at P.  When the replay reaches the end of the log
 * it swaps the result in: one batch deletes every proj/NAME/ key, writes the staged
 * states, dead letters and the combined checkpoint there, and deletes the
 * staging meta; then the rest of the staging keys are dropped.  Readers of
 * proj/NAME/ see the old model or the new one, never a mix.
 *
 * Emitted events (tm.emit) are suppressed while replaying (counted, not
 * appended) unless the script sets `emit_during_rebuild = true` and the
 * replay persists; then they are appended idempotently at each barrier.
 *
 * Threads: replay_run drives the workers and returns after joining them;
 * the read functions are called after replay_run, from one thread.
 */
#ifndef TM_REPLAY_H
#define TM_REPLAY_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "buf.h"
#include "err.h"
#include "json.h"
#include "proj.h"
#include "store.h"

typedef struct replay replay;

typedef struct replay_opts {
    unsigned workers;        /* 0 = online CPUs; capped at 64 */
    int persist;             /* stage, checkpoint, swap into proj/NAME/ at the end */
    int resume;              /* with persist: continue from the staging checkpoint */
    size_t memory_limit;     /* per worker Lua state, bytes; 0 = proj default */
    double cpu_limit;        /* seconds per batch, 0 = none (proj_opts) */
    uint64_t checkpoint_every; /* events between barriers; 0 = script's or 500000 */
    /* Non-zero stops the replay (checkpointing first when persisting);
     * may be set from a signal handler. */
    volatile sig_atomic_t *cancel;
    FILE *progress;          /* progress line (rate, ETA); NULL = none */
} replay_opts;

/* Load the script once per worker.  name: the projection's name (keys,
 * emitted ids, messages).  TM_EINVAL for a bad script or name. */
replay *replay_new(store *s, const char *name, const char *src, size_t len,
                   const char *filename, const replay_opts *opts, tm_err *err);
void replay_free(replay *r);
/* For a process that exits next: replay_free, except that the workers'
 * Lua states are left for the OS to reclaim at once (closing the states
 * of 1M partitions takes ~0.3 s).  Under a sanitizer it is replay_free,
 * so leak checks still see everything. */
void replay_free_at_exit(replay *r);

#define REPLAY_CANCELLED 2
/* Run to the end of the log.  0 done (persisted: swapped in);
 * REPLAY_CANCELLED stopped by opts.cancel (persisted: checkpointed, resume
 * with opts.resume); -1 error or projection fault (err; replay_fault).
 * TM_ENOTFOUND when resume finds no unfinished replay; TM_EINVAL when the
 * staged replay was made from another source text. */
int replay_run(replay *r, tm_err *err);

/* How the replay runs: "2 workers, routed by data.customer" or
 * "1 worker: the projection has no partition".  Valid after replay_new. */
const char *replay_describe(const replay *r);
unsigned replay_workers(const replay *r);
/* After a run. */
uint64_t replay_position(const replay *r);   /* last position covered */
uint64_t replay_events(const replay *r);     /* events handled (all workers) */
uint64_t replay_emits_suppressed(const replay *r);
/* The fault that stopped the run (the lowest position), NULL if none. */
const proj_fault *replay_fault(const replay *r);

/* Reading the result: the same msgpack as the proj_* functions of one
 * projection fed every event. */
int replay_state(replay *r, buf *out, tm_err *err);
/* A partitioned model's pairs written into w (json.h), in key order: the
 * bytes cli_print_json prints for the whole map.  With several workers,
 * each worker's pairs are transcoded in a thread of their own and the runs
 * merged.  -1 with err: a state that does not transcode. */
int replay_json_pairs(replay *r, json_objw *w, tm_err *err);
int replay_partitioned(const replay *r);
int replay_get(replay *r, const char *key, size_t klen, buf *out, tm_err *err);
int replay_partitions(replay *r, buf *out, tm_err *err);
int replay_top(replay *r, const char *field, uint64_t n, buf *out, tm_err *err);
int replay_query(replay *r, const char *name, const char *args, size_t alen, buf *out,
                 tm_err *err);

/* The worker owning a partition key among n (exposed for tests). */
unsigned replay_shard(const char *key, size_t len, unsigned n);

/* ---- the router alone (the server's version builds split by it too) ----
 * The partition form recognised in a projection's source, read as tokens
 * (nothing runs): NULL when partition is not a form the router knows, or
 * when the script needs its events in one order (on_error =
 * "dead_letter") or emits while rebuilding (emit_during_rebuild = true).
 * A guess: the owner of every stored key must be checked afterwards
 * (replay_shard of the key). */
typedef struct replay_router replay_router;
replay_router *replay_router_new(const char *src, size_t len);
/* The worker among n that the guessed partition key of ev belongs to
 * (worker 0 when the event has no such key). */
unsigned replay_router_shard(const replay_router *rt, const tm_event *ev, unsigned n);
void replay_router_free(replay_router *rt);

#endif
