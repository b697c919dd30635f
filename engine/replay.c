/* replay.c — parallel re-projection of history (see replay.h for the model).
 *
 * Owns: recognising the partition form in the script's source (a small
 * Lua tokenizer), the routing key in C, the worker threads, the reader's
 * turn they take in rotation, their bounded chunk queues, barriers (one
 * store batch per global checkpoint), the staging key layout and the final swap, resume, the routing check and
 * the one-worker fallback, and merging the workers' results (the JSON of
 * a partitioned result rendered by every worker's pairs in parallel).
 *
 * Invariants:
 *   - Every event a worker sees is selected by `from`; each worker sees its
 *     events in position order (one reader's turn at a time, FIFO queues).
 *   - A partition's events all go to one worker iff that worker's key set
 *     holds only keys that hash to it (checked after every threaded run).
 *   - STAGE meta = P is committed in the same batch as every worker's
 *     checkpoint at P; nothing under proj/NAME/ changes before the swap.
 *   - Workers touch only their own proj; the holder of the reader's turn
 *     touches r->rd, r->defp and the queues; the last worker at a barrier
 *     commits it while the others wait; shared fields are under r->mu (or
 *     atomics: failed).
 */
#define _GNU_SOURCE
#include "replay.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <msgpack/pack.h>

#include "json.h"
#include "mp.h"
#include "progress.h"
#include "record.h"

#define MAX_WORKERS 64
#define QMAX 64                    /* chunks queued per worker, on average */
#define CHUNK_BYTES (64 * 1024)
#define CHUNK_EVENTS 1024
#define MAX_PATH 8

typedef enum route_kind {
    ROUTE_NONE, ROUTE_STREAM_EXACT, ROUTE_STREAM, ROUTE_CATEGORY, ROUTE_TYPE, ROUTE_DATA
} route_kind;

/* The partition form recognised in a source (replay_router_new). */
struct replay_router {
    route_kind route;
    char path[MAX_PATH][64];
    size_t pathlen[MAX_PATH];
    unsigned npath;
    int emit_mode;                 /* emit_during_rebuild = true */
    int dead_letter;               /* on_error = "dead_letter" */
};

enum { CH_EVENTS, CH_BARRIER, CH_END };

typedef struct chunk {
    struct chunk *next;
    int kind;
    unsigned n;
    buf b;
} chunk;

/* One event in a chunk: this header, then its stored record (record.h),
 * which the worker decodes and verifies: the reader only peeks at it to
 * select and route (record_peek), so the checksum, the decode and the copy
 * of the fields are off the pipeline's head. */
typedef struct ev_hdr {
    uint64_t position;
    uint32_t len;
} ev_hdr;

typedef struct worker {
    struct replay *r;
    unsigned idx;
    proj *p;
    pthread_t th;
    int started;
    pthread_cond_t cv;             /* queue non-empty / barrier released */
    chunk *qhead, *qtail;          /* under r->mu */
    unsigned qlen;                 /* chunks in the queue */
    int idle;                      /* sleeping in take */
    buf kv;                        /* barrier output: [u32 kl][k][u32 vl][v]... */
    tm_event *emits;
    size_t nemits;
    int failed;                    /* this worker stopped (fault or error) */
    tm_err err;
    proj_backing bk;
    int misrouted;                 /* wrote or holds a state key it does not own (badkey) */
    char badkey[101];
    buf state;                     /* threaded: its states (proj_state), encoded at the end */
    chunk *pool;                   /* chunks it ran, under r->mu (see chunk_get) */
    int state_rc;                  /* -1: encoding it failed (state_err) */
    int unreadable;                /* own_keys could not read its encoded states */
    tm_err state_err;
} worker;

/* The reader's state.  No thread owns the reader: a worker whose queue
 * runs low takes the reader's turn (r->reading), reads and routes a slice
 * of the log into every worker's queue, and goes back to its own events
 * (read_slice).  So a run has as many threads as workers, each always
 * either reading or running handlers, and no hand-over to a third thread
 * that the two cores would have to take turns with. */
typedef struct reader {
    store_iter *it;
    chunk *cur[MAX_WORKERS];       /* the chunk being filled for each worker */
    uint64_t from, every, seen, since;
    progress *pg;
    int stop;                      /* cancelled */
} reader;

struct replay {
    store *st;
    char *name, *src, *filename;
    size_t srclen;
    replay_opts o;
    proj *defp;                    /* definition only (from, flags), reader thread */
    replay_router rt;              /* the partition form recognised in the source */
    int emit_mode;                 /* emit_during_rebuild = true (and persisting) */
    char desc[400];
    unsigned nw;
    worker *w;
    unsigned nalloc;               /* workers allocated in w */
    buf stage;                     /* "replay/NAME/" */
    buf live;                      /* "proj/NAME/" */
    int swapped;                   /* backing reads go to proj/NAME/ */
    /* sync: the queues, the reader's turn and the barriers, under mu */
    pthread_mutex_t mu;
    unsigned queued;               /* chunks queued to all workers */
    int reading;                   /* a worker holds the reader's turn */
    int read_done;                 /* the log is read (or the run stopped): END queued */
    int barrier_due;               /* barrier chunks queued, not yet committed */
    chunk *pool;
    unsigned arrived, gen;
    int barrier_ok;
    int failed;                    /* atomic: some worker stopped */
    int misrouted;                 /* a barrier found a wrong routing guess (badkey) */
    char badkey[101];
    int run_rc;                    /* -1: the read or a barrier's commit failed (run_err) */
    tm_err run_err;
    reader rd;                     /* the reader's state: only the turn's holder touches it */
    /* progress */
    uint64_t last, events, suppressed;
    const proj_fault *fault;
    proj *merged;                  /* lazily built for top/query over many workers */
    proj_backing mbk;
};

/* ------------------------------------------------------------ small helpers */

static uint64_t fnv1a(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* SHARD_VERSION names the mapping below; the staging meta records it, so
 * a stage written under another mapping is not resumed (its workers'
 * states would belong to other owners). */
#define SHARD_VERSION 2

static uint64_t load64(const unsigned char *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

static uint32_t load32(const unsigned char *p) {
    uint32_t w;
    memcpy(&w, p, 4);
    return w;
}

/* The owner of a partition key among n workers.  Keys are short (customer
 * ids, stream names), so the hash takes 8 bytes at a time (the tail as an
 * overlapping load, as xxHash3 does) and the range is reduced by a
 * multiply-high instead of a division: FNV-1a's byte loop and the `%`
 * were half of the reader's routing (docs/benchmarks.md section 13). */
static inline unsigned shard_of(const char *key, size_t len, unsigned n) {
    if (n <= 1) return 0;
    const unsigned char *s = (const unsigned char *)key;
    uint64_t h = 0x9e3779b97f4a7c15ull ^ (len * 0xff51afd7ed558ccdull);
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        h = (h ^ load64(s + i)) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
    }
    size_t rest = len - i;
    if (rest) {
        uint64_t w;
        if (len >= 8) w = load64(s + len - 8) >> (8 * (8 - rest));
        else if (len >= 4) w = load32(s) | (uint64_t)load32(s + len - 4) << 32;
        else w = s[0] | (uint64_t)s[len / 2] << 8 | (uint64_t)s[len - 1] << 16;
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    }
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    h ^= h >> 31;
    return (unsigned)(((unsigned __int128)h * n) >> 64);
}

unsigned replay_shard(const char *key, size_t len, unsigned n) { return shard_of(key, len, n); }

static int wr(void *data, const char *p, size_t n) {
    buf_append(data, p, n);
    return 0;
}

static void put_u32(buf *b, uint32_t v) { buf_append(b, &v, 4); }

/* the part of k after prefix, or NULL */
static const char *after(const char *k, size_t kl, const buf *prefix, size_t *rest) {
    if (kl < prefix->len || memcmp(k, prefix->ptr, prefix->len)) return NULL;
    *rest = kl - prefix->len;
    return k + prefix->len;
}

/* ------------------------------------------------------------ recognising partition */

typedef struct tok {
    int kind;                      /* 'n' name, 's' string, '#' number, else the char */
    const char *s;
    size_t n;
} tok;

/* Long bracket at p ("[[", "[=[", ...): its level, or -1. */
static int long_open(const char *p, const char *end) {
    if (p >= end || *p != '[') return -1;
    int lvl = 0;
    p++;
    while (p < end && *p == '=') lvl++, p++;
    return (p < end && *p == '[') ? lvl : -1;
}

static const char *long_close(const char *p, const char *end, int lvl) {
    for (; p < end; p++) {
        if (*p != ']') continue;
        const char *q = p + 1;
        int l = 0;
        while (q < end && *q == '=') l++, q++;
        if (l == lvl && q < end && *q == ']') return q + 1;
    }
    return end;
}

static size_t tokenize(const char *src, size_t len, tok **out) {
    const char *p = src, *end = src + len;
    size_t n = 0, cap = 256;
    tok *t = malloc(cap * sizeof *t);
    while (p < end) {
        char c = *p;
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
            p++;
            continue;
        }
        if (c == '-' && p + 1 < end && p[1] == '-') {
            p += 2;
            int lvl = long_open(p, end);
            if (lvl >= 0) p = long_close(p + lvl + 2, end, lvl);
            else
                while (p < end && *p != '\n') p++;
            continue;
        }
        if (n == cap) t = realloc(t, (cap *= 2) * sizeof *t);
        tok *k = &t[n++];
        k->s = p;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
            while (p < end && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                               (*p >= '0' && *p <= '9') || *p == '_'))
                p++;
            k->kind = 'n';
            k->n = (size_t)(p - k->s);
        } else if (c == '"' || c == '\'') {
            p++;
            k->s = p;
            while (p < end && *p != c) p += (*p == '\\' && p + 1 < end) ? 2 : 1;
            k->kind = memchr(k->s, '\\', (size_t)(p - k->s)) ? '?' : 's';
            k->n = (size_t)(p - k->s);
            if (p < end) p++;
        } else if (c == '[' && long_open(p, end) >= 0) {
            int lvl = long_open(p, end);
            const char *e = long_close(p + lvl + 2, end, lvl);
            k->kind = '?';
            k->n = (size_t)(e - p);
            p = e;
        } else if (c >= '0' && c <= '9') {
            while (p < end && ((*p >= '0' && *p <= '9') || *p == '.' || *p == 'x' ||
                               (*p >= 'a' && *p <= 'f') || (*p >= 'A' && *p <= 'F')))
                p++;
            k->kind = '#';
            k->n = (size_t)(p - k->s);
        } else if (c == '=' && p + 1 < end && p[1] == '=') {
            k->kind = 'E';
            k->n = 2;
            p += 2;
        } else {
            k->kind = (unsigned char)c;
            k->n = 1;
            p++;
        }
    }
    *out = t;
    return n;
}

