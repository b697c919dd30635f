/* repl.c — `tidemark repl`: options, the event source, and the three ways
 * to run Lua: -e CHUNK, -f FILE (or a script on stdin when it is not a
 * terminal), and the interactive prompt (replline.c).
 *
 * Exit status (DESIGN.md): 0 success; 1 usage, Lua errors or bad input;
 * otherwise the status of the engine error that stopped the script (2 not
 * found, 3 conflict, 4 I/O); 130 when interrupted with Ctrl-C.
 */
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buf.h"
#include "cli.h"
#include "repl.h"
#include "replproj.h"

static const char repl_help[] =
    "usage: tidemark repl [--data DIR | --url URL] [-e CHUNK | -f FILE.lua] [options]\n"
    "\n"
    "A Lua prompt over your events: expressions print their values, ad-hoc\n"
    "queries run over history, projections can be inspected and loaded.\n"
    "Type .help at the prompt.  See docs/repl.md.\n"
    "\n"
    "  --data DIR        open a data directory in-process (embedded)\n"
    "  --url URL         talk to a running server (http://HOST:PORT)\n"
    "  -e CHUNK          run CHUNK, print its results, exit\n"
    "  -f FILE.lua       run a script file (one chunk), print its results, exit\n"
    "                    (with neither and stdin not a terminal, stdin is read\n"
    "                    line by line like the prompt; the first error stops it)\n"
    "  --format FMT      table (default), json, csv or vertical\n"
    "  --no-progress     no progress bars on stderr\n"
    "  --cpu-limit S     CPU seconds one command may use (default 600, 0 = none);\n"
    "                    past it interpreted code fails, a JIT-compiled loop is\n"
    "                    abandoned with the Lua state (as with Ctrl-C twice)\n"
    "  --workers N       cores a query runs on (embedded; default: every core for\n"
    "                    scans of 50,000 events or more, 1 = always serial); see\n"
    "                    'Parallel queries' in docs/repl.md\n"
    "\n"
    "Environment: TIDEMARK_HISTORY (history file, default ~/.tidemark_history).\n"
    "Exit status: 0 ok, 1 usage or Lua error, 2 not found, 3 conflict, 4 I/O,\n"
    "130 interrupted.\n";

static int read_all(FILE *f, buf *out) {
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) buf_append(out, tmp, n);
    return ferror(f) ? -1 : 0;
}

static int run_chunk(repl *r, const char *code, size_t len, const char *name) {
    repllua_result res = repllua_eval(r, code, len, name, 0);
    fflush(stdout);
    if (res == REPLLUA_OK) return 0;
    return r->fail_code ? r->fail_code : 1;
}

int cli_repl(int argc, char **argv) {
    static const struct option opts[] = {
        {"data", required_argument, NULL, 'd'},
        {"url", required_argument, NULL, 'u'},
        {"format", required_argument, NULL, 'F'},
        {"no-progress", no_argument, NULL, 'P'},
        {"cpu-limit", required_argument, NULL, 'C'},
        {"workers", required_argument, NULL, 'W'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *data = NULL, *url = NULL, *chunk = NULL, *file = NULL, *format = NULL;
    int no_progress = 0, c, workers = 0;
    double cpu_limit = 600;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":e:f:h", opts, NULL)) != -1) {
        switch (c) {
        case 'd': data = optarg; break;
        case 'u': url = optarg; break;
        case 'e': chunk = optarg; break;
        case 'f': file = optarg; break;
        case 'F': format = optarg; break;
        case 'P': no_progress = 1; break;
        case 'C': {
            char *end;
            cpu_limit = strtod(optarg, &end);
            if (*end || cpu_limit < 0)
                return cli_usage_error("repl", "--cpu-limit wants seconds (0 = none), got '%s'", optarg);
            break;
        }
        case 'W': {
            char *end;
            long n = strtol(optarg, &end, 10);
            if (*end || end == optarg || n < 1 || n > 16)
                return cli_usage_error("repl", "--workers wants a number from 1 to 16, got '%s'", optarg);
            workers = (int)n;
            break;
        }
        case 'h': fputs(repl_help, stdout); return 0;
        case ':': return cli_usage_error("repl", "%s needs a value", argv[optind - 1]);
        default: return cli_usage_error("repl", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) return cli_usage_error("repl", "unexpected argument '%s'", argv[optind]);
    if (!data == !url) return cli_usage_error("repl", "give one of --data DIR or --url URL");
    if (chunk && file) return cli_usage_error("repl", "give -e or -f, not both");
    if (format && strcmp(format, "table") && strcmp(format, "json") && strcmp(format, "csv") &&
        strcmp(format, "vertical"))
        return cli_usage_error("repl", "--format is table, json, csv or vertical");

    buf script = BUF_INIT;
    if (file) {
        FILE *f = fopen(file, "rb");
        if (!f) {
            fprintf(stderr, "tidemark repl: cannot open %s\n", file);
            return TM_ENOTFOUND;
        }
        int bad = read_all(f, &script);
        fclose(f);
        if (bad) {
            buf_free(&script);
            fprintf(stderr, "tidemark repl: cannot read %s\n", file);
            return TM_EIO;
        }
    }

    tm_err e;
    err_clear(&e);
    repl r;
    memset(&r, 0, sizeof r);
    r.cpu_limit = cpu_limit;
    r.workers = workers;
    /* Threads the store starts (its writer) must never take the REPL's
     * SIGINT: they inherit this mask; the main thread unblocks it after. */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    r.src = data ? replsrc_open_local(data, &e) : replsrc_open_remote(url, &e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!r.src) {
        buf_free(&script);
        return cli_fail("repl", &e);
    }
    int batch = chunk || file || !isatty(0);
    r.interactive = !batch;
    r.progress = !no_progress && isatty(2);
    if (batch && !chunk && !file) r.progress = r.progress && isatty(1);
    if (repllua_open(&r) < 0) {
        replsrc_close(r.src);
        buf_free(&script);
        return TM_EIO;
    }
    int status = 0;
    if (format) {
        char line[64];
        snprintf(line, sizeof line, ".format %s", format);
        repllua_dot(&r, line);
    }
    if (chunk) {
        status = run_chunk(&r, chunk, strlen(chunk), "=(command line)");
    } else if (file) {
        char name[1024];
        snprintf(name, sizeof name, "@%s", file);
        status = run_chunk(&r, script.ptr ? script.ptr : "", script.len, name);
    } else {
        status = replline_run(&r);
    }
    buf_free(&script);
    repllua_close(&r);
    replproj_close();
    replsrc_close(r.src);
    return status;
}
