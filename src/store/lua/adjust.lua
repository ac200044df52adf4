-- adjust.lua: settlements, one or several in one round trip. Each charges (a forced
-- debit, may create debt) or refunds units on several limits, releases or renews
-- concurrency slots, and is applied at most once per settlement id. (clock.lua and
-- state.lua are prepended.)
--
-- KEYS     per settlement, settlement after settlement: the state key of each of its
--          limits, then (only with a settlement id) the key that marks that id applied
--          (`<first state key>:settlement:<id>`). One settlement's keys share one hash
--          tag; on a Redis Cluster a script carries one settlement.
-- ARGV[1]  the number of settlements g; ARGV[2] how long to remember an id (ms);
--          ARGV[3] (builds with the `test-util` feature only) "now" in microseconds
--          instead of the server's TIME, or -1.
-- ARGV[4]  one string of little-endian doubles, settlement after settlement: the
--          number of its limits n, 1 if it has an id (0: none), then per limit (in KEYS
--          order, not counting the id keys) six doubles (48 bytes): algorithm
--          (1 fixed, 2 sliding, 3 bucket, 4 concurrency), p1, p2, p3 (as in
--          acquire.lua), delta (> 0 charge or renew the slot's lease, < 0 refund or
--          release; a refund never goes beyond a full budget), window (the window index
--          that paid for a refund, -1: none; see `algorithm::adjust` for where a refund
--          lands once that window has rolled). For concurrency, p3 is the slot id's high
--          32 bits and the window field its low 32 bits. A limit whose state is a member
--          of a group's shared value (see state.lua) has that value's key in KEYS, and
--          16 * (its place + 1) + 256 * (the group's members) added to its algorithm.
-- Reply    an array: "now" (us), then per settlement, concatenated: 1 if applied, 0 if
--          its id was applied before (nothing changed), -1 if one of its keys holds
--          something else than a limiter state (neither applied nor recorded); then per
--          limit, in KEYS order: for a rate limit, its key's value as read before the
--          settlement (nil: none), from which the client computes the outcome with the
--          arithmetic of src/algorithm.rs; for concurrency, the slots' decision after
--          it, as one string of six little-endian doubles (see slots_reply).
-- Writes   every non-zero delta, with a TTL (or deletes a state back to "absent"), and
--          the id's key (expiring after ARGV[2] ms); nothing for a settlement whose id
--          key exists (a retry of one that was applied).

local settlements = ARGV[1] + 0
local now = clock(ARGV[3] ~= '-1' and ARGV[3] or nil)
-- How long an id is remembered, as a string (see USED_AT).
local remember_ms = id_ttl_ms(ARGV[2])
local reply, len = { now, 0, 0 }, 1
-- Per limit of the settlement being applied, reused from settlement to settlement: its
-- view (anchor, cur, prev, same window, decision time) and its key's value as read (for
-- slots, nothing).
local V = { 0, 0, 0, 0, 0, 0 }
-- A limit's algorithm field: the algorithm, and for a group's member its place (0-based)
-- and the group's size (-1, 0: a state of its own).
local function placement(alg)
  if alg < 16 then return alg, -1, 0 end
  local code = alg % 16
  local place = (alg - code) / 16
  local member = place % 16
  return code, member - 1, (place - member) / 16
