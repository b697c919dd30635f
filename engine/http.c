/* http.c — evhttp transport: listening, limits, routing, replies, SSE
 * connections, signals and graceful shutdown (see http.h).
 *
 * Invariants:
 *   - every socket operation happens on the loop thread; workers only run
 *     api_* handlers on copies of the request (the evhttp_request may die
 *     while a worker runs: the connection's close callback clears job->req);
 *   - every 4xx/5xx reply this file sends has a JSON body
 *     {"error":"...","code":N} (libevent's own hard-limit rejections, 64 KiB
 *     over the body limit (413) or 4x the header limit (400), are the
 *     documented exception);
 *   - an SSE connection belongs to exactly one sse_client until either the
 *     hub ends it (sink end) or the connection closes (sse_client_gone).
 */
#define _GNU_SOURCE
#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>
#include <event2/thread.h>

#include "httpconn.h"
#include "metrics.h"
#include "sse.h"
#include "workq.h"

/* Generated at build time from engine/dashboard/ and Chart.js
 * (scripts/embed-assets -> build/gen/assets.c). */
struct http_asset {
    const char *path;
    const char *type;
    const unsigned char *data;
    size_t len;
};
extern const struct http_asset http_assets[];

#define MAX_TOKENS 64
#define HTTP_BODY_SLACK (64 * 1024)    /* see http_new: JSON 413 zone above max_body */
/* JSON 431 zone: up to 4x max_headers (libevent answers 400 beyond it). */

typedef struct pub_msg {
    struct pub_msg *next;
    size_t clen, jlen;
    char data[];  /* channel then json */
} pub_msg;

struct http_server {
    store *st;
    http_opts o;
    struct event_base *base;
    struct evhttp *http;
    struct evhttp_bound_socket *sock;
    int port;
    workq *wq;
    struct event *wq_ev;       /* workers -> loop: finished jobs */
    struct event *append_ev;   /* store writer -> loop: finished appends */
    pthread_mutex_t append_mu;
    struct append_ctx *append_done;
    unsigned appends_inflight; /* loop thread only */
    struct event *commit_ev;   /* writer -> loop: new commits */
    _Atomic uint64_t committed;
    struct event *sse_run_ev;  /* continue SSE catch-ups */
    struct event *hb_ev;
    struct event *pub_ev;
    pthread_mutex_t pub_mu;
    pub_msg *pub_head, *pub_tail;
    struct event *sig_ev[3];
    struct event *stop_ev;
    struct event *accept_ev;   /* resumes accepting after EMFILE & co */
    unsigned long accept_fails;/* accept errors since the last log line */
    struct timespec accept_log_t;
    struct http_server *next_server;   /* the servers list (server_of) */
    int stopping;              /* 0 running, 1 draining jobs, 2 flushing */
    struct timespec stop_t;
    sse_hub *hub;
    struct sse_conn *dirty;    /* SSE connections with staged bytes */
    struct event *flush_ev;
    struct lookup_lane *lanes;  /* partition lookups by projection (loop thread) */
    httpconn_table *conns;     /* the request deadline of every connection */
    int freeing;               /* http_free has begun: start no more batches */
    http_projections proj;
    char *tokens[MAX_TOKENS];
    int ntokens;
};

/* ---- logging ---- */

