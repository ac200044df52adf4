-- state.lua: what acquire.lua and adjust.lua share, prepended to each at compile time
-- (after clock.lua, which defines `clock`, `ttl_ms` and `id_ttl_ms`). Defines no KEYS,
-- ARGV or reply of its own.
--
-- The arithmetic is a line-for-line port of src/algorithm.rs (read that file for the
-- math). Redis Lua numbers are IEEE doubles: every quantity stays below 2^53, and the one
-- fractional step (the sliding-window weight) uses the same operations in the same order
-- as the Rust code, so both stores decide identically.
--
-- The scripts reply with each limit's state as they read it (before the call changed
-- it): the client computes the decisions from those states with src/algorithm.rs, the
-- code the memory store runs, so the scripts compute only what their writes need.
--
-- Cost matters here: these scripts run once per decision on a Redis that every instance
-- shares, and Redis's Lua spends ~10 ns per VM instruction and ~100 ns per call of a C
-- function. So the hot path builds no tables (functions return several values), calls
-- TIME once per script, takes every limit's six numbers packed in one string argument
-- for the whole script (one C call per limit instead of six decimal parses, and one
-- argument for Redis to parse; other ARGV values are read once, by arithmetic
-- coercion, not tonumber), rounds with `%` (not math.floor/ceil), builds tables at their
-- final size where it is known, and keeps each limit's state in one 25-byte string: a
-- byte 1 (no state of earlier releases starts with it), then three little-endian
-- doubles, packed and unpacked by `struct` in C:
--   fixed window:   window index, used, 0
--   sliding window: window index, used in that window, used in the window before
--   token bucket:   used (capacity - tokens; above the capacity is debt), last refill
--                   time (us), 0. Keeping "used" lets a changed capacity keep it.
-- A state in the text form "a:b:c" of earlier releases is still read.
--
-- Rounding: for integers 0 <= a < 2^53 and b > 0, a % b is exact, so (a - a % b) / b is
-- floor(a / b) exactly; for a double x, x - x % 1 is floor(x).

local MAX = 4503599627370496 -- 2^52: counters saturate here, TTLs (us) are capped here
local PACK = '<Bddd'
-- Offset of the "used" double (after the marker byte and the first double), as the
-- string SETRANGE takes. Redis turns each number passed to redis.call into a string with
-- snprintf("%.17g"), ~2 600 instructions each, a tenth of what a decision costs Redis when
-- every argument was a number: constant arguments are strings.
local USED_AT = '9'
-- One limit's six numbers, packed by the client (see the scripts' headers).
local PACKED_LIMIT = '<dddddd'
local PACKED_LIMIT_BYTES = 48
-- A state's three numbers (a nil: no state) normalized to `now` (View in algorithm.rs);
-- `packed`: they were read from a packed state (not text), `raw`: the value they were
-- read from, returned last. view (below) reads them from a key. As five values:
--   fixed:   window index, used, 0, used
--   sliding: window index, used in it, used in the one before, weighted use
--   bucket:  last refill time, used after refilling, 0, used
-- and whether the key holds a packed state of this very window with something used in
-- it, so that a take only has to rewrite the "used" field (its TTL already ends where
-- the new state's does), the time the decision is made at: `now`, or the start of the
-- state's window (its last refill for a bucket) if later (`effective` in
-- algorithm.rs: a state from "the future" was written by a caller whose clock read later;
-- deciding in its window keeps its count there). view returns nothing (nil) if the key
-- holds another type.
-- alg: 1 fixed, 2 sliding, 3 bucket; p2 window us or refill per interval; p3 bucket
-- interval us.
local function view_of(a, b, c, packed, alg, p2, p3, now, raw)
  if alg == 3 then
    if not a then return now, 0, 0, 0, false, now, raw end
    if b > now then now = b end
    local elapsed = now - b
    local intervals = (elapsed - elapsed % p3) / p3
    local used = a - intervals * p2
    if used <= 0 then return now, 0, 0, 0, false, now, raw end
    return b + intervals * p3, used, 0, used, false, now, raw
  end
  -- A window starting more than a window after now was written under another window
  -- length (a reconfigured limit): absent (`effective` in algorithm.rs).
  if a and a * p2 > now + p2 then a = nil end
  if a and a * p2 > now then now = a * p2 end
  local idx = (now - now % p2) / p2
  if alg == 1 then
    if a and a >= idx then return idx, b, 0, b, packed and a == idx and b > 0, now, raw end
    return idx, 0, 0, 0, false, now, raw
  end
  local cur, prev = 0, 0
  if a and a >= idx then
    cur, prev = b, c
  elseif a and a == idx - 1 then
    prev = b
  end
  local same = packed and a == idx and cur > 0
  if prev <= 0 then return idx, cur, prev, cur, same, now, raw end
  local w = prev * (p2 - (now - idx * p2)) / p2
  local f = w % 1
  if f > 0 then w = w - f + 1 end
  return idx, cur, prev, cur + w, same, now, raw
