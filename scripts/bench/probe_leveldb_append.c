/* probe_leveldb_append.c — limit probe: raw LevelDB appends of event records.
 *
 *   probe_leveldb_append DIR EVENTS BATCH THREADS [NAME]
 *
 * Writes EVENTS records to a fresh LevelDB at DIR, key = be64 position
 * (1, 2, ...), value = the stored record of the benchmark's event (the
 * same bytes the engine stores: bench_common.h), in WriteBatches of BATCH
 * records, each write synced (sync=true, like the store's default durable
 * mode).  THREADS = 1: one thread writes batch after batch.  THREADS > 1:
 * THREADS threads each write their own batches concurrently and LevelDB's
 * writer queue groups them (one log write + one fsync per group).
 *
 * What is timed: only the leveldb_write calls (the records are built
 * before the clock starts, so this is the LevelDB limit itself; opening
 * and closing the database are not timed, as on the engine's side).
 *
 * LevelDB options: configured like the store (engine/store.c store_open):
 * snappy, 64 MiB write buffer, 8 MiB table files; not its bloom filter
 * (only point lookups need it; building it is work the probe skips, which
 * makes the limit stronger).  BENCH_LDB_WRITE_BUFFER (bytes) overrides the
 * write buffer size.
 *
 * Prints: BENCH name=NAME events=.. seconds=.. rate=.. record_bytes=..
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>

#include <leveldb/c.h>

#include "bench_common.h"

typedef struct probe {
    leveldb_t *db;
    leveldb_writeoptions_t *wo;
    const char *arena;      /* all records, back to back */
    const size_t *off;      /* record n is arena[off[n] .. off[n+1]) */
    uint64_t events, batch;
    atomic_uint_fast64_t next; /* next event index to claim (THREADS > 1) */
} probe;

static void write_range(probe *p, leveldb_writebatch_t *wb, uint64_t from, uint64_t to)
{
    char key[8], *err = NULL;
    leveldb_writebatch_clear(wb);
    for (uint64_t n = from; n < to; n++) {
        bench_be64(key, n + 1);
        leveldb_writebatch_put(wb, key, 8, p->arena + p->off[n], p->off[n + 1] - p->off[n]);
    }
    leveldb_write(p->db, p->wo, wb, &err);
    if (err)
        bench_die("leveldb_write: %s", err);
}

static void *writer_thread(void *arg)
{
    probe *p = arg;
    leveldb_writebatch_t *wb = leveldb_writebatch_create();
    for (;;) {
        uint64_t from = atomic_fetch_add(&p->next, p->batch);
        if (from >= p->events)
            break;
        uint64_t to = from + p->batch > p->events ? p->events : from + p->batch;
        write_range(p, wb, from, to);
    }
    leveldb_writebatch_destroy(wb);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 5 || argc > 6)
        bench_die("usage: probe_leveldb_append DIR EVENTS BATCH THREADS [NAME]");
    const char *dir = argv[1];
    probe p = {0};
    p.events = bench_arg_u64(argv[2], "EVENTS");
    p.batch = bench_arg_u64(argv[3], "BATCH");
    uint64_t threads = bench_arg_u64(argv[4], "THREADS");
    const char *name = argc == 6 ? argv[5] : "probe_leveldb_append";

    /* Build every record before the clock starts. */
    bench_crc_init();
    srand(1);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    size_t *off = malloc((p.events + 1) * sizeof *off);
    if (!off)
        bench_die("out of memory");
    int64_t now = bench_wall_ms();
    for (uint64_t n = 0; n < p.events; n++) {
        off[n] = sb.size;
        bench_record(&sb, n, now);
    }
    off[p.events] = sb.size;
    p.arena = sb.data;
    p.off = off;

    leveldb_options_t *o = leveldb_options_create();
    leveldb_options_set_create_if_missing(o, 1);
    leveldb_options_set_error_if_exists(o, 1);
    leveldb_options_set_compression(o, leveldb_snappy_compression);
    leveldb_options_set_max_file_size(o, 8u << 20);
    const char *wbuf = getenv("BENCH_LDB_WRITE_BUFFER");
    leveldb_options_set_write_buffer_size(
        o, wbuf && *wbuf ? bench_arg_u64(wbuf, "BENCH_LDB_WRITE_BUFFER") : 64u << 20);
    char *err = NULL;
    p.db = leveldb_open(o, dir, &err);
    if (err)
        bench_die("leveldb_open %s: %s", dir, err);
    p.wo = leveldb_writeoptions_create();
    leveldb_writeoptions_set_sync(p.wo, 1);

    double t0 = bench_now();
    if (threads == 1) {
        leveldb_writebatch_t *wb = leveldb_writebatch_create();
        for (uint64_t n = 0; n < p.events; n += p.batch)
            write_range(&p, wb, n, n + p.batch > p.events ? p.events : n + p.batch);
        leveldb_writebatch_destroy(wb);
    } else {
        pthread_t *tid = calloc(threads, sizeof *tid);
        if (!tid)
            bench_die("out of memory");
        atomic_init(&p.next, 0);
        for (uint64_t t = 0; t < threads; t++)
            if (pthread_create(&tid[t], NULL, writer_thread, &p))
                bench_die("pthread_create failed");
        for (uint64_t t = 0; t < threads; t++)
            pthread_join(tid[t], NULL);
        free(tid);
    }
    double secs = bench_now() - t0;

    leveldb_writeoptions_destroy(p.wo);
    leveldb_close(p.db);
    leveldb_options_destroy(o);

    char extra[128];
    snprintf(extra, sizeof extra, "record_bytes=%.1f batch=%" PRIu64 " threads=%" PRIu64,
             (double)sb.size / (double)p.events, p.batch, threads);
    bench_result(name, p.events, secs, extra);
    msgpack_sbuffer_destroy(&sb);
    free(off);
    return 0;
}
