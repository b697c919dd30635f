/* store.c — the event log on LevelDB: appends (group commit), indexes,
 * reads, verification, and the projections' key-value namespace.
 *
 * The only file that includes leveldb/c.h.
 *
 * ---- Key layout (one LevelDB keyspace, first byte = namespace) ----
 *   0x7f be64(last)                -> log block: the records (record.h: crc32c
 *                                     + msgpack array) of positions
 *                                     last-n+1 .. last, see "Log blocks"
 *                                     below.  The log comes after every other
 *                                     namespace so that a new block key is the
 *                                     largest key in the memtable: LevelDB's
 *                                     skiplist insert then makes no comparison
 *                                     against a successor at each level.
 *   'i' id(16)                     -> varint(pos)   only for client-supplied ids
 *   'g' be64(p0)                   -> stream journal of the commit whose first
 *                                     position is p0 (one key per commit)
 *   's' stream 0x00 be64(v0)       -> run: positions of versions v0, v0+1, ...
 *   'c' category 0x00 be64(p0)     -> run: positions p0 < p1 < ... in the category
 *   't' type 0x00 be64(p0)         -> run: positions p0 < p1 < ... of the type
 *   'm' "last"                     -> be64(last position)
 *   'm' "folded"                   -> be64(fold mark)
 *   'm' "format"                   -> "3" (formats 1 and 2: below)
 *   'p' caller key                 -> caller value (projection namespace)
 * A run value is crc32c(payload) (4 bytes LE) then payload = varint(first)
 * varint(delta)...  Each commit writes ONE 'c' run per category and ONE 't'
 * run per type it touched.  Names never contain NUL, so "name\0" orders a
 * name's runs together and before any longer name.
 *
 * Streams: a commit may touch hundreds of streams (a batch import), and a
 * key per stream per commit would cost as much as the events themselves.
 * So each commit writes one journal key 'g' listing, per stream it touched,
 * (name, first version, positions).  Every FOLD_EVENTS events or
 * FOLD_GROUPS commits, the committing batch also "folds": it writes one 's'
 * run per stream holding all its versions since the previous fold and
 * moves the fold mark to its last position.  A stream is therefore its 's'
 * runs (versions 0..hf) followed by its entries in the journal keys above
 * the fold mark (versions hf+1..head); readers take both from one
 * snapshot.  The fold deletes the journal keys it folded.
 * The leader keeps the journal's streams in memory (rebuilt on open).
 *
 * Ids: a client-supplied id (has_id=1) is stored under 'i'.  A generated
 * id is a UUIDv8 that carries its own position: bytes 0-5 = the position
 * (48 bits), version nibble 8, variant 10, the other 74 bits random.  Such
 * an id is found by reading the record at that position and comparing ids,
 * so generated ids cost no key.  (Positions >= 2^48 fall back to a random
 * id under 'i'.)  Both kinds are permanent.
 *
 * Log blocks: a commit writes its records in blocks of up to
 * BLOCK_MAX_EVENTS consecutive positions and about BLOCK_MAX_BYTES:
 *   block  = varint(n) then n times (varint(len) record)
 * under the key of its last position, so a seek to a position lands on
 * the block holding it.  One LevelDB entry per block instead of one per
 * event: the memtable insert (a skiplist search) is most of LevelDB's cost
 * per entry.  Each record keeps its own checksum.  Older stores: format 2
 * has one bare record per key (the key is its position), format 1 the
 * same under 'e'; they are read and written as blocks of one
 * without the header (s->blocks == 0).
 *
 * ---- Invariants ----
 *   - positions 1..last are all present ('m' last = last); a commit writes
 *     the events, their index runs, their 'i' keys and 'm' last in one
 *     WriteBatch, so readers (snapshots) never see a partial append;
 *   - each stream's runs then journal entries cover versions 0..head
 *     contiguously; each category/type's runs hold strictly increasing
 *     positions;
 *   - only the leader (one appending thread at a time, see lead()) writes
 *     to 'e','i','g','s','c','t','m'; the head cache (streams map) is only
 *     touched by the leader and holds
 *     committed heads: a group's tentative heads live in node->ghead,
 *     valid only while node->gen == s->gen, and are promoted after the
 *     write succeeds;
 *   - after a failed write the store refuses every write (s->failed)
 *     until it is closed and reopened.
 */
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <leveldb/c.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "buf.h"
#include "mp.h"
#include "record.h"

#define K_EVENT_V1 'e'  /* format 1 stores */
#define K_EVENT 0x7f    /* formats 2 and 3: after every other namespace */
#define K_ID 'i'
#define K_STREAM 's'
#define K_CAT 'c'
#define K_TYPE 't'
#define K_META 'm'
#define K_PROJ 'p'
#define K_JOURNAL 'g'

#define FOLD_EVENTS 32768 /* fold the stream journal after this many events */
#define FOLD_GROUPS 512   /* ... or after this many commits */

#define BLOCK_MAX_EVENTS 64   /* < 128: the header varint is one byte */
#define BLOCK_MAX_BYTES 4096  /* a block is flushed before it would pass this */

#define STREAM_CACHE_MAX (1u << 20) /* cached stream heads before the cache is dropped */
#define MAX_COMMIT_FNS 16
#define GEN_ID_MAX_POS ((uint64_t)1 << 48)

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)v;
        v >>= 8;
    }
}

/* buf_get_be64 without a call (the read loop's hot path). */
static inline uint64_t get_be64(const char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? __builtin_bswap64(v) : v;
}

