-- prelude.lua — the REPL's built-in Lua: result printing, ad-hoc queries,
-- event reads, projections, dot commands and completion.
--
-- Compiled into the binary (Makefile: build/gen/repl_prelude.h) and run
-- once per Lua state (the sandbox of sandbox.h) with T, the table of C
-- built-ins (repllua.c), the ffi module and the projection runtime's msgpack
-- decoder (engine/proj_mp.lua: ext values as their payload strings, NaN map
-- keys dropped); none of the three is reachable from user code (they live
-- in this chunk's locals).  Returns show(...), the printer
-- of evaluation results; T.dot and T.complete are set for the C side.
--
-- Queries run as transient projections over history: one scan (T.scan, C)
-- decodes every selected event into a table and calls ONE handler closure
-- built here from the query's where / group_by / window and aggregate.
-- Per-group state lives in a flat table keyed by the group key (or a
-- composite string key for several keys); nothing per event is kept.

local T, ffi, decode = ...
local type, pairs, ipairs, tostring, tonumber, select = type, pairs, ipairs, tostring, tonumber, select
local setmetatable, getmetatable, rawget, error, pcall = setmetatable, getmetatable, rawget, error, pcall
local fmt, concat, sort, insert, floor, huge = string.format, table.concat, table.sort, table.insert, math.floor, math.huge
local osdate = os.date
local unpack, assert, string, math = unpack, assert, string, math
local loadstring = loadstring
local G = _G

local settings = { format = "table", timing = false }
local NULL = setmetatable({}, { __tostring = function() return "null" end })

------------------------------------------------------------------ helpers

local function is_int(v)
  return type(v) == "number" and v == floor(v) and v > -2^53 and v < 2^53
end

local function num_text(v)
  if is_int(v) then return fmt("%d", v) end
  if v ~= v then return "nan" end
  if v == huge then return "inf" elseif v == -huge then return "-inf" end
  return fmt("%.14g", v)
end

local function iso(ms)
  if type(ms) ~= "number" then return tostring(ms) end
  local s = floor(ms / 1000)
  return osdate("!%Y-%m-%dT%H:%M:%S", s) .. fmt(".%03dZ", ms - s * 1000)
end

local json
local function cell_text(v)
  local t = type(v)
  if v == nil or v == NULL then return "" end
  if t == "number" then return num_text(v) end
  if t == "string" then return v end
  if t == "boolean" then return tostring(v) end
  if t == "table" then return json(v) end
  return tostring(v)
end

json = function(v)
  if v == nil or v == NULL then return "null" end
  if type(v) == "number" then
    if v ~= v or v == huge or v == -huge then return "null" end
    return num_text(v)
  end
  local s = T.json(v)
  if s == nil then return fmt("%q", tostring(v)) end
  return s
end

-- Ordering that never fails on mixed types: nil/null < booleans < numbers < strings < others.
local rank = { ["nil"] = 0, boolean = 1, number = 2, string = 3 }
local function before(a, b)
  if a == NULL then a = nil end
  if b == NULL then b = nil end
  local ta, tb = type(a), type(b)
  if ta ~= tb then return (rank[ta] or 4) < (rank[tb] or 4) end
  if ta == "number" or ta == "string" then return a < b end
  if ta == "boolean" then return (not a) and b end
  return tostring(a) < tostring(b)
end

------------------------------------------------------------- result sets

-- A result set: { columns = {...}, rows = { {...}, ... } } (rows are arrays
-- in column order; nil cells are NULL).
local RS = {}
RS.__index = RS

local function result(columns, rows)
  return setmetatable({ columns = columns, rows = rows or {} }, RS)
end

local function col_index(rs, col)
  if type(col) == "number" then return col end
  for i, c in ipairs(rs.columns) do if c == col then return i end end
  error("no column '" .. tostring(col) .. "' (columns: " .. concat(rs.columns, ", ") .. ")", 3)
end

function RS:sort(col, dir)
  local i = col_index(self, col or 1)
  local desc = dir == "desc"
  sort(self.rows, function(a, b)
    if desc then return before(b[i], a[i]) end
    return before(a[i], b[i])
  end)
  return self
end
RS.order_by = RS.sort

function RS:limit(n)
  local rows = {}
  for i = 1, math.min(n, #self.rows) do rows[i] = self.rows[i] end
  return result(self.columns, rows)
end

function RS:column(col)
  local i, out = col_index(self, col), {}
  for k, r in ipairs(self.rows) do out[k] = r[i] ~= NULL and r[i] or nil end
  return out
end

-- Row k as a table keyed by column name.
function RS:row(k)
  local r, t = self.rows[k], {}
  if not r then return nil end
  for i, c in ipairs(self.columns) do if r[i] ~= NULL then t[c] = r[i] end end
  return t
end

function RS:count() return #self.rows end
RS.__len = function(self) return #self.rows end

local function is_result(v) return getmetatable(v) == RS end

-- Events (arrays of event tables from read()) display as a result set.
local EV = {}
EV.__index = EV
local event_columns = { "position", "stream", "version", "type", "time", "data" }

local function events_result(list)
  local rows = {}
  for i, e in ipairs(list) do
    rows[i] = { e.position, e.stream, e.version, e.type, iso(e.time), e.data == nil and NULL or e.data }
  end
  return result(event_columns, rows)
end

local function event_list(list) return setmetatable(list, EV) end

-- The scan loop's Lua half.  T.scan (C) fills a batch of slots (struct
-- below, same layout as repllua.c) and an arena holding each event's
-- stream and data bytes, then calls T.runner once per batch.  The runner
-- decodes data (msgpack, validated by the store) with the projection
-- runtime's decoder (decode, engine/proj_mp.lua: FFI reads) and calls
-- the query's handler; LuaJIT compiles the loop with the decoder and the
-- handler inlined.  Type names are interned by C into T.types.
-- The Ctrl-C flag is read per event through the FFI (a volatile load that
-- JIT-compiled code performs, unlike hooks).  A handler returning STOP
-- ends the scan.
local STOP = setmetatable({}, { __tostring = function() return "stop" end })
T.STOP = STOP
ffi.cdef [[
typedef struct replscan_slot {
    double position, version, time;
    uint32_t stream_off, stream_len, data_off, data_len, type_idx, pad;
} replscan_slot;
]]
local intr = ffi.cast("volatile int *", T.intr_addr())
local slotp = ffi.typeof("const replscan_slot *")
local u8p = ffi.typeof("const uint8_t *")
local fstr, fcast = ffi.string, ffi.cast
local types = {}
T.types = types

-- Events carry stream, id and metadata lazily.  While its batch is being
-- run, an event's stream is read from the batch (a binary search on
-- position among the batch's slots: positions are ordered in a scan);
-- afterwards, and for id and metadata, the event is read back by position
-- (T.extra).  category is derived from the stream.
local cur_s, cur_a, cur_n = nil, nil, 0

local function batch_stream(pos)
  if cur_n == 0 then return nil end
  local s = cur_s
  local lo, hi = 0, cur_n - 1
  local asc = s[0].position <= s[hi].position
  while lo <= hi do
    local mid = floor((lo + hi) / 2)
    local p = s[mid].position
    if p == pos then return fstr(cur_a + s[mid].stream_off, s[mid].stream_len) end
    if (p < pos) == asc then lo = mid + 1 else hi = mid - 1 end
  end
  return nil
end

local EV_MT = {
  __index = function(e, k)
    if k == "stream" then
      local pos = rawget(e, "position")
      local v = batch_stream(pos)
      if v == nil then
        local _, _, st = T.extra(pos)
        v = st
      end
      rawset(e, "stream", v)
      return v
    end
    if k == "category" then return (e.stream:match("^[^-]*")) end
    if k == "id" or k == "metadata" then
      local id, meta = T.extra(rawget(e, "position"))
      rawset(e, "id", id)
      rawset(e, "metadata", meta or {})
      return rawget(e, k)
    end
    return nil
  end,
}

function T.runner(sp, ap, n, h)
  local s, a = fcast(slotp, sp), fcast(u8p, ap)
  cur_s, cur_a, cur_n = s, a, n
  for j = 0, n - 1 do
    if intr[0] ~= 0 then error("interrupted", 0) end
    local x = s[j]
    local data
    if x.data_len > 0 then data = decode(a, x.data_off) end
    local e = setmetatable({ type = types[x.type_idx], position = x.position,
      version = x.version, time = x.time, data = data }, EV_MT)
    if h(e) == STOP then cur_n = 0; return true end
  end
  cur_n = 0
  return false
end

-- Called by C after every batch, also when it ended in an error: the
-- batch's memory is reused, so no event may read from it any more.
function T.batch_done() cur_s, cur_a, cur_n = nil, nil, 0 end

------------------------------------------------------------------ printing

local out = T.write

local function pad(s, w, right)
  local n = #s
  -- count UTF-8 characters, not bytes, for alignment
  local _, cont = s:gsub("[\128-\191]", "")
  n = n - cont
  if n >= w then return s end
  if right then return string.rep(" ", w - n) .. s end
  return s .. string.rep(" ", w - n)
end

local function width(s)
  local _, cont = s:gsub("[\128-\191]", "")
  return #s - cont
end

local function one_line(s)
  return (s:gsub("[\r\n\t]", function(c) return c == "\t" and "  " or "\\n" end))
end

local function print_table(rs)
  local cols, rows = rs.columns, rs.rows
  local w, cells, numeric = {}, {}, {}
  for i, c in ipairs(cols) do w[i] = width(c); numeric[i] = true end
  for r, row in ipairs(rows) do
    local line = {}
    for i = 1, #cols do
      local v = row[i]
      local s = one_line(cell_text(v))
      if #s > 120 then s = s:sub(1, 117) .. "..." end
      line[i] = s
      if type(v) ~= "number" and v ~= nil and v ~= NULL then numeric[i] = false end
      local ww = width(s)
      if ww > w[i] then w[i] = ww end
    end
    cells[r] = line
  end
  local buf = {}
  local head, sep = {}, {}
  for i, c in ipairs(cols) do
    head[i] = pad(c, w[i], numeric[i] and #rows > 0)
    sep[i] = string.rep("-", w[i])
  end
  buf[#buf + 1] = (concat(head, " | "):gsub("%s+$", ""))
  buf[#buf + 1] = concat(sep, "-+-")
  for _, line in ipairs(cells) do
    local l = {}
    for i = 1, #cols do l[i] = pad(line[i], w[i], numeric[i]) end
    buf[#buf + 1] = (concat(l, " | "):gsub("%s+$", ""))
  end
  buf[#buf + 1] = fmt("(%d row%s)", #rows, #rows == 1 and "" or "s")
  out(concat(buf, "\n") .. "\n")
end

local function csv_cell(v)
  local s = cell_text(v)
  if s:find('[,"\r\n]') then s = '"' .. s:gsub('"', '""') .. '"' end
  return s
end

local function print_csv(rs)
  local buf = {}
  local h = {}
  for i, c in ipairs(rs.columns) do h[i] = csv_cell(c) end
  buf[1] = concat(h, ",")
  for _, row in ipairs(rs.rows) do
    local l = {}
    for i = 1, #rs.columns do l[i] = csv_cell(row[i]) end
    buf[#buf + 1] = concat(l, ",")
  end
  out(concat(buf, "\r\n") .. "\r\n")
end

local function row_json(cols, row)
  local parts = {}
  for i, c in ipairs(cols) do parts[i] = json(c) .. ":" .. json(row[i]) end
  return "{" .. concat(parts, ",") .. "}"
end

local function print_json_rs(rs)
  local n = #rs.rows
  if n == 0 then out("[]\n") return end
  local buf = { "[" }
  for r, row in ipairs(rs.rows) do
    buf[#buf + 1] = row_json(rs.columns, row) .. (r < n and "," or "")
  end
  buf[#buf + 1] = "]"
  out(concat(buf, "\n") .. "\n")
end

local function print_vertical(rs)
  local w = 0
  for _, c in ipairs(rs.columns) do if width(c) > w then w = width(c) end end
  local buf = {}
  for r, row in ipairs(rs.rows) do
    buf[#buf + 1] = fmt("-[ RECORD %d ]%s", r, string.rep("-", math.max(0, w - 6)))
    for i, c in ipairs(rs.columns) do buf[#buf + 1] = pad(c, w) .. " | " .. one_line(cell_text(row[i])) end
  end
  if #rs.rows == 0 then buf[1] = "(0 rows)" end
  out(concat(buf, "\n") .. "\n")
end

local function show_rs(rs)
  local f = settings.format
  if f == "json" then print_json_rs(rs)
  elseif f == "csv" then print_csv(rs)
  elseif f == "vertical" then print_vertical(rs)
  else print_table(rs) end
end

-- A readable Lua-ish rendering of a plain table (sorted keys, bounded).
local function render(v, indent, seen, depth)
  local t = type(v)
  if t == "string" then return fmt("%q", v) end
  if t == "number" then return num_text(v) end
  if t ~= "table" then return tostring(v) end
  if v == NULL then return "null" end
  if seen[v] then return "<cycle>" end
  if depth > 8 then return "{...}" end
  local mt = getmetatable(v)
  if mt and mt.__tostring then return tostring(v) end
  seen[v] = true
  local n = #v
  local keys = {}
  for k in pairs(v) do
    if not (type(k) == "number" and k >= 1 and k <= n and k == floor(k)) then keys[#keys + 1] = k end
  end
  sort(keys, before)
  local parts = {}
  for i = 1, n do parts[#parts + 1] = render(v[i], indent .. "  ", seen, depth + 1) end
  for _, k in ipairs(keys) do
    local ks = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or ("[" .. render(k, indent, seen, depth + 1) .. "]")
    parts[#parts + 1] = ks .. " = " .. render(v[k], indent .. "  ", seen, depth + 1)
  end
  seen[v] = nil
  if #parts == 0 then return "{}" end
  local flat = "{ " .. concat(parts, ", ") .. " }"
  if #flat <= 80 and not flat:find("\n") then return flat end
  return "{\n" .. indent .. "  " .. concat(parts, ",\n" .. indent .. "  ") .. "\n" .. indent .. "}"
end

local function show_value(v)
  local mt = getmetatable(v)
  if mt == RS then return show_rs(v) end
  if mt == EV then return show_rs(events_result(v)) end
  if settings.format == "json" then out(json(v) .. "\n") return end
  if type(v) == "string" then out(v .. "\n") return end
  out(render(v, "", {}, 0) .. "\n")
end

local function show(...)
  local n = select("#", ...)
  if n == 1 then return show_value((...)) end
  -- several values: scalars on one line (like lua.c), tables each in turn
  local simple = true
  for i = 1, n do
    local v = select(i, ...)
    if type(v) == "table" then simple = false end
  end
  if simple and settings.format ~= "json" then
    local parts = {}
    for i = 1, n do
      local v = select(i, ...)
      parts[i] = type(v) == "number" and num_text(v) or tostring(v)
    end
    out(concat(parts, "\t") .. "\n")
    return
  end
  for i = 1, n do show_value((select(i, ...))) end
end

------------------------------------------------------------- fields

-- A field is a function(e) or a dotted path string ("data.amount").
-- Paths compile once to a closure; "category" is the stream's category.
local getter_cache = {}
local function getter(f, what)
  if type(f) == "function" then return f end
  if type(f) ~= "string" or f == "" then
    error((what or "field") .. " must be a field name like \"data.amount\" or a function", 3)
  end
  local g = getter_cache[f]
  if g then return g end
  if f == "category" then
    g = function(e) return (e.stream:match("^[^-]*")) end
  else
    local src = { "local e = ...\nlocal v = e\n" }
    for part in f:gmatch("[^.]+") do
      local key = tonumber(part) and part or fmt("%q", part)
      src[#src + 1] = "if type(v) ~= 'table' then return nil end v = v[" .. key .. "]\n"
    end
    src[#src + 1] = "return v"
    local chunk = assert(loadstring("return function(...) " .. concat(src) .. " end", "=field"))
    g = chunk()
  end
  getter_cache[f] = g
  return g
end

local function field_name(f, i)
  if type(f) == "string" then return f end
  return "key" .. i
end

------------------------------------------------------------- selectors

-- from{} / from{all=true} / from{stream=} / from{streams={}} /
-- from{category=} / from{type=} / from{types={}} (the projections' `from`).
local function selector(spec)
  if spec == nil or spec == "all" then return { kind = "all" } end
  if type(spec) == "string" then return { kind = "stream", name = spec } end
  if type(spec) ~= "table" then error("from{...} wants a selector table", 3) end
  local sel
  if spec.stream then sel = { kind = "stream", name = tostring(spec.stream) }
  elseif spec.category then sel = { kind = "category", name = tostring(spec.category) }
  elseif spec.type then sel = { kind = "type", name = tostring(spec.type) }
  elseif spec.types then
    local set, n, one = {}, 0, nil
    for _, t in ipairs(spec.types) do set[tostring(t)] = true; n = n + 1; one = tostring(t) end
    if n == 0 then error("from{types={...}} wants at least one type", 3) end
    if n == 1 then sel = { kind = "type", name = one } else sel = { kind = "all", types = set } end
  elseif spec.streams then
    local set, n, one = {}, 0, nil
    for _, s in ipairs(spec.streams) do set[tostring(s)] = true; n = n + 1; one = tostring(s) end
    if n == 0 then error("from{streams={...}} wants at least one stream", 3) end
    if n == 1 then sel = { kind = "stream", name = one } else sel = { kind = "all", streams = set } end
  else
    for k in pairs(spec) do
      if k ~= "all" and k ~= "from" and k ~= "limit" then
        error("unknown selector key '" .. tostring(k) .. "' (all, stream, streams, category, type, types)", 3)
      end
    end
    sel = { kind = "all" }
  end
  if spec.from then sel.from = tonumber(spec.from) end
  return sel
end

------------------------------------------------------------- aggregates

-- An aggregate: { name = column(s), init(), step(state, e) -> state,
-- final(state) -> value(s) }.  States are numbers or small tables.
-- merge(a, b) combines two states of the same aggregate (the parallel
-- path: every worker aggregates its share of the events, the REPL merges
-- the partial states in range order); spec describes the aggregate to a
-- worker's Lua state (T.pscan).
local function add(a, b) return a + b end

local function agg_count()
  return { columns = { "count" }, init = function() return 0 end,
           step = function(s) return s + 1 end, final = function(s) return s end,
           merge = add, spec = { kind = "count" } }
end

local function agg_sum(f)
  local get = getter(f)
  return { columns = { "sum" }, init = function() return 0 end,
           step = function(s, e) local v = get(e); if type(v) == "number" then return s + v end return s end,
           final = function(s) return s end,
           merge = add, spec = { kind = "sum", f = f } }
end

local function agg_avg(f)
  local get = getter(f)
  return { columns = { "avg" }, init = function() return { 0, 0 } end,
           step = function(s, e)
             local v = get(e)
             if type(v) == "number" then s[1] = s[1] + v; s[2] = s[2] + 1 end
             return s
           end,
           final = function(s) if s[2] == 0 then return nil end return s[1] / s[2] end,
           merge = function(a, b) a[1] = a[1] + b[1]; a[2] = a[2] + b[2]; return a end,
           spec = { kind = "avg", f = f } }
end

local function agg_minmax(f, ismax)
  local get = getter(f)
  local function better(s, v)
    if v == nil or (type(v) ~= "number" and type(v) ~= "string") then return s end
    if s == nil then return v end
    if type(s) ~= type(v) then return s end
    if ismax then if v > s then return v end elseif v < s then return v end
    return s
  end
  return { columns = { ismax and "max" or "min" }, init = function() return nil end,
           step = function(s, e) return better(s, get(e)) end,
           final = function(s) return s end,
           merge = better, spec = { kind = ismax and "max" or "min", f = f } }
end

-- distinct: HyperLogLog from the sketch library (tm.hll) when present,
-- else an exact set.
local function sketch_lib() return rawget(G, "tm") end

local function agg_distinct(f)
  local get = getter(f)
  local lib = sketch_lib()
  if lib and lib.hll then
    local hll = lib.hll
    return { columns = { "distinct" }, init = function() return hll() end,
             step = function(s, e) local v = get(e); if v ~= nil then s:add(v) end return s end,
             final = function(s) return floor(s:count() + 0.5) end,
             merge = function(a, b) a:merge(b); return a end, spec = { kind = "distinct", f = f } }
  end
  return { columns = { "distinct" }, init = function() return { n = 0, set = {} } end,
           step = function(s, e)
             local v = get(e)
             if v ~= nil then
               if type(v) == "table" then v = json(v) end
               if not s.set[v] then s.set[v] = true; s.n = s.n + 1 end
             end
             return s
           end,
           final = function(s) return s.n end,
           merge = function(a, b)
             for v in pairs(b.set) do if not a.set[v] then a.set[v] = true; a.n = a.n + 1 end end
             return a
           end,
           spec = { kind = "distinct", f = f } }
end

local function pct_name(p)
  local s = num_text(p * 100):gsub("%.", "_")
  return "p" .. s
end

-- percentiles: tm.quantiles() when present, else exact (nearest rank).
local function agg_percentiles(f, ps)
  local get = getter(f)
  ps = ps or { 0.5, 0.9, 0.99 }
  if type(ps) == "number" then ps = { ps } end
  local cols = {}
  for i, p in ipairs(ps) do
    if type(p) ~= "number" or p < 0 or p > 1 then error("percentiles wants fractions in [0,1], like {0.5, 0.99}", 3) end
    cols[i] = pct_name(p)
  end
  local lib = sketch_lib()
  if lib and lib.quantiles then
    local q = lib.quantiles
    return { columns = cols, init = function() return q() end,
             step = function(s, e) local v = get(e); if type(v) == "number" then s:add(v) end return s end,
             final = function(s)
               local r = {}
               for i, p in ipairs(ps) do r[i] = s:quantile(p) end
               return unpack(r, 1, #ps)
             end,
             merge = function(a, b) a:merge(b); return a end,
             spec = { kind = "percentiles", f = f, ps = ps } }
  end
  return { columns = cols, init = function() return {} end,
           step = function(s, e) local v = get(e); if type(v) == "number" then s[#s + 1] = v end return s end,
           final = function(s)
             sort(s)
             local r, n = {}, #s
             for i, p in ipairs(ps) do
               if n == 0 then r[i] = nil else
                 local k = math.ceil(p * n); if k < 1 then k = 1 end
                 r[i] = s[k]
               end
             end
             return unpack(r, 1, #ps)
           end,
           merge = function(a, b) for i = 1, #b do a[#a + 1] = b[i] end return a end,
           spec = { kind = "percentiles", f = f, ps = ps } }
end

------------------------------------------------------------- queries

local Q = {}
Q.__index = Q

-- A query keeps, beside the closures it runs, a description of each part
-- (wspecs, keys[i].spec, the aggregate's spec) from which a worker's Lua
-- state rebuilds the same closures (the parallel path, T.pscan).
local function query(sel)
  return setmetatable({ sel = sel, wheres = {}, wspecs = {}, keys = {}, limit_n = nil,
                        order = nil }, Q)
end

local function copy(q)
  local c = setmetatable({}, Q)
  for k, v in pairs(q) do c[k] = v end
  c.wheres = { unpack(q.wheres) }
  c.wspecs = { unpack(q.wspecs) }
  c.keys = { unpack(q.keys) }
  return c
end

local function where_fn(pred, value)
  if type(pred) == "function" then return pred end
  -- where("type", "OrderPlaced"): field equals value
  local get = getter(pred)
  return function(e) return get(e) == value end
end

function Q:where(pred, value)
  if type(pred) ~= "string" and type(pred) ~= "function" then
    error("where wants a function(e) or a field and a value", 2)
  end
  local c = copy(self)
  c.wheres[#c.wheres + 1] = where_fn(pred, value)
  c.wspecs[#c.wspecs + 1] = { f = pred, value = value }
  return c
end
Q.filter = Q.where

-- A group key from its spec: { f = field } or { window = ms }.
local function make_key(spec, name)
  if spec.window then
    local size_ms = spec.window
    return { name = "window", window = size_ms, spec = spec,
             get = function(e) local t = e.time or 0; return t - t % size_ms end }
  end
  return { name = name, get = getter(spec.f, "group_by key"), spec = spec }
end

function Q:group_by(...)
  local c = copy(self)
  local n = select("#", ...)
  if n == 0 then error("group_by wants at least one field", 2) end
  for i = 1, n do
    local f = select(i, ...)
    c.keys[#c.keys + 1] = make_key({ f = f }, field_name(f, #c.keys + 1))
  end
  return c
end

function Q:window(size_ms)
  if type(size_ms) ~= "number" or size_ms <= 0 then error("window wants a size in ms", 2) end
  local c = copy(self)
  insert(c.keys, 1, make_key({ window = size_ms }))
  return c
end

function Q:order_by(col, dir) local c = copy(self); c.order = { col, dir }; return c end
function Q:limit(n) local c = copy(self); c.limit_n = n; return c end

local function where_all(wheres)
  local n = #wheres
  if n == 0 then return nil end
  if n == 1 then return wheres[1] end
  return function(e)
    for i = 1, n do if not wheres[i](e) then return false end end
    return true
  end
end

local function scan(q, handler, label)
  return T.scan(q.sel, handler, label)
end

local function finish(rs, q)
  if q.order then rs:sort(q.order[1], q.order[2]) end
  if q.limit_n then rs = rs:limit(q.limit_n) end
  return rs
end

local function values(t)
  local list = {}
  for _, v in pairs(t) do list[#list + 1] = v end
  return list
end

-- Group keys: the key itself for one key, else a composite string.
local function key_text(k)
  if type(k) == "string" then return k end
  if type(k) == "number" then return num_text(k) .. "#" end
  return tostring(k) .. "#"
end

-- The handler of aggregate `a` over the query, and collect(), which
-- returns what it gathered: the state (no keys) or a list of { keys, state }.
local function grouping(q, a)
  local where = where_all(q.wheres)
  local init, step = a.init, a.step
  local nk = #q.keys
  if nk == 0 then
    local s = init()
    local h
    if where then h = function(e) if where(e) then s = step(s, e) end end
    else h = function(e) s = step(s, e) end end
    return h, function() return s end
  end
  if nk == 1 then
    local acc, key = {}, q.keys[1].get
    local h
    if where then
      h = function(e)
        if where(e) then
          local k = key(e); if k == nil then k = NULL end
          local s = acc[k]; if s == nil then s = init() end
          acc[k] = step(s, e)
        end
      end
    else
      h = function(e)
        local k = key(e); if k == nil then k = NULL end
        local s = acc[k]; if s == nil then s = init() end
        acc[k] = step(s, e)
      end
    end
    return h, function()
      local list = {}
      for k, s in pairs(acc) do list[#list + 1] = { { k }, s } end
      return list
    end
  end
  local gets, groups = {}, {}
  for i = 1, nk do gets[i] = q.keys[i].get end
  local h = function(e)
    if where == nil or where(e) then
      local ks, parts = {}, {}
      for i = 1, nk do
        local k = gets[i](e); if k == nil then k = NULL end
        ks[i] = k
        parts[i] = key_text(k)
      end
      local ck = concat(parts, "\31")
      local g = groups[ck]
      if g == nil then g = { ks, init() }; groups[ck] = g end
      g[2] = step(g[2], e)
    end
  end
  return h, function() return values(groups) end
end

------------------------------------------------------------- the parallel path

-- T.pscan (replpar.c, embedded mode) runs a query on every core: each
-- worker thread scans one contiguous range of positions in a Lua state of
-- its own with this prelude; a worker rebuilds the query's
-- closures from a description (fields as paths, functions as bytecode
-- dumped by C: only functions without upvalues travel) and returns its
-- partial states, which are merged here in range order.  A worker state
-- has none of the REPL's I/O and no user globals: touching either raises
-- REPLPAR_FALLBACK (repl.h) there, and the REPL runs the query serially instead, so
-- the result is always the serial one (float sums up to rounding).

local NULL_KEY = { ["\0null"] = true } -- NULL in a partial's keys (msgpack)

-- A description part: fields are paths or an index into fns (a function);
-- nil when a part cannot travel (a table compared by identity).
local function port_field(f, fns)
  if type(f) == "function" then fns[#fns + 1] = f; return #fns end
  return f
end

local function describe(q, aspec)
  local fns, d = {}, { wheres = {}, keys = {} }
  for i, w in ipairs(q.wspecs) do
    if type(w.value) == "table" then return nil end
    d.wheres[i] = { f = port_field(w.f, fns), value = w.value }
  end
  for i, k in ipairs(q.keys) do
    if k.spec.window then d.keys[i] = { window = k.spec.window }
    else d.keys[i] = { f = port_field(k.spec.f, fns), name = k.name } end
  end
  local ag = {}
  for k, v in pairs(aspec) do ag[k] = v end
  if aspec.f ~= nil then ag.f = port_field(aspec.f, fns) end
  if aspec.parts then
    ag.parts = {}
    for i, p in ipairs(aspec.parts) do
      ag.parts[i] = { kind = p.kind, f = p.f ~= nil and port_field(p.f, fns) or nil }
    end
  end
  d.agg = ag
  return d, fns
end

local make_agg, top_grouping -- below

-- In a worker state: the query's handler and collector from a description.
function T.pbuild(sel, d, fns)
  local function field(f) if type(f) == "number" then return fns[f] end return f end
  local q = query(sel)
  for i, w in ipairs(d.wheres) do
    local f = field(w.f)
    q.wheres[i] = where_fn(f, w.value)
  end
  for i, k in ipairs(d.keys) do
    if k.window then q.keys[i] = make_key({ window = k.window })
    else q.keys[i] = make_key({ f = field(k.f) }, k.name) end
  end
  local ag = d.agg
  local h, collect
  if ag.kind == "top" then
    h, collect = top_grouping(q, getter(field(ag.f)))
  else
    local spec = { kind = ag.kind, f = field(ag.f), ps = ag.ps, names = ag.names }
    if ag.parts then
      spec.parts = {}
      for i, p in ipairs(ag.parts) do spec.parts[i] = { kind = p.kind, f = field(p.f) } end
    end
    h, collect = grouping(q, make_agg(spec))
  end
  return h, function()
    local r = collect()
    if #q.keys == 0 then return { r } end
    for _, g in ipairs(r) do
      for i, k in ipairs(g[1]) do if k == NULL then g[1][i] = NULL_KEY end end
    end
    return r
  end
end

-- Try the query on every core: the merged collect() result, or nil when
-- it runs serially (one core, remote, few events, a part that cannot
-- travel, or a worker that met a global or the REPL's I/O).
local function parallel(q, aspec, merge, label)
  if not T.pscan then return nil end
  local d, fns = describe(q, aspec)
  if not d then return nil end
  local parts = T.pscan(q.sel, d, fns, label)
  if not parts then return nil end
  local nk = #q.keys
  if nk == 0 then
    local s = parts[1][1]
    for i = 2, #parts do s = merge(s, parts[i][1]) end
    return s
  end
  local byk, list = {}, {}
  for _, part in ipairs(parts) do
    for _, g in ipairs(part) do
      local ks = g[1]
      for i = 1, nk do if type(ks[i]) == "table" and ks[i]["\0null"] then ks[i] = NULL end end
      local ck
      if nk == 1 then ck = ks[1] else
        local t = {}
        for i = 1, nk do t[i] = key_text(ks[i]) end
        ck = concat(t, "\31")
      end
      local have = byk[ck]
      if have then have[2] = merge(have[2], g[2])
      else byk[ck] = g; list[#list + 1] = g end
    end
  end
  return list
end

-- What the query's handler gathered (collect()): on every core when it
-- can, else in one scan here with the handler build() makes.
local function gathered(q, spec, merge, label, build)
  local got = parallel(q, spec, merge, label)
  if got ~= nil then return got end
  local h, collect = build()
  scan(q, h, label)
  return collect()
end

local function sort_groups(list, nk)
  sort(list, function(x, y)
    for i = 1, nk do
      local a1, b1 = x[1][i], y[1][i]
      if a1 ~= b1 then return before(a1, b1) end
    end
    return false
  end)
end

-- Run aggregate `a` over the query.  No keys: returns the final value(s).
-- Keys: a result set of key columns then the aggregate's columns.
local function run(q, a, label)
  local nk = #q.keys
  local got = gathered(q, a.spec, a.merge, label, function() return grouping(q, a) end)
  if nk == 0 then return a.final(got) end
  local order = got
  sort_groups(order, nk)
  local cols = {}
  for i, k in ipairs(q.keys) do cols[i] = k.name end
  for _, c in ipairs(a.columns) do cols[#cols + 1] = c end
  local rows = {}
  for r, g in ipairs(order) do
    local row = {}
    for i = 1, nk do
      local k = g[1][i]
      if q.keys[i].window and type(k) == "number" then k = iso(k) end
      row[i] = k
    end
    local vals = { a.final(g[2]) }
    for i = 1, #a.columns do local v = vals[i]; row[nk + i] = v == nil and NULL or v end
    rows[r] = row
  end
  return finish(result(cols, rows), q)
end

function Q:count() return run(self, agg_count(), "count") end
function Q:sum(f) return run(self, agg_sum(f), "sum") end
function Q:avg(f) return run(self, agg_avg(f), "avg") end
function Q:min(f) return run(self, agg_minmax(f, false), "min") end
function Q:max(f) return run(self, agg_minmax(f, true), "max") end
function Q:distinct(f) return run(self, agg_distinct(f), "distinct") end
function Q:percentiles(f, ps)
  local a = agg_percentiles(f, ps)
  if #self.keys == 0 then
    local vals = { run(self, a, "percentiles") }
    local row = {}
    for i = 1, #a.columns do row[i] = vals[i] == nil and NULL or vals[i] end
    return result(a.columns, { row })
  end
  return run(self, a, "percentiles")
end

-- top(n, field): the n most frequent values of field (exact), with their
-- counts; per group when grouped.  Its grouping gathers { keys, counts }.
top_grouping = function(q, get)
  local where = where_all(q.wheres)
  local nk = #q.keys
  local gets = {}
  for i = 1, nk do gets[i] = q.keys[i].get end
  local groups = {}
  local h = function(e)
    if where == nil or where(e) then
      local v = get(e)
      if v ~= nil then
        if type(v) == "table" then v = json(v) end
        local ck, ks = "", nil
        if nk > 0 then
          local parts = {}
          ks = {}
          for i = 1, nk do
            local k = gets[i](e); if k == nil then k = NULL end
            ks[i] = k
            parts[i] = key_text(k)
          end
          ck = concat(parts, "\31")
        end
        local g = groups[ck]
        if g == nil then g = { ks or {}, {} }; groups[ck] = g end
        g[2][v] = (g[2][v] or 0) + 1
      end
    end
  end
  return h, function() return values(groups) end
end

local function merge_counts(a, b)
  for v, c in pairs(b) do a[v] = (a[v] or 0) + c end
  return a
end

function Q:top(n, f)
  if type(n) ~= "number" or n < 1 then error("top wants a count and a field: top(10, \"data.customer\")", 2) end
  local get = getter(f)
  local nk = #self.keys
  local merge = merge_counts
  if nk == 0 then
    -- one group: parallel() merges a keyless state, here a list of one
    merge = function(a, b)
      if a[1] == nil then return b end
      if b[1] ~= nil then merge_counts(a[1][2], b[1][2]) end
      return a
    end
  end
  local list = gathered(self, { kind = "top", f = f }, merge, "top",
                        function() return top_grouping(self, get) end)
  sort_groups(list, nk)
  local cols = {}
  for i, k in ipairs(self.keys) do cols[i] = k.name end
  cols[#cols + 1] = field_name(f, nk + 1)
  cols[#cols + 1] = "count"
  local rows = {}
  for _, g in ipairs(list) do
    local vals = {}
    for v, c in pairs(g[2]) do vals[#vals + 1] = { v, c } end
    sort(vals, function(a, b) if a[2] ~= b[2] then return a[2] > b[2] end return before(a[1], b[1]) end)
    for i = 1, math.min(n, #vals) do
      local row = {}
      for j = 1, nk do
        local k = g[1][j]
        if self.keys[j].window and type(k) == "number" then k = iso(k) end
        row[j] = k
      end
      row[nk + 1] = vals[i][1]
      row[nk + 2] = vals[i][2]
      rows[#rows + 1] = row
    end
  end
  return finish(result(cols, rows), self)
end

-- Several aggregates in one pass: agg{ n = "count", revenue = {"sum", "data.amount"} }
local agg_makers = { count = agg_count, sum = agg_sum, avg = agg_avg, distinct = agg_distinct,
                     min = function(f) return agg_minmax(f, false) end,
                     max = function(f) return agg_minmax(f, true) end }

local function agg_multi(parts, cols)
  local n = #parts
  local specs = {}
  for i = 1, n do specs[i] = parts[i].spec end
  return {
    columns = cols,
    init = function() local s = {}; for i = 1, n do s[i] = parts[i].init() end return s end,
    step = function(s, e) for i = 1, n do s[i] = parts[i].step(s[i], e) end return s end,
    final = function(s) local r = {}; for i = 1, n do r[i] = parts[i].final(s[i]) end return unpack(r, 1, n) end,
    merge = function(a, b) for i = 1, n do a[i] = parts[i].merge(a[i], b[i]) end return a end,
    spec = { kind = "agg", parts = specs, names = cols },
  }
end

-- An aggregate from its spec (a worker rebuilding the query's).
make_agg = function(spec)
  if spec.kind == "percentiles" then return agg_percentiles(spec.f, spec.ps) end
  if spec.kind == "agg" then
    local parts = {}
    for i, p in ipairs(spec.parts) do parts[i] = agg_makers[p.kind](p.f) end
    return agg_multi(parts, spec.names)
  end
  return agg_makers[spec.kind](spec.f)
end

function Q:agg(spec)
  if type(spec) ~= "table" then error("agg wants a table like { n = \"count\", total = {\"sum\", \"data.amount\"} }", 2) end
  local names = {}
  for k in pairs(spec) do names[#names + 1] = k end
  sort(names, before)
  local parts, cols = {}, {}
  for i, name in ipairs(names) do
    local s = spec[name]
    local kind, f = s, nil
    if type(s) == "table" then kind, f = s[1], s[2] end
    local mk = agg_makers[kind]
    if not mk then error("agg: unknown aggregate '" .. tostring(kind) .. "' (count, sum, avg, min, max, distinct)", 2) end
    parts[i] = mk(f)
    cols[i] = tostring(name)
  end
  local n = #parts
  local a = agg_multi(parts, cols)
  if #self.keys == 0 then
    local vals = { run(self, a, "agg") }
    local row = {}
    for i = 1, n do row[i] = vals[i] == nil and NULL or vals[i] end
    return result(cols, { row })
  end
  return run(self, a, "agg")
end

-- Events themselves: list(n) the first n matching events; each(fn) calls fn.
function Q:list(n)
  n = n or 20
  local where = where_all(self.wheres)
  local got = {}
  scan(self, function(e)
    if where == nil or where(e) then
      got[#got + 1] = e
      if #got >= n then return STOP end
    end
  end, "list")
  return event_list(got)
end
Q.first = Q.list

function Q:each(fn)
  local where = where_all(self.wheres)
  if where then return scan(self, function(e) if where(e) then fn(e) end end, "each") end
  return scan(self, fn, "each")
end

-- map(fn): a result set of whatever fn returns per event (a table of
-- column = value, or a single value).
function Q:map(fn, n)
  local where = where_all(self.wheres)
  local cols, seen, rows = {}, {}, {}
  scan(self, function(e)
    if where == nil or where(e) then
      local v = fn(e)
      if v ~= nil then rows[#rows + 1] = v end
      if n and #rows >= n then return STOP end
    end
  end, "map")
  for _, v in ipairs(rows) do
    if type(v) == "table" then
      local ks = {}
      for k in pairs(v) do ks[#ks + 1] = k end
      sort(ks, before)
      for _, k in ipairs(ks) do if not seen[k] then seen[k] = true; cols[#cols + 1] = k end end
    end
  end
  if #cols == 0 then cols = { "value" } end
  local out_rows = {}
  for i, v in ipairs(rows) do
    local row = {}
    if type(v) == "table" then
      for j, c in ipairs(cols) do local x = v[c]; row[j] = x == nil and NULL or x end
    else row[1] = v end
    out_rows[i] = row
  end
  return finish(result(cols, out_rows), self)
end

Q.__tostring = function(q)
  return "query over " .. (q.sel.name and (q.sel.kind .. " " .. q.sel.name) or q.sel.kind) ..
         " (finish it with :count(), :sum(f), :avg(f), :min(f), :max(f), :distinct(f), :percentiles(f, ps), :top(n, f), :agg{...}, :list(n))"
end

------------------------------------------------------------- built-ins

function G.from(spec) return query(selector(spec)) end

function G.streams()
  local rows = {}
  for i, s in ipairs(T.streams()) do rows[i] = { s[1], s[2] == nil and NULL or s[2] } end
  return result({ "stream", "version" }, rows)
end

function G.categories()
  local rows = {}
  for i, c in ipairs(T.categories()) do rows[i] = { c } end
  return result({ "category" }, rows)
end

-- read(stream [, {from=, limit=, backward=}]); read() or read("$all") reads all.
function G.read(stream, opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("read(stream, {from=, limit=, backward=})", 2) end
  local sel
  if stream == nil or stream == "$all" then sel = { kind = "all" }
  elseif type(stream) == "table" then sel = selector(stream)
  else sel = { kind = "stream", name = tostring(stream) } end
  sel.limit = opts.limit or 100
  sel.backward = opts.backward and true or false
  if opts.from then sel.from = tonumber(opts.from) end
  return event_list(T.read(sel))
end

function G.last_position() return T.last_position() end

local function event_line(e)
  if settings.format == "json" then
    return fmt('{"position":%s,"stream":%s,"type":%s,"version":%s,"time":%s,"data":%s}',
      num_text(e.position or 0), json(e.stream), json(e.type), num_text(e.version or 0), num_text(e.time or 0), json(e.data))
  end
  return fmt("%s  %s  %s@%s  %s  %s", num_text(e.position or 0), iso(e.time), e.stream, num_text(e.version or 0), e.type, json(e.data))
end

-- tail(stream | {selector} | nil): print new events as they arrive, until Ctrl-C.
function G.tail(spec, fn)
  local sel = type(spec) == "string" and { kind = "stream", name = spec } or selector(spec)
  fn = fn or function(e) out(event_line(e) .. "\n"); T.flush() end
  local info = T.info()
  T.write("(tailing; Ctrl-C to stop)\n", true)
  local function follow()
    if info.remote then
      local path
      if sel.kind == "stream" then path = "/streams/" .. T.escape(sel.name) .. "/live"
      elseif sel.kind == "category" then path = "/all/live?category=" .. T.escape(sel.name)
      elseif sel.kind == "type" then path = "/all/live?type=" .. T.escape(sel.name)
      else path = "/all/live" end
      local matches = function(e)
        if sel.streams and not sel.streams[e.stream] then return false end
        if sel.types and not sel.types[e.type] then return false end
        return true
      end
      T.sse(path, function(e) if type(e) == "table" and matches(e) then fn(e) end end)
      return
    end
    -- embedded: poll the store's head (events appended by this process)
    local pos = T.last_position()
    while not T.interrupted() do
      local now = T.last_position()
      if now > pos then
        local s = { kind = "all", from = pos + 1, streams = sel.streams, types = sel.types }
        if sel.kind == "stream" then s.streams = { [sel.name] = true }
        elseif sel.kind == "category" or sel.kind == "type" then s.kind, s.name = sel.kind, sel.name end
        T.scan(s, function(e) if e.position <= now then fn(e) end end, nil)
        pos = now
      end
      T.sleep(0.1)
    end
  end
  local ok, err = pcall(follow)
  if not ok and tostring(err) ~= "interrupted" then error(err, 0) end
  T.ack_interrupt()
end

-- append(stream, type, data [, metadata]) -> position (both modes).
function G.append(stream, etype, data, meta)
  if type(stream) ~= "string" or type(etype) ~= "string" then
    error("append(stream, type, data [, metadata])", 2)
  end
  return T.append(stream, etype, data, meta)
end

function G.show(...) show(...) end
function G.json(v) return json(v) end
G.null = NULL
G.iso_time = iso

------------------------------------------------------------- projections

-- Projections go through T.proj (repl/replproj.c) when the projection
-- runtime is linked in (embedded) or over HTTP (remote).
local function remote() return T.info().remote end

local function http_json(method, path, body)
  local st, text = T.http(method, path, body, body and "application/json" or nil)
  if st == 404 then return nil, st end
  if st < 200 or st >= 300 then
    local v = T.json_decode(text)
    local msg = type(v) == "table" and (v.error or v.message) or text
    error(fmt("%s %s: HTTP %d: %s", method, path, st, tostring(msg)), 3)
  end
  if text == "" then return true, st end
  local v, e = T.json_decode(text)
  if v == nil and e then return text, st end
  return v, st
end

local function need_proj(what)
  if remote() then return nil end
  if not T.proj then
    error(what .. ": the projection runtime is not linked into this build; use --url with a server", 3)
  end
  return T.proj
end

local function proj_path(name, rest)
  return "/projections/" .. T.escape(name) .. (rest or "")
end

local function as_rows(list, cols)
  local rows = {}
  for i, p in ipairs(list) do
    local row = {}
    for j, c in ipairs(cols) do local v = p[c]; row[j] = v == nil and NULL or v end
    rows[i] = row
  end
  return result(cols, rows)
end

local proj_cols = { "name", "status", "position", "lag", "events", "error" }

function G.projections()
  local P = need_proj("projections()")
  local list
  if P then list = P.list()
  else
    local v = http_json("GET", "/projections")
    list = type(v) == "table" and (v.projections or v) or {}
  end
  for _, p in ipairs(list) do
    if type(p.error) == "table" then
      p.error = fmt("position %s (%s): %s", tostring(p.error.position), tostring(p.error.type), tostring(p.error.message))
    end
  end
  return as_rows(list, proj_cols)
end

function G.status(name)
  if type(name) ~= "string" then error("status(name)", 2) end
  local P = need_proj("status()")
  if P then return P.status(name) end
  local v = http_json("GET", proj_path(name))
  if v == nil then error("no projection '" .. name .. "'", 2) end
  return v
end

function G.state(name, partition)
  if type(name) ~= "string" then error("state(name [, partition])", 2) end
  local P = need_proj("state()")
  if P then return P.state(name, partition) end
  local path = proj_path(name, "/state")
  if partition ~= nil then path = path .. "/" .. T.escape(tostring(partition)) end
  local v = http_json("GET", path)
  return v
end

-- query(projection, query_name [, args]): a named query of the script's
-- `queries` table.
function G.query(name, qname, args)
  if type(name) ~= "string" or type(qname) ~= "string" then
    error("query(projection, query_name [, args])", 2)
  end
  local P = need_proj("query()")
  if P then return P.query(name, qname, args) end
  local path = proj_path(name, "/query/" .. T.escape(qname))
  if args ~= nil then path = path .. "?args=" .. T.escape(json(args)) end
  local v, st = http_json("GET", path)
  if v == nil and st == 404 then error("no projection or query " .. name .. "/" .. qname, 2) end
  return v
end

local function read_file(file)
  if not T.read_file then error("reading files is not available", 3) end
  local text, e = T.read_file(file)
  if not text then error(e, 3) end
  return text
end

-- load(file): install a projection from a Lua file (named after the file);
-- embedded: runs it over history now; remote: PUT to the server.
function G.load(file, name)
  if type(file) ~= "string" then error("load(file [, name])", 2) end
  name = name or file:match("([^/]+)%.lua$") or file:match("([^/]+)$")
  local src = read_file(file)
  local P = need_proj("load()")
  if P then return P.load(name, src, file) end
  http_json("PUT", proj_path(name), src)
  return G.status(name)
end

-- run(file): run a projection file once over all history; its final state.
function G.run(file)
  if type(file) ~= "string" then error("run(file)", 2) end
  local src = read_file(file)
  local P = need_proj("run()")
  if P then return P.run(src, file) end
  error("run(): running a projection file once needs embedded mode (--data); use load() on a server", 2)
end

------------------------------------------------------------- dot commands

local help = [[
Lua prompt: expressions print their value; statements run; unfinished
chunks continue on the next line.  Ctrl-C cancels, Ctrl-D quits.

Events
  streams()  categories()              list names
  read(stream [, {from=, limit=, backward=}])   read events (read() = all)
  tail(stream | {category=...} | nil)  print new events until Ctrl-C
Queries (one pass over history, Ctrl-C cancels)
  from{category="order"}              selector: all / stream / streams /
                                       category / type / types
    :where(function(e) return e.data.amount > 100 end)   or :where("type", "X")
    :group_by("type", "data.customer")  fields are "dotted.paths" or functions
    :window(60000)                      event-time windows (ms)
    :count()  :sum(f)  :avg(f)  :min(f)  :max(f)  :distinct(f)
    :percentiles(f, {0.5, 0.95, 0.99})  :top(n, f)  :agg{n="count", s={"sum", f}}
    :list(n)  :each(fn)  :map(fn)       :order_by(col, "desc")  :limit(n)
Projections
  projections()  status(name)  state(name [, partition])  query(name, q [, args])
  load(file)  run(file)
Dot commands
  .help  .streams  .categories  .projections  .describe NAME  .load FILE
  .format table|json|csv|vertical  .timing on|off  .quit
]]

local dots = {}
function dots.help() out(help) end
function dots.streams() show(G.streams()) end
function dots.categories() show(G.categories()) end
function dots.projections() show(G.projections()) end
function dots.describe(arg)
  if arg == "" then error(".describe NAME", 0) end
  local s = G.status(arg)
  if type(s) ~= "table" then show(s) return end
  local keys = {}
  for k in pairs(s) do keys[#keys + 1] = k end
  sort(keys, before)
  local rows = {}
  for i, k in ipairs(keys) do rows[i] = { k, s[k] } end
  show_rs(result({ "property", "value" }, rows))
end
function dots.load(arg)
  if arg == "" then error(".load FILE", 0) end
  show(G.load(arg))
end
function dots.format(arg)
  if arg == "" then out(settings.format .. "\n") return end
  if arg ~= "table" and arg ~= "json" and arg ~= "csv" and arg ~= "vertical" then
    error(".format table|json|csv|vertical", 0)
  end
  settings.format = arg
end
function dots.timing(arg)
  if arg == "on" then settings.timing = true elseif arg == "off" then settings.timing = false
  elseif arg == "" then out(settings.timing and "on\n" or "off\n") return
  else error(".timing on|off", 0) end
  T.set_timing(settings.timing)
end
function dots.quit() T.quit() end
dots.exit = dots.quit
dots.q = dots.quit

local dot_names = {}
for k in pairs(dots) do dot_names[#dot_names + 1] = "." .. k end
sort(dot_names)

-- A dot command line: the REPL sends any line whose first non-blank
-- character is '.' followed by a letter (repl/replline.c).
function T.dot(line)
  local cmd, arg = line:match("^%s*%.(%S+)%s*(.-)%s*$")
  local f = cmd and dots[cmd]
  if not f then error("unknown command '" .. (line:match("^%s*(%S+)") or "") .. "'; try .help", 0) end
  return f(arg or "")
end

------------------------------------------------------------- completion

local types_cache
local function event_types()
  -- types seen in the most recent events (there is no type listing API)
  if types_cache then return types_cache end
  types_cache = {}
  local ok, list = pcall(T.read, { kind = "all", backward = true, limit = 2000 })
  if ok then
    local seen = {}
    for _, e in ipairs(list) do
      if not seen[e.type] then seen[e.type] = true; types_cache[#types_cache + 1] = e.type end
    end
  end
  return types_cache
end

local function projection_names()
  local names = {}
  local ok, rs = pcall(G.projections)
  if ok then for _, r in ipairs(rs.rows) do names[#names + 1] = r[1] end end
  return names
end

local function names_for_strings()
  local out_ = {}
  local ok, s = pcall(T.streams)
  if ok then for _, x in ipairs(s) do out_[#out_ + 1] = x[1] end end
  local ok2, c = pcall(T.categories)
  if ok2 then for _, x in ipairs(c) do out_[#out_ + 1] = x end end
  for _, t in ipairs(event_types()) do out_[#out_ + 1] = t end
  for _, n in ipairs(projection_names()) do out_[#out_ + 1] = n end
  return out_
end

local lua_keywords = { "and", "break", "do", "else", "elseif", "end", "false", "for", "function",
                       "if", "in", "local", "nil", "not", "or", "repeat", "return", "then", "true",
                       "until", "while" }

-- T.complete(line, word) -> candidates replacing `word` (the text from the
-- start of the current token to the cursor).
function T.complete(line, word)
  local res, seen = {}, {}
  local function add(c) if not seen[c] then seen[c] = true; res[#res + 1] = c end end
  if line:match("^%s*%.") and not line:find("%s") then
    for _, d in ipairs(dot_names) do if d:sub(1, #word) == word then add(d) end end
    return res
  end
  if line:match("^%s*%.describe%s") or line:match("^%s*%.load%s") then
    if line:match("^%s*%.describe") then
      for _, n in ipairs(projection_names()) do if n:sub(1, #word) == word then add(n) end end
    end
    return res
  end
  if line:match("^%s*%.format%s") then
    for _, f in ipairs({ "table", "json", "csv", "vertical" }) do if f:sub(1, #word) == word then add(f) end end
    return res
  end
  -- inside a string literal: names of streams, categories, types, projections
  local q = word:match("^([\"'])")
  if q then
    local pre = word:sub(2)
    for _, n in ipairs(names_for_strings()) do
      if n:sub(1, #pre) == pre then add(q .. n) end
    end
    sort(res)
    return res
  end
  -- a Lua path a.b.c or a:b
  local base, sepc, last = word:match("^(.-)([%.:])([%w_]*)$")
  local tbl, prefix
  if base and base ~= "" and base:match("^[%a_][%w_%.]*$") then
    tbl = G
    for part in base:gmatch("[^.]+") do
      if type(tbl) ~= "table" then tbl = nil break end
      tbl = rawget(tbl, part)
    end
    if type(tbl) ~= "table" then
      -- methods through the metatable (a query's :where, a string's :upper)
      local mt = tbl ~= nil and getmetatable(tbl)
      tbl = type(tbl) == "string" and string or (mt and type(mt.__index) == "table" and mt.__index) or nil
    end
    prefix = base .. sepc
  else
    tbl, last, prefix = G, word, ""
    if not word:match("^[%a_][%w_]*$") and word ~= "" then return res end
    for _, k in ipairs(lua_keywords) do if k:sub(1, #last) == last then add(k) end end
  end
  if type(tbl) == "table" then
    local t, guard = tbl, 0
    while type(t) == "table" and guard < 4 do
      for k, v in pairs(t) do
        if type(k) == "string" and k:match("^[%a_][%w_]*$") and k:sub(1, #last) == last then
          add(prefix .. k .. ((type(v) == "function" and sepc ~= ".") and "(" or ""))
        end
      end
      local mt = getmetatable(t)
      t = mt and type(mt.__index) == "table" and mt.__index or nil
      guard = guard + 1
    end
  end
  sort(res)
  return res
end

return show
