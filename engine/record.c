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

#include <msgpack/pack.h>
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
    uint64_t c64 = c;
    while (n && ((uintptr_t)p & 7)) {
        c64 = __builtin_ia32_crc32qi((uint32_t)c64, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c64;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
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

/* ---- encode ---- */

static int pack_to_buf(void *data, const char *p, size_t n) {
    buf_append((buf *)data, p, n);
    return 0;
}

void record_encode(const tm_event *ev, buf *out) {
    size_t start = out->len;
    buf_reserve(out, 48 + ev->stream_len + ev->type_len + ev->meta_len + ev->data_len);
    buf_append(out, "\0\0\0\0", 4);
    msgpack_packer pk;
    msgpack_packer_init(&pk, out, pack_to_buf);
    msgpack_pack_array(&pk, 8);
    msgpack_pack_uint64(&pk, 1);
    msgpack_pack_bin(&pk, 16);
    msgpack_pack_bin_body(&pk, ev->id, 16);
    msgpack_pack_str(&pk, ev->stream_len);
    msgpack_pack_str_body(&pk, ev->stream, ev->stream_len);
    msgpack_pack_str(&pk, ev->type_len);
    msgpack_pack_str_body(&pk, ev->type, ev->type_len);
    msgpack_pack_uint64(&pk, ev->version);
    msgpack_pack_int64(&pk, ev->time_ms);
    if (ev->meta_len) buf_append(out, ev->meta, ev->meta_len);
    else msgpack_pack_map(&pk, 0);
    if (ev->data_len) buf_append(out, ev->data, ev->data_len);
    else msgpack_pack_nil(&pk);
    uint32_t c = crc32c(0, out->ptr + start + 4, out->len - start - 4);
    unsigned char *h = (unsigned char *)out->ptr + start;
    h[0] = (unsigned char)c;
    h[1] = (unsigned char)(c >> 8);
    h[2] = (unsigned char)(c >> 16);
    h[3] = (unsigned char)(c >> 24);
}

/* ---- decode ---- */

static int corrupt(tm_err *err, const char *what) {
    return err_set(err, TM_EIO, "corrupt record: %s", what);
}

int record_decode(const char *rec, size_t len, tm_event *ev, tm_err *err) {
    if (len < 5) return corrupt(err, "too short");
    const unsigned char *h = (const unsigned char *)rec;
    uint32_t want = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 |
                    (uint32_t)h[3] << 24;
    if (crc32c(0, rec + 4, len - 4) != want) return corrupt(err, "checksum mismatch");
    const char *p = rec + 4, *end = rec + len;
    mp_item it;
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
    const char *m = p;
    if (mp_next(&p, end, &it) < 0 || it.type != MP_MAP) return corrupt(err, "bad metadata");
    p = m;
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
