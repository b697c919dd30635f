/* cli_import.c — `tidemark import`: JSON lines into the store in large
 * atomic batches.
 *
 * Pipeline: the main thread reads and parses lines into a batch while a
 * committer thread appends the previous batch (store_append: one atomic,
 * synced write per batch).  At most one batch is in flight, so a failure
 * leaves a precise boundary: every batch before it is committed, nothing
 * of it or after it is written.  A bad line stops the import with its
 * line number; the events parsed before it in the same batch are dropped
 * (nothing is half written) and the summary says which lines are stored.
 */
#include <getopt.h>
#include <pthread.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "buf.h"
#include "cli.h"
#include "event.h"
#include "progress.h"

typedef struct ibatch {
    buf scratch;          /* parsed msgpack of every event in the batch */
    tm_event *evs;
    size_t n, cap;
    uint64_t first_line, last_line;
} ibatch;

typedef struct committer {
    store *s;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ibatch *pending;      /* handed over, not yet committed */
    int busy, quit, failed;
    tm_err err;
    uint64_t committed_events, committed_last_line, first_pos, last_pos;
} committer;

/* Pointers of a parsed event are stored as offsets into scratch until the
 * batch is complete (scratch may move while the batch grows). */
#define OFF(p) ((const char *)(uintptr_t)(p))

static void batch_rebase(ibatch *b) {
    for (size_t i = 0; i < b->n; i++) {
        tm_event *ev = &b->evs[i];
        ev->stream = b->scratch.ptr + (uintptr_t)ev->stream;
        ev->type = b->scratch.ptr + (uintptr_t)ev->type;
        ev->data = b->scratch.ptr + (uintptr_t)ev->data;
        if (ev->meta_len) ev->meta = b->scratch.ptr + (uintptr_t)ev->meta;
    }
}

static int in_buf(const buf *b, const char *p) { return p >= b->ptr && p < b->ptr + b->len; }

/* Parse one line into the batch; -1 with e filled on bad input. */
static int batch_add(ibatch *b, const char *line, size_t len, tm_err *e) {
    if (b->n == b->cap) {
        b->cap = b->cap ? b->cap * 2 : 1024;
        b->evs = realloc(b->evs, b->cap * sizeof *b->evs);
        if (!b->evs) tm_oom();
    }
    tm_event *ev = &b->evs[b->n];
    memset(ev, 0, sizeof *ev);
    /* event_from_json checks the names too */
    if (event_from_json(line, len, NULL, 0, NULL, &b->scratch, ev, e) < 0) return -1;
    /* stream, type, data, metadata all live in scratch after a JSON parse;
     * a value that does not (e.g. a shared nil) is copied in. */
    const char **ptrs[4] = {&ev->stream, &ev->type, &ev->data, &ev->meta};
    size_t lens[4] = {ev->stream_len, ev->type_len, ev->data_len, ev->meta_len};
    for (int i = 0; i < 4; i++) {
        if (lens[i] == 0) continue;
        if (!in_buf(&b->scratch, *ptrs[i])) {
            size_t off = b->scratch.len;
            buf_append(&b->scratch, *ptrs[i], lens[i]);
            *ptrs[i] = OFF(off);
        } else {
            *ptrs[i] = OFF(*ptrs[i] - b->scratch.ptr);
        }
    }
    b->n++;
    return 0;
}

static void batch_reset(ibatch *b) {
    buf_reset(&b->scratch);
    b->n = 0;
}

