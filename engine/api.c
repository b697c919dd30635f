/* api.c — HTTP route handlers over the store (see api.h).
 *
 * Invariants: handlers never touch sockets; every reply has a status and a
 * JSON body; bodies from outside are validated (json_to_mp / mp_validate)
 * before any event view is built on them; events reach the JSON output
 * only through event_to_json (the export format).
 */
#include "api.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "event.h"
#include "json.h"
#include "metrics.h"
#include "mp.h"

#define API_DEFAULT_LIMIT 100
#define API_MAX_LIMIT 10000
#define API_MAX_EVENTS_PER_APPEND 100000

/* ---- replies ---- */

void api_reply_init(api_reply *rp) {
    rp->status = 200;
    rp->body = (buf)BUF_INIT;
    rp->content_type = "application/json";
}

void api_reply_free(api_reply *rp) { buf_free(&rp->body); }

static void error_body(api_reply *rp, int status, const char *msg) {
    rp->status = status;
    rp->content_type = "application/json";
    buf_reset(&rp->body);
    buf_puts(&rp->body, "{\"error\":");
    json_put_string(&rp->body, msg, strlen(msg));
    buf_printf(&rp->body, ",\"code\":%d}", status);
}

void api_error(api_reply *rp, int status, const char *fmt, ...) {
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    error_body(rp, status, msg);
}

int api_status_of(int tm_code) {
    switch (tm_code) {
    case TM_EINVAL: return 400;
    case TM_ENOTFOUND: return 404;
    case TM_ECONFLICT: return 409;
    case TM_EIO: return 503;
    default: return 500;
    }
}

const char *api_reason(int status) {
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default: return "Status";
    }
}

static void reply_tm_err(api_reply *rp, const tm_err *err) {
    error_body(rp, api_status_of(err->code), err->msg[0] ? err->msg : err_code_name(err->code));
    if (err->code == TM_EIO) metrics_add(METRICS_STORE_ERRORS, 1);
}

/* ---- query strings ---- */

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = tolower(c);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

int api_url_decode(buf *out, const char *s, size_t len, int plus_is_space) {
    buf_reset(out);
    buf_append(out, "", 0);   /* ptr is valid and NUL-terminated even when empty */
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '%') {
            if (i + 2 >= len) return -1;
            int hi = hexval((unsigned char)s[i + 1]), lo = hexval((unsigned char)s[i + 2]);
            if (hi < 0 || lo < 0) return -1;
            buf_putc(out, (char)(hi * 16 + lo));
            i += 2;
        } else if (c == '+' && plus_is_space) {
            buf_putc(out, ' ');
        } else {
            buf_putc(out, c);
        }
    }
    return 0;
}

void api_url_encode(buf *out, const char *s, size_t len) {
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || c == ':') {
            buf_putc(out, (char)c);
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            buf_append(out, e, 3);
        }
    }
}

int api_query_next(const char *query, size_t *pos, buf *k, buf *v) {
    if (!query) return 0;
    size_t qlen = strlen(query);
    while (*pos < qlen) {
        const char *p = query + *pos;
        const char *amp = memchr(p, '&', qlen - *pos);
        size_t plen = amp ? (size_t)(amp - p) : qlen - *pos;
        *pos += plen + (amp ? 1 : 0);
        if (plen == 0) continue;
        const char *eq = memchr(p, '=', plen);
        size_t kl = eq ? (size_t)(eq - p) : plen;
        if (api_url_decode(k, p, kl, 1) != 0) continue;
        if (eq) {
            if (api_url_decode(v, eq + 1, plen - kl - 1, 1) != 0) continue;
        } else {
            buf_reset(v);
            buf_append(v, "", 0);
        }
        return 1;
    }
    return 0;
}

int api_query_get(const char *query, const char *key, buf *out) {
    size_t pos = 0;
    buf k = BUF_INIT;
    int found = 0;
    while (api_query_next(query, &pos, &k, out)) {
        if (strcmp(k.ptr, key) == 0) {
            found = 1;
            break;
        }
    }
    buf_free(&k);
    if (!found) {
        buf_reset(out);
        buf_append(out, "", 0);
    }
    return found;
}

