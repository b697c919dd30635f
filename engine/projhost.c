/* projhost.c — a projection in a worker process (see projhost.h).
 *
 * Owns: the frame protocol, the worker's main loop (a proj whose reads go
 * back to the host through a proj_backing), and the host side: starting
 * and killing the worker, feeding it batches of raw records, answering its
 * reads from the store, committing its checkpoints atomically (in the
 * caller's thread, or on a committer thread while feeding goes on), and
 * turning its death or a failed commit into a FAULTED / DEAD status.
 *
 * Invariants:
 *   - Every request gets exactly one final answer; reads ('g','s','r') may
 *     come before it and are answered in order.
 *   - The host never blocks forever on the worker: every wait is bounded by
 *     the timeout, after which the worker is SIGKILLed.
 *   - Once a worker is FAULTED or DEAD no further frames are sent to it.
 *   - At most one background checkpoint is in flight; nothing that writes
 *     or reads the projection's stored keys (the next checkpoint, free)
 *     proceeds before it has landed or failed.
 */
#define _GNU_SOURCE
#include "projhost.h"

#include <errno.h>
#include <fcntl.h>
#include <msgpack/pack.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mp.h"
#include "proj.h"
#include "record.h"
#include "workq.h"

/* ------------------------------------------------------------ framing */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read exactly n bytes; deadline < 0 = no limit.  0 ok, -1 EOF/error,
 * -2 timeout. */
static int read_all(int fd, void *p, size_t n, double deadline) {
    char *c = p;
    while (n) {
        if (deadline >= 0) {
            double left = deadline - now_s();
            if (left <= 0) return -2;
            struct pollfd pf = {.fd = fd, .events = POLLIN};
            int pr = poll(&pf, 1, (int)(left * 1000) + 1);
            if (pr < 0 && errno == EINTR) continue;
            if (pr == 0) return -2;
        }
        ssize_t r = read(fd, c, n);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) return -1;
        c += r;
        n -= (size_t)r;
    }
    return 0;
}

static int send_frame(int fd, char kind, const char *p, size_t n) {
    unsigned char h[5];
    uint32_t len = (uint32_t)n + 1;
    h[0] = (unsigned char)len;
    h[1] = (unsigned char)(len >> 8);
    h[2] = (unsigned char)(len >> 16);
    h[3] = (unsigned char)(len >> 24);
    h[4] = (unsigned char)kind;
    if (write_all(fd, h, 5) < 0) return -1;
    return n ? write_all(fd, p, n) : 0;
}

#define FRAME_MAX (256u << 20)

static int recv_frame(int fd, char *kind, buf *payload, double deadline) {
    unsigned char h[5];
    int r = read_all(fd, h, 5, deadline);
    if (r < 0) return r;
    uint32_t len = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 |
                   (uint32_t)h[3] << 24;
    if (len < 1 || len > FRAME_MAX) return -1;
    *kind = (char)h[4];
    buf_reset(payload);
    buf_reserve(payload, len);
    if (len > 1 && (r = read_all(fd, payload->ptr, len - 1, deadline)) < 0) return r;
    payload->len = len - 1;
    return 0;
}

/* ------------------------------------------------------------ msgpack helpers */

static int wr(void *d, const char *p, size_t n) {
    buf_append(d, p, n);
    return 0;
}

static void pk_init(msgpack_packer *pk, buf *b) { msgpack_packer_init(pk, b, wr); }

