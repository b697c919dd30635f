/* json.c — JSON <-> msgpack transcoding (see json.h).
 *
 * Owns: the yajl parse callbacks that write msgpack through msgpack-c's
 * packer, the canonical compaction of that output, the hand-written
 * msgpack -> JSON printer, JSON string escaping / UTF-8 checking, and
 * the chunked writer of large objects (json_objw: a read model printed
 * pair by pair).
 *
 * JSON -> msgpack.  yajl reports a container's end, never its count in
 * advance, so every array/map is first written with a 5-byte header
 * (array32/map32) whose count is patched when it closes; a stack holds the
 * header offsets.  When the whole value is parsed, one forward pass
 * rewrites each such header in its smallest form (fixarray/fixmap, 16 or
 * 32 bits) and slides the rest down (the write cursor never passes the
 * read cursor, so this is done in place).  Scalars come from the packer,
 * which already picks the smallest encoding; floats are always float64.
 * So the same JSON always yields the same bytes.
 *   Limits: depth and per-container counts are checked as containers
 * open and grow; size is checked against a lower bound of the final size
 * while parsing (bytes written, less what closed containers will save,
 * less 4 per open container) and exactly at the end.
 *   Numbers arrive as text (yajl_number): an integer literal becomes int64
 * or, if positive and too big for int64, uint64; anything else (fraction,
 * exponent, or an integer beyond 64 bits) becomes float64.  "-0" is the
 * integer 0; "-0.0" is the float -0.0.  Text <-> double conversions use
 * the C locale whatever the process locale is.
 *
 * msgpack -> JSON is printed by hand (recursive, at most JSON_MAX_DEPTH = 512;
 * input must already be validated, but reads stay inside [mp, mp+len)).
 * Doubles print with the fewest digits (15..17) that read back exactly and
 * always look like floats ("1.0", "1e+300"); float32 with 6..9 digits;
 * NaN and infinities print as null.
 */
#define _GNU_SOURCE
#include "json.h"

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack/pack.h>
#include <yajl/yajl_parse.h>

#define JSON_MAX_DEPTH 512 /* printer recursion guard (data is validated to 64 by default) */

/* ---- C locale for number text ---- */

static locale_t c_locale;
static pthread_once_t c_locale_once = PTHREAD_ONCE_INIT;

static void c_locale_init(void) { c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0); }

static double strtod_c(const char *s, char **end) {
    pthread_once(&c_locale_once, c_locale_init);
    if (c_locale) return strtod_l(s, end, c_locale);
    return strtod(s, end);
}

static float strtof_c(const char *s, char **end) {
    pthread_once(&c_locale_once, c_locale_init);
    if (c_locale) return strtof_l(s, end, c_locale);
    return strtof(s, end);
}

static const double p10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                               1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                               1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* Clinger's fast path: a decimal with at most 15 significant digits m and
 * a power of ten |e| <= 22 is m * 10^e or m / 10^e, one correctly rounded
 * operation on two exact doubles, hence exactly what strtod returns.
 * Returns 0 when the text is outside that case (the caller uses strtod). */
static int fast_strtod(const char *s, size_t n, double *out) {
    size_t i = 0;
    int neg = 0, digits = 0, e = 0;
    uint64_t m = 0;
    if (i < n && s[i] == '-') neg = 1, i++;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) {
        if (digits || s[i] != '0') digits++;
        if (digits > 15) return 0;
        m = m * 10 + (uint64_t)(s[i] - '0');
    }
    if (i < n && s[i] == '.') {
        for (i++; i < n && s[i] >= '0' && s[i] <= '9'; i++) {
            if (digits || s[i] != '0') digits++;
            if (digits > 15) return 0;
            m = m * 10 + (uint64_t)(s[i] - '0');
            e--;
        }
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        int eneg = 0, x = 0;
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) eneg = s[i++] == '-';
        for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) {
            if (x > 100000) return 0;
            x = x * 10 + (s[i] - '0');
        }
        e += eneg ? -x : x;
    }
    if (i != n || e < -22 || e > 22) return 0;
    double d = (double)m;
    d = e < 0 ? d / p10[-e] : d * p10[e];
    *out = neg ? -d : d;
    return 1;
}

/* ---- JSON -> msgpack ---- */

typedef struct frame {
    size_t hdr;      /* offset in out of the 5-byte header */
    uint32_t count;  /* elements (array) or pairs (map) so far */
    int is_map;
} frame;

typedef struct jctx {
    buf *out;
    size_t start;           /* out->len when we began */
    const mp_limits *lim;
    frame *stack;
    unsigned depth, cap;
    size_t saved;           /* bytes compaction will remove from closed containers */
    msgpack_packer pk;
    int failed;             /* a callback set err */
    tm_err *err;
} jctx;

static int pk_write(void *data, const char *p, size_t n) {
    buf_append(data, p, n);
    return 0;
}

static size_t hdr_size(uint32_t n) { return n < 16 ? 1 : n < 65536 ? 3 : 5; }

/* Direct writers for the hot scalars: the same bytes as msgpack-c's packer
 * (smallest form), without a callback per item. */
