/* httpconn.h — the HTTP server's per-connection guard (part of the HTTP
 * module with http.c; evhttp types).
 *
 * libevent 2.1's evhttp has an idle timeout per read, not a deadline for
 * a whole request: a client that sends one byte of its headers every few
 * seconds (slowloris) holds a connection forever.  The guard gives every
 * connection a request deadline: a request must arrive whole (request
 * line, headers and body) within `request_timeout_s` of its first byte
 * (for the first request of a connection: of the accept), else the
 * connection is closed.  Between requests (idle keep-alive) and while a
 * request is being answered (a long SSE stream included) no deadline runs.
 *
 * How: the guard creates each connection's bufferevent (evhttp_set_bevcb),
 * watches its input buffer for the first byte of a request, and learns
 * the evhttp_connection right after evhttp has set it up (its callbacks'
 * argument).  It owns the connection's close callback; the server sets
 * its own through httpconn_set_closecb, which the guard calls first.
 *
 * Each cut is logged and counted (METRICS_REQUEST_TIMEOUTS).
 *
 * Threads: a server's connections are touched by its loop thread only;
 * the evcon -> guard map is shared by the servers of a process (locked).
 */
#ifndef TM_HTTPCONN_H
#define TM_HTTPCONN_H

#include <event2/event.h>
#include <event2/http.h>

typedef struct httpconn_table httpconn_table;
typedef void (*httpconn_close_fn)(struct evhttp_connection *evcon, void *arg);

/* Guard every connection `http` accepts from now on.  NULL on failure. */
httpconn_table *httpconn_new(struct evhttp *http, int request_timeout_s);
/* After evhttp_free: drop what is left. */
void httpconn_free(httpconn_table *t);

/* The calls below take any connection, guarded or not (an unguarded one
 * is left to evhttp alone); the loop thread of its server calls them. */
/* evhttp_connection_set_closecb, through the guard (cb NULL clears). */
void httpconn_set_closecb(struct evhttp_connection *evcon, httpconn_close_fn cb, void *arg);
/* A request has arrived whole (the server's request callback). */
void httpconn_request_begin(struct evhttp_connection *evcon);
/* Its answer is complete (sent, or the stream ended): the next request's
 * deadline starts with its first byte. */
void httpconn_request_end(struct evhttp_connection *evcon);

#endif
