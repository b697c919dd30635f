/* failio.c — an LD_PRELOAD shim that fails chosen I/O calls, for tests.
 *
 * It wraps write/pwrite, fsync/fdatasync, rename/renameat, open/openat
 * (and their 64-bit names) and counts the calls of the selected kind that
 * touch files under FAILIO_DIR; the Nth such call (once) or every call
 * from the Nth on (persistent) fails with the chosen errno, without doing
 * any I/O.  Other calls pass straight to libc.  (Failing malloc is
 * failmem.c's job: a shim that interposes the allocator cannot be loaded
 * under AddressSanitizer, and this one must be.)
 *
 * Environment (read once, at load):
 *   FAILIO_CALL   kinds to count, comma-separated: write, sync (= fsync and
 *                 fdatasync), fsync, fdatasync, rename, open; "all" = every kind
 *   FAILIO_N      1-based call number to fail; 0 or unset = never fail (count only)
 *   FAILIO_MODE   once (default) | persistent
 *   FAILIO_ERRNO  EIO (default) | ENOSPC | EDQUOT | EROFS
 *   FAILIO_DIR    only calls on paths under this absolute directory count
 *                 (fd calls: fds opened on such paths); unset = every path
 *   FAILIO_COUNT_FILE  at exit, write "<calls counted> <calls failed>\n" here
 *   FAILIO_VERBOSE     1 = say on stderr which call was failed
 *
 * In-process control (for C tests that dlsym them; the shim must be loaded):
 *   void failio_arm(const char *kinds, long n, int persistent, int err);
 *       restart counting: the nth call from now fails (n <= 0 disarms)
 *   long failio_calls(void);   calls counted since the last arm
 *   long failio_failed(void);  calls failed since the last arm
 *
 * Invariants: thread-safe (atomic counters; the fd table is a fixed array
 * of atomic flags), allocation-free on the I/O paths, and never recursive
 * (the real functions come from dlsym(RTLD_NEXT)).  Not for production.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

enum { K_WRITE = 1, K_FSYNC = 2, K_FDATASYNC = 4, K_RENAME = 8, K_OPEN = 16 };

#define MAX_FD 65536

static atomic_int kinds;            /* which kinds count */
static atomic_long fail_at;         /* 1-based; 0 = never */
static atomic_int persistent;
static atomic_int fail_errno = EIO;
static atomic_long ncalls, nfailed;
static char dir[PATH_MAX];
static size_t dirlen;
static int verbose;
static const char *count_file;
static atomic_uchar fd_under[MAX_FD]; /* 1 = fd was opened on a path under dir */

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_close)(int);

/* "write,sync,..." -> kinds, one word at a time. */
static int parse_kinds(const char *s) {
    int k = 0;
    if (!s) return 0;
    while (*s) {
        size_t n = strcspn(s, ", ");
        if (n == 3 && !strncmp(s, "all", 3)) k |= K_WRITE | K_FSYNC | K_FDATASYNC | K_RENAME | K_OPEN;
        else if (n == 5 && !strncmp(s, "write", 5)) k |= K_WRITE;
        else if (n == 4 && !strncmp(s, "sync", 4)) k |= K_FSYNC | K_FDATASYNC;
        else if (n == 5 && !strncmp(s, "fsync", 5)) k |= K_FSYNC;
        else if (n == 9 && !strncmp(s, "fdatasync", 9)) k |= K_FDATASYNC;
        else if (n == 6 && !strncmp(s, "rename", 6)) k |= K_RENAME;
        else if (n == 4 && !strncmp(s, "open", 4)) k |= K_OPEN;
        s += n;
        while (*s == ',' || *s == ' ') s++;
    }
    return k;
}

static int parse_errno(const char *s) {
    if (!s || !strcmp(s, "EIO")) return EIO;
    if (!strcmp(s, "ENOSPC")) return ENOSPC;
    if (!strcmp(s, "EDQUOT")) return EDQUOT;
    if (!strcmp(s, "EROFS")) return EROFS;
    return atoi(s) > 0 ? atoi(s) : EIO;
}

