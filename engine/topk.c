/* topk.c — Space-Saving heavy hitters.
 *
 * Design (Metwally, Agrawal, El Abbadi, "Efficient Computation of Frequent
 * and Top-k Elements in Data Streams", ICDT 2005; weighted updates as in
 * Berinde et al. 2010):
 *  - Up to `capacity` monitored entries (key, count, error).  Adding weight
 *    w to a monitored key raises its count; an unmonitored key takes a free
 *    entry (error 0) or replaces the entry with the smallest count c_min:
 *    count = c_min + w, error = c_min.  Hence count overestimates the true
 *    weight by at most error <= c_min <= total/capacity, and any key heavier
 *    than total/capacity is always monitored.
 *  - Entries live in an array; a hash table (open addressing, linear
 *    probing, backward-shift deletion, keys hashed with skio_hash64) finds
 *    them, and a binary min-heap finds the entry to replace.  The heap
 *    orders by (count ascending, key descending): a TOTAL order, so the
 *    victim is the entry ranked last by topk_top (count descending, key
 *    ascending).  Behaviour therefore depends only on the entry set, never
 *    on hash layout: deterministic and canonical.
 *  - Merge (Cafaro, Pulimeno, Tempesta, "A parallel space saving algorithm
 *    for frequent items and the Hurwitz zeta distribution", 2016; Agarwal
 *    et al., "Mergeable summaries", 2012): a key missing from a full summary
 *    is charged that summary's minimum count (as count and as error); the
 *    union is cut back to the `capacity` heaviest.  Bounds add up: the
 *    result's errors are bounded by total(A+B)/capacity.
 * Memory: capacity x (48 bytes + key) + a 2-4x hash index of 4-byte slots.
 */
#include "topk.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "skio.h"

#define TOPK_SEED 0x746f706bULL

typedef struct entry {
    char *key;
    uint32_t len;
    uint32_t heap;   /* position in heap[] */
    double count, err;
} entry;

struct topk {
    unsigned k, cap;
    size_t n;        /* entries in use */
    entry *e;        /* [cap] */
    uint32_t *heap;  /* [cap] entry indexes, min-heap */
    uint32_t *slot;  /* [nslot] entry index + 1, 0 = empty */
    size_t nslot;    /* power of two >= 2 * cap */
    double total;
};

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz);
    if (!p) tm_oom();
    return p;
}

static int keycmp(const char *a, size_t al, const char *b, size_t bl) {
    int c = memcmp(a, b, al < bl ? al : bl);
    if (c) return c;
    return (al > bl) - (al < bl);
}

/* 1 if entry a must sit above b in the min-heap (a is "smaller"). */
static int heap_less(const topk *t, uint32_t a, uint32_t b) {
    const entry *x = &t->e[a], *y = &t->e[b];
    if (x->count != y->count) return x->count < y->count;
    return keycmp(x->key, x->len, y->key, y->len) > 0;
}

static void heap_swap(topk *t, size_t i, size_t j) {
    uint32_t a = t->heap[i], b = t->heap[j];
    t->heap[i] = b;
    t->heap[j] = a;
    t->e[b].heap = (uint32_t)i;
    t->e[a].heap = (uint32_t)j;
}

static void sift_up(topk *t, size_t i) {
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(t, t->heap[i], t->heap[p])) break;
        heap_swap(t, i, p);
        i = p;
    }
}

static void sift_down(topk *t, size_t i) {
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < t->n && heap_less(t, t->heap[l], t->heap[m])) m = l;
        if (r < t->n && heap_less(t, t->heap[r], t->heap[m])) m = r;
        if (m == i) return;
        heap_swap(t, i, m);
        i = m;
    }
}

static size_t slot_of(const topk *t, const char *key, size_t len, int *found) {
    size_t mask = t->nslot - 1, i = (size_t)skio_hash64(key, len, TOPK_SEED) & mask;
    for (;; i = (i + 1) & mask) {
        uint32_t s = t->slot[i];
        if (!s) {
            *found = 0;
            return i;
        }
        const entry *x = &t->e[s - 1];
        if (x->len == len && memcmp(x->key, key, len) == 0) {
            *found = 1;
            return i;
        }
    }
}

