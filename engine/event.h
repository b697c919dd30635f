/* event.h — the event value, its ids, and its JSON-lines form.
 *
 * tm_event is a *view*: every pointer is borrowed from a buffer owned by
 * whoever filled it (a JSON parse buffer, a store iterator, a record).  It
 * is valid until that owner moves on (the next iterator step, buf_free...).
 *
 * JSON-lines form (DESIGN.md), in this key order on output:
 *   {"stream":..,"type":..,"data":..,"metadata":{..},"id":"uuid","time":ms,
 *    "position":N,"version":N}
 * On input `id`, `metadata`, `time` are optional, `position`/`version` are
 * ignored, unknown keys are an error.  The stream is UTF-8, 1..256 bytes;
 * the type is 1..256 bytes.  The category of a stream is its name up to the
 * first '-' (the whole name if it has none).
 */
#ifndef TM_EVENT_H
#define TM_EVENT_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"
#include "mp.h"

#define EVENT_MAX_STREAM 256
#define EVENT_MAX_TYPE 256

typedef struct tm_event {
    uint8_t id[16];          /* UUID bytes */
    int has_id;              /* input only: 0 = the store generates one */
    const char *stream;
    size_t stream_len;
    const char *type;
    size_t type_len;
    const char *data;        /* one msgpack value (nil if absent) */
    size_t data_len;
    const char *meta;        /* one msgpack map; len 0 = none (empty map) */
    size_t meta_len;
    int64_t time_ms;         /* event time; 0 on input = the store uses append time */
    uint64_t position;       /* set by the store: global, from 1 */
    uint64_t version;        /* set by the store: per stream, from 0 */
} tm_event;

/* ---- ids ---- */
void event_id_generate(uint8_t id[16]);                 /* random UUIDv4, thread-safe */
int event_id_parse(const char *s, size_t len, uint8_t id[16]); /* 0 / -1 */
void event_id_format(const uint8_t id[16], char out[37]);      /* NUL-terminated */

/* ---- names ---- */
size_t event_category_len(const char *stream, size_t len);
/* Validate stream and type names (lengths, UTF-8, no NUL). */
int event_check_names(const tm_event *ev, tm_err *err);

/* ---- JSON lines ---- */
/* Parse one JSON object (an import line, or an HTTP body element).  The
 * event's data/meta point into `scratch`, which the caller owns and must
 * keep until done with ev (scratch is appended to, not reset).
 * If stream is non-NULL it is used and a "stream" key is an error... unless
 * equal; if NULL, "stream" is required.  lim bounds data and metadata. */
int event_from_json(const char *text, size_t len, const char *stream, size_t stream_len,
                    const mp_limits *lim, buf *scratch, tm_event *ev, tm_err *err);
/* Same, from a msgpack map with the same keys (HTTP msgpack bodies); the
 * id may be a 16-byte bin or a UUID string.  ev points into mp. */
int event_from_mp(const char *mp, size_t len, const char *stream, size_t stream_len,
                  tm_event *ev, tm_err *err);
/* Append the export JSON of ev (with position and version) to out, no newline. */
int event_to_json(const tm_event *ev, buf *out, tm_err *err);

#endif
