/* gen_orders.c — the replay benchmarks' events (issues #3, #5, #6), fast.
 *
 *   gen_orders N CUSTOMERS FILE.jsonl [FILE.pgcopy]
 *
 * Writes N events in tidemark's JSON-lines import format, one per line, for
 * the DESIGN.md example read model (projections/customers.lua).  Event n
 * (0-based, stored at position n+1 by `tidemark import`):
 *   stream   "order-<(n / 3) % 100000>"           (category "order")
 *   customer "cust-<n % CUSTOMERS>"
 *   type     by t = (n + n / CUSTOMERS) % 10:
 *              0..4 OrderPlaced     {"customer":..,"amount":A}
 *              5..8 PaymentReceived {"customer":..,"amount":A}
 *              9    OrderShipped    {"customer":..,"carrier":"dhl"}
 *   amount   A = ((n * 37) % 10000) / 100, printed with two decimals
 * so every customer gets N/CUSTOMERS events of mixed types (with
 * N >= 2 * CUSTOMERS every customer has at least one handled event), and a
 * line is about 95 bytes (a stored record about 100).  Deterministic: the
 * same arguments give the same bytes.
 *
 * FILE.pgcopy (optional) holds the same events in PostgreSQL's COPY text
 * format, columns (position, stream, type, data): the PostgreSQL peer loads
 * it into a jsonb table (scripts/bench/run).  The JSON has no backslash,
 * tab or newline, so it needs no COPY escaping.
 *
 * Why C: scripts/gen-events (Python, realistic e-commerce sessions) writes
 * about 100k events/s; these benchmarks need 2M simple ones in a second.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const TYPES[10] = {
    "OrderPlaced", "OrderPlaced", "OrderPlaced", "OrderPlaced", "OrderPlaced",
    "PaymentReceived", "PaymentReceived", "PaymentReceived", "PaymentReceived",
    "OrderShipped",
};

static int data_json(char *out, size_t cap, unsigned long n, unsigned long customers)
{
    unsigned long t = (n + n / customers) % 10;
    unsigned long cents = (n * 37) % 10000;
    if (t == 9)
        return snprintf(out, cap, "{\"customer\":\"cust-%lu\",\"carrier\":\"dhl\"}",
                        n % customers);
    return snprintf(out, cap, "{\"customer\":\"cust-%lu\",\"amount\":%lu.%02lu}",
                    n % customers, cents / 100, cents % 100);
}

int main(int argc, char **argv)
{
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: gen_orders N CUSTOMERS FILE.jsonl [FILE.pgcopy]\n");
        return 1;
    }
    char *end;
    unsigned long n = strtoul(argv[1], &end, 10);
    if (*end || n == 0) {
        fprintf(stderr, "gen_orders: N must be a positive integer\n");
        return 1;
    }
    unsigned long customers = strtoul(argv[2], &end, 10);
    if (*end || customers == 0) {
        fprintf(stderr, "gen_orders: CUSTOMERS must be a positive integer\n");
        return 1;
    }
    FILE *js = fopen(argv[3], "w");
    FILE *pg = argc == 5 ? fopen(argv[4], "w") : NULL;
    if (!js || (argc == 5 && !pg)) {
        perror("gen_orders: open");
        return 1;
    }
    static char jbuf[1 << 16], pbuf[1 << 16];
    setvbuf(js, jbuf, _IOFBF, sizeof jbuf);
    if (pg)
        setvbuf(pg, pbuf, _IOFBF, sizeof pbuf);
    char data[128];
    for (unsigned long i = 0; i < n; i++) {
        data_json(data, sizeof data, i, customers);
        const char *type = TYPES[(i + i / customers) % 10];
        unsigned long stream = (i / 3) % 100000;
        fprintf(js, "{\"stream\":\"order-%lu\",\"type\":\"%s\",\"data\":%s}\n", stream, type,
                data);
        if (pg)
            fprintf(pg, "%lu\torder-%lu\t%s\t%s\n", i + 1, stream, type, data);
    }
    int bad = fclose(js) != 0;
    if (pg)
        bad |= fclose(pg) != 0;
    if (bad) {
        perror("gen_orders: write");
        return 1;
    }
    return 0;
}
