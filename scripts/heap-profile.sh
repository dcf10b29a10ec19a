#!/usr/bin/env bash
# Where easel's heap goes at its peak, for the two memory figures of scripts/bench.sh that are bounded by code
# easel does not own: large base64 answers at c=16 ("peak RSS per in-flight large request") and 1,000 clients
# waiting in an admission queue ("memory per waiter").
#
#   scripts/heap-profile.sh BUILD_DIR large|waiters [N]
#
# BUILD_DIR holds `easel` and `examples/{bench_upstream,loadgen,waiters}` (target/release after
# `cargo build --release --bin easel --example bench_upstream --example loadgen --example waiters`; EASEL_BIN names
# another easel binary, e.g. target/dist/easel, the shipped build). N is the
# concurrency (large, default 16) or the number of waiters (default 1000). easel runs under heaptrack (Debian's
# `heaptrack` package); the script prints the heap at its peak grouped by the code that allocated it (the first
# frame of each backtrace that is not the allocator, `bytes` or `RawVec`), per request or waiter. Everything binds
# 127.0.0.1 and stops by itself.
set -euo pipefail
REL=${1:?usage: $0 BUILD_DIR large|waiters [N]}
CASE=${2:?usage: $0 BUILD_DIR large|waiters [N]}
EASEL_BIN=${EASEL_BIN:-$REL/easel}
case "$CASE" in
  large) N=${3:-16} ;;
  waiters) N=${3:-1000} ;;
  *) echo "the case is large or waiters, not $CASE" >&2; exit 2 ;;
esac
command -v heaptrack >/dev/null || { echo "heaptrack is not installed (apt-get install heaptrack)" >&2; exit 1; }
W=$(mktemp -d); UPID=; EPID=
trap 'kill $EPID $UPID 2>/dev/null || true; rm -rf "$W"' EXIT
. "$(dirname "$0")/bench-common.sh"
UP=$(free_port); GW=$(free_port)
SLOW_MS=1000 "$REL/examples/bench_upstream" "127.0.0.1:$UP" >"$W/upstream.log" 2>&1 & UPID=$!
bench_config "$W" "$UP" "$N"
EASEL_LOG=warn heaptrack -o "$W/heap" "$EASEL_BIN" serve --config "$W/easel.yaml" --listen "127.0.0.1:$GW" \
  >"$W/easel.log" 2>&1 &
HPID=$!
wait_ready "$GW" "$W/easel.log"
EPID=$(pgrep -f "^$EASEL_BIN serve .*127.0.0.1:$GW" | head -1)
URL="http://127.0.0.1:$GW/v1/images/generations"
if [ "$CASE" = large ]; then
  "$REL/examples/loadgen" "$URL" '{"model":"large","prompt":"bench","response_format":"b64_json"}' "$N" 3 1 >&2
else
  "$REL/examples/waiters" "$URL" '{"model":"slow","prompt":"bench","response_format":"b64_json"}' "$((N + 2))" "$EPID" >&2
fi
kill -INT "$EPID"; wait "$HPID" || true; EPID=
heaptrack_print -f "$W"/heap.*zst --print-peaks 1 --print-allocators 0 --print-temporary 0 --print-leaks 0 \
  --peak-limit 40 --sub-peak-limit 8 >"$W/peaks.txt" 2>/dev/null
python3 - "$W/peaks.txt" "$N" "$CASE" <<'PY'
import re, sys
from collections import defaultdict
lines = open(sys.argv[1], errors="replace").read().splitlines()
n, case = int(sys.argv[2]), sys.argv[3]
unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
size = lambda s: float(s[:-1]) * unit[s[-1]] if s[-1] in unit else float(s)
def clean(sym):
    sym = re.sub(r"::h[0-9a-f]{16}$", "", sym)
    for a, b in (("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$C$", ","), ("$u7b$", "{"), ("$u7d$", "}"), ("$LP$", "("), ("$RP$", ")"), ("..", "::")):
        sym = sym.replace(a, b)
    return sym.lstrip("_")[:110]
skip = re.compile(r"^(0x|alloc::|bytes::|rust|RNv|core::ptr|<alloc::|<bytes::|std::|malloc|realloc|operator new)")
owners, total, peak, top = defaultdict(lambda: [0.0, 0]), 0.0, "", ""
i = 0
while i < len(lines):
    if re.match(r"^[\d.]+[KMG]? peak memory consumed over", lines[i]) and i + 1 < len(lines):
        top = lines[i + 1].strip()
    m = re.match(r"^\s*([\d.]+[KMG]?) consumed over (\d+) calls from:", lines[i])
    if m:
        frames, j = [top], i + 1
        while j < len(lines) and lines[j].startswith("    "):
            t = lines[j].strip()
            if not t.startswith(("in ", "at ")):
                frames.append(t)
            j += 1
        owner = next((clean(f) for f in frames if not skip.match(clean(f))), clean(frames[0]) if frames else "?")
        owners[owner][0] += size(m.group(1)); owners[owner][1] += int(m.group(2)); total += size(m.group(1))
        i = j
        continue
    m = re.match(r"^peak heap memory consumption: (.*)$", lines[i])
    if m:
        peak = m.group(1)
    i += 1
per = "in-flight request" if case == "large" else "waiter"
print(f"heap at its peak: {peak} ({case}, n={n}); by the code that allocated it, per {per}:")
for owner, (b, calls) in sorted(owners.items(), key=lambda kv: -kv[1][0])[:14]:
    print(f"  {b / n / 1024:9.1f} KB  {b / (1 << 20):7.2f} MB  {calls:7d} calls  {owner}")
print(f"  {total / n / 1024:9.1f} KB  {total / (1 << 20):7.2f} MB  (the sum of the sites heaptrack listed)")
PY
