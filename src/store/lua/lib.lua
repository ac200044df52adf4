-- Shared algorithm functions: a line-for-line port of src/algorithm.rs (read that file
-- for the math). Prepended to acquire.lua and adjust.lua at compile time; defines no
-- KEYS, ARGV or reply of its own.
--
-- Redis Lua numbers are IEEE doubles: every quantity stays below 2^53, and the one
-- fractional step (the sliding-window weight) uses the same operations in the same order
-- as the Rust code, so both stores decide identically.
--
-- State is one string "a:b:c" per key:
--   fixed:   a = window index, b = used
--   sliding: a = window index, b = used in current window, c = used in previous window
--   bucket:  a = used (capacity - tokens; above the capacity is debt), b = last refill
--            time (microseconds). Keeping "used" lets a changed capacity keep it.

local MAX_COUNTER = 4503599627370496 -- 2^52
local MAX_TTL_US = 4503599627370496
-- Added to every TTL when a test supplies "now" (see test_now). An expired state equals
-- an absent one, so a longer TTL never changes a decision.
local TTL_PAD_MS = 0

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- "Now": the server's TIME, or (only in builds with the `test-util` feature, where the
-- prelude sets TEST_CLOCK) a test's virtual time, with every TTL padded so keys cannot
-- expire in real time before the test's virtual time is done with them.
local function test_now(override)
  if TEST_CLOCK and override then
    TTL_PAD_MS = 600000
    return tonumber(override)
  end
  return now_us()
end

local function clamp_counter(v)
  if v > MAX_COUNTER then return MAX_COUNTER end
  if v < -MAX_COUNTER then return -MAX_COUNTER end
  return v
end

