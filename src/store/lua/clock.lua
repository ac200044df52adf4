-- clock.lua: the scripts' clock and TTLs, prepended to state.lua and each script.
-- Defines no KEYS, ARGV or reply of its own. (Builds with the `test-util` feature
-- append test_clock.lua, which lets a test supply "now".)

-- "Now" in microseconds: the server's TIME. The scripts call it with their test-clock
-- argument, which only `test-util` builds send; here it is not read.
local function clock()
  local t = redis.call('TIME')
  return t[1] * 1000000 + t[2]
end

-- A TTL in microseconds as whole milliseconds, rounded up (for PX and PEXPIRE).
local function ttl_ms(us)
  local ms = us / 1000
  local f = ms % 1
  if f > 0 then ms = ms - f + 1 end
  return ms
end

-- How long a settlement id is remembered (ms), from the argument that says so.
local function id_ttl_ms(arg)
  return arg
end