static void log_line(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_line(const char *level, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    fprintf(stderr, "ts=%lld.%03ld level=%s %s\n", (long long)ts.tv_sec, ts.tv_nsec / 1000000,
            level, msg);
}

static const char *method_name(enum evhttp_cmd_type c) {
    switch (c) {
    case EVHTTP_REQ_GET: return "GET";
    case EVHTTP_REQ_POST: return "POST";
    case EVHTTP_REQ_HEAD: return "HEAD";
    case EVHTTP_REQ_PUT: return "PUT";
    case EVHTTP_REQ_DELETE: return "DELETE";
    case EVHTTP_REQ_OPTIONS: return "OPTIONS";
    case EVHTTP_REQ_TRACE: return "TRACE";
    case EVHTTP_REQ_CONNECT: return "CONNECT";
    case EVHTTP_REQ_PATCH: return "PATCH";
    }
    return "?";
}

/* ---- replies ---- */

static void send_reply(struct evhttp_request *req, int status, const char *ctype,
                       const char *body, size_t len, const char *allow) {
    struct evkeyvalq *oh = evhttp_request_get_output_headers(req);
    evhttp_add_header(oh, "Content-Type", ctype);
    if (allow) evhttp_add_header(oh, "Allow", allow);
    if (status == 401) evhttp_add_header(oh, "WWW-Authenticate", "Bearer");
    if (evhttp_request_get_command(req) == EVHTTP_REQ_HEAD) {
        /* libevent 2.1 writes the body of a HEAD reply (without a
         * Content-Length): a keep-alive client would read it as the start
         * of the next response.  Send the length only. */
        char n[32];
        snprintf(n, sizeof n, "%zu", len);
        evhttp_add_header(oh, "Content-Length", n);
    } else {
        evbuffer_add(evhttp_request_get_output_buffer(req), body, len);
    }
    metrics_http_response(status);
    if (status >= 400) {
        const char *uri = evhttp_request_get_uri(req);
        log_line(status >= 500 ? "error" : "warn", "msg=\"request failed\" method=%s uri=\"%.200s\" status=%d body=%.*s",
                 method_name(evhttp_request_get_command(req)), uri ? uri : "", status,
                 (int)(len > 300 ? 300 : len), body);
    }
    httpconn_request_end(evhttp_request_get_connection(req));
    evhttp_send_reply(req, status, api_reason(status), NULL);
}

static void send_api_reply(struct evhttp_request *req, api_reply *rp, const char *allow) {
    send_reply(req, rp->status, rp->content_type, rp->body.ptr ? rp->body.ptr : "", rp->body.len,
               allow);
}

static void send_error(struct evhttp_request *req, int status, const char *allow,
                       const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void send_error(struct evhttp_request *req, int status, const char *allow,
                       const char *fmt, ...) {
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    api_reply rp;
    api_reply_init(&rp);
    api_error(&rp, status, "%s", msg);
    send_api_reply(req, &rp, allow);
    api_reply_free(&rp);
}

/* ---- jobs: handlers on worker threads ---- */

typedef enum job_kind {
    JOB_READ_STREAM, JOB_READ_ALL, JOB_LIST_STREAMS, JOB_CATEGORIES, JOB_PROJ
} job_kind;

typedef struct http_job {
    workq_job job;
    http_server *h;
    struct evhttp_request *req;   /* NULL once the connection is gone */
    job_kind kind;
    api_request rq;
    char *strs;                   /* one allocation holding the request's strings */
    buf body;
    api_reply rp;
    struct http_job *lnext;       /* on a lookup lane's queue */
} http_job;

static void job_run(workq_job *j) {
    http_job *jb = (http_job *)j;
    http_server *h = jb->h;
    switch (jb->kind) {
    case JOB_READ_STREAM: api_read_stream(h->st, &jb->rq, &jb->rp); break;
    case JOB_READ_ALL: api_read_all(h->st, &jb->rq, &jb->rp); break;
    case JOB_LIST_STREAMS: api_list_streams(h->st, &jb->rq, &jb->rp); break;
    case JOB_CATEGORIES: api_list_categories(h->st, &jb->rq, &jb->rp); break;
    case JOB_PROJ:
        if (h->proj.handle) h->proj.handle(h->proj.ud, &jb->rq, &jb->rp);
        else api_error(&jb->rp, 501, "projections are not available in this server");
        break;
    }
}

/* libevent detaches a request the user has not finished from a failed
 * connection (req->evcon = NULL) and leaves freeing it to the user; a
 * request still attached is freed with its connection. */
static void free_if_detached(struct evhttp_request *req) {
    if (req && !evhttp_request_get_connection(req)) evhttp_request_free(req);
}

static void job_conn_closed(struct evhttp_connection *evcon, void *arg) {
    (void)evcon;
    http_job *jb = arg;
    free_if_detached(jb->req);
    jb->req = NULL;
}

static void job_done(workq_job *j) {
    http_job *jb = (http_job *)j;
    if (jb->req) {
        struct evhttp_connection *evcon = evhttp_request_get_connection(jb->req);
        if (evcon) httpconn_set_closecb(evcon, NULL, NULL);
        send_api_reply(jb->req, &jb->rp, NULL);
    }
    api_reply_free(&jb->rp);
    buf_free(&jb->body);
    free(jb->strs);
    free(jb);
}

/* Copy a string into the job's string block. */
static const char *pack_str(char **cur, const char *s, size_t n) {
    if (!s) return NULL;
    char *d = *cur;
    memcpy(d, s, n);
    d[n] = '\0';
    *cur += n + 1;
    return d;
}

/* A job holding a copy of the request (the connection's close callback
 * detaches it); the caller submits it. */
static http_job *job_new(http_server *h, struct evhttp_request *req, job_kind kind,
                         const char *path, const char *query, const char *stream,
                         size_t stream_len) {
    struct evkeyvalq *ih = evhttp_request_get_input_headers(req);
    const char *ctype = evhttp_find_header(ih, "Content-Type");
    const char *expv = evhttp_find_header(ih, "Expected-Version");
    const char *method = method_name(evhttp_request_get_command(req));
    size_t need = strlen(path) + 1 + (query ? strlen(query) + 1 : 0) + stream_len + 1 +
                  (ctype ? strlen(ctype) + 1 : 0) + (expv ? strlen(expv) + 1 : 0) +
                  strlen(method) + 1;
    http_job *jb = calloc(1, sizeof *jb);
    if (!jb) tm_oom();
    jb->strs = malloc(need);
    if (!jb->strs) tm_oom();
    char *cur = jb->strs;
    jb->h = h;
    jb->req = req;
    jb->kind = kind;
    jb->job.run = job_run;
    jb->job.done = job_done;
    api_reply_init(&jb->rp);
    jb->rq.method = pack_str(&cur, method, strlen(method));
    jb->rq.path = pack_str(&cur, path, strlen(path));
    jb->rq.query = query ? pack_str(&cur, query, strlen(query)) : NULL;
    jb->rq.stream = stream ? pack_str(&cur, stream, stream_len) : NULL;
    jb->rq.stream_len = stream_len;
    jb->rq.content_type = ctype ? pack_str(&cur, ctype, strlen(ctype)) : NULL;
    jb->rq.expected_version = expv ? pack_str(&cur, expv, strlen(expv)) : NULL;
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t blen = evbuffer_get_length(in);
    if (blen) {
        buf_reserve(&jb->body, blen);
        evbuffer_remove(in, jb->body.ptr, blen);
        jb->body.len = blen;
        jb->body.ptr[blen] = '\0';
    }
    jb->rq.body = jb->body.ptr ? jb->body.ptr : "";
    jb->rq.body_len = jb->body.len;
    struct evhttp_connection *evcon = evhttp_request_get_connection(req);
    httpconn_set_closecb(evcon, job_conn_closed, jb);
    return jb;
}

static void submit_job(http_server *h, struct evhttp_request *req, job_kind kind,
                       const char *path, const char *query, const char *stream,
                       size_t stream_len) {
    http_job *jb = job_new(h, req, kind, path, query, stream, stream_len);
    workq_submit(h->wq, &jb->job);
}

/* ---- partition lookups: batched per projection ----
 * One partition's state is the hot read (dashboards, read models); alone,
 * each lookup would cost a hop to a worker thread and a round trip to the
 * projection's worker process.  Lookups of one projection queue on a lane;
 * a lane has at most one batch on a worker at a time, and a batch takes
 * every lookup queued on the lane (up to LOOKUP_BATCH_MAX), like a group
 * commit: under load many lookups share one hop and one round trip, and
 * a lone lookup waits for nothing.  A lane exists only while it has work. */

#define LOOKUP_BATCH_MAX 256

typedef struct lookup_lane {
    struct lookup_lane *next;
    http_job *head, *tail;     /* queued lookups, in arrival order */
    int busy;                  /* a batch of this lane is on a worker */
    size_t name_len;
    char name[];               /* the projection's name as in the path */
} lookup_lane;

typedef struct lookup_batch {
    workq_job job;
    http_server *h;
    lookup_lane *lane;
    size_t n;
    http_job *jobs[LOOKUP_BATCH_MAX];
    const api_request *rqs[LOOKUP_BATCH_MAX];
    api_reply *rps[LOOKUP_BATCH_MAX];
} lookup_batch;

static void lookup_run(workq_job *j) {
    lookup_batch *b = (lookup_batch *)j;
    http_server *h = b->h;
    if (h->proj.handle_many) {
        h->proj.handle_many(h->proj.ud, b->rqs, b->rps, b->n);
        return;
    }
    for (size_t i = 0; i < b->n; i++) job_run(&b->jobs[i]->job);
}

static void lane_kick(http_server *h, lookup_lane *ln);

static void lookup_done(workq_job *j) {
    lookup_batch *b = (lookup_batch *)j;
    for (size_t i = 0; i < b->n; i++) job_done(&b->jobs[i]->job);
    b->lane->busy = 0;
    lane_kick(b->h, b->lane);
    free(b);
}

/* Loop thread: start the lane's next batch if it can; drop an idle lane. */
static void lane_kick(http_server *h, lookup_lane *ln) {
    if (ln->busy) return;
    if (!ln->head || h->freeing) {
        while (ln->head) { /* the server is going away: nothing runs these */
            http_job *jb = ln->head;
            ln->head = jb->lnext;
            api_error(&jb->rp, 503, "server is shutting down");
            job_done(&jb->job);
        }
        for (lookup_lane **pp = &h->lanes; *pp; pp = &(*pp)->next)
            if (*pp == ln) {
                *pp = ln->next;
                break;
            }
        free(ln);
        return;
    }
    lookup_batch *b = malloc(sizeof *b);
    if (!b) tm_oom();
    b->job.run = lookup_run;
    b->job.done = lookup_done;
    b->h = h;
    b->lane = ln;
    b->n = 0;
    while (ln->head && b->n < LOOKUP_BATCH_MAX) {
        http_job *jb = ln->head;
        ln->head = jb->lnext;
        b->jobs[b->n] = jb;
        b->rqs[b->n] = &jb->rq;
        b->rps[b->n] = &jb->rp;
        b->n++;
    }
    if (!ln->head) ln->tail = NULL;
    ln->busy = 1;
    workq_submit(h->wq, &b->job);
}

static void submit_lookup(http_server *h, struct evhttp_request *req, const char *path,
                          const char *query, const char *name, size_t name_len) {
    lookup_lane *ln = h->lanes;
    while (ln && !(ln->name_len == name_len && memcmp(ln->name, name, name_len) == 0))
        ln = ln->next;
    if (!ln) {
        ln = calloc(1, sizeof *ln + name_len + 1);
        if (!ln) tm_oom();
        memcpy(ln->name, name, name_len);
        ln->name_len = name_len;
        ln->next = h->lanes;
        h->lanes = ln;
    }
    http_job *jb = job_new(h, req, JOB_PROJ, path, query, NULL, 0);
    if (ln->tail) ln->tail->lnext = jb;
    else ln->head = jb;
    ln->tail = jb;
    lane_kick(h, ln);
}

static void wq_notify(void *ud) {
    http_server *h = ud;
    event_active(h->wq_ev, 0, 0);
}

static void on_wq(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    http_server *h = arg;
    workq_complete(h->wq);
}

/* ---- appends: parsed on the loop, committed by the store's writer ----
 * No thread per request: the writer thread calls append_committed after
 * the group commit; the loop replies.  Many appends share one fsync. */

typedef struct append_ctx {
    http_server *h;
    struct evhttp_request *req;   /* NULL once the connection is gone */
    api_append_op *op;
    struct append_ctx *next;
} append_ctx;

static void append_conn_closed(struct evhttp_connection *evcon, void *arg) {
    (void)evcon;
    append_ctx *ac = arg;
    free_if_detached(ac->req);
    ac->req = NULL;
}

/* Writer thread. */
static void append_committed(void *ud, int rc, const tm_err *err) {
    append_ctx *ac = ud;
    http_server *h = ac->h;
    api_append_result(ac->op, rc, err);
    pthread_mutex_lock(&h->append_mu);
    ac->next = h->append_done;
    h->append_done = ac;
    pthread_mutex_unlock(&h->append_mu);
    event_active(h->append_ev, 0, 0);
}

static void on_appends_done(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    http_server *h = arg;
    pthread_mutex_lock(&h->append_mu);
    append_ctx *ac = h->append_done;
    h->append_done = NULL;
    pthread_mutex_unlock(&h->append_mu);
    append_ctx *rev = NULL;   /* reply in commit order */
    while (ac) {
        append_ctx *n = ac->next;
        ac->next = rev;
        rev = ac;
        ac = n;
    }
    while (rev) {
        append_ctx *n = rev->next;
        h->appends_inflight--;
        if (rev->req) {
            struct evhttp_connection *evcon = evhttp_request_get_connection(rev->req);
            if (evcon) httpconn_set_closecb(evcon, NULL, NULL);
            api_reply rp;
            api_reply_init(&rp);
            api_append_finish(h->st, rev->op, &rp);
            send_api_reply(rev->req, &rp, NULL);
            api_reply_free(&rp);
        }
        api_append_free(rev->op);
        free(rev);
        rev = n;
    }
}

static void start_append(http_server *h, struct evhttp_request *req, const char *path,
                         const char *stream, size_t stream_len) {
    struct evkeyvalq *ih = evhttp_request_get_input_headers(req);
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t blen = evbuffer_get_length(in);
    api_request rq;
    memset(&rq, 0, sizeof rq);
    rq.method = "POST";
    rq.path = path;
    rq.stream = stream;
    rq.stream_len = stream_len;
    rq.content_type = evhttp_find_header(ih, "Content-Type");
    rq.expected_version = evhttp_find_header(ih, "Expected-Version");
    rq.body = blen ? (const char *)evbuffer_pullup(in, -1) : "";
    rq.body_len = blen;
    api_reply rp;
    api_reply_init(&rp);
    api_append_op *op = api_append_parse(&rq, &rp);
    if (!op) {
        send_api_reply(req, &rp, NULL);
        api_reply_free(&rp);
        return;
    }
    append_ctx *ac = calloc(1, sizeof *ac);
    if (!ac) tm_oom();
    ac->h = h;
    ac->req = req;
    ac->op = op;
    if (api_append_start(h->st, op, append_committed, ac, &rp) != 0) {
        send_api_reply(req, &rp, NULL);
        api_reply_free(&rp);
        api_append_free(op);
        free(ac);
        return;
    }
    api_reply_free(&rp);
    h->appends_inflight++;
    httpconn_set_closecb(evhttp_request_get_connection(req), append_conn_closed, ac);
}

/* ---- SSE connections (the sse.h sink) ---- */

/* Messages are staged per connection and sent as one chunk per loop
 * callback (flush_ev): a commit of many events costs one chunk write per
 * client, not one per event. */
typedef struct sse_conn {
    http_server *h;
    struct evhttp_request *req;
    struct evhttp_connection *evcon;
    sse_client *client;
    struct evbuffer *stage;       /* written by the hub, not yet handed to evhttp */
    struct sse_conn *dirty_next;  /* on h->dirty while stage is non-empty */
    int dirty;
    char peer[64];
} sse_conn;

static void sse_drained(struct evhttp_connection *evcon, void *arg);

static void sse_flush_one(sse_conn *sc) {
    if (evbuffer_get_length(sc->stage))
        evhttp_send_reply_chunk_with_cb(sc->req, sc->stage, sse_drained, sc);
}

static void sse_undirty(sse_conn *sc) {
    if (!sc->dirty) return;
    for (sse_conn **pp = &sc->h->dirty; *pp; pp = &(*pp)->dirty_next)
        if (*pp == sc) {
            *pp = sc->dirty_next;
            break;
        }
    sc->dirty = 0;
}

static void on_sse_flush(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    http_server *h = arg;
    sse_conn *sc = h->dirty;
    h->dirty = NULL;
    while (sc) {
        sse_conn *n = sc->dirty_next;
        sc->dirty = 0;
        sse_flush_one(sc);
        sc = n;
    }
}

static void sse_conn_free(sse_conn *sc) {
    sse_undirty(sc);
    evbuffer_free(sc->stage);
    free(sc);
}

static void sse_drained(struct evhttp_connection *evcon, void *arg) {
    (void)evcon;
    sse_conn *sc = arg;
    if (sc->client) sse_client_drained(sc->client);
}

static void sink_write(void *conn, const sse_piece *p, int n) {
    sse_conn *sc = conn;
    for (int i = 0; i < n; i++)
        if (p[i].n) evbuffer_add(sc->stage, p[i].p, p[i].n);
    if (!sc->dirty) {
        sc->dirty = 1;
        sc->dirty_next = sc->h->dirty;
        sc->h->dirty = sc;
        event_active(sc->h->flush_ev, 0, 0);
    }
}

static size_t sink_pending(void *conn) {
    sse_conn *sc = conn;
    struct bufferevent *bev = evhttp_connection_get_bufferevent(sc->evcon);
    return evbuffer_get_length(sc->stage) +
           (bev ? evbuffer_get_length(bufferevent_get_output(bev)) : 0);
}

static void sink_end(void *conn) {
    sse_conn *sc = conn;
    httpconn_set_closecb(sc->evcon, NULL, NULL);
    log_line("info", "msg=\"sse client ended\" peer=%s", sc->peer);
    sse_flush_one(sc);
    httpconn_request_end(sc->evcon);
    evhttp_send_reply_end(sc->req);
    sse_conn_free(sc);
}

static void sink_schedule(void *ud) {
    http_server *h = ud;
    event_active(h->sse_run_ev, 0, 0);
}

static const sse_sink http_sink = {sink_write, sink_pending, sink_end, sink_schedule};

static void sse_conn_closed(struct evhttp_connection *evcon, void *arg) {
    (void)evcon;
    sse_conn *sc = arg;
    log_line("info", "msg=\"sse client disconnected\" peer=%s", sc->peer);
    if (sc->client) sse_client_gone(sc->client);
    free_if_detached(sc->req);
    sse_conn_free(sc);
}

static void on_sse_run(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    http_server *h = arg;
    sse_hub_run(h->hub);
}

static void on_heartbeat(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    http_server *h = arg;
    sse_hub_heartbeat(h->hub);
}

static void on_commit(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    http_server *h = arg;
    if (sse_hub_commit(h->hub, atomic_load(&h->committed))) event_active(h->commit_ev, 0, 0);
}

void http_notify_commit(http_server *h, uint64_t last) {
    uint64_t cur = atomic_load(&h->committed);
    while (cur < last && !atomic_compare_exchange_weak(&h->committed, &cur, last)) {
    }
    event_active(h->commit_ev, 0, 0);
}

void http_publish(http_server *h, const char *channel, size_t clen, const char *json,
                  size_t jlen) {
    pub_msg *m = malloc(sizeof *m + clen + jlen);
    if (!m) tm_oom();
    m->next = NULL;
    m->clen = clen;
    m->jlen = jlen;
    memcpy(m->data, channel, clen);
    memcpy(m->data + clen, json, jlen);
    pthread_mutex_lock(&h->pub_mu);
    if (h->pub_tail) h->pub_tail->next = m;
    else h->pub_head = m;
    h->pub_tail = m;
    pthread_mutex_unlock(&h->pub_mu);
    event_active(h->pub_ev, 0, 0);
}

static void on_publish(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    http_server *h = arg;
    pthread_mutex_lock(&h->pub_mu);
    pub_msg *m = h->pub_head;
    h->pub_head = h->pub_tail = NULL;
    pthread_mutex_unlock(&h->pub_mu);
    while (m) {
        pub_msg *n = m->next;
        sse_hub_publish(h->hub, m->data, m->clen, m->data + m->clen, m->jlen);
        free(m);
        m = n;
    }
}

/* Start an SSE response for the given subscriptions (specs[i], with an
 * optional type filter).  named: multiplexed messages carry `event:`. */
static void start_sse(http_server *h, struct evhttp_request *req, const char *query,
                      const char **specs, const size_t *lens, int nspecs, const char *type,
                      size_t tlen, int named) {
    struct evkeyvalq *ih = evhttp_request_get_input_headers(req);
    uint64_t after = sse_hub_position(h->hub);
    const char *lei = evhttp_find_header(ih, "Last-Event-ID");
    buf v = BUF_INIT;
    char *end = NULL;
    if (lei && *lei) {
        errno = 0;
        after = strtoull(lei, &end, 10);
        if (errno || *end || lei[0] == '-') {
            buf_free(&v);
            send_error(req, 400, NULL, "Last-Event-ID must be a position");
            return;
        }
    } else if (api_query_get(query, "last_event_id", &v) || api_query_get(query, "after", &v)) {
        errno = 0;
        after = strtoull(v.ptr, &end, 10);
        if (!v.len || errno || *end || v.ptr[0] == '-') {
            buf_free(&v);
            send_error(req, 400, NULL, "last_event_id must be a position");
            return;
        }
    } else if (api_query_get(query, "from", &v)) {
        errno = 0;
        uint64_t from = strtoull(v.ptr, &end, 10);
        if (!v.len || errno || *end || v.ptr[0] == '-') {
            buf_free(&v);
            send_error(req, 400, NULL, "from must be a position");
            return;
        }
        after = from ? from - 1 : 0;
    }
    buf_free(&v);

    sse_conn *sc = calloc(1, sizeof *sc);
    if (!sc) tm_oom();
    sc->stage = evbuffer_new();
    sc->h = h;
    sc->req = req;
    sc->evcon = evhttp_request_get_connection(req);
    char *addr = NULL;
    ev_uint16_t port = 0;
    evhttp_connection_get_peer(sc->evcon, &addr, &port);
    snprintf(sc->peer, sizeof sc->peer, "%s:%u", addr ? addr : "?", (unsigned)port);
    sse_client *c = sse_client_new(h->hub, sc, after, named);
    tm_err err;
    err_clear(&err);
    for (int i = 0; i < nspecs; i++) {
        if (sse_client_subscribe(c, specs[i], lens[i], type, tlen, &err) != 0) {
            sse_client_gone(c);
            sse_conn_free(sc);
            send_error(req, 400, NULL, "%s", err.msg);
            return;
        }
    }
    sc->client = c;
    struct evkeyvalq *oh = evhttp_request_get_output_headers(req);
    evhttp_add_header(oh, "Content-Type", "text/event-stream");
    evhttp_add_header(oh, "Cache-Control", "no-cache");
    evhttp_add_header(oh, "X-Accel-Buffering", "no");
    evhttp_add_header(oh, "Connection", "close");
    metrics_http_response(200);
    evhttp_send_reply_start(req, 200, "OK");
    /* A stream is idle on the read side by nature: no read timeout (evhttp
     * keeps reading only to notice the close), bounded unread input, and
     * the write timeout still drops clients that stop taking bytes. */
    struct bufferevent *bev = evhttp_connection_get_bufferevent(sc->evcon);
    if (bev) {
        struct timeval wt = {h->o.timeout_s, 0};
        bufferevent_set_timeouts(bev, NULL, &wt);
        bufferevent_setwatermark(bev, EV_READ, 0, 64 * 1024);
    }
    httpconn_set_closecb(sc->evcon, sse_conn_closed, sc);
    log_line("info", "msg=\"sse client connected\" peer=%s uri=\"%.200s\" after=%llu", sc->peer,
             evhttp_request_get_uri(req), (unsigned long long)after);
    sse_client_start(c);
}

/* ---- auth ---- */

static int ct_equal(const char *a, size_t al, const char *b, size_t bl) {
    unsigned char d = (unsigned char)(al != bl);
    size_t n = al < bl ? al : bl;
    for (size_t i = 0; i < n; i++) d |= (unsigned char)(a[i] ^ b[i]);
    return d == 0;
}

/* 1 when the request may write (no tokens configured, or a valid bearer). */
static int authorized(http_server *h, struct evhttp_request *req) {
    if (h->ntokens == 0) return 1;
    const char *a = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (!a || strncasecmp(a, "Bearer ", 7) != 0) return 0;
    const char *t = a + 7;
    size_t tl = strlen(t);
    int ok = 0;
    for (int i = 0; i < h->ntokens; i++) ok |= ct_equal(t, tl, h->tokens[i], strlen(h->tokens[i]));
    return ok;
}

static int load_tokens(http_server *h, const char *path, tm_err *err) {
    FILE *f = fopen(path, "r");
    if (!f) return err_set(err, TM_EIO, "token file %s: %s", path, strerror(errno));
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        size_t n = strcspn(line, "\r\n");
        line[n] = '\0';
        char *s = line;
        while (*s == ' ' || *s == '\t') s++;
        n = strlen(s);
        while (n && (s[n - 1] == ' ' || s[n - 1] == '\t')) s[--n] = '\0';
        if (!n || s[0] == '#') continue;
        if (h->ntokens == MAX_TOKENS) {
            fclose(f);
            return err_set(err, TM_EINVAL, "token file %s: more than %d tokens", path, MAX_TOKENS);
        }
        h->tokens[h->ntokens++] = strdup(s);
    }
    fclose(f);
    if (h->ntokens == 0) return err_set(err, TM_EINVAL, "token file %s holds no token", path);
    return 0;
}

/* ---- routing ---- */

static const struct http_asset *find_asset(const char *path) {
    for (const struct http_asset *a = http_assets; a->path; a++)
        if (strcmp(a->path, path) == 0) return a;
    return NULL;
}

static size_t header_bytes(struct evhttp_request *req) {
    struct evkeyvalq *ih = evhttp_request_get_input_headers(req);
    const char *uri = evhttp_request_get_uri(req);
    size_t n = uri ? strlen(uri) + 16 : 16;
    for (struct evkeyval *kv = ih->tqh_first; kv; kv = kv->next.tqe_next)
        n += strlen(kv->key) + strlen(kv->value) + 4;
    return n;
}

static int is_get(enum evhttp_cmd_type c) { return c == EVHTTP_REQ_GET || c == EVHTTP_REQ_HEAD; }

/* RFC 9110 token characters (header field names). */
static int is_tchar(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* Message framing that a proxy in front could read differently from
 * libevent (request smuggling): NULL when the request is unambiguous, else
 * why not.  libevent itself refuses Content-Length together with
 * Transfer-Encoding, unknown transfer codings and bad chunk sizes; it does
 * not refuse, and frames by the first one of: several Content-Length
 * headers, a signed Content-Length ("+5"), a body declared on a HEAD request
 * (which it leaves unread, to be parsed as the next request), several
 * Transfer-Encoding headers, or a field name holding whitespace
 * ("Transfer-Encoding : chunked" is no header to libevent but may be one to
 * a lenient proxy), a transfer coding other than "chunked" (libevent then
 * reads no body and parses it as the next request).  Such requests get 400
 * and the connection is closed, so bytes after them are never parsed as
 * another request. */
static const char *framing_problem(struct evhttp_request *req) {
    struct evkeyvalq *ih = evhttp_request_get_input_headers(req);
    int ncl = 0, nte = 0;
    const char *cl = NULL, *te = NULL;
    for (struct evkeyval *kv = ih->tqh_first; kv; kv = kv->next.tqe_next) {
        if (!kv->key[0]) return "empty header name";
        for (const char *p = kv->key; *p; p++)
            if (!is_tchar((unsigned char)*p)) return "malformed header name";
        if (strcasecmp(kv->key, "Content-Length") == 0) {
            ncl++;
            cl = kv->value;
        } else if (strcasecmp(kv->key, "Transfer-Encoding") == 0) {
            nte++;
            te = kv->value;
        }
    }
    if (ncl > 1) return "more than one Content-Length header";
    if (nte > 1) return "more than one Transfer-Encoding header";
    if (te) {
        /* libevent reads no body at all for a coding it does not know. */
        while (*te == ' ' || *te == '\t') te++;
        size_t n = strlen(te);
        while (n && (te[n - 1] == ' ' || te[n - 1] == '\t')) n--;
        if (n != 7 || strncasecmp(te, "chunked", 7) != 0)
            return "Transfer-Encoding other than chunked is not supported";
    }
    if (cl) {
        const char *p = cl;
        while (*p == ' ' || *p == '\t') p++;
        if (!(*p >= '0' && *p <= '9')) return "Content-Length must be a decimal number";
        errno = 0;
        char *end = NULL;
        unsigned long long n = strtoull(p, &end, 10);
        while (*end == ' ' || *end == '\t') end++;
        if (errno || *end) return "Content-Length must be a decimal number";
        /* libevent reads no body for HEAD (and the like): the declared
         * bytes would become the next request. */
        if (n != evbuffer_get_length(evhttp_request_get_input_buffer(req)))
            return "the request body does not match its Content-Length";
    }
    return NULL;
}

static void route_metrics(http_server *h, struct evhttp_request *req) {
    buf b = BUF_INIT;
    metrics_set(METRICS_LAST_POSITION, store_last_position(h->st));
    uint64_t synced = 0;
    metrics_set(METRICS_STORE_COMMITS, store_commits(h->st, &synced));
    metrics_set(METRICS_STORE_SYNCS, synced);
    metrics_render(&b);
    if (h->proj.metrics) h->proj.metrics(h->proj.ud, &b);
    send_reply(req, 200, "text/plain; version=0.0.4", b.ptr ? b.ptr : "", b.len, NULL);
    buf_free(&b);
}

static void route_health(http_server *h, struct evhttp_request *req) {
    api_reply rp;
    api_reply_init(&rp);
    api_health(h->st, &rp);
    send_api_reply(req, &rp, NULL);
    api_reply_free(&rp);
}

/* /live?sub=...&sub=... */
static void route_live(http_server *h, struct evhttp_request *req, const char *query) {
    enum { MAX_SUBS = 32 };
    buf k = BUF_INIT, v = BUF_INIT;
    char *specs[MAX_SUBS];
    const char *cspecs[MAX_SUBS];
    size_t lens[MAX_SUBS];
    int n = 0, too_many = 0;
    size_t pos = 0;
    while (api_query_next(query, &pos, &k, &v)) {
        if (strcmp(k.ptr, "sub") != 0) continue;
        if (n == MAX_SUBS) { too_many = 1; break; }
        lens[n] = v.len;
        specs[n] = malloc(v.len + 1);
        memcpy(specs[n], v.ptr, v.len + 1);
        cspecs[n] = specs[n];
        n++;
    }
    buf_free(&k);
    buf_free(&v);
    if (too_many) send_error(req, 400, NULL, "at most %d subscriptions per connection", MAX_SUBS);
    else if (n == 0) send_error(req, 400, NULL, "no subscription: use /live?sub=all&sub=stream:S...");
    else start_sse(h, req, query, cspecs, lens, n, NULL, 0, 1);
    for (int i = 0; i < n; i++) free(specs[i]);
}

/* Does the query name a partition (`partition=` present)? */
static int is_partition_query(const char *query) {
    buf v = BUF_INIT;
    int has = query && api_query_get(query, "partition", &v) == 1;
    buf_free(&v);
    return has;
}

static void on_request(struct evhttp_request *req, void *arg) {
    http_server *h = arg;
    httpconn_request_begin(evhttp_request_get_connection(req));
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(req);
    const char *path = u ? evhttp_uri_get_path(u) : NULL;
    const char *query = u ? evhttp_uri_get_query(u) : NULL;
    if (!path || !*path) path = "/";

    if (h->stopping) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Connection", "close");
        send_error(req, 503, NULL, "server is shutting down");
        return;
    }
    const char *framing = framing_problem(req);
    if (framing) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Connection", "close");
        send_error(req, 400, NULL, "%s", framing);
        return;
    }
    if (header_bytes(req) > h->o.max_headers) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Connection", "close");
        send_error(req, 431, NULL, "request headers larger than %zu bytes", h->o.max_headers);
        return;
    }
    if (evbuffer_get_length(evhttp_request_get_input_buffer(req)) > h->o.max_body) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Connection", "close");
        send_error(req, 413, NULL, "request body larger than %zu bytes", h->o.max_body);
        return;
    }

    /* Split the path into at most 4 segments. */
    const char *sp[4] = {0};
    size_t sl[4] = {0};
    int nseg = 0;
    for (const char *p = path; *p;) {
        if (*p == '/') { p++; continue; }
        const char *e = strchr(p, '/');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (nseg == 4) { nseg = 5; break; }
        sp[nseg] = p;
        sl[nseg] = n;
        nseg++;
        p += n;
    }