static int is_name(const tok *t, const char *s) {
    return t->kind == 'n' && t->n == strlen(s) && !memcmp(t->s, s, t->n);
}

static int same(const tok *a, const tok *b) {
    return a->kind == b->kind && a->n == b->n && !memcmp(a->s, b->s, a->n);
}

/* `partition = ...` at t[i]: set the route; 1 if recognised. */
static int recognise(replay_router *r, const tok *t, size_t n, size_t i) {
    if (i + 2 >= n) return 0;
    const tok *v = &t[i + 2];
    if (v->kind == 's' && v->n == 6 && !memcmp(v->s, "stream", 6)) {
        r->route = ROUTE_STREAM_EXACT;
        return 1;
    }
    /* function ( e ) return e <fields> end */
    if (i + 9 >= n || !is_name(v, "function") || t[i + 3].kind != '(' || t[i + 4].kind != 'n' ||
        t[i + 5].kind != ')' || !is_name(&t[i + 6], "return") || !same(&t[i + 7], &t[i + 4]))
        return 0;
    size_t j = i + 8;
    r->npath = 0;
    while (j < n && r->npath < MAX_PATH) {
        const tok *f = NULL;
        if (t[j].kind == '.' && j + 1 < n && t[j + 1].kind == 'n') {
            f = &t[j + 1];
            j += 2;
        } else if (t[j].kind == '[' && j + 2 < n && t[j + 1].kind == 's' && t[j + 2].kind == ']') {
            f = &t[j + 1];
            j += 3;
        } else {
            break;
        }
        if (f->n >= sizeof r->path[0]) return 0;
        memcpy(r->path[r->npath], f->s, f->n);
        r->path[r->npath][f->n] = 0;
        r->pathlen[r->npath++] = f->n;
    }
    if (j >= n || !is_name(&t[j], "end") || r->npath == 0) return 0;
    const char *f0 = r->path[0];
    if (r->npath == 1 && !strcmp(f0, "stream")) r->route = ROUTE_STREAM;
    else if (r->npath == 1 && !strcmp(f0, "category")) r->route = ROUTE_CATEGORY;
    else if (r->npath == 1 && !strcmp(f0, "type")) r->route = ROUTE_TYPE;
    else if (r->npath >= 2 && !strcmp(f0, "data")) r->route = ROUTE_DATA;
    else return 0;
    return 1;
}

/* Recognise the partition form and the in-order options in src, read as
 * tokens (nothing runs). */
static void scan_source(replay_router *r, const char *src, size_t len) {
    tok *t;
    size_t n = tokenize(src, len, &t);
    int found = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        if (t[i + 1].kind != '=') continue;
        if (is_name(&t[i], "partition") && !found) found = recognise(r, t, n, i);
        if (is_name(&t[i], "emit_during_rebuild") && i + 2 < n && is_name(&t[i + 2], "true"))
            r->emit_mode = 1;
        if (is_name(&t[i], "on_error") && i + 2 < n && t[i + 2].kind == 's' &&
            t[i + 2].n == 11 && !memcmp(t[i + 2].s, "dead_letter", 11))
            r->dead_letter = 1;
    }
    if (!found) r->route = ROUTE_NONE;
    free(t);
}

replay_router *replay_router_new(const char *src, size_t len) {
    replay_router *r = calloc(1, sizeof *r);
    if (!r) tm_oom();
    scan_source(r, src, len);
    if (r->route == ROUTE_NONE || r->emit_mode || r->dead_letter) {
        free(r);
        return NULL;
    }
    return r;
}

void replay_router_free(replay_router *r) { free(r); }

/* ------------------------------------------------------------ routing key */

/* The key partition() would return as a string (proj_rt.lua numkey). */
static int number_key(double k, char *out, size_t n) {
    if (k != k || isinf(k)) return -1;
    if (k == floor(k) && k > -9007199254740992.0 && k < 9007199254740992.0)
        return snprintf(out, n, "%lld", (long long)k);
    return snprintf(out, n, "%.17g", k);
}

/* The worker for ev: the owner of the guessed key, worker 0 when there is
 * no key (partition() returns nil or fails the same way anywhere). */
static inline unsigned router_shard(const replay_router *r, const tm_event *ev, unsigned n) {
    const char *k = NULL;
    size_t kl = 0;
    char num[40];
    switch (r->route) {
    case ROUTE_STREAM_EXACT:
    case ROUTE_STREAM: k = ev->stream, kl = ev->stream_len; break;
    case ROUTE_CATEGORY: k = ev->stream, kl = event_category_len(ev->stream, ev->stream_len); break;
    case ROUTE_TYPE: k = ev->type, kl = ev->type_len; break;
    case ROUTE_DATA: {
        const char *v = ev->data;
        size_t vl = ev->data_len;
        for (unsigned i = 1; i < r->npath; i++)
            if (!v || mp_map_find(v, vl, r->path[i], r->pathlen[i], &v, &vl) != 1) return 0;
        const char *q = v;
        mp_item it;
        if (mp_next(&q, v + vl, &it) < 0) return 0;
        int nl = -1;
        switch (it.type) {
        case MP_STR:
        case MP_BIN: k = it.v.s.ptr, kl = it.v.s.len; break;
        case MP_UINT: nl = number_key((double)it.v.u, num, sizeof num); break;
        case MP_INT: nl = number_key((double)it.v.i, num, sizeof num); break;
        case MP_FLOAT:
        case MP_DOUBLE: nl = number_key(it.v.d, num, sizeof num); break;
        default: return 0;
        }
        if (!k) {
            if (nl < 0) return 0;
            k = num, kl = (size_t)nl;
        }
        break;
    }
    default: return 0;
    }
    return shard_of(k, kl, n);
}

unsigned replay_router_shard(const replay_router *r, const tm_event *ev, unsigned n) {
    return router_shard(r, ev, n);
}

static unsigned route(const replay *r, const tm_event *ev) { return router_shard(&r->rt, ev, r->nw); }

/* ------------------------------------------------------------ worker backing (key remapping) */

/* The store key for a proj key (proj/NAME/SUFFIX) of worker w. */
static int map_key(worker *w, const char *k, size_t kl, buf *out) {
    replay *r = w->r;
    size_t rl;
    const char *rest = after(k, kl, &r->live, &rl);
    buf_reset(out);
    if (!rest) return -1;
    if (r->swapped) {
        buf_append(out, k, kl);
    } else if (rl == 2 && !memcmp(rest, "cp", 2)) {
        buf_append(out, r->stage.ptr, r->stage.len);
        buf_printf(out, "w/%u/cp", w->idx);
    } else {
        buf_append(out, r->stage.ptr, r->stage.len);
        buf_append(out, rest, rl);
    }
    return 0;
}

static int bk_get(void *ud, const char *k, size_t kl, char **val, size_t *vl, tm_err *err) {
    worker *w = ud;
    if (!w->r->o.persist) return 0;
    buf key = BUF_INIT;
    int rc = map_key(w, k, kl, &key) < 0 ? 0 : store_kv_get(w->r->st, key.ptr, key.len, val, vl, err);
    buf_free(&key);
    return rc;
}

static int bk_scan(void *ud, const char *prefix, size_t pl, proj_kv_fn each, void *ctx,
                   tm_err *err) {
    worker *w = ud;
    replay *r = w->r;
    if (!r->o.persist) return 0;
    buf from = BUF_INIT, k2 = BUF_INIT;
    if (map_key(w, prefix, pl, &from) < 0) {
        buf_free(&from);
        return 0;
    }
    size_t srl = 0;
    const char *sub = after(prefix, pl, &r->live, &srl);
    int states = sub && srl >= 2 && !memcmp(sub, "s/", 2);
    store_kv_iter *it = store_kv_scan(r->st, from.ptr, from.len, NULL, 0, err);
    int rc = it ? 0 : -1;
    const char *k, *v;
    size_t kl, vl;
    int n;
    while (it && (n = store_kv_next(it, &k, &kl, &v, &vl, err)) == 1) {
        const char *key = k + from.len;
        size_t keyl = kl - from.len;
        if (states && r->nw > 1 && replay_shard(key, keyl, r->nw) != w->idx) continue;
        buf_reset(&k2);
        buf_append(&k2, prefix, pl);
        buf_append(&k2, key, keyl);
        if (each(ctx, k2.ptr, k2.len, v, vl)) break;
    }
    if (it && n < 0) rc = -1;
    store_kv_iter_free(it);
    buf_free(&from);
    buf_free(&k2);
    return rc;
}

static int bk_record(void *ud, uint64_t pos, char **rec, size_t *len, tm_err *err) {
    worker *w = ud;
    store_iter *it = store_read_all(w->r->st, pos, 0, 1, err);
    if (!it) return -1;
    tm_event ev;
    int r = store_iter_next(it, &ev, err);
    if (r == 1 && ev.position == pos) {
        const char *rp;
        size_t rl;
        store_iter_record(it, &rp, &rl);
        *rec = malloc(rl);
        memcpy(*rec, rp, rl);
        *len = rl;
    } else if (r >= 0) {
        r = 0;
    }
    store_iter_free(it);
    return r;
}

