/* topk.h — heavy hitters over string keys (Space-Saving), mergeable.
 *
 * Monitors at most `capacity` keys.  For every reported key:
 *     count - error <= true weight <= count,   error <= total / capacity,
 * and every key whose true weight exceeds total / capacity is monitored.
 * The state is a function of the monitored (key, count, error) set, so
 * one input sequence gives byte-identical serialisations.
 * See topk.c for the design and references.
 */
#ifndef TM_TOPK_H
#define TM_TOPK_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"

#define TOPK_MAX_CAPACITY 100000
#define TOPK_MAX_KEY 1024        /* bytes */

typedef struct topk topk;

typedef struct topk_item {
    const char *key;  /* borrowed: valid until the next add/merge/free */
    size_t len;
    double count;     /* upper bound of the key's weight */
    double error;     /* count - error is a lower bound */
} topk_item;

/* k: default number of results for topk_top callers (1..capacity);
 * capacity: keys monitored (1..TOPK_MAX_CAPACITY).  NULL if out of range. */
topk *topk_new(unsigned k, unsigned capacity);
void topk_free(topk *t);

/* Add weight w (finite, > 0) to key; -1 + e (TM_EINVAL) for a bad weight
 * or a key longer than TOPK_MAX_KEY. */
int topk_add(topk *t, const char *key, size_t len, double w, tm_err *e);
/* dst := merge(dst, src) (Cafaro et al.); dst keeps its capacity. */
void topk_merge(topk *dst, const topk *src);

/* Fill out[0..n) with the n heaviest monitored keys, count descending, ties
 * by key ascending (bytewise); returns how many were written. */
size_t topk_top(const topk *t, size_t n, topk_item *out);
/* Look up one key: 1 and *item filled when monitored, else 0. */
int topk_get(const topk *t, const char *key, size_t len, topk_item *item);

unsigned topk_k(const topk *t);
unsigned topk_capacity(const topk *t);
size_t topk_size(const topk *t);   /* keys monitored */
double topk_total(const topk *t);  /* total weight added */

/* Canonical serialisation (magic "TMTK", v1). */
void topk_serialize(const topk *t, buf *out);
topk *topk_deserialize(const char *p, size_t n, tm_err *e);

#endif