#define SEG(i, s) (sl[i] == sizeof(s) - 1 && memcmp(sp[i], s, sizeof(s) - 1) == 0)

    if (nseg == 0) {
        if (!is_get(cmd)) { send_error(req, 405, "GET", "method not allowed"); return; }
        const struct http_asset *a = find_asset("/");
        if (!a) { send_error(req, 404, NULL, "dashboard not built in"); return; }
        send_reply(req, 200, a->type, (const char *)a->data, a->len, NULL);
        return;
    }
    if (SEG(0, "dashboard") && nseg == 2) {
        const struct http_asset *a = find_asset(path);
        if (!a) { send_error(req, 404, NULL, "no such asset"); return; }
        if (!is_get(cmd)) { send_error(req, 405, "GET", "method not allowed"); return; }
        evhttp_add_header(evhttp_request_get_output_headers(req), "Cache-Control", "max-age=3600");
        send_reply(req, 200, a->type, (const char *)a->data, a->len, NULL);
        return;
    }
    if (nseg == 1 && SEG(0, "health")) {
        if (!is_get(cmd)) { send_error(req, 405, "GET", "method not allowed"); return; }
        route_health(h, req);
        return;
    }
    if (nseg == 1 && SEG(0, "metrics")) {
        if (!is_get(cmd)) { send_error(req, 405, "GET", "method not allowed"); return; }
        route_metrics(h, req);
        return;
    }
    if (nseg == 1 && SEG(0, "live")) {
        if (cmd != EVHTTP_REQ_GET) { send_error(req, 405, "GET", "method not allowed"); return; }
        route_live(h, req, query);
        return;
    }
    if (nseg == 1 && SEG(0, "categories")) {
        if (!is_get(cmd)) { send_error(req, 405, "GET", "method not allowed"); return; }
        submit_job(h, req, JOB_CATEGORIES, path, query, NULL, 0);
        return;
    }
    if (SEG(0, "all") && nseg <= 2) {
        if (nseg == 2 && !SEG(1, "live")) { send_error(req, 404, NULL, "no such route"); return; }
        if (nseg == 2 ? cmd != EVHTTP_REQ_GET : !is_get(cmd)) {
            send_error(req, 405, "GET", "method not allowed");
            return;
        }
        if (nseg == 1) {
            submit_job(h, req, JOB_READ_ALL, path, query, NULL, 0);
            return;
        }
        buf cat = BUF_INIT, type = BUF_INIT, spec = BUF_INIT;
        int hc = api_query_get(query, "category", &cat) && cat.len;
        int ht = api_query_get(query, "type", &type) && type.len;
        if (hc) { buf_puts(&spec, "category:"); buf_append(&spec, cat.ptr, cat.len); }
        else buf_puts(&spec, "all");
        const char *specs[1] = {spec.ptr};
        size_t lens[1] = {spec.len};
        start_sse(h, req, query, specs, lens, 1, ht ? type.ptr : NULL, ht ? type.len : 0, 0);
        buf_free(&cat);
        buf_free(&type);
        buf_free(&spec);
        return;
    }
    if (SEG(0, "streams") && nseg <= 3) {
        if (nseg == 1) {
            if (!is_get(cmd)) { send_error(req, 405, "GET", "method not allowed"); return; }
            submit_job(h, req, JOB_LIST_STREAMS, path, query, NULL, 0);
            return;
        }
        if (nseg == 3 && !SEG(2, "live")) { send_error(req, 404, NULL, "no such route"); return; }
        buf name = BUF_INIT;
        if (api_url_decode(&name, sp[1], sl[1], 0) != 0 || name.len == 0) {
            buf_free(&name);
            send_error(req, 400, NULL, "bad stream name in the path");
            return;
        }
        if (nseg == 2) {
            if (cmd == EVHTTP_REQ_POST) {
                if (!authorized(h, req)) send_error(req, 401, NULL, "a valid bearer token is required to write");
                else start_append(h, req, path, name.ptr, name.len);
            } else if (is_get(cmd)) {
                submit_job(h, req, JOB_READ_STREAM, path, query, name.ptr, name.len);
            } else {
                send_error(req, 405, "GET, POST", "method not allowed");
            }
            buf_free(&name);
            return;
        }
        if (cmd != EVHTTP_REQ_GET) {
            buf_free(&name);
            send_error(req, 405, "GET", "method not allowed");
            return;
        }
        buf spec = BUF_INIT, type = BUF_INIT;
        buf_puts(&spec, "stream:");
        buf_append(&spec, name.ptr, name.len);
        int ht = api_query_get(query, "type", &type) && type.len;
        const char *specs[1] = {spec.ptr};
        size_t lens[1] = {spec.len};
        start_sse(h, req, query, specs, lens, 1, ht ? type.ptr : NULL, ht ? type.len : 0, 0);
        buf_free(&spec);
        buf_free(&type);
        buf_free(&name);
        return;
    }
    if (SEG(0, "projections")) {
        if (nseg == 3 && SEG(2, "live")) {
            if (cmd != EVHTTP_REQ_GET) { send_error(req, 405, "GET", "method not allowed"); return; }
            buf name = BUF_INIT, spec = BUF_INIT;
            if (api_url_decode(&name, sp[1], sl[1], 0) != 0 || name.len == 0) {
                buf_free(&name);
                send_error(req, 400, NULL, "bad projection name in the path");
                return;
            }
            buf_puts(&spec, "projection:");
            buf_append(&spec, name.ptr, name.len);
            const char *specs[1] = {spec.ptr};
            size_t lens[1] = {spec.len};
            start_sse(h, req, query, specs, lens, 1, NULL, 0, 0);
            buf_free(&name);
            buf_free(&spec);
            return;
        }
        /* The token first: an unauthenticated write learns nothing else. */
        if (!is_get(cmd) && !authorized(h, req)) {
            send_error(req, 401, NULL, "a valid bearer token is required to change projections");
            return;
        }
        if (!h->proj.handle) {
            send_error(req, 501, NULL, "projections are not available in this server yet");
            return;
        }
        if (is_get(cmd) && nseg >= 3 && nseg <= 4 && SEG(2, "state") &&
            (nseg == 4 || is_partition_query(query))) {
            submit_lookup(h, req, path, query, sp[1], sl[1]);
            return;
        }
        submit_job(h, req, JOB_PROJ, path, query, NULL, 0);
        return;
    }
    send_error(req, 404, NULL, "no such route: %.200s", path);
