/* metrics.h — the server's counters and their Prometheus text form.
 *
 * Counters are process-wide atomics so any thread (workers, the loop) can
 * bump them without locks.  metrics_render appends the exposition text
 * (text/plain; version=0.0.4) for GET /metrics.
 */
#ifndef TM_METRICS_H
#define TM_METRICS_H

#include <stdint.h>

#include "buf.h"

typedef enum metrics_counter {
    METRICS_APPENDS,          /* events appended */
    METRICS_APPEND_REQUESTS,  /* successful append requests */
    METRICS_APPEND_BYTES,     /* request body bytes of successful appends */
    METRICS_APPEND_CONFLICTS, /* 409s from appends */
    METRICS_STORE_ERRORS,     /* store I/O failures seen by the server */
    METRICS_READ_EVENTS,      /* events returned by GET reads */
    METRICS_SSE_MESSAGES,     /* SSE event messages written */
    METRICS_SSE_SLOW_CLOSED,  /* SSE clients closed for not keeping up */
    METRICS_REQUEST_TIMEOUTS, /* connections closed: no whole request in --request-timeout */
    METRICS_SSE_CLIENTS,      /* gauge: connected SSE clients */
    METRICS_LAST_POSITION,    /* gauge: last committed position */
    METRICS_STORE_COMMITS,    /* group commits (synced in the durable mode), copied from the store */
    METRICS_STORE_SYNCS,      /* of those, synced */
    METRICS_N_
} metrics_counter;

void metrics_add(metrics_counter c, uint64_t n);
void metrics_set(metrics_counter c, uint64_t v);
uint64_t metrics_get(metrics_counter c);
/* Count one HTTP response with the given status. */
void metrics_http_response(int status);
/* Append the Prometheus exposition of every metric to out. */
void metrics_render(buf *out);

#endif
