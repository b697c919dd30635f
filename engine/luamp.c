/* luamp.c — msgpack <-> Lua values (see luamp.h for the encoding rules).
 *
 * Owns: deterministic encoding of Lua values (sorted map keys, integer
 * detection, sketch ext), decoding msgpack into Lua values, and the full
 * event table (slow path).
 *
 * Invariants:
 *   - Encoding never depends on pairs() order: map keys are gathered into
 *     an array, sorted with a total order, then written.  Small maps keep
 *     their pairs on the Lua stack while sorted and allocate nothing; large
 *     ones are written in table order, then their bytes moved into key
 *     order (see "large maps").
 *   - Recursion depth is bounded by LUAMP_MAX_DEPTH both ways (a cycle in a
 *     table shows up as exceeding it); Lua stack space is checked per level.
 *   - On failure the output buffer is restored to its length on entry and
 *     the Lua stack to its height on entry.
 */
#include "luamp.h"

#include <lauxlib.h>
#include <math.h>
#include <msgpack/pack.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lsketch.h"
#include "mp.h"


/* ------------------------------------------------------------ encode */

typedef struct enc {
    lua_State *L;
    msgpack_packer pk;
    buf *out;
    tm_err *err;
    const char *what;
    unsigned flags; /* LUAMP_NAN */
    /* path of keys from the root, for error messages: stack indexes */
    int path[LUAMP_MAX_DEPTH + 1];
    int depth;
} enc;

static int wr(void *data, const char *p, size_t n) {
    buf_append(data, p, n);
    return 0;
}

/* Render the path (root name plus keys) into err. */
static int fail(enc *e, const char *fmt, const char *arg) {
    buf p = BUF_INIT;
    buf_puts(&p, e->what);
    for (int i = 0; i < e->depth; i++) {
        int k = e->path[i];
        if (lua_type(e->L, k) == LUA_TSTRING) buf_printf(&p, ".%s", lua_tostring(e->L, k));
        else if (lua_type(e->L, k) == LUA_TNUMBER) buf_printf(&p, "[%.17g]", lua_tonumber(e->L, k));
        else buf_printf(&p, "[%s]", luaL_typename(e->L, k));
    }
    err_set(e->err, TM_EINVAL, "%s: ", p.ptr);
    size_t used = strlen(e->err->msg);
    snprintf(e->err->msg + used, sizeof e->err->msg - used, fmt, arg);
    buf_free(&p);
    return -1;
}

