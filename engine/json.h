/* json.h — JSON <-> msgpack transcoding with yajl, without a tree.
 *
 * JSON to msgpack streams yajl's parse callbacks straight into msgpack-c's
 * packer (maps and arrays get their counts patched when they close).
 * Faithfulness rules, both ways:
 *   - integers stay integers (up to 64-bit signed/unsigned), other numbers
 *     become float64 and are printed back with round-trip precision;
 *   - map key order is preserved;
 *   - msgpack bin (which JSON lacks) is exported as {"$bin":"<base64>"} and
 *     msgpack ext as {"$ext":T,"data":"<base64>"}; non-string map keys are
 *     printed as their JSON text in a string.
 * Limits (depth, item counts, size) are those of mp_limits.
 */
#ifndef TM_JSON_H
#define TM_JSON_H

#include <stddef.h>

#include "buf.h"
#include "err.h"
#include "mp.h"

/* Transcode exactly one JSON value in [text, text+len) to msgpack appended
 * to out.  Leading/trailing whitespace is allowed; anything else is an error
 * that names the offset.  lim may be NULL (defaults). */
int json_to_mp(const char *text, size_t len, const mp_limits *lim, buf *out, tm_err *err);
/* Tests only: 0 makes json_to_mp skip its fast path (always yajl), 1 (the
 * default) restores it.  Not thread-safe. */
void json_set_fast_path(int on);

/* Append the JSON text of one msgpack value (already validated) to out. */
int json_from_mp(const char *mp, size_t len, buf *out, tm_err *err);

/* Append s as a JSON string literal (quoted, escaped; invalid UTF-8 is
 * replaced by U+FFFD). */
void json_put_string(buf *out, const char *s, size_t len);

/* 1 if [s, s+len) is well-formed UTF-8 (no overlongs, no surrogates,
 * nothing above U+10FFFF), else 0. */
int json_utf8_valid(const char *s, size_t len);

#endif