#undef SEG
}

/* ---- accept errors ----
 * Out of descriptors (EMFILE, ENFILE) or memory, accept() fails while the
 * pending connection keeps the listening socket readable: libevent would
 * retry at once, forever (a busy loop writing a warning per try: tens of MB
 * of log per second).  Pause accepting for a moment instead; waiting
 * clients stay in the kernel's backlog until descriptors are free. */

#define ACCEPT_PAUSE_US 100000

static void on_accept_resume(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    http_server *h = arg;
    if (h->sock) evconnlistener_enable(evhttp_bound_socket_get_listener(h->sock));
}

static double since(const struct timespec *t0);

/* libevent passes the listener's argument, the struct evhttp, to the error
 * callback: find its server here. */
static pthread_mutex_t servers_mu = PTHREAD_MUTEX_INITIALIZER;
static http_server *servers;   /* linked by next_server */

static http_server *server_of(struct evhttp *http) {
    pthread_mutex_lock(&servers_mu);
    http_server *h = servers;
    while (h && h->http != http) h = h->next_server;
    pthread_mutex_unlock(&servers_mu);
    return h;
}

static void servers_del(http_server *h) {
    pthread_mutex_lock(&servers_mu);
    for (http_server **pp = &servers; *pp; pp = &(*pp)->next_server)
        if (*pp == h) {
            *pp = h->next_server;
            break;
        }
    pthread_mutex_unlock(&servers_mu);
}

