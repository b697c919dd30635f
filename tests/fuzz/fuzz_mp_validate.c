/* fuzz_mp_validate.c — libFuzzer target: the msgpack validator and the
 * readers that trust it.
 *
 * Properties, for any bytes:
 *   - mp_validate, mp_validate_prefix, mp_skip, mp_map_find and json_from_mp
 *     never crash or read outside the input (ASan), even on input that
 *     was NOT validated (mp.h: they never read past `end`);
 *   - accepted input is one whole value: mp_skip consumes exactly all of it;
 *   - mp_validate_prefix agrees with mp_validate on the prefix it reports;
 *   - a value accepted under tight limits is accepted under the defaults;
 *   - json_from_mp succeeds on accepted input, and its JSON text parses
 *     again with json_to_mp (export output must always be importable
 *     text; limits are widened because {"$bin":..} adds a level).
 */
#include "fuzz_common.h"

#include "buf.h"
#include "err.h"
#include "json.h"
#include "mp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *in = fuzz_copy(data, size);
    const char *end = in + size;
    tm_err e;

    /* readers on raw bytes: must stay in bounds whatever the result */
    const char *p = in;
    int skip_ok = mp_skip(&p, end) == 0;
    if (skip_ok) fuzz_assert(p > in && p <= end, "mp_skip cursor out of range");
    const char *v;
    size_t vl;
    if (mp_map_find(in, size, "a", 1, &v, &vl) == 1)
        fuzz_assert(v >= in && v + vl <= end, "mp_map_find value out of range");
    buf raw = BUF_INIT;
    (void)json_from_mp(in, size, &raw, &e);
    buf_free(&raw);

    size_t used = 0;
    int pre = mp_validate_prefix(in, size, NULL, &used, &e);
    int ok = mp_validate(in, size, NULL, &e);
    if (pre == 0) {
        fuzz_assert(used > 0 && used <= size, "prefix length %zu of %zu", used, size);
        fuzz_assert(mp_validate(in, used, NULL, &e) == 0, "prefix not valid alone: %s", e.msg);
        fuzz_assert(ok == (used == size ? 0 : -1), "validate/prefix disagree");
    } else {
        fuzz_assert(ok < 0, "validate accepts what prefix rejects");
    }

    mp_limits tight = {.max_depth = 3, .max_items = 4, .max_size = 64};
    if (mp_validate(in, size, &tight, &e) == 0)
        fuzz_assert(ok == 0, "accepted under tight limits, rejected under defaults");

    if (ok == 0) {
        fuzz_assert(skip_ok && p == end, "mp_skip did not consume exactly the validated value");
        buf j = BUF_INIT;
        fuzz_assert(json_from_mp(in, size, &j, &e) == 0, "json_from_mp failed: %s", e.msg);
        mp_limits wide = mp_default_limits;
        wide.max_depth = 2 * mp_default_limits.max_depth + 1;
        wide.max_size = 64 * size + 4096;
        buf m = BUF_INIT;
        fuzz_assert(json_to_mp(j.ptr, j.len, &wide, &m, &e) == 0,
                    "printed JSON does not parse again: %s: %.200s", e.msg, j.ptr);
        buf_free(&m);
        buf_free(&j);
    }
    free(in);
    return 0;
}
