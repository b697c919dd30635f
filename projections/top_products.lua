-- top_products.lua — best-selling products by units and by revenue (top-k).
--
-- Reads:  OrderPlaced (streams order-N) and its data.items = [{sku, price, qty}].
-- Builds: one (unpartitioned) state:
--           units   = tm.topk(10, 200)  heavy hitters weighted by qty
--           revenue = tm.topk(10, 200)  heavy hitters weighted by price * qty
--           orders, lines, units_total (exact counters)
--         Space-Saving monitors 200 SKUs, so any SKU with more than 1/200 of
--         the total weight is monitored and each count overestimates the true
--         weight by at most total/200 (the "error" field bounds it per SKU).
-- Queries:
--   top     {n = 10, by = "units" | "revenue"} -> [{sku=, units=|revenue=, error=}],
--           largest first, ties by SKU; revenue rounded to cents
--   product {sku = "SKU-0001"} -> {sku=, units=, units_error=, revenue=, revenue_error=}
--           (nil counts when the SKU is not monitored: it sold little)
--
--   tidemark project --data DIR projections/top_products.lua --query top '{"by":"revenue","n":5}'

local function round2(x) return math.floor(x * 100 + 0.5) / 100 end

return {
  from = { type = "OrderPlaced" },
  init = function()
    return { units = tm.topk(10, 200), revenue = tm.topk(10, 200),
             orders = 0, lines = 0, units_total = 0 }
  end,
  on = {
    OrderPlaced = function(s, e)
      s.orders = s.orders + 1
      for _, it in ipairs(e.data.items or {}) do
        local qty = it.qty or 1
        s.lines = s.lines + 1
        s.units_total = s.units_total + qty
        s.units:add(it.sku, qty)
        if it.price * qty > 0 then s.revenue:add(it.sku, it.price * qty) end
      end
    end,
  },
  queries = {
    top = function(s, args)
      local by = args and args.by or "units"
      if by ~= "units" and by ~= "revenue" then error("top: by must be \"units\" or \"revenue\"") end
      local out = {}
      for i, it in ipairs(s[by]:top(args and args.n or 10)) do
        local v = by == "revenue" and round2(it.count) or it.count
        out[i] = { sku = it.key, [by] = v, error = by == "revenue" and round2(it.error) or it.error }
      end
      return out
    end,
    product = function(s, args)
      local sku = args and args.sku
      if type(sku) ~= "string" then error("product: args.sku is required") end
      local u, ue = s.units:get(sku)
      local r, re = s.revenue:get(sku)
      return { sku = sku, units = u, units_error = ue,
               revenue = r and round2(r), revenue_error = re and round2(re) }
    end,
  },
}
