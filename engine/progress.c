/* progress.c — throttled progress line with rate and ETA (see progress.h). */
#include "progress.h"

#include "err.h"

#include <stdlib.h>
#include <time.h>
#include <unistd.h>

struct progress {
    FILE *out;
    const char *what, *unit;
    uint64_t total;
    int tty, quiet, drawn;
    double start, last;
    unsigned calls;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

progress *progress_new(FILE *out, const char *what, uint64_t total, const char *unit, int quiet) {
    progress *p = calloc(1, sizeof *p);
    if (!p) tm_oom();
    p->out = out;
    p->what = what;
    p->unit = unit;
    p->total = total;
    p->quiet = quiet;
    p->tty = isatty(fileno(out));
    p->start = p->last = now_s();
    return p;
}

double progress_elapsed(const progress *p) { return now_s() - p->start; }

static void fmt_eta(char *s, size_t n, double secs) {
    if (secs < 0 || secs > 1e7) {
        snprintf(s, n, "--:--");
        return;
    }
    long t = (long)(secs + 0.5);
    if (t >= 3600) snprintf(s, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else snprintf(s, n, "%02ld:%02ld", t / 60, t % 60);
}

static void draw(progress *p, uint64_t done, uint64_t items, double t) {
    double el = t - p->start;
    double rate = el > 0 ? (double)items / el : 0;
    if (p->total) {
        double frac = (double)done / (double)p->total;
        if (frac > 1) frac = 1;
        char eta[32];
        fmt_eta(eta, sizeof eta, frac > 0 ? el / frac - el : -1);
        if (p->tty) {
            char bar[31];
            int fill = (int)(frac * 30);
            for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
            bar[30] = '\0';
            fprintf(p->out, "\r%s [%s] %5.1f%%  %llu %s  %.0f %s/s  ETA %s\033[K", p->what, bar,
                    frac * 100, (unsigned long long)items, p->unit, rate, p->unit, eta);
        } else {
            fprintf(p->out, "%s: %.1f%%, %llu %s, %.0f %s/s, ETA %s\n", p->what, frac * 100,
                    (unsigned long long)items, p->unit, rate, p->unit, eta);
        }
    } else if (p->tty) {
        fprintf(p->out, "\r%s: %llu %s  %.0f %s/s\033[K", p->what, (unsigned long long)items,
                p->unit, rate, p->unit);
    } else {
        fprintf(p->out, "%s: %llu %s, %.0f %s/s\n", p->what, (unsigned long long)items, p->unit,
                rate, p->unit);
    }
    fflush(p->out);
    p->drawn = 1;
}

void progress_update(progress *p, uint64_t done, uint64_t items) {
    if (!p || p->quiet) return;
    if (++p->calls % 64 != 0) return;
    double t = now_s();
    double every = p->tty ? 0.2 : 2.0;
    if (t - p->last < every) return;
    p->last = t;
    draw(p, done, items, t);
}

void progress_end(progress *p) {
    if (!p) return;
    if (p->tty && p->drawn && !p->quiet) {
        fprintf(p->out, "\r\033[K");
        fflush(p->out);
    }
    free(p);
}
