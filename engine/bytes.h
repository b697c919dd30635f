/* bytes.h — equality of short byte strings, inlined on the hot paths.
 *
 * Owns nothing; header only.  The names these paths compare (a category,
 * an event type, a data key, a partition field) are a few bytes long, and
 * a call into libc's memcmp for each of them costs more than the compare:
 * the replay's reader spent ~30% of its time in memcmp calls made by
 * proj_selects and mp_map_find (10M events, gdb samples; docs/benchmarks.md
 * section 13).  Up to 16 bytes are compared with overlapping unaligned
 * word loads; longer strings go to memcmp.
 */
#ifndef TM_BYTES_H
#define TM_BYTES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* 1 if the n bytes at a and b are equal. */
static inline int bytes_eq(const void *a, const void *b, size_t n) {
    const unsigned char *x = a, *y = b;
    if (n >= 8) {
        if (n > 16) return memcmp(x, y, n) == 0;
        uint64_t a0, a1, b0, b1;
        memcpy(&a0, x, 8);
        memcpy(&b0, y, 8);
        memcpy(&a1, x + n - 8, 8);
        memcpy(&b1, y + n - 8, 8);
        return ((a0 ^ b0) | (a1 ^ b1)) == 0;
    }
    if (n >= 4) {
        uint32_t a0, a1, b0, b1;
        memcpy(&a0, x, 4);
        memcpy(&b0, y, 4);
        memcpy(&a1, x + n - 4, 4);
        memcpy(&b1, y + n - 4, 4);
        return ((a0 ^ b0) | (a1 ^ b1)) == 0;
    }
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return 0;
    return 1;
}

#endif