/* Unsigned query parameter: 1 set, 0 absent, -1 malformed (reply filled). */
static int query_u64(const api_request *rq, const char *key, uint64_t *v, api_reply *rp) {
    buf b = BUF_INIT;
    int found = api_query_get(rq->query, key, &b);
    int rc = 0;
    if (found) {
        char *end = NULL;
        errno = 0;
        unsigned long long x = b.len ? strtoull(b.ptr, &end, 10) : 0;
        if (!b.len || errno || *end || b.ptr[0] == '-') {
            api_error(rp, 400, "query parameter %s must be a non-negative integer", key);
            rc = -1;
        } else {
            *v = x;
            rc = 1;
        }
    }
    buf_free(&b);
    return rc;
}

/* limit (1..API_MAX_LIMIT, default API_DEFAULT_LIMIT) and direction. */
static int paging(const api_request *rq, uint64_t *limit, int *backward, api_reply *rp) {
    *limit = API_DEFAULT_LIMIT;
    if (query_u64(rq, "limit", limit, rp) < 0) return -1;
    if (*limit == 0 || *limit > API_MAX_LIMIT) {
        api_error(rp, 400, "limit must be between 1 and %d", API_MAX_LIMIT);
        return -1;
    }
    *backward = 0;
    buf d = BUF_INIT;
    if (api_query_get(rq->query, "direction", &d)) {
        if (strcmp(d.ptr, "backward") == 0) *backward = 1;
        else if (strcmp(d.ptr, "forward") != 0) {
            buf_free(&d);
            api_error(rp, 400, "direction must be forward or backward");
            return -1;
        }
    }
    buf_free(&d);
    return 0;
}

/* ---- append ---- */

static int parse_expected(const char *h, int64_t *v) {
    if (!h || !*h || strcmp(h, "any") == 0) { *v = STORE_ANY; return 0; }
    if (strcmp(h, "no_stream") == 0) { *v = STORE_NO_STREAM; return 0; }
    if (strcmp(h, "exists") == 0) { *v = STORE_EXISTS; return 0; }
    char *end = NULL;
    errno = 0;
    if (!isdigit((unsigned char)h[0])) return -1;
    long long x = strtoll(h, &end, 10);
    if (errno || *end || x < 0) return -1;
    *v = x;
    return 0;
}

static int is_msgpack(const char *ct) {
    if (!ct) return 0;
    return strncasecmp(ct, "application/msgpack", 19) == 0 ||
           strncasecmp(ct, "application/x-msgpack", 21) == 0;
}

/* Turn the body into event views (into *mp or the body itself). */
static int parse_events(const api_request *rq, buf *mp, tm_event **evs, size_t *n, tm_err *err) {
    const char *m;
    size_t ml;
    mp_limits lim = mp_default_limits;
    if (is_msgpack(rq->content_type)) {
        lim.max_size = rq->body_len + 16;
        if (mp_validate(rq->body, rq->body_len, &lim, err) != 0)
            return err_prefix(err, "malformed msgpack body");
        m = rq->body;
        ml = rq->body_len;
    } else {
        lim.max_size = rq->body_len * 2 + 64;
        if (json_to_mp(rq->body, rq->body_len, &lim, mp, err) != 0)
            return err_prefix(err, "malformed JSON body");
        m = mp->ptr;
        ml = mp->len;
    }
    const char *p = m, *end = m + ml;
    mp_item it;
    if (mp_next(&p, end, &it) != 0) return err_set(err, TM_EINVAL, "empty body");
    if (it.type == MP_MAP) {
        *n = 1;
        *evs = calloc(1, sizeof **evs);
        if (!*evs) tm_oom();
        if (event_from_mp(m, ml, rq->stream, rq->stream_len, &(*evs)[0], err) != 0) return -1;
        return 0;
    }
    if (it.type != MP_ARRAY)
        return err_set(err, TM_EINVAL, "body must be an event object or an array of them");
    if (it.v.n == 0) return err_set(err, TM_EINVAL, "empty array: no events to append");
    if (it.v.n > API_MAX_EVENTS_PER_APPEND)
        return err_set(err, TM_EINVAL, "too many events in one request (max %d)",
                       API_MAX_EVENTS_PER_APPEND);
    *n = it.v.n;
    *evs = calloc(*n, sizeof **evs);
    if (!*evs) tm_oom();
    for (size_t i = 0; i < *n; i++) {
        const char *start = p;
        if (mp_skip(&p, end) != 0) return err_set(err, TM_EINVAL, "event %zu: truncated", i);
        mp_item el;
        const char *q = start;
        if (mp_next(&q, p, &el) != 0 || el.type != MP_MAP)
            return err_set(err, TM_EINVAL, "event %zu: not an object", i);
        if (event_from_mp(start, (size_t)(p - start), rq->stream, rq->stream_len, &(*evs)[i],
                          err) != 0)
            return err_prefix(err, "event %zu", i);
    }
    return 0;
}

