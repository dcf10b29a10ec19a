#!/usr/bin/env bash
# Gateway overhead benchmark: the same closed-loop load sent straight to a minimal OpenAI-compatible upstream and
# through easel in front of it, at concurrency 1, 16 and 64, for a small answer (one ~100-byte image) and a large
# one (~1.5 MB of base64). Prints a Markdown table and writes benches/RESULTS.md. Everything runs on 127.0.0.1 and
# stops by itself (BENCH_SECONDS per cell, default 5). The load generator, the upstream and easel share the cores.
#
# Then the streaming benchmark against one fake SSE chat upstream (examples/sse_upstream.rs), measured the same way
# three ways — direct, through easel, through LiteLLM proxy (installed into ~/.cache/litellm-venv when missing;
# skipped, and said so, when it cannot be installed or started, or with BENCH_LITELLM=0): time to first token p50/p99 over
# BENCH_TTFT_REQUESTS sequential streams (default 300), and SSE relay throughput (chunks/s) over
# BENCH_STREAMS streams (default 16) of BENCH_CHUNKS chunks (default 5000), 4 at a time (examples/sse_bench.rs).
# BENCH_ONLY=stream runs only this part; its table is appended to benches/RESULTS.md.
#
# Also measured, each against its own limit in the same run: URL mode at c=16 (easel stores the image and answers a
# URL; direct is the upstream's b64 answer), a 10 MB multipart edit upload, 1,000 clients waiting in the admission
# queue of a slow backend (RSS per waiter; Retry-After of the 429s against when the queue next admits;
# examples/waiters.rs), a 100 MB stored video through GET /v1/files/{id} against nginx serving the same file,
# idle RSS, RSS after 10x more requests, job progress events against polling the job, and a second easel sharing admission through Redis (cluster.redis) against
# the in-process one. Needs python3, curl, /usr/sbin/nginx and redis-server; a part whose tool is missing says so.
set -euo pipefail
ulimit -n 65536 2>/dev/null || ulimit -n 4096 2>/dev/null || true
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/easel-target}"
SECONDS_PER_CELL="${BENCH_SECONDS:-5}"
# easel as it ships (the `dist` profile: fat LTO, one codegen unit); the load tools in the plain release profile.
cargo build --profile dist --locked ${BENCH_FEATURES:+--features "$BENCH_FEATURES"} --bin easel
cargo build --release --locked --example bench_upstream --example loadgen --example sse_upstream --example sse_bench --example waiters --example job_events
REL="$CARGO_TARGET_DIR/release"
EASEL_BIN="$CARGO_TARGET_DIR/dist/easel"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

. scripts/bench-common.sh # free_port, wait_ready
UP_PORT=$(free_port)
SLOW_MS="${BENCH_SLOW_MS:-1000}" "$REL/examples/bench_upstream" "127.0.0.1:$UP_PORT" > "$WORK/upstream.log" 2>&1 &
PIDS+=($!)
SSE_PORT=$(free_port)
"$REL/examples/sse_upstream" "127.0.0.1:$SSE_PORT" > "$WORK/sse_upstream.log" 2>&1 &
PIDS+=($!)
cat > "$WORK/easel.yaml" <<YAML
storage: {database: "sqlite://$WORK/easel.db", files: "$WORK/files"}
backends:
  up: {kind: openai, url: "http://127.0.0.1:$UP_PORT", timeout: 30s, concurrency: {images: 256}, queue: {depth: 1024, wait: 30s}}
  slow: {kind: openai, url: "http://127.0.0.1:$UP_PORT", timeout: 120s, concurrency: {images: 2}, queue: {depth: ${BENCH_WAITERS:-1000}, wait: 120s}}
  sim: {kind: simulated, latency: 2s, poll_interval: 20ms}
  sse: {kind: openai, url: "http://127.0.0.1:$SSE_PORT/v1", timeout: 30s, concurrency: {text: 256}, queue: {depth: 1024, wait: 30s}}
models:
  - {id: small, backends: [up]}
  - {id: large, backends: [up]}
  - {id: slow, backends: [slow]}
  - {id: clip, type: video, backends: [sim], default_size: 64x36}
  - {id: chat, type: text, backends: [sse], upstream_model: up-llm}
