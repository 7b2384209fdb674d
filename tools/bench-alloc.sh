#!/usr/bin/env bash
# Heap allocations per relayed chat message, per thread (issue target: 0).
#
#   - release builds of kefu and kefu-bench;
#   - a fresh gateway pinned to one core (--shards 1 unless --shards says
#     otherwise: more shards share the core; rate limit lifted),
#     kefu-bench chat pinned to the other at a fixed rate;
#   - once messages flow, 3 s more, then /metrics is read twice WINDOW
#     seconds apart; each thread's kefu_thread_allocations_total delta is
#     divided by the messages received in the window (one per relayed
#     message: the visitor's send), and the storage writer's also by the
#     group commits in it (kefu_storage_commits_total).
#
# Allocation counts do not depend on how busy the host is, but how many
# writes share a group commit does (it grows with the rate and with how
# fast the chat shard hands writes over), so the storage writer's figure
# per message moves with it; per commit it is stable.
#
# Usage: tools/bench-alloc.sh [--no-build] [--out DIR] [--rate R] [--visitors N]
#                             [--agents N] [--window S] [--shards N]
# Extra gateway settings go through the environment, e.g.
#   KEFU_STORAGE_QUICK_REPAIR=false tools/bench-alloc.sh
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
OUT=$REPO/target-bench/alloc
RATE=2000
SHARDS=1
VISITORS=500
AGENTS=5
WINDOW=4
CLIENT_CPU=0
SERVER_CPU=1
PORT=9311
ADMIN_PORT=9312

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --out) OUT=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --shards) SHARDS=$2; shift ;;
        --visitors) VISITORS=$2; shift ;;
        --agents) AGENTS=$2; shift ;;
        --window) WINDOW=$2; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

BIN=$TARGET_DIR/release
if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -j2 -p kefu-gateway -p kefu-bench)
fi
RUN=$OUT/rate-$RATE
rm -rf "$RUN"
mkdir -p "$RUN"
metrics() { curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics"; }

# Thousands of anonymous visitors from one address: per-address limits lifted.
KEFU_LIMITS_MESSAGES_PER_S=1000000 KEFU_LIMITS_BURST=1000000 \
    KEFU_LIMITS_NEW_CONNECTIONS_BURST_PER_IP=1000000 KEFU_LIMITS_ANONYMOUS_PER_MIN_PER_IP=1000000 \
    taskset -c "$SERVER_CPU" "$BIN/kefu" serve --shards "$SHARDS" --listen "127.0.0.1:$PORT" \
    --admin-listen "127.0.0.1:$ADMIN_PORT" --data "$RUN/data" 2>"$RUN/gateway.log" &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    [ -s "$RUN/data/jwt_secret" ] && metrics >/dev/null && break
    sleep 0.1
done

# Long enough to cover the ramp, the wait below and the window.
taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" chat --url "ws://127.0.0.1:$PORT/ws" --data "$RUN/data" \
    --visitors "$VISITORS" --agents "$AGENTS" --rate "$RATE" --duration $((WINDOW + 8)) --warmup 2 \
    --cpu "$CLIENT_CPU" --server-pid "$SERVER_PID" --fsync-probe 0 >"$RUN/bench.json" 2>"$RUN/bench.err" &
BENCH_PID=$!

received() { metrics | awk '/^kefu_messages_in_total/ { s += $2 } END { print s + 0 }'; }
prev=$(received)
while sleep 0.5; do
    now=$(received)
    [ $((now - prev)) -gt $((RATE / 4)) ] && break
    prev=$now
    kill -0 "$BENCH_PID" 2>/dev/null || { echo "kefu-bench ended before messages flowed; see $RUN/bench.err" >&2; exit 1; }
done
sleep 3
metrics >"$RUN/metrics-1"
sleep "$WINDOW"
metrics >"$RUN/metrics-2"
wait "$BENCH_PID" || echo "WARNING: kefu-bench exited with $?; see $RUN/bench.err" >&2

python3 - "$RUN" "$RATE" <<'EOF'
import json, re, sys
run, rate = sys.argv[1], sys.argv[2]
def load(path):
    out = {}
    for line in open(path):
        if line.strip() and not line.startswith('#'):
            key, value = line.rsplit(' ', 1)
            out[key] = float(value)
    return out
a, b = load(run + '/metrics-1'), load(run + '/metrics-2')
d = {k: b[k] - a.get(k, 0) for k in b}
msgs = sum(v for k, v in d.items() if k.startswith('kefu_messages_in_total'))
commits = d['kefu_storage_commits_total']
writes = d['kefu_storage_writes_total']
print(f"rate {rate}/s: {msgs:.0f} messages, {writes:.0f} storage writes, {commits:.0f} group commits "
      f"({writes / max(commits, 1):.2f} writes per commit) in the window")
print(f"{'thread':16} {'allocations':>12} {'per message':>12} {'per commit':>11}")
total = d['kefu_allocations_total']
print(f"{'(all)':16} {total:12.0f} {total / msgs:12.2f}")
for k, v in sorted(d.items()):
    m = re.match(r'kefu_thread_allocations_total\{thread="([^"]*)"\}', k)
    if m:
        per_commit = f"{v / commits:11.1f}" if commits and 'storage' in m.group(1) else ''
        print(f"{m.group(1):16} {v:12.0f} {v / msgs:12.2f} {per_commit}")
r = json.load(open(run + '/bench.json'))
print(f"client: sent {r['send_rate']:.0f}/s, delivered {r['delivered_per_s']:.0f}/s, "
      f"undelivered {r['undelivered']}, unacked {r['unacked']}, errors {r['error_codes']} {r['connection_errors']}")
EOF