static void append_ok(api_reply *rp, const tm_event *evs, size_t n) {
    buf *b = &rp->body;
    rp->status = 201;
    buf_reset(b);
    buf_puts(b, "{\"positions\":[");
    for (size_t i = 0; i < n; i++)
        buf_printf(b, "%s%llu", i ? "," : "", (unsigned long long)evs[i].position);
    buf_puts(b, "],\"versions\":[");
    for (size_t i = 0; i < n; i++)
        buf_printf(b, "%s%llu", i ? "," : "", (unsigned long long)evs[i].version);
    buf_puts(b, "],\"ids\":[");
    for (size_t i = 0; i < n; i++) {
        char id[37];
        event_id_format(evs[i].id, id);
        buf_printf(b, "%s\"%s\"", i ? "," : "", id);
    }
    buf_printf(b, "],\"first_position\":%llu,\"last_position\":%llu}",
               (unsigned long long)evs[0].position, (unsigned long long)evs[n - 1].position);
}

struct api_append_op {
    store_expect exp;
    char *stream;        /* owned copy (exp.stream points here) */
    char *body;          /* owned copy of the request body (msgpack bodies) */
    size_t body_len;
    buf mp;              /* JSON bodies transcoded to msgpack */
    tm_event *evs;
    size_t n;
    int rc;              /* result of the append */
    tm_err err;
};

void api_append_free(api_append_op *op) {
    if (!op) return;
    free(op->evs);
    buf_free(&op->mp);
    free(op->body);
    free(op->stream);
    free(op);
}

api_append_op *api_append_parse(const api_request *rq, api_reply *rp) {
    api_append_op *op = calloc(1, sizeof *op);
    if (!op) tm_oom();
    err_clear(&op->err);
    int64_t expv;
    if (parse_expected(rq->expected_version, &expv) != 0) {
        api_error(rp, 400, "Expected-Version must be any, no_stream, exists or a version number");
        goto fail;
    }
    op->stream = malloc(rq->stream_len + 1);
    if (!op->stream) tm_oom();
    memcpy(op->stream, rq->stream, rq->stream_len);
    op->stream[rq->stream_len] = '\0';
    op->exp = (store_expect){op->stream, rq->stream_len, expv};
    api_request r = *rq;
    r.stream = op->stream;
    if (is_msgpack(rq->content_type)) {
        /* Event views point into the body: keep a copy. */
        op->body = malloc(rq->body_len + 1);
        if (!op->body) tm_oom();
        memcpy(op->body, rq->body, rq->body_len);
        op->body_len = rq->body_len;
        r.body = op->body;
    }
    tm_err err;
    err_clear(&err);
    if (parse_events(&r, &op->mp, &op->evs, &op->n, &err) != 0) {
        error_body(rp, 400, err.msg);
        goto fail;
    }
    op->body_len = rq->body_len;
    return op;
fail:
    api_append_free(op);
    return NULL;
}

int api_append_start(store *s, api_append_op *op, store_append_fn fn, void *ud, api_reply *rp) {
    tm_err err;
    err_clear(&err);
    if (store_append_async(s, op->evs, op->n, &op->exp, 1, fn, ud, &err) != 0) {
        op->rc = -1;
        op->err = err;
        api_append_finish(s, op, rp);
        return -1;
    }
    return 0;
}

void api_append_result(api_append_op *op, int rc, const tm_err *err) {
    op->rc = rc;
    if (rc != 0 && err) op->err = *err;
}

void api_append_finish(store *s, api_append_op *op, api_reply *rp) {
    if (op->rc != 0) {
        if (op->err.code == TM_ECONFLICT) {
            int64_t cur = -1;
            tm_err e2;
            if (store_stream_version(s, op->exp.stream, op->exp.stream_len, &cur, &e2) != 1)
                cur = -1;
            metrics_add(METRICS_APPEND_CONFLICTS, 1);
            error_body(rp, 409, op->err.msg);
            rp->body.len--;   /* reopen the object to add the current version */
            buf_printf(&rp->body, ",\"current_version\":%lld}", (long long)cur);
        } else {
            reply_tm_err(rp, &op->err);
        }
        return;
    }
    metrics_add(METRICS_APPENDS, op->n);
    metrics_add(METRICS_APPEND_REQUESTS, 1);
    metrics_add(METRICS_APPEND_BYTES, op->body_len);
    append_ok(rp, op->evs, op->n);
}