static void put_be(buf *out, unsigned char tag, uint64_t v, int n) {
    buf_reserve(out, 9);
    char *p = out->ptr + out->len;
    *p++ = (char)tag;
    for (int i = n - 1; i >= 0; i--) p[i] = (char)(v >> (8 * (n - 1 - i)));
    out->len += 1 + (size_t)n;
    out->ptr[out->len] = '\0';
}

static void put_uint(buf *out, uint64_t v) {
    if (v < 128) buf_putc(out, (char)v);
    else if (v < 256) put_be(out, 0xcc, v, 1);
    else if (v < 65536) put_be(out, 0xcd, v, 2);
    else if (v < 4294967296ull) put_be(out, 0xce, v, 4);
    else put_be(out, 0xcf, v, 8);
}

static void put_neg(buf *out, int64_t v) { /* v < 0 */
    if (v >= -32) buf_putc(out, (char)(v & 0xff));
    else if (v >= -128) put_be(out, 0xd0, (uint64_t)v, 1);
    else if (v >= -32768) put_be(out, 0xd1, (uint64_t)v, 2);
    else if (v >= -2147483648ll) put_be(out, 0xd2, (uint64_t)v, 4);
    else put_be(out, 0xd3, (uint64_t)v, 8);
}

static void put_double(buf *out, double d) { /* float64, as msgpack_pack_double */
    uint64_t bits;
    memcpy(&bits, &d, 8);
    put_be(out, 0xcb, bits, 8);
}

static void put_str(buf *out, const void *s, size_t n) {
    buf_reserve(out, 5 + n);
    char *p = out->ptr + out->len;
    if (n < 32) *p++ = (char)(0xa0 | n);
    else if (n < 256) {
        *p++ = (char)0xd9;
        *p++ = (char)n;
    } else if (n < 65536) {
        *p++ = (char)0xda;
        *p++ = (char)(n >> 8);
        *p++ = (char)n;
    } else {
        *p++ = (char)0xdb;
        for (int i = 3; i >= 0; i--) *p++ = (char)(n >> (8 * i));
    }
    memcpy(p, s, n);
    out->len = (size_t)(p + n - out->ptr);
    out->ptr[out->len] = '\0';
}

/* Record a callback's error; returns 0 so yajl stops. */
static int fail(jctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(jctx *c, const char *fmt, ...) {
    char m[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m, sizeof m, fmt, ap);
    va_end(ap);
    c->failed = 1;
    err_set(c->err, TM_EINVAL, "%s", m);
    return 0;
}

/* Lower bound of the final size must stay within the limit. */
static int check_size(jctx *c) {
    size_t raw = c->out->len - c->start;
    size_t open = 4 * (size_t)c->depth;
    size_t lower = raw - c->saved;
    lower = lower > open ? lower - open : 0;
    if (lower > c->lim->max_size)
        return fail(c, "value exceeds size limit of %zu bytes", c->lim->max_size);
    return 1;
}

/* Count one more element in the enclosing array (map pairs are counted by
 * their key). */
static int add_elem(jctx *c) {
    if (!c->depth) return 1;
    frame *f = &c->stack[c->depth - 1];
    if (f->is_map) return 1;
    if (++f->count > c->lim->max_items)
        return fail(c, "array of more than %u items", c->lim->max_items);
    return 1;
}

static int cb_null(void *ctx) {
    jctx *c = ctx;
    if (!add_elem(c)) return 0;
    msgpack_pack_nil(&c->pk);
    return check_size(c);
}

static int cb_bool(void *ctx, int v) {
    jctx *c = ctx;
    if (!add_elem(c)) return 0;
    if (v) msgpack_pack_true(&c->pk);
    else msgpack_pack_false(&c->pk);
    return check_size(c);
}

/* Pack a JSON number given as text (already checked by yajl's lexer).
 * 0, or -1 when it is beyond a double's range (it would become an
 * infinity, which JSON cannot say: printed back it would be null). */
static int pack_number(jctx *c, const char *s, size_t n) {
    int is_int = 1;
    for (size_t i = 0; i < n; i++)
        if (s[i] == '.' || s[i] == 'e' || s[i] == 'E') {
            is_int = 0;
            break;
        }
    if (is_int) {
        size_t i = 0;
        int neg = s[0] == '-';
        if (neg) i++;
        uint64_t v = 0;
        int over = 0;
        for (; i < n; i++) {
            unsigned d = (unsigned)(s[i] - '0');
            if (v > (UINT64_MAX - d) / 10) {
                over = 1;
                break;
            }
            v = v * 10 + d;
        }
        if (!over && (!neg || v == 0)) { /* "-0" is the integer 0 */
            put_uint(c->out, v);
            return 0;
        }
        if (!over && v <= (uint64_t)INT64_MAX + 1) {
            put_neg(c->out, v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v);
            return 0;
        }
    }
    double d;
    if (fast_strtod(s, n, &d)) {
        put_double(c->out, d);
        return 0;
    }
    char small[64];
    char *t = n < sizeof small ? small : malloc(n + 1);
    if (!t) tm_oom();
    memcpy(t, s, n);
    t[n] = '\0';
    d = strtod_c(t, NULL);
    if (t != small) free(t);
    if (!isfinite(d)) return -1;
    put_double(c->out, d);
    return 0;
}

static int cb_number(void *ctx, const char *s, size_t n) {
    jctx *c = ctx;
    if (!add_elem(c)) return 0;
    if (pack_number(c, s, n) < 0)
        return fail(c, "number %.*s%s is out of range", (int)(n < 40 ? n : 40), s,
                    n < 40 ? "" : "...");
    return check_size(c);
}

/* Strings must be UTF-8 both ways.  yajl's own check of raw text lets
 * overlong forms through (C0 A3), and a \uDC00..\uDFFF escape without its
 * high half decodes to ED B0..BF xx; either would print back as U+FFFD.
 * ASCII (the common case) is skipped 8 bytes at a time. */
static int bad_utf8(const unsigned char *s, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        if (w & 0x8080808080808080ull) break;
    }
    for (; i < n && s[i] < 0x80; i++) {
    }
    return i < n && !json_utf8_valid((const char *)s + i, n - i);
}

