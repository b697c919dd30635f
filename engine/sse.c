/* sse.c — SSE subscriptions, catch-up and live fan-out (see sse.h).
 *
 * Invariants:
 *   - hub->pos is the last position the live fan-out has processed; every
 *     live client has been offered every event <= hub->pos that is above
 *     its cursor at the time it joined.
 *   - a client is on exactly one list: catching up or live.
 *   - a client's cursor only grows; a message for position P is written to
 *     a client only when P > cursor, and the cursor becomes P.
 *   - once the hub ends a client (sink->end) or the transport reports it
 *     gone, the client is freed and never touched again.
 */
#include "sse.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "event.h"
#include "json.h"
#include "metrics.h"

/* Catch-up is paced so the loop stays responsive for live delivery: one
 * sse_hub_run scans at most CATCHUP_BUDGET events, shared by the clients
 * catching up (each gets one step of at least CATCHUP_MIN_STEP). */
#define CATCHUP_BUDGET 2000
#define SSE_COMMIT_SLICE 2048   /* events fanned out per sse_hub_commit call */
#define CATCHUP_MIN_STEP 100

typedef enum sub_kind { SUB_ALL, SUB_STREAM, SUB_CATEGORY, SUB_TYPE, SUB_PROJECTION } sub_kind;

typedef struct sse_sub {
    sub_kind kind;
    char *name;          /* stream / category / type / projection channel; NULL for all */
    size_t name_len;
    char *type;          /* optional type filter */
    size_t type_len;
    char *evline;        /* "event: <spec>\n" */
    size_t evline_len;
    char *channel;       /* "projection:NAME" for projection subs */
    size_t channel_len;
} sse_sub;

struct sse_client {
    sse_hub *hub;
    void *conn;
    sse_client *prev, *next;
    int live;            /* 0 = catching up */
    int paused;          /* catch-up waiting for the output to drain */
    int named;
    int started;
    uint64_t cursor;
    sse_sub *subs;
    int nsubs;
};

struct sse_hub {
    store *st;
    const sse_sink *sink;
    void *sink_ud;
    size_t max_pending;
    uint64_t pos;
    sse_client *catching, *live;
    unsigned nclients;
    unsigned nlive_events;   /* live clients with at least one log subscription */
    uint64_t msgs;           /* messages written since the last metrics flush */
    buf json;                /* scratch: one event's JSON */
    buf msg;                 /* scratch: "id: N\ndata: ...\n\n" */
};

/* ---- lists ---- */

static void list_add(sse_client **head, sse_client *c) {
    c->prev = NULL;
    c->next = *head;
    if (*head) (*head)->prev = c;
    *head = c;
}

