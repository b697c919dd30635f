/* proj_lag.c — continuous-projection lag: the time from an append's
 * acknowledgement to the projection's state reflecting it.
 *
 *   build/bench/proj_lag PORT [RATE [SECONDS [APPENDERS [BATCH [WHAT]]]]]
 *   (defaults: 20000 events/s, 5 s, 4 appenders, 10 events per request,
 *   WHAT = state)
 *
 * Installs the projection `lagcount` (PUT: counts the events of category
 * "lag"), then A appender threads POST batches of BATCH events to streams
 * lag-<i> at RATE events/s in total, recording (last position, ack time) of
 * every request.  A poller thread reads, in a loop, what a client of the
 * read model would read, and records when each position was first seen:
 *   state   (default) GET /projections/lagcount/state, the live read model:
 *           it covers position base + n (n = the count it holds; every event
 *           after `base` is one of ours, which the end checks).  "Reflects"
 *           means exactly this: a state read returns the event's effect.
 *   status  GET /projections/lagcount, its "position": the server reports a
 *           position only once the state covering it is applied (visible to
 *           state reads); the stored checkpoint ("checkpoint") follows within
 *           the projection's checkpoint_ms (default 100 ms) — a crash in
 *           between only re-processes events (DESIGN.md: state and checkpoint
 *           are one atomic write).
 * Lag of a request = first time the position seen was >= the request's last
 * position, minus the ack time (0 if it was seen before the ack arrived).
 * The first 0.5 s are skipped.  At the end the state is checked: count ==
 * events appended, and the status position == base + count.
 * Prints one line "BENCH name=proj_lag ... p50_ms= p99_ms= limit_ms=5 ratio=".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int port, napp, batch, by_state = 1;
static long long base;
static double rate, secs;
static volatile int stop;

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (connect(fd, (void *)&a, sizeof a)) {
        perror("connect");
        exit(1);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* One request on a keep-alive connection; the body (NUL-terminated) in out. */
static int request(int fd, const char *method, const char *path, const char *body, char *out,
                   size_t outsz) {
    static __thread char req[1 << 16];
    int bl = body ? (int)strlen(body) : 0;
    int rl = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s",
                      method, path, bl, body ? body : "");
    if (write(fd, req, rl) != rl) return -1;
    size_t got = 0;
    for (;;) {
        ssize_t r = read(fd, out + got, outsz - got - 1);
        if (r <= 0) return -1;
        got += (size_t)r;
        out[got] = 0;
        char *e = strstr(out, "\r\n\r\n");
        if (!e) continue;
        char *cl = strcasestr(out, "Content-Length:");
        size_t L = cl ? (size_t)atol(cl + 15) : 0;
        if (got >= (size_t)(e - out) + 4 + L) {
            int status = atoi(out + 9);
            memmove(out, e + 4, L);
            out[L] = 0;
            return status;
        }
    }
}

typedef struct ack {
    long long pos, t;
} ack;
static ack *acks;
static long nacks, capacks;
static long sent;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void *appender(void *arg) {
    long id = (long)arg;
    int fd = conn();
    char path[64], out[65536];
    char *body = malloc((size_t)batch * 64 + 16);
    snprintf(path, sizeof path, "/streams/lag-%ld", id);
    double interval = (double)napp * batch / rate;
    long long next = now_ns();
    while (!stop) {
        long long t = now_ns();
        if (t < next) {
            struct timespec d = {0, next - t};
            nanosleep(&d, 0);
            continue;
        }
        next += (long long)(interval * 1e9);
        char *p = body;
        *p++ = '[';
        for (int i = 0; i < batch; i++)
            p += sprintf(p, "%s{\"type\":\"Tick\",\"data\":{\"a\":%ld}}", i ? "," : "", id);
        *p++ = ']';
        *p = 0;
        if (request(fd, "POST", path, body, out, sizeof out) != 201) {
            fprintf(stderr, "append failed: %s\n", out);
            break;
        }
        long long ta = now_ns();
        /* {"positions":[a,...,z],...}: the last one */
        char *ps = strstr(out, "\"positions\":[");
        char *end = ps ? strchr(ps, ']') : NULL;
        if (!end) break;
        char *q = end;
        while (q > ps && q[-1] != '[' && q[-1] != ',') q--;
        long long pos = atoll(q);
        pthread_mutex_lock(&mu);
        if (nacks < capacks) acks[nacks++] = (ack){pos, ta};
        sent += batch;
        pthread_mutex_unlock(&mu);
    }
    close(fd);
    free(body);
    return 0;
}

typedef struct seen {
    long long pos, t;
} seen;
static seen *seens;
static long nseen, capseen;
static long long *reads; /* duration of each poll request (ns) */
static long nreads, capreads;

static long long status_position(int fd, char *out, size_t n) {
    if (request(fd, "GET", "/projections/lagcount", NULL, out, n) != 200) return -1;
    char *p = strstr(out, "\"position\":");
    return p ? atoll(p + 11) : -1;
}

/* The position the live state covers: base + its count. */
static long long state_position(int fd, char *out, size_t n) {
    if (request(fd, "GET", "/projections/lagcount/state", NULL, out, n) != 200) return -1;
    char *p = strstr(out, "\"n\":");
    return p ? base + atoll(p + 4) : -1;
}

static long long seen_position(int fd, char *out, size_t n) {
    return by_state ? state_position(fd, out, n) : status_position(fd, out, n);
}