static void put_kv(void *ud, const char *k, size_t kl, const char *v, size_t vl) {
    worker *w = ud;
    replay *r = w->r;
    buf key = BUF_INIT;
    if (map_key(w, k, kl, &key) == 0) {
        /* every state a worker touches passes through here at a barrier:
         * the routing check of persisted replays (a resumed run no longer
         * holds the earlier states in memory) */
        size_t rl;
        const char *rest = after(k, kl, &r->live, &rl);
        if (r->nw > 1 && rest && rl >= 2 && !memcmp(rest, "s/", 2) &&
            replay_shard(rest + 2, rl - 2, r->nw) != w->idx && !w->misrouted) {
            w->misrouted = 1;
            snprintf(w->badkey, sizeof w->badkey, "%.*s", (int)(rl - 2 < 100 ? rl - 2 : 100),
                     rest + 2);
        }
        put_u32(&w->kv, (uint32_t)key.len);
        buf_append(&w->kv, key.ptr, key.len);
        put_u32(&w->kv, (uint32_t)vl);
        buf_append(&w->kv, v, vl);
    }
    buf_free(&key);
}

/* ------------------------------------------------------------ life cycle */

static void describe(replay *r, const char *why) {
    static const char *names[] = {"", "stream", "stream", "category", "type", "data"};
    if (r->nw > 1) {
        char path[200] = "";
        if (r->rt.route == ROUTE_DATA) {
            size_t o = 0;
            for (unsigned i = 0; i < r->rt.npath && o < sizeof path - 66; i++)
                o += (size_t)snprintf(path + o, sizeof path - o, "%s%s", i ? "." : "", r->rt.path[i]);
        }
        snprintf(r->desc, sizeof r->desc, "%u workers, routed by %s", r->nw,
                 r->rt.route == ROUTE_DATA ? path : names[r->rt.route]);
    } else {
        snprintf(r->desc, sizeof r->desc, "1 worker%s%s", why ? ": " : "", why ? why : "");
    }
}

/* fn(items[i]) for i < n at once: items 1.. in threads of their own,
 * item 0 (and any whose thread cannot start) in this one. */
static void in_threads(void *(*fn)(void *), void *items, size_t size, unsigned n) {
    pthread_t th[MAX_WORKERS];
    int started[MAX_WORKERS] = {0};
    char *at = items;
    for (unsigned i = 1; i < n; i++)
        started[i] = pthread_create(&th[i], NULL, fn, at + i * size) == 0;
    if (n) fn(at);
    for (unsigned i = 1; i < n; i++) {
        if (started[i]) pthread_join(th[i], NULL);
        else fn(at + i * size);
    }
}

static void *free_proj(void *arg) {
    worker *w = arg;
    proj_free(w->p);
    w->p = NULL;
    return NULL;
}

/* Closing a Lua state frees every object in it (1M partitions: most of a
 * second): the workers' states are closed in parallel, one thread each. */
static void free_projs(replay *r) {
    if (r->w) in_threads(free_proj, r->w, sizeof *r->w, r->nalloc);
}

static void chunks_free(chunk *c) {
    for (chunk *nx; c; c = nx) {
        nx = c->next;
        buf_free(&c->b);
        free(c);
    }
}

static void free_workers(replay *r) {
    free_projs(r);
    for (unsigned i = 0; r->w && i < r->nalloc; i++) {
        chunks_free(r->w[i].qhead); /* a worker that never ran */
        chunks_free(r->w[i].pool);
        buf_free(&r->w[i].kv);
        buf_free(&r->w[i].state);
        pthread_cond_destroy(&r->w[i].cv);
    }
    free(r->w);
    r->w = NULL;
    r->nalloc = 0;
    proj_free(r->merged);
    r->merged = NULL;
}

/* The workers' Lua heaps grow at the same time, so each grows ahead in
 * steps of contiguous address space (sandbox.h grow_step): 2 workers, 10M
 * events, 1M partitions: 5.2 -> 4.6-4.8 s, CPU -0.8 s (section 13 of
 * docs/benchmarks.md); 32 MiB was as fast as larger steps. */
#define GROW_STEP ((size_t)32 << 20)

static int make_workers(replay *r, unsigned n, tm_err *err) {
    free_workers(r);
    r->nw = n;
    r->w = calloc(n, sizeof *r->w);
    r->nalloc = n;
    for (unsigned i = 0; i < n; i++) {
        worker *w = &r->w[i];
        w->r = r;
        w->idx = i;
        pthread_cond_init(&w->cv, NULL);
        /* not persisted: no stored states to look up (proj skips the key) */
        w->bk = (proj_backing){.ud = w, .get = r->o.persist ? bk_get : NULL, .scan = bk_scan,
                               .record = bk_record};
        proj_opts po = {.memory_limit = r->o.memory_limit, .cpu_limit = r->o.cpu_limit,
                        .grow_step = n > 1 ? GROW_STEP : 0, .backing = &w->bk};
        w->p = proj_new(r->name, r->src, r->srclen, r->filename, &po, err);
        if (!w->p) return -1;
        /* not persisted, no dead letters: never checkpointed (no dirty set) */
        if (!r->o.persist && !proj_dead_letter_mode(w->p) && proj_set_one_shot(w->p, err) < 0)
            return -1;
    }
    return 0;
}

replay *replay_new(store *s, const char *name, const char *src, size_t len,
                   const char *filename, const replay_opts *opts, tm_err *err) {
    replay *r = calloc(1, sizeof *r);
    r->st = s;
    r->name = strdup(name);
    r->src = malloc(len + 1);
    memcpy(r->src, src, len);
    r->src[len] = 0;
    r->srclen = len;
    r->filename = strdup(filename ? filename : name);
    if (opts) r->o = *opts;
    if (r->o.resume) r->o.persist = 1;
    pthread_mutex_init(&r->mu, NULL);
    buf_printf(&r->stage, "replay/%s/", name);
    buf_printf(&r->live, "proj/%s/", name);
    proj_opts po = {.memory_limit = r->o.memory_limit};
    r->defp = proj_new(name, src, len, r->filename, &po, err);
    if (!r->defp) {
        replay_free(r);
        return NULL;
    }
    scan_source(&r->rt, src, len);
    r->emit_mode = r->o.persist && r->rt.emit_mode;
    unsigned n = r->o.workers;
    if (n == 0) n = tm_cores();
    if (n > MAX_WORKERS) n = MAX_WORKERS;
    const char *why = NULL;
    if (!proj_partitioned(r->defp)) why = "the projection has no partition";
    else if (proj_dead_letter_mode(r->defp)) why = "on_error = \"dead_letter\" replays in order";
    else if (r->rt.route == ROUTE_NONE) why = "partition function not recognised by the router";
    else if (n == 1) why = NULL;
    if (why) n = 1;
    r->nw = n;
    describe(r, why);
    return r;
}

void replay_free(replay *r) {
    if (!r) return;
    free_workers(r);
    proj_free(r->defp);
    chunks_free(r->pool);
    pthread_mutex_destroy(&r->mu);
    buf_free(&r->stage);
    buf_free(&r->live);
    free(r->name);
    free(r->src);
    free(r->filename);
    free(r);
}

void replay_free_at_exit(replay *r) {
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
    for (unsigned i = 0; r && r->w && i < r->nalloc; i++) r->w[i].p = NULL; /* the OS's now */
#endif
    replay_free(r);
}

const char *replay_describe(const replay *r) { return r->desc; }
unsigned replay_workers(const replay *r) { return r->nw; }
uint64_t replay_position(const replay *r) { return r->last; }
uint64_t replay_events(const replay *r) { return r->events; }
uint64_t replay_emits_suppressed(const replay *r) { return r->suppressed; }
const proj_fault *replay_fault(const replay *r) { return r->fault; }

/* ------------------------------------------------------------ queues */

/* Take a chunk to fill, for the reader's turn held by `self` (NULL: any).
 * A chunk's bytes are in the cache of the core that ran it last, so self
 * fills its own first: writing lines another core holds costs a transfer
 * per line (the reader's copy was ~half of read_slice's samples with one
 * pool), while the worker a chunk goes to reads it once anyway. */
static chunk *pool_pop(chunk **pool) {
    chunk *c = *pool;
    if (c) *pool = c->next;
    return c;
}

static chunk *chunk_get(replay *r, worker *self, int kind) {
    pthread_mutex_lock(&r->mu);
    chunk *c = self ? pool_pop(&self->pool) : NULL;
    if (!c) c = pool_pop(&r->pool);
    for (unsigned i = 0; !c && i < r->nw; i++) c = pool_pop(&r->w[i].pool);
    pthread_mutex_unlock(&r->mu);
    if (!c) c = calloc(1, sizeof *c);
    c->next = NULL;
    c->kind = kind;
    c->n = 0;
    buf_reset(&c->b);
    return c;
}

/* Give back a chunk w ran. */
static void chunk_put(replay *r, worker *w, chunk *c) {
    pthread_mutex_lock(&r->mu);
    c->next = w->pool;
    w->pool = c;
    pthread_mutex_unlock(&r->mu);
}

/* Queue bounds, in chunks.  A worker takes the reader's turn when its
 * queue holds fewer than LOW chunks and gives it back once it holds HIGH
 * (or all queues together hold QMAX per worker: a worker that is slower
 * for a while builds up a backlog while the others are still fed). */
#define LOW 4
#define HIGH 8

static int queues_full(const replay *r) { return r->queued >= QMAX * r->nw; }

/* Wake every worker sleeping in take (r->mu held): the reader's turn is
 * free again, room was made in the queues, or a barrier was committed. */
