-- order-funnel.lua — how many orders reached each step, and the drop-off.
--
--   tidemark repl --data DIR -f scripts/examples/order-funnel.lua
--
-- A hand-written pass with each(): one scan of the order category, a set
-- of streams per step, then a small result table built with show().
local steps = { "OrderPlaced", "PaymentReceived", "OrderShipped" }
local seen = {}
for _, s in ipairs(steps) do seen[s] = {} end
from{ category = "order" }:each(function(e)
  local set = seen[e.type]
  if set then set[e.stream] = true end
end)
local out, first = {}, nil
for i, s in ipairs(steps) do
  local n = 0
  for _ in pairs(seen[s]) do n = n + 1 end
  first = first or n
  out[i] = string.format("%-16s %6d  %5.1f%%", s, n, first > 0 and 100 * n / first or 0)
end
print(table.concat(out, "\n"))