static void on_accept_error(struct evconnlistener *l, void *arg) {
    int e = EVUTIL_SOCKET_ERROR();
    http_server *h = server_of(arg);
    if (!h) return;
    evconnlistener_disable(l);
    struct timeval tv = {0, ACCEPT_PAUSE_US};
    event_add(h->accept_ev, &tv);
    h->accept_fails++;
    if (h->accept_log_t.tv_sec == 0 || since(&h->accept_log_t) >= 10.0) {   /* one line per 10 s */
        log_line("warn", "msg=\"accept failed; pausing new connections\" error=\"%s\" pause_ms=%d failures=%lu",
                 strerror(e), ACCEPT_PAUSE_US / 1000, h->accept_fails);
        clock_gettime(CLOCK_MONOTONIC, &h->accept_log_t);
        h->accept_fails = 0;
    }
}

/* ---- signals and shutdown ---- */

static double since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - t0->tv_sec) + (double)(t.tv_nsec - t0->tv_nsec) / 1e9;
}

static void on_stop_tick(evutil_socket_t fd, short what, void *arg) {
    (void)fd, (void)what;
    http_server *h = arg;
    if (h->stopping == 1) {
        unsigned n = workq_inflight(h->wq) + h->appends_inflight;
        if (n > 0 && since(&h->stop_t) < 30.0) return;
        if (n > 0) log_line("warn", "msg=\"shutdown: giving up waiting\" inflight=%u", n);
        sse_hub_close_all(h->hub, "server shutting down");
        h->stopping = 2;
        clock_gettime(CLOCK_MONOTONIC, &h->stop_t);
        return;
    }
    if (since(&h->stop_t) >= 0.3) event_base_loopbreak(h->base);
}