static void pk_str(msgpack_packer *pk, const char *s, size_t n) {
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void pk_cstr(msgpack_packer *pk, const char *s) { pk_str(pk, s, strlen(s)); }

static void pk_bin(msgpack_packer *pk, const char *s, size_t n) {
    msgpack_pack_bin(pk, n);
    msgpack_pack_bin_body(pk, s, n);
}

static int get_item(const char *m, size_t n, const char *key, mp_item *it) {
    const char *v;
    size_t vl;
    if (mp_map_find(m, n, key, strlen(key), &v, &vl) != 1) return -1;
    return mp_next(&v, v + vl, it);
}

static uint64_t get_u64(const char *m, size_t n, const char *key) {
    mp_item it;
    if (get_item(m, n, key, &it) < 0) return 0;
    if (it.type == MP_UINT) return it.v.u;
    if (it.type == MP_DOUBLE || it.type == MP_FLOAT) return (uint64_t)it.v.d;
    return 0;
}

static double get_f64(const char *m, size_t n, const char *key) {
    mp_item it;
    if (get_item(m, n, key, &it) < 0) return 0;
    if (it.type == MP_DOUBLE || it.type == MP_FLOAT) return it.v.d;
    if (it.type == MP_UINT) return (double)it.v.u;
    return 0;
}

/* A str/bin field: NUL-free copy into out (malloc'd, NUL-terminated). */
static char *get_str(const char *m, size_t n, const char *key, size_t *len) {
    mp_item it;
    if (get_item(m, n, key, &it) < 0 || (it.type != MP_STR && it.type != MP_BIN)) return NULL;
    char *s = malloc(it.v.s.len + 1);
    memcpy(s, it.v.s.ptr, it.v.s.len);
    s[it.v.s.len] = 0;
    if (len) *len = it.v.s.len;
    return s;
}

/* ============================================================ worker */

typedef struct worker {
    int in, out;
    proj *p;
    buf frame, msg;
} worker;

/* Send a read request and wait for its answer (kind 'v' or 'w'). */
static int w_ask(worker *w, char kind, const buf *req, char want, buf *ans, tm_err *err) {
    char k;
    if (send_frame(w->out, kind, req->ptr, req->len) < 0 ||
        recv_frame(w->in, &k, ans, -1) < 0 || k != want)
        return err_set(err, TM_EIO, "projection host went away");
    return 0;
}

/* [found, bytes] -> 1 / 0 */
static int w_found(const buf *ans, char **val, size_t *vl, tm_err *err) {
    const char *p = ans->ptr, *end = ans->ptr + ans->len;
    mp_item a, f, b;
    if (mp_next(&p, end, &a) < 0 || a.type != MP_ARRAY || a.v.n != 2 || mp_next(&p, end, &f) < 0 ||
        f.type != MP_BOOL)
        return err_set(err, TM_EIO, "bad answer from the projection host");
    if (!f.v.b) return 0;
    if (mp_next(&p, end, &b) < 0 || b.type != MP_BIN)
        return err_set(err, TM_EIO, "bad answer from the projection host");
    *val = malloc(b.v.s.len ? b.v.s.len : 1);
    memcpy(*val, b.v.s.ptr, b.v.s.len);
    *vl = b.v.s.len;
    return 1;
}

static int wb_get(void *ud, const char *k, size_t kl, char **val, size_t *vl, tm_err *err) {
    worker *w = ud;
    buf req = BUF_INIT, ans = BUF_INIT;
    msgpack_packer pk;
    pk_init(&pk, &req);
    msgpack_pack_map(&pk, 1);
    pk_cstr(&pk, "key");
    pk_bin(&pk, k, kl);
    int rc = w_ask(w, 'g', &req, 'v', &ans, err);
    if (rc == 0) rc = w_found(&ans, val, vl, err);
    buf_free(&req);
    buf_free(&ans);
    return rc;
}

static int wb_record(void *ud, uint64_t pos, char **rec, size_t *len, tm_err *err) {
    worker *w = ud;
    buf req = BUF_INIT, ans = BUF_INIT;
    msgpack_packer pk;
    pk_init(&pk, &req);
    msgpack_pack_map(&pk, 1);
    pk_cstr(&pk, "position");
    msgpack_pack_uint64(&pk, pos);
    int rc = w_ask(w, 'r', &req, 'v', &ans, err);
    if (rc == 0) rc = w_found(&ans, rec, len, err);
    buf_free(&req);
    buf_free(&ans);
    return rc;
}

static int wb_scan(void *ud, const char *prefix, size_t pl, proj_kv_fn each, void *ctx,
                   tm_err *err) {
    worker *w = ud;
    buf req = BUF_INIT, ans = BUF_INIT;
    msgpack_packer pk;
    pk_init(&pk, &req);
    msgpack_pack_map(&pk, 1);
    pk_cstr(&pk, "prefix");
    pk_bin(&pk, prefix, pl);
    int rc = w_ask(w, 's', &req, 'w', &ans, err);
    if (rc == 0) {
        const char *p = ans.ptr, *end = ans.ptr + ans.len;
        mp_item a, pair, k, v;
        if (mp_next(&p, end, &a) < 0 || a.type != MP_ARRAY) rc = err_set(err, TM_EIO, "bad scan answer");
        for (uint32_t i = 0; rc == 0 && i < a.v.n; i++) {
            if (mp_next(&p, end, &pair) < 0 || pair.type != MP_ARRAY || pair.v.n != 2 ||
                mp_next(&p, end, &k) < 0 || k.type != MP_BIN || mp_next(&p, end, &v) < 0 ||
                v.type != MP_BIN) {
                rc = err_set(err, TM_EIO, "bad scan answer");
                break;
            }
            if (each(ctx, k.v.s.ptr, k.v.s.len, v.v.s.ptr, v.v.s.len)) break;
        }
    }
    buf_free(&req);
    buf_free(&ans);
    return rc;
}

static const proj_backing *worker_backing(worker *w) {
    static __thread proj_backing b;
    b.ud = w;
    b.get = wb_get;
    b.scan = wb_scan;
    b.record = wb_record;
    return &b;
}

static void w_error(worker *w, const tm_err *err) {
    buf_reset(&w->msg);
    msgpack_packer pk;
    pk_init(&pk, &w->msg);
    msgpack_pack_map(&pk, 2);
    pk_cstr(&pk, "code");
    msgpack_pack_int(&pk, err->code);
    pk_cstr(&pk, "message");
    pk_cstr(&pk, err->msg);
    send_frame(w->out, 'E', w->msg.ptr, w->msg.len);
}

static void w_fault(worker *w, const tm_err *err) {
    const proj_fault *f = w->p ? proj_fault_info(w->p) : NULL;
    if (!f) {
        w_error(w, err);
        return;
    }
    buf_reset(&w->msg);
    msgpack_packer pk;
    pk_init(&pk, &w->msg);
    msgpack_pack_map(&pk, 4);
    pk_cstr(&pk, "position");
    msgpack_pack_uint64(&pk, f->position);
    pk_cstr(&pk, "type");
    pk_cstr(&pk, f->type);
    pk_cstr(&pk, "message");
    pk_cstr(&pk, f->message);
    pk_cstr(&pk, "traceback");
    pk_cstr(&pk, f->traceback ? f->traceback : "");
    send_frame(w->out, 'F', w->msg.ptr, w->msg.len);
}

static void w_position(worker *w, char kind) {
    buf_reset(&w->msg);
    msgpack_packer pk;
    pk_init(&pk, &w->msg);
    msgpack_pack_map(&pk, 3);
    pk_cstr(&pk, "position");
    msgpack_pack_uint64(&pk, proj_position(w->p));
    pk_cstr(&pk, "events");
    msgpack_pack_uint64(&pk, proj_events(w->p));
    pk_cstr(&pk, "uncommitted");
    msgpack_pack_uint64(&pk, proj_uncommitted(w->p));
    send_frame(w->out, kind, w->msg.ptr, w->msg.len);
}

/* Answer a feed/flush/checkpoint outcome; 1 if it was final (R/F). */
static int w_outcome(worker *w, int rc, const tm_err *err) {
    if (rc == PROJ_REPLAY) {
        w_position(w, 'R');
        return 1;
    }
    if (rc < 0) {
        w_fault(w, err);
        return 1;
    }
    return 0;
}

static void w_init(worker *w, const buf *f) {
    tm_err err;
    err_clear(&err);
    size_t srclen = 0;
    char *name = get_str(f->ptr, f->len, "name", NULL);
    char *file = get_str(f->ptr, f->len, "file", NULL);
    char *src = get_str(f->ptr, f->len, "source", &srclen);
    proj_opts o = {.memory_limit = (size_t)get_u64(f->ptr, f->len, "memory"),
                   .cpu_limit = get_f64(f->ptr, f->len, "cpu"),
                   .backing = worker_backing(w),
                   .batch = (unsigned)get_u64(f->ptr, f->len, "batch")};
    if (!name || !src) {
        err_set(&err, TM_EINVAL, "init without name or source");
        w_error(w, &err);
    } else if (!(w->p = proj_new(name, src, srclen, file ? file : name, &o, &err)) ||
               proj_restore(w->p, &err) < 0) {
        w_error(w, &err);
    } else {
        buf_reset(&w->msg);
        msgpack_packer pk;
        pk_init(&pk, &w->msg);
        msgpack_pack_map(&pk, 8);
        pk_cstr(&pk, "partitioned");
        msgpack_pack_uint64(&pk, (uint64_t)proj_partitioned(w->p));
        pk_cstr(&pk, "dead_letter");
        msgpack_pack_uint64(&pk, (uint64_t)proj_dead_letter_mode(w->p));
        pk_cstr(&pk, "position");
        msgpack_pack_uint64(&pk, proj_position(w->p));
        pk_cstr(&pk, "events");
        msgpack_pack_uint64(&pk, proj_events(w->p));
        pk_cstr(&pk, "checkpoint_every");
        msgpack_pack_uint64(&pk, proj_checkpoint_every(w->p));
        pk_cstr(&pk, "checkpoint_ms");
        msgpack_pack_uint64(&pk, proj_checkpoint_ms(w->p));
        pk_cstr(&pk, "from");
        msgpack_pack_int(&pk, (int)proj_from(w->p));
        pk_cstr(&pk, "names");
        msgpack_pack_array(&pk, proj_from_count(w->p));
        for (size_t i = 0; i < proj_from_count(w->p); i++) {
            size_t nl;
            const char *n = proj_from_name(w->p, i, &nl);
            pk_str(&pk, n, nl);
        }
        send_frame(w->out, 'O', w->msg.ptr, w->msg.len);
    }
    free(name);
    free(file);
    free(src);
}

static void w_batch(worker *w, const buf *f) {
    tm_err err;
    err_clear(&err);
    const char *p = f->ptr, *end = f->ptr + f->len;
    while (end - p >= 12) {
        uint64_t pos = 0;
        for (int i = 0; i < 8; i++) pos |= (uint64_t)(unsigned char)p[i] << (8 * i);
        uint32_t len = 0;
        for (int i = 0; i < 4; i++) len |= (uint32_t)(unsigned char)p[8 + i] << (8 * i);
        p += 12;
        if ((size_t)(end - p) < len) break;
        tm_event ev;
        if (record_decode(p, len, &ev, &err) < 0) {
            w_error(w, &err);
            return;
        }
        ev.position = pos;
        p += len;
        if (w_outcome(w, proj_feed(w->p, &ev, &err), &err)) return;
    }
    if (w_outcome(w, proj_flush(w->p, &err), &err)) return;
    w_position(w, 'A');
}

typedef struct kvs {
    buf b;
    uint32_t n;
} kvs;

static void kv_put(void *ud, const char *k, size_t kl, const char *v, size_t vl) {
    kvs *c = ud;
    msgpack_packer pk;
    pk_init(&pk, &c->b);
    msgpack_pack_array(&pk, 2);
    pk_bin(&pk, k, kl);
    pk_bin(&pk, v, vl);
    c->n++;
}

/* 1 when the checkpoint was sent ('K'). */
static int w_checkpoint(worker *w) {
    tm_err err;
    err_clear(&err);
    kvs c = {BUF_INIT, 0};
    tm_event *em = NULL;
    size_t nem = 0;
    int rc = proj_checkpoint_to(w->p, kv_put, &c, &em, &nem, &err);
    if (w_outcome(w, rc, &err)) {
        buf_free(&c.b);
        return 0;
    }
    buf_reset(&w->msg);
    msgpack_packer pk;
    pk_init(&pk, &w->msg);
    msgpack_pack_map(&pk, 2);
    pk_cstr(&pk, "kv");
    msgpack_pack_array(&pk, c.n);
    buf_append(&w->msg, c.b.ptr, c.b.len);
    pk_cstr(&pk, "emits");
    msgpack_pack_array(&pk, nem);
    for (size_t i = 0; i < nem; i++) {
        msgpack_pack_array(&pk, 5);
        pk_str(&pk, em[i].stream, em[i].stream_len);
        pk_str(&pk, em[i].type, em[i].type_len);
        pk_bin(&pk, em[i].data, em[i].data_len);
        if (em[i].meta_len) pk_bin(&pk, em[i].meta, em[i].meta_len);
        else msgpack_pack_nil(&pk);
        pk_bin(&pk, (const char *)em[i].id, 16);
    }
    buf_free(&c.b);
    send_frame(w->out, 'K', w->msg.ptr, w->msg.len);
    return 1;
}

static void w_value(worker *w, int rc, const buf *out, const tm_err *err) {
    if (rc < 0) w_error(w, err);
    else send_frame(w->out, 'V', out->ptr, out->len);
}

/* 'M': the frame is a msgpack array of partition keys (strings); the
 * answer is a 'V' frame holding the array of their states. */
static void w_peek_many(worker *w, buf *out, tm_err *err) {
    const char *p = w->frame.ptr, *end = w->frame.ptr + w->frame.len;
    mp_item it;
    if (mp_validate(p, w->frame.len, NULL, err) < 0 || mp_next(&p, end, &it) < 0 ||
        it.type != MP_ARRAY) {
        if (!err->code) err_set(err, TM_EINVAL, "peek-many: not an array of keys");
        w_error(w, err);
        return;
    }
    size_t n = it.v.n;
    const char **keys = malloc((n ? n : 1) * sizeof *keys);
    size_t *lens = malloc((n ? n : 1) * sizeof *lens);
    if (!keys || !lens) tm_oom();
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (mp_next(&p, end, &it) < 0 || it.type != MP_STR) {
            rc = err_set(err, TM_EINVAL, "peek-many: key %zu is not a string", i);
            break;
        }
        keys[i] = it.v.s.ptr;
        lens[i] = it.v.s.len;
    }
    if (rc == 0) rc = proj_peek_many(w->p, keys, lens, n, out, err);
    w_value(w, rc, out, err);
    free(keys);
    free(lens);
}

