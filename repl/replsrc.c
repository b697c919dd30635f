/* replsrc.c — the REPL's event source: embedded store or remote server
 * (see replsrc.h).
 *
 * Embedded reads are store iterators.  Remote reads page through the HTTP
 * API (docs/http-api.md): GET /streams/{s} for one stream, GET /all (with
 * ?category= / ?type= filters) for everything else, 1000 events a page,
 * so the same selector returns the same events in the same order in both
 * modes.  A page's JSON body is transcoded to msgpack once (json_to_mp)
 * and the events are borrowed views into that buffer.
 *
 * Replies are untrusted (tests/fuzz/fuzz_repl_remote.c): every event must
 * move a read on (positions, or a stream's versions, strictly increase,
 * or decrease backwards) and stream names must come in order, so a server
 * that ignores from= or after= ends a read with an error instead of
 * repeating a page forever.
 */
#include "replsrc.h"

#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include "event.h"
#include "json.h"
#include "mp.h"
#include "repl.h"
#include "replhttp.h"

#define PAGE 1000

struct replsrc {
    store *st;          /* embedded */
    char *where;        /* directory or URL */
    int remote;
};

struct replsrc_iter {
    replsrc *src;
    store_iter *it;     /* embedded */
    int filter;         /* embedded: `it` scans the log; keep sel's category / type */
    /* remote */
    replsrc_sel sel;
    char *name;         /* owned copy of sel.name */
    buf page;           /* msgpack of the current page */
    const char *p, *end;/* cursor over the page's events array */
    uint32_t left;      /* events left in the page */
    uint64_t next_from; /* where the next page starts */
    uint64_t returned;
    int last_page;
};


replsrc *replsrc_open_local(const char *dir, tm_err *err) {
    store_opts o;
    store_opts_default(&o);
    o.create_if_missing = 0;
    store *st = store_open(dir, &o, err);
    if (!st) {
        if (strstr(err->msg, "another process") || strstr(err->msg, "locked") ||
            strstr(err->msg, "in use"))
            err_set(err, err->code,
                    "%s is in use by another process (a running server?); connect to that "
                    "server instead with --url http://HOST:PORT",
                    dir);
        return NULL;
    }
    replsrc *s = calloc(1, sizeof *s);
    s->st = st;
    s->where = strdup(dir);
    return s;
}

replsrc *replsrc_open_remote(const char *url, tm_err *err) {
    char host[256], port[16], prefix[512];
    if (replhttp_parse_url(url, host, port, prefix, err) < 0) return NULL;
    replsrc *s = calloc(1, sizeof *s);
    s->remote = 1;
    s->where = strdup(url);
    size_t n = strlen(s->where);
    while (n > 7 && s->where[n - 1] == '/') s->where[--n] = 0;
    uint64_t pos;
    if (replsrc_last_position(s, &pos, err) < 0) {
        replsrc_close(s);
        return NULL;
    }
    return s;
}

void replsrc_close(replsrc *s) {
    if (!s) return;
    if (s->st) store_close(s->st);
    free(s->where);
    free(s);
}

int replsrc_is_remote(const replsrc *s) { return s->remote; }
const char *replsrc_where(const replsrc *s) { return s->where; }
store *replsrc_store(replsrc *s) { return s->st; }
const char *replsrc_url(const replsrc *s) { return s->remote ? s->where : NULL; }

/* ---- remote helpers ---- */

/* GET path, expect 200 with JSON; msgpack of the body into out.  404 -> 0
 * with out empty ("not found" is a result). */
