# Sourced by the benchmarks that count the instructions Redis executes.
#
# callgrind_total COMMAND...: start a redis-server under valgrind's callgrind on a free
# loopback port, counting only inside evalShaCommand (deterministic, whatever else the
# machine is doing); run COMMAND (a program or a shell function) with REDIS_PORT set to
# that port; stop the server and print the instructions counted.
callgrind_total() {
  local port dir pid
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  dir=$(mktemp -d)
  valgrind --tool=callgrind --callgrind-out-file=/dev/null --toggle-collect=evalShaCommand \
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    >/dev/null 2>"$dir/vg.log" &
  pid=$!
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.2; done
  REDIS_PORT="$port" "$@"
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  wait "$pid" || true
  awk '/Collected/ { print $4 }' "$dir/vg.log"
  rm -rf "$dir"
}
