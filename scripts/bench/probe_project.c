/* probe_project.c — limit probe for issue #3: the replay of
 * projections/customers.lua in C, over the engine's own store.
 *
 *   probe_project DIR OUT.json [NAME]
 *
 * Does what `tidemark project --data DIR projections/customers.lua` does,
 * with no Lua: opens the store, reads category "order" with the same
 * iterator the projection runner uses (store_read_category +
 * store_iter_next: LevelDB reads, checksum and record decode are the
 * engine's, so they cost the same on both sides), then for each event
 *   OrderPlaced     -> state[data.customer].orders  += 1
 *   PaymentReceived -> state[data.customer].revenue += data.amount
 * (other types skipped, like events without a handler) with its own msgpack
 * walk of the data map and an open-addressing hash map of customers, and
 * finally writes the state as one JSON object with the keys in byte order
 * (what `tidemark project` prints) to OUT.json.  The ratio of the two
 * therefore measures what the Lua runtime (event tables, handler calls,
 * Lua state tables, the final encode) costs over the C floor of the same
 * scan.  Numbers are doubles, summed in position order, as in Lua.
 *
 * Timed here (BENCH line, for information): open to close, output
 * included.  The runner times this whole process from outside, like the
 * tidemark side.
 *
 * Prints: BENCH name=NAME events=<scanned> seconds=.. rate=.. handled=.. partitions=..
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"
#include "store.h"

/* ---- customers: open addressing, keys in one arena ---- */

typedef struct slot {
    uint64_t hash;            /* 0 = empty */
    size_t key;               /* offset in arena */
    uint32_t klen;
    double orders, revenue;
} slot;

typedef struct table {
    slot *v;
    size_t cap, n;
    char *arena;
    size_t alen, acap;
} table;

static uint64_t hash_bytes(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * 1099511628211ull;
    h ^= h >> 29;
    return h ? h : 1;
}

static void table_grow(table *t)
{
    size_t ncap = t->cap ? t->cap * 2 : 1024;
    slot *nv = calloc(ncap, sizeof *nv);
    if (!nv)
        bench_die("out of memory");
    for (size_t i = 0; i < t->cap; i++) {
        if (!t->v[i].hash)
            continue;
        size_t j = t->v[i].hash & (ncap - 1);
        while (nv[j].hash)
            j = (j + 1) & (ncap - 1);
        nv[j] = t->v[i];
    }
    free(t->v);
    t->v = nv;
    t->cap = ncap;
}

static slot *table_get(table *t, const char *k, size_t kl)
{
    if ((t->n + 1) * 2 > t->cap)
        table_grow(t);
    uint64_t h = hash_bytes(k, kl);
    size_t j = h & (t->cap - 1);
    while (t->v[j].hash) {
        slot *s = &t->v[j];
        if (s->hash == h && s->klen == kl && memcmp(t->arena + s->key, k, kl) == 0)
            return s;
        j = (j + 1) & (t->cap - 1);
    }
    if (t->alen + kl > t->acap) {
        t->acap = (t->acap + kl) * 2;
        t->arena = realloc(t->arena, t->acap);
        if (!t->arena)
            bench_die("out of memory");
    }
    memcpy(t->arena + t->alen, k, kl);
    slot *s = &t->v[j];
    s->hash = h;
    s->key = t->alen;
    s->klen = (uint32_t)kl;
    s->orders = s->revenue = 0;
    t->alen += kl;
    t->n++;
    return s;
}

/* ---- msgpack: the data map's "customer" (str) and "amount" (number) ---- */

