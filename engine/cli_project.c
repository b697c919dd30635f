/* cli_project.c — `tidemark project`: run a projection over all history once.
 *
 * Owns: option parsing, choosing the narrowest store read for the
 * projection's `from`, the replay loop (feed, dead-letter replays,
 * periodic checkpoints with --persist), and printing the final state (or a
 * query's result) as JSON on stdout.
 *
 * The process is the sandbox here: a projection stuck in a JIT-compiled
 * loop past --cpu-limit plus the grace period makes the watchdog print the
 * fault and exit(1) (proj.h / sandbox.h).  Without --persist nothing is
 * written to the store (a dry run over history; emitted events are counted,
 * not appended).
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buf.h"
#include "cli.h"
#include "json.h"
#include "progress.h"
#include "proj.h"
#include "projhost.h"
#include "replay.h"

static const char usage[] =
    "usage: tidemark project --data DIR FILE.lua [options]\n"
    "Run a Lua projection over all stored events once and print its final state\n"
    "as JSON (one object keyed by partition when the projection is partitioned).\n"
    "\n"
    "  --data DIR           the data directory\n"
    "  --name N             projection name (default: FILE without .lua)\n"
    "  --query NAME [ARGS]  print the result of the script's query NAME instead,\n"
    "                       ARGS is one JSON value passed as the second argument\n"
    "  --get KEY            print one partition's state\n"
    "  --top FIELD[:N]      print the N (default 10) partitions with the largest\n"
    "                       numeric state[FIELD]\n"
    "  --partitions         print the sorted list of partition keys\n"
    "  --cpu-limit S        CPU seconds a batch of events may use (default 10;\n"
    "                       0 = none); a JIT-compiled loop is stopped by exiting 1\n"
    "  --memory-limit MB    Lua memory cap (default 256)\n"
    "  --persist            store state and checkpoint in the data directory,\n"
    "                       resume from the last checkpoint, append emitted events\n"
    "  --reset              with --persist: forget stored state first\n"
    "  --workers N          without --persist: run on N parallel workers (default:\n"
    "                       the cores it may use; see tidemark replay); same output\n"
    "  --isolate            run the Lua in a separate worker process (as the\n"
    "                       server does; implies --persist): a crash or runaway\n"
    "                       script kills the worker, not this process\n"
    "  --quiet              no progress on stderr\n"
    "\n"
    "Exit status: 0 ok, 1 bad script, usage or projection fault, 2 no such data\n"
    "directory or script file, 4 I/O error.\n";


typedef struct run_opts {
    int persist;
    int quiet;
} run_opts;

static void print_fault(const char *cmd, const proj *p, const tm_err *err) {
    const proj_fault *f = proj_fault_info(p);
    fprintf(stderr, "tidemark %s: %s\n", cmd, err->msg);
    if (f && f->traceback && strchr(f->traceback, '\n'))
        fprintf(stderr, "%s\n", strchr(f->traceback, '\n') + 1);
}

/* Outcome of feeding: 0 go on, PROJ_REPLAY, -2 projection fault (print
 * it), -1 other error (err). */
static int fed(proj *p, int rc) {
    if (rc == 0 || rc == PROJ_REPLAY) return rc;
    return proj_fault_info(p) ? -2 : -1;
}

/* A commit's failure is a fault when the projection failed (its flush ran
 * handlers, or a state could not be encoded), else an I/O error. */
static int committed(proj *p, int rc, const tm_err *err) {
    if (rc == 0 || rc == PROJ_REPLAY) return rc;
    return (proj_fault_info(p) || err->code == TM_EINVAL) ? -2 : -1;
}

/* Replay everything after the projection's position.  0 / exit status.
 * (A reader thread prefetching chunks was measured slower on this shared
 * 2-core machine: both threads compete with everything else.) */
