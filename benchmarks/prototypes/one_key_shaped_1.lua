-- one_key_shaped_1.lua: a measurement prototype, not used by the crate: the layout of
-- one_key_acquire.lua (all of an identifier's limits in one key) with the script written
-- for one shape, as the crate's generated scripts are (src/store/lua/acquire_shaped.lua):
-- here one fixed window of an hour that takes. Its value: a shape id, used, window index
-- (three little-endian doubles). It leaves out what a real version needs (records of
-- other shapes, earlier releases' keys, denials' details). See BENCHMARKS.md, ninth pass.
-- (clock.lua is prepended.)
--
-- KEYS     one key per call.
-- ARGV[1]  little-endian doubles: the number of calls, then per call: limit, cost.
-- Reply    "now", then per call: allowed_all, the key's value as read (nil: none).
local W = 3600000000
local SHAPE = 3
local records = ARGV[1]
local now = clock(ARGV[2])
local calls, at = struct.unpack('<d', records)
local reply, len = { now, 0, 0 }, 1
for call = 1, calls do
  local key = KEYS[call]
  local q1, c1
  q1, c1, at = struct.unpack('<dd', records, at)
  local raw = redis.pcall('GET', key)
  local h, u1, a1 = 0, 0, -1
  local all = 1
  if raw then
    if #raw == 24 then
      h, u1, a1 = struct.unpack('<ddd', raw)
      if h ~= SHAPE then all = -1 end
    else
      all = -1
    end
  end
  local t = now
  if a1 * W > t + W then a1 = -1 end
  if a1 * W > t then t = a1 * W end
  local idx = (t - t % W) / W
  if a1 ~= idx then u1 = 0 end
  if all == 1 and u1 + c1 > q1 then all = 0 end
  len = len + 2
  reply[len - 1], reply[len] = all, raw
  if all == 1 then
    if a1 == idx then
      redis.call('SETRANGE', key, '8', struct.pack('<d', u1 + c1))
    else
      local value = struct.pack('<ddd', SHAPE, u1 + c1, idx)
      redis.call('SET', key, value, 'PX', string.format('%d', ttl_ms((idx + 1) * W - now)))
    end
  end
end
return reply