static void slot_delete(topk *t, size_t i) {
    size_t mask = t->nslot - 1, j = i;
    t->slot[i] = 0;
    for (;;) {
        j = (j + 1) & mask;
        uint32_t s = t->slot[j];
        if (!s) return;
        const entry *x = &t->e[s - 1];
        size_t home = (size_t)skio_hash64(x->key, x->len, TOPK_SEED) & mask;
        /* move s back to i unless its home lies cyclically in (i, j] */
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            t->slot[i] = s;
            t->slot[j] = 0;
            i = j;
        }
    }
}

topk *topk_new(unsigned k, unsigned capacity) {
    if (capacity < 1 || capacity > TOPK_MAX_CAPACITY || k < 1 || k > capacity) return NULL;
    topk *t = xcalloc(1, sizeof *t);
    t->k = k;
    t->cap = capacity;
    t->e = xcalloc(capacity, sizeof(entry));
    t->heap = xcalloc(capacity, sizeof(uint32_t));
    t->nslot = 4;
    while (t->nslot < 2 * (size_t)capacity) t->nslot *= 2;
    t->slot = xcalloc(t->nslot, sizeof(uint32_t));
    return t;
}

void topk_free(topk *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n; i++) free(t->e[i].key);
    free(t->e);
    free(t->heap);
    free(t->slot);
    free(t);
}

static char *dupkey(const char *key, size_t len) {
    char *k = xcalloc(len + 1, 1);
    memcpy(k, key, len);
    return k;
}

/* Insert a new entry (room must exist). */
static void insert(topk *t, size_t slot, const char *key, size_t len, double count, double err) {
    uint32_t idx = (uint32_t)t->n++;
    entry *x = &t->e[idx];
    x->key = dupkey(key, len);
    x->len = (uint32_t)len;
    x->count = count;
    x->err = err;
    x->heap = idx;
    t->heap[idx] = idx;
    t->slot[slot] = idx + 1;
    sift_up(t, idx);
}

int topk_add(topk *t, const char *key, size_t len, double w, tm_err *e) {
    if (!(w > 0) || !isfinite(w)) return err_set(e, TM_EINVAL, "topk: weight must be a positive finite number");
    if (len > TOPK_MAX_KEY) return err_set(e, TM_EINVAL, "topk: key longer than %d bytes", TOPK_MAX_KEY);
    int found;
    size_t s = slot_of(t, key, len, &found);
    t->total += w;
    if (found) {
        entry *x = &t->e[t->slot[s] - 1];
        x->count += w;
        sift_down(t, x->heap);
        return 0;
    }
    if (t->n < t->cap) {
        insert(t, s, key, len, w, 0);
        return 0;
    }
    /* replace the minimum entry */
    uint32_t idx = t->heap[0];
    entry *x = &t->e[idx];
    int f2;
    slot_delete(t, slot_of(t, x->key, x->len, &f2));
    free(x->key);
    x->key = dupkey(key, len);
    x->len = (uint32_t)len;
    x->err = x->count;
    x->count += w;
    s = slot_of(t, key, len, &found);
    t->slot[s] = idx + 1;
    sift_down(t, 0);
    return 0;
}

static int rank_cmp(const void *a, const void *b) {
    const topk_item *x = a, *y = b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    return keycmp(x->key, x->len, y->key, y->len);
}

/* All entries as items in rank order; caller frees. */
static topk_item *ranked(const topk *t) {
    topk_item *it = xcalloc(t->n, sizeof *it);
    for (size_t i = 0; i < t->n; i++)
        it[i] = (topk_item){t->e[i].key, t->e[i].len, t->e[i].count, t->e[i].err};
    qsort(it, t->n, sizeof *it, rank_cmp);
    return it;
}

size_t topk_top(const topk *t, size_t n, topk_item *out) {
    if (n > t->n) n = t->n;
    if (!n) return 0;
    topk_item *it = ranked(t);
    memcpy(out, it, n * sizeof *it);
    free(it);
    return n;
}

int topk_get(const topk *t, const char *key, size_t len, topk_item *item) {
    int found;
    size_t s = slot_of(t, key, len, &found);
    if (!found) return 0;
    const entry *x = &t->e[t->slot[s] - 1];
    *item = (topk_item){x->key, x->len, x->count, x->err};
    return 1;
}

unsigned topk_k(const topk *t) { return t->k; }
unsigned topk_capacity(const topk *t) { return t->cap; }
size_t topk_size(const topk *t) { return t->n; }
double topk_total(const topk *t) { return t->total; }

