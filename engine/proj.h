/* proj.h — one projection instance: a Lua script run over events.
 *
 * A projection is a sandboxed Lua state (sandbox.h) holding the script's
 * definition and one state per partition.  Events are fed in position
 * order (proj_feed); they are buffered and run in batches by the Lua
 * runtime (proj_rt.lua).  States live in Lua and are NOT serialised per
 * event: the partitions a batch touched are marked dirty, and
 * proj_checkpoint encodes exactly those (deterministic msgpack, luamp.h)
 * plus the checkpoint record into one store_batch, so state and position
 * commit atomically.
 *
 * Keys in the store's projection namespace (NAME = projection name):
 *   proj/NAME/cp            msgpack map {position=, events=, dead_letters=}
 *   proj/NAME/s/KEY         msgpack state of partition KEY ("" = unpartitioned)
 *   proj/NAME/dl/POS        dead letter: {position=, type=, error=} (POS: 20 digits)
 *
 * Faults: a runtime error (or CPU / memory limit) in partition() or a
 * handler stops the batch.  Every partition dirtied since the last
 * checkpoint is discarded (its last checkpointed version is reloaded on
 * demand), as are events emitted since then, and proj_position() goes back
 * to the checkpoint: nothing half-applied survives.  With on_error =
 * "fault" (default) the projection is faulted (proj_fault); with
 * "dead_letter" the event is recorded as a dead letter and proj_feed
 * returns PROJ_REPLAY: the caller re-feeds events from proj_position()+1
 * (dead letters are skipped).  Emitted events get ids derived from
 * (projection name, source position, index), so re-running never
 * duplicates them in the store (the store's idempotent append).
 *
 * Ownership: proj owns its sandbox; the store passed in opts is borrowed
 * (used for lazy state loading and restore; NULL = in-memory only: then a
 * checkpoint keeps the encoded states in memory).
 */
#ifndef TM_PROJ_H
#define TM_PROJ_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"
#include "event.h"
#include "store.h"

typedef struct proj proj;

typedef enum proj_from_kind {
    PROJ_FROM_ALL, PROJ_FROM_STREAM, PROJ_FROM_STREAMS, PROJ_FROM_CATEGORY, PROJ_FROM_TYPES
} proj_from_kind;

/* Where states, checkpoints and stored events come from when the
 * projection does not own a store handle (a worker process asks its host).
 * Each returns 1 found (*val / *rec malloc'd, freed by proj), 0 absent,
 * -1 error. */
typedef int (*proj_kv_fn)(void *ctx, const char *k, size_t kl, const char *v, size_t vl);
typedef struct proj_backing {
    void *ud;
    int (*get)(void *ud, const char *k, size_t kl, char **val, size_t *vl, tm_err *err);
    /* every key with the prefix, in key order; each returns non-zero to stop */
    int (*scan)(void *ud, const char *prefix, size_t pl, proj_kv_fn each, void *ctx,
                tm_err *err);
    /* the stored record (record.h) at position pos */
    int (*record)(void *ud, uint64_t pos, char **rec, size_t *len, tm_err *err);
} proj_backing;

typedef struct proj_opts {
    size_t memory_limit;    /* bytes, 0 = default (256 MiB) */
    double cpu_limit;       /* seconds of CPU per batch, 0 = none (see sandbox.h) */
    size_t grow_step;       /* 0, or grow the Lua heap ahead in such steps (sandbox.h) */
    /* Hard CPU limit (JIT-compiled loop).  NULL = print a fault line naming
     * the projection and the event, then _exit(1).  Runs on the watchdog
     * thread. */
    void (*on_hard_limit)(proj *p, void *ud);
    void (*print)(void *ud, const char *line, size_t len); /* print(); NULL = stderr */
    void *ud;
    store *st;              /* borrowed; NULL = in-memory */
    /* borrowed; where the lazy fields (stream, id, metadata, category) of
     * an event kept beyond its batch are read back from; NULL = they read
     * as nil after the batch */
    store *source;
    const proj_backing *backing; /* borrowed; instead of st / source for reads */
    unsigned batch;         /* events per Lua batch; 0 = 256 */
} proj_opts;

typedef struct proj_fault {
    uint64_t position;      /* the failing event */
    char type[EVENT_MAX_TYPE + 1];
    char message[512];      /* first line of the Lua error */
    char *traceback;        /* full message with Lua traceback (owned by proj) */
} proj_fault;

/* Load the script (source text) and read its definition.  TM_EINVAL for
 * syntax errors ("FILE:LINE: message"), bad definitions and bad names (a
 * name is 1-128 characters of A-Z a-z 0-9 _ - .). */
proj *proj_new(const char *name, const char *src, size_t len, const char *filename,
               const proj_opts *opts, tm_err *err);
void proj_free(proj *p);
const char *proj_name(const proj *p);

/* ---- definition ---- */
proj_from_kind proj_from(const proj *p);
size_t proj_from_count(const proj *p);        /* names in `from` (0 for all) */
const char *proj_from_name(const proj *p, size_t i, size_t *len);
/* The narrowest read of s that covers the selector, from position `from`
 * on (a stream selector reads its whole stream: proj_feed skips events it
 * has seen).  Iterator to free with store_iter_free, or NULL (err set). */
store_iter *proj_open_reader(store *s, const proj *p, uint64_t from, tm_err *err);
int proj_partitioned(const proj *p);
int proj_dead_letter_mode(const proj *p);
uint64_t proj_checkpoint_every(const proj *p); /* events; 0 = not set */
uint64_t proj_checkpoint_ms(const proj *p);    /* 0 = not set */
/* 1 if ev is selected by `from` (proj_feed also filters; readers may use
 * a narrower index read). */
