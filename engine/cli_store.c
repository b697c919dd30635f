/* cli_store.c — the store commands: append, read, import, export, check.
 *
 * Each opens the data directory itself (the LevelDB lock makes a second
 * process fail with a clear message), does its work through store.h, and
 * turns a tm_err into a message and exit status once, via cli_fail.
 * JSON lines go to stdout through a large buffer; progress and errors go
 * to stderr.
 */
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "buf.h"
#include "cli.h"
#include "event.h"
#include "json.h"
#include "progress.h"

/* ---------------------------------------------------------------- helpers */

static int parse_expect(const char *cmd, const char *s, int64_t *out) {
    if (!strcmp(s, "any")) *out = STORE_ANY;
    else if (!strcmp(s, "no_stream")) *out = STORE_NO_STREAM;
    else if (!strcmp(s, "exists")) *out = STORE_EXISTS;
    else {
        uint64_t v;
        if (cli_parse_u64(cmd, "--expect", s, &v) < 0) return -1;
        if (v > INT64_MAX) return cli_usage_error(cmd, "--expect %s is too large", s), -1;
        *out = (int64_t)v;
    }
    return 0;
}

static int want_help(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--")) break;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return 1;
    }
    return 0;
}

#define OUT_CHUNK (256u << 10)

/* Write pending to out (and empty it).  0 / -1. */
static int flush_lines(buf *pending, FILE *out, tm_err *e) {
    size_t n = pending->len;
    int ok = !n || fwrite(pending->ptr, 1, n, out) == n;
    buf_reset(pending);
    return ok ? 0 : err_set(e, TM_EIO, "writing output: short write");
}

/* Add one event as a JSON line to pending, written to out in chunks of
 * OUT_CHUNK bytes (flush_lines writes the rest). */
static int put_event_line(const tm_event *ev, buf *pending, FILE *out, tm_err *e) {
    if (event_to_json(ev, pending, e) < 0) return -1;
    buf_putc(pending, '\n');
    return pending->len >= OUT_CHUNK ? flush_lines(pending, out, e) : 0;
}

/* ----------------------------------------------------------------- append */

static const char append_help[] =
    "usage: tidemark append --data DIR STREAM TYPE JSON [options]\n"
    "\n"
    "Append one event to STREAM.  JSON is the event's data (any JSON value).\n"
    "Prints {\"position\":N,\"version\":V,\"id\":\"...\"} on success.\n"
    "\n"
    "options:\n"
    "  --data DIR          data directory (created if missing)\n"
    "  --expect V          expected stream version: any (default), no_stream,\n"
    "                      exists, or a number; a mismatch exits 3 and names\n"
    "                      the current version\n"
    "  --id UUID           event id (default: generated); re-sending the same id\n"
    "                      with the same content is a no-op that prints the\n"
    "                      original position\n"
    "  --metadata JSON     metadata object, e.g. '{\"correlation_id\":\"c-1\"}'\n"
    "  --time MS           event time in ms since the epoch (default: now)\n"
    "  --durability MODE   durable (default: fsync before success) or\n"
    "                      lose-on-os-crash (no fsync: safe against a killed\n"
    "                      process, not against an OS crash or power cut)\n"
    "\n"
    "example:\n"
    "  tidemark append --data ./data order-17 OrderPlaced '{\"customer\":\"c-9\",\"amount\":42.5}'\n";