static int cb_string(void *ctx, const unsigned char *s, size_t n) {
    jctx *c = ctx;
    if (!add_elem(c)) return 0;
    if (n > UINT32_MAX) return fail(c, "string longer than %u bytes", UINT32_MAX);
    if (bad_utf8(s, n)) return fail(c, "string is not valid UTF-8 (or an unpaired surrogate escape)");
    put_str(c->out, s, n);
    return check_size(c);
}

static int open_container(jctx *c, int is_map) {
    if (!add_elem(c)) return 0;
    if (c->depth >= c->lim->max_depth)
        return fail(c, "nesting deeper than %u", c->lim->max_depth);
    if (c->depth == c->cap) {
        unsigned cap = c->cap ? c->cap * 2 : 16;
        frame *s = realloc(c->stack, sizeof *s * cap);
        if (!s) tm_oom();
        c->stack = s;
        c->cap = cap;
    }
    frame *f = &c->stack[c->depth++];
    f->hdr = c->out->len;
    f->count = 0;
    f->is_map = is_map;
    static const char hdr[2][5] = {{(char)0xdd, 0, 0, 0, 0}, {(char)0xdf, 0, 0, 0, 0}};
    buf_append(c->out, hdr[is_map], 5);
    return check_size(c);
}

static int close_container(jctx *c) {
    frame *f = &c->stack[--c->depth];
    unsigned char *h = (unsigned char *)c->out->ptr + f->hdr;
    h[1] = (unsigned char)(f->count >> 24);
    h[2] = (unsigned char)(f->count >> 16);
    h[3] = (unsigned char)(f->count >> 8);
    h[4] = (unsigned char)f->count;
    c->saved += 5 - hdr_size(f->count);
    return 1;
}

static int cb_start_map(void *ctx) { return open_container(ctx, 1); }
static int cb_start_array(void *ctx) { return open_container(ctx, 0); }
static int cb_end(void *ctx) { return close_container(ctx); }

static int cb_map_key(void *ctx, const unsigned char *s, size_t n) {
    jctx *c = ctx;
    frame *f = &c->stack[c->depth - 1];
    if (++f->count > c->lim->max_items)
        return fail(c, "object of more than %u items", c->lim->max_items);
    if (n > UINT32_MAX) return fail(c, "key longer than %u bytes", UINT32_MAX);
    if (bad_utf8(s, n)) return fail(c, "key is not valid UTF-8 (or an unpaired surrogate escape)");
    put_str(c->out, s, n);
    return check_size(c);
}

static const yajl_callbacks json_callbacks = {
    .yajl_null = cb_null,
    .yajl_boolean = cb_bool,
    .yajl_number = cb_number,
    .yajl_string = cb_string,
    .yajl_start_map = cb_start_map,
    .yajl_map_key = cb_map_key,
    .yajl_end_map = cb_end,
    .yajl_start_array = cb_start_array,
    .yajl_end_array = cb_end,
};

/* Rewrite every 5-byte container header at [from, out->len) in its
 * smallest form, sliding the bytes between headers down. */
static void compact(buf *out, size_t from) {
    char *b = out->ptr;
    const char *r = b + from, *end = b + out->len;
    char *w = b + from;
    const char *run = r; /* start of bytes not yet copied */
    while (r < end) {
        unsigned char c = (unsigned char)*r;
        if (c == 0xdd || c == 0xdf) {
            size_t rl = (size_t)(r - run);
            if (w != run) memmove(w, run, rl);
            w += rl;
            const unsigned char *h = (const unsigned char *)r;
            uint32_t n = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
            int is_map = c == 0xdf;
            if (n < 16) {
                *w++ = (char)((is_map ? 0x80 : 0x90) | n);
            } else if (n < 65536) {
                *w++ = (char)(is_map ? 0xde : 0xdc);
                *w++ = (char)(n >> 8);
                *w++ = (char)n;
            } else {
                memmove(w, r, 5);
                w += 5;
            }
            r += 5;
            run = r;
            continue;
        }
        mp_item it;
        if (mp_next(&r, end, &it) < 0) abort(); /* we wrote these bytes */
    }
    size_t rl = (size_t)(r - run);
    if (w != run) memmove(w, run, rl);
    w += rl;
    out->len = (size_t)(w - b);
    out->ptr[out->len] = '\0';
}

