-- payment_percentiles.lua — payment amount percentiles, overall and per method (KLL).
--
-- Reads:  PaymentReceived {amount, method} (streams order-N).
-- Builds: one (unpartitioned) state:
--           all       = tm.quantiles()           every payment amount
--           by_method = { card = tm.quantiles(), paypal = ..., ... }  one per method
--           count, total (exact)
--         KLL (k = 400): rank error about 0.4% at 99% confidence (docs/sketches.md);
--         count, min and max are exact.
-- Queries:
--   percentiles nil -> {all = {count=, min=, p50=, p95=, p99=, max=},
--                       by_method = {card = {...}, ...}}
--   rank {amount = 100, method = "card"} -> {amount=, method=, fraction=}: the
--        estimated fraction of payments (of that method, default all) <= amount
--
--   tidemark project --data DIR projections/payment_percentiles.lua --query percentiles

local function summary(q)
  return { count = q:count(), min = q:min(), max = q:max(),
           p50 = q:quantile(0.5), p95 = q:quantile(0.95), p99 = q:quantile(0.99) }
end

return {
  from = { type = "PaymentReceived" },
  init = function() return { all = tm.quantiles(), by_method = {}, count = 0, total = 0 } end,
  on = {
    PaymentReceived = function(s, e)
      local amount = e.data.amount
      local method = e.data.method or "unknown"
      s.count = s.count + 1
      s.total = s.total + amount
      s.all:add(amount)
      local q = s.by_method[method]
      if not q then q = tm.quantiles(); s.by_method[method] = q end
      q:add(amount)
    end,
  },
  queries = {
    percentiles = function(s)
      local by = {}
      for method, q in pairs(s.by_method) do by[method] = summary(q) end
      return { all = summary(s.all), by_method = by }
    end,
    rank = function(s, args)
      local amount = args and tonumber(args.amount)
      if not amount then error("rank: args.amount (a number) is required") end
      local method = args.method
      local q = method and s.by_method[method] or (not method and s.all)
      return { amount = amount, method = method or "all", fraction = q and q:rank(amount) or 0 }
    end,
  },
}
