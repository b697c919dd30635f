/* mp.c — msgpack cursor reader and validator (see mp.h).
 *
 * Owns: decoding one msgpack item header (mp_next), skipping whole values
 * (mp_skip), finding a string key in a map (mp_map_find), and validating
 * untrusted bytes against mp_limits (mp_validate, mp_validate_prefix).
 *
 * Invariants:
 *   - No function here reads a byte at or past `end`: every length taken
 *     from a header is compared with the bytes that remain before use, in
 *     a way that cannot overflow (remaining >= len, never p + len <= end).
 *   - Nothing recurses: mp_skip counts pending values; mp_validate keeps an
 *     explicit stack of remaining child counts bounded by max_depth, so a
 *     hostile document of nested arrays costs memory proportional to the
 *     limit, not to the input.
 *   - 0xc1 (never used by the format) is a bad byte everywhere.
 */
#include "mp.h"

#include "bytes.h"

#include <stdlib.h>
#include <string.h>

const mp_limits mp_default_limits = {
    .max_depth = 64,
    .max_items = 1u << 20,
    .max_size = 1u << 20,
};

static inline uint16_t rd16(const unsigned char *p) {
    return (uint16_t)((uint16_t)p[0] << 8 | p[1]);
}

static inline uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t rd64(const unsigned char *p) {
    return (uint64_t)rd32(p) << 32 | rd32(p + 4);
}

/* Signed encodings holding a non-negative value are reported as MP_UINT:
 * the type says the sign, not the wire width. */
static inline long sint(mp_item *out, int64_t v, long n) {
    if (v < 0) {
        out->type = MP_INT;
        out->v.i = v;
    } else {
        out->type = MP_UINT;
        out->v.u = (uint64_t)v;
    }
    return n;
}

/* Outcome of decoding one header, so the validator can say why. */
enum { RD_OK = 0, RD_TRUNC = -1, RD_BAD = -2 };

/* Decode the item at q (q < end).  On success sets *out and returns the
 * number of bytes consumed (header plus str/bin/ext payload). */
