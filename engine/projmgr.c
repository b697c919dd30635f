/* projmgr.c — the server's projection registry (see projmgr.h).
 *
 * Owns: the list of projections (entries), one feeding thread per entry,
 * the admin thread (reloads), the override / version records in the
 * store's key-value namespace, live-update coalescing, and the HTTP routes
 * under /projections.
 *
 * Versions (see projmgr.h): an entry's `rb` is the version building; its
 * thread owns rb->ph until the swap moves it into e->ph under e->mu.  rb is
 * attached and detached with admin held (rebuild_begin / rebuild_stop,
 * which joins the thread without holding e->mu).
 *
 * Locks, in the order they may be taken:
 *   m->admin   serialises everything that changes the set or a version
 *              (PUT, commands, reload); held for long operations.
 *   m->mu      the registry list and entry reference counts; brief.
 *   e->mu      the entry's worker (projhost is not thread-safe): feeding
 *              cycles, state reads, queries, commands.
 *   e->smu     the entry's status snapshot; brief (metrics, listings).
 *   m->wake_mu last committed position, per-entry wake flags; brief (the
 *              store's writer thread takes only this one).
 * Invariants:
 *   - An entry is freed only after it is unlinked, its thread joined and
 *     its reference count is 0.
 *   - Feeding does not commit: the worker's live state (what state,
 *     partition and query routes read) covers every event up to the
 *     reported position; the stored read model is the last checkpoint,
 *     taken at most checkpoint_ms (script option, default
 *     PROJMGR_CHECKPOINT_MS) after the first event it does not cover, when
 *     checkpoint_every events are uncommitted, before a partition listing
 *     (read from the store), and before a worker is stopped.  Each
 *     checkpoint commits state + position in one atomic store batch, so a
 *     crash between checkpoints only re-processes events.  The timed ones
 *     commit on the host's committer thread while feeding goes on
 *     (projhost_checkpoint_async); every other one waits for it first.
 */
#define _GNU_SOURCE
#include "projmgr.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <msgpack/pack.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "json.h"
#include "mp.h"
#include "proj.h"
#include "projhost.h"
#include "replay.h"

#define NAME_MAX_LEN 128
#define PUB_STATE_MAX (64u << 10)   /* larger states are not pushed live */
#define PROJMGR_CHECKPOINT_MS 100   /* default checkpoint interval (continuous mode) */
#define FEED_CHUNK 20000            /* events per feeding call: requests get the lock between */
#define REBUILD_CHUNK 2000          /* events per call building a new version (quit seen between) */
#define MAX_SHARDS 64               /* worker processes building one version */

typedef enum pstatus { PS_RUNNING, PS_FAULTED, PS_STOPPED } pstatus;

static const char *status_name(pstatus s) {
    return s == PS_RUNNING ? "running" : s == PS_FAULTED ? "faulted" : "stopped";
}

struct rebuild;

typedef struct pentry {
    struct projmgr *m;
    struct pentry *next;
    char name[NAME_MAX_LEN + 1];
    int refs;                 /* m->mu */
    pthread_t th;
    /* e->mu */
    pthread_mutex_t mu;
    projhost *ph;
    char *source;
    size_t srclen;
    uint64_t version;         /* hash of source */
    char *file;               /* name given to the Lua loader (errors say FILE:LINE) */
    int from_api;             /* the source came from PUT */
    uint64_t file_hash;       /* hash of NAME.lua in the directory (0 = none) */
    int big_state;            /* state too large to push live */
    double dirty_since;       /* when the first uncommitted event was applied; 0 = none */
    /* m->wake_mu */
    double cp_due;            /* when a checkpoint is due; 0 = none */
    double last_pub;
    int pub_pending;
    int quit, kick;
    uint64_t seen;
    /* e->smu: what listings read without waiting for a cycle */
    pthread_mutex_t smu;
    pstatus status;
    uint64_t position;        /* every event up to here has been considered (applied live) */
    uint64_t cp_position;     /* the stored checkpoint's position */
    uint64_t events_total;    /* handled in this process */
    uint64_t host_events;     /* projhost's counter at the last look */
    double rate, rate_t;
    uint64_t rate_ev;
    int has_error;
    uint64_t err_position;
    char err_type[257];
    char err_message[512];
    char *err_traceback;
    /* versions: the new version rebuilding in the background (set and
     * cleared with admin held, under e->smu; see rebuild_*) */
    struct rebuild *rb;
    int has_rb_error;         /* e->smu: the last rebuild failed */
    uint64_t rb_err_version, rb_err_position;
    char rb_err_type[257];
    char rb_err_message[512];
} pentry;

/* A new version of an entry's source, built by its own worker and thread
 * under proj/NAME@VERSION/ while the entry's worker keeps serving; the
 * thread swaps it in when it has caught up (rebuild_swap). */
typedef struct rebuild {
    pentry *e;
    projhost *ph;             /* the rebuild thread's; moved into e->ph by the swap */
    char *source;
    size_t srclen;
    uint64_t version;
    char *file;
    int from_api;
    int emit_mode;            /* the script sets emit_during_rebuild = true */
    char store_name[NAME_MAX_LEN + 20];
    pthread_t th;
    int quit;                 /* m->wake_mu: stop (checkpointed, to resume later) */
    int done;                 /* e->smu: the thread finished (swapped, failed, or quit) */
    int swapped;              /* e->smu */
    uint64_t position;        /* e->smu */
    double rate, rate_t;
    uint64_t rate_pos;
    /* built on several workers (nsh > 1; see "Sharded builds") */
    unsigned nsh;             /* e->smu once the thread has planned; 1 = rb->ph alone */
    replay_router *rt;
    struct shard *shs;
    int sh_failed;            /* atomic: some shard stopped */
} rebuild;

/* One worker process of a sharded build: the partitions whose guessed key
 * routes to idx (replay_router_shard), under proj/NAME@VERSION~idx/. */
typedef struct shard {
    rebuild *rb;
    unsigned idx;
    projhost *ph;
    pthread_t th;
    uint64_t position;        /* e->smu: every event up to here read (fed or not ours) */
    int failed;
    tm_err err;
} shard;

struct projmgr {
    store *s;
    projmgr_opts o;
    char *dir;
    char *exe;
    pthread_mutex_t admin;
    pthread_mutex_t mu;
    pthread_cond_t refs_cv;
    pentry *head;
    pthread_mutex_t wake_mu;
    pthread_cond_t wake_cv;
    pthread_cond_t done_cv;   /* reloads finished */
    uint64_t last;
    int reload_req, reloads_done, reloads_asked, quit;
    pthread_t admin_th;
};

/* ------------------------------------------------------------ helpers */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static struct timespec abs_in(double secs) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    double ns = (double)t.tv_nsec + secs * 1e9;
    t.tv_sec += (time_t)(ns / 1e9);
    t.tv_nsec = (long)fmod(ns, 1e9);
    return t;
}

static uint64_t fnv64(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ull;
    }
    return h ? h : 1; /* 0 means "no file" */
}

static int valid_name(const char *s, size_t n) {
    if (n == 0 || n > NAME_MAX_LEN) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.'))
            return 0;
    }
    return 1;
}

static void logf_(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(const char *level, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "level=%s component=projections %s\n", level, line);
}

/* Quote a value for a key=value log line (no newlines, quotes escaped). */
static const char *logq(char *out, size_t n, const char *s) {
    size_t j = 0;
    for (size_t i = 0; s[i] && j + 3 < n; i++) {
        char c = s[i];
        if (c == '\n' || c == '\r') c = ' ';
        if (c == '"' || c == '\\') out[j++] = '\\';
        out[j++] = c;
    }
    out[j] = 0;
    return out;
}

static int read_file(const char *path, buf *out, tm_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return err_set(err, TM_EIO, "cannot open %s: %s", path, strerror(errno));
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) buf_append(out, tmp, n);
    int bad = ferror(f);
    fclose(f);
    if (bad) return err_set(err, TM_EIO, "cannot read %s", path);
    return 0;
}

static int wr(void *d, const char *p, size_t n) {
    buf_append(d, p, n);
    return 0;
}

static void pk_cstr(msgpack_packer *pk, const char *s) {
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

/* ------------------------------------------------------------ stored records */

typedef struct override {
    int present;
    char *source;             /* malloc'd or NULL */
    size_t srclen;
    uint64_t file_hash;
    int stopped, deleted;
} override;

static void key_of(buf *k, const char *kind, const char *name) {
    buf_reset(k);
    buf_printf(k, "projmgr/%s/%s", kind, name);
}

static void override_parse(const char *v, size_t vl, override *o) {
    memset(o, 0, sizeof *o);
    if (mp_validate(v, vl, NULL, NULL) < 0) return;
    o->present = 1;
    const char *f;
    size_t fl;
    mp_item it;
    if (mp_map_find(v, vl, "source", 6, &f, &fl) == 1 && mp_next(&f, f + fl, &it) == 0 &&
        it.type == MP_STR) {
        o->source = malloc(it.v.s.len + 1);
        memcpy(o->source, it.v.s.ptr, it.v.s.len);
        o->source[it.v.s.len] = 0;
        o->srclen = it.v.s.len;
    }
    if (mp_map_find(v, vl, "file", 4, &f, &fl) == 1 && mp_next(&f, f + fl, &it) == 0 &&
        it.type == MP_UINT)
        o->file_hash = it.v.u;
    if (mp_map_find(v, vl, "stopped", 7, &f, &fl) == 1 && mp_next(&f, f + fl, &it) == 0 &&
        it.type == MP_BOOL)
        o->stopped = it.v.b;
    if (mp_map_find(v, vl, "deleted", 7, &f, &fl) == 1 && mp_next(&f, f + fl, &it) == 0 &&
        it.type == MP_BOOL)
        o->deleted = it.v.b;
}

/* Write (or, when nothing is overridden, delete) NAME's override record. */
static int override_save(projmgr *m, const char *name, const char *src, size_t srclen,
                         uint64_t file_hash, int stopped, int deleted, tm_err *err) {
    buf k = BUF_INIT, v = BUF_INIT;
    key_of(&k, "o", name);
    store_batch *b = store_batch_new();
    if (!src && !stopped && !deleted) {
        store_batch_del(b, k.ptr, k.len);
    } else {
        msgpack_packer pk;
        msgpack_packer_init(&pk, &v, wr);
        msgpack_pack_map(&pk, src ? 4 : 3);
        if (src) {
            pk_cstr(&pk, "source");
            msgpack_pack_str(&pk, srclen);
            msgpack_pack_str_body(&pk, src, srclen);
        }
        pk_cstr(&pk, "file");
        msgpack_pack_uint64(&pk, file_hash);
        pk_cstr(&pk, "stopped");
        if (stopped) msgpack_pack_true(&pk);
        else msgpack_pack_false(&pk);
        pk_cstr(&pk, "deleted");
        if (deleted) msgpack_pack_true(&pk);
        else msgpack_pack_false(&pk);
        store_batch_put(b, k.ptr, k.len, v.ptr, v.len);
    }
    int rc = store_batch_commit(m->s, b, err);
    store_batch_free(b);
    buf_free(&k);
    buf_free(&v);
    return rc;
}

static int entry_save(pentry *e, int stopped, int deleted, tm_err *err) {
    const rebuild *rb = e->rb; /* e->mu held: a swap cannot run meanwhile */
    if (rb && rb->source) /* a pending version: the desired source is the new one */
        return override_save(e->m, e->name, rb->from_api ? rb->source : NULL, rb->srclen,
                             e->file_hash, stopped, deleted, err);
    return override_save(e->m, e->name, e->from_api ? e->source : NULL, e->srclen, e->file_hash,
                         stopped, deleted, err);
}

/* Delete NAME's state, checkpoint and dead letters. */
static int state_delete(projmgr *m, const char *name, tm_err *err) {
    buf k = BUF_INIT;
    buf_printf(&k, "proj/%s/", name);
    int rc = store_kv_delete_prefix(m->s, k.ptr, k.len, err);
    buf_free(&k);
    return rc;
}

/* Make the proj/NAME/ keys belong to `version`: a state built by another source
 * is deleted (rebuild from 0); reset = delete in any case. */
static int state_prepare(projmgr *m, const char *name, uint64_t version, int reset, tm_err *err) {
    buf k = BUF_INIT;
    key_of(&k, "v", name);
    char *v = NULL;
    size_t vl = 0;
    int rc = store_kv_get(m->s, k.ptr, k.len, &v, &vl, err);
    if (rc < 0) goto out;
    uint64_t stored = 0;
    if (rc == 1 && vl == 16) stored = strtoull(strndupa(v, vl), NULL, 16);
    rc = 0;
    if (reset || (stored && stored != version)) {
        if ((rc = state_delete(m, name, err)) < 0) goto out;
    }
    if (stored != version || reset) {
        char hex[17];
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)version);
        store_batch *b = store_batch_new();
        store_batch_put(b, k.ptr, k.len, hex, 16);
        rc = store_batch_commit(m->s, b, err);
        store_batch_free(b);
    }
out:
    free(v);
    buf_free(&k);
    return rc;
}

static int version_delete(projmgr *m, const char *name, tm_err *err) {
    buf k = BUF_INIT;
    key_of(&k, "v", name);
    store_batch *b = store_batch_new();
    store_batch_del(b, k.ptr, k.len);
    int rc = store_batch_commit(m->s, b, err);
    store_batch_free(b);
    buf_free(&k);
    return rc;
}

/* ------------------------------------------------------------ status */

