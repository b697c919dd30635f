/* probe_evhttp.c — the ceiling of libevent's evhttp on this machine
 * (issue #4's HTTP lines): an evhttp server with no engine around it.
 *
 *   probe_evhttp LOOPS
 *
 * Starts LOOPS threads, each with its own event_base and evhttp on one
 * shared port (SO_REUSEPORT: the kernel spreads connections over the
 * loops), and answers every request with 200 and a small JSON body, the
 * size of tidemark's GET /health.  Prints `ready port=N` and serves until
 * SIGTERM/SIGINT.  Driven by build/bench/load_client http-get with
 * LOAD_PATH=/health, it tells what any evhttp server can reach here with
 * one loop and with several, against Redis with the same client: the
 * bound on http_lookup's and http_append's ratios, whatever the engine
 * does behind the loop.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>

#define MAX_LOOPS 16

static const char BODY[] = "{\"status\":\"ok\",\"position\":0,\"writable\":true}";

static void on_request(struct evhttp_request *req, void *arg) {
    (void)arg;
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    evbuffer_add(out, BODY, sizeof BODY - 1);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evhttp_send_reply(req, 200, "OK", NULL);
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 1024) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void *loop_main(void *arg) {
    event_base_dispatch(arg);
    return NULL;
}

static void on_signal(evutil_socket_t sig, short what, void *arg) {
    (void)sig, (void)what;
    struct event_base **bases = arg;
    for (int i = 0; bases[i]; i++) event_base_loopbreak(bases[i]);
}

int main(int argc, char **argv) {
    int loops = argc > 1 ? atoi(argv[1]) : 1;
    if (loops < 1 || loops > MAX_LOOPS) {
        fprintf(stderr, "usage: probe_evhttp LOOPS (1..%d)\n", MAX_LOOPS);
        return 2;
    }
    evthread_use_pthreads();  /* loop 0 breaks the other loops */
    struct event_base *bases[MAX_LOOPS + 1] = {0};
    int port = 0;
    for (int i = 0; i < loops; i++) {
        int fd = listen_on(port);
        if (fd < 0) {
            perror("probe_evhttp: listen");
            return 1;
        }
        if (!port) {
            struct sockaddr_in a;
            socklen_t al = sizeof a;
            getsockname(fd, (struct sockaddr *)&a, &al);
            port = ntohs(a.sin_port);
        }
        bases[i] = event_base_new();
        struct evhttp *http = evhttp_new(bases[i]);
        if (!bases[i] || !http || !evhttp_accept_socket_with_handle(http, fd)) {
            fprintf(stderr, "probe_evhttp: evhttp setup failed\n");
            return 1;
        }
        evhttp_set_gencb(http, on_request, NULL);
    }
    /* Signals go to loop 0, which breaks every loop. */
    struct event *sigs[2] = {evsignal_new(bases[0], SIGTERM, on_signal, bases),
                             evsignal_new(bases[0], SIGINT, on_signal, bases)};
    event_add(sigs[0], NULL);
    event_add(sigs[1], NULL);
    printf("ready port=%d\n", port);
    fflush(stdout);
    pthread_t th[MAX_LOOPS];
    for (int i = 1; i < loops; i++) pthread_create(&th[i], NULL, loop_main, bases[i]);
    event_base_dispatch(bases[0]);
    for (int i = 1; i < loops; i++) pthread_join(th[i], NULL);
    return 0;
}
