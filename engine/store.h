/* store.h — the event log: LevelDB-backed, append-only, indexed.
 *
 * The only module that includes leveldb/c.h.  It owns the data directory:
 *   - the log: position (1, 2, ... gapless) -> record (record.h)
 *   - per-stream, per-category, per-type indexes, written in the same
 *     WriteBatch as the events they index;
 *   - the event-id index (permanent) for idempotent retries;
 *   - a key-value namespace for projections (state + checkpoint in one
 *     atomic batch, see store_batch_*).
 *
 * Appends are group-committed, LevelDB-style: concurrent callers enqueue;
 * one of them (the leader) takes everything queued, validates expected
 * versions in arrival order, builds one WriteBatch, writes it with sync (by
 * default), wakes the group's callers and hands leadership to one of the
 * callers queued meanwhile.  store_append may be called from any number of
 * threads.  A failed write/sync fails every request in that batch and puts
 * the store into a refusing state (TM_EIO) until it is closed and reopened.
 *
 * Reads are iterators over a LevelDB snapshot; they stream (memory is
 * independent of how many events they return) and may run concurrently
 * with appends from any thread.
 */
#ifndef TM_STORE_H
#define TM_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"
#include "event.h"

typedef struct store store;
typedef struct store_iter store_iter;
typedef struct store_batch store_batch;
typedef struct store_kv_iter store_kv_iter;

/* Durability modes, named for what they can lose. */
typedef enum store_durability {
    STORE_DURABLE = 0,           /* default: fsync before acknowledging */
    STORE_LOSE_ON_OS_CRASH = 1,  /* no fsync: a kill -9 loses nothing, an OS
                                    crash or power cut may lose recent appends */
} store_durability;

typedef struct store_opts {
    store_durability durability;
    size_t max_event_size;       /* bytes of data+metadata per event; default 1 MiB */
    int create_if_missing;       /* default 1 when opts is NULL */
    size_t cache_bytes;          /* LevelDB block cache; default 64 MiB */
    int use_reserve;             /* a reader: on a full disk, release the data
                                    directory's RESERVE space so the store can
                                    open (LevelDB writes at every open) */
} store_opts;

void store_opts_default(store_opts *o);

/* Open (and lock) a data directory.  NULL on failure: TM_EIO, or
 * TM_ENOTFOUND when it does not exist and create_if_missing is 0, or
 * TM_EIO with "locked by another process" when a server holds it. */
store *store_open(const char *dir, const store_opts *opts, tm_err *err);
/* Wait for pending appends to be committed, close LevelDB.  No append may
 * start once store_close is called. */
void store_close(store *s);

/* ---- append ---- */

#define STORE_ANY (-1)        /* expected version: no check */
#define STORE_NO_STREAM (-2)  /* the stream must not exist */
#define STORE_EXISTS (-3)     /* the stream must exist */

typedef struct store_expect {
    const char *stream;
    size_t stream_len;
    int64_t version;          /* STORE_ANY / STORE_NO_STREAM / STORE_EXISTS / N >= 0 */
} store_expect;

/* Append evs[0..n) atomically (one or many streams), after checking every
 * expectation in exp[0..nexp).  On success fills each event's id (when
 * generated), position, version and time (when 0: append time) and returns
 * 0 once the batch is durable (per the store's mode).
 * Idempotency: if every event carries an id already stored with the same
 * content, nothing is written and the original positions/versions are
 * filled in.  An id stored with other content, or a request that mixes
 * stored and new ids, is TM_ECONFLICT.  A version mismatch is TM_ECONFLICT
 * with err->current_version set (-1 = no stream) and the stream named.
 * Invalid events (names, sizes, msgpack) are TM_EINVAL; nothing is written. */
int store_append(store *s, tm_event *evs, size_t n, const store_expect *exp, size_t nexp,
                 tm_err *err);

/* The same as store_append without blocking (for event loops): returns -1
 * with err filled when the request is refused at once (invalid events, a
 * refusing or closing store) and fn is never called; otherwise returns 0
 * and fn(ud, rc, err) is called exactly once after the group commit, on the
 * committing thread (a blocking caller leading the group, or the store's
 * async commit thread) (rc 0: evs are filled as with store_append; rc -1:
 * err says why, with current_version on a conflict).  evs, their bytes and
 * exp must stay valid until fn runs.  fn must be quick and must not append. */
typedef void (*store_append_fn)(void *ud, int rc, const tm_err *err);
int store_append_async(store *s, tm_event *evs, size_t n, const store_expect *exp, size_t nexp,
                       store_append_fn fn, void *ud, tm_err *err);

/* Called after each durable commit, with the last position now readable,
 * on the committing thread (the leader: one of the appending callers'
 * threads).  Must be quick, must not append and must not take a lock an
 * appending caller may hold. */