local function load_state(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  local a, b, c = string.match(raw, '^(-?%d+):(-?%d+):(-?%d+)$')
  if not a then return nil end
  return { tonumber(a), tonumber(b), tonumber(c) }
end

-- The state normalized to `now`: cur, prev, anchor (see View in algorithm.rs).
local function view(alg, p1, p2, p3, st, now)
  if alg == 1 then
    local idx = math.floor(now / p2)
    local cur = 0
    if st and st[1] >= idx then cur = st[2] end
    return { cur = cur, prev = 0, anchor = idx }
  elseif alg == 2 then
    local idx = math.floor(now / p2)
    local cur, prev = 0, 0
    if st and st[1] >= idx then
      cur, prev = st[2], st[3]
    elseif st and st[1] == idx - 1 then
      cur, prev = 0, st[2]
    end
    return { cur = cur, prev = prev, anchor = idx }
  else
    local cap = p1
    if not st then return { cur = cap, prev = 0, anchor = now } end
    local elapsed = now - st[2]
    if elapsed < 0 then elapsed = 0 end
    local intervals = math.floor(elapsed / p3)
    local used = st[1] - intervals * p2
    if used <= 0 then return { cur = cap, prev = 0, anchor = now } end
    return { cur = cap - used, prev = 0, anchor = st[2] + intervals * p3 }
  end
end

local function sliding_weighted(prev, w, elapsed)
  if prev <= 0 then return 0 end
  return math.ceil(prev * (w - elapsed) / w)
end

local function used(alg, p1, p2, v, now)
  if alg == 1 then return v.cur end
  if alg == 2 then return v.cur + sliding_weighted(v.prev, p2, now - v.anchor * p2) end
  return p1 - v.cur
end

local function reset_after(alg, p1, p2, p3, v, now)
  if alg == 1 then return (v.anchor + 1) * p2 - now end
  if alg == 2 then
    if v.cur > 0 then return (v.anchor + 2) * p2 - now end
    if v.prev > 0 then return (v.anchor + 1) * p2 - now end
    return 0
  end
  local missing = p1 - v.cur
  if missing <= 0 then return 0 end
  return v.anchor + math.ceil(missing / p2) * p3 - now
end

local function retry_after(alg, p1, p2, p3, v, now, cost)
  if alg == 1 then return (v.anchor + 1) * p2 - now end
  if alg == 2 then
    local w = p2
    local elapsed = now - v.anchor * w
    local room = p1 - cost - v.cur
    if room >= 0 then
      local e = math.ceil(w - room * w / v.prev)
      return math.max(e - elapsed, 1)
    end
    local to_next = (v.anchor + 1) * w - now
    local room_next = p1 - cost
    if v.cur <= room_next then return math.max(to_next, 1) end
    local e = math.ceil(w - room_next * w / v.cur)
    return to_next + math.max(e, 0)
  end
  local missing = cost - v.cur
  return math.max(v.anchor + math.ceil(missing / p2) * p3 - now, 1)
end

local function is_empty(alg, p1, v)
  if alg == 1 then return v.cur == 0 end
  if alg == 2 then return v.cur == 0 and v.prev == 0 end
  return v.cur >= p1
end

-- Persist v (or delete the key when v equals "absent"), with a TTL of exactly as long as
-- the state can matter.
local function write(key, alg, p1, p2, p3, v, now)
  if is_empty(alg, p1, v) then
    redis.call('DEL', key)
    return
  end
  local a, b, c
  if alg == 3 then a, b, c = clamp_counter(p1 - v.cur), v.anchor, 0 else a, b, c = v.anchor, v.cur, v.prev end
  local ttl_us = reset_after(alg, p1, p2, p3, v, now)
  if ttl_us < 1 then ttl_us = 1 end
  if ttl_us > MAX_TTL_US then ttl_us = MAX_TTL_US end
  redis.call('SET', key, string.format('%.0f:%.0f:%.0f', a, b, c), 'PX', math.ceil(ttl_us / 1000) + TTL_PAD_MS)
end

-- The six reply fields of one decision: allowed, limit, remaining, reset_after_us,
-- retry_after_us (-1: none), window index (-1: a bucket or slots).
local function push_outcome(reply, alg, p1, p2, p3, v, now, allowed, retry)
  local remaining = p1 - used(alg, p1, p2, v, now)
  if remaining < 0 then remaining = 0 end
  local reset = reset_after(alg, p1, p2, p3, v, now)
  if reset < 0 then reset = 0 end
  if reset > MAX_TTL_US then reset = MAX_TTL_US end
  if retry == nil then retry = -1 elseif retry < 1 then retry = 1 end
  if retry > MAX_TTL_US then retry = MAX_TTL_US end
  reply[#reply + 1] = allowed and 1 or 0
  reply[#reply + 1] = p1
  reply[#reply + 1] = remaining
  reply[#reply + 1] = reset
  reply[#reply + 1] = retry
  if alg == 3 then reply[#reply + 1] = -1 else reply[#reply + 1] = v.anchor end
end

-- Concurrency slots (algorithm 4): a sorted set of slot id -> lease end (microseconds).
-- Expired slots are dropped before counting, so a slot of a crashed process frees itself.
local function slots_held(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key)
end

-- Time until the earliest lease ends (an upper bound on when a slot frees), or 0.
local function slots_earliest(key, now)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first == 0 then return 0 end
  local left = tonumber(first[2]) - now
  if left < 0 then return 0 end
  return left
end

local function push_slots_outcome(reply, key, max, now, held, allowed)
  local remaining = max - held
  if remaining < 0 then remaining = 0 end
  local earliest = slots_earliest(key, now)
  local retry = -1
  if not allowed then retry = math.max(earliest, 1) end
  reply[#reply + 1] = allowed and 1 or 0
  reply[#reply + 1] = max
  reply[#reply + 1] = remaining
  reply[#reply + 1] = earliest
  reply[#reply + 1] = retry
  reply[#reply + 1] = -1
end

-- Evaluate one call's limits atomically, all-or-nothing: the group of `n` keys starting
-- after keys[k0], with their six parameters each starting after args[a0]. Appends
-- allowed_all and six fields per limit to `reply` (see acquire.lua).
local function acquire_group(keys, k0, n, args, a0, now, reply)
  local views, allowed, retries, params = {}, {}, {}, {}
  local all = true
  for i = 1, n do
    local key = keys[k0 + i]
    local o = a0 + 6 * (i - 1)
    local alg, p1, p2, p3 = tonumber(args[o + 1]), tonumber(args[o + 2]), tonumber(args[o + 3]), tonumber(args[o + 4])
    local cost = tonumber(args[o + 5])
    params[i] = { alg, p1, p2, p3, cost }
    if alg == 4 then
      local held = slots_held(key, now)
      views[i] = { held = held }
      allowed[i] = held < p1
      if not allowed[i] then all = false end
    else
      local v = view(alg, p1, p2, p3, load_state(key), now)
      views[i] = v
      if used(alg, p1, p2, v, now) + cost <= p1 then
        allowed[i] = true
      else
        allowed[i] = false
        all = false
        if cost <= p1 then retries[i] = retry_after(alg, p1, p2, p3, v, now, cost) end
      end
    end
  end
  reply[#reply + 1] = all and 1 or 0
  for i = 1, n do
    local key = keys[k0 + i]
    local o = a0 + 6 * (i - 1)
    local p = params[i]
    local alg, p1, p2, p3, cost = p[1], p[2], p[3], p[4], p[5]
    local take = args[o + 6] == '1'
    local v = views[i]
    if alg == 4 then
      local held = v.held
      if all and take then
        redis.call('ZADD', key, now + p2, args[o + 4])
        redis.call('PEXPIRE', key, math.ceil(p2 / 1000))
        held = held + 1
      end
      push_slots_outcome(reply, key, p1, now, held, allowed[i])
    else
      if all and take and cost > 0 then
        if alg == 3 then v.cur = v.cur - cost else v.cur = v.cur + cost end
        write(key, alg, p1, p2, p3, v, now)
      end
      push_outcome(reply, alg, p1, p2, p3, v, now, allowed[i], retries[i])
    end
  end
end
