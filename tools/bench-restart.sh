#!/usr/bin/env bash
# Restart after kill -9 with 1M messages logged (issue 3): how long from
# exec until the gateway accepts connections again.
#
# A data directory is filled to N messages (10k conversations, 2k of them
# still open) by kefu-storage's benchmark filler, which is killed with
# SIGKILL mid-write. Then `kefu serve` is started on it and timed until a TCP
# connect to its listener succeeds; it is killed with SIGKILL and started
# again, R times with a warm page cache, then once after dropping the page
# cache (needs root). Prints one line per start and the median.
#
# Usage: tools/bench-restart.sh [--records N] [--repeat R] [--shards N] [--no-build]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
RECORDS=1000000
REPEAT=3
SHARDS=1
BUILD=1
PORT=9401
while [ $# -gt 0 ]; do
    case "$1" in
        --records) RECORDS=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --shards) SHARDS=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
cd "$REPO"
if [ "$BUILD" = 1 ]; then
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p kefu-gateway >&2
fi
FILLER=$TARGET_DIR/$(CARGO_TARGET_DIR=$TARGET_DIR cargo bench -p kefu-storage --bench storage --no-run 2>&1 |
    grep -o "release/deps/storage-[0-9a-f]*" | head -1)
[ -x "$FILLER" ] || { echo "cannot find the storage bench binary" >&2; exit 1; }
DATA=$(mktemp -d)
trap 'kill -9 "${FILL:-}" "${KEFU:-}" 2>/dev/null || true; rm -rf "$DATA"' EXIT

echo "filling $DATA with $RECORDS messages..." >&2
"$FILLER" child-fill --dir "$DATA" --records "$RECORDS" > "$DATA/fill.out" 2>/dev/null &
FILL=$!
until grep -q FILLED "$DATA/fill.out" 2>/dev/null; do
    kill -0 "$FILL" 2>/dev/null || { echo "filler died" >&2; exit 1; }
    sleep 0.2
done
sleep 0.3
kill -9 "$FILL"; wait "$FILL" 2>/dev/null || true
echo "filled; killed the filler mid-write ($(du -sh "$DATA" | cut -f1))" >&2

now_ns() { date +%s%N; }
# Starts kefu in the background (KEFU) and sets MS to the milliseconds until
# its listener accepts. Not called in $(…): the subshell would wait for kefu.
start_and_time() {
    local t0 t1
    t0=$(now_ns)
    "$TARGET_DIR/release/kefu" serve --data "$DATA" --shards "$SHARDS" --listen "127.0.0.1:$PORT" \
        --admin-listen "127.0.0.1:$((PORT + 1))" >/dev/null 2>>"$DATA/kefu.log" &
    KEFU=$!
    until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
        kill -0 "$KEFU" 2>/dev/null || { echo "kefu exited; its log:" >&2; tail "$DATA/kefu.log" >&2; exit 1; }
        sleep 0.002
    done
    # The gateway's own "kefu listening" line (logged once every shard
    # listens) is the moment of record; the connect above only waits for it.
    # This start's line is the (STARTS+1)-th: reading "the last one" and
    # then counting raced with the line being written.
    local line=
    until [ -n "$line" ]; do
        line=$(grep -a "kefu listening" "$DATA/kefu.log" | sed -n "$((STARTS + 1))p" || true)
        [ -n "$line" ] || sleep 0.002
    done
    STARTS=$((STARTS + 1))
    t1=$(date -d "$(echo "$line" | cut -d' ' -f1)" +%s%N)
    MS=$(((t1 - t0) / 1000000))
}
STARTS=0

times=()
for r in $(seq "$REPEAT"); do
    start_and_time
    ms=$MS
    store_ms=$(grep -ao 'store open elapsed_ms=[0-9]*' "$DATA/kefu.log" | tail -1 | cut -d= -f2)
    echo "restart $r after kill -9: listening in $ms ms (store open ${store_ms:-?} ms)"
    times+=("$ms")
    sleep 0.3
    kill -9 "$KEFU"; wait "$KEFU" 2>/dev/null || true
done
if [ -w /proc/sys/vm/drop_caches ]; then
    sync; echo 3 > /proc/sys/vm/drop_caches
    start_and_time
    echo "restart after kill -9, cold page cache: listening in $MS ms"
    kill -9 "$KEFU"; wait "$KEFU" 2>/dev/null || true
else
    echo "cold-cache restart SKIPPED: /proc/sys/vm/drop_caches is not writable" >&2
fi
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print "median restart after kill -9 (warm): " a[int((NR+1)/2)] " ms"}'