static void begin_shutdown(http_server *h) {
    if (h->stopping) return;
    h->stopping = 1;
    clock_gettime(CLOCK_MONOTONIC, &h->stop_t);
    if (h->sock) {
        evhttp_del_accept_socket(h->http, h->sock);
        h->sock = NULL;
    }
    log_line("info", "msg=\"shutting down\" inflight=%u sse_clients=%u", workq_inflight(h->wq),
             sse_hub_nclients(h->hub));
    struct timeval tv = {0, 20000};
    h->stop_ev = event_new(h->base, -1, EV_PERSIST, on_stop_tick, h);
    event_add(h->stop_ev, &tv);
}

static void on_signal(evutil_socket_t sig, short what, void *arg) {
    (void)what;
    http_server *h = arg;
    if (sig == SIGHUP) {
        log_line("info", "msg=\"SIGHUP\" action=%s", h->proj.reload ? "reload projections" : "none (no projections)");
        if (h->proj.reload) h->proj.reload(h->proj.ud);
        return;
    }
    log_line("info", "msg=\"signal\" signal=%s", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    if (h->stopping) {
        log_line("warn", "msg=\"second signal: stopping now\"");
        event_base_loopbreak(h->base);
        return;
    }
    begin_shutdown(h);
}

/* ---- lifecycle ---- */

void http_opts_default(http_opts *o) {
    memset(o, 0, sizeof *o);
    o->bind = "127.0.0.1";
    o->port = 0;
    o->max_body = 8u << 20;
    o->max_headers = 64u << 10;
    o->timeout_s = 60;
    o->request_timeout_s = 30;
    o->workers = 64;
    o->sse_max_pending = 4u << 20;
    o->heartbeat_s = 15;
}

static int bound_port(struct evhttp_bound_socket *s) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(evhttp_bound_socket_get_fd(s), (struct sockaddr *)&ss, &len) != 0) return -1;
    if (ss.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6) return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return -1;
}