static void set_error(pentry *e, uint64_t pos, const char *type, const char *msg,
                      const char *tb) {
    e->has_error = 1;
    e->err_position = pos;
    snprintf(e->err_type, sizeof e->err_type, "%s", type ? type : "");
    snprintf(e->err_message, sizeof e->err_message, "%s", msg ? msg : "");
    free(e->err_traceback);
    e->err_traceback = tb && *tb ? strdup(tb) : NULL;
}

static void clear_error(pentry *e) {
    e->has_error = 0;
    free(e->err_traceback);
    e->err_traceback = NULL;
}

/* Copy the worker's status into the snapshot (e->mu held). */
static void sync_status(pentry *e) {
    pthread_mutex_lock(&e->smu);
    if (e->ph) {
        const projhost_status *st = projhost_get_status(e->ph);
        if (st->events >= e->host_events) e->events_total += st->events - e->host_events;
        e->host_events = st->events;
        if (st->position > e->position) e->position = st->position;
        e->cp_position = st->checkpoint_position;
        if (st->state != PROJHOST_RUNNING && e->status == PS_RUNNING) {
            e->status = PS_FAULTED;
            uint64_t pos = st->fault_position;
            char type[257];
            snprintf(type, sizeof type, "%s", st->fault_type);
            /* a worker stopped by its watchdog said where: "... faulted at
             * position P (type T): ..." */
            const char *at = pos ? NULL : strstr(st->message, "faulted at position ");
            unsigned long long p = 0;
            char t[257];
            if (at && sscanf(at, "faulted at position %llu (type %256[^)])", &p, t) == 2) {
                pos = p;
                snprintf(type, sizeof type, "%s", t);
            }
            if (!pos) pos = st->position + 1; /* killed: the first event not committed */
            set_error(e, pos, type, st->message, st->traceback);
            char q[600];
            logf_("warn", "msg=\"projection faulted\" name=%s position=%llu type=\"%s\" error=\"%s\"",
                  e->name, (unsigned long long)pos, type, logq(q, sizeof q, st->message));
        }
    }
    pthread_mutex_unlock(&e->smu);
}

/* A background checkpoint landed (the host's committer thread): the
 * entry's thread takes it into the status (entry_cycle). */
static void entry_committed(void *ud) {
    pentry *e = ud;
    pthread_mutex_lock(&e->m->wake_mu);
    e->kick = 1;
    pthread_cond_broadcast(&e->m->wake_cv);
    pthread_mutex_unlock(&e->m->wake_mu);
}

/* Start the worker for the entry's source (e->mu held, ph == NULL). */
static int entry_launch(pentry *e, tm_err *err) {
    projmgr *m = e->m;
    projhost_opts ho = {.memory_limit = m->o.memory_limit,
                        .cpu_limit = m->o.cpu_limit,
                        .exe = m->exe,
                        .on_commit = entry_committed,
                        .on_commit_ud = e};
    projhost *ph = projhost_start(m->s, e->name, e->source, e->srclen, e->file, &ho, err);
    pthread_mutex_lock(&e->smu);
    if (!ph) {
        e->status = PS_FAULTED;
        set_error(e, 0, "", err->msg, NULL);
    } else {
        e->ph = ph;
        e->status = PS_RUNNING;
        e->host_events = projhost_get_status(ph)->events;
        e->position = projhost_get_status(ph)->position;
        e->cp_position = projhost_get_status(ph)->checkpoint_position;
        clear_error(e);
    }
    pthread_mutex_unlock(&e->smu);
    pthread_mutex_lock(&m->wake_mu);
    e->kick = 1;
    e->pub_pending = 1;
    pthread_cond_broadcast(&m->wake_cv);
    pthread_mutex_unlock(&m->wake_mu);
    return ph ? 0 : -1;
}

/* Commit what the worker applied since its last checkpoint (e->mu held);
 * `background`: the commit runs on the host's committer thread and feeding
 * goes on meanwhile (the timed checkpoints of a running projection). */
static int checkpoint_with(pentry *e, int background, tm_err *err) {
    int rc = 0;
    if (e->ph && !background) projhost_wait_commit(e->ph); /* what follows reads the store */
    if (e->ph && projhost_get_status(e->ph)->state == PROJHOST_RUNNING &&
        projhost_uncommitted(e->ph) > 0) {
        /* a dead letter surfacing at the checkpoint rolls back: re-feed, again */
        for (int i = 0; i < 100 &&
                        (rc = background ? projhost_checkpoint_async(e->ph, err)
                                         : projhost_checkpoint(e->ph, err)) == PROJ_REPLAY;
             i++)
            if ((rc = projhost_feed(e->ph, 0, err)) < 0) break;
        sync_status(e);
        if (rc != 0 && projhost_get_status(e->ph)->state == PROJHOST_RUNNING) {
            char q[600];
            logf_("warn", "msg=\"projection checkpoint failed; will retry\" name=%s error=\"%s\"",
                  e->name, logq(q, sizeof q, err->msg));
        }
    }
    if (e->ph && projhost_uncommitted(e->ph) == 0) e->dirty_since = 0;
    return rc == 0 ? 0 : -1;
}

static int entry_checkpoint(pentry *e, tm_err *err) { return checkpoint_with(e, 0, err); }

/* Stop the worker (e->mu held); a running one is checkpointed first when
 * `save` (its state is kept). */
static void entry_halt(pentry *e, pstatus to, int save) {
    if (save) {
        tm_err err;
        err_clear(&err);
        entry_checkpoint(e, &err);
    }
    e->dirty_since = 0;
    if (e->ph) {
        projhost_free(e->ph);
        e->ph = NULL;
    }
    pthread_mutex_lock(&e->smu);
    e->status = to;
    pthread_mutex_unlock(&e->smu);
}

/* ------------------------------------------------------------ JSON */

static void rebuild_json(pentry *e, uint64_t last, buf *out);

static void json_status(pentry *e, uint64_t last, buf *out) {
    pthread_mutex_lock(&e->smu);
    buf_puts(out, "{\"name\":");
    json_put_string(out, e->name, strlen(e->name));
    buf_printf(out, ",\"status\":\"%s\",\"position\":%llu,\"lag\":%llu,\"events\":%llu,"
               "\"events_per_second\":%.1f",
               status_name(e->status), (unsigned long long)e->position,
               (unsigned long long)(last > e->position ? last - e->position : 0),
               (unsigned long long)e->events_total,
               now_s() - e->rate_t > 2.5 ? 0.0 : e->rate);
    buf_printf(out, ",\"checkpoint\":%llu", (unsigned long long)e->cp_position);
    buf_printf(out, ",\"version\":\"%016llx\",\"origin\":\"%s\",\"file\":",
               (unsigned long long)e->version, e->from_api ? "api" : "dir");
    json_put_string(out, e->file, strlen(e->file));
    buf_puts(out, ",\"error\":");
    if (e->has_error) {
        buf_printf(out, "{\"position\":%llu,\"type\":", (unsigned long long)e->err_position);
        json_put_string(out, e->err_type, strlen(e->err_type));
        buf_puts(out, ",\"message\":");
        json_put_string(out, e->err_message, strlen(e->err_message));
        buf_puts(out, ",\"traceback\":");
        if (e->err_traceback) json_put_string(out, e->err_traceback, strlen(e->err_traceback));
        else buf_puts(out, "null");
        buf_putc(out, '}');
    } else {
        buf_puts(out, "null");
    }
    rebuild_json(e, last, out);
    buf_putc(out, '}');
    pthread_mutex_unlock(&e->smu);
}

static uint64_t last_pos(projmgr *m) {
    pthread_mutex_lock(&m->wake_mu);
    uint64_t l = m->last;
    pthread_mutex_unlock(&m->wake_mu);
    return l;
}

/* ------------------------------------------------------------ live updates */

/* Push {"name","status","position","lag","events",("state")} (e->mu held). */
static void publish(pentry *e, uint64_t last) {
    projmgr *m = e->m;
    if (!m->o.publish) return;
    buf j = BUF_INIT;
    json_status(e, last, &j);
    j.len--; /* reopen the object */
    pthread_mutex_lock(&e->smu);
    int running = e->status == PS_RUNNING;
    pthread_mutex_unlock(&e->smu);
    if (running && e->ph && !e->big_state) {
        buf mpb = BUF_INIT;
        tm_err err;
        err_clear(&err);
        double t0 = now_s();
        if (projhost_state_mp(e->ph, &mpb, &err) == 0) {
            size_t before = j.len;
            buf_puts(&j, ",\"state\":");
            if (mpb.len > PUB_STATE_MAX || json_from_mp(mpb.ptr, mpb.len, &j, &err) < 0 ||
                j.len - before > PUB_STATE_MAX) {
                j.len = before;
                e->big_state = 1;
            }
        }
        /* keep feeding cycles short: a state that takes long to fetch is not pushed */
        if (now_s() - t0 > 0.05) e->big_state = 1;
        buf_free(&mpb);
        sync_status(e);
    }
    if (e->big_state) buf_puts(&j, ",\"state_omitted\":true");
    buf_putc(&j, '}');
    char ch[NAME_MAX_LEN + 16];
    int cl = snprintf(ch, sizeof ch, "projection:%s", e->name);
    m->o.publish(m->o.publish_ud, ch, (size_t)cl, j.ptr, j.len);
    buf_free(&j);
}

/* ------------------------------------------------------------ feeding */

static void update_rate(pentry *e, double now) {
    pthread_mutex_lock(&e->smu);
    if (e->rate_t == 0) {
        e->rate_t = now;
        e->rate_ev = e->events_total;
    } else if (now - e->rate_t >= 1.0) {
        e->rate = (double)(e->events_total - e->rate_ev) / (now - e->rate_t);
        e->rate_t = now;
        e->rate_ev = e->events_total;
    }
    pthread_mutex_unlock(&e->smu);
}

/* The checkpoint interval in seconds and the event bound (e->mu held). */
static double cp_secs(pentry *e) {
    uint64_t ms = e->ph ? projhost_get_status(e->ph)->checkpoint_ms : 0;
    return (double)(ms ? ms : PROJMGR_CHECKPOINT_MS) / 1000.0;
}

/* One cycle: feed what was committed up to `last` (at most FEED_CHUNK
 * events; 1 = more to do), checkpoint when due, maybe publish. */
static int entry_cycle(pentry *e, uint64_t last) {
    int more = 0;
    pthread_mutex_lock(&e->mu);
    if (e->ph) { /* a background checkpoint may have landed (or failed) */
        projhost_settle(e->ph);
        sync_status(e);
    }
    pthread_mutex_lock(&e->smu);
    int run = e->ph && e->status == PS_RUNNING && last > e->position;
    pstatus before = e->status;
    uint64_t pos_before = e->position;
    pthread_mutex_unlock(&e->smu);
    tm_err err;
    err_clear(&err);
    if (run) {
        int rc = projhost_feed(e->ph, FEED_CHUNK, &err);
        sync_status(e);
        pthread_mutex_lock(&e->smu);
        /* applied live up to the end of the store: every event up to
         * `last` has been considered (unselected ones included) */
        if (rc == 0 && e->status == PS_RUNNING && last > e->position) e->position = last;
        pthread_mutex_unlock(&e->smu);
        if (rc == PROJHOST_MORE) more = 1;
        if (rc < 0 && projhost_get_status(e->ph)->state == PROJHOST_RUNNING) {
            char q[600];
            logf_("warn", "msg=\"projection feed failed; will retry\" name=%s error=\"%s\"",
                  e->name, logq(q, sizeof q, err.msg));
        }
    }
    double now = now_s();
    double cp_due = 0;
    if (e->ph && projhost_get_status(e->ph)->state == PROJHOST_RUNNING) {
        uint64_t unc = projhost_uncommitted(e->ph);
        if (unc == 0) {
            e->dirty_since = 0;
        } else {
            if (e->dirty_since == 0) e->dirty_since = now;
            cp_due = e->dirty_since + cp_secs(e);
            if (now >= cp_due) {
                err_clear(&err);
                checkpoint_with(e, 1, &err); /* on failure dirty_since stays: retried when due */
                if (e->dirty_since == 0) cp_due = 0;
                else cp_due = now + cp_secs(e);
            }
        }
    }
    update_rate(e, now);
    pthread_mutex_lock(&e->smu);
    int changed = e->status != before, moved = e->position != pos_before;
    pthread_mutex_unlock(&e->smu);
    projmgr *m = e->m;
    double gap = 1.0 / (m->o.publish_hz ? m->o.publish_hz : 10);
    pthread_mutex_lock(&m->wake_mu);
    e->cp_due = cp_due;
    if (moved) e->pub_pending = 1;
    int due = changed || (e->pub_pending && now - e->last_pub >= gap);
    if (due) {
        e->pub_pending = 0;
        e->last_pub = now;
    }
    pthread_mutex_unlock(&m->wake_mu);
    if (due) publish(e, last_pos(m));
    pthread_mutex_unlock(&e->mu);
    return more;
}

static void *entry_main(void *arg) {
    pentry *e = arg;
    projmgr *m = e->m;
    pthread_mutex_lock(&m->wake_mu);
    for (;;) {
        while (!e->quit && !e->kick && e->seen >= m->last) {
            double gap = 1.0 / (m->o.publish_hz ? m->o.publish_hz : 10);
            double now = now_s(), wait = 1.0;
            if (e->pub_pending && e->last_pub + gap - now < wait) wait = e->last_pub + gap - now;
            if (e->cp_due && e->cp_due - now < wait) wait = e->cp_due - now;
            if (wait < 0.001) wait = 0.001;
            struct timespec ts = abs_in(wait);
            if (pthread_cond_timedwait(&m->wake_cv, &m->wake_mu, &ts) == ETIMEDOUT) break;
        }
        if (e->quit) break;
        e->kick = 0;
        uint64_t last = m->last;
        pthread_mutex_unlock(&m->wake_mu);
        int more = entry_cycle(e, last);
        pthread_mutex_lock(&m->wake_mu);
        if (more) e->kick = 1;
        else if (e->seen < last) e->seen = last;
    }
    pthread_mutex_unlock(&m->wake_mu);
    return NULL;
}