void api_append(store *s, const api_request *rq, api_reply *rp) {
    api_append_op *op = api_append_parse(rq, rp);
    if (!op) return;
    tm_err err;
    err_clear(&err);
    op->rc = store_append(s, op->evs, op->n, &op->exp, 1, &err);
    if (op->rc != 0) op->err = err;
    api_append_finish(s, op, rp);
    api_append_free(op);
}

/* ---- reads ---- */

/* Write the events of `it` as a JSON array into rp->body; fills count and
 * the last event's position / version.  -1 (reply filled) on error. */
static int events_array(store_iter *it, api_reply *rp, uint64_t *count, uint64_t *last_pos,
                        uint64_t *last_ver) {
    tm_err err;
    err_clear(&err);
    tm_event ev;
    int rc;
    *count = 0;
    buf_puts(&rp->body, "\"events\":[");
    while ((rc = store_iter_next(it, &ev, &err)) == 1) {
        if (*count) buf_putc(&rp->body, ',');
        if (event_to_json(&ev, &rp->body, &err) != 0) {
            rc = -1;
            break;
        }
        (*count)++;
        *last_pos = ev.position;
        *last_ver = ev.version;
    }
    if (rc < 0) {
        reply_tm_err(rp, &err);
        return -1;
    }
    buf_putc(&rp->body, ']');
    metrics_add(METRICS_READ_EVENTS, *count);
    return 0;
}

void api_read_stream(store *s, const api_request *rq, api_reply *rp) {
    tm_err err;
    err_clear(&err);
    uint64_t limit, from = 0;
    int backward;
    if (paging(rq, &limit, &backward, rp) != 0) return;
    if (backward) from = UINT64_MAX;
    if (query_u64(rq, "from", &from, rp) < 0) return;
    int64_t cur = -1;
    int found = store_stream_version(s, rq->stream, rq->stream_len, &cur, &err);
    if (found < 0) { reply_tm_err(rp, &err); return; }
    if (found == 0) {
        api_error(rp, 404, "stream '%.*s' not found", (int)(rq->stream_len > 300 ? 300 : rq->stream_len),
                  rq->stream);
        return;
    }
    store_iter *it = store_read_stream(s, rq->stream, rq->stream_len, from, backward, limit, &err);
    if (!it) { reply_tm_err(rp, &err); return; }
    buf *b = &rp->body;
    buf_reset(b);
    buf_puts(b, "{\"stream\":");
    json_put_string(b, rq->stream, rq->stream_len);
    buf_printf(b, ",\"version\":%lld,", (long long)cur);
    uint64_t count, lp = 0, lv = 0;
    int rc = events_array(it, rp, &count, &lp, &lv);
    store_iter_free(it);
    if (rc != 0) return;
    buf_puts(b, ",\"next\":");
    if (!backward || (count == limit && lv > 0)) {
        uint64_t next = backward ? lv - 1 : (count ? lv + 1 : from);
        buf_puts(b, "\"/streams/");
        api_url_encode(b, rq->stream, rq->stream_len);
        buf_printf(b, "?from=%llu&limit=%llu%s\"", (unsigned long long)next,
                   (unsigned long long)limit, backward ? "&direction=backward" : "");
    } else {
        buf_puts(b, "null");
    }
    buf_putc(b, '}');
    rp->status = 200;
}

