
-- acquire.lua: evaluate several limits atomically, all-or-nothing.
--
-- KEYS[i]  state key of limit i; all keys share one hash tag (one cluster slot).
-- ARGV     six values per limit i, starting at ARGV[6*(i-1)+1]:
--          algorithm (1 fixed, 2 sliding, 3 bucket, 4 concurrency), p1 (limit, capacity
--          or max in flight), p2 (window us, bucket refill, or lease us), p3 (bucket
--          interval us; for concurrency the call's slot id; else 0), cost, take (1: take
--          the cost if it fits; 0: only check that it fits).
-- Reply    { allowed_all (0|1), then per limit: allowed (0|1), limit, remaining,
--          reset_after_us, retry_after_us (-1: none, or the cost can never pass) }.
-- ARGV[6n+1] (optional, tests only) "now" in microseconds instead of the server's TIME.
-- Writes   nothing if any limit denies (beyond dropping expired concurrency slots);
--          otherwise each taken cost or slot, with a TTL.

local n = #KEYS
local now = tonumber(ARGV[6 * n + 1]) or now_us()
if ARGV[6 * n + 1] then TTL_PAD_MS = 600000 end
local views, allowed, retries, params = {}, {}, {}, {}
local all = true
for i = 1, n do
  local o = 6 * (i - 1)
  local alg, p1, p2, p3 = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
  local cost = tonumber(ARGV[o + 5])
  params[i] = { alg, p1, p2, p3, cost }
  if alg == 4 then
    local held = slots_held(KEYS[i], now)
    views[i] = { held = held }
    allowed[i] = held < p1
    if not allowed[i] then all = false end
  else
    local v = view(alg, p1, p2, p3, load_state(KEYS[i]), now)
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
local reply = { all and 1 or 0 }
for i = 1, n do
  local o = 6 * (i - 1)
  local p = params[i]
  local alg, p1, p2, p3, cost = p[1], p[2], p[3], p[4], p[5]
  local take = ARGV[o + 6] == '1'
  local v = views[i]
  if alg == 4 then
    local held = v.held
    if all and take then
      redis.call('ZADD', KEYS[i], now + p2, ARGV[o + 4])
      redis.call('PEXPIRE', KEYS[i], math.ceil(p2 / 1000))
      held = held + 1
    end
    push_slots_outcome(reply, KEYS[i], p1, now, held, allowed[i])
  else
    if all and take and cost > 0 then
      if alg == 3 then v.cur = v.cur - cost else v.cur = v.cur + cost end
      write(KEYS[i], alg, p1, p2, p3, v, now)
    end
    push_outcome(reply, alg, p1, p2, p3, v, now, allowed[i], retries[i])
  end
end
return reply