static double min_count(const topk *t) { return t->n == t->cap ? t->e[t->heap[0]].count : 0; }

void topk_merge(topk *dst, const topk *src) {
    double m1 = min_count(dst), m2 = min_count(src);
    size_t cnt = 0;
    topk_item *all = xcalloc(dst->n + src->n, sizeof *all);
    char **keep = xcalloc(dst->n + src->n, sizeof(char *));
    for (size_t i = 0; i < dst->n; i++) {
        const entry *x = &dst->e[i];
        topk_item o;
        double c = m2, er = m2;
        if (topk_get(src, x->key, x->len, &o)) c = o.count, er = o.error;
        keep[cnt] = dupkey(x->key, x->len);
        all[cnt] = (topk_item){keep[cnt], x->len, x->count + c, x->err + er};
        cnt++;
    }
    for (size_t i = 0; i < src->n; i++) {
        const entry *x = &src->e[i];
        topk_item o;
        if (topk_get(dst, x->key, x->len, &o)) continue;
        keep[cnt] = dupkey(x->key, x->len);
        all[cnt] = (topk_item){keep[cnt], x->len, x->count + m1, x->err + m1};
        cnt++;
    }
    qsort(all, cnt, sizeof *all, rank_cmp);
    double total = dst->total + src->total;
    for (size_t i = 0; i < dst->n; i++) free(dst->e[i].key);
    dst->n = 0;
    memset(dst->slot, 0, dst->nslot * sizeof(uint32_t));
    for (size_t i = 0; i < cnt && i < dst->cap; i++) {
        int found;
        size_t s = slot_of(dst, all[i].key, all[i].len, &found);
        insert(dst, s, all[i].key, all[i].len, all[i].count, all[i].error);
    }
    dst->total = total;
    for (size_t i = 0; i < cnt; i++) free(keep[i]);
    free(keep);
    free(all);
}

/* --- serialisation: k, capacity, total, n, then n x (key, count, error)
 * in rank order (strictly: count descending, key ascending). */
void topk_serialize(const topk *t, buf *out) {
    size_t start = skio_begin(out, "TMTK", 1);
    skio_put_u64(out, t->k);
    skio_put_u64(out, t->cap);
    skio_put_f64(out, t->total);
    skio_put_u64(out, t->n);
    topk_item *it = ranked(t);
    for (size_t i = 0; i < t->n; i++) {
        skio_put_bytes(out, it[i].key, it[i].len);
        skio_put_f64(out, it[i].count);
        skio_put_f64(out, it[i].error);
    }
    free(it);
    skio_end(out, start);
}

topk *topk_deserialize(const char *p, size_t n, tm_err *e) {
    skio_rd rd;
    if (skio_open(&rd, p, n, "TMTK", 1, e) < 0) return NULL;
    uint64_t k = skio_u64(&rd), cap = skio_u64(&rd);
    double total = skio_f64(&rd);
    uint64_t cnt = skio_u64(&rd);
    topk *t = NULL;
    if (rd.bad || cap > TOPK_MAX_CAPACITY || k > cap || cnt > cap) goto bad;
    if (!(t = topk_new((unsigned)k, (unsigned)cap))) goto bad;
    if (!(total >= 0)) goto bad; /* +inf is reachable by overflow; NaN is not */
    topk_item prev = {0};
    for (uint64_t i = 0; i < cnt; i++) {
        topk_item it;
        it.key = skio_bytes(&rd, &it.len, TOPK_MAX_KEY);
        it.count = skio_f64(&rd);
        it.error = skio_f64(&rd);
        if (rd.bad || !(it.count > 0) || !(it.error >= 0) || it.error > it.count)
            goto bad;
        if (i > 0 && rank_cmp(&prev, &it) >= 0) goto bad; /* rank order */
        int found;
        size_t s = slot_of(t, it.key, it.len, &found);
        if (found) goto bad;                              /* duplicate key */
        insert(t, s, it.key, it.len, it.count, it.error);
        prev = it;
    }
    t->total = total;
    if (skio_close(&rd, "topk", e) < 0) {
        topk_free(t);
        return NULL;
    }
    return t;
bad:
    topk_free(t);
    skio_fail(&rd);
    skio_close(&rd, "topk", e);
    return NULL;
}