/* In-memory hash of a name (never stored): 8 bytes per step. */
static uint64_t hash_bytes(const char *p, size_t n) {
    uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    uint64_t w = 0;
    for (size_t i = 0; i < n; i++) w |= (uint64_t)(unsigned char)p[i] << (8 * i);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 29);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Event key kev+be64(pos) into k[9] (kev: the store's event prefix). */
static void event_key(unsigned char k[9], char kev, uint64_t pos) {
    k[0] = (unsigned char)kev;
    put_be64(k + 1, pos);
}

/* ---- log blocks ----
 * A cursor over one block (a view into the LevelDB value it was opened
 * on: valid until that iterator moves).  Formats 1 and 2 (blocks == 0):
 * the value is one bare record. */
typedef struct blk {
    const char *body, *p, *end; /* the records; the next one's length varint */
    uint64_t first, last;       /* positions held */
    uint64_t cur;               /* position of rec, first - 1 before the first step */
    const char *rec;            /* the record at cur */
    size_t reclen;
    int bare;
} blk;

/* Open a block from its key and value: 1, 0 (not a log key), -1 malformed. */
static int blk_open(blk *b, char kev, int blocks, const char *k, size_t kl, const char *v,
                    size_t vl) {
    if (kl != 9 || k[0] != kev) return 0;
    b->last = get_be64(k + 1);
    b->end = v + vl;
    b->bare = !blocks;
    uint64_t n = 1;
    const char *p = v;
    if (blocks && (buf_get_varint(&p, b->end, &n) < 0 || n == 0 || n > b->last)) return -1;
    if (b->last == 0) return -1;
    b->first = b->last - n + 1;
    b->body = b->p = p;
    b->cur = b->first - 1;
    b->rec = NULL;
    return 1;
}

/* Step onto the next record: 1, 0 (past the last), -1 malformed. */
static int blk_step(blk *b) {
    if (b->cur == b->last) return 0;
    if (b->bare) {
        b->rec = b->body;
        b->reclen = (size_t)(b->end - b->body);
    } else {
        uint64_t len;
        const char *p = b->p;
        if (p < b->end && (unsigned char)*p < 0x80) len = (unsigned char)*p++; /* < 128 bytes */
        else if (buf_get_varint(&p, b->end, &len) < 0) return -1;
        if (len > (uint64_t)(b->end - p)) return -1;
        b->rec = p;
        b->reclen = (size_t)len;
        b->p = p + len;
    }
    b->cur++;
    return 1;
}

/* Move onto pos (first <= pos <= last): 1, -1 malformed. */
static int blk_seek(blk *b, uint64_t pos) {
    if (pos == b->cur && b->rec) return 1;
    if (pos < b->cur) {
        b->p = b->body;
        b->cur = b->first - 1;
    }
    while (b->cur < pos)
        if (blk_step(b) <= 0) return -1;
    return 1;
}

/* LEB128 (as buf_put_varint) into room the caller reserved; returns the end. */
static inline char *put_varint_raw(char *p, uint64_t v) {
    while (v >= 0x80) {
        *p++ = (char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    return p;
}

static inline void put_varint(buf *b, uint64_t v) {
    if (b->cap - b->len < 11) buf_reserve(b, 10);
    b->len = (size_t)(put_varint_raw(b->ptr + b->len, v) - b->ptr);
    b->ptr[b->len] = '\0';
}

/* varint(p0) varint(p1-p0) ... */
static void put_positions(buf *out, const uint64_t *pos, size_t n, uint64_t prev) {
    buf_reserve(out, n * 10);
    char *p = out->ptr + out->len;
    for (size_t i = 0; i < n; i++) {
        p = put_varint_raw(p, pos[i] - prev);
        prev = pos[i];
    }
    out->len = (size_t)(p - out->ptr);
    out->ptr[out->len] = '\0';
}

static void put_crc_at(buf *out, size_t start) {
    uint32_t c = crc32c(0, out->ptr + start + 4, out->len - start - 4);
    unsigned char *h = (unsigned char *)out->ptr + start;
    h[0] = (unsigned char)c;
    h[1] = (unsigned char)(c >> 8);
    h[2] = (unsigned char)(c >> 16);
    h[3] = (unsigned char)(c >> 24);
}

static int crc_ok(const char *val, size_t len) {
    if (len < 4) return 0;
    const unsigned char *h = (const unsigned char *)val;
    uint32_t want = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 |
                    (uint32_t)h[3] << 24;
    return crc32c(0, val + 4, len - 4) == want;
}

/* An index run value: crc32c(payload) LE + positions a[0..na) then b[0..nb). */
static void run_encode(buf *out, const uint64_t *a, size_t na, const uint64_t *b, size_t nb) {
    size_t start = out->len;
    buf_append(out, "\0\0\0\0", 4);
    put_positions(out, a, na, 0);
    put_positions(out, b, nb, na ? a[na - 1] : 0);
    put_crc_at(out, start);
}

typedef struct u64vec {
    uint64_t *v;
    size_t n, cap;
} u64vec;

static void u64vec_push(u64vec *a, uint64_t x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 8;
        uint64_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) tm_oom();
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
}

/* Decode a run value into out (replacing its contents).  Positions must be
 * strictly increasing and non-zero.  0 / -1 (corrupt). */
static int run_decode(const char *val, size_t len, u64vec *out) {
    out->n = 0;
    if (len < 5 || !crc_ok(val, len)) return -1;
    const char *p = val + 4, *end = val + len;
    uint64_t prev = 0;
    while (p < end) {
        uint64_t d;
        if (buf_get_varint(&p, end, &d) < 0 || d == 0 || prev + d < prev) return -1;
        prev += d;
        u64vec_push(out, prev);
    }
    return 0;
}

/* ---- the stream journal ----
 * 'g' be64(p0) -> crc32c + entries, one per stream the commit appended to:
 *   varint(name len) name varint(first version) varint(n) n position varints
 *   (first absolute, then deltas).
 * Events above the fold mark ('m' "folded") are indexed only here; a fold
 * (written in the batch of the commit that triggers it) writes one 's' run
 * per stream holding everything since the previous fold. */
typedef struct jent {
    const char *name;
    size_t nl;
    uint64_t first, n;
    const char *pos, *end; /* the position varints */
} jent;

/* Parse the next entry at *p.  1 / 0 (end) / -1 (corrupt). */
static int jent_next(const char **p, const char *end, jent *e) {
    if (*p >= end) return 0;
    uint64_t nl;
    if (buf_get_varint(p, end, &nl) < 0 || nl == 0 || nl > (uint64_t)(end - *p)) return -1;
    e->name = *p;
    e->nl = (size_t)nl;
    *p += nl;
    if (buf_get_varint(p, end, &e->first) < 0 || buf_get_varint(p, end, &e->n) < 0 || e->n == 0)
        return -1;
    e->pos = *p;
    for (uint64_t i = 0; i < e->n; i++) {
        uint64_t d;
        if (buf_get_varint(p, end, &d) < 0) return -1;
    }
    e->end = *p;
    return 1;
}

/* Append the entry's positions to out (strictly increasing).  0 / -1. */
static int jent_positions(const jent *e, u64vec *out) {
    const char *p = e->pos;
    uint64_t prev = 0;
    for (uint64_t i = 0; i < e->n; i++) {
        uint64_t d;
        if (buf_get_varint(&p, e->end, &d) < 0 || d == 0 || prev + d < prev) return -1;
        prev += d;
        u64vec_push(out, prev);
    }
    return 0;
}

/* Find the entry for name in a journal value.  1 found / 0 / -1 corrupt. */
static int jval_find(const char *v, size_t vl, const char *name, size_t nl, jent *e) {
    if (!crc_ok(v, vl)) return -1;
    const char *p = v + 4, *end = v + vl;
    int r;
    while ((r = jent_next(&p, end, e)) == 1)
        if (e->nl == nl && memcmp(e->name, name, nl) == 0) return 1;
    return r;
}

/* ------------------------------------------------------------------ */
/* name map: stream / category / type -> node (stable pointers)        */

typedef struct node {
    struct node *next;   /* hash chain */
    struct node *tnext;  /* list of nodes touched by the current group */
    uint64_t hash;
    int64_t head;        /* streams: committed head version, -1 = none */
    int64_t ghead;       /* streams: head within group `gen` */
    uint64_t gen;        /* group whose ghead / run are valid */
    uint64_t first;      /* streams: first version appended in the group */
    u64vec run;          /* positions appended in the group */
    u64vec pend;         /* streams: committed positions above the fold mark */
    uint64_t pfirst;     /* streams: version of pend.v[0] */
    struct node *pnext;  /* list of nodes with pend.n > 0 */
    size_t klen;
    char key[];
} node;

typedef struct nmap {
    node **tab;
    size_t cap, count;
} nmap;

static node *nmap_find(nmap *m, const char *k, size_t kl, uint64_t h) {
    if (!m->cap) return NULL;
    for (node *n = m->tab[h & (m->cap - 1)]; n; n = n->next)
        if (n->hash == h && n->klen == kl && memcmp(n->key, k, kl) == 0) return n;
    return NULL;
}

static node *nmap_add(nmap *m, const char *k, size_t kl, uint64_t h) {
    if (m->count + 1 > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 64;
        node **tab = calloc(cap, sizeof *tab);
        if (!tab) tm_oom();
        for (size_t i = 0; i < m->cap; i++) {
            node *n = m->tab[i];
            while (n) {
                node *nx = n->next;
                n->next = tab[n->hash & (cap - 1)];
                tab[n->hash & (cap - 1)] = n;
                n = nx;
            }
        }
        free(m->tab);
        m->tab = tab;
        m->cap = cap;
    }
    node *n = calloc(1, sizeof *n + kl + 1);
    if (!n) tm_oom();
    n->hash = h;
    n->klen = kl;
    memcpy(n->key, k, kl);
    n->head = n->ghead = -1;
    n->next = m->tab[h & (m->cap - 1)];
    m->tab[h & (m->cap - 1)] = n;
    m->count++;
    return n;
}

static void nmap_clear(nmap *m) {
    for (size_t i = 0; i < m->cap; i++) {
        node *n = m->tab[i];
        while (n) {
            node *nx = n->next;
            free(n->run.v);
            free(n->pend.v);
            free(n);
            n = nx;
        }
    }
    free(m->tab);
    m->tab = NULL;
    m->cap = m->count = 0;
}

/* Drop every node without journal positions (the head cache is only a cache). */
static void nmap_evict_idle(nmap *m) {
    for (size_t i = 0; i < m->cap; i++) {
        node **pp = &m->tab[i];
        while (*pp) {
            node *n = *pp;
            if (n->pend.n == 0) {
                *pp = n->next;
                free(n->run.v);
                free(n->pend.v);
                free(n);
                m->count--;
            } else pp = &n->next;
        }
    }
}

/* ------------------------------------------------------------------ */
/* the store                                                           */

typedef struct req {
    tm_event *evs;
    size_t n;
    const store_expect *exp;
    size_t nexp;
    size_t nid;          /* events with has_id */
    int rc;
    tm_err err;
    uint32_t state;      /* REQ_WAIT or REQ_DONE (atomic) */
    uint64_t group;      /* the take (s->taken) that will commit it */
    store_append_fn fn;  /* async (store_append_async): called by the leader
                            after the commit, then the request is freed */
    void *ud;
    struct req *next;
} req;

enum { REQ_WAIT = 0, REQ_DONE = 1 };

/* The group's id table: client ids appended by earlier requests of the
 * group (open addressing over tm_event pointers; reset per group). */
typedef struct idtab {
    tm_event **slot;
    size_t cap, count;
} idtab;

struct store {
    leveldb_t *db;
    leveldb_options_t *opts;
    leveldb_filterpolicy_t *bloom;
    leveldb_cache_t *cache;
    leveldb_readoptions_t *ro;     /* verify checksums */
    leveldb_writeoptions_t *wo;    /* sync per durability */
    char kev;                      /* event key prefix: K_EVENT, or K_EVENT_V1 (format 1) */
    int blocks;                    /* format 3: the log is in blocks (else one record per key) */
    store_opts o;
    char *dir;

    pthread_mutex_t mu;
    pthread_cond_t idle;           /* signalled when leadership ends while stopping */
    req *qhead, *qtail;            /* requests waiting for the next group */
    int leading;                   /* a caller is committing groups (the leader) */
    uint64_t taken;                /* groups taken from the queue so far */
    uint64_t lead_wanted;          /* group whose waiters should supply a leader, 0 = none */
    uint32_t fword;                /* futex word all waiters sleep on (a wake counter) */
    unsigned qsync;                /* blocking callers in the queue (they can lead) */
    unsigned qcount;               /* requests in the queue */
    /* commit delay (gather): see gather() */
    pthread_cond_t gather_cv;      /* a gathering leader: the queue reached gather_want */
    unsigned gather_want;          /* 0 = nobody gathering */
    unsigned prev_group;           /* requests in the last group taken */
    unsigned handoff;              /* requests queued when the last leader handed over */
    unsigned gather_skip;          /* groups to take without gathering (after a miss) */
    uint64_t sync_ns;              /* the last synced commit's duration */
    pthread_t async_th;            /* leads groups made only of async requests */
    pthread_cond_t async_cv;       /* wakes async_th: queued work and no leader */
    int async_started, async_quit;
    int stopping;
    int failed;
    char failmsg[256];
    struct {
        store_commit_fn fn;
        void *ud;
    } fns[MAX_COMMIT_FNS];
    int nfns;

    uint64_t last;                 /* committed last position (atomic) */
    uint64_t folded;               /* fold mark: streams indexed in 's' up to here */
    uint64_t unf_groups;           /* journal keys above the fold mark */
    node *pending;                 /* stream nodes with journal positions */
    u64vec jkeys;                  /* journal keys above the fold mark (their p0) */

    /* leader state: touched only by the current leader (leadership passes
     * under mu, which orders one leader's writes before the next's reads) */
    nmap streams, cats, types;
    uint64_t gen;
    uint64_t gpos;                 /* last position assigned in the group */
    int64_t gnow;
    node *tstreams, *tcats, *ttypes;
    idtab ids;
    node **sv;                     /* per event of a request: its stream node */
    size_t svcap;
    leveldb_iterator_t *git;       /* lazily created per group, for head lookups */
    leveldb_writebatch_t *wb;
    buf rec, key, val;
    buf blk;                       /* the block being filled: header byte, then records */
    unsigned blkn;                 /* records in blk */
    uint64_t blklast;              /* position of its last record */
    uint64_t rng[2];
};

static uint64_t load_last(store *s) { return __atomic_load_n(&s->last, __ATOMIC_ACQUIRE); }

uint64_t store_last_position(store *s) { return load_last(s); }

uint64_t store_commits(store *s, uint64_t *synced) {
    uint64_t n = __atomic_load_n(&s->taken, __ATOMIC_RELAXED);
    if (synced) *synced = s->o.durability == STORE_DURABLE ? n : 0;
    return n;
}

void store_opts_default(store_opts *o) {
    o->durability = STORE_DURABLE;
    o->max_event_size = 1u << 20;
    o->create_if_missing = 1;
    o->cache_bytes = 64u << 20;
    o->use_reserve = 0;
}

static int db_err(tm_err *err, char *lerr, const char *what) {
    err_set(err, TM_EIO, "%s: %s", what, lerr ? lerr : "unknown LevelDB error");
    leveldb_free(lerr);
    return -1;
}

/* Get a key (malloc'd value, free with leveldb_free).  1 found, 0 not, -1 error. */
static int db_get(store *s, const leveldb_readoptions_t *ro, const char *k, size_t kl, char **v,
                  size_t *vl, tm_err *err) {
    char *lerr = NULL;
    *v = leveldb_get(s->db, ro ? ro : s->ro, k, kl, vl, &lerr);
    if (lerr) return db_err(err, lerr, "read");
    return *v != NULL;
}

/* Iterator-level error check: 0 ok, -1 (err set). */
static int iter_status(leveldb_iterator_t *it, tm_err *err) {
    char *lerr = NULL;
    leveldb_iter_get_error(it, &lerr);
    if (lerr) return db_err(err, lerr, "read");
    return 0;
}

/* Position the iterator on the last run of `prefix` (name + NUL) with first
 * key <= target.  Returns 1 (positioned, *first set), 0 (none), -1 error. */
static int run_seek_le(leveldb_iterator_t *it, buf *kb, const char *prefix, size_t pl,
                       uint64_t target, uint64_t *first, tm_err *err) {
    buf_reset(kb);
    buf_append(kb, prefix, pl);
    buf_put_be64(kb, target);
    leveldb_iter_seek(it, kb->ptr, kb->len);
    size_t kl;
    const char *k;
    if (leveldb_iter_valid(it)) {
        k = leveldb_iter_key(it, &kl);
        if (kl == kb->len && memcmp(k, kb->ptr, kl) == 0) {
            *first = target;
            return 1;
        }
        leveldb_iter_prev(it);
    } else {
        if (iter_status(it, err) < 0) return -1;
        leveldb_iter_seek_to_last(it);
    }
    if (iter_status(it, err) < 0) return -1; /* a skipped unreadable block */
    if (!leveldb_iter_valid(it)) return 0;
    k = leveldb_iter_key(it, &kl);
    if (kl != pl + 8 || memcmp(k, prefix, pl) != 0) return 0;
    *first = buf_get_be64(k + pl);
    return 1;
}

/* Current head of a stream from the DB via `it`: 1 found, 0 none, -1 error. */
static int db_stream_head(leveldb_iterator_t *it, buf *kb, buf *pb, const char *name, size_t nl,
                          u64vec *tmp, int64_t *head, tm_err *err) {
    buf_reset(pb);
    buf_putc(pb, K_STREAM);
    buf_append(pb, name, nl);
    buf_putc(pb, '\0');
    uint64_t first;
    int r = run_seek_le(it, kb, pb->ptr, pb->len, UINT64_MAX, &first, err);
    if (r <= 0) return r;
    size_t vl;
    const char *v = leveldb_iter_value(it, &vl);
    if (run_decode(v, vl, tmp) < 0 || tmp->n == 0)
        return err_set(err, TM_EIO, "corrupt stream index for '%.*s' at version %llu", (int)nl,
                       name, (unsigned long long)first);
    *head = (int64_t)(first + tmp->n - 1);
    return 1;
}

/* ------------------------------------------------------------------ */
/* open / close                                                        */

static int dir_exists(const char *dir) {
    struct stat st;
    return stat(dir, &st) == 0 && S_ISDIR(st.st_mode);
}

static int has_current(const char *dir) {
    buf p = BUF_INIT;
    buf_printf(&p, "%s/CURRENT", dir);
    struct stat st;
    int ok = stat(p.ptr, &st) == 0;
    buf_free(&p);
    return ok;
}

static uint64_t read_folded(store *s, const leveldb_readoptions_t *ro, tm_err *err, int *rc) {
    char *v;
    size_t vl;
    uint64_t f = 0;
    *rc = db_get(s, ro, "mfolded", 7, &v, &vl, err);
    if (*rc == 1) {
        if (vl == 8) f = buf_get_be64(v);
        else *rc = err_set(err, TM_EIO, "corrupt store: bad fold mark");
        leveldb_free(v);
    }
    return f;
}

/* Rebuild the leader's journal state (streams above the fold mark). */
static int load_journal(store *s, tm_err *err) {
    int rc;
    s->folded = read_folded(s, NULL, err, &rc);
    if (rc < 0) return -1;
    leveldb_iterator_t *it = leveldb_create_iterator(s->db, s->ro);
    unsigned char k[9];
    k[0] = K_JOURNAL;
    put_be64(k + 1, s->folded + 1);
    rc = 0;
    for (leveldb_iter_seek(it, (const char *)k, 9); leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t kl, vl;
        const char *kk = leveldb_iter_key(it, &kl);
        if (kk[0] != K_JOURNAL) break;
        const char *v = leveldb_iter_value(it, &vl), *p = v + 4, *end = v + vl;
        jent e;
        int r = crc_ok(v, vl) ? 1 : -1;
        while (r == 1 && (r = jent_next(&p, end, &e)) == 1) {
            uint64_t h = hash_bytes(e.name, e.nl);
            node *n = nmap_find(&s->streams, e.name, e.nl, h);
            if (!n) n = nmap_add(&s->streams, e.name, e.nl, h);
            if (n->pend.n == 0) {
                n->pfirst = e.first;
                n->pnext = s->pending;
                s->pending = n;
            } else if (n->pfirst + n->pend.n != e.first) r = -1;
            if (r == 1 && jent_positions(&e, &n->pend) < 0) r = -1;
            n->head = n->ghead = (int64_t)(e.first + e.n - 1);
        }
        if (r < 0) {
            rc = err_set(err, TM_EIO, "corrupt store: stream journal at position %llu is damaged",
                         (unsigned long long)buf_get_be64(kk + 1));
            break;
        }
        s->unf_groups++;
        u64vec_push(&s->jkeys, buf_get_be64(kk + 1));
    }
    if (rc == 0 && iter_status(it, err) < 0) rc = -1;
    leveldb_iter_destroy(it);
    return rc;
}

static int load_meta(store *s, tm_err *err) {
    char *v;
    size_t vl;
    int r = db_get(s, NULL, "mformat", 7, &v, &vl, err);
    if (r < 0) return -1;
    s->kev = K_EVENT;
    s->blocks = 1;
    if (r == 1) {
        int ok = vl == 1 && v[0] >= '1' && v[0] <= '3';
        if (ok && v[0] == '1') s->kev = K_EVENT_V1;
        if (ok && v[0] != '3') s->blocks = 0;
        leveldb_free(v);
        if (!ok) return err_set(err, TM_EIO, "data directory %s: unsupported store format", s->dir);
    } else {
        char *lerr = NULL;
        leveldb_put(s->db, s->wo, "mformat", 7, "3", 1, &lerr);
        if (lerr) return db_err(err, lerr, "write");
    }
    uint64_t last = 0;
    r = db_get(s, NULL, "mlast", 5, &v, &vl, err);
    if (r < 0) return -1;
    if (r == 1) {
        if (vl != 8) {
            leveldb_free(v);
            return err_set(err, TM_EIO, "data directory %s: corrupt last position", s->dir);
        }
        last = buf_get_be64(v);
        leveldb_free(v);
    }
    /* Never reuse a position: take the larger of 'm' last and the last 'e' key
     * (store_check reports any mismatch). */
    leveldb_iterator_t *it = leveldb_create_iterator(s->db, s->ro);
    unsigned char k[9];
    event_key(k, s->kev, UINT64_MAX);
    leveldb_iter_seek(it, (const char *)k, 9);
    if (leveldb_iter_valid(it)) leveldb_iter_prev(it);
    else leveldb_iter_seek_to_last(it);
    while (leveldb_iter_valid(it)) {
        size_t kl;
        const char *kk = leveldb_iter_key(it, &kl);
        if (kl == 9 && kk[0] == s->kev) {
            uint64_t p = buf_get_be64(kk + 1);
            if (p > last) last = p;
            break;
        }
        if ((unsigned char)kk[0] < (unsigned char)s->kev) break;
        leveldb_iter_prev(it);
    }
    r = iter_status(it, err);
    leveldb_iter_destroy(it);
    if (r < 0) return -1;
    s->last = last;
    return load_journal(s, err);
}

/* ---- disk-full reserve ----
 * RESERVE in the data directory holds STORE_RESERVE_BYTES of allocated
 * space.  When the disk is full, opening the store (which LevelDB cannot
 * do without writing) releases it, so reads, export and check still work;
 * it is re-created at the next open that has room. */
#define STORE_RESERVE_BYTES (256u << 10)

static void reserve_path(const char *dir, char *out, size_t n) {
    snprintf(out, n, "%s/RESERVE", dir);
}

static void reserve_make(const char *dir) {
    char path[4096];
    reserve_path(dir, path, sizeof path);
    struct stat st;
    if (stat(path, &st) == 0 && st.st_size >= (off_t)STORE_RESERVE_BYTES) return;
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (posix_fallocate(fd, 0, STORE_RESERVE_BYTES) != 0) {
        close(fd);
        unlink(path); /* no room: no reserve this time */
        return;
    }
    fsync(fd);
    close(fd);
}

/* 1 when a reserve existed and was released. */
static int reserve_release(const char *dir) {
    char path[4096];
    reserve_path(dir, path, sizeof path);
    return unlink(path) == 0;
}

/* Release everything store_open allocated (LevelDB handles, caches, the
 * commit path's maps); used by store_close and by store_open's failure path. */
static void store_free_parts(store *s) {
    if (s->db) leveldb_close(s->db);
    leveldb_writebatch_destroy(s->wb);
    leveldb_writeoptions_destroy(s->wo);
    leveldb_readoptions_destroy(s->ro);
    leveldb_options_destroy(s->opts);
    leveldb_cache_destroy(s->cache);
    leveldb_filterpolicy_destroy(s->bloom);
    nmap_clear(&s->streams);
    nmap_clear(&s->cats);
    nmap_clear(&s->types);
    free(s->ids.slot);
    free(s->sv);
    free(s->jkeys.v);
    buf_free(&s->rec);
    buf_free(&s->key);
    buf_free(&s->val);
    buf_free(&s->blk);
    free(s->dir);
    free(s);
}

store *store_open(const char *dir, const store_opts *opts, tm_err *err) {
    store_opts o;
    if (opts) o = *opts;
    else store_opts_default(&o);
    if (!o.max_event_size) o.max_event_size = 1u << 20;
    if (!o.cache_bytes) o.cache_bytes = 64u << 20;
    if (!o.create_if_missing && (!dir_exists(dir) || !has_current(dir))) {
        err_set(err, TM_ENOTFOUND, "data directory %s does not exist or holds no store", dir);
        return NULL;
    }
    store *s = calloc(1, sizeof *s);
    if (!s) tm_oom();
    s->o = o;
    s->dir = strdup(dir);
    s->opts = leveldb_options_create();
    s->bloom = leveldb_filterpolicy_create_bloom(10);
    s->cache = leveldb_cache_create_lru(o.cache_bytes);
    leveldb_options_set_create_if_missing(s->opts, o.create_if_missing);
    leveldb_options_set_paranoid_checks(s->opts, 1);
    leveldb_options_set_filter_policy(s->opts, s->bloom);
    leveldb_options_set_cache(s->opts, s->cache);
    leveldb_options_set_write_buffer_size(s->opts, 64u << 20);
    leveldb_options_set_max_file_size(s->opts, 8u << 20);
    leveldb_options_set_compression(s->opts, leveldb_snappy_compression);
    s->ro = leveldb_readoptions_create();
    leveldb_readoptions_set_verify_checksums(s->ro, 1);
    s->wo = leveldb_writeoptions_create();
    leveldb_writeoptions_set_sync(s->wo, o.durability == STORE_DURABLE);
    s->wb = leveldb_writebatch_create();

    if (o.create_if_missing && !dir_exists(dir) && mkdir(dir, 0755) < 0 && errno != EEXIST) {
        err_set(err, TM_EIO, "cannot create data directory %s: %s", dir, strerror(errno));
        goto fail;
    }
    char *lerr = NULL;
    s->db = leveldb_open(s->opts, dir, &lerr);
    if (lerr && o.use_reserve && strstr(lerr, "No space left") && reserve_release(dir)) {
        /* A full disk: LevelDB writes at every open (log recovery, a new
         * MANIFEST).  Give it the reserved space so reads keep working. */
        leveldb_free(lerr);
        lerr = NULL;
        s->db = leveldb_open(s->opts, dir, &lerr);
    }
    if (lerr) {
        /* LevelDB says "lock <path>: ..." when the lock is held; an I/O
         * error opening the LOCK file is just "<path>/LOCK: ..." */
        if (strstr(lerr, "lock "))
            err_set(err, TM_EIO, "data directory %s is in use by another process (a running server?)",
                    dir);
        else if (strstr(lerr, "does not exist"))
            err_set(err, TM_ENOTFOUND, "data directory %s holds no store", dir);
        else err_set(err, TM_EIO, "cannot open data directory %s: %s", dir, lerr);
        leveldb_free(lerr);
        goto fail;
    }
    if (load_meta(s, err) < 0) goto fail;
    reserve_make(dir);
    if (getrandom(s->rng, sizeof s->rng, 0) != sizeof s->rng) {
        s->rng[0] = (uint64_t)now_ms() ^ (uint64_t)getpid() << 32;
        s->rng[1] = (uint64_t)(uintptr_t)s ^ 0x9e3779b97f4a7c15ull;
    }
    if (!s->rng[0] && !s->rng[1]) s->rng[0] = 1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->idle, NULL);
    pthread_cond_init(&s->async_cv, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->gather_cv, &ca);
    pthread_condattr_destroy(&ca);
    return s;
fail:
    store_free_parts(s);
    return NULL;
}

void store_close(store *s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_cond_broadcast(&s->gather_cv);
    /* drain queued appends: blocking ones lead themselves, async ones are
     * led by async_th */
    while (s->leading || s->qhead) {
        if (!s->leading) pthread_cond_signal(&s->async_cv);
        pthread_cond_wait(&s->idle, &s->mu);
    }
    s->async_quit = 1;
    pthread_cond_signal(&s->async_cv);
    int started = s->async_started;
    pthread_mutex_unlock(&s->mu);
    if (started) pthread_join(s->async_th, NULL);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->idle);
    pthread_cond_destroy(&s->async_cv);
    pthread_cond_destroy(&s->gather_cv);
    store_free_parts(s);
}

