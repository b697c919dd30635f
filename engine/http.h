/* http.h — the tidemark HTTP server (libevent evhttp): routes, limits,
 * Server-Sent Events, the dashboard, graceful shutdown.
 *
 * The only module that includes evhttp.  One event-loop thread does all
 * socket I/O and the SSE fan-out; handlers that touch the store run on a
 * worker pool (workq.h) and hand their replies back to the loop.  Route
 * logic lives in api.c (transport-free); SSE delivery in sse.c.
 *
 * Threads: http_new/http_run/http_free and http_set_projections belong to
 * the thread that runs the loop; http_notify_commit and http_publish may be
 * called from any thread.
 */
#ifndef TM_HTTP_H
#define TM_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "api.h"
#include "buf.h"
#include "err.h"
#include "store.h"

typedef struct http_server http_server;

typedef struct http_opts {
    const char *bind;          /* address to listen on; default "127.0.0.1" */
    int port;                  /* 0 = any free port */
    size_t max_body;           /* bytes; larger bodies get 413; default 8 MiB */
    size_t max_headers;        /* bytes of request line + headers; larger get 431; 64 KiB */
    int timeout_s;             /* idle read / stalled write timeout per connection; 60 */
    int request_timeout_s;     /* a request must arrive whole within this of its first
                                  byte (slow clients, slowloris); 30 */
    unsigned workers;          /* worker threads for store work; default 64 */
    size_t sse_max_pending;    /* unsent bytes per SSE client before it is closed; 4 MiB */
    int heartbeat_s;           /* SSE heartbeat comment interval; default 15 */
    const char *token_file;    /* bearer tokens (one per line) for writes; NULL = open */
} http_opts;

void http_opts_default(http_opts *o);

/* The projection host's side of the HTTP API (plugs in later; until it is
 * set, /projections routes answer 501 with a JSON error).
 *   handle:  any request under /projections except GET /projections/{name}/live
 *            (which the server serves from http_publish); runs on a worker
 *            thread, may block; rq->path starts with "/projections".
 *   metrics: append Prometheus lines (lag, rates) to out; loop thread, quick.
 *   reload:  SIGHUP; loop thread.
 * Any member may be NULL.
 * What the dashboard reads (keep these shapes): GET /projections answers
 * {"projections":[{"name":..,"status":"running"|"faulted"|..,"position":N},..]},
 * and updates published on "projection:NAME" are JSON objects that may
 * carry "status" and "position" (plus anything else, e.g. the state). */
typedef struct http_projections {
    void (*handle)(void *ud, const api_request *rq, api_reply *rp);
    /* Optional: n partition lookups of one projection at once (worker
     * thread); NULL = handle each. */
    void (*handle_many)(void *ud, const api_request *const *rqs, api_reply *const *rps, size_t n);
    void (*metrics)(void *ud, buf *out);
    void (*reload)(void *ud);
    void *ud;
} http_projections;

/* Bind and listen (connections queue until http_run).  NULL on failure. */
http_server *http_new(store *st, const http_opts *o, tm_err *err);
/* The port actually bound (useful with port 0). */
int http_port(const http_server *h);
void http_set_projections(http_server *h, const http_projections *p);

/* Any thread: events up to `last` are committed (wire this to store_on_commit). */
void http_notify_commit(http_server *h, uint64_t last);
/* Any thread: send one JSON document (no newlines) to SSE subscribers of
 * `channel` (e.g. "projection:revenue").  Copies its arguments. */
void http_publish(http_server *h, const char *channel, size_t clen, const char *json,
                  size_t jlen);

/* Run the loop until SIGTERM/SIGINT, then shut down gracefully: stop
 * accepting, finish in-flight requests, close SSE clients with a reason.
 * Returns 0. */
int http_run(http_server *h);
/* Close every connection and free the server (not the store). */
void http_free(http_server *h);

#endif