int projhost_worker_main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN);
    worker w = {.in = 0, .out = 1, .p = NULL, .frame = BUF_INIT, .msg = BUF_INIT};
    char kind;
    while (recv_frame(w.in, &kind, &w.frame, -1) == 0) {
        if (kind == 'I') {
            if (!w.p) w_init(&w, &w.frame);
            continue;
        }
        if (!w.p) {
            tm_err e;
            err_set(&e, TM_EINVAL, "not initialised");
            w_error(&w, &e);
            continue;
        }
        tm_err err;
        err_clear(&err);
        buf out = BUF_INIT;
        switch (kind) {
        case 'B': w_batch(&w, &w.frame); break;
        case 'C': w_checkpoint(&w); break;
        case 'c': /* committed in the background: counted done now */
            if (w_checkpoint(&w)) proj_checkpoint_done(w.p);
            break;
        case 'D':
            proj_checkpoint_done(w.p);
            w_position(&w, 'A');
            break;
        case 'S': w_value(&w, proj_state(w.p, &out, &err), &out, &err); break;
        case 'Q': {
            char *name = get_str(w.frame.ptr, w.frame.len, "name", NULL);
            size_t al = 0;
            char *args = get_str(w.frame.ptr, w.frame.len, "args", &al);
            if (!name) err_set(&err, TM_EINVAL, "query without a name");
            int rc = name ? proj_query(w.p, name, args, al, &out, &err) : -1;
            w_value(&w, rc, &out, &err);
            free(name);
            free(args);
            break;
        }
        case 'M': w_peek_many(&w, &out, &err); break;
        case 'P': {
            char *op = get_str(w.frame.ptr, w.frame.len, "op", NULL);
            size_t al = 0;
            char *a = get_str(w.frame.ptr, w.frame.len, "a", &al);
            char *b = get_str(w.frame.ptr, w.frame.len, "b", NULL);
            uint64_t n = get_u64(w.frame.ptr, w.frame.len, "n");
            int rc = -1;
            if (!op) err_set(&err, TM_EINVAL, "read without an op");
            else if (!strcmp(op, "get") && a) rc = proj_get(w.p, a, al, &out, &err);
            else if (!strcmp(op, "peek") && a) rc = proj_peek(w.p, a, al, &out, &err);
            else if (!strcmp(op, "partitions")) rc = proj_partitions(w.p, &out, &err);
            else if (!strcmp(op, "top") && a) rc = proj_top(w.p, a, n, &out, &err);
            else if (!strcmp(op, "range")) rc = proj_range(w.p, a, b, n, &out, &err);
            else if (!strcmp(op, "prefix") && a) rc = proj_prefix(w.p, a, n, &out, &err);
            else err_set(&err, TM_EINVAL, "bad read '%s'", op);
            w_value(&w, rc, &out, &err);
            free(op);
            free(a);
            free(b);
            break;
        }
        default: {
            err_set(&err, TM_EINVAL, "unknown frame '%c'", kind);
            w_error(&w, &err);
        }
        }
        buf_free(&out);
    }
    proj_free(w.p);
    buf_free(&w.frame);
    buf_free(&w.msg);
    return 0;
}

