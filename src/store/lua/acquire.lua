
-- acquire.lua: evaluate several limits atomically, all-or-nothing.
--
-- KEYS[i]  state key of limit i; all keys share one hash tag (one cluster slot).
-- ARGV     six values per limit i, starting at ARGV[6*(i-1)+1]:
--          algorithm (1 fixed, 2 sliding, 3 bucket, 4 concurrency), p1 (limit, capacity
--          or max in flight), p2 (window us, bucket refill, or lease us), p3 (bucket
--          interval us; for concurrency the call's slot id; else 0), cost, take (1: take
--          the cost if it fits; 0: only check that it fits).
-- Reply    { allowed_all (0|1), then per limit: allowed (0|1), limit, remaining,
--          reset_after_us, retry_after_us (-1: none, or the cost can never pass),
--          window index the decision was made in (-1: a bucket or slots) }.
-- ARGV[6n+1] (builds with the `test-util` feature only) "now" in microseconds instead of
--          the server's TIME.
-- Writes   nothing if any limit denies (beyond dropping expired concurrency slots);
--          otherwise each taken cost or slot, with a TTL.

local n = #KEYS
local now = test_now(ARGV[6 * n + 1])
local reply = {}
acquire_group(KEYS, 0, n, ARGV, 0, now, reply)
return reply