static int run_serial(const char *cmd, store *s, proj *p, const run_opts *ro) {
    tm_err err;
    err_clear(&err);
    uint64_t last = store_last_position(s);
    progress *pg = progress_new(stderr, "project", last, "events", ro->quiet || !isatty(2));
    uint64_t every = proj_checkpoint_every(p);
    if (!every) every = ro->persist ? 100000 : 0;
    if (!every && proj_dead_letter_mode(p)) every = 100000; /* bounds dead-letter replays */
    uint64_t seen = 0;
    int rc = 0;
    for (;;) {
        store_iter *it = proj_open_reader(s, p, proj_position(p) + 1, &err);
        if (!it) {
            rc = -1;
            break;
        }
        tm_event ev;
        int r;
        rc = 0;
        while (rc == 0 && (r = store_iter_next(it, &ev, &err)) == 1) {
            rc = fed(p, proj_feed(p, &ev, &err));
            if ((++seen & 4095) == 0) progress_update(pg, ev.position, seen);
            if (rc == 0 && every && proj_uncommitted(p) >= every)
                rc = committed(p, proj_commit(p, &err), &err);
        }
        store_iter_free(it);
        if (rc == 0 && r < 0) rc = -1;
        if (rc == PROJ_REPLAY) continue;
        if (rc == 0) rc = fed(p, proj_flush(p, &err));
        if (rc == PROJ_REPLAY) continue;
        if (rc == 0 && (ro->persist || proj_dead_letter_mode(p)))
            rc = committed(p, proj_commit(p, &err), &err);
        if (rc == PROJ_REPLAY) continue;
        break;
    }
    progress_end(pg);
    if (rc == -2) {
        print_fault(cmd, p, &err);
        return 1;
    }
    if (rc < 0) return cli_fail(cmd, &err);
    return 0;
}

static int proj_pairs(void *src, proj_kv_fn each, void *ctx, tm_err *err) {
    return proj_state_pairs(src, each, ctx, err);
}

static int replay_object(void *src, json_objw *w, tm_err *err) {
    return replay_json_pairs(src, w, err);
}

/* --isolate: the projection runs in a worker process (projhost.h). */
typedef struct read_req {
    const char *query, *get, *top;
    int list;
} read_req;

/* "FIELD[:N]" -> field (malloc'd) and n (default 10). */
static char *parse_top(const char *top, uint64_t *n) {
    char *field = strdup(top);
    char *colon = strrchr(field, ':');
    *n = 10;
    if (colon) {
        *colon = 0;
        *n = strtoull(colon + 1, NULL, 10);
    }
    return field;
}

/* Without --persist: the parallel path (replay.h), the same bytes. */
static int run_parallel(const char *cmd, store *s, const char *name, const buf *src,
                        const char *file, double cpu, uint64_t mem_mb, uint64_t workers,
                        int quiet, const read_req *rq, const buf *args) {
    tm_err err;
    err_clear(&err);
    replay_opts ro = {.workers = (unsigned)workers, .memory_limit = (size_t)mem_mb << 20,
                      .cpu_limit = cpu, .progress = (quiet || !isatty(2)) ? NULL : stderr};
    replay *r = replay_new(s, name, src->ptr ? src->ptr : "", src->len, file, &ro, &err);
    if (!r) return cli_fail(cmd, &err);
    int status;
    if (replay_run(r, &err) != 0) {
        const proj_fault *f = replay_fault(r);
        fprintf(stderr, "tidemark %s: %s\n", cmd, err.msg);
        if (f && f->traceback && strchr(f->traceback, '\n'))
            fprintf(stderr, "%s\n", strchr(f->traceback, '\n') + 1);
        status = f ? 1 : (err.code ? err.code : 1);
    } else if (!rq->query && !rq->get && !rq->list && !rq->top && replay_partitioned(r)) {
        status = cli_print_object(cmd, replay_object, r);
    } else {
        buf out = BUF_INIT;
        int rc;
        if (rq->query) rc = replay_query(r, rq->query, args->ptr, args->len, &out, &err);
        else if (rq->get) rc = replay_get(r, rq->get, strlen(rq->get), &out, &err);
        else if (rq->list) rc = replay_partitions(r, &out, &err);
        else if (rq->top) {
            uint64_t n;
            char *field = parse_top(rq->top, &n);
            rc = replay_top(r, field, n, &out, &err);
            free(field);
        } else rc = replay_state(r, &out, &err);
        status = rc < 0 ? cli_fail(cmd, &err) : cli_print_json(cmd, &out);
        buf_free(&out);
    }
    replay_free_at_exit(r); /* the command ends here */
    return status;
}