static int get_json(replsrc *s, const char *path, buf *out, tm_err *err) {
    buf body = BUF_INIT;
    int status = 0;
    buf_reset(out);
    if (replhttp_request(s->where, "GET", path, NULL, NULL, 0, repl_cancel_requested, &status,
                         &body, err) < 0) {
        buf_free(&body);
        return -1;
    }
    int r = 0;
    /* A page holds up to PAGE events of up to 1 MiB each, 3 levels down
     * ({"events":[{"data":...}]}): the size limit follows the reply (msgpack
     * is at most 3 times the JSON), the depth lets any stored event through. */
    mp_limits lim = mp_default_limits;
    lim.max_size = body.len * 4 + 64;
    lim.max_depth += 3;
    if (status == 404) {
        r = 0;
    } else if (status != 200) {
        r = err_set(err, status >= 500 ? TM_EIO : TM_EINVAL, "GET %s: HTTP %d: %.200s", path,
                    status, body.ptr ? body.ptr : "");
    } else if (json_to_mp(body.ptr ? body.ptr : "", body.len, &lim, out, err) < 0) {
        /* (an empty body has no buffer: never pass NULL) */
        err_prefix(err, "GET %s: bad JSON reply", path);
        r = -1;
    }
    buf_free(&body);
    return r;
}

/* Fill ev from one export-format event map at *p; advances *p. */
static int parse_event(const char **p, const char *end, tm_event *ev, tm_err *err) {
    mp_item it, v;
    memset(ev, 0, sizeof *ev);
    if (mp_next(p, end, &it) < 0 || it.type != MP_MAP)
        return err_set(err, TM_EIO, "remote event is not an object");
    for (uint32_t i = 0; i < it.v.n; i++) {
        mp_item k;
        if (mp_next(p, end, &k) < 0 || k.type != MP_STR)
            return err_set(err, TM_EIO, "bad key in remote event");
        const char *vstart = *p;
        if (mp_skip(p, end) < 0) return err_set(err, TM_EIO, "truncated remote event");
        size_t vlen = (size_t)(*p - vstart);
        const char *q = vstart;
        mp_next(&q, vstart + vlen, &v);
#define KEY(lit) (k.v.s.len == sizeof(lit) - 1 && !memcmp(k.v.s.ptr, lit, sizeof(lit) - 1))
        if (KEY("stream") && v.type == MP_STR) ev->stream = v.v.s.ptr, ev->stream_len = v.v.s.len;
        else if (KEY("type") && v.type == MP_STR) ev->type = v.v.s.ptr, ev->type_len = v.v.s.len;
        else if (KEY("data")) ev->data = vstart, ev->data_len = vlen;
        else if (KEY("metadata")) ev->meta = vstart, ev->meta_len = vlen;
        else if (KEY("id") && v.type == MP_STR) event_id_parse(v.v.s.ptr, v.v.s.len, ev->id);
        else if (KEY("time") && (v.type == MP_UINT || v.type == MP_INT)) ev->time_ms = v.type == MP_UINT ? (int64_t)v.v.u : v.v.i;
        else if (KEY("position") && v.type == MP_UINT) ev->position = v.v.u;
        else if (KEY("version") && v.type == MP_UINT) ev->version = v.v.u;
#undef KEY
    }
    if (!ev->stream || !ev->type) return err_set(err, TM_EIO, "remote event without stream/type");
    return 0;
}

/* Position the cursor on the "events" array of the page. */
static int open_events(replsrc_iter *it, tm_err *err) {
    it->left = 0;
    if (it->page.len == 0) return 0;
    const char *arr;
    size_t alen;
    int f = mp_map_find(it->page.ptr, it->page.len, "events", 6, &arr, &alen);
    if (f < 0) return err_set(err, TM_EIO, "bad reply: no events array");
    if (f == 0) return 0;
    mp_item a;
    it->p = arr;
    it->end = arr + alen;
    if (mp_next(&it->p, it->end, &a) < 0 || a.type != MP_ARRAY)
        return err_set(err, TM_EIO, "bad reply: events is not an array");
    it->left = a.v.n;
    return 0;
}

