-- top-customers.lua — the five customers who paid the most.
--
--   tidemark repl --data DIR -f scripts/examples/top-customers.lua
--   tidemark repl --data DIR -f scripts/examples/top-customers.lua --format csv > top.csv
--
-- One pass over PaymentReceived events (the type index), summing
-- data.amount per data.customer, then the five largest sums.
return from{ type = "PaymentReceived" }
  :group_by("data.customer")
  :sum("data.amount")
  :order_by("sum", "desc")
  :limit(5)