static void wake_idle(replay *r) {
    for (unsigned i = 0; i < r->nw; i++)
        if (r->w[i].idle) pthread_cond_signal(&r->w[i].cv);
}

/* Queue c for w (r->mu held). */
static void enqueue(replay *r, worker *w, chunk *c) {
    c->next = NULL;
    if (w->qtail) w->qtail->next = c;
    else w->qhead = c;
    w->qtail = c;
    w->qlen++;
    r->queued++;
    if (w->idle) pthread_cond_signal(&w->cv);
}

/* Queue c for w; 1 if the reader's slice for `self` is over (its queue is
 * at HIGH, or the queues are full). */
static int push(replay *r, worker *w, chunk *c, const worker *self) {
    pthread_mutex_lock(&r->mu);
    enqueue(r, w, c);
    int over = self->qlen >= HIGH || queues_full(r);
    pthread_mutex_unlock(&r->mu);
    return over;
}

/* Push one chunk of `kind` to every worker. */
static void push_all(replay *r, int kind) {
    for (unsigned i = 0; i < r->nw; i++) {
        chunk *c = chunk_get(r, NULL, kind);
        pthread_mutex_lock(&r->mu);
        enqueue(r, &r->w[i], c);
        pthread_mutex_unlock(&r->mu);
    }
}

static int may_read(const replay *r) {
    return !r->reading && !r->read_done && !r->barrier_due && !queues_full(r);
}

static void read_slice(replay *r, worker *self);

/* w's next chunk; while its queue runs low and nobody reads, w reads. */
static chunk *take(replay *r, worker *w) {
    pthread_mutex_lock(&r->mu);
    for (;;) {
        if (w->qlen < LOW && may_read(r)) {
            r->reading = 1;
            pthread_mutex_unlock(&r->mu);
            read_slice(r, w);
            pthread_mutex_lock(&r->mu);
            r->reading = 0;
            wake_idle(r);
            continue;
        }
        if (w->qhead) break;
        w->idle = 1;
        pthread_cond_wait(&w->cv, &r->mu);
        w->idle = 0;
    }
    chunk *c = w->qhead;
    w->qhead = c->next;
    if (!w->qhead) w->qtail = NULL;
    w->qlen--;
    int was_full = queues_full(r);
    r->queued--;
    if (was_full) wake_idle(r);
    pthread_mutex_unlock(&r->mu);
    return c;
}

static void chunk_add(chunk *c, uint64_t pos, const char *rec, size_t len) {
    ev_hdr h = {.position = pos, .len = (uint32_t)len};
    if (c->b.len + sizeof h + len >= c->b.cap) buf_reserve(&c->b, sizeof h + len);
    memcpy(c->b.ptr + c->b.len, &h, sizeof h);
    memcpy(c->b.ptr + c->b.len + sizeof h, rec, len);
    c->b.len += sizeof h + len;
    c->n++;
}

/* ------------------------------------------------------------ workers */

static void worker_fail(worker *w) {
    w->failed = 1;
    __atomic_store_n(&w->r->failed, 1, __ATOMIC_RELEASE);
}

/* The flag is set by a signal handler and read by every worker. */
static int cancelled(const replay *r) {
    return r->o.cancel && __atomic_load_n(r->o.cancel, __ATOMIC_RELAXED);
}

/* Cancelled and not persisting: nothing of the run will be kept, so the
 * workers drop what is still queued instead of running it (a persisted
 * run drains its queues: its checkpoint is at the reader's position). */
static int dropping(const replay *r) {
    return !r->o.persist && cancelled(r);
}

static void worker_events(worker *w, chunk *c) {
    const char *p = c->b.ptr, *end = c->b.ptr + c->b.len;
    while (p < end && !w->failed && !dropping(w->r)) {
        ev_hdr h;
        memcpy(&h, p, sizeof h);
        p += sizeof h;
        tm_event ev;
        if (record_decode(p, h.len, &ev, &w->err) < 0) {
            err_prefix(&w->err, "position %llu", (unsigned long long)h.position);
            worker_fail(w);
            break;
        }
        p += h.len;
        ev.position = h.position;
        if (proj_feed(w->p, &ev, &w->err) != 0) worker_fail(w);
    }
}

static int commit_barrier(replay *r, tm_err *err);
static int own_keys(worker *w);

/* Record the run's first error (the read, or a barrier's commit). */
static void run_fail(replay *r, const tm_err *err) {
    pthread_mutex_lock(&r->mu);
    if (r->run_rc == 0) {
        r->run_rc = -1;
        r->run_err = *err;
    }
    pthread_mutex_unlock(&r->mu);
}

/* Every worker stops at a barrier with its checkpoint; the last to arrive
 * commits them all in one batch and releases the others. */
static void worker_barrier(worker *w) {
    replay *r = w->r;
    buf_reset(&w->kv);
    w->emits = NULL;
    w->nemits = 0;
    if (!w->failed &&
        proj_checkpoint_to(w->p, put_kv, w, &w->emits, &w->nemits, &w->err) != 0)
        worker_fail(w);
    pthread_mutex_lock(&r->mu);
    unsigned g = r->gen;
    if (++r->arrived == r->nw) {
        pthread_mutex_unlock(&r->mu);
        tm_err e;
        err_clear(&e);
        int rc = commit_barrier(r, &e);
        if (rc < 0) run_fail(r, &e);
        pthread_mutex_lock(&r->mu);
        r->arrived = 0;
        r->barrier_ok = rc == 0;
        r->barrier_due = 0;
        r->gen++;
        wake_idle(r);
    } else {
        while (r->gen == g) {
            w->idle = 1;
            pthread_cond_wait(&w->cv, &r->mu);
            w->idle = 0;
        }
    }
    int ok = r->barrier_ok;
    pthread_mutex_unlock(&r->mu);
    if (ok && !w->failed) proj_checkpoint_done(w->p);
    buf_reset(&w->kv);
}

static void *worker_main(void *arg) {
    worker *w = arg;
    /* Workers run at the reader's priority: renicing them (+3) helped
     * while the reader decoded every event, and costs ~5% since it only
     * routes stored records (docs/benchmarks.md section 13). */
    for (;;) {
        chunk *c = take(w->r, w);
        int kind = c->kind;
        if (kind == CH_EVENTS) worker_events(w, c);
        else if (kind == CH_BARRIER) worker_barrier(w);
        chunk_put(w->r, w, c);
        if (kind == CH_END) break;
    }
    if (!w->failed && proj_flush(w->p, &w->err) != 0) worker_fail(w);
    /* the result, encoded here: every worker in parallel (sorting 1M keys
     * is not free), then merged in C by the caller */
    buf_reset(&w->state);
    if (!w->failed) w->state_rc = proj_state(w->p, &w->state, &w->state_err);
    if (!w->failed && w->state_rc == 0) w->unreadable = own_keys(w) < 0;
    return NULL;
}

/* ------------------------------------------------------------ checkpoints */

static void pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void source_id(const replay *r, char out[17]) {
    snprintf(out, 17, "%016llx", (unsigned long long)fnv1a(r->src, r->srclen));
}

static void put_meta(replay *r, store_batch *b) {
    buf v = BUF_INIT, k = BUF_INIT;
    msgpack_packer pk;
    msgpack_packer_init(&pk, &v, wr);
    char sid[17];
    source_id(r, sid);
    msgpack_pack_map(&pk, 5);
    pack_str(&pk, "events");
    msgpack_pack_uint64(&pk, r->events);
    pack_str(&pk, "position");
    msgpack_pack_uint64(&pk, r->last);
    pack_str(&pk, "source");
    pack_str(&pk, sid);
    pack_str(&pk, "workers");
    msgpack_pack_uint64(&pk, r->nw);
    pack_str(&pk, "shard");
    msgpack_pack_uint64(&pk, SHARD_VERSION);
    buf_append(&k, r->stage.ptr, r->stage.len);
    buf_puts(&k, "meta");
    store_batch_put(b, k.ptr, k.len, v.ptr, v.len);
    buf_free(&v);
    buf_free(&k);
}

static void kv_to_batch(const buf *kv, store_batch *b) {
    const char *p = kv->ptr, *end = kv->ptr + kv->len;
    while (p && p < end) {
        uint32_t kl, vl;
        memcpy(&kl, p, 4);
        const char *k = p + 4;
        memcpy(&vl, k + kl, 4);
        const char *v = k + kl + 4;
        store_batch_put(b, k, kl, v, vl);
        p = v + vl;
    }
}

static uint64_t total_events(replay *r) {
    uint64_t n = 0;
    for (unsigned i = 0; i < r->nw; i++) n += proj_events(r->w[i].p);
    return n;
}

/* Append the emitted events (emit mode) or count them. */
static int emits_out(replay *r, tm_event *ev, size_t n, tm_err *err) {
    if (!n) return 0;
    if (!r->emit_mode) {
        r->suppressed += n;
        return 0;
    }
    if (store_append(r->st, ev, n, NULL, 0, err) == 0) return 0;
    if (err->code != TM_ECONFLICT) return -1;
    for (size_t i = 0; i < n; i++)
        if (store_append(r->st, &ev[i], 1, NULL, 0, err) < 0) return -1;
    return 0;
}

/* Commit every worker's barrier output and meta in one batch. */
static int commit_barrier(replay *r, tm_err *err) {
    for (unsigned i = 0; i < r->nw; i++)
        if (r->w[i].failed) return -1;
    for (unsigned i = 0; i < r->nw; i++)
        if (r->w[i].misrouted) {
            r->misrouted = 1;
            snprintf(r->badkey, sizeof r->badkey, "%s", r->w[i].badkey);
            return err_set(err, TM_EINVAL, "replay %s: partition %s reached another worker",
                           r->name, r->badkey);
        }
    r->events = total_events(r);
    for (unsigned i = 0; i < r->nw; i++)
        if (emits_out(r, r->w[i].emits, r->w[i].nemits, err) < 0) return -1;
    store_batch *b = store_batch_new();
    for (unsigned i = 0; i < r->nw; i++) kv_to_batch(&r->w[i].kv, b);
    put_meta(r, b);
    int rc = store_batch_commit(r->st, b, err);
    store_batch_free(b);
    return rc;
}

