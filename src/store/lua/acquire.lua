-- acquire.lua: the acquires of one or more calls in one round trip, each call
-- all-or-nothing across its limits. (state.lua is prepended.)
--
-- KEYS     the state keys of every call, call after call. One call's keys share one hash
--          tag; on a Redis Cluster a script carries one call.
-- ARGV[1]  the number of calls g.
-- ARGV[2]  one string of little-endian doubles, call after call: how many limits (keys)
--          the call has, then per limit, in key order, six doubles (48 bytes):
--          algorithm (1 fixed window, 2 sliding window, 3 token bucket, 4 concurrency),
--          p1 (limit, capacity or max in flight), p2 (window us, bucket refill per
--          interval, or lease us), p3 (bucket interval us; else 0), cost, take (1: take
--          the cost if every limit of the call allows it; 0: only check that it fits).
--          For concurrency, the call's slot id travels as its high 32 bits in p3 and its
--          low 32 bits in the cost field (a slot's cost is always one slot).
--          (One string, not an argument per call and per limit: Redis parses every
--          argument and the script makes a string of each, ~850 instructions apiece.)
-- ARGV[3]  (builds with the `test-util` feature only) "now" in microseconds instead of
--          the server's TIME.
-- Reply    one string of little-endian doubles (8 bytes per number, all integers):
--          per call, calls concatenated, allowed_all (0|1; -1 if one of its keys holds
--          something else than a limiter state: nothing is taken), then six numbers per
--          limit: allowed (0|1), limit, remaining, reset_after_us, retry_after_us (-1:
--          none, or the cost can never pass), window index the decision was made in (-1:
--          a bucket or slots).
-- Writes   for each call that every limit allows and that takes: each cost taken (a
--          state with a TTL) or slot held; nothing for a denied call (beyond dropping
--          expired slots).

local calls = ARGV[1] + 0
local records = ARGV[2]
local now = clock(ARGV[3])
-- Where the next value in `records` starts (struct.unpack returns it after the values).
local at = 1
-- Tables are built at their smallest sizes up front (growing one rehashes it): the
-- reply holds at least one call's flag and one limit's six fields.
local reply, len = { 0, 0, 0, 0, 0, 0, 0 }, 0
-- Eleven values per limit of the call being decided, reused from call to call: its
-- six arguments (take folded into flags: 1 take, +2 "same window", see view), then its
-- view (anchor, cur, prev, used, and the time it is decided at; for slots, the slots
-- held).
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
    L[l - 9], L[l - 8], L[l - 7], L[l - 6], L[l - 5] = alg, p1, p2, p3, cost
    if alg == 4 then
      -- pcall, as in view: a key of another type fails this call only.
      local held = redis.pcall('ZREMRANGEBYSCORE', key, '-inf', now)
      if type(held) == 'number' then held = redis.call('ZCARD', key) else held, all = 0, -1 end
      L[l - 4], L[l - 3] = take, held
      if held >= p1 and all == 1 then all = 0 end
    else
      local anchor, cur, prev, used, same, at = view(key, alg, p2, p3, now)
      if anchor == nil then anchor, cur, prev, used, same, at, all = 0, 0, 0, 0, false, now, -1 end
      L[l - 4] = same and take + 2 or take
      L[l - 3], L[l - 2], L[l - 1], L[l], L[l + 1] = anchor, cur, prev, used, at
      if used + cost > p1 and all == 1 then all = 0 end
    end
  end
  -- Pass 2: take (if the call passes and takes) and report every limit.
  len = len + 1
  reply[len] = all
  for i = 1, n do
    local key, l = KEYS[k0 + i], 11 * i - 1
    local alg, p1, p2, p3, cost = L[l - 9], L[l - 8], L[l - 7], L[l - 6], L[l - 5]
    local flags = L[l - 4]
    local take = all == 1 and flags % 2 == 1
    if all == -1 then
      len = push(reply, len, 0, 0, 0, 0, -1, -1)
    elseif alg == 4 then
      local held = L[l - 3]
      local allowed = held < p1 and 1 or 0
      if take then
        local slot = string.format('%.0f:%.0f', p3, cost)
        redis.call('ZADD', key, now + p2, slot)
        redis.call('PEXPIRE', key, ttl_ms(p2))
        held = held + 1
      end
      len = push_slots(reply, len, key, p1, held, allowed, now)
    else
      local anchor, cur, prev, used = L[l - 3], L[l - 2], L[l - 1], L[l]
      -- This limit's decision time (see view), shadowing the script's; TTLs count from
      -- the script's own time, so one made later lives that much longer.
      local late = L[l + 1] - now
      local now = L[l + 1]
      local window = alg == 3 and -1 or anchor
      if used + cost <= p1 then
        if take and cost > 0 then
          -- Taking adds exactly `cost` to what is used (the previous window's weight
          -- and the bucket's refill do not change).
          cur, used = cur + cost, used + cost
          local reset = reset_after(alg, p2, p3, anchor, cur, prev, now)
          if flags >= 2 then
            -- Same window, something used already: its TTL already ends where this
            -- state's does, so only the "used" field changes.
            redis.call('SETRANGE', key, USED_AT, struct.pack('<d', cur))
          else
            persist(key, alg, anchor, cur, prev, reset + late)
          end
          len = push(reply, len, 1, p1, used, reset, -1, window)
        else
          len = push(reply, len, 1, p1, used, reset_after(alg, p2, p3, anchor, cur, prev, now), -1, window)
        end
      else
        -- Denied: the earliest time the cost would fit if nothing else happens (-1 if
        -- it never can).
        local retry = -1
        if cost <= p1 then
          if alg == 1 then
            retry = (anchor + 1) * p2 - now
          elseif alg == 2 then
            local room = p1 - cost - cur
            if room >= 0 then
              -- Wait in this window until ceil(prev * (W - e) / W) <= room.
              local e = p2 - room * p2 / prev
              local f = e % 1
              if f > 0 then e = e - f + 1 end
              retry = e - (now - anchor * p2)
            else
              -- Next window: the current count becomes the previous one.
              local to_next = (anchor + 1) * p2 - now
              local room_next = p1 - cost
              if cur <= room_next then
                retry = to_next
              else
                local e = p2 - room_next * p2 / cur
                local f = e % 1
                if f > 0 then e = e - f + 1 end
                retry = to_next + (e > 0 and e or 0)
              end
            end
          else
            local intervals = (cost - (p1 - cur)) / p2
            local f = intervals % 1
            if f > 0 then intervals = intervals - f + 1 end
            retry = anchor + intervals * p3 - now
          end
          if retry < 1 then retry = 1 end
        end
        len = push(reply, len, 0, p1, used, reset_after(alg, p2, p3, anchor, cur, prev, now), retry, window)
      end
    end
  end
  k0 = k0 + n
end
return pack_reply(reply, len)