/* ------------------------------------------------------------ registry */

static pentry *entry_new(projmgr *m, const char *name, const char *src, size_t len,
                         const char *file, int from_api, uint64_t file_hash) {
    pentry *e = calloc(1, sizeof *e);
    if (!e) tm_oom();
    e->m = m;
    snprintf(e->name, sizeof e->name, "%s", name);
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->smu, NULL);
    e->source = malloc(len + 1);
    memcpy(e->source, src, len);
    e->source[len] = 0;
    e->srclen = len;
    e->version = fnv64(src, len);
    e->file = strdup(file);
    e->from_api = from_api;
    e->file_hash = file_hash;
    e->status = PS_STOPPED;
    e->seen = last_pos(m);
    return e;
}

static void entry_destroy(pentry *e) {
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->smu);
    free(e->source);
    free(e->file);
    free(e->err_traceback);
    free(e);
}

static int rebuild_stop(pentry *e, char **src, size_t *len, char **file, int *from_api);
static int rebuild_begin(pentry *e, const char *src, size_t len, const char *file, int from_api,
                         int fresh, tm_err *err);
static void rebuild_abandon(pentry *e);
static int staging_delete(projmgr *m, const char *name, tm_err *err);
static int kv_put1(projmgr *m, const char *kind, const char *name, const char *v, size_t vl,
                   tm_err *err);

/* Link and start the thread (admin held). */
static void entry_register(projmgr *m, pentry *e) {
    pthread_mutex_lock(&m->mu);
    pentry **pp = &m->head; /* keep the list sorted by name */
    while (*pp && strcmp((*pp)->name, e->name) < 0) pp = &(*pp)->next;
    e->next = *pp;
    *pp = e;
    pthread_mutex_unlock(&m->mu);
    tm_thread(&e->th, entry_main, e, "projection");
}

/* Unlink, stop the thread and the worker, free once unused (admin held). */
static void entry_remove(projmgr *m, pentry *e) {
    pthread_mutex_lock(&m->mu);
    for (pentry **pp = &m->head; *pp; pp = &(*pp)->next)
        if (*pp == e) {
            *pp = e->next;
            break;
        }
    pthread_mutex_unlock(&m->mu);
    rebuild_stop(e, NULL, NULL, NULL, NULL);
    pthread_mutex_lock(&m->wake_mu);
    e->quit = 1;
    pthread_cond_broadcast(&m->wake_cv);
    pthread_mutex_unlock(&m->wake_mu);
    pthread_join(e->th, NULL);
    pthread_mutex_lock(&e->mu);
    entry_halt(e, PS_STOPPED, 1);
    pthread_mutex_unlock(&e->mu);
    pthread_mutex_lock(&m->mu);
    while (e->refs > 0) pthread_cond_wait(&m->refs_cv, &m->mu);
    pthread_mutex_unlock(&m->mu);
    entry_destroy(e);
}

static pentry *find_locked(projmgr *m, const char *name) {
    for (pentry *e = m->head; e; e = e->next)
        if (!strcmp(e->name, name)) return e;
    return NULL;
}

/* A referenced entry (release with entry_put) or NULL. */
static pentry *entry_get(projmgr *m, const char *name) {
    pthread_mutex_lock(&m->mu);
    pentry *e = find_locked(m, name);
    if (e) e->refs++;
    pthread_mutex_unlock(&m->mu);
    return e;
}

static void entry_put(projmgr *m, pentry *e) {
    pthread_mutex_lock(&m->mu);
    if (--e->refs == 0) pthread_cond_broadcast(&m->refs_cv);
    pthread_mutex_unlock(&m->mu);
}

/* Replace the entry's source (e->mu held): stop, reset, restart. */
static int entry_replace(pentry *e, const char *src, size_t len, const char *file, int from_api,
                         tm_err *err) {
    entry_halt(e, PS_STOPPED, 0);
    free(e->source);
    e->source = malloc(len + 1);
    memcpy(e->source, src, len);
    e->source[len] = 0;
    e->srclen = len;
    e->version = fnv64(src, len);
    free(e->file);
    e->file = strdup(file);
    e->from_api = from_api;
    e->big_state = 0;
    pthread_mutex_lock(&e->smu);
    e->position = 0;
    pthread_mutex_unlock(&e->smu);
    if (state_prepare(e->m, e->name, e->version, 1, err) < 0) return -1;
    return entry_launch(e, err);
}

/* ------------------------------------------------------------ versions */

/* 1 if the script asks for its emitted events during a rebuild
 * (`emit_during_rebuild = true`, as replay.h reads it). */
static int wants_emits(const char *src, size_t n) {
    const char *k = "emit_during_rebuild";
    size_t kl = strlen(k);
    for (size_t i = 0; i + kl <= n; i++) {
        if (memcmp(src + i, k, kl) || (i && (isalnum((unsigned char)src[i - 1]) || src[i - 1] == '_')))
            continue;
        size_t j = i + kl;
        while (j < n && strchr(" \t\r\n", src[j])) j++;
        if (j >= n || src[j] != '=' || (j + 1 < n && src[j + 1] == '=')) continue;
        j++;
        while (j < n && strchr(" \t\r\n", src[j])) j++;
        if (j + 4 <= n && !memcmp(src + j, "true", 4)) return 1;
    }
    return 0;
}

static int kv_put1(projmgr *m, const char *kind, const char *name, const char *v, size_t vl,
                   tm_err *err) {
    buf k = BUF_INIT;
    key_of(&k, kind, name);
    store_batch *b = store_batch_new();
    if (v) store_batch_put(b, k.ptr, k.len, v, vl);
    else store_batch_del(b, k.ptr, k.len);
    int rc = store_batch_commit(m->s, b, err);
    store_batch_free(b);
    buf_free(&k);
    return rc;
}

/* Delete every staged version of NAME (proj/NAME@.../). */
static int staging_delete(projmgr *m, const char *name, tm_err *err) {
    buf k = BUF_INIT;
    buf_printf(&k, "proj/%s@", name);
    int rc = store_kv_delete_prefix(m->s, k.ptr, k.len, err);
    buf_free(&k);
    if (rc == 0) rc = kv_put1(m, "n", name, NULL, 0, err); /* the staged shard count */
    return rc;
}

static void rb_fail(rebuild *rb, const char *type, uint64_t pos, const char *msg) {
    pentry *e = rb->e;
    char q[600];
    logf_("warn", "msg=\"projection rebuild failed; the old version keeps serving\" name=%s "
          "version=%016llx error=\"%s\"", e->name, (unsigned long long)rb->version,
          logq(q, sizeof q, msg));
    pthread_mutex_lock(&e->smu);
    e->has_rb_error = 1;
    e->rb_err_version = rb->version;
    e->rb_err_position = pos;
    snprintf(e->rb_err_type, sizeof e->rb_err_type, "%s", type ? type : "");
    snprintf(e->rb_err_message, sizeof e->rb_err_message, "%s", msg);
    rb->done = 1; /* with the error: no listing shows both */
    pthread_mutex_unlock(&e->smu);
    if (rb->ph) {
        projhost_free(rb->ph);
        rb->ph = NULL;
    }
    tm_err e2;
    err_clear(&e2);
    staging_delete(e->m, e->name, &e2);
}

static void rb_fail_ph(rebuild *rb, const tm_err *err) {
    const projhost_status *st = rb->ph ? projhost_get_status(rb->ph) : NULL;
    if (st && st->state != PROJHOST_RUNNING)
        rb_fail(rb, st->fault_type, st->fault_position, *st->message ? st->message : err->msg);
    else
        rb_fail(rb, "", 0, err->msg);
}

static int rb_quit(rebuild *rb) {
    projmgr *m = rb->e->m;
    pthread_mutex_lock(&m->wake_mu);
    int q = rb->quit;
    pthread_mutex_unlock(&m->wake_mu);
    return q;
}

/* The start of a swap (rebuild thread): take e->mu, fix the swap position
 * *L (the log's end) and bring the serving worker there, checkpointed (its
 * emitted events up to L are appended).  0 (e->mu held), or 1: quit asked
 * (e->mu not held). */
static int swap_enter(rebuild *rb, uint64_t *L) {
    pentry *e = rb->e;
    tm_err err;
    err_clear(&err);
    pthread_mutex_lock(&e->mu);
    if (rb_quit(rb)) {
        pthread_mutex_unlock(&e->mu);
        return 1;
    }
    *L = store_last_position(e->m->s);
    projhost *old = e->ph;
    if (old && projhost_get_status(old)->state == PROJHOST_RUNNING) {
        if (projhost_feed_until(old, *L, &err) == 0) entry_checkpoint(e, &err);
        sync_status(e);
    }
    return 0;
}

/* Into the swap's batch: delete every key under the serving model's
 * prefix.  0, -1 with err. */
static int swap_clear_live(projmgr *m, const buf *live, store_batch *b, tm_err *err) {
    const char *k, *v;
    size_t kl, vl;
    int r = 0;
    store_kv_iter *it = store_kv_scan(m->s, live->ptr, live->len, NULL, 0, err);
    if (!it) return -1;
    while ((r = store_kv_next(it, &k, &kl, &v, &vl, err)) == 1) store_batch_del(b, k, kl);
    store_kv_iter_free(it);
    return r < 0 ? -1 : 0;
}

/* Into the swap's batch: the new version's source hash, and no build
 * pending (its source and shard count records dropped). */
static void swap_records(rebuild *rb, store_batch *b, buf *key) {
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)rb->version);
    key_of(key, "v", rb->e->name);
    store_batch_put(b, key->ptr, key->len, hex, 16);
    key_of(key, "s", rb->e->name);
    store_batch_del(b, key->ptr, key->len);
    key_of(key, "n", rb->e->name);
    store_batch_del(b, key->ptr, key->len);
}

/* The entry takes the built version's source (e->mu held, the stored
 * switch done). */
static void swap_source(rebuild *rb) {
    pentry *e = rb->e;
    free(e->source);
    e->source = rb->source;
    e->srclen = rb->srclen;
    e->version = rb->version;
    rb->source = NULL;
    free(e->file);
    e->file = rb->file;
    rb->file = NULL;
    e->from_api = rb->from_api;
    e->big_state = 0;
    e->dirty_since = 0;
}

/* Make the caught-up new version the entry's (runs on the rebuild thread):
 * under e->mu, bring the old worker and the new one to the same position L
 * (the old one checkpointed: its emitted events up to L are appended), then
 * ONE store batch replaces proj/NAME/ by the new version's keys and records
 * its source hash; then the entry serves from the new worker.  0 swapped,
 * 1 quit asked, -1 failed (rb_fail called). */
static int rebuild_swap(rebuild *rb) {
    pentry *e = rb->e;
    projmgr *m = e->m;
    tm_err err;
    err_clear(&err);
    uint64_t L;
    if (swap_enter(rb, &L)) return 1;
    projhost *old = e->ph;
    int rc;
    for (int i = 0; i < 100; i++) {
        if ((rc = projhost_feed_until(rb->ph, L, &err)) != 0) break;
        if ((rc = projhost_checkpoint(rb->ph, &err)) != PROJ_REPLAY) break;
    }
    if (rc != 0) {
        pthread_mutex_unlock(&e->mu);
        rb_fail_ph(rb, &err);
        return -1;
    }
    /* one batch: proj/NAME/ := proj/NAME@V/, projmgr/v/NAME := V */
    store_batch *b = store_batch_new();
    buf live = BUF_INIT, stage = BUF_INIT, key = BUF_INIT;
    buf_printf(&live, "proj/%s/", e->name);
    buf_printf(&stage, "proj/%s/", rb->store_name);
    const char *k, *v;
    size_t kl, vl;
    int r = 0;
    int bad = swap_clear_live(m, &live, b, &err) < 0;
    store_kv_iter *it = bad ? NULL : store_kv_scan(m->s, stage.ptr, stage.len, NULL, 0, &err);
    while (it && (r = store_kv_next(it, &k, &kl, &v, &vl, &err)) == 1) {
        buf_reset(&key);
        buf_append(&key, live.ptr, live.len);
        buf_append(&key, k + stage.len, kl - stage.len);
        store_batch_put(b, key.ptr, key.len, v, vl);
        store_batch_del(b, k, kl);
    }
    bad = bad || !it || r < 0;
    store_kv_iter_free(it);
    swap_records(rb, b, &key);
    if (!bad && store_batch_commit(m->s, b, &err) < 0) bad = 1;
    store_batch_free(b);
    buf_free(&live);
    buf_free(&stage);
    buf_free(&key);
    if (bad) {
        pthread_mutex_unlock(&e->mu);
        rb_fail(rb, "", 0, err.msg);
        return -1;
    }
    /* the stored switch is done: now the entry serves the new version */
    projhost_set_store_name(rb->ph, NULL);
    if (!rb->emit_mode) projhost_set_suppress_emits(rb->ph, 0);
    const projhost_status *st = projhost_get_status(rb->ph);
    e->ph = rb->ph;
    rb->ph = NULL;
    swap_source(rb);
    pthread_mutex_lock(&e->smu);
    e->status = PS_RUNNING;
    clear_error(e);
    e->host_events = st->events;
    e->position = st->position > L ? st->position : L;
    e->cp_position = st->checkpoint_position;
    e->has_rb_error = 0;
    rb->swapped = 1;
    pthread_mutex_unlock(&e->smu);
    pthread_mutex_lock(&m->wake_mu);
    e->kick = 1;
    e->pub_pending = 1;
    pthread_cond_broadcast(&m->wake_cv);
    pthread_mutex_unlock(&m->wake_mu);
    pthread_mutex_unlock(&e->mu);
    logf_("info", "msg=\"projection version swapped in\" name=%s version=%016llx position=%llu",
          e->name, (unsigned long long)e->version, (unsigned long long)L);
    projhost_free(old); /* not checkpointed again: its keys are gone */
    return 0;
}