static uint64_t be(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* Skip one value (any type). Returns the next pointer or NULL. */
static const unsigned char *skip(const unsigned char *p, const unsigned char *end, int depth)
{
    if (p >= end || depth > 32)
        return NULL;
    unsigned c = *p++;
    uint64_t n = 0;
    if (c <= 0x7f || c >= 0xe0 || c == 0xc0 || c == 0xc2 || c == 0xc3)
        return p;
    if ((c & 0xe0) == 0xa0)
        return p + (c & 0x1f) <= end ? p + (c & 0x1f) : NULL;
    if ((c & 0xf0) == 0x90 || (c & 0xf0) == 0x80) {
        n = (c & 0x0f) * ((c & 0xf0) == 0x80 ? 2 : 1);
        goto items;
    }
    switch (c) {
    case 0xcc: case 0xd0: return p + 1;
    case 0xcd: case 0xd1: return p + 2;
    case 0xca: case 0xce: case 0xd2: return p + 4;
    case 0xcb: case 0xcf: case 0xd3: return p + 8;
    case 0xd9: case 0xc4: if (p + 1 > end) return NULL; n = p[0]; p += 1; break;
    case 0xda: case 0xc5: if (p + 2 > end) return NULL; n = be(p, 2); p += 2; break;
    case 0xdb: case 0xc6: if (p + 4 > end) return NULL; n = be(p, 4); p += 4; break;
    case 0xdc: if (p + 2 > end) return NULL; n = be(p, 2); p += 2; goto items;
    case 0xdd: if (p + 4 > end) return NULL; n = be(p, 4); p += 4; goto items;
    case 0xde: if (p + 2 > end) return NULL; n = 2 * be(p, 2); p += 2; goto items;
    case 0xdf: if (p + 4 > end) return NULL; n = 2 * be(p, 4); p += 4; goto items;
    case 0xd4: return p + 2;
    case 0xd5: return p + 3;
    case 0xd6: return p + 5;
    case 0xd7: return p + 9;
    case 0xd8: return p + 17;
    case 0xc7: if (p + 1 > end) return NULL; return p + 2 + p[0];
    case 0xc8: if (p + 2 > end) return NULL; return p + 3 + be(p, 2);
    case 0xc9: if (p + 4 > end) return NULL; return p + 5 + be(p, 4);
    default: return NULL;
    }
    return p + n <= end ? p + n : NULL;
items:
    for (uint64_t i = 0; i < n && p; i++)
        p = skip(p, end, depth + 1);
    return p;
}

static int read_str(const unsigned char **pp, const unsigned char *end, const char **s, size_t *n)
{
    const unsigned char *p = *pp;
    if (p >= end)
        return -1;
    unsigned c = *p++;
    if ((c & 0xe0) == 0xa0) *n = c & 0x1f;
    else if (c == 0xd9 && p + 1 <= end) { *n = p[0]; p += 1; }
    else if (c == 0xda && p + 2 <= end) { *n = be(p, 2); p += 2; }
    else if (c == 0xdb && p + 4 <= end) { *n = be(p, 4); p += 4; }
    else return -1;
    if (p + *n > end)
        return -1;
    *s = (const char *)p;
    *pp = p + *n;
    return 0;
}

static int read_num(const unsigned char **pp, const unsigned char *end, double *v)
{
    const unsigned char *p = *pp;
    if (p >= end)
        return -1;
    unsigned c = *p++;
    union { uint64_t u; double d; } u8;
    union { uint32_t u; float f; } u4;
    if (c <= 0x7f) *v = c;
    else if (c >= 0xe0) *v = (int8_t)c;
    else switch (c) {
    case 0xcb: if (p + 8 > end) return -1; u8.u = be(p, 8); *v = u8.d; p += 8; break;
    case 0xca: if (p + 4 > end) return -1; u4.u = (uint32_t)be(p, 4); *v = u4.f; p += 4; break;
    case 0xcc: if (p + 1 > end) return -1; *v = p[0]; p += 1; break;
    case 0xcd: if (p + 2 > end) return -1; *v = (double)be(p, 2); p += 2; break;
    case 0xce: if (p + 4 > end) return -1; *v = (double)be(p, 4); p += 4; break;
    case 0xcf: if (p + 8 > end) return -1; *v = (double)be(p, 8); p += 8; break;
    case 0xd0: if (p + 1 > end) return -1; *v = (int8_t)p[0]; p += 1; break;
    case 0xd1: if (p + 2 > end) return -1; *v = (int16_t)be(p, 2); p += 2; break;
    case 0xd2: if (p + 4 > end) return -1; *v = (int32_t)be(p, 4); p += 4; break;
    case 0xd3: if (p + 8 > end) return -1; *v = (double)(int64_t)be(p, 8); p += 8; break;
    default: return -1;
    }
    *pp = p;
    return 0;
}

/* Find customer and amount in the data map. 0 ok (amount NAN if absent), -1 bad. */
static int data_fields(const char *data, size_t len, const char **cust, size_t *cl, double *amount)
{
    const unsigned char *p = (const unsigned char *)data, *end = p + len;
    if (p >= end)
        return -1;
    uint64_t n;
    unsigned c = *p++;
    if ((c & 0xf0) == 0x80) n = c & 0x0f;
    else if (c == 0xde && p + 2 <= end) { n = be(p, 2); p += 2; }
    else if (c == 0xdf && p + 4 <= end) { n = be(p, 4); p += 4; }
    else return -1;
    *cust = NULL;
    *amount = 0.0 / 0.0;
    for (uint64_t i = 0; i < n; i++) {
        const char *k;
        size_t kl;
        if (read_str(&p, end, &k, &kl) < 0)
            return -1;
        if (kl == 8 && memcmp(k, "customer", 8) == 0) {
            if (read_str(&p, end, cust, cl) < 0)
                return -1;
        } else if (kl == 6 && memcmp(k, "amount", 6) == 0) {
            if (read_num(&p, end, amount) < 0)
                return -1;
        } else if (!(p = skip(p, end, 0))) {
            return -1;
        }
    }
    return 0;
}

/* ---- output: {"key":{"orders":N,"revenue":R},...} in key byte order ---- */

static const table *sort_t;

static int by_key(const void *a, const void *b)
{
    const slot *x = *(slot *const *)a, *y = *(slot *const *)b;
    size_t n = x->klen < y->klen ? x->klen : y->klen;
    int c = memcmp(sort_t->arena + x->key, sort_t->arena + y->key, n);
    return c ? c : (x->klen > y->klen) - (x->klen < y->klen);
}

static void put_num(FILE *f, double v)
{
    if (v == (double)(int64_t)v && v > -1e15 && v < 1e15)
        fprintf(f, "%" PRId64, (int64_t)v);
    else
        fprintf(f, "%.17g", v);
}

static void write_json(const table *t, FILE *f)
{
    slot **order = malloc((t->n ? t->n : 1) * sizeof *order);
    if (!order)
        bench_die("out of memory");
    size_t k = 0;
    for (size_t i = 0; i < t->cap; i++)
        if (t->v[i].hash)
            order[k++] = &t->v[i];
    sort_t = t;
    qsort(order, k, sizeof *order, by_key);
    fputc('{', f);
    for (size_t i = 0; i < k; i++) {
        /* keys are plain "cust-N" here; no escaping needed */
        fprintf(f, "%s\"%.*s\":{\"orders\":", i ? "," : "", (int)order[i]->klen,
                t->arena + order[i]->key);
        put_num(f, order[i]->orders);
        fputs(",\"revenue\":", f);
        put_num(f, order[i]->revenue);
        fputc('}', f);
    }
    fputs("}\n", f);
    free(order);
}

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: probe_project DIR OUT.json [NAME]\n");
        return 1;
    }
    const char *name = argc == 4 ? argv[3] : "probe_project";
    double t0 = bench_now();
    tm_err err;
    err_clear(&err);
    store_opts so;
    store_opts_default(&so);
    so.create_if_missing = 0;
    store *s = store_open(argv[1], &so, &err);
    if (!s)
        bench_die("store_open %s: %s", argv[1], err.msg);
    store_iter *it = store_read_category(s, "order", 5, 1, 0, &err);
    if (!it)
        bench_die("store_read_category: %s", err.msg);
    table t = {0};
    uint64_t scanned = 0, handled = 0;
    tm_event ev;
    int r;
    while ((r = store_iter_next(it, &ev, &err)) == 1) {
        scanned++;
        int placed = ev.type_len == 11 && memcmp(ev.type, "OrderPlaced", 11) == 0;
        int paid = !placed && ev.type_len == 15 && memcmp(ev.type, "PaymentReceived", 15) == 0;
        if (!placed && !paid)
            continue;
        const char *cust;
        size_t cl;
        double amount;
        if (data_fields(ev.data, ev.data_len, &cust, &cl, &amount) < 0 || !cust)
            bench_die("position %" PRIu64 ": data is not {customer: str, ...}", ev.position);
        slot *sl = table_get(&t, cust, cl);
        handled++;
        if (placed)
            sl->orders += 1;
        else
            sl->revenue += amount;
    }
    if (r < 0)
        bench_die("store_iter_next: %s", err.msg);
    store_iter_free(it);
    FILE *out = fopen(argv[2], "w");
    if (!out)
        bench_die("cannot write %s", argv[2]);
    write_json(&t, out);
    if (fclose(out) != 0)
        bench_die("cannot write %s", argv[2]);
    store_close(s);
    double secs = bench_now() - t0;
    printf("BENCH name=%s events=%" PRIu64 " seconds=%.6f rate=%.0f handled=%" PRIu64
           " partitions=%zu\n", name, scanned, secs, scanned / secs, handled, t.n);
    free(t.v);
    free(t.arena);
    return 0;
}