int cli_append(int argc, char **argv) {
    const char *cmd = "append";
    if (want_help(argc, argv)) return fputs(append_help, stdout), 0;
    static const struct option opts[] = {
        {"data", required_argument, 0, 'd'},     {"expect", required_argument, 0, 'x'},
        {"id", required_argument, 0, 'i'},       {"metadata", required_argument, 0, 'm'},
        {"time", required_argument, 0, 't'},     {"durability", required_argument, 0, 'D'},
        {0, 0, 0, 0}};
    const char *dir = NULL, *id = NULL, *meta = NULL;
    int64_t expect = STORE_ANY;
    uint64_t time_ms = 0;
    store_opts so;
    store_opts_default(&so);
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dir = optarg; break;
        case 'x': if (parse_expect(cmd, optarg, &expect) < 0) return 1; break;
        case 'i': id = optarg; break;
        case 'm': meta = optarg; break;
        case 't': if (cli_parse_u64(cmd, "--time", optarg, &time_ms) < 0) return 1; break;
        case 'D': if (cli_parse_durability(cmd, optarg, &so.durability) < 0) return 1; break;
        default: return cli_usage_error(cmd, "unknown option");
        }
    }
    if (argc - optind != 3)
        return cli_usage_error(cmd, "expected STREAM TYPE JSON, got %d argument(s)", argc - optind);
    const char *stream = argv[optind], *type = argv[optind + 1], *json = argv[optind + 2];

    tm_err e;
    err_clear(&e);
    buf data = BUF_INIT, mbuf = BUF_INIT;
    int status = 0;
    tm_event ev;
    memset(&ev, 0, sizeof ev);
    if (json_to_mp(json, strlen(json), NULL, &data, &e) < 0) {
        err_prefix(&e, "data is not valid JSON");
        status = cli_fail(cmd, &e);
        goto out;
    }
    if (meta) {
        if (json_to_mp(meta, strlen(meta), NULL, &mbuf, &e) < 0) {
            err_prefix(&e, "--metadata is not valid JSON");
            status = cli_fail(cmd, &e);
            goto out;
        }
        if (mbuf.len == 0 || !(((unsigned char)mbuf.ptr[0] & 0xf0) == 0x80 ||
                               (unsigned char)mbuf.ptr[0] == 0xde ||
                               (unsigned char)mbuf.ptr[0] == 0xdf)) {
            status = cli_usage_error(cmd, "--metadata must be a JSON object");
            goto out;
        }
        ev.meta = mbuf.ptr;
        ev.meta_len = mbuf.len;
    }
    if (id) {
        if (event_id_parse(id, strlen(id), ev.id) < 0) {
            status = cli_usage_error(cmd, "--id '%s' is not a UUID", id);
            goto out;
        }
        ev.has_id = 1;
    }
    ev.stream = stream;
    ev.stream_len = strlen(stream);
    ev.type = type;
    ev.type_len = strlen(type);
    ev.data = data.ptr;
    ev.data_len = data.len;
    ev.time_ms = (int64_t)time_ms;

    store *s = cli_open_store(cmd, dir, 1, &so, &status);
    if (!s) goto out;
    store_expect x = {stream, ev.stream_len, expect};
    if (store_append(s, &ev, 1, &x, 1, &e) < 0) {
        status = cli_fail(cmd, &e);
    } else {
        char ids[37];
        event_id_format(ev.id, ids);
        printf("{\"position\":%llu,\"version\":%llu,\"id\":\"%s\"}\n",
               (unsigned long long)ev.position, (unsigned long long)ev.version, ids);
    }
    store_close(s);
out:
    buf_free(&data);
    buf_free(&mbuf);
    return status;
}

/* ------------------------------------------------------------ read/export */

static const char read_help[] =
    "usage: tidemark read --data DIR (STREAM | --all | --category C | --type T) [options]\n"
    "\n"
    "Print events as JSON lines (the export format, with position and version).\n"
    "\n"
    "options:\n"
    "  --data DIR        data directory\n"
    "  --all             every event, in position order\n"
    "  --category C      events of streams in category C (stream name up to the\n"
    "                    first '-': order-17 is in category order)\n"
    "  --type T          events of type T\n"
    "  --from N          start at version N (a stream) or position N (others);\n"
    "                    default: the first (or, with --backward, the last)\n"
    "  --limit N         at most N events (default: all)\n"
    "  --backward        newest first (a stream or --all)\n"
    "\n"
    "exit status: 2 when STREAM does not exist.\n";

typedef enum { READ_STREAM, READ_ALL, READ_CATEGORY, READ_TYPE } read_mode;

static int read_events(const char *cmd, store *s, read_mode mode, const char *name,
                       uint64_t from, int from_set, int backward, uint64_t limit) {
    tm_err e;
    err_clear(&e);
    store_iter *it = NULL;
    size_t nl = name ? strlen(name) : 0;
    if (backward && !from_set) from = UINT64_MAX;
    switch (mode) {
    case READ_STREAM: {
        int64_t v;
        int r = store_stream_version(s, name, nl, &v, &e);
        if (r < 0) return cli_fail(cmd, &e);
        if (r == 0) {
            fprintf(stderr, "tidemark %s: stream '%s' not found\n", cmd, name);
            return TM_ENOTFOUND;
        }
        it = store_read_stream(s, name, nl, from, backward, limit, &e);
        break;
    }
    case READ_ALL: it = store_read_all(s, from_set || backward ? from : 1, backward, limit, &e); break;
    case READ_CATEGORY: it = store_read_category(s, name, nl, from, limit, &e); break;
    case READ_TYPE: it = store_read_type(s, name, nl, from, limit, &e); break;
    }
    if (!it) return cli_fail(cmd, &e);
    buf line = BUF_INIT; /* pending lines, written OUT_CHUNK at a time (stdio passes
                            a write larger than its buffer straight through) */
    buf_reserve(&line, OUT_CHUNK + 4096);
    tm_event ev;
    int r, status = 0;
    while ((r = store_iter_next(it, &ev, &e)) == 1) {
        if (put_event_line(&ev, &line, stdout, &e) < 0) {
            r = -1;
            break;
        }
    }
    tm_err fe;
    if (flush_lines(&line, stdout, &fe) < 0 && r >= 0) { /* the lines before any error */
        e = fe;
        r = -1;
    }
    if (r < 0) status = cli_fail(cmd, &e);
    if (fflush(stdout) != 0 && !status) {
        fprintf(stderr, "tidemark %s: writing output failed\n", cmd);
        status = TM_EIO;
    }
    buf_free(&line);
    store_iter_free(it);
    return status;
}

