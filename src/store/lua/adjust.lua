-- adjust.lua: charge (forced debit, may create debt) or refund units on several limits,
-- release or renew concurrency slots; at most once per settlement id.
--
-- KEYS[i]  state key of limit i, i = 1..n; all keys share one hash tag (one cluster slot).
-- KEYS[n+1] (only with a settlement id) the identifier's set of recent settlement ids
--          (a sorted set: id -> expiry ms), same hash tag.
-- ARGV[1]  settlement id, or -1 for none; ARGV[2] how long to remember an id (ms);
--          ARGV[3] the most ids remembered per set (the oldest are forgotten first).
-- ARGV     then six values per limit i, starting at ARGV[3+6*(i-1)+1]:
--          algorithm (1 fixed, 2 sliding, 3 bucket, 4 concurrency), p1, p2, p3 (as in
--          acquire.lua; for concurrency p3 is the slot), delta (> 0 charge or renew the
--          slot's lease, < 0 refund or release; a refund never goes beyond a full budget),
--          window (the window index that paid for a refund, -1: none; see
--          `algorithm::adjust` for where a refund lands once that window has rolled).
-- ARGV[3+6n+1] (builds with the `test-util` feature only) "now" in microseconds instead
--          of the server's TIME.
-- Reply    per limit: within_limit (0|1), limit, remaining, reset_after_us, -1, window.
-- Writes   every non-zero delta, with a TTL (or deletes a state back to "absent"), and
--          the id into the set (pruned by expiry and size, with a TTL); nothing when the
--          set shows the id was applied already.

local dedupe = ARGV[1] ~= '-1'
local n = #KEYS
if dedupe then n = n - 1 end
local now = test_now(ARGV[3 + 6 * n + 1])
local apply = true
local ids, now_ms
if dedupe then
  ids = KEYS[n + 1]
  now_ms = math.floor(now / 1000)
  redis.call('ZREMRANGEBYSCORE', ids, '-inf', now_ms)
  if redis.call('ZSCORE', ids, ARGV[1]) then apply = false end
end
local reply = {}
for i = 1, n do
  local o = 3 + 6 * (i - 1)
  local alg, p1, p2, p3 = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
  local delta = tonumber(ARGV[o + 5])
  local window = tonumber(ARGV[o + 6])
  if alg == 4 then
    local held = slots_held(KEYS[i], now)
    if apply and delta < 0 then
      redis.call('ZREM', KEYS[i], ARGV[o + 4])
      held = redis.call('ZCARD', KEYS[i])
    elseif apply and delta > 0 and redis.call('ZSCORE', KEYS[i], ARGV[o + 4]) then
      redis.call('ZADD', KEYS[i], now + p2, ARGV[o + 4])
      redis.call('PEXPIRE', KEYS[i], math.ceil(p2 / 1000))
    end
    if held == 0 then redis.call('DEL', KEYS[i]) end
    push_slots_outcome(reply, KEYS[i], p1, now, held, true)
  else
    local v = view(alg, p1, p2, p3, load_state(KEYS[i]), now)
    local changed = apply and delta ~= 0
    if changed then
      if delta > 0 then
        if alg == 3 then v.cur = clamp_counter(v.cur - delta) else v.cur = clamp_counter(v.cur + delta) end
      else
        local back = -delta
        if alg == 3 then
          v.cur = math.min(clamp_counter(v.cur + back), p1)
        elseif window >= 0 and window >= v.anchor then
          if alg == 1 then v.cur = math.max(v.cur - back, 0) else v.cur = v.cur - math.min(back, math.max(v.cur, 0)) end
        elseif window >= 0 and alg == 2 and window == v.anchor - 1 then
          v.prev = math.max(v.prev - back, 0)
        elseif window >= 0 then
          changed = false
        elseif alg == 1 then
          v.cur = math.max(v.cur - back, 0)
        else
          local from_current = math.min(back, math.max(v.cur, 0))
          v.cur = v.cur - from_current
          v.prev = math.max(v.prev - (back - from_current), 0)
        end
      end
    end
    if changed then write(KEYS[i], alg, p1, p2, p3, v, now) end
    push_outcome(reply, alg, p1, p2, p3, v, now, used(alg, p1, p2, v, now) <= p1, nil)
  end
end
if dedupe and apply then
  local horizon = tonumber(ARGV[2])
  redis.call('ZADD', ids, now_ms + horizon, ARGV[1])
  local extra = redis.call('ZCARD', ids) - tonumber(ARGV[3])
  if extra > 0 then redis.call('ZREMRANGEBYRANK', ids, 0, extra - 1) end
  redis.call('PEXPIRE', ids, horizon + TTL_PAD_MS)
end
return reply
