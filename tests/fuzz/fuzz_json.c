/* fuzz_json.c — libFuzzer target: JSON -> msgpack -> JSON round trips.
 *
 * Properties, for any text:
 *   - json_to_mp never crashes, never reads outside the input;
 *   - what it accepts it emits as one valid msgpack value within the
 *     default limits (mp_validate accepts it);
 *   - json_from_mp prints it; that text transcodes again to the SAME
 *     msgpack bytes (canonical, stable), and prints to the same text.
 */
#include "fuzz_common.h"

#include "buf.h"
#include "err.h"
#include "json.h"
#include "mp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *in = fuzz_copy(data, size);
    tm_err e;
    buf m1 = BUF_INIT, j1 = BUF_INIT, m2 = BUF_INIT, j2 = BUF_INIT;
    if (json_to_mp(in, size, NULL, &m1, &e) == 0) {
        fuzz_assert(mp_validate(m1.ptr, m1.len, NULL, &e) == 0, "json_to_mp output invalid: %s",
                    e.msg);
        fuzz_assert(json_from_mp(m1.ptr, m1.len, &j1, &e) == 0, "json_from_mp: %s", e.msg);
        fuzz_assert(json_to_mp(j1.ptr, j1.len, NULL, &m2, &e) == 0,
                    "printed JSON does not parse: %s: %.200s", e.msg, j1.ptr);
        fuzz_assert(m1.len == m2.len && memcmp(m1.ptr, m2.ptr, m1.len) == 0,
                    "msgpack differs after a round trip; JSON was %.200s", j1.ptr);
        fuzz_assert(json_from_mp(m2.ptr, m2.len, &j2, &e) == 0, "json_from_mp: %s", e.msg);
        fuzz_assert(j1.len == j2.len && memcmp(j1.ptr, j2.ptr, j1.len) == 0,
                    "JSON text differs after a round trip: %.200s vs %.200s", j1.ptr, j2.ptr);
    }
    buf_free(&m1);
    buf_free(&j1);
    buf_free(&m2);
    buf_free(&j2);
    free(in);
    return 0;
}
