#!/usr/bin/env bash
# Runs every test: the Rust unit and end-to-end suites, then the OpenAI Python SDK suite against the built binary.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/easel-target}"

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