YAML
GW_PORT=$(free_port)
EASEL_LOG=warn "$EASEL_BIN" serve --config "$WORK/easel.yaml" --listen "127.0.0.1:$GW_PORT" > "$WORK/easel.log" 2>&1 &
EASEL_PID=$!
PIDS+=($EASEL_PID)
wait_ready "$GW_PORT" "$WORK/easel.log"
sleep 1 # let startup allocations settle before reading idle RSS

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/${1:-$EASEL_PID}/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/${1:-$EASEL_PID}/status"; }
reset_hwm() { echo 5 > "/proc/${1:-$EASEL_PID}/clear_refs" 2>/dev/null || true; }
IDLE_RSS=$(rss_kb); RSS_N=""; RSS_10N=""; RESULTS="$WORK/results.jsonl"

EXTRA="$WORK/extra.json"
echo '{}' > "$EXTRA"
put() { python3 - "$EXTRA" "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); d[sys.argv[2]] = json.loads(sys.argv[3]); json.dump(d, open(sys.argv[1], "w"))
PY
}
if [[ "${BENCH_ONLY:-}" != stream ]]; then
body() { printf '{"model":"%s","prompt":"bench","response_format":"%s"}' "$1" "${2:-b64_json}"; }
RESULTS="$WORK/results.jsonl"
# 1,000 clients waiting in the admission queue of a slow backend (2 slots, SLOW_MS per request), plus the 2 it runs.
# First, while easel's RSS is still its idle figure: after the large answers the allocator keeps their memory.
w=$("$REL/examples/waiters" "http://127.0.0.1:$GW_PORT/v1/images/generations" "$(body slow)" "$((${BENCH_WAITERS:-1000} + 2))" "$EASEL_PID") \
  && put waiters "$w" || echo "waiters benchmark failed" >&2
echo "waiters $w" >&2
# The dropped waiters leave the queue; wait (with a deadline) for easel to forget them before the next parts.
for _ in $(seq 1 100); do curl -s -o /dev/null -w '%{http_code}' -m 0.3 "http://127.0.0.1:$GW_PORT/v1/images/generations" -H 'content-type: application/json' -d "$(body small)" | grep -q 200 && break; sleep 0.1; done

for case in small large; do
  for c in 1 16 64; do
    direct=$("$REL/examples/loadgen" "http://127.0.0.1:$UP_PORT/v1/images/generations" "$(body $case)" "$c" "$SECONDS_PER_CELL" 1)
    reset_hwm
    gateway=$("$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/images/generations" "$(body $case)" "$c" "$SECONDS_PER_CELL" 1)
    echo "{\"case\":\"$case\",\"c\":$c,\"direct\":$direct,\"gateway\":$gateway,\"peak_rss_kb\":$(hwm_kb)}" >> "$RESULTS"
    echo "$case c=$c direct=$direct gateway=$gateway" >&2
  done
done

# Peak RSS per in-flight large request, on a fresh easel (nothing retained from the parts before): large b64
# answers at c=16, (peak RSS - idle RSS) / 16 against the payload's size.
mkdir -p "$WORK/peak-instance"
sed -e "s#$WORK/easel.db#$WORK/peak-instance/easel.db#" -e "s#$WORK/files#$WORK/peak-instance/files#" "$WORK/easel.yaml" > "$WORK/easel-peak.yaml"
PK_PORT=$(free_port)
EASEL_LOG=warn "$EASEL_BIN" serve --config "$WORK/easel-peak.yaml" --listen "127.0.0.1:$PK_PORT" > "$WORK/easel-peak.log" 2>&1 &
PK_PID=$!
PIDS+=($PK_PID)
wait_ready "$PK_PORT" "$WORK/easel-peak.log"
sleep 1
pk_idle=$(rss_kb "$PK_PID"); reset_hwm "$PK_PID"
pk=$("$REL/examples/loadgen" "http://127.0.0.1:$PK_PORT/v1/images/generations" "$(body large)" 16 "$SECONDS_PER_CELL" 1)
put peak "{\"idle_kb\":$pk_idle,\"hwm_kb\":$(hwm_kb "$PK_PID"),\"c\":16,\"run\":$pk}"
kill "$PK_PID" 2>/dev/null || true

