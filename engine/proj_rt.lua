-- proj_rt.lua — the projection runtime's Lua half (trusted; embedded in
-- proj.c as a string at build time and run once per projection state).
--
-- It receives (ffi, bit, def, seedtab, C, table.new) and returns the table M of
-- entry points proj.c calls.  The script never sees this chunk's locals:
-- there is no debug library, and events' metatables are protected.
--
-- Replay path: proj.c fills a batch of fixed-size slots (ffi struct
-- proj_slot) plus an arena of bytes, then calls M.run(slots, arena, n, keep)
-- once per batch.  The loop below builds each event table, resolves the
-- partition and the handler, and calls it — all inside one JIT-compiled
-- Lua loop, so the C/Lua boundary is crossed once per batch, not per event.
-- Event fields type, position, version, time and data are set eagerly;
-- stream, id, metadata and category are computed on first access: from the
-- batch's bytes while it runs, afterwards by asking the host to read the
-- event back by position (C.fetch).  A new string per event, or a copy of
-- every batch kept for later, were the largest costs of a replay (measured).
local ffi, bit, def, seedtab, C, tnew = ...

ffi.cdef [[
typedef struct proj_slot {
    double position, version, time;
    uint32_t stream_off, stream_len, data_off, data_len, meta_off, meta_len, id_off, type_idx;
} proj_slot;
]]

local slotp = ffi.typeof("const proj_slot *")
local u8p = ffi.typeof("const uint8_t *")
local i32p = ffi.typeof("int32_t *")
local fstr, fcast = ffi.string, ffi.cast
local tohex = bit.tohex
local type, error, pairs, rawget, rawset, setmetatable, tostring, select =
    type, error, pairs, rawget, rawset, setmetatable, tostring, select
local floor, huge = math.floor, math.huge
local sformat, sfind, ssub, concat, sort = string.format, string.find, string.sub, table.concat,
    table.sort

----------------------------------------------------------------- msgpack in Lua
local conv = ffi.new("union { double d; float f; uint32_t w[2]; }")
local decode

local function be16(p, i) return p[i] * 256 + p[i + 1] end
local function be32(p, i) return ((p[i] * 256 + p[i + 1]) * 256 + p[i + 2]) * 256 + p[i + 3] end

-- One key/value pair into t.
local function pair(p, i, t)
  local k, v
  k, i = decode(p, i)
  v, i = decode(p, i)
  if k ~= nil then t[k] = v end
  return i
end

-- Small maps (the usual event payload) are decoded without a loop: a loop
-- here would be an inner loop of the replay loop, which LuaJIT does not
-- compile into the caller's trace (measured: 3x slower replay).
local function dmap(p, i, n)
  local t = tnew(0, n)
  if n <= 8 then
    if n > 0 then i = pair(p, i, t)
    if n > 1 then i = pair(p, i, t)
    if n > 2 then i = pair(p, i, t)
    if n > 3 then i = pair(p, i, t)
    if n > 4 then i = pair(p, i, t)
    if n > 5 then i = pair(p, i, t)
    if n > 6 then i = pair(p, i, t)
    if n > 7 then i = pair(p, i, t)
    end end end end end end end end
    return t, i
  end
  for _ = 1, n do i = pair(p, i, t) end
  return t, i
end

local function darr(p, i, n)
  local t = tnew(n, 0)
  for j = 1, n do
    local v
    v, i = decode(p, i)
    t[j] = v
  end
  return t, i
end

local function dext(p, i, n, hdr)
  local ty = p[i + hdr - 1]
  if ty >= 128 then ty = ty - 256 end
  local v = C.ext(ty, fstr(p + i + hdr, n))
  return v, i + hdr + n
end