static int is_int(double d) {
    return d == floor(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0;
}

static void pack_number(enc *e, double d) {
    if (is_int(d)) msgpack_pack_int64(&e->pk, (int64_t)d);
    else msgpack_pack_double(&e->pk, d);
}

static int enc_value(enc *e, int idx);

/* Key order: numbers, then strings, then booleans (false < true). */
static int key_rank(lua_State *L, int i) {
    switch (lua_type(L, i)) {
    case LUA_TNUMBER: return 0;
    case LUA_TSTRING: return 1;
    case LUA_TBOOLEAN: return 2;
    default: return 3;
    }
}

/* A key of a small map to sort.  ref = its Lua stack index (where it is
 * kept alive) * 4 + its rank. */
typedef struct keyref {
    union {
        double num;        /* rank 0: the number; rank 2: 0 false, 1 true */
        const char *s;     /* rank 1: the string's bytes (pinned, see ref) */
    } u;
    uint32_t len;          /* rank 1: its length */
    uint32_t ref;
} keyref;

#define KEY_RANK(k) ((int)((k)->ref & 3))
#define KEY_REF(k) ((int)((k)->ref >> 2))
/* Maps up to this size are read in one pass that leaves every pair on the
 * Lua stack and the refs on the C stack: encoding many small tables (the
 * usual state) allocates nothing and looks nothing up twice.  Larger maps
 * take enc_large. */
#define SMALL_MAP 32
#define MAX_MAP (1u << 29)

static int key_cmp(const void *a, const void *b) {
    const keyref *x = a, *y = b;
    int rx = KEY_RANK(x), ry = KEY_RANK(y);
    if (rx != ry) return rx < ry ? -1 : 1;
    if (rx == 0) return x->u.num < y->u.num ? -1 : x->u.num > y->u.num;
    if (rx == 2) return (int)x->u.num - (int)y->u.num;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->u.s, y->u.s, n);
    if (c) return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

/* Sort a few keyrefs (a state's handful of fields) without qsort's calls. */
static void sort_small(keyref *ks, size_t n) {
    for (size_t i = 1; i < n; i++) {
        keyref k = ks[i];
        size_t j = i;
        for (; j > 0 && key_cmp(&ks[j - 1], &k) > 0; j--) ks[j] = ks[j - 1];
        ks[j] = k;
    }
}

/* The key at stack index i as a keyref (ref = where it stays pinned). */
static int key_ref(enc *e, int i, uint32_t ref, keyref *k, int base) {
    lua_State *L = e->L;
    int r = key_rank(L, i);
    if (r == 3) {
        lua_pushvalue(L, i);
        e->path[e->depth++] = lua_gettop(L);
        int rc = fail(e, "cannot store a table key of type %s", luaL_typename(L, -1));
        e->depth--;
        lua_settop(L, base);
        return rc;
    }
    k->u.num = r == 0 ? lua_tonumber(L, i) : r == 2 ? lua_toboolean(L, i) : 0;
    if (r == 0 && isnan(k->u.num)) {
        lua_settop(L, base);
        return fail(e, "%s", "NaN table key");
    }
    if (r == 1) {
        size_t len;
        k->u.s = lua_tolstring(L, i, &len);
        if (len > UINT32_MAX) {
            lua_settop(L, base);
            return fail(e, "%s", "table key too long to store");
        }
        k->len = (uint32_t)len;
    }
    k->ref = ref << 2 | (uint32_t)r;
    return 0;
}

/* Encode the pairs whose keyrefs are ks (sorted), each key at stack index
 * KEY_REF and its value just above it. */
static int enc_pairs(enc *e, const keyref *ks, size_t n) {
    msgpack_pack_map(&e->pk, (uint32_t)n);
    for (size_t j = 0; j < n; j++) {
        int k = KEY_REF(&ks[j]), v = k + 1;
        e->path[e->depth++] = k;
        int rc = enc_value(e, k);
        if (rc == 0) rc = enc_value(e, v);
        e->depth--;
        if (rc < 0) return -1;
    }
    return 0;
}

/* An array 1..n: its values in order. */
static int enc_array(enc *e, int t, size_t n) {
    lua_State *L = e->L;
    msgpack_pack_array(&e->pk, (uint32_t)n);
    for (size_t i = 1; i <= n; i++) {
        lua_pushnumber(L, (lua_Number)i);
        e->path[e->depth++] = lua_gettop(L);
        lua_rawgeti(L, t, (int)i);
        int rc = enc_value(e, lua_gettop(L));
        lua_pop(L, 2);
        e->depth--;
        if (rc < 0) return -1;
    }
    return 0;
}

/* Small maps in one pass: every pair stays on the stack (key, value), so
 * nothing is looked up again.  1 when the table has more than SMALL_MAP
 * keys (nothing written: the caller takes the large path). */
static int enc_small(enc *e, int t) {
    lua_State *L = e->L;
    keyref ks[SMALL_MAP];
    int base = lua_gettop(L), array = 1;
    double maxk = 0;
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {                      /* ... k v */
        if (n == SMALL_MAP) {
            lua_settop(L, base);
            return 1;
        }
        int k = lua_gettop(L) - 1;
        if (key_ref(e, k, (uint32_t)k, &ks[n], base) < 0) return -1;
        if (array) {
            double d = KEY_RANK(&ks[n]) == 0 ? ks[n].u.num : 0;
            if (d >= 1 && d == floor(d)) {
                if (d > maxk) maxk = d;
            } else array = 0;
        }
        n++;
        lua_pushvalue(L, k);                      /* ... k v k: lua_next goes on */
    }
    int rc;
    if (n > 0 && array && maxk == (double)n) {
        lua_settop(L, base);
        rc = enc_array(e, t, n);
    } else {
        sort_small(ks, n);
        rc = enc_pairs(e, ks, n);
        lua_settop(L, base);
    }
    return rc;
}

/* ------------------------------------------------------------ large maps
 *
 * A large map (a state table of 1M partitions) is encoded in one walk of
 * the table in its own order: each pair's key and value go straight into
 * out, and a pairref records where.  The refs are then sorted, and the
 * pairs' bytes moved into key order.  So the Lua heap is read once, in the
 * order it is laid out, and the sort reads only C memory: mostly an
 * 8-byte prefix of the key held in the ref (past the prefix every string
 * key shares), the key's bytes in out on a tie. */

typedef struct pairref {
    uint64_t pre;   /* rank 0: the number's bits, ordered; 1: 8 key bytes
                       from the shared prefix on, big-endian, zero padded;
                       2: 0 false, 1 true */
    size_t off;     /* the pair's bytes: from the region's start */
    uint32_t len;
    uint32_t rank;  /* key_rank */
} pairref;

static uint64_t number_pre(double d) {
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u >> 63 ? ~u : u | 1ull << 63;
}

/* The bytes of a msgpack str at p (one that enc_value wrote). */
static const uint8_t *str_at(const uint8_t *p, size_t *len) {
    switch (*p) {
    case 0xd9: *len = p[1]; return p + 2;
    case 0xda: *len = (size_t)p[1] << 8 | p[2]; return p + 3;
    case 0xdb: *len = (size_t)p[1] << 24 | (size_t)p[2] << 16 | (size_t)p[3] << 8 | p[4];
        return p + 5;
    default: *len = *p & 0x1f; return p + 1;
    }
}

static uint64_t string_pre(const uint8_t *s, size_t len, size_t from) {
    uint64_t v = 0;
    for (size_t i = 0; i < 8; i++) v = v << 8 | (from + i < len ? s[from + i] : 0);
    return v;
}

/* key_cmp's order on pairrefs (region: the pairs' bytes). */
static int pair_cmp(const pairref *x, const pairref *y, const uint8_t *region) {
    if (x->rank != y->rank) return x->rank < y->rank ? -1 : 1;
    if (x->pre != y->pre) return x->pre < y->pre ? -1 : 1;
    if (x->rank != 1) return 0;
    size_t xl, yl;
    const uint8_t *xs = str_at(region + x->off, &xl), *ys = str_at(region + y->off, &yl);
    int c = memcmp(xs, ys, xl < yl ? xl : yl);
    if (c) return c;
    return xl < yl ? -1 : xl > yl;
}

static void pair_swap(pairref *a, pairref *b) {
    pairref t = *a;
    *a = *b;
    *b = t;
}

/* Introsort: quicksort (median of three, the smaller side first), heapsort
 * past 2 log2(n) levels, insertion sort for short runs.  Keys are
 * distinct, so no equal elements to balance. */
static void pair_heapify(pairref *a, size_t n, size_t i, const uint8_t *region) {
    for (;;) {
        size_t m = i, l = 2 * i + 1, r = l + 1;
        if (l < n && pair_cmp(&a[l], &a[m], region) > 0) m = l;
        if (r < n && pair_cmp(&a[r], &a[m], region) > 0) m = r;
        if (m == i) return;
        pair_swap(&a[i], &a[m]);
        i = m;
    }
}

static void pair_sort(pairref *a, size_t n, int depth, const uint8_t *region) {
    while (n > 16) {
        if (depth-- == 0) {
            for (size_t i = n / 2; i-- > 0;) pair_heapify(a, n, i, region);
            for (size_t i = n - 1; i > 0; i--) {
                pair_swap(&a[0], &a[i]);
                pair_heapify(a, i, 0, region);
            }
            return;
        }
        size_t mid = n / 2;
        if (pair_cmp(&a[mid], &a[0], region) < 0) pair_swap(&a[mid], &a[0]);
        if (pair_cmp(&a[n - 1], &a[0], region) < 0) pair_swap(&a[n - 1], &a[0]);
        if (pair_cmp(&a[n - 1], &a[mid], region) < 0) pair_swap(&a[n - 1], &a[mid]);
        pair_swap(&a[mid], &a[n - 2]); /* the pivot, out of the way */
        pairref *piv = &a[n - 2];
        size_t i = 0, j = n - 2;
        for (;;) {
            while (pair_cmp(&a[++i], piv, region) < 0) {}
            while (j > 0 && pair_cmp(&a[--j], piv, region) > 0) {}
            if (i >= j) break;
            pair_swap(&a[i], &a[j]);
        }
        pair_swap(&a[i], &a[n - 2]);
        size_t left = i, right = n - i - 1;
        if (left < right) {
            pair_sort(a, left, depth, region);
            a += i + 1;
            n = right;
        } else {
            pair_sort(a + i + 1, right, depth, region);
            n = left;
        }
    }
    for (size_t i = 1; i < n; i++) {
        pairref k = a[i];
        size_t j = i;
        for (; j > 0 && pair_cmp(&a[j - 1], &k, region) > 0; j--) a[j] = a[j - 1];
        a[j] = k;
    }
}

/* Gather: every pair of t encoded into out (from `start` on), its ref in
 * rs; *cpl is set to the length of the prefix all string keys share. */
static int enc_gather(enc *e, int t, size_t n, size_t start, pairref *rs, size_t *cpl) {
    lua_State *L = e->L;
    int base = lua_gettop(L);
    size_t i = 0, first = SIZE_MAX, shared = SIZE_MAX;
    lua_pushnil(L);
    while (lua_next(L, t)) {                      /* ... k v */
        int k = lua_gettop(L) - 1;
        if (i == n) { /* cannot happen: the table is not written meanwhile */
            lua_settop(L, base);
            return fail(e, "%s", "table changed while being stored");
        }
        keyref kr;
        if (key_ref(e, k, 0, &kr, base) < 0) return -1;
        pairref *r = &rs[i++];
        r->rank = (uint32_t)KEY_RANK(&kr);
        r->pre = r->rank == 0 ? number_pre(kr.u.num) : r->rank == 2 ? (uint64_t)kr.u.num : 0;
        r->off = e->out->len - start;
        e->path[e->depth++] = k;
        int rc = enc_value(e, k);
        if (rc == 0) rc = enc_value(e, k + 1);
        e->depth--;
        if (rc < 0) {
            lua_settop(L, base);
            return -1;
        }
        if (e->out->len - start - r->off > UINT32_MAX) {
            lua_settop(L, base);
            return fail(e, "%s", "table entry too large to store");
        }
        r->len = (uint32_t)(e->out->len - start - r->off);
        if (r->rank == 1) {
            const uint8_t *region = (const uint8_t *)e->out->ptr + start;
            if (first == SIZE_MAX) {
                first = r->off;
                shared = kr.len;
            } else {
                size_t fl, c = 0;
                const uint8_t *f = str_at(region + first, &fl);
                size_t lim = shared < kr.len ? shared : kr.len;
                while (c < lim && f[c] == (uint8_t)kr.u.s[c]) c++;
                shared = c;
            }
        }
        lua_pop(L, 1);                            /* ... k: lua_next goes on */
    }
    if (i != n) {
        lua_settop(L, base);
        return fail(e, "%s", "table changed while being stored");
    }
    *cpl = shared == SIZE_MAX ? 0 : shared;
    return 0;
}

/* A map of n (> SMALL_MAP) pairs, in key order. */
static int enc_large(enc *e, int t, size_t n) {
    lua_State *L = e->L;
    int base = lua_gettop(L);
    /* the refs live in the Lua heap: collected if an error unwinds past */
    pairref *rs = lua_newuserdata(L, n * sizeof *rs);
    msgpack_pack_map(&e->pk, (uint32_t)n);
    size_t start = e->out->len, cpl = 0;
    if (enc_gather(e, t, n, start, rs, &cpl) < 0) return -1;
    const uint8_t *region = (const uint8_t *)e->out->ptr + start;
    size_t total = e->out->len - start;
    for (size_t i = 0; i < n; i++) {
        if (rs[i].rank != 1) continue;
        size_t kl;
        const uint8_t *k = str_at(region + rs[i].off, &kl);
        rs[i].pre = string_pre(k, kl, cpl);
    }
    int depth = 0;
    for (size_t m = n; m > 1; m >>= 1) depth += 2;
    pair_sort(rs, n, depth, region);
    char *tmp = malloc(total ? total : 1);
    if (!tmp) {
        lua_settop(L, base);
        return fail(e, "%s", "out of memory");
    }
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        memcpy(tmp + o, region + rs[i].off, rs[i].len);
        o += rs[i].len;
    }
    memcpy(e->out->ptr + start, tmp, total);
    free(tmp);
    lua_settop(L, base);
    return 0;
}