/* yajl's message, made one line. */
static void set_yajl_error(tm_err *err, yajl_handle h, const char *text, size_t len, size_t off) {
    unsigned char *m = yajl_get_error(h, 0, (const unsigned char *)text, len);
    char *s = (char *)m;
    size_t n = s ? strlen(s) : 0;
    while (n && (s[n - 1] == '\n' || s[n - 1] == ' ' || s[n - 1] == '.')) s[--n] = '\0';
    for (size_t i = 0; i < n; i++)
        if (s[i] == '\n' || s[i] == '\r') s[i] = ' ';
    err_set(err, TM_EINVAL, "invalid JSON at byte %zu: %s", off, s ? s : "parse error");
    if (m) yajl_free_error(h, m);
}

/* ---- the fast path ----
 * A small parser for the common case, driving the same callbacks as yajl
 * (so the output bytes and the limits are the same by construction).  It
 * accepts a subset of what yajl accepts: standard JSON with whitespace
 * ' ', '\t', '\n', '\r'; strings of bytes >= 0x20 other than DEL, strictly
 * valid UTF-8, with the escapes \" \\ \/ \b \f \n \r \t (no \u).  On
 * anything else -- including every error and every limit a callback
 * reports -- it returns 0 and json_to_mp parses the text again with yajl,
 * which then gives the exact error message or handles the construct.
 * Returns 1 when the whole text was one value and was delivered. */

static inline const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')) p++;
    return p;
}

static const char esc_of[128] = {['"'] = '"', ['\\'] = '\\', ['/'] = '/', ['b'] = '\b',
                                 ['f'] = '\f', ['n'] = '\n', ['r'] = '\r', ['t'] = '\t'};

/* Byte classes inside a string: 0 plain ASCII, 1 '"', '\\', control or
 * DEL (stop), 2 >= 0x80 (UTF-8: checked after). */
static unsigned char str_class[256];
static pthread_once_t str_class_once = PTHREAD_ONCE_INIT;

static void str_class_init(void) {
    for (int i = 0; i < 256; i++)
        str_class[i] = i < 0x20 || i == 0x7f || i == '"' || i == '\\' ? 1 : i >= 0x80 ? 2 : 0;
}

/* A string at *pp (just after the opening quote).  Sets s, n to its bytes, in
 * the text or (escapes) in tmp.  0 = not for the fast path. */
static int fast_string(const char **pp, const char *end, buf *tmp, const char **s, size_t *n) {
    const unsigned char *p = (const unsigned char *)*pp, *e = (const unsigned char *)end;
    const unsigned char *start = p;
    int high = 0;
    for (;;) { /* plain bytes: class 0 (see str_class) */
        while (p + 4 <= e && !(str_class[p[0]] | str_class[p[1]] | str_class[p[2]] |
                                str_class[p[3]]))
            p += 4;
        while (p < e && !str_class[*p]) p++;
        if (p >= e) return 0;
        unsigned char ch = *p;
        if (ch == '"') break;
        if (str_class[ch] != 2) goto slow;
        high = 1;
        p++;
    }
    *s = (const char *)start;
    *n = (size_t)(p - start);
    *pp = (const char *)p + 1;
    return !high || json_utf8_valid(*s, *n);
slow: /* escapes: unescape into tmp */
    buf_reset(tmp);
    buf_append(tmp, start, (size_t)(p - start));
    for (;;) {
        if (p >= e) return 0;
        unsigned char ch = *p++;
        if (ch == '"') break;
        if (ch < 0x20 || ch == 0x7f) return 0;
        if (ch == '\\') {
            if (p >= e || *p >= 128 || !esc_of[*p]) return 0; /* incl. \u */
            ch = (unsigned char)esc_of[*p++];
        }
        high |= ch & 0x80;
        buf_putc(tmp, (char)ch);
    }
    *s = tmp->ptr;
    *n = tmp->len;
    *pp = (const char *)p;
    return !high || json_utf8_valid(*s, *n);
}

/* A number's text per the JSON grammar at *pp; 0 = not one. */
static int fast_number(const char **pp, const char *end) {
    const char *p = *pp;
    if (p < end && *p == '-') p++;
    if (p >= end) return 0;
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9')
        while (p < end && *p >= '0' && *p <= '9') p++;
    else return 0;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return 0;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return 0;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    *pp = p;
    return 1;
}

static int fast_literal(const char **pp, const char *end, const char *lit, size_t n) {
    if ((size_t)(end - *pp) < n || memcmp(*pp, lit, n) != 0) return 0;
    *pp += n;
    return 1;
}

