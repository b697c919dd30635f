/* err.h — the error record every fallible engine function fills.
 *
 * Convention (DESIGN.md "Errors"): a function returns 0 / a pointer on
 * success and -1 / NULL on failure, after filling a caller-owned tm_err.
 * Not-found is not an error: lookups report it through their result.
 * Codes equal the CLI's exit statuses, so the edge (CLI, HTTP, Lua) maps
 * them in one place.  A tm_err may be NULL: the error is then dropped.
 */
#ifndef TM_ERR_H
#define TM_ERR_H

#include <pthread.h>
#include <stdint.h>

enum {
    TM_OK = 0,
    TM_EINVAL = 1,    /* usage or bad input: malformed, oversized, invalid */
    TM_ENOTFOUND = 2, /* a named thing does not exist (when that is an error) */
    TM_ECONFLICT = 3, /* expected version mismatch, id reused with other content */
    TM_EIO = 4,       /* I/O failure, corruption, store refusing writes */
};

typedef struct tm_err {
    int code;                /* TM_* */
    int64_t current_version; /* on TM_ECONFLICT: the stream's version, -1 if none */
    char msg[512];           /* one line, no trailing newline */
} tm_err;

void err_clear(tm_err *e);
/* Set code and a printf-style message; returns -1 for `return err_set(...)`. */
int err_set(tm_err *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prefix the existing message with "what: " (adds context on the way up). */
int err_prefix(tm_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *err_code_name(int code);

/* Out of memory: the engine's one answer.  Says so on stderr in one line
 * and aborts (fail-stop, as Redis's zmalloc does): every path that could
 * be mid-change is either not yet acknowledged or already in one atomic
 * LevelDB write, so a restart finds the store as the last acknowledged
 * commit left it (tests/e2e/test_failio.py fails every malloc in turn). */
void tm_oom(void) __attribute__((noreturn, cold));
/* pthread_create, or fail-stop like tm_oom when no thread can be had
 * (EAGAIN: out of memory or of the thread limit), naming what it was for. */
void tm_thread(pthread_t *th, void *(*fn)(void *), void *arg, const char *what);
/* The cores this process may run on (its affinity: taskset, a cgroup's
 * cpuset), at least 1: the default worker count of parallel work. */
unsigned tm_cores(void);

#endif