http_server *http_new(store *st, const http_opts *o, tm_err *err) {
    static int threads_on;
    if (!threads_on) {
        if (evthread_use_pthreads() != 0) {
            err_set(err, TM_EIO, "libevent: no pthreads support");
            return NULL;
        }
        threads_on = 1;
    }
    http_server *h = calloc(1, sizeof *h);
    if (!h) tm_oom();
    h->st = st;
    if (o) h->o = *o;
    else http_opts_default(&h->o);
    if (!h->o.bind) h->o.bind = "127.0.0.1";
    if (!h->o.max_body) h->o.max_body = 8u << 20;
    if (!h->o.max_headers) h->o.max_headers = 64u << 10;
    if (h->o.timeout_s <= 0) h->o.timeout_s = 60;
    if (h->o.request_timeout_s <= 0) h->o.request_timeout_s = 30;
    if (!h->o.workers) h->o.workers = 64;
    if (h->o.heartbeat_s <= 0) h->o.heartbeat_s = 15;
    pthread_mutex_init(&h->pub_mu, NULL);
    pthread_mutex_init(&h->append_mu, NULL);
    atomic_store(&h->committed, store_last_position(st));
    metrics_set(METRICS_LAST_POSITION, store_last_position(st));

    if (h->o.token_file && load_tokens(h, h->o.token_file, err) != 0) goto fail;
    /* The changelist folds the epoll_ctl calls of one loop iteration (evhttp
     * toggles read/write interest several times per request). */
    struct event_config *cfg = event_config_new();
    if (cfg) event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    h->base = cfg ? event_base_new_with_config(cfg) : NULL;
    if (cfg) event_config_free(cfg);
    if (!h->base) h->base = event_base_new();
    h->http = h->base ? evhttp_new(h->base) : NULL;
    if (!h->http) {
        err_set(err, TM_EIO, "libevent: cannot create the HTTP server");
        goto fail;
    }
    /* Hard limits a little above the configured ones: up to them our
     * handler answers 413/431 with JSON bodies; beyond them libevent cuts
     * the request before buffering it (its own 413 for bodies and 400 for
     * headers, HTML bodies; libevent 2.1 has no hook for those replies). */
    evhttp_set_max_body_size(h->http, (ev_ssize_t)(h->o.max_body + HTTP_BODY_SLACK));
    evhttp_set_max_headers_size(h->http, (ev_ssize_t)(h->o.max_headers * 4));
    evhttp_set_timeout(h->http, h->o.timeout_s);
    h->conns = httpconn_new(h->http, h->o.request_timeout_s);
    if (!h->conns) {
        err_set(err, TM_EIO, "cannot set up the connection guard");
        goto fail;
    }
    evhttp_set_allowed_methods(h->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                            EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
    evhttp_set_gencb(h->http, on_request, h);
    h->sock = evhttp_bind_socket_with_handle(h->http, h->o.bind, (ev_uint16_t)h->o.port);
    if (!h->sock) {
        err_set(err, TM_EIO, "cannot listen on %s:%d: %s", h->o.bind, h->o.port, strerror(errno));
        goto fail;
    }
    h->port = bound_port(h->sock);
    /* No Nagle: an SSE message or a reply is written whole and must leave
     * at once, not wait for the ACK of the previous one (with the peer's
     * delayed ACK that was up to 40 ms).  Accepted sockets inherit it. */
    int one = 1;
    setsockopt(evhttp_bound_socket_get_fd(h->sock), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    h->accept_ev = event_new(h->base, -1, 0, on_accept_resume, h);
    pthread_mutex_lock(&servers_mu);
    h->next_server = servers;
    servers = h;
    pthread_mutex_unlock(&servers_mu);
    evconnlistener_set_error_cb(evhttp_bound_socket_get_listener(h->sock), on_accept_error);
    h->wq = workq_new(h->o.workers, wq_notify, h);
    if (!h->wq) {
        err_set(err, TM_EIO, "cannot start worker threads");
        goto fail;
    }
    h->hub = sse_hub_new(st, &http_sink, h, h->o.sse_max_pending);
    h->wq_ev = event_new(h->base, -1, 0, on_wq, h);
    h->append_ev = event_new(h->base, -1, 0, on_appends_done, h);
    h->commit_ev = event_new(h->base, -1, 0, on_commit, h);
    h->sse_run_ev = event_new(h->base, -1, 0, on_sse_run, h);
    h->flush_ev = event_new(h->base, -1, 0, on_sse_flush, h);
    h->pub_ev = event_new(h->base, -1, 0, on_publish, h);
    h->hb_ev = event_new(h->base, -1, EV_PERSIST, on_heartbeat, h);
    struct timeval hb = {h->o.heartbeat_s, 0};
    event_add(h->hb_ev, &hb);
    int sigs[3] = {SIGTERM, SIGINT, SIGHUP};
    for (int i = 0; i < 3; i++) {
        h->sig_ev[i] = evsignal_new(h->base, sigs[i], on_signal, h);
        event_add(h->sig_ev[i], NULL);
    }
    return h;
fail:
    http_free(h);
    return NULL;
}

int http_port(const http_server *h) { return h->port; }

void http_set_projections(http_server *h, const http_projections *p) {
    if (p) h->proj = *p;
    else memset(&h->proj, 0, sizeof h->proj);
}

int http_run(http_server *h) {
    log_line("info", "msg=\"listening\" bind=%s port=%d workers=%u", h->o.bind, h->port,
             h->o.workers);
    event_base_dispatch(h->base);
    log_line("info", "msg=\"stopped\" last_position=%llu",
             (unsigned long long)store_last_position(h->st));
    return 0;
}

void http_free(http_server *h) {
    if (!h) return;
    servers_del(h);
    h->freeing = 1;
    /* Appends the store still holds call back into this server: let them land. */
    while (h->base && h->appends_inflight) event_base_loop(h->base, EVLOOP_ONCE);
    /* Workers first: their done() callbacks may still reply. */
    if (h->wq) workq_free(h->wq);
    if (h->hub) sse_hub_free(h->hub);
    if (h->http) evhttp_free(h->http);
    httpconn_free(h->conns); /* after evhttp_free: every connection is gone */
    struct event *evs[] = {h->wq_ev, h->append_ev, h->flush_ev, h->commit_ev, h->sse_run_ev, h->pub_ev, h->hb_ev,
                           h->stop_ev, h->accept_ev, h->sig_ev[0], h->sig_ev[1], h->sig_ev[2]};
    for (size_t i = 0; i < sizeof evs / sizeof evs[0]; i++)
        if (evs[i]) event_free(evs[i]);
    pub_msg *m = h->pub_head;
    while (m) {
        pub_msg *n = m->next;
        free(m);
        m = n;
    }
    if (h->base) event_base_free(h->base);
    for (int i = 0; i < h->ntokens; i++) free(h->tokens[i]);
    pthread_mutex_destroy(&h->pub_mu);
    pthread_mutex_destroy(&h->append_mu);
    free(h);
}
