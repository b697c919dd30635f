/* record.c — the stored form of one event, and crc32c.
 *
 * Owns the byte layout documented in record.h:
 *   crc32c(body) (4 bytes, little-endian) then body =
 *   msgpack [1, id(bin 16), stream(str), type(str), version(uint), time(int),
 *            metadata(map), data]
 * Invariants: record_encode always writes a record that record_decode
 * accepts; record_decode never reads outside [rec, rec+len) and accepts
 * nothing whose checksum or shape is wrong (TM_EIO, "corrupt record: ...").
 * The data and metadata bytes are copied verbatim (they were validated by
 * the store before encoding); decode checks that each is one whole value
 * and that the metadata is a map, and that nothing trails the data.
 *
 * crc32c (Castagnoli, reflected, as used by iSCSI/ext4/LevelDB) uses the
 * SSE4.2 crc32 instruction when the CPU has it (checked once at run time),
 * else slicing-by-8 tables.  crc32c(0, "123456789", 9) == 0xE3069283.
 */
#include "record.h"

#include <pthread.h>
#include <string.h>

#include "mp.h"

/* ---- crc32c ---- */

#define CRC32C_POLY 0x82F63B78u

static uint32_t crc_table[8][256];
static int crc_hw;
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t crc_sw(uint32_t c, const unsigned char *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) {
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        uint32_t lo = (uint32_t)w ^ c, hi = (uint32_t)(w >> 32);
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
            crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
            crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
            crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw_run(uint32_t c, const unsigned char *p,
                                                              size_t n) {
    /* unaligned 8-byte loads are fine on x86; the tail in 4/2/1-byte steps */
    uint64_t c64 = c;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c64;
    if (n & 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        c32 = __builtin_ia32_crc32si(c32, w);
        p += 4;
    }
    if (n & 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        c32 = __builtin_ia32_crc32hi(c32, w);
        p += 2;
    }
    if (n & 1) c32 = __builtin_ia32_crc32qi(c32, *p);
    return c32;
}
#endif

uint32_t crc32c(uint32_t crc, const void *p, size_t n) {
    pthread_once(&crc_once, crc_init);
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (crc_hw) return ~crc_hw_run(c, p, n);
#endif
    return ~crc_sw(c, p, n);
}

/* ---- encode ----
 * Written directly (no packer callbacks), in the smallest form for each
 * value, byte for byte what msgpack-c's packer writes (test_store checks). */

static char *put_u8(char *p, unsigned c) {
    *p++ = (char)c;
    return p;
}

static char *put_be(char *p, uint64_t v, int n) {
    if (n == 8) { /* the time: one byte-swapped store */
        uint64_t b = __builtin_bswap64(v);
        memcpy(p, &b, 8);
        return p + 8;
    }
    for (int i = n - 1; i >= 0; i--) p[i] = (char)(v >> (8 * (n - 1 - i)));
    return p + n;
}

static char *put_uint(char *p, uint64_t v) {
    if (v < 128) return put_u8(p, (unsigned)v);
    if (v < 256) return put_be(put_u8(p, 0xcc), v, 1);
    if (v < 65536) return put_be(put_u8(p, 0xcd), v, 2);
    if (v < 4294967296ull) return put_be(put_u8(p, 0xce), v, 4);
    return put_be(put_u8(p, 0xcf), v, 8);
}

static char *put_int(char *p, int64_t v) {
    if (v >= 0) return put_uint(p, (uint64_t)v);
    if (v >= -32) return put_u8(p, (unsigned)(v & 0xff));
    if (v >= -128) return put_be(put_u8(p, 0xd0), (uint64_t)v, 1);
    if (v >= -32768) return put_be(put_u8(p, 0xd1), (uint64_t)v, 2);
    if (v >= -2147483648ll) return put_be(put_u8(p, 0xd2), (uint64_t)v, 4);
    return put_be(put_u8(p, 0xd3), (uint64_t)v, 8);
}

static char *put_str(char *p, const char *s, size_t n) {
    if (n < 32) p = put_u8(p, 0xa0 | (unsigned)n);
    else if (n < 256) p = put_be(put_u8(p, 0xd9), n, 1);
    else if (n < 65536) p = put_be(put_u8(p, 0xda), n, 2);
    else p = put_be(put_u8(p, 0xdb), n, 4);
    memcpy(p, s, n);
    return p + n;
}

void record_encode(const tm_event *ev, buf *out) {
    /* 4 crc + 1 array + 1 format + 18 id + 2 x (5 + name) + 9 version
     * + 9 time + metadata (1 if none) + data (1 if none) */
    buf_reserve(out, 64 + ev->stream_len + ev->type_len + ev->meta_len + ev->data_len);
    char *start = out->ptr + out->len, *p = start + 4;
    p = put_u8(p, 0x98); /* array of 8 */
    p = put_u8(p, 1);
    p = put_u8(p, 0xc4); /* bin 8 */
    p = put_u8(p, 16);
    memcpy(p, ev->id, 16);
    p += 16;
    p = put_str(p, ev->stream, ev->stream_len);
    p = put_str(p, ev->type, ev->type_len);
    p = put_uint(p, ev->version);
    p = put_int(p, ev->time_ms);
    if (ev->meta_len) {
        memcpy(p, ev->meta, ev->meta_len);
        p += ev->meta_len;
    } else p = put_u8(p, 0x80); /* empty map */
    if (ev->data_len) {
        memcpy(p, ev->data, ev->data_len);
        p += ev->data_len;
    } else p = put_u8(p, 0xc0); /* nil */
    uint32_t c = crc32c(0, start + 4, (size_t)(p - start - 4));
    start[0] = (char)c;
    start[1] = (char)(c >> 8);
    start[2] = (char)(c >> 16);
    start[3] = (char)(c >> 24);
    out->len = (size_t)(p - out->ptr);
    out->ptr[out->len] = '\0'; /* buf.h: always NUL-terminated */
}

/* ---- decode ---- */

static int corrupt(tm_err *err, const char *what) {
    return err_set(err, TM_EIO, "corrupt record: %s", what);
}

/* Big-endian n-byte unsigned at q (n = 1, 2, 4 or 8): one load each. */
static inline uint64_t get_be(const unsigned char *q, int n) {
    uint16_t h;
    uint32_t w;
    uint64_t d;
    switch (n) {
    case 1: return q[0];
    case 2: memcpy(&h, q, 2); return __builtin_bswap16(h);
    case 4: memcpy(&w, q, 4); return __builtin_bswap32(w);
    default: memcpy(&d, q, 8); return __builtin_bswap64(d);
    }
}

/* A non-empty str at *q in the forms record_encode writes for names
 * (fixstr, str8, str16); 0 = not that (the general decoder decides). */
static inline int fast_str(const unsigned char **q, const unsigned char *e, const char **s, size_t *n) {
    const unsigned char *p = *q;
    size_t l, h;
    if (p >= e) return 0;
    if ((*p & 0xe0) == 0xa0) l = *p & 0x1f, h = 1;
    else if (*p == 0xd9 && e - p >= 2) l = p[1], h = 2;
    else if (*p == 0xda && e - p >= 3) l = (size_t)get_be(p + 1, 2), h = 3;
    else return 0;
    if (l == 0 || (size_t)(e - p) - h < l) return 0;
    *s = (const char *)p + h;
    *n = l;
    *q = p + h + l;
    return 1;
}

/* A uint at *q (positive fixint, uint8..64); 0 = not that. */
static inline int fast_uint(const unsigned char **q, const unsigned char *e, uint64_t *v) {
    const unsigned char *p = *q;
    if (p >= e) return 0;
    if (*p < 0x80) {
        *v = *p;
        *q = p + 1;
        return 1;
    }
    if (*p < 0xcc || *p > 0xcf) return 0;
    int n = 1 << (*p - 0xcc);
    if (e - p - 1 < n) return 0;
    *v = get_be(p + 1, n);
    *q = p + 1 + n;
    return 1;
}

/* The fixed fields of a record as record_encode writes them (with a
 * non-negative time); returns the position of the metadata, or NULL when
 * the record is in any other form (the general decoder then decides). */
static const char *decode_head_fast(const char *body, const char *end, tm_event *ev) {
    const unsigned char *q = (const unsigned char *)body, *e = (const unsigned char *)end;
    if (e - q < 22 || q[0] != 0x98 || q[1] != 1 || q[2] != 0xc4 || q[3] != 16) return NULL;
    memcpy(ev->id, q + 4, 16);
    q += 20;
    uint64_t t;
    if (!fast_str(&q, e, &ev->stream, &ev->stream_len) ||
        !fast_str(&q, e, &ev->type, &ev->type_len) || !fast_uint(&q, e, &ev->version) ||
        !fast_uint(&q, e, &t) || t > (uint64_t)INT64_MAX)
        return NULL;
    ev->time_ms = (int64_t)t;
    ev->has_id = 1;
    return (const char *)q;
}

int record_decode(const char *rec, size_t len, tm_event *ev, tm_err *err) {
    if (len < 5) return corrupt(err, "too short");
    const unsigned char *h = (const unsigned char *)rec;
    uint32_t want = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 |
                    (uint32_t)h[3] << 24;
    if (crc32c(0, rec + 4, len - 4) != want) return corrupt(err, "checksum mismatch");
    const char *p = rec + 4, *end = rec + len;
    mp_item it;
    const char *m = decode_head_fast(p, end, ev);
    if (m) {
        unsigned char c = m < end ? (unsigned char)*m : 0;
        if (!((c & 0xf0) == 0x80 || c == 0xde || c == 0xdf)) return corrupt(err, "bad metadata");
        p = m;
        goto meta;
    }
    if (mp_next(&p, end, &it) < 0 || it.type != MP_ARRAY || it.v.n != 8)
        return corrupt(err, "not an 8-element array");
    if (mp_next(&p, end, &it) < 0 || it.type != MP_UINT || it.v.u != 1)
        return corrupt(err, "unknown record format");
    if (mp_next(&p, end, &it) < 0 || it.type != MP_BIN || it.v.s.len != 16)
        return corrupt(err, "bad id");
    memcpy(ev->id, it.v.s.ptr, 16);
    ev->has_id = 1;
    if (mp_next(&p, end, &it) < 0 || it.type != MP_STR || it.v.s.len == 0)
        return corrupt(err, "bad stream");
    ev->stream = it.v.s.ptr;
    ev->stream_len = it.v.s.len;
    if (mp_next(&p, end, &it) < 0 || it.type != MP_STR || it.v.s.len == 0)
        return corrupt(err, "bad type");
    ev->type = it.v.s.ptr;
    ev->type_len = it.v.s.len;
    if (mp_next(&p, end, &it) < 0 || it.type != MP_UINT) return corrupt(err, "bad version");
    ev->version = it.v.u;
    if (mp_next(&p, end, &it) < 0) return corrupt(err, "bad time");
    if (it.type == MP_UINT && it.v.u <= (uint64_t)INT64_MAX) ev->time_ms = (int64_t)it.v.u;
    else if (it.type == MP_INT) ev->time_ms = it.v.i;
    else return corrupt(err, "bad time");
    m = p;
    if (mp_next(&p, end, &it) < 0 || it.type != MP_MAP) return corrupt(err, "bad metadata");
    p = m;
meta:
    if (mp_skip(&p, end) < 0) return corrupt(err, "truncated metadata");
    ev->meta = m;
    ev->meta_len = (size_t)(p - m);
    const char *d = p;
    if (mp_skip(&p, end) < 0) return corrupt(err, "truncated data");
    if (p != end) return corrupt(err, "trailing bytes");
    ev->data = d;
    ev->data_len = (size_t)(p - d);
    return 0;
}

/* The fields of rec without checking its checksum or the shape of its
 * metadata and data (data = the bytes after the metadata): for routing an
 * event before record_decode, which must follow before it is used. */
int record_peek(const char *rec, size_t len, tm_event *ev) {
    if (len < 5) return -1;
    const char *end = rec + len;
    const char *m = decode_head_fast(rec + 4, end, ev);
    if (!m) {
        tm_err e;
        return record_decode(rec, len, ev, &e); /* the general form */
    }
    const char *p = m;
    if (p < end && ((unsigned char)*p == 0x80)) p++; /* no metadata: the common case */
    else if (mp_skip(&p, end) < 0) return -1;
    if (p >= end) return -1;
    ev->meta = m;
    ev->meta_len = (size_t)(p - m);
    ev->data = p;
    ev->data_len = (size_t)(end - p);
    return 0;
}
