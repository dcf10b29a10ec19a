#!/usr/bin/env bash
# CPU per request of easel and of the upstream it proxies, for comparing two builds on the same machine minutes
# apart (the shared cores make absolute rates drift between runs; CPU per request drifts much less).
#
#   scripts/cpu-per-request.sh BUILD_DIR [MODEL] [CONCURRENCY] [SECONDS] [-- perf record options]
#
# BUILD_DIR holds `easel` and `examples/{bench_upstream,loadgen}` (e.g. target/release after
# `cargo build --release --bin easel --example bench_upstream --example loadgen`); EASEL_BIN names another easel
# binary, e.g. the shipped build, target/dist/easel after `cargo build --profile dist --bin easel`. MODEL is `small` (about
# 100 bytes of base64) or `large` (about 1.5 MB). With `-- <options>`, `perf record <options>` samples easel
# during the load and writes perf.data into the work directory. Everything binds 127.0.0.1 and stops by itself.
set -euo pipefail
REL=${1:?usage: $0 BUILD_DIR [MODEL] [CONCURRENCY] [SECONDS] [-- perf options]}
EASEL_BIN=${EASEL_BIN:-$REL/easel}; MODEL=${2:-small}; C=${3:-16}; S=${4:-4}
shift $(($# < 4 ? $# : 4))
[ "${1:-}" = "--" ] && shift
W=$(mktemp -d); EPID=; UPID=; PERF=
# The work directory goes too unless it holds perf data.
trap 'kill $EPID $UPID 2>/dev/null || true; [ -n "$PERF" ] || rm -rf "$W"' EXIT
. "$(dirname "$0")/bench-common.sh"
UP=$(free_port); GW=$(free_port)
"$REL/examples/bench_upstream" "127.0.0.1:$UP" >"$W/upstream.log" 2>&1 & UPID=$!
bench_config "$W" "$UP"
EASEL_LOG=warn "$EASEL_BIN" serve --config "$W/easel.yaml" --listen "127.0.0.1:$GW" >"$W/easel.log" 2>&1 & EPID=$!
wait_ready "$GW" "$W/easel.log"
URL="http://127.0.0.1:$GW/v1/images/generations"
BODY="{\"model\":\"$MODEL\",\"prompt\":\"bench\",\"response_format\":\"b64_json\"}"
"$REL/examples/loadgen" "$URL" "$BODY" "$C" 1 1 >/dev/null   # warm-up
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
e0=$(ticks $EPID); u0=$(ticks $UPID)
if [ $# -gt 0 ]; then perf record -o "$W/perf.data" "$@" -p $EPID -- sleep "$S" 2>"$W/perf.err" & PERF=$!; fi
RESULT=$("$REL/examples/loadgen" "$URL" "$BODY" "$C" "$S" 1)
[ -n "$PERF" ] && wait "$PERF"
e1=$(ticks $EPID); u1=$(ticks $UPID)
HZ=$(getconf CLK_TCK)
python3 - "$RESULT" $((e1 - e0)) $((u1 - u0)) "$HZ" "$MODEL" "$C" "$S" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); n = r["requests"]; hz = int(sys.argv[4])
us = lambda ticks: int(ticks) * 1e6 / hz / max(n, 1)
print(f"{sys.argv[5]} c={sys.argv[6]} {sys.argv[7]} s: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.3f} ms, errors {r['errors']}; "
      f"CPU per request: easel {us(sys.argv[2]):.0f} µs, upstream {us(sys.argv[3]):.0f} µs")
PY
[ -n "$PERF" ] && echo "perf data: $W/perf.data"