/* ============================================================ host */

struct projhost {
    store *s;
    char *name;
    projhost_opts o;
    pid_t pid;
    int to, from, errfd;
    projhost_status st;
    uint64_t checkpoint_every, uncommitted;
    uint64_t skipped;  /* owns: every event up to here is fed or not ours (>= st.position) */
    int from_kind;
    char **names;
    size_t *name_lens, nnames;
    buf frame, msg, errtext;
    buf ans;       /* answers to the worker's reads (never the batch being built) */
    buf pfx_w, pfx_s;  /* "proj/NAME/" (worker's keys) and "proj/STORE/" (stored keys) */
    buf key;           /* a translated key */
    uint64_t suppressed;
    /* background checkpoints (projhost_checkpoint_async): a one-thread
     * workq, created on first use; at most one job (cj) in flight */
    workq *cq;
    struct commit_job {
        workq_job job;
        projhost *h;
        store_batch *b;
        uint64_t pos;
        int rc;
        tm_err err;
    } cj;
};

/* The stored key for a worker's key (h->key or the key itself). */
static const char *key_in(projhost *h, const char *k, size_t kl, size_t *ol) {
    *ol = kl;
    if (!h->pfx_s.len || kl < h->pfx_w.len || memcmp(k, h->pfx_w.ptr, h->pfx_w.len)) return k;
    buf_reset(&h->key);
    buf_append(&h->key, h->pfx_s.ptr, h->pfx_s.len);
    buf_append(&h->key, k + h->pfx_w.len, kl - h->pfx_w.len);
    *ol = h->key.len;
    return h->key.ptr;
}

/* The worker's key for a stored key. */
static const char *key_out(projhost *h, const char *k, size_t kl, size_t *ol) {
    *ol = kl;
    if (!h->pfx_s.len || kl < h->pfx_s.len || memcmp(k, h->pfx_s.ptr, h->pfx_s.len)) return k;
    buf_reset(&h->key);
    buf_append(&h->key, h->pfx_w.ptr, h->pfx_w.len);
    buf_append(&h->key, k + h->pfx_s.len, kl - h->pfx_s.len);
    *ol = h->key.len;
    return h->key.ptr;
}

void projhost_set_store_name(projhost *h, const char *store_name) {
    buf_reset(&h->pfx_w);
    buf_reset(&h->pfx_s);
    if (!store_name || !strcmp(store_name, h->name)) return;
    buf_printf(&h->pfx_w, "proj/%s/", h->name);
    buf_printf(&h->pfx_s, "proj/%s/", store_name);
}

void projhost_set_suppress_emits(projhost *h, int on) { h->o.suppress_emits = on; }
uint64_t projhost_emits_suppressed(const projhost *h) { return h->suppressed; }

/* Collect what the worker wrote on stderr (non-blocking). */
static void drain_stderr(projhost *h) {
    char tmp[4096];
    for (;;) {
        ssize_t r = read(h->errfd, tmp, sizeof tmp);
        if (r <= 0) break;
        buf_append(&h->errtext, tmp, (size_t)r);
        if (h->errtext.len > 65536) { /* keep the tail */
            memmove(h->errtext.ptr, h->errtext.ptr + h->errtext.len - 32768, 32768);
            h->errtext.len = 32768;
        }
    }
}

static const char *last_line(buf *b) {
    if (!b->ptr) return "";
    while (b->len && (b->ptr[b->len - 1] == '\n' || b->ptr[b->len - 1] == '\r')) b->len--;
    b->ptr[b->len] = 0;
    char *nl = strrchr(b->ptr, '\n');
    return nl ? nl + 1 : b->ptr;
}

static void reap(projhost *h, int kill_it) {
    if (h->pid <= 0) return;
    if (kill_it) kill(h->pid, SIGKILL);
    int status;
    while (waitpid(h->pid, &status, 0) < 0 && errno == EINTR) {
    }
    h->pid = -1;
    drain_stderr(h);
}

/* The worker died or hung: record why. */
static int worker_lost(projhost *h, int timed_out, tm_err *err) {
    if (timed_out) {
        reap(h, 1);
        h->st.state = PROJHOST_DEAD;
        snprintf(h->st.message, sizeof h->st.message,
                 "no answer within %gs (CPU limit %gs): worker killed", h->o.timeout,
                 h->o.cpu_limit);
    } else {
        reap(h, 0);
        h->st.state = PROJHOST_FAULTED;
        const char *l = last_line(&h->errtext);
        snprintf(h->st.message, sizeof h->st.message, "worker exited: %s",
                 *l ? l : "(no message)");
    }
    return err_set(err, TM_EINVAL, "projection %s: %s", h->name, h->st.message);
}

