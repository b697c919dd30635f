/* fuzz_event_json.c — libFuzzer target: one import line (event_from_json)
 * and its export form (event_to_json).
 *
 * Properties, for any text:
 *   - event_from_json never crashes or reads outside the input; on error
 *     it gives back the scratch bytes it appended;
 *   - an accepted event has valid names (event_check_names) and data /
 *     metadata that are single valid msgpack values within the limits;
 *   - event_to_json prints it, and that line parses again to the same
 *     stream, type, data, metadata, id and time (export -> import is
 *     lossless for anything import accepted).
 */
#include "fuzz_common.h"

#include "buf.h"
#include "err.h"
#include "event.h"
#include "mp.h"

static int same(const char *a, size_t al, const char *b, size_t bl) {
    return al == bl && (al == 0 || memcmp(a, b, al) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *in = fuzz_copy(data, size);
    tm_err e;
    buf scratch = BUF_INIT, out = BUF_INIT, scratch2 = BUF_INIT;
    buf_append(&scratch, "x", 1); /* non-empty: checks the give-back on failure */
    tm_event ev, ev2;
    memset(&ev, 0, sizeof ev);
    if (event_from_json(in, size, NULL, 0, NULL, &scratch, &ev, &e) < 0) {
        fuzz_assert(scratch.len == 1, "scratch not restored on failure (%zu bytes)", scratch.len);
        goto out;
    }
    fuzz_assert(event_check_names(&ev, &e) == 0, "accepted bad names: %s", e.msg);
    fuzz_assert(ev.data_len > 0 && mp_validate(ev.data, ev.data_len, NULL, &e) == 0,
                "data invalid: %s", e.msg);
    if (ev.meta_len) {
        fuzz_assert(mp_validate(ev.meta, ev.meta_len, NULL, &e) == 0, "metadata invalid: %s",
                    e.msg);
        unsigned char c = (unsigned char)ev.meta[0];
        fuzz_assert((c & 0xf0) == 0x80 || c == 0xde || c == 0xdf, "metadata not a map");
    }
    ev.position = 7;
    ev.version = 3;
    fuzz_assert(event_to_json(&ev, &out, &e) == 0, "event_to_json: %s", e.msg);
    memset(&ev2, 0, sizeof ev2);
    fuzz_assert(event_from_json(out.ptr, out.len, NULL, 0, NULL, &scratch2, &ev2, &e) == 0,
                "exported line does not import: %s: %.300s", e.msg, out.ptr);
    fuzz_assert(same(ev.stream, ev.stream_len, ev2.stream, ev2.stream_len), "stream differs");
    fuzz_assert(same(ev.type, ev.type_len, ev2.type, ev2.type_len), "type differs");
    fuzz_assert(same(ev.data, ev.data_len, ev2.data, ev2.data_len), "data differs: %.300s",
                out.ptr);
    const char *m1 = ev.meta_len ? ev.meta : "\x80";
    size_t m1l = ev.meta_len ? ev.meta_len : 1;
    fuzz_assert(same(m1, m1l, ev2.meta, ev2.meta_len), "metadata differs: %.300s", out.ptr);
    fuzz_assert(ev2.has_id, "exported id missing");
    if (ev.has_id) fuzz_assert(memcmp(ev.id, ev2.id, 16) == 0, "id differs");
    fuzz_assert(ev.time_ms == ev2.time_ms, "time differs");
out:
    buf_free(&scratch);
    buf_free(&scratch2);
    buf_free(&out);
    free(in);
    return 0;
}