static void *poller(void *arg) {
    (void)arg;
    int fd = conn();
    char out[65536];
    long long lastp = -1;
    while (!stop) {
        long long t0 = now_ns();
        long long p = seen_position(fd, out, sizeof out);
        long long t = now_ns();
        if (nreads < capreads) reads[nreads++] = t - t0;
        if (p > lastp && nseen < capseen) {
            seens[nseen++] = (seen){p, t};
            lastp = p;
        }
    }
    /* let the projection catch up the tail */
    for (int i = 0; i < 2000; i++) {
        long long p = seen_position(fd, out, sizeof out);
        if (p > lastp && nseen < capseen) {
            seens[nseen++] = (seen){p, now_ns()};
            lastp = p;
        }
        usleep(1000);
    }
    close(fd);
    return 0;
}

static int cmp_ll(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: proj_lag PORT [RATE [SECONDS [APPENDERS [BATCH [state|status]]]]]\n");
        return 1;
    }
    if (argc > 6) {
        if (!strcmp(argv[6], "status")) by_state = 0;
        else if (strcmp(argv[6], "state")) {
            fprintf(stderr, "proj_lag: WHAT must be state or status\n");
            return 1;
        }
    }
    port = atoi(argv[1]);
    rate = argc > 2 ? atof(argv[2]) : 20000;
    secs = argc > 3 ? atof(argv[3]) : 5;
    napp = argc > 4 ? atoi(argv[4]) : 4;
    batch = argc > 5 ? atoi(argv[5]) : 10;
    char out[65536];
    int fd = conn();
    const char *src =
        "return { from = { category = \"lag\" }, init = function() return { n = 0 } end,\n"
        "  on = { Tick = function(s, e) s.n = s.n + 1 end } }\n";
    int st = request(fd, "PUT", "/projections/lagcount", src, out, sizeof out);
    if (st != 200 && st != 201) {
        fprintf(stderr, "PUT lagcount: %d %s\n", st, out);
        return 1;
    }
    request(fd, "POST", "/projections/lagcount/reset", "", out, sizeof out);
    /* wait for the reset's rebuild: position = the store's last */
    for (int i = 0; i < 5000; i++) {
        request(fd, "GET", "/projections/lagcount", NULL, out, sizeof out);
        char *lp = strstr(out, "\"lag\":");
        if (lp && atoll(lp + 6) == 0) break;
        usleep(1000);
    }
    base = status_position(fd, out, sizeof out);
    state_position(fd, out, sizeof out);
    if (by_state && strstr(out, "\"n\":0") == NULL) {
        fprintf(stderr, "proj_lag: the store already holds lag events (%s); use a fresh one\n",
                out);
        return 1;
    }
    capacks = (long)(rate * secs / batch * 1.5) + 1000;
    acks = malloc((size_t)capacks * sizeof *acks);
    capseen = capacks * 4 + 100000;
    seens = malloc((size_t)capseen * sizeof *seens);
    capreads = capseen;
    reads = malloc((size_t)capreads * sizeof *reads);
    pthread_t pt, at[256];
    pthread_create(&pt, 0, poller, 0);
    long long t0 = now_ns();
    for (long i = 0; i < napp; i++) pthread_create(&at[i], 0, appender, (void *)i);
    usleep((useconds_t)(secs * 1e6));
    stop = 1;
    for (int i = 0; i < napp; i++) pthread_join(at[i], 0);
    double elapsed = (now_ns() - t0) / 1e9;
    pthread_join(pt, 0);
    /* lag per request */
    long long *lat = malloc((size_t)(nacks + 1) * sizeof *lat);
    long nlat = 0, missing = 0;
    long long warm = t0 + 500000000LL;
    for (long i = 0; i < nacks; i++) {
        if (acks[i].t < warm) continue;
        long lo = 0, hi = nseen; /* first seen with pos >= ack pos */
        while (lo < hi) {
            long mid = (lo + hi) / 2;
            if (seens[mid].pos >= acks[i].pos) hi = mid;
            else lo = mid + 1;
        }
        if (lo == nseen) {
            missing++;
            continue;
        }
        long long d = seens[lo].t - acks[i].t;
        lat[nlat++] = d > 0 ? d : 0;
    }
    qsort(lat, (size_t)nlat, sizeof *lat, cmp_ll);
    long long count = state_position(fd, out, sizeof out) - base;
    long long endpos = status_position(fd, out, sizeof out);
    int ok = count == sent && endpos == base + count;
    if (!nlat) {
        fprintf(stderr, "no measurements (missing=%ld)\n", missing);
        return 1;
    }
    qsort(reads, (size_t)nreads, sizeof *reads, cmp_ll);
    double read_p50 = nreads ? reads[nreads / 2] / 1e6 : 0,
           read_p99 = nreads ? reads[nreads * 99 / 100] / 1e6 : 0;
    double p50 = lat[nlat / 2] / 1e6, p99 = lat[nlat * 99 / 100] / 1e6,
           p999 = lat[nlat * 999 / 1000] / 1e6, mx = lat[nlat - 1] / 1e6;
    printf("BENCH name=proj_lag events=%ld seconds=%.2f rate=%.0f target_rate=%.0f batch=%d "
           "appenders=%d samples=%ld missing=%ld p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f "
           "limit_ms=5 ratio=%.2f count=%lld count_ok=%s base=%lld end=%lld reflects=%s reads=%ld "
           "read_p50_ms=%.3f read_p99_ms=%.3f\n",
           sent, elapsed, sent / elapsed, rate, batch, napp, nlat, missing, p50, p99, p999, mx,
           p99 / 5.0, count, ok ? "yes" : "no", base, endpos, by_state ? "state" : "status", nreads,
           read_p50, read_p99);
    return ok && p99 <= 5.0 ? 0 : 2;
}