/* Inline (one worker in this thread). */
static int checkpoint_inline(replay *r, tm_err *err) {
    worker *w = &r->w[0];
    if (!r->o.persist) { /* in memory (dead letters bound the re-feeds) */
        tm_event *em;
        size_t ne;
        int rc = proj_checkpoint(w->p, NULL, &em, &ne, err);
        if (rc == 0) {
            r->suppressed += ne;
            proj_checkpoint_done(w->p);
        }
        return rc;
    }
    buf_reset(&w->kv);
    int rc = proj_checkpoint_to(w->p, put_kv, w, &w->emits, &w->nemits, err);
    if (rc != 0) return rc;
    store_batch *b = store_batch_new();
    kv_to_batch(&w->kv, b);
    r->events = proj_events(w->p);
    put_meta(r, b);
    rc = emits_out(r, w->emits, w->nemits, err);
    if (rc == 0) rc = store_batch_commit(r->st, b, err);
    store_batch_free(b);
    buf_reset(&w->kv);
    if (rc == 0) proj_checkpoint_done(w->p);
    return rc;
}

/* ------------------------------------------------------------ reading the log */


static uint64_t every_events(replay *r) {
    if (r->o.checkpoint_every) return r->o.checkpoint_every;
    uint64_t e = proj_checkpoint_every(r->defp);
    return e ? e : 500000;
}

/* The read for a replay from `from`: the projection's narrowest read
 * (proj_open_reader), except that a category or type holding most of the
 * log is read as a scan of the log (filtered by proj_selects): stepping
 * through the log costs less per event than an index read, which fetches
 * each event by position (measured: 490 vs 600 ns per event). */
static store_iter *open_reader(replay *r, uint64_t from, tm_err *err) {
    proj_from_kind k = proj_from(r->defp);
    uint64_t last = store_last_position(r->st), n = 0;
    if ((k == PROJ_FROM_CATEGORY || k == PROJ_FROM_TYPES) && proj_from_count(r->defp) == 1 &&
        last >= from) {
        size_t nl;
        const char *name = proj_from_name(r->defp, 0, &nl);
        int rc = k == PROJ_FROM_CATEGORY ? store_count_category(r->st, name, nl, from, &n, err)
                                         : store_count_type(r->st, name, nl, from, &n, err);
        if (rc < 0) return NULL;
        if (n * 5 >= (last - from + 1) * 4) return store_read_all(r->st, from, 0, 0, err);
    }
    return proj_open_reader(r->st, r->defp, from, err);
}

/* Outcome of proj calls: 0, PROJ_REPLAY, -1. */
static int run_inline(replay *r, uint64_t from, progress *pg, tm_err *err) {
    worker *w = &r->w[0];
    uint64_t every = (r->o.persist || proj_dead_letter_mode(r->defp)) ? every_events(r) : 0;
    int rc = 0, stop = 0;
    uint64_t seen = 0;
    for (;;) {
        uint64_t start = proj_position(w->p) + 1;
        if (start < from) start = from;
        store_iter *it = open_reader(r, start, err);
        if (!it) return -1;
        tm_event ev;
        int n = 0;
        rc = 0;
        while (rc == 0 && (n = store_iter_next(it, &ev, err)) == 1) {
            if (ev.position < start) continue;
            rc = proj_feed(w->p, &ev, err);
            r->last = ev.position;
            progress_update(pg, ev.position, ++seen);
            if ((seen & 1023) == 0 && cancelled(r)) {
                stop = 1;
                break;
            }
            if (rc == 0 && every && proj_uncommitted(w->p) >= every) rc = checkpoint_inline(r, err);
        }
        store_iter_free(it);
        if (rc == 0 && n < 0) return -1;
        if (rc == PROJ_REPLAY) continue;
        if (rc == 0) rc = proj_flush(w->p, err);
        if (rc == PROJ_REPLAY) continue;
        if (rc == 0 && (r->o.persist || proj_dead_letter_mode(r->defp)))
            rc = checkpoint_inline(r, err);
        if (rc == PROJ_REPLAY) continue;
        break;
    }
    r->events = proj_events(w->p);
    if (rc != 0) {
        w->failed = 1;
        return -1;
    }
    return stop ? REPLAY_CANCELLED : 0;
}

/* End the read (the turn held): queue what was read, then, unless the run
 * failed, the last barrier of a persisted run (a cancelled one too: its
 * checkpoint is where the reader stopped, to resume from), then END. */
static void finish_read(replay *r) {
    reader *d = &r->rd;
    for (unsigned i = 0; i < r->nw; i++) {
        pthread_mutex_lock(&r->mu);
        enqueue(r, &r->w[i], d->cur[i]);
        pthread_mutex_unlock(&r->mu);
        d->cur[i] = NULL;
    }
    pthread_mutex_lock(&r->mu);
    int ok = r->run_rc == 0 && !__atomic_load_n(&r->failed, __ATOMIC_ACQUIRE);
    if (ok && r->o.persist) r->barrier_due = 1;
    r->read_done = 1;
    pthread_mutex_unlock(&r->mu);
    if (ok && r->o.persist) push_all(r, CH_BARRIER);
    push_all(r, CH_END);
}

/* Queue a barrier at r->last (the turn held): what was read goes first. */
static void queue_barrier(replay *r, worker *self) {
    reader *d = &r->rd;
    pthread_mutex_lock(&r->mu);
    for (unsigned i = 0; i < r->nw; i++) enqueue(r, &r->w[i], d->cur[i]);
    r->barrier_due = 1;
    pthread_mutex_unlock(&r->mu);
    for (unsigned i = 0; i < r->nw; i++) d->cur[i] = chunk_get(r, self, CH_EVENTS);
    d->since = 0;
    push_all(r, CH_BARRIER);
}

/* The reader's turn, taken by `self` (see struct reader): read, select
 * and route events until self's queue holds HIGH chunks or all queues are
 * full, a barrier is due, or the read ends. */
static void read_slice(replay *r, worker *self) {
    reader *d = &r->rd;
    pthread_mutex_lock(&r->mu);
    int failed = r->run_rc != 0;
    pthread_mutex_unlock(&r->mu);
    if (failed || __atomic_load_n(&r->failed, __ATOMIC_ACQUIRE)) {
        finish_read(r);
        return;
    }
    tm_event ev;
    tm_err err;
    err_clear(&err);
    uint64_t pos;
    const char *rec;
    size_t rl;
    for (;;) {
        int n = store_iter_next_record(d->it, &pos, &rec, &rl, &err);
        if (n <= 0) {
            if (n < 0) run_fail(r, &err);
            finish_read(r);
            return;
        }
        if (pos < d->from) continue;
        r->last = pos;
        if (record_peek(rec, rl, &ev) < 0) { /* corrupt: report it as a read would */
            if (record_decode(rec, rl, &ev, &err) == 0) err_set(&err, TM_EIO, "corrupt record");
            err_prefix(&err, "position %llu", (unsigned long long)pos);
            run_fail(r, &err);
            finish_read(r);
            return;
        }
        ev.position = pos;
        if (!proj_selects(r->defp, &ev)) continue;
        unsigned j = route(r, &ev);
        chunk_add(d->cur[j], pos, rec, rl);
        int over = 0;
        if (d->cur[j]->n >= CHUNK_EVENTS || d->cur[j]->b.len >= CHUNK_BYTES) {
            over = push(r, &r->w[j], d->cur[j], self);
            d->cur[j] = chunk_get(r, self, CH_EVENTS);
        }
        progress_update(d->pg, ev.position, ++d->seen);
        d->since++;
        if ((d->seen & 1023) == 0) {
            if (__atomic_load_n(&r->failed, __ATOMIC_ACQUIRE)) {
                finish_read(r);
                return;
            }
            if (cancelled(r)) {
                d->stop = 1;
                finish_read(r);
                return;
            }
        }
        if (d->every && d->since >= d->every) {
            queue_barrier(r, self);
            return;
        }
        if (over) return;
    }
}

static int run_threaded(replay *r, uint64_t from, progress *pg, tm_err *err) {
    reader *d = &r->rd;
    *d = (reader){.from = from, .pg = pg, .every = r->o.persist ? every_events(r) : 0};
    r->failed = r->run_rc = 0;
    r->gen = r->arrived = 0;
    r->reading = r->read_done = r->barrier_due = 0;
    d->it = open_reader(r, from, err);
    if (!d->it) return -1;
    for (unsigned i = 0; i < r->nw; i++) d->cur[i] = chunk_get(r, NULL, CH_EVENTS);
    unsigned started = 0;
    for (; started < r->nw; started++)
        if (pthread_create(&r->w[started].th, NULL, worker_main, &r->w[started]) != 0) break;
    if (started < r->nw) { /* stop the ones started: they read to the end of an empty read */
        err_set(&r->run_err, TM_EIO, "cannot start a replay worker thread");
        pthread_mutex_lock(&r->mu);
        r->run_rc = -1;
        pthread_mutex_unlock(&r->mu);
        if (!started) finish_read(r); /* nobody will: queue (and so free) the chunks */
    }
    for (unsigned i = 0; i < started; i++) pthread_join(r->w[i].th, NULL);
    store_iter_free(d->it);
    d->it = NULL;
    r->events = total_events(r);
    /* the fault at the lowest position is the one a serial run meets first */
    worker *bad = NULL;
    for (unsigned i = 0; i < r->nw; i++) {
        worker *w = &r->w[i];
        if (!w->failed) continue;
        const proj_fault *f = proj_fault_info(w->p), *bf = bad ? proj_fault_info(bad->p) : NULL;
        if (!bad || (f && (!bf || f->position < bf->position))) bad = w;
    }
    if (bad) {
        *err = bad->err;
        return -1;
    }
    if (r->run_rc < 0) {
        *err = r->run_err;
        return -1;
    }
    return d->stop ? REPLAY_CANCELLED : 0;
}

