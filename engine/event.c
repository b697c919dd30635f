/* event.c — event ids, names, and the JSON-lines / msgpack-map forms of an
 * event (see event.h).
 *
 * Ids: UUIDv4 from a per-thread xoshiro256** generator seeded from
 * getrandom() (256 bits), so generating an id makes no system call and
 * takes no lock.  A fork handler bumps a generation number so that a child
 * process reseeds instead of repeating its parent's ids.  The generator is
 * not cryptographic: ids are unique, not secret.
 *
 * Parsing: event_from_json transcodes the whole object once (json_to_mp,
 * appended to the caller's scratch buffer) and then walks that map exactly
 * as event_from_mp walks a msgpack body, so both forms accept the same
 * keys with the same rules.  Nothing is appended to scratch after the
 * transcode, so pointers into it stay valid until the caller appends.
 * The walk uses only mp_next/mp_skip, which never read past the end, so an
 * unvalidated msgpack body cannot make it read out of bounds; depth and
 * size limits on a msgpack body are the caller's (mp_validate at the edge).
 *
 * Rules: keys stream, type, data, metadata, id, time (position and version
 * are accepted and ignored; anything else, or a key given twice, is an
 * error).  data is any value (nil when absent); metadata a map (null =
 * absent); id a canonical UUID string (or a 16-byte bin in msgpack; null =
 * absent); time a non-negative integer in ms (null = absent).
 */
#define _GNU_SOURCE
#include "event.h"

#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "json.h"

/* ---- ids ---- */

static atomic_uint fork_generation;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void) { atomic_fetch_add(&fork_generation, 1); }
static void fork_init(void) { pthread_atfork(NULL, NULL, on_fork_child); }

static _Thread_local struct {
    uint64_t s[4];
    unsigned generation;
    int seeded;
} rng;

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_seed(void) {
    uint64_t seed[4] = {0};
    size_t got = 0;
    while (got < sizeof seed) {
        ssize_t n = getrandom((char *)seed + got, sizeof seed - got, 0);
        if (n <= 0) break;
        got += (size_t)n;
    }
    if (got < sizeof seed) { /* no entropy source: fall back to what differs */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t x = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        x ^= (uint64_t)getpid() << 32 ^ (uint64_t)(uintptr_t)&rng;
        for (int i = 0; i < 4; i++) seed[i] ^= splitmix64(&x);
    }
    /* spread the seed through splitmix so the state is never all zero */
    uint64_t x = seed[0] ^ seed[1] ^ seed[2] ^ seed[3];
    for (int i = 0; i < 4; i++) rng.s[i] = seed[i] ^ splitmix64(&x);
    if (!(rng.s[0] | rng.s[1] | rng.s[2] | rng.s[3])) rng.s[0] = 1;
    rng.seeded = 1;
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(void) {
    uint64_t *s = rng.s;
    uint64_t r = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

void event_id_generate(uint8_t id[16]) {
    unsigned gen = atomic_load_explicit(&fork_generation, memory_order_relaxed);
    if (!rng.seeded || rng.generation != gen) {
        pthread_once(&fork_once, fork_init);
        rng_seed();
        rng.generation = atomic_load(&fork_generation);
    }
    uint64_t a = rng_next(), b = rng_next();
    for (int i = 0; i < 8; i++) {
        id[i] = (uint8_t)(a >> (56 - 8 * i));
        id[8 + i] = (uint8_t)(b >> (56 - 8 * i));
    }
    id[6] = (uint8_t)((id[6] & 0x0f) | 0x40); /* version 4 */
    id[8] = (uint8_t)((id[8] & 0x3f) | 0x80); /* RFC 4122 variant */
}

static int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    c |= 0x20;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

int event_id_parse(const char *s, size_t len, uint8_t id[16]) {
    if (len != 36) return -1;
    if (s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-') return -1;
    uint8_t out[16];
    int k = 0;
    for (size_t i = 0; i < 36;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            i++;
            continue;
        }
        int hi = hexval((unsigned char)s[i]), lo = hexval((unsigned char)s[i + 1]);
        if (hi < 0 || lo < 0) return -1;
        out[k++] = (uint8_t)(hi << 4 | lo);
        i += 2;
    }
    memcpy(id, out, 16);
    return 0;
}

void event_id_format(const uint8_t id[16], char out[37]) {
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) *o++ = '-';
        *o++ = hex[id[i] >> 4];
        *o++ = hex[id[i] & 15];
    }
    *o = '\0';
}

/* ---- names ---- */

