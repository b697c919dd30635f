/* replsrc.h — where the REPL's events come from: a data directory opened
 * in-process (embedded) or a running server (remote, over HTTP).
 *
 * Both give the same reads, so every REPL command works the same way in
 * both modes.  Events returned by replsrc_next are borrowed views, valid
 * until the next call or replsrc_iter_free.
 */
#ifndef TM_REPLSRC_H
#define TM_REPLSRC_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "event.h"
#include "store.h"

typedef struct replsrc replsrc;
typedef struct replsrc_iter replsrc_iter;

typedef enum replsrc_kind {
    REPLSRC_ALL, REPLSRC_STREAM, REPLSRC_CATEGORY, REPLSRC_TYPE
} replsrc_kind;

typedef struct replsrc_sel {
    replsrc_kind kind;
    const char *name;   /* stream / category / type (borrowed) */
    size_t name_len;
    uint64_t from;      /* version (stream) or position (others), inclusive;
                           backward: UINT64_MAX = from the end */
    int backward;       /* stream and all only */
    uint64_t limit;     /* 0 = no limit */
} replsrc_sel;

/* Embedded: open (and lock) a data directory.  When a server holds it the
 * error says so and suggests --url. */
replsrc *replsrc_open_local(const char *dir, tm_err *err);
/* Remote: http://host:port[/prefix]; checks that the server answers. */
replsrc *replsrc_open_remote(const char *url, tm_err *err);
void replsrc_close(replsrc *s);

int replsrc_is_remote(const replsrc *s);
const char *replsrc_where(const replsrc *s);     /* the directory or URL */
store *replsrc_store(replsrc *s);                /* embedded only, else NULL */
const char *replsrc_url(const replsrc *s);       /* remote only, else NULL */

int replsrc_last_position(replsrc *s, uint64_t *pos, tm_err *err);
replsrc_iter *replsrc_read(replsrc *s, const replsrc_sel *sel, tm_err *err);
/* 1 = ev filled, 0 = end, -1 = error. */
int replsrc_next(replsrc_iter *it, tm_event *ev, tm_err *err);
void replsrc_iter_free(replsrc_iter *it);

/* Stream names with their versions / category names (version -1). */
int replsrc_list_streams(replsrc *s, store_name_fn fn, void *ud, tm_err *err);
int replsrc_list_categories(replsrc *s, store_name_fn fn, void *ud, tm_err *err);

#endif
