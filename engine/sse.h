/* sse.h — Server-Sent Events fan-out: subscriptions, resume, back-pressure.
 *
 * Transport-free: the hub formats SSE messages and decides who gets what;
 * the HTTP module supplies a sink (queue bytes on a connection, report how
 * many are still unsent, end a response, schedule a callback on the loop).
 * Everything here runs on the event-loop thread.
 *
 * Delivery rule: every client has a cursor (the last global position it
 * has been given).  A new client first catches up from the store (after
 * Last-Event-ID / ?from) in bounded steps, paced by its output draining;
 * then it joins the live set.  sse_hub_commit reads each new event from
 * the store once, formats its JSON once, and writes the same bytes to
 * every live client whose subscription matches and whose cursor is below
 * the event's position: no gap (the catch-up reads up to the store's end,
 * which is at or past the hub's position) and no duplicate (cursors).
 *
 * Back-pressure: a client whose unsent bytes exceed max_pending gets a
 * final `event: close` message with the reason and is ended, so memory per
 * client stays bounded.
 *
 * Subscription specs: "all", "stream:NAME", "category:C", "type:T",
 * "projection:NAME" (fed by sse_hub_publish, not by the log).
 */
#ifndef TM_SSE_H
#define TM_SSE_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "store.h"

typedef struct sse_hub sse_hub;
typedef struct sse_client sse_client;

typedef struct sse_piece {
    const char *p;
    size_t n;
} sse_piece;

typedef struct sse_sink {
    /* Queue one message (the pieces, concatenated) on conn's output. */
    void (*write)(void *conn, const sse_piece *pieces, int npieces);
    /* Bytes queued on conn and not yet sent to the socket. */
    size_t (*pending)(void *conn);
    /* Finish conn's response; the hub forgets conn and never calls back on it. */
    void (*end)(void *conn);
    /* Ask for sse_hub_run(hub) to be called soon from the loop (ud = sink_ud). */
    void (*schedule)(void *sink_ud);
} sse_sink;

/* max_pending: unsent bytes per client before it is closed as too slow. */
sse_hub *sse_hub_new(store *st, const sse_sink *sink, void *sink_ud, size_t max_pending);
/* Ends every client without a message and frees the hub. */
void sse_hub_free(sse_hub *h);

/* A client for connection conn that wants events after position `after`
 * (its cursor; pass sse_hub_position() for "from now").  named: each message
 * carries `event: <spec>` (multiplexed connections). */
sse_client *sse_client_new(sse_hub *h, void *conn, uint64_t after, int named);
/* Add a subscription; type_filter (may be NULL/0) further restricts
 * all/stream/category subscriptions to one event type.  TM_EINVAL on a bad spec. */
int sse_client_subscribe(sse_client *c, const char *spec, size_t len, const char *type_filter,
                         size_t tlen, tm_err *err);
/* Subscriptions are complete: send the opening comment, begin catch-up. */
void sse_client_start(sse_client *c);
/* The connection is gone: free the client (no sink calls on it after). */
void sse_client_gone(sse_client *c);
/* conn's output has drained: a paused catch-up may continue. */
void sse_client_drained(sse_client *c);

/* Events up to `last` are committed and readable: deliver them, at most a
 * slice per call (the loop stays responsive).  Returns 1 when more remain
 * (call again soon with the same or a later `last`), 0 when done. */
int sse_hub_commit(sse_hub *h, uint64_t last);
/* Deliver one JSON document to subscribers of `channel` ("projection:NAME"). */
void sse_hub_publish(sse_hub *h, const char *channel, size_t clen, const char *json,
                     size_t jlen);
/* Comment line to every client (keeps proxies and idle timers happy). */
void sse_hub_heartbeat(sse_hub *h);
/* Send every client `event: close` with the reason, then end it. */
void sse_hub_close_all(sse_hub *h, const char *reason);
/* Continue pending catch-ups (called after sink->schedule). */
void sse_hub_run(sse_hub *h);

uint64_t sse_hub_position(const sse_hub *h);
unsigned sse_hub_nclients(const sse_hub *h);

#endif
