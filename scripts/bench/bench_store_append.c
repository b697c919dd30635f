/* bench_store_append.c — the engine's side of the append benchmarks.
 *
 *   bench_store_append DIR EVENTS BATCH THREADS [NAME]
 *
 * Appends EVENTS benchmark events (bench_common.h: stream order-<n%1000>,
 * type OrderPlaced, a 3-key msgpack data map, no metadata, no id: the
 * store generates ids and stamps the time) to a fresh store at DIR through
 * the C API, store_append (engine/store.h), in the default durable mode
 * (acknowledged after fsync), with no expected-version checks (STORE_ANY).
 *   THREADS = 1: one thread appends batches of BATCH events, one call each.
 *   THREADS > 1: THREADS threads each append BATCH (normally 1) events per
 *                call, concurrently; the store's group commit is what is
 *                being measured.
 *
 * What is timed: only the store_append calls.  The events' msgpack data is
 * built before the clock starts (it is the caller's input, just as the
 * probe's records are built before its clock starts); opening and closing
 * the store are not timed.  After the clock stops (untimed) the program
 * checks that the store's last position is EVENTS and samples the stored
 * record size, so the result line can show that both sides wrote records
 * of the same size.
 *
 * Prints: BENCH name=NAME events=.. seconds=.. rate=.. record_bytes=..
 *         batch=.. threads=.. commits=.. (group commits: events per sync =
 *         events / commits in the durable mode)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>

#include "bench_common.h"
#include "store.h"

typedef struct run {
    store *s;
    tm_event *evs;
    uint64_t events, batch;
    atomic_uint_fast64_t next;
} run;

static void append_range(run *r, uint64_t from, uint64_t to)
{
    tm_err err;
    err_clear(&err);
    if (store_append(r->s, r->evs + from, (size_t)(to - from), NULL, 0, &err) < 0)
        bench_die("store_append (events %" PRIu64 "..%" PRIu64 "): %s", from, to, err.msg);
}

static void *appender_thread(void *arg)
{
    run *r = arg;
    for (;;) {
        uint64_t from = atomic_fetch_add(&r->next, r->batch);
        if (from >= r->events)
            break;
        append_range(r, from, from + r->batch > r->events ? r->events : from + r->batch);
    }
    return NULL;
}

/* Average stored record size, sampled as 10 runs of up to 1000 events
 * spread over the whole log (versions, hence sizes, grow along it). */
static double record_bytes(store *s, uint64_t events)
{
    uint64_t n = 0, bytes = 0;
    for (uint64_t k = 0; k < 10; k++) {
        tm_err err;
        err_clear(&err);
        store_iter *it = store_read_all(s, 1 + k * (events / 10), 0, 1000, &err);
        if (!it)
            bench_die("store_read_all: %s", err.msg);
        tm_event ev;
        int rc;
        while ((rc = store_iter_next(it, &ev, &err)) == 1) {
            const char *rec;
            size_t len;
            store_iter_record(it, &rec, &len);
            bytes += len;
            n++;
        }
        if (rc < 0)
            bench_die("store_iter_next: %s", err.msg);
        store_iter_free(it);
    }
    return n ? (double)bytes / (double)n : 0.0;
}

int main(int argc, char **argv)
{
    if (argc < 5 || argc > 6)
        bench_die("usage: bench_store_append DIR EVENTS BATCH THREADS [NAME]");
    const char *dir = argv[1];
    run r = {0};
    r.events = bench_arg_u64(argv[2], "EVENTS");
    r.batch = bench_arg_u64(argv[3], "BATCH");
    uint64_t threads = bench_arg_u64(argv[4], "THREADS");
    const char *name = argc == 6 ? argv[5] : "bench_store_append";

    /* The caller's input, built before the clock starts. */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    size_t *off = malloc((r.events + 1) * sizeof *off);
    char *streams = malloc(r.events * 16);
    r.evs = calloc(r.events, sizeof *r.evs);
    if (!off || !streams || !r.evs)
        bench_die("out of memory");
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    for (uint64_t n = 0; n < r.events; n++) {
        off[n] = sb.size;
        bench_pack_data(&pk, n);
    }
    off[r.events] = sb.size;
    for (uint64_t n = 0; n < r.events; n++) {
        tm_event *e = &r.evs[n];
        e->stream = streams + n * 16;
        e->stream_len = bench_stream(n, streams + n * 16, 16);
        e->type = "OrderPlaced";
        e->type_len = 11;
        e->data = sb.data + off[n];
        e->data_len = off[n + 1] - off[n];
    }

    store_opts o;
    store_opts_default(&o);
    o.durability = STORE_DURABLE;
    tm_err err;
    err_clear(&err);
    store *s = store_open(dir, &o, &err);
    if (!s)
        bench_die("store_open %s: %s", dir, err.msg);
    r.s = s;

    double t0 = bench_now();
    if (threads == 1) {
        for (uint64_t n = 0; n < r.events; n += r.batch)
            append_range(&r, n, n + r.batch > r.events ? r.events : n + r.batch);
    } else {
        pthread_t *tid = calloc(threads, sizeof *tid);
        if (!tid)
            bench_die("out of memory");
        atomic_init(&r.next, 0);
        for (uint64_t t = 0; t < threads; t++)
            if (pthread_create(&tid[t], NULL, appender_thread, &r))
                bench_die("pthread_create failed");
        for (uint64_t t = 0; t < threads; t++)
            pthread_join(tid[t], NULL);
        free(tid);
    }
    double secs = bench_now() - t0;

    /* Untimed checks. */
    if (store_last_position(s) != r.events)
        bench_die("store holds %" PRIu64 " events after appending %" PRIu64,
                  store_last_position(s), r.events);
    double rb = record_bytes(s, r.events);
    uint64_t commits = store_commits(s, NULL);
    store_close(s);

    char extra[160];
    snprintf(extra, sizeof extra,
             "record_bytes=%.1f batch=%" PRIu64 " threads=%" PRIu64 " commits=%" PRIu64, rb,
             r.batch, threads, commits);
    bench_result(name, r.events, secs, extra);
    msgpack_sbuffer_destroy(&sb);
    free(off);
    free(streams);
    free(r.evs);
    return 0;
}
