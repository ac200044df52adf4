#!/usr/bin/env bash
# Peak RSS (VmHWM) of llm-gateway holding N concurrent streamed chat calls (built-in mock
# upstream, in-memory store, 200 SSE chunks 10 ms apart, 200 API keys), unmetered (a
# request limit only: bodies pass through) and metered (request + token limit with output
# counted: every stream's usage is read). The difference per stream is what metering
# costs.
#
# Usage: benchmarks/stream_rss.sh [N...]   (default: 600 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || true
cargo build --release -q -p llm-gateway --bin llm-gateway --example stream_clients
GW=target/release/llm-gateway
CLIENTS=target/release/examples/stream_clients
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run() { # N MODE -> prints "N MODE peak_kib completed"
  local n=$1 mode=$2 p flags
  p=$(port)
  if [ "$mode" = unmetered ]; then flags=(--requests 100000000); else flags=(--requests 100000000 --tokens 100000000000 --include-output-tokens); fi
  RUST_LOG=error "$GW" --listen "127.0.0.1:$p" --window 1h "${flags[@]}" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.05; done
  local done_line
  done_line=$("$CLIENTS" "127.0.0.1:$p" "$n" 200 200 10 | tail -1)
  local hwm
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$n $mode $hwm $done_line"
}

echo "# llm-gateway peak RSS, $(nproc) cpus, rustc $(rustc --version | awk '{print $2}')"
for n in "${@:-600 5000}"; do
  read -r _ _ plain plain_done <<<"$(run "$n" unmetered)"
  read -r _ _ metered metered_done <<<"$(run "$n" metered)"
  per=$(( (metered - plain) * 1024 / n ))
  echo "N=$n unmetered=${plain}KiB ($plain_done) metered=${metered}KiB ($metered_done) metering=${per} bytes/stream"
done