/* ------------------------------------------------------------ sharded builds
 *
 * A new version whose partition form the router recognises (replay.h,
 * replay_router_new) is built by one worker process per core instead of
 * one: shard i feeds only the events whose guessed partition key routes to
 * it (projhost_opts.owns), keeps its states under proj/NAME@VERSION~i/ and
 * checkpoints on its own (its checkpoint is at its own last event, so a
 * restart resumes each shard where it was; the staged shard count,
 * projmgr/n/NAME, must match or the build starts over).  Each shard has
 * its own feeding thread, so the Lua of the shards runs on every core.
 * The swap brings every shard to the same position L, checks that every
 * stored partition key belongs to the shard holding it (the router's guess
 * held), and in one batch moves every shard's states to proj/NAME/ with
 * one checkpoint at L; a fresh worker then serves proj/NAME/ (its states
 * load from the store as they are asked for).  A fault in a shard, a
 * wrong guess, or a script that turns out unpartitioned, is not trusted:
 * the version is built again on one worker, which reports a real fault as
 * an unsharded build would. */

static int shard_owns(void *ud, const tm_event *ev) {
    shard *sh = ud;
    return replay_router_shard(sh->rb->rt, ev, sh->rb->nsh) == sh->idx;
}

/* Workers to build rb's version on. */
static unsigned shards_planned(rebuild *rb) {
    projmgr *m = rb->e->m;
    unsigned n = m->o.rebuild_workers ? m->o.rebuild_workers : tm_cores();
    if (n > MAX_SHARDS) n = MAX_SHARDS;
    if (n < 2 || rb->emit_mode) return 1;
    if (!rb->rt) rb->rt = replay_router_new(rb->source, rb->srclen);
    return rb->rt ? n : 1;
}

/* Keep a staged build only if it was split the same way; record n. */
static int shards_prepare(rebuild *rb, unsigned n, tm_err *err) {
    pentry *e = rb->e;
    buf k = BUF_INIT;
    key_of(&k, "n", e->name);
    char *v = NULL;
    size_t vl = 0;
    int rc = store_kv_get(e->m->s, k.ptr, k.len, &v, &vl, err);
    buf_free(&k);
    if (rc < 0) return -1;
    unsigned was = 1;
    if (rc == 1 && vl > 0 && vl < 8) {
        char num[8];
        memcpy(num, v, vl);
        num[vl] = 0;
        was = (unsigned)atoi(num);
    }
    free(v);
    if (was != n && staging_delete(e->m, e->name, err) < 0) return -1;
    char num[16];
    snprintf(num, sizeof num, "%u", n);
    if (n > 1 && kv_put1(e->m, "n", e->name, num, strlen(num), err) < 0) return -1;
    pthread_mutex_lock(&e->smu);
    rb->nsh = n;
    pthread_mutex_unlock(&e->smu);
    return 0;
}

static void shards_free(rebuild *rb) {
    for (unsigned i = 0; rb->shs && i < rb->nsh; i++)
        if (rb->shs[i].ph) projhost_free(rb->shs[i].ph);
    free(rb->shs);
    rb->shs = NULL;
}

/* The build's progress: the slowest shard's position (e->smu held). */
static void shards_progress(rebuild *rb) {
    uint64_t p = UINT64_MAX;
    for (unsigned i = 0; i < rb->nsh; i++)
        if (rb->shs[i].position < p) p = rb->shs[i].position;
    double now = now_s();
    if (p != UINT64_MAX && p > rb->position) rb->position = p;
    if (rb->rate_t == 0) {
        rb->rate_t = now;
        rb->rate_pos = rb->position;
    } else if (now - rb->rate_t >= 0.5) {
        rb->rate = (double)(rb->position - rb->rate_pos) / (now - rb->rate_t);
        rb->rate_t = now;
        rb->rate_pos = rb->position;
    }
}

static void shard_fail(shard *sh) {
    sh->failed = 1;
    __atomic_store_n(&sh->rb->sh_failed, 1, __ATOMIC_RELEASE);
}

/* Feed one shard until it has caught up with the log once (or quit, or
 * another shard stopped), checkpointing every second. */
static void *shard_main(void *arg) {
    shard *sh = arg;
    rebuild *rb = sh->rb;
    pentry *e = rb->e;
    double last_cp = now_s();
    while (!rb_quit(rb) && !__atomic_load_n(&rb->sh_failed, __ATOMIC_ACQUIRE)) {
        uint64_t last = store_last_position(e->m->s);
        int rc = projhost_feed(sh->ph, REBUILD_CHUNK, &sh->err);
        if (rc < 0) {
            shard_fail(sh);
            break;
        }
        pthread_mutex_lock(&e->smu);
        uint64_t p = projhost_get_status(sh->ph)->position;
        sh->position = rc == 0 && last > p ? last : p;
        shards_progress(rb);
        pthread_mutex_unlock(&e->smu);
        if (rc == 0) break;
        if (now_s() - last_cp >= 1.0) {
            if (projhost_checkpoint(sh->ph, &sh->err) != 0) {
                shard_fail(sh);
                break;
            }
            last_cp = now_s();
        }
    }
    return NULL;
}

/* Checkpoint every shard (to resume later) and stop them. */
static void shards_park(rebuild *rb) {
    tm_err err;
    for (unsigned i = 0; i < rb->nsh; i++) {
        err_clear(&err);
        if (rb->shs[i].ph) projhost_checkpoint(rb->shs[i].ph, &err);
    }
    shards_free(rb);
}

/* Move shard i's staged keys into b (proj/NAME/...), adding its states'
 * routing check.  0, 1 (a key that shard does not own: the guess failed),
 * -1 with err. */
static int shard_move(rebuild *rb, unsigned i, const buf *live, store_batch *b, tm_err *err) {
    projmgr *m = rb->e->m;
    buf stage = BUF_INIT, key = BUF_INIT;
    buf_printf(&stage, "proj/%s~%u/", rb->store_name, i);
    store_kv_iter *it = store_kv_scan(m->s, stage.ptr, stage.len, NULL, 0, err);
    const char *k, *v;
    size_t kl, vl;
    int r = 0, rc = it ? 0 : -1;
    while (rc == 0 && (r = store_kv_next(it, &k, &kl, &v, &vl, err)) == 1) {
        const char *rest = k + stage.len;
        size_t rl = kl - stage.len;
        store_batch_del(b, k, kl);
        if (rl == 2 && !memcmp(rest, "cp", 2)) continue; /* one checkpoint for all, below */
        if (rl >= 2 && !memcmp(rest, "s/", 2) && replay_shard(rest + 2, rl - 2, rb->nsh) != i) {
            rc = 1;
            break;
        }
        buf_reset(&key);
        buf_append(&key, live->ptr, live->len);
        buf_append(&key, rest, rl);
        store_batch_put(b, key.ptr, key.len, v, vl);
    }
    if (rc == 0 && r < 0) rc = -1;
    store_kv_iter_free(it);
    buf_free(&stage);
    buf_free(&key);
    return rc;
}

/* The entry takes the built version (e->mu held, the stored switch done):
 * its source, and a fresh worker on proj/NAME/. */
static void shards_install(rebuild *rb, uint64_t L) {
    pentry *e = rb->e;
    projhost *old = e->ph;
    e->ph = NULL;
    swap_source(rb);
    tm_err err;
    err_clear(&err);
    entry_launch(e, &err);
    pthread_mutex_lock(&e->smu);
    if (e->position < L) e->position = L;
    e->has_rb_error = 0;
    rb->swapped = 1;
    pthread_mutex_unlock(&e->smu);
    if (old) projhost_free(old); /* not checkpointed again: its keys are gone */
}

/* rebuild_swap for a sharded build.  0 swapped, 1 build again on one
 * worker, 2 quit asked, -1 failed (rb_fail called). */
static int shards_swap(rebuild *rb) {
    pentry *e = rb->e;
    projmgr *m = e->m;
    tm_err err;
    err_clear(&err);
    uint64_t L;
    if (swap_enter(rb, &L)) return 2;
    uint64_t events = 0;
    for (unsigned i = 0; i < rb->nsh; i++) {
        projhost *ph = rb->shs[i].ph;
        if (projhost_feed_until(ph, L, &err) != 0 || projhost_checkpoint(ph, &err) != 0) {
            pthread_mutex_unlock(&e->mu);
            return projhost_get_status(ph)->state == PROJHOST_RUNNING ? (rb_fail_ph(rb, &err), -1)
                                                                       : 1;
        }
        events += projhost_get_status(ph)->events;
    }
    store_batch *b = store_batch_new();
    buf live = BUF_INIT, val = BUF_INIT, key = BUF_INIT;
    buf_printf(&live, "proj/%s/", e->name);
    int rc = swap_clear_live(m, &live, b, &err);
    for (unsigned i = 0; rc == 0 && i < rb->nsh; i++) rc = shard_move(rb, i, &live, b, &err);
    if (rc == 0) { /* the checkpoint of the whole model */
        proj_checkpoint_record(&val, 0, events, L);
        buf_reset(&key);
        buf_printf(&key, "proj/%s/cp", e->name);
        store_batch_put(b, key.ptr, key.len, val.ptr, val.len);
        swap_records(rb, b, &key);
        if (store_batch_commit(m->s, b, &err) < 0) rc = -1;
    }
    store_batch_free(b);
    buf_free(&live);
    buf_free(&val);
    buf_free(&key);
    if (rc != 0) {
        pthread_mutex_unlock(&e->mu);
        if (rc < 0) rb_fail(rb, "", 0, err.msg);
        return rc < 0 ? -1 : 1;
    }
    shards_install(rb, L);
    pthread_mutex_unlock(&e->mu);
    logf_("info", "msg=\"projection version swapped in\" name=%s version=%016llx position=%llu "
          "workers=%u", e->name, (unsigned long long)rb->version, (unsigned long long)L, rb->nsh);
    return 0;
}

/* Build rb's version on rb->nsh workers.  0 done (swapped, failed or
 * quit), 1 build it again on one worker. */
static int rebuild_sharded(rebuild *rb) {
    pentry *e = rb->e;
    projmgr *m = e->m;
    tm_err err;
    err_clear(&err);
    rb->shs = calloc(rb->nsh, sizeof *rb->shs);
    if (!rb->shs) tm_oom();
    for (unsigned i = 0; i < rb->nsh; i++) {
        shard *sh = &rb->shs[i];
        sh->rb = rb;
        sh->idx = i;
        char sn[NAME_MAX_LEN + 40];
        snprintf(sn, sizeof sn, "%s~%u", rb->store_name, i);
        projhost_opts ho = {.memory_limit = m->o.memory_limit, .cpu_limit = m->o.cpu_limit,
                            .exe = m->exe, .store_name = sn, .suppress_emits = 1,
                            .owns = shard_owns, .owns_ud = sh};
        sh->ph = projhost_start(m->s, e->name, rb->source, rb->srclen, rb->file, &ho, &err);
        if (!sh->ph) {
            shards_free(rb);
            rb_fail(rb, "", 0, err.msg);
            return 0;
        }
        sh->position = projhost_get_status(sh->ph)->position;
    }
    const projhost_status *st0 = projhost_get_status(rb->shs[0].ph);
    if (!st0->partitioned || st0->dead_letter) {
        shards_free(rb);
        return 1;
    }
    uint64_t from = UINT64_MAX;
    for (unsigned i = 0; i < rb->nsh; i++)
        if (rb->shs[i].position < from) from = rb->shs[i].position;
    logf_("info", "msg=\"projection version building\" name=%s version=%016llx workers=%u "
          "from=%llu", e->name, (unsigned long long)rb->version, rb->nsh,
          (unsigned long long)from);
    for (;;) {
        for (unsigned i = 1; i < rb->nsh; i++)
            tm_thread(&rb->shs[i].th, shard_main, &rb->shs[i], "projection rebuild shard");
        shard_main(&rb->shs[0]);
        for (unsigned i = 1; i < rb->nsh; i++) pthread_join(rb->shs[i].th, NULL);
        if (rb_quit(rb)) {
            shards_park(rb);
            return 0;
        }
        if (rb->sh_failed) { /* confirmed (or not) by a build on one worker */
            for (unsigned i = 0; i < rb->nsh; i++)
                if (rb->shs[i].failed) {
                    char q[600];
                    logf_("info", "msg=\"projection rebuild shard stopped; building on one "
                          "worker\" name=%s error=\"%s\"", e->name,
                          logq(q, sizeof q, rb->shs[i].err.msg));
                    break;
                }
            shards_free(rb);
            return 1;
        }
        int rc = shards_swap(rb);
        if (rc == 2) continue; /* quit asked: parked above */
        if (rc == 1) {
            logf_("info", "msg=\"projection rebuild: the router's guess did not hold; building "
                  "on one worker\" name=%s", e->name);
            shards_free(rb);
            return 1;
        }
        shards_free(rb);
        return 0;
    }
}

