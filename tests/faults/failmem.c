/* failmem.c — an LD_PRELOAD shim that fails the Nth allocation, for tests.
 *
 * It wraps malloc, calloc and realloc and counts every call of the
 * process; the Nth (once) or every call from the Nth on (persistent)
 * returns NULL with errno ENOMEM.  free and the rest pass through.  It
 * calls glibc's own entry points (__libc_malloc ...), so it needs no dlsym
 * (which itself allocates), and it cannot be used under AddressSanitizer,
 * whose allocator it would bypass (tests skip it there).
 *
 * Environment (read once, at load; the names are failio.c's):
 *   FAILIO_CALL        must name "malloc" for anything to be counted
 *   FAILIO_N           1-based call number to fail; 0 or unset = count only
 *   FAILIO_MODE        once (default) | persistent
 *   FAILIO_COUNT_FILE  at exit, write "<calls counted> <calls failed>\n" here
 *   FAILIO_VERBOSE     1 = say on stderr which call was failed
 *
 * Invariants: counting is allocation-free and thread-safe (atomics);
 * before the constructor has run nothing is counted.  Not for production.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);

static atomic_int armed;       /* FAILIO_CALL names malloc */
static atomic_long fail_at;    /* 1-based; 0 = never */
static atomic_int persistent;
static atomic_long ncalls, nfailed;
static int verbose;
static const char *count_file;

static void report(void) {
    if (!count_file) return;
    long c = atomic_load(&ncalls), f = atomic_load(&nfailed);
    atomic_store(&armed, 0); /* fopen allocates */
    FILE *out = fopen(count_file, "w");
    if (!out) return;
    fprintf(out, "%ld %ld\n", c, f);
    fclose(out);
}

static int names_malloc(const char *s) {
    while (s && *s) {
        size_t n = strcspn(s, ", ");
        if (n == 6 && !strncmp(s, "malloc", 6)) return 1;
        s += n;
        while (*s == ',' || *s == ' ') s++;
    }
    return 0;
}

__attribute__((constructor)) static void failmem_init(void) {
    const char *n = getenv("FAILIO_N");
    const char *m = getenv("FAILIO_MODE");
    atomic_store(&fail_at, n ? atol(n) : 0);
    atomic_store(&persistent, m && !strcmp(m, "persistent"));
    verbose = getenv("FAILIO_VERBOSE") && atoi(getenv("FAILIO_VERBOSE"));
    count_file = getenv("FAILIO_COUNT_FILE");
    if (count_file) atexit(report);
    atomic_store(&armed, names_malloc(getenv("FAILIO_CALL")));
}

static int should_fail(const char *what) {
    if (!atomic_load(&armed)) return 0;
    long at = atomic_load(&fail_at);
    long c = atomic_fetch_add(&ncalls, 1) + 1;
    if (at <= 0 || c < at || (c > at && !atomic_load(&persistent))) return 0;
    atomic_fetch_add(&nfailed, 1);
    if (verbose) {
        char msg[96];
        int k = snprintf(msg, sizeof msg, "failmem: failing %s call #%ld\n", what, c);
        if (k > 0) {
            ssize_t w = write(2, msg, (size_t)k);
            (void)w;
        }
    }
    errno = ENOMEM;
    return 1;
}

void *malloc(size_t n) {
    if (should_fail("malloc")) return NULL;
    return __libc_malloc(n);
}

void *calloc(size_t a, size_t b) {
    if (should_fail("calloc")) return NULL;
    return __libc_calloc(a, b);
}

void *realloc(void *p, size_t n) {
    if (should_fail("realloc")) return NULL;
    return __libc_realloc(p, n);
}
