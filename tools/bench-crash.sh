#!/usr/bin/env bash
# Zero loss across kill -9 (issue 11, item 7): kefu-bench crash, which
# starts the gateway itself, kills it with SIGKILL under chat load and
# starts it again, --kills times, then checks every conversation's history
# against the acks (acked but lost, duplicates, gaps: all must be 0).
#
#   - release builds of kefu and kefu-bench (--quick: debug builds);
#   - a fresh data directory, and a config ($OUT/crash.toml) that lifts
#     only what a reconnecting client meets (the per-connection command
#     limit, which the resends after a restart burst through, and the
#     per-address connection limits) and runs --shards shards (2: a
#     conversation's home and its visitor's shard differ for half of
#     them); [storage] is left at its defaults, the production ones
#     (acks after an fsynced redb commit, Durability::Immediate, which no
#     setting changes; quick_repair = true);
#   - kefu-bench crash: 50 visitors with tokens, 5 agents, 500 msg/s,
#     20 kills, each 1.5-4.5 s after the gateway acked again.
#
# --quick is the bounded version for CI: debug builds, 10 visitors, 2
# agents, 100 msg/s, 3 kills about 1 s apart.
#
# Usage: tools/bench-crash.sh [--no-build] [--quick] [--out DIR] [--kills K]
#                             [--interval S] [--rate R] [--shards N]
#
# Results: the run's JSON line in $OUT/crash.jsonl, the gateway's log (all
# its starts) in $OUT/gateway.log, the summary on stderr; exits non-zero if
# the check fails.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
QUICK=0
OUT=
KILLS=20
INTERVAL=3
RATE=500
SHARDS=2
PORT=9241
ADMIN_PORT=9242

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --quick) QUICK=1 ;;
        --out) OUT=$2; shift ;;
        --kills) KILLS=$2; shift ;;
        --interval) INTERVAL=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --shards) SHARDS=$2; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$QUICK" = 1 ]; then
    PROFILE=debug
    CARGO_PROFILE=()
    OUT=${OUT:-$REPO/target-bench/crash-quick}
    LOAD=(--visitors 10 --agents 2 --rate 100 --kills 3 --interval 1)
else
    PROFILE=release
    CARGO_PROFILE=(--release)
    OUT=${OUT:-$REPO/target-bench/crash}
    LOAD=(--visitors 50 --agents 5 --rate "$RATE" --kills "$KILLS" --interval "$INTERVAL")
fi

BIN=$TARGET_DIR/$PROFILE
mkdir -p "$OUT"
if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build "${CARGO_PROFILE[@]}" -j2 -p kefu-gateway -p kefu-bench)
fi

DATA=$OUT/data
rm -rf "$DATA" "$OUT/gateway.log"
cat >"$OUT/crash.toml" <<TOML
# Written by tools/bench-crash.sh. [storage] is deliberately absent: the
# run is about the production durability.
[server]
shards = $SHARDS

[limits]
# After a restart a visitor sends again everything unacked at once.
messages_per_s = 100000
burst = 100000
# Every client reconnects from 127.0.0.1 after each kill.
new_connections_per_s_per_ip = 1000000
new_connections_burst_per_ip = 1000000
TOML

status=0
"$BIN/kefu-bench" crash --kefu "$BIN/kefu" --config "$OUT/crash.toml" --data "$DATA" \
    --url "ws://127.0.0.1:$PORT/ws" --admin-listen "127.0.0.1:$ADMIN_PORT" --gateway-log "$OUT/gateway.log" \
    "${LOAD[@]}" >"$OUT/crash.jsonl" || status=$?
if [ "$status" = 0 ]; then
    rm -rf "$DATA"
else
    echo "crash run FAILED ($status): data kept in $DATA, gateway log in $OUT/gateway.log" >&2
fi
exit "$status"