size_t event_category_len(const char *stream, size_t len) {
    const char *dash = len ? memchr(stream, '-', len) : NULL;
    return dash ? (size_t)(dash - stream) : len;
}

/* 1 when s[0..len) is ASCII without NUL (the common name: valid as is). */
static int ascii_no_nul(const char *s, size_t len) {
    const uint64_t hi = 0x8080808080808080ull, lo = 0x0101010101010101ull;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        if ((w & hi) || ((w - lo) & ~w & hi)) return 0;
    }
    for (; i < len; i++)
        if (s[i] == 0 || (unsigned char)s[i] >= 0x80) return 0;
    return 1;
}

static int check_name(const char *what, const char *s, size_t len, size_t max, tm_err *err) {
    if (!s || len == 0) return err_set(err, TM_EINVAL, "%s is empty", what);
    if (len > max)
        return err_set(err, TM_EINVAL, "%s is %zu bytes, longer than %zu", what, len, max);
    if (ascii_no_nul(s, len)) return 0;
    if (memchr(s, '\0', len)) return err_set(err, TM_EINVAL, "%s contains a NUL byte", what);
    if (!json_utf8_valid(s, len)) return err_set(err, TM_EINVAL, "%s is not valid UTF-8", what);
    return 0;
}

int event_check_names(const tm_event *ev, tm_err *err) {
    if (check_name("stream name", ev->stream, ev->stream_len, EVENT_MAX_STREAM, err) < 0)
        return -1;
    return check_name("event type", ev->type, ev->type_len, EVENT_MAX_TYPE, err);
}

/* ---- parsing ---- */

enum { K_STREAM, K_TYPE, K_DATA, K_META, K_ID, K_TIME, K_POSITION, K_VERSION, K_COUNT };
static const struct {
    const char *name;
    size_t len;
} keys[K_COUNT] = {
    {"stream", 6}, {"type", 4}, {"data", 4}, {"metadata", 8},
    {"id", 2},     {"time", 4}, {"position", 8}, {"version", 7},
};

static int key_index(const char *k, size_t n) {
    for (int i = 0; i < K_COUNT; i++)
        if (keys[i].len == n && memcmp(keys[i].name, k, n) == 0) return i;
    return -1;
}

