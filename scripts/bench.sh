#!/usr/bin/env bash
# Gateway overhead benchmark: the same closed-loop load sent straight to a minimal OpenAI-compatible upstream and
# through easel in front of it, at concurrency 1, 16 and 64, for a small answer (one ~100-byte image) and a large
# one (~1.5 MB of base64). Prints a Markdown table and writes benches/RESULTS.md. Everything runs on 127.0.0.1 and
# stops by itself (BENCH_SECONDS per cell, default 5). The load generator, the upstream and easel share the cores.
#
# Then the streaming benchmark against one fake SSE chat upstream (examples/sse_upstream.rs), measured the same way
# three ways — direct, through easel, through LiteLLM proxy (installed into ~/.cache/litellm-venv when missing;
# skipped, and said so, when it cannot be installed or started): time to first token p50/p99 over
# BENCH_TTFT_REQUESTS sequential streams (default 300), and SSE relay throughput (chunks/s) over
# BENCH_STREAMS streams (default 16) of BENCH_CHUNKS chunks (default 5000), 4 at a time (examples/sse_bench.rs).
# BENCH_ONLY=stream runs only this part; its table is appended to benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/easel-target}"
SECONDS_PER_CELL="${BENCH_SECONDS:-5}"
cargo build --release --locked --bin easel --example bench_upstream --example loadgen --example sse_upstream --example sse_bench
REL="$CARGO_TARGET_DIR/release"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port)
"$REL/examples/bench_upstream" "127.0.0.1:$UP_PORT" > "$WORK/upstream.log" 2>&1 &
PIDS+=($!)
SSE_PORT=$(free_port)
"$REL/examples/sse_upstream" "127.0.0.1:$SSE_PORT" > "$WORK/sse_upstream.log" 2>&1 &
PIDS+=($!)
cat > "$WORK/easel.yaml" <<YAML
storage: {database: "sqlite://$WORK/easel.db", files: "$WORK/files"}
backends:
  up: {kind: openai, url: "http://127.0.0.1:$UP_PORT", timeout: 30s, concurrency: {images: 256}, queue: {depth: 1024, wait: 30s}}
  sse: {kind: openai, url: "http://127.0.0.1:$SSE_PORT/v1", timeout: 30s, concurrency: {text: 256}, queue: {depth: 1024, wait: 30s}}
models:
  - {id: small, backends: [up]}
  - {id: large, backends: [up]}
  - {id: chat, type: text, backends: [sse], upstream_model: up-llm}
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

if [[ "${BENCH_ONLY:-}" != stream ]]; then
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
fi

# --- Streaming: time to first token and SSE relay throughput, direct / easel / LiteLLM. ---
TTFT_N="${BENCH_TTFT_REQUESTS:-300}"
STREAMS="${BENCH_STREAMS:-16}"
CHUNKS="${BENCH_CHUNKS:-5000}"
LL_VENV="${LITELLM_VENV:-$HOME/.cache/litellm-venv}"
LL_URL=""
if [[ ! -x "$LL_VENV/bin/litellm" ]]; then
  { python3 -m venv "$LL_VENV" && "$LL_VENV/bin/pip" install -q 'litellm[proxy]'; } > "$WORK/litellm-install.log" 2>&1 \
    || echo "LiteLLM could not be installed (see below); easel vs direct only" >&2
fi
if [[ -x "$LL_VENV/bin/litellm" ]]; then
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

python3 - "$STREAM_RESULTS" "$TTFT_N" "$STREAMS" "$CHUNKS" "${LL_URL:+yes}" >> benches/RESULTS.md <<'PY'
import json, sys, datetime, os
rows = {r["via"]: r for r in (json.loads(l) for l in open(sys.argv[1]))}
n, streams, chunks, litellm = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "yes"
d = rows["direct"]
out = [f"\n## Streaming (SSE chat completions)\n",
       f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, release build, "
       f"`BENCH_ONLY=stream scripts/bench.sh`: TTFT over {n} sequential 4-chunk streams; throughput over {streams} "
       f"streams of {chunks} chunks, 4 at a time; one fake upstream (`examples/sse_upstream.rs`)."
       + ("" if litellm else " LiteLLM proxy could not be installed or started: not measured.") + "\n",
       "| via | TTFT p50 / p99 ms | TTFT p50 vs direct | chunks/s | chunks/s vs direct | errors |",
       "|---|---|---|---|---|---|"]
for via in ("direct", "easel", "litellm"):
    r = rows.get(via)
    if not r:
        continue
    t, c = r["ttft"], r["tput"]
    added = t["ttft_p50_ms"] - d["ttft"]["ttft_p50_ms"]
    ratio_t = t["ttft_p50_ms"] / d["ttft"]["ttft_p50_ms"] if d["ttft"]["ttft_p50_ms"] else 0
    ratio_c = c["chunks_per_s"] / d["tput"]["chunks_per_s"] if d["tput"]["chunks_per_s"] else 0
    vs_t = "—" if via == "direct" else f"{ratio_t:.2f}× (+{added:.3f} ms)"
    vs_c = "—" if via == "direct" else f"{ratio_c:.0%}"
    out.append(f"| {via} | {t['ttft_p50_ms']:.3f} / {t['ttft_p99_ms']:.3f} | {vs_t} | {c['chunks_per_s']:.0f} | {vs_c} | {t['errors'] + c['errors']} |")
e = rows["easel"]
added = e["ttft"]["ttft_p50_ms"] - d["ttft"]["ttft_p50_ms"]
out += ["\n| target | measured | |", "|---|---|---|",
        f"| easel adds < 1 ms to TTFT p50 | {added:.3f} ms | {'PASS' if added < 1 else 'MISS'} |",
        f"| easel relays ≥ 50,000 SSE chunks/s | {e['tput']['chunks_per_s']:.0f} | {'PASS' if e['tput']['chunks_per_s'] >= 50000 else 'MISS'} |"]
print("\n".join(out))
PY
if [[ "${BENCH_ONLY:-}" == stream ]]; then sed -n '/^## Streaming/,$p' benches/RESULTS.md | tail -n +1; fi
