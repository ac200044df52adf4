#!/usr/bin/env bash
# Instructions Redis's Lua spends on each operation a limiter script uses (valgrind's
# callgrind on redis-server, counted inside evalShaCommand: deterministic), per
# operation, the empty loop's cost taken off. The prices behind the scripts' layout and
# behind BENCHMARKS.md's bound on four limits against one.
#
# Usage: benchmarks/lua_costs.sh   (needs valgrind and python3)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind"; exit 1; }
VENV="${TMPDIR:-/tmp}/tower-llm-ratelimit-bench-venv"
[ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import redis" 2>/dev/null ||
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q redis; }
RUNS=20
echo "redis=$(redis-server --version | awk '{print $3}')"
. benchmarks/callgrind_redis.sh
run_operation() { "$VENV/bin/python" benchmarks/lua_costs.py "$REDIS_PORT" "$operation" "$RUNS"; }
# Instructions per iteration of OPERATION's loop.
count() {
  local operation="$1" total
  total=$(callgrind_total run_operation)
  echo $((total / RUNS / 1000))
}
loop=$(count loop)
echo "loop iteration: $loop instructions"
for op in table_store function_call unpack_6_doubles pack_1_double pack_6_doubles get mget_4_keys \
  setrange set_keepttl set_px_number set_px_formatted set_px_text time; do
  echo "$op: $(( $(count "$op") - loop )) instructions"
done
