-- one_key_acquire.lua: a measurement prototype, not used by the crate. It decides like
-- src/store/lua/acquire.lua, but keeps every rate limit of an identifier in ONE Redis
-- string (records of four little-endian doubles: limit id, then the state's three
-- numbers), so that a call costs one GET and one write however many limits it has.
-- benchmarks/script_instructions.sh runs it (shapes one-key32, one-key32x4) to measure
-- what that layout would save; see BENCHMARKS.md, eighth pass. It leaves out what a
-- real version needs (record expiry, per-model keys, concurrency slots, denials'
-- details, reading the per-limit keys of earlier releases). (clock.lua is prepended.)
--
-- KEYS     one key per call, call after call.
-- ARGV[1]  little-endian doubles: the number of calls, then per call: 1 (one key), its
--          limit count n, then per limit: id, algorithm (1 fixed, 2 sliding, 3 bucket),
--          limit, window us (or refill), interval us (bucket), cost (negative: check
--          that -cost fits, take nothing).
-- Reply    "now", then per call: allowed_all, the key's value as read (nil: none).

local MAX = 4503599627370496
local FORMATS = { '<dddd', '<dddddddd', '<dddddddddddd', '<dddddddddddddddd' }
local function format(r)
  local f = FORMATS[r]
  if not f then f = '<' .. string.rep('dddd', r) FORMATS[r] = f end
  return f
end

-- As view in state.lua, from the state's numbers (a nil: none).
local function view(alg, a, b, c, p2, p3, now)
  if alg == 3 then
    if not a then return now, 0, 0, 0 end
    if b > now then now = b end
    local elapsed = now - b
    local intervals = (elapsed - elapsed % p3) / p3
    local used = a - intervals * p2
    if used <= 0 then return now, 0, 0, 0 end
    return b + intervals * p3, used, 0, used
  end
  if a and a * p2 > now + p2 then a = nil end
  if a and a * p2 > now then now = a * p2 end
  local idx = (now - now % p2) / p2
  if alg == 1 then
    if a and a >= idx then return idx, b, 0, b end
    return idx, 0, 0, 0
  end
  local cur, prev = 0, 0
  if a and a >= idx then cur, prev = b, c elseif a and a == idx - 1 then prev = b end
  if prev <= 0 then return idx, cur, prev, cur end
  local w = prev * (p2 - (now - idx * p2)) / p2
  local f = w % 1
  if f > 0 then w = w - f + 1 end
  return idx, cur, prev, cur + w
end

local records = ARGV[1]
local now = clock(ARGV[2])
local calls, at = struct.unpack('<d', records)
local reply, len = { now, 0, 0 }, 1
for call = 1, calls do
  local _, n
  _, n, at = struct.unpack('<dd', records, at)
  local key = KEYS[call]
  local raw = redis.pcall('GET', key)
  local S, r, all = nil, 0, 1
  if raw then
    if #raw % 32 ~= 0 then all = -1 else r = #raw / 32 S = { struct.unpack(format(r), raw) } end
  end
  -- One pass: the parsed set is a scratch copy, written back only if every limit allows.
  local changed, moved = false, false
  for i = 1, n do
    local id, alg, p1, p2, p3, cost
    id, alg, p1, p2, p3, cost, at = struct.unpack('<dddddd', records, at)
    if all == 1 then
      local j = 4 * i - 3
      if i > r or S[j] ~= id then
        j = 0
        for q = 1, 4 * r, 4 do if S[q] == id then j = q break end end
      end
      local anchor, cur, prev, used
      if j > 0 then
        anchor, cur, prev, used = view(alg, S[j + 1], S[j + 2], S[j + 3], p2, p3, now)
      else
        anchor, cur, prev, used = view(alg, nil, 0, 0, p2, p3, now)
      end
      if used + (cost < 0 and -cost or cost) > p1 then
        all = 0
      elseif cost > 0 then
        if not S then S = {} end
        if j == 0 then r = r + 1 j = 4 * r - 3 S[j] = id moved = true end
        if alg == 3 then
          S[j + 1], S[j + 2], S[j + 3] = cur + cost, anchor, 0
          moved = true
        else
          if S[j + 1] ~= anchor then moved = true end
          S[j + 1], S[j + 2], S[j + 3] = anchor, cur + cost, prev
        end
        changed = true
      end
    end
  end
  len = len + 2
  reply[len - 1], reply[len] = all, raw
  if all == 1 and changed then
    local packed = struct.pack(format(r), unpack(S, 1, 4 * r))
    if not moved then
      -- The same windows: the value's length and TTL stay.
      redis.call('SETRANGE', key, '0', packed)
    elseif raw then
      redis.call('SET', key, packed, 'KEEPTTL')
      redis.call('PEXPIRE', key, '7200000', 'GT')
    else
      redis.call('SET', key, packed, 'PX', '7200000')
    end
  end
end
return reply
