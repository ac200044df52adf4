-- one_key_shaped_4.lua: a measurement prototype, not used by the crate: as
-- one_key_shaped_1.lua, for the layer's four-limit shape (fixed windows of an hour;
-- limits 1 and 3 take, 2 and 4 only check). Its value: a shape id, then used 1, used 3,
-- window 1, window 3, used 2, window 2, used 4, window 4 (nine little-endian doubles: the
-- taking limits' counts next to each other, so that a take in the same windows rewrites
-- 16 bytes). See BENCHMARKS.md, ninth pass. (clock.lua is prepended.)
--
-- KEYS     one key per call.
-- ARGV[1]  little-endian doubles: the number of calls, then per call, per limit: limit,
--          cost.
-- Reply    "now", then per call: allowed_all, the key's value as read (nil: none).
local W = 3600000000
local SHAPE = 7
local records = ARGV[1]
local now = clock(ARGV[2])
local calls, at = struct.unpack('<d', records)
local reply, len = { now, 0, 0 }, 1
for call = 1, calls do
  local key = KEYS[call]
  local q1, c1, q2, c2, q3, c3, q4, c4
  q1, c1, q2, c2, q3, c3, q4, c4, at = struct.unpack('<dddddddd', records, at)
  local raw = redis.pcall('GET', key)
  local h, u1, u3, a1, a3, u2, a2, u4, a4 = 0, 0, 0, -1, -1, 0, -1, 0, -1
  local all = 1
  if raw then
    if #raw == 72 then
      h, u1, u3, a1, a3, u2, a2, u4, a4 = struct.unpack('<ddddddddd', raw)
      if h ~= SHAPE then all = -1 end -- (a real script would convert)
    else
      all = -1
    end
  end
  local t = now
  -- a window from "the future" (written by a caller whose clock read later)
  if a1 * W > t + W then a1 = -1 end
  if a1 * W > t then t = a1 * W end
  local idx = (t - t % W) / W
  if a1 ~= idx then u1 = 0 end
  if a2 ~= idx then u2 = 0 end
  if a3 ~= idx then u3 = 0 end
  if a4 ~= idx then u4 = 0 end
  if all == 1 and (u1 + c1 > q1 or u2 + c2 > q2 or u3 + c3 > q3 or u4 + c4 > q4) then all = 0 end
  len = len + 2
  reply[len - 1], reply[len] = all, raw
  if all == 1 then
    if a1 == idx and a3 == idx then
      redis.call('SETRANGE', key, '8', struct.pack('<dd', u1 + c1, u3 + c3))
    else
      local value = struct.pack('<ddddddddd', SHAPE, u1 + c1, u3 + c3, idx, idx, u2, a2, u4, a4)
      redis.call('SET', key, value, 'PX', string.format('%d', ttl_ms((idx + 1) * W - now)))
    end
  end
end
return reply
