/* crash.h — a one-screen crash report on fatal signals.
 *
 * crash_install() makes SIGSEGV, SIGBUS, SIGFPE and SIGILL print one line
 * naming the signal and the faulting address, then the native backtrace
 * (glibc's backtrace_symbols_fd: library, symbol, address per frame) to
 * stderr, and then die of the same signal (the exit status still says
 * which).  Like Redis's crash report, it is for the operator and for the
 * tests that fail every malloc in turn (they tell a fault inside LevelDB
 * from one in tidemark by the first frames).  Not installed in sanitizer
 * builds, whose own reports are better.
 */
#ifndef TM_CRASH_H
#define TM_CRASH_H

void crash_install(void);

#endif
