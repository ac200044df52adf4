
-- acquire_batch.lua: several independent calls' acquires in one round trip, each
-- all-or-nothing on its own (as acquire.lua), for a single Redis (not Cluster: the
-- calls' keys are in different slots).
--
-- KEYS     the keys of every call, call after call.
-- ARGV[1]  the number of calls g; ARGV[2..g+1] how many keys each call has;
--          then six values per key, in key order (as in acquire.lua).
-- ARGV[g+2+6*#KEYS] (builds with the `test-util` feature only) "now" in microseconds
--          instead of TIME.
-- Reply    per call, calls concatenated: allowed_all (0|1), then six fields per limit
--          (as in acquire.lua).
-- Writes   per call, as acquire.lua.

local g = tonumber(ARGV[1])
local base = 1 + g
local now = test_now(ARGV[base + 6 * #KEYS + 1])
local reply = {}
local k0 = 0
for j = 1, g do
  local n = tonumber(ARGV[1 + j])
  acquire_group(KEYS, k0, n, ARGV, base + 6 * k0, now, reply)
  k0 = k0 + n
end
return reply