void store_on_commit(store *s, store_commit_fn fn, void *ud) {
    pthread_mutex_lock(&s->mu);
    if (s->nfns < MAX_COMMIT_FNS) {
        s->fns[s->nfns].fn = fn;
        s->fns[s->nfns].ud = ud;
        s->nfns++;
    }
    pthread_mutex_unlock(&s->mu);
}

/* Enter the refusing state (caller holds no lock). */
static void set_failed(store *s, const char *why) {
    pthread_mutex_lock(&s->mu);
    if (!s->failed) {
        s->failed = 1;
        snprintf(s->failmsg, sizeof s->failmsg, "%s", why);
    }
    pthread_mutex_unlock(&s->mu);
}

static int refusing(tm_err *err) {
    return err_set(err, TM_EIO, "store is refusing writes after a failed sync; reopen it");
}

/* ------------------------------------------------------------------ */
/* group commit                                                       */

static uint64_t rng_next(store *s) {
    uint64_t s1 = s->rng[0];
    const uint64_t s0 = s->rng[1];
    s->rng[0] = s0;
    s1 ^= s1 << 23;
    s->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return s->rng[1] + s0;
}

/* A generated id carrying its position (see the top of this file). */
static void gen_id(store *s, uint64_t pos, uint8_t id[16]) {
    uint64_t a = rng_next(s), b = rng_next(s);
    /* bytes 0-5 the position, 6 = 0x8 | 4 random bits, 7 random (one
     * big-endian word); 8 = 0b10 | 6 random bits, 9-15 = b's low 7 bytes,
     * lowest first */
    uint64_t hi = __builtin_bswap64(pos << 16 | (0x80 | (a & 0x0f)) << 8 | ((a >> 8) & 0xff));
    uint64_t lo = (b << 8) | (0x80 | ((a >> 16) & 0x3f)); /* little-endian: byte 8 first */
    if (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__) lo = __builtin_bswap64(lo);
    if (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__) hi = __builtin_bswap64(hi);
    memcpy(id, &hi, 8);
    memcpy(id + 8, &lo, 8);
}

/* The position a generated id claims, or 0 when it is not of that form. */
static uint64_t gen_id_pos(const uint8_t id[16]) {
    if ((id[6] & 0xf0) != 0x80 || (id[8] & 0xc0) != 0x80) return 0;
    uint64_t p = 0;
    for (int i = 0; i < 6; i++) p = (p << 8) | id[i];
    return p;
}

static int same_content(const tm_event *a, const tm_event *b) {
    const char *am = a->meta_len ? a->meta : "\x80", *bm = b->meta_len ? b->meta : "\x80";
    size_t aml = a->meta_len ? a->meta_len : 1, bml = b->meta_len ? b->meta_len : 1;
    const char *ad = a->data_len ? a->data : "\xc0", *bd = b->data_len ? b->data : "\xc0";
    size_t adl = a->data_len ? a->data_len : 1, bdl = b->data_len ? b->data_len : 1;
    return a->stream_len == b->stream_len && memcmp(a->stream, b->stream, a->stream_len) == 0 &&
           a->type_len == b->type_len && memcmp(a->type, b->type, a->type_len) == 0 &&
           aml == bml && memcmp(am, bm, aml) == 0 && adl == bdl && memcmp(ad, bd, adl) == 0;
}

static uint64_t id_hash(const uint8_t id[16]) {
    uint64_t a, b;
    memcpy(&a, id, 8);
    memcpy(&b, id + 8, 8);
    return (a ^ (b * 0x9e3779b97f4a7c15ull)) * 0xff51afd7ed558ccdull;
}

static tm_event *idtab_find(idtab *t, const uint8_t id[16]) {
    if (!t->count) return NULL;
    for (size_t i = id_hash(id) & (t->cap - 1);; i = (i + 1) & (t->cap - 1)) {
        tm_event *e = t->slot[i];
        if (!e) return NULL;
        if (memcmp(e->id, id, 16) == 0) return e;
    }
}

static void idtab_add(idtab *t, tm_event *ev) {
    if ((t->count + 1) * 2 > t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        tm_event **slot = calloc(cap, sizeof *slot);
        if (!slot) tm_oom();
        for (size_t i = 0; i < t->cap; i++) {
            tm_event *e = t->slot[i];
            if (!e) continue;
            size_t j = id_hash(e->id) & (cap - 1);
            while (slot[j]) j = (j + 1) & (cap - 1);
            slot[j] = e;
        }
        free(t->slot);
        t->slot = slot;
        t->cap = cap;
    }
    size_t j = id_hash(ev->id) & (t->cap - 1);
    while (t->slot[j]) j = (j + 1) & (t->cap - 1);
    t->slot[j] = ev;
    t->count++;
}

static void idtab_reset(idtab *t) {
    if (t->count) memset(t->slot, 0, t->cap * sizeof *t->slot);
    t->count = 0;
}

static leveldb_iterator_t *group_iter(store *s) {
    if (!s->git) s->git = leveldb_create_iterator(s->db, s->ro);
    return s->git;
}

/* The stream's node with its committed head loaded (leader). */
static node *stream_node(store *s, const char *name, size_t nl, tm_err *err) {
    uint64_t h = hash_bytes(name, nl);
    node *n = nmap_find(&s->streams, name, nl, h);
    if (n) return n;
    int64_t head = -1;
    u64vec tmp = {0};
    int r = db_stream_head(group_iter(s), &s->key, &s->val, name, nl, &tmp, &head, err);
    free(tmp.v);
    if (r < 0) return NULL;
    n = nmap_add(&s->streams, name, nl, h);
    n->head = n->ghead = head;
    n->gen = 0;
    return n;
}

static int64_t group_head(store *s, node *n) { return n->gen == s->gen ? n->ghead : n->head; }

static node *touch(store *s, nmap *m, node **list, const char *name, size_t nl) {
    uint64_t h = hash_bytes(name, nl);
    node *n = nmap_find(m, name, nl, h);
    if (!n) n = nmap_add(m, name, nl, h);
    if (n->gen != s->gen) {
        n->gen = s->gen;
        n->run.n = 0;
        n->tnext = *list;
        *list = n;
    }
    return n;
}

static int bad_block(tm_err *err, uint64_t pos) {
    return err_set(err, TM_EIO, "corrupt store: malformed log block at position %llu",
                   (unsigned long long)pos);
}

/* Seek `it` to the block holding pos and *b onto its record: 1, 0 (no
 * such position), -1 (a read error or a malformed block). */
static int log_seek(store *s, leveldb_iterator_t *it, uint64_t pos, blk *b, tm_err *err) {
    unsigned char k[9];
    event_key(k, s->kev, pos);
    leveldb_iter_seek(it, (const char *)k, 9);
    int r = 0;
    if (leveldb_iter_valid(it)) {
        size_t kl, vl;
        const char *key = leveldb_iter_key(it, &kl);
        const char *v = leveldb_iter_value(it, &vl);
        r = blk_open(b, s->kev, s->blocks, key, kl, v, vl);
    }
    if (r == 0 || (r == 1 && pos < b->first)) return iter_status(it, err) < 0 ? -1 : 0;
    if (r < 0 || blk_seek(b, pos) < 0) return bad_block(err, pos);
    return 1;
}

/* Does the record at pos carry ev's id?  1 yes (*orig, *same filled), 0 no
 * (or no such position), -1 error. */
static int id_at(store *s, uint64_t pos, const tm_event *ev, tm_event *orig, int *same,
                 tm_err *err) {
    blk b;
    int r = log_seek(s, group_iter(s), pos, &b, err);
    tm_event st;
    if (r == 1 && record_decode(b.rec, b.reclen, &st, err) < 0)
        r = err_prefix(err, "position %llu", (unsigned long long)pos);
    if (r == 1) {
        r = memcmp(st.id, ev->id, 16) == 0;
        if (r) {
            *same = same_content(ev, &st);
            orig->position = pos;
            orig->version = st.version;
            orig->time_ms = st.time_ms;
        }
    }
    return r;
}

/* Look an id up among stored events and earlier requests of this group.
 * 1 found (*orig has the stored position/version/time, *same = same
 * content), 0 not found, -1 error. */
static int lookup_id(store *s, const tm_event *ev, tm_event *orig, int *same, tm_err *err) {
    tm_event *g = idtab_find(&s->ids, ev->id);
    if (g) {
        *orig = *g;
        *same = same_content(ev, g);
        return 1;
    }
    uint64_t pos = gen_id_pos(ev->id);
    if (pos && pos <= s->last) {
        int r = id_at(s, pos, ev, orig, same, err);
        if (r != 0) return r;
    }
    char ik[17], *v;
    size_t vl;
    ik[0] = K_ID;
    memcpy(ik + 1, ev->id, 16);
    int r = db_get(s, NULL, ik, 17, &v, &vl, err);
    if (r <= 0) return r;
    const char *p = v;
    int bad = buf_get_varint(&p, v + vl, &pos) < 0 || p != v + vl || !pos || pos > s->last;
    leveldb_free(v);
    if (!bad && (r = id_at(s, pos, ev, orig, same, err)) != 0) return r;
    char ids[37];
    event_id_format(ev->id, ids);
    return err_set(err, TM_EIO, "corrupt store: the id index entry for %s is wrong; run check", ids);
}

static void fmt_expect(char *out, size_t n, int64_t v) {
    if (v == STORE_ANY) snprintf(out, n, "any");
    else if (v == STORE_NO_STREAM) snprintf(out, n, "no_stream");
    else if (v == STORE_EXISTS) snprintf(out, n, "exists");
    else snprintf(out, n, "%lld", (long long)v);
}

/* Put the block being filled into the batch. */
static void log_flush(store *s) {
    if (!s->blkn) return;
    unsigned char k[9];
    event_key(k, s->kev, s->blklast);
    s->blk.ptr[0] = (char)s->blkn; /* BLOCK_MAX_EVENTS < 128: one varint byte */
    leveldb_writebatch_put(s->wb, (const char *)k, 9, s->blk.ptr, s->blk.len);
    s->blkn = 0;
}

