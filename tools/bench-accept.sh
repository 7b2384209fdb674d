#!/usr/bin/env bash
# What accepting a connection costs the gateway, by `server.uring_accept`
# (issue 11, item 1: multishot accept): a storm of WebSocket connections,
# opened as fast as the client can, against `oneshot` (an `Accept`
# submitted per connection) and `multishot` (one per listener).
#
#   - release builds of kefu and kefu-bench;
#   - rounds: in each, every mode once, in turn, each on a fresh gateway
#     (one shard, the echo endpoint, the per-address limits lifted) pinned
#     to --server-cpu, after a quiet host (bench-lib.sh's wait_quiet);
#   - kefu-bench idle (pinned to --client-cpu) opens --connections
#     WebSockets with --ramp-concurrency handshakes in flight per process,
#     holds them 1 s and closes them;
#   - the gateway's CPU over the whole run (every thread's time on a CPU,
#     /proc/PID/task/*/schedstat, in ns) divided by the connections: the
#     server's CPU per connection, opened, held and closed; the ramp's
#     connections a second from kefu-bench's report;
#   - with --trace, a last pass of each mode counts the ring's operations
#     (io_uring tracepoints: requests submitted, completions, io_uring_enter
#     calls) and the accept system calls per connection, over the ramp.
#
# The accept is a small part of a connection's cost (the TCP handshake,
# the HTTP upgrade, the task): the table shows how small.
#
# Usage: tools/bench-accept.sh [--no-build] [--out DIR] [--rounds N]
#                              [--connections N] [--ramp-concurrency N]
#                              [--modes "oneshot multishot"] [--trace]
#                              [--client-cpu N] [--server-cpu N] [--quiet-wait S]
#
# Results: one JSON line per run in $OUT/accept.jsonl (kefu-bench idle's
# report plus mode, round and server_cpu_ns), gateway logs in
# $OUT/gateway-MODE-ROUND.log, and a table of medians at the end.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
OUT=$REPO/target-bench/accept
ROUNDS=5
CONNECTIONS=15000
RAMP_CONCURRENCY=500
MODES="oneshot multishot"
TRACE=0
CLIENT_CPU=0
SERVER_CPU=1
QUIET_WAIT=30
PORT=9221
ADMIN_PORT=9222
SOURCES=127.0.0.1,127.0.0.2

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --out) OUT=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --connections) CONNECTIONS=$2; shift ;;
        --ramp-concurrency) RAMP_CONCURRENCY=$2; shift ;;
        --modes) MODES=$2; shift ;;
        --trace) TRACE=1 ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        --quiet-wait) QUIET_WAIT=$2; shift ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=tools/bench-lib.sh
source "$REPO/tools/bench-lib.sh"
mkdir -p "$OUT"
release_build kefu-gateway kefu-bench
trap stop_server EXIT

# Every thread's time on a CPU so far, in ns (threads that ended are lost:
# the gateway's threads live as long as it does).
server_cpu_ns() {
    cat /proc/"$SERVER_PID"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%d\n", s}'
}

# start_gateway MODE LOG: a fresh gateway accepting by MODE, once the host
# is quiet, its start line checked.
start_gateway() {
    local mode=$1 log=$2
    wait_quiet
    start_kefu "$OUT/data" "$log" "${LIFTED_LIMITS[@]}" KEFU_DIAGNOSTICS_ECHO=true \
        KEFU_SERVER_URING_ACCEPT="$mode" KEFU_SERVER_HEARTBEAT_S=600
    grep -q "accept=\"$mode\"" "$log" || { echo "the gateway's start line does not name accept=\"$mode\"" >&2; exit 1; }
    sleep 1
}

# storm_cmd HOLD SETTLE: sets STORM to kefu-bench idle's storm against the
# gateway (its report on stdout), for run and for perf in trace.
storm_cmd() {
    STORM=(taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" idle --url "ws://127.0.0.1:$PORT/ws/echo"
        --connections "$CONNECTIONS" --sources "$SOURCES" --server-pid "$SERVER_PID"
        --hold "$1" --settle "$2" --ramp-concurrency "$RAMP_CONCURRENCY" --json)
}