static int fast_parse(jctx *c, const char *text, size_t len) {
    pthread_once(&str_class_once, str_class_init);
    const char *p = text, *end = text + len, *s;
    size_t n;
    buf tmp = BUF_INIT;
    int ok = 0;
value:
    p = skip_ws(p, end);
    if (p >= end) goto out;
    switch (*p) {
    case '{':
        p++;
        if (!cb_start_map(c)) goto out;
        p = skip_ws(p, end);
        if (p < end && *p == '}') {
            p++;
            cb_end(c);
            goto after;
        }
        goto key;
    case '[':
        p++;
        if (!cb_start_array(c)) goto out;
        p = skip_ws(p, end);
        if (p < end && *p == ']') {
            p++;
            cb_end(c);
            goto after;
        }
        goto value;
    case '"':
        p++;
        if (!fast_string(&p, end, &tmp, &s, &n) || !cb_string(c, (const unsigned char *)s, n))
            goto out;
        goto after;
    case 't':
        if (!fast_literal(&p, end, "true", 4) || !cb_bool(c, 1)) goto out;
        goto after;
    case 'f':
        if (!fast_literal(&p, end, "false", 5) || !cb_bool(c, 0)) goto out;
        goto after;
    case 'n':
        if (!fast_literal(&p, end, "null", 4) || !cb_null(c)) goto out;
        goto after;
    default:
        s = p;
        if (!fast_number(&p, end) || !cb_number(c, s, (size_t)(p - s))) goto out;
        goto after;
    }
key:
    if (p >= end || *p != '"') goto out;
    p++;
    if (!fast_string(&p, end, &tmp, &s, &n) || !cb_map_key(c, (const unsigned char *)s, n))
        goto out;
    p = skip_ws(p, end);
    if (p >= end || *p != ':') goto out;
    p++;
    goto value;
after:
    p = skip_ws(p, end);
    if (!c->depth) {
        ok = p == end;
        goto out;
    }
    if (p >= end) goto out;
    if (*p == ',') {
        p = skip_ws(p + 1, end);
        if (c->stack[c->depth - 1].is_map) goto key;
        goto value;
    }
    if (*p != (c->stack[c->depth - 1].is_map ? '}' : ']')) goto out;
    p++;
    cb_end(c);
    goto after;
out:
    buf_free(&tmp);
    return ok && !c->failed;
}

/* Back to the state before any callback ran (the fast path gave up). */
static void jctx_rewind(jctx *c) {
    c->out->len = c->start;
    if (c->out->ptr) c->out->ptr[c->out->len] = '\0';
    c->depth = 0;
    c->saved = 0;
    c->failed = 0;
}

static int fast_path_on = 1;

void json_set_fast_path(int on) { fast_path_on = on; }

int json_to_mp(const char *text, size_t len, const mp_limits *lim, buf *out, tm_err *err) {
    jctx c = {0};
    c.out = out;
    c.start = out->len;
    c.lim = lim ? lim : &mp_default_limits;
    c.err = err;
    msgpack_packer_init(&c.pk, out, pk_write);
    int rc = -1;
    if (fast_path_on && fast_parse(&c, text, len)) {
        if (out->len - c.start - c.saved <= c.lim->max_size) {
            if (c.saved) compact(out, c.start);
            free(c.stack);
            return 0;
        }
    }
    jctx_rewind(&c);
    yajl_handle h = yajl_alloc(&json_callbacks, NULL, &c);
    if (!h) tm_oom();
    yajl_status st = yajl_parse(h, (const unsigned char *)text, len);
    size_t off = yajl_get_bytes_consumed(h);
    if (st == yajl_status_ok) {
        st = yajl_complete_parse(h);
        off = len;
    }
    if (st == yajl_status_client_canceled && c.failed) {
        err_prefix(err, "invalid JSON at byte %zu", off);
        goto out;
    }
    if (st != yajl_status_ok) {
        set_yajl_error(err, h, text, len, off);
        goto out;
    }
    if (out->len - c.start - c.saved > c.lim->max_size) {
        err_set(err, TM_EINVAL, "invalid JSON: value exceeds size limit of %zu bytes",
                c.lim->max_size);
        goto out;
    }
    if (c.saved) compact(out, c.start);
    rc = 0;
out:
    yajl_free(h);
    free(c.stack);
    if (rc) {
        out->len = c.start;
        if (out->ptr) out->ptr[out->len] = '\0';
    }
    return rc;
}

/* ---- strings ---- */

/* buf_putc without a call when there is room (the printer's hot path). */
static inline void put_c(buf *out, char c) {
    if (out->len + 1 < out->cap) {
        out->ptr[out->len++] = c;
        out->ptr[out->len] = '\0';
    } else {
        buf_putc(out, c);
    }
}


/* Length of the valid UTF-8 sequence at s (n > 0 bytes available), or the
 * negated length of the maximal invalid subpart (at least 1) to replace. */
static long utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t need;
    unsigned lo = 0x80, hi = 0xbf;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c == 0xe0) need = 2, lo = 0xa0;
    else if (c >= 0xe1 && c <= 0xef) need = 2, hi = c == 0xed ? 0x9f : 0xbf;
    else if (c == 0xf0) need = 3, lo = 0x90;
    else if (c >= 0xf1 && c <= 0xf3) need = 3;
    else if (c == 0xf4) need = 3, hi = 0x8f;
    else return -1;
    for (size_t i = 1; i <= need; i++) {
        if (i >= n || s[i] < lo || s[i] > hi) return -(long)i;
        lo = 0x80, hi = 0xbf;
    }
    return (long)need + 1;
}

