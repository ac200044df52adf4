"""Send one of the Redis store's scripts (or a peer's) N times through a pipelined client,
for benchmarks/script_instructions.sh, which counts the instructions Redis executes.

Usage: script_instructions.py PORT SHAPE N

SHAPE: empty | peer | acquire | acquire4 | acquire4-check2 | acquire32 | acquire32x4 | settle |
       settle-no-id | shaped | shaped4-check2 | shaped32 | shaped32x4 | grouped4-check2 |
       grouped32x4 | one-key32 | one-key32x4 |
       one-key-shaped32 | one-key-shaped32x4 | shared-columns32x4 | hash32 | hash32x4 | shaped32x4-mget
The scripts are assembled as the crate assembles them (clock.lua, state.lua, the body),
from the working tree, or from the git revision in $SCRIPTS_AT (to compare releases).
The shaped* shapes run the scripts the crate generates for calls of one shape, as
`examples/acquire_script.rs` prints them into the files $SHAPED_ONE, $SHAPED_FOUR and
$SHAPED_GROUPED (from the working tree only; grouped* are the layer's four limits as it
plans them, one group whose states share one value); one-key* and hash* run the prototypes in benchmarks/prototypes/;
shaped32x4-mget is the generated four-limit script with its four GETs made one MGET.
"""

import os
import pathlib
import struct
import subprocess
import sys

import redis

ROOT = pathlib.Path(__file__).resolve().parent.parent
LUA = ROOT / "src" / "store" / "lua"
PEER = ROOT / "benchmarks" / "peers" / "node_modules" / "rate-limiter-flexible" / "lib" / "RateLimiterRedis.js"


def lua(name: str) -> str:
    at = os.environ.get("SCRIPTS_AT")
    if not at:
        return (LUA / name).read_text()
    path = f"{at}:src/store/lua/{name}"
    return subprocess.run(["git", "-C", str(ROOT), "show", path], check=True, capture_output=True, text=True).stdout


def ours(body: str) -> str:
    # Revisions before clock.lua had a one-line prelude instead.
    try:
        clock = lua("clock.lua")
    except (OSError, subprocess.CalledProcessError):
        clock = "local TEST_CLOCK = false\n"
    return clock + lua("state.lua") + lua(body)


def shaped(variable: str) -> str:
    return pathlib.Path(os.environ[variable]).read_text()


def prototype(name: str) -> str:
    return lua("clock.lua") + (ROOT / "benchmarks" / "prototypes" / name).read_text()


def with_mget(script: str) -> str:
    """The generated four-limit script reading its four keys with one MGET (a measurement
    only: MGET reads a key of another type as nil, which the crate's scripts must not)."""
    script = script.replace("local function view(key, alg, p2, p3, now)", "local function view(raw, alg, p2, p3, now)")
    script = script.replace("  local raw = redis.pcall('GET', key)\n", "", 1)
    first = "  local a1, u1, p1, w1, s1, t1, r1 = view(KEYS[k + 1]"
    assert first in script
    script = script.replace(first, "  local m = redis.call('MGET', KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4])\n" + first)
    for q in range(1, 5):
        script = script.replace(f"view(KEYS[k + {q}]", f"view(m[{q}]")
    return script


def peer_script() -> str:
    source = PEER.read_text()
    start = source.index("`") + 1
    return source[start : source.index("`", start)].replace("\\\n", "\n")


# A fixed window of 2^40 per hour: never denies, so every run is a full read-modify-write.
LIMIT = struct.pack("<dddddd", 1, 2**40, 3600e6, 0, 1, 1)
CHARGE = struct.pack("<dddddd", 1, 2**40, 3600e6, 0, 150, -1)
# A check that only reads (a token limit in CheckRemaining mode: cost 1, not taken).
CHECK = struct.pack("<dddddd", 1, 2**40, 3600e6, 0, 1, 0)
# Counts in the scripts' record string (a call's limits; a settlement's limits and id flag).
COUNT = {n: struct.pack("<d", n) for n in (0, 1, 4)}