static void *committer_main(void *arg) {
    committer *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->pending && !c->quit) pthread_cond_wait(&c->cv, &c->mu);
        if (!c->pending) break;
        ibatch *b = c->pending;
        pthread_mutex_unlock(&c->mu);
        tm_err e;
        err_clear(&e);
        int r = store_append(c->s, b->evs, b->n, NULL, 0, &e);
        pthread_mutex_lock(&c->mu);
        if (r < 0) {
            c->failed = 1;
            c->err = e;
        } else {
            if (!c->committed_events) c->first_pos = b->evs[0].position;
            c->last_pos = b->evs[b->n - 1].position;
            c->committed_events += b->n;
            c->committed_last_line = b->last_line;
        }
        c->pending = NULL;
        c->busy = 0;
        pthread_cond_broadcast(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Wait until the committer is idle; returns its failed flag. */
static int committer_wait(committer *c) {
    pthread_mutex_lock(&c->mu);
    while (c->busy) pthread_cond_wait(&c->cv, &c->mu);
    int f = c->failed;
    pthread_mutex_unlock(&c->mu);
    return f;
}

static void committer_submit(committer *c, ibatch *b) {
    pthread_mutex_lock(&c->mu);
    c->pending = b;
    c->busy = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static const char import_help[] =
    "usage: tidemark import --data DIR FILE.jsonl [options]\n"
    "\n"
    "Append events from a JSON-lines file (- for stdin), one event per line:\n"
    "  {\"stream\":\"order-1\",\"type\":\"OrderPlaced\",\"data\":{...},\n"
    "   \"metadata\":{...},\"id\":\"<uuid>\",\"time\":1700000000000}\n"
    "id, metadata and time are optional; position and version (as written by\n"
    "'tidemark export') are ignored.  Events are committed in atomic batches;\n"
    "a bad line stops the import with its line number, and nothing after the\n"
    "last committed batch is written.  Re-importing a file whose events carry\n"
    "ids stores nothing twice (batches already stored are recognised).\n"
    "\n"
    "options:\n"
    "  --data DIR          data directory (created if missing)\n"
    "  --batch N           events per atomic batch (default 10000)\n"
    "  --durability MODE   durable (default) or lose-on-os-crash\n"
    "  --quiet             no progress or summary on stderr\n"
    "\n"
    "Exit status: 0 all imported, 1 usage or a bad line (nothing after the last\n"
    "stored batch is stored), 2 no such FILE, 4 I/O error (what was stored is said).\n"
    "Progress (rate, and ETA when the size is known) goes to stderr.\n";

typedef struct import_opts {
    const char *dir, *file;
    uint64_t batch;
    int quiet;
    store_opts so;
} import_opts;

static int parse_import_opts(int argc, char **argv, import_opts *o) {
    const char *cmd = "import";
    static const struct option opts[] = {{"data", required_argument, 0, 'd'},
                                         {"batch", required_argument, 0, 'b'},
                                         {"durability", required_argument, 0, 'D'},
                                         {"quiet", no_argument, 0, 'q'},
                                         {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    o->batch = 10000;
    store_opts_default(&o->so);
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'd': o->dir = optarg; break;
        case 'b':
            if (cli_parse_u64(cmd, "--batch", optarg, &o->batch) < 0) return -1;
            if (o->batch == 0 || o->batch > 1000000)
                return cli_usage_error(cmd, "--batch must be 1..1000000"), -1;
            break;
        case 'D': if (cli_parse_durability(cmd, optarg, &o->so.durability) < 0) return -1; break;
        case 'q': o->quiet = 1; break;
        default: cli_usage_error(cmd, "unknown option"); return -1;
        }
    }
    if (argc - optind != 1) {
        cli_usage_error(cmd, "expected one FILE (or - for stdin)");
        return -1;
    }
    o->file = argv[optind];
    return 0;
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

int cli_import(int argc, char **argv) {
    const char *cmd = "import";
    for (int i = 1; i < argc && strcmp(argv[i], "--"); i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            return fputs(import_help, stdout), 0;
    import_opts o;
    if (parse_import_opts(argc, argv, &o) < 0) return 1;

    FILE *in = strcmp(o.file, "-") ? fopen(o.file, "r") : stdin;
    if (!in) {
        int code = cli_open_code(errno);
        fprintf(stderr, "tidemark import: cannot open '%s': %m\n", o.file);
        return code;
    }
    struct stat st;
    uint64_t total = (fstat(fileno(in), &st) == 0 && S_ISREG(st.st_mode)) ? (uint64_t)st.st_size : 0;
    int status = 0;
    store *s = cli_open_store(cmd, o.dir, 1, &o.so, &status);
    if (!s) {
        if (in != stdin) fclose(in);
        return status;
    }
    static char ibuf[1 << 20];
    setvbuf(in, ibuf, _IOFBF, sizeof ibuf);

    committer c;
    memset(&c, 0, sizeof c);
    c.s = s;
    pthread_mutex_init(&c.mu, NULL);
    pthread_cond_init(&c.cv, NULL);
    int terr = pthread_create(&c.th, NULL, committer_main, &c);
    if (terr) {
        fprintf(stderr, "tidemark import: cannot start the commit thread: %s; nothing was stored\n",
                strerror(terr));
        store_close(s);
        if (in != stdin) fclose(in);
        return TM_EIO;
    }

    ibatch batches[2];
    memset(batches, 0, sizeof batches);
    int cur = 0;
    progress *pg = progress_new(stderr, "import", total, "events", o.quiet);
    size_t max_line = o.so.max_event_size * 4 + 65536;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    uint64_t lineno = 0, bytes = 0, parsed = 0;
    tm_err e;
    err_clear(&e);
    int bad = 0;
    while ((len = getline(&line, &cap, in)) != -1) {
        lineno++;
        bytes += (uint64_t)len;
        if (is_blank(line, (size_t)len)) continue;
        ibatch *b = &batches[cur];
        if (b->n == 0) b->first_line = lineno;
        if ((size_t)len > max_line) {
            err_set(&e, TM_EINVAL, "line %llu: %zd bytes is longer than the limit (%zu)",
                    (unsigned long long)lineno, len, max_line);
            bad = 1;
            break;
        }
        if (batch_add(b, line, (size_t)len, &e) < 0) {
            err_prefix(&e, "line %llu", (unsigned long long)lineno);
            bad = 1;
            break;
        }
        b->last_line = lineno;
        parsed++;
        if (b->n >= o.batch) {
            if (committer_wait(&c)) break;
            batch_rebase(b);
            committer_submit(&c, b);
            cur ^= 1;
            batch_reset(&batches[cur]);
        }
        progress_update(pg, bytes, parsed);
    }
    /* When getline ended the loop: its -1 is the end only at EOF (out of
     * memory leaves no error flag on the stream; errno says ENOMEM). */
    if (!bad && len == -1 && (ferror(in) || !feof(in))) {
        err_set(&e, TM_EIO, "reading '%s' failed after line %llu: %s", o.file,
                (unsigned long long)lineno, strerror(errno));
        bad = 1;
    }
    /* The final partial batch is committed only when the input was good. */
    if (!bad && !committer_wait(&c) && batches[cur].n) {
        batch_rebase(&batches[cur]);
        committer_submit(&c, &batches[cur]);
    }
    int failed = committer_wait(&c);
    pthread_mutex_lock(&c.mu);
    c.quit = 1;
    pthread_cond_broadcast(&c.cv);
    pthread_mutex_unlock(&c.mu);
    pthread_join(c.th, NULL);
    double secs = progress_elapsed(pg);
    progress_end(pg);

    if (bad) status = cli_fail(cmd, &e);
    else if (failed) status = cli_fail(cmd, &c.err);
    if (!o.quiet || status) {
        if (c.committed_events)
            fprintf(stderr,
                    "tidemark import: %s %llu events (lines 1-%llu, positions %llu-%llu) in "
                    "%.2f s, %.0f events/s\n",
                    status ? "stored" : "imported", (unsigned long long)c.committed_events,
                    (unsigned long long)c.committed_last_line, (unsigned long long)c.first_pos,
                    (unsigned long long)c.last_pos, secs,
                    secs > 0 ? (double)c.committed_events / secs : 0.0);
        else
            fprintf(stderr, "tidemark import: %s\n",
                    status ? "nothing was stored" : "no events in the input");
        if (status && c.committed_events)
            fprintf(stderr, "tidemark import: nothing after line %llu was stored\n",
                    (unsigned long long)c.committed_last_line);
    }
    free(line);
    for (int i = 0; i < 2; i++) {
        buf_free(&batches[i].scratch);
        free(batches[i].evs);
    }
    pthread_mutex_destroy(&c.mu);
    pthread_cond_destroy(&c.cv);
    if (in != stdin) fclose(in);
    store_close(s);
    return status;
}
