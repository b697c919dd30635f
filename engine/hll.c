/* hll.c — HyperLogLog distinct counting.
 *
 * Design (after Redis's hyperloglog.c, Salvatore Sanfilippo):
 *  - Each element is hashed to 64 bits with MurmurHash64A (skio_hash64).
 *    The low P = 14 bits select one of m = 16384 registers; the remaining
 *    50 bits, with a sentinel bit set at position 50, give the run length
 *    rho = (count of trailing zeros) + 1, in 1..51.  A register keeps the
 *    maximum rho seen: the state is a function of the SET of elements.
 *  - Dense form: 16384 registers x 6 bits packed little-endian bit order,
 *    12288 bytes (+1 guard byte in memory, never serialised).
 *  - Sparse form: a sorted array of (register << 6 | value) for the
 *    non-zero registers, used while there are at most HLL_SPARSE_MAX of
 *    them (<= 4 KiB in memory, ~2.5 bytes each serialised).  The switch to
 *    dense happens exactly when the count of non-zero registers exceeds
 *    HLL_SPARSE_MAX, and that count never decreases, so
 *        sparse  <=>  nonzero registers <= HLL_SPARSE_MAX
 *    holds for every reachable state (decode enforces it): one set, one
 *    byte string.
 *  - Estimator: Otmar Ertl's improved raw estimator ("New cardinality
 *    estimation algorithms for HyperLogLog sketches", 2017, arXiv:1702.01284),
 *    the one Redis uses since 4.0.  It works on the register histogram,
 *    needs no empirical bias tables, and its sigma() term is the
 *    linear-counting correction for small cardinalities (m*ln(m/V) when
 *    most registers are zero), while tau() corrects the large range.
 *
 * Error bounds: standard error 1.04/sqrt(m) = 0.81%; ~99.7% of estimates
 * are within 3 sigma = 2.4% at any cardinality (small sets are nearly
 * exact: linear counting on 16384 registers).  Merge is register-wise max,
 * so count(merge(A,B)) estimates |A u B| with the same error.
 *
 * References: Flajolet, Fusy, Gandouet, Meunier, "HyperLogLog: the analysis
 * of a near-optimal cardinality estimation algorithm" (2007); Heule,
 * Nunkesser, Hall, "HyperLogLog in practice" (2013) for the sparse idea;
 * Redis src/hyperloglog.c for the packed layout.
 */
#include "hll.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "skio.h"

#define HLL_Q (64 - HLL_P)
#define HLL_REG_MAX 63
#define HLL_RHO_MAX (HLL_Q + 1)
#define HLL_SEED 0xadc83b19ULL
#define HLL_NUM_SEED 0x6e756d62657221ULL /* numbers hash apart from strings */

struct hll {
    uint8_t *dense;   /* HLL_DENSE_BYTES + 1, or NULL while sparse */
    uint32_t *sparse; /* sorted reg << 6 | value */
    size_t n, cap;    /* sparse entries */
};

static void *xmalloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p) tm_oom();
    return p;
}

/* --- dense register access (Redis's HLL_DENSE_GET/SET_REGISTER) ------ */
static unsigned dense_get(const uint8_t *p, unsigned reg) {
    unsigned byte = reg * 6 / 8, fb = reg * 6 & 7, fb8 = 8 - fb;
    unsigned b0 = p[byte], b1 = p[byte + 1];
    return ((b0 >> fb) | (b1 << fb8)) & HLL_REG_MAX;
}

static void dense_set(uint8_t *p, unsigned reg, unsigned v) {
    unsigned byte = reg * 6 / 8, fb = reg * 6 & 7, fb8 = 8 - fb;
    p[byte] &= (uint8_t) ~(HLL_REG_MAX << fb);
    p[byte] |= (uint8_t)(v << fb);
    p[byte + 1] &= (uint8_t) ~(HLL_REG_MAX >> fb8);
    p[byte + 1] |= (uint8_t)(v >> fb8);
}

hll *hll_new(void) { return xmalloc(sizeof(hll)); }

void hll_free(hll *h) {
    if (!h) return;
    free(h->dense);
    free(h->sparse);
    free(h);
}

