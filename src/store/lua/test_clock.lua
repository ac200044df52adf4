-- test_clock.lua: appended to clock.lua only in builds with the `test-util` feature.
-- Defines no KEYS, ARGV or reply of its own.
--
-- A test may supply "now" (microseconds) instead of the server's TIME. Every TTL is then
-- padded by ten minutes: an expired state equals an absent one, so a longer TTL never
-- changes a decision, and keys cannot expire in real time before the test's virtual
-- time is done with them.

local ttl_pad_ms = 0
local server_clock, server_ttl_ms = clock, ttl_ms

local function clock(override)
  if override then
    ttl_pad_ms = 600000
    return override + 0
  end
  return server_clock()
end

local function ttl_ms(us)
  return server_ttl_ms(us) + ttl_pad_ms
end

-- (string.format '%d', not tostring: tostring keeps 14 digits.)
local function id_ttl_ms(arg)
  if ttl_pad_ms == 0 then return arg end
  return string.format('%d', arg + ttl_pad_ms)
end