/* Serve the worker's reads until it sends a final answer; returns its kind
 * (payload in h->frame), or -1 after worker_lost. */
static int await(projhost *h, tm_err *err) {
    double deadline = now_s() + h->o.timeout;
    for (;;) {
        char kind;
        int r = recv_frame(h->from, &kind, &h->frame, deadline);
        drain_stderr(h);
        if (r < 0) return worker_lost(h, r == -2, err), -1;
        if (kind != 'g' && kind != 's' && kind != 'r') return kind;
        buf_reset(&h->ans);
        msgpack_packer pk;
        pk_init(&pk, &h->ans);
        tm_err e2;
        if (kind == 'g') {
            size_t kl;
            char *k = get_str(h->frame.ptr, h->frame.len, "key", &kl);
            char *v = NULL;
            size_t vl = 0, sl = 0;
            const char *sk = k ? key_in(h, k, kl, &sl) : NULL;
            int f = k ? store_kv_get(h->s, sk, sl, &v, &vl, &e2) : 0;
            msgpack_pack_array(&pk, 2);
            if (f == 1) {
                msgpack_pack_true(&pk);
                pk_bin(&pk, v, vl);
            } else {
                msgpack_pack_false(&pk);
                msgpack_pack_nil(&pk);
            }
            free(k);
            free(v);
            send_frame(h->to, 'v', h->ans.ptr, h->ans.len);
        } else if (kind == 'r') {
            uint64_t pos = get_u64(h->frame.ptr, h->frame.len, "position");
            store_iter *it = pos ? store_read_all(h->s, pos, 0, 1, &e2) : NULL;
            tm_event ev;
            msgpack_pack_array(&pk, 2);
            if (it && store_iter_next(it, &ev, &e2) == 1 && ev.position == pos) {
                const char *rp;
                size_t rl;
                store_iter_record(it, &rp, &rl);
                msgpack_pack_true(&pk);
                pk_bin(&pk, rp, rl);
            } else {
                msgpack_pack_false(&pk);
                msgpack_pack_nil(&pk);
            }
            store_iter_free(it);
            send_frame(h->to, 'v', h->ans.ptr, h->ans.len);
        } else {
            size_t pl;
            char *prefix = get_str(h->frame.ptr, h->frame.len, "prefix", &pl);
            buf items = BUF_INIT;
            uint32_t n = 0;
            size_t spl = 0;
            const char *sp = prefix ? key_in(h, prefix, pl, &spl) : NULL;
            store_kv_iter *it = prefix ? store_kv_scan(h->s, sp, spl, NULL, 0, &e2) : NULL;
            const char *k, *v;
            size_t kl, vl;
            msgpack_packer ik;
            pk_init(&ik, &items);
            while (it && store_kv_next(it, &k, &kl, &v, &vl, &e2) == 1) {
                msgpack_pack_array(&ik, 2);
                size_t wl;
                const char *wk = key_out(h, k, kl, &wl);
                pk_bin(&ik, wk, wl);
                pk_bin(&ik, v, vl);
                n++;
            }
            store_kv_iter_free(it);
            msgpack_pack_array(&pk, n);
            buf_append(&h->ans, items.ptr, items.len);
            buf_free(&items);
            free(prefix);
            send_frame(h->to, 'w', h->ans.ptr, h->ans.len);
        }
        deadline = now_s() + h->o.timeout; /* reads are progress */
    }
}

static void settle(projhost *h);

static int usable(projhost *h, tm_err *err) {
    settle(h);
    if (h->st.state == PROJHOST_RUNNING) return 0;
    return err_set(err, TM_EINVAL, "projection %s is %s: %s", h->name,
                   h->st.state == PROJHOST_FAULTED ? "faulted" : "dead", h->st.message);
}

static int remote_error(projhost *h, tm_err *err) {
    char *m = get_str(h->frame.ptr, h->frame.len, "message", NULL);
    int code = (int)get_u64(h->frame.ptr, h->frame.len, "code");
    err_set(err, code ? code : TM_EINVAL, "%s", m ? m : "worker error");
    free(m);
    return -1;
}

static int remote_fault(projhost *h, tm_err *err) {
    h->st.state = PROJHOST_FAULTED;
    h->st.fault_position = get_u64(h->frame.ptr, h->frame.len, "position");
    char *t = get_str(h->frame.ptr, h->frame.len, "type", NULL);
    char *m = get_str(h->frame.ptr, h->frame.len, "message", NULL);
    free(h->st.traceback);
    h->st.traceback = get_str(h->frame.ptr, h->frame.len, "traceback", NULL);
    snprintf(h->st.fault_type, sizeof h->st.fault_type, "%s", t ? t : "");
    snprintf(h->st.message, sizeof h->st.message, "%s", m ? m : "");
    free(t);
    free(m);
    return err_set(err, TM_EINVAL, "projection %s faulted at position %llu (type %s): %s",
                   h->name, (unsigned long long)h->st.fault_position, h->st.fault_type,
                   h->st.message);
}

static void take_position(projhost *h) {
    h->st.position = get_u64(h->frame.ptr, h->frame.len, "position");
    h->st.events = get_u64(h->frame.ptr, h->frame.len, "events");
    h->uncommitted = get_u64(h->frame.ptr, h->frame.len, "uncommitted");
}