static int enc_table(enc *e, int t) {
    lua_State *L = e->L;
    if (e->depth >= LUAMP_MAX_DEPTH) return fail(e, "%s", "nested too deep (or a cycle)");
    if (!lua_checkstack(L, 2 * SMALL_MAP + 8)) return fail(e, "%s", "Lua stack exhausted");
    /* Lazy tables (events) fill themselves in first. */
    if (lua_getmetatable(L, t)) {
        lua_getfield(L, -1, "__tm_materialize");
        if (lua_isfunction(L, -1)) {
            lua_pushvalue(L, t);
            if (lua_pcall(L, 1, 0, 0) != 0) {
                lua_pop(L, 2);
                return fail(e, "%s", "cannot materialise an event table");
            }
            lua_pop(L, 1);
        } else {
            lua_pop(L, 2);
        }
    }
    int rc = enc_small(e, t);
    if (rc != 1) return rc;
    /* Large: count the keys and check for an array 1..n. */
    size_t n = 0;
    int array = 1;
    double maxk = 0;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        lua_pop(L, 1);
        n++;
        if (array) {
            if (lua_type(L, -1) == LUA_TNUMBER) {
                double k = lua_tonumber(L, -1);
                if (k >= 1 && k == floor(k)) {
                    if (k > maxk) maxk = k;
                } else array = 0;
            } else array = 0;
        }
    }
    if (array && maxk == (double)n) return enc_array(e, t, n);
    if (n >= MAX_MAP) return fail(e, "%s", "table too large to store");
    return enc_large(e, t, n);
}

