
-- adjust.lua: charge (forced debit, may create debt) or refund units on several limits.
--
-- KEYS[i]  state key of limit i; all keys share one hash tag (one cluster slot).
-- ARGV     five values per limit i, starting at ARGV[5*(i-1)+1]:
--          algorithm (1 fixed, 2 sliding, 3 bucket), p1, p2, p3 (as in acquire.lua),
--          delta (> 0 charge, < 0 refund; a refund never goes beyond a full budget).
-- Reply    per limit: within_limit (0|1), limit, remaining, reset_after_us, -1.
-- Writes   every non-zero delta, with a TTL (or deletes a state back to "absent").

local now = now_us()
local reply = {}
for i = 1, #KEYS do
  local o = 5 * (i - 1)
  local alg, p1, p2, p3 = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4])
  local delta = tonumber(ARGV[o + 5])
  local v = view(alg, p1, p2, p3, load_state(KEYS[i]), now)
  if delta ~= 0 then
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
return reply
