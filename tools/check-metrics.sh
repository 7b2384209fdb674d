#!/usr/bin/env bash
# Lints the live /metrics of a running kefu with `promtool check metrics`
# (Debian package `prometheus`): names, units, HELP and TYPE lines, as
# Prometheus would scrape them.
#
# It builds kefu (debug), starts `kefu serve` on ephemeral ports with a
# throwaway data directory and two shards, scrapes /metrics from the
# bridge, checks it, and stops kefu. Exit 0 only if promtool finds nothing.
#
#   tools/check-metrics.sh [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null; then
    echo "check-metrics: promtool not found (apt-get install prometheus)" >&2
    exit 2
fi
if [[ "${1:-}" != "--no-build" ]]; then
    cargo build -q -p kefu-gateway --bin kefu
fi

work=$(mktemp -d)
pid=
cleanup() {
    if [[ -n "$pid" ]]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

"${CARGO_TARGET_DIR:-target}/debug/kefu" serve --data "$work/data" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --shards 2 >"$work/log" 2>&1 &
pid=$!
admin=
for _ in $(seq 100); do
    admin=$(sed -n 's/.*kefu listening.* admin=\([0-9.:]*\).*/\1/p' "$work/log" | head -n1)
    [[ -n "$admin" ]] && break
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "check-metrics: kefu exited at start:" >&2
        cat "$work/log" >&2
        exit 1
    fi
    sleep 0.1
done
if [[ -z "$admin" ]]; then
    echo "check-metrics: kefu did not report listening within 10 s:" >&2
    cat "$work/log" >&2
    exit 1
fi

curl -fsS "http://$admin/metrics" >"$work/metrics"
echo "check-metrics: $(grep -c '^# TYPE' "$work/metrics") metric families from $admin"
promtool check metrics <"$work/metrics"
echo "check-metrics: promtool found nothing to fix"
