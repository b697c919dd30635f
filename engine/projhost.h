/* projhost.h — running a projection in a worker process (crash isolation).
 *
 * A count hook cannot stop a JIT-compiled loop and a crash in a script's
 * C call takes its process down, so long-running hosts (the server) never
 * run projection Lua in their own process.  projhost starts a worker
 * (fork, then exec of `tidemark __proj-worker` when an executable is
 * given), which owns the sandbox and the proj instance; the host owns the
 * store.  They speak a framed protocol over two pipes:
 *
 *   frame = u32 little-endian length of (kind + payload), kind (1 byte), payload
 *
 *   host -> worker                     worker -> host
 *   'I' init {name,file,source,        'O' ready {position,events,from,names,
 *                                           checkpoint_every,checkpoint_ms}
 *        memory,cpu}                   'E' error {code,message}
 *   'B' batch: (u64 pos, u32 len,      'A' applied {position,events,uncommitted}
 *        record)*                      'R' replay from {position} (dead letter)
 *                                      'F' fault {position,type,message,traceback}
 *   'C' checkpoint                     'K' {kv:[[k,v]..], emits:[[stream,type,
 *                                           data,meta,id]..]}
 *   'D' checkpoint committed           'A'
 *   'c' checkpoint, done at once       'K' (as for 'C'; no 'D' follows)
 *   'S' state, 'Q' query {name,args}   'V' value (msgpack bytes) or 'E'
 *   'P' built-in read {op,key,to,n}    'V' or 'E'
 *   (answers to the worker's reads)    'g' get {key}  's' scan {prefix}
 *   'v' [found, bytes], 'w' [[k,v]..]  'r' record {position}
 * Payloads are msgpack maps unless noted (B is raw).
 *
 * The host commits each checkpoint itself: emitted events are appended
 * first (idempotent ids), then the key/values in one store_batch_commit, so
 * state and position stay atomic.  With 'c' the worker counts the
 * checkpoint done when it answers, and the host commits it in the
 * background; a failed commit kills the worker, whose restart resumes
 * from the stored checkpoint, so the worker's optimism never shows.  A worker that does not answer a batch
 * within cpu_limit + grace + a margin is SIGKILLed; a worker that dies
 * (CPU hard limit, crash) leaves the projection FAULTED with the reason
 * (its last stderr line) and the host process unharmed.
 */
#ifndef TM_PROJHOST_H
#define TM_PROJHOST_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"
#include "event.h"
#include "store.h"

typedef struct projhost projhost;

typedef struct projhost_opts {
    size_t memory_limit;   /* bytes; 0 = default */
    double cpu_limit;      /* seconds per batch; 0 = 10 */
    double timeout;        /* seconds to wait for an answer; 0 = cpu_limit * 2 + 5 */
    const char *exe;       /* exec this binary with "__proj-worker"; NULL = fork only */
    unsigned batch;        /* events per batch frame; 0 = 512 */
    /* Keep the state under proj/STORE_NAME/ instead of proj/NAME/ (the
     * worker still runs as NAME: emitted ids derive from NAME); the host
     * translates the keys of every read and checkpoint.  NULL = NAME. */
    const char *store_name;
    int suppress_emits;    /* drop emitted events at checkpoints (counted) */
    /* Called on the committer thread when a background checkpoint
     * (projhost_checkpoint_async) has landed or failed, so that the owner
     * calls projhost_settle soon; it must not wait for the owner's locks. */
    void (*on_commit)(void *ud);
    void *on_commit_ud;
    /* Feed only the events `owns` returns 1 for (one shard of a version
     * built on several workers; the others are read and skipped); NULL =
     * every event.  The position then covers the events fed: a shard's
     * checkpoint is at its own last event. */
    int (*owns)(void *ud, const tm_event *ev);
    void *owns_ud;
} projhost_opts;

typedef enum projhost_state {
    PROJHOST_RUNNING, PROJHOST_FAULTED, PROJHOST_DEAD
} projhost_state;

typedef struct projhost_status {
    projhost_state state;
    uint64_t position, events;  /* applied by the worker (live, maybe uncommitted) */
    uint64_t checkpoint_position; /* position of the last committed checkpoint */
    uint64_t checkpoint_every;    /* the script's options; 0 = not set */
    uint64_t checkpoint_ms;
    int partitioned;              /* the script has a partition function */
    int dead_letter;              /* on_error = "dead_letter" */
    uint64_t fault_position;
    char fault_type[257];
    char message[512];
    char *traceback;       /* owned by the host; may be NULL */
} projhost_status;

