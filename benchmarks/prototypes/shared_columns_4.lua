-- shared_columns_4.lua: a measurement prototype, not used by the crate (see
-- BENCHMARKS.md, twelfth pass): the layer's four-limit shape (fixed windows of an hour;
-- limits 1 and 3 take, 2 and 4 only check) in one value per identifier laid out by
-- columns: the four member ids, then each state's first number (window index), then
-- each one's count, then each one's third number (sixteen little-endian doubles), so
-- that a call whose takers are all in their windows already rewrites their counts with
-- one SETRANGE. Views are inlined per algorithm, with the clamps of view in state.lua.
-- A value of other members would go to the general path (not measured here).
-- KEYS one key per call; ARGV[1] the number of calls, then per call, per limit: quota,
-- cost. Reply: "now", then per call: allowed_all, the value as read.
local MAX = 4503599627370496
local records = ARGV[1]
local now = clock(ARGV[2])
local calls, at = struct.unpack('<d', records)
local reply, len = { now, 0, 0 }, 1
local k = 0
for call = 1, calls do
  local all = 1
  local q1, c1, q2, c2, q3, c3, q4, c4
  q1, c1, q2, c2, q3, c3, q4, c4, at = struct.unpack('<dddddddd', records, at)
  local key = KEYS[k + 1]
  local g = redis.pcall('GET', key)
  local h1, h2, h3, h4, a1, a2, a3, a4, b1, b2, b3, b4, e1, e2, e3, e4
  if type(g) == 'string' then
    if #g == 128 then
      h1, h2, h3, h4, a1, a2, a3, a4, b1, b2, b3, b4, e1, e2, e3, e4 = struct.unpack('<dddddddddddddddd', g)
    end
    if not (h1 == 1 and h2 == 2 and h3 == 3 and h4 == 4) then
      a1, a2, a3, a4 = nil, nil, nil, nil -- (the real script: the general path)
    end
  elseif g then
    all = -1
  end
  -- Member 1: a fixed window of an hour (view in state.lua, inlined).
  if a1 then
    if a1 ~= a1 then a1 = 0 elseif a1 > MAX then a1 = MAX elseif a1 < -MAX then a1 = -MAX end
    if b1 ~= b1 then b1 = 0 elseif b1 > MAX then b1 = MAX elseif b1 < -MAX then b1 = -MAX end
    if a1 * 3600000000 > now + 3600000000 then a1 = nil end
  end
  local t1 = now
  if a1 and a1 * 3600000000 > now then t1 = a1 * 3600000000 end
  local i1 = (t1 - t1 % 3600000000) / 3600000000
  local u1 = 0
  if a1 and a1 >= i1 then u1 = b1 end
  if all == 1 and u1 + c1 > q1 then all = 0 end
  -- Member 2: a fixed window of an hour (view in state.lua, inlined).
  if a2 then
    if a2 ~= a2 then a2 = 0 elseif a2 > MAX then a2 = MAX elseif a2 < -MAX then a2 = -MAX end
    if b2 ~= b2 then b2 = 0 elseif b2 > MAX then b2 = MAX elseif b2 < -MAX then b2 = -MAX end
    if a2 * 3600000000 > now + 3600000000 then a2 = nil end
  end
  local t2 = now
  if a2 and a2 * 3600000000 > now then t2 = a2 * 3600000000 end
  local i2 = (t2 - t2 % 3600000000) / 3600000000
  local u2 = 0
  if a2 and a2 >= i2 then u2 = b2 end
  if all == 1 and u2 + c2 > q2 then all = 0 end
  -- Member 3: a fixed window of an hour (view in state.lua, inlined).
  if a3 then
    if a3 ~= a3 then a3 = 0 elseif a3 > MAX then a3 = MAX elseif a3 < -MAX then a3 = -MAX end
    if b3 ~= b3 then b3 = 0 elseif b3 > MAX then b3 = MAX elseif b3 < -MAX then b3 = -MAX end
    if a3 * 3600000000 > now + 3600000000 then a3 = nil end
  end
  local t3 = now
  if a3 and a3 * 3600000000 > now then t3 = a3 * 3600000000 end
  local i3 = (t3 - t3 % 3600000000) / 3600000000
  local u3 = 0
  if a3 and a3 >= i3 then u3 = b3 end
  if all == 1 and u3 + c3 > q3 then all = 0 end
  -- Member 4: a fixed window of an hour (view in state.lua, inlined).
  if a4 then
    if a4 ~= a4 then a4 = 0 elseif a4 > MAX then a4 = MAX elseif a4 < -MAX then a4 = -MAX end
    if b4 ~= b4 then b4 = 0 elseif b4 > MAX then b4 = MAX elseif b4 < -MAX then b4 = -MAX end
    if a4 * 3600000000 > now + 3600000000 then a4 = nil end
  end
  local t4 = now
  if a4 and a4 * 3600000000 > now then t4 = a4 * 3600000000 end
  local i4 = (t4 - t4 % 3600000000) / 3600000000
  local u4 = 0
  if a4 and a4 >= i4 then u4 = b4 end
  if all == 1 and u4 + c4 > q4 then all = 0 end
  len = len + 2
  reply[len - 1], reply[len] = all, g
  if all == 1 then
    if a1 == i1 and u1 > 0 and a3 == i3 and u3 > 0 then
      -- The takers' counts, and the one between them as it is: bytes 64..87.
      redis.call('SETRANGE', key, '64', struct.pack('<ddd', u1 + c1, u2, u3 + c3))
    else
      local value = struct.pack('<dddddddddddddddd', 1, 2, 3, 4, i1, i2, i3, i4, u1 + c1, u2, u3 + c3, u4, 0, 0, 0, 0)
      redis.call('SET', key, value, 'PX', string.format('%d', ttl_ms((i1 + 1) * 3600000000 - now)))
    end
  end
  k = k + 1
end
return reply
