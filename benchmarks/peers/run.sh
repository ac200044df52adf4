#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: our loadgen and the peer (rate-limiter-flexible on ioredis),
# runs alternated, against one fresh redis-server this script starts; for every Redis run
# the Redis server's CPU per decision (INFO cpu, user + sys), its script time per decision
# (INFO commandstats: EVALSHA/EVAL/FCALL) and the client's CPU per decision. The layer's
# shapes (a request and a token limit; two of each) run beside the peer doing the same
# work its own way (peers.mjs LIMITS): per call, one "decision". Each round ends with its
# ratios against the targets. Then four limits against one by calls in flight, Redis
# memory per identifier, and the criterion benches when asked. (No redis-benchmark
# ceiling: our scripts take packed binary arguments, which a command line cannot carry.)
#
# Usage: benchmarks/peers/run.sh [SECONDS] [ROUNDS]   (defaults 5 and 2; CRITERION=1 to also
#        run the criterion benches, a few minutes more)
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS="${1:-5}"
ROUNDS="${2:-2}"
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

cargo build --release --example loadgen -q
LOADGEN=target/release/examples/loadgen
(cd benchmarks/peers && [ -d node_modules/rate-limiter-flexible ] || npm install --silent --no-audit --no-fund)

echo "# machine"
echo "cpus=$(nproc) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "redis=$(redis-server --version | awk '{print $3}') rustc=$(rustc --version | awk '{print $2}') node=$(node --version)"
echo "peer: $(node benchmarks/peers/peers.mjs "$PORT" 1 1 1 | head -1)"

# Redis server CPU so far, in microseconds (user + sys).
redis_cpu_us() {
  redis-cli -p "$PORT" INFO cpu | tr -d '\r' |
    awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { printf "%.0f", s * 1000000 }'
}
# Script calls and their total microseconds so far.
script_stats() {
  redis-cli -p "$PORT" INFO commandstats | tr -d '\r' |
    awk -F'[:,=]' '/^cmdstat_(evalsha|eval|fcall):/ { c += $3; u += $5 } END { printf "%d %d\n", c, u }'
}
# measure LABEL COMMAND...: run COMMAND (its last line carries decisions=N) and print its
# throughput with the Redis work and client CPU per decision.
measure() {
  local label="$1"; shift
  local cpu0 cpu1 c0 u0 c1 u1 out decisions
  cpu0=$(redis_cpu_us); read -r c0 u0 < <(script_stats)
  out=$("$@" 2>&1 | tail -1)
  cpu1=$(redis_cpu_us); read -r c1 u1 < <(script_stats)
  decisions=$(sed -n 's/.* decisions=\([0-9]*\).*/\1/p' <<<"$out")
  if [ -z "$decisions" ] || [ "$decisions" = 0 ]; then echo "$label: $out"; return; fi
  local line
  line=$(awk -v l="$label" -v o="$out" -v d="$decisions" -v cpu=$((cpu1 - cpu0)) -v c=$((c1 - c0)) -v u=$((u1 - u0)) \
    'BEGIN { split(o, f, " "); printf "%-34s %s %s %s redis_cpu_us_per_decision=%.2f script_us_per_decision=%.2f scripts_per_decision=%.2f %s\n", l, f[1], f[2], f[3], cpu / d, u / d, c / d, f[5] }')
  echo "$line"
  RATE[$label]=$(sed -n 's/.*decisions_per_sec=\([0-9]*\).*/\1/p' <<<"$line")
  CPU[$label]=$(sed -n 's/.*redis_cpu_us_per_decision=\([0-9.]*\).*/\1/p' <<<"$line")
}
declare -A RATE CPU
# ratio NAME A B: A's value over B's (from the CPU or RATE table named by $1).
ratio() {
  local -n table="$1"
  awk -v a="${table[$2]:-0}" -v b="${table[$3]:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'
}
# The round's ratios against the targets, so they need not be worked out by hand.
ratios() {
  local peer="rate-limiter-flexible consume"
  echo "ratios: redis_cpu ours/peer batched=$(ratio CPU "ours limiter batching=on" "$peer")" \
    "unbatched=$(ratio CPU "ours limiter batching=off" "$peer")" \
    "layer_limits=2=$(ratio CPU "ours layer limits=2" "rate-limiter-flexible limits=2")" \
    "layer_limits=4=$(ratio CPU "ours layer limits=4" "rate-limiter-flexible limits=4")" \
    "| throughput ours/peer=$(ratio RATE "ours limiter batching=on" "$peer")" \
    "| four/one limits (no usage)=$(ratio RATE "ours layer limits=4 no usage" "ours layer limits=1 no usage")"
}

echo; echo "# Redis: 64 in flight, 100 identifiers, ${SECS}s per run, $ROUNDS rounds, runs alternated"
for round in $(seq "$ROUNDS"); do
  echo "## round $round"
  measure "ours limiter batching=on" $LOADGEN --redis "$URL" --duration "$SECS"
  measure "rate-limiter-flexible consume" node benchmarks/peers/peers.mjs "$PORT" 64 "$SECS" 100
  measure "ours limiter batching=off" $LOADGEN --redis "$URL" --duration "$SECS" --batching off
  measure "ours limiter threads=2" $LOADGEN --redis "$URL" --duration "$SECS" --threads 2
  for limits in 1 2 4; do
    measure "ours layer limits=$limits" $LOADGEN --redis "$URL" --duration "$SECS" --through layer --limits "$limits"
    if [ "$limits" != 1 ]; then
      measure "rate-limiter-flexible limits=$limits" node benchmarks/peers/peers.mjs "$PORT" 64 "$SECS" 100 "$limits"
    fi
  done
  measure "ours layer limits=2 batching=off" $LOADGEN --redis "$URL" --duration "$SECS" --through layer --limits 2 --batching off
  for limits in 1 4; do
    measure "ours layer limits=$limits no usage" $LOADGEN --redis "$URL" --duration "$SECS" --through layer --limits "$limits" --no-usage
  done
  ratios
done

echo; echo "# Four limits against one by calls in flight (through the layer, no usage, alternated)"
# Few in flight, the rate is bounded by round trips (one per call however many limits);
# many, by Redis's work per call, which grows with every limit's read, write and arithmetic.
for c in 1 4 16 64; do
  measure "ours layer limits=1 in_flight=$c" $LOADGEN --redis "$URL" --duration "$SECS" --through layer --limits 1 --no-usage --concurrency "$c"
  measure "ours layer limits=4 in_flight=$c" $LOADGEN --redis "$URL" --duration "$SECS" --through layer --limits 4 --no-usage --concurrency "$c"
  echo "ratio four/one in_flight=$c: $(ratio RATE "ours layer limits=4 in_flight=$c" "ours layer limits=1 in_flight=$c")"
done

echo; echo "# memory store, ${SECS}s"
for limits in 1 4; do
  echo "ours/memory/layer limits=$limits: $($LOADGEN --duration "$SECS" --through layer --limits $limits | tail -1)"
done

echo; echo "# Redis memory per identifier and limit (MEMORY USAGE, 100 keys sampled)"
for pattern in 'loadgen-*:rpm:{*}' 'rlf-*-rpm:*'; do
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