# run MODE ROUND: one storm against a fresh gateway; appends to accept.jsonl.
run() {
    local mode=$1 round=$2 c0 c1 report
    start_gateway "$mode" "$OUT/gateway-$mode-$round.log"
    c0=$(server_cpu_ns)
    storm_cmd 1 0.2
    report=$("${STORM[@]}" 2>"$OUT/idle-$mode-$round.log")
    c1=$(server_cpu_ns)
    stop_server
    echo "$report" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
r.update(mode=sys.argv[1], round=int(sys.argv[2]), server_cpu_ns=int(sys.argv[3]))
print(json.dumps(r))' "$mode" "$round" "$((c1 - c0))" >>"$OUT/accept.jsonl"
}

# trace MODE: the ring's operations and accept calls over one ramp.
trace() {
    local mode=$1
    start_gateway "$mode" "$OUT/gateway-$mode-trace.log"
    storm_cmd 0 0
    perf stat -x, -e io_uring:io_uring_submit_req,io_uring:io_uring_complete,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_accept4,syscalls:sys_enter_getpeername \
        -p "$SERVER_PID" -o "$OUT/trace-$mode.stat" -- \
        "${STORM[@]}" >"$OUT/trace-$mode.json" 2>/dev/null
    stop_server
}

: >"$OUT/accept.jsonl"
for round in $(seq "$ROUNDS"); do
    for mode in $MODES; do
        run "$mode" "$round"
        echo "round $round, $mode: $(tail -1 "$OUT/accept.jsonl" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
up, ramp, ns = r["connected"], r["ramp_s"], r["server_cpu_ns"]
print(f"{up} up, ramp {ramp:.2f} s, server {ns / max(up, 1) / 1000:.1f} us/connection")')" >&2
    done
done
if [ "$TRACE" = 1 ]; then
    for mode in $MODES; do
        trace "$mode"
    done
fi

python3 - "$OUT" "$CONNECTIONS" "$TRACE" "$MODES" <<'EOF'
import json, statistics, sys
out, connections, traced, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4].split()
runs = [json.loads(l) for l in open(f"{out}/accept.jsonl")]
print(f"{'mode':<10} {'runs':>4} {'up':>7} {'ramp conn/s (median)':>21} {'server us/conn (median)':>24} {'server us/conn (all)':>30}")
for mode in modes:
    rs = [r for r in runs if r["mode"] == mode]
    if not rs:
        continue
    rate = statistics.median(r["connected"] / r["ramp_s"] for r in rs if r["ramp_s"] > 0)
    per = [r["server_cpu_ns"] / max(r["connected"], 1) / 1000 for r in rs]
    up = min(r["connected"] for r in rs)
    print(f"{mode:<10} {len(rs):>4} {up:>7} {rate:>21.0f} {statistics.median(per):>24.1f} {' '.join(f'{p:.1f}' for p in per):>30}")
    short = [r for r in rs if r["connected"] < connections]
    if short:
        print(f"WARNING: {mode}: {len(short)} runs with fewer than {connections} up", file=sys.stderr)
if traced:
    print("\nper connection over one ramp (perf tracepoints):")
    for mode in modes:
        counts = {}
        try:
            for line in open(f"{out}/trace-{mode}.stat"):
                f = line.strip().split(",")
                if len(f) > 2 and f[0].replace(".", "").isdigit():
                    counts[f[2].split(":")[-1]] = float(f[0])
        except FileNotFoundError:
            continue
        up = json.load(open(f"{out}/trace-{mode}.json"))["connected"] or 1
        print(f"  {mode:<10} " + ", ".join(f"{k} {v / up:.2f}" for k, v in sorted(counts.items())))
EOF
