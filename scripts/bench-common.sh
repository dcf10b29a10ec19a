# Sourced by scripts/cpu-per-request.sh and scripts/heap-profile.sh: a free port, the benchmark's easel config
# (the `up` backend in front of examples/bench_upstream.rs, models `small` and `large`, optionally the queued
# `slow` backend), and waiting for easel to be ready. Everything binds 127.0.0.1.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# bench_config DIR UPSTREAM_PORT [SLOW_QUEUE_DEPTH]: writes DIR/easel.yaml (database and files inside DIR). With a
# depth, adds backend `slow` (2 at a time, that many queued) and model `slow` on the same upstream.
bench_config() {
  local dir=$1 up=$2 depth=${3:-}
  {
    echo "storage: {database: \"sqlite://$dir/easel.db\", files: \"$dir/files\"}"
    echo "backends:"
    echo "  up: {kind: openai, url: \"http://127.0.0.1:$up\", timeout: 30s, concurrency: {images: 256}, queue: {depth: 1024, wait: 30s}}"
    [ -z "$depth" ] || echo "  slow: {kind: openai, url: \"http://127.0.0.1:$up\", timeout: 120s, concurrency: {images: 2}, queue: {depth: $depth, wait: 120s}}"
    echo "models:"
    echo "  - {id: small, backends: [up]}"
    echo "  - {id: large, backends: [up]}"
    [ -z "$depth" ] || echo "  - {id: slow, backends: [slow]}"
  } >"$dir/easel.yaml"
}

# wait_ready PORT LOG: until easel answers /readyz (20 s at most); else says so with easel's log and fails.
wait_ready() {
  for _ in $(seq 400); do
    curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "easel did not become ready on 127.0.0.1:$1 within 20 s; its log ($2):" >&2
  cat "$2" >&2
  return 1
}
