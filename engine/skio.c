/* skio.c — sketch serialisation framing, canonical varints, the hash
 * (see skio.h).  Invariant: a reader accepts only the bytes a writer
 * could have produced for some state (canonical varints, exact length). */
#include "skio.h"

#include <string.h>

uint64_t skio_hash64(const void *key, size_t len, uint64_t seed) {
    const uint64_t m = 0xc6a4a7935bd1e995ULL;
    const int r = 47;
    uint64_t h = seed ^ (len * m);
    const unsigned char *data = key;
    const unsigned char *end = data + (len - (len & 7));
    while (data != end) {
        uint64_t k = 0;
        for (int i = 7; i >= 0; i--) k = (k << 8) | data[i];
        k *= m;
        k ^= k >> r;
        k *= m;
        h ^= k;
        h *= m;
        data += 8;
    }
    switch (len & 7) {
    case 7: h ^= (uint64_t)data[6] << 48; /* fall through */
    case 6: h ^= (uint64_t)data[5] << 40; /* fall through */
    case 5: h ^= (uint64_t)data[4] << 32; /* fall through */
    case 4: h ^= (uint64_t)data[3] << 24; /* fall through */
    case 3: h ^= (uint64_t)data[2] << 16; /* fall through */
    case 2: h ^= (uint64_t)data[1] << 8;  /* fall through */
    case 1: h ^= (uint64_t)data[0];
            h *= m;
    }
    h ^= h >> r;
    h *= m;
    h ^= h >> r;
    return h;
}

size_t skio_begin(buf *out, const char magic[4], int version) {
    size_t start = out->len;
    buf_append(out, magic, 4);
    buf_putc(out, (char)version);
    return start;
}

void skio_put_u64(buf *out, uint64_t v) { buf_put_varint(out, v); }

void skio_put_i64(buf *out, int64_t v) {
    uint64_t u = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    buf_put_varint(out, u);
}

void skio_put_f64(buf *out, double v) {
    uint64_t bits;
    memcpy(&bits, &v, 8);
    buf_put_be64(out, bits);
}

void skio_put_bytes(buf *out, const void *p, size_t n) {
    buf_put_varint(out, n);
    buf_append(out, p, n);
}

void skio_end(buf *out, size_t start) {
    uint32_t c = (uint32_t)skio_hash64(out->ptr + start, out->len - start, SKIO_CHECK_SEED);
    unsigned char x[4] = {(unsigned char)(c >> 24), (unsigned char)(c >> 16),
                          (unsigned char)(c >> 8), (unsigned char)c};
    buf_append(out, x, 4);
}

int skio_open(skio_rd *rd, const char *p, size_t n, const char magic[4], int version,
              tm_err *e) {
    rd->p = rd->end = NULL;
    rd->bad = 1;
    if (!p || n < 9) return err_set(e, TM_EINVAL, "sketch bytes truncated (%zu bytes)", n);
    if (memcmp(p, magic, 4) != 0)
        return err_set(e, TM_EINVAL, "sketch bytes: bad magic (want %.4s)", magic);
    if ((unsigned char)p[4] != version)
        return err_set(e, TM_EINVAL, "sketch bytes: %.4s version %d unsupported", magic,
                       (unsigned char)p[4]);
    const unsigned char *c = (const unsigned char *)p + n - 4;
    uint32_t want = ((uint32_t)c[0] << 24) | ((uint32_t)c[1] << 16) | ((uint32_t)c[2] << 8) | c[3];
    if ((uint32_t)skio_hash64(p, n - 4, SKIO_CHECK_SEED) != want)
        return err_set(e, TM_EINVAL, "sketch bytes: %.4s checksum mismatch", magic);
    rd->p = (const unsigned char *)p + 5;
    rd->end = c;
    rd->bad = 0;
    return 0;
}

uint64_t skio_u64(skio_rd *rd) {
    if (rd->bad) return 0;
    uint64_t r = 0;
    for (int shift = 0; shift < 64 && rd->p < rd->end; shift += 7) {
        unsigned char c = *rd->p++;
        if (shift == 63 && c > 1) break;               /* overflows 64 bits */
        r |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            if (c == 0 && shift > 0) break;            /* not the shortest form */
            return r;
        }
    }
    rd->bad = 1;
    return 0;
}

int64_t skio_i64(skio_rd *rd) {
    uint64_t u = skio_u64(rd);
    return (int64_t)(u >> 1) ^ -(int64_t)(u & 1);
}

double skio_f64(skio_rd *rd) {
    const void *x = skio_raw(rd, 8);
    if (!x) return 0;
    uint64_t bits = buf_get_be64(x);
    double d;
    memcpy(&d, &bits, 8);
    return d;
}

const void *skio_raw(skio_rd *rd, size_t n) {
    if (rd->bad || (size_t)(rd->end - rd->p) < n) {
        rd->bad = 1;
        return NULL;
    }
    const void *r = rd->p;
    rd->p += n;
    return r;
}

const char *skio_bytes(skio_rd *rd, size_t *n, size_t max) {
    uint64_t len = skio_u64(rd);
    if (len > max) skio_fail(rd);
    *n = rd->bad ? 0 : (size_t)len;
    const char *r = skio_raw(rd, *n);
    if (!r) *n = 0;
    return r;
}

void skio_fail(skio_rd *rd) { rd->bad = 1; }

int skio_close(skio_rd *rd, const char *what, tm_err *e) {
    if (rd->bad) return err_set(e, TM_EINVAL, "%s: invalid serialised bytes", what);
    if (rd->p != rd->end) return err_set(e, TM_EINVAL, "%s: trailing bytes", what);
    return 0;
}