hll *hll_clone(const hll *h) {
    hll *c = hll_new();
    if (h->dense) {
        c->dense = xmalloc(HLL_DENSE_BYTES + 1);
        memcpy(c->dense, h->dense, HLL_DENSE_BYTES + 1);
    } else if (h->n) {
        c->sparse = xmalloc(h->n * sizeof(uint32_t));
        memcpy(c->sparse, h->sparse, h->n * sizeof(uint32_t));
        c->n = c->cap = h->n;
    }
    return c;
}

static void to_dense(hll *h) {
    h->dense = xmalloc(HLL_DENSE_BYTES + 1);
    for (size_t i = 0; i < h->n; i++) dense_set(h->dense, h->sparse[i] >> 6, h->sparse[i] & 63);
    free(h->sparse);
    h->sparse = NULL;
    h->n = h->cap = 0;
}

/* First sparse slot whose register is >= reg. */
static size_t sparse_find(const hll *h, unsigned reg) {
    size_t lo = 0, hi = h->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if ((h->sparse[mid] >> 6) < reg) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Raise register reg to at least v; 1 if it changed. */
static int set_max(hll *h, unsigned reg, unsigned v) {
    if (h->dense) {
        if (dense_get(h->dense, reg) >= v) return 0;
        dense_set(h->dense, reg, v);
        return 1;
    }
    size_t i = sparse_find(h, reg);
    if (i < h->n && (h->sparse[i] >> 6) == reg) {
        if ((h->sparse[i] & 63) >= v) return 0;
        h->sparse[i] = reg << 6 | v;
        return 1;
    }
    if (h->n == h->cap) {
        h->cap = h->cap ? h->cap * 2 : 16;
        h->sparse = realloc(h->sparse, h->cap * sizeof(uint32_t));
        if (!h->sparse) tm_oom();
    }
    memmove(h->sparse + i + 1, h->sparse + i, (h->n - i) * sizeof(uint32_t));
    h->sparse[i] = reg << 6 | v;
    h->n++;
    if (h->n > HLL_SPARSE_MAX) to_dense(h);
    return 1;
}

int hll_add_hash(hll *h, uint64_t hash) {
    unsigned reg = (unsigned)(hash & (HLL_REGISTERS - 1));
    hash >>= HLL_P;
    hash |= 1ULL << HLL_Q;
    unsigned rho = (unsigned)__builtin_ctzll(hash) + 1;
    return set_max(h, reg, rho);
}

int hll_add(hll *h, const void *p, size_t n) {
    return hll_add_hash(h, skio_hash64(p, n, HLL_SEED));
}

int hll_add_double(hll *h, double d) {
    uint64_t bits;
    if (d == 0) d = 0.0;          /* -0 and 0 are one element */
    if (isnan(d)) d = NAN;        /* every NaN is one element */
    memcpy(&bits, &d, 8);
    unsigned char x[8];
    for (int i = 7; i >= 0; i--, bits >>= 8) x[i] = (unsigned char)bits;
    return hll_add_hash(h, skio_hash64(x, 8, HLL_NUM_SEED));
}

/* --- estimation (Ertl 2017; Redis hllCount) ---------------------------- */
static double hll_sigma(double x) {
    if (x == 1.0) return INFINITY;
    double y = 1, z = x, zp;
    do {
        x *= x;
        zp = z;
        z += x * y;
        y += y;
    } while (zp != z);
    return z;
}

static double hll_tau(double x) {
    if (x == 0.0 || x == 1.0) return 0.0;
    double y = 1.0, z = 1 - x, zp;
    do {
        x = sqrt(x);
        zp = z;
        y *= 0.5;
        z -= pow(1 - x, 2) * y;
    } while (zp != z);
    return z / 3;
}

double hll_estimate(const hll *h) {
    int hist[HLL_RHO_MAX + 1] = {0};
    if (h->dense) {
        for (unsigned r = 0; r < HLL_REGISTERS; r++) hist[dense_get(h->dense, r)]++;
    } else {
        hist[0] = HLL_REGISTERS - (int)h->n;
        for (size_t i = 0; i < h->n; i++) hist[h->sparse[i] & 63]++;
    }
    double m = HLL_REGISTERS;
    double z = m * hll_tau((m - hist[HLL_Q + 1]) / m);
    for (int j = HLL_Q; j >= 1; --j) {
        z += hist[j];
        z *= 0.5;
    }
    z += m * hll_sigma(hist[0] / m);
    return 0.721347520444481703680 * m * m / z; /* alpha_inf = 1/(2 ln 2) */
}

uint64_t hll_count(const hll *h) { return (uint64_t)llround(hll_estimate(h)); }

void hll_merge(hll *dst, const hll *src) {
    if (dst == src) return;
    if (src->dense) {
        if (!dst->dense) to_dense(dst);
        for (unsigned r = 0; r < HLL_REGISTERS; r++) {
            unsigned v = dense_get(src->dense, r);
            if (v > dense_get(dst->dense, r)) dense_set(dst->dense, r, v);
        }
        return;
    }
    for (size_t i = 0; i < src->n; i++) set_max(dst, src->sparse[i] >> 6, src->sparse[i] & 63);
}

int hll_is_sparse(const hll *h) { return h->dense == NULL; }

size_t hll_memory(const hll *h) {
    return sizeof *h + (h->dense ? HLL_DENSE_BYTES + 1 : h->cap * sizeof(uint32_t));
}

/* --- serialisation ----------------------------------------------------- */
/* body: encoding (0 sparse, 1 dense);
 *   sparse: count, then per entry: register gap (reg - prev - 1; first is
 *           reg), value   (varints)
 *   dense:  HLL_DENSE_BYTES packed registers */
void hll_serialize(const hll *h, buf *out) {
    size_t start = skio_begin(out, "TMHL", 1);
    if (h->dense) {
        skio_put_u64(out, 1);
        buf_append(out, h->dense, HLL_DENSE_BYTES);
    } else {
        skio_put_u64(out, 0);
        skio_put_u64(out, h->n);
        long prev = -1;
        for (size_t i = 0; i < h->n; i++) {
            long reg = (long)(h->sparse[i] >> 6);
            skio_put_u64(out, (uint64_t)(reg - prev - 1));
            skio_put_u64(out, h->sparse[i] & 63);
            prev = reg;
        }
    }
    skio_end(out, start);
}

hll *hll_deserialize(const char *p, size_t n, tm_err *e) {
    skio_rd rd;
    if (skio_open(&rd, p, n, "TMHL", 1, e) < 0) return NULL;
    hll *h = hll_new();
    uint64_t enc = skio_u64(&rd);
    if (enc == 1) {
        const uint8_t *regs = skio_raw(&rd, HLL_DENSE_BYTES);
        if (regs) {
            h->dense = xmalloc(HLL_DENSE_BYTES + 1);
            memcpy(h->dense, regs, HLL_DENSE_BYTES);
            size_t nz = 0;
            for (unsigned r = 0; r < HLL_REGISTERS; r++) {
                unsigned v = dense_get(h->dense, r);
                if (v > HLL_RHO_MAX) skio_fail(&rd);
                nz += v != 0;
            }
            if (nz <= HLL_SPARSE_MAX) skio_fail(&rd); /* would still be sparse */
        }
    } else if (enc == 0) {
        uint64_t cnt = skio_u64(&rd);
        if (cnt > HLL_SPARSE_MAX) skio_fail(&rd);
        if (!rd.bad && cnt) {
            h->sparse = xmalloc(cnt * sizeof(uint32_t));
            h->cap = cnt;
        }
        uint64_t reg = 0;
        for (uint64_t i = 0; i < cnt && !rd.bad; i++) {
            uint64_t gap = skio_u64(&rd), v = skio_u64(&rd);
            reg = (i == 0 ? 0 : reg + 1) + gap;
            if (gap >= HLL_REGISTERS || reg >= HLL_REGISTERS || v < 1 || v > HLL_RHO_MAX) {
                skio_fail(&rd);
                break;
            }
            h->sparse[h->n++] = (uint32_t)(reg << 6 | v);
        }
    } else {
        skio_fail(&rd);
    }
    if (skio_close(&rd, "hll", e) < 0) {
        hll_free(h);
        return NULL;
    }
    return h;
}
