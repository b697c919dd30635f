/* buf.h — a growable byte buffer (the engine's one string builder).
 *
 * A plain value type: { ptr, len, cap }.  The buffer owns ptr (malloc'd);
 * buf_free releases it.  ptr is always NUL-terminated after any append
 * (not counted in len), so text built here can be printed directly.
 * Allocation failure aborts: the engine treats OOM as fatal.
 */
#ifndef TM_BUF_H
#define TM_BUF_H

#include <stddef.h>
#include <stdint.h>

typedef struct buf {
    char *ptr;
    size_t len;
    size_t cap;
} buf;

#define BUF_INIT {NULL, 0, 0}

void buf_reserve(buf *b, size_t extra);     /* room for extra more bytes */
void buf_append(buf *b, const void *p, size_t n);
void buf_putc(buf *b, char c);
void buf_puts(buf *b, const char *s);
void buf_printf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void buf_put_be64(buf *b, uint64_t v);
void buf_put_varint(buf *b, uint64_t v);    /* LEB128 */
void buf_reset(buf *b);                     /* len = 0, keeps memory */
void buf_free(buf *b);
char *buf_steal(buf *b, size_t *len);       /* caller owns the result; b is reset */

uint64_t buf_get_be64(const void *p);
/* Decode a LEB128 varint at *p (< end); advances *p. -1 on truncation. */
int buf_get_varint(const char **p, const char *end, uint64_t *v);

#endif
