/* cli_serve.c — `tidemark serve`: open the store, start the HTTP server,
 * print "ready port=N" once it accepts connections, run until SIGTERM/SIGINT.
 *
 * Owns the wiring between modules: the store's commit callback feeds the
 * HTTP server's live delivery and the projection manager (projmgr.h), whose
 * routes, metrics and SIGHUP reload plug into the server.  Shutdown order:
 * the loop stops, commits stop being reported, every projection is
 * checkpointed and stopped, then the server and the store close.
 * Exit status: 0 after a clean shutdown, 1 usage, 2/4 store or socket errors.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "cli.h"
#include "err.h"
#include "http.h"
#include "projmgr.h"
#include "store.h"

static const char serve_usage[] =
    "usage: tidemark serve --data DIR [--port N] [--bind ADDR] [--projections DIR]\n"
    "                      [--token-file F] [--max-body BYTES] [--durability MODE]\n"
    "\n"
    "Serve the HTTP API, live Server-Sent Events and the dashboard for DIR.\n"
    "Prints \"ready port=N\" on stdout once it accepts connections.\n"
    "\n"
    "  --data DIR          data directory (created if missing)\n"
    "  --port N            TCP port; 0 picks a free one (default 8080)\n"
    "  --bind ADDR         address to listen on (default 127.0.0.1)\n"
    "  --projections DIR   load the Lua projections in DIR (*.lua)\n"
    "  --projection-cpu-limit S  CPU seconds a projection may spend on one batch\n"
    "                      (default 10); a runaway projection is stopped and faulted\n"
    "  --projection-memory-limit MB  Lua memory per projection (default 256)\n"
    "  --rebuild-workers N  worker processes building a changed projection's new\n"
    "                      version, split by partition (default: the cores; 1 = one)\n"
    "  --token-file F      bearer tokens (one per line) required for writes\n"
    "  --max-body BYTES    largest request body (default 8388608); larger: 413\n"
    "  --max-headers BYTES largest request line + headers (default 65536); larger: 431\n"
    "  --durability MODE   durable (default: fsync before acknowledging) or\n"
    "                      lose-on-os-crash (no fsync; survives kill -9, not power loss)\n"
    "  --timeout SECS      idle read / stalled write timeout per connection (default 60)\n"
    "  --request-timeout SECS  a request (line, headers, body) must arrive whole within\n"
    "                      SECS of its first byte, else the connection is closed: slow\n"
    "                      clients cannot hold connections (slowloris) (default 30)\n"
    "  --workers N         threads doing store work (default 64; appends wait for\n"
    "                      the group commit, so more threads = bigger commit groups)\n"
    "  --sse-buffer BYTES  unsent bytes per SSE client before it is closed (default 4194304)\n"
    "  --sse-heartbeat S   seconds between SSE heartbeat comments (default 15)\n"
    "\n"
    "SIGTERM/SIGINT stop gracefully (in-flight appends finish, SSE clients get\n"
    "`event: close`); SIGHUP reloads projections.  Logs go to stderr as key=value lines.\n";

typedef struct serve_ctx {
    http_server *h;
    projmgr *pm;
} serve_ctx;

static void on_store_commit(void *ud, uint64_t last) {
    serve_ctx *c = ud;
    http_notify_commit(c->h, last);
    if (c->pm) projmgr_notify(c->pm, last);
}

static void pm_publish(void *ud, const char *ch, size_t cl, const char *json, size_t jl) {
    http_publish(ud, ch, cl, json, jl);
}
static void pm_handle(void *ud, const api_request *rq, api_reply *rp) { projmgr_handle(ud, rq, rp); }
static void pm_handle_many(void *ud, const api_request *const *rqs, api_reply *const *rps,
                           size_t n) {
    projmgr_handle_many(ud, rqs, rps, n);
}
static void pm_metrics(void *ud, buf *out) { projmgr_metrics(ud, out); }
static void pm_reload(void *ud) { projmgr_reload(ud); }

static int parse_double(const char *s, double lo, double hi, double *out) {
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) return -1;
    *out = v;
    return 0;
}

static int parse_size(const char *s, size_t *out) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-' || v == 0) return -1;
    *out = (size_t)v;
    return 0;
}

static int parse_int(const char *s, int lo, int hi, int *out) {
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

int cli_serve(int argc, char **argv) {
    enum { O_DATA = 1, O_PORT, O_BIND, O_PROJ, O_TOKEN, O_MAXBODY, O_MAXHDR, O_DUR, O_TIMEOUT,
           O_WORKERS, O_SSEBUF, O_SSEHB, O_PCPU, O_PMEM, O_RBW, O_REQTIMEOUT, O_HELP };
    static const struct option opts[] = {
        {"data", required_argument, 0, O_DATA},       {"port", required_argument, 0, O_PORT},
        {"bind", required_argument, 0, O_BIND},       {"projections", required_argument, 0, O_PROJ},
        {"token-file", required_argument, 0, O_TOKEN}, {"max-body", required_argument, 0, O_MAXBODY},
        {"max-headers", required_argument, 0, O_MAXHDR}, {"durability", required_argument, 0, O_DUR},
        {"timeout", required_argument, 0, O_TIMEOUT}, {"workers", required_argument, 0, O_WORKERS},
        {"request-timeout", required_argument, 0, O_REQTIMEOUT},
        {"sse-buffer", required_argument, 0, O_SSEBUF}, {"sse-heartbeat", required_argument, 0, O_SSEHB},
        {"projection-cpu-limit", required_argument, 0, O_PCPU},
        {"projection-memory-limit", required_argument, 0, O_PMEM},
        {"rebuild-workers", required_argument, 0, O_RBW},
        {"help", no_argument, 0, O_HELP},             {0, 0, 0, 0},
    };
    const char *data = NULL, *projections = NULL;
    http_opts ho;
    http_opts_default(&ho);
    ho.port = 8080;
    store_opts so;
    store_opts_default(&so);
    int workers = 0, rbw = 0;
    double pcpu = 10, pmem = 256;
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        const char *bad = NULL;
        switch (c) {
        case O_DATA: data = optarg; break;
        case O_PORT: if (parse_int(optarg, 0, 65535, &ho.port)) bad = "--port"; break;
        case O_BIND: ho.bind = optarg; break;
        case O_PROJ: projections = optarg; break;
        case O_TOKEN: ho.token_file = optarg; break;
        case O_MAXBODY: if (parse_size(optarg, &ho.max_body)) bad = "--max-body"; break;
        case O_MAXHDR: if (parse_size(optarg, &ho.max_headers)) bad = "--max-headers"; break;
        case O_DUR:
            if (strcmp(optarg, "durable") == 0) so.durability = STORE_DURABLE;
            else if (strcmp(optarg, "lose-on-os-crash") == 0) so.durability = STORE_LOSE_ON_OS_CRASH;
            else bad = "--durability (durable or lose-on-os-crash)";
            break;
        case O_TIMEOUT: if (parse_int(optarg, 1, 86400, &ho.timeout_s)) bad = "--timeout"; break;
        case O_REQTIMEOUT:
            if (parse_int(optarg, 1, 86400, &ho.request_timeout_s)) bad = "--request-timeout";
            break;
        case O_WORKERS:
            if (parse_int(optarg, 1, 1024, &workers)) bad = "--workers";
            else ho.workers = (unsigned)workers;
            break;
        case O_SSEBUF: if (parse_size(optarg, &ho.sse_max_pending)) bad = "--sse-buffer"; break;
        case O_SSEHB: if (parse_int(optarg, 1, 3600, &ho.heartbeat_s)) bad = "--sse-heartbeat"; break;
        case O_PCPU: if (parse_double(optarg, 0.01, 3600, &pcpu)) bad = "--projection-cpu-limit"; break;
        case O_PMEM: if (parse_double(optarg, 1, 1 << 20, &pmem)) bad = "--projection-memory-limit"; break;
        case O_RBW: if (parse_int(optarg, 1, 64, &rbw)) bad = "--rebuild-workers"; break;
        case 'h':
        case O_HELP: fputs(serve_usage, stdout); return 0;
        default:
            fprintf(stderr, "tidemark serve: unknown or incomplete option '%s' (see --help)\n",
                    argv[optind - 1]);
            return 1;
        }
        if (bad) {
            fprintf(stderr, "tidemark serve: bad value for %s: '%s'\n", bad, optarg);
            return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "tidemark serve: unexpected argument '%s' (see --help)\n", argv[optind]);
        return 1;
    }
    if (!data) {
        fprintf(stderr, "tidemark serve: --data DIR is required (see --help)\n");
        return 1;
    }
    if (projections) {
        struct stat stt;
        if (stat(projections, &stt) != 0 || !S_ISDIR(stt.st_mode)) {
            fprintf(stderr, "tidemark serve: --projections %s: not a directory\n", projections);
            return 1;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    /* Every SSE client holds a socket: allow as many as the hard limit. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    tm_err err;
    err_clear(&err);
    store *st = store_open(data, &so, &err);
    if (!st) {
        fprintf(stderr, "tidemark serve: %s: %s\n", data, err.msg);
        return err.code ? err.code : TM_EIO;
    }
    http_server *h = http_new(st, &ho, &err);
    if (!h) {
        fprintf(stderr, "tidemark serve: %s\n", err.msg);
        store_close(st);
        return err.code ? err.code : TM_EIO;
    }
    projmgr_opts po = {.dir = projections, .exe = "/proc/self/exe",
                       .memory_limit = (size_t)(pmem * 1024 * 1024), .cpu_limit = pcpu,
                       .rebuild_workers = (unsigned)rbw,
                       .publish = pm_publish, .publish_ud = h};
    projmgr *pm = projmgr_new(st, &po, &err);
    if (!pm) {
        fprintf(stderr, "tidemark serve: %s\n", err.msg);
        http_free(h);
        store_close(st);
        return err.code ? err.code : TM_EIO;
    }
    http_projections hp = {pm_handle, pm_handle_many, pm_metrics, pm_reload, pm};
    http_set_projections(h, &hp);
    serve_ctx ctx = {h, pm};
    store_on_commit(st, on_store_commit, &ctx);
    printf("ready port=%d\n", http_port(h));
    fflush(stdout);
    http_run(h);
    store_on_commit(st, NULL, NULL);
    projmgr_free(pm); /* every projection checkpointed */
    http_set_projections(h, NULL);
    http_free(h);
    store_close(st);
    return 0;
}