static void *rebuild_main(void *arg) {
    rebuild *rb = arg;
    pentry *e = rb->e;
    projmgr *m = e->m;
    tm_err err;
    err_clear(&err);
    unsigned nsh = rb->nsh; /* planned by rebuild_begin */
    if (shards_prepare(rb, nsh, &err) < 0) {
        rb_fail(rb, "", 0, err.msg);
        goto out;
    }
    if (nsh > 1) {
        if (rebuild_sharded(rb) == 0) goto out;
        if (shards_prepare(rb, 1, &err) < 0) { /* drops the shards' keys */
            rb_fail(rb, "", 0, err.msg);
            goto out;
        }
    }
    projhost_opts ho = {.memory_limit = m->o.memory_limit, .cpu_limit = m->o.cpu_limit,
                        .exe = m->exe, .store_name = rb->store_name,
                        .suppress_emits = !rb->emit_mode,
                        /* swapped in, it becomes e->ph (background checkpoints) */
                        .on_commit = entry_committed, .on_commit_ud = e};
    rb->ph = projhost_start(m->s, e->name, rb->source, rb->srclen, rb->file, &ho, &err);
    if (!rb->ph) {
        rb_fail(rb, "", 0, err.msg);
        goto out;
    }
    logf_("info", "msg=\"projection version building\" name=%s version=%016llx from=%llu",
          e->name, (unsigned long long)rb->version,
          (unsigned long long)projhost_get_status(rb->ph)->position);
    double last_cp = now_s();
    for (;;) {
        if (rb_quit(rb)) { /* keep what was built: a restart resumes from it */
            err_clear(&err);
            for (int i = 0; i < 100 && projhost_checkpoint(rb->ph, &err) == PROJ_REPLAY; i++)
                if (projhost_feed(rb->ph, 0, &err) < 0) break;
            projhost_free(rb->ph);
            rb->ph = NULL;
            break;
        }
        uint64_t last = store_last_position(m->s);
        int rc = projhost_feed(rb->ph, REBUILD_CHUNK, &err);
        if (rc < 0) {
            rb_fail_ph(rb, &err);
            break;
        }
        double now = now_s();
        pthread_mutex_lock(&e->smu);
        uint64_t p = projhost_get_status(rb->ph)->position;
        if (rc == 0 && last > p) p = last;
        if (p > rb->position) rb->position = p;
        if (rb->rate_t == 0) {
            rb->rate_t = now;
            rb->rate_pos = rb->position;
        } else if (now - rb->rate_t >= 0.5) {
            rb->rate = (double)(rb->position - rb->rate_pos) / (now - rb->rate_t);
            rb->rate_t = now;
            rb->rate_pos = rb->position;
        }
        pthread_mutex_unlock(&e->smu);
        if (rc == 0) { /* caught up with the live log */
            if (rebuild_swap(rb) != 1) break;
            continue; /* quit asked: handled above */
        }
        if (now - last_cp >= 1.0) {
            for (int i = 0; i < 100 && (rc = projhost_checkpoint(rb->ph, &err)) == PROJ_REPLAY; i++)
                if ((rc = projhost_feed(rb->ph, 0, &err)) < 0) break;
            if (rc < 0 && projhost_get_status(rb->ph)->state != PROJHOST_RUNNING) {
                rb_fail_ph(rb, &err);
                break;
            }
            last_cp = now_s();
        }
    }
out:
    pthread_mutex_lock(&e->smu);
    rb->done = 1;
    pthread_mutex_unlock(&e->smu);
    return NULL;
}

/* Start building `src` as the entry's next version (admin and e->mu held,
 * no rebuild attached, the entry running).  fresh: discard any staged
 * version first (else a staged checkpoint of the same source resumes). */
static int rebuild_begin(pentry *e, const char *src, size_t len, const char *file, int from_api,
                         int fresh, tm_err *err) {
    projmgr *m = e->m;
    if (fresh && staging_delete(m, e->name, err) < 0) return -1;
    /* the source that built proj/NAME/: a restart serves it until the swap */
    if (kv_put1(m, "s", e->name, e->source, e->srclen, err) < 0) return -1;
    rebuild *rb = calloc(1, sizeof *rb);
    if (!rb) tm_oom();
    rb->e = e;
    rb->source = malloc(len + 1);
    memcpy(rb->source, src, len);
    rb->source[len] = 0;
    rb->srclen = len;
    rb->version = fnv64(src, len);
    rb->file = strdup(file);
    rb->from_api = from_api;
    rb->emit_mode = wants_emits(src, len);
    snprintf(rb->store_name, sizeof rb->store_name, "%s@%016llx", e->name,
             (unsigned long long)rb->version);
    rb->nsh = shards_planned(rb); /* the status shows it from the start */
    pthread_mutex_lock(&e->smu);
    e->rb = rb;
    e->has_rb_error = 0;
    pthread_mutex_unlock(&e->smu);
    logf_("info", "msg=\"%s\" name=%s version=%016llx workers=%u",
          rb->version == e->version ? "projection rebuilding its source beside the serving model"
                                    : "projection source changed: building the new version",
          e->name, (unsigned long long)rb->version, rb->nsh);
    tm_thread(&rb->th, rebuild_main, rb, "projection rebuild");
    return 0;
}

/* Detach the entry's rebuild (admin held, e->mu NOT held: the thread may
 * be swapping): stop its thread (a running one checkpoints, so it can
 * resume), free it.  Returns 1 if a build was still pending (not swapped,
 * not failed), with *src / *len / *file / *from_api handed over when they
 * are not NULL. */
static int rebuild_stop(pentry *e, char **src, size_t *len, char **file, int *from_api) {
    rebuild *rb = e->rb;
    if (!rb) return 0;
    projmgr *m = e->m;
    pthread_mutex_lock(&m->wake_mu);
    rb->quit = 1;
    pthread_mutex_unlock(&m->wake_mu);
    pthread_join(rb->th, NULL);
    pthread_mutex_lock(&e->smu);
    e->rb = NULL;
    int failed = e->has_rb_error && e->rb_err_version == rb->version;
    pthread_mutex_unlock(&e->smu);
    int pending = !rb->swapped && !failed;
    if (pending && src) {
        *src = rb->source;
        *len = rb->srclen;
        *file = rb->file;
        *from_api = rb->from_api;
        rb->source = rb->file = NULL;
    }
    free(rb->source);
    free(rb->file);
    replay_router_free(rb->rt);
    free(rb);
    return pending;
}

/* Give up a pending rebuild (admin held, e->mu not held): the entry takes
 * the new source as its own (not started: the caller restarts or halts it;
 * a start rebuilds it in place) and the staged keys go. */
static void rebuild_abandon(pentry *e) {
    char *src = NULL, *file = NULL;
    size_t len = 0;
    int from_api = 0;
    if (!rebuild_stop(e, &src, &len, &file, &from_api)) return;
    tm_err err;
    err_clear(&err);
    staging_delete(e->m, e->name, &err);
    kv_put1(e->m, "s", e->name, NULL, 0, &err);
    pthread_mutex_lock(&e->mu);
    free(e->source);
    e->source = src;
    e->srclen = len;
    e->version = fnv64(src, len);
    free(e->file);
    e->file = file;
    e->from_api = from_api;
    pthread_mutex_unlock(&e->mu);
}

static void rebuild_json(pentry *e, uint64_t last, buf *out) {
    rebuild *rb = e->rb;
    buf_puts(out, ",\"rebuilding\":");
    if (rb && !rb->done && !rb->swapped) {
        buf_printf(out, "{\"version\":\"%016llx\",\"position\":%llu,\"lag\":%llu,"
                   "\"events_per_second\":%.1f,\"workers\":%u}",
                   (unsigned long long)rb->version, (unsigned long long)rb->position,
                   (unsigned long long)(last > rb->position ? last - rb->position : 0),
                   now_s() - rb->rate_t > 2.5 ? 0.0 : rb->rate, rb->nsh ? rb->nsh : 1);
    } else {
        buf_puts(out, "null");
    }
    buf_puts(out, ",\"rebuild_error\":");
    if (e->has_rb_error) {
        buf_printf(out, "{\"version\":\"%016llx\",\"position\":%llu,\"type\":",
                   (unsigned long long)e->rb_err_version, (unsigned long long)e->rb_err_position);
        json_put_string(out, e->rb_err_type, strlen(e->rb_err_type));
        buf_puts(out, ",\"message\":");
        json_put_string(out, e->rb_err_message, strlen(e->rb_err_message));
        buf_putc(out, '}');
    } else {
        buf_puts(out, "null");
    }
}

/* ------------------------------------------------------------ desired set */

typedef struct wanted {
    char name[NAME_MAX_LEN + 1];
    char *source;             /* owned */
    size_t srclen;
    char *file;               /* owned */
    int from_api;
    uint64_t file_hash;
    int stopped, deleted;
} wanted;

typedef struct wanted_list {
    wanted *v;
    size_t n, cap;
} wanted_list;

static wanted *wanted_find(wanted_list *l, const char *name) {
    for (size_t i = 0; i < l->n; i++)
        if (!strcmp(l->v[i].name, name)) return &l->v[i];
    return NULL;
}

static wanted *wanted_add(wanted_list *l, const char *name) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 16;
        l->v = realloc(l->v, l->cap * sizeof *l->v);
        if (!l->v) tm_oom();
    }
    wanted *w = &l->v[l->n++];
    memset(w, 0, sizeof *w);
    snprintf(w->name, sizeof w->name, "%s", name);
    return w;
}

static void wanted_free(wanted_list *l) {
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].source);
        free(l->v[i].file);
    }
    free(l->v);
}

/* Directory files, then the stored overrides that still apply. */
static int wanted_load(projmgr *m, wanted_list *l, tm_err *err) {
    if (m->dir) {
        DIR *d = opendir(m->dir);
        if (!d) return err_set(err, TM_EIO, "projections directory %s: %s", m->dir, strerror(errno));
        struct dirent *de;
        while ((de = readdir(d))) {
            size_t n = strlen(de->d_name);
            if (n <= 4 || strcmp(de->d_name + n - 4, ".lua") || de->d_name[0] == '.') continue;
            char name[NAME_MAX_LEN + 1];
            if (!valid_name(de->d_name, n - 4)) {
                logf_("warn", "msg=\"skipping projection file: bad name\" file=\"%s\"", de->d_name);
                continue;
            }
            memcpy(name, de->d_name, n - 4);
            name[n - 4] = 0;
            buf path = BUF_INIT, src = BUF_INIT;
            buf_printf(&path, "%s/%s", m->dir, de->d_name);
            struct stat st;
            tm_err e2;
            if (stat(path.ptr, &st) != 0 || !S_ISREG(st.st_mode) || read_file(path.ptr, &src, &e2) < 0) {
                logf_("warn", "msg=\"cannot read projection file\" file=\"%s\"", path.ptr);
                buf_free(&path);
                buf_free(&src);
                continue;
            }
            wanted *w = wanted_add(l, name);
            w->srclen = src.len;
            w->source = buf_steal(&src, NULL);
            if (!w->source) w->source = strdup("");
            w->file = buf_steal(&path, NULL);
            w->file_hash = fnv64(w->source, w->srclen);
        }
        closedir(d);
    }
    store_kv_iter *it = store_kv_scan(m->s, "projmgr/o/", 10, NULL, 0, err);
    if (!it) return -1;
    const char *k, *v;
    size_t kl, vl;
    int r;
    store_batch *stale = store_batch_new();
    int nstale = 0;
    while ((r = store_kv_next(it, &k, &kl, &v, &vl, err)) == 1) {
        char name[NAME_MAX_LEN + 1];
        if (kl - 10 > NAME_MAX_LEN || !valid_name(k + 10, kl - 10)) continue;
        memcpy(name, k + 10, kl - 10);
        name[kl - 10] = 0;
        override o;
        override_parse(v, vl, &o);
        wanted *w = wanted_find(l, name);
        uint64_t fh = w ? w->file_hash : 0;
        if (!o.present || o.file_hash != fh || (!o.source && !w)) {
            store_batch_del(stale, k, kl); /* the file changed or went away since */
            nstale++;
            free(o.source);
            continue;
        }
        if (!w) {
            w = wanted_add(l, name);
            buf f = BUF_INIT;
            buf_printf(&f, "%s.lua", name);
            w->file = buf_steal(&f, NULL);
        }
        if (o.source) {
            free(w->source);
            w->source = o.source;
            w->srclen = o.srclen;
            w->from_api = 1;
            free(w->file);
            buf f = BUF_INIT;
            buf_printf(&f, "%s.lua", name);
            w->file = buf_steal(&f, NULL);
        }
        w->stopped = o.stopped;
        w->deleted = o.deleted;
    }
    store_kv_iter_free(it);
    if (r == 0 && nstale) r = store_batch_commit(m->s, stale, err);
    store_batch_free(stale);
    return r < 0 ? -1 : 0;
}

/* The stored source of NAME's serving version when a new version
 * (`want`) was still building at the last stop: projmgr/s/NAME, kept only
 * while it built proj/NAME/ (its hash is projmgr/v/NAME).  NULL = none. */
/* At start, no build to resume (pending_active found none): a build left
 * staged by a stop (a rebuild of the serving source, say) is dropped.
 * 0, -1 with err. */
