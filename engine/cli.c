/* cli.c — helpers shared by the command-line commands (see cli.h). */
#include "cli.h"

#include "buf.h"
#include "json.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cli_fail(const char *cmd, const tm_err *e) {
    fprintf(stderr, "tidemark %s: %s\n", cmd, e->msg[0] ? e->msg : err_code_name(e->code));
    return e->code ? e->code : 1;
}

int cli_usage_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "tidemark %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "; see 'tidemark %s --help'\n", cmd);
    va_end(ap);
    return TM_EINVAL;
}

int cli_parse_u64(const char *cmd, const char *opt, const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    if (!s || !*s || *s == '-') goto bad;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end) goto bad;
    *out = v;
    return 0;
bad:
    cli_usage_error(cmd, "%s wants a non-negative integer, got '%s'", opt, s ? s : "");
    return -1;
}

int cli_parse_durability(const char *cmd, const char *s, store_durability *out) {
    if (!strcmp(s, "durable")) *out = STORE_DURABLE;
    else if (!strcmp(s, "lose-on-os-crash")) *out = STORE_LOSE_ON_OS_CRASH;
    else {
        cli_usage_error(cmd, "--durability is 'durable' (default) or 'lose-on-os-crash', not '%s'",
                        s);
        return -1;
    }
    return 0;
}

store *cli_open_store(const char *cmd, const char *dir, int create, const store_opts *opts,
                      int *status) {
    if (!dir) {
        *status = cli_usage_error(cmd, "--data DIR is required");
        return NULL;
    }
    store_opts o;
    if (opts) o = *opts;
    else store_opts_default(&o);
    o.create_if_missing = create;
    o.use_reserve = !create; /* read, export, check: keep working on a full disk */
    tm_err e;
    err_clear(&e);
    store *s = store_open(dir, &o, &e);
    if (!s) *status = cli_fail(cmd, &e);
    return s;
}

int cli_open_code(int e) {
    if (e == ENOENT || e == ENOTDIR) return TM_ENOTFOUND;
    if (e == EACCES || e == EISDIR) return TM_EINVAL;
    return TM_EIO;
}

int cli_read_file(const char *path, buf *out, tm_err *err) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) return err_set(err, cli_open_code(errno), "cannot open %s: %s", path, strerror(errno));
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) buf_append(out, tmp, n);
    int bad = ferror(f);
    if (f != stdin) fclose(f);
    if (bad) return err_set(err, TM_EIO, "cannot read %s", path);
    return 0;
}

char *cli_projection_name(const char *path) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    size_t n = strlen(b);
    if (n > 4 && !strcmp(b + n - 4, ".lua")) n -= 4;
    if (n == 0 || !strcmp(path, "-")) return strdup("projection");
    return strndup(b, n);
}

int cli_print_json(const char *cmd, const buf *mp) {
    buf out = BUF_INIT;
    tm_err err;
    if (json_from_mp(mp->ptr, mp->len, &out, &err) < 0) {
        buf_free(&out);
        return cli_fail(cmd, &err);
    }
    buf_putc(&out, '\n');
    fwrite(out.ptr, 1, out.len, stdout);
    buf_free(&out);
    return fflush(stdout) == 0 ? 0 : 4;
}

int cli_print_pairs(const char *cmd, cli_pairs_fn pairs, void *src) {
    tm_err err;
    err_clear(&err);
    json_objw w;
    json_objw_init(&w, stdout);
    if (pairs(src, json_objw_each, &w, &err) < 0) {
        json_objw_free(&w);
        return cli_fail(cmd, &err);
    }
    return json_objw_end(&w, &err) < 0 ? cli_fail(cmd, &err) : 0;
}

int cli_print_object(const char *cmd, cli_object_fn write, void *src) {
    tm_err err;
    err_clear(&err);
    json_objw w;
    json_objw_init(&w, stdout);
    if (write(src, &w, &err) < 0) {
        json_objw_free(&w);
        return cli_fail(cmd, &err);
    }
    return json_objw_end(&w, &err) < 0 ? cli_fail(cmd, &err) : 0;
}
