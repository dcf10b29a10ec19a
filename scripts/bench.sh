#!/usr/bin/env bash
# Gateway overhead benchmark: the same closed-loop load sent straight to a minimal OpenAI-compatible upstream and
# through easel in front of it, at concurrency 1, 16 and 64, for a small answer (one ~100-byte image) and a large
# one (~1.5 MB of base64). Prints a Markdown table and writes benches/RESULTS.md. Everything runs on 127.0.0.1 and
# stops by itself (BENCH_SECONDS per cell, default 5). The load generator, the upstream and easel share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/easel-target}"
SECONDS_PER_CELL="${BENCH_SECONDS:-5}"
cargo build --release --locked --bin easel --example bench_upstream --example loadgen
REL="$CARGO_TARGET_DIR/release"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port)
"$REL/examples/bench_upstream" "127.0.0.1:$UP_PORT" > "$WORK/upstream.log" 2>&1 &
PIDS+=($!)
cat > "$WORK/easel.yaml" <<YAML
storage: {database: "sqlite://$WORK/easel.db", files: "$WORK/files"}
backends:
  up: {kind: openai, url: "http://127.0.0.1:$UP_PORT", timeout: 30s, concurrency: {images: 256}, queue: {depth: 1024, wait: 30s}}
models:
  - {id: small, backends: [up]}
  - {id: large, backends: [up]}
YAML
GW_PORT=$(free_port)
EASEL_LOG=warn "$REL/easel" serve --config "$WORK/easel.yaml" --listen "127.0.0.1:$GW_PORT" > "$WORK/easel.log" 2>&1 &
EASEL_PID=$!
PIDS+=($EASEL_PID)
for _ in $(seq 1 200); do
  curl -sf "http://127.0.0.1:$GW_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.05
done
curl -sf "http://127.0.0.1:$GW_PORT/readyz" >/dev/null || { echo "easel did not become ready"; cat "$WORK/easel.log"; exit 1; }

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$EASEL_PID/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$EASEL_PID/status"; }
reset_hwm() { echo 5 > "/proc/$EASEL_PID/clear_refs" 2>/dev/null || true; }
IDLE_RSS=$(rss_kb)

body() { printf '{"model":"%s","prompt":"bench","response_format":"b64_json"}' "$1"; }
RESULTS="$WORK/results.jsonl"
for case in small large; do
  for c in 1 16 64; do
    direct=$("$REL/examples/loadgen" "http://127.0.0.1:$UP_PORT/v1/images/generations" "$(body $case)" "$c" "$SECONDS_PER_CELL" 1)
    reset_hwm
    gateway=$("$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/images/generations" "$(body $case)" "$c" "$SECONDS_PER_CELL" 1)
    echo "{\"case\":\"$case\",\"c\":$c,\"direct\":$direct,\"gateway\":$gateway,\"peak_rss_kb\":$(hwm_kb)}" >> "$RESULTS"
    echo "$case c=$c direct=$direct gateway=$gateway" >&2
  done
done

# RSS must follow in-flight work, not the number served: N then 10N more small requests at c=1.
"$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/images/generations" "$(body small)" 1 1 0 > /dev/null
RSS_N=$(rss_kb)
"$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/images/generations" "$(body small)" 1 10 0 > "$WORK/more.json"
RSS_10N=$(rss_kb)

python3 - "$RESULTS" "$IDLE_RSS" "$RSS_N" "$RSS_10N" "$WORK/more.json" "$SECONDS_PER_CELL" > benches/RESULTS.md <<'PY'
import json, sys, datetime, os
rows = [json.loads(l) for l in open(sys.argv[1])]
idle, rss_n, rss_10n = (int(x) for x in sys.argv[2:5])
more = json.load(open(sys.argv[5]))
secs = sys.argv[6]
out = []
p = out.append
p(f"# Gateway overhead benchmark\n")
p(f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores (load generator, upstream and easel share them), "
  f"{secs} s per cell after 1 s warm-up, release build, `scripts/bench.sh`.\n")
p("| case | c | direct req/s | easel req/s | ratio | direct p50/p99 ms | easel p50/p99 ms | added p50/p99 ms | easel peak RSS MB |")
p("|---|---|---|---|---|---|---|---|---|")
verdicts = []
for r in rows:
    d, g = r["direct"], r["gateway"]
    ratio = g["rps"] / d["rps"] if d["rps"] else 0
    add50, add99 = g["p50_ms"] - d["p50_ms"], g["p99_ms"] - d["p99_ms"]
    p(f"| {r['case']} | {r['c']} | {d['rps']:.0f} | {g['rps']:.0f} | {ratio:.0%} | {d['p50_ms']:.3f} / {d['p99_ms']:.3f} | {g['p50_ms']:.3f} / {g['p99_ms']:.3f} | {add50:.3f} / {add99:.3f} | {r['peak_rss_kb']/1024:.1f} |")
    if r["case"] == "small" and r["c"] == 64:
        verdicts.append(("small, c=64: ≥ 35% of direct throughput", f"{ratio:.0%}", ratio >= 0.35))
    if r["case"] == "small" and r["c"] == 1:
        verdicts.append(("c=1: < 0.15 ms added at p50", f"{add50:.3f} ms", add50 < 0.15))
        verdicts.append(("c=1: < 1 ms added at p99", f"{add99:.3f} ms", add99 < 1.0))
    if r["case"] == "large" and r["c"] == 16:
        verdicts.append(("large, c=16: ≥ 40% of direct throughput", f"{ratio:.0%}", ratio >= 0.40))
        per_req = (r["peak_rss_kb"] - idle) / 1024 / 16
        verdicts.append(("large, c=16: ≤ 2 payload copies per request (1.5 MB each)", f"{per_req:.1f} MB per in-flight request ≈ {per_req/1.5:.1f} copies", per_req / 1.5 <= 2.0))
    errs = d["errors"] + g["errors"]
    if errs:
        p(f"|  | errors: {errs} |  |  |  |  |  |  |  |")
verdicts.append(("idle RSS < 30 MB", f"{idle/1024:.1f} MB", idle < 30 * 1024))
growth = (rss_10n - rss_n) / 1024
verdicts.append((f"RSS flat with requests served (after N, then {more['requests']} more)", f"{rss_n/1024:.1f} → {rss_10n/1024:.1f} MB", growth < 5))
p("\n| target | measured | |")
p("|---|---|---|")
for name, got, ok in verdicts:
    p(f"| {name} | {got} | {'PASS' if ok else 'MISS'} |")
print("\n".join(out))
PY
cat benches/RESULTS.md
