#!/usr/bin/env bash
# SendMessage calls per second and their latency (issue 8, item 7), from a
# grpcio client (Python's gRPC: a client kefu did not write), and the
# gateway's CPU per call, so a reader can tell a client-bound run.
#
#   - a release kefu on a fresh data directory, one shard, pinned to
#     --server-cpu (its storage writer and bridge thread share that core);
#   - tools/bench_api.py pinned to --client-cpu: --workers threads, each
#     with its own conversation, calling SendMessage back to back (closed
#     loop) for --seconds; every call is answered once its message is
#     durable;
#   - per repetition one JSON line in OUT/api.jsonl, with the server's CPU
#     time over the run (utime + stime of the whole process).
#
# Usage: tools/bench-api.sh --py PYTHON [--no-build] [--out DIR] [--repeat N]
#                           [--workers N] [--seconds S]
#                           [--client-cpu N] [--server-cpu N]
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
OUT=$REPO/target-bench/api
REPEAT=3
WORKERS=16
SECONDS_MEASURED=60
CLIENT_CPU=0
SERVER_CPU=1
PORT=9221
ADMIN_PORT=9222
KEY=bench-api-key-0123456789
PY=

while [ $# -gt 0 ]; do
    case "$1" in
        --py) PY=$2; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --workers) WORKERS=$2; shift ;;
        --seconds) SECONDS_MEASURED=$2; shift ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$PY" ] || { echo "--py PYTHON (with grpcio, grpcio-tools, websockets) is required" >&2; exit 2; }

if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && cargo build --release -p kefu-gateway --bin kefu)
fi
KEFU=$TARGET_DIR/release/kefu
mkdir -p "$OUT"
: >"$OUT/api.jsonl"

# shellcheck source=tools/bench-lib.sh
source "$REPO/tools/bench-lib.sh"
trap stop_server EXIT

# CPU seconds (user + system) the process has used.
cpu_s() {
    awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}

for i in $(seq 1 "$REPEAT"); do
    data=$(mktemp -d)
    KEFU_ADMIN_API_KEYS="[\"$KEY\"]" KEFU_LIMITS_MESSAGES_PER_S=100000 KEFU_LIMITS_BURST=100000 \
        taskset -c "$SERVER_CPU" "$KEFU" serve --listen "127.0.0.1:$PORT" \
        --admin-listen "127.0.0.1:$ADMIN_PORT" --data "$data" --shards 1 2>"$OUT/gateway-$i.log" &
    SERVER_PID=$!
    for _ in $(seq 1 200); do
        grep -q "kefu listening" "$OUT/gateway-$i.log" && break
        sleep 0.05
    done
    before=$(cpu_s "$SERVER_PID")
    line=$(taskset -c "$CLIENT_CPU" "$PY" "$REPO/tools/bench_api.py" --addr "127.0.0.1:$PORT" \
        --admin "127.0.0.1:$ADMIN_PORT" --key "$KEY" --kefu "$KEFU" --data "$data" \
        --workers "$WORKERS" --seconds "$SECONDS_MEASURED")
    after=$(cpu_s "$SERVER_PID")
    stop_server
    rm -rf "$data"
    python3 - "$line" "$before" "$after" >>"$OUT/api.jsonl" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
cpu = float(sys.argv[3]) - float(sys.argv[2])
r["server_cpu_s"] = round(cpu, 2)
r["server_cpu_us_per_call"] = round(cpu / max(1, r["calls"]) * 1e6, 1)
print(json.dumps(r))
EOF
    tail -1 "$OUT/api.jsonl" >&2
done

python3 - "$OUT/api.jsonl" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def med(f):
    return statistics.median(f(r) for r in runs)
print(f"SendMessage calls/s: runs {[r['calls_per_s'] for r in runs]}, median {med(lambda r: r['calls_per_s']):,.1f}")
for p in ("p50", "p90", "p99", "max"):
    print(f"latency {p} ms: runs {[r['latency_ms'][p] for r in runs]}, median {med(lambda r: r['latency_ms'][p]):.2f}")
print(f"server CPU per call µs: runs {[r['server_cpu_us_per_call'] for r in runs]}, median {med(lambda r: r['server_cpu_us_per_call']):.1f}")
print(f"errors: {[r['errors'] for r in runs]}")
EOF
