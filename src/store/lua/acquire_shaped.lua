-- acquire_shaped.lua: what acquire.lua does, for calls that all have the same rate limits
-- in the same order (a "shape": each limit's algorithm, window or refill and interval,
-- whether it takes, and its place in its identifier's group, if it is grouped), with
-- that shape written into the script as constants. The client generates one script per
-- shape from the sections below (clock.lua and state.lua are prepended): `head` once,
-- `read` per limit with a state of its own, and for a shape with grouped limits
-- `group_read` once and `member_read_<algorithm>` per member; then `reply`, `write` per limit of its
-- own that takes, `group_write` once if a member takes (with `member_place` per member
-- in it, at $PLACES), then `tail`. In a section, $N stands for the shape's limit count,
-- $K for its keys per call (its limits of their own, and one for the group's value),
-- $i for the limit's place in the shape (1-based), $j for its key's place, $G for the
-- group value's key's place, $ALG for its algorithm (1 fixed window, 2 sliding window,
-- 3 token bucket), $P2 and $P3 for its window (us) or refill (the variable f$i: an
-- argument, which a tier's quota scales) and interval (us), $USED
-- for what it has used once the call took; $QUOTAS for "q1, c1, ..., qN, cN" (with f$i after a
-- bucket's), $FORMAT for their struct format, $SLOTS for "reply[len + 2], ...,
-- reply[len + 1 + R]", $FAILED for R times "false", $RAWS for each value as read (each
-- limit's of its own, then the group's);
-- and for the group: $GLEN its value's length, $GFORMAT that value's struct format,
-- $GVARS its members' numbers (by columns, as the value holds them), $GZEROS as many
-- zeros, $GSUM their sum, $GCLAMPS a line clamping each member's, $GTAKES whether a member takes
-- something, $GSAME whether every member that takes is in the window its value holds,
-- $SPANAT, $SPANFORMAT and $SPAN the byte offset, format and numbers that rewrite their
-- counts in place then; $R the values per call in the reply.
--
-- (Why: acquire.lua reads every limit's algorithm and window from its arguments and
-- keeps each limit's values in a table between its two passes. Here they are constants
-- and locals: ~30 % less work for Redis per call; and a group's members cost one read
-- and at most one write whatever their number; see BENCHMARKS.md.)
--
-- KEYS     per call, call after call: the state key of each limit of its own, in shape
--          order, then the group's value's key if the shape has grouped limits.
--          One call's keys share one hash tag; on a Redis Cluster a script carries one
--          call.
-- ARGV[1]  one string of little-endian doubles: the number of calls, then per call, per
--          limit in shape order: its limit (or capacity), then the cost, and for a
--          token bucket then its refill per interval.
-- ARGV[2]  (builds with the `test-util` feature only) "now" in microseconds instead of
--          the server's TIME.
-- Reply    as acquire.lua's: "now", then per call its flag (1 allowed, 0 denied, -1 a
--          key holds something else than a limiter state) and per limit its key's
--          value as read before the call (nil: none, or the flag is -1), skipping the
--          grouped limits, whose group's value as read comes last.
-- Writes   as acquire.lua's: for each call that every limit allows, each taking
--          limit's cost (a state with a TTL, or its place in the group's value, which
--          lives as long as its longest-lived member needs); nothing for a denied call.

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
  local a$i, u$i, p$i, w$i, s$i, t$i, r$i = view(KEYS[k + $j], $ALG, $P2, $P3, now)
  if a$i == nil then all = -1 elseif all == 1 and w$i + c$i > q$i then all = 0 end
--@ group_read
  -- The group's value (see state.lua): one read for all its members. A value of
  -- another length or marker reads as no state, and is replaced when written.
  local graw = redis.pcall('GET', KEYS[k + $G])
  local gok = false
  local $GVARS = $GZEROS
  if graw then
    if #graw == $GLEN then
      local marker
      marker, $GVARS = struct.unpack('$GFORMAT', graw)
      gok = marker == 2
      if not gok then
        $GVARS = $GZEROS
      else
        -- A number no script writes (NaN or an infinity; see clamped in state.lua) makes
        -- this sum NaN or an infinity, and one beyond +-2^52 makes it more than 2^57 (24
        -- numbers within 2^52 sum to less) unless another cancels it (which leaves the
        -- decisions as the client's: beyond 2^52 a count never fits and a window or a
        -- refill time lies centuries ahead, clamped or not). The usual values then cost
        -- no function call.
        local sum = $GSUM
        if sum ~= sum or sum > 144115188075855872 or sum < -144115188075855872 then
$GCLAMPS
        end
      end
    elseif type(graw) == 'table' then
      all = -1
    end
  end
--@ member_read_1
  -- Limit $i, a fixed window: its view from its place in the group's value (view_of in
  -- state.lua, inline and with its window as a constant: a call of a Lua function costs
  -- Redis ~900 instructions, more than the view; -1 stands for no state).
  local a$i, u$i, p$i, w$i, s$i, t$i = 0, 0, 0, 0, false, now
  do
    local x = g$iA
    if x * $P2 > now + $P2 then x = -1 end
    if x * $P2 > now then t$i = x * $P2 end
    a$i = (t$i - t$i % $P2) / $P2
    if x >= a$i then u$i, w$i, s$i = g$iB, g$iB, gok and x == a$i and g$iB > 0 end
  end
  if all == 1 and w$i + c$i > q$i then all = 0 end