/* Start a worker for the projection (restores from the store's checkpoint). */
projhost *projhost_start(store *s, const char *name, const char *src, size_t len,
                         const char *file, const projhost_opts *o, tm_err *err);
/* Feed every event after the position (at most max_events when it is not
 * 0) without committing: the worker's live state covers them at once, the
 * store only at the next checkpoint.  Checkpoints inside only when
 * `checkpoint_every` events (script option; default 100000) are
 * uncommitted; a dead letter's replay (PROJ_REPLAY) is handled inside.
 * 0 = fed up to the end of the store, PROJHOST_MORE = stopped after
 * max_events (call again), -1 with err (and status FAULTED / DEAD when the
 * projection failed). */
#define PROJHOST_MORE 2
int projhost_feed(projhost *h, uint64_t max_events, tm_err *err);
/* Events applied since the last committed checkpoint. */
uint64_t projhost_uncommitted(const projhost *h);
/* projhost_feed up to the end, then a checkpoint: 0 ok, -1 with err. */
int projhost_catch_up(projhost *h, tm_err *err);
/* Commit a checkpoint now (emitted events first, then state + position in
 * one store batch).  0 ok, PROJ_REPLAY (a dead letter surfaced: call
 * projhost_feed again), -1 with err. */
int projhost_checkpoint(projhost *h, tm_err *err);
/* Start a checkpoint and go on: the worker counts it committed at once,
 * and the host commits it on its own thread while feeding continues (the
 * fsync is off the feeding path).  At most one is in flight: the next
 * checkpoint, projhost_checkpoint and projhost_free wait for it first.  If
 * its commit fails the worker is killed (DEAD, "checkpoint commit
 * failed"), as when projhost_checkpoint's does, and a restart resumes from
 * the last stored checkpoint.  A checkpoint with emitted events is
 * committed before returning (events, then state).  0, PROJ_REPLAY, -1. */
int projhost_checkpoint_async(projhost *h, tm_err *err);
/* Wait until the checkpoint in flight (if any) is stored or has failed. */
void projhost_wait_commit(projhost *h);
/* Take a finished background checkpoint into the status (its position, or
 * DEAD when its commit failed); every other call does it too. */
void projhost_settle(projhost *h);
/* The model (msgpack) / a named query's result (args msgpack or NULL). */
int projhost_state_mp(projhost *h, buf *out, tm_err *err);
int projhost_query(projhost *h, const char *name, const char *args, size_t alen, buf *out,
                   tm_err *err);
/* Built-in reads (proj.h): op "get" (a = key), "partitions", "top"
 * (a = field, n), "range" (a = from, b = to, either NULL = open; n = limit),
 * "prefix" (a = prefix, n = limit). */
int projhost_read(projhost *h, const char *op, const char *a, const char *b, uint64_t n,
                  buf *out, tm_err *err);
/* One partition's live state (msgpack appended to out): 1 found, 0 no such
 * partition (never created by asking), -1 with err. */
int projhost_partition(projhost *h, const char *key, size_t klen, buf *out, tm_err *err);
/* n partitions in one round trip: a msgpack array of n live states (nil =
 * no such partition) appended to out.  0, or -1 with err. */
int projhost_partitions(projhost *h, const char *const *keys, const size_t *klens, size_t n,
                        buf *out, tm_err *err);
const projhost_status *projhost_get_status(const projhost *h);
/* Like projhost_feed (no event bound) but only events with position <= until. */
int projhost_feed_until(projhost *h, uint64_t until, tm_err *err);
/* Change where the state is kept (NULL = proj/NAME/) / the emit gate. */
void projhost_set_store_name(projhost *h, const char *store_name);
void projhost_set_suppress_emits(projhost *h, int on);
uint64_t projhost_emits_suppressed(const projhost *h);
/* Stop the worker (SIGKILL if it does not exit on EOF) and free. */
void projhost_free(projhost *h);

/* The worker's main: frames on fd 0 in, fd 1 out.  Returns the exit status. */
int projhost_worker_main(int argc, char **argv);

#endif
