"""Run one micro-operation 1000 times inside one Lua script, for benchmarks/lua_costs.sh,
which counts the instructions Redis executes (callgrind) and subtracts the empty loop.

Usage: lua_costs.py PORT OPERATION RUNS

These are the prices a limiter script pays in Redis's Lua 5.1 on every decision; the
scripts' layout (one key per limit, packed states, packed arguments) and BENCHMARKS.md's
bound on four limits against one follow from them.
"""

import struct
import sys

import redis

# Each body runs its operation once per iteration of a 1000-iteration loop.
LOOP = (
    "local s = 0 local r = ARGV[1] local T = {{0,0,0,0,0,0,0,0,0,0,0,0}} "
    "local function f(a, b, c) return a, b, c end "
    "for i = 1, 1000 do {} end return s"
)
OPERATIONS = {
    "loop": "s = s + i",
    "table_store": "T[5] = i",
    "function_call": "local a, b, c = f(i, 2, 3) s = s + a",
    "unpack_6_doubles": "local a, b, c, d, e, f = struct.unpack('<dddddd', r) s = s + a",
    "pack_1_double": "local x = struct.pack('<d', i) s = s + #x",
    "pack_6_doubles": "local x = struct.pack('<dddddd', i, 2, 3, 4, 5, 6) s = s + #x",
    "get": "local v = redis.pcall('GET', 'k1') s = s + #v",
    "mget_4_keys": "local v = redis.call('MGET', 'k1', 'k2', 'k3', 'k4') s = s + #v[1]",
    "setrange": "redis.call('SETRANGE', 'k1', '9', 'abcdefgh')",
    "set_keepttl": "redis.call('SET', 'k1', r, 'KEEPTTL')",
    "set_px_number": "redis.call('SET', 'k1', r, 'PX', 1000000000 + i)",
    "set_px_formatted": "redis.call('SET', 'k1', r, 'PX', string.format('%d', 1000000000 + i))",
    "set_px_text": "redis.call('SET', 'k1', r, 'PX', '1000000000')",
    "time": "local t = redis.call('TIME') s = s + t[2]",
}


def main() -> None:
    port, operation, runs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    client = redis.Redis(port=port)
    sha = client.script_load(LOOP.format(OPERATIONS[operation]))
    for key in ("k1", "k2", "k3", "k4"):
        client.set(key, b"\x01" + b"\x00" * 24, px=10**9)
    argument = struct.pack("<dddddd", 1, 2, 3, 4, 5, 6)
    for _ in range(runs):
        client.evalsha(sha, 0, argument)


if __name__ == "__main__":
    main()