#define LOAD(name) real_##name = dlsym(RTLD_NEXT, #name)

static void load(void) {
    LOAD(write);
    LOAD(pwrite);
    LOAD(pwrite64);
    LOAD(fsync);
    LOAD(fdatasync);
    LOAD(rename);
    LOAD(renameat);
    LOAD(open);
    LOAD(open64);
    LOAD(openat);
    LOAD(openat64);
    LOAD(close);
}

static void report(void) {
    if (!count_file) return;
    FILE *f = fopen(count_file, "w");
    if (!f) return;
    fprintf(f, "%ld %ld\n", atomic_load(&ncalls), atomic_load(&nfailed));
    fclose(f);
}

__attribute__((constructor)) static void failio_init(void) {
    load();
    atomic_store(&kinds, parse_kinds(getenv("FAILIO_CALL")));
    const char *n = getenv("FAILIO_N");
    atomic_store(&fail_at, n ? atol(n) : 0);
    const char *m = getenv("FAILIO_MODE");
    atomic_store(&persistent, m && !strcmp(m, "persistent"));
    atomic_store(&fail_errno, parse_errno(getenv("FAILIO_ERRNO")));
    const char *d = getenv("FAILIO_DIR");
    if (d && *d && strlen(d) < sizeof dir - 1) {
        strcpy(dir, d);
        dirlen = strlen(dir);
        while (dirlen > 1 && dir[dirlen - 1] == '/') dir[--dirlen] = '\0';
    }
    verbose = getenv("FAILIO_VERBOSE") && atoi(getenv("FAILIO_VERBOSE"));
    count_file = getenv("FAILIO_COUNT_FILE");
    if (count_file) atexit(report);
}

/* ---- control API ---- */

void failio_arm(const char *k, long n, int pers, int err) {
    atomic_store(&fail_at, 0);
    atomic_store(&ncalls, 0);
    atomic_store(&nfailed, 0);
    atomic_store(&kinds, parse_kinds(k));
    atomic_store(&persistent, pers);
    atomic_store(&fail_errno, err ? err : EIO);
    atomic_store(&fail_at, n > 0 ? n : 0);
}

long failio_calls(void) { return atomic_load(&ncalls); }
long failio_failed(void) { return atomic_load(&nfailed); }

/* ---- selection ---- */

static int path_under(int dirfd, const char *p) {
    if (!dirlen) return 1;
    if (!p) return 0;
    char abs[PATH_MAX];
    if (p[0] != '/') {
        /* relative: to the cwd (AT_FDCWD) or to dirfd (use its flag) */
        if (dirfd != AT_FDCWD) return dirfd >= 0 && dirfd < MAX_FD && atomic_load(&fd_under[dirfd]);
        if (!getcwd(abs, sizeof abs)) return 0;
        size_t l = strlen(abs);
        if (l + 1 + strlen(p) + 1 > sizeof abs) return 0;
        abs[l] = '/';
        strcpy(abs + l + 1, p);
        p = abs;
    }
    return strncmp(p, dir, dirlen) == 0 && (p[dirlen] == '/' || p[dirlen] == '\0');
}

static int fd_selected(int fd) {
    if (!dirlen) return 1;
    return fd >= 0 && fd < MAX_FD && atomic_load(&fd_under[fd]);
}

/* Count a selected call of kind k; 1 = fail it (errno set). */
static int should_fail(int k, const char *what, const char *path) {
    if (!(atomic_load(&kinds) & k)) return 0;
    long at = atomic_load(&fail_at);
    long c = atomic_fetch_add(&ncalls, 1) + 1;
    if (at <= 0 || c < at || (c > at && !atomic_load(&persistent))) return 0;
    atomic_fetch_add(&nfailed, 1);
    int e = atomic_load(&fail_errno);
    if (verbose) {
        char msg[PATH_MAX + 128];
        int n = snprintf(msg, sizeof msg, "failio: failing %s call #%ld%s%s with %s\n", what, c,
                         path ? " on " : "", path ? path : "", strerror(e));
        if (n > 0 && real_write) real_write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg);
    }
    errno = e;
    return 1;
}

