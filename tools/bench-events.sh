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
#
# Targets: >= 50,000 events/s to one stream; lag p99 <= 20 ms.
#
# Usage: tools/bench-events.sh [--no-build] [--out DIR] [--repeat N]
#                              [--events N] [--rate R] [--visitors N]
#                              [--seconds S] [--warmup S]
#                              [--client-cpu N] [--server-cpu N]
#                              [--port P] [--admin-port P]
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
for i in $(seq 1 "$REPEAT"); do
    data=$(mktemp -d)
    "$BENCH" prefill --data "$data" --events "$EVENTS" >/dev/null
    start_gateway "$data" "$OUT/gateway-catchup-$i.log"
    taskset -c "$CLIENT_CPU" "$BENCH" catchup --admin "127.0.0.1:$ADMIN_PORT" --key "$KEY" \
        --events "$EVENTS" >>"$OUT/catchup.jsonl"
    stop_gateway
    rm -rf "$data"

    data=$(mktemp -d)
    start_gateway "$data" "$OUT/gateway-live-$i.log"
    taskset -c "$CLIENT_CPU" "$BENCH" live --admin "127.0.0.1:$ADMIN_PORT" --key "$KEY" \
        --ws "ws://127.0.0.1:$PORT/ws" --visitors "$VISITORS" --rate "$RATE" \
        --seconds "$SECONDS_MEASURED" --warmup "$WARMUP" >>"$OUT/live.jsonl"
    stop_gateway
    rm -rf "$data"
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
catchup = [json.loads(l) for l in open(f"{out}/catchup.jsonl")]
live = [json.loads(l) for l in open(f"{out}/live.jsonl")]
rates = [r["events_per_s"] for r in catchup]
print(f"catchup events/s: runs {[round(r) for r in rates]}, median {statistics.median(rates):,.0f}")
for p in ("p50", "p99", "p999", "max"):
    vals = [r["lag_ms"][p] for r in live]
    print(f"live lag {p} ms: runs {[round(v, 2) for v in vals]}, median {statistics.median(vals):.2f}")
print(f"live errors: {[r['errors'] for r in live]}")
EOF
