/* fuzz_record.c — libFuzzer target: decoding stored records (record.h).
 *
 * The first input byte picks a mode: odd = the rest is taken as a record
 * body and given a correct crc32c (so the fuzzer explores the shape
 * checks behind the checksum), even = the rest is used as is.
 * Properties, for any bytes:
 *   - record_decode never crashes or reads outside the record;
 *   - without a fixed checksum, random bytes are (practically) never
 *     accepted: anything accepted has a checksum that matches its body;
 *   - an accepted record's views lie inside it, names are non-empty,
 *     metadata is a map, and record_encode of the decoded event decodes
 *     to the same event (stream, type, id, version, time, metadata, data);
 *   - event_to_json on it never crashes (records are served as JSON);
 *   - record_peek (the replay reader's unverified view) never crashes,
 *     its views lie inside the record, and on a record record_decode
 *     accepts it sees the same stream, type, metadata and data.
 */
#include "fuzz_common.h"

#include "buf.h"
#include "err.h"
#include "event.h"
#include "record.h"

static int inside(const char *p, size_t n, const char *lo, size_t len) {
    return p >= lo && p + n <= lo + len;
}

static int same(const char *a, size_t al, const char *b, size_t bl) {
    return al == bl && (al == 0 || memcmp(a, b, al) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int fix = data[0] & 1;
    size_t len = size - 1;
    char *rec = fuzz_copy(data + 1, len);
    if (fix && len >= 4) {
        uint32_t c = crc32c(0, rec + 4, len - 4);
        rec[0] = (char)c;
        rec[1] = (char)(c >> 8);
        rec[2] = (char)(c >> 16);
        rec[3] = (char)(c >> 24);
    }
    tm_event pk;
    memset(&pk, 0, sizeof pk);
    int peeked = record_peek(rec, len, &pk) == 0;
    if (peeked) {
        fuzz_assert(inside(pk.stream, pk.stream_len, rec, len), "peek: stream");
        fuzz_assert(inside(pk.type, pk.type_len, rec, len), "peek: type");
        fuzz_assert(inside(pk.meta, pk.meta_len, rec, len), "peek: metadata");
        fuzz_assert(inside(pk.data, pk.data_len, rec, len), "peek: data");
    }
    tm_event ev;
    tm_err e;
    memset(&ev, 0, sizeof ev);
    if (record_decode(rec, len, &ev, &e) == 0) {
        fuzz_assert(peeked, "record_peek refused a record record_decode accepts");
        fuzz_assert(same(pk.stream, pk.stream_len, ev.stream, ev.stream_len) &&
                        same(pk.type, pk.type_len, ev.type, ev.type_len) &&
                        same(pk.meta, pk.meta_len, ev.meta, ev.meta_len) &&
                        same(pk.data, pk.data_len, ev.data, ev.data_len),
                    "record_peek and record_decode disagree");
        fuzz_assert(len >= 5, "accepted %zu bytes", len);
        const unsigned char *h = (const unsigned char *)rec;
        uint32_t want = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 |
                        (uint32_t)h[3] << 24;
        fuzz_assert(crc32c(0, rec + 4, len - 4) == want, "accepted a wrong checksum");
        fuzz_assert(inside(ev.stream, ev.stream_len, rec, len) && ev.stream_len > 0, "stream");
        fuzz_assert(inside(ev.type, ev.type_len, rec, len) && ev.type_len > 0, "type");
        fuzz_assert(inside(ev.meta, ev.meta_len, rec, len) && ev.meta_len > 0, "metadata");
        fuzz_assert(inside(ev.data, ev.data_len, rec, len) && ev.data_len > 0, "data");
        unsigned char m = (unsigned char)ev.meta[0];
        fuzz_assert((m & 0xf0) == 0x80 || m == 0xde || m == 0xdf, "metadata is not a map");

        buf r2 = BUF_INIT;
        record_encode(&ev, &r2);
        tm_event ev2;
        memset(&ev2, 0, sizeof ev2);
        fuzz_assert(record_decode(r2.ptr, r2.len, &ev2, &e) == 0, "re-encoded record: %s", e.msg);
        fuzz_assert(same(ev.stream, ev.stream_len, ev2.stream, ev2.stream_len), "stream differs");
        fuzz_assert(same(ev.type, ev.type_len, ev2.type, ev2.type_len), "type differs");
        fuzz_assert(same(ev.meta, ev.meta_len, ev2.meta, ev2.meta_len), "metadata differs");
        fuzz_assert(same(ev.data, ev.data_len, ev2.data, ev2.data_len), "data differs");
        fuzz_assert(memcmp(ev.id, ev2.id, 16) == 0 && ev.version == ev2.version &&
                        ev.time_ms == ev2.time_ms, "id/version/time differ");
        buf_free(&r2);

        buf j = BUF_INIT;
        (void)event_to_json(&ev, &j, &e);
        buf_free(&j);
    }
    free(rec);
    return 0;
}