static inline long rd_item(const unsigned char *q, const unsigned char *end, mp_item *out) {
    size_t avail = (size_t)(end - q);
    unsigned c = q[0];
    size_t hl;      /* header length */
    uint32_t n;     /* payload length or child count */

    if (c <= 0x7f) {
        out->type = MP_UINT;
        out->v.u = c;
        return 1;
    }
    if (c >= 0xe0) {
        out->type = MP_INT;
        out->v.i = (int8_t)c;
        return 1;
    }
    if (c <= 0x8f) {
        out->type = MP_MAP;
        out->v.n = c & 0x0f;
        return 1;
    }
    if (c <= 0x9f) {
        out->type = MP_ARRAY;
        out->v.n = c & 0x0f;
        return 1;
    }
    if (c <= 0xbf) {
        n = c & 0x1f;
        if (avail - 1 < n) return RD_TRUNC;
        out->type = MP_STR;
        out->v.s.ptr = (const char *)q + 1;
        out->v.s.len = n;
        out->v.s.ext = 0;
        return 1 + (long)n;
    }
    /* 0xc0 .. 0xdf */
    static const unsigned char hdr[32] = {
        /* c0 nil */ 1, /* c1 */ 0, /* c2 c3 */ 1, 1,
        /* c4 c5 c6 bin */ 2, 3, 5,
        /* c7 c8 c9 ext */ 3, 4, 6,
        /* ca cb float */ 5, 9,
        /* cc cd ce cf uint */ 2, 3, 5, 9,
        /* d0 d1 d2 d3 int */ 2, 3, 5, 9,
        /* d4..d8 fixext */ 2, 2, 2, 2, 2,
        /* d9 da db str */ 2, 3, 5,
        /* dc dd array */ 3, 5,
        /* de df map */ 3, 5,
    };
    hl = hdr[c - 0xc0];
    if (!hl) return RD_BAD;
    if (avail < hl) return RD_TRUNC;
    switch (c) {
    case 0xc0: out->type = MP_NIL; return 1;
    case 0xc2: out->type = MP_BOOL; out->v.b = 0; return 1;
    case 0xc3: out->type = MP_BOOL; out->v.b = 1; return 1;
    case 0xc4: n = q[1]; goto bin;
    case 0xc5: n = rd16(q + 1); goto bin;
    case 0xc6: n = rd32(q + 1);
    bin:
        if (avail - hl < n) return RD_TRUNC;
        out->type = MP_BIN;
        out->v.s.ptr = (const char *)q + hl;
        out->v.s.len = n;
        out->v.s.ext = 0;
        return (long)(hl + n);
    case 0xc7: n = q[1]; goto ext;
    case 0xc8: n = rd16(q + 1); goto ext;
    case 0xc9: n = rd32(q + 1);
    ext:
        if (avail - hl < n) return RD_TRUNC;
        out->type = MP_EXT;
        out->v.s.ext = (int8_t)q[hl - 1];
        out->v.s.ptr = (const char *)q + hl;
        out->v.s.len = n;
        return (long)(hl + n);
    case 0xca: {
        uint32_t u = rd32(q + 1);
        float f;
        memcpy(&f, &u, 4);
        out->type = MP_FLOAT;
        out->v.d = f;
        return 5;
    }
    case 0xcb: {
        uint64_t u = rd64(q + 1);
        memcpy(&out->v.d, &u, 8);
        out->type = MP_DOUBLE;
        return 9;
    }
    case 0xcc: out->type = MP_UINT; out->v.u = q[1]; return 2;
    case 0xcd: out->type = MP_UINT; out->v.u = rd16(q + 1); return 3;
    case 0xce: out->type = MP_UINT; out->v.u = rd32(q + 1); return 5;
    case 0xcf: out->type = MP_UINT; out->v.u = rd64(q + 1); return 9;
    case 0xd0: return sint(out, (int8_t)q[1], 2);
    case 0xd1: return sint(out, (int16_t)rd16(q + 1), 3);
    case 0xd2: return sint(out, (int32_t)rd32(q + 1), 5);
    case 0xd3: return sint(out, (int64_t)rd64(q + 1), 9);
    case 0xd4: n = 1; goto fixext;
    case 0xd5: n = 2; goto fixext;
    case 0xd6: n = 4; goto fixext;
    case 0xd7: n = 8; goto fixext;
    case 0xd8: n = 16;
    fixext:
        if (avail - hl < n) return RD_TRUNC;
        out->type = MP_EXT;
        out->v.s.ext = (int8_t)q[1];
        out->v.s.ptr = (const char *)q + 2;
        out->v.s.len = n;
        return (long)(2 + n);
    case 0xd9: n = q[1]; goto str;
    case 0xda: n = rd16(q + 1); goto str;
    case 0xdb: n = rd32(q + 1);
    str:
        if (avail - hl < n) return RD_TRUNC;
        out->type = MP_STR;
        out->v.s.ptr = (const char *)q + hl;
        out->v.s.len = n;
        out->v.s.ext = 0;
        return (long)(hl + n);
    case 0xdc: out->type = MP_ARRAY; out->v.n = rd16(q + 1); return 3;
    case 0xdd: out->type = MP_ARRAY; out->v.n = rd32(q + 1); return 5;
    case 0xde: out->type = MP_MAP; out->v.n = rd16(q + 1); return 3;
    default:   out->type = MP_MAP; out->v.n = rd32(q + 1); return 5; /* 0xdf */
    }
}

