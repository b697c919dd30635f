/* sse_latency.c — append-to-SSE delivery latency (issue #4c).
 *
 *   sse_latency PORT CLIENTS RATE SECONDS APPENDERS [NAME]
 *
 * CLIENTS raw SSE clients read GET /all/live on one epoll thread while
 * APPENDERS threads POST events (one per request, each thread with one
 * request in flight, paced to RATE events/s in total) for SECONDS.  Each
 * event carries its send time (CLOCK_REALTIME ns, data.t); a client
 * receiving it records receive time - send time, i.e. what a dashboard
 * sees: the append's group commit (fsync in the default durable mode),
 * the commit notification and the fan-out.  The first 0.5 s is skipped;
 * clients keep reading 1 s after the appenders stop, then every client
 * must have received every appended event (else the run fails: a lost or
 * late message is not a latency).  The POST round trip (the append's own
 * latency, acknowledgment after the sync) is reported for comparison.
 *
 * Prints: BENCH name=NAME events=<appended> seconds=.. rate=<appended/s>
 *         messages=.. expected=.. p50_ms=.. p99_ms=.. p999_ms=.. max_ms=..
 *         post_p50_ms=.. post_p99_ms=..
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int port, napp;
static double rate, secs;
static volatile int stop;
static long long t_warm, t_end;
static long sent;

typedef struct lat {
    long long *v;
    long n, cap;
} lat;

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void lat_add(lat *l, long long v)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 65536;
        l->v = realloc(l->v, l->cap * sizeof *l->v);
        if (!l->v) {
            fprintf(stderr, "sse_latency: out of memory\n");
            exit(1);
        }
    }
    l->v[l->n++] = v;
}

static int cmp_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

static double pct(lat *l, double p)
{
    if (!l->n)
        return 0;
    long i = (long)(l->n * p);
    if (i >= l->n)
        i = l->n - 1;
    return l->v[i] / 1e6;
}

static int dial(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (connect(fd, (void *)&a, sizeof a)) {
        perror("sse_latency: connect");
        exit(1);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

typedef struct appender {
    pthread_t t;
    long id;
    lat post;
    int failed;
} appender;

static void *append_main(void *arg)
{
    appender *ap = arg;
    int fd = dial();
    char req[1024], body[256], buf[4096];
    long long interval = (long long)(napp / rate * 1e9);
    long long next = now_ns() + (long long)(ap->id * interval / napp);
    while (!stop) {
        long long t = now_ns();
        if (t < next) {
            struct timespec d = {0, next - t};
            nanosleep(&d, 0);
            continue;
        }
        next += interval;
        long long ts = now_ns();
        int bl = snprintf(body, sizeof body, "{\"type\":\"Tick\",\"data\":{\"t\":%lld,\"a\":%ld}}",
                          ts, ap->id);
        int rl = snprintf(req, sizeof req,
                          "POST /streams/lat-%ld HTTP/1.1\r\nHost: x\r\n"
                          "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                          ap->id, bl, body);
        if (write(fd, req, rl) != rl) {
            ap->failed = 1;
            break;
        }
        int got = 0;
        for (;;) {
            int r = read(fd, buf + got, sizeof buf - got - 1);
            if (r <= 0) {
                ap->failed = 1;
                goto out;
            }
            got += r;
            buf[got] = 0;
            char *e = strstr(buf, "\r\n\r\n");
            if (e) {
                char *cl = strcasestr(buf, "Content-Length:");
                int L = cl ? atoi(cl + 15) : 0;
                if (got >= (e - buf) + 4 + L)
                    break;
            }
        }
        if (buf[9] != '2') {
            fprintf(stderr, "sse_latency: append answered %.12s\n", buf);
            ap->failed = 1;
            break;
        }
        long long done = now_ns();
        if (ts > t_warm && ts < t_end)
            lat_add(&ap->post, done - ts);
        __sync_fetch_and_add(&sent, 1);
    }
out:
    close(fd);
    return 0;
}

typedef struct client {
    int fd;
    char *buf;
    int len;
} client;

int main(int argc, char **argv)
{
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: sse_latency PORT CLIENTS RATE SECONDS APPENDERS [NAME]\n");
        return 1;
    }
    port = atoi(argv[1]);
    int nc = atoi(argv[2]);
    rate = atof(argv[3]);
    secs = atof(argv[4]);
    napp = atoi(argv[5]);
    const char *name = argc == 7 ? argv[6] : "sse_latency";
    if (port <= 0 || nc <= 0 || rate <= 0 || secs <= 0 || napp <= 0 || napp > 1024) {
        fprintf(stderr, "sse_latency: bad arguments\n");
        return 1;
    }
    enum { CAP = 1 << 20 };
    int ep = epoll_create1(0);
    client *cs = calloc(nc, sizeof *cs);
    for (int i = 0; i < nc; i++) {
        cs[i].fd = dial();
        const char *r = "GET /all/live HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n";
        if (write(cs[i].fd, r, strlen(r)) < 0) {
            perror("sse_latency: write");
            return 1;
        }
        fcntl(cs[i].fd, F_SETFL, O_NONBLOCK);
        cs[i].buf = malloc(CAP);
        struct epoll_event e = {EPOLLIN, {.u32 = (uint32_t)i}};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &e);
    }
    usleep(300000); /* the subscriptions are in place */
    long long t0 = now_ns();
    t_warm = t0 + 500000000LL;
    t_end = t0 + (long long)(secs * 1e9);
    appender *aps = calloc(napp, sizeof *aps);
    for (long i = 0; i < napp; i++) {
        aps[i].id = i;
        pthread_create(&aps[i].t, 0, append_main, &aps[i]);
    }
    lat l = {0};
    long total = 0;
    struct epoll_event evs[256];
    for (;;) {
        long long tn = now_ns();
        if (tn > t_end)
            stop = 1;
        if (tn > t_end + 1000000000LL)
            break;
        int n = epoll_wait(ep, evs, 256, 50);
        for (int k = 0; k < n; k++) {
            client *x = &cs[evs[k].data.u32];
            int r = read(x->fd, x->buf + x->len, CAP - x->len - 1);
            if (r <= 0)
                continue;
            long long rt = now_ns();
            x->len += r;
            x->buf[x->len] = 0;
            char *p = x->buf, *nl;
            while ((nl = memchr(p, '\n', x->buf + x->len - p))) {
                if (!strncmp(p, "data:", 5)) {
                    char *tt = memmem(p, nl - p, "\"t\":", 4);
                    if (tt) {
                        long long ts = atoll(tt + 4);
                        total++;
                        if (ts > t_warm && ts < t_end)
                            lat_add(&l, rt - ts);
                    }
                }
                p = nl + 1;
            }
            memmove(x->buf, p, x->buf + x->len - p);
            x->len = (int)(x->buf + x->len - p);
        }
    }
    int failed = 0;
    lat post = {0};
    for (int i = 0; i < napp; i++) {
        pthread_join(aps[i].t, 0);
        failed |= aps[i].failed;
        for (long j = 0; j < aps[i].post.n; j++)
            lat_add(&post, aps[i].post.v[j]);
    }
    if (failed) {
        fprintf(stderr, "sse_latency: an appender failed\n");
        return 1;
    }
    qsort(l.v, l.n, sizeof *l.v, cmp_ll);
    qsort(post.v, post.n, sizeof *post.v, cmp_ll);
    printf("BENCH name=%s events=%ld seconds=%.3f rate=%.0f clients=%d messages=%ld expected=%ld "
           "p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f post_p50_ms=%.3f post_p99_ms=%.3f\n",
           name, sent, secs, sent / secs, nc, total, sent * (long)nc, pct(&l, 0.5), pct(&l, 0.99),
           pct(&l, 0.999), l.n ? l.v[l.n - 1] / 1e6 : 0, pct(&post, 0.5), pct(&post, 0.99));
    return 0;
}
