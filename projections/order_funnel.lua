-- order_funnel.lua — the shopping funnel: how many carts reach each stage.
--
-- Reads:  CartCreated, ItemAdded, CheckoutStarted (streams cart-N) and
--         OrderPlaced, PaymentReceived, OrderShipped (streams order-N).
-- Builds: one (unpartitioned) state of stage counters:
--           carts      CartCreated events
--           with_items carts that got at least one item: the ItemAdded that
--                      is version 1 of its cart stream (CartCreated is version 0,
--                      so the first item needs no per-cart memory)
--           checkouts  CheckoutStarted, orders OrderPlaced, paid PaymentReceived,
--           shipped    OrderShipped
--         plus items (units added to carts) and order_value (sum of OrderPlaced.amount).
-- Queries:
--   funnel nil -> [{stage=, count=, from_previous=, from_start=}] in funnel order,
--                 conversion rates as fractions rounded to 4 decimals
--   rate {from = "carts", to = "paid"} -> the conversion rate between two stages
--
--   tidemark project --data DIR projections/order_funnel.lua --query funnel

local STAGES = { "carts", "with_items", "checkouts", "orders", "paid", "shipped" }

local function ratio(a, b)
  if b == 0 then return 0 end
  return math.floor(a / b * 10000 + 0.5) / 10000
end

return {
  from = { types = { "CartCreated", "ItemAdded", "CheckoutStarted",
                     "OrderPlaced", "PaymentReceived", "OrderShipped" } },
  init = function()
    return { carts = 0, with_items = 0, checkouts = 0, orders = 0, paid = 0, shipped = 0,
             items = 0, order_value = 0 }
  end,
  on = {
    CartCreated = function(s, e) s.carts = s.carts + 1 end,
    ItemAdded = function(s, e)
      if e.version == 1 then s.with_items = s.with_items + 1 end
      s.items = s.items + (e.data.qty or 1)
    end,
    CheckoutStarted = function(s, e) s.checkouts = s.checkouts + 1 end,
    OrderPlaced = function(s, e)
      s.orders = s.orders + 1
      s.order_value = s.order_value + e.data.amount
    end,
    PaymentReceived = function(s, e) s.paid = s.paid + 1 end,
    OrderShipped = function(s, e) s.shipped = s.shipped + 1 end,
  },
  queries = {
    funnel = function(s)
      local out = {}
      for i, stage in ipairs(STAGES) do
        out[i] = { stage = stage, count = s[stage],
                   from_previous = i == 1 and 1 or ratio(s[stage], s[STAGES[i - 1]]),
                   from_start = ratio(s[stage], s.carts) }
      end
      return out
    end,
    rate = function(s, args)
      local from, to = args and args.from or "carts", args and args.to or "paid"
      for _, name in ipairs({ from, to }) do
        if type(s[name]) ~= "number" or name == "items" or name == "order_value" then
          error("rate: unknown stage " .. tostring(name))
        end
      end
      return { from = from, to = to, rate = ratio(s[to], s[from]) }
    end,
  },
}
