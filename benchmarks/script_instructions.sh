#!/usr/bin/env bash
# Instructions Redis executes per script run (valgrind's callgrind on redis-server,
# counted inside evalShaCommand: deterministic, whatever else the machine is doing), for
# the Redis store's scripts and rate-limiter-flexible's `consume` script. Each shape runs
# on its own fresh redis-server: 1000 runs to fill the keys, then N more; instructions
# over all of them, divided by their number.
#
# Usage: [SCRIPTS_AT=<git revision>] [SHAPES="acquire ..."] benchmarks/script_instructions.sh [N]
#        (default 3000; needs valgrind, python3, cargo (the shaped* shapes run the scripts
#        examples/acquire_script.rs prints), and benchmarks/peers/node_modules, which
#        benchmarks/peers/run.sh installs)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-3000}"
command -v valgrind >/dev/null || { echo "needs valgrind"; exit 1; }
VENV="${TMPDIR:-/tmp}/tower-llm-ratelimit-bench-venv"
[ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import redis" 2>/dev/null ||
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q redis; }
[ -d benchmarks/peers/node_modules/rate-limiter-flexible ] ||
  (cd benchmarks/peers && npm install --silent --no-audit --no-fund)

SHAPED="$(mktemp -d)"
trap 'rm -rf "$SHAPED"' EXIT
cargo run -q --features test-util --example acquire_script -- one >"$SHAPED/one.lua"
cargo run -q --features test-util --example acquire_script -- four >"$SHAPED/four.lua"
cargo run -q --features test-util --example acquire_script -- four-grouped >"$SHAPED/grouped.lua"
export SHAPED_ONE="$SHAPED/one.lua" SHAPED_FOUR="$SHAPED/four.lua" SHAPED_GROUPED="$SHAPED/grouped.lua"

. benchmarks/callgrind_redis.sh
# 1000 runs to fill the keys, then N more.
fill_and_run() {
  "$VENV/bin/python" benchmarks/script_instructions.py "$REDIS_PORT" "$shape" 1000
  "$VENV/bin/python" benchmarks/script_instructions.py "$REDIS_PORT" "$shape" "$N"
}
for shape in ${SHAPES:-empty peer acquire acquire4 acquire4-check2 acquire32 acquire32x4 shaped shaped4-check2 shaped32 shaped32x4 grouped4-check2 grouped32x4 settle settle-no-id one-key32 one-key32x4 one-key-shaped32 one-key-shaped32x4 shared-columns32x4 hash32 hash32x4 shaped32x4-mget}; do
  total=$(callgrind_total fill_and_run)
  echo "$shape: $((total / (N + 1000))) instructions per script run"
done
