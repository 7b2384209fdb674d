#!/usr/bin/env bash
# The agent console and the visitor widget end to end in headless Chromium,
# against the real kefu binary (tools/browser/e2e.test.mjs, node's test
# runner, playwright-core); and kefu-bench's HTML report of a real chat run
# rendered there (tools/browser/report.test.mjs).
#
# Installs what it needs itself: Debian's chromium (and CJK fonts, for the
# Chinese UI's screenshots) and node with apt-get, playwright-core with npm
# into the cargo target dir (never `playwright install`: Chromium is
# Debian's, started from /usr/bin/chromium). Builds the gateway binary
# (debug, as `cargo test` already did in CI), runs the tests, exits non-zero
# on any failure. Screenshots land in $KEFU_ARTIFACTS (default
# target/browser-artifacts).
#
# Usage: tools/browser-test.sh
# Environment:
#   KEFU_BIN         a kefu binary to test instead of building one
#   KEFU_BENCH_BIN   a kefu-bench binary to test instead of building one
#   KEFU_ARTIFACTS   where screenshots go
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
NODE_DIR=$TARGET/browser-test
PLAYWRIGHT_CORE=playwright-core@1.65.2
export KEFU_ARTIFACTS=${KEFU_ARTIFACTS:-$TARGET/browser-artifacts}

apt_install() {
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ ! -x /usr/bin/chromium ]; then
    echo "installing Debian's chromium"
    apt_install chromium fonts-noto-cjk
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "installing node"
    apt_install nodejs npm
fi
# node:test's describe/before and the spec reporter need node 18.
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' \
    || { echo "node $(node --version) is too old: 18 or later is needed" >&2; exit 1; }

if [ ! -f "$NODE_DIR/node_modules/playwright-core/package.json" ] \
    || ! grep -q "\"version\": \"${PLAYWRIGHT_CORE#*@}\"" "$NODE_DIR/node_modules/playwright-core/package.json"; then
    echo "installing $PLAYWRIGHT_CORE into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    [ -f "$NODE_DIR/package.json" ] || echo '{"private": true}' > "$NODE_DIR/package.json"
    # playwright-core downloads no browser on install (only `playwright
    # install` would, which is never run here).
    npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error "$PLAYWRIGHT_CORE"
fi
export KEFU_NODE_MODULES=$NODE_DIR/node_modules

if [ -z "${KEFU_BIN:-}" ]; then
    cargo build -q -p kefu-gateway --bin kefu
    KEFU_BIN=$TARGET/debug/kefu
fi
export KEFU_BIN
if [ -z "${KEFU_BENCH_BIN:-}" ]; then
    cargo build -q -p kefu-bench
    KEFU_BENCH_BIN=$TARGET/debug/kefu-bench
fi
export KEFU_BENCH_BIN

mkdir -p "$KEFU_ARTIFACTS"
echo "kefu: $KEFU_BIN; $(/usr/bin/chromium --version 2>/dev/null); node $(node --version); screenshots: $KEFU_ARTIFACTS"
node --test --test-reporter=spec tools/browser/e2e.test.mjs tools/browser/report.test.mjs