--@ member_read_2
  -- Limit $i, a sliding window: as member_read_1 (-2 stands for no state).
  local a$i, u$i, p$i, w$i, s$i, t$i = 0, 0, 0, 0, false, now
  do
    local x = g$iA
    if x * $P2 > now + $P2 then x = -2 end
    if x * $P2 > now then t$i = x * $P2 end
    a$i = (t$i - t$i % $P2) / $P2
    if x >= a$i then u$i, p$i = g$iB, g$iC elseif x == a$i - 1 then p$i = g$iB end
    s$i, w$i = gok and x == a$i and u$i > 0, u$i
    if p$i > 0 then
      local w = p$i * ($P2 - (t$i - a$i * $P2)) / $P2
      local f = w % 1
      if f > 0 then w = w - f + 1 end
      w$i = u$i + w
    end
  end
  if all == 1 and w$i + c$i > q$i then all = 0 end
--@ member_read_3
  -- Limit $i, a token bucket: as member_read_1 (three zeros read as a full bucket).
  local a$i, u$i, p$i, w$i, s$i, t$i = now, 0, 0, 0, false, now
  do
    local last = g$iB
    if last > now then a$i, t$i = last, last end
    local elapsed = t$i - last
    local intervals = (elapsed - elapsed % $P3) / $P3
    local left = g$iA - intervals * $P2
    if left > 0 then a$i, u$i, w$i = last + intervals * $P3, left, left end
  end
  if all == 1 and w$i + c$i > q$i then all = 0 end
--@ reply
  if all == -1 then
    reply[len + 1], $SLOTS = -1, $FAILED
  else
    reply[len + 1], $SLOTS = all, $RAWS
  end
  len = len + 1 + $R
  if all == 1 then
--@ write
    -- Limit $i takes: exactly its cost is added to what is used (as in acquire.lua).
    if c$i > 0 then
      if s$i then
        redis.call('SETRANGE', KEYS[k + $j], USED_AT, struct.pack('<d', u$i + c$i))
      else
        persist(KEYS[k + $j], $ALG, a$i, u$i + c$i, p$i, reset_after($ALG, $P2, $P3, a$i, u$i + c$i, p$i, t$i) + t$i - now)
      end
    end
--@ group_write
    -- The group, if a member takes: when every member that takes is in the window the
    -- value holds (with something used there), their counts are rewritten in place (the
    -- value's TTL already covers them); else the whole value, each member's view as
    -- persist would store it, living as long as its longest-lived member needs.
    if $GTAKES then
      if $GSAME then
        redis.call('SETRANGE', KEYS[k + $G], '$SPANAT', struct.pack('$SPANFORMAT', $SPAN))
      else
        local ttl, reset = 0, 0
$PLACES
        redis.call('SET', KEYS[k + $G], struct.pack('$GFORMAT', 2, $GVARS), 'PX', string.format('%d', ttl_ms(ttl)))
      end
    end
--@ member_place
        g$iA, g$iB, g$iC, reset = placed($ALG, a$i, $USED, p$i, reset_after($ALG, $P2, $P3, a$i, $USED, p$i, t$i) + t$i - now)
        if reset > ttl then ttl = reset end
--@ tail
  end
  k = k + $K
end
return reply