static int stale_build_drop(projmgr *m, const char *name, tm_err *err) {
    buf k = BUF_INIT;
    key_of(&k, "s", name);
    char *v = NULL;
    size_t vl = 0;
    int rc = store_kv_get(m->s, k.ptr, k.len, &v, &vl, err);
    free(v);
    buf_free(&k);
    if (rc <= 0) return rc;
    if (kv_put1(m, "s", name, NULL, 0, err) < 0) return -1;
    return staging_delete(m, name, err);
}

static char *pending_active(projmgr *m, const char *name, uint64_t want, size_t *len) {
    buf k = BUF_INIT;
    tm_err err;
    err_clear(&err);
    char *src = NULL, *v = NULL;
    size_t sl = 0, vl = 0;
    key_of(&k, "s", name);
    if (store_kv_get(m->s, k.ptr, k.len, &src, &sl, &err) == 1) {
        key_of(&k, "v", name);
        uint64_t h = fnv64(src, sl), stored = 0;
        if (store_kv_get(m->s, k.ptr, k.len, &v, &vl, &err) == 1 && vl == 16)
            stored = strtoull(strndupa(v, vl), NULL, 16);
        if (stored != h || h == want) {
            free(src);
            src = NULL;
        }
    }
    free(v);
    buf_free(&k);
    if (src) { /* NUL-terminate */
        char *c = realloc(src, sl + 1);
        if (!c) tm_oom();
        c[sl] = 0;
        src = c;
    }
    *len = sl;
    return src;
}

/* Bring the registry to the wanted set (admin held). */
static int apply_wanted(projmgr *m, tm_err *err) {
    wanted_list l = {0};
    if (wanted_load(m, &l, err) < 0) {
        wanted_free(&l);
        return -1;
    }
    /* stop what is no longer wanted */
    for (;;) {
        pentry *gone = NULL;
        pthread_mutex_lock(&m->mu);
        for (pentry *e = m->head; e && !gone; e = e->next) {
            wanted *w = wanted_find(&l, e->name);
            if (!w || w->deleted) gone = e;
        }
        pthread_mutex_unlock(&m->mu);
        if (!gone) break;
        logf_("info", "msg=\"projection removed\" name=%s", gone->name);
        entry_remove(m, gone);
    }
    for (size_t i = 0; i < l.n; i++) {
        wanted *w = &l.v[i];
        if (w->deleted || !w->source) continue;
        tm_err e2;
        err_clear(&e2);
        pthread_mutex_lock(&m->mu);
        pentry *e = find_locked(m, w->name);
        pthread_mutex_unlock(&m->mu);
        if (e) {
            /* the admin lock keeps e alive */
            uint64_t want = fnv64(w->source, w->srclen);
            if (e->rb && e->rb->version == want) continue; /* already building it */
            if (e->rb) rebuild_stop(e, NULL, NULL, NULL, NULL);
            pthread_mutex_lock(&e->mu);
            e->file_hash = w->file_hash;
            if (e->version == want) {
                if (kv_put1(m, "s", e->name, NULL, 0, &e2) == 0) staging_delete(m, e->name, &e2);
            } else if (e->ph && e->status == PS_RUNNING) {
                /* a new version, built beside the serving one */
                rebuild_begin(e, w->source, w->srclen, w->file, w->from_api, 1, &e2);
            } else {
                logf_("info", "msg=\"projection source changed: rebuilding\" name=%s", e->name);
                if (entry_replace(e, w->source, w->srclen, w->file, w->from_api, &e2) < 0 &&
                    !e->ph) {
                    char q[600];
                    logf_("warn", "msg=\"projection failed to load\" name=%s error=\"%s\"", e->name,
                          logq(q, sizeof q, e2.msg));
                }
            }
            pthread_mutex_unlock(&e->mu);
            continue;
        }
        /* a rebuild pending at the last stop: the old version serves, the new one builds */
        char *active = NULL;
        size_t alen = 0;
        if (!w->stopped) active = pending_active(m, w->name, fnv64(w->source, w->srclen), &alen);
        if (active)
            e = entry_new(m, w->name, active, alen, w->file, w->from_api, w->file_hash);
        else
            e = entry_new(m, w->name, w->source, w->srclen, w->file, w->from_api, w->file_hash);
        pthread_mutex_lock(&e->mu);
        if (active && state_prepare(m, e->name, e->version, 0, &e2) == 0 &&
            entry_launch(e, &e2) == 0) {
            rebuild_begin(e, w->source, w->srclen, w->file, w->from_api, 0, &e2);
            logf_("info", "msg=\"projection started; its new version resumes building\" "
                  "name=%s position=%llu", e->name, (unsigned long long)e->position);
            free(active);
        } else if (active) {
            char q[600];
            logf_("warn", "msg=\"projection failed to load\" name=%s error=\"%s\"", e->name,
                  logq(q, sizeof q, e2.msg));
            free(active);
        } else if (w->stopped) {
            e->status = PS_STOPPED;
        } else if (stale_build_drop(m, e->name, &e2) < 0 ||
                   state_prepare(m, e->name, e->version, 0, &e2) < 0 || entry_launch(e, &e2) < 0) {
            char q[600];
            pthread_mutex_lock(&e->smu);
            e->status = PS_FAULTED;
            if (!e->has_error) set_error(e, 0, "", e2.msg, NULL);
            pthread_mutex_unlock(&e->smu);
            logf_("warn", "msg=\"projection failed to load\" name=%s error=\"%s\"", e->name,
                  logq(q, sizeof q, e2.msg));
        } else {
            logf_("info", "msg=\"projection started\" name=%s position=%llu", e->name,
                  (unsigned long long)e->position);
        }
        pthread_mutex_unlock(&e->mu);
        entry_register(m, e);
    }
    wanted_free(&l);
    return 0;
}

static void *admin_main(void *arg) {
    projmgr *m = arg;
    pthread_mutex_lock(&m->wake_mu);
    for (;;) {
        while (!m->quit && !m->reload_req) pthread_cond_wait(&m->wake_cv, &m->wake_mu);
        if (m->quit) break;
        m->reload_req = 0;
        int ticket = m->reloads_asked;
        pthread_mutex_unlock(&m->wake_mu);
        pthread_mutex_lock(&m->admin);
        tm_err err;
        err_clear(&err);
        if (apply_wanted(m, &err) < 0) {
            char q[600];
            logf_("warn", "msg=\"reload failed\" error=\"%s\"", logq(q, sizeof q, err.msg));
        } else {
            logf_("info", "msg=\"projections reloaded\"");
        }
        pthread_mutex_unlock(&m->admin);
        pthread_mutex_lock(&m->wake_mu);
        m->reloads_done = ticket;
        pthread_cond_broadcast(&m->done_cv);
    }
    pthread_mutex_unlock(&m->wake_mu);
    return NULL;
}

/* ------------------------------------------------------------ lifecycle */

projmgr *projmgr_new(store *s, const projmgr_opts *o, tm_err *err) {
    projmgr *m = calloc(1, sizeof *m);
    if (!m) tm_oom();
    m->s = s;
    if (o) m->o = *o;
    m->dir = m->o.dir ? strdup(m->o.dir) : NULL;
    m->exe = m->o.exe ? strdup(m->o.exe) : NULL;
    m->o.dir = m->dir;
    m->o.exe = m->exe;
    pthread_mutex_init(&m->admin, NULL);
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->refs_cv, NULL);
    pthread_mutex_init(&m->wake_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&m->wake_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&m->done_cv, NULL);
    m->last = store_last_position(s);
    pthread_mutex_lock(&m->admin);
    int rc = apply_wanted(m, err);
    pthread_mutex_unlock(&m->admin);
    if (rc < 0) {
        projmgr_free(m);
        return NULL;
    }
    tm_thread(&m->admin_th, admin_main, m, "projection admin");
    return m;
}

void projmgr_notify(projmgr *m, uint64_t last) {
    pthread_mutex_lock(&m->wake_mu);
    if (last > m->last) m->last = last;
    pthread_cond_broadcast(&m->wake_cv);
    pthread_mutex_unlock(&m->wake_mu);
}

void projmgr_reload(projmgr *m) {
    pthread_mutex_lock(&m->wake_mu);
    m->reload_req = 1;
    m->reloads_asked++;
    pthread_cond_broadcast(&m->wake_cv);
    pthread_mutex_unlock(&m->wake_mu);
}

void projmgr_sync(projmgr *m) {
    pthread_mutex_lock(&m->wake_mu);
    int want = m->reloads_asked;
    while (!m->quit && m->reloads_done < want) pthread_cond_wait(&m->done_cv, &m->wake_mu);
    pthread_mutex_unlock(&m->wake_mu);
}

void projmgr_free(projmgr *m) {
    if (!m) return;
    pthread_mutex_lock(&m->wake_mu);
    int had_admin = !m->quit && m->admin_th;
    m->quit = 1;
    pthread_cond_broadcast(&m->wake_cv);
    pthread_cond_broadcast(&m->done_cv);
    pthread_mutex_unlock(&m->wake_mu);
    if (had_admin) pthread_join(m->admin_th, NULL);
    pthread_mutex_lock(&m->admin);
    while (m->head) entry_remove(m, m->head);
    pthread_mutex_unlock(&m->admin);
    pthread_mutex_destroy(&m->admin);
    pthread_mutex_destroy(&m->mu);
    pthread_cond_destroy(&m->refs_cv);
    pthread_mutex_destroy(&m->wake_mu);
    pthread_cond_destroy(&m->wake_cv);
    pthread_cond_destroy(&m->done_cv);
    free(m->dir);
    free(m->exe);
    free(m);
}

void projmgr_metrics(projmgr *m, buf *out) {
    static const char *const names[4] = {"position", "lag", "events_total", "faulted"};
    static const char *const help[4] = {
        "last store position the projection has processed",
        "store last position minus the projection's position",
        "events handled by the projection since the server started",
        "1 when the projection is faulted"};
    uint64_t last = last_pos(m);
    pthread_mutex_lock(&m->mu);
    for (int k = 0; k < 4; k++) {
        buf_printf(out, "# HELP tidemark_projection_%s %s\n# TYPE tidemark_projection_%s %s\n",
                   names[k], help[k], names[k], k == 2 ? "counter" : "gauge");
        for (pentry *e = m->head; e; e = e->next) {
            pthread_mutex_lock(&e->smu);
            uint64_t v = k == 0   ? e->position
                         : k == 1 ? (last > e->position ? last - e->position : 0)
                         : k == 2 ? e->events_total
                                  : (uint64_t)(e->status == PS_FAULTED);
            pthread_mutex_unlock(&e->smu);
            buf_printf(out, "tidemark_projection_%s{name=\"%s\"} %llu\n", names[k], e->name,
                       (unsigned long long)v);
        }
    }
    pthread_mutex_unlock(&m->mu);
}

/* ------------------------------------------------------------ routes */

static void reply_json(api_reply *rp, int status, buf *b) {
    rp->status = status;
    buf_reset(&rp->body);
    buf_append(&rp->body, b->ptr ? b->ptr : "", b->len);
    rp->content_type = "application/json";
}

static void reply_err(api_reply *rp, const tm_err *err) {
    api_error(rp, api_status_of(err->code ? err->code : TM_EIO), "%s", err->msg);
}

static void reply_mp(api_reply *rp, const buf *mpb) {
    buf j = BUF_INIT;
    tm_err err;
    err_clear(&err);
    if (json_from_mp(mpb->ptr, mpb->len, &j, &err) < 0) reply_err(rp, &err);
    else reply_json(rp, 200, &j);
    buf_free(&j);
}

static void route_list(projmgr *m, api_reply *rp) {
    uint64_t last = last_pos(m);
    buf j = BUF_INIT;
    buf_printf(&j, "{\"last_position\":%llu,\"projections\":[", (unsigned long long)last);
    pthread_mutex_lock(&m->mu);
    for (pentry *e = m->head; e; e = e->next) {
        if (e != m->head) buf_putc(&j, ',');
        json_status(e, last, &j);
    }
    pthread_mutex_unlock(&m->mu);
    buf_puts(&j, "]}");
    reply_json(rp, 200, &j);
    buf_free(&j);
}

static void route_status(projmgr *m, pentry *e, int code, api_reply *rp) {
    buf j = BUF_INIT;
    json_status(e, last_pos(m), &j);
    reply_json(rp, code, &j);
    buf_free(&j);
}

/* Lock e->mu for a request: 0, or -1 with rp filled (busy). */
static int lock_for_request(pentry *e, api_reply *rp) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 30;
    if (pthread_mutex_timedlock(&e->mu, &ts) != 0) {
        api_error(rp, 503, "projection %s is busy (catching up); try again", e->name);
        return -1;
    }
    return 0;
}

static int need_running(pentry *e, api_reply *rp) {
    pthread_mutex_lock(&e->smu);
    pstatus s = e->status;
    char msg[512];
    snprintf(msg, sizeof msg, "%s", e->has_error ? e->err_message : "");
    pthread_mutex_unlock(&e->smu);
    if (s == PS_RUNNING && e->ph) return 0;
    if (s == PS_FAULTED)
        api_error(rp, 409, "projection %s is faulted: %s", e->name, msg);
    else
        api_error(rp, 409, "projection %s is stopped", e->name);
    return -1;
}

static void reply_no_partition(pentry *e, const char *key, size_t kl, api_reply *rp) {
    buf q = BUF_INIT;
    json_put_string(&q, key, kl);
    api_error(rp, 404, "no partition %s in projection %s", q.ptr, e->name);
    buf_free(&q);
}

