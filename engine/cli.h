/* cli.h — the tidemark command-line commands (one function per command). */
#ifndef TM_CLI_H
#define TM_CLI_H

int cli_serve(int argc, char **argv);

#endif