projhost *projhost_start(store *s, const char *name, const char *src, size_t len,
                         const char *file, const projhost_opts *o, tm_err *err) {
    projhost *h = calloc(1, sizeof *h);
    h->s = s;
    h->name = strdup(name);
    if (o) h->o = *o;
    h->o.store_name = NULL; /* not kept: see pfx_s */
    projhost_set_store_name(h, o ? o->store_name : NULL);
    if (h->o.cpu_limit <= 0) h->o.cpu_limit = 10;
    if (h->o.timeout <= 0) h->o.timeout = h->o.cpu_limit * 2 + 5;
    if (!h->o.batch) h->o.batch = 512;
    h->pid = -1;
    h->to = h->from = h->errfd = -1;
    int in[2], out[2], er[2];
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(er, O_CLOEXEC) < 0) {
        err_set(err, TM_EIO, "pipe: %s", strerror(errno));
        projhost_free(h);
        return NULL;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        err_set(err, TM_EIO, "fork: %s", strerror(errno));
        close(in[0]), close(in[1]), close(out[0]), close(out[1]), close(er[0]), close(er[1]);
        projhost_free(h);
        return NULL;
    }
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        dup2(er[1], 2);
        if (h->o.exe) {
            execl(h->o.exe, h->o.exe, "__proj-worker", (char *)NULL);
            dprintf(2, "cannot exec %s: %s\n", h->o.exe, strerror(errno));
            _exit(127);
        }
        _exit(projhost_worker_main(0, NULL));
    }
    h->pid = pid;
    close(in[0]);
    close(out[1]);
    close(er[1]);
    h->to = in[1];
    h->from = out[0];
    h->errfd = er[0];
    fcntl(h->errfd, F_SETFL, fcntl(h->errfd, F_GETFL) | O_NONBLOCK);
    signal(SIGPIPE, SIG_IGN);

    buf_reset(&h->msg);
    msgpack_packer pk;
    pk_init(&pk, &h->msg);
    msgpack_pack_map(&pk, 6);
    pk_cstr(&pk, "name");
    pk_cstr(&pk, name);
    pk_cstr(&pk, "file");
    pk_cstr(&pk, file ? file : name);
    pk_cstr(&pk, "source");
    pk_str(&pk, src, len);
    pk_cstr(&pk, "memory");
    msgpack_pack_uint64(&pk, h->o.memory_limit);
    pk_cstr(&pk, "cpu");
    msgpack_pack_double(&pk, h->o.cpu_limit);
    pk_cstr(&pk, "batch");
    msgpack_pack_uint64(&pk, 256);
    if (send_frame(h->to, 'I', h->msg.ptr, h->msg.len) < 0) {
        worker_lost(h, 0, err);
        projhost_free(h);
        return NULL;
    }
    int k = await(h, err);
    if (k != 'O') {
        if (k == 'E') remote_error(h, err);
        projhost_free(h);
        return NULL;
    }
    h->st.state = PROJHOST_RUNNING;
    h->st.position = get_u64(h->frame.ptr, h->frame.len, "position");
    h->st.events = get_u64(h->frame.ptr, h->frame.len, "events");
    h->st.checkpoint_position = h->st.position;
    h->st.checkpoint_every = get_u64(h->frame.ptr, h->frame.len, "checkpoint_every");
    h->st.checkpoint_ms = get_u64(h->frame.ptr, h->frame.len, "checkpoint_ms");
    h->checkpoint_every = h->st.checkpoint_every ? h->st.checkpoint_every : 100000;
    h->from_kind = (int)get_u64(h->frame.ptr, h->frame.len, "from");
    h->st.partitioned = get_u64(h->frame.ptr, h->frame.len, "partitioned") != 0;
    h->st.dead_letter = get_u64(h->frame.ptr, h->frame.len, "dead_letter") != 0;
    const char *v;
    size_t vl;
    if (mp_map_find(h->frame.ptr, h->frame.len, "names", 5, &v, &vl) == 1) {
        const char *q = v, *end = v + vl;
        mp_item a, it;
        if (mp_next(&q, end, &a) == 0 && a.type == MP_ARRAY) {
            h->names = calloc(a.v.n + 1, sizeof *h->names);
            h->name_lens = calloc(a.v.n + 1, sizeof *h->name_lens);
            for (uint32_t i = 0; i < a.v.n && mp_next(&q, end, &it) == 0; i++) {
                if (it.type != MP_STR) continue;
                h->names[h->nnames] = strndup(it.v.s.ptr, it.v.s.len);
                h->name_lens[h->nnames++] = it.v.s.len;
            }
        }
    }
    return h;
}

/* ------------------------------------------------------------ checkpoints */

/* The worker's dirty set no longer matches the store: restart it. */
static int commit_failed(projhost *h, const tm_err *err) {
    reap(h, 1);
    h->st.state = PROJHOST_DEAD;
    snprintf(h->st.message, sizeof h->st.message, "checkpoint commit failed: %.400s", err->msg);
    return -1;
}

/* The committer thread: store the checkpoint. */
static void commit_run(workq_job *j) {
    struct commit_job *c = (struct commit_job *)j;
    err_clear(&c->err);
    c->rc = store_batch_commit(c->h->s, c->b, &c->err);
    store_batch_free(c->b);
    c->b = NULL;
}

/* The owner's thread (settle, wait_commit): take its outcome into the
 * status, the checkpoint position or a dead worker. */
static void commit_done(workq_job *j) {
    struct commit_job *c = (struct commit_job *)j;
    projhost *h = c->h;
    if (c->rc == 0) h->st.checkpoint_position = c->pos;
    else if (h->st.state == PROJHOST_RUNNING) commit_failed(h, &c->err);
}

/* A background commit that has finished: into the status. */
static void settle(projhost *h) {
    if (h->cq) workq_complete(h->cq);
}

/* Wait until no checkpoint is in flight (then settled). */
static void wait_commit(projhost *h) {
    if (h->cq) workq_wait(h->cq);
}

void projhost_wait_commit(projhost *h) { wait_commit(h); }
void projhost_settle(projhost *h) { settle(h); }

/* Send 'C' or 'c' and read the answer: 'K' (the checkpoint is in
 * h->frame), PROJ_REPLAY, or -1 with err. */
static int ask_checkpoint(projhost *h, char kind, tm_err *err) {
    if (usable(h, err) < 0) return -1;
    if (send_frame(h->to, kind, NULL, 0) < 0) return worker_lost(h, 0, err);
    int k = await(h, err);
    if (k < 0) return -1;
    if (k == 'F') return remote_fault(h, err);
    if (k == 'E') return remote_error(h, err);
    if (k == 'R') { /* a dead letter surfaced while flushing: caller re-feeds */
        take_position(h);
        return PROJ_REPLAY;
    }
    if (k != 'K') return err_set(err, TM_EIO, "unexpected answer '%c'", k);
    return 'K';
}

/* Append the checkpoint's emitted events (idempotent ids); *any = 1 when
 * there were some to store.  0 or -1 with err. */
