/* projmgr.h — the server's projection manager: the registry of running
 * projections, continuously fed from the store, and their HTTP routes.
 *
 * Each projection runs in its own worker process (projhost.h) driven by
 * its own thread: the store's commit callback (projmgr_notify) only
 * records the last position and wakes the threads, so neither the store's
 * writer nor the HTTP loop ever waits on Lua.  A thread feeds everything
 * committed since its projection's position to the worker without
 * committing (reads are served from the worker's live state), and commits
 * a checkpoint (state + position in one atomic store batch) at most
 * checkpoint_ms (script option, default 100 ms) after the first event it
 * does not cover, before a partition listing and before stopping.
 *
 * Sources: every *.lua in the projections directory (name = file name
 * without .lua) plus projections installed with PUT, whose source is kept
 * in the store's key-value namespace (so they survive a restart):
 *   projmgr/o/NAME   override record (msgpack map): source (PUT, optional),
 *                    file = FNV-1a hash of NAME.lua in the directory when
 *                    the record was written (0 = no file), stopped, deleted.
 *                    A record whose file hash no longer matches the file is
 *                    stale (the file changed or went away since) and is
 *                    dropped: the most recent change wins.
 *   projmgr/v/NAME   hash of the source that built the proj/NAME/ keys (a changed
 *                    source resets the state and rebuilds from position 0).
 *   projmgr/s/NAME   while a new version builds: the source that built
 *                    proj/NAME/ (a restart serves it and resumes the build).
 *
 * Versions: a changed source for a running projection is built by a second
 * worker (the worker runs as NAME; its keys live under proj/NAME@VERSION/,
 * emitted events suppressed unless the script sets emit_during_rebuild =
 * true) fed by its own thread while the old worker serves.  Caught up, it
 * is swapped in under the entry's lock: both brought to the same position
 * and checkpointed, then ONE store batch moves proj/NAME@VERSION/ to
 * proj/NAME/ and sets projmgr/v/NAME; the entry then serves the new worker.
 * A fault in the new version drops it (status rebuild_error).
 *
 * Threads: projmgr_notify may be called from any thread (quick, never
 * blocks on a projection); projmgr_handle from HTTP worker threads (may
 * block); projmgr_metrics and projmgr_reload from the HTTP loop (quick:
 * reload only wakes the manager's admin thread).
 */
#ifndef TM_PROJMGR_H
#define TM_PROJMGR_H

#include <stddef.h>
#include <stdint.h>

#include "api.h"
#include "buf.h"
#include "err.h"
#include "store.h"

typedef struct projmgr projmgr;

/* Deliver one JSON update on an SSE channel ("projection:NAME"). */
typedef void (*projmgr_publish_fn)(void *ud, const char *channel, size_t clen, const char *json,
                                   size_t jlen);

typedef struct projmgr_opts {
    const char *dir;          /* projections directory; NULL = none (PUT only) */
    const char *exe;          /* worker executable; NULL = fork only (tests) */
    size_t memory_limit;      /* bytes per projection; 0 = default (256 MiB) */
    double cpu_limit;         /* CPU seconds per batch; 0 = 10 */
    unsigned publish_hz;      /* live updates per second per projection; 0 = 10 */
    unsigned rebuild_workers; /* worker processes building a new version; 0 = cores */
    projmgr_publish_fn publish; /* NULL = no live updates */
    void *publish_ud;
} projmgr_opts;

/* Load the directory and the stored projections and start them (each
 * catches up on its own thread).  A projection that fails to load is
 * registered as faulted; only an unreadable directory fails (NULL). */
projmgr *projmgr_new(store *s, const projmgr_opts *o, tm_err *err);
/* Any thread: events up to `last` are committed. */
void projmgr_notify(projmgr *m, uint64_t last);
/* Every /projections request except .../live (http.h http_projections). */
void projmgr_handle(projmgr *m, const api_request *rq, api_reply *rp);
/* n requests at once (worker thread), each answered as projmgr_handle
 * would: partition lookups of one projection (GET .../state/KEY or
 * .../state?partition=KEY) share one lock and one round trip to its
 * worker process; any other request is handled on its own. */
void projmgr_handle_many(projmgr *m, const api_request *const *rqs, api_reply *const *rps,
                         size_t n);
/* Prometheus lines: position, lag, events_total, faulted per projection. */
void projmgr_metrics(projmgr *m, buf *out);
/* Re-read the directory (SIGHUP): new files start, changed sources reset
 * and rebuild, removed files stop.  Asynchronous. */
void projmgr_reload(projmgr *m);
/* Wait until a pending reload is done (tests, shutdown ordering). */
void projmgr_sync(projmgr *m);
/* Stop every projection (each is checkpointed after its last cycle) and free. */
void projmgr_free(projmgr *m);

#endif
