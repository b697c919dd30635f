/* probe_leveldb_scan.c — limit probe: LevelDB scan plus msgpack decode.
 *
 *   probe_leveldb_scan DIR EXPECTED [NAME]
 *   probe_leveldb_scan DIR settle
 *
 * Opens the LevelDB at DIR (written by probe_leveldb_append: key = be64
 * position, value = crc32c + msgpack record), iterates over every key in
 * order and decodes every msgpack item of every value with a plain walk
 * (no allocation, no tree: each item's header is read, numbers are
 * converted, strings and binaries are taken as (ptr, len)), folding the
 * decoded values into a checksum so that nothing can be optimised away.
 * Fails unless exactly EXPECTED records were read and each decoded cleanly.
 *
 * What is timed: open + scan + decode + close, i.e. what one process
 * reading the whole log does (the engine side is a whole
 * `tidemark read --all` process).  The runner first "settles" both
 * databases, untimed (`settle` here opens and closes the database): a
 * LevelDB that was just written still holds its last memtable in the log,
 * and the first open replays it into a table file -- work that belongs to
 * neither a scan nor a read.  fill_cache is off (a one-pass scan
 * gains nothing from the block cache), which makes this the stronger limit.
 *
 * Prints: BENCH name=NAME events=.. seconds=.. rate=.. bytes=..
 */
#include <leveldb/c.h>

#include "bench_common.h"

typedef struct walk {
    const unsigned char *p, *end;
    uint64_t acc;
} walk;

