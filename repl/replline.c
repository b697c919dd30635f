/* replline.c — the interactive prompt: libedit (readline compatibility
 * API) for editing, Ctrl-R reverse search, a history file kept across
 * sessions, and tab completion that asks the prelude (T.complete) for
 * dot commands, Lua globals and table fields, and stream / category /
 * event type / projection names inside string literals.
 *
 * Invariants: a chunk spanning several lines is one history entry; a
 * Ctrl-C at the prompt discards the pending input and shows a fresh
 * prompt (libedit reads through getc_utf8, which polls the Ctrl-C flag
 * and never blocks in read); Ctrl-D on an empty prompt quits.
 */
#include <editline/readline.h>
#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <poll.h>
#include <unistd.h>
#include <sys/types.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "repl.h"

#define PROMPT "tidemark> "
#define CONT "     ...> "
#define HISTORY_MAX 2000

static repl *g_repl;
static char **g_cands;
static size_t g_ncands, g_cand_next;


static void add_cand(void *ud, const char *c) {
    (void)ud;
    g_cands = realloc(g_cands, (g_ncands + 1) * sizeof *g_cands);
    g_cands[g_ncands++] = strdup(c);
}

static void free_cands(void) {
    for (size_t i = g_cand_next; i < g_ncands; i++) free(g_cands[i]);
    free(g_cands);
    g_cands = NULL;
    g_ncands = g_cand_next = 0;
}

static char *generator(const char *text, int state) {
    (void)text;
    if (g_cand_next < g_ncands) return g_cands[g_cand_next++]; /* readline frees it */
    (void)state;
    return NULL;
}

static char **complete(const char *text, int start, int end) {
    (void)end;
    free_cands();
    char *line = strdup(rl_line_buffer ? rl_line_buffer : "");
    if ((size_t)start <= strlen(line)) line[start + strlen(text) <= strlen(line) ? start + strlen(text) : strlen(line)] = 0;
    repllua_complete(g_repl, line, text, add_cand, NULL);
    free(line);
    rl_attempted_completion_over = 1; /* never fall back to file names */
    if (g_ncands == 0) return NULL;
    return rl_completion_matches(text, generator);
}

static const char *history_path(buf *b) {
    const char *h = getenv("TIDEMARK_HISTORY");
    if (h && *h) return h;
    const char *home = getenv("HOME");
    if (!home || !*home) return NULL;
    buf_printf(b, "%s/.tidemark_history", home);
    return b->ptr;
}

/* A second, non-blocking open file description of the terminal (so the
 * shell's stays as it was): a read after poll() must not block, and it
 * would when a Ctrl-C flushes the terminal's input between the two. */
static int g_nbfd = -1;

/* One byte of stdin, waiting in poll() so that a Ctrl-C (the SIGINT
 * handler's flag) ends the wait even when the signal did not interrupt
 * a system call (it may arrive between two). */
static int read_byte(int fd) {
    int rfd = g_nbfd >= 0 ? g_nbfd : fd;
    for (;;) {
        if (repl_cancel_requested()) return -1;
        struct pollfd p = {rfd, POLLIN, 0};
        int r = poll(&p, 1, 100);
        if (r < 0 && errno != EINTR) return -1;
        if (r <= 0) continue;
        unsigned char c;
        ssize_t n = read(rfd, &c, 1);
        if (n == 1) return c;
        if (n == 0) return -1;
        if (errno != EINTR && errno != EAGAIN) return -1;
    }
}

/* libedit's character source (rl_getc_function): a whole UTF-8 character
 * as a code point (libedit takes the int as a wchar_t); -1 = EOF, also on
 * Ctrl-C, after which readline() returns and the flag is checked. */
static int getc_utf8(FILE *f) {
    int fd = fileno(f);
    int c = read_byte(fd);
    if (c < 0x80 || MB_CUR_MAX == 1) return c; /* ASCII, -1, or a byte locale */
    int more = c >= 0xf0 ? 3 : c >= 0xe0 ? 2 : c >= 0xc0 ? 1 : 0;
    int cp = c & (0x3f >> more);
    for (int i = 0; i < more; i++) {
        int d = read_byte(fd);
        if (d < 0) return -1;
        cp = (cp << 6) | (d & 0x3f);
    }
    return cp;
}

static int is_dot(const char *line) {
    while (*line == ' ' || *line == '\t') line++;
    return line[0] == '.' && ((line[1] >= 'a' && line[1] <= 'z') || (line[1] >= 'A' && line[1] <= 'Z'));
}