/* One partition (e->mu held): a running projection answers from its
 * worker (the live state, which may be ahead of the last checkpoint); a
 * stopped or faulted one from the stored checkpoint. */
static void route_partition(projmgr *m, pentry *e, const char *key, size_t kl, api_reply *rp) {
    pthread_mutex_lock(&e->smu);
    int running = e->ph && e->status == PS_RUNNING;
    pthread_mutex_unlock(&e->smu);
    if (running) {
        buf out = BUF_INIT;
        tm_err err;
        err_clear(&err);
        int rc = projhost_partition(e->ph, key, kl, &out, &err);
        if (rc < 0) sync_status(e);
        if (rc == 1) reply_mp(rp, &out);
        else if (rc == 0) reply_no_partition(e, key, kl, rp);
        else if (projhost_get_status(e->ph)->state == PROJHOST_RUNNING) reply_err(rp, &err);
        buf_free(&out);
        if (rc >= 0 || projhost_get_status(e->ph)->state == PROJHOST_RUNNING) return;
        /* the worker just failed: its stored checkpoint still answers */
    }
    buf k = BUF_INIT;
    buf_printf(&k, "proj/%s/s/", e->name);
    buf_append(&k, key, kl);
    char *v = NULL;
    size_t vl = 0;
    tm_err err;
    err_clear(&err);
    int rc = store_kv_get(m->s, k.ptr, k.len, &v, &vl, &err);
    if (rc < 0) {
        reply_err(rp, &err);
    } else if (rc == 0) {
        reply_no_partition(e, key, kl, rp);
    } else {
        buf b = {.ptr = v, .len = vl};
        if (mp_validate(v, vl, NULL, &err) < 0) reply_err(rp, &err);
        else reply_mp(rp, &b);
    }
    free(v);
    buf_free(&k);
}

static void route_state(projmgr *m, pentry *e, const api_request *rq, const char *part,
                        size_t partlen, api_reply *rp) {
    buf p = BUF_INIT;
    if (!part && api_query_get(rq->query, "partition", &p)) {
        part = p.ptr ? p.ptr : "";
        partlen = p.len;
    }
    if (part) {
        if (lock_for_request(e, rp) == 0) {
            route_partition(m, e, part, partlen, rp);
            pthread_mutex_unlock(&e->mu);
        }
        buf_free(&p);
        return;
    }
    buf_free(&p);
    if (lock_for_request(e, rp) < 0) return;
    if (need_running(e, rp) == 0) {
        buf mpb = BUF_INIT;
        tm_err err;
        err_clear(&err);
        if (projhost_state_mp(e->ph, &mpb, &err) < 0) {
            sync_status(e);
            reply_err(rp, &err);
        } else {
            reply_mp(rp, &mpb);
        }
        buf_free(&mpb);
    }
    pthread_mutex_unlock(&e->mu);
}

static void route_partitions(projmgr *m, pentry *e, const api_request *rq, api_reply *rp) {
    buf after = BUF_INIT, lim = BUF_INIT;
    int has_after = api_query_get(rq->query, "after", &after);
    uint64_t limit = 1000;
    if (api_query_get(rq->query, "limit", &lim)) {
        char *end = NULL;
        unsigned long long v = strtoull(lim.ptr ? lim.ptr : "", &end, 10);
        if (!lim.len || *end || v == 0 || v > 100000) {
            api_error(rp, 400, "limit must be 1..100000");
            buf_free(&after);
            buf_free(&lim);
            return;
        }
        limit = v;
    }
    buf prefix = BUF_INIT, start = BUF_INIT;
    buf_printf(&prefix, "proj/%s/s/", e->name);
    if (has_after) {
        buf_append(&start, prefix.ptr, prefix.len);
        buf_append(&start, after.ptr ? after.ptr : "", after.len);
        buf_putc(&start, '\0'); /* the first key after `after` */
    }
    tm_err err;
    err_clear(&err);
    if (lock_for_request(e, rp) < 0) goto out;
    /* the listing reads the store: commit what the worker applied first */
    if (entry_checkpoint(e, &err) < 0) {
        pthread_mutex_unlock(&e->mu);
        reply_err(rp, &err);
        goto out;
    }
    store_kv_iter *it =
        store_kv_scan(m->s, prefix.ptr, prefix.len, has_after ? start.ptr : NULL, start.len, &err);
    pthread_mutex_unlock(&e->mu);
    if (!it) {
        reply_err(rp, &err);
        goto out;
    }
    buf j = BUF_INIT;
    buf_puts(&j, "{\"partitions\":[");
    const char *k, *v;
    size_t kl, vl;
    uint64_t n = 0;
    int r;
    const char *lastk = NULL;
    size_t lastl = 0;
    buf lastb = BUF_INIT;
    while (n < limit && (r = store_kv_next(it, &k, &kl, &v, &vl, &err)) == 1) {
        if (n++) buf_putc(&j, ',');
        json_put_string(&j, k + prefix.len, kl - prefix.len);
        buf_reset(&lastb);
        buf_append(&lastb, k + prefix.len, kl - prefix.len);
    }
    int more = n == limit && store_kv_next(it, &k, &kl, &v, &vl, &err) == 1;
    store_kv_iter_free(it);
    buf_puts(&j, "],\"next\":");
    if (more) {
        lastk = lastb.ptr;
        lastl = lastb.len;
        json_put_string(&j, lastk, lastl);
    } else {
        buf_puts(&j, "null");
    }
    buf_putc(&j, '}');
    reply_json(rp, 200, &j);
    buf_free(&j);
    buf_free(&lastb);
out:
    buf_free(&after);
    buf_free(&lim);
    buf_free(&prefix);
    buf_free(&start);
}

/* Query arguments as msgpack: POST body (JSON), ?args=JSON, or the other
 * query parameters as an object (values parsed as JSON when they are). */
static int query_args(const api_request *rq, buf *out, tm_err *err) {
    if (!strcmp(rq->method, "POST")) {
        size_t i = 0;
        while (i < rq->body_len && strchr(" \t\r\n", rq->body[i])) i++;
        if (i == rq->body_len) return 0;
        return json_to_mp(rq->body, rq->body_len, NULL, out, err);
    }
    buf a = BUF_INIT;
    if (api_query_get(rq->query, "args", &a)) {
        int rc = json_to_mp(a.ptr ? a.ptr : "", a.len, NULL, out, err);
        buf_free(&a);
        if (rc < 0) err_prefix(err, "args");
        return rc;
    }
    buf_free(&a);
    if (!rq->query || !*rq->query) return 0;
    buf j = BUF_INIT, k = BUF_INIT, v = BUF_INIT, tmp = BUF_INIT;
    size_t pos = 0;
    int n = 0;
    buf_putc(&j, '{');
    while (api_query_next(rq->query, &pos, &k, &v)) {
        if (n++) buf_putc(&j, ',');
        json_put_string(&j, k.ptr ? k.ptr : "", k.len);
        buf_putc(&j, ':');
        tm_err e2;
        buf_reset(&tmp);
        if (v.len && json_to_mp(v.ptr, v.len, NULL, &tmp, &e2) == 0) buf_append(&j, v.ptr, v.len);
        else json_put_string(&j, v.ptr ? v.ptr : "", v.len);
    }
    buf_putc(&j, '}');
    int rc = json_to_mp(j.ptr, j.len, NULL, out, err);
    buf_free(&j);
    buf_free(&k);
    buf_free(&v);
    buf_free(&tmp);
    return rc;
}

static void route_query(pentry *e, const api_request *rq, const char *q, api_reply *rp) {
    buf args = BUF_INIT, out = BUF_INIT;
    tm_err err;
    err_clear(&err);
    if (query_args(rq, &args, &err) < 0) {
        api_error(rp, 400, "bad query arguments: %s", err.msg);
    } else if (lock_for_request(e, rp) == 0) {
        if (need_running(e, rp) == 0) {
            if (projhost_query(e->ph, q, args.ptr, args.len, &out, &err) < 0) {
                sync_status(e);
                if (strstr(err.msg, "no query") || strstr(err.msg, "unknown query"))
                    api_error(rp, 404, "%s", err.msg);
                else
                    reply_err(rp, &err);
            } else {
                reply_mp(rp, &out);
            }
        }
        pthread_mutex_unlock(&e->mu);
    }
    buf_free(&args);
    buf_free(&out);
}

static uint64_t dir_file_hash(projmgr *m, const char *name) {
    if (!m->dir) return 0;
    buf path = BUF_INIT, src = BUF_INIT;
    buf_printf(&path, "%s/%s.lua", m->dir, name);
    tm_err err;
    uint64_t h = 0;
    struct stat st;
    if (stat(path.ptr, &st) == 0 && S_ISREG(st.st_mode) && read_file(path.ptr, &src, &err) == 0)
        h = fnv64(src.ptr ? src.ptr : "", src.len);
    buf_free(&path);
    buf_free(&src);
    return h;
}

/* PUT /projections/{name} (admin held). */
static void route_put(projmgr *m, const char *name, const api_request *rq, api_reply *rp) {
    if (rq->body_len == 0) {
        api_error(rp, 400, "the body must be the projection's Lua source");
        return;
    }
    buf file = BUF_INIT;
    buf_printf(&file, "%s.lua", name);
    tm_err err;
    err_clear(&err);
    pentry *e = entry_get(m, name);
    uint64_t want = fnv64(rq->body, rq->body_len);
    if (e && e->version == want && e->rb) { /* back to the serving source: drop the build */
        rebuild_stop(e, NULL, NULL, NULL, NULL);
        if (kv_put1(m, "s", name, NULL, 0, &err) == 0) staging_delete(m, name, &err);
        pthread_mutex_lock(&e->mu);
        entry_save(e, 0, 0, &err);
        pthread_mutex_unlock(&e->mu);
    }
    int building = 0; /* the version already building (admin held: e->rb stays) */
    if (e && e->rb) {
        pthread_mutex_lock(&e->smu);
        building = e->rb->version == want && !e->rb->done;
        pthread_mutex_unlock(&e->smu);
    }
    if (e && (e->version == want || building)) {
        /* same source (or the version already building): nothing to do */
        route_status(m, e, 200, rp);
        entry_put(m, e);
        buf_free(&file);
        return;
    }
    /* load it once in a throw-away worker: syntax and definition errors are 400s */
    projhost_opts ho = {.memory_limit = m->o.memory_limit, .cpu_limit = m->o.cpu_limit,
                        .exe = m->exe};
    projhost *probe = projhost_start(m->s, name, rq->body, rq->body_len, file.ptr, &ho, &err);
    if (!probe) {
        if (e) entry_put(m, e);
        api_error(rp, err.code == TM_EINVAL ? 400 : api_status_of(err.code), "%s", err.msg);
        buf_free(&file);
        return;
    }
    projhost_free(probe);
    uint64_t fh = dir_file_hash(m, name);
    int created = 0;
    if (e) {
        rebuild_stop(e, NULL, NULL, NULL, NULL); /* a newer version replaces a building one */
        pthread_mutex_lock(&e->mu);
        e->file_hash = fh;
        int rc;
        if (e->ph && e->status == PS_RUNNING) {
            /* the old version serves until the new one has caught up */
            rc = override_save(m, name, rq->body, rq->body_len, fh, 0, 0, &err);
            if (rc == 0) rc = rebuild_begin(e, rq->body, rq->body_len, file.ptr, 1, 1, &err);
            if (rc < 0) reply_err(rp, &err);
            pthread_mutex_unlock(&e->mu);
            if (rc == 0) {
                route_status(m, e, 200, rp);
                logf_("info", "msg=\"projection new version building\" name=%s", name);
            }
            entry_put(m, e);
            buf_free(&file);
            return;
        }
        rc = entry_replace(e, rq->body, rq->body_len, file.ptr, 1, &err);
        if (rc == 0 || e->status == PS_FAULTED) rc = entry_save(e, 0, 0, &err);
        pthread_mutex_unlock(&e->mu);
        logf_("info", "msg=\"projection replaced\" name=%s", name);
    } else {
        e = entry_new(m, name, rq->body, rq->body_len, file.ptr, 1, fh);
        pthread_mutex_lock(&e->mu);
        if (state_prepare(m, name, e->version, 1, &err) == 0) entry_launch(e, &err);
        entry_save(e, 0, 0, &err);
        pthread_mutex_unlock(&e->mu);
        entry_register(m, e);
        e = entry_get(m, name);
        created = 1;
        logf_("info", "msg=\"projection created\" name=%s", name);
    }
    if (e) {
        route_status(m, e, created ? 201 : 200, rp);
        entry_put(m, e);
    }
    buf_free(&file);
}

/* start | stop | reset | delete (admin held). */
/* POST .../rebuild (admin held; releases e): build the serving source
 * again from position 0 as a new version beside the serving model (on
 * every core when it splits), swapped in when caught up, as a PUT of a
 * changed source is.  A build already under way (of this source or of a
 * newer one) is kept; a projection that is not running is a 409. */
