#!/usr/bin/env bash
# Fan-out to the agents of one group (issue 11, item 7): kefu-bench fanout
# against a real kefu gateway.
#
#   - release builds of kefu and kefu-bench (--quick: debug builds);
#   - per repetition, a fresh data directory and a fresh gateway pinned to
#     --server-cpu (0), --shards shards (1), with:
#       routing.auto_assign = false   every open stays queued: the run is
#                                     about fan-out, not assignment;
#       routing.abandon_after_s = 0   no abandon sweep (visitors stay
#                                     connected anyway);
#       limits.new_connections_*_per_ip lifted: a thousand agents connect
#                                     from one address;
#     everything else at its default (limits.outbound_queue_frames 1024 per
#     connection, server.mailbox_capacity and backlog_messages_max 65536,
#     routing.max_queued 100000: none is met at these rates);
#   - kefu-bench fanout pinned to --client-cpu (1): 1,000 agents of group
#     "fanout", 50 actors toggling presence, 100 visitors opening and
#     closing conversations, 50 changes/s (every 2nd a presence toggle),
#     2 s warmup, 60 s measured;
#   - the medians over the repetitions.
#
# Target (issue 11): at 1,000 recipients, p99 <= 20 ms.
#
# --quick is the bounded version for CI: debug builds, 50 agents, 10
# actors, 20 visitors, 20 changes/s, 1 s + 4 s, one repetition; it checks
# that every change reaches every agent (the run fails otherwise).
#
# Usage: tools/bench-fanout.sh [--no-build] [--quick] [--out DIR] [--repeat N]
#                              [--agents N] [--rate R] [--duration S]
#                              [--shards N] [--client-cpu N] [--server-cpu N]
#                              [--quiet-wait S]
#
# Results: one JSON line per run in $OUT/fanout.jsonl, gateway logs in
# $OUT/gateway-N.log, and a summary at the end.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
QUICK=0
OUT=
REPEAT=2
AGENTS=1000
RATE=50
DURATION=60
SHARDS=1
CLIENT_CPU=1
SERVER_CPU=0
QUIET_WAIT=300
PORT=9251
ADMIN_PORT=9252

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --quick) QUICK=1 ;;
        --out) OUT=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --agents) AGENTS=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --shards) SHARDS=$2; shift ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        --quiet-wait) QUIET_WAIT=$2; shift ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$QUICK" = 1 ]; then
    PROFILE=debug
    CARGO_PROFILE=()
    OUT=${OUT:-$REPO/target-bench/fanout-quick}
    REPEAT=1
    QUIET_WAIT=0
    LOAD=(--agents 50 --actors 10 --visitors 20 --rate 20 --duration 4 --warmup 1)
else
    PROFILE=release
    CARGO_PROFILE=(--release)
    OUT=${OUT:-$REPO/target-bench/fanout}
    LOAD=(--agents "$AGENTS" --actors 50 --visitors 100 --rate "$RATE" --duration "$DURATION" --warmup 2)
fi

BIN=$TARGET_DIR/$PROFILE
mkdir -p "$OUT"
if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build "${CARGO_PROFILE[@]}" -j2 -p kefu-gateway -p kefu-bench)
fi

# shellcheck source=tools/bench-lib.sh
source "$REPO/tools/bench-lib.sh"
trap stop_server EXIT

GATEWAY_ENV=(KEFU_ROUTING_AUTO_ASSIGN=false KEFU_ROUTING_ABANDON_AFTER_S=0
    KEFU_LIMITS_NEW_CONNECTIONS_PER_S_PER_IP=1000000 KEFU_LIMITS_NEW_CONNECTIONS_BURST_PER_IP=1000000)

failed=0
: >"$OUT/fanout.jsonl"
for run in $(seq "$REPEAT"); do
    wait_quiet
    data=$OUT/data-$run
    start_kefu "$data" "$OUT/gateway-$run.log" "${GATEWAY_ENV[@]}"
    echo "== fanout run $run/$REPEAT, $SHARDS shard(s)" >&2
    status=0
    line=$(taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" fanout --url "ws://127.0.0.1:$PORT/ws" --data "$data" \
        --cpu "$CLIENT_CPU" --server-pid "$SERVER_PID" "${LOAD[@]}") || status=$?
    stop_server
    rm -rf "$data"
    if [ "$status" != 0 ]; then
        echo "WARNING: fanout run $run exited with $status (see above)" >&2
        failed=1
    fi
    [ -n "$line" ] && echo "$line" >>"$OUT/fanout.jsonl"
done

python3 - "$OUT/fanout.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
if not runs:
    sys.exit("no runs completed")
def fmt(v, spec):
    return "-" if v is None else format(v, spec)
rows = [
    ("recipients", lambda r: r["agents_ready"], ".0f"),
    ("changes (opens + toggles)", lambda r: r["changes_open"] + r["changes_presence"], ".0f"),
    ("deliveries/s", lambda r: r["deliveries_per_s"], ".0f"),
    ("latency p50 µs", lambda r: r["latency_us"]["p50"], ".0f"),
    ("latency p99 µs", lambda r: r["latency_us"]["p99"], ".0f"),
    ("latency p99.9 µs", lambda r: r["latency_us"]["p999"], ".0f"),
    ("latency max µs", lambda r: r["latency_us"]["max"], ".0f"),
    ("open p99 µs", lambda r: r["open_latency_us"]["p99"], ".0f"),
    ("presence p99 µs", lambda r: r["presence_latency_us"]["p99"], ".0f"),
    ("missing deliveries", lambda r: r["missing"], ".0f"),
    ("duplicates", lambda r: r["duplicates"], ".0f"),
    ("failed changes", lambda r: r["changes_failed"], ".0f"),
    ("first→last recipient p50 µs", lambda r: r["spread_us"]["p50"], ".0f"),
    ("first→last recipient p99 µs", lambda r: r["spread_us"]["p99"], ".0f"),
    ("action lag p99 µs", lambda r: r["action_lag_us"]["p99"], ".0f"),
    ("client CPU cores", lambda r: r["client_cpu_cores"], ".2f"),
    ("server CPU cores", lambda r: r["server_cpu_cores"], ".2f"),
    ("server RSS MiB", lambda r: r["server_rss_bytes"] and r["server_rss_bytes"] / 2**20, ".1f"),
    ("other CPU cores", lambda r: r["other_cpu_cores"], ".2f"),
    ("host steal %, the CPU most stolen from", lambda r: 100 * max(r["steal_by_cpu"]), ".1f"),
]
print(f"\n| figure | median of {len(runs)} | runs |")
print("| --- | ---: | --- |")
for name, f, spec in rows:
    vals = [f(r) for r in runs]
    print(f"| {name} | {fmt(statistics.median(vals), spec)} | {' / '.join(fmt(v, spec) for v in vals)} |")
PY
exit "$failed"
