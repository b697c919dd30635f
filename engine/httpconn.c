/* httpconn.c — the per-connection request deadline (see httpconn.h).
 *
 * A guard's life:
 *   bevcb      evhttp asks for the connection's bufferevent: the guard
 *              makes it, holds a reference to it (so it stays valid until
 *              adopted), starts the deadline (the first request's clock
 *              runs from the accept) and activates `adopt_ev`;
 *   adopt      (next in the same loop iteration, before any read) the
 *              bufferevent's callback argument is the evhttp_connection:
 *              the guard registers it, takes its close callback and drops
 *              its reference.  If evhttp already let the connection go,
 *              the guard just frees itself;
 *   input      the first byte of a request while none is being read or
 *              answered starts the deadline;
 *   begin/end  the server's request callback stops it; the end of the
 *              answer allows the next one (started at once if its bytes
 *              are already in);
 *   deadline   no whole request in time: the connection is freed
 *              (evhttp_connection_free), which calls the close callback;
 *   closed     evhttp frees the connection: the server's close callback
 *              runs, then the guard is unregistered and freed.
 * Invariants: a registered guard's evcon is alive; a guard is freed
 * exactly once, by `closed` or by `adopt` (never adopted).
 */
#define _GNU_SOURCE
#include "httpconn.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>

#include "err.h"
#include "metrics.h"

typedef struct guard {
    httpconn_table *t;
    struct bufferevent *bev;
    struct evhttp_connection *evcon;   /* set by adopt */
    struct evbuffer_cb_entry *incb;    /* on the input buffer */
    struct event *deadline, *adopt_ev;
    httpconn_close_fn user_cb;
    void *user_arg;
    int in_request;                    /* read whole, being answered */
    int held;                          /* our reference to bev (until adopted) */
    struct guard *hnext;               /* hash chain */
} guard;

struct httpconn_table {
    struct timeval timeout;
};

/* ---- the evcon -> guard map ----
 * One for the process (a reply knows its connection, not its server);
 * guarded by a mutex for processes with several servers on several
 * threads (the tests), uncontended otherwise. */

typedef struct gmap {
    guard **slot;
    size_t nslot, count;
} gmap;

static gmap g_map;
static pthread_mutex_t g_map_mu = PTHREAD_MUTEX_INITIALIZER;

static size_t slot_of(const gmap *t, const void *evcon) {
    uintptr_t k = (uintptr_t)evcon;
    k ^= k >> 17;
    k *= 0x9e3779b97f4a7c15ull;
    return (size_t)(k >> 20) & (t->nslot - 1);
}

static void map_grow(gmap *t) {
    size_t n = t->nslot ? t->nslot * 2 : 256;
    guard **old = t->slot;
    size_t on = t->nslot;
    t->slot = calloc(n, sizeof *t->slot);
    if (!t->slot) tm_oom();
    t->nslot = n;
    for (size_t i = 0; i < on; i++)
        for (guard *g = old[i], *nx; g; g = nx) {
            nx = g->hnext;
            size_t s = slot_of(t, g->evcon);
            g->hnext = t->slot[s];
            t->slot[s] = g;
        }
    free(old);
}

static void map_put(guard *g) {
    gmap *t = &g_map;
    pthread_mutex_lock(&g_map_mu);
    if (t->count + 1 > t->nslot) map_grow(t);
    size_t s = slot_of(t, g->evcon);
    g->hnext = t->slot[s];
    t->slot[s] = g;
    t->count++;
    pthread_mutex_unlock(&g_map_mu);
}

/* The guard of evcon, NULL if it has none.  The caller is the loop
 * thread of evcon's server, so the guard stays alive after the lookup. */
static guard *map_get(const struct evhttp_connection *evcon) {
    gmap *t = &g_map;
    guard *found = NULL;
    if (!evcon) return NULL;
    pthread_mutex_lock(&g_map_mu);
    if (t->nslot)
        for (guard *g = t->slot[slot_of(t, evcon)]; g; g = g->hnext)
            if (g->evcon == evcon) {
                found = g;
                break;
            }
    pthread_mutex_unlock(&g_map_mu);
    return found;
}

static void map_del(guard *g) {
    gmap *t = &g_map;
    pthread_mutex_lock(&g_map_mu);
    for (guard **pp = &t->slot[slot_of(t, g->evcon)]; *pp; pp = &(*pp)->hnext)
        if (*pp == g) {
            *pp = g->hnext;
            t->count--;
            break;
        }
    if (t->count == 0) { /* the last connection of the process is gone */
        free(t->slot);
        t->slot = NULL;
        t->nslot = 0;
    }
    pthread_mutex_unlock(&g_map_mu);
}

/* ---- a guard's life ---- */