static int enc_value(enc *e, int idx) {
    lua_State *L = e->L;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: msgpack_pack_nil(&e->pk); return 0;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx)) msgpack_pack_true(&e->pk);
        else msgpack_pack_false(&e->pk);
        return 0;
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        if (isnan(d) && !(e->flags & LUAMP_NAN)) return fail(e, "%s", "cannot store NaN");
        pack_number(e, d);
        return 0;
    }
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        msgpack_pack_str(&e->pk, len);
        msgpack_pack_str_body(&e->pk, s, len);
        return 0;
    }
    case LUA_TTABLE: return enc_table(e, idx);
    case LUA_TUSERDATA: {
        int t = lsketch_ext_type(L, idx);
        if (t > 0) {
            buf b = BUF_INIT;
            if (lsketch_serialize(L, idx, &b) < 0) {
                buf_free(&b);
                return fail(e, "%s", "cannot serialise a sketch");
            }
            msgpack_pack_ext(&e->pk, b.len, (int8_t)t);
            msgpack_pack_ext_body(&e->pk, b.ptr, b.len);
            buf_free(&b);
            return 0;
        }
        return fail(e, "%s", "cannot store a userdata value");
    }
    default: return fail(e, "cannot store a %s value", luaL_typename(L, idx));
    }
}