def calls(shape: str, i: int):
    """(keys, args) of the i-th run."""
    user = f"u{i % 100}"
    if shape == "empty":
        return [f"k:{{{user}}}"], []
    if shape == "peer":
        return [f"peer:{{{user}}}"], [1, 3600]
    if shape == "acquire":
        return [f"k:{{{user}}}"], acquire_args(1, COUNT[1] + LIMIT)
    if shape == "acquire4":
        return [f"k{j}:{{{user}}}" for j in range(4)], acquire_args(1, COUNT[4] + LIMIT * 4)
    if shape == "acquire4-check2":
        # The layer's four-limit shape: two request limits take, two token limits check.
        return [f"k{j}:{{{user}}}" for j in range(4)], acquire_args(1, COUNT[4] + (LIMIT + CHECK) * 2)
    if shape == "acquire32":
        keys = [f"k:{{u{(i * 32 + j) % 100}}}" for j in range(32)]
        return keys, acquire_args(32, (COUNT[1] + LIMIT) * 32)
    if shape in ("shaped", "shaped4-check2", "shaped32", "shaped32x4", "shaped32x4-mget"):
        # Generated per shape: per limit only its quota and cost.
        limits = 4 if shape.endswith("4-check2") or "x4" in shape else 1
        calls_per_run = 32 if "32" in shape else 1
        call = struct.pack("<dd", 2**40, 1) * limits
        keys = [f"k{q}:{{u{(i * calls_per_run + j) % 100}}}" for j in range(calls_per_run) for q in range(limits)]
        return keys, [struct.pack("<d", calls_per_run) + call * calls_per_run]
    if shape in ("grouped4-check2", "grouped32x4"):
        # The layer's four-limit shape as the crate plans it: one group, one key per call.
        calls_per_run = 32 if "32" in shape else 1
        call = struct.pack("<dd", 2**40, 1) * 4
        keys = [f"g:{{u{(i * calls_per_run + j) % 100}}}" for j in range(calls_per_run)]
        return keys, [struct.pack("<d", calls_per_run) + call * calls_per_run]
    if shape == "shared-columns32x4":
        # benchmarks/prototypes/shared_columns_4.lua: one value per identifier, by columns.
        call = struct.pack("<dd", 2**40, 1) * 4
        keys = [f"c:{{u{(i * 32 + j) % 100}}}" for j in range(32)]
        return keys, [struct.pack("<d", 32) + call * 32]
    if shape in ("one-key-shaped32", "one-key-shaped32x4"):
        call = struct.pack("<dd", 2**40, 1) * (1 if shape == "one-key-shaped32" else 4)
        keys = [f"one:{{u{(i * 32 + j) % 100}}}" for j in range(32)]
        return keys, [struct.pack("<d", 32) + call * 32]
    if shape in ("hash32", "hash32x4"):
        # benchmarks/prototypes/hash_per_identifier_*.lua: per call the identifier's hash,
        # then its fields.
        limits = 1 if shape == "hash32" else 4
        call = struct.pack("<dd", 2**40, 1) * limits
        keys = []
        for j in range(32):
            user = f"u{(i * 32 + j) % 100}"
            keys += [f"h:{{{user}}}"] + [f"k{q}:{{{user}}}" for q in range(limits)]
        return keys, [struct.pack("<d", 32) + call * 32]
    if shape in ("one-key32", "one-key32x4"):
        # benchmarks/prototypes/one_key_acquire.lua: one key per identifier for all its limits.
        limits = 1 if shape == "one-key32" else 4

        def limit(j: int, take: bool) -> bytes:
            return struct.pack("<dddddd", j + 1, 1, 2**40, 3600e6, 0, 1 if take else -1)

        call = struct.pack("<dd", 1, limits) + b"".join(limit(j, j % 2 == 0) for j in range(limits))
        keys = [f"one:{{u{(i * 32 + j) % 100}}}" for j in range(32)]
        return keys, [struct.pack("<d", 32) + call * 32]
    if shape == "acquire32x4":
        keys = [f"k{q}:{{u{(i * 32 + j) % 100}}}" for j in range(32) for q in range(4)]
        return keys, acquire_args(32, (COUNT[4] + (LIMIT + CHECK) * 2) * 32)
    # Settlements on 10 identifiers (for revisions with a set of recent ids per
    # identifier, so that each set is full: 128).
    user = f"u{i % 10}"
    with_id = shape == "settle"
    # Ids as the crate makes them: 63-bit, spread (a counter times an odd constant).
    settlement_id = ((i + 1) * 0x9E3779B97F4A7C15) & ((1 << 63) - 1)
    records = COUNT[1] + COUNT[int(with_id)] + CHARGE
    if ID_SETS:
        keys = [f"t:{{{user}}}"] + ([f"t:{{{user}}}:settlements"] if with_id else [])
        return keys, [1, 10000, 127, -1, settlement_id, records]
    keys = [f"t:{{{user}}}"] + ([f"t:{{{user}}}:settlement:{settlement_id}"] if with_id else [])
    return keys, [1, 10000, -1, records]


def acquire_args(calls: int, records: bytes):
    """acquire.lua's ARGV: the call count leads the records string (earlier revisions took it
    as an argument of its own)."""
    if COUNT_IN_RECORDS:
        return [struct.pack("<d", calls) + records]
    return [calls, records]


# Revisions before per-settlement id keys kept an identifier's ids in one sorted set and
# took the ids, and the set's trim rank, as arguments.
ID_SETS = False
# Whether acquire.lua reads its call count from the records string.
COUNT_IN_RECORDS = True


def main() -> None:
    global ID_SETS, COUNT_IN_RECORDS
    ID_SETS = "ARGV[5 + settlements]" in lua("adjust.lua")
    COUNT_IN_RECORDS = "local calls = ARGV[1]" not in lua("acquire.lua")
    port, shape, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    body = {
        "empty": "return 1",
        "peer": None,
        "acquire": ours("acquire.lua"),
        "acquire4": ours("acquire.lua"),
        "acquire4-check2": ours("acquire.lua"),
        "acquire32": ours("acquire.lua"),
        "acquire32x4": ours("acquire.lua"),
        "shaped": shaped("SHAPED_ONE"),
        "shaped4-check2": shaped("SHAPED_FOUR"),
        "shaped32": shaped("SHAPED_ONE"),
        "shaped32x4": shaped("SHAPED_FOUR"),
        "grouped4-check2": shaped("SHAPED_GROUPED"),
        "grouped32x4": shaped("SHAPED_GROUPED"),
        "one-key32": prototype("one_key_acquire.lua"),
        "one-key32x4": prototype("one_key_acquire.lua"),
        "one-key-shaped32": prototype("one_key_shaped_1.lua"),
        "one-key-shaped32x4": prototype("one_key_shaped_4.lua"),
        "shared-columns32x4": prototype("shared_columns_4.lua"),
        "shaped32x4-mget": with_mget(shaped("SHAPED_FOUR")),
        "hash32": prototype("hash_per_identifier_1.lua"),
        "hash32x4": prototype("hash_per_identifier_4.lua"),
        "settle": ours("adjust.lua"),
        "settle-no-id": ours("adjust.lua"),
    }[shape] or peer_script()
    client = redis.Redis(port=port)
    sha = client.script_load(body)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        keys, args = calls(shape, i)
        pipe.evalsha(sha, len(keys), *keys, *args)
        if len(pipe) >= 200:
            pipe.execute()
    pipe.execute()


if __name__ == "__main__":
    main()
