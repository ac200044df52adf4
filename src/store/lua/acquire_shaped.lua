-- acquire_shaped.lua: what acquire.lua does, for calls that all have the same rate limits
-- in the same order (a "shape": each limit's algorithm, window or refill and interval,
-- and whether it takes), with that shape written into the script as constants. The
-- client generates one script per shape from the sections below (clock.lua and
-- state.lua are prepended): `head` once, `read` per limit, `reply`, `write` per limit
-- that takes, then `tail`. In a section, $N stands for the shape's limit count, $i for
-- the limit's place in it (1-based), $ALG for its algorithm (1 fixed window, 2 sliding
-- window, 3 token bucket), $P2 and $P3 for its window (µs) or refill and interval (µs);
-- $QUOTAS for "q1, c1, ..., qN, cN", $FORMAT for the struct format of 2N doubles,
-- $SLOTS for "reply[len + 2], ..., reply[len + 1 + N]", $FAILED for N times "false" and
-- $RAWS for "r1, ..., rN".
--
-- (Why: acquire.lua reads every limit's algorithm and window from its arguments and
-- keeps each limit's values in a table between its two passes. Here they are constants
-- and locals: ~30 % less work for Redis per call; see BENCHMARKS.md.)
--
-- KEYS     the state keys of every call, call after call, N per call in shape order.
--          One call's keys share one hash tag; on a Redis Cluster a script carries one
--          call.
-- ARGV[1]  one string of little-endian doubles: the number of calls, then per call, per
--          limit in key order: its limit (or capacity), then the cost.
-- ARGV[2]  (builds with the `test-util` feature only) "now" in microseconds instead of
--          the server's TIME.
-- Reply    as acquire.lua's: "now", then per call its flag (1 allowed, 0 denied, -1 a
--          key holds something else than a limiter state) and per limit its key's
--          value as read before the call (nil: none, or the flag is -1).
-- Writes   as acquire.lua's: for each call that every limit allows, each taking
--          limit's cost (a state with a TTL); nothing for a denied call.

--@ head
local records = ARGV[1]
local now = clock(ARGV[2])
local calls, at = struct.unpack('<d', records)
local reply, len = { now, 0, 0 }, 1
-- KEYS index before the current call's keys.
local k = 0
for call = 1, calls do
  local all = 1
  local $QUOTAS
  $QUOTAS, at = struct.unpack('$FORMAT', records, at)
--@ read
  -- Limit $i: its view (see view in state.lua); nil if its key holds another type.
  local a$i, u$i, p$i, w$i, s$i, t$i, r$i = view(KEYS[k + $i], $ALG, $P2, $P3, now)
  if a$i == nil then all = -1 elseif all == 1 and w$i + c$i > q$i then all = 0 end
--@ reply
  if all == -1 then
    reply[len + 1], $SLOTS = -1, $FAILED
  else
    reply[len + 1], $SLOTS = all, $RAWS
  end
  len = len + 1 + $N
  if all == 1 then
--@ write
    -- Limit $i takes: exactly its cost is added to what is used (as in acquire.lua).
    if c$i > 0 then
      if s$i then
        redis.call('SETRANGE', KEYS[k + $i], USED_AT, struct.pack('<d', u$i + c$i))
      else
        persist(KEYS[k + $i], $ALG, a$i, u$i + c$i, p$i, reset_after($ALG, $P2, $P3, a$i, u$i + c$i, p$i, t$i) + t$i - now)
      end
    end
--@ tail
  end
  k = k + $N
end
return reply