static int run_isolated(const char *cmd, store *s, const char *name, const buf *src,
                        const char *file, double cpu, uint64_t mem_mb, const read_req *rq,
                        const buf *args, int reset) {
    tm_err err;
    err_clear(&err);
    if (reset) {
        buf pre = BUF_INIT;
        buf_printf(&pre, "proj/%s/", name);
        int rc = store_kv_delete_prefix(s, pre.ptr, pre.len, &err);
        buf_free(&pre);
        if (rc < 0) return cli_fail(cmd, &err);
    }
    projhost_opts ho = {.memory_limit = (size_t)mem_mb << 20, .cpu_limit = cpu > 0 ? cpu : 3600,
                        .exe = "/proc/self/exe"};
    projhost *h = projhost_start(s, name, src->ptr ? src->ptr : "", src->len, file, &ho, &err);
    if (!h) return cli_fail(cmd, &err);
    int status = 0;
    buf out = BUF_INIT;
    if (projhost_catch_up(h, &err) != 0) {
        const projhost_status *st = projhost_get_status(h);
        fprintf(stderr, "tidemark %s: %s\n", cmd, err.msg);
        if (st->traceback && strchr(st->traceback, '\n'))
            fprintf(stderr, "%s\n", strchr(st->traceback, '\n') + 1);
        status = err.code == TM_EIO ? 4 : 1;
    } else {
        int rc;
        if (rq->query) rc = projhost_query(h, rq->query, args->ptr, args->len, &out, &err);
        else if (rq->get) rc = projhost_read(h, "get", rq->get, NULL, 0, &out, &err);
        else if (rq->list) rc = projhost_read(h, "partitions", NULL, NULL, 0, &out, &err);
        else if (rq->top) {
            uint64_t n;
            char *field = parse_top(rq->top, &n);
            rc = projhost_read(h, "top", field, NULL, n, &out, &err);
            free(field);
        } else rc = projhost_state_mp(h, &out, &err);
        status = rc < 0 ? cli_fail(cmd, &err) : cli_print_json(cmd, &out);
    }
    buf_free(&out);
    projhost_free(h);
    return status;
}

