-- orders_per_minute.lua — orders and revenue per minute of event time.
--
-- Reads:  OrderPlaced {amount} (streams order-N), using e.time (event time).
-- Builds: one (unpartitioned) state:
--           per_min  tm.window.tumbling{size = 60000, lateness = 30000, retain = 60}
--                    (minute windows [k*60000, (k+1)*60000); a minute closes when the
--                    watermark, max event time seen - 30 s, passes its end)
--           closed   emit-on-close: one row {minute=, orders=, revenue=} appended when
--                    its minute closes (in closing order = minute order); the last
--                    KEEP_MINUTES (7 days) rows are kept, older ones are dropped
--                    a day at a time so the state stays bounded
--           late     {orders=, revenue=}: orders that arrived after their minute
--                    had closed (counted, never silently dropped)
--         Each closed minute is also emitted as an event MinuteClosed to stream
--         "stats-orders_per_minute" (appended with --persist / in the server).
-- Queries:
--   minutes {from = ms, to = ms} -> [{minute=, orders=, revenue=, closed=}] closed and
--           still-open minutes with from <= minute < to (default: all)
--   busiest {n = 5}              -> the n closed minutes with the most orders
--                                   (ties: earlier minute first)
--
--   tidemark project --data DIR projections/orders_per_minute.lua --query busiest '{"n":3}'

local function round2(x) return math.floor(x * 100 + 0.5) / 100 end

local KEEP_MINUTES = 7 * 1440      -- closed minutes kept in the state
local TRIM = 1440                  -- dropped at once when KEEP_MINUTES + TRIM are held

-- Drop the oldest TRIM rows of the closed list (one O(n) move, not n table.removes).
local function trim(closed)
  local n = #closed
  for i = 1, n - TRIM do closed[i] = closed[i + TRIM] end
  for i = n - TRIM + 1, n do closed[i] = nil end
end

return {
  from = { type = "OrderPlaced" },
  init = function()
    return { per_min = tm.window.tumbling{ size = 60000, lateness = 30000, retain = 60 },
             closed = {}, late = { orders = 0, revenue = 0 } }
  end,
  on = {
    OrderPlaced = function(s, e)
      local amount = e.data.amount or 0
      if s.per_min:add(e.time, amount) == 0 then
        s.late.orders = s.late.orders + 1
        s.late.revenue = round2(s.late.revenue + amount)
      end
      for _, w in ipairs(s.per_min:closed()) do
        local row = { minute = w.start, orders = w.count, revenue = round2(w.sum) }
        s.closed[#s.closed + 1] = row
        tm.emit("stats-orders_per_minute", "MinuteClosed", row)
      end
      if #s.closed >= KEEP_MINUTES + TRIM then trim(s.closed) end
    end,
  },
  queries = {
    minutes = function(s, args)
      local from = args and args.from or -math.huge
      local to = args and args.to or math.huge
      local out = {}
      for _, r in ipairs(s.closed) do
        if r.minute >= from and r.minute < to then
          out[#out + 1] = { minute = r.minute, orders = r.orders, revenue = r.revenue, closed = true }
        end
      end
      for _, w in ipairs(s.per_min:windows()) do
        if not w.closed and w.start >= from and w.start < to then
          out[#out + 1] = { minute = w.start, orders = w.count, revenue = round2(w.sum), closed = false }
        end
      end
      return out
    end,
    busiest = function(s, args)
      local rows = {}
      for i, r in ipairs(s.closed) do rows[i] = r end
      table.sort(rows, function(a, b)
        if a.orders ~= b.orders then return a.orders > b.orders end
        return a.minute < b.minute
      end)
      local out = {}
      for i = 1, math.min(args and args.n or 5, #rows) do out[i] = rows[i] end
      return out
    end,
  },
}