int mp_next(const char **p, const char *end, mp_item *out) {
    const unsigned char *q = (const unsigned char *)*p;
    if (q >= (const unsigned char *)end) return -1;
    unsigned c = *q;
    if (c <= 0x7f) { /* the commonest items, without the general decoder */
        out->type = MP_UINT;
        out->v.u = c;
        *p += 1;
        return 0;
    }
    if ((c & 0xe0) == 0xa0) {
        uint32_t n = c & 0x1f;
        if ((size_t)((const unsigned char *)end - q) - 1 < n) return -1;
        out->type = MP_STR;
        out->v.s.ptr = (const char *)q + 1;
        out->v.s.len = n;
        out->v.s.ext = 0;
        *p += 1 + n;
        return 0;
    }
    long n = rd_item(q, (const unsigned char *)end, out);
    if (n < 0) return -1;
    *p += n;
    return 0;
}

/* Byte classes for the loops below: the commonest items are handled
 * without a call. */
enum { C_ONE, C_FIXSTR, C_FIXMAP, C_FIXARRAY, C_OTHER };
static const unsigned char cls[256] = {
    [0x80] = C_FIXMAP,   [0x81] = C_FIXMAP,   [0x82] = C_FIXMAP,   [0x83] = C_FIXMAP,
    [0x84] = C_FIXMAP,   [0x85] = C_FIXMAP,   [0x86] = C_FIXMAP,   [0x87] = C_FIXMAP,
    [0x88] = C_FIXMAP,   [0x89] = C_FIXMAP,   [0x8a] = C_FIXMAP,   [0x8b] = C_FIXMAP,
    [0x8c] = C_FIXMAP,   [0x8d] = C_FIXMAP,   [0x8e] = C_FIXMAP,   [0x8f] = C_FIXMAP,
    [0x90] = C_FIXARRAY, [0x91] = C_FIXARRAY, [0x92] = C_FIXARRAY, [0x93] = C_FIXARRAY,
    [0x94] = C_FIXARRAY, [0x95] = C_FIXARRAY, [0x96] = C_FIXARRAY, [0x97] = C_FIXARRAY,
    [0x98] = C_FIXARRAY, [0x99] = C_FIXARRAY, [0x9a] = C_FIXARRAY, [0x9b] = C_FIXARRAY,
    [0x9c] = C_FIXARRAY, [0x9d] = C_FIXARRAY, [0x9e] = C_FIXARRAY, [0x9f] = C_FIXARRAY,
    [0xa0] = C_FIXSTR,   [0xa1] = C_FIXSTR,   [0xa2] = C_FIXSTR,   [0xa3] = C_FIXSTR,
    [0xa4] = C_FIXSTR,   [0xa5] = C_FIXSTR,   [0xa6] = C_FIXSTR,   [0xa7] = C_FIXSTR,
    [0xa8] = C_FIXSTR,   [0xa9] = C_FIXSTR,   [0xaa] = C_FIXSTR,   [0xab] = C_FIXSTR,
    [0xac] = C_FIXSTR,   [0xad] = C_FIXSTR,   [0xae] = C_FIXSTR,   [0xaf] = C_FIXSTR,
    [0xb0] = C_FIXSTR,   [0xb1] = C_FIXSTR,   [0xb2] = C_FIXSTR,   [0xb3] = C_FIXSTR,
    [0xb4] = C_FIXSTR,   [0xb5] = C_FIXSTR,   [0xb6] = C_FIXSTR,   [0xb7] = C_FIXSTR,
    [0xb8] = C_FIXSTR,   [0xb9] = C_FIXSTR,   [0xba] = C_FIXSTR,   [0xbb] = C_FIXSTR,
    [0xbc] = C_FIXSTR,   [0xbd] = C_FIXSTR,   [0xbe] = C_FIXSTR,   [0xbf] = C_FIXSTR,
    [0xc1] = C_OTHER,    [0xc4] = C_OTHER,    [0xc5] = C_OTHER,    [0xc6] = C_OTHER,
    [0xc7] = C_OTHER,    [0xc8] = C_OTHER,    [0xc9] = C_OTHER,    [0xca] = C_OTHER,
    [0xcb] = C_OTHER,    [0xcc] = C_OTHER,    [0xcd] = C_OTHER,    [0xce] = C_OTHER,
    [0xcf] = C_OTHER,    [0xd0] = C_OTHER,    [0xd1] = C_OTHER,    [0xd2] = C_OTHER,
    [0xd3] = C_OTHER,    [0xd4] = C_OTHER,    [0xd5] = C_OTHER,    [0xd6] = C_OTHER,
    [0xd7] = C_OTHER,    [0xd8] = C_OTHER,    [0xd9] = C_OTHER,    [0xda] = C_OTHER,
    [0xdb] = C_OTHER,    [0xdc] = C_OTHER,    [0xdd] = C_OTHER,    [0xde] = C_OTHER,
    [0xdf] = C_OTHER,
};

