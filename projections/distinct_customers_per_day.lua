-- distinct_customers_per_day.lua — distinct shoppers and buyers per UTC day (HyperLogLog).
--
-- Reads:  CartCreated {customer} (streams cart-N) and OrderPlaced {customer}
--         (streams order-N); the day is the UTC date of the event time e.time,
--         so a late event still counts for the day it happened.
-- Builds: one state per day "YYYY-MM-DD":
--           shoppers = tm.hll()  distinct customers who created a cart
--           buyers   = tm.hll()  distinct customers who placed an order
--           carts, orders        exact event counts
--         HLL error: 0.81% standard error (docs/sketches.md); small sets are
--         nearly exact.
-- Queries:
--   days  nil -> [{day=, shoppers=, buyers=, carts=, orders=}] sorted by day
--   range {from = "YYYY-MM-DD", to = "YYYY-MM-DD"} (inclusive, default all) ->
--         {days=, shoppers=, buyers=, carts=, orders=}: distinct customers over the
--         range, by merging the daily sketches (not the sum of daily counts)
--
--   tidemark project --data DIR projections/distinct_customers_per_day.lua --query days

-- Civil date from days since 1970-01-01 (H. Hinnant's days_from_civil inverse),
-- integer arithmetic only: there is no os.date in the sandbox.
local floor = math.floor
local function utc_day(ms)
  local z = floor(ms / 86400000) + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return string.format("%04d-%02d-%02d", y, m, d)
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

return {
  from = { types = { "CartCreated", "OrderPlaced" } },
  partition = function(e) return utc_day(e.time) end,
  init = function() return { shoppers = tm.hll(), buyers = tm.hll(), carts = 0, orders = 0 } end,
  on = {
    CartCreated = function(s, e)
      s.carts = s.carts + 1
      s.shoppers:add(e.data.customer)
    end,
    OrderPlaced = function(s, e)
      s.orders = s.orders + 1
      s.buyers:add(e.data.customer)
    end,
  },
  queries = {
    days = function(days)
      local out = {}
      for i, day in ipairs(sorted_keys(days)) do
        local s = days[day]
        out[i] = { day = day, shoppers = s.shoppers:count(), buyers = s.buyers:count(),
                   carts = s.carts, orders = s.orders }
      end
      return out
    end,
    range = function(days, args)
      local from = args and args.from or ""
      local to = args and args.to or "\255"
      local shoppers, buyers = tm.hll(), tm.hll()
      local n, carts, orders = 0, 0, 0
      for _, day in ipairs(sorted_keys(days)) do
        if day >= from and day <= to then
          local s = days[day]
          shoppers:merge(s.shoppers)
          buyers:merge(s.buyers)
          n, carts, orders = n + 1, carts + s.carts, orders + s.orders
        end
      end
      return { days = n, shoppers = shoppers:count(), buyers = buyers:count(),
               carts = carts, orders = orders }
    end,
  },
}