static int blank(const char *s) {
    for (; *s; s++)
        if (*s != ' ' && *s != '\t' && *s != '\r' && *s != '\n') return 0;
    return 1;
}

/* Piped input: the same line rules as the prompt (dot commands, chunks
 * continued until complete), no prompt or history; stops at the first
 * error and returns its exit status. */
static int run_piped(repl *r) {
    buf chunk = BUF_INIT;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int status = 0;
    while ((n = getline(&line, &cap, stdin)) >= 0) {
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (chunk.len == 0 && blank(line)) continue;
        repllua_result res;
        if (chunk.len == 0 && is_dot(line)) {
            res = repllua_dot(r, line);
        } else {
            if (chunk.len) buf_putc(&chunk, '\n');
            buf_puts(&chunk, line);
            res = repllua_eval(r, chunk.ptr, chunk.len, "=stdin", 1);
            if (res == REPLLUA_INCOMPLETE) continue;
            buf_reset(&chunk);
        }
        if (res == REPLLUA_ERROR) {
            status = r->fail_code ? r->fail_code : 1;
            break;
        }
        if (r->quit) break;
    }
    if (status == 0 && chunk.len) /* input ended inside a chunk: report it */
        if (repllua_eval(r, chunk.ptr, chunk.len, "=stdin", 0) != REPLLUA_OK)
            status = r->fail_code ? r->fail_code : 1;
    free(line);
    buf_free(&chunk);
    fflush(stdout);
    return status;
}

int replline_run(repl *r) {
    if (!r->interactive) return run_piped(r);
    g_repl = r;
    buf hp = BUF_INIT;
    const char *hist = history_path(&hp);
    rl_readline_name = "tidemark";
    rl_attempted_completion_function = complete;
    rl_completion_append_character = 0;
    rl_basic_word_break_characters = " \t\n()[]{},;=+-*/<>~^%#&|";
    setlocale(LC_CTYPE, ""); /* libedit edits UTF-8 in a UTF-8 locale */
    rl_getc_function = getc_utf8;
    /* libedit's signal handling stays on (terminal modes around Ctrl-Z,
     * window size); its SIGINT handler restores cooked mode and re-raises
     * to the REPL's, which sets the flag getc_utf8 polls: reads never block
     * (g_nbfd), so the mode change cannot hold them. */
    const char *tty = ttyname(0);
    if (tty) g_nbfd = open(tty, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    rl_initialize();
    /* libedit's readline emulation leaves ^R unbound: bind incremental
     * reverse search (like GNU readline) */
    rl_parse_and_bind("bind ^R em-inc-search-prev");
    using_history();
    stifle_history(HISTORY_MAX);
    if (hist) read_history(hist);
    printf("tidemark repl on %s — .help for help, Ctrl-D to quit\n", replsrc_where(r->src));
    fflush(stdout);
    buf chunk = BUF_INIT;
    for (;;) {
        char *line = readline(chunk.len ? CONT : PROMPT);
        if (line && repl_cancel_requested()) { /* Ctrl-C ended a partial line */
            free(line);
            line = NULL;
        }
        if (!line) {
            if (repl_cancel_requested()) { /* Ctrl-C at the prompt */
                repl_cancel_clear();
                buf_reset(&chunk);
                fputs("\n", stdout);
                fflush(stdout);
                continue;
            }
            fputs("\n", stdout);
            break; /* Ctrl-D */
        }
        if (chunk.len == 0 && blank(line)) {
            free(line);
            continue;
        }
        if (chunk.len == 0 && is_dot(line)) {
            add_history(line);
            if (hist) write_history(hist);
            repllua_dot(r, line);
            free(line);
            if (r->quit) break;
            continue;
        }
        if (chunk.len) buf_putc(&chunk, '\n');
        buf_puts(&chunk, line);
        free(line);
        repllua_result res = repllua_eval(r, chunk.ptr, chunk.len, "=stdin", 1);
        if (res == REPLLUA_INCOMPLETE) continue;
        add_history(chunk.ptr);
        if (hist) write_history(hist);
        buf_reset(&chunk);
        if (r->quit) break;
    }
    buf_free(&chunk);
    buf_free(&hp);
    free_cands();
    if (g_nbfd >= 0) close(g_nbfd);
    g_nbfd = -1;
    return 0;
}