int luamp_encode(lua_State *L, int idx, const char *what, buf *out, tm_err *err) {
    return luamp_encode_opt(L, idx, what, 0, out, err);
}

int luamp_encode_opt(lua_State *L, int idx, const char *what, unsigned flags, buf *out,
                     tm_err *err) {
    if (idx < 0 && idx > LUA_REGISTRYINDEX) idx = lua_gettop(L) + idx + 1;
    enc e = {.L = L, .out = out, .err = err, .what = what ? what : "value", .flags = flags};
    msgpack_packer_init(&e.pk, out, wr);
    size_t len0 = out->len;
    int top = lua_gettop(L);
    int rc = enc_value(&e, idx);
    lua_settop(L, top);
    if (rc < 0) out->len = len0;
    return rc;
}

/* ------------------------------------------------------------ decode */

static int push_item(lua_State *L, const char **p, const char *end, int depth, unsigned flags,
                     tm_err *err);

static int push_container(lua_State *L, const mp_item *it, const char **p, const char *end,
                          int depth, unsigned flags, tm_err *err) {
    if (depth >= LUAMP_MAX_DEPTH) return err_set(err, TM_EINVAL, "msgpack nested too deep");
    if (!lua_checkstack(L, 4)) return err_set(err, TM_EINVAL, "Lua stack exhausted");
    uint32_t n = it->v.n;
    if (it->type == MP_ARRAY) {
        lua_createtable(L, (int)(n < 1u << 20 ? n : 0), 0);
        for (uint32_t i = 0; i < n; i++) {
            if (push_item(L, p, end, depth + 1, flags, err) < 0) {
                lua_pop(L, 1);
                return -1;
            }
            lua_rawseti(L, -2, (int)i + 1);
        }
        return 0;
    }
    lua_createtable(L, 0, (int)(n < 1u << 20 ? n : 0));
    for (uint32_t i = 0; i < n; i++) {
        if (push_item(L, p, end, depth + 1, flags, err) < 0) {
            lua_pop(L, 1);
            return -1;
        }
        if (push_item(L, p, end, depth + 1, flags, err) < 0) {
            lua_pop(L, 2);
            return -1;
        }
        /* nil and NaN cannot be Lua table keys (rawset would raise outside
         * any protected call and abort the process): such pairs are dropped,
         * as Lua itself cannot represent them */
        if (lua_isnil(L, -2) ||
            (lua_type(L, -2) == LUA_TNUMBER && lua_tonumber(L, -2) != lua_tonumber(L, -2)))
            lua_pop(L, 2);
        else lua_rawset(L, -3);
    }
    return 0;
}