static int fetch_page(replsrc_iter *it, tm_err *err) {
    buf path = BUF_INIT;
    const replsrc_sel *sel = &it->sel;
    uint64_t want = PAGE;
    if (sel->limit && sel->limit - it->returned < want &&
        (sel->kind == REPLSRC_STREAM || sel->kind == REPLSRC_ALL))
        want = sel->limit - it->returned;
    if (sel->kind == REPLSRC_STREAM) {
        buf_puts(&path, "/streams/");
        replhttp_escape(&path, it->name, sel->name_len);
    } else {
        buf_puts(&path, "/all");
    }
    buf_printf(&path, "?limit=%llu", (unsigned long long)want);
    if (it->next_from != UINT64_MAX) buf_printf(&path, "&from=%llu", (unsigned long long)it->next_from);
    if (sel->backward) buf_puts(&path, "&direction=backward");
    if (sel->kind == REPLSRC_CATEGORY || sel->kind == REPLSRC_TYPE) {
        buf_puts(&path, sel->kind == REPLSRC_CATEGORY ? "&category=" : "&type=");
        replhttp_escape(&path, it->name, sel->name_len);
    }
    int r = get_json(it->src, path.ptr, &it->page, err);
    buf_free(&path);
    if (r < 0 || open_events(it, err) < 0) return -1;
    if (it->left == 0) it->last_page = 1;
    return 0;
}

static int selected(const replsrc_sel *sel, const tm_event *ev) {
    switch (sel->kind) {
    case REPLSRC_CATEGORY: {
        size_t cl = event_category_len(ev->stream, ev->stream_len);
        return cl == sel->name_len && !memcmp(ev->stream, sel->name, cl);
    }
    case REPLSRC_TYPE:
        return ev->type_len == sel->name_len && !memcmp(ev->type, sel->name, sel->name_len);
    default: return 1;
    }
}

static int remote_next(replsrc_iter *it, tm_event *ev, tm_err *err) {
    for (;;) {
        if (it->sel.limit && it->returned >= it->sel.limit) return 0;
        if (it->left == 0) {
            if (it->last_page) return 0;
            if (fetch_page(it, err) < 0) return -1;
            if (it->left == 0) return 0;
        }
        it->left--;
        if (parse_event(&it->p, it->end, ev, err) < 0) return -1;
        int stream = it->sel.kind == REPLSRC_STREAM;
        uint64_t cur = stream ? ev->version : ev->position;
        /* every event must move the read on (a server that ignored from=
         * would otherwise have it return the same page forever) */
        if (it->sel.backward ? cur > it->next_from : cur < it->next_from)
            return err_set(err, TM_EIO, "bad reply from %s: %s %llu out of order (wanted %s %llu)",
                           it->src->where, stream ? "version" : "position",
                           (unsigned long long)cur, it->sel.backward ? "at most" : "at least",
                           (unsigned long long)it->next_from);
        if (it->sel.backward) {
            if (cur == 0) it->last_page = 1, it->left = 0;
            it->next_from = cur ? cur - 1 : 0;
        } else {
            if (cur == UINT64_MAX) it->last_page = 1, it->left = 0;
            it->next_from = cur + 1;
        }
        if (!selected(&it->sel, ev)) continue;
        it->returned++;
        return 1;
    }
}

/* ---- reads ---- */

int replsrc_last_position(replsrc *s, uint64_t *pos, tm_err *err) {
    if (!s->remote) {
        *pos = store_last_position(s->st);
        return 0;
    }
    buf page = BUF_INIT;
    int r = get_json(s, "/health", &page, err);
    *pos = 0;
    if (r == 0) {
        const char *v;
        size_t vl;
        mp_item it;
        if (page.len && mp_map_find(page.ptr, page.len, "last_position", 13, &v, &vl) == 1 &&
            mp_next(&v, v + vl, &it) == 0 && it.type == MP_UINT)
            *pos = it.v.u;
        else
            r = err_set(err, TM_EIO, "%s does not look like a tidemark server (GET /health)",
                        s->where);
    }
    buf_free(&page);
    return r;
}

