/* cli.h — the command-line front end: one entry point per command and the
 * helpers every command shares.
 *
 * Each cli_<cmd>(argc, argv) gets argv[0] = the command name, parses its
 * own options (getopt_long; options may follow positional arguments),
 * answers --help, and returns the process exit status of DESIGN.md:
 * 0 success, 1 usage or bad input, 2 not found, 3 version conflict,
 * 4 I/O or corruption.  Errors are printed once, here at the edge, as one
 * line on stderr: "tidemark CMD: message".
 */
#ifndef TM_CLI_H
#define TM_CLI_H

#include <stdint.h>

#include "buf.h"
#include "err.h"
#include "json.h"
#include "proj.h"
#include "store.h"

/* Commands (cli_store.c unless noted). */
int cli_append(int argc, char **argv);
int cli_read(int argc, char **argv);
int cli_import(int argc, char **argv);
int cli_export(int argc, char **argv);
int cli_check(int argc, char **argv);
int cli_project(int argc, char **argv);   /* cli_project.c */
int cli_replay(int argc, char **argv);    /* cli_replay.c */
int cli_serve(int argc, char **argv);     /* cli_serve.c */
int cli_repl(int argc, char **argv);      /* repl/ */

/* Shared helpers (cli.c). */
/* Print "tidemark CMD: message" for e and return its exit status. */
int cli_fail(const char *cmd, const tm_err *e);
/* Print a usage error ("tidemark CMD: msg; see 'tidemark CMD --help'"), return 1. */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Parse a non-negative integer option; -1 with a message on bad input. */
int cli_parse_u64(const char *cmd, const char *opt, const char *s, uint64_t *out);
/* Parse --durability: "durable" or "lose-on-os-crash". */
int cli_parse_durability(const char *cmd, const char *s, store_durability *out);
/* Open a data directory for the command; create = create if missing.
 * NULL after printing the error; *status gets the exit status. */
store *cli_open_store(const char *cmd, const char *dir, int create, const store_opts *opts,
                      int *status);

/* One-shot commands that scan history once (project, replay): the LevelDB
 * block cache they open the store with (each block is read once; the
 * default 64 MiB would fill up and stay resident for nothing). */
#define CLI_SCAN_CACHE_BYTES (8u << 20)

/* Print one msgpack value as JSON and a newline on stdout; the exit status. */
int cli_print_json(const char *cmd, const buf *mp);
/* Print a partitioned model as one JSON object, pair by pair as pairs(src,
 * each, ctx, err) hands them out (proj_state_pairs):
 * the same bytes as cli_print_json of the whole map, without holding its
 * JSON text.  Nothing reaches stdout when pairs fails before the first
 * pair.  The exit status. */
typedef int (*cli_pairs_fn)(void *src, proj_kv_fn each, void *ctx, tm_err *err);
int cli_print_pairs(const char *cmd, cli_pairs_fn pairs, void *src);
/* The same object, written by write(src, w, err) into w (replay_json_pairs:
 * pairs rendered in parallel).  The exit status. */
typedef int (*cli_object_fn)(void *src, json_objw *w, tm_err *err);
int cli_print_object(const char *cmd, cli_object_fn write, void *src);

/* The exit status for an input file that cannot be opened (errno e):
 * TM_ENOTFOUND when it does not exist, TM_EINVAL when it is not readable
 * as a file (permissions, a directory), else TM_EIO (ENOMEM, EMFILE ...). */
int cli_open_code(int e);
/* Append the whole file at path ("-" = stdin) to out. */
int cli_read_file(const char *path, buf *out, tm_err *err);
/* A projection's default name: the file's base name less ".lua"
 * ("projection" for stdin); malloc'd. */
char *cli_projection_name(const char *path);

#endif
