-- acquire.lua: the acquires of one or more calls in one round trip, each call
-- all-or-nothing across its limits. (clock.lua and state.lua are prepended.) This script
-- carries calls of any limits; calls of up to eight rate limits usually go through a
-- script generated for their shape instead (acquire_shaped.lua), which decides and
-- writes exactly as this one does.
--
-- KEYS     the state keys of every call, call after call. One call's keys share one hash
--          tag; on a Redis Cluster a script carries one call.
-- ARGV[1]  one string of little-endian doubles: the number of calls, then call after
--          call: how many limits (keys) the call has, then per limit, in key order, six
--          doubles (48 bytes): algorithm (1 fixed window, 2 sliding window, 3 token
--          bucket, 4 concurrency), p1 (limit, capacity or max in flight), p2 (window us,
--          bucket refill per interval, or lease us), p3 (bucket interval us; else 0),
--          cost, take (1: take the cost if every limit of the call allows it; 0: only
--          check that it fits). For concurrency, the call's slot id travels as its high
--          32 bits in p3 and its low 32 bits in the cost field (a slot's cost is always
--          one slot). (One string, not an argument per call and per limit: Redis parses
--          every argument and the script makes a string of each, ~850 instructions
--          apiece; and the count is read from it, not from an argument of its own, which
--          the script would turn into a number with a strtod.)
-- ARGV[2]  (builds with the `test-util` feature only) "now" in microseconds instead of
--          the server's TIME.
-- Reply    an array: "now" (us, the time every limit was decided at), then per call,
--          calls concatenated: allowed_all (1 | 0; -1 if one of its keys holds something
--          else than a limiter state: nothing is taken), then per limit, in key order:
--          for a rate limit, its key's value as read before this call (nil: none), from
--          which the client computes the decision with the arithmetic of
--          src/algorithm.rs (as the memory store does); for concurrency, the decision as
--          one string of six little-endian doubles (see slots_reply in state.lua).
--          (Strings taken as they are read, and numbers left to the client: packing
--          every limit's six reply numbers cost the script ~4 000 instructions a limit.)
-- Writes   for each call that every limit allows and that takes: each cost taken (a
--          state with a TTL) or slot held; nothing for a denied call (beyond dropping
--          expired slots).

local records = ARGV[1]
local now = clock(ARGV[2])
-- The number of calls, and where the next value in `records` starts (struct.unpack
-- returns it after the values).
local calls, at = struct.unpack('<d', records)
-- Tables are built at their smallest sizes up front (growing one rehashes it): the
-- reply holds "now" and at least one call's flag and one limit's state.
local reply, len = { now, 0, 0 }, 1
-- Eleven places per limit of the call being decided, reused from call to call: its
-- algorithm, p1, p2, p3, cost, flags (1: takes a cost, +2: "same window", see view; 0:
-- takes nothing), then its view (anchor, cur, prev), its key's value as read and the
-- time it is decided at; for slots, the slots held instead of the view.
local L = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }
local k0 = 0
for call = 1, calls do
  local n
  n, at = struct.unpack('<d', records, at)
  -- Pass 1: read every limit; the call passes only if all of them allow it.
  local all = 1
  for i = 1, n do
    local key, l = KEYS[k0 + i], 11 * i - 1
    local alg, p1, p2, p3, cost, take
    alg, p1, p2, p3, cost, take, at = struct.unpack(PACKED_LIMIT, records, at)
    L[l - 9] = alg
    if alg == 4 then
      -- pcall, as in view: a key of another type fails this call only.
      local held = redis.pcall('ZREMRANGEBYSCORE', key, '-inf', now)
      if type(held) == 'number' then held = redis.call('ZCARD', key) else held, all = 0, -1 end
      L[l - 8], L[l - 7], L[l - 6], L[l - 5], L[l - 4], L[l - 3] = p1, p2, p3, cost, take, held
      if held >= p1 and all == 1 then all = 0 end
    else
      local anchor, cur, prev, used, same, at, raw = view(key, alg, p2, p3, now)
      if anchor == nil then anchor, cur, prev, used, same, at, raw, all = 0, 0, 0, 0, false, now, false, -1 end
      L[l] = raw
      -- A check that takes nothing needs only its state in pass 2 (each value kept
      -- here is a table store, ~200 instructions).
      if take == 1 and cost > 0 then
        L[l - 7], L[l - 6], L[l - 5], L[l - 4] = p2, p3, cost, same and 3 or 1
        L[l - 3], L[l - 2], L[l - 1], L[l + 1] = anchor, cur, prev, at
      else
        L[l - 4] = 0
      end
      if used + cost > p1 and all == 1 then all = 0 end
    end
  end
  -- Pass 2: take (if the call passes and takes) and report every limit.
  len = len + 1
  reply[len] = all
  for i = 1, n do
    local key, l = KEYS[k0 + i], 11 * i - 1
    local alg = L[l - 9]
    local take = all == 1 and L[l - 4] % 2 == 1
    len = len + 1
    if all == -1 then
      reply[len] = false
    elseif alg == 4 then
      local p1, p2, p3, cost, held = L[l - 8], L[l - 7], L[l - 6], L[l - 5], L[l - 3]
      local allowed = held < p1 and 1 or 0
      if take then
        local slot = string.format('%.0f:%.0f', p3, cost)
        redis.call('ZADD', key, now + p2, slot)
        redis.call('PEXPIRE', key, ttl_ms(p2))
        held = held + 1
      end
      reply[len] = slots_reply(key, p1, held, allowed, now)
    else
      reply[len] = L[l]
      if take then
        -- Taking adds exactly `cost` to what is used (the previous window's weight and
        -- the bucket's refill do not change).
        local p2, p3, cost = L[l - 7], L[l - 6], L[l - 5]
        local cur = L[l - 2] + cost
        if L[l - 4] >= 2 then
          -- Same window, something used already: its TTL already ends where this
          -- state's does, so only the "used" field changes.
          redis.call('SETRANGE', key, USED_AT, struct.pack('<d', cur))
        else
          local anchor, prev = L[l - 3], L[l - 1]
          -- This limit's decision time (see view); TTLs count from the script's own
          -- time, so one made later lives that much longer.
          local at = L[l + 1]
          persist(key, alg, anchor, cur, prev, reset_after(alg, p2, p3, anchor, cur, prev, at) + at - now)
        end
      end
    end
  end
  k0 = k0 + n
end
return reply
