/* api.h — the HTTP API's request -> response logic, free of any transport.
 *
 * The HTTP module (http.c) parses the request line and headers, picks the
 * route, copies what a handler needs into an api_request and runs the
 * handler on a worker thread (handlers block on the store: appends wait
 * for the group commit).  A handler fills an api_reply: status, JSON body.
 * Every 4xx/5xx body is {"error":"...","code":N} (plus route-specific
 * fields, e.g. current_version on 409).
 *
 * Error mapping (tm_err code -> status), in one place (api_status_of):
 *   TM_EINVAL 400, TM_ENOTFOUND 404, TM_ECONFLICT 409, TM_EIO 503.
 */
#ifndef TM_API_H
#define TM_API_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"
#include "store.h"

typedef struct api_request {
    const char *method;            /* "GET", "POST", "PUT", "DELETE" */
    const char *path;              /* raw path, e.g. "/streams/order-1" */
    const char *query;             /* raw query string without '?', or NULL */
    const char *stream;            /* decoded {stream} of /streams/{stream}, or NULL */
    size_t stream_len;
    const char *content_type;      /* request Content-Type or NULL */
    const char *expected_version;  /* Expected-Version header or NULL */
    const char *body;              /* request body (owned by the caller) */
    size_t body_len;
} api_request;

typedef struct api_reply {
    int status;
    buf body;                      /* owned by the reply; api_reply_free */
    const char *content_type;      /* static string */
} api_reply;

void api_reply_init(api_reply *rp);
void api_reply_free(api_reply *rp);
/* Set an error reply: status and {"error":msg,"code":status}. */
void api_error(api_reply *rp, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int api_status_of(int tm_code);
/* Reason phrase for a status ("Not Found"). */
const char *api_reason(int status);

/* ---- append: POST /streams/{s} ----
 * api_append does it all and blocks until durable.  The non-blocking form
 * (for the event loop): api_append_parse (NULL: rp holds the 400), then
 * api_append_start (-1: refused at once, rp filled), the store calls fn on
 * its writer thread; hand op back to the loop, call api_append_result with
 * fn's rc/err (or from fn itself), then api_append_finish fills rp. */
typedef struct api_append_op api_append_op;
void api_append(store *s, const api_request *rq, api_reply *rp);
api_append_op *api_append_parse(const api_request *rq, api_reply *rp);
int api_append_start(store *s, api_append_op *op, store_append_fn fn, void *ud, api_reply *rp);
void api_append_result(api_append_op *op, int rc, const tm_err *err);
void api_append_finish(store *s, api_append_op *op, api_reply *rp);
void api_append_free(api_append_op *op);

/* ---- other routes (worker threads) ---- */
void api_read_stream(store *s, const api_request *rq, api_reply *rp); /* GET /streams/{s} */
void api_read_all(store *s, const api_request *rq, api_reply *rp);    /* GET /all */
void api_list_streams(store *s, const api_request *rq, api_reply *rp);/* GET /streams */
void api_list_categories(store *s, const api_request *rq, api_reply *rp); /* GET /categories */
void api_health(store *s, api_reply *rp);                             /* GET /health */

/* ---- query strings ---- */
/* Find `key` in a raw query string; on success the percent-decoded value
 * is appended to out (after a reset) and 1 is returned; 0 when absent. */
int api_query_get(const char *query, const char *key, buf *out);
/* Iterate every `key=value` pair: *pos starts at 0; returns 1 with the
 * decoded key and value in k and v, 0 at the end. */
int api_query_next(const char *query, size_t *pos, buf *k, buf *v);
/* Append s percent-encoded for a path segment or query value. */
void api_url_encode(buf *out, const char *s, size_t len);
/* Percent-decode [s, s+len) into out (reset first); -1 on a bad escape. */
int api_url_decode(buf *out, const char *s, size_t len, int plus_is_space);

#endif
