/* buf.c — growable byte buffer (see buf.h). */
#include "buf.h"
#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void buf_reserve(buf *b, size_t extra) {
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    char *p = realloc(b->ptr, cap);
    if (!p) {
        tm_oom();
    }
    b->ptr = p;
    b->cap = cap;
}

void buf_append(buf *b, const void *p, size_t n) {
    buf_reserve(b, n);
    if (n) memcpy(b->ptr + b->len, p, n);
    b->len += n;
    b->ptr[b->len] = '\0';
}

void buf_putc(buf *b, char c) {
    buf_reserve(b, 1);
    b->ptr[b->len++] = c;
    b->ptr[b->len] = '\0';
}

void buf_puts(buf *b, const char *s) { buf_append(b, s, strlen(s)); }

void buf_printf(buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->ptr + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void buf_put_be64(buf *b, uint64_t v) {
    unsigned char x[8];
    for (int i = 7; i >= 0; i--) {
        x[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
    buf_append(b, x, 8);
}

void buf_put_varint(buf *b, uint64_t v) {
    unsigned char x[10];
    size_t n = 0;
    while (v >= 0x80) {
        x[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    x[n++] = (unsigned char)v;
    buf_append(b, x, n);
}

void buf_reset(buf *b) {
    b->len = 0;
    if (b->ptr) b->ptr[0] = '\0';
}

void buf_free(buf *b) {
    free(b->ptr);
    b->ptr = NULL;
    b->len = b->cap = 0;
}

char *buf_steal(buf *b, size_t *len) {
    if (!b->ptr) buf_reserve(b, 0);
    char *p = b->ptr;
    if (len) *len = b->len;
    b->ptr = NULL;
    b->len = b->cap = 0;
    return p;
}

uint64_t buf_get_be64(const void *p) {
    const unsigned char *x = p;
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | x[i];
    return v;
}

int buf_get_varint(const char **p, const char *end, uint64_t *v) {
    uint64_t r = 0;
    int shift = 0;
    const unsigned char *q = (const unsigned char *)*p;
    while ((const char *)q < end && shift < 64) {
        unsigned char c = *q++;
        r |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            *v = r;
            *p = (const char *)q;
            return 0;
        }
        shift += 7;
    }
    return -1;
}