static int store_emits(projhost *h, int *any, tm_err *err) {
    const char *v;
    size_t vl;
    int rc = 0;
    tm_event *evs = NULL;
    uint32_t nev = 0;
    *any = 0;
    if (mp_map_find(h->frame.ptr, h->frame.len, "emits", 5, &v, &vl) == 1) {
        const char *q = v, *end = v + vl;
        mp_item a, t, f[5];
        if (mp_next(&q, end, &a) == 0 && a.type == MP_ARRAY && a.v.n) {
            evs = calloc(a.v.n, sizeof *evs);
            for (uint32_t i = 0; i < a.v.n; i++) {
                if (mp_next(&q, end, &t) < 0 || t.type != MP_ARRAY || t.v.n != 5) break;
                int ok = 1;
                for (int j = 0; j < 5; j++) ok &= mp_next(&q, end, &f[j]) == 0;
                if (!ok || f[4].type != MP_BIN || f[4].v.s.len != 16) break;
                tm_event *e = &evs[nev++];
                e->stream = f[0].v.s.ptr;
                e->stream_len = f[0].v.s.len;
                e->type = f[1].v.s.ptr;
                e->type_len = f[1].v.s.len;
                e->data = f[2].v.s.ptr;
                e->data_len = f[2].v.s.len;
                if (f[3].type == MP_BIN) {
                    e->meta = f[3].v.s.ptr;
                    e->meta_len = f[3].v.s.len;
                }
                memcpy(e->id, f[4].v.s.ptr, 16);
                e->has_id = 1;
            }
        }
    }
    if (nev && h->o.suppress_emits) { /* the side-effect gate (a version rebuilding) */
        h->suppressed += nev;
        nev = 0;
    }
    *any = nev > 0;
    if (nev && store_append(h->s, evs, nev, NULL, 0, err) < 0) {
        if (err->code != TM_ECONFLICT) rc = -1;
        for (uint32_t i = 0; rc == 0 && i < nev; i++)
            if (store_append(h->s, &evs[i], 1, NULL, 0, err) < 0) rc = -1;
    }
    free(evs);
    return rc;
}

/* The checkpoint's key/values (state + position) as one batch. */
static store_batch *state_batch(projhost *h) {
    const char *v;
    size_t vl;
    store_batch *b = store_batch_new();
    if (mp_map_find(h->frame.ptr, h->frame.len, "kv", 2, &v, &vl) == 1) {
        const char *q = v, *end = v + vl;
        mp_item a, t, k2, v2;
        if (mp_next(&q, end, &a) == 0 && a.type == MP_ARRAY) {
            for (uint32_t i = 0; i < a.v.n; i++) {
                if (mp_next(&q, end, &t) < 0 || t.type != MP_ARRAY || t.v.n != 2 ||
                    mp_next(&q, end, &k2) < 0 || mp_next(&q, end, &v2) < 0)
                    break;
                size_t sl;
                const char *sk = key_in(h, k2.v.s.ptr, k2.v.s.len, &sl);
                store_batch_put(b, sk, sl, v2.v.s.ptr, v2.v.s.len);
            }
        }
    }
    return b;
}

int projhost_checkpoint(projhost *h, tm_err *err) {
    wait_commit(h);
    int k = ask_checkpoint(h, 'C', err);
    if (k != 'K') return k;
    /* emitted events first (idempotent), then state + checkpoint atomically */
    int any;
    int rc = store_emits(h, &any, err);
    if (rc == 0) {
        store_batch *b = state_batch(h);
        rc = store_batch_commit(h->s, b, err);
        store_batch_free(b);
    }
    if (rc < 0) return commit_failed(h, err);
    if (send_frame(h->to, 'D', NULL, 0) < 0) return worker_lost(h, 0, err);
    k = await(h, err);
    if (k != 'A') return k < 0 ? -1 : err_set(err, TM_EIO, "unexpected answer '%c'", k);
    take_position(h);
    h->st.checkpoint_position = h->st.position;
    return 0;
}

int projhost_checkpoint_async(projhost *h, tm_err *err) {
    wait_commit(h);
    uint64_t pos = h->st.position; /* every batch sent was answered: the worker is here */
    int k = ask_checkpoint(h, 'c', err);
    if (k != 'K') return k;
    /* the worker counts it committed already (it is restarted if not) */
    h->uncommitted = 0;
    int any;
    if (store_emits(h, &any, err) < 0) return commit_failed(h, err);
    store_batch *b = state_batch(h);
    if (!any && !h->cq) h->cq = workq_new(1, h->o.on_commit, h->o.on_commit_ud);
    if (any || !h->cq) { /* right behind the stored emits, or no thread: here */
        int rc = store_batch_commit(h->s, b, err);
        store_batch_free(b);
        if (rc < 0) return commit_failed(h, err);
        h->st.checkpoint_position = pos;
        return 0;
    }
    h->cj = (struct commit_job){.job = {.run = commit_run, .done = commit_done}, .h = h, .b = b,
                                .pos = pos};
    workq_submit(h->cq, &h->cj.job);
    return 0;
}

static store_iter *host_reader(projhost *h, uint64_t from, tm_err *err) {
    if (h->nnames == 1) {
        switch (h->from_kind) {
        case PROJ_FROM_CATEGORY:
            return store_read_category(h->s, h->names[0], h->name_lens[0], from, 0, err);
        case PROJ_FROM_TYPES:
            return store_read_type(h->s, h->names[0], h->name_lens[0], from, 0, err);
        case PROJ_FROM_STREAM:
        case PROJ_FROM_STREAMS:
            return store_read_stream(h->s, h->names[0], h->name_lens[0], 0, 0, 0, err);
        default: break;
        }
    }
    return store_read_all(h->s, from, 0, 0, err);
}

/* Send the batch in h->msg; handle the answer.  0 ok, PROJ_REPLAY, -1. */
static int send_batch(projhost *h, tm_err *err) {
    if (send_frame(h->to, 'B', h->msg.ptr, h->msg.len) < 0) return worker_lost(h, 0, err);
    buf_reset(&h->msg);
    int k = await(h, err);
    if (k < 0) return -1;
    if (k == 'A') {
        take_position(h);
        return 0;
    }
    if (k == 'R') {
        take_position(h);
        return PROJ_REPLAY;
    }
    if (k == 'F') return remote_fault(h, err);
    if (k == 'E') return remote_error(h, err);
    return err_set(err, TM_EIO, "unexpected answer '%c'", k);
}