end

-- A number no script writes (NaN, or beyond +-2^52: a key set by something else)
-- reads as the client reads it (parse_state in src/store/redis/mod.rs): NaN as 0,
-- the rest clamped to +-2^52. Both then decide alike, and nothing written back from
-- it is NaN or infinite (a NaN TTL would fail the whole script, after the writes of
-- the calls before it in a batch).
local function clamped(a, b, c)
  if a ~= a then a = 0 elseif a > MAX then a = MAX elseif a < -MAX then a = -MAX end
  if b ~= b then b = 0 elseif b > MAX then b = MAX elseif b < -MAX then b = -MAX end
  if c ~= c then c = 0 elseif c > MAX then c = MAX elseif c < -MAX then c = -MAX end
  return a, b, c
end

local function view(key, alg, p2, p3, now)
  -- pcall: a key of another type (a misconfigured prefix) fails its own call only, as
  -- nil, before the script has written anything for that call.
  local raw = redis.pcall('GET', key)
  local a, b, c
  local packed = false
  if raw then
    -- The length first: the usual packed state then costs no C call to tell from an
    -- error reply (a table, whose length is 0) or text.
    local marker
    if #raw == 25 then marker, a, b, c = struct.unpack(PACK, raw) end
    if marker == 1 then
      packed = true
    elseif type(raw) == 'table' then
      return nil
    else
      a, b, c = string.match(raw, '^(-?%d+):(-?%d+):(-?%d+)$')
      if a then a, b, c = a + 0, b + 0, c + 0 end
    end
    -- (clamped and view_of, inline: this runs for every limit with a state of its own,
    -- and a call of a Lua function costs Redis more than what it does here, ~900
    -- instructions a limit.)
    if a then
      if a ~= a then a = 0 elseif a > MAX then a = MAX elseif a < -MAX then a = -MAX end
      if b ~= b then b = 0 elseif b > MAX then b = MAX elseif b < -MAX then b = -MAX end
      if c ~= c then c = 0 elseif c > MAX then c = MAX elseif c < -MAX then c = -MAX end
    end
  end
  if alg == 3 then
    if not a then return now, 0, 0, 0, false, now, raw end
    if b > now then now = b end
    local elapsed = now - b
    local intervals = (elapsed - elapsed % p3) / p3
    local used = a - intervals * p2
    if used <= 0 then return now, 0, 0, 0, false, now, raw end
    return b + intervals * p3, used, 0, used, false, now, raw
  end
  if a and a * p2 > now + p2 then a = nil end
  if a and a * p2 > now then now = a * p2 end
  local idx = (now - now % p2) / p2
  if alg == 1 then
    if a and a >= idx then return idx, b, 0, b, packed and a == idx and b > 0, now, raw end
    return idx, 0, 0, 0, false, now, raw
  end
  local cur, prev = 0, 0
  if a and a >= idx then
    cur, prev = b, c
  elseif a and a == idx - 1 then
    prev = b
  end
  local same = packed and a == idx and cur > 0
  if prev <= 0 then return idx, cur, prev, cur, same, now, raw end
  local w = prev * (p2 - (now - idx * p2)) / p2
  local f = w % 1
  if f > 0 then w = w - f + 1 end
  return idx, cur, prev, cur + w, same, now, raw
end

-- Grouped limits: an identifier's limits that every call of a layer has share one
-- value: a byte 2, then by columns, member after member, each member's first number,
-- then each one's second, then each one's third (the numbers of a state of its own, as
-- little-endian doubles; the counts side by side, so that a call's takes rewrite few
-- bytes). Three zeros stand for no state. The value's length says how many members it
-- has.
local GROUP_MARKER = 2

-- Member `member` (0-based) of `members` in the value at `key`, as view reads a state
-- of its own (the value as read is the last result); nil if the key holds another type.
-- A value of another length or marker reads as no state (and is replaced when written).
local function member_view(key, member, members, alg, p2, p3, now)
  local raw = redis.pcall('GET', key)
  local a, b, c
  local packed = false
  if raw then
    if type(raw) == 'table' then return nil end
    if #raw == 1 + 24 * members and string.byte(raw, 1) == GROUP_MARKER then
      a = struct.unpack('<d', raw, 2 + 8 * member)
      b = struct.unpack('<d', raw, 2 + 8 * (members + member))
      c = struct.unpack('<d', raw, 2 + 8 * (2 * members + member))
      a, b, c = clamped(a, b, c)
      packed = true
      if a == 0 and b == 0 and c == 0 then a = nil end
    end
  end
  return view_of(a, b, c, packed, alg, p2, p3, now, raw)
