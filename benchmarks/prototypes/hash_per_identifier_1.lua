-- hash_per_identifier_1.lua: a measurement prototype, not used by the crate: every limit
-- of an identifier as one field of one Redis hash (HMGET the call's fields, HSET the
-- ones that take), the layout that keeps per-limit fields so that calls of different
-- limit sets can share it; the hash's expiry is kept in a field "!" (a packed double, the
-- latest end any field needs) and extended with PEXPIREAT only when a write needs more.
-- Here: one fixed window of an hour that takes; each field holds the crate's 25-byte state. It leaves out what a
-- real version needs (other algorithms, keys of other types, earlier releases' keys).
-- See BENCHMARKS.md, tenth pass. (clock.lua is prepended.)
--
-- KEYS     per call: the identifier's hash, then its 1 field name (the limits' keys).
-- ARGV[1]  little-endian doubles: the number of calls, then per call, per limit: limit,
--          cost.
-- Reply    "now", then per call: allowed_all, each field's value as read (nil: none).
local W = 3600000000
local PACK = '<Bddd'
local function decode(raw, p2, now)
  local a, b, c
  if raw then
    local marker
    if #raw == 25 then marker, a, b, c = struct.unpack(PACK, raw) end
  end
  if a and a * p2 > now + p2 then a = nil end
  if a and a * p2 > now then now = a * p2 end
  local idx = (now - now % p2) / p2
  if a and a >= idx then return idx, b, 0, b, now end
  return idx, 0, 0, 0, now
end
local records = ARGV[1]
local now = clock(ARGV[2])
local calls, at = struct.unpack('<d', records)
local reply, len = { now, 0, 0 }, 1
local k = 0
for call = 1, calls do
  local all = 1
  local q1, c1
  q1, c1, at = struct.unpack('<dd', records, at)
  local h = KEYS[k + 1]
  local f = redis.call('HMGET', h, KEYS[k + 2], '!')
  local r1, ex = f[1], f[2]
  local a1, u1, p1, w1, t1 = decode(r1, W, now)
  if w1 + c1 > q1 then all = 0 end
  reply[len + 1], reply[len + 2] = all, r1
  len = len + 2
  if all == 1 then
    local e1 = (a1 + 1) * W
    local old = ex and struct.unpack('<d', ex) or 0
    if e1 > old then
      redis.call('HSET', h, KEYS[k + 2], struct.pack(PACK, 1, a1, u1 + c1, 0), '!', struct.pack('<d', e1))
      redis.call('PEXPIREAT', h, string.format('%d', ttl_ms(e1)))
    else
      redis.call('HSET', h, KEYS[k + 2], struct.pack(PACK, 1, a1, u1 + c1, 0))
    end
  end
  k = k + 2
end
return reply
