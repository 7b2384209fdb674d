#!/usr/bin/env bash
# One kefu.v1.Events/Subscribe stream (issue 8, item 7): events/s while it
# reads a backlog, and its lag behind the log while visitors send.
# gateway/examples/events_bench.rs says what each step measures.
#
#   - release builds of kefu and the events_bench example;
#   - per repetition, "catchup": a fresh data directory prefilled with
#     --events messages, a gateway pinned to --server-cpu (one shard), and
#     one subscriber pinned to --client-cpu reading them all from offset 1;
#   - per repetition, "live": a fresh data directory and gateway, --visitors
#     visitors sending --rate msg/s for --warmup + --seconds, and one
#     subscriber following the tail; lag from each message's ts;
#   - the medians over the repetitions.
#   - with --py PYTHON (a Python with grpcio and grpcio-tools), a second
#     subscriber written with grpcio (tools/events_lag.py, a client kefu
#     did not write) follows the same live run on the client core and
#     reports the lag it sees per --window seconds: run it for minutes
#     (--seconds 500 at 2,000 msg/s is a million messages) to see the
#     steady state. --skip-catchup leaves the backlog step out.
#
# Targets: >= 50,000 events/s to one stream; lag p99 <= 20 ms.
#
# Usage: tools/bench-events.sh [--no-build] [--out DIR] [--repeat N]
#                              [--events N] [--rate R] [--visitors N]
#                              [--seconds S] [--warmup S]
#                              [--client-cpu N] [--server-cpu N]
#                              [--port P] [--admin-port P]
#                              [--py PYTHON] [--window S] [--skip-catchup]
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
OUT=$REPO/target-bench/events
REPEAT=3
EVENTS=500000
RATE=2000
VISITORS=200
SECONDS_MEASURED=10
WARMUP=2
CLIENT_CPU=0
SERVER_CPU=1
# Apart from bench-chat.sh's 9201/9202, so the two never meet.
PORT=9211
ADMIN_PORT=9212
KEY=bench-events-key-0123456789
PY=
WINDOW=60
CATCHUP=1

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --out) OUT=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --events) EVENTS=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --visitors) VISITORS=$2; shift ;;
        --seconds) SECONDS_MEASURED=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        --port) PORT=$2; shift ;;
        --admin-port) ADMIN_PORT=$2; shift ;;
        --py) PY=$2; shift ;;
        --window) WINDOW=$2; shift ;;
        --skip-catchup) CATCHUP=0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && cargo build --release -p kefu-gateway --bin kefu --example events_bench)
fi
KEFU=$TARGET_DIR/release/kefu
BENCH=$TARGET_DIR/release/examples/events_bench
mkdir -p "$OUT"

GATEWAY_PID=
stop_gateway() {
    if [ -n "$GATEWAY_PID" ]; then
        kill -TERM "$GATEWAY_PID" 2>/dev/null || true
        wait "$GATEWAY_PID" 2>/dev/null || true
        GATEWAY_PID=
    fi
}
trap stop_gateway EXIT

# start_gateway DATA_DIR LOG: one shard on the server core, the rate limit
# lifted (it counts commands per connection), the key configured.
start_gateway() {
    KEFU_ADMIN_API_KEYS="[\"$KEY\"]" KEFU_LIMITS_MESSAGES_PER_S=100000 KEFU_LIMITS_BURST=100000 \
        taskset -c "$SERVER_CPU" "$KEFU" serve --listen "127.0.0.1:$PORT" \
        --admin-listen "127.0.0.1:$ADMIN_PORT" --data "$1" --shards 1 2>"$2" &
    GATEWAY_PID=$!
    for _ in $(seq 1 200); do
        grep -q "kefu listening" "$2" && return 0
        sleep 0.05
    done
    echo "the gateway did not start; see $2" >&2
    exit 1
}

: >"$OUT/catchup.jsonl"
: >"$OUT/live.jsonl"
: >"$OUT/live-py.jsonl"
for i in $(seq 1 "$REPEAT"); do
    if [ "$CATCHUP" = 1 ]; then
        data=$(mktemp -d)
        "$BENCH" prefill --data "$data" --events "$EVENTS" >/dev/null
        start_gateway "$data" "$OUT/gateway-catchup-$i.log"
        taskset -c "$CLIENT_CPU" "$BENCH" catchup --admin "127.0.0.1:$ADMIN_PORT" --key "$KEY" \
            --events "$EVENTS" >>"$OUT/catchup.jsonl"
        stop_gateway
        rm -rf "$data"
    fi

    data=$(mktemp -d)
    start_gateway "$data" "$OUT/gateway-live-$i.log"
    PY_PID=
    if [ -n "$PY" ]; then
        # Every message of the run, the warm-up's not measured; a margin
        # of time past the run, so it ends by count, not by clock.
        taskset -c "$CLIENT_CPU" "$PY" "$REPO/tools/events_lag.py" --admin "127.0.0.1:$ADMIN_PORT" \
            --key "$KEY" --window "$WINDOW" --seconds $((WARMUP + SECONDS_MEASURED + 60)) \
            --events $((RATE * (WARMUP + SECONDS_MEASURED))) --skip $((RATE * WARMUP)) \
            >>"$OUT/live-py.jsonl" 2>"$OUT/live-py-$i.log" &
        PY_PID=$!
    fi
    taskset -c "$CLIENT_CPU" "$BENCH" live --admin "127.0.0.1:$ADMIN_PORT" --key "$KEY" \
        --ws "ws://127.0.0.1:$PORT/ws" --visitors "$VISITORS" --rate "$RATE" \
        --seconds "$SECONDS_MEASURED" --warmup "$WARMUP" >>"$OUT/live.jsonl"
    if [ -n "$PY_PID" ]; then
        wait "$PY_PID" || echo "events_lag.py failed; see $OUT/live-py-$i.log" >&2
    fi
    stop_gateway
    rm -rf "$data"
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
catchup = [json.loads(l) for l in open(f"{out}/catchup.jsonl")]
live = [json.loads(l) for l in open(f"{out}/live.jsonl")]
py = [json.loads(l) for l in open(f"{out}/live-py.jsonl")]
rates = [r["events_per_s"] for r in catchup]
if rates:
    print(f"catchup events/s: runs {[round(r) for r in rates]}, median {statistics.median(rates):,.0f}")
for p in ("p50", "p99", "p999", "max"):
    vals = [r["lag_ms"][p] for r in live]
    print(f"live lag {p} ms: runs {[round(v, 2) for v in vals]}, median {statistics.median(vals):.2f}")
print(f"live errors: {[r['errors'] for r in live]}")
for r in py:
    if r.get("summary"):
        lag = r["lag_ms"]
        print(f"grpcio subscriber: {r['measured']} measured, lag p50 {lag.get('p50')} p99 {lag.get('p99')} p99.9 {lag.get('p999')} max {lag.get('max')} ms, offset gaps {r['offset_gaps']}, client {r['client_cpu_cores']} cores")
    else:
        lag = r["lag_ms"]
        print(f"  window to {r['window_end_s']} s: n {lag.get('n')} p50 {lag.get('p50')} p99 {lag.get('p99')} p99.9 {lag.get('p999')} max {lag.get('max')} ms")
EOF
