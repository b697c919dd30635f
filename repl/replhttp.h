/* replhttp.h — a minimal HTTP/1.1 client for the REPL's remote mode.
 *
 * Plain TCP (http:// only), one connection per request, "Connection:
 * close".  Replies may use Content-Length, chunked encoding or EOF; the
 * body can be read whole (replhttp_request) or as it arrives
 * (replhttp_open + replhttp_read, or replhttp_sse_next for Server-Sent
 * Events).  A read can be interrupted: it polls and calls `cancel` (if
 * set) every 200 ms.  Replies are untrusted input (tests/fuzz/
 * fuzz_repl_remote.c).
 */
#ifndef TM_REPLHTTP_H
#define TM_REPLHTTP_H

#include <stddef.h>

#include "buf.h"
#include "err.h"

typedef struct replhttp replhttp;

/* Parse "http://host[:port][/prefix]": host and port into the caller's
 * arrays, the prefix (without trailing '/') into prefix.  0 / -1. */
int replhttp_parse_url(const char *url, char host[256], char port[16], char prefix[512],
                       tm_err *err);

/* Send a request to base_url + path.  content_type may be NULL (no body).
 * extra_headers: NULL or "Name: value\r\n..." lines.  Reads the status
 * line and headers; the body is then read with replhttp_read. */
replhttp *replhttp_open(const char *base_url, const char *method, const char *path,
                        const char *extra_headers, const char *content_type, const char *body,
                        size_t body_len, int (*cancel)(void), tm_err *err);
int replhttp_status(const replhttp *h);
/* Value of a reply header (case-insensitive name), or NULL. */
const char *replhttp_header(const replhttp *h, const char *name);
/* Append up to some body bytes to out: returns >0 bytes read, 0 at end,
 * -1 on error or cancel (err says which). */
long replhttp_read(replhttp *h, buf *out, tm_err *err);
void replhttp_close(replhttp *h);

/* One whole request: *status and the whole body into out. */
int replhttp_request(const char *base_url, const char *method, const char *path,
                     const char *content_type, const char *body, size_t body_len,
                     int (*cancel)(void), int *status, buf *out, tm_err *err);

/* Server-Sent Events over an open reply: the next message's data (its
 * "data:" lines joined with "\n"; other fields and comments are skipped)
 * into data (reset first).  1 a message, 0 the stream ended (a message
 * without its closing blank line is dropped), -1 error or cancel. */
int replhttp_sse_next(replhttp *h, buf *data, tm_err *err);

/* Tests and fuzzing: connect through fn instead of resolving the URL's
 * host (fn returns a connected stream socket, or -1 with err set); NULL
 * restores the default. */
typedef int (*replhttp_connect_fn)(const char *host, const char *port, tm_err *err);
void replhttp_set_connect(replhttp_connect_fn fn);

/* Percent-encode s for a URL path segment or query value into out. */
void replhttp_escape(buf *out, const char *s, size_t len);

#endif