end
local records = ARGV[4]
-- KEYS index before the current settlement's keys, and where its limits start in
-- `records` (limit i at o + PACKED_LIMIT_BYTES * (i - 1)).
local k, o = 0, 1
for s = 1, settlements do
  local n, flag
  n, flag, o = struct.unpack('<dd', records, o)
  local has_id = flag == 1
  -- Pass 1: read every limit. A key holding something else than a limiter state (a
  -- misconfigured prefix) fails this settlement only, before anything is written.
  local failed = false
  for i = 1, n do
    local key = KEYS[k + i]
    local alg, _, p2, p3 = struct.unpack(PACKED_LIMIT, records, o + PACKED_LIMIT_BYTES * (i - 1))
    local member, members
    alg, member, members = placement(alg)
    if alg == 4 then
      failed = failed or type(redis.pcall('ZREMRANGEBYSCORE', key, '-inf', now)) ~= 'number'
    else
      local anchor, cur, prev, _, same, at, raw
      if member >= 0 then
        anchor, cur, prev, _, same, at, raw = member_view(key, member, members, alg, p2, p3, now)
      else
        anchor, cur, prev, _, same, at, raw = view(key, alg, p2, p3, now)
      end
      if anchor == nil then failed = true end
      local v = 6 * i
      V[v - 5], V[v - 4], V[v - 3], V[v - 2], V[v - 1], V[v] = anchor, cur, prev, same, at, raw
    end
  end
  local apply = not failed
  if apply and has_id then
    -- The id's own key, set only if absent: whether this id was applied before, in one
    -- command. Nothing but time forgets an id (unlike a set of an identifier's newest
    -- ids, which forgot the oldest once enough newer ones came).
    local marked = redis.pcall('SET', KEYS[k + n + 1], '1', 'NX', 'PX', remember_ms)
    if not marked then
      apply = false
    elseif marked.err then
      failed, apply = true, false
    end
  end
  -- Pass 2: apply (unless failed or applied before) and report every limit.
  len = len + 1
  reply[len] = failed and -1 or apply and 1 or 0
  for i = 1, n do
    local key = KEYS[k + i]
    local alg, p1, p2, p3, delta, window = struct.unpack(PACKED_LIMIT, records, o + PACKED_LIMIT_BYTES * (i - 1))
    local member, members
    alg, member, members = placement(alg)
    len = len + 1
    if failed then
      reply[len] = false
    elseif alg == 4 then
      local slot = string.format('%.0f:%.0f', p3, window)
      if apply and delta < 0 then
        redis.call('ZREM', key, slot)
      elseif apply and delta > 0 and redis.call('ZSCORE', key, slot) then
        redis.call('ZADD', key, now + p2, slot)
        redis.call('PEXPIRE', key, ttl_ms(p2))
      end
      -- An empty sorted set is deleted by Redis itself.
      reply[len] = slots_reply(key, p1, redis.call('ZCARD', key), 1, now)
    else
      local v = 6 * i
      local anchor, cur, prev, same = V[v - 5], V[v - 4], V[v - 3], V[v - 2]
      reply[len] = V[v]
      -- This limit's decision time (see view), shadowing the script's; TTLs count from
      -- the script's own time, so one made later lives that much longer.
      local late = V[v - 1] - now
      local now = V[v - 1]
      local changed = apply and delta ~= 0
      if changed then
        if delta > 0 then
          cur = cur + delta
          if alg == 3 then
            -- As algorithm.rs keeps tokens (p1 - used): clamp those, not what is used.
            local tokens = p1 - cur
            if tokens < -MAX then cur = p1 + MAX end
          elseif cur > MAX then
            cur = MAX
          end
        else
          local back = -delta
          if alg == 3 then
            local tokens = p1 - cur + back
            if tokens > MAX then tokens = MAX end
            if tokens > p1 then tokens = p1 end
            cur = p1 - tokens
          elseif window >= 0 and window >= anchor then
            -- Into the window that paid, which is the current one.
            if alg == 1 then
              cur = cur - back
              if cur < 0 then cur = 0 end
            else
              local from_current = cur > 0 and cur or 0
              if back < from_current then from_current = back end
              cur = cur - from_current
            end
          elseif window >= 0 and alg == 2 and window == anchor - 1 then
            -- The paying window is the previous one: its weight shrinks.
            prev = prev - back
            if prev < 0 then prev = 0 end
          elseif window >= 0 then
            -- The paying window has rolled out of the state: nothing to give back.
            changed = false
          elseif alg == 1 then
            cur = cur - back
            if cur < 0 then cur = 0 end
          else
            -- Give back from the current window first, then from the previous one.
            local from_current = cur > 0 and cur or 0
            if back < from_current then from_current = back end
            cur = cur - from_current
            prev = prev - (back - from_current)
            if prev < 0 then prev = 0 end
          end
        end
      end
      if changed and member >= 0 then
        local reset = reset_after(alg, p2, p3, anchor, cur, prev, now) + late
        local x, y, z
        x, y, z, reset = placed(alg, anchor, cur, prev, reset)
        persist_member(key, member, members, x, y, z, reset)
      elseif changed and same and delta > 0 then
        -- A charge into this very window of a state with something used: its TTL
        -- already ends where the new state's does, so only "used" changes.
        redis.call('SETRANGE', key, USED_AT, struct.pack('<d', cur))
      elseif changed then
        persist(key, alg, anchor, cur, prev, reset_after(alg, p2, p3, anchor, cur, prev, now) + late)
      end
    end
  end
  k = k + n + (has_id and 1 or 0)
  o = o + PACKED_LIMIT_BYTES * n
end
return reply