/* Skip without recursion: `pending` counts values still to be consumed
 * (a map of n pairs adds 2n).  64 bits cannot overflow: pending never
 * exceeds the bytes left (checked after each container). */
int mp_skip(const char **p, const char *end) {
    const unsigned char *q = (const unsigned char *)*p;
    const unsigned char *e = (const unsigned char *)end;
    uint64_t pending = 1;
    mp_item it;
    while (pending) {
        if (q >= e) return -1;
        unsigned c = *q;
        pending--;
        switch (cls[c]) {
        case C_ONE:
            q++;
            continue;
        case C_FIXSTR:
            if ((size_t)(e - q) - 1 < (c & 0x1f)) return -1;
            q += 1 + (c & 0x1f);
            continue;
        case C_FIXMAP:
            q++;
            pending += 2 * (c & 0x0f);
            break;
        case C_FIXARRAY:
            q++;
            pending += c & 0x0f;
            break;
        default: {
            long n = rd_item(q, e, &it);
            if (n < 0) return -1;
            q += n;
            if (it.type == MP_ARRAY) pending += it.v.n;
            else if (it.type == MP_MAP) pending += 2 * (uint64_t)it.v.n;
            else continue;
        }
        }
        /* every pending value needs at least one byte */
        if (pending > (uint64_t)(e - q)) return -1;
    }
    *p = (const char *)q;
    return 0;
}

/* The commonest maps (fixmap, fixstr keys, fixstr or fixint values) are
 * walked without a call: a replay's reader routes every event by a field
 * of its data, and every handler's key plan finds its fields here. */
int mp_map_find(const char *map, size_t len, const char *key, size_t klen,
                const char **val, size_t *vlen) {
    const unsigned char *q = (const unsigned char *)map, *e = q + len;
    uint32_t n;
    if (q < e && (*q & 0xf0) == 0x80) {
        n = *q++ & 0x0f;
    } else {
        const char *p = map;
        mp_item it;
        if (mp_next(&p, map + len, &it) < 0 || it.type != MP_MAP) return -1;
        n = it.v.n;
        q = (const unsigned char *)p;
    }
    for (uint32_t i = 0; i < n; i++) {
        const char *ks = NULL;
        size_t kl = 0;
        if (q < e && (*q & 0xe0) == 0xa0) {
            kl = *q & 0x1f;
            if ((size_t)(e - q) - 1 < kl) return -1;
            ks = (const char *)q + 1;
            q += 1 + kl;
        } else {
            const char *p = (const char *)q, *k = p;
            mp_item ki;
            if (mp_next(&p, (const char *)e, &ki) < 0) return -1;
            if (ki.type == MP_ARRAY || ki.type == MP_MAP) {
                p = k;
                if (mp_skip(&p, (const char *)e) < 0) return -1;
            }
            if (ki.type == MP_STR) ks = ki.v.s.ptr, kl = ki.v.s.len;
            q = (const unsigned char *)p;
        }
        const unsigned char *v = q;
        if (q >= e) return -1;
        if (*q <= 0x7f || *q >= 0xe0) {
            q++;
        } else if ((*q & 0xe0) == 0xa0) {
            if ((size_t)(e - q) - 1 < (size_t)(*q & 0x1f)) return -1;
            q += 1 + (*q & 0x1f);
        } else {
            const char *p = (const char *)q;
            if (mp_skip(&p, (const char *)e) < 0) return -1;
            q = (const unsigned char *)p;
        }
        if (ks && kl == klen && bytes_eq(ks, key, klen)) {
            *val = (const char *)v;
            *vlen = (size_t)(q - v);
            return 1;
        }
    }
    return 0;
}