int proj_selects(const proj *p, const tm_event *ev);

/* ---- running ---- */
#define PROJ_REPLAY 1
/* Feed one event (position order).  0 ok; -1 faulted (err and proj_fault
 * set); PROJ_REPLAY (dead-letter mode): rolled back, re-feed from
 * proj_position() + 1. */
int proj_feed(proj *p, const tm_event *ev, tm_err *err);
/* Run the buffered events now.  Same returns as proj_feed. */
int proj_flush(proj *p, tm_err *err);
uint64_t proj_position(const proj *p);   /* last event applied (0 = none) */
uint64_t proj_events(const proj *p);     /* events handled since start/restore */
/* Events fed since the last checkpoint (for checkpoint_every). */
uint64_t proj_uncommitted(const proj *p);
const proj_fault *proj_fault_info(const proj *p); /* NULL unless faulted */
/* During a batch: the event being handled (for the hard-limit message). */
void proj_current(const proj *p, uint64_t *position, const char **type, size_t *type_len);
/* Diagnostics: 1 if events of this type take the replay fast path (one
 * reused event table, payload keys located in C; see proj_rt.lua), 0 the
 * general path, -1 if no handler runs for the type. */
int proj_type_fast(proj *p, const char *type, size_t len);

/* One-shot runs (never checkpointed: `tidemark project` without --persist,
 * a replay that is not persisted): no dirty set is kept, so a partition
 * costs its state and its key only; proj_checkpoint* refuse (TM_EINVAL);
 * a fault rolls back to the only checkpoint there is, the empty model.
 * Call before the first event.  -1 (TM_EINVAL) after events were fed or in
 * dead-letter mode (which needs checkpoints). */
int proj_set_one_shot(proj *p, tm_err *err);

/* ---- checkpoints ---- */
/* Flush, then write every dirty partition state, the dead letters and the
 * checkpoint record into b; append the emitted events' records (in
 * record.h form, ids derived) as tm_events in *emits (owned by p, valid
 * until the next call).  Then the caller appends *emits (idempotent) and
 * commits b, and calls proj_checkpoint_done.  With no store (in-memory),
 * b may be NULL. */
int proj_checkpoint(proj *p, store_batch *b, tm_event **emits, size_t *nemits, tm_err *err);
void proj_checkpoint_done(proj *p);
/* The same, with every key/value handed to put (a worker process sends
 * them to its host) instead of a store_batch. */
typedef void (*proj_put_fn)(void *ud, const char *k, size_t kl, const char *v, size_t vl);
int proj_checkpoint_to(proj *p, proj_put_fn put, void *ud, tm_event **emits, size_t *nemits,
                       tm_err *err);
/* All of the above against opts.st (or in memory when it is NULL). */
int proj_commit(proj *p, tm_err *err);
/* Read the checkpoint from opts.st; states load lazily.  0 also when
 * there is no checkpoint yet (position 0). */
int proj_restore(proj *p, tm_err *err);
/* The checkpoint record (proj/NAME/cp) as proj_restore reads it, appended
 * to out: for writers of a whole model built elsewhere (a replay's or the
 * server's swap of a model built by several workers). */
void proj_checkpoint_record(buf *out, uint64_t dead_letters, uint64_t events, uint64_t position);
/* Delete every key of the projection in the store. */
int proj_reset(proj *p, tm_err *err);

/* ---- reading the model (msgpack appended to out) ---- */
/* The state (unpartitioned) or a map partition -> state, keys sorted. */
int proj_state(proj *p, buf *out, tm_err *err);
/* A partitioned model pair by pair: each(ctx, key, klen, state msgpack,
 * vlen) in key order, what proj_state's map holds, for callers that print
 * the model without holding it twice.  Every state is encoded before the
 * first call, so an unstorable state fails before anything is handed out.
 * each returns non-zero to stop.  TM_EINVAL when not partitioned. */
int proj_state_pairs(proj *p, proj_kv_fn each, void *ctx, tm_err *err);
/* One partition's state; 0 ok (nil when absent), -1 error. */
int proj_get(proj *p, const char *key, size_t klen, buf *out, tm_err *err);
/* One partition's state as it is live (applied, maybe not yet
 * checkpointed); nil when the partition does not exist.  Unlike proj_get it
 * never creates the partition. */
int proj_peek(proj *p, const char *key, size_t klen, buf *out, tm_err *err);
/* proj_peek of n partitions at once: a msgpack array of n states (nil for
 * each absent one) appended to out.  On error nothing is appended. */
int proj_peek_many(proj *p, const char *const *keys, const size_t *klens, size_t n, buf *out,
                   tm_err *err);
/* Sorted partition keys (array). */
int proj_partitions(proj *p, buf *out, tm_err *err);
/* [{key=, state=}...] for keys in [from, to) (NULL = open), at most limit (0 = all). */
int proj_range(proj *p, const char *from, const char *to, uint64_t limit, buf *out,
               tm_err *err);
/* [{key=, state=}...] for keys starting with prefix. */
int proj_prefix(proj *p, const char *prefix, uint64_t limit, buf *out, tm_err *err);
/* [{key=, value=}...]: the n partitions with the largest numeric state[field]. */
int proj_top(proj *p, const char *field, uint64_t n, buf *out, tm_err *err);
/* A named query from the script's `queries`: args is msgpack (NULL = nil). */
int proj_query(proj *p, const char *name, const char *args, size_t alen, buf *out,
               tm_err *err);

/* The derived id of the idx-th event emitted while handling position pos. */
void proj_emit_id(const char *name, uint64_t pos, uint32_t idx, uint8_t id[16]);

#endif
