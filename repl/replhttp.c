/* replhttp.c — minimal HTTP/1.1 client (see replhttp.h).
 *
 * Owns one socket per request and the framing of Server-Sent Events.
 * Invariants: the header block is bounded (64 KiB), so are an SSE line
 * and a message's data (SSE_MAX), chunk sizes are parsed strictly, and
 * every blocking wait goes through poll() with a 200 ms tick so a cancel
 * callback (Ctrl-C) is honoured promptly.  Nothing here knows the
 * tidemark API.
 */
#define _GNU_SOURCE
#include "replhttp.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

struct replhttp {
    int fd;
    int status;
    buf head;          /* header block, NUL-terminated lines */
    buf in;            /* raw bytes read but not yet consumed */
    size_t in_off;
    int chunked;
    long long remaining; /* content-length left, or bytes left in chunk; -1 = until EOF */
    int done, eof;
    int (*cancel)(void);
    buf sse;           /* SSE: body bytes not yet split into lines */
    size_t sse_off;
};

int replhttp_parse_url(const char *url, char host[256], char port[16], char prefix[512],
                       tm_err *err) {
    if (strncmp(url, "http://", 7))
        return err_set(err, TM_EINVAL, "--url must start with http:// (got '%s')", url);
    const char *h = url + 7, *slash = strchr(h, '/');
    size_t hl = slash ? (size_t)(slash - h) : strlen(h);
    const char *colon = memchr(h, ':', hl);
    size_t namel = colon ? (size_t)(colon - h) : hl;
    if (namel == 0 || namel >= 256) return err_set(err, TM_EINVAL, "bad host in URL '%s'", url);
    memcpy(host, h, namel);
    host[namel] = 0;
    if (colon) {
        size_t pl = hl - namel - 1;
        if (pl == 0 || pl >= 16) return err_set(err, TM_EINVAL, "bad port in URL '%s'", url);
        memcpy(port, colon + 1, pl);
        port[pl] = 0;
    } else {
        strcpy(port, "80");
    }
    prefix[0] = 0;
    if (slash) {
        size_t pl = strlen(slash);
        while (pl && slash[pl - 1] == '/') pl--;
        if (pl >= 512) return err_set(err, TM_EINVAL, "URL path too long");
        memcpy(prefix, slash, pl);
        prefix[pl] = 0;
    }
    return 0;
}

static int wait_fd(replhttp *h, int fd, short ev, tm_err *err) {
    for (;;) {
        if (h && h->cancel && h->cancel()) return err_set(err, TM_EIO, "interrupted");
        struct pollfd p = {fd, ev, 0};
        int r = poll(&p, 1, 200);
        if (r > 0) return 0;
        if (r < 0 && errno != EINTR) return err_set(err, TM_EIO, "poll: %s", strerror(errno));
    }
}

static int connect_to(const char *host, const char *port, tm_err *err);
static replhttp_connect_fn g_connect = connect_to;

void replhttp_set_connect(replhttp_connect_fn fn) { g_connect = fn ? fn : connect_to; }