end

-- What a grouped member's place holds for a view (anchor, cur, prev) whose budget is
-- restored after `reset` us: its three numbers, and how long the value must live for
-- them (0: no state, three zeros). As persist stores a state of its own.
local function placed(alg, anchor, cur, prev, reset)
  if cur == 0 and prev == 0 or alg == 3 and cur <= 0 then return 0, 0, 0, 0 end
  if reset < 1 then reset = 1 elseif reset > MAX then reset = MAX end
  if alg == 3 then
    if cur > MAX then cur = MAX end
    return cur, anchor, 0, reset
  end
  return anchor, cur, prev, reset
end

-- Write one member's place in the value at `key` (see placed), creating the value if
-- it is not one of `members` members, and making it live at least `reset` us.
local function persist_member(key, member, members, x, y, z, reset)
  local raw = redis.call('GET', key)
  if raw and #raw == 1 + 24 * members and string.byte(raw, 1) == GROUP_MARKER then
    for column, v in ipairs({ x, y, z }) do
      local at = 1 + 8 * ((column - 1) * members + member)
      redis.call('SETRANGE', key, string.format('%d', at), struct.pack('<d', v))
    end
    if reset > 0 then
      local ms = ttl_ms(reset)
      local left = redis.call('PTTL', key)
      if left >= 0 and left < ms then redis.call('PEXPIRE', key, string.format('%d', ms)) end
    end
    return
  end
  if reset <= 0 then return end
  local before, after = string.rep('\0', 8 * member), string.rep('\0', 8 * (members - member - 1))
  local value = string.char(GROUP_MARKER) ..
    before .. struct.pack('<d', x) .. after ..
    before .. struct.pack('<d', y) .. after ..
    before .. struct.pack('<d', z) .. after
  redis.call('SET', key, value, 'PX', string.format('%d', ttl_ms(reset)))
end

-- Time (us) until the budget of a view (anchor, cur, prev) is fully restored.
local function reset_after(alg, p2, p3, anchor, cur, prev, now)
  if alg == 1 then return (anchor + 1) * p2 - now end
  if alg == 2 then
    if cur > 0 then return (anchor + 2) * p2 - now end
    if prev > 0 then return (anchor + 1) * p2 - now end
    return 0
  end
  if cur <= 0 then return 0 end
  local intervals = cur / p2
  local f = intervals % 1
  if f > 0 then intervals = intervals - f + 1 end
  return anchor + intervals * p3 - now
end

-- Persist a view whose budget is restored after `reset` us: delete the key when the
-- view equals "absent", else store it with a TTL of exactly as long as it can matter.
local function persist(key, alg, anchor, cur, prev, reset)
  if cur == 0 and prev == 0 or alg == 3 and cur <= 0 then
    redis.call('DEL', key)
    return
  end
  local state
  if alg == 3 then
    if cur > MAX then cur = MAX elseif cur < -MAX then cur = -MAX end
    state = struct.pack(PACK, 1, cur, anchor, 0)
  else
    state = struct.pack(PACK, 1, anchor, cur, prev)
  end
  if reset < 1 then reset = 1 elseif reset > MAX then reset = MAX end
  -- The TTL as text made here: Redis would make it with %.17g, ~1 300 instructions more.
  redis.call('SET', key, state, 'PX', string.format('%d', ttl_ms(reset)))
end

-- Concurrency slots: a sorted set of slot id -> lease end (us). Expired slots are dropped
-- before counting, so a slot of a crashed process frees itself. The decision, as the
-- reply carries it: one string of six little-endian doubles, allowed (0|1), max, held,
-- reset and retry (the time until the earliest lease ends, an upper bound on when a slot
-- frees; retry -1 when allowed), -1.
local function slots_reply(key, max, held, allowed, now)
  local earliest = 0
  if held > 0 then
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then
      earliest = first[2] - now
      if earliest < 0 then earliest = 0 end
    end
  end
  if earliest > MAX then earliest = MAX end
  local retry = -1
  if allowed == 0 then retry = earliest > 1 and earliest or 1 end
  return struct.pack(PACKED_LIMIT, allowed, max, held, earliest, retry, -1)
end
