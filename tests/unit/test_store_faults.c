/* test_store_faults.c — the store under failed syncs and writes, with the
 * LD_PRELOAD shim tests/faults/failio.c (built to build/faults/failio.so).
 *
 * main() re-executes this program with the shim preloaded when it is not
 * loaded yet (found via FAILIO_SO or next to this binary's build dir); the
 * tests then arm it through its control API (failio_arm, looked up with
 * dlsym) at the exact moment they want the next fdatasync / write to fail.
 * Without the shim every test is skipped (and says so).
 *
 * Proven here (DESIGN.md "Durability"): a failed sync is never
 * acknowledged; after it the store refuses every write (appends and
 * projection batches), even once I/O works again, while reads go on; after
 * a reopen it takes writes again, every acknowledged event is there, and
 * store_check is clean.  Under concurrent appends (group commit) each
 * caller told success finds its event after the reopen.  A projection's
 * checkpoint committed in the background (projhost_checkpoint_async) that
 * meets a failed sync stops its worker and is resumed from the last one
 * stored.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <dlfcn.h>
#include <errno.h>
#include <ftw.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mp.h"
#include "projhost.h"
#include "store.h"

typedef void (*arm_fn)(const char *kinds, long n, int persistent, int err);
typedef long (*count_fn)(void);
static arm_fn failio_arm;
static count_fn failio_failed;

typedef struct fx {
    char dir[64];
    store *s;
} fx;

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *f) {
    (void)st, (void)flag, (void)f;
    return remove(p);
}

static int setup(void **state) {
    if (!failio_arm) return 0; /* tests skip themselves */
    fx *f = calloc(1, sizeof *f);
    strcpy(f->dir, "/tmp/tm_faults_XXXXXX");
    if (!mkdtemp(f->dir)) return -1;
    tm_err err;
    f->s = store_open(f->dir, NULL, &err);
    if (!f->s) {
        fprintf(stderr, "open: %s\n", err.msg);
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fx *f = *state;
    if (!f) return 0;
    failio_arm("", 0, 0, 0);
    store_close(f->s);
    nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void reopen(fx *f) {
    store_close(f->s);
    tm_err err;
    f->s = store_open(f->dir, NULL, &err);
    if (!f->s) fail_msg("reopen: %s", err.msg);
}

static tm_event mkev(const char *stream, const char *type, const char *data, size_t dlen) {
    tm_event e;
    memset(&e, 0, sizeof e);
    e.stream = stream;
    e.stream_len = strlen(stream);
    e.type = type;
    e.type_len = strlen(type);
    e.data = data;
    e.data_len = dlen;
    return e;
}

/* Append one event whose data is the positive fixint n (0..127). */
static int append_n(store *s, const char *stream, unsigned n, tm_event *out, tm_err *err) {
    static const char ints[128] = {
#define I8(b) b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7
        I8(0), I8(8), I8(16), I8(24), I8(32), I8(40), I8(48), I8(56),
        I8(64), I8(72), I8(80), I8(88), I8(96), I8(104), I8(112), I8(120)};
    tm_event e = mkev(stream, "T", &ints[n & 127], 1);
    int rc = store_append(s, &e, 1, NULL, 0, err);
    if (out) *out = e;
    return rc;
}

/* Every event of the store in position order: fills pos->data byte. */
static size_t read_all(store *s, unsigned char *vals, size_t max) {
    tm_err err;
    store_iter *it = store_read_all(s, 1, 0, 0, &err);
    assert_non_null(it);
    tm_event ev;
    size_t n = 0;
    int r;
    while ((r = store_iter_next(it, &ev, &err)) == 1) {
        assert_int_equal(ev.position, n + 1);
        if (n < max) vals[n] = (unsigned char)ev.data[0];
        n++;
    }
    assert_int_equal(r, 0);
    store_iter_free(it);
    return n;
}

static void assert_clean(store *s) {
    tm_err err;
    store_check_report rep;
    assert_int_equal(store_check(s, stderr, &rep, &err), 0);
    assert_int_equal(rep.problems, 0);
}

static void assert_refusing(store *s) {
    tm_err err;
    assert_int_equal(append_n(s, "a", 99, NULL, &err), -1);
    assert_int_equal(err.code, TM_EIO);
    assert_non_null(strstr(err.msg, "reopen"));
    store_batch *b = store_batch_new();
    store_batch_put(b, "k", 1, "v", 1);
    assert_int_equal(store_batch_commit(s, b, &err), -1);
    assert_int_equal(err.code, TM_EIO);
    store_batch_free(b);
}

/* One failed call of `kind` during an append: not acknowledged, refusing
 * afterwards, reads fine, and a reopen brings the store back. */
static void failed_call(void **state, const char *kind, int err_no) {
    if (!failio_arm) skip();
    fx *f = *state;
    tm_err err;
    for (unsigned i = 1; i <= 3; i++) assert_int_equal(append_n(f->s, "a", i, NULL, &err), 0);
    failio_arm(kind, 1, 0, err_no);
    int rc = append_n(f->s, "a", 4, NULL, &err);
    assert_int_equal(failio_failed(), 1);
    assert_int_equal(rc, -1);
    assert_int_equal(err.code, TM_EIO);
    failio_arm("", 0, 0, 0); /* I/O works again ... */
    assert_refusing(f->s);   /* ... but the store refuses until reopened */
    unsigned char v[8];
    assert_int_equal(store_last_position(f->s), 3);
    assert_int_equal(read_all(f->s, v, 8), 3); /* reads go on */
    assert_memory_equal(v, "\1\2\3", 3);
    reopen(f);
    /* the unacknowledged event may have reached the disk (its write did,
     * only its sync failed): it is either wholly there or absent */
    size_t n = read_all(f->s, v, 8);
    assert_true(n == 3 || (n == 4 && v[3] == 4));
    assert_int_equal(append_n(f->s, "a", 5, NULL, &err), 0);
    assert_int_equal(read_all(f->s, v, 8), n + 1);
    assert_int_equal(v[n], 5);
    assert_clean(f->s);
}

static void test_failed_fdatasync(void **state) { failed_call(state, "sync", EIO); }
static void test_failed_write(void **state) { failed_call(state, "write", ENOSPC); }

static void test_failed_kv_batch(void **state) {
    if (!failio_arm) skip();
    fx *f = *state;
    tm_err err;
    assert_int_equal(append_n(f->s, "a", 1, NULL, &err), 0);
    store_batch *b = store_batch_new();
    store_batch_put(b, "k", 1, "v", 1);
    failio_arm("sync", 1, 0, EIO);
    assert_int_equal(store_batch_commit(f->s, b, &err), -1);
    assert_int_equal(err.code, TM_EIO);
    store_batch_free(b);
    failio_arm("", 0, 0, 0);
    assert_refusing(f->s);
    reopen(f);
    assert_int_equal(append_n(f->s, "a", 2, NULL, &err), 0);
    assert_clean(f->s);
}

/* ---- a projection's background checkpoint meets a failed sync ---- */

static const char *COUNTER =
    "return { from = 'all', init = function() return { n = 0 } end,\n"
    "  on = { T = function(s, e) s.n = s.n + 1 end } }\n";

/* The worker counted it committed at once; the host's commit fails: the
 * worker is stopped (DEAD, "checkpoint commit failed") and its status
 * never claims the position; after a reopen a new worker resumes from a
 * stored checkpoint and counts every event exactly once. */
static void test_background_checkpoint_failed_sync(void **state) {
    if (!failio_arm) skip();
    fx *f = *state;
    tm_err err;
    for (unsigned i = 0; i < 10; i++) assert_int_equal(append_n(f->s, "a", i, NULL, &err), 0);
    projhost_opts o = {.cpu_limit = 5};
    projhost *h = projhost_start(f->s, "cnt", COUNTER, strlen(COUNTER), "cnt.lua", &o, &err);
    if (!h) fail_msg("%s", err.msg);
    assert_int_equal(projhost_feed(h, 0, &err), 0);
    assert_int_equal(projhost_checkpoint_async(h, &err), 0);
    projhost_wait_commit(h);
    assert_int_equal(projhost_get_status(h)->checkpoint_position, 10);
    for (unsigned i = 0; i < 5; i++) assert_int_equal(append_n(f->s, "a", i, NULL, &err), 0);
    assert_int_equal(projhost_feed(h, 0, &err), 0);
    failio_arm("sync", 1, 0, EIO);
    assert_int_equal(projhost_checkpoint_async(h, &err), 0); /* the commit fails behind it */
    projhost_wait_commit(h);
    failio_arm("", 0, 0, 0);
    const projhost_status *st = projhost_get_status(h);
    assert_int_equal(st->state, PROJHOST_DEAD);
    assert_non_null(strstr(st->message, "checkpoint commit failed"));
    assert_int_equal(st->checkpoint_position, 10);
    assert_int_equal(projhost_feed(h, 0, &err), -1); /* no more frames to a dead worker */
    projhost_free(h);
    assert_refusing(f->s);
    reopen(f);
    h = projhost_start(f->s, "cnt", COUNTER, strlen(COUNTER), "cnt.lua", &o, &err);
    if (!h) fail_msg("%s", err.msg);
    /* the failed batch may still be in LevelDB's log (written, its sync
     * failed): either checkpoint, each state with its own position */
    uint64_t from = projhost_get_status(h)->position;
    assert_true(from == 10 || from == 15);
    assert_int_equal(projhost_catch_up(h, &err), 0);
    buf m = BUF_INIT;
    assert_int_equal(projhost_state_mp(h, &m, &err), 0);
    const char *v;
    size_t vl;
    mp_item it;
    assert_int_equal(mp_map_find(m.ptr, m.len, "n", 1, &v, &vl), 1);
    assert_int_equal(mp_next(&v, v + vl, &it), 0);
    assert_int_equal(it.v.u, 15); /* every event counted once */
    buf_free(&m);
    projhost_free(h);
    assert_clean(f->s);
}

/* ---- concurrent appends: group commit meets a failed sync ---- */

#define THREADS 4
#define PER_THREAD 40

typedef struct worker {
    store *s;
    char stream[16];
    int ok[PER_THREAD];           /* 1 = acknowledged */
    uint64_t pos[PER_THREAD];
    int failed_then_ok;           /* an acknowledgement after a failure */
} worker;

static void *work(void *arg) {
    worker *w = arg;
    int seen_fail = 0;
    for (unsigned i = 0; i < PER_THREAD; i++) {
        tm_event e;
        tm_err err;
        w->ok[i] = append_n(w->s, w->stream, i, &e, &err) == 0;
        if (w->ok[i]) {
            w->pos[i] = e.position;
            if (seen_fail) w->failed_then_ok = 1;
        } else {
            if (err.code != TM_EIO) fprintf(stderr, "unexpected error: %s\n", err.msg);
            seen_fail = 1;
        }
    }
    return NULL;
}

static void test_concurrent_failed_sync(void **state) {
    if (!failio_arm) skip();
    fx *f = *state;
    worker w[THREADS];
    pthread_t th[THREADS];
    failio_arm("sync", 12, 0, EIO); /* the 12th group commit's sync fails */
    for (int t = 0; t < THREADS; t++) {
        memset(&w[t], 0, sizeof w[t]);
        w[t].s = f->s;
        snprintf(w[t].stream, sizeof w[t].stream, "w%d-x", t);
        pthread_create(&th[t], NULL, work, &w[t]);
    }
    for (int t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
    failio_arm("", 0, 0, 0);
    size_t acked = 0, refused = 0;
    for (int t = 0; t < THREADS; t++) {
        assert_false(w[t].failed_then_ok);
        for (int i = 0; i < PER_THREAD; i++) acked += w[t].ok[i], refused += !w[t].ok[i];
    }
    assert_true(refused > 0);
    assert_true(acked > 0);
    assert_refusing(f->s);
    reopen(f);
    /* every acknowledged event is at the position it was told, with its data */
    tm_err err;
    for (int t = 0; t < THREADS; t++) {
        for (int i = 0; i < PER_THREAD; i++) {
            if (!w[t].ok[i]) continue;
            store_iter *it = store_read_all(f->s, w[t].pos[i], 0, 1, &err);
            tm_event ev;
            assert_int_equal(store_iter_next(it, &ev, &err), 1);
            assert_int_equal(ev.position, w[t].pos[i]);
            assert_int_equal(ev.stream_len, strlen(w[t].stream));
            assert_memory_equal(ev.stream, w[t].stream, ev.stream_len);
            assert_int_equal((unsigned char)ev.data[0], i);
            store_iter_free(it);
        }
    }
    assert_true(store_last_position(f->s) >= acked);
    assert_clean(f->s);
}

/* Find the shim: $FAILIO_SO, else build/faults/failio.so above this binary
 * (build/tests/x or build/san/tests/x). */
static int find_shim(char *out, size_t n) {
    const char *env = getenv("FAILIO_SO");
    if (env && access(env, R_OK) == 0) return snprintf(out, n, "%s", env), 1;
    char exe[PATH_MAX];
    ssize_t l = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (l <= 0) return 0;
    exe[l] = '\0';
    char *d = dirname(exe); /* .../tests */
    for (int up = 0; up < 3; up++) {
        snprintf(out, n, "%s/faults/failio.so", d);
        if (access(out, R_OK) == 0) return 1;
        d = dirname(d);
    }
    return 0;
}

int main(int argc, char **argv) {
    (void)argc;
    failio_arm = (arm_fn)dlsym(RTLD_DEFAULT, "failio_arm");
    failio_failed = (count_fn)dlsym(RTLD_DEFAULT, "failio_failed");
    if (!failio_arm && !getenv("TM_FAULTS_REEXEC")) {
        char shim[PATH_MAX];
        if (find_shim(shim, sizeof shim)) {
            char asan[512];
            const char *old = getenv("ASAN_OPTIONS");
            snprintf(asan, sizeof asan, "%s%sverify_asan_link_order=0", old ? old : "",
                     old && *old ? ":" : "");
            setenv("ASAN_OPTIONS", asan, 1);
            setenv("LD_PRELOAD", shim, 1);
            setenv("TM_FAULTS_REEXEC", "1", 1);
            execv("/proc/self/exe", argv);
            perror("test_store_faults: re-exec with the shim failed");
        }
        fprintf(stderr, "test_store_faults: failio.so not found; build it with "
                        "'make build/faults/failio.so' (tests skipped)\n");
    }
    unsetenv("LD_PRELOAD"); /* not for anything this test might start */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_failed_fdatasync, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_write, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_kv_batch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_background_checkpoint_failed_sync, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_failed_sync, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
