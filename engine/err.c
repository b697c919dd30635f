/* err.c — filling and decorating tm_err records (see err.h). */
#define _GNU_SOURCE
#include "err.h"

#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void err_clear(tm_err *e) {
    if (!e) return;
    e->code = TM_OK;
    e->current_version = -1;
    e->msg[0] = '\0';
}

int err_set(tm_err *e, int code, const char *fmt, ...) {
    if (!e) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->code = code;
    return -1;
}

int err_prefix(tm_err *e, const char *fmt, ...) {
    if (!e) return -1;
    char old[sizeof e->msg];
    memcpy(old, e->msg, sizeof old);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    size_t used = (size_t)n < sizeof e->msg ? (size_t)n : sizeof e->msg - 1;
    /* append ": old", truncating (messages are one line, at most msg's size) */
    size_t room = sizeof e->msg - 1 - used, ol = strlen(old);
    if (room >= 2) {
        memcpy(e->msg + used, ": ", 2);
        used += 2, room -= 2;
        if (ol > room) ol = room;
        memcpy(e->msg + used, old, ol);
        used += ol;
    }
    e->msg[used] = '\0';
    return -1;
}

const char *err_code_name(int code) {
    switch (code) {
    case TM_OK: return "ok";
    case TM_EINVAL: return "invalid";
    case TM_ENOTFOUND: return "not found";
    case TM_ECONFLICT: return "conflict";
    case TM_EIO: return "i/o error";
    default: return "error";
    }
}

void tm_oom(void) {
    static const char msg[] = "tidemark: out of memory\n"; /* no allocation on the way out */
    ssize_t w = write(2, msg, sizeof msg - 1);
    (void)w;
    abort();
}

void tm_thread(pthread_t *th, void *(*fn)(void *), void *arg, const char *what) {
    int e = pthread_create(th, NULL, fn, arg);
    if (e == 0) return;
    fprintf(stderr, "tidemark: cannot start the %s thread: %s\n", what, strerror(e));
    abort();
}

unsigned tm_cores(void) {
    cpu_set_t set;
    long c = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set)
                                                         : sysconf(_SC_NPROCESSORS_ONLN);
    return c > 0 ? (unsigned)c : 1;
}