# URL mode: easel writes the image to its files dir and answers a URL; direct is the upstream's own b64 answer.
for case in small large; do
  d=$("$REL/examples/loadgen" "http://127.0.0.1:$UP_PORT/v1/images/generations" "$(body $case)" 16 "$SECONDS_PER_CELL" 1)
  g=$("$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/images/generations" "$(body $case url)" 16 "$SECONDS_PER_CELL" 1)
  put "url_$case" "{\"direct\":$d,\"gateway\":$g}"; echo "url $case direct=$d gateway=$g" >&2
done
find "$WORK/files" -name 'img_*' -delete 2>/dev/null || true

# A 10 MB multipart edit upload (a valid PNG of incompressible pixels), c=4.
python3 - "$WORK/edit.body" <<'PY'
import os, struct, sys, zlib
w, h = 1830, 1830
raw = b"".join(b"\0" + os.urandom(w * 3) for _ in range(h))
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b"")
b = b"benchboundary"
parts = [b"--" + b + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nsmall\r\n',
         b"--" + b + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nbench\r\n',
         b"--" + b + b'\r\nContent-Disposition: form-data; name="response_format"\r\n\r\nb64_json\r\n',
         b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\nContent-Type: image/png\r\n\r\n' + png + b"\r\n",
         b"--" + b + b"--\r\n"]
open(sys.argv[1], "wb").write(b"".join(parts))
PY
EDIT_MB=$(python3 -c "import os,sys; print(round(os.path.getsize(sys.argv[1])/1e6,1))" "$WORK/edit.body")
export LOADGEN_CONTENT_TYPE="multipart/form-data; boundary=benchboundary"
d=$("$REL/examples/loadgen" "http://127.0.0.1:$UP_PORT/v1/images/edits" "@$WORK/edit.body" 4 "$SECONDS_PER_CELL" 1)
g=$("$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/images/edits" "@$WORK/edit.body" 4 "$SECONDS_PER_CELL" 1)
unset LOADGEN_CONTENT_TYPE
put edit "{\"mb\":$EDIT_MB,\"direct\":$d,\"gateway\":$g}"; echo "edit direct=$d gateway=$g" >&2

# A 100 MB stored video through GET /v1/files/{id}, against nginx serving the same file; c=4.
VID="vid_$(python3 -c 'import secrets; print(secrets.token_hex(16))').mp4"
mkdir -p "$WORK/files"
head -c 104857600 /dev/urandom > "$WORK/files/$VID"
# nginx's workers drop root for `nobody`: the mktemp folder (mode 700) must let them read the file.
chmod 755 "$WORK" "$WORK/files"; chmod 644 "$WORK/files/$VID"
if [[ -x /usr/sbin/nginx ]]; then
  NG_PORT=$(free_port)
  mkdir -p "$WORK/nginx"
  cat > "$WORK/nginx/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 256; }
http {
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx; fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  server { listen 127.0.0.1:$NG_PORT; location / { root $WORK/files; } }
}
NGINX
  /usr/sbin/nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' > "$WORK/nginx/out.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$NG_PORT/$VID" -r 0-0 && break; sleep 0.05; done
  d=$("$REL/examples/loadgen" "http://127.0.0.1:$NG_PORT/$VID" GET 4 "$SECONDS_PER_CELL" 1)
  g=$("$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/files/$VID" GET 4 "$SECONDS_PER_CELL" 1)
  put download "{\"direct\":$d,\"gateway\":$g}"; echo "download nginx=$d easel=$g" >&2
else
  echo "nginx missing: file download not measured" >&2
fi
rm -f "$WORK/files/$VID"

# RSS must follow in-flight work, not the number served: N then 10N more small requests at c=1.
"$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/images/generations" "$(body small)" 1 "$SECONDS_PER_CELL" 0 > "$WORK/first.json"
RSS_N=$(rss_kb)
"$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/images/generations" "$(body small)" 1 "$((SECONDS_PER_CELL * 10))" 0 > "$WORK/more.json"
RSS_10N=$(rss_kb)

