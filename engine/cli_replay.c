/* cli_replay.c — `tidemark replay`: rebuild a projection from position 0
 * on every core (replay.h).
 *
 * Owns: option parsing, finding the script (a file, or the source of a
 * projection installed in the server with PUT: projmgr/o/NAME), Ctrl-C
 * (the first SIGINT cancels cleanly: checkpoint when persisting and say
 * how to resume; a second one kills), progress and the summary on stderr,
 * and printing the result as JSON on stdout (the same bytes as
 * `tidemark project` prints for the same script and data).
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "buf.h"
#include "cli.h"
#include "json.h"
#include "mp.h"
#include "replay.h"

static const char usage[] =
    "usage: tidemark replay --data DIR (NAME | FILE.lua) [options]\n"
    "Rebuild a projection from position 0 using every core: the log is read and\n"
    "decoded once, events are dispatched by partition to parallel workers, each\n"
    "running the projection for its share of the partitions.  The result is the\n"
    "same, byte for byte, as `tidemark project` prints.\n"
    "NAME is a projection installed in the server with PUT (its stored source).\n"
    "(A running server builds a changed projection's new version on every core\n"
    "itself: PUT the new source; see `tidemark serve --help`, --rebuild-workers.)\n"
    "\n"
    "  --data DIR           the data directory\n"
    "  --workers N          parallel workers (default: the cores this process may\n"
    "                       use, so taskset and cpusets are respected)\n"
    "  --name N             projection name (default: FILE without .lua)\n"
    "  --persist            build the new read model apart (staging keys, with\n"
    "                       checkpoints) and swap it into the projection's state\n"
    "                       in one atomic step at the end\n"
    "  --resume             continue a cancelled or interrupted --persist replay\n"
    "                       from its own checkpoint (implies --persist)\n"
    "  --checkpoint-every N events between checkpoints (default: the script's\n"
    "                       checkpoint_every, else 500000)\n"
    "  --query NAME [ARGS]  print the result of the script's query NAME instead\n"
    "  --get KEY            print one partition's state\n"
    "  --top FIELD[:N]      print the N (default 10) largest partitions by FIELD\n"
    "  --partitions         print the sorted list of partition keys\n"
    "  --summary            print {\"position\",\"events\",\"workers\",\"seconds\"} instead\n"
    "                       of the state\n"
    "  --cpu-limit S        CPU seconds a batch may use (default 10; 0 = none)\n"
    "  --memory-limit MB    Lua memory cap per worker (default 256)\n"
    "  --quiet              no progress on stderr\n"
    "\n"
    "Ctrl-C stops the replay; with --persist it checkpoints first and tells how\n"
    "to resume.  Exit status: 0 ok, 1 bad script, usage or projection fault,\n"
    "2 no such data directory or projection (or nothing to resume), 4 I/O error,\n"
    "130 cancelled.\n";

static volatile sig_atomic_t cancel_flag;

static void on_sigint(int sig) {
    (void)sig;
    __atomic_store_n(&cancel_flag, 1, __ATOMIC_RELAXED); /* read by the replay's threads */
}