decode = function(p, i)
  local b = p[i]
  if b < 0x80 then return b, i + 1 end
  if b >= 0xa0 and b < 0xc0 then
    local n = b - 0xa0
    return fstr(p + i + 1, n), i + 1 + n
  end
  if b < 0x90 then return dmap(p, i + 1, b - 0x80) end
  if b < 0xa0 then return darr(p, i + 1, b - 0x90) end
  if b >= 0xe0 then return b - 256, i + 1 end
  if b == 0xcb then
    conv.w[1] = be32(p, i + 1); conv.w[0] = be32(p, i + 5)
    return conv.d, i + 9
  end
  if b == 0xc0 then return nil, i + 1 end
  if b == 0xc2 then return false, i + 1 end
  if b == 0xc3 then return true, i + 1 end
  if b == 0xcc then return p[i + 1], i + 2 end
  if b == 0xcd then return be16(p, i + 1), i + 3 end
  if b == 0xce then return be32(p, i + 1), i + 5 end
  if b == 0xcf then return be32(p, i + 1) * 4294967296 + be32(p, i + 5), i + 9 end
  if b == 0xd0 then local v = p[i + 1]; if v >= 128 then v = v - 256 end; return v, i + 2 end
  if b == 0xd1 then local v = be16(p, i + 1); if v >= 32768 then v = v - 65536 end; return v, i + 3 end
  if b == 0xd2 then
    local v = be32(p, i + 1); if v >= 2147483648 then v = v - 4294967296 end
    return v, i + 5
  end
  if b == 0xd3 then
    local hi = be32(p, i + 1); if hi >= 2147483648 then hi = hi - 4294967296 end
    return hi * 4294967296 + be32(p, i + 5), i + 9
  end
  if b == 0xca then conv.w[0] = be32(p, i + 1); return conv.f, i + 5 end
  if b == 0xd9 or b == 0xc4 then local n = p[i + 1]; return fstr(p + i + 2, n), i + 2 + n end
  if b == 0xda or b == 0xc5 then local n = be16(p, i + 1); return fstr(p + i + 3, n), i + 3 + n end
  if b == 0xdb or b == 0xc6 then local n = be32(p, i + 1); return fstr(p + i + 5, n), i + 5 + n end
  if b == 0xdc then return darr(p, i + 3, be16(p, i + 1)) end
  if b == 0xdd then return darr(p, i + 5, be32(p, i + 1)) end
  if b == 0xde then return dmap(p, i + 3, be16(p, i + 1)) end
  if b == 0xdf then return dmap(p, i + 5, be32(p, i + 1)) end
  if b == 0xd4 then return dext(p, i, 1, 2) end
  if b == 0xd5 then return dext(p, i, 2, 2) end
  if b == 0xd6 then return dext(p, i, 4, 2) end
  if b == 0xd7 then return dext(p, i, 8, 2) end
  if b == 0xd8 then return dext(p, i, 16, 2) end
  if b == 0xc7 then return dext(p, i, p[i + 1], 3) end
  if b == 0xc8 then return dext(p, i, be16(p, i + 1), 4) end
  if b == 0xc9 then return dext(p, i, be32(p, i + 1), 6) end
  error("malformed msgpack in event")
end

----------------------------------------------------------------- definition
local on = def.on or {}
local any = on["$any"]
local init = def.init
local part = def.partition
if part == "stream" then part = function(e) return e.stream end end
local partitioned = part ~= nil

