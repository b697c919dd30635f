/* crash.c — the fatal-signal report (see crash.h).
 *
 * The handler runs on its own stack (a stack overflow can still report),
 * calls only async-signal-safe functions plus backtrace(), which is
 * called once at install time so that it loads libgcc's unwinder then and
 * allocates nothing later, and re-raises the signal with the default
 * action (SA_RESETHAND).
 */
#define _GNU_SOURCE
#include "crash.h"

#include <execinfo.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define CRASH_FRAMES 48

static void put(const char *s) {
    ssize_t w = write(2, s, strlen(s));
    (void)w;
}

static void put_hex(uintptr_t v) {
    char b[2 + 2 * sizeof v + 1];
    int i = (int)sizeof b - 1;
    b[i] = '\0';
    do {
        b[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v && i > 2);
    b[--i] = 'x';
    b[--i] = '0';
    put(b + i);
}

static const char *signame(int sig) {
    switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    default: return "a fatal signal";
    }
}

static void on_fatal(int sig, siginfo_t *si, void *ctx) {
    (void)ctx;
    put("tidemark: crashed: ");
    put(signame(sig));
    put(" at address ");
    put_hex((uintptr_t)si->si_addr);
    put("; backtrace:\n");
    void *frames[CRASH_FRAMES];
    int n = backtrace(frames, CRASH_FRAMES);
    backtrace_symbols_fd(frames, n, 2);
    raise(sig); /* the default action again (SA_RESETHAND) */
}

void crash_install(void) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    return;
#else
    static char altstack[64 * 1024];
    void *warm[1];
    backtrace(warm, 1);
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fatal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) sigaction(sigs[i], &sa, NULL);
#endif
}
