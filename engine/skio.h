/* skio.h — framing and primitives shared by the sketch serialisers
 * (hll.c, kll.c, topk.c, window.c) and the 64-bit hash they use.
 *
 * A serialised sketch is
 *     magic[4]  version(1 byte)  body ...  check[4]
 * where check is the low 32 bits of skio_hash64(everything before it,
 * SKIO_CHECK_SEED), stored big-endian.  Integers in the body are
 * canonical LEB128 varints (the shortest encoding; a reader rejects any
 * other), doubles are their IEEE-754 bits big-endian (8 bytes).  Because
 * every writer emits one canonical form, equal sketches give equal bytes,
 * and a reader that accepts bytes re-serialises them to the same bytes.
 *
 * Readers are cursors over untrusted bytes: every read is bounds-checked,
 * the first failure sticks (rd->bad) and later reads return zeros, so a
 * decoder can read a whole record and test once.  The frame is verified
 * (length, magic, version, checksum) before the body is looked at.
 */
#ifndef TM_SKIO_H
#define TM_SKIO_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"

#define SKIO_CHECK_SEED 0x7469646d61726bULL /* "tidmark" */

/* MurmurHash64A (Austin Appleby, public domain), as used by Redis's
 * hyperloglog.c; reads the input little-endian on every platform. */
uint64_t skio_hash64(const void *p, size_t n, uint64_t seed);

/* --- writing ---------------------------------------------------------- */
/* Start a frame at the current end of out; returns the frame's offset. */
size_t skio_begin(buf *out, const char magic[4], int version);
void skio_put_u64(buf *out, uint64_t v);  /* varint */
void skio_put_i64(buf *out, int64_t v);   /* zigzag varint */
void skio_put_f64(buf *out, double v);    /* IEEE bits, big-endian */
void skio_put_bytes(buf *out, const void *p, size_t n); /* varint length + bytes */
/* Close the frame opened at offset start: appends the checksum. */
void skio_end(buf *out, size_t start);

/* --- reading ---------------------------------------------------------- */
typedef struct skio_rd {
    const unsigned char *p, *end;
    int bad;
} skio_rd;

/* Verify the frame (magic, version, checksum) and position rd on the body.
 * 0, or -1 filling e (TM_EINVAL). */
int skio_open(skio_rd *rd, const char *p, size_t n, const char magic[4], int version,
              tm_err *e);
uint64_t skio_u64(skio_rd *rd);
int64_t skio_i64(skio_rd *rd);
double skio_f64(skio_rd *rd);  /* any bits, NaN included: callers validate */
/* A length-prefixed byte string (borrowed from the input); max bounds it. */
const char *skio_bytes(skio_rd *rd, size_t *n, size_t max);
const void *skio_raw(skio_rd *rd, size_t n); /* n raw bytes, borrowed */
/* Mark the cursor bad (a decoder found an invalid value). */
void skio_fail(skio_rd *rd);
/* 0 when nothing failed and the body was consumed exactly; else -1 + e. */
int skio_close(skio_rd *rd, const char *what, tm_err *e);

#endif