int json_utf8_valid(const char *s, size_t len) {
    const unsigned char *p = (const unsigned char *)s, *e = p + len;
    while (p < e) {
        if (*p < 0x80) {
            p++;
            continue;
        }
        long k = utf8_seq(p, (size_t)(e - p));
        if (k < 0) return 0;
        p += k;
    }
    return 1;
}

/* 0 = copy as is; 'u' = \u00XX; other = \<that char> */
static const char esc[256] = {
    ['\b'] = 'b', ['\f'] = 'f', ['\n'] = 'n', ['\r'] = 'r', ['\t'] = 't',
    [0x00] = 'u', [0x01] = 'u', [0x02] = 'u', [0x03] = 'u', [0x04] = 'u', [0x05] = 'u',
    [0x06] = 'u', [0x07] = 'u', [0x0b] = 'u', [0x0e] = 'u', [0x0f] = 'u', [0x10] = 'u',
    [0x11] = 'u', [0x12] = 'u', [0x13] = 'u', [0x14] = 'u', [0x15] = 'u', [0x16] = 'u',
    [0x17] = 'u', [0x18] = 'u', [0x19] = 'u', [0x1a] = 'u', [0x1b] = 'u', [0x1c] = 'u',
    [0x1d] = 'u', [0x1e] = 'u', [0x1f] = 'u', ['"'] = '"', ['\\'] = '\\',
};

/* Short strings: reserve the worst case (6 bytes per input byte, as
 * \u00XX) once, then write without further checks. */
static void put_short_string(buf *out, const unsigned char *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    if (out->cap - out->len <= 6 * len + 2) buf_reserve(out, 6 * len + 2);
    char *w = out->ptr + out->len;
    const unsigned char *e = s + len;
    *w++ = '"';
    while (s < e) {
        /* four plain ASCII bytes at a time */
        while (e - s >= 4 && (s[0] | s[1] | s[2] | s[3]) < 0x80 &&
               !(esc[s[0]] | esc[s[1]] | esc[s[2]] | esc[s[3]])) {
            memcpy(w, s, 4);
            w += 4;
            s += 4;
        }
        if (s >= e) break;
        unsigned c = *s;
        if (c < 0x80) {
            char x = esc[c];
            if (!x) {
                *w++ = (char)c;
            } else if (x == 'u') {
                memcpy(w, "\\u00", 4);
                w[4] = hex[c >> 4];
                w[5] = hex[c & 15];
                w += 6;
            } else {
                w[0] = '\\';
                w[1] = x;
                w += 2;
            }
            s++;
            continue;
        }
        long k = utf8_seq(s, (size_t)(e - s));
        if (k > 0) {
            memcpy(w, s, (size_t)k);
            w += k;
            s += k;
        } else {
            memcpy(w, "\xef\xbf\xbd", 3); /* U+FFFD: 3 bytes for >= 1 replaced */
            w += 3;
            s += -k;
        }
    }
    *w++ = '"';
    out->len = (size_t)(w - out->ptr);
    out->ptr[out->len] = '\0';
}

void json_put_string(buf *out, const char *str, size_t len) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str, *e = s + len;
    if (len <= 256) {
        put_short_string(out, s, len);
        return;
    }
    buf_reserve(out, len + 2);
    put_c(out, '"');
    while (s < e) {
        const unsigned char *run = s;
        while (s < e && *s < 0x80 && !esc[*s]) s++;
        if (s > run) buf_append(out, run, (size_t)(s - run));
        if (s >= e) break;
        unsigned c = *s;
        if (c < 0x80) {
            char x = esc[c];
            if (x == 'u') {
                char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
                buf_append(out, u, 6);
            } else {
                char u[2] = {'\\', x};
                buf_append(out, u, 2);
            }
            s++;
            continue;
        }
        long k = utf8_seq(s, (size_t)(e - s));
        if (k > 0) {
            buf_append(out, s, (size_t)k);
            s += k;
        } else {
            buf_append(out, "\xef\xbf\xbd", 3);
            s += -k;
        }
    }
    put_c(out, '"');
}

/* ---- msgpack -> JSON ---- */

static void put_u64(buf *out, uint64_t v, int neg) {
    char t[24];
    char *p = t + sizeof t;
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (neg) *--p = '-';
    buf_append(out, p, (size_t)(t + sizeof t - p));
}

static void put_i64(buf *out, int64_t v) {
    if (v < 0) put_u64(out, (uint64_t)0 - (uint64_t)v, 1);
    else put_u64(out, (uint64_t)v, 0);
}

/* Make snprintf's %g output locale-proof: keep digits, sign, exponent;
 * whatever else is the decimal point (possibly multibyte) becomes '.'. */
static int c_number(char *s, int n) {
    int w = 0, dot = 0;
    for (int i = 0; i < n; i++) {
        char ch = s[i];
        if ((ch >= '0' && ch <= '9') || ch == '-' || ch == '+' || ch == 'e' || ch == 'E') {
            s[w++] = ch;
        } else if (!dot) {
            s[w++] = '.';
            dot = 1;
        }
    }
    s[w] = '\0';
    return w;
}

