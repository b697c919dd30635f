-- proj_rt.lua — the projection runtime's Lua half (trusted; embedded in
-- proj.c as a string at build time and run once per projection state).
--
-- It receives (ffi, bit, def, seedtab, C, decode, jit.util) and returns the table M of
-- entry points proj.c calls; decode is the runtime's msgpack decoder
-- (proj_mp.lua, shared with the REPL's scans; ext values become sketches).  The script never sees this chunk's locals:
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
--
-- Fast path (reused events): when the bytecode of `partition` and of a
-- type's handler shows that `e` and `e.data` never leave the call (see
-- "escape analysis" below) and that `e.data` is only read with constant
-- string keys, events of that type reuse one `e` table and one `data`
-- table holding only those keys: C locates their values in the payload
-- (slot.fld) and nothing else of the payload is decoded, so such an event
-- allocates no table and interns no key string.  What a handler can
-- observe is the same as with fresh tables.  Anything the analysis cannot
-- prove (`e` passed to a function, stored, returned, captured by a
-- closure, indexed with a variable key...) keeps the general path.
-- `reuse_events = false` in the definition turns the fast path off.
local ffi, bit, def, seedtab, C, decode, jutil = ...

ffi.cdef [[
typedef struct proj_slot {
    double position, version, time;
    uint32_t stream_off, stream_len, data_off, data_len, meta_off, meta_len, id_off, type_idx;
    int32_t fast;     /* 1: fld holds the plan's keys (or data is empty); 0: general path */
    uint32_t fld[8];  /* arena offset + 1 of the value of the plan's i-th key, 0 = absent */
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

----------------------------------------------------------------- escape analysis
-- A conservative, flow-sensitive pass over a function's bytecode (via
-- jit.util): which registers may hold `e` (E) or `e.data` (D) at each
-- instruction.  The function is "safe" when such a register is only used
-- to index with a constant string key (or tested, compared, used in
-- arithmetic: operations that keep no reference and fail the same way on
-- any table), never stored, passed, returned, captured or indexed with a
-- variable key.  The result lists the constant keys read from `e` and
-- from `e.data`.  Opcode names and operand modes are those of LuaJIT 2.1;
-- an instruction whose mode differs from the expected one (another
-- LuaJIT) makes the function unsafe, so a mismatch costs speed, never
-- correctness.
local band, bor, shr = bit.band, bit.bor, bit.rshift
local BCNAMES = "ISLT  ISGE  ISLE  ISGT  ISEQV ISNEV ISEQS ISNES ISEQN ISNEN ISEQP ISNEP ISTC  ISFC  IST   ISF   ISTYPEISNUM MOV   NOT   UNM   LEN   ADDVN SUBVN MULVN DIVVN MODVN ADDNV SUBNV MULNV DIVNV MODNV ADDVV SUBVV MULVV DIVVV MODVV POW   CAT   KSTR  KCDATAKSHORTKNUM  KPRI  KNIL  UGET  USETV USETS USETN USETP UCLO  FNEW  TNEW  TDUP  GGET  GSET  TGETV TGETS TGETB TGETR TSETV TSETS TSETB TSETM TSETR CALLM CALL  CALLMTCALLT ITERC ITERN VARG  ISNEXTRETM  RET   RET0  RET1  FORI  JFORI FORL  IFORL JFORL ITERL IITERLJITERLLOOP  ILOOP JLOOP JMP   "
-- expected operand modes a, b, c (lj_bc.h: 0 none 1 dst 2 base 3 var 4 rbase
-- 5 uv 6 lit 7 lits 8 pri 9 num 10 str 11 tab 12 func 13 jump 14 cdata)
local MODES = {
  ISLT = "303", ISGE = "303", ISLE = "303", ISGT = "303", ISEQV = "303", ISNEV = "303",
  ISEQS = "30a", ISNES = "30a", ISEQN = "309", ISNEN = "309", ISEQP = "308", ISNEP = "308",
  ISTC = "103", ISFC = "103", IST = "003", ISF = "003", MOV = "103", NOT = "103",
  UNM = "103", LEN = "103", ADDVN = "139", SUBVN = "139", MULVN = "139", DIVVN = "139",
  MODVN = "139", ADDNV = "139", SUBNV = "139", MULNV = "139", DIVNV = "139", MODNV = "139",
  ADDVV = "133", SUBVV = "133", MULVV = "133", DIVVV = "133", MODVV = "133", POW = "133",
  CAT = "144", KSTR = "10a", KCDATA = "10e", KSHORT = "107", KNUM = "109", KPRI = "108",
  KNIL = "202", UGET = "105", USETV = "503", USETS = "50a", USETN = "509", USETP = "508",
  UCLO = "40d", TNEW = "106", TDUP = "10b", GGET = "10a", GSET = "30a", TGETV = "133",
  TGETS = "13a", TGETB = "136", TSETV = "333", TSETS = "33a", TSETB = "336", TSETM = "209",
  CALLM = "266", CALL = "266", CALLMT = "206", CALLT = "206", ITERC = "266", ITERN = "266",
  VARG = "266", ISNEXT = "20d", RETM = "206", RET = "406", RET0 = "406", RET1 = "406",
  FORI = "20d", FORL = "20d", ITERL = "20d", LOOP = "40d", JMP = "40d",
}
local E, D = 1, 2
local bcname = {}
for i = 0, #BCNAMES / 6 - 1 do bcname[i] = (ssub(BCNAMES, i * 6 + 1, i * 6 + 6):gsub(" ", "")) end

local function copy(t) local r = {} for k, v in pairs(t) do r[k] = v end return r end
local function merge(into, t)
  local changed = false
  for k, v in pairs(t) do
    local o = into[k] or 0
    local n = bor(o, v)
    if n ~= o then into[k] = n; changed = true end
  end
  return changed
end
local function anyfrom(t, r) for k, v in pairs(t) do if k >= r and v ~= 0 then return true end end return false end
local function clearfrom(t, r) for k in pairs(t) do if k >= r then t[k] = nil end end end

-- f: the function; slot: the register holding e on entry.  Returns nil
-- (unsafe) or { efields = {key = true}, dkeys = {key = true} }.
local function analyse(f, slot)
  if not jutil or type(f) ~= "function" then return nil end
  local fi = jutil.funcinfo(f)
  if not fi or not fi.bytecodes or fi.isvararg or fi.ffid then return nil end
  local ef, dk = {}, {}
  if fi.params <= slot then return { efields = ef, dkeys = dk } end -- e not even a parameter
  local n = fi.bytecodes
  if n > 4000 then return nil end
  local ins_in = { [1] = { [slot] = E } }
  local work, wn, steps = { 1 }, 1, 0
  while wn > 0 do
    local pc = work[wn]; work[wn] = nil; wn = wn - 1
    steps = steps + 1
    if steps > 100000 then return nil end
    local ins, m = jutil.funcbc(f, pc)
    if not ins then return nil end
    local name = bcname[band(ins, 0xff)]
    local want = name and MODES[name]
    if not want or sformat("%x%x%x", band(m, 7), band(shr(m, 3), 15), band(shr(m, 7), 15)) ~= want then
      return nil
    end
    local T = copy(ins_in[pc])
    local a, b, c, d = band(shr(ins, 8), 0xff), shr(ins, 24), band(shr(ins, 16), 0xff), shr(ins, 16)
    local function t(r) return T[r] or 0 end
    -- successors: pc + 1 (the JMP after a test, taken when the test holds),
    -- pc + 2 (the test fails), or a jump target; T2 = the state on pc + 2
    local succ1, succ2, T2 = pc + 1, nil, nil
    local target = pc + d - 0x7fff
    if name == "IST" or name == "ISF" then
      -- on the branch where D is false or nil it holds no table
      T2 = copy(T); succ2 = pc + 2
      if name == "IST" then T2[d] = nil else T[d] = nil end
    elseif name == "ISTC" or name == "ISFC" then
      -- ISTC: D true -> A = D, jump; ISFC: D false/nil -> A = D (no table), jump
      T2 = copy(T); succ2 = pc + 2
      if name == "ISTC" then T[a] = T[d]; T2[d] = nil else T[a] = nil; T[d] = nil end
    elseif ssub(name, 1, 2) == "IS" and name ~= "ISNEXT" then
      succ2 = pc + 2
    elseif name == "MOV" then T[a] = T[d]
    elseif name == "LEN" then if t(d) ~= 0 then return nil end; T[a] = nil
    elseif name == "KNIL" then for r = a, d do T[r] = nil end
    elseif name == "USETV" then if t(d) ~= 0 then return nil end
    elseif name == "GSET" then if t(a) ~= 0 then return nil end
    elseif name == "UCLO" or name == "JMP" then succ1 = target
    elseif name == "TGETS" then
      local k = jutil.funck(f, -c - 1)
      local nt = 0
      if band(t(b), E) ~= 0 then ef[k] = true; if k == "data" then nt = D end end
      if band(t(b), D) ~= 0 then dk[k] = true end
      T[a] = nt ~= 0 and nt or nil
    elseif name == "TGETV" then if t(b) ~= 0 then return nil end; T[a] = nil
    elseif name == "TGETB" then if band(t(b), D) ~= 0 then return nil end; T[a] = nil
    elseif name == "TSETV" then if t(a) ~= 0 or t(b) ~= 0 or t(c) ~= 0 then return nil end
    elseif name == "TSETS" or name == "TSETB" then if t(a) ~= 0 or t(b) ~= 0 then return nil end
    elseif name == "TSETM" then if anyfrom(T, a - 1) then return nil end
    elseif name == "CALL" or name == "CALLM" or name == "VARG" then
      if anyfrom(T, a) then return nil end
      clearfrom(T, a)
    elseif name == "ITERC" or name == "ITERN" then
      if anyfrom(T, a - 3) then return nil end
      clearfrom(T, a)
    elseif name == "ISNEXT" then
      if anyfrom(T, a - 3) then return nil end
      succ1 = target
    elseif name == "CALLT" or name == "CALLMT" or name == "RETM" then
      if anyfrom(T, a) then return nil end
      succ1 = nil
    elseif name == "RET" then
      for r = a, a + d - 2 do if t(r) ~= 0 then return nil end end
      succ1 = nil
    elseif name == "RET1" then if t(a) ~= 0 then return nil end; succ1 = nil
    elseif name == "RET0" then succ1 = nil
    elseif name == "FORI" or name == "FORL" then T[a + 3] = nil; succ2 = target
    elseif name == "ITERL" then T[a - 1] = T[a]; succ2 = target
    elseif name == "LOOP" then succ2 = target
    elseif MODES[name] == "139" or MODES[name] == "133" or name == "CAT" or name == "NOT"
        or name == "UNM" or sfind(",KSTR,KCDATA,KSHORT,KNUM,KPRI,UGET,TNEW,TDUP,GGET,", "," .. name .. ",", 1, true) then
      T[a] = nil
    elseif name == "USETS" or name == "USETN" or name == "USETP" then
      -- no register read
    else
      return nil -- FNEW (a closure may capture e), and anything unexpected
    end
    for i = 1, 2 do
      local sp = i == 1 and succ1 or succ2
      local st = (i == 2 and T2) or T
      if sp then
        if sp < 1 or sp >= n then return nil end
        local into = ins_in[sp]
        if not into then ins_in[sp] = copy(st); wn = wn + 1; work[wn] = sp
        elseif merge(into, st) then wn = wn + 1; work[wn] = sp end
      end
    end
  end
  return { efields = ef, dkeys = dk }
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
local track = true   -- false: a one-shot run (M.one_shot): no dirty set, no checkpoints
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

----------------------------------------------------------------- plans (fast path)
local reuse = def.reuse_events
if reuse == nil and type(def.options) == "table" then reuse = def.options.reuse_events end
local part_plan = false
if reuse ~= false then
  if part == nil then part_plan = { efields = {}, dkeys = {} } else part_plan = analyse(part, 0) or false end
end

local plans = {}   -- type name -> plan or false
local plan_of = {} -- type index -> plan or false
-- The plan of a type: { keys = sorted data keys read, n = #keys, lazy = reads
-- a lazy field, d = the type's reused data table }, or false.
local function plan_for(tname)
  local pl = plans[tname]
  if pl ~= nil then return pl end
  pl = false
  local h = on[tname] or any
  local hp = h and part_plan and analyse(h, 1)
  if hp then
    local set, keys = {}, {}
    for k in pairs(part_plan.dkeys) do set[k] = true end
    for k in pairs(hp.dkeys) do set[k] = true end
    for k in pairs(set) do keys[#keys + 1] = k end
    sort(keys)
    local lz = false
    for k in pairs(lazy_keys) do
      if part_plan.efields[k] or hp.efields[k] then lz = true end
    end
    if #keys <= 8 then pl = { keys = keys, n = #keys, lazy = lz, d = {} } end
  end
  plans[tname] = pl
  return pl
end

-- The value of a plan's key: o = arena offset + 1 (0 = absent).
local function fv(a, o)
  if o > 0 then return (decode(a, o - 1)) end
  return nil
end

-- Unrolled (see dmap: a loop here would not compile into the replay loop).
local function fill(d, k, n, a, f)
  if n > 0 then d[k[1]] = fv(a, f[0])
  if n > 1 then d[k[2]] = fv(a, f[1])
  if n > 2 then d[k[3]] = fv(a, f[2])
  if n > 3 then d[k[4]] = fv(a, f[3])
  if n > 4 then d[k[5]] = fv(a, f[4])
  if n > 5 then d[k[6]] = fv(a, f[5])
  if n > 6 then d[k[7]] = fv(a, f[6])
  if n > 7 then d[k[8]] = fv(a, f[7])
  end end end end end end end end
end

local RE = setmetatable({}, EV_MT) -- the reused event (never reachable by a script afterwards)

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
      local pl = plan_of[ti]
      if pl == nil then pl = plan_for(types[ti]); plan_of[ti] = pl end
      local e
      if pl and x.fast ~= 0 then
        e = RE
        e.type = types[ti]; e.position = pos; e.version = x.version; e.time = x.time
        if pl.lazy then e.stream = nil; e.id = nil; e.metadata = nil; e.category = nil end
        if x.data_len > 0 then
          local d = pl.d
          fill(d, pl.keys, pl.n, a, x.fld)
          e.data = d
        else
          e.data = nil
        end
      else
        local data
        if x.data_len > 0 then data = decode(a, x.data_off) end
        e = setmetatable({ type = types[ti], position = pos, version = x.version,
          time = x.time, data = data }, EV_MT)
      end
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
        if track then dirty[key] = true end -- before the handler: a failing handler's changes are discarded
        local r = h(st, e)
        if r ~= nil then states[key] = r end
      end
    end
  end
  cur_j = -1
  bs, ba, bn = nil, nil, 0
end

function M.current() return cur_j end

-- Whether events of type t run Lua, and the data keys C must locate for
-- the fast path (nil: general path).
function M.handles(t)
  if on[t] == nil and any == nil then return false end
  local pl = plan_for(t)
  return true, pl and pl.keys or nil
end

-- After a fault: forget everything since the last checkpoint.
-- (One-shot: the only checkpoint is the empty model.)
function M.rollback()
  bs, ba, bn = nil, nil, 0
  if track then
    for k in pairs(dirty) do states[k] = nil; dirty[k] = nil end
  else
    for k in pairs(states) do states[k] = nil end
  end
  for i = #outs, 1, -1 do outs[i] = nil end
  cur_j = -1
end

-- A one-shot run (proj_set_one_shot): never checkpointed, so no dirty set
-- (it would hold every partition key once more).
function M.one_shot() track = false end

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