/* ---- validation ---- */

#define STACK_INLINE 64

/* Describe why the item at q could not be read. */
static int fail_item(const unsigned char *base, const unsigned char *q, const unsigned char *end,
                     size_t len, const mp_limits *lim, tm_err *err) {
    mp_item it;
    size_t off = (size_t)(q - base);
    if (q < end && rd_item(q, end, &it) == RD_BAD)
        return err_set(err, TM_EINVAL, "msgpack: invalid byte 0x%02x at byte %zu", *q, off);
    if (len > (size_t)(end - base))
        return err_set(err, TM_EINVAL, "msgpack: value exceeds size limit of %zu bytes",
                       lim->max_size);
    return err_set(err, TM_EINVAL, "msgpack: truncated at byte %zu", off);
}

/* The walk keeps `rem`, the values still expected at the current level,
 * in a register; stack[] saves the outer levels' counts (one per open
 * container, at most max_depth). */
static int validate(const char *buf, size_t len, const mp_limits *lim, size_t *used,
                    int whole, tm_err *err) {
    if (!lim) lim = &mp_default_limits;
    const unsigned char *base = (const unsigned char *)buf;
    /* Never look beyond max_size: a value that needs more is too big. */
    size_t span = len < lim->max_size ? len : lim->max_size;
    const unsigned char *q = base, *end = base + span;
    uint64_t inline_stack[STACK_INLINE];
    uint64_t *stack = inline_stack;
    unsigned depth = 0, max_depth = lim->max_depth;
    uint64_t rem = 1, kids;
    int rc = -1;
    mp_item it;

    /* each open container holds at least its header byte, so the stack
     * never needs more entries than there are bytes */
    size_t need = max_depth < span ? max_depth : span;
    if (need > STACK_INLINE) {
        stack = malloc(sizeof *stack * need);
        if (!stack) return err_set(err, TM_EIO, "msgpack: out of memory for depth stack");
    }
    for (;;) {
        while (rem == 0) {
            if (!depth) goto done;
            rem = stack[--depth];
        }
        if (q >= end) {
            fail_item(base, q, end, len, lim, err);
            goto out;
        }
        const unsigned char *at = q;
        unsigned c = *q;
        int is_map;
        rem--;
        switch (cls[c]) {
        case C_ONE:
            q++;
            continue;
        case C_FIXSTR:
            if ((size_t)(end - q) - 1 < (c & 0x1f)) {
                fail_item(base, q, end, len, lim, err);
                goto out;
            }
            q += 1 + (c & 0x1f);
            continue;
        case C_FIXMAP:
            q++;
            is_map = 1;
            kids = 2 * (c & 0x0f);
            break;
        case C_FIXARRAY:
            q++;
            is_map = 0;
            kids = c & 0x0f;
            break;
        default: {
            long n = rd_item(q, end, &it);
            if (n < 0) {
                fail_item(base, q, end, len, lim, err);
                goto out;
            }
            q += n;
            if (it.type != MP_ARRAY && it.type != MP_MAP) continue;
            is_map = it.type == MP_MAP;
            if (it.v.n > lim->max_items) {
                err_set(err, TM_EINVAL, "msgpack: %s of %u items exceeds limit of %u at byte %zu",
                        is_map ? "map" : "array", it.v.n, lim->max_items,
                        (size_t)(at - base));
                goto out;
            }
            kids = is_map ? 2 * (uint64_t)it.v.n : it.v.n;
        }
        }
        /* a container (fixmap/fixarray counts are at most 15 <= any sane
         * max_items, but check them too for tiny limits) */
        if ((is_map ? kids / 2 : kids) > lim->max_items) {
            err_set(err, TM_EINVAL, "msgpack: %s of %u items exceeds limit of %u at byte %zu",
                    is_map ? "map" : "array", (unsigned)(is_map ? kids / 2 : kids),
                    lim->max_items, (size_t)(at - base));
            goto out;
        }
        if (depth >= max_depth) {
            err_set(err, TM_EINVAL, "msgpack: nesting deeper than %u at byte %zu", max_depth,
                    (size_t)(at - base));
            goto out;
        }
        if (kids > (uint64_t)(end - q)) { /* each child needs at least one byte */
            if (len > span)
                err_set(err, TM_EINVAL, "msgpack: value exceeds size limit of %zu bytes",
                        lim->max_size);
            else
                err_set(err, TM_EINVAL,
                        "msgpack: truncated: %s at byte %zu claims %u items, %zu bytes left",
                        is_map ? "map" : "array", (size_t)(at - base),
                        (unsigned)(is_map ? kids / 2 : kids), (size_t)(end - q));
            goto out;
        }
        stack[depth++] = rem;
        rem = kids;
    }
done:
    if (whole && (size_t)(q - base) != len) {
        err_set(err, TM_EINVAL, "msgpack: %zu trailing bytes at byte %zu",
                len - (size_t)(q - base), (size_t)(q - base));
        goto out;
    }
    if (used) *used = (size_t)(q - base);
    rc = 0;
out:
    if (stack != inline_stack) free(stack);
    return rc;
}