typedef void (*store_commit_fn)(void *ud, uint64_t last_position);
void store_on_commit(store *s, store_commit_fn fn, void *ud);

/* ---- reads ---- */

uint64_t store_last_position(store *s);                /* 0 when empty */
/* Group commits written since open (each one LevelDB write of one or many
 * append requests); *synced (may be NULL): how many were synced (all of
 * them in the durable mode, none otherwise). */
uint64_t store_commits(store *s, uint64_t *synced);
/* Current version of a stream: 1 found (*version set), 0 no such stream, -1 error. */
int store_stream_version(store *s, const char *stream, size_t len, int64_t *version, tm_err *err);

/* Iterators.  `from` is a version (stream) or a position (others), inclusive;
 * backward reads go down from `from` (UINT64_MAX = from the end).
 * limit 0 = no limit. */
store_iter *store_read_stream(store *s, const char *stream, size_t len, uint64_t from,
                              int backward, uint64_t limit, tm_err *err);
store_iter *store_read_all(store *s, uint64_t from, int backward, uint64_t limit, tm_err *err);
store_iter *store_read_category(store *s, const char *cat, size_t len, uint64_t from,
                                uint64_t limit, tm_err *err);
store_iter *store_read_type(store *s, const char *type, size_t len, uint64_t from,
                            uint64_t limit, tm_err *err);
/* About how many events a category / type read from `from` returns (the
 * run holding `from` is counted whole): for choosing between an index read
 * and a scan of the log.  0 / -1. */
int store_count_category(store *s, const char *cat, size_t len, uint64_t from, uint64_t *n,
                         tm_err *err);
int store_count_type(store *s, const char *type, size_t len, uint64_t from, uint64_t *n,
                     tm_err *err);
/* 1 = *ev filled (valid until the next call or free), 0 = end, -1 = error
 * (corruption names the position).  Records are checksum-verified. */
int store_iter_next(store_iter *it, tm_event *ev, tm_err *err);
/* The raw record bytes of the last event returned (for fast paths that
 * decode themselves); valid like ev. */
void store_iter_record(store_iter *it, const char **rec, size_t *len);
/* The next event as its position and stored record (valid like ev), for a
 * reader that hands records to other threads: on a log read
 * (store_read_all) the record is neither decoded nor verified, and the
 * caller must record_decode it before use; other reads decode and verify
 * as store_iter_next.  1, 0 = end, -1 = error. */
int store_iter_next_record(store_iter *it, uint64_t *pos, const char **rec, size_t *len,
                           tm_err *err);
void store_iter_free(store_iter *it);

/* Distinct stream / category names in order, starting at `after` (exclusive;
 * NULL = first); at most limit (0 = all).  The callback returns non-zero to stop. */
typedef int (*store_name_fn)(void *ud, const char *name, size_t len, int64_t version);
int store_list_streams(store *s, const char *after, size_t alen, uint64_t limit,
                       store_name_fn fn, void *ud, tm_err *err);
int store_list_categories(store *s, store_name_fn fn, void *ud, tm_err *err);

/* ---- verification ---- */

typedef struct store_check_report {
    uint64_t events, streams, categories, types, ids;
    uint64_t problems;        /* 0 = clean */
} store_check_report;
/* Verify gapless positions, checksums, stream versions, every index against
 * the log.  Each problem is printed as one line to `out` (may be NULL).
 * Returns 0 when the check ran (look at report->problems), -1 if it could not. */
int store_check(store *s, FILE *out, store_check_report *report, tm_err *err);

/* ---- projection key-value namespace ----
 * Keys are the caller's bytes (kept apart from the log's keys).  A batch
 * is applied atomically; sync follows the store's durability mode. */
store_batch *store_batch_new(void);
void store_batch_put(store_batch *b, const char *k, size_t kl, const char *v, size_t vl);
void store_batch_del(store_batch *b, const char *k, size_t kl);
void store_batch_clear(store_batch *b);
int store_batch_commit(store *s, store_batch *b, tm_err *err);
void store_batch_free(store_batch *b);

/* 1 found (*val malloc'd, caller frees with free()), 0 not found, -1 error. */
int store_kv_get(store *s, const char *k, size_t kl, char **val, size_t *vl, tm_err *err);
/* Keys with the given prefix, from `start` (inclusive; NULL = prefix start). */
store_kv_iter *store_kv_scan(store *s, const char *prefix, size_t pl, const char *start,
                             size_t sl, tm_err *err);
/* 1 = k/v set (borrowed, valid until next call), 0 = end, -1 = error. */
int store_kv_next(store_kv_iter *it, const char **k, size_t *kl, const char **v, size_t *vl,
                  tm_err *err);
void store_kv_iter_free(store_kv_iter *it);
/* Delete every key with the prefix (in batches; not atomic as a whole). */
int store_kv_delete_prefix(store *s, const char *prefix, size_t pl, tm_err *err);

#endif