static void guard_free(guard *g) {
    if (g->incb) evbuffer_remove_cb_entry(bufferevent_get_input(g->bev), g->incb);
    event_free(g->deadline);
    event_free(g->adopt_ev);
    if (g->held) bufferevent_decref(g->bev);
    free(g);
}

static void arm(guard *g) {
    if (!evtimer_pending(g->deadline, NULL)) evtimer_add(g->deadline, &g->t->timeout);
}

static void on_closed(struct evhttp_connection *evcon, void *arg) {
    guard *g = arg;
    if (g->user_cb) g->user_cb(evcon, g->user_arg);
    map_del(g);
    guard_free(g);
}

static void on_adopt(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    guard *g = arg;
    bufferevent_data_cb rd, wr;
    bufferevent_event_cb ev;
    void *cbarg = NULL;
    bufferevent_getcb(g->bev, &rd, &wr, &ev, &cbarg);
    if (!ev || !cbarg) { /* evhttp has let the connection go already */
        guard_free(g);
        return;
    }
    g->evcon = cbarg; /* evhttp's callbacks take the evhttp_connection */
    map_put(g);
    evhttp_connection_set_closecb(g->evcon, on_closed, g);
    bufferevent_decref(g->bev); /* evhttp holds it; on_closed tells us when it goes */
    g->held = 0;
}

static void on_input(struct evbuffer *b, const struct evbuffer_cb_info *info, void *arg) {
    (void)b;
    guard *g = arg;
    if (info->n_added && !g->in_request && g->evcon) arm(g);
}

static void peer_of(struct bufferevent *bev, char *out, size_t n) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    snprintf(out, n, "?");
    if (getpeername(bufferevent_getfd(bev), (struct sockaddr *)&ss, &len) != 0) return;
    char a[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss.ss_family == AF_INET) {
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, a, sizeof a);
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    } else if (ss.ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, a, sizeof a);
        port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    snprintf(out, n, "%s:%d", a, port);
}

static void on_deadline(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    guard *g = arg;
    if (g->in_request || !g->evcon) return;
    metrics_add(METRICS_REQUEST_TIMEOUTS, 1);
    char peer[80];
    peer_of(g->bev, peer, sizeof peer);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    fprintf(stderr,
            "ts=%lld.%03ld level=warn msg=\"closing a connection: no whole request in %ld s "
            "(--request-timeout)\" peer=%s\n",
            (long long)ts.tv_sec, ts.tv_nsec / 1000000, (long)g->t->timeout.tv_sec, peer);
    evhttp_connection_free(g->evcon); /* on_closed frees g */
}

static struct bufferevent *on_bev(struct event_base *base, void *arg) {
    httpconn_table *t = arg;
    /* options 0, as evhttp's own: evhttp closes the socket itself */
    struct bufferevent *bev = bufferevent_socket_new(base, -1, 0);
    if (!bev) return NULL; /* evhttp makes its own */
    guard *g = calloc(1, sizeof *g);
    if (!g) tm_oom();
    g->t = t;
    g->bev = bev;
    bufferevent_incref(bev);
    g->held = 1;
    g->deadline = evtimer_new(base, on_deadline, g);
    g->adopt_ev = event_new(base, -1, 0, on_adopt, g);
    if (!g->deadline || !g->adopt_ev) tm_oom();
    g->incb = evbuffer_add_cb(bufferevent_get_input(bev), on_input, g);
    evtimer_add(g->deadline, &t->timeout);
    event_active(g->adopt_ev, EV_TIMEOUT, 0);
    return bev;
}

/* ---- the table ---- */

httpconn_table *httpconn_new(struct evhttp *http, int request_timeout_s) {
    httpconn_table *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->timeout.tv_sec = request_timeout_s > 0 ? request_timeout_s : 30;
    evhttp_set_bevcb(http, on_bev, t);
    return t;
}

void httpconn_free(httpconn_table *t) {
    /* evhttp_free has freed every connection (on_closed ran for each) */
    free(t);
}

void httpconn_set_closecb(struct evhttp_connection *evcon, httpconn_close_fn cb, void *arg) {
    guard *g = map_get(evcon);
    if (!g) { /* not guarded (made before the guard, or adoption pending) */
        evhttp_connection_set_closecb(evcon, cb, arg);
        return;
    }
    g->user_cb = cb;
    g->user_arg = arg;
}

void httpconn_request_begin(struct evhttp_connection *evcon) {
    guard *g = map_get(evcon);
    if (!g) return;
    g->in_request = 1;
    evtimer_del(g->deadline);
}

void httpconn_request_end(struct evhttp_connection *evcon) {
    guard *g = map_get(evcon);
    if (!g) return;
    g->in_request = 0;
    if (evbuffer_get_length(bufferevent_get_input(g->bev))) arm(g);
}