/* ---- wrappers ---- */

ssize_t write(int fd, const void *b, size_t n) {
    if (!real_write) load();
    if (fd_selected(fd) && fd > 2 && should_fail(K_WRITE, "write", NULL)) return -1;
    return real_write(fd, b, n);
}

ssize_t pwrite(int fd, const void *b, size_t n, off_t off) {
    if (!real_pwrite) load();
    if (fd_selected(fd) && fd > 2 && should_fail(K_WRITE, "pwrite", NULL)) return -1;
    return real_pwrite(fd, b, n, off);
}

ssize_t pwrite64(int fd, const void *b, size_t n, off_t off) {
    if (!real_pwrite64) load();
    if (fd_selected(fd) && fd > 2 && should_fail(K_WRITE, "pwrite", NULL)) return -1;
    return real_pwrite64(fd, b, n, off);
}

int fsync(int fd) {
    if (!real_fsync) load();
    if (fd_selected(fd) && should_fail(K_FSYNC, "fsync", NULL)) return -1;
    return real_fsync(fd);
}

int fdatasync(int fd) {
    if (!real_fdatasync) load();
    if (fd_selected(fd) && should_fail(K_FDATASYNC, "fdatasync", NULL)) return -1;
    return real_fdatasync(fd);
}

int rename(const char *a, const char *b) {
    if (!real_rename) load();
    if (path_under(AT_FDCWD, b) && should_fail(K_RENAME, "rename", b)) return -1;
    return real_rename(a, b);
}

int renameat(int da, const char *a, int db, const char *b) {
    if (!real_renameat) load();
    if (path_under(db, b) && should_fail(K_RENAME, "renameat", b)) return -1;
    return real_renameat(da, a, db, b);
}

static int opened(int fd, int dirfd, const char *p) {
    if (fd >= 0 && fd < MAX_FD) atomic_store(&fd_under[fd], (unsigned char)path_under(dirfd, p));
    return fd;
}

#define OPEN_MODE(flags, mode)                                                 \
    mode_t mode = 0;                                                           \
    if ((flags) & (O_CREAT | O_TMPFILE)) {                                     \
        va_list ap;                                                            \
        va_start(ap, flags);                                                   \
        mode = (mode_t)va_arg(ap, int);                                        \
        va_end(ap);                                                            \
    }

int open(const char *p, int flags, ...) {
    if (!real_open) load();
    OPEN_MODE(flags, mode);
    if (path_under(AT_FDCWD, p) && should_fail(K_OPEN, "open", p)) return -1;
    return opened(real_open(p, flags, mode), AT_FDCWD, p);
}

int open64(const char *p, int flags, ...) {
    if (!real_open64) load();
    OPEN_MODE(flags, mode);
    if (path_under(AT_FDCWD, p) && should_fail(K_OPEN, "open", p)) return -1;
    return opened(real_open64(p, flags, mode), AT_FDCWD, p);
}

int openat(int d, const char *p, int flags, ...) {
    if (!real_openat) load();
    OPEN_MODE(flags, mode);
    if (path_under(d, p) && should_fail(K_OPEN, "openat", p)) return -1;
    return opened(real_openat(d, p, flags, mode), d, p);
}

int openat64(int d, const char *p, int flags, ...) {
    if (!real_openat64) load();
    OPEN_MODE(flags, mode);
    if (path_under(d, p) && should_fail(K_OPEN, "openat", p)) return -1;
    return opened(real_openat64(d, p, flags, mode), d, p);
}

int close(int fd) {
    if (!real_close) load();
    if (fd >= 0 && fd < MAX_FD) atomic_store(&fd_under[fd], 0);
    return real_close(fd);
}