/* A key for an error message: one line, at most 64 bytes, printable. */
static void key_text(const char *k, size_t n, char out[80]) {
    size_t w = 0;
    for (size_t i = 0; i < n && w < 64; i++) {
        unsigned char c = (unsigned char)k[i];
        out[w++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (n > 64) memcpy(out + w, "...", 3), w += 3;
    out[w] = '\0';
}

static const char nil_byte[1] = {(char)0xc0};

/* Walk the event map in [mp, mp+len); ev's pointers go into it. */
static int from_map(const char *mp, size_t len, const char *stream, size_t stream_len,
                    int is_json, tm_event *ev, tm_err *err) {
    const char *p = mp, *end = mp + len;
    unsigned seen = 0;
    mp_item it;
    memset(ev, 0, sizeof *ev);
    if (mp_next(&p, end, &it) < 0 || it.type != MP_MAP)
        return err_set(err, TM_EINVAL, "event must be %s", is_json ? "a JSON object" : "a map");
    for (uint32_t i = 0; i < it.v.n; i++) {
        mp_item k, v;
        const char *kp = p;
        if (mp_next(&p, end, &k) < 0) goto malformed;
        if (k.type != MP_STR) {
            p = kp;
            if (mp_skip(&p, end) < 0) goto malformed;
            return err_set(err, TM_EINVAL, "event keys must be strings");
        }
        int ki = key_index(k.v.s.ptr, k.v.s.len);
        char kt[80];
        if (ki < 0) {
            key_text(k.v.s.ptr, k.v.s.len, kt);
            return err_set(err, TM_EINVAL, "event: unknown key \"%s\"", kt);
        }
        if (seen & (1u << ki))
            return err_set(err, TM_EINVAL, "event: duplicate key \"%s\"", keys[ki].name);
        seen |= 1u << ki;
        const char *vp = p, *q = p;
        if (mp_skip(&p, end) < 0 || mp_next(&q, end, &v) < 0) goto malformed;
        size_t vlen = (size_t)(p - vp);
        switch (ki) {
        case K_STREAM:
            if (v.type != MP_STR) return err_set(err, TM_EINVAL, "event: \"stream\" must be a string");
            if (stream && (v.v.s.len != stream_len || memcmp(v.v.s.ptr, stream, stream_len) != 0)) {
                key_text(v.v.s.ptr, v.v.s.len, kt);
                return err_set(err, TM_EINVAL,
                               "event: \"stream\" is \"%s\" but the request's stream differs", kt);
            }
            ev->stream = v.v.s.ptr;
            ev->stream_len = v.v.s.len;
            break;
        case K_TYPE:
            if (v.type != MP_STR) return err_set(err, TM_EINVAL, "event: \"type\" must be a string");
            ev->type = v.v.s.ptr;
            ev->type_len = v.v.s.len;
            break;
        case K_DATA:
            ev->data = vp;
            ev->data_len = vlen;
            break;
        case K_META:
            if (v.type == MP_NIL) break;
            if (v.type != MP_MAP)
                return err_set(err, TM_EINVAL, "event: \"metadata\" must be %s",
                               is_json ? "an object" : "a map");
            ev->meta = vp;
            ev->meta_len = vlen;
            break;
        case K_ID:
            if (v.type == MP_NIL) break;
            if (v.type == MP_STR && event_id_parse(v.v.s.ptr, v.v.s.len, ev->id) == 0) {
                ev->has_id = 1;
            } else if (!is_json && v.type == MP_BIN && v.v.s.len == 16) {
                memcpy(ev->id, v.v.s.ptr, 16);
                ev->has_id = 1;
            } else {
                return err_set(err, TM_EINVAL,
                               "event: \"id\" must be a UUID string (8-4-4-4-12 hex digits)%s",
                               is_json ? "" : " or 16 bytes");
            }
            break;
        case K_TIME:
            if (v.type == MP_NIL) break;
            if (v.type != MP_UINT || v.v.u > INT64_MAX)
                return err_set(err, TM_EINVAL,
                               "event: \"time\" must be a non-negative integer (milliseconds)");
            ev->time_ms = (int64_t)v.v.u;
            break;
        default: /* position, version: set by the store, ignored on input */
            break;
        }
    }
    if (p != end) return err_set(err, TM_EINVAL, "event: trailing bytes after the map");
    if (!(seen & (1u << K_STREAM))) {
        if (!stream) return err_set(err, TM_EINVAL, "event: missing \"stream\"");
        ev->stream = stream;
        ev->stream_len = stream_len;
    }
    if (!(seen & (1u << K_TYPE))) return err_set(err, TM_EINVAL, "event: missing \"type\"");
    if (!ev->data) {
        ev->data = nil_byte;
        ev->data_len = 1;
    }
    if (event_check_names(ev, err) < 0) return err_prefix(err, "event");
    return 0;
malformed:
    return err_set(err, TM_EINVAL, "event: malformed msgpack");
}

int event_from_json(const char *text, size_t len, const char *stream, size_t stream_len,
                    const mp_limits *lim, buf *scratch, tm_event *ev, tm_err *err) {
    if (!lim) lim = &mp_default_limits;
    /* The object itself adds one level and its own bytes around data and
     * metadata; those two are then checked against lim exactly. */
    mp_limits outer = *lim;
    if (outer.max_depth < UINT_MAX) outer.max_depth++;
    if (outer.max_items < K_COUNT) outer.max_items = K_COUNT;
    size_t extra = 4096;
    outer.max_size = lim->max_size > (SIZE_MAX - extra) / 2 ? SIZE_MAX : 2 * lim->max_size + extra;
    size_t off = scratch->len;
    if (json_to_mp(text, len, &outer, scratch, err) < 0) return -1;
    const char *mp = scratch->ptr + off;
    if (from_map(mp, scratch->len - off, stream, stream_len, 1, ev, err) < 0) goto fail;
    /* When the whole object is within lim's size and the outer item limit
     * is lim's own, the parse has already held data and metadata to lim:
     * they sit one level down (depth lim+1 overall = lim for them), hold no
     * more items than the parse allowed, and are no bigger than the whole.
     * (mp_validate checks nothing else of bytes we just wrote.) */
    int held = outer.max_items == lim->max_items && scratch->len - off <= lim->max_size &&
               outer.max_depth == lim->max_depth + 1;
    if (!held && mp_validate(ev->data, ev->data_len, lim, err) < 0) {
        err_prefix(err, "event data");
        goto fail;
    }
    if (!held && ev->meta_len && mp_validate(ev->meta, ev->meta_len, lim, err) < 0) {
        err_prefix(err, "event metadata");
        goto fail;
    }
    return 0;
fail:
    scratch->len = off; /* give back what this call appended */
    scratch->ptr[off] = '\0';
    return -1;
}

int event_from_mp(const char *mp, size_t len, const char *stream, size_t stream_len,
                  tm_event *ev, tm_err *err) {
    return from_map(mp, len, stream, stream_len, 0, ev, err);
}

/* ---- export ---- */

static const char dec2[] = "00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899";

/* Decimal digits of v (and a leading '-' when neg) at w; returns the end. */
static char *put_int(char *w, uint64_t v, int neg) {
    if (neg) *w++ = '-';
    static const uint64_t p10[19] = {10ull, 100ull, 1000ull, 10000ull, 100000ull, 1000000ull,
                                     10000000ull, 100000000ull, 1000000000ull, 10000000000ull,
                                     100000000000ull, 1000000000000ull, 10000000000000ull,
                                     100000000000000ull, 1000000000000000ull,
                                     10000000000000000ull, 100000000000000000ull,
                                     1000000000000000000ull, 10000000000000000000ull};
    int n = 1;
    while (n < 20 && v >= p10[n - 1]) n++;
    char *p = w + n;
    while (v >= 100) {
        p -= 2;
        memcpy(p, dec2 + 2 * (v % 100), 2);
        v /= 100;
    }
    if (v >= 10) memcpy(p - 2, dec2 + 2 * v, 2);
    else p[-1] = (char)('0' + v);
    return w + n;
}

static char *put_lit(char *w, const char *s, size_t n) {
    memcpy(w, s, n);
    return w + n;
}

/* buf_append of a short constant, without a call when there is room. */
static inline void lit(buf *out, const char *s, size_t n) {
    if (out->cap - out->len > n) {
        memcpy(out->ptr + out->len, s, n);
        out->len += n;
        out->ptr[out->len] = '\0';
    } else buf_append(out, s, n);
}

/* The id as 8-4-4-4-12 lowercase hex at w (36 bytes). */
static char *put_id(char *w, const uint8_t id[16]) {
    static const char hex2[] = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";
#define HEX2(i) memcpy(w + 2 * (i) + ((i) >= 4) + ((i) >= 6) + ((i) >= 8) + ((i) >= 10), \
                       hex2 + 2 * id[i], 2)
    HEX2(0), HEX2(1), HEX2(2), HEX2(3), HEX2(4), HEX2(5), HEX2(6), HEX2(7);
    HEX2(8), HEX2(9), HEX2(10), HEX2(11), HEX2(12), HEX2(13), HEX2(14), HEX2(15);
#undef HEX2
    w[8] = w[13] = w[18] = w[23] = '-';
    w += 36;
    return w;
}

int event_to_json(const tm_event *ev, buf *out, tm_err *err) {
    size_t start = out->len;
    lit(out, "{\"stream\":", 10);
    json_put_string(out, ev->stream, ev->stream_len);
    lit(out, ",\"type\":", 8);
    json_put_string(out, ev->type, ev->type_len);
    lit(out, ",\"data\":", 8);
    if (!ev->data_len) lit(out, "null", 4);
    else if (json_from_mp(ev->data, ev->data_len, out, err) < 0) goto fail;
    lit(out, ",\"metadata\":", 12);
    if (!ev->meta_len || (ev->meta_len == 1 && (unsigned char)ev->meta[0] == 0x80))
        lit(out, "{}", 2); /* none, or the empty map */
    else if (json_from_mp(ev->meta, ev->meta_len, out, err) < 0) goto fail;
    /* the fixed tail, written in one reserved run */
    buf_reserve(out, 7 + 36 + 9 + 21 + 12 + 20 + 11 + 20 + 1);
    char *w = out->ptr + out->len;
    w = put_lit(w, ",\"id\":\"", 7);
    w = put_id(w, ev->id);
    w = put_lit(w, "\",\"time\":", 9);
    w = put_int(w, ev->time_ms < 0 ? (uint64_t)0 - (uint64_t)ev->time_ms : (uint64_t)ev->time_ms,
                ev->time_ms < 0);
    w = put_lit(w, ",\"position\":", 12);
    w = put_int(w, ev->position, 0);
    w = put_lit(w, ",\"version\":", 11);
    w = put_int(w, ev->version, 0);
    *w++ = '}';
    out->len = (size_t)(w - out->ptr);
    out->ptr[out->len] = '\0';
    return 0;
fail:
    err_prefix(err, "event %" PRIu64, ev->position);
    out->len = start;
    if (out->ptr) out->ptr[start] = '\0';
    return -1;
}
