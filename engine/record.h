/* record.h — the stored form of one event (the value under its position).
 *
 *   record = crc32c(body) as 4 bytes little-endian, then body
 *   body   = msgpack array [1, id(bin 16), stream(str), type(str),
 *                           version(uint), time(int), metadata(map), data]
 * The position is the LevelDB key, not part of the record.  record_decode
 * verifies the checksum and the shape; a mismatch is TM_EIO ("corrupt").
 */
#ifndef TM_RECORD_H
#define TM_RECORD_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"
#include "event.h"

/* Append the record of ev (its version and time as given) to out. */
void record_encode(const tm_event *ev, buf *out);
/* Decode rec into ev (a view into rec); ev->position is left untouched. */
int record_decode(const char *rec, size_t len, tm_event *ev, tm_err *err);

/* The fields of rec, unverified (no checksum, metadata and data not
 * walked): to route an event that record_decode will decode before use.
 * 0, or -1 when even that much does not parse. */
int record_peek(const char *rec, size_t len, tm_event *ev);

uint32_t crc32c(uint32_t crc, const void *p, size_t n);

#endif