/* Doubles in [1e-4, 1e15) that are exactly some decimal m / 10^k with
 * m < 10^15: print that decimal without printf.  Such a decimal of at most
 * 15 digits is the only one of that length naming d (DBL_DIG is 15), so
 * this prints what the %.15g path would, only faster. */
static int put_decimal_fast(buf *out, double d) {
    double a = fabs(d);
    if (!(a >= 1e-4 && a < 1e15)) return 0;
    for (int k = 1; k <= 19; k++) {
        double m = nearbyint(a * p10[k]);
        if (m >= 1e15) return 0;
        if (m / p10[k] != a) continue;
        uint64_t v = (uint64_t)m;
        while (k > 1 && v % 10 == 0) v /= 10, k--;
        char dig[24], t[48];
        int nd = 0, w = 0;
        do {
            dig[nd++] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        if (d < 0) t[w++] = '-';
        if (nd <= k) {
            t[w++] = '0';
            t[w++] = '.';
            for (int z = 0; z < k - nd; z++) t[w++] = '0';
            while (nd) t[w++] = dig[--nd];
        } else {
            while (nd > k) t[w++] = dig[--nd];
            t[w++] = '.';
            while (nd) t[w++] = dig[--nd];
        }
        buf_append(out, t, (size_t)w);
        return 1;
    }
    return 0;
}

static void put_real(buf *out, double d, int single) {
    if (!isfinite(d)) {
        buf_append(out, "null", 4);
        return;
    }
    /* integral values: fast and exact */
    if (d == trunc(d) && fabs(d) < 1e15) {
        if (d == 0 && signbit(d)) buf_append(out, "-0.0", 4);
        else {
            put_i64(out, (int64_t)d);
            buf_append(out, ".0", 2);
        }
        return;
    }
    if (!single && put_decimal_fast(out, d)) return;
    char s[40];
    int n = 0;
    int lo = single ? 6 : 15, hi = single ? 9 : 17;
    for (int prec = lo; prec <= hi; prec++) {
        n = c_number(s, snprintf(s, sizeof s, "%.*g", prec, d));
        if (single ? strtof_c(s, NULL) == (float)d : strtod_c(s, NULL) == d) break;
    }
    if (!memchr(s, '.', (size_t)n) && !memchr(s, 'e', (size_t)n)) {
        s[n++] = '.';
        s[n++] = '0';
    }
    buf_append(out, s, (size_t)n);
}

static void put_base64(buf *out, const unsigned char *s, size_t n) {
    static const char tb[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    buf_reserve(out, (n + 2) / 3 * 4 + 2);
    put_c(out, '"');
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        char q[4] = {tb[v >> 18], tb[(v >> 12) & 63], tb[(v >> 6) & 63], tb[v & 63]};
        buf_append(out, q, 4);
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)s[i] << 16;
        char q[4] = {tb[v >> 18], tb[(v >> 12) & 63], '=', '='};
        buf_append(out, q, 4);
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8;
        char q[4] = {tb[v >> 18], tb[(v >> 12) & 63], tb[(v >> 6) & 63], '='};
        buf_append(out, q, 4);
    }
    put_c(out, '"');
}

static int put_value(const char **p, const char *end, buf *out, int depth, int in_key,
                     tm_err *err);

/* A fixstr at *p (the commonest key and value): printed without the
 * general decoder.  1 done, 0 not a (whole) fixstr. */
static inline int put_fixstr(const char **p, const char *end, buf *out) {
    const unsigned char *q = (const unsigned char *)*p;
    if (q >= (const unsigned char *)end || (*q & 0xe0) != 0xa0) return 0;
    size_t n = *q & 0x1f;
    if ((size_t)((const unsigned char *)end - q) - 1 < n) return 0;
    put_short_string(out, q + 1, n);
    *p += 1 + n;
    return 1;
}

/* A map key: a string as itself; any other value as its JSON text in a
 * string.  Inside such a key (in_key) nested non-string keys are written
 * as plain text, so the whole key is escaped once: escaping at every
 * level would double the size per level (64 levels: 2^64 bytes). */
static int put_key(const char **p, const char *end, buf *out, int depth, int in_key,
                   tm_err *err) {
    if (put_fixstr(p, end, out)) return 0;
    const char *q = *p;
    mp_item it;
    if (mp_next(&q, end, &it) < 0)
        return err_set(err, TM_EINVAL, "msgpack: truncated or invalid map key");
    if (it.type == MP_STR) {
        json_put_string(out, it.v.s.ptr, it.v.s.len);
        *p = q;
        return 0;
    }
    if (in_key) return put_value(p, end, out, depth, 1, err);
    buf tmp = BUF_INIT;
    int rc = put_value(p, end, &tmp, depth, 1, err);
    if (rc == 0) json_put_string(out, tmp.ptr, tmp.len);
    buf_free(&tmp);
    return rc;
}