int cli_read(int argc, char **argv) {
    const char *cmd = "read";
    if (want_help(argc, argv)) return fputs(read_help, stdout), 0;
    static const struct option opts[] = {
        {"data", required_argument, 0, 'd'},     {"all", no_argument, 0, 'a'},
        {"category", required_argument, 0, 'c'}, {"type", required_argument, 0, 't'},
        {"from", required_argument, 0, 'f'},     {"limit", required_argument, 0, 'l'},
        {"backward", no_argument, 0, 'b'},       {0, 0, 0, 0}};
    const char *dir = NULL, *name = NULL;
    int modes = 0, from_set = 0, backward = 0;
    read_mode mode = READ_STREAM;
    uint64_t from = 0, limit = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dir = optarg; break;
        case 'a': mode = READ_ALL, modes++; break;
        case 'c': mode = READ_CATEGORY, name = optarg, modes++; break;
        case 't': mode = READ_TYPE, name = optarg, modes++; break;
        case 'f': if (cli_parse_u64(cmd, "--from", optarg, &from) < 0) return 1; from_set = 1; break;
        case 'l': if (cli_parse_u64(cmd, "--limit", optarg, &limit) < 0) return 1; break;
        case 'b': backward = 1; break;
        default: return cli_usage_error(cmd, "unknown option");
        }
    }
    int npos = argc - optind;
    if (npos == 1 && modes == 0) name = argv[optind], modes = 1;
    else if (npos > 0) return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    if (modes != 1)
        return cli_usage_error(cmd, "give exactly one of STREAM, --all, --category, --type");
    if (backward && (mode == READ_CATEGORY || mode == READ_TYPE))
        return cli_usage_error(cmd, "--backward works with a STREAM or --all");
    int status = 0;
    store *s = cli_open_store(cmd, dir, 0, NULL, &status);
    if (!s) return status;
    status = read_events(cmd, s, mode, name, from, from_set, backward, limit);
    store_close(s);
    return status;
}

static const char export_help[] =
    "usage: tidemark export --data DIR [--from POS]\n"
    "\n"
    "Print every event from position POS (default 1) as JSON lines, in the\n"
    "format 'tidemark import' reads (plus position and version).\n";

int cli_export(int argc, char **argv) {
    const char *cmd = "export";
    if (want_help(argc, argv)) return fputs(export_help, stdout), 0;
    static const struct option opts[] = {{"data", required_argument, 0, 'd'},
                                         {"from", required_argument, 0, 'f'},
                                         {0, 0, 0, 0}};
    const char *dir = NULL;
    uint64_t from = 1;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dir = optarg; break;
        case 'f': if (cli_parse_u64(cmd, "--from", optarg, &from) < 0) return 1; break;
        default: return cli_usage_error(cmd, "unknown option");
        }
    }
    if (optind < argc) return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    int status = 0;
    store *s = cli_open_store(cmd, dir, 0, NULL, &status);
    if (!s) return status;
    status = read_events(cmd, s, READ_ALL, NULL, from ? from : 1, 1, 0, 0);
    store_close(s);
    return status;
}

/* ------------------------------------------------------------------ check */

static const char check_help[] =
    "usage: tidemark check --data DIR [--quiet]\n"
    "\n"
    "Verify the store: positions gapless from 1, every record's checksum and\n"
    "shape, each stream's versions contiguous, and the stream, category, type\n"
    "and event-id indexes in agreement with the log (both ways).  Prints each\n"
    "problem on its own line and a summary.  Exit 0 only when clean, 4 when a\n"
    "problem was found.\n";

int cli_check(int argc, char **argv) {
    const char *cmd = "check";
    if (want_help(argc, argv)) return fputs(check_help, stdout), 0;
    static const struct option opts[] = {{"data", required_argument, 0, 'd'},
                                         {"quiet", no_argument, 0, 'q'},
                                         {0, 0, 0, 0}};
    const char *dir = NULL;
    int quiet = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dir = optarg; break;
        case 'q': quiet = 1; break;
        default: return cli_usage_error(cmd, "unknown option");
        }
    }
    if (optind < argc) return cli_usage_error(cmd, "unexpected argument '%s'", argv[optind]);
    int status = 0;
    store *s = cli_open_store(cmd, dir, 0, NULL, &status);
    if (!s) return status;
    tm_err e;
    err_clear(&e);
    store_check_report rep;
    memset(&rep, 0, sizeof rep);
    if (store_check(s, quiet ? NULL : stdout, &rep, &e) < 0) {
        status = cli_fail(cmd, &e);
    } else {
        printf("%s: %llu events, %llu streams, %llu categories, %llu types, %llu ids; "
               "%llu problem%s\n",
               rep.problems ? "NOT CLEAN" : "clean", (unsigned long long)rep.events,
               (unsigned long long)rep.streams, (unsigned long long)rep.categories,
               (unsigned long long)rep.types, (unsigned long long)rep.ids,
               (unsigned long long)rep.problems, rep.problems == 1 ? "" : "s");
        status = rep.problems ? TM_EIO : 0;
    }
    store_close(s);
    return status;
}
