-- customers.lua — revenue by customer (the DESIGN.md example read model).
--
-- Reads:  category "order" (streams order-N): OrderPlaced {customer, amount},
--         PaymentReceived {customer, amount}; other types (OrderShipped) are
--         skipped without running Lua.
-- Builds: one state per customer (data.customer):
--           { orders = number of OrderPlaced, revenue = sum of PaymentReceived.amount }
--         revenue is summed in event (position) order.
-- Queries:
--   top      {n = 10, by = "revenue" | "orders"}  -> [{customer=, orders=, revenue=}]
--            largest first, ties by customer key (also: --top revenue:10);
--            query results show revenue rounded to cents
--   customer {key = "cust-17"}                     -> {customer=, orders=, revenue=}
--            (init() values for a customer never seen; also: --get cust-17)
--   summary  nil                                   -> {customers=, orders=, revenue=,
--            paying_customers=, avg_order_value=}   (sums over customers in key order)
--
--   tidemark project --data DIR projections/customers.lua --query top '{"n":5}'

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function round2(x) return math.floor(x * 100 + 0.5) / 100 end

return {
  from      = { category = "order" },
  partition = function(e) return e.data.customer end,
  init      = function() return { orders = 0, revenue = 0 } end,
  on = {
    OrderPlaced     = function(s, e) s.orders = s.orders + 1 end,
    PaymentReceived = function(s, e) s.revenue = s.revenue + e.data.amount end,
  },
  queries = {
    top = function(customers, args)
      local n = args and args.n or 10
      local by = args and args.by or "revenue"
      if by ~= "revenue" and by ~= "orders" then error("top: by must be \"revenue\" or \"orders\"") end
      local rows = {}
      for _, k in ipairs(sorted_keys(customers)) do
        local s = customers[k]
        rows[#rows + 1] = { customer = k, orders = s.orders, revenue = round2(s.revenue) }
      end
      table.sort(rows, function(a, b)
        if a[by] ~= b[by] then return a[by] > b[by] end
        return a.customer < b.customer
      end)
      local out = {}
      for i = 1, math.min(n, #rows) do out[i] = rows[i] end
      return out
    end,
    customer = function(customers, args)
      local key = args and args.key
      if type(key) ~= "string" then error("customer: args.key (a customer id) is required") end
      local s = customers[key] or { orders = 0, revenue = 0 }
      return { customer = key, orders = s.orders, revenue = round2(s.revenue) }
    end,
    summary = function(customers)
      local n, paying, orders, revenue = 0, 0, 0, 0
      for _, k in ipairs(sorted_keys(customers)) do
        local s = customers[k]
        n = n + 1
        orders = orders + s.orders
        revenue = revenue + s.revenue
        if s.revenue > 0 then paying = paying + 1 end
      end
      return { customers = n, paying_customers = paying, orders = orders, revenue = round2(revenue),
               avg_order_value = orders > 0 and round2(revenue / orders) or 0 }
    end,
  },
}