void api_read_all(store *s, const api_request *rq, api_reply *rp) {
    tm_err err;
    err_clear(&err);
    uint64_t limit, from = 1;
    int backward;
    if (paging(rq, &limit, &backward, rp) != 0) return;
    if (backward) from = UINT64_MAX;
    if (query_u64(rq, "from", &from, rp) < 0) return;
    buf cat = BUF_INIT, type = BUF_INIT;
    int has_cat = api_query_get(rq->query, "category", &cat);
    int has_type = api_query_get(rq->query, "type", &type);
    store_iter *it = NULL;
    if (has_cat && has_type) {
        api_error(rp, 400, "use either category or type, not both");
        goto out;
    }
    if ((has_cat || has_type) && backward) {
        api_error(rp, 400, "category and type reads go forward only");
        goto out;
    }
    if (has_cat && cat.len == 0) { api_error(rp, 400, "empty category"); goto out; }
    if (has_type && type.len == 0) { api_error(rp, 400, "empty type"); goto out; }
    if (has_cat) it = store_read_category(s, cat.ptr, cat.len, from, limit, &err);
    else if (has_type) it = store_read_type(s, type.ptr, type.len, from, limit, &err);
    else it = store_read_all(s, from, backward, limit, &err);
    if (!it) { reply_tm_err(rp, &err); goto out; }
    buf *b = &rp->body;
    buf_reset(b);
    buf_putc(b, '{');
    uint64_t count, lp = 0, lv = 0;
    int rc = events_array(it, rp, &count, &lp, &lv);
    store_iter_free(it);
    if (rc != 0) goto out;
    buf_printf(b, ",\"last_position\":%llu,\"next\":", (unsigned long long)store_last_position(s));
    if (!backward || (count == limit && lp > 1)) {
        uint64_t next = backward ? lp - 1 : (count ? lp + 1 : from);
        buf_printf(b, "\"/all?from=%llu&limit=%llu", (unsigned long long)next,
                   (unsigned long long)limit);
        if (backward) buf_puts(b, "&direction=backward");
        if (has_cat) { buf_puts(b, "&category="); api_url_encode(b, cat.ptr, cat.len); }
        if (has_type) { buf_puts(b, "&type="); api_url_encode(b, type.ptr, type.len); }
        buf_putc(b, '"');
    } else {
        buf_puts(b, "null");
    }
    buf_putc(b, '}');
    rp->status = 200;
out:
    buf_free(&cat);
    buf_free(&type);
}

typedef struct list_ctx {
    buf *b;
    uint64_t n;
    const char *key;
    buf last;
} list_ctx;

static int list_cb(void *ud, const char *name, size_t len, int64_t version) {
    list_ctx *lc = ud;
    if (lc->n++) buf_putc(lc->b, ',');
    buf_printf(lc->b, "{\"%s\":", lc->key);
    json_put_string(lc->b, name, len);
    buf_printf(lc->b, ",\"version\":%lld}", (long long)version);
    buf_reset(&lc->last);
    buf_append(&lc->last, name, len);
    return 0;
}

void api_list_streams(store *s, const api_request *rq, api_reply *rp) {
    tm_err err;
    err_clear(&err);
    uint64_t limit = API_DEFAULT_LIMIT;
    if (query_u64(rq, "limit", &limit, rp) < 0) return;
    if (limit == 0 || limit > API_MAX_LIMIT) {
        api_error(rp, 400, "limit must be between 1 and %d", API_MAX_LIMIT);
        return;
    }
    buf after = BUF_INIT;
    int has_after = api_query_get(rq->query, "after", &after);
    buf *b = &rp->body;
    buf_reset(b);
    buf_puts(b, "{\"streams\":[");
    list_ctx lc = {b, 0, "stream", BUF_INIT};
    if (store_list_streams(s, has_after ? after.ptr : NULL, has_after ? after.len : 0, limit,
                           list_cb, &lc, &err) != 0) {
        reply_tm_err(rp, &err);
    } else {
        buf_puts(b, "],\"next\":");
        if (lc.n == limit) {
            buf_printf(b, "\"/streams?limit=%llu&after=", (unsigned long long)limit);
            api_url_encode(b, lc.last.ptr, lc.last.len);
            buf_putc(b, '"');
        } else {
            buf_puts(b, "null");
        }
        buf_putc(b, '}');
        rp->status = 200;
    }
    buf_free(&lc.last);
    buf_free(&after);
}

void api_list_categories(store *s, const api_request *rq, api_reply *rp) {
    (void)rq;
    tm_err err;
    err_clear(&err);
    buf *b = &rp->body;
    buf_reset(b);
    buf_puts(b, "{\"categories\":[");
    list_ctx lc = {b, 0, "category", BUF_INIT};
    if (store_list_categories(s, list_cb, &lc, &err) != 0) {
        reply_tm_err(rp, &err);
    } else {
        buf_puts(b, "]}");
        rp->status = 200;
    }
    buf_free(&lc.last);
}

void api_health(store *s, api_reply *rp) {
    buf_reset(&rp->body);
    buf_printf(&rp->body, "{\"status\":\"ok\",\"last_position\":%llu}",
               (unsigned long long)store_last_position(s));
    rp->status = 200;
}
