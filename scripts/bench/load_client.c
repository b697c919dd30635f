/* load_client.c — closed-loop request load for the server benchmarks
 * (issue #4): the same client drives tidemark over HTTP and its Redis peer
 * over RESP, so the two sides differ only in the server.
 *
 *   load_client MODE PORT CONNS SECONDS [KEYS [NAME]]
 *
 * MODE
 *   http-append  POST /streams/order-<c> {"type":"OrderPlaced","data":{...}}
 *                (one event per request; 2xx expected)
 *   redis-xadd   XADD order-<c> * type OrderPlaced data <the same JSON>
 *   http-get     GET /projections/customers/state?partition=cust-<k>  (200)
 *   redis-hget   HGET customers cust-<k>                     (a value, not nil)
 * With LOAD_PATH=/some/path in the environment, http-get asks for that
 * path instead (e.g. /health: the server's HTTP floor, for profiling).
 * where c is the connection number and k is uniform in [0, KEYS) (default
 * 5000).  One thread, epoll, CONNS connections on 127.0.0.1:PORT, each
 * with exactly one request in flight (like redis-benchmark -c CONNS
 * without pipelining).  The first 0.5 s is a warm-up; requests completed
 * in the next SECONDS are counted.  A request whose answer is not the
 * expected kind counts as bad; the runner refuses a side with bad answers.
 *
 * Prints: BENCH name=NAME events=<requests> seconds=.. rate=.. bad=.. p50_ms=.. p99_ms=..
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { HTTP_APPEND, REDIS_XADD, HTTP_GET, REDIS_HGET };

typedef struct conn {
    int fd, id;
    char in[16384];
    int got;
    char out[1024];
    int olen, osent;
    long n;
    double sent_at;
} conn;

static int mode, nkeys = 5000;
static unsigned long long rng = 88172645463325252ull;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int next_key(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (int)(rng % (unsigned long long)nkeys);
}

static void die(const char *m)
{
    fprintf(stderr, "load_client: %s: %s\n", m, strerror(errno));
    exit(1);
}

static void build(conn *c)
{
    char body[256], key[64];
    int bl;
    switch (mode) {
    case HTTP_APPEND:
    case REDIS_XADD:
        bl = snprintf(body, sizeof body,
                      "{\"type\":\"OrderPlaced\",\"data\":{\"customer\":\"cust-%d\",\"amount\":%ld.5}}",
                      c->id, c->n % 100);
        if (mode == HTTP_APPEND)
            c->olen = snprintf(c->out, sizeof c->out,
                               "POST /streams/order-%d HTTP/1.1\r\nHost: x\r\n"
                               "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                               c->id, bl, body);
        else {
            /* the same event as stream entry fields: type, data */
            char stream[32];
            int sl = snprintf(stream, sizeof stream, "order-%d", c->id);
            c->olen = snprintf(c->out, sizeof c->out,
                               "*7\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n*\r\n$4\r\ntype\r\n"
                               "$11\r\nOrderPlaced\r\n$4\r\ndata\r\n$%d\r\n%s\r\n",
                               sl, stream, bl, body);
        }
        break;
    case HTTP_GET: {
        /* LOAD_PATH (e.g. /health) replaces the lookup: the HTTP floor */
        const char *lp = getenv("LOAD_PATH");
        if (lp)
            c->olen = snprintf(c->out, sizeof c->out, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", lp);
        else
            c->olen = snprintf(c->out, sizeof c->out,
                               "GET /projections/customers/state?partition=cust-%d HTTP/1.1\r\n"
                               "Host: x\r\n\r\n", next_key());
        break;
    }
    case REDIS_HGET: {
        int kl = snprintf(key, sizeof key, "cust-%d", next_key());
        c->olen = snprintf(c->out, sizeof c->out,
                           "*3\r\n$4\r\nHGET\r\n$9\r\ncustomers\r\n$%d\r\n%s\r\n", kl, key);
        break;
    }
    }
    c->osent = 0;
}

static int flush_out(conn *c)
{
    while (c->osent < c->olen) {
        ssize_t w = write(c->fd, c->out + c->osent, c->olen - c->osent);
        if (w < 0) {
            if (errno == EAGAIN)
                return 0;
            return -1;
        }
        c->osent += (int)w;
    }
    return 0;
}

/* Length of one complete answer at the start of c->in, 0 if incomplete;
 * *ok says whether it is the expected kind. */
