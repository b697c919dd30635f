/* hll.h — HyperLogLog distinct counting (mergeable, serialisable).
 *
 * p = 14: 16384 registers of 6 bits packed (12 KiB dense), standard error
 * 1.04/sqrt(16384) = 0.81%.  Small sets use a sparse sorted list of
 * (register, value) pairs until HLL_SPARSE_MAX entries.  The state is a
 * function of the SET of added elements only (not of their order or
 * repetition), so equal sets give byte-identical serialisations.
 * See hll.c for the design and references.
 */
#ifndef TM_HLL_H
#define TM_HLL_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "err.h"

#define HLL_P 14
#define HLL_REGISTERS (1 << HLL_P)
#define HLL_DENSE_BYTES (HLL_REGISTERS * 6 / 8) /* 12288 */
#define HLL_SPARSE_MAX 1024                    /* entries before going dense */

typedef struct hll hll;

hll *hll_new(void);                 /* empty, sparse; caller frees */
void hll_free(hll *h);
hll *hll_clone(const hll *h);

/* Add an element; returns 1 when a register changed, else 0. */
int hll_add(hll *h, const void *p, size_t n);
/* Add a number: hashed from its IEEE-754 bits (-0 as 0, one NaN), with a
 * seed distinct from byte strings', so 1 and "1" are different elements. */
int hll_add_double(hll *h, double d);
/* Add a precomputed 64-bit hash (for callers that hash themselves). */
int hll_add_hash(hll *h, uint64_t hash);

uint64_t hll_count(const hll *h);   /* estimated distinct elements */
double hll_estimate(const hll *h);  /* the same, unrounded */
/* dst := union(dst, src).  Never fails. */
void hll_merge(hll *dst, const hll *src);

int hll_is_sparse(const hll *h);
size_t hll_memory(const hll *h);    /* bytes held (approximate) */

/* Append the canonical serialisation (magic "TMHL", v1) to out. */
void hll_serialize(const hll *h, buf *out);
/* Decode and validate; NULL + e (TM_EINVAL) on any invalid byte. */
hll *hll_deserialize(const char *p, size_t n, tm_err *e);

#endif
