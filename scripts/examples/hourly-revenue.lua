-- hourly-revenue.lua — payments and revenue per event-time hour.
--
--   tidemark repl --data DIR -f scripts/examples/hourly-revenue.lua
--   tidemark repl --url http://localhost:8080 -f scripts/examples/hourly-revenue.lua --format json
--
-- Tumbling one-hour windows on the events' own time (e.time), two
-- aggregates in one pass.
return from{ type = "PaymentReceived" }
  :window(3600 * 1000)
  :agg{ payments = "count", revenue = { "sum", "data.amount" } }
