#!/usr/bin/env bash
# Runs the example business system (examples/business, Python + grpcio)
# against the real kefu binary: SyncUser, the OnMessage hook, and the event
# stream across a restart of the example. Makes its own venv.
#
#   tools/example-test.sh            (builds kefu in debug first)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
VENV=${KEFU_EXAMPLE_VENV:-$TARGET/venv-example}
cd "$REPO"
cargo build -q -p kefu-gateway
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -r examples/business/requirements.txt
timeout 300 "$VENV/bin/python" tools/example_test.py "$TARGET/debug/kefu" "$VENV/bin/python"
