/* bench_common.h — shared by the benchmark programs in scripts/bench.
 *
 * Owns: the benchmark's event workload (the same events on every side:
 * stream "order-<n % 1000>", type "OrderPlaced", data the msgpack map
 * {customer: "c-<n % 1000>", amount: <n % 100>.5, sku: "sku-<n % 100>"}),
 * the limit probes' own copy of the stored record format (record.h:
 * crc32c LE + msgpack array [1, id, stream, type, version, time, meta, data]),
 * a monotonic clock, and the one machine-readable result line every
 * benchmark program prints:
 *     BENCH name=<name> events=<n> seconds=<s> rate=<events/s> [key=value...]
 * scripts/bench/run parses that line; everything else goes to stderr.
 *
 * Header-only (static functions) because the Makefile builds each
 * scripts/bench/NAME.c into its own program.  The limit probes use only this
 * file, LevelDB and msgpack-c: no engine code.
 */
#ifndef TM_BENCH_COMMON_H
#define TM_BENCH_COMMON_H

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <msgpack.h>

#ifndef BENCH_STREAMS /* -D for experiments only; the benchmarks use 1000 */
#define BENCH_STREAMS 1000
#endif

static inline double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static inline int64_t bench_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline void bench_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("bench: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* Parse a positive decimal argument or die with its name. */
static inline uint64_t bench_arg_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || v == 0)
        bench_die("bad %s: '%s' (want a positive integer)", what, s);
    return (uint64_t)v;
}

/* ---- the workload ---- */

/* Stream name of event n (0-based) into out; returns its length. */
static inline size_t bench_stream(uint64_t n, char *out, size_t cap)
{
    return (size_t)snprintf(out, cap, "order-%" PRIu64, n % BENCH_STREAMS);
}

static inline uint64_t bench_version(uint64_t n)
{
    return n / BENCH_STREAMS; /* events go round-robin over the streams */
}

static inline void bench_pack_str(msgpack_packer *pk, const char *s, size_t n)
{
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* Pack the data map of event n (the same values gen_events writes as JSON). */
static inline void bench_pack_data(msgpack_packer *pk, uint64_t n)
{
    char tmp[32];
    msgpack_pack_map(pk, 3);
    bench_pack_str(pk, "customer", 8);
    bench_pack_str(pk, tmp, (size_t)snprintf(tmp, sizeof tmp, "c-%" PRIu64, n % 1000));
    bench_pack_str(pk, "amount", 6);
    msgpack_pack_double(pk, (double)(n % 100) + 0.5);
    bench_pack_str(pk, "sku", 3);
    bench_pack_str(pk, tmp, (size_t)snprintf(tmp, sizeof tmp, "sku-%" PRIu64, n % 100));
}

/* ---- the probes' copy of the record format (record.h) ---- */

static uint32_t bench_crc_table[256];

static inline void bench_crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1; /* Castagnoli, reflected */
        bench_crc_table[i] = c;
    }
}

static inline uint32_t bench_crc32c(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = bench_crc_table[(c ^ *b++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* Append the stored record of event n (random id, version per stream,
 * time `now_ms`, empty metadata) to sb. */
static inline void bench_record(msgpack_sbuffer *sb, uint64_t n, int64_t now_ms)
{
    size_t start = sb->size;
    static const char zero[4];
    msgpack_sbuffer_write(sb, zero, 4); /* crc placeholder */
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    char id[16], stream[32];
    for (int i = 0; i < 16; i++)
        id[i] = (char)(rand() & 0xFF);
    id[6] = (char)((id[6] & 0x0F) | 0x40);
    id[8] = (char)((id[8] & 0x3F) | 0x80);
    msgpack_pack_array(&pk, 8);
    msgpack_pack_uint8(&pk, 1);
    msgpack_pack_bin(&pk, 16);
    msgpack_pack_bin_body(&pk, id, 16);
    bench_pack_str(&pk, stream, bench_stream(n, stream, sizeof stream));
    bench_pack_str(&pk, "OrderPlaced", 11);
    msgpack_pack_uint64(&pk, bench_version(n));
    msgpack_pack_int64(&pk, now_ms);
    msgpack_pack_map(&pk, 0);
    bench_pack_data(&pk, n);
    uint32_t crc = bench_crc32c(sb->data + start + 4, sb->size - start - 4);
    for (int i = 0; i < 4; i++)
        sb->data[start + (size_t)i] = (char)(crc >> (8 * i));
}

static inline void bench_be64(char out[8], uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (char)(v & 0xFF);
        v >>= 8;
    }
}

/* ---- the result line ---- */

/* Print "BENCH name=... events=... seconds=... rate=..." plus `extra`
 * (already "key=value ..." formatted, may be NULL). */
static inline void bench_result(const char *name, uint64_t events, double seconds,
                                const char *extra)
{
    printf("BENCH name=%s events=%" PRIu64 " seconds=%.6f rate=%.1f%s%s\n", name, events,
           seconds, seconds > 0 ? (double)events / seconds : 0.0, extra ? " " : "",
           extra ? extra : "");
    fflush(stdout);
}

#endif