static int feed(projhost *h, uint64_t max_events, uint64_t until, tm_err *err) {
    if (usable(h, err) < 0) return -1;
    for (;;) {
        uint64_t from = h->st.position;
        if (h->o.owns && h->skipped > from) from = h->skipped;
        store_iter *it = host_reader(h, from + 1, err);
        if (!it) return -1;
        tm_event ev;
        int r, rc = 0;
        unsigned n = 0;
        uint64_t sent = 0;
        buf_reset(&h->msg);
        while ((r = store_iter_next(it, &ev, err)) == 1) {
            if (ev.position <= from) continue;
            if (until && ev.position > until) break;
            if (h->o.owns && !h->o.owns(h->o.owns_ud, &ev)) {
                if (!n) h->skipped = ev.position; /* nothing of ours waits to be sent */
                continue;
            }
            const char *rec;
            size_t rl;
            store_iter_record(it, &rec, &rl);
            unsigned char hdr[12];
            for (int i = 0; i < 8; i++) hdr[i] = (unsigned char)(ev.position >> (8 * i));
            for (int i = 0; i < 4; i++) hdr[8 + i] = (unsigned char)((uint32_t)rl >> (8 * i));
            buf_append(&h->msg, hdr, 12);
            buf_append(&h->msg, rec, rl);
            sent++;
            if (++n == h->o.batch || sent == max_events) {
                n = 0;
                if ((rc = send_batch(h, err)) != 0) break;
                if (h->uncommitted >= h->checkpoint_every &&
                    (rc = projhost_checkpoint(h, err)) != 0)
                    break;
                if (sent == max_events) {
                    rc = PROJHOST_MORE;
                    break;
                }
            }
        }
        store_iter_free(it);
        if (r < 0) return -1;
        if (rc == 0 && n) rc = send_batch(h, err);
        if (rc == 0 && h->uncommitted >= h->checkpoint_every)
            rc = projhost_checkpoint(h, err);
        if (rc == PROJ_REPLAY) { /* rolled back to the checkpoint: re-feed */
            h->skipped = 0;
            continue;
        }
        return rc;
    }
}

int projhost_feed(projhost *h, uint64_t max_events, tm_err *err) {
    return feed(h, max_events, 0, err);
}

int projhost_feed_until(projhost *h, uint64_t until, tm_err *err) {
    if (!until) return usable(h, err);
    return feed(h, 0, until, err);
}

int projhost_catch_up(projhost *h, tm_err *err) {
    for (;;) {
        int rc = projhost_feed(h, 0, err);
        if (rc == 0) rc = projhost_checkpoint(h, err);
        if (rc == PROJ_REPLAY) continue;
        return rc;
    }
}

uint64_t projhost_uncommitted(const projhost *h) { return h->uncommitted; }

static int value(projhost *h, char kind, buf *req, buf *out, tm_err *err) {
    if (usable(h, err) < 0) return -1;
    if (send_frame(h->to, kind, req ? req->ptr : NULL, req ? req->len : 0) < 0)
        return worker_lost(h, 0, err);
    int k = await(h, err);
    if (k < 0) return -1;
    if (k == 'E') return remote_error(h, err);
    if (k == 'F') return remote_fault(h, err);
    if (k != 'V') return err_set(err, TM_EIO, "unexpected answer '%c'", k);
    buf_append(out, h->frame.ptr, h->frame.len);
    return 0;
}

int projhost_state_mp(projhost *h, buf *out, tm_err *err) { return value(h, 'S', NULL, out, err); }

int projhost_query(projhost *h, const char *name, const char *args, size_t alen, buf *out,
                   tm_err *err) {
    buf req = BUF_INIT;
    msgpack_packer pk;
    pk_init(&pk, &req);
    msgpack_pack_map(&pk, args && alen ? 2 : 1);
    pk_cstr(&pk, "name");
    pk_cstr(&pk, name);
    if (args && alen) {
        pk_cstr(&pk, "args");
        pk_bin(&pk, args, alen);
    }
    int rc = value(h, 'Q', &req, out, err);
    buf_free(&req);
    return rc;
}

int projhost_read(projhost *h, const char *op, const char *a, const char *b, uint64_t n,
                  buf *out, tm_err *err) {
    buf req = BUF_INIT;
    msgpack_packer pk;
    pk_init(&pk, &req);
    msgpack_pack_map(&pk, 2 + (a != NULL) + (b != NULL));
    pk_cstr(&pk, "op");
    pk_cstr(&pk, op);
    pk_cstr(&pk, "n");
    msgpack_pack_uint64(&pk, n);
    if (a) {
        pk_cstr(&pk, "a");
        pk_cstr(&pk, a);
    }
    if (b) {
        pk_cstr(&pk, "b");
        pk_cstr(&pk, b);
    }
    int rc = value(h, 'P', &req, out, err);
    buf_free(&req);
    return rc;
}

int projhost_partition(projhost *h, const char *key, size_t klen, buf *out, tm_err *err) {
    buf req = BUF_INIT, v = BUF_INIT;
    msgpack_packer pk;
    pk_init(&pk, &req);
    msgpack_pack_map(&pk, 3);
    pk_cstr(&pk, "op");
    pk_cstr(&pk, "peek");
    pk_cstr(&pk, "n");
    msgpack_pack_uint64(&pk, 0);
    pk_cstr(&pk, "a");
    pk_str(&pk, key, klen);
    int rc = value(h, 'P', &req, &v, err);
    if (rc == 0 && !(v.len == 1 && (unsigned char)v.ptr[0] == 0xc0)) { /* nil = absent */
        buf_append(out, v.ptr, v.len);
        rc = 1;
    }
    buf_free(&req);
    buf_free(&v);
    return rc;
}

int projhost_partitions(projhost *h, const char *const *keys, const size_t *klens, size_t n,
                        buf *out, tm_err *err) {
    buf req = BUF_INIT;
    msgpack_packer pk;
    pk_init(&pk, &req);
    msgpack_pack_array(&pk, (uint32_t)n);
    for (size_t i = 0; i < n; i++) pk_str(&pk, keys[i], klens[i]);
    int rc = value(h, 'M', &req, out, err);
    buf_free(&req);
    return rc;
}

const projhost_status *projhost_get_status(const projhost *h) { return &h->st; }

void projhost_free(projhost *h) {
    if (!h) return;
    if (h->cq) { /* a checkpoint in flight lands before anything else happens */
        workq_wait(h->cq);
        workq_free(h->cq);
    }
    if (h->to >= 0) close(h->to); /* EOF: the worker exits */
    if (h->pid > 0) {
        for (int i = 0; i < 100; i++) { /* up to ~1 s, then SIGKILL */
            int status;
            pid_t r = waitpid(h->pid, &status, WNOHANG);
            if (r == h->pid || (r < 0 && errno != EINTR)) {
                h->pid = -1;
                break;
            }
            usleep(10000);
        }
        reap(h, 1);
    }
    if (h->from >= 0) close(h->from);
    if (h->errfd >= 0) close(h->errfd);
    for (size_t i = 0; i < h->nnames; i++) free(h->names[i]);
    free(h->names);
    free(h->name_lens);
    free(h->st.traceback);
    buf_free(&h->frame);
    buf_free(&h->msg);
    buf_free(&h->ans);
    buf_free(&h->errtext);
    buf_free(&h->pfx_w);
    buf_free(&h->pfx_s);
    buf_free(&h->key);
    free(h->name);
    free(h);
}