static int answer_len(conn *c, int *ok)
{
    char *b = c->in;
    if (mode == HTTP_APPEND || mode == HTTP_GET) {
        char *e = memmem(b, c->got, "\r\n\r\n", 4);
        if (!e)
            return 0;
        int hl = (int)(e - b) + 4;
        char save = *e;
        *e = 0;
        char *cl = strcasestr(b, "\r\nContent-Length:");
        int chunked = strcasestr(b, "\r\nTransfer-Encoding: chunked") != NULL;
        *e = save;
        int total;
        if (chunked) {
            char *z = memmem(b + hl, c->got - hl, "\r\n0\r\n\r\n", 7);
            if (!z)
                return 0;
            total = (int)(z - b) + 7;
        } else {
            total = hl + (cl ? atoi(cl + 17) : 0);
        }
        if (c->got < total)
            return 0;
        *ok = mode == HTTP_APPEND ? (b[9] == '2') : !strncmp(b + 9, "200", 3);
        return total;
    }
    char *nl = memmem(b, c->got, "\r\n", 2);
    if (!nl)
        return 0;
    int line = (int)(nl - b) + 2;
    if (b[0] == '$') {
        long n = atol(b + 1);
        if (n < 0) {
            *ok = 0;
            return line;
        }
        if (c->got < line + n + 2)
            return 0;
        *ok = 1;
        return line + (int)n + 2;
    }
    *ok = 0; /* -ERR, or a kind neither command answers */
    return line;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc < 5 || argc > 7) {
        fprintf(stderr, "usage: load_client http-append|redis-xadd|http-get|redis-hget "
                        "PORT CONNS SECONDS [KEYS [NAME]]\n");
        return 1;
    }
    const char *m = argv[1];
    if (!strcmp(m, "http-append")) mode = HTTP_APPEND;
    else if (!strcmp(m, "redis-xadd")) mode = REDIS_XADD;
    else if (!strcmp(m, "http-get")) mode = HTTP_GET;
    else if (!strcmp(m, "redis-hget")) mode = REDIS_HGET;
    else {
        fprintf(stderr, "load_client: unknown mode %s\n", m);
        return 1;
    }
    int port = atoi(argv[2]), nc = atoi(argv[3]);
    double secs = atof(argv[4]), warm = 0.5;
    if (argc >= 6)
        nkeys = atoi(argv[5]);
    const char *name = argc >= 7 ? argv[6] : m;
    if (port <= 0 || nc <= 0 || secs <= 0 || nkeys <= 0) {
        fprintf(stderr, "load_client: bad arguments\n");
        return 1;
    }
    int ep = epoll_create1(0);
    conn *cs = calloc(nc, sizeof *cs);
    for (int i = 0; i < nc; i++) {
        cs[i].id = i;
        cs[i].fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_port = htons(port);
        a.sin_addr.s_addr = htonl(0x7f000001);
        if (connect(cs[i].fd, (void *)&a, sizeof a) != 0)
            die("connect");
        int one = 1;
        setsockopt(cs[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(cs[i].fd, F_SETFL, O_NONBLOCK);
        struct epoll_event e = {EPOLLIN, {.u32 = (uint32_t)i}};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &e);
    }
    size_t cap = 1 << 20, nlat = 0;
    double *lat = malloc(cap * sizeof *lat);
    double t0 = now(), tw = t0 + warm, tend = tw + secs;
    for (int i = 0; i < nc; i++) {
        build(&cs[i]);
        cs[i].sent_at = t0;
        if (flush_out(&cs[i]) < 0)
            die("write");
    }
    long total = 0, bad = 0;
    struct epoll_event evs[256];
    for (;;) {
        double t = now();
        if (t >= tend)
            break;
        int n = epoll_wait(ep, evs, 256, 50);
        for (int k = 0; k < n; k++) {
            conn *c = &cs[evs[k].data.u32];
            ssize_t r = read(c->fd, c->in + c->got, sizeof c->in - c->got - 1);
            if (r == 0) {
                fprintf(stderr, "load_client: server closed a connection\n");
                return 1;
            }
            if (r < 0) {
                if (errno == EAGAIN)
                    continue;
                die("read");
            }
            c->got += (int)r;
            int ok, len;
            double tr = now();
            while ((len = answer_len(c, &ok)) > 0) {
                if (c->sent_at >= tw && tr < tend) {
                    total++;
                    bad += !ok;
                    if (nlat == cap) {
                        cap *= 2;
                        lat = realloc(lat, cap * sizeof *lat);
                    }
                    lat[nlat++] = tr - c->sent_at;
                }
                memmove(c->in, c->in + len, c->got - len);
                c->got -= len;
                c->n++;
                build(c);
                c->sent_at = tr;
                if (flush_out(c) < 0)
                    die("write");
            }
            if (c->got >= (int)sizeof c->in - 1) {
                fprintf(stderr, "load_client: answer too large\n");
                return 1;
            }
        }
    }
    qsort(lat, nlat, sizeof *lat, cmp_d);
    double p50 = nlat ? lat[nlat / 2] * 1e3 : 0, p99 = nlat ? lat[nlat * 99 / 100] * 1e3 : 0;
    printf("BENCH name=%s events=%ld seconds=%.3f rate=%.0f bad=%ld conns=%d p50_ms=%.3f "
           "p99_ms=%.3f\n", name, total, secs, total / secs, bad, nc, p50, p99);
    return 0;
}