/* ------------------------------------------------------------ staging, resume, swap */

/* The staging meta: its position, worker count, whether the same source
 * and the same partition mapping (SHARD_VERSION; absent before version 2)
 * wrote it.  1, 0 (no stage), -1. */
static int read_meta(replay *r, uint64_t *pos, uint64_t *workers, int *same_src,
                     int *same_shard, tm_err *err) {
    buf k = BUF_INIT;
    buf_append(&k, r->stage.ptr, r->stage.len);
    buf_puts(&k, "meta");
    char *v = NULL;
    size_t vl = 0;
    int rc = store_kv_get(r->st, k.ptr, k.len, &v, &vl, err);
    buf_free(&k);
    if (rc <= 0) return rc;
    const char *x;
    size_t xl;
    mp_item it;
    *pos = *workers = 0;
    *same_src = *same_shard = 0;
    if (mp_validate(v, vl, NULL, err) < 0) goto corrupt;
    if (mp_map_find(v, vl, "position", 8, &x, &xl) == 1 && mp_next(&x, x + xl, &it) == 0 &&
        it.type == MP_UINT)
        *pos = it.v.u;
    else goto corrupt;
    if (mp_map_find(v, vl, "workers", 7, &x, &xl) == 1 && mp_next(&x, x + xl, &it) == 0 &&
        it.type == MP_UINT && it.v.u >= 1 && it.v.u <= MAX_WORKERS)
        *workers = it.v.u;
    else goto corrupt;
    char sid[17];
    source_id(r, sid);
    if (mp_map_find(v, vl, "source", 6, &x, &xl) == 1 && mp_next(&x, x + xl, &it) == 0 &&
        it.type == MP_STR && it.v.s.len == 16 && !memcmp(it.v.s.ptr, sid, 16))
        *same_src = 1;
    if (mp_map_find(v, vl, "shard", 5, &x, &xl) == 1 && mp_next(&x, x + xl, &it) == 0 &&
        it.type == MP_UINT && it.v.u == SHARD_VERSION)
        *same_shard = 1;
    free(v);
    return 1;
corrupt:
    free(v);
    return err_set(err, TM_EIO, "replay %s: corrupt staging checkpoint", r->name);
}

/* The server's record of which source built proj/NAME/ (projmgr.h:
 * projmgr/v/NAME = 16 hex digits of its FNV-1a variant of the source).
 * When the server knows NAME, the swap records the replayed source there,
 * so a server whose source differs rebuilds instead of continuing a model
 * made by another script. */
static void server_version(replay *r, store_batch *b, tm_err *err) {
    buf k = BUF_INIT;
    buf_printf(&k, "projmgr/v/%s", r->name);
    char *v = NULL;
    size_t vl = 0;
    if (store_kv_get(r->st, k.ptr, k.len, &v, &vl, err) == 1) {
        uint64_t h = 1469598103934665603ull; /* projmgr.c fnv64, as written there */
        for (size_t i = 0; i < r->srclen; i++) {
            h ^= (unsigned char)r->src[i];
            h *= 1099511628211ull;
        }
        char hex[17];
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)(h ? h : 1));
        store_batch_put(b, k.ptr, k.len, hex, 16);
    }
    free(v);
    buf_free(&k);
}

/* One batch: proj/NAME/ := the staged model; then drop the staging keys. */
static int swap_in(replay *r, tm_err *err) {
    store_batch *b = store_batch_new();
    const char *k, *v;
    size_t kl, vl;
    int n = 0, rc = 0;
    uint64_t ndl = 0;
    buf key = BUF_INIT;
    store_kv_iter *it = store_kv_scan(r->st, r->live.ptr, r->live.len, NULL, 0, err);
    if (!it) rc = -1;
    while (it && (n = store_kv_next(it, &k, &kl, &v, &vl, err)) == 1) store_batch_del(b, k, kl);
    if (it && n < 0) rc = -1;
    store_kv_iter_free(it);
    static const char *const subs[] = {"s/", "dl/"};
    for (int s = 0; s < 2 && rc == 0; s++) {
        buf_reset(&key);
        buf_append(&key, r->stage.ptr, r->stage.len);
        buf_puts(&key, subs[s]);
        size_t pl = key.len;
        it = store_kv_scan(r->st, key.ptr, key.len, NULL, 0, err);
        if (!it) rc = -1;
        while (it && (n = store_kv_next(it, &k, &kl, &v, &vl, err)) == 1) {
            buf_reset(&key);
            buf_append(&key, r->live.ptr, r->live.len);
            buf_puts(&key, subs[s]);
            buf_append(&key, k + pl, kl - pl);
            store_batch_put(b, key.ptr, key.len, v, vl);
            if (s == 1) ndl++;
        }
        if (it && n < 0) rc = -1;
        store_kv_iter_free(it);
    }
    if (rc == 0) {
        buf val = BUF_INIT;
        proj_checkpoint_record(&val, ndl, r->events, r->last);
        buf_reset(&key);
        buf_append(&key, r->live.ptr, r->live.len);
        buf_puts(&key, "cp");
        store_batch_put(b, key.ptr, key.len, val.ptr, val.len);
        buf_free(&val);
        buf_reset(&key);
        buf_append(&key, r->stage.ptr, r->stage.len);
        buf_puts(&key, "meta");
        store_batch_del(b, key.ptr, key.len);
        server_version(r, b, err);
        rc = store_batch_commit(r->st, b, err);
    }
    store_batch_free(b);
    buf_free(&key);
    if (rc < 0) return -1;
    r->swapped = 1;
    return store_kv_delete_prefix(r->st, r->stage.ptr, r->stage.len, err);
}

/* Whether every key of w's encoded states hashes to w: the first that does
 * not is recorded as misrouted (badkey); -1 if the encoding does not read.
 * Run by each worker on its own result, in parallel (1M keys: ~50 ms on
 * one core). */
static int own_keys(worker *w) {
    const char *p = w->state.ptr, *end = w->state.ptr + w->state.len;
    mp_item it;
    if (mp_next(&p, end, &it) < 0 || it.type != MP_MAP) return -1;
    for (uint32_t j = 0; j < it.v.n; j++) {
        mp_item k;
        if (mp_next(&p, end, &k) < 0 || k.type != MP_STR) return -1;
        if (replay_shard(k.v.s.ptr, k.v.s.len, w->r->nw) != w->idx) {
            if (!w->misrouted)
                snprintf(w->badkey, sizeof w->badkey, "%.*s",
                         (int)(k.v.s.len < 100 ? k.v.s.len : 100), k.v.s.ptr);
            w->misrouted = 1;
            return 0;
        }
        if (mp_skip(&p, end) < 0) return -1;
    }
    return 0;
}

/* Each worker holds only keys it owns (else the routing guess was wrong):
 * 1 ok, 0 misrouted (key named in *bad), -1 error. */
static int check_routing(replay *r, buf *bad, tm_err *err) {
    if (r->nw <= 1) return 1;
    for (unsigned i = 0; i < r->nw; i++) {
        worker *w = &r->w[i];
        if (w->state_rc < 0) {
            *err = w->state_err;
            return -1;
        }
        if (w->unreadable)
            return err_set(err, TM_EIO, "replay %s: unreadable worker result", r->name);
        if (w->misrouted) {
            buf_reset(bad);
            buf_puts(bad, w->badkey);
            return 0;
        }
    }
    return 1;
}

static int run_once(replay *r, uint64_t from, tm_err *err) {
    progress *pg = NULL;
    if (r->o.progress) {
        pg = progress_new(r->o.progress, "replay", store_last_position(r->st), "events", 0);
        fprintf(r->o.progress, "replay %s: %s\n", r->name, r->desc);
    }
    int rc = r->nw > 1 ? run_threaded(r, from, pg, err) : run_inline(r, from, pg, err);
    progress_end(pg);
    return rc;
}

static const proj_fault *first_fault(replay *r) {
    const proj_fault *best = NULL;
    for (unsigned i = 0; r->w && i < r->nw; i++) {
        const proj_fault *f = proj_fault_info(r->w[i].p);
        if (f && (!best || f->position < best->position)) best = f;
    }
    return best;
}

static int any_fault(replay *r) { return first_fault(r) != NULL; }

static int clear_stage(replay *r, tm_err *err) {
    return store_kv_delete_prefix(r->st, r->stage.ptr, r->stage.len, err);
}

