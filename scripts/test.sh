#!/usr/bin/env bash
# Runs every test: the Rust unit and end-to-end suites, then the OpenAI Python and Node SDK suites and the web page in
# headless Chromium against the built binary. The SDKs and playwright-core are installed outside the checkout (a venv
# and node_modules under ~/.cache), only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/easel-target}"

# Tools some tests run for real: `promtool check metrics` (observability), `systemd-analyze verify` (the
# deployment unit) and `redis-server` (fleet-wide admission). Installed from Debian's packages when missing; without them those tests fail.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# The fleet tests (tests/it/cluster.rs) start a real `redis-server` on a free port; they fail without it.
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The browser suite drives Debian's Chromium (playwright-core never downloads a browser of its own here).
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
# The PostgreSQL ledger tests (tests/it/postgres.rs) initdb and start a server of their own.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
# The several-instances tests (tests/it/fleet.rs) put easel instances behind a real nginx.
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
if ((${#missing[@]})) && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# An S3-compatible server for the S3 storage tests (tests/it/s3.rs): moto's server mode from PyPI, in its own venv
# outside the checkout. The tests find it through EASEL_MOTO and fail without it.
MOTO_VENV="${EASEL_MOTO_VENV:-$HOME/.cache/easel-moto}"
MOTO_SPEC='moto[server]==5.2.5'
if [[ "$(cat "$MOTO_VENV/.spec" 2>/dev/null)" != "$MOTO_SPEC" || ! -x "$MOTO_VENV/bin/python" ]]; then
  python3 -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install -q "$MOTO_SPEC"
  echo "$MOTO_SPEC" > "$MOTO_VENV/.spec"
fi
export EASEL_MOTO="${EASEL_MOTO:-$MOTO_VENV/bin/python}"

echo "== cargo build"
cargo build --locked
echo "== cargo test"
cargo test --locked --all-targets

echo "== OpenAI Python SDK suite"
VENV="${EASEL_VENV:-$HOME/.cache/easel-venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
if ! cmp -s tests/sdk/requirements.txt "$VENV/.requirements" 2>/dev/null; then
  "$VENV/bin/pip" install -q -r tests/sdk/requirements.txt
  cp tests/sdk/requirements.txt "$VENV/.requirements"
fi
EASEL_BIN="$CARGO_TARGET_DIR/debug/easel" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/sdk

echo "== OpenAI Node SDK suite"
NODE_DIR="${EASEL_NODE_DIR:-$HOME/.cache/easel-node}"
mkdir -p "$NODE_DIR"
if ! cmp -s tests/node/package.json "$NODE_DIR/package.json" 2>/dev/null || [[ ! -d "$NODE_DIR/node_modules/openai" ]]; then
  cp tests/node/package.json "$NODE_DIR/package.json"
  (cd "$NODE_DIR" && npm install --no-audit --no-fund --silent)
fi
EASEL_BIN="$CARGO_TARGET_DIR/debug/easel" NODE_PATH="$NODE_DIR/node_modules" node --test tests/node/

echo "== Web page in headless Chromium"
BROWSER_DIR="${EASEL_BROWSER_NODE_DIR:-$HOME/.cache/easel-browser}"
mkdir -p "$BROWSER_DIR"
if ! cmp -s tests/browser/package.json "$BROWSER_DIR/package.json" 2>/dev/null || [[ ! -d "$BROWSER_DIR/node_modules/playwright-core" ]]; then
  cp tests/browser/package.json "$BROWSER_DIR/package.json"
  (cd "$BROWSER_DIR" && npm install --no-audit --no-fund --silent)
fi
export EASEL_ARTIFACTS="${EASEL_ARTIFACTS:-$HOME/.cache/easel-artifacts}"
echo "(screenshots of each page go to $EASEL_ARTIFACTS)"
EASEL_BIN="$CARGO_TARGET_DIR/debug/easel" NODE_PATH="$BROWSER_DIR/node_modules" node --test tests/browser/
