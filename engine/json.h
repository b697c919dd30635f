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
#include <stdio.h>

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

/* Append "key":value to out, the key quoted as json_put_string quotes
 * it, the value transcoded from msgpack (json_from_mp). */
int json_render_pair(buf *out, const char *k, size_t kl, const char *mp, size_t len,
                     tm_err *err);

/* A JSON object written to a stream pair by pair in 64 KiB chunks (a read
 * model of 1M partitions is ~40 MB of text, never held whole): '{' goes
 * out with the first pair, "}\n" -- or "{}\n" -- with json_objw_end.  The
 * fields are private; the struct is here to live on the caller's stack. */
typedef struct json_objw {
    FILE *f;
    buf b;
    size_t n;
    int io;             /* errno of the first failed write, 0 = none */
    int bad;            /* a value did not transcode: err says why */
    tm_err err;
} json_objw;

void json_objw_init(json_objw *w, FILE *f);
/* One pair, its value transcoded from msgpack; -1 (err) if it does not
 * transcode. */
int json_objw_pair(json_objw *w, const char *k, size_t kl, const char *mp, size_t len,
                   tm_err *err);
/* json_objw_pair as a pair callback (proj_kv_fn's shape, w as ctx): 1
 * stops the walk at the first value that does not transcode, or once a
 * write failed; json_objw_end then reports it. */
int json_objw_each(void *w, const char *k, size_t kl, const char *mp, size_t len);
/* n pairs already rendered and joined by commas ("k":v,"k":v), written
 * straight to the stream (len may be tens of MB: it is not copied). */
void json_objw_rendered_run(json_objw *w, const char *text, size_t len, size_t n);
/* 1 once a write to the stream has failed (the caller may stop early). */
int json_objw_failed(const json_objw *w);
/* Close the object, flush and free; -1 with err: a value json_objw_each
 * could not transcode (then nothing more is written), or TM_EIO when a
 * write failed. */
int json_objw_end(json_objw *w, tm_err *err);
/* Abandon the object (after an error): free without writing more. */
void json_objw_free(json_objw *w);

/* 1 if [s, s+len) is well-formed UTF-8 (no overlongs, no surrogates,
 * nothing above U+10FFFF), else 0. */
int json_utf8_valid(const char *s, size_t len);

#endif
