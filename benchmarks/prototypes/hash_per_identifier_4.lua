-- hash_per_identifier_4.lua: a measurement prototype, not used by the crate: every limit
-- of an identifier as one field of one Redis hash (HMGET the call's fields, HSET the
-- ones that take), the layout that keeps per-limit fields so that calls of different
-- limit sets can share it; the hash's expiry is kept in a field "!" (a packed double, the
-- latest end any field needs) and extended with PEXPIREAT only when a write needs more.
-- Here: the layer's four-limit shape (fixed windows of an hour; limits 1 and 3 take, 2 and 4
-- only check); each field holds the crate's 25-byte state. It leaves out what a
-- real version needs (other algorithms, keys of other types, earlier releases' keys).
-- See BENCHMARKS.md, tenth pass. (clock.lua is prepended.)
--
-- KEYS     per call: the identifier's hash, then its 4 field names (the limits' keys).
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
  local q1, c1, q2, c2, q3, c3, q4, c4
  q1, c1, q2, c2, q3, c3, q4, c4, at = struct.unpack('<dddddddd', records, at)
  local h = KEYS[k + 1]
  local f = redis.call('HMGET', h, KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5], '!')
  local r1, r2, r3, r4, ex = f[1], f[2], f[3], f[4], f[5]
  local a1, u1, p1, w1, t1 = decode(r1, W, now)
  if w1 + c1 > q1 then all = 0 end
  local a2, u2, p2, w2, t2 = decode(r2, W, now)
  if all == 1 and w2 + c2 > q2 then all = 0 end
  local a3, u3, p3, w3, t3 = decode(r3, W, now)
  if all == 1 and w3 + c3 > q3 then all = 0 end
  local a4, u4, p4, w4, t4 = decode(r4, W, now)
  if all == 1 and w4 + c4 > q4 then all = 0 end
  reply[len + 1], reply[len + 2], reply[len + 3], reply[len + 4], reply[len + 5] = all, r1, r2, r3, r4
  len = len + 5
  if all == 1 then
    local e1 = (a1 + 1) * W
    local e3 = (a3 + 1) * W
    if e3 > e1 then e1 = e3 end
    local old = ex and struct.unpack('<d', ex) or 0
    if e1 > old then
      redis.call('HSET', h, KEYS[k + 2], struct.pack(PACK, 1, a1, u1 + c1, 0), KEYS[k + 4], struct.pack(PACK, 1, a3, u3 + c3, 0), '!', struct.pack('<d', e1))
      redis.call('PEXPIREAT', h, string.format('%d', ttl_ms(e1)))
    else
      redis.call('HSET', h, KEYS[k + 2], struct.pack(PACK, 1, a1, u1 + c1, 0), KEYS[k + 4], struct.pack(PACK, 1, a3, u3 + c3, 0))
    end
  end
  k = k + 5
end
return reply