/* Embedded: a category or type holding most of the positions from
 * sel->from on is read as a scan of the log, filtered in replsrc_next:
 * stepping through the log costs less per event than the index, which
 * fetches each event by position (engine/replay.c's open_reader does the
 * same).  1 = scan, 0 = index, -1 with err. */
static int scan_instead(replsrc *s, const replsrc_sel *sel, tm_err *err) {
    if ((sel->kind != REPLSRC_CATEGORY && sel->kind != REPLSRC_TYPE) || sel->limit ||
        sel->backward)
        return 0;
    uint64_t from = sel->from ? sel->from : 1, last = store_last_position(s->st), n = 0;
    if (last < from) return 0;
    int rc = sel->kind == REPLSRC_CATEGORY
                 ? store_count_category(s->st, sel->name, sel->name_len, from, &n, err)
                 : store_count_type(s->st, sel->name, sel->name_len, from, &n, err);
    if (rc < 0) return -1;
    return n * 5 >= (last - from + 1) * 4;
}

replsrc_iter *replsrc_read(replsrc *s, const replsrc_sel *sel, tm_err *err) {
    replsrc_iter *it = calloc(1, sizeof *it);
    it->src = s;
    it->sel = *sel;
    if (!s->remote) {
        int scan = scan_instead(s, sel, err);
        if (scan < 0) return free(it), NULL;
        if (scan) {
            it->name = malloc(sel->name_len + 1);
            memcpy(it->name, sel->name, sel->name_len);
            it->name[sel->name_len] = 0;
            it->filter = 1;
            it->it = store_read_all(s->st, sel->from, 0, 0, err);
            if (!it->it) return free(it->name), free(it), NULL;
            return it;
        }
        switch (sel->kind) {
        case REPLSRC_ALL:
            it->it = store_read_all(s->st, sel->from, sel->backward, sel->limit, err);
            break;
        case REPLSRC_STREAM:
            it->it = store_read_stream(s->st, sel->name, sel->name_len, sel->from, sel->backward,
                                       sel->limit, err);
            break;
        case REPLSRC_CATEGORY:
            it->it = store_read_category(s->st, sel->name, sel->name_len, sel->from, sel->limit, err);
            break;
        case REPLSRC_TYPE:
            it->it = store_read_type(s->st, sel->name, sel->name_len, sel->from, sel->limit, err);
            break;
        }
        if (!it->it) return free(it), NULL;
        return it;
    }
    if (sel->name) {
        it->name = malloc(sel->name_len + 1);
        memcpy(it->name, sel->name, sel->name_len);
        it->name[sel->name_len] = 0;
        it->sel.name = it->name;
    }
    it->next_from = sel->from;
    if (!sel->backward && sel->from == 0 && sel->kind != REPLSRC_STREAM) it->next_from = 1;
    return it;
}

/* ev is in the filtered scan's category / type. */
static int kept(const replsrc_iter *it, const tm_event *ev) {
    const char *k = ev->type;
    size_t kl = ev->type_len;
    if (it->sel.kind == REPLSRC_CATEGORY) {
        k = ev->stream;
        kl = event_category_len(ev->stream, ev->stream_len);
    }
    return kl == it->sel.name_len && bytes_eq(k, it->name, kl);
}

int replsrc_next(replsrc_iter *it, tm_event *ev, tm_err *err) {
    if (it->it && it->filter) {
        int r;
        while ((r = store_iter_next(it->it, ev, err)) == 1 && !kept(it, ev)) {
        }
        return r;
    }
    if (it->it) return store_iter_next(it->it, ev, err);
    return remote_next(it, ev, err);
}

void replsrc_iter_free(replsrc_iter *it) {
    if (!it) return;
    if (it->it) store_iter_free(it->it);
    buf_free(&it->page);
    free(it->name);
    free(it);
}

