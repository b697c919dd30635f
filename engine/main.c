/* main.c — the tidemark binary: dispatches `tidemark CMD ...` to the
 * command's cli_* entry point (cli.h) and prints the command overview. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "crash.h"
#include "projhost.h"

#ifndef TIDEMARK_VERSION
#define TIDEMARK_VERSION "0.1.0"
#endif

typedef struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *synopsis;
    const char *summary;
} command;

static const command commands[] = {
    {"append", cli_append, "--data DIR STREAM TYPE JSON [--expect V]", "append one event"},
    {"read", cli_read, "--data DIR (STREAM | --all | --category C | --type T) [--from N] [--limit N]",
     "read events as JSON lines"},
    {"import", cli_import, "--data DIR FILE.jsonl", "import JSON lines (- for stdin)"},
    {"export", cli_export, "--data DIR [--from POS]", "export all events as JSON lines"},
    {"check", cli_check, "--data DIR", "verify the store's invariants"},
    {"serve", cli_serve, "--data DIR [--port N] [--bind ADDR] [--projections DIR]",
     "serve the HTTP API, live events (SSE) and the dashboard"},
    {"project", cli_project, "--data DIR FILE.lua [--query NAME [ARGS]] [--cpu-limit S]",
     "run a projection over all history once, print its state as JSON"},
    {"replay", cli_replay, "--data DIR (NAME | FILE.lua) [--workers N] [--persist] [--resume]",
     "rebuild a projection from position 0 on every core (versioned, resumable)"},
    {"repl", cli_repl, "[--data DIR | --url URL] [-e CHUNK | -f FILE.lua]",
     "Lua prompt and ad-hoc queries over events"},
};

static void overview(FILE *out) {
    fprintf(out,
            "tidemark %s — event store and scriptable analytics engine\n\n"
            "usage: tidemark COMMAND [OPTIONS]\n\ncommands:\n",
            TIDEMARK_VERSION);
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        fprintf(out, "  %-8s %s\n           %s\n", commands[i].name, commands[i].summary,
                commands[i].synopsis);
    fprintf(out,
            "  help     this overview; 'tidemark help CMD' = 'tidemark CMD --help'\n\n"
            "exit status: 0 success, 1 usage or bad input, 2 not found, 3 version conflict,\n"
            "             4 I/O or corruption\n");
}

static const command *find(const char *name) {
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        if (!strcmp(commands[i].name, name)) return &commands[i];
    return NULL;
}

int main(int argc, char **argv) {
    crash_install();
    if (argc < 2) {
        overview(stderr);
        return 1;
    }
    const char *name = argv[1];
    if (!strcmp(name, "help") || !strcmp(name, "--help") || !strcmp(name, "-h")) {
        if (argc > 2 && find(argv[2])) {
            char *av[] = {argv[2], "--help", NULL};
            return find(argv[2])->run(2, av);
        }
        overview(stdout);
        return 0;
    }
    if (!strcmp(name, "--version") || !strcmp(name, "version")) {
        printf("tidemark %s\n", TIDEMARK_VERSION);
        return 0;
    }
    /* hidden: the projection worker process (projhost.h) */
    if (!strcmp(name, "__proj-worker")) return projhost_worker_main(argc - 1, argv + 1);
    const command *c = find(name);
    if (!c) {
        fprintf(stderr, "tidemark: unknown command '%s'; see 'tidemark help'\n", name);
        return 1;
    }
    return c->run(argc - 1, argv + 1);
}