# Shared state: a second easel whose admission lives in Redis, against the in-process one, small at c=16.
if command -v redis-server >/dev/null; then
  RD_PORT=$(free_port)
  redis-server --port "$RD_PORT" --bind 127.0.0.1 --save '' --appendonly no > "$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do redis-cli -p "$RD_PORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.05; done
  mkdir -p "$WORK/redis-instance"
  sed -e "s#$WORK/easel.db#$WORK/redis-instance/easel.db#" -e "s#$WORK/files#$WORK/redis-instance/files#" "$WORK/easel.yaml" > "$WORK/easel-redis.yaml"
  echo "cluster: {redis: \"redis://127.0.0.1:$RD_PORT/0\"}" >> "$WORK/easel-redis.yaml"
  RG_PORT=$(free_port)
  EASEL_LOG=warn "$EASEL_BIN" serve --config "$WORK/easel-redis.yaml" --listen "127.0.0.1:$RG_PORT" > "$WORK/easel-redis.log" 2>&1 &
  PIDS+=($!)
  wait_ready "$RG_PORT" "$WORK/easel-redis.log"
  d=$("$REL/examples/loadgen" "http://127.0.0.1:$UP_PORT/v1/images/generations" "$(body small)" 16 "$SECONDS_PER_CELL" 1)
  l=$("$REL/examples/loadgen" "http://127.0.0.1:$GW_PORT/v1/images/generations" "$(body small)" 16 "$SECONDS_PER_CELL" 1)
  r=$("$REL/examples/loadgen" "http://127.0.0.1:$RG_PORT/v1/images/generations" "$(body small)" 16 "$SECONDS_PER_CELL" 1)
  put redis "{\"direct\":$d,\"local\":$l,\"redis\":$r}"; echo "redis direct=$d local=$l redis=$r" >&2
else
  echo "redis-server missing: shared-state admission not measured" >&2
fi

fi

# --- Streaming: time to first token and SSE relay throughput, direct / easel / LiteLLM. ---
TTFT_N="${BENCH_TTFT_REQUESTS:-300}"
STREAMS="${BENCH_STREAMS:-16}"
CHUNKS="${BENCH_CHUNKS:-5000}"
LL_VENV="${LITELLM_VENV:-$HOME/.cache/litellm-venv}"
LL_URL=""
if [[ "${BENCH_LITELLM:-1}" != 0 && ! -x "$LL_VENV/bin/litellm" ]]; then
  { python3 -m venv "$LL_VENV" && "$LL_VENV/bin/pip" install -q 'litellm[proxy]'; } > "$WORK/litellm-install.log" 2>&1 \
    || echo "LiteLLM could not be installed (see below); easel vs direct only" >&2
fi
if [[ "${BENCH_LITELLM:-1}" != 0 && -x "$LL_VENV/bin/litellm" ]]; then
  cat > "$WORK/litellm.yaml" <<YAML
model_list:
  - model_name: chat
    litellm_params: {model: openai/up-llm, api_base: "http://127.0.0.1:$SSE_PORT/v1", api_key: unused}
litellm_settings: {drop_params: true, set_verbose: false}
YAML
  LL_PORT=$(free_port)
  # No master key: like easel here, the proxy runs without client auth (127.0.0.1 only, stopped at the end).
  LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true LITELLM_LOG=ERROR "$LL_VENV/bin/litellm" --config "$WORK/litellm.yaml" --host 127.0.0.1 --port "$LL_PORT" \
    > "$WORK/litellm.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 1200); do
    curl -sf "http://127.0.0.1:$LL_PORT/health/liveliness" >/dev/null 2>&1 && { LL_URL="http://127.0.0.1:$LL_PORT"; break; }
    sleep 0.1
  done
  [[ -n "$LL_URL" ]] || { echo "LiteLLM proxy did not start; easel vs direct only:" >&2; tail -5 "$WORK/litellm.log" >&2; }
fi
STREAM_RESULTS="$WORK/stream.jsonl"
measure() { # NAME URL MODEL
  local ttft tput
  ttft=$("$REL/examples/sse_bench" "$2/v1/chat/completions" "$3" ttft "$TTFT_N")
  tput=$("$REL/examples/sse_bench" "$2/v1/chat/completions" "$3" throughput "$STREAMS" "$CHUNKS" 4)
  echo "{\"via\":\"$1\",\"ttft\":$ttft,\"tput\":$tput}" >> "$STREAM_RESULTS"
  echo "stream $1 ttft=$ttft throughput=$tput" >&2
}
measure direct "http://127.0.0.1:$SSE_PORT" up-llm
measure easel "http://127.0.0.1:$GW_PORT" chat
[[ -n "$LL_URL" ]] && measure litellm "$LL_URL" chat