static uint64_t rd(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static void fold(walk *w, uint64_t v)
{
    w->acc = (w->acc ^ v) * 0x100000001B3ull;
}

/* Decode one msgpack value (recursively). 0 ok, -1 malformed/truncated. */
static int walk_value(walk *w, int depth)
{
    if (w->p >= w->end || depth > 64)
        return -1;
    unsigned c = *w->p++;
    uint64_t len = 0, count = 0;
    int is_map = 0, is_container = 0, nbytes = 0;
    if (c <= 0x7f) {
        fold(w, c);
        return 0;
    } else if (c >= 0xe0) {
        fold(w, (uint64_t)(int8_t)c);
        return 0;
    } else if ((c & 0xf0) == 0x80) {
        count = c & 0x0f, is_map = 1, is_container = 1;
    } else if ((c & 0xf0) == 0x90) {
        count = c & 0x0f, is_container = 1;
    } else if ((c & 0xe0) == 0xa0) {
        len = c & 0x1f;
    } else {
        switch (c) {
        case 0xc0: fold(w, 0); return 0;
        case 0xc2: case 0xc3: fold(w, c & 1); return 0;
        case 0xc4: case 0xd9: nbytes = 1; break;              /* bin8, str8 */
        case 0xc5: case 0xda: nbytes = 2; break;              /* bin16, str16 */
        case 0xc6: case 0xdb: nbytes = 4; break;              /* bin32, str32 */
        case 0xca: {                                          /* float32 */
            if (w->end - w->p < 4) return -1;
            uint32_t u = (uint32_t)rd(w->p, 4);
            float f;
            memcpy(&f, &u, 4);
            double d = f;
            uint64_t bits;
            memcpy(&bits, &d, 8);
            fold(w, bits);
            w->p += 4;
            return 0;
        }
        case 0xcb: {                                          /* float64 */
            if (w->end - w->p < 8) return -1;
            uint64_t u = rd(w->p, 8);
            double d;
            memcpy(&d, &u, 8);
            memcpy(&u, &d, 8);
            fold(w, u);
            w->p += 8;
            return 0;
        }
        case 0xcc: case 0xcd: case 0xce: case 0xcf: {         /* uint 8..64 */
            int n = 1 << (c - 0xcc);
            if (w->end - w->p < n) return -1;
            fold(w, rd(w->p, n));
            w->p += n;
            return 0;
        }
        case 0xd0: case 0xd1: case 0xd2: case 0xd3: {         /* int 8..64 */
            int n = 1 << (c - 0xd0);
            if (w->end - w->p < n) return -1;
            uint64_t u = rd(w->p, n);
            int64_t v = n == 8 ? (int64_t)u : (int64_t)(u << (64 - 8 * n)) >> (64 - 8 * n);
            fold(w, (uint64_t)v);
            w->p += n;
            return 0;
        }
        case 0xdc: case 0xdd:                                 /* array16/32 */
            nbytes = c == 0xdc ? 2 : 4, is_container = 1;
            break;
        case 0xde: case 0xdf:                                 /* map16/32 */
            nbytes = c == 0xde ? 2 : 4, is_container = 1, is_map = 1;
            break;
        case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext */
            len = 1u << (c - 0xd4);
            if (w->end - w->p < (long)len + 1) return -1;
            fold(w, w->p[0]);
            w->p += 1 + len;
            return 0;
        case 0xc7: case 0xc8: case 0xc9: {                    /* ext8/16/32 */
            int n = 1 << (c - 0xc7);
            if (w->end - w->p < n + 1) return -1;
            len = rd(w->p, n);
            w->p += n + 1;
            if ((uint64_t)(w->end - w->p) < len) return -1;
            w->p += len;
            fold(w, len);
            return 0;
        }
        default:
            return -1;
        }
        if (w->end - w->p < nbytes) return -1;
        if (is_container)
            count = rd(w->p, nbytes);
        else
            len = rd(w->p, nbytes);
        w->p += nbytes;
    }
    if (is_container) {
        uint64_t items = is_map ? count * 2 : count;
        fold(w, count);
        for (uint64_t i = 0; i < items; i++)
            if (walk_value(w, depth + 1) < 0)
                return -1;
        return 0;
    }
    /* str / bin: take (ptr, len) and look at it the way a reader would */
    if ((uint64_t)(w->end - w->p) < len)
        return -1;
    fold(w, len ^ (len ? w->p[0] : 0));
    w->p += len;
    return 0;
}

/* Options like the store's (and probe_leveldb_append's), so a settle
 * replays the log into tables the way the store would. */
static leveldb_options_t *scan_options(void)
{
    leveldb_options_t *o = leveldb_options_create();
    leveldb_options_set_compression(o, leveldb_snappy_compression);
    leveldb_options_set_max_file_size(o, 8u << 20);
    const char *wbuf = getenv("BENCH_LDB_WRITE_BUFFER");
    leveldb_options_set_write_buffer_size(
        o, wbuf && *wbuf ? bench_arg_u64(wbuf, "BENCH_LDB_WRITE_BUFFER") : 64u << 20);
    return o;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4)
        bench_die("usage: probe_leveldb_scan DIR EXPECTED [NAME]");
    const char *dir = argv[1];
    if (argc == 3 && strcmp(argv[2], "settle") == 0) {
        leveldb_options_t *so = scan_options();
        char *serr = NULL;
        leveldb_t *sdb = leveldb_open(so, dir, &serr);
        if (serr)
            bench_die("leveldb_open %s: %s", dir, serr);
        leveldb_close(sdb);
        leveldb_options_destroy(so);
        return 0;
    }
    uint64_t expected = bench_arg_u64(argv[2], "EXPECTED");
    const char *name = argc == 4 ? argv[3] : "probe_leveldb_scan";

    double t0 = bench_now();
    leveldb_options_t *o = scan_options();
    char *err = NULL;
    leveldb_t *db = leveldb_open(o, dir, &err);
    if (err)
        bench_die("leveldb_open %s: %s", dir, err);
    leveldb_readoptions_t *ro = leveldb_readoptions_create();
    leveldb_readoptions_set_fill_cache(ro, 0);
    leveldb_iterator_t *it = leveldb_create_iterator(db, ro);
    uint64_t n = 0, bytes = 0, acc = 0;
    for (leveldb_iter_seek_to_first(it); leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t kl, vl;
        const char *k = leveldb_iter_key(it, &kl);
        const char *v = leveldb_iter_value(it, &vl);
        if (kl != 8 || vl < 5)
            bench_die("unexpected key/value at record %" PRIu64, n);
        walk w = {(const unsigned char *)v + 4, (const unsigned char *)v + vl, acc};
        fold(&w, rd((const unsigned char *)k, 8));
        if (walk_value(&w, 0) < 0 || w.p != w.end)
            bench_die("record %" PRIu64 " does not decode", n);
        acc = w.acc;
        bytes += vl;
        n++;
    }
    leveldb_iter_get_error(it, &err);
    if (err)
        bench_die("scan: %s", err);
    leveldb_iter_destroy(it);
    leveldb_readoptions_destroy(ro);
    leveldb_close(db);
    leveldb_options_destroy(o);
    double secs = bench_now() - t0;

    if (n != expected)
        bench_die("scanned %" PRIu64 " records, expected %" PRIu64, n, expected);
    char extra[96];
    snprintf(extra, sizeof extra, "bytes=%" PRIu64 " acc=%016" PRIx64, bytes, acc);
    bench_result(name, n, secs, extra);
    return 0;
}