/* Total bytes of the fixed-size scalars (positive/negative fixint, nil,
 * bools, float32/64, uint/int 8..64); 0 = anything else. */
static const unsigned char scalar_size[256] = {
    [0x00 ... 0x7f] = 1, [0xe0 ... 0xff] = 1, [0xc0] = 1, [0xc2] = 1, [0xc3] = 1,
    [0xca] = 5, [0xcb] = 9, [0xcc] = 2, [0xcd] = 3, [0xce] = 5, [0xcf] = 9,
    [0xd0] = 2, [0xd1] = 3, [0xd2] = 5, [0xd3] = 9,
};

/* The commonest event data: one fixmap/fixarray of scalars and short
 * strings (fixstr, str8), exactly filling [buf, buf+len).  1 = valid under
 * lim (the general walk would accept it too: depth 1, at most 15 items,
 * every item whole, nothing trailing, len within max_size); 0 = not of
 * that shape, or not certainly valid: the general walk decides. */
static int flat_ok(const unsigned char *q, size_t len, const mp_limits *lim) {
    if (!len || len > lim->max_size || lim->max_depth < 1) return 0;
    const unsigned char *e = q + len;
    unsigned c = *q++, n, items;
    if ((c & 0xf0) == 0x80) items = c & 0x0f, n = 2 * items;
    else if ((c & 0xf0) == 0x90) items = n = c & 0x0f;
    else return 0;
    if (items > lim->max_items) return 0;
    while (n--) {
        if (q >= e) return 0;
        c = *q;
        size_t sz;
        if ((c & 0xe0) == 0xa0) sz = 1 + (c & 0x1f);
        else if (c == 0xd9) {
            if (e - q < 2) return 0;
            sz = 2 + (size_t)q[1];
        } else if (!(sz = scalar_size[c])) return 0;
        if ((size_t)(e - q) < sz) return 0;
        q += sz;
    }
    return q == e;
}

int mp_validate(const char *buf, size_t len, const mp_limits *lim, tm_err *err) {
    if (flat_ok((const unsigned char *)buf, len, lim ? lim : &mp_default_limits)) return 0;
    return validate(buf, len, lim, NULL, 1, err);
}

int mp_validate_prefix(const char *buf, size_t len, const mp_limits *lim, size_t *used,
                       tm_err *err) {
    return validate(buf, len, lim, used, 0, err);
}