static int push_item(lua_State *L, const char **p, const char *end, int depth, unsigned flags,
                     tm_err *err) {
    mp_item it;
    if (mp_next(p, end, &it) < 0) return err_set(err, TM_EINVAL, "truncated or malformed msgpack");
    switch (it.type) {
    case MP_NIL: lua_pushnil(L); return 0;
    case MP_BOOL: lua_pushboolean(L, it.v.b); return 0;
    case MP_UINT: lua_pushnumber(L, (lua_Number)it.v.u); return 0;
    case MP_INT: lua_pushnumber(L, (lua_Number)it.v.i); return 0;
    case MP_FLOAT:
    case MP_DOUBLE: lua_pushnumber(L, it.v.d); return 0;
    case MP_STR:
    case MP_BIN: lua_pushlstring(L, it.v.s.ptr, it.v.s.len); return 0;
    case MP_ARRAY:
    case MP_MAP: return push_container(L, &it, p, end, depth, flags, err);
    case MP_EXT:
        if (flags & LUAMP_RAW_EXT) {
            lua_pushlstring(L, it.v.s.ptr, it.v.s.len);
            return 0;
        }
        if (lsketch_push_decoded(L, it.v.s.ext, it.v.s.ptr, it.v.s.len) == 0)
            return 0;
        return err_set(err, TM_EINVAL, "unknown or invalid msgpack ext type %d", it.v.s.ext);
    }
    return err_set(err, TM_EINVAL, "bad msgpack item");
}

int luamp_push(lua_State *L, const char *p, size_t n, tm_err *err) {
    return luamp_push_opt(L, p, n, 0, err);
}

int luamp_push_opt(lua_State *L, const char *p, size_t n, unsigned flags, tm_err *err) {
    const char *q = p;
    int top = lua_gettop(L);
    if (push_item(L, &q, p + n, 0, flags, err) < 0) {
        lua_settop(L, top);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ events */

int luamp_push_event(lua_State *L, const tm_event *ev, tm_err *err) {
    return luamp_push_event_opt(L, ev, 0, err);
}

int luamp_push_event_opt(lua_State *L, const tm_event *ev, unsigned flags, tm_err *err) {
    int top = lua_gettop(L);
    lua_createtable(L, 0, 9);
    char id[37];
    event_id_format(ev->id, id);
    lua_pushlstring(L, id, 36);
    lua_setfield(L, -2, "id");
    lua_pushlstring(L, ev->stream, ev->stream_len);
    lua_setfield(L, -2, "stream");
    lua_pushlstring(L, ev->stream, event_category_len(ev->stream, ev->stream_len));
    lua_setfield(L, -2, "category");
    lua_pushlstring(L, ev->type, ev->type_len);
    lua_setfield(L, -2, "type");
    if (ev->data_len) {
        if (luamp_push_opt(L, ev->data, ev->data_len, flags, err) < 0) goto fail;
    } else {
        lua_pushnil(L);
    }
    lua_setfield(L, -2, "data");
    if (ev->meta_len) {
        if (luamp_push_opt(L, ev->meta, ev->meta_len, flags, err) < 0) goto fail;
    } else {
        lua_newtable(L);
    }
    lua_setfield(L, -2, "metadata");
    lua_pushnumber(L, (lua_Number)ev->time_ms);
    lua_setfield(L, -2, "time");
    lua_pushnumber(L, (lua_Number)ev->position);
    lua_setfield(L, -2, "position");
    lua_pushnumber(L, (lua_Number)ev->version);
    lua_setfield(L, -2, "version");
    return 0;
fail:
    lua_settop(L, top);
    return -1;
}