/* The record of ev at pos (the next position of the group) into the log. */
static void log_add(store *s, uint64_t pos, const tm_event *ev) {
    buf_reset(&s->rec);
    record_encode(ev, &s->rec);
    if (!s->blocks) {
        unsigned char k[9];
        event_key(k, s->kev, pos);
        leveldb_writebatch_put(s->wb, (const char *)k, 9, s->rec.ptr, s->rec.len);
        return;
    }
    if (s->blkn && (s->blkn == BLOCK_MAX_EVENTS || s->blk.len + s->rec.len + 3 > BLOCK_MAX_BYTES))
        log_flush(s);
    if (!s->blkn) {
        buf_reset(&s->blk);
        buf_putc(&s->blk, 0); /* the count, set by log_flush */
    }
    put_varint(&s->blk, s->rec.len);
    buf_append(&s->blk, s->rec.ptr, s->rec.len);
    s->blkn++;
    s->blklast = pos;
}

/* Check a request against stored ids and current heads; on success append
 * it to the group.  0 ok, -1 rejected (r->err filled, group unaffected). */
static int group_add(store *s, req *r) {
    tm_err *err = &r->err;
    /* 1. idempotent retries */
    if (r->nid) {
        size_t found = 0;
        const tm_event *first_new = NULL;
        tm_event *orig = r->nid == r->n ? calloc(r->n, sizeof *orig) : NULL;
        for (size_t i = 0; i < r->n; i++) {
            tm_event *ev = &r->evs[i];
            if (!ev->has_id) {
                first_new = first_new ? first_new : ev;
                continue;
            }
            tm_event o;
            int same = 0;
            int rc = lookup_id(s, ev, &o, &same, err);
            if (rc < 0) {
                free(orig);
                return -1;
            }
            if (rc == 0) {
                first_new = first_new ? first_new : ev;
                continue;
            }
            if (!same) {
                char ids[37];
                event_id_format(ev->id, ids);
                free(orig);
                err->current_version = -1;
                return err_set(err, TM_ECONFLICT,
                               "event %zu: id %s is already stored at position %llu with other content",
                               i, ids, (unsigned long long)o.position);
            }
            if (orig) orig[i] = o;
            found++;
        }
        if (found && first_new) {
            free(orig);
            err->current_version = -1;
            return err_set(err, TM_ECONFLICT,
                           "request mixes %zu already stored event ids with new events", found);
        }
        if (found == r->n) {
            for (size_t i = 0; i < r->n; i++) {
                r->evs[i].position = orig[i].position;
                r->evs[i].version = orig[i].version;
                r->evs[i].time_ms = orig[i].time_ms;
            }
            free(orig);
            return 0;
        }
        free(orig);
    }
    /* 2. expected versions */
    for (size_t i = 0; i < r->nexp; i++) {
        const store_expect *x = &r->exp[i];
        node *n = stream_node(s, x->stream, x->stream_len, err);
        if (!n) return -1;
        int64_t cur = group_head(s, n);
        int ok = x->version == STORE_ANY || (x->version == STORE_NO_STREAM && cur < 0) ||
                 (x->version == STORE_EXISTS && cur >= 0) || (x->version >= 0 && cur == x->version);
        if (!ok) {
            char want[32];
            fmt_expect(want, sizeof want, x->version);
            err->current_version = cur;
            if (cur < 0)
                return err_set(err, TM_ECONFLICT,
                               "stream '%.*s': expected version %s but the stream does not exist",
                               (int)x->stream_len, x->stream, want);
            return err_set(err, TM_ECONFLICT,
                           "stream '%.*s': expected version %s but the stream is at version %lld",
                           (int)x->stream_len, x->stream, want, (long long)cur);
        }
    }
    /* Load every stream's head before assigning anything (a read error must
     * leave the group untouched). */
    if (r->n > s->svcap) {
        free(s->sv);
        s->svcap = r->n;
        s->sv = malloc(r->n * sizeof *s->sv);
        if (!s->sv) tm_oom();
    }
    node *prev = NULL;
    for (size_t i = 0; i < r->n; i++) {
        tm_event *ev = &r->evs[i];
        if (!prev || prev->klen != ev->stream_len || memcmp(prev->key, ev->stream, prev->klen) != 0)
            if (!(prev = stream_node(s, ev->stream, ev->stream_len, err))) return -1;
        s->sv[i] = prev;
    }
    /* 3. assign positions and versions, encode into the batch */
    node *sn = NULL, *cn = NULL, *tn = NULL;
    for (size_t i = 0; i < r->n; i++) {
        tm_event *ev = &r->evs[i];
        if (sn != s->sv[i]) {
            sn = s->sv[i];
            if (sn->gen != s->gen) {
                sn->ghead = sn->head;
                sn->gen = s->gen;
                sn->run.n = 0;
            }
            if (sn->run.n == 0) {
                sn->first = (uint64_t)(sn->ghead + 1);
                sn->tnext = s->tstreams;
                s->tstreams = sn;
            }
        }
        size_t cl = event_category_len(ev->stream, ev->stream_len);
        if (!cn || cn->klen != cl || memcmp(cn->key, ev->stream, cl) != 0)
            cn = touch(s, &s->cats, &s->tcats, ev->stream, cl);
        if (!tn || tn->klen != ev->type_len || memcmp(tn->key, ev->type, tn->klen) != 0)
            tn = touch(s, &s->types, &s->ttypes, ev->type, ev->type_len);
        uint64_t pos = ++s->gpos;
        ev->version = (uint64_t)(++sn->ghead);
        ev->position = pos;
        if (!ev->time_ms) ev->time_ms = s->gnow;
        u64vec_push(&sn->run, pos);
        u64vec_push(&cn->run, pos);
        u64vec_push(&tn->run, pos);
        unsigned char k[17];
        if (ev->has_id || pos >= GEN_ID_MAX_POS) {
            if (!ev->has_id) {
                gen_id(s, 0, ev->id); /* random; marks as not positional below */
                ev->id[6] = (uint8_t)(0x40 | (ev->id[6] & 0x0f)); /* UUIDv4 */
            }
            k[0] = K_ID;
            memcpy(k + 1, ev->id, 16);
            buf_reset(&s->val);
            put_varint(&s->val, pos);
            leveldb_writebatch_put(s->wb, (const char *)k, 17, s->val.ptr, s->val.len);
            idtab_add(&s->ids, ev);
        } else {
            gen_id(s, pos, ev->id);
        }
        log_add(s, pos, ev);
    }
    return 0;
}

static void put_run(store *s, char tag, node *n, uint64_t first, const u64vec *a,
                    const u64vec *b) {
    buf_reset(&s->key);
    buf_putc(&s->key, tag);
    buf_append(&s->key, n->key, n->klen);
    buf_putc(&s->key, '\0');
    buf_put_be64(&s->key, first);
    buf_reset(&s->val);
    run_encode(&s->val, a->v, a->n, b ? b->v : NULL, b ? b->n : 0);
    leveldb_writebatch_put(s->wb, s->key.ptr, s->key.len, s->val.ptr, s->val.len);
}

/* Category / type runs of the group. */
static void put_runs(store *s, char tag, node *list, int unused) {
    for (node *n = list; n; n = n->tnext) put_run(s, tag, n, n->run.v[0], &n->run, NULL);
}

/* One journal key for the group's stream appends. */
static void put_journal(store *s) {
    unsigned char k[9];
    k[0] = K_JOURNAL;
    put_be64(k + 1, s->last + 1);
    buf_reset(&s->val);
    buf_append(&s->val, "\0\0\0\0", 4);
    for (node *n = s->tstreams; n; n = n->tnext) {
        put_varint(&s->val, n->klen);
        buf_append(&s->val, n->key, n->klen);
        put_varint(&s->val, n->first);
        put_varint(&s->val, n->run.n);
        put_positions(&s->val, n->run.v, n->run.n, 0);
    }
    put_crc_at(&s->val, 0);
    leveldb_writebatch_put(s->wb, (const char *)k, 9, s->val.ptr, s->val.len);
}

/* Fold: one 's' run per stream with everything above the fold mark,
 * including this group; the new mark is the group's last position. */
static void put_fold(store *s) {
    static const u64vec none = {0};
    for (node *n = s->pending; n; n = n->pnext) {
        int in_group = n->gen == s->gen && n->run.n > 0;
        put_run(s, K_STREAM, n, n->pfirst, &n->pend, in_group ? &n->run : &none);
    }
    for (node *n = s->tstreams; n; n = n->tnext)
        if (n->pend.n == 0) put_run(s, K_STREAM, n, n->first, &n->run, NULL);
    unsigned char v[8], k[9];
    put_be64(v, s->gpos);
    leveldb_writebatch_put(s->wb, "mfolded", 7, (const char *)v, 8);
    k[0] = K_JOURNAL;
    for (size_t i = 0; i < s->jkeys.n; i++) { /* the folded journal is no longer needed */
        put_be64(k + 1, s->jkeys.v[i]);
        leveldb_writebatch_delete(s->wb, (const char *)k, 9);
    }
}

static void release_runs(node *list) {
    for (node *n = list; n; n = n->tnext) {
        if (n->run.cap > 4096) {
            free(n->run.v);
            n->run.v = NULL;
            n->run.cap = 0;
        }
        n->run.n = 0;
    }
}

/* Process one group (the requests in list, in arrival order). */
static void group_commit(store *s, req *list) {
    if (s->streams.count > STREAM_CACHE_MAX) nmap_evict_idle(&s->streams);
    if (s->cats.count > STREAM_CACHE_MAX) nmap_clear(&s->cats);
    if (s->types.count > STREAM_CACHE_MAX) nmap_clear(&s->types);
    s->gen++;
    s->gpos = s->last;
    s->gnow = now_ms();
    s->tstreams = s->tcats = s->ttypes = NULL;
    idtab_reset(&s->ids);
    leveldb_writebatch_clear(s->wb);

    int failed;
    pthread_mutex_lock(&s->mu);
    failed = s->failed;
    pthread_mutex_unlock(&s->mu);
    for (req *r = list; r; r = r->next) {
        if (failed) r->rc = refusing(&r->err);
        else r->rc = group_add(s, r);
    }
    log_flush(s);
    if (s->git) {
        leveldb_iter_destroy(s->git);
        s->git = NULL;
    }
    if (s->gpos == s->last) goto out; /* nothing new (rejections, retries) */

    int fold = s->gpos - s->folded >= FOLD_EVENTS || s->unf_groups + 1 >= FOLD_GROUPS;
    if (fold) put_fold(s);
    else put_journal(s);
    put_runs(s, K_CAT, s->tcats, 0);
    put_runs(s, K_TYPE, s->ttypes, 0);
    unsigned char lastv[8];
    put_be64(lastv, s->gpos);
    leveldb_writebatch_put(s->wb, "mlast", 5, (const char *)lastv, 8);
    char *lerr = NULL;
    leveldb_write(s->db, s->wo, s->wb, &lerr);
    if (lerr) {
        char why[256];
        snprintf(why, sizeof why, "%s", lerr);
        leveldb_free(lerr);
        set_failed(s, why);
        for (req *r = list; r; r = r->next) {
            if (r->rc == 0) {
                r->rc = err_set(&r->err, TM_EIO, "append failed, nothing acknowledged: %s; "
                                "store is refusing writes after a failed sync; reopen it", why);
            }
        }
        s->gen++; /* discard tentative heads */
        goto out;
    }
    for (node *n = s->tstreams; n; n = n->tnext) n->head = n->ghead;
    if (fold) {
        for (node *n = s->pending; n; n = n->pnext) {
            n->pend.n = 0;
            if (n->pend.cap > 4096) {
                free(n->pend.v);
                n->pend.v = NULL;
                n->pend.cap = 0;
            }
        }
        s->pending = NULL;
        s->folded = s->gpos;
        s->unf_groups = 0;
        s->jkeys.n = 0;
    } else {
        for (node *n = s->tstreams; n; n = n->tnext) {
            if (n->pend.n == 0) {
                n->pfirst = n->first;
                n->pnext = s->pending;
                s->pending = n;
            }
            for (size_t i = 0; i < n->run.n; i++) u64vec_push(&n->pend, n->run.v[i]);
        }
        s->unf_groups++;
        u64vec_push(&s->jkeys, s->last + 1);
    }
    __atomic_store_n(&s->last, s->gpos, __ATOMIC_RELEASE);
    struct {
        store_commit_fn fn;
        void *ud;
    } fns[MAX_COMMIT_FNS];
    pthread_mutex_lock(&s->mu);
    int nf = s->nfns;
    memcpy(fns, s->fns, sizeof fns);
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < nf; i++) fns[i].fn(fns[i].ud, s->gpos);
out:
    release_runs(s->tstreams);
    release_runs(s->tcats);
    release_runs(s->ttypes);
    s->gpos = s->last;
}

/* ---- leadership (LevelDB-style group commit) ----
 * An appending caller enqueues its request; if nobody is committing it
 * becomes the leader: it takes every queued request as one group (take
 * number s->taken), commits it (group_commit) without holding mu, marks
 * the group's requests done, and -- if requests queued meanwhile -- asks
 * that next group for a leader (s->lead_wanted), else gives leadership up.
 * A request queued while take t is the latest belongs to group t + 1.
 *   Waiters sleep on one futex word (s->fword, bumped at every wake) with
 * FUTEX_WAIT_BITSET, their bit being their group number mod 32 (at most
 * three groups have waiters at once: committing, queued, and the next).
 * The leader wakes its whole group with one FUTEX_WAKE_BITSET, and one
 * waiter of the next group, which claims leadership under mu.  A waiter
 * reads the word before checking its state and the lead request, so a
 * wake between the check and the sleep is never lost. */