int cli_project(int argc, char **argv) {
    const char *cmd = "project";
    const char *data = NULL, *name_opt = NULL, *query = NULL, *get = NULL, *top = NULL;
    int persist = 0, reset = 0, quiet = 0, list = 0, isolate = 0;
    double cpu = 10;
    uint64_t mem_mb = 256, workers = 0;
    enum { O_WORKERS = 300, O_NAME = 256, O_QUERY, O_GET, O_TOP, O_CPU, O_MEM, O_PERSIST, O_RESET, O_QUIET,
           O_PARTS, O_ISOLATE };
    static const struct option opts[] = {
        {"data", required_argument, 0, 'd'},       {"name", required_argument, 0, O_NAME},
        {"query", required_argument, 0, O_QUERY},  {"get", required_argument, 0, O_GET},
        {"top", required_argument, 0, O_TOP},      {"cpu-limit", required_argument, 0, O_CPU},
        {"memory-limit", required_argument, 0, O_MEM},
        {"persist", no_argument, 0, O_PERSIST},    {"reset", no_argument, 0, O_RESET},
        {"quiet", no_argument, 0, O_QUIET},        {"partitions", no_argument, 0, O_PARTS},
        {"isolate", no_argument, 0, O_ISOLATE},    {"help", no_argument, 0, 'h'},
        {"workers", required_argument, 0, O_WORKERS},
        {0, 0, 0, 0},
    };
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "d:h", opts, NULL)) != -1) {
        switch (c) {
        case 'd': data = optarg; break;
        case O_NAME: name_opt = optarg; break;
        case O_QUERY: query = optarg; break;
        case O_GET: get = optarg; break;
        case O_TOP: top = optarg; break;
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
        case O_PERSIST: persist = 1; break;
        case O_RESET: reset = 1; break;
        case O_QUIET: quiet = 1; break;
        case O_PARTS: list = 1; break;
        case O_ISOLATE: isolate = persist = 1; break;
        case O_WORKERS:
            if (cli_parse_u64(cmd, "--workers", optarg, &workers) < 0) return 1;
            if (workers < 1 || workers > 64)
                return cli_usage_error(cmd, "--workers must be 1..64");
            break;
        case 'h': fputs(usage, stdout); return 0;
        default:
            return cli_usage_error(cmd, "unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    /* positionals (GNU getopt moved them last): FILE [query ARGS] */
    const char *file = optind < argc ? argv[optind++] : NULL;
    const char *qargs = NULL;
    if (optind < argc && query) qargs = argv[optind++];
    if (optind < argc) return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    if (!data) return cli_usage_error(cmd, "--data DIR is required");
    if (!file) return cli_usage_error(cmd, "a projection FILE.lua is required");
    if (reset && !persist) return cli_usage_error(cmd, "--reset needs --persist");

    tm_err err;
    err_clear(&err);
    buf src = BUF_INIT, args = BUF_INIT;
    if (cli_read_file(file, &src, &err) < 0) {
        buf_free(&src);
        return cli_fail(cmd, &err);
    }
    if (qargs && json_to_mp(qargs, strlen(qargs), NULL, &args, &err) < 0) {
        buf_free(&src);
        err_prefix(&err, "query arguments");
        return cli_fail(cmd, &err);
    }
    int status = 0;
    store_opts so;
    store_opts_default(&so);
    so.cache_bytes = CLI_SCAN_CACHE_BYTES;
    store *s = cli_open_store(cmd, data, 0, &so, &status);
    if (!s) {
        buf_free(&src);
        buf_free(&args);
        return status;
    }
    char *name = name_opt ? strdup(name_opt) : cli_projection_name(file);
    if (isolate) {
        read_req rq = {.query = query, .get = get, .top = top, .list = list};
        status = run_isolated(cmd, s, name, &src, file, cpu, mem_mb, &rq, &args, reset);
        store_close(s);
        free(name);
        buf_free(&src);
        buf_free(&args);
        return status;
    }
    if (!persist && workers != 1) {
        read_req rq = {.query = query, .get = get, .top = top, .list = list};
        status = run_parallel(cmd, s, name, &src, file, cpu, mem_mb, workers, quiet, &rq, &args);
        store_close(s);
        free(name);
        buf_free(&src);
        buf_free(&args);
        return status;
    }
    proj_opts po = {.memory_limit = (size_t)mem_mb << 20, .cpu_limit = cpu,
                    .st = persist ? s : NULL, .source = s};
    proj *p = proj_new(name, src.ptr ? src.ptr : "", src.len, file, &po, &err);
    buf_free(&src);
    if (!p) {
        status = cli_fail(cmd, &err);
        goto out;
    }
    /* a dry run that never checkpoints keeps no dirty set (proj.h) */
    if (!persist && !proj_dead_letter_mode(p) && !proj_checkpoint_every(p) &&
        proj_set_one_shot(p, &err) < 0) {
        status = cli_fail(cmd, &err);
        goto out;
    }
    if (persist && reset && proj_reset(p, &err) < 0) {
        status = cli_fail(cmd, &err);
        goto out;
    }
    if (persist && proj_restore(p, &err) < 0) {
        status = cli_fail(cmd, &err);
        goto out;
    }
    run_opts ro = {.persist = persist, .quiet = quiet};
    status = run_serial(cmd, s, p, &ro);
    if (status) goto out;

    if (!query && !get && !list && !top && proj_partitioned(p)) {
        status = cli_print_pairs(cmd, proj_pairs, p);
        goto out;
    }
    buf out = BUF_INIT;
    int rc;
    if (query) rc = proj_query(p, query, args.ptr, args.len, &out, &err);
    else if (get) rc = proj_get(p, get, strlen(get), &out, &err);
    else if (list) rc = proj_partitions(p, &out, &err);
    else if (top) {
        uint64_t n;
        char *field = parse_top(top, &n);
        rc = proj_top(p, field, n, &out, &err);
        free(field);
    } else rc = proj_state(p, &out, &err);
    if (rc < 0) status = cli_fail(cmd, &err);
    else status = cli_print_json(cmd, &out);
    buf_free(&out);
out:
    proj_free(p);
    store_close(s);
    free(name);
    buf_free(&args);
    return status;
}