int replay_run(replay *r, tm_err *err) {
    uint64_t from = 1;
    r->fault = NULL;
    if (r->o.persist) {
        uint64_t pos, nw;
        int same_src, same_shard;
        int m = read_meta(r, &pos, &nw, &same_src, &same_shard, err);
        if (m < 0) return -1;
        if (r->o.resume) {
            if (m == 0)
                return err_set(err, TM_ENOTFOUND, "replay %s: nothing to resume", r->name);
            if (!same_src)
                return err_set(err, TM_EINVAL,
                               "replay %s: the unfinished replay ran another version of the "
                               "script; start over without --resume",
                               r->name);
            if (nw > 1 && !same_shard)
                return err_set(err, TM_EINVAL,
                               "replay %s: the unfinished replay was staged by an older "
                               "tidemark, which gave partitions to other workers; start over "
                               "without --resume",
                               r->name);
            if (nw != r->nw) {
                r->nw = (unsigned)nw; /* the sharding must stay the same */
                describe(r, r->nw == 1 ? "as the replay being resumed" : NULL);
            }
            from = pos + 1;
            r->last = pos;
        } else if (clear_stage(r, err) < 0) {
            return -1;
        }
    }
    if (make_workers(r, r->nw, err) < 0) return -1;
    if (r->o.resume)
        for (unsigned i = 0; i < r->nw; i++)
            if (proj_restore(r->w[i].p, err) < 0) return -1;
    int rc = run_once(r, from, err);
    if (rc == REPLAY_CANCELLED) return rc;
    if (r->nw > 1) {
        /* A guessed route is checked; a fault seen under a guess is
         * confirmed by the serial run (a misrouted event sees a wrong state). */
        buf bad = BUF_INIT;
        int ok = 1;
        if (r->misrouted) {
            ok = 0;
            buf_puts(&bad, r->badkey);
        } else if (rc == 0) {
            ok = check_routing(r, &bad, err);
            if (ok < 0) {
                buf_free(&bad);
                return -1;
            }
        } else if (r->rt.route != ROUTE_STREAM_EXACT && any_fault(r)) {
            ok = 0;
            buf_puts(&bad, "(a fault under a guessed route)");
        }
        if (!ok) {
            char why[200];
            snprintf(why, sizeof why, "the router's guess did not hold (partition %.100s%s)",
                     bad.ptr ? bad.ptr : "", "");
            buf_free(&bad);
            if (r->o.progress)
                fprintf(r->o.progress, "replay %s: %s; running again on one worker\n", r->name,
                        why);
            r->nw = 1;
            describe(r, why);
            r->last = 0;
            r->misrouted = 0;
            r->o.resume = 0;
            err_clear(err);
            if (r->o.persist && clear_stage(r, err) < 0) return -1;
            if (make_workers(r, 1, err) < 0) return -1;
            rc = run_once(r, 1, err);
            if (rc == REPLAY_CANCELLED) return rc;
        }
        buf_free(&bad);
    }
    if (rc < 0) {
        r->fault = first_fault(r);
        return -1;
    }
    if (r->o.persist && swap_in(r, err) < 0) return -1;
    return 0;
}

/* ------------------------------------------------------------ reading the result */

/* A cursor over the pairs (or items) of one encoded map (array). */
typedef struct mcur {
    const char *p, *end;
    uint32_t left;
    int map;
    const char *k;       /* key bytes (strings only) */
    size_t kl;
    const char *item;    /* the whole pair / item */
    size_t il;
    size_t kbl;          /* bytes of the encoded key (at item) */
    const char *v;       /* the value of a pair */
    size_t vl;
} mcur;

static int mcur_open(mcur *c, const buf *b, int map) {
    memset(c, 0, sizeof *c);
    c->p = b->ptr;
    c->end = b->ptr + b->len;
    c->map = map;
    mp_item it;
    if (mp_next(&c->p, c->end, &it) < 0) return -1;
    if (it.type == MP_MAP && it.v.n == 0) return 0; /* the empty table */
    if (it.type != (map ? MP_MAP : MP_ARRAY)) return -1;
    c->left = it.v.n;
    return 0;
}

/* 1 = next pair/item loaded, 0 = end, -1 = malformed */
static int mcur_next(mcur *c) {
    if (!c->left) return 0;
    c->left--;
    c->item = c->p;
    mp_item it;
    if (mp_next(&c->p, c->end, &it) < 0 || it.type != MP_STR) return -1;
    c->k = it.v.s.ptr;
    c->kl = it.v.s.len;
    c->kbl = (size_t)(c->p - c->item);
    if (c->map) {
        c->v = c->p;
        if (mp_skip(&c->p, c->end) < 0) return -1;
        c->vl = (size_t)(c->p - c->v);
    }
    c->il = (size_t)(c->p - c->item);
    return 1;
}

/* Byte order of keys, as the workers sort them. */
static int bytes_less(const char *a, size_t al, const char *b, size_t bl) {
    int c = memcmp(a, b, al < bl ? al : bl);
    return c < 0 || (c == 0 && al < bl);
}

static int key_less(const mcur *a, const mcur *b) { return bytes_less(a->k, a->kl, b->k, b->kl); }

typedef int (*merge_fn)(void *ud, const mcur *c);

/* Walk the workers' encoded maps (arrays) in key order. */
static int merge_walk(replay *r, buf *parts, int map, merge_fn fn, void *ud, tm_err *err) {
    mcur cs[MAX_WORKERS];
    int live[MAX_WORKERS];
    for (unsigned i = 0; i < r->nw; i++) {
        if (mcur_open(&cs[i], &parts[i], map) < 0) goto bad;
        live[i] = mcur_next(&cs[i]);
        if (live[i] < 0) goto bad;
    }
    for (;;) {
        int m = -1;
        for (unsigned i = 0; i < r->nw; i++)
            if (live[i] && (m < 0 || key_less(&cs[i], &cs[m]))) m = (int)i;
        if (m < 0) return 0;
        if (fn(ud, &cs[m])) return 0;
        live[m] = mcur_next(&cs[m]);
        if (live[m] < 0) goto bad;
    }
bad:
    return err_set(err, TM_EIO, "replay %s: unreadable worker result", r->name);
}

static int append_item(void *ud, const mcur *c) {
    buf_append(ud, c->item, c->il);
    return 0;
}

static int append_key(void *ud, const mcur *c) {
    buf_append(ud, c->item, c->kbl);
    return 0;
}

static int states_of(replay *r, buf *parts, tm_err *err) {
    for (unsigned i = 0; i < r->nw; i++) {
        if (r->w[i].state_rc < 0) {
            *err = r->w[i].state_err;
            return -1;
        }
        parts[i] = r->w[i].state;
    }
    return 0;
}

/* The workers' states merged: the whole map (keys_only = 0) or the sorted
 * key list (1), encoded as luamp encodes them. */
static int merged(replay *r, int keys_only, buf *out, tm_err *err) {
    buf parts[MAX_WORKERS];
    if (states_of(r, parts, err) < 0) return -1;
    uint64_t total = 0; /* the workers' keys are disjoint: their counts add up */
    for (unsigned i = 0; i < r->nw; i++) {
        mcur c;
        if (mcur_open(&c, &parts[i], 1) < 0)
            return err_set(err, TM_EIO, "replay %s: unreadable worker result", r->name);
        total += c.left;
    }
    msgpack_packer pk;
    msgpack_packer_init(&pk, out, wr);
    if (total == 0) msgpack_pack_map(&pk, 0); /* luamp: the empty table is a map */
    else if (!keys_only) msgpack_pack_map(&pk, (size_t)total);
    else msgpack_pack_array(&pk, (size_t)total);
    return merge_walk(r, parts, 1, keys_only ? append_key : append_item, out, err);
}

static int ready(replay *r, tm_err *err) {
    if (!r->w) return err_set(err, TM_EINVAL, "replay %s has not run", r->name);
    return 0;
}

int replay_state(replay *r, buf *out, tm_err *err) {
    if (ready(r, err) < 0) return -1;
    if (r->nw == 1) return proj_state(r->w[0].p, out, err);
    return merged(r, 0, out, err);
}

/* ------------------------------------------------------------ the result as JSON */

/* A partitioned result printed whole (1M partitions: ~40 MB of JSON)
 * costs about as much to transcode as the workers took to encode it, so
 * with several workers each one's pairs are rendered in a thread of their
 * own into a run of [u32 kl][key][u32 tl][text] in key order (the text is
 * json_render_pair's), and the caller only merges the runs by key. */
/* The JSON of a partitioned result, over many workers.  Each worker's
 * encoded map is sorted; the output is their merge in key order.  The key
 * space is cut into segments at keys sampled from worker 0's map (the
 * router spreads keys evenly, so every map holds about as many keys in
 * each segment); one thread per worker takes the segments in turn, merges
 * each from every map and renders it to text, and whichever thread
 * finishes the next segment due writes it out, while the others render
 * on.  So neither the rendering, nor the merge, nor the write of 1M pairs
 * (~40 MB) waits for the rest. */

#define SAMPLE_EVERY 32            /* pairs between two sampled offsets */
#define SEGMENTS_PER_WORKER 8
#define MAX_SEGMENTS (MAX_WORKERS * SEGMENTS_PER_WORKER)

/* A worker's map, sampled: the offset of every SAMPLE_EVERY-th pair. */
typedef struct jmap {
    const buf *state;
    size_t *off;                   /* malloc'd; off[i] = pair i * SAMPLE_EVERY */
    size_t noff;
    uint32_t pairs;
    int rc;
} jmap;

/* One segment: the pairs with keys in [lo, hi) of every map. */
typedef struct jseg {
    const char *lo, *hi;           /* NULL: unbounded */
    size_t lol, hil;
    buf out;                       /* "k":v,"k":v... */
    size_t n;
    int done;                      /* rendered (under jout.mu) */
    int rc;
    tm_err err;
} jseg;

/* The segments, the maps they merge, and the writer's turn. */
typedef struct jout {
    const jmap *maps;
    unsigned nmaps;
    jseg *segs;
    unsigned nsegs;
    unsigned claimed;              /* atomic: the next segment to render */
    pthread_mutex_t mu;
    unsigned written;              /* segments written (or given up) */
    int writing;                   /* a thread holds the writer's turn */
    int failed;                    /* a segment failed: nothing after it is written */
    json_objw *w;
} jout;

static void *sample_map(void *arg) {
    jmap *m = arg;
    mcur c;
    if (mcur_open(&c, m->state, 1) < 0) {
        m->rc = -1;
        return NULL;
    }
    m->pairs = c.left;
    m->off = malloc(sizeof *m->off * (c.left / SAMPLE_EVERY + 1));
    if (!m->off) tm_oom();
    for (uint32_t i = 0; i < m->pairs; i++) {
        if (i % SAMPLE_EVERY == 0) m->off[m->noff++] = (size_t)(c.p - m->state->ptr);
        if (mcur_next(&c) != 1) {
            m->rc = -1;
            return NULL;
        }
    }
    return NULL;
}