/* The source of a projection installed with PUT (projmgr.h: projmgr/o/NAME). */
static int stored_source(store *s, const char *name, buf *out, tm_err *err) {
    buf k = BUF_INIT;
    buf_printf(&k, "projmgr/o/%s", name);
    char *v = NULL;
    size_t vl = 0;
    int rc = store_kv_get(s, k.ptr, k.len, &v, &vl, err);
    buf_free(&k);
    if (rc <= 0) return rc;
    const char *x;
    size_t xl;
    mp_item it;
    rc = 0;
    if (mp_validate(v, vl, NULL, NULL) == 0 && mp_map_find(v, vl, "source", 6, &x, &xl) == 1 &&
        mp_next(&x, x + xl, &it) == 0 && it.type == MP_STR) {
        buf_append(out, it.v.s.ptr, it.v.s.len);
        rc = 1;
    }
    free(v);
    return rc;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct req {
    const char *query, *get, *top;
    int list, summary;
    buf args;
} req;

static int replay_object(void *src, json_objw *w, tm_err *err) {
    return replay_json_pairs(src, w, err);
}

static int output(const char *cmd, replay *r, const req *q, double secs) {
    tm_err err;
    err_clear(&err);
    buf out = BUF_INIT;
    int rc;
    if (q->summary) {
        printf("{\"position\":%llu,\"events\":%llu,\"workers\":%u,\"seconds\":%.3f}\n",
               (unsigned long long)replay_position(r), (unsigned long long)replay_events(r),
               replay_workers(r), secs);
        return fflush(stdout) == 0 ? 0 : 4;
    }
    if (q->query) rc = replay_query(r, q->query, q->args.ptr, q->args.len, &out, &err);
    else if (q->get) rc = replay_get(r, q->get, strlen(q->get), &out, &err);
    else if (q->list) rc = replay_partitions(r, &out, &err);
    else if (q->top) {
        char *field = strdup(q->top);
        char *colon = strrchr(field, ':');
        uint64_t n = 10;
        if (colon) {
            *colon = 0;
            n = strtoull(colon + 1, NULL, 10);
        }
        rc = replay_top(r, field, n, &out, &err);
        free(field);
    } else if (replay_partitioned(r)) {
        return cli_print_object(cmd, replay_object, r);
    } else {
        rc = replay_state(r, &out, &err);
    }
    int status = rc < 0 ? cli_fail(cmd, &err) : cli_print_json(cmd, &out);
    buf_free(&out);
    return status;
}

static int run(const char *cmd, store *s, const char *name, const buf *src, const char *file,
               replay_opts *ro, const req *q, int quiet) {
    tm_err err;
    err_clear(&err);
    replay *r = replay_new(s, name, src->ptr ? src->ptr : "", src->len, file, ro, &err);
    if (!r) return cli_fail(cmd, &err);
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESETHAND; /* a second Ctrl-C kills */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
    double t0 = now_s();
    int rc = replay_run(r, &err);
    double secs = now_s() - t0;
    sigaction(SIGINT, &old, NULL);
    int status = 0;
    if (rc == REPLAY_CANCELLED) {
        if (ro->persist)
            fprintf(stderr,
                    "tidemark %s: cancelled; checkpointed at position %llu; continue with "
                    "'tidemark replay --data DIR %s --name %s --resume'\n",
                    cmd, (unsigned long long)replay_position(r), file, name);
        else
            fprintf(stderr, "tidemark %s: cancelled at position %llu (nothing saved; "
                            "use --persist to be able to resume)\n",
                    cmd, (unsigned long long)replay_position(r));
        status = 130;
    } else if (rc < 0) {
        const proj_fault *f = replay_fault(r);
        fprintf(stderr, "tidemark %s: %s\n", cmd, err.msg);
        if (f && f->traceback && strchr(f->traceback, '\n'))
            fprintf(stderr, "%s\n", strchr(f->traceback, '\n') + 1);
        status = f ? 1 : (err.code ? err.code : 1);
    } else {
        if (!quiet) {
            fprintf(stderr, "replay %s: %llu events handled up to position %llu in %.2f s "
                            "(%.0f events/s), %s",
                    name, (unsigned long long)replay_events(r),
                    (unsigned long long)replay_position(r), secs,
                    secs > 0 ? (double)replay_position(r) / secs : 0, replay_describe(r));
            if (replay_emits_suppressed(r))
                fprintf(stderr, "; %llu emitted events suppressed",
                        (unsigned long long)replay_emits_suppressed(r));
            fprintf(stderr, "%s\n", ro->persist ? "; swapped in" : "");
        }
        status = output(cmd, r, q, secs);
    }
    replay_free_at_exit(r); /* the command ends here */
    return status;
}

int cli_replay(int argc, char **argv) {
    const char *cmd = "replay";
    const char *data = NULL, *name_opt = NULL;
    req q = {.args = BUF_INIT};
    int quiet = 0;
    double cpu = 10;
    uint64_t mem_mb = 256, workers = 0, every = 0;
    replay_opts ro = {0};
    enum { O_NAME = 256, O_QUERY, O_GET, O_TOP, O_CPU, O_MEM, O_PERSIST, O_RESUME, O_QUIET,
           O_PARTS, O_WORKERS, O_EVERY, O_SUMMARY };
    static const struct option opts[] = {
        {"data", required_argument, 0, 'd'},       {"name", required_argument, 0, O_NAME},
        {"query", required_argument, 0, O_QUERY},  {"get", required_argument, 0, O_GET},
        {"top", required_argument, 0, O_TOP},      {"cpu-limit", required_argument, 0, O_CPU},
        {"memory-limit", required_argument, 0, O_MEM},
        {"persist", no_argument, 0, O_PERSIST},    {"resume", no_argument, 0, O_RESUME},
        {"quiet", no_argument, 0, O_QUIET},        {"partitions", no_argument, 0, O_PARTS},
        {"workers", required_argument, 0, O_WORKERS},
        {"checkpoint-every", required_argument, 0, O_EVERY},
        {"summary", no_argument, 0, O_SUMMARY},    {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "d:h", opts, NULL)) != -1) {
        switch (c) {
        case 'd': data = optarg; break;
        case O_NAME: name_opt = optarg; break;
        case O_QUERY: q.query = optarg; break;
        case O_GET: q.get = optarg; break;
        case O_TOP: q.top = optarg; break;
        case O_CPU: {
            char *end;
            cpu = strtod(optarg, &end);
            if (*end || cpu < 0) return cli_usage_error(cmd, "bad --cpu-limit '%s'", optarg);
            break;
        }
        case O_MEM:
            if (cli_parse_u64(cmd, "--memory-limit", optarg, &mem_mb) < 0) return 1;
            if (mem_mb < 1 || mem_mb > (1u << 20))
                return cli_usage_error(cmd, "--memory-limit must be 1..1048576 MB");
            break;
        case O_WORKERS:
            if (cli_parse_u64(cmd, "--workers", optarg, &workers) < 0) return 1;
            if (workers < 1 || workers > 64)
                return cli_usage_error(cmd, "--workers must be 1..64");
            break;
        case O_EVERY:
            if (cli_parse_u64(cmd, "--checkpoint-every", optarg, &every) < 0) return 1;
            if (every < 1) return cli_usage_error(cmd, "--checkpoint-every must be >= 1");
            break;
        case O_PERSIST: ro.persist = 1; break;
        case O_RESUME: ro.persist = ro.resume = 1; break;
        case O_QUIET: quiet = 1; break;
        case O_PARTS: q.list = 1; break;
        case O_SUMMARY: q.summary = 1; break;
        case 'h': fputs(usage, stdout); return 0;
        default:
            return cli_usage_error(cmd, "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    const char *target = optind < argc ? argv[optind++] : NULL;
    const char *qargs = NULL;
    if (optind < argc && q.query) qargs = argv[optind++];
    if (optind < argc) return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    if (!data) return cli_usage_error(cmd, "--data DIR is required");
    if (!target) return cli_usage_error(cmd, "a projection NAME or FILE.lua is required");

    tm_err err;
    err_clear(&err);
    if (qargs && json_to_mp(qargs, strlen(qargs), NULL, &q.args, &err) < 0) {
        err_prefix(&err, "query arguments");
        return cli_fail(cmd, &err);
    }
    int status = 0;
    store_opts so;
    store_opts_default(&so);
    so.cache_bytes = CLI_SCAN_CACHE_BYTES;
    store *s = cli_open_store(cmd, data, 0, &so, &status);
    if (!s) {
        buf_free(&q.args);
        return status;
    }
    buf src = BUF_INIT;
    char *name = NULL;
    struct stat sb;
    int is_file = !strcmp(target, "-") || stat(target, &sb) == 0 ||
                  (strlen(target) > 4 && !strcmp(target + strlen(target) - 4, ".lua"));
    if (is_file) {
        if (cli_read_file(target, &src, &err) < 0) status = cli_fail(cmd, &err);
        name = name_opt ? strdup(name_opt) : cli_projection_name(target);
    } else {
        int rc = stored_source(s, target, &src, &err);
        if (rc < 0) status = cli_fail(cmd, &err);
        else if (rc == 0) {
            fprintf(stderr, "tidemark %s: no file %s and no projection %s installed in the "
                            "data directory\n", cmd, target, target);
            status = TM_ENOTFOUND;
        }
        name = strdup(name_opt ? name_opt : target);
    }
    if (status == 0) {
        ro.workers = (unsigned)workers;
        ro.memory_limit = (size_t)mem_mb << 20;
        ro.cpu_limit = cpu;
        ro.checkpoint_every = every;
        ro.cancel = &cancel_flag;
        ro.progress = quiet ? NULL : stderr;
        status = run(cmd, s, name, &src, target, &ro, &q, quiet);
    }
    free(name);
    buf_free(&src);
    buf_free(&q.args);
    store_close(s);
    return status;
}
