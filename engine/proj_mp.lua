-- proj_mp.lua — the projection runtime's msgpack decoder (trusted; embedded
-- in proj_mp.c at build time).  proj_rt.lua decodes event payloads with it,
-- and so does the REPL's scan loop (repl/prelude.lua): one decoder, two
-- batch loops.
--
-- The chunk receives (ffi, table.new or nil, ext, drop_nan_keys) and returns
--   decode(p, i) -> value, j
-- where p is a `const uint8_t *` (FFI cdata) over msgpack bytes, i the
-- 0-based offset of a value and j the offset just after it.  The bytes
-- must be validated (mp_validate: the store's records are); decode does
-- not check lengths.  Values: maps and arrays become tables (sized up
-- front with table.new), str and bin strings, integers and floats Lua
-- numbers (integers beyond 2^53 lose precision), nil, booleans;
-- ext(type, payload) gives an ext value's Lua value (nil: the payload
-- string).  A map pair with a nil key is dropped; a NaN key is dropped
-- when drop_nan_keys is true, otherwise storing it raises Lua's "table
-- index is NaN" (the projection runtime's rule: the event faults).
--
-- Written for LuaJIT's trace compiler: no inner loop for the usual small
-- map (see dmap), no closures or varargs, so a caller's loop compiles with
-- the decoder inlined.
local ffi, tnew, ext, drop_nan = ...

local fstr = ffi.string
local error = error
tnew = tnew or function() return {} end
ext = ext or function(_, s) return s end
drop_nan = drop_nan and true or false

local conv = ffi.new("union { double d; float f; uint32_t w[2]; }")
local decode

local function be16(p, i) return p[i] * 256 + p[i + 1] end
local function be32(p, i) return ((p[i] * 256 + p[i + 1]) * 256 + p[i + 2]) * 256 + p[i + 3] end

-- One key/value pair into t.
local function pair(p, i, t)
  local k, v
  k, i = decode(p, i)
  v, i = decode(p, i)
  if k ~= nil and (k == k or not drop_nan) then t[k] = v end
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

-- An ext of n payload bytes after a header of hdr bytes (type last).
local function dext(p, i, n, hdr)
  local ty = p[i + hdr - 1]
  if ty >= 128 then ty = ty - 256 end
  local v = ext(ty, fstr(p + i + hdr, n))
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

return decode