put stream "$(python3 -c 'import json,sys; print(json.dumps({json.loads(l)["via"]: json.loads(l) for l in open(sys.argv[1])}))' "$STREAM_RESULTS")"
put stream_args "{\"ttft_n\":$TTFT_N,\"streams\":$STREAMS,\"chunks\":$CHUNKS,\"litellm\":\"${LL_URL:+yes}\"}"

# --- Job events: simulated video jobs watched through GET /v1/jobs/{id}/events, against polling the same job. ---
je=$("$REL/examples/job_events" "http://127.0.0.1:$GW_PORT" clip "${BENCH_JOBS:-16}") && put job_events "$je" \
  || echo "job events benchmark failed" >&2
echo "job events $je" >&2

# --- One report for every part measured. ---
python3 - "$RESULTS" "$IDLE_RSS" "$RSS_N" "$RSS_10N" "$WORK/first.json" "$WORK/more.json" "$SECONDS_PER_CELL" "$EXTRA" > benches/RESULTS.md <<'PY'
import json, sys, datetime, os
rows = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
idle, rss_n, rss_10n = (int(x or 0) for x in sys.argv[2:5])
first, more = (json.load(open(f)) if os.path.exists(f) else None for f in sys.argv[5:7])
secs = sys.argv[7]
x = json.load(open(sys.argv[8]))
out = []
p = out.append
# The command that reproduces this run: every BENCH_* setting it had, with the cell length always shown.
knobs = {k: v for k, v in os.environ.items() if k.startswith("BENCH_")} | {"BENCH_SECONDS": secs}
command = " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) + " scripts/bench.sh"
p("# Gateway benchmark\n")
p(f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores (load generator, upstream and easel share them), "
  f"{secs} s per cell after 1 s warm-up, `dist` build (fat LTO), command: `{command}`. "
  "Each figure is a ratio to its limit measured in the same run; on shared cores the figures are noisy.\n")
p("| figure | direct / limit | easel | ratio or added | target | |")
p("|---|---|---|---|---|---|")
def row(name, d, g, rel, target, ok):
    p(f"| {name} | {d} | {g} | {rel} | {target} | {'' if ok is None else ('PASS' if ok else 'MISS')} |")
def rps(r): return f"{r['rps']:.0f} req/s, p50 {r['p50_ms']:.3f} ms" + (f", {r['errors']} errors" if r['errors'] else "")
PAYLOAD_MB = 1.5
for r in rows:
    d, g = r["direct"], r["gateway"]
    ratio = g["rps"] / d["rps"] if d["rps"] else 0
    add50 = g["p50_ms"] - d["p50_ms"]
    target, ok = "", None
    if r["case"] == "small" and r["c"] == 64: target, ok = "≥ 40% of direct", ratio >= 0.40
    if r["case"] == "large" and r["c"] == 16: target, ok = "≥ 45% of direct", ratio >= 0.45
    row(f"b64 {r['case']}, c={r['c']}", rps(d), rps(g), f"{ratio:.1%}, +{add50:.3f} ms p50", target, ok)
    if r["case"] == "small" and r["c"] == 1:
        row("c=1 added p50 (small)", f"{d['p50_ms']:.3f} ms", f"{g['p50_ms']:.3f} ms", f"+{add50:.3f} ms", "< 0.10 ms", add50 < 0.10)
    if r["case"] == "large" and r["c"] == 16 and x.get("peak"):
        pk = x["peak"]
        per_req = (pk["hwm_kb"] - pk["idle_kb"]) / 1024 / pk["c"]
        row(f"peak RSS per in-flight large request (fresh easel, c={pk['c']})", f"payload {PAYLOAD_MB} MB b64", f"{pk['idle_kb']/1024:.1f} MB idle, {pk['hwm_kb']/1024:.1f} MB peak", f"{per_req:.2f} MB = {per_req/PAYLOAD_MB:.2f}× payload", "≤ 1.2× payload", per_req / PAYLOAD_MB <= 1.2)
for case in ("small", "large"):
    u = x.get(f"url_{case}")
    if u:
        d, g = u["direct"], u["gateway"]
        row(f"URL mode {case}, c=16 (direct = b64)", rps(d), rps(g), f"{g['rps']/d['rps']:.0%}, +{g['p50_ms']-d['p50_ms']:.3f} ms p50", "", None)