static void fword_wake(store *s, uint64_t group, int n) {
    syscall(SYS_futex, &s->fword, FUTEX_WAKE_BITSET_PRIVATE, n, NULL, NULL,
            (uint32_t)1 << (group & 31));
}

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Commit delay (PostgreSQL's commit_delay with commit_siblings), synced
 * mode only.  With many closed-loop writers the callers of the group just
 * committed come back a moment later (a wake and a return); taking the
 * queue at once makes two cohorts alternate, each half of the writers per
 * sync.  So a leader whose last group had GATHER_SIBLINGS requests or more
 * waits, holding mu, until the queue holds as many requests as that group
 * plus those queued while it committed (the writers seen), or for half of
 * the last sync's duration (at most GATHER_MAX_NS), whichever comes
 * first.  A wait that times out means the writers did not come back (an
 * open loop): the next GATHER_BACKOFF groups are taken without waiting. */
#define GATHER_SIBLINGS 4
#define GATHER_MAX_NS 1000000ull
#define GATHER_BACKOFF 16

static void gather(store *s) {
    unsigned want = s->prev_group + s->handoff;
    if (s->o.durability != STORE_DURABLE || s->prev_group < GATHER_SIBLINGS ||
        s->qcount >= want || s->stopping)
        return;
    if (s->gather_skip) {
        s->gather_skip--;
        return;
    }
    uint64_t wait = s->sync_ns / 2 < GATHER_MAX_NS ? s->sync_ns / 2 : GATHER_MAX_NS;
    uint64_t end = mono_ns() + wait;
    struct timespec ts = {(time_t)(end / 1000000000ull), (long)(end % 1000000000ull)};
    s->gather_want = want;
    while (s->qcount < want && !s->stopping)
        if (pthread_cond_timedwait(&s->gather_cv, &s->mu, &ts) != 0) break; /* timed out */
    s->gather_want = 0;
    if (s->qcount < want) s->gather_skip = GATHER_BACKOFF;
}

/* A request joined the queue (mu held). */
static void queued(store *s) {
    s->qcount++;
    if (s->gather_want && s->qcount >= s->gather_want) pthread_cond_signal(&s->gather_cv);
}

/* Called by the leader holding mu; returns with mu released and
 * leadership given away.  `self` is the leader's own request. */
static void lead(store *s, req *self) {
    gather(s);
    req *list = s->qhead;
    s->qhead = s->qtail = NULL;
    s->qsync = 0;
    s->prev_group = s->qcount;
    s->qcount = 0;
    uint64_t g = __atomic_add_fetch(&s->taken, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&s->mu);
    uint64_t t0 = mono_ns();
    group_commit(s, list);
    uint64_t took = mono_ns() - t0;
    int others = 0;
    req *async = NULL;
    /* handoff counts the requests queued during the commit, so it is read
     * before any of this group is marked done: a spinning waiter that sees
     * its request done returns and may queue again at once, and counting
     * it here as well as in prev_group would make gather() wait for more
     * writers than there are. */
    pthread_mutex_lock(&s->mu);
    s->sync_ns = took;
    s->handoff = s->qcount;
    for (req *r = list, *nx; r; r = nx) {
        nx = r->next; /* read before the store: r may be gone after it */
        if (r->fn) {
            r->next = async;
            async = r;
        } else if (r != self) {
            others = 1;
            __atomic_store_n(&r->state, REQ_DONE, __ATOMIC_SEQ_CST);
        }
    }
    /* Requests queued during the commit form group g + 1.  A blocking one
     * among them leads it; a group of async requests only goes to async_th. */
    int next = s->qhead != NULL && s->qsync > 0;
    if (next) __atomic_store_n(&s->lead_wanted, g + 1, __ATOMIC_SEQ_CST);
    else {
        s->leading = 0;
        if (s->qhead) pthread_cond_signal(&s->async_cv);
        if (s->stopping) pthread_cond_broadcast(&s->idle);
    }
    pthread_mutex_unlock(&s->mu);
    __atomic_add_fetch(&s->fword, 1, __ATOMIC_SEQ_CST);
    if (next) fword_wake(s, g + 1, 1); /* the next leader first */
    if (others) fword_wake(s, g, INT32_MAX);
    for (req *r = async, *nx; r; r = nx) {
        nx = r->next;
        r->fn(r->ud, r->rc, &r->err);
        free(r);
    }
}

/* The async leader: whenever requests are queued and nobody leads (only
 * async requests are waiting), take the lead for them. */
static void *async_main(void *arg) {
    store *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!(s->qhead && !s->leading) && !s->async_quit)
            pthread_cond_wait(&s->async_cv, &s->mu);
        if (!(s->qhead && !s->leading)) break; /* quitting with nothing to do */
        s->leading = 1;
        lead(s, NULL); /* returns with mu released */
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* A waiter yields the CPU up to WAIT_SPINS times, watching the futex word,
 * before it sleeps on it (spin-then-block, as glibc's adaptive mutexes and
 * PostgreSQL's spinlocks); every commit that ends meanwhile (the word
 * moves) renews that budget, and no waiter spins for more than
 * WAIT_SPIN_NS in all.  With many closed-loop callers on few CPUs the
 * woken callers of a group come back and queue while the others are still
 * yielding, so the CPUs never halt between two commits and most waiters
 * see their group done without a futex wake.  64 threads on a 2-vCPU VM,
 * 8 alternating runs each: 98-130k appends/s before, 120-146k with both
 * bounds; without the time bound 70-141k, and once 23k/s (64 threads
 * yielding to each other for seconds: docs/benchmarks.md section 3).  A
 * lone waiter's sched_yield returns at once: ~64 us of CPU at most. */
#define WAIT_SPINS 64
#define WAIT_SPIN_NS 300000ull

/* A queued caller (mu not held): until its request is done, spin a little,
 * then sleep, or lead its group when asked. */
static void wait_or_lead(store *s, req *r) {
    uint32_t bit = (uint32_t)1 << (r->group & 31);
    int spins = WAIT_SPINS;
    uint64_t until = mono_ns() + WAIT_SPIN_NS;
    uint32_t last = __atomic_load_n(&s->fword, __ATOMIC_SEQ_CST);
    for (;;) {
        uint32_t seq = __atomic_load_n(&s->fword, __ATOMIC_SEQ_CST);
        if (seq != last) { /* a commit ended meanwhile: the queue is moving */
            last = seq;
            spins = WAIT_SPINS;
        }
        if (__atomic_load_n(&r->state, __ATOMIC_SEQ_CST) == REQ_DONE) return;
        if (__atomic_load_n(&s->lead_wanted, __ATOMIC_SEQ_CST) == r->group) {
            pthread_mutex_lock(&s->mu);
            if (s->lead_wanted == r->group) { /* r is still queued: its group is not taken */
                __atomic_store_n(&s->lead_wanted, 0, __ATOMIC_SEQ_CST);
                lead(s, r);
                return;
            }
            pthread_mutex_unlock(&s->mu);
            continue;
        }
        if (spins > 0 && ((spins & 7) || mono_ns() < until)) { /* the clock every 8th */
            spins--;
            sched_yield();
            continue;
        }
        syscall(SYS_futex, &s->fword, FUTEX_WAIT_BITSET_PRIVATE, seq, NULL, NULL, bit);
    }
}

/* ------------------------------------------------------------------ */
/* append: validation on the caller's thread, then enqueue and wait    */

static int cmp_id(const void *a, const void *b) { return memcmp(a, b, 16); }

static int validate(store *s, tm_event *evs, size_t n, const store_expect *exp, size_t nexp,
                    size_t *nid, tm_err *err) {
    if (n == 0) return err_set(err, TM_EINVAL, "no events to append");
    mp_limits lim = mp_default_limits;
    lim.max_size = s->o.max_event_size;
    *nid = 0;
    for (size_t i = 0; i < n; i++) {
        tm_event *ev = &evs[i];
        if (event_check_names(ev, err) < 0) return err_prefix(err, "event %zu", i);
        if (ev->data_len + ev->meta_len > s->o.max_event_size)
            return err_set(err, TM_EINVAL,
                           "event %zu: data and metadata are %zu bytes, more than the limit of %zu",
                           i, ev->data_len + ev->meta_len, s->o.max_event_size);
        if (ev->data_len && mp_validate(ev->data, ev->data_len, &lim, err) < 0)
            return err_prefix(err, "event %zu: data", i);
        if (ev->meta_len) {
            if (mp_validate(ev->meta, ev->meta_len, &lim, err) < 0)
                return err_prefix(err, "event %zu: metadata", i);
            unsigned char c = (unsigned char)ev->meta[0];
            if (!((c & 0xf0) == 0x80 || c == 0xde || c == 0xdf))
                return err_set(err, TM_EINVAL, "event %zu: metadata must be a map", i);
        }
        if (ev->has_id) (*nid)++;
    }
    for (size_t i = 0; i < nexp; i++) {
        tm_event t = {0};
        t.stream = exp[i].stream;
        t.stream_len = exp[i].stream_len;
        t.type = "x";
        t.type_len = 1;
        if (event_check_names(&t, err) < 0) return err_prefix(err, "expected version %zu", i);
        if (exp[i].version < STORE_EXISTS)
            return err_set(err, TM_EINVAL, "expected version %lld for stream '%.*s' is invalid",
                           (long long)exp[i].version, (int)exp[i].stream_len, exp[i].stream);
    }
    if (*nid > 1) {
        uint8_t(*ids)[16] = malloc(*nid * 16), (*p)[16] = NULL;
        if (!ids) tm_oom();
        p = ids;
        for (size_t i = 0; i < n; i++)
            if (evs[i].has_id) memcpy(*p++, evs[i].id, 16);
        qsort(ids, *nid, 16, cmp_id);
        for (size_t i = 1; i < *nid; i++)
            if (memcmp(ids[i - 1], ids[i], 16) == 0) {
                char idt[37];
                event_id_format(ids[i], idt);
                free(ids);
                return err_set(err, TM_EINVAL, "event id %s appears twice in one request", idt);
            }
        free(ids);
    }
    return 0;
}

int store_append(store *s, tm_event *evs, size_t n, const store_expect *exp, size_t nexp,
                 tm_err *err) {
    req r;
    memset(&r, 0, sizeof r);
    if (validate(s, evs, n, exp, nexp, &r.nid, err) < 0) return -1;
    r.evs = evs;
    r.n = n;
    r.exp = exp;
    r.nexp = nexp;
    err_clear(&r.err);
    pthread_mutex_lock(&s->mu);
    if (s->failed || s->stopping) {
        pthread_mutex_unlock(&s->mu);
        if (s->stopping) return err_set(err, TM_EIO, "store is closing");
        return refusing(err);
    }
    if (s->qtail) s->qtail->next = &r;
    else s->qhead = &r;
    s->qtail = &r;
    s->qsync++;
    queued(s);
    r.group = s->taken + 1;
    if (s->leading) {
        pthread_mutex_unlock(&s->mu);
        wait_or_lead(s, &r);
    } else {
        s->leading = 1;
        lead(s, &r);
    }
    if (r.rc < 0 && err) *err = r.err;
    return r.rc;
}

int store_append_async(store *s, tm_event *evs, size_t n, const store_expect *exp, size_t nexp,
                       store_append_fn fn, void *ud, tm_err *err) {
    req *r = calloc(1, sizeof *r);
    if (!r) tm_oom();
    if (validate(s, evs, n, exp, nexp, &r->nid, err) < 0) {
        free(r);
        return -1;
    }
    r->evs = evs;
    r->n = n;
    r->exp = exp;
    r->nexp = nexp;
    r->fn = fn;
    r->ud = ud;
    err_clear(&r->err);
    pthread_mutex_lock(&s->mu);
    if (s->failed || s->stopping) {
        int stopping = s->stopping;
        pthread_mutex_unlock(&s->mu);
        free(r);
        if (stopping) return err_set(err, TM_EIO, "store is closing");
        return refusing(err);
    }
    if (!s->async_started) {
        if (pthread_create(&s->async_th, NULL, async_main, s) != 0) {
            pthread_mutex_unlock(&s->mu);
            free(r);
            return err_set(err, TM_EIO, "cannot start the store's async commit thread");
        }
        s->async_started = 1;
    }
    if (s->qtail) s->qtail->next = r;
    else s->qhead = r;
    s->qtail = r;
    queued(s);
    r->group = s->taken + 1;
    if (!s->leading) pthread_cond_signal(&s->async_cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* ------------------------------------------------------------------ */
/* reads                                                               */


enum { IT_ALL, IT_STREAM, IT_CAT, IT_TYPE };

struct store_iter {
    store *s;
    const leveldb_snapshot_t *snap;
    leveldb_readoptions_t *ro;
    leveldb_iterator_t *it;   /* 'e' keys */
    leveldb_iterator_t *ix;   /* index runs */
    int kind, backward, started, done;
    uint64_t limit, count;
    uint64_t hi;              /* last position in the snapshot */
    uint64_t next;            /* IT_ALL: next position; IT_STREAM: next version */
    uint64_t from;
    buf prefix;               /* index key prefix: tag + name + NUL */
    buf kb;
    u64vec run;               /* current run */
    uint64_t run_first;       /* key of the current run */
    size_t ri;                /* next index into run (forward) / count left (backward) */
    uint64_t lastpos;         /* cat/type: last position returned */
    /* streams: folded runs ('s', phase 0) then the journal ('g', phase 1) */
    int phase;
    uint64_t folded;          /* fold mark in the snapshot */
    int64_t hf;               /* head version in the folded runs, -1 = none */
    leveldb_iterator_t *jx;   /* journal keys */
    u64vec jpos;              /* positions of the current journal entry */
    uint64_t jfirst;          /* its first version */
    size_t ji;
    uint64_t jexpect;         /* the version the next journal entry must start at */
    u64vec jall;              /* backward: every journal position of the stream */
    blk b;                    /* the block under it, when bok */
    int bok;
};

static store_iter *iter_new(store *s, int kind, uint64_t from, int backward, uint64_t limit) {
    store_iter *it = calloc(1, sizeof *it);
    if (!it) tm_oom();
    it->s = s;
    it->kind = kind;
    it->from = from;
    it->backward = backward;
    it->limit = limit;
    it->hi = load_last(s); /* read before the snapshot: the snapshot holds all of it */
    it->snap = leveldb_create_snapshot(s->db);
    it->ro = leveldb_readoptions_create();
    leveldb_readoptions_set_verify_checksums(it->ro, 1);
    /* a scan reads each block once: do not churn the cache (a scan of the
     * log, or an index read without a limit: a catch-up or a replay) */
    leveldb_readoptions_set_fill_cache(it->ro, kind != IT_ALL && limit != 0);
    leveldb_readoptions_set_snapshot(it->ro, it->snap);
    it->it = leveldb_create_iterator(s->db, it->ro);
    if (kind != IT_ALL) it->ix = leveldb_create_iterator(s->db, it->ro);
    return it;
}

void store_iter_free(store_iter *it) {
    if (!it) return;
    leveldb_iter_destroy(it->it);
    if (it->ix) leveldb_iter_destroy(it->ix);
    if (it->jx) leveldb_iter_destroy(it->jx);
    free(it->jpos.v);
    free(it->jall.v);
    leveldb_readoptions_destroy(it->ro);
    leveldb_release_snapshot(it->s->db, it->snap);
    buf_free(&it->prefix);
    buf_free(&it->kb);
    free(it->run.v);
    free(it);
}

store_iter *store_read_all(store *s, uint64_t from, int backward, uint64_t limit, tm_err *err) {
    store_iter *it = iter_new(s, IT_ALL, from, backward, limit);
    if (!backward) it->next = from ? from : 1;
    else it->next = from < it->hi ? from : it->hi;
    return it;
}

static store_iter *index_iter(store *s, int kind, char tag, const char *name, size_t len,
                              uint64_t from, int backward, uint64_t limit, tm_err *err) {
    if (len == 0 || memchr(name, '\0', len)) {
        err_set(err, TM_EINVAL, "invalid name");
        return NULL;
    }
    store_iter *it = iter_new(s, kind, from, backward, limit);
    buf_putc(&it->prefix, tag);
    buf_append(&it->prefix, name, len);
    buf_putc(&it->prefix, '\0');
    return it;
}

store_iter *store_read_stream(store *s, const char *stream, size_t len, uint64_t from,
                              int backward, uint64_t limit, tm_err *err) {
    return index_iter(s, IT_STREAM, K_STREAM, stream, len, from, backward, limit, err);
}

store_iter *store_read_category(store *s, const char *cat, size_t len, uint64_t from,
                                uint64_t limit, tm_err *err) {
    return index_iter(s, IT_CAT, K_CAT, cat, len, from, 0, limit, err);
}

store_iter *store_read_type(store *s, const char *type, size_t len, uint64_t from,
                            uint64_t limit, tm_err *err) {
    return index_iter(s, IT_TYPE, K_TYPE, type, len, from, 0, limit, err);
}

/* Positions >= from in the runs of tag+name: a count of the varints (a
 * byte below 0x80 ends one), runs not decoded; crc and order are checked
 * by the reads this count is for. */
static int index_count(store *s, char tag, const char *name, size_t len, uint64_t from,
                       uint64_t *n, tm_err *err) {
    *n = 0;
    if (len == 0 || memchr(name, '\0', len)) return err_set(err, TM_EINVAL, "invalid name");
    buf prefix = BUF_INIT;
    buf_putc(&prefix, tag);
    buf_append(&prefix, name, len);
    buf_putc(&prefix, '\0');
    leveldb_readoptions_t *ro = leveldb_readoptions_create();
    leveldb_readoptions_set_fill_cache(ro, 0);
    leveldb_iterator_t *ix = leveldb_create_iterator(s->db, ro);
    uint64_t first;
    buf kb = BUF_INIT;
    /* the run holding `from` (if any), then every later one */
    int r = run_seek_le(ix, &kb, prefix.ptr, prefix.len, from, &first, err);
    if (r == 0) {
        buf_reset(&kb);
        buf_append(&kb, prefix.ptr, prefix.len);
        buf_put_be64(&kb, from);
        leveldb_iter_seek(ix, kb.ptr, kb.len);
    }
    for (; r >= 0 && leveldb_iter_valid(ix); leveldb_iter_next(ix)) {
        size_t kl, vl;
        const char *k = leveldb_iter_key(ix, &kl);
        if (kl != prefix.len + 8 || memcmp(k, prefix.ptr, prefix.len) != 0) break;
        const unsigned char *v = (const unsigned char *)leveldb_iter_value(ix, &vl);
        for (size_t i = 4; i < vl; i++) *n += v[i] < 0x80;
    }
    if (r >= 0 && iter_status(ix, err) < 0) r = -1;
    leveldb_iter_destroy(ix);
    leveldb_readoptions_destroy(ro);
    buf_free(&prefix);
    buf_free(&kb);
    return r < 0 ? -1 : 0;
}

int store_count_category(store *s, const char *cat, size_t len, uint64_t from, uint64_t *n,
                         tm_err *err) {
    return index_count(s, K_CAT, cat, len, from, n, err);
}

int store_count_type(store *s, const char *type, size_t len, uint64_t from, uint64_t *n,
                     tm_err *err) {
    return index_count(s, K_TYPE, type, len, from, n, err);
}

static const char *iter_name(store_iter *it, size_t *len) {
    *len = it->prefix.len - 2;
    return it->prefix.ptr + 1;
}

/* Open the block under it->it into it->b: 1, 0 (no log key there), -1. */
static int iter_block(store_iter *it, tm_err *err) {
    it->bok = 0;
    if (!leveldb_iter_valid(it->it)) return 0;
    size_t kl, vl;
    const char *k = leveldb_iter_key(it->it, &kl);
    const char *v = leveldb_iter_value(it->it, &vl);
    int r = blk_open(&it->b, it->s->kev, it->s->blocks, k, kl, v, vl);
    if (r < 0) return bad_block(err, get_be64(k + 1));
    it->bok = r;
    return r;
}

/* Move the log iterator onto pos (it->b.rec = its record).  0 / -1. */
static int locate(store_iter *it, uint64_t pos, tm_err *err) {
    blk *b = &it->b;
    int on = it->bok && leveldb_iter_valid(it->it);
    int there = on && pos >= b->first && pos <= b->last;
    /* sequential reads: step to the neighbouring block instead of seeking.
     * Landing on the block that holds pos means any block LevelDB skipped
     * on the way (unreadable, its error recorded) held only positions this
     * read does not want (all_step relies on the same) */
    if (!there && on && pos > b->last && pos - b->last <= BLOCK_MAX_EVENTS) {
        leveldb_iter_next(it->it);
        if (iter_block(it, err) < 0) return -1;
        there = it->bok && pos >= b->first && pos <= b->last;
    } else if (!there && on && pos < b->first && b->first - pos <= BLOCK_MAX_EVENTS) {
        leveldb_iter_prev(it->it);
        if (iter_block(it, err) < 0) return -1;
        there = it->bok && pos >= b->first && pos <= b->last;
    }
    if (there) return blk_seek(b, pos) < 0 ? bad_block(err, pos) : 0;
    int r = log_seek(it->s, it->it, pos, b, err);
    it->bok = r == 1;
    if (r < 0) return -1;
    if (r == 0)
        return err_set(err, TM_EIO, "corrupt store: position %llu is missing from the log",
                       (unsigned long long)pos);
    return 0;
}

/* locate, then decode the record into ev.  0 / -1. */
static int fetch(store_iter *it, uint64_t pos, tm_event *ev, tm_err *err) {
    if (locate(it, pos, err) < 0) return -1;
    if (record_decode(it->b.rec, it->b.reclen, ev, err) < 0)
        return err_prefix(err, "position %llu", (unsigned long long)pos);
    ev->position = pos;
    return 0;
}

/* A log read's next position: it->b.rec on its record, *pos = it.
 * 1, 0 at the end, -1. */
static int all_step(store_iter *it, uint64_t *pos, tm_err *err) {
    if (it->backward ? it->next == 0 : it->next > it->hi) return 0;
    if (!it->backward && it->started && it->bok) {
        /* a forward scan: the next record of the block, or the first of
         * the next block (anything else: locate decides) */
        blk *b = &it->b;
        int r = 0;
        if (b->cur + 1 == it->next && b->cur < b->last) r = blk_step(b);
        else if (b->cur + 1 == it->next) {
            leveldb_iter_next(it->it);
            if (iter_block(it, err) < 0) return -1;
            if (it->bok && b->first == it->next) r = blk_step(b);
        }
        if (r < 0) return bad_block(err, it->next);
        if (r == 1) {
            *pos = it->next++;
            return 1;
        }
    }
    it->started = !it->backward;
    if (locate(it, it->next, err) < 0) return -1;
    *pos = it->next;
    if (it->backward) it->next--;
    else it->next++;
    return 1;
}

static int next_all(store_iter *it, tm_event *ev, tm_err *err) {
    uint64_t pos;
    int r = all_step(it, &pos, err);
    if (r <= 0) return r;
    if (record_decode(it->b.rec, it->b.reclen, ev, err) < 0)
        return err_prefix(err, "position %llu", (unsigned long long)pos);
    ev->position = pos;
    return 1;
}

static int bad_run(store_iter *it, tm_err *err) {
    size_t nl;
    const char *name = iter_name(it, &nl);
    const char *what = it->kind == IT_STREAM ? "stream" : it->kind == IT_CAT ? "category" : "type";
    return err_set(err, TM_EIO, "corrupt store: %s index for '%.*s' is broken at %s %llu", what,
                   (int)nl, name, it->kind == IT_STREAM ? "version" : "position",
                   (unsigned long long)it->run_first);
}

/* Load the run under it->ix (must match the prefix): 1 loaded, 0 not ours, -1. */
static int load_run(store_iter *it, tm_err *err) {
    /* checked even when valid: LevelDB's iterator steps over a block it
     * cannot read (recording the error) and lands on a later key */
    if (iter_status(it->ix, err) < 0) return -1;
    if (!leveldb_iter_valid(it->ix)) return 0;
    size_t kl, vl;
    const char *k = leveldb_iter_key(it->ix, &kl);
    if (kl != it->prefix.len + 8 || memcmp(k, it->prefix.ptr, it->prefix.len) != 0) return 0;
    it->run_first = buf_get_be64(k + it->prefix.len);
    const char *v = leveldb_iter_value(it->ix, &vl);
    if (run_decode(v, vl, &it->run) < 0 || it->run.n == 0) return bad_run(it, err);
    if (it->kind != IT_STREAM && it->run.v[0] != it->run_first) return bad_run(it, err);
    return 1;
}

/* Position on the first run to read.  1 / 0 (nothing) / -1. */
static int index_start(store_iter *it, tm_err *err) {
    uint64_t target = it->from, first;
    int r = run_seek_le(it->ix, &it->kb, it->prefix.ptr, it->prefix.len, target, &first, err);
    if (r < 0) return -1;
    if (r == 0) {
        if (it->backward) return 0;
        /* nothing at or below `from`: the first run after it, if ours */
        buf_reset(&it->kb);
        buf_append(&it->kb, it->prefix.ptr, it->prefix.len);
        buf_put_be64(&it->kb, target);
        leveldb_iter_seek(it->ix, it->kb.ptr, it->kb.len);
        r = load_run(it, err);
        if (r <= 0) return r;
        if (it->kind == IT_STREAM && it->run_first != 0) return bad_run(it, err);
        it->ri = 0;
        it->next = it->run_first;
        return 1;
    }
    if ((r = load_run(it, err)) <= 0) return r;
    if (it->kind == IT_STREAM) {
        uint64_t end = it->run_first + it->run.n; /* one past the run's last version */
        if (it->backward) {
            uint64_t v = target < end ? target : end - 1;
            it->ri = (size_t)(v - it->run_first) + 1; /* entries left, counting down */
            it->next = v;
            return 1;
        }
        if (target >= end) {
            /* from is past this run: the next run must start exactly at end */
            leveldb_iter_next(it->ix);
            r = load_run(it, err);
            if (r <= 0) return r;
            if (it->run_first != end) return bad_run(it, err);
            it->ri = 0;
            it->next = end;
            return 1;
        }
        it->ri = (size_t)(target - it->run_first);
        it->next = target;
        return 1;
    }
    /* category / type, forward: skip entries below from */
    size_t i = 0;
    while (i < it->run.n && it->run.v[i] < target) i++;
    it->ri = i;
    it->lastpos = 0;
    return 1;
}

static int check_match(store_iter *it, tm_event *ev, uint64_t pos, tm_err *err) {
    size_t nl;
    const char *name = iter_name(it, &nl);
    int ok;
    if (it->kind == IT_STREAM)
        ok = ev->stream_len == nl && memcmp(ev->stream, name, nl) == 0 && ev->version == it->next;
    else if (it->kind == IT_CAT)
        ok = event_category_len(ev->stream, ev->stream_len) == nl &&
             memcmp(ev->stream, name, nl) == 0;
    else ok = ev->type_len == nl && memcmp(ev->type, name, nl) == 0;
    if (ok) return 0;
    return err_set(err, TM_EIO, "corrupt store: the %s index for '%.*s' points at position %llu, "
                   "which holds another event", it->kind == IT_STREAM ? "stream"
                   : it->kind == IT_CAT ? "category" : "type", (int)nl, name,
                   (unsigned long long)pos);
}

static int next_index(store_iter *it, tm_event *ev, tm_err *err) {
    if (!it->started && it->kind != IT_STREAM) {
        it->started = 1;
        int r = index_start(it, err);
        if (r <= 0) {
            it->done = 1;
            return r;
        }
    }
    uint64_t pos;
    if (it->kind == IT_STREAM && it->backward) {
        if (it->ri == 0) {
            uint64_t first = it->run_first;
            if (first == 0) return 0;
            leveldb_iter_prev(it->ix);
            int r = load_run(it, err);
            if (r < 0) return -1;
            if (r == 0 || it->run_first + it->run.n != first) {
                it->run_first = first;
                return bad_run(it, err);
            }
            it->ri = it->run.n;
        }
        pos = it->run.v[--it->ri];
    } else {
        while (it->ri >= it->run.n) {
            uint64_t expect = it->run_first + it->run.n;
            leveldb_iter_next(it->ix);
            int r = load_run(it, err);
            if (r <= 0) return r;
            if (it->kind == IT_STREAM && it->run_first != expect) return bad_run(it, err);
            it->ri = 0;
        }
        pos = it->run.v[it->ri++];
        if (it->kind != IT_STREAM) {
            if (pos <= it->lastpos) return bad_run(it, err);
            it->lastpos = pos;
        }
    }
    if (pos > it->hi) return 0; /* cannot happen with a consistent snapshot */
    if (fetch(it, pos, ev, err) < 0) return -1;
    if (check_match(it, ev, pos, err) < 0) return -1;
    if (it->kind == IT_STREAM) {
        if (it->backward) it->next--;
        else it->next++;
    }
    return 1;
}

/* ---- stream reads: folded runs, then the journal ---- */

static int bad_journal(store_iter *it, uint64_t at, tm_err *err) {
    size_t nl;
    const char *name = iter_name(it, &nl);
    return err_set(err, TM_EIO, "corrupt store: stream journal for '%.*s' is broken at %llu",
                   (int)nl, name, (unsigned long long)at);
}

/* Fold mark and folded head of the stream in the snapshot. */
static int stream_prepare(store_iter *it, tm_err *err) {
    int rc;
    it->folded = read_folded(it->s, it->ro, err, &rc);
    if (rc < 0) return -1;
    size_t nl;
    const char *name = iter_name(it, &nl);
    buf pb = BUF_INIT;
    int64_t head = -1;
    int r = db_stream_head(it->ix, &it->kb, &pb, name, nl, &it->run, &head, err);
    buf_free(&pb);
    if (r < 0) return -1;
    it->hf = r == 1 ? head : -1;
    it->jexpect = (uint64_t)(it->hf + 1);
    return 0;
}

/* The stream's next journal entry into jpos.  1 / 0 (end) / -1. */
static int journal_next(store_iter *it, tm_err *err) {
    if (!it->jx) {
        it->jx = leveldb_create_iterator(it->s->db, it->ro);
        unsigned char k[9];
        k[0] = K_JOURNAL;
        put_be64(k + 1, it->folded + 1);
        leveldb_iter_seek(it->jx, (const char *)k, 9);
    } else leveldb_iter_next(it->jx);
    size_t nl;
    const char *name = iter_name(it, &nl);
    for (; leveldb_iter_valid(it->jx); leveldb_iter_next(it->jx)) {
        size_t kl, vl;
        const char *k = leveldb_iter_key(it->jx, &kl);
        if (k[0] != K_JOURNAL || kl != 9) break;
        const char *v = leveldb_iter_value(it->jx, &vl);
        jent e;
        int r = jval_find(v, vl, name, nl, &e);
        if (r < 0) return bad_journal(it, buf_get_be64(k + 1), err);
        if (r == 0) continue;
        it->jpos.n = 0;
        if (jent_positions(&e, &it->jpos) < 0) return bad_journal(it, buf_get_be64(k + 1), err);
        if (e.first != it->jexpect) return bad_journal(it, e.first, err);
        it->jfirst = e.first;
        it->jexpect = e.first + e.n;
        it->ji = 0;
        return 1;
    }
    return iter_status(it->jx, err) < 0 ? -1 : 0;
}

static int emit_stream(store_iter *it, uint64_t pos, uint64_t ver, tm_event *ev, tm_err *err) {
    it->next = ver;
    if (fetch(it, pos, ev, err) < 0) return -1;
    if (check_match(it, ev, pos, err) < 0) return -1;
    return 1;
}

static int next_stream_fwd(store_iter *it, tm_event *ev, tm_err *err) {
    if (!it->started) {
        it->started = 1;
        if (stream_prepare(it, err) < 0) return -1;
        it->phase = 1;
        if (it->hf >= 0 && it->from <= (uint64_t)it->hf) {
            int r = index_start(it, err);
            if (r < 0) return -1;
            if (r == 1) it->phase = 0;
        }
    }
    if (it->phase == 0) {
        int r = next_index(it, ev, err);
        if (r != 0) return r;
        it->phase = 1; /* the folded runs are done */
    }
    for (;;) {
        while (it->ji >= it->jpos.n) {
            int r = journal_next(it, err);
            if (r <= 0) return r;
        }
        uint64_t ver = it->jfirst + it->ji, pos = it->jpos.v[it->ji++];
        if (ver < it->from) continue;
        return emit_stream(it, pos, ver, ev, err);
    }
}

static int next_stream_bwd(store_iter *it, tm_event *ev, tm_err *err) {
    if (!it->started) {
        it->started = 1;
        if (stream_prepare(it, err) < 0) return -1;
        int r;
        while ((r = journal_next(it, err)) == 1)
            for (size_t i = 0; i < it->jpos.n; i++) u64vec_push(&it->jall, it->jpos.v[i]);
        if (r < 0) return -1;
        uint64_t base = (uint64_t)(it->hf + 1); /* version of jall.v[0] */
        it->phase = 0;
        if (it->jall.n && it->from >= base) {
            uint64_t top = base + it->jall.n - 1, v = it->from < top ? it->from : top;
            it->ji = (size_t)(v - base) + 1;
            it->phase = 1;
        }
        if (it->phase == 0) {
            if (it->hf < 0) return 0;
            if (it->from > (uint64_t)it->hf) it->from = (uint64_t)it->hf;
            if ((r = index_start(it, err)) <= 0) return r;
        }
    }
    if (it->phase == 1) {
        if (it->ji > 0) {
            it->ji--;
            return emit_stream(it, it->jall.v[it->ji], (uint64_t)(it->hf + 1) + it->ji, ev, err);
        }
        if (it->hf < 0) return 0;
        it->phase = 0;
        it->from = (uint64_t)it->hf;
        int r = index_start(it, err);
        if (r <= 0) return r;
    }
    return next_index(it, ev, err);
}

int store_iter_next(store_iter *it, tm_event *ev, tm_err *err) {
    if (it->done) return 0;
    if (it->limit && it->count >= it->limit) return 0;
    int r = it->kind == IT_ALL      ? next_all(it, ev, err)
            : it->kind != IT_STREAM ? next_index(it, ev, err)
            : it->backward          ? next_stream_bwd(it, ev, err)
                                    : next_stream_fwd(it, ev, err);
    if (r == 1) it->count++;
    else if (r == 0) it->done = 1;
    return r;
}

int store_stream_version(store *s, const char *stream, size_t len, int64_t *version, tm_err *err) {
    store_iter *it = store_read_stream(s, stream, len, 0, 0, 0, err);
    if (!it) return -1;
    int r = stream_prepare(it, err);
    int64_t head = it->hf;
    if (r == 0)
        while ((r = journal_next(it, err)) == 1) head = (int64_t)(it->jexpect - 1);
    store_iter_free(it);
    if (r < 0) return -1;
    if (head < 0) return 0;
    *version = head;
    return 1;
}

int store_iter_next_record(store_iter *it, uint64_t *pos, const char **rec, size_t *len,
                           tm_err *err) {
    int r;
    if (it->kind == IT_ALL) {
        if (it->done || (it->limit && it->count >= it->limit)) return 0;
        r = all_step(it, pos, err);
        if (r == 1) it->count++;
        else if (r == 0) it->done = 1;
    } else {
        tm_event ev;
        r = store_iter_next(it, &ev, err);
        if (r == 1) *pos = ev.position;
    }
    if (r == 1) {
        *rec = it->b.rec;
        *len = it->b.reclen;
    }
    return r;
}

void store_iter_record(store_iter *it, const char **rec, size_t *len) {
    *rec = it->b.rec;
    *len = it->b.reclen;
}

/* ---- names ---- */

static int name_cmp(const char *a, size_t al, const char *b, size_t bl) {
    int c = memcmp(a, b, al < bl ? al : bl);
    return c ? c : (al < bl ? -1 : al > bl);
}

static int node_cmp(const void *x, const void *y) {
    const node *a = *(node *const *)x, *b = *(node *const *)y;
    return name_cmp(a->key, a->klen, b->key, b->klen);
}

/* Streams above the fold mark with their heads, sorted by name (m owns them). */
static node **journal_names(store *s, const leveldb_readoptions_t *ro, nmap *m, size_t *n,
                            tm_err *err) {
    int rc;
    uint64_t folded = read_folded(s, ro, err, &rc);
    if (rc < 0) return NULL;
    leveldb_iterator_t *it = leveldb_create_iterator(s->db, ro);
    unsigned char k[9];
    k[0] = K_JOURNAL;
    put_be64(k + 1, folded + 1);
    rc = 0;
    for (leveldb_iter_seek(it, (const char *)k, 9); leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t kl, vl;
        const char *kk = leveldb_iter_key(it, &kl);
        if (kk[0] != K_JOURNAL) break;
        const char *v = leveldb_iter_value(it, &vl), *p = v + 4, *end = v + vl;
        jent e;
        int r = crc_ok(v, vl) ? 1 : -1;
        while (r == 1 && (r = jent_next(&p, end, &e)) == 1) {
            uint64_t h = hash_bytes(e.name, e.nl);
            node *nd = nmap_find(m, e.name, e.nl, h);
            if (!nd) nd = nmap_add(m, e.name, e.nl, h);
            nd->head = (int64_t)(e.first + e.n - 1);
        }
        if (r < 0) {
            rc = err_set(err, TM_EIO, "corrupt store: stream journal at position %llu is damaged",
                         (unsigned long long)buf_get_be64(kk + 1));
            break;
        }
    }
    if (rc == 0 && iter_status(it, err) < 0) rc = -1;
    leveldb_iter_destroy(it);
    if (rc < 0) return NULL;
    node **arr = malloc((m->count + 1) * sizeof *arr);
    if (!arr) tm_oom();
    *n = 0;
    for (size_t b = 0; b < m->cap; b++)
        for (node *nd = m->tab[b]; nd; nd = nd->next) arr[(*n)++] = nd;
    qsort(arr, *n, sizeof *arr, node_cmp);
    return arr;
}

int store_list_streams(store *s, const char *after, size_t alen, uint64_t limit,
                       store_name_fn fn, void *ud, tm_err *err) {
    const leveldb_snapshot_t *snap = leveldb_create_snapshot(s->db);
    leveldb_readoptions_t *ro = leveldb_readoptions_create();
    leveldb_readoptions_set_verify_checksums(ro, 1);
    leveldb_readoptions_set_snapshot(ro, snap);
    nmap jm = {0};
    size_t nj = 0, ji = 0;
    node **jarr = journal_names(s, ro, &jm, &nj, err);
    int rc = jarr ? 0 : -1;
    leveldb_iterator_t *it = leveldb_create_iterator(s->db, ro);
    buf kb = BUF_INIT, name = BUF_INIT, pb = BUF_INIT;
    u64vec tmp = {0};
    uint64_t count = 0;
    if (after)
        while (ji < nj && name_cmp(jarr[ji]->key, jarr[ji]->klen, after, alen) <= 0) ji++;
    buf_putc(&kb, K_STREAM);
    if (after) {
        buf_append(&kb, after, alen);
        buf_putc(&kb, '\x01');
    }
    leveldb_iter_seek(it, kb.ptr, kb.len);
    while (rc == 0) {
        size_t kl = 0;
        const char *k = leveldb_iter_valid(it) ? leveldb_iter_key(it, &kl) : NULL;
        int have_s = k && kl >= 10 && k[0] == K_STREAM;
        if (!have_s && ji == nj) break;
        int c = !have_s ? 1 : ji == nj ? -1 : name_cmp(k + 1, kl - 10, jarr[ji]->key, jarr[ji]->klen);
        int64_t head = -1;
        buf_reset(&name);
        if (c > 0) {
            buf_append(&name, jarr[ji]->key, jarr[ji]->klen);
            head = jarr[ji++]->head;
        } else {
            buf_append(&name, k + 1, kl - 10);
            if (db_stream_head(it, &kb, &pb, name.ptr, name.len, &tmp, &head, err) < 0) {
                rc = -1;
                break;
            }
            if (c == 0) head = jarr[ji++]->head;
            buf_reset(&kb);
            buf_putc(&kb, K_STREAM);
            buf_append(&kb, name.ptr, name.len);
            buf_putc(&kb, '\x01');
            leveldb_iter_seek(it, kb.ptr, kb.len);
        }
        if (fn(ud, name.ptr, name.len, head)) break;
        if (limit && ++count >= limit) break;
    }
    if (rc == 0 && iter_status(it, err) < 0) rc = -1;
    leveldb_iter_destroy(it);
    leveldb_readoptions_destroy(ro);
    leveldb_release_snapshot(s->db, snap);
    free(jarr);
    nmap_clear(&jm);
    buf_free(&kb);
    buf_free(&name);
    buf_free(&pb);
    free(tmp.v);
    return rc;
}

/* The version passed for a category is -1 (categories have no version). */
int store_list_categories(store *s, store_name_fn fn, void *ud, tm_err *err) {
    leveldb_iterator_t *it = leveldb_create_iterator(s->db, s->ro);
    buf kb = BUF_INIT;
    int rc = 0;
    leveldb_iter_seek(it, "c", 1);
    while (leveldb_iter_valid(it)) {
        size_t kl;
        const char *k = leveldb_iter_key(it, &kl);
        if (kl < 10 || k[0] != K_CAT) break;
        buf_reset(&kb);
        buf_append(&kb, k, kl - 9);
        if (fn(ud, kb.ptr + 1, kb.len - 1, -1)) break;
        buf_putc(&kb, '\x01');
        leveldb_iter_seek(it, kb.ptr, kb.len);
    }
    if (iter_status(it, err) < 0) rc = -1;
    leveldb_iter_destroy(it);
    buf_free(&kb);
    return rc;
}

/* ------------------------------------------------------------------ */
/* check                                                               */

typedef struct check {
    store *s;
    FILE *out;
    store_check_report *rep;
    leveldb_readoptions_t *ro;
    leveldb_iterator_t *ev;  /* random access to records */
    nmap streams, cats, types; /* name -> count of events in the log (in node->head) */
} check;

static void problem(check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(check *c, const char *fmt, ...) {
    c->rep->problems++;
    if (!c->out) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(c->out, fmt, ap);
    va_end(ap);
    fputc('\n', c->out);
}

static void count_name(nmap *m, const char *k, size_t kl) {
    uint64_t h = hash_bytes(k, kl);
    node *n = nmap_find(m, k, kl, h);
    if (!n) {
        n = nmap_add(m, k, kl, h);
        n->head = 0;
    }
    n->head++;
}

/* Read the record at pos via c->ev: 1 decoded, 0 missing/corrupt (reported), -1 error. */
static int check_fetch(check *c, uint64_t pos, tm_event *ev) {
    blk b;
    tm_err e;
    if (log_seek(c->s, c->ev, pos, &b, &e) != 1) return 0;
    if (record_decode(b.rec, b.reclen, ev, &e) < 0) return 0;
    return 1;
}

/* Per-name check state lives in the counts map's nodes:
 *   head  = events of that name in the log (from the log scan)
 *   gen   = index entries seen;  ghead = 1 once seen in the index
 *   first = the next version a stream run / journal entry must start at
 *   pfirst = the last position seen (categories, types) */
static node *cnode(nmap *m, const char *k, size_t kl) {
    uint64_t h = hash_bytes(k, kl);
    node *n = nmap_find(m, k, kl, h);
    if (!n) {
        n = nmap_add(m, k, kl, h);
        n->head = 0;
    }
    return n;
}

static void check_entry(check *c, char tag, const char *what, node *n, uint64_t ver,
                        uint64_t pos) {
    n->gen++;
    if (tag != K_STREAM) {
        if (pos <= n->pfirst)
            problem(c, "%s '%.*s': positions not increasing (%llu after %llu)", what,
                    (int)n->klen, n->key, (unsigned long long)pos, (unsigned long long)n->pfirst);
        n->pfirst = pos;
    }
    tm_event ev;
    if (!check_fetch(c, pos, &ev)) {
        problem(c, "%s '%.*s': entry points at position %llu, which is missing or corrupt", what,
                (int)n->klen, n->key, (unsigned long long)pos);
        return;
    }
    int ok;
    if (tag == K_STREAM)
        ok = ev.stream_len == n->klen && memcmp(ev.stream, n->key, n->klen) == 0 &&
             ev.version == ver;
    else if (tag == K_CAT)
        ok = event_category_len(ev.stream, ev.stream_len) == n->klen &&
             memcmp(ev.stream, n->key, n->klen) == 0;
    else ok = ev.type_len == n->klen && memcmp(ev.type, n->key, n->klen) == 0;
    if (ok) return;
    if (tag == K_STREAM)
        problem(c, "stream '%.*s': version %llu points at position %llu, which holds '%.*s' "
                "version %llu", (int)n->klen, n->key, (unsigned long long)ver,
                (unsigned long long)pos, (int)ev.stream_len, ev.stream,
                (unsigned long long)ev.version);
    else
        problem(c, "%s '%.*s': entry points at position %llu, which is not in it", what,
                (int)n->klen, n->key, (unsigned long long)pos);
}

static void seen(node *n, uint64_t *names) {
    if (n->ghead != 1) {
        n->ghead = 1;
        (*names)++;
    }
}

/* Verify every run of one index tag. */
static int check_index(check *c, char tag, nmap *counts, const char *what, uint64_t *names) {
    leveldb_iterator_t *it = leveldb_create_iterator(c->s->db, c->ro);
    u64vec run = {0};
    char t[2] = {tag, 0};
    for (leveldb_iter_seek(it, t, 1); leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t kl, vl;
        const char *k = leveldb_iter_key(it, &kl);
        if (k[0] != tag) break;
        if (kl < 11 || k[kl - 9] != '\0') {
            problem(c, "%s index: malformed key", what);
            continue;
        }
        node *n = cnode(counts, k + 1, kl - 10);
        seen(n, names);
        uint64_t first = buf_get_be64(k + kl - 8);
        const char *v = leveldb_iter_value(it, &vl);
        if (run_decode(v, vl, &run) < 0 || run.n == 0) {
            problem(c, "%s '%.*s': corrupt index entry at %llu", what, (int)n->klen, n->key,
                    (unsigned long long)first);
            continue;
        }
        if (tag == K_STREAM) {
            if (first != n->first)
                problem(c, "stream '%.*s': versions jump from %llu to %llu", (int)n->klen, n->key,
                        (unsigned long long)n->first, (unsigned long long)first);
            n->first = first + run.n;
        } else if (run.v[0] != first) {
            problem(c, "%s '%.*s': index key %llu does not match its first position %llu", what,
                    (int)n->klen, n->key, (unsigned long long)first, (unsigned long long)run.v[0]);
        }
        for (size_t i = 0; i < run.n; i++) check_entry(c, tag, what, n, first + i, run.v[i]);
    }
    int rc = iter_status(it, NULL) < 0 ? -1 : 0;
    leveldb_iter_destroy(it);
    free(run.v);
    return rc;
}

/* The stream journal above the fold mark continues the folded runs. */
static int check_journal(check *c, nmap *counts, uint64_t folded, uint64_t *names) {
    leveldb_iterator_t *it = leveldb_create_iterator(c->s->db, c->ro);
    u64vec pos = {0};
    for (leveldb_iter_seek(it, "g", 1); leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t kl, vl;
        const char *k = leveldb_iter_key(it, &kl);
        if (k[0] != K_JOURNAL) break;
        uint64_t at = kl == 9 ? buf_get_be64(k + 1) : 0;
        if (at <= folded) {
            problem(c, "stream journal key at position %llu is below the fold mark %llu",
                    (unsigned long long)at, (unsigned long long)folded);
            continue;
        }
        const char *v = leveldb_iter_value(it, &vl), *p = v + 4, *end = v + vl;
        jent e;
        int r = crc_ok(v, vl) ? 1 : -1;
        while (r == 1 && (r = jent_next(&p, end, &e)) == 1) {
            node *n = cnode(counts, e.name, e.nl);
            seen(n, names);
            if (e.first != n->first)
                problem(c, "stream '%.*s': versions jump from %llu to %llu (journal at %llu)",
                        (int)n->klen, n->key, (unsigned long long)n->first,
                        (unsigned long long)e.first, (unsigned long long)at);
            pos.n = 0;
            if (jent_positions(&e, &pos) < 0) {
                r = -1;
                break;
            }
            for (size_t i = 0; i < pos.n; i++) check_entry(c, K_STREAM, "stream", n, e.first + i, pos.v[i]);
            n->first = e.first + e.n;
        }
        if (r < 0) problem(c, "stream journal at position %llu is corrupt", (unsigned long long)at);
    }
    int rc = iter_status(it, NULL) < 0 ? -1 : 0;
    leveldb_iter_destroy(it);
    free(pos.v);
    return rc;
}

/* Both directions: every name's index count equals its count in the log. */
static void check_counts(check *c, nmap *counts, const char *what) {
    for (size_t b = 0; b < counts->cap; b++)
        for (node *n = counts->tab[b]; n; n = n->next)
            if ((uint64_t)n->head != n->gen)
                problem(c, "%s '%.*s': the index has %llu entries, the log has %lld events", what,
                        (int)n->klen, n->key, (unsigned long long)n->gen, (long long)n->head);
}

static int check_ids(check *c) {
    leveldb_iterator_t *it = leveldb_create_iterator(c->s->db, c->ro);
    leveldb_iter_seek(it, "i", 1);
    for (; leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t kl, vl;
        const char *k = leveldb_iter_key(it, &kl);
        if (k[0] != K_ID) break;
        const char *v = leveldb_iter_value(it, &vl), *p = v;
        uint64_t pos;
        char ids[37] = "?";
        if (kl == 17) event_id_format((const uint8_t *)k + 1, ids);
        if (kl != 17 || buf_get_varint(&p, v + vl, &pos) < 0 || p != v + vl) {
            problem(c, "id index: malformed entry for %s", ids);
            continue;
        }
        tm_event ev;
        if (!check_fetch(c, pos, &ev)) {
            problem(c, "id %s: points at position %llu, which is missing or corrupt", ids,
                    (unsigned long long)pos);
            continue;
        }
        if (memcmp(ev.id, k + 1, 16) != 0)
            problem(c, "id %s: points at position %llu, which holds another id", ids,
                    (unsigned long long)pos);
    }
    int rc = iter_status(it, NULL) < 0 ? -1 : 0;
    leveldb_iter_destroy(it);
    return rc;
}

/* One event's id: generated ids must name their own position, others need
 * an 'i' entry pointing here. */
static void check_event_id(check *c, const tm_event *ev, uint64_t pos) {
    if (gen_id_pos(ev->id) == pos) {
        c->rep->ids++;
        return;
    }
    char ik[17], *v;
    size_t vl;
    ik[0] = K_ID;
    memcpy(ik + 1, ev->id, 16);
    char ids[37];
    event_id_format(ev->id, ids);
    tm_err e;
    int r = db_get(c->s, c->ro, ik, 17, &v, &vl, &e);
    if (r <= 0) {
        problem(c, "position %llu: id %s is not in the id index", (unsigned long long)pos, ids);
        return;
    }
    const char *p = v;
    uint64_t at = 0;
    buf_get_varint(&p, v + vl, &at);
    leveldb_free(v);
    if (at != pos)
        problem(c, "position %llu: id %s is indexed at position %llu", (unsigned long long)pos,
                ids, (unsigned long long)at);
    else c->rep->ids++;
}

int store_check(store *s, FILE *out, store_check_report *report, tm_err *err) {
    store_check_report dummy;
    if (!report) report = &dummy;
    memset(report, 0, sizeof *report);
    check c = {.s = s, .out = out, .rep = report};
    uint64_t last = load_last(s);
    const leveldb_snapshot_t *snap = leveldb_create_snapshot(s->db);
    c.ro = leveldb_readoptions_create();
    leveldb_readoptions_set_verify_checksums(c.ro, 1);
    leveldb_readoptions_set_snapshot(c.ro, snap);
    c.ev = leveldb_create_iterator(s->db, c.ro);
    int rc = 0;

    /* the log */
    leveldb_iterator_t *it = leveldb_create_iterator(s->db, c.ro);
    unsigned char k0[9];
    event_key(k0, s->kev, 0);
    leveldb_iter_seek(it, (const char *)k0, 9);
    uint64_t expect = 1;
    for (; leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t kl, vl;
        const char *k = leveldb_iter_key(it, &kl);
        if (k[0] != s->kev) break;
        if (kl != 9) {
            problem(&c, "log: malformed key");
            continue;
        }
        const char *v = leveldb_iter_value(it, &vl);
        blk b;
        if (blk_open(&b, s->kev, s->blocks, k, kl, v, vl) < 0) {
            uint64_t at = buf_get_be64(k + 1);
            problem(&c, "log: malformed block at position %llu", (unsigned long long)at);
            expect = at + 1;
            continue;
        }
        if (b.first != expect) {
            if (b.first > expect)
                problem(&c, "log: positions %llu..%llu are missing", (unsigned long long)expect,
                        (unsigned long long)(b.first - 1));
            else problem(&c, "log: position %llu out of order", (unsigned long long)b.first);
        }
        expect = b.last + 1;
        int r;
        while ((r = blk_step(&b)) == 1) {
            tm_event ev;
            tm_err e;
            if (record_decode(b.rec, b.reclen, &ev, &e) < 0) {
                problem(&c, "position %llu: %s", (unsigned long long)b.cur, e.msg);
                continue;
            }
            report->events++;
            count_name(&c.streams, ev.stream, ev.stream_len);
            count_name(&c.cats, ev.stream, event_category_len(ev.stream, ev.stream_len));
            count_name(&c.types, ev.type, ev.type_len);
            check_event_id(&c, &ev, b.cur);
        }
        if (r < 0)
            problem(&c, "log: malformed block at position %llu", (unsigned long long)(b.cur + 1));
        else if (b.p != b.end && !b.bare)
            problem(&c, "log: stray bytes after position %llu", (unsigned long long)b.last);
    }
    if (iter_status(it, err) < 0) rc = -1;
    leveldb_iter_destroy(it);
    if (expect - 1 != last)
        problem(&c, "log: the last position is %llu but the store records %llu",
                (unsigned long long)(expect - 1), (unsigned long long)last);

    int frc = 0;
    uint64_t folded = rc == 0 ? read_folded(s, c.ro, err, &frc) : 0;
    if (frc < 0) rc = -1;
    if (rc == 0 && (check_index(&c, K_STREAM, &c.streams, "stream", &report->streams) < 0 ||
                    check_journal(&c, &c.streams, folded, &report->streams) < 0 ||
                    check_index(&c, K_CAT, &c.cats, "category", &report->categories) < 0 ||
                    check_index(&c, K_TYPE, &c.types, "type", &report->types) < 0 ||
                    check_ids(&c) < 0))
        rc = err_set(err, TM_EIO, "check: read error");
    if (rc == 0) {
        check_counts(&c, &c.streams, "stream");
        check_counts(&c, &c.cats, "category");
        check_counts(&c, &c.types, "type");
    }

    /* unknown namespaces: visit the first key of each first byte */
    if (rc == 0) {
        it = leveldb_create_iterator(s->db, c.ro);
        leveldb_iter_seek_to_first(it);
        while (leveldb_iter_valid(it)) {
            size_t kl;
            const char *k = leveldb_iter_key(it, &kl);
            unsigned char tag = (unsigned char)k[0];
            if (tag != (unsigned char)s->kev && (!tag || !strchr("isctmpg", tag)))
                problem(&c, "unknown key namespace 0x%02x", tag);
            if (tag == 0xff) break;
            unsigned char nx = (unsigned char)(tag + 1);
            leveldb_iter_seek(it, (const char *)&nx, 1);
        }
        leveldb_iter_destroy(it);
    }

    leveldb_iter_destroy(c.ev);
    leveldb_readoptions_destroy(c.ro);
    leveldb_release_snapshot(s->db, snap);
    nmap_clear(&c.streams);
    nmap_clear(&c.cats);
    nmap_clear(&c.types);
    return rc;
}

/* ------------------------------------------------------------------ */
/* projection key-value namespace                                      */

struct store_batch {
    leveldb_writebatch_t *wb;
    buf key;
};

struct store_kv_iter {
    store *s;
    leveldb_iterator_t *it;
    const leveldb_snapshot_t *snap;
    leveldb_readoptions_t *ro;
    buf prefix;
    int started;
};

static const char *pkey(buf *b, const char *k, size_t kl) {
    buf_reset(b);
    buf_putc(b, K_PROJ);
    buf_append(b, k, kl);
    return b->ptr;
}

store_batch *store_batch_new(void) {
    store_batch *b = calloc(1, sizeof *b);
    if (!b) tm_oom();
    b->wb = leveldb_writebatch_create();
    return b;
}

void store_batch_put(store_batch *b, const char *k, size_t kl, const char *v, size_t vl) {
    pkey(&b->key, k, kl);
    leveldb_writebatch_put(b->wb, b->key.ptr, b->key.len, v, vl);
}

void store_batch_del(store_batch *b, const char *k, size_t kl) {
    pkey(&b->key, k, kl);
    leveldb_writebatch_delete(b->wb, b->key.ptr, b->key.len);
}

void store_batch_clear(store_batch *b) { leveldb_writebatch_clear(b->wb); }

int store_batch_commit(store *s, store_batch *b, tm_err *err) {
    pthread_mutex_lock(&s->mu);
    int failed = s->failed;
    pthread_mutex_unlock(&s->mu);
    if (failed) return refusing(err);
    char *lerr = NULL;
    leveldb_write(s->db, s->wo, b->wb, &lerr);
    if (lerr) {
        char why[256];
        snprintf(why, sizeof why, "%s", lerr);
        leveldb_free(lerr);
        set_failed(s, why);
        return err_set(err, TM_EIO, "write failed: %s; "
                       "store is refusing writes after a failed sync; reopen it", why);
    }
    return 0;
}

void store_batch_free(store_batch *b) {
    if (!b) return;
    leveldb_writebatch_destroy(b->wb);
    buf_free(&b->key);
    free(b);
}

int store_kv_get(store *s, const char *k, size_t kl, char **val, size_t *vl, tm_err *err) {
    buf kb = BUF_INIT;
    pkey(&kb, k, kl);
    char *v;
    int r = db_get(s, NULL, kb.ptr, kb.len, &v, vl, err);
    buf_free(&kb);
    if (r <= 0) return r;
    /* hand over a malloc'd copy (LevelDB's buffer is freed with leveldb_free) */
    *val = malloc(*vl ? *vl : 1);
    if (!*val) tm_oom();
    memcpy(*val, v, *vl);
    leveldb_free(v);
    return 1;
}

store_kv_iter *store_kv_scan(store *s, const char *prefix, size_t pl, const char *start,
                             size_t sl, tm_err *err) {
    store_kv_iter *it = calloc(1, sizeof *it);
    if (!it) tm_oom();
    it->s = s;
    it->snap = leveldb_create_snapshot(s->db);
    it->ro = leveldb_readoptions_create();
    leveldb_readoptions_set_verify_checksums(it->ro, 1);
    leveldb_readoptions_set_snapshot(it->ro, it->snap);
    it->it = leveldb_create_iterator(s->db, it->ro);
    buf_putc(&it->prefix, K_PROJ);
    buf_append(&it->prefix, prefix, pl);
    buf kb = BUF_INIT;
    if (start && (sl < pl || memcmp(start, prefix, pl) < 0)) start = NULL;
    if (start) pkey(&kb, start, sl);
    else buf_append(&kb, it->prefix.ptr, it->prefix.len);
    leveldb_iter_seek(it->it, kb.ptr, kb.len);
    buf_free(&kb);
    return it;
}

int store_kv_next(store_kv_iter *it, const char **k, size_t *kl, const char **v, size_t *vl,
                  tm_err *err) {
    if (it->started) leveldb_iter_next(it->it);
    it->started = 1;
    if (iter_status(it->it, err) < 0) return -1; /* a skipped unreadable block */
    if (!leveldb_iter_valid(it->it)) return 0;
    size_t n;
    const char *key = leveldb_iter_key(it->it, &n);
    if (n < it->prefix.len || memcmp(key, it->prefix.ptr, it->prefix.len) != 0) return 0;
    *k = key + 1;
    *kl = n - 1;
    *v = leveldb_iter_value(it->it, vl);
    return 1;
}

void store_kv_iter_free(store_kv_iter *it) {
    if (!it) return;
    leveldb_iter_destroy(it->it);
    leveldb_readoptions_destroy(it->ro);
    leveldb_release_snapshot(it->s->db, it->snap);
    buf_free(&it->prefix);
    free(it);
}

int store_kv_delete_prefix(store *s, const char *prefix, size_t pl, tm_err *err) {
    for (;;) {
        store_kv_iter *it = store_kv_scan(s, prefix, pl, NULL, 0, err);
        store_batch *b = store_batch_new();
        const char *k, *v;
        size_t kl, vl;
        int r, n = 0;
        while (n < 10000 && (r = store_kv_next(it, &k, &kl, &v, &vl, err)) == 1) {
            store_batch_del(b, k, kl);
            n++;
        }
        store_kv_iter_free(it);
        if (n > 0 && store_batch_commit(s, b, err) < 0) r = -1;
        store_batch_free(b);
        if (r < 0) return -1;
        if (n < 10000) return 0;
    }
}