static void list_del(sse_client **head, sse_client *c) {
    if (c->prev) c->prev->next = c->next;
    else *head = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

static int has_log_subs(const sse_client *c) {
    for (int i = 0; i < c->nsubs; i++)
        if (c->subs[i].kind != SUB_PROJECTION) return 1;
    return 0;
}

static void client_free(sse_client *c) {
    for (int i = 0; i < c->nsubs; i++) {
        free(c->subs[i].name);
        free(c->subs[i].type);
        free(c->subs[i].evline);
        free(c->subs[i].channel);
    }
    free(c->subs);
    free(c);
}

static void client_unlink(sse_client *c) {
    sse_hub *h = c->hub;
    if (c->started) {
        if (c->live) {
            list_del(&h->live, c);
            if (has_log_subs(c)) h->nlive_events--;
        } else {
            list_del(&h->catching, c);
        }
    }
    h->nclients--;
    metrics_set(METRICS_SSE_CLIENTS, h->nclients);
}

/* Write the close message, end the response, forget the client. */
static void client_close(sse_client *c, const char *reason) {
    sse_hub *h = c->hub;
    buf m = BUF_INIT;
    buf_puts(&m, "event: close\ndata: {\"reason\":");
    json_put_string(&m, reason, strlen(reason));
    buf_printf(&m, ",\"last_event_id\":%llu}\n\n", (unsigned long long)c->cursor);
    sse_piece p = {m.ptr, m.len};
    h->sink->write(c->conn, &p, 1);
    buf_free(&m);
    client_unlink(c);
    h->sink->end(c->conn);
    client_free(c);
}

/* Messages are counted locally and added to the shared counter once per
 * public call (an atomic add per message per client would cost more than
 * the message). */
static void flush_counts(sse_hub *h) {
    if (h->msgs) metrics_add(METRICS_SSE_MESSAGES, h->msgs);
    h->msgs = 0;
}

/* ---- hub ---- */

sse_hub *sse_hub_new(store *st, const sse_sink *sink, void *sink_ud, size_t max_pending) {
    sse_hub *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    h->st = st;
    h->sink = sink;
    h->sink_ud = sink_ud;
    h->max_pending = max_pending ? max_pending : (4u << 20);
    h->pos = store_last_position(st);
    return h;
}

void sse_hub_free(sse_hub *h) {
    if (!h) return;
    sse_client *lists[2] = {h->catching, h->live};
    for (int i = 0; i < 2; i++) {
        sse_client *c = lists[i];
        while (c) {
            sse_client *n = c->next;
            h->sink->end(c->conn);
            client_free(c);
            c = n;
        }
    }
    h->nclients = 0;
    metrics_set(METRICS_SSE_CLIENTS, 0);
    buf_free(&h->json);
    buf_free(&h->msg);
    free(h);
}

uint64_t sse_hub_position(const sse_hub *h) { return h->pos; }
unsigned sse_hub_nclients(const sse_hub *h) { return h->nclients; }

/* ---- clients ---- */

sse_client *sse_client_new(sse_hub *h, void *conn, uint64_t after, int named) {
    sse_client *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->hub = h;
    c->conn = conn;
    c->cursor = after;
    c->named = named;
    h->nclients++;
    metrics_set(METRICS_SSE_CLIENTS, h->nclients);
    return c;
}

static char *dup_n(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (!d) tm_oom();
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

int sse_client_subscribe(sse_client *c, const char *spec, size_t len, const char *type_filter,
                         size_t tlen, tm_err *err) {
    static const struct { const char *prefix; sub_kind kind; } kinds[] = {
        {"stream:", SUB_STREAM}, {"category:", SUB_CATEGORY}, {"type:", SUB_TYPE},
        {"projection:", SUB_PROJECTION},
    };
    sse_sub s;
    memset(&s, 0, sizeof s);
    if (len == 3 && memcmp(spec, "all", 3) == 0) {
        s.kind = SUB_ALL;
    } else {
        size_t i;
        for (i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
            size_t pl = strlen(kinds[i].prefix);
            if (len > pl && memcmp(spec, kinds[i].prefix, pl) == 0) {
                s.kind = kinds[i].kind;
                s.name = dup_n(spec + pl, len - pl);
                s.name_len = len - pl;
                break;
            }
        }
        if (i == sizeof kinds / sizeof kinds[0])
            return err_set(err, TM_EINVAL,
                           "bad subscription '%.*s' (want all, stream:S, category:C, type:T "
                           "or projection:P)", (int)(len > 200 ? 200 : len), spec);
        if (memchr(s.name, '\n', s.name_len) || memchr(s.name, '\r', s.name_len)) {
            free(s.name);
            return err_set(err, TM_EINVAL, "subscription names cannot hold line breaks");
        }
    }
    if (type_filter && tlen) {
        s.type = dup_n(type_filter, tlen);
        s.type_len = tlen;
    }
    buf ev = BUF_INIT;
    buf_puts(&ev, "event: ");
    buf_append(&ev, spec, len);
    buf_putc(&ev, '\n');
    s.evline_len = ev.len;
    s.evline = buf_steal(&ev, NULL);
    if (s.kind == SUB_PROJECTION) {
        s.channel = dup_n(spec, len);
        s.channel_len = len;
    }
    sse_sub *n = realloc(c->subs, (size_t)(c->nsubs + 1) * sizeof *n);
    if (!n) tm_oom();
    c->subs = n;
    c->subs[c->nsubs++] = s;
    return 0;
}

static int sub_matches(const sse_sub *s, const tm_event *ev) {
    if (s->type && (ev->type_len != s->type_len || memcmp(ev->type, s->type, s->type_len)))
        return 0;
    switch (s->kind) {
    case SUB_ALL: return 1;
    case SUB_STREAM:
        return ev->stream_len == s->name_len && memcmp(ev->stream, s->name, s->name_len) == 0;
    case SUB_CATEGORY: {
        size_t cl = event_category_len(ev->stream, ev->stream_len);
        return cl == s->name_len && memcmp(ev->stream, s->name, cl) == 0;
    }
    case SUB_TYPE:
        return ev->type_len == s->name_len && memcmp(ev->type, s->name, s->name_len) == 0;
    case SUB_PROJECTION: return 0;
    }
    return 0;
}

/* Format ev into h->msg ("id: N\ndata: JSON\n\n"); *idlen = length of the id line. */
static int format_event(sse_hub *h, const tm_event *ev, size_t *idlen) {
    tm_err err;
    buf_reset(&h->json);
    if (event_to_json(ev, &h->json, &err) != 0) {
        fprintf(stderr, "level=error msg=\"sse: cannot format event\" position=%llu error=\"%s\"\n",
                (unsigned long long)ev->position, err.msg);
        return -1;
    }
    buf_reset(&h->msg);
    buf_printf(&h->msg, "id: %llu\n", (unsigned long long)ev->position);
    *idlen = h->msg.len;
    buf_puts(&h->msg, "data: ");
    buf_append(&h->msg, h->json.ptr, h->json.len);
    buf_puts(&h->msg, "\n\n");
    return 0;
}

/* Offer one formatted event to c; returns 1 if anything was written. */
static int offer(sse_hub *h, sse_client *c, const tm_event *ev, int *formatted, size_t *idlen) {
    int wrote = 0;
    for (int i = 0; i < c->nsubs; i++) {
        const sse_sub *s = &c->subs[i];
        if (!sub_matches(s, ev)) continue;
        if (!*formatted) {
            if (format_event(h, ev, idlen) != 0) return 0;
            *formatted = 1;
        }
        if (c->named) {
            sse_piece p[3] = {{h->msg.ptr, *idlen}, {s->evline, s->evline_len},
                              {h->msg.ptr + *idlen, h->msg.len - *idlen}};
            h->sink->write(c->conn, p, 3);
        } else {
            sse_piece p = {h->msg.ptr, h->msg.len};
            h->sink->write(c->conn, &p, 1);
            wrote = 1;
            h->msgs++;
            break;   /* one message per event on an unnamed connection */
        }
        wrote = 1;
        h->msgs++;
    }
    return wrote;
}

static void go_live(sse_client *c) {
    sse_hub *h = c->hub;
    list_del(&h->catching, c);
    c->live = 1;
    list_add(&h->live, c);
    if (has_log_subs(c)) h->nlive_events++;
}

/* The iterator a catch-up step reads: an index when one subscription
 * allows it, else the whole log. */
static store_iter *catchup_iter(sse_client *c, uint64_t step, tm_err *err) {
    sse_hub *h = c->hub;
    uint64_t from = c->cursor + 1;
    int nlog = 0;
    const sse_sub *only = NULL;
    for (int i = 0; i < c->nsubs; i++)
        if (c->subs[i].kind != SUB_PROJECTION) {
            nlog++;
            only = &c->subs[i];
        }
    if (nlog == 1) {
        if (only->kind == SUB_CATEGORY)
            return store_read_category(h->st, only->name, only->name_len, from, step, err);
        if (only->kind == SUB_STREAM)
            return store_read_category(h->st, only->name,
                                       event_category_len(only->name, only->name_len), from,
                                       step, err);
        if (only->kind == SUB_TYPE)
            return store_read_type(h->st, only->name, only->name_len, from, step, err);
        if (only->kind == SUB_ALL && only->type)
            return store_read_type(h->st, only->type, only->type_len, from, step, err);
    }
    return store_read_all(h->st, from, 0, step, err);
}

/* One bounded catch-up step.  Returns 1 if more remains and the client
 * was not paused or closed, 0 otherwise (live, paused, or closed). */
static int catchup_step(sse_client *c, uint64_t step) {
    sse_hub *h = c->hub;
    if (!has_log_subs(c)) {
        go_live(c);
        return 0;
    }
    tm_err err;
    err_clear(&err);
    store_iter *it = catchup_iter(c, step, &err);
    if (!it) {
        client_close(c, err.msg[0] ? err.msg : "store read failed");
        return 0;
    }
    tm_event ev;
    uint64_t scanned = 0;
    int rc;
    while ((rc = store_iter_next(it, &ev, &err)) == 1) {
        scanned++;
        if (ev.position <= c->cursor) continue;
        int formatted = 0;
        size_t idlen = 0;
        offer(h, c, &ev, &formatted, &idlen);
        c->cursor = ev.position;
        if (h->sink->pending(c->conn) > h->max_pending / 2) {
            c->paused = 1;
            break;
        }
    }
    store_iter_free(it);
    if (rc < 0) {
        client_close(c, err.msg[0] ? err.msg : "store read failed");
        return 0;
    }
    if (c->paused) return 0;
    if (scanned < step) {
        /* Reached the end of the snapshot, which holds every event up to
         * hub->pos (the hub read them): nothing matching <= hub->pos is
         * missing, and the live fan-out delivers what is above the cursor. */
        if (c->cursor < h->pos) c->cursor = h->pos;
        go_live(c);
        return 0;
    }
    return 1;
}

static unsigned count_catching(const sse_hub *h) {
    unsigned n = 0;
    for (const sse_client *c = h->catching; c; c = c->next)
        if (!c->paused) n++;
    return n;
}

static uint64_t step_size(const sse_hub *h) {
    unsigned n = count_catching(h);
    uint64_t step = n ? CATCHUP_BUDGET / n : CATCHUP_BUDGET;
    return step < CATCHUP_MIN_STEP ? CATCHUP_MIN_STEP : step;
}

/* One step; if more remains, yield to the loop and continue soon. */
static void client_catchup(sse_client *c, uint64_t step) {
    if (catchup_step(c, step)) c->hub->sink->schedule(c->hub->sink_ud);
}

void sse_client_start(sse_client *c) {
    sse_hub *h = c->hub;
    static const char hello[] = ": tidemark\nretry: 2000\n\n";
    sse_piece p = {hello, sizeof hello - 1};
    h->sink->write(c->conn, &p, 1);
    c->started = 1;
    c->live = 0;
    list_add(&h->catching, c);
    if (c->cursor >= h->pos) {
        go_live(c);
        return;
    }
    client_catchup(c, step_size(h));
    flush_counts(h);
}

void sse_client_gone(sse_client *c) {
    client_unlink(c);
    client_free(c);
}

void sse_client_drained(sse_client *c) {
    if (c->live || !c->paused) return;
    c->paused = 0;
    c->hub->sink->schedule(c->hub->sink_ud);
}

void sse_hub_run(sse_hub *h) {
    uint64_t step = step_size(h);
    sse_client *c = h->catching;
    while (c) {
        sse_client *n = c->next;   /* c may go live or be closed */
        if (!c->paused) client_catchup(c, step);
        c = n;
    }
    flush_counts(h);
}

/* ---- live ---- */

int sse_hub_commit(sse_hub *h, uint64_t last) {
    if (last <= h->pos) return 0;
    metrics_set(METRICS_LAST_POSITION, last);
    if (h->nlive_events == 0) {
        h->pos = last;
        return 0;
    }
    uint64_t upto = last - h->pos > SSE_COMMIT_SLICE ? h->pos + SSE_COMMIT_SLICE : last;
    tm_err err;
    err_clear(&err);
    store_iter *it = store_read_all(h->st, h->pos + 1, 0, upto - h->pos, &err);
    if (!it) {
        fprintf(stderr, "level=error msg=\"sse: read failed\" error=\"%s\"\n", err.msg);
        return 0;
    }
    tm_event ev;
    int rc;
    while ((rc = store_iter_next(it, &ev, &err)) == 1) {
        int formatted = 0;
        size_t idlen = 0;
        sse_client *c = h->live;
        while (c) {
            sse_client *n = c->next;
            if (ev.position > c->cursor && c->nsubs) {
                int wrote = offer(h, c, &ev, &formatted, &idlen);
                c->cursor = ev.position;
                if (wrote && h->sink->pending(c->conn) > h->max_pending) {
                    metrics_add(METRICS_SSE_SLOW_CLOSED, 1);
                    client_close(c, "slow consumer: too many unsent bytes");
                }
            }
            c = n;
        }
        h->pos = ev.position;
    }
    if (rc < 0) fprintf(stderr, "level=error msg=\"sse: read failed\" error=\"%s\"\n", err.msg);
    store_iter_free(it);
    flush_counts(h);
    return rc >= 0 && h->pos < last;
}

void sse_hub_publish(sse_hub *h, const char *channel, size_t clen, const char *json,
                     size_t jlen) {
    sse_client *lists[2] = {h->live, h->catching};
    for (int l = 0; l < 2; l++) {
        sse_client *c = lists[l];
        while (c) {
            sse_client *n = c->next;
            for (int i = 0; i < c->nsubs; i++) {
                const sse_sub *s = &c->subs[i];
                if (s->kind != SUB_PROJECTION || s->channel_len != clen ||
                    memcmp(s->channel, channel, clen) != 0)
                    continue;
                sse_piece p[4] = {{s->evline, c->named ? s->evline_len : 0},
                                  {"data: ", 6}, {json, jlen}, {"\n\n", 2}};
                h->sink->write(c->conn, p, 4);
                h->msgs++;
                if (h->sink->pending(c->conn) > h->max_pending) {
                    metrics_add(METRICS_SSE_SLOW_CLOSED, 1);
                    client_close(c, "slow consumer: too many unsent bytes");
                }
                break;
            }
            c = n;
        }
    }
    flush_counts(h);
}

void sse_hub_heartbeat(sse_hub *h) {
    static const char hb[] = ": heartbeat\n\n";
    sse_piece p = {hb, sizeof hb - 1};
    sse_client *lists[2] = {h->live, h->catching};
    for (int l = 0; l < 2; l++)
        for (sse_client *c = lists[l]; c; c = c->next) h->sink->write(c->conn, &p, 1);
}

void sse_hub_close_all(sse_hub *h, const char *reason) {
    while (h->live) client_close(h->live, reason);
    while (h->catching) client_close(h->catching, reason);
}
