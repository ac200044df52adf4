
-- adjust.lua: charge (forced debit, may create debt) or refund units on several limits,
-- or release concurrency slots; at most once per settlement id.
--
-- KEYS[i]  state key of limit i, i = 1..n; all keys share one hash tag (one cluster slot).
-- KEYS[n+1] (only with a settlement id) the settlement's dedupe key, same hash tag.
-- ARGV[1]  settlement id, or -1 for none; ARGV[2] how long to remember it (ms).
-- ARGV     then five values per limit i, starting at ARGV[2+5*(i-1)+1]:
--          algorithm (1 fixed, 2 sliding, 3 bucket, 4 concurrency), p1, p2, p3 (as in
--          acquire.lua; for concurrency p3 is the slot to release), delta (> 0 charge,
--          < 0 refund or release; a refund never goes beyond a full budget).
-- ARGV[2+5n+1] (optional, tests only) "now" in microseconds instead of the server's TIME.
-- Reply    per limit: within_limit (0|1), limit, remaining, reset_after_us, -1.
-- Writes   every non-zero delta, with a TTL (or deletes a state back to "absent"), and
--          the dedupe key; nothing when the dedupe key shows the id was applied already.

local dedupe = ARGV[1] ~= '-1'
local n = #KEYS
if dedupe then n = n - 1 end
local now = tonumber(ARGV[2 + 5 * n + 1]) or now_us()
if ARGV[2 + 5 * n + 1] then TTL_PAD_MS = 600000 end
local apply = true
if dedupe and redis.call('EXISTS', KEYS[n + 1]) == 1 then apply = false end
local reply = {}
for i = 1, n do
  local o = 2 + 5 * (i - 1)
  local alg, p1, p2, p3 = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
  local delta = tonumber(ARGV[o + 5])
  if alg == 4 then
    if apply and delta < 0 then redis.call('ZREM', KEYS[i], ARGV[o + 4]) end
    local held = slots_held(KEYS[i], now)
    if held == 0 then redis.call('DEL', KEYS[i]) end
    push_slots_outcome(reply, KEYS[i], p1, now, held, true)
  else
    local v = view(alg, p1, p2, p3, load_state(KEYS[i]), now)
    if apply and delta ~= 0 then
      if alg == 1 then
        v.cur = math.max(clamp_counter(v.cur + delta), 0)
      elseif alg == 2 then
        if delta > 0 then
          v.cur = clamp_counter(v.cur + delta)
        else
          local back = -delta
          local from_current = math.min(back, v.cur)
          v.cur = v.cur - from_current
          v.prev = math.max(v.prev - (back - from_current), 0)
        end
      else
        v.cur = math.min(clamp_counter(v.cur - delta), p1)
      end
      write(KEYS[i], alg, p1, p2, p3, v, now)
    end
    push_outcome(reply, alg, p1, p2, p3, v, now, used(alg, p1, p2, v, now) <= p1, nil)
  end
end
if dedupe and apply then
  redis.call('SET', KEYS[n + 1], '1', 'PX', tonumber(ARGV[2]))
end
return reply