/* ---- names ---- */

/* 1 when name sorts strictly after prev (bytewise, as the store orders). */
static int name_after(const char *name, size_t len, const buf *prev) {
    size_t m = len < prev->len ? len : prev->len;
    int c = memcmp(name, prev->ptr, m);
    return c > 0 || (c == 0 && len > prev->len);
}

/* Remote listing: GET /streams (pages of {"stream":name,"version":N},
 * continued with ?after=NAME while "next" is not null) or GET /categories. */
static int remote_names(replsrc *s, int categories, store_name_fn fn, void *ud, tm_err *err) {
    buf page = BUF_INIT, path = BUF_INIT, after = BUF_INIT;
    const char *key = categories ? "categories" : "streams";
    const char *field = categories ? "category" : "stream";
    int r = 0, more = 1, stop = 0, have_after = 0;
    while (more && !stop) {
        int advanced = 0;
        buf_reset(&path);
        buf_printf(&path, "/%s?limit=1000", key);
        if (after.len) {
            buf_puts(&path, "&after=");
            replhttp_escape(&path, after.ptr, after.len);
        }
        r = get_json(s, path.ptr, &page, err);
        if (r < 0 || page.len == 0) break;
        const char *arr, *nx;
        size_t alen, nxl;
        if (mp_map_find(page.ptr, page.len, key, strlen(key), &arr, &alen) != 1) {
            r = err_set(err, TM_EIO, "bad reply from GET /%s", key);
            break;
        }
        more = !categories && mp_map_find(page.ptr, page.len, "next", 4, &nx, &nxl) == 1 &&
               (unsigned char)nx[0] != 0xc0;
        const char *p = arr, *end = arr + alen;
        mp_item a, x;
        mp_next(&p, end, &a);
        uint32_t n = a.type == MP_ARRAY ? a.v.n : 0;
        if (n == 0) more = 0;
        for (uint32_t i = 0; i < n && !stop; i++) {
            const char *start = p;
            if (mp_skip(&p, end) < 0) break;
            const char *nv, *vv;
            size_t nl, vl;
            mp_item v;
            int64_t version = -1;
            if (mp_map_find(start, (size_t)(p - start), field, strlen(field), &nv, &nl) != 1 ||
                mp_next(&nv, nv + nl, &x) < 0 || x.type != MP_STR)
                continue;
            if (!categories && mp_map_find(start, (size_t)(p - start), "version", 7, &vv, &vl) == 1 &&
                mp_next(&vv, vv + vl, &v) == 0 && v.type == MP_UINT)
                version = (int64_t)v.v.u;
            if (!categories && have_after && !name_after(x.v.s.ptr, x.v.s.len, &after)) {
                /* pages continue after the last name: a name that does
                 * not sort after it means the server ignored after= */
                r = err_set(err, TM_EIO, "bad reply from GET /%s: names out of order", key);
                stop = 1;
                break;
            }
            buf_reset(&after);
            buf_append(&after, x.v.s.ptr, x.v.s.len);
            have_after = advanced = 1;
            if (fn(ud, x.v.s.ptr, x.v.s.len, version)) stop = 1;
        }
        if (more && !stop && !advanced) /* "next" without a name to go on from */
            r = err_set(err, TM_EIO, "bad reply from GET /%s: a page without names", key), stop = 1;
    }
    buf_free(&page);
    buf_free(&path);
    buf_free(&after);
    return r;
}

int replsrc_list_streams(replsrc *s, store_name_fn fn, void *ud, tm_err *err) {
    if (s->remote) return remote_names(s, 0, fn, ud, err);
    return store_list_streams(s->st, NULL, 0, 0, fn, ud, err);
}

int replsrc_list_categories(replsrc *s, store_name_fn fn, void *ud, tm_err *err) {
    if (s->remote) return remote_names(s, 1, fn, ud, err);
    return store_list_categories(s->st, fn, ud, err);
}