/* A cursor on map m at its sampled pair i. */
static void mcur_at(mcur *c, const jmap *m, size_t i) {
    memset(c, 0, sizeof *c);
    c->p = m->state->ptr + m->off[i];
    c->end = m->state->ptr + m->state->len;
    c->map = 1;
    c->left = m->pairs - (uint32_t)(i * SAMPLE_EVERY);
}

/* The key of m's sampled pair i. */
static int sample_key(const jmap *m, size_t i, const char **k, size_t *kl) {
    mcur c;
    mcur_at(&c, m, i);
    if (mcur_next(&c) != 1) return -1;
    *k = c.k;
    *kl = c.kl;
    return 0;
}

/* c on m's first pair whose key is not below (k, kl) (k NULL: the first
 * pair); live = 1, 0 (none), -1 (malformed). */
static int mcur_seek(mcur *c, const jmap *m, const char *k, size_t kl) {
    if (!m->noff) return 0;
    size_t lo = 0, hi = m->noff; /* the last sample below k, by bisection */
    while (k && hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        const char *mk;
        size_t ml;
        if (sample_key(m, mid, &mk, &ml) < 0) return -1;
        if (bytes_less(mk, ml, k, kl)) lo = mid;
        else hi = mid;
    }
    mcur_at(c, m, lo);
    int live;
    while ((live = mcur_next(c)) == 1 && k && bytes_less(c->k, c->kl, k, kl)) {
    }
    return live;
}

static void render_segment(const jout *o, jseg *g) {
    mcur cs[MAX_WORKERS];
    int live[MAX_WORKERS];
    for (unsigned i = 0; i < o->nmaps; i++) {
        live[i] = mcur_seek(&cs[i], &o->maps[i], g->lo, g->lol);
        if (live[i] < 0) goto bad;
    }
    for (;;) {
        int m = -1;
        for (unsigned i = 0; i < o->nmaps; i++)
            if (live[i] && (m < 0 || key_less(&cs[i], &cs[m]))) m = (int)i;
        if (m < 0 || (g->hi && !bytes_less(cs[m].k, cs[m].kl, g->hi, g->hil))) return;
        if (g->n++) buf_putc(&g->out, ',');
        if (json_render_pair(&g->out, cs[m].k, cs[m].kl, cs[m].v, cs[m].vl, &g->err) < 0) {
            g->rc = -1;
            return;
        }
        live[m] = mcur_next(&cs[m]);
        if (live[m] < 0) goto bad;
    }
bad:
    g->rc = -1;
    err_set(&g->err, TM_EIO, "unreadable worker result");
}

/* Write every rendered segment that is due, in order, unless another
 * thread holds the writer's turn (o->mu held; released while writing). */
static void write_due(jout *o) {
    if (o->writing) return;
    o->writing = 1;
    while (o->written < o->nsegs && o->segs[o->written].done) {
        jseg *g = &o->segs[o->written];
        if (g->rc < 0) o->failed = 1;
        if (!o->failed) {
            pthread_mutex_unlock(&o->mu);
            json_objw_rendered_run(o->w, g->out.ptr, g->out.len, g->n);
            int io = json_objw_failed(o->w); /* the writer's turn: only we touch w */
            buf_free(&g->out);
            pthread_mutex_lock(&o->mu);
            if (io) o->failed = 1;
        }
        o->written++;
    }
    o->writing = 0;
}

static void *segment_thread(void *arg) {
    jout *o = *(jout **)arg;
    for (;;) {
        unsigned t = __atomic_fetch_add(&o->claimed, 1, __ATOMIC_RELAXED);
        if (t >= o->nsegs) break;
        pthread_mutex_lock(&o->mu);
        int skip = o->failed;
        pthread_mutex_unlock(&o->mu);
        jseg *g = &o->segs[t];
        if (!skip) render_segment(o, g);
        pthread_mutex_lock(&o->mu);
        g->done = 1;
        write_due(o);
        pthread_mutex_unlock(&o->mu);
    }
    return NULL;
}

/* Sample every map, cut the key space at worker 0's samples, then render
 * and write the segments (segment_thread) on one thread per worker. */
static int write_segments(replay *r, jmap *maps, jout *o, json_objw *w, tm_err *err) {
    in_threads(sample_map, maps, sizeof *maps, r->nw);
    for (unsigned i = 0; i < r->nw; i++)
        if (maps[i].rc < 0) return err_set(err, TM_EIO, "replay %s: unreadable worker result",
                                           r->name);
    unsigned n = r->nw * SEGMENTS_PER_WORKER;
    if (maps[0].noff < n) n = maps[0].noff ? (unsigned)maps[0].noff : 1;
    *o = (jout){.maps = maps, .nmaps = r->nw, .segs = o->segs, .nsegs = n, .w = w};
    for (unsigned t = 1; t < n; t++) {
        jseg *g = &o->segs[t];
        if (sample_key(&maps[0], maps[0].noff * t / n, &g->lo, &g->lol) < 0)
            return err_set(err, TM_EIO, "replay %s: unreadable worker result", r->name);
        o->segs[t - 1].hi = g->lo, o->segs[t - 1].hil = g->lol;
    }
    pthread_mutex_init(&o->mu, NULL);
    jout *args[MAX_WORKERS];
    for (unsigned i = 0; i < r->nw; i++) args[i] = o;
    in_threads(segment_thread, args, sizeof *args, r->nw);
    pthread_mutex_destroy(&o->mu);
    for (unsigned t = 0; t < n; t++)
        if (o->segs[t].rc < 0) {
            *err = o->segs[t].err;
            err_prefix(err, "replay %s", r->name);
            return -1;
        }
    return 0;
}

int replay_json_pairs(replay *r, json_objw *w, tm_err *err) {
    if (ready(r, err) < 0) return -1;
    if (!proj_partitioned(r->defp))
        return err_set(err, TM_EINVAL, "projection %s is not partitioned", r->name);
    if (r->nw == 1) return proj_state_pairs(r->w[0].p, json_objw_each, w, err);
    buf parts[MAX_WORKERS];
    if (states_of(r, parts, err) < 0) return -1;
    jmap maps[MAX_WORKERS];
    for (unsigned i = 0; i < r->nw; i++) maps[i] = (jmap){.state = &r->w[i].state};
    jout o = {.segs = calloc(MAX_SEGMENTS, sizeof(jseg))};
    if (!o.segs) tm_oom();
    int rc = write_segments(r, maps, &o, w, err);
    for (unsigned i = 0; i < r->nw; i++) free(maps[i].off);
    for (unsigned t = 0; t < MAX_SEGMENTS; t++) buf_free(&o.segs[t].out);
    free(o.segs);
    return rc;
}

int replay_partitioned(const replay *r) { return proj_partitioned(r->defp); }

int replay_partitions(replay *r, buf *out, tm_err *err) {
    if (ready(r, err) < 0) return -1;
    if (r->nw == 1) return proj_partitions(r->w[0].p, out, err);
    return merged(r, 1, out, err);
}

int replay_get(replay *r, const char *key, size_t klen, buf *out, tm_err *err) {
    if (ready(r, err) < 0) return -1;
    return proj_get(r->w[replay_shard(key, klen, r->nw)].p, key, klen, out, err);
}

/* top and queries see the whole model: one more projection instance whose
 * states are the merged ones. */
typedef struct mscan {
    replay *r;
    buf *parts;
    proj_kv_fn each;
    void *ctx;
    buf key;
} mscan;

static int mscan_one(void *ud, const mcur *c) {
    mscan *m = ud;
    buf_reset(&m->key);
    buf_append(&m->key, m->r->live.ptr, m->r->live.len);
    buf_puts(&m->key, "s/");
    buf_append(&m->key, c->k, c->kl);
    return m->each(m->ctx, m->key.ptr, m->key.len, c->v, c->vl);
}

static int mg_get(void *ud, const char *k, size_t kl, char **val, size_t *vl, tm_err *err) {
    return 0;
}

static int mg_scan(void *ud, const char *prefix, size_t pl, proj_kv_fn each, void *ctx,
                   tm_err *err) {
    replay *r = ud;
    size_t rl;
    const char *rest = after(prefix, pl, &r->live, &rl);
    if (!rest || rl != 2 || memcmp(rest, "s/", 2)) return 0;
    buf parts[MAX_WORKERS];
    if (states_of(r, parts, err) < 0) return -1;
    mscan m = {r, parts, each, ctx, BUF_INIT};
    int rc = merge_walk(r, parts, 1, mscan_one, &m, err);
    buf_free(&m.key);
    return rc;
}

static int mg_record(void *ud, uint64_t pos, char **rec, size_t *len, tm_err *err) {
    replay *r = ud;
    return bk_record(&r->w[0], pos, rec, len, err);
}

static proj *whole(replay *r, tm_err *err) {
    if (r->nw == 1) return r->w[0].p;
    if (r->merged) return r->merged;
    r->mbk = (proj_backing){.ud = r, .get = mg_get, .scan = mg_scan, .record = mg_record};
    proj_opts po = {.memory_limit = r->o.memory_limit, .cpu_limit = r->o.cpu_limit,
                    .backing = &r->mbk};
    r->merged = proj_new(r->name, r->src, r->srclen, r->filename, &po, err);
    return r->merged;
}

int replay_top(replay *r, const char *field, uint64_t n, buf *out, tm_err *err) {
    if (ready(r, err) < 0) return -1;
    proj *p = whole(r, err);
    return p ? proj_top(p, field, n, out, err) : -1;
}

int replay_query(replay *r, const char *name, const char *args, size_t alen, buf *out,
                 tm_err *err) {
    if (ready(r, err) < 0) return -1;
    proj *p = whole(r, err);
    return p ? proj_query(p, name, args, alen, out, err) : -1;
}
