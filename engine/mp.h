/* mp.h — reading and validating msgpack without trusting it.
 *
 * Writing msgpack uses msgpack-c's packer (msgpack/pack.h) everywhere.
 * Reading uses this small cursor instead of msgpack-c's unpacker, because
 * (1) msgpack-c's unpacker has no limits of its own, and (2) the hot paths
 * (replay, export, Lua decode) want to walk bytes without building trees.
 *
 * Rule: bytes from outside go through mp_validate first (one whole value,
 * depth, lengths and total size bounded); after that mp_next/mp_skip may be
 * used on them without re-checking sizes (they still never read past end).
 */
#ifndef TM_MP_H
#define TM_MP_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct mp_limits {
    unsigned max_depth;   /* nesting of arrays/maps; default 64 */
    uint32_t max_items;   /* elements of one array / pairs of one map; default 1<<20 */
    size_t max_size;      /* bytes of the whole value; default 1 MiB */
} mp_limits;

extern const mp_limits mp_default_limits;

typedef enum mp_type {
    MP_NIL, MP_BOOL, MP_UINT, MP_INT, MP_FLOAT, MP_DOUBLE,
    MP_STR, MP_BIN, MP_ARRAY, MP_MAP, MP_EXT
} mp_type;

typedef struct mp_item {
    mp_type type;
    union {
        int b;                 /* MP_BOOL */
        uint64_t u;            /* MP_UINT (non-negative integers) */
        int64_t i;             /* MP_INT (negative integers) */
        double d;              /* MP_FLOAT (widened) and MP_DOUBLE */
        struct {
            const char *ptr;   /* MP_STR, MP_BIN, MP_EXT payload (borrowed) */
            uint32_t len;
            int8_t ext;        /* MP_EXT type */
        } s;
        uint32_t n;            /* MP_ARRAY elements, MP_MAP pairs (children follow) */
    } v;
} mp_item;

/* Check that [buf, buf+len) holds exactly one msgpack value within lim
 * (NULL = mp_default_limits).  On failure err says what and at which byte. */
int mp_validate(const char *buf, size_t len, const mp_limits *lim, tm_err *err);
/* Like mp_validate but the value may be followed by more bytes; *used gets
 * the length of the first value. */
int mp_validate_prefix(const char *buf, size_t len, const mp_limits *lim,
                       size_t *used, tm_err *err);

/* Read one item header at *p, advance past it (and past str/bin/ext payload;
 * array/map children are NOT skipped).  -1 on truncation or bad byte. */
int mp_next(const char **p, const char *end, mp_item *out);
/* Skip one whole value (with its children).  -1 on truncation. */
int mp_skip(const char **p, const char *end);
/* In the map at `map` (header not yet read), find string key `key`; on success *val, *vlen
 * is the value's bytes.  Returns 1 found, 0 not found, -1 malformed. */
int mp_map_find(const char *map, size_t len, const char *key, size_t klen,
                const char **val, size_t *vlen);

#endif