static int put_value(const char **p, const char *end, buf *out, int depth, int in_key,
                     tm_err *err) {
    if (put_fixstr(p, end, out)) return 0;
    if (*p < end && (unsigned char)**p < 0x80) { /* positive fixint */
        put_u64(out, (unsigned char)**p, 0);
        *p += 1;
        return 0;
    }
    mp_item it;
    if (mp_next(p, end, &it) < 0) return err_set(err, TM_EINVAL, "msgpack: truncated or invalid");
    switch (it.type) {
    case MP_NIL: buf_append(out, "null", 4); return 0;
    case MP_BOOL:
        if (it.v.b) buf_append(out, "true", 4);
        else buf_append(out, "false", 5);
        return 0;
    case MP_UINT: put_u64(out, it.v.u, 0); return 0;
    case MP_INT: put_i64(out, it.v.i); return 0;
    case MP_FLOAT: put_real(out, it.v.d, 1); return 0;
    case MP_DOUBLE: put_real(out, it.v.d, 0); return 0;
    case MP_STR: json_put_string(out, it.v.s.ptr, it.v.s.len); return 0;
    case MP_BIN:
        buf_append(out, "{\"$bin\":", 8);
        put_base64(out, (const unsigned char *)it.v.s.ptr, it.v.s.len);
        put_c(out, '}');
        return 0;
    case MP_EXT:
        buf_append(out, "{\"$ext\":", 8);
        put_i64(out, it.v.s.ext);
        buf_append(out, ",\"data\":", 8);
        put_base64(out, (const unsigned char *)it.v.s.ptr, it.v.s.len);
        put_c(out, '}');
        return 0;
    case MP_ARRAY:
    case MP_MAP:
        break;
    }
    if (depth >= JSON_MAX_DEPTH) return err_set(err, TM_EINVAL, "msgpack: nesting too deep");
    int is_map = it.type == MP_MAP;
    put_c(out, is_map ? '{' : '[');
    for (uint32_t i = 0; i < it.v.n; i++) {
        if (i) put_c(out, ',');
        if (is_map) {
            if (put_key(p, end, out, depth + 1, in_key, err) < 0) return -1;
            put_c(out, ':');
        }
        if (put_value(p, end, out, depth + 1, in_key, err) < 0) return -1;
    }
    put_c(out, is_map ? '}' : ']');
    return 0;
}

int json_from_mp(const char *mp, size_t len, buf *out, tm_err *err) {
    size_t start = out->len;
    const char *p = mp, *end = mp + len;
    int rc = put_value(&p, end, out, 0, 0, err);
    if (rc == 0 && p != end) rc = err_set(err, TM_EINVAL, "msgpack: trailing bytes after value");
    if (rc < 0) {
        out->len = start;
        if (out->ptr) out->ptr[start] = '\0';
    }
    return rc;
}

/* ------------------------------------------------------------ objects out */

int json_render_pair(buf *out, const char *k, size_t kl, const char *mp, size_t len,
                     tm_err *err) {
    json_put_string(out, k, kl);
    buf_putc(out, ':');
    return json_from_mp(mp, len, out, err);
}

#define OBJW_CHUNK (64 * 1024)

void json_objw_init(json_objw *w, FILE *f) {
    w->f = f;
    w->b = (buf)BUF_INIT;
    w->n = 0;
    w->io = 0;
    w->bad = 0;
    err_clear(&w->err);
}

static void objw_flush(json_objw *w) {
    if (w->b.len && !w->io && fwrite(w->b.ptr, 1, w->b.len, w->f) != w->b.len) w->io = errno ? errno : EIO;
    buf_reset(&w->b);
}

static void objw_sep(json_objw *w) {
    buf_putc(&w->b, w->n++ ? ',' : '{');
}

int json_objw_pair(json_objw *w, const char *k, size_t kl, const char *mp, size_t len,
                   tm_err *err) {
    objw_sep(w);
    if (json_render_pair(&w->b, k, kl, mp, len, err) < 0) return -1;
    if (w->b.len >= OBJW_CHUNK) objw_flush(w);
    return 0;
}

int json_objw_each(void *ctx, const char *k, size_t kl, const char *mp, size_t len) {
    json_objw *w = ctx;
    if (json_objw_pair(w, k, kl, mp, len, &w->err) < 0) w->bad = 1;
    return w->bad || w->io;
}

void json_objw_rendered_run(json_objw *w, const char *text, size_t len, size_t n) {
    if (!n) return;
    objw_sep(w);
    w->n += n - 1;
    objw_flush(w);
    if (!w->io && fwrite(text, 1, len, w->f) != len) w->io = errno ? errno : EIO;
}

int json_objw_failed(const json_objw *w) { return w->io; }

int json_objw_end(json_objw *w, tm_err *err) {
    if (w->bad) {
        buf_free(&w->b);
        *err = w->err;
        return -1;
    }
    buf_puts(&w->b, w->n ? "}\n" : "{}\n");
    objw_flush(w);
    buf_free(&w->b);
    if (!w->io && fflush(w->f) != 0) w->io = errno ? errno : EIO;
    if (w->io) return err_set(err, TM_EIO, "cannot write the output: %s", strerror(w->io));
    return 0;
}

void json_objw_free(json_objw *w) { buf_free(&w->b); }