static void route_rebuild(projmgr *m, pentry *e, api_reply *rp) {
    tm_err err;
    err_clear(&err);
    pthread_mutex_lock(&e->smu);
    int building = e->rb && !e->rb->done && !e->rb->swapped;
    pthread_mutex_unlock(&e->smu);
    if (!building) {
        rebuild_stop(e, NULL, NULL, NULL, NULL); /* a finished one (swapped or failed) */
        pthread_mutex_lock(&e->mu);
        int running = e->ph && e->status == PS_RUNNING;
        int rc = running ? rebuild_begin(e, e->source, e->srclen, e->file, e->from_api, 1, &err)
                         : 0;
        pthread_mutex_unlock(&e->mu);
        if (!running) {
            api_error(rp, 409, "projection %s is not running (start it first)", e->name);
            entry_put(m, e);
            return;
        }
        if (rc < 0) {
            reply_err(rp, &err);
            entry_put(m, e);
            return;
        }
        logf_("info", "msg=\"projection command\" name=%s command=rebuild", e->name);
    }
    route_status(m, e, 200, rp);
    entry_put(m, e);
}

static void route_command(projmgr *m, pentry *e, const char *cmd, api_reply *rp) {
    tm_err err;
    err_clear(&err);
    if (!strcmp(cmd, "delete")) {
        char name[NAME_MAX_LEN + 1];
        snprintf(name, sizeof name, "%s", e->name);
        uint64_t fh = dir_file_hash(m, name);
        entry_put(m, e);
        entry_remove(m, e);
        int rc = state_delete(m, name, &err);
        if (rc == 0) rc = staging_delete(m, name, &err);
        if (rc == 0) rc = kv_put1(m, "s", name, NULL, 0, &err);
        if (rc == 0) rc = version_delete(m, name, &err);
        /* a file in the directory would bring it back: remember the deletion */
        if (rc == 0) rc = override_save(m, name, NULL, 0, fh, 0, fh != 0, &err);
        if (rc < 0) {
            reply_err(rp, &err);
            return;
        }
        logf_("info", "msg=\"projection deleted\" name=%s", name);
        buf j = BUF_INIT;
        buf_puts(&j, "{\"name\":");
        json_put_string(&j, name, strlen(name));
        buf_puts(&j, ",\"status\":\"deleted\"}");
        reply_json(rp, 200, &j);
        buf_free(&j);
        return;
    }
    if (!strcmp(cmd, "rebuild")) {
        route_rebuild(m, e, rp);
        return;
    }
    if (strcmp(cmd, "start")) rebuild_abandon(e); /* stop / reset: the new source in place */
    pthread_mutex_lock(&e->mu);
    int rc = 0;
    if (!strcmp(cmd, "stop")) {
        entry_halt(e, PS_STOPPED, 1);
        rc = entry_save(e, 1, 0, &err);
    } else if (!strcmp(cmd, "start")) {
        if (!e->ph || e->status != PS_RUNNING) {
            entry_halt(e, PS_STOPPED, 0);
            rc = state_prepare(m, e->name, e->version, 0, &err);
            if (rc == 0) entry_launch(e, &err);
        }
        if (rc == 0) rc = entry_save(e, 0, 0, &err);
    } else { /* reset */
        entry_halt(e, PS_STOPPED, 0);
        pthread_mutex_lock(&e->smu);
        e->position = 0;
        pthread_mutex_unlock(&e->smu);
        rc = state_prepare(m, e->name, e->version, 1, &err);
        if (rc == 0) entry_launch(e, &err);
        if (rc == 0) rc = entry_save(e, 0, 0, &err);
    }
    pthread_mutex_unlock(&e->mu);
    logf_("info", "msg=\"projection command\" name=%s command=%s", e->name, cmd);
    if (rc < 0) reply_err(rp, &err);
    else route_status(m, e, 200, rp);
    pthread_mutex_lock(&m->wake_mu);
    e->kick = 1;
    pthread_cond_broadcast(&m->wake_cv);
    pthread_mutex_unlock(&m->wake_mu);
    entry_put(m, e);
}

static int command_of(const api_request *rq, char *out, size_t n, api_reply *rp) {
    const char *v;
    size_t vl;
    buf mpb = BUF_INIT;
    tm_err err;
    err_clear(&err);
    mp_item it;
    if (json_to_mp(rq->body, rq->body_len, NULL, &mpb, &err) < 0 ||
        mp_map_find(mpb.ptr, mpb.len, "command", 7, &v, &vl) != 1 || mp_next(&v, v + vl, &it) < 0 ||
        it.type != MP_STR || it.v.s.len >= n) {
        buf_free(&mpb);
        api_error(rp, 400, "the body must be {\"command\":\"start\"|\"stop\"|\"reset\"|\"delete\"}");
        return -1;
    }
    memcpy(out, it.v.s.ptr, it.v.s.len);
    out[it.v.s.len] = 0;
    buf_free(&mpb);
    return 0;
}

static int is_command(const char *s) {
    return !strcmp(s, "start") || !strcmp(s, "stop") || !strcmp(s, "reset") ||
           !strcmp(s, "delete") || !strcmp(s, "rebuild");
}

#define MAX_SEGS 5

/* The path's segments (empty ones skipped): their count, -1 if more than
 * MAX_SEGS. */
static int split_path(const char *p, const char **sp, size_t *sl) {
    int nseg = 0;
    while (*p) {
        while (*p == '/') p++;
        if (!*p) break;
        const char *s = p;
        while (*p && *p != '/') p++;
        if (nseg == MAX_SEGS) return -1;
        sp[nseg] = s;
        sl[nseg++] = (size_t)(p - s);
    }
    return nseg;
}

void projmgr_handle(projmgr *m, const api_request *rq, api_reply *rp) {
    /* split the path: /projections/{name}/{what}/{arg} */
    const char *sp[MAX_SEGS];
    size_t sl[MAX_SEGS];
    int nseg = split_path(rq->path, sp, sl);
    if (nseg < 0) {
        api_error(rp, 404, "no such route");
        return;
    }
    const char *method = rq->method;
    int get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    if (nseg == 1) {
        if (!get) api_error(rp, 405, "method not allowed (GET)");
        else route_list(m, rp);
        return;
    }
    buf name = BUF_INIT, what = BUF_INIT, arg = BUF_INIT;
    if (api_url_decode(&name, sp[1], sl[1], 0) != 0 || !valid_name(name.ptr, name.len)) {
        api_error(rp, 400, "bad projection name (1-128 of A-Z a-z 0-9 _ - .)");
        goto out;
    }
    if (nseg >= 3) api_url_decode(&what, sp[2], sl[2], 0);
    if (nseg >= 4 && api_url_decode(&arg, sp[3], sl[3], 0) != 0) {
        api_error(rp, 400, "bad path segment");
        goto out;
    }
    if (nseg == 2 && !strcmp(method, "PUT")) {
        pthread_mutex_lock(&m->admin);
        route_put(m, name.ptr, rq, rp);
        pthread_mutex_unlock(&m->admin);
        goto out;
    }
    char cmd[16] = "";
    int is_cmd = 0;
    if (nseg == 2 && !strcmp(method, "DELETE")) {
        strcpy(cmd, "delete");
        is_cmd = 1;
    } else if (nseg == 3 && what.ptr && (!strcmp(what.ptr, "command") || is_command(what.ptr))) {
        if (strcmp(method, "POST")) {
            api_error(rp, 405, "method not allowed (POST)");
            goto out;
        }
        if (!strcmp(what.ptr, "command")) {
            if (command_of(rq, cmd, sizeof cmd, rp) < 0) goto out;
            if (!is_command(cmd)) {
                api_error(rp, 400, "unknown command '%s' (start, stop, reset, rebuild, delete)",
                          cmd);
                goto out;
            }
        } else {
            snprintf(cmd, sizeof cmd, "%s", what.ptr);
        }
        is_cmd = 1;
    }
    if (is_cmd) {
        pthread_mutex_lock(&m->admin);
        pentry *e = entry_get(m, name.ptr);
        if (!e) api_error(rp, 404, "no projection '%s'", name.ptr);
        else route_command(m, e, cmd, rp); /* releases e */
        pthread_mutex_unlock(&m->admin);
        goto out;
    }
    pentry *e = entry_get(m, name.ptr);
    if (!e) {
        api_error(rp, 404, "no projection '%s'", name.ptr);
        goto out;
    }
    if (nseg == 2) {
        if (!get) api_error(rp, 405, "method not allowed (GET, PUT, DELETE)");
        else route_status(m, e, 200, rp);
    } else if (!strcmp(what.ptr, "state") && nseg <= 4) {
        if (!get) api_error(rp, 405, "method not allowed (GET)");
        else route_state(m, e, rq, nseg == 4 ? arg.ptr : NULL, arg.len, rp);
    } else if (!strcmp(what.ptr, "partitions") && nseg == 3) {
        if (!get) api_error(rp, 405, "method not allowed (GET)");
        else route_partitions(m, e, rq, rp);
    } else if (!strcmp(what.ptr, "query") && nseg == 4) {
        if (!get && strcmp(method, "POST")) api_error(rp, 405, "method not allowed (GET, POST)");
        else route_query(e, rq, arg.ptr, rp);
    } else {
        api_error(rp, 404, "no such route: %.200s", rq->path);
    }
    entry_put(m, e);
out:
    buf_free(&name);
    buf_free(&what);
    buf_free(&arg);
}

/* ---- batched partition lookups (projmgr_handle_many) ---- */

/* Is rq a partition lookup?  Then 1, with the decoded projection name
 * and partition key. */
static int parse_lookup(const api_request *rq, buf *name, buf *key) {
    if (strcmp(rq->method, "GET") && strcmp(rq->method, "HEAD")) return 0;
    const char *sp[MAX_SEGS];
    size_t sl[MAX_SEGS];
    int nseg = split_path(rq->path, sp, sl);
    if ((nseg != 3 && nseg != 4) || sl[2] != 5 || memcmp(sp[2], "state", 5)) return 0;
    name->len = key->len = 0;
    if (api_url_decode(name, sp[1], sl[1], 0) != 0 || !valid_name(name->ptr, name->len)) return 0;
    if (nseg == 4) return api_url_decode(key, sp[3], sl[3], 0) == 0;
    return api_query_get(rq->query, "partition", key) == 1;
}

/* One projection's lookups: rps[i] answers keys[i]. */
static void lookup_batch(projmgr *m, const char *name, const char *const *keys,
                         const size_t *lens, api_reply *const *rps, size_t n) {
    pentry *e = entry_get(m, name);
    if (!e) {
        for (size_t i = 0; i < n; i++) api_error(rps[i], 404, "no projection '%s'", name);
        return;
    }
    if (lock_for_request(e, rps[0]) < 0) {
        for (size_t i = 1; i < n; i++)
            api_error(rps[i], 503, "projection %s is busy (catching up); try again", e->name);
        entry_put(m, e);
        return;
    }
    pthread_mutex_lock(&e->smu);
    int running = e->ph && e->status == PS_RUNNING;
    pthread_mutex_unlock(&e->smu);
    buf out = BUF_INIT;
    tm_err err;
    err_clear(&err);
    int done = 0;
    if (running && projhost_partitions(e->ph, keys, lens, n, &out, &err) == 0) {
        const char *p = out.ptr, *end = out.ptr + out.len;
        mp_item it;
        if (mp_next(&p, end, &it) == 0 && it.type == MP_ARRAY && it.v.n == n) {
            done = 1;
            for (size_t i = 0; i < n; i++) {
                const char *v = p;
                if (mp_skip(&p, end) < 0) { /* the worker's own encoding: cannot be short */
                    api_error(rps[i], 500, "bad answer from the projection worker");
                    continue;
                }
                if (p - v == 1 && (unsigned char)*v == 0xc0) {
                    reply_no_partition(e, keys[i], lens[i], rps[i]);
                } else {
                    buf b = {.ptr = (char *)v, .len = (size_t)(p - v)};
                    reply_mp(rps[i], &b);
                }
            }
        }
    } else if (running) {
        sync_status(e);
    }
    /* Not running, or the batch failed: one by one (a failed worker's
     * stored checkpoint still answers, errors are reported per request). */
    if (!done)
        for (size_t i = 0; i < n; i++) route_partition(m, e, keys[i], lens[i], rps[i]);
    buf_free(&out);
    pthread_mutex_unlock(&e->mu);
    entry_put(m, e);
}

void projmgr_handle_many(projmgr *m, const api_request *const *rqs, api_reply *const *rps,
                         size_t n) {
    buf *names = calloc(n ? n : 1, sizeof *names), *keys = calloc(n ? n : 1, sizeof *keys);
    char *is = calloc(n ? n : 1, 1);
    const char **kp = malloc((n ? n : 1) * sizeof *kp);
    size_t *kl = malloc((n ? n : 1) * sizeof *kl);
    api_reply **rp = malloc((n ? n : 1) * sizeof *rp);
    if (!names || !keys || !is || !kp || !kl || !rp) tm_oom();
    for (size_t i = 0; i < n; i++) {
        is[i] = (char)parse_lookup(rqs[i], &names[i], &keys[i]);
        if (!is[i]) projmgr_handle(m, rqs[i], rps[i]);
    }
    for (size_t i = 0; i < n; i++) {
        if (is[i] != 1) continue;
        size_t k = 0;
        for (size_t j = i; j < n; j++) {
            if (is[j] != 1 || names[j].len != names[i].len ||
                memcmp(names[j].ptr, names[i].ptr, names[i].len))
                continue;
            is[j] = 2;
            kp[k] = keys[j].ptr ? keys[j].ptr : "";
            kl[k] = keys[j].len;
            rp[k++] = rps[j];
        }
        lookup_batch(m, names[i].ptr, kp, kl, rp, k);
    }
    for (size_t i = 0; i < n; i++) {
        buf_free(&names[i]);
        buf_free(&keys[i]);
    }
    free(names);
    free(keys);
    free(is);
    free(kp);
    free(kl);
    free(rp);
}
