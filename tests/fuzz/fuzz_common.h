/* fuzz_common.h — helpers shared by the libFuzzer targets in tests/fuzz/.
 *
 * Each target is one LLVMFuzzerTestOneInput that checks properties and
 * calls fuzz_fail (abort, so libFuzzer saves the input) when one breaks.
 * Inputs are copied into an exact-size heap buffer first, so AddressSanitizer
 * flags a read even one byte past the end.
 */
#ifndef TM_FUZZ_COMMON_H
#define TM_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define fuzz_fail(...)                                                        \
    do {                                                                      \
        fprintf(stderr, "fuzz property failed at %s:%d: ", __FILE__, __LINE__); \
        fprintf(stderr, __VA_ARGS__);                                         \
        fputc('\n', stderr);                                                  \
        abort();                                                              \
    } while (0)

#define fuzz_assert(cond, ...)                                                \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "(%s) ", #cond);                                  \
            fuzz_fail(__VA_ARGS__);                                           \
        }                                                                     \
    } while (0)

/* An exact-size malloc'd copy (never NULL; size 0 gives a 1-byte block). */
static inline char *fuzz_copy(const uint8_t *data, size_t size) {
    char *p = malloc(size ? size : 1);
    if (!p) abort();
    if (size) memcpy(p, data, size);
    return p;
}

#endif