e = x.get("edit")
if e:
    d, g = e["direct"], e["gateway"]
    row(f"{e['mb']} MB multipart edit upload, c=4", rps(d) + f", {d['rps']*e['mb']:.0f} MB/s", rps(g) + f", {g['rps']*e['mb']:.0f} MB/s", f"{g['rps']/d['rps']:.0%}, +{g['p50_ms']-d['p50_ms']:.2f} ms p50", "", None)
w = x.get("waiters")
if w:
    added = (w["rss_waiting_kb"] - w["rss_before_kb"]) / 1024
    row(f"{w['waiting']} clients waiting in an admission queue", f"{w['rss_before_kb']/1024:.1f} MB before", f"{w['rss_waiting_kb']/1024:.1f} MB waiting", f"+{added:.1f} MB, {added*1024*1024/max(w['waiting'],1)/1024:.1f} KB per waiter", "< 20 MB added", added < 20)
    row("Retry-After of a 429 from the full queue", f"next admission after {w['admitted_after_s']:.2f} s", f"Retry-After: {w['retry_after_s']:g} s", f"{w['retry_after_s'] - w['admitted_after_s']:+.2f} s", "advertised ≈ actual", None)
dl = x.get("download")
if dl:
    d, g = dl["direct"], dl["gateway"]
    ratio = g["bytes_per_s"] / d["bytes_per_s"] if d["bytes_per_s"] else 0
    row("100 MB video via GET /v1/files/{id}, c=4 (limit: nginx)", f"{d['bytes_per_s']/1e6:.0f} MB/s", f"{g['bytes_per_s']/1e6:.0f} MB/s", f"{ratio:.1%}", "≥ 80% of nginx", ratio >= 0.80)
rd = x.get("redis")
if rd:
    d, l, r = rd["direct"], rd["local"], rd["redis"]
    row("admission in Redis vs in process, small c=16", rps(l) + " (in process)", rps(r) + " (Redis)", f"{r['rps']/l['rps']:.0%} of in-process, +{r['p50_ms']-l['p50_ms']:.3f} ms p50 (direct {d['rps']:.0f} req/s)", "", None)
st, sa = x.get("stream"), x.get("stream_args")
if st:
    d = st["direct"]
    for via in ("easel", "litellm"):
        r = st.get(via)
        if not r:
            continue
        added = r["ttft"]["ttft_p50_ms"] - d["ttft"]["ttft_p50_ms"]
        ok = added < 1 if via == "easel" else None
        row(f"SSE text, TTFT p50 over {sa['ttft_n']} streams ({via})", f"{d['ttft']['ttft_p50_ms']:.3f} ms", f"{r['ttft']['ttft_p50_ms']:.3f} ms", f"+{added:.3f} ms", "< 1 ms added" if via == "easel" else "", ok)
        cps, dcps = r["tput"]["chunks_per_s"], d["tput"]["chunks_per_s"]
        t = r["tput"]
        notes = "".join(f", {t[k]} {k}" for k in ("errors", "short") if t.get(k))
        row(f"SSE text relay, {sa['streams']}×{sa['chunks']} chunks, 4 at a time ({via})", f"{dcps:.0f} chunks/s", f"{cps:.0f} chunks/s{notes}", f"{cps/dcps:.0%}" if dcps else "", "≥ 50,000 chunks/s" if via == "easel" else "", cps >= 50000 if via == "easel" else None)
    if sa["litellm"] != "yes":
        p("| SSE via LiteLLM | | not measured: skipped (BENCH_LITELLM=0) or could not be installed or started | | | |")
je = x.get("job_events")
if je:
    row(f"job events, GET /v1/jobs/{{id}}/events ({je['jobs']} jobs)", "", f"{je['events_per_s']:.0f} events/s", f"completed event {je['lag_p50_ms']:+.1f} ms p50 / {je['lag_max_ms']:+.1f} ms max vs a 5 ms poll seeing it", "", None)
if idle:
  row("idle RSS", "", f"{idle/1024:.1f} MB", "", "< 20 MB", idle < 20 * 1024)
if first:
  growth = (rss_10n - rss_n) / 1024
  row(f"RSS flat over a 10× longer run ({first['requests']} then {more['requests']} more requests)", f"{rss_n/1024:.1f} MB", f"{rss_10n/1024:.1f} MB", f"{growth:+.1f} MB", "< +5 MB", growth < 5)
print("\n".join(out))
PY
cat benches/RESULTS.md