static int connect_to(const char *host, const char *port, tm_err *err) {
    struct addrinfo hints = {0}, *res, *a;
    hints.ai_socktype = SOCK_STREAM;
    int r = getaddrinfo(host, port, &hints, &res);
    if (r) return err_set(err, TM_EIO, "cannot resolve %s: %s", host, gai_strerror(r));
    int fd = -1, saved = 0;
    for (a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
        saved = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        err_set(err, TM_EIO, "cannot connect to %s:%s: %s", host, port,
                strerror(saved ? saved : ECONNREFUSED));
    return fd;
}

static int send_all(replhttp *h, const char *p, size_t n, tm_err *err) {
    while (n) {
        ssize_t w = send(h->fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return err_set(err, TM_EIO, "sending request: %s", strerror(errno));
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read more raw bytes into h->in; 1 read, 0 EOF, -1 error. */
static int fill(replhttp *h, tm_err *err) {
    if (h->in_off && h->in_off == h->in.len) {
        buf_reset(&h->in);
        h->in_off = 0;
    }
    if (wait_fd(h, h->fd, POLLIN, err) < 0) return -1;
    buf_reserve(&h->in, 65536);
    ssize_t r;
    do r = recv(h->fd, h->in.ptr + h->in.len, 65536, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0) return err_set(err, TM_EIO, "reading reply: %s", strerror(errno));
    if (r == 0) return 0;
    h->in.len += (size_t)r;
    h->in.ptr[h->in.len] = 0;
    return 1;
}

/* A line (without CRLF) from h->in into line; -1 on EOF/error/too long. */
static int read_line(replhttp *h, buf *line, tm_err *err) {
    buf_reset(line);
    for (;;) {
        char *s = h->in.ptr ? h->in.ptr + h->in_off : NULL;
        size_t avail = h->in.len - h->in_off;
        char *nl = s ? memchr(s, '\n', avail) : NULL;
        if (nl) {
            size_t n = (size_t)(nl - s);
            buf_append(line, s, n && s[n - 1] == '\r' ? n - 1 : n);
            h->in_off += n + 1;
            return 0;
        }
        if (avail > 65536) return err_set(err, TM_EIO, "reply header line too long");
        int r = fill(h, err);
        if (r <= 0) return r == 0 ? err_set(err, TM_EIO, "connection closed early") : -1;
    }
}

replhttp *replhttp_open(const char *base_url, const char *method, const char *path,
                        const char *extra_headers, const char *content_type, const char *body,
                        size_t body_len, int (*cancel)(void), tm_err *err) {
    char host[256], port[16], prefix[512];
    if (replhttp_parse_url(base_url, host, port, prefix, err) < 0) return NULL;
    replhttp *h = calloc(1, sizeof *h);
    h->cancel = cancel;
    h->fd = g_connect(host, port, err);
    if (h->fd < 0) return free(h), NULL;
    buf req = BUF_INIT;
    buf_printf(&req, "%s %s%s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n"
               "Accept: application/json\r\nUser-Agent: tidemark-repl\r\n",
               method, prefix, path, host, port);
    if (extra_headers) buf_puts(&req, extra_headers);
    if (content_type || body_len)
        buf_printf(&req, "Content-Type: %s\r\nContent-Length: %zu\r\n",
                   content_type ? content_type : "application/json", body_len);
    buf_puts(&req, "\r\n");
    int r = send_all(h, req.ptr, req.len, err);
    if (r == 0 && body_len) r = send_all(h, body, body_len, err);
    buf_free(&req);
    buf line = BUF_INIT;
    if (r == 0) r = read_line(h, &line, err);
    if (r == 0) {
        if (sscanf(line.ptr ? line.ptr : "", "HTTP/1.%*d %d", &h->status) != 1)
            r = err_set(err, TM_EIO, "bad reply from %s: '%.80s'", base_url, line.ptr ? line.ptr : "");
    }
    h->remaining = -1;
    while (r == 0) {
        r = read_line(h, &line, err);
        if (r < 0 || line.len == 0) break;
        if (h->head.len > 65536) {
            r = err_set(err, TM_EIO, "reply headers too large");
            break;
        }
        buf_append(&h->head, line.ptr, line.len + 1); /* keep the NUL */
    }
    buf_free(&line);
    if (r < 0) return replhttp_close(h), NULL;
    const char *te = replhttp_header(h, "Transfer-Encoding");
    const char *cl = replhttp_header(h, "Content-Length");
    if (te && strcasestr(te, "chunked")) h->chunked = 1, h->remaining = 0;
    else if (cl) h->remaining = strtoll(cl, NULL, 10);
    if (!strcmp(method, "HEAD") || h->status == 204 || h->status == 304) h->done = 1;
    if (!h->chunked && h->remaining == 0) h->done = 1;
    return h;
}

int replhttp_status(const replhttp *h) { return h->status; }

const char *replhttp_header(const replhttp *h, const char *name) {
    size_t nl = strlen(name);
    for (size_t off = 0; off < h->head.len;) {
        const char *l = h->head.ptr + off;
        size_t ll = strlen(l);
        if (ll > nl && l[nl] == ':' && !strncasecmp(l, name, nl)) {
            const char *v = l + nl + 1;
            while (*v == ' ' || *v == '\t') v++;
            return v;
        }
        off += ll + 1;
    }
    return NULL;
}

/* Move up to `max` buffered body bytes to out. */
static size_t take(replhttp *h, buf *out, size_t max) {
    size_t avail = h->in.len - h->in_off;
    if (avail > max) avail = max;
    buf_append(out, h->in.ptr + h->in_off, avail);
    h->in_off += avail;
    return avail;
}

long replhttp_read(replhttp *h, buf *out, tm_err *err) {
    buf line = BUF_INIT;
    long got = 0;
    while (!h->done && got == 0) {
        if (h->chunked && h->remaining == 0) {
            if (read_line(h, &line, err) < 0) goto fail;
            if (line.len == 0) continue; /* CRLF after a chunk */
            char *end;
            long long n = strtoll(line.ptr, &end, 16);
            if (end == line.ptr || n < 0) {
                err_set(err, TM_EIO, "bad chunk size in reply");
                goto fail;
            }
            if (n == 0) {
                h->done = 1;
                break;
            }
            h->remaining = n;
            continue;
        }
        if (h->in_off == h->in.len) {
            int r = fill(h, err);
            if (r < 0) goto fail;
            if (r == 0) {
                if (h->remaining > 0 || h->chunked) {
                    err_set(err, TM_EIO, "connection closed in the middle of a reply");
                    goto fail;
                }
                h->done = 1;
                break;
            }
        }
        size_t max = h->remaining >= 0 ? (size_t)h->remaining : (size_t)-1;
        size_t n = take(h, out, max);
        if (h->remaining >= 0) {
            h->remaining -= (long long)n;
            if (!h->chunked && h->remaining == 0) h->done = 1;
        }
        got = (long)n;
    }
    buf_free(&line);
    return got;
fail:
    buf_free(&line);
    return -1;
}

/* A line or a message's data beyond this is refused (an event is at most
 * 1 MiB of msgpack; its JSON is a few times that). */
#define SSE_MAX ((size_t)32 << 20)

int replhttp_sse_next(replhttp *h, buf *data, tm_err *err) {
    buf_reset(data);
    for (;;) {
        char *s = h->sse.ptr ? h->sse.ptr + h->sse_off : NULL;
        char *nl = s ? memchr(s, '\n', h->sse.len - h->sse_off) : NULL;
        if (!nl) {
            if (h->sse_off) { /* keep only the partial line */
                memmove(h->sse.ptr, h->sse.ptr + h->sse_off, h->sse.len - h->sse_off);
                h->sse.len -= h->sse_off;
                h->sse_off = 0;
            }
            if (h->sse.len > SSE_MAX)
                return err_set(err, TM_EIO, "server-sent event line too long");
            long got = replhttp_read(h, &h->sse, err);
            if (got < 0) return -1;
            if (got == 0) return 0;
            continue;
        }
        size_t ll = (size_t)(nl - s);
        h->sse_off += ll + 1;
        if (ll && s[ll - 1] == '\r') ll--;
        if (ll == 0) { /* end of a message */
            if (data->len) return 1;
        } else if (ll >= 5 && !memcmp(s, "data:", 5)) {
            size_t skip = ll > 5 && s[5] == ' ' ? 6 : 5;
            if (data->len) buf_putc(data, '\n');
            buf_append(data, s + skip, ll - skip);
            if (data->len > SSE_MAX) return err_set(err, TM_EIO, "server-sent event too large");
        }
    }
}

void replhttp_close(replhttp *h) {
    if (!h) return;
    if (h->fd >= 0) close(h->fd);
    buf_free(&h->head);
    buf_free(&h->in);
    buf_free(&h->sse);
    free(h);
}

/* A whole reply (a page of events, a read model) is held in memory: a
 * server that sends more than this is refused, not followed until memory
 * runs out.  A state of 1M partitions is ~40 MB of JSON. */
#define REPLY_MAX (1 << 30)

int replhttp_request(const char *base_url, const char *method, const char *path,
                     const char *content_type, const char *body, size_t body_len,
                     int (*cancel)(void), int *status, buf *out, tm_err *err) {
    replhttp *h = replhttp_open(base_url, method, path, NULL, content_type, body, body_len,
                                cancel, err);
    if (!h) return -1;
    long r = 0;
    size_t len0 = out->len;
    if (h->remaining > (long long)REPLY_MAX)
        r = err_set(err, TM_EIO, "the reply from %s would be %lld bytes, more than the %d MiB "
                    "a reply may have; refused", base_url, h->remaining, REPLY_MAX >> 20);
    else
        while ((r = replhttp_read(h, out, err)) > 0)
            if (out->len - len0 > REPLY_MAX) {
                r = err_set(err, TM_EIO, "the reply from %s is more than the %d MiB a reply "
                            "may have; refused", base_url, REPLY_MAX >> 20);
                break;
            }
    *status = h->status;
    replhttp_close(h);
    return r < 0 ? -1 : 0;
}

void replhttp_escape(buf *out, const char *s, size_t len) {
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '_' || c == '.' || c == '~') {
            buf_putc(out, (char)c);
        } else {
            buf_putc(out, '%');
            buf_putc(out, hex[c >> 4]);
            buf_putc(out, hex[c & 15]);
        }
    }
}
