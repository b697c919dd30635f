/* metrics.c — lock-free counters and the Prometheus rendering (metrics.h).
 *
 * Invariant: every counter only grows except the two gauges (SSE clients,
 * last position), which are set or adjusted by their single owner thread;
 * the store's commit counts are copied from it (store_commits) at render.
 */
#include "metrics.h"

#include <stdatomic.h>

static _Atomic uint64_t counters[METRICS_N_];
static _Atomic uint64_t http_codes[600];

void metrics_add(metrics_counter c, uint64_t n) {
    atomic_fetch_add_explicit(&counters[c], n, memory_order_relaxed);
}

void metrics_set(metrics_counter c, uint64_t v) {
    atomic_store_explicit(&counters[c], v, memory_order_relaxed);
}

uint64_t metrics_get(metrics_counter c) {
    return atomic_load_explicit(&counters[c], memory_order_relaxed);
}

void metrics_http_response(int status) {
    if (status < 100 || status > 599) status = 599;
    atomic_fetch_add_explicit(&http_codes[status], 1, memory_order_relaxed);
}

static void metric(buf *out, const char *name, const char *type, const char *help,
                   metrics_counter c) {
    buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", name, help, name, type, name,
               (unsigned long long)metrics_get(c));
}

void metrics_render(buf *out) {
    metric(out, "tidemark_appends_total", "counter", "Events appended over HTTP.", METRICS_APPENDS);
    metric(out, "tidemark_append_requests_total", "counter", "Successful append requests.",
           METRICS_APPEND_REQUESTS);
    metric(out, "tidemark_append_bytes_total", "counter",
           "Request body bytes of successful appends.", METRICS_APPEND_BYTES);
    metric(out, "tidemark_append_conflicts_total", "counter",
           "Append requests refused with 409.", METRICS_APPEND_CONFLICTS);
    metric(out, "tidemark_store_errors_total", "counter", "Store I/O errors seen by the server.",
           METRICS_STORE_ERRORS);
    metric(out, "tidemark_read_events_total", "counter", "Events returned by HTTP reads.",
           METRICS_READ_EVENTS);
    metric(out, "tidemark_sse_messages_total", "counter", "SSE event messages written.",
           METRICS_SSE_MESSAGES);
    metric(out, "tidemark_sse_slow_closed_total", "counter",
           "SSE clients disconnected for not keeping up.", METRICS_SSE_SLOW_CLOSED);
    metric(out, "tidemark_http_request_timeouts_total", "counter",
           "Connections closed for not sending a whole request within --request-timeout.",
           METRICS_REQUEST_TIMEOUTS);
    metric(out, "tidemark_store_commits_total", "counter",
           "Group commits: LevelDB writes of one or many append requests.",
           METRICS_STORE_COMMITS);
    metric(out, "tidemark_store_syncs_total", "counter",
           "Group commits synced to disk (every one in the durable mode).", METRICS_STORE_SYNCS);
    metric(out, "tidemark_sse_clients", "gauge", "Connected SSE clients.", METRICS_SSE_CLIENTS);
    metric(out, "tidemark_last_position", "gauge", "Last committed global position.",
           METRICS_LAST_POSITION);
    buf_puts(out, "# HELP tidemark_http_requests_total HTTP responses by status code.\n"
                  "# TYPE tidemark_http_requests_total counter\n");
    for (int i = 100; i < 600; i++) {
        uint64_t n = atomic_load_explicit(&http_codes[i], memory_order_relaxed);
        if (n) buf_printf(out, "tidemark_http_requests_total{code=\"%d\"} %llu\n", i,
                          (unsigned long long)n);
    }
}