local types = {}     -- type index (C's) -> type string
local hcache = {}    -- type index -> handler or false
local states = {}    -- partition key -> state
local dirty = {}     -- partition key -> true, since the last checkpoint
local committed = {} -- in-memory mode: partition key -> msgpack at the last checkpoint
local outs = {}      -- emitted events since the last checkpoint
local cur_j, cur_pos = -1, 0

local function numkey(k)
  if k ~= k or k == huge or k == -huge then error("partition key must be a finite number or a string", 0) end
  if k == floor(k) and k > -2^53 and k < 2^53 then return sformat("%d", k) end
  return sformat("%.17g", k)
end

local function fresh(key)
  local s = C.load(key, committed[key])
  if s == nil then
    if init then s = init(key) end
    if s == nil then s = {} end
  end
  states[key] = s
  return s
end

----------------------------------------------------------------- lazy fields
local function fmt_id(a, off)
  local h = {}
  for k = 0, 15 do h[k + 1] = tohex(a[off + k], 2) end
  local x = concat(h)
  return ssub(x, 1, 8) .. "-" .. ssub(x, 9, 12) .. "-" .. ssub(x, 13, 16) .. "-" ..
      ssub(x, 17, 20) .. "-" .. ssub(x, 21, 32)
end

-- The batch being run (C memory, valid only while M.run runs).
local bs, ba, bn = nil, nil, 0

local function find(pos)
  local lo, hi = 0, bn - 1
  while lo <= hi do
    local mid = floor((lo + hi) / 2)
    local p = bs[mid].position
    if p == pos then return bs[mid] end
    if p < pos then lo = mid + 1 else hi = mid - 1 end
  end
end

-- Lazy fields.  During the event's batch they come from the batch's bytes;
-- afterwards (an event kept in state and read later) from the host, which
-- reads the event back by position (C.fetch).  Nothing is copied per batch.
local lazy_keys = { stream = true, id = true, metadata = true, category = true }
local function lazy(t, k)
  if not lazy_keys[k] then return nil end
  if k == "category" then
    local s = t.stream
    if type(s) ~= "string" then return nil end
    local d = sfind(s, "-", 1, true)
    local v = d and ssub(s, 1, d - 1) or s
    rawset(t, k, v)
    return v
  end
  local pos = rawget(t, "position")
  local x = bn > 0 and find(pos)
  if x then
    local v
    if k == "stream" then v = fstr(ba + x.stream_off, x.stream_len)
    elseif k == "id" then v = fmt_id(ba, x.id_off)
    elseif x.meta_len > 0 then v = (decode(ba, x.meta_off))
    else v = {} end
    rawset(t, k, v)
    return v
  end
  local stream, id, meta = C.fetch(pos)
  if stream == nil then return nil end
  rawset(t, "stream", stream)
  rawset(t, "id", id)
  rawset(t, "metadata", meta)
  return rawget(t, k)
end

local EV_MT = { __metatable = false, __index = lazy }
EV_MT.__tm_materialize = function(t)
  lazy(t, "stream"); lazy(t, "id"); lazy(t, "metadata"); lazy(t, "category")
end

----------------------------------------------------------------- tm.emit / tm.link
local function emit(stream, etype, data, metadata)
  if cur_j < 0 then error("tm.emit may only be called from a handler", 2) end
  if type(stream) ~= "string" or stream == "" then error("tm.emit: stream must be a non-empty string", 2) end
  if type(etype) ~= "string" or etype == "" then error("tm.emit: type must be a non-empty string", 2) end
  if metadata ~= nil and type(metadata) ~= "table" then error("tm.emit: metadata must be a table", 2) end
  outs[#outs + 1] = { stream, etype, C.pack(data), metadata ~= nil and C.pack(metadata) or false, cur_pos }
end

local function link(stream, e)
  if type(e) ~= "table" or type(rawget(e, "position")) ~= "number" then
    error("tm.link: second argument must be an event", 2)
  end
  emit(stream, "$>", { stream = rawget(e, "stream"), position = rawget(e, "position") })
end

----------------------------------------------------------------- entry points
local M = { emit = emit, link = link, types = types, states = states, dirty = dirty,
  committed = committed, partitioned = partitioned }

function M.run(sp, ap, n, curp)
  local s = fcast(slotp, sp)
  local cur = fcast(i32p, curp) -- the host's watchdog reads the event index here
  local a = fcast(u8p, ap)
  bs, ba, bn = s, a, n
  for j = 0, n - 1 do
    local x = s[j]
    local ti = x.type_idx
    local h = hcache[ti]
    if h == nil then
      h = on[types[ti]] or any or false
      hcache[ti] = h
    end
    if h then
      local pos = x.position
      cur_j, cur_pos = j, pos
      cur[0] = j
      seedtab[1] = pos
      local data
      if x.data_len > 0 then data = decode(a, x.data_off) end
      local e = setmetatable({ type = types[ti], position = pos, version = x.version,
        time = x.time, data = data }, EV_MT)
      local key = ""
      if partitioned then
        key = part(e)
        local tk = type(key)
        if tk ~= "string" then
          if tk == "number" then key = numkey(key)
          elseif key ~= nil then error("partition(e) must return a string, a number or nil, not a " .. tk, 0) end
        end
      end
      if key ~= nil then
        local st = states[key]
        if st == nil then st = fresh(key) end
        local r = h(st, e)
        if r ~= nil then states[key] = r end
        dirty[key] = true
      end
    end
  end
  cur_j = -1
  bs, ba, bn = nil, nil, 0
end

function M.current() return cur_j end

function M.handles(t) return on[t] ~= nil or any ~= nil end

-- After a fault: forget everything since the last checkpoint.
function M.rollback()
  bs, ba, bn = nil, nil, 0
  for k in pairs(dirty) do states[k] = nil; dirty[k] = nil end
  for i = #outs, 1, -1 do outs[i] = nil end
  cur_j = -1
end

function M.take_outs()
  local o = outs
  outs = {}
  return o
end

function M.clear_dirty()
  for k in pairs(dirty) do dirty[k] = nil end
end

-- The state of one partition (loading it, and running init, if needed).
function M.get(key)
  local s = states[key]
  if s == nil then s = fresh(key) end
  return s
end

-- The state of one partition, or nil when it does not exist (neither in
-- memory nor stored); unlike get, never creates it.
function M.peek(key)
  local s = states[key]
  if s == nil then
    s = C.load(key, committed[key])
    if s ~= nil then states[key] = s end
  end
  return s
end

-- Whole read model: the state, or a table keyed by partition.
function M.view()
  if partitioned then return states end
  return M.get("")
end

local function sorted_keys()
  local ks = {}
  for k in pairs(states) do ks[#ks + 1] = k end
  sort(ks)
  return ks
end
M.keys = sorted_keys

-- Built-in queries (after C has loaded every partition).
function M.range(from, to, limit)
  local r = {}
  for _, k in ipairs(sorted_keys()) do
    if (from == nil or k >= from) and (to == nil or k < to) then
      r[#r + 1] = { key = k, state = states[k] }
      if limit and #r >= limit then break end
    end
  end
  return r
end

function M.prefix(p, limit)
  local r = {}
  for _, k in ipairs(sorted_keys()) do
    if ssub(k, 1, #p) == p then
      r[#r + 1] = { key = k, state = states[k] }
      if limit and #r >= limit then break end
    end
  end
  return r
end

function M.top(field, n)
  local r = {}
  for k, s in pairs(states) do
    local v = type(s) == "table" and s[field] or nil
    if type(v) == "number" then r[#r + 1] = { key = k, value = v } end
  end
  sort(r, function(x, y)
    if x.value ~= y.value then return x.value > y.value end
    return x.key < y.key
  end)
  for i = #r, (n or 10) + 1, -1 do r[i] = nil end
  return r
end

function M.query(name, args)
  local q = def.queries and def.queries[name]
  if type(q) ~= "function" then error("no query named '" .. tostring(name) .. "'", 0) end
  return q(M.view(), args)
end

return M
