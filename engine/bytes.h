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

/* The first and last w bytes (w <= n <= 2w) of x and y are equal:
 * together they cover all n.  w is a constant where this is inlined, so
 * each memcpy is one load. */
static inline int bytes_ends_eq(const unsigned char *x, const unsigned char *y, size_t n,
                                size_t w) {
    uint64_t x0 = 0, x1 = 0, y0 = 0, y1 = 0;
    memcpy(&x0, x, w);
    memcpy(&y0, y, w);
    memcpy(&x1, x + n - w, w);
    memcpy(&y1, y + n - w, w);
    return ((x0 ^ y0) | (x1 ^ y1)) == 0;
}

/* 1 if the n bytes at a and b are equal. */
static inline int bytes_eq(const void *a, const void *b, size_t n) {
    const unsigned char *x = a, *y = b;
    if (n > 16) return memcmp(x, y, n) == 0;
    if (n >= 8) return bytes_ends_eq(x, y, n, 8);
    if (n >= 4) return bytes_ends_eq(x, y, n, 4);
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return 0;
    return 1;
}

#endif
