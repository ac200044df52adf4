#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: our loadgen, the peers (rate-limiter-flexible on ioredis,
# redis-benchmark ceilings for our own script), Redis memory per identifier, and the
# criterion benches, side by side on this machine, against a redis-server it starts.
#
# Usage: benchmarks/peers/run.sh [SECONDS]   (default 5 per loadgen/peer run; add CRITERION=1 to
#                                  also run the criterion benches, a few minutes more)
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS="${1:-5}"
PORT="${BENCH_REDIS_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
DIR="$(mktemp -d)"

command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)"; exit 1; }
command -v node >/dev/null || { echo "needs node and npm for the rate-limiter-flexible peer"; exit 1; }

redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" --daemonize yes \
  --pidfile "$DIR/redis.pid" >/dev/null
trap 'kill "$(cat "$DIR/redis.pid")" 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$PORT" ping >/dev/null || { echo "redis-server did not start on port $PORT"; exit 1; }
URL="redis://127.0.0.1:$PORT/"

echo "# machine"
echo "cpus=$(nproc) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "redis=$(redis-server --version | awk '{print $3}') rustc=$(rustc --version | awk '{print $2}') node=$(node --version)"

cargo build --release --example loadgen -q
LOADGEN=target/release/examples/loadgen

echo; echo "# decisions at 64 in flight, 100 identifiers, ${SECS}s each"
for through in limiter layer; do
  echo "ours/memory/$through: $($LOADGEN --duration "$SECS" --through $through | tail -1)"
done
for through in limiter layer; do
  echo "ours/redis/$through: $($LOADGEN --redis "$URL" --duration "$SECS" --through $through 2>&1 | tail -1)"
done

(cd benchmarks/peers && [ -d node_modules/rate-limiter-flexible ] || npm install --silent --no-audit --no-fund)
echo "rate-limiter-flexible/redis (ioredis, consume): $(node benchmarks/peers/peers.mjs "$PORT" 64 "$SECS" 100 | tail -1)"

echo; echo "# redis-benchmark ceiling: EVALSHA of our acquire script, 64 clients, 100 keys"
SHA=$(redis-cli -p "$PORT" SCRIPT LOAD "$(cat src/store/lua/lib.lua src/store/lua/acquire.lua)")
N=$((SECS * 40000))
for pipeline in 1 16; do
  line=$(redis-benchmark -p "$PORT" -c 64 -n "$N" -r 100 -P "$pipeline" -q \
    EVALSHA "$SHA" 1 "ceiling:{__rand_int__}" 1 1000000000000 3600000000 0 1 1 2>/dev/null | tr '\r' '\n' | grep "requests per second" | tail -1)
  echo "redis-benchmark pipeline=$pipeline: ${line#*: }"
done

echo; echo "# Redis memory per identifier and limit (MEMORY USAGE, 100 keys sampled)"
for pattern in 'loadgen-*:{user-*}' 'loadgen-*:requests:{user-*}'; do
  keys=$(redis-cli -p "$PORT" --scan --pattern "$pattern" | awk 'NR <= 100')
  total=0; count=0
  for k in $keys; do
    bytes=$(redis-cli -p "$PORT" MEMORY USAGE "$k"); total=$((total + bytes)); count=$((count + 1))
  done
  if [ "$count" -gt 0 ]; then echo "$pattern: $((total / count)) bytes per key ($count keys)"; fi
done

if [ "${CRITERION:-0}" = 1 ]; then
  echo; echo "# criterion"
  REDIS_URL="$URL" cargo bench --bench vs_governor --bench memory_store --bench redis_store --bench body -- \
    --warm-up-time 1 --measurement-time 3 2>&1 | grep -E "^[a-z_]+/|time:" | grep -v "%"
fi
