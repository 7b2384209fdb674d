#!/usr/bin/env bash
# Two builds of kefu side by side in one run: the figures issue 7 must keep
# (delivery latency at 5k msg/s, shard-thread allocations per message, idle
# memory per connection, restart after kill -9), measured for a "before"
# and an "after" build, alternating, so drift on this shared machine hits
# both alike.
#
#   tools/bench-ab.sh --before TARGET_DIR --after TARGET_DIR [--out DIR]
#                     [--repeat N] [--chat-duration S] [--skip-chat]
#                     [--skip-alloc] [--skip-idle] [--skip-restart]
#
# Each TARGET_DIR holds a release build of kefu and kefu-bench (and, for
# the restart figure, is the CARGO_TARGET_DIR its tree builds the storage
# filler into): make one with `git worktree add DIR REV` and
# `CARGO_TARGET_DIR=DIR/target cargo build --release -p kefu-gateway -p kefu-bench`.
# Nothing is built here; each figure is the existing script's own
# (bench-chat.sh, bench-alloc.sh, bench-baselines.sh --skip-echo,
# bench-restart.sh), run with --no-build against the side's binaries.
#
# The chat runs default to 200 s at 5,000 msg/s: a million messages each,
# past warm-up. Results: $OUT/{before,after}/..., and a table at the end.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$REPO/target-bench/ab
REPEAT=2
CHAT_DURATION=200
BEFORE=
AFTER=
SKIP_CHAT=0
SKIP_ALLOC=0
SKIP_IDLE=0
SKIP_RESTART=0

while [ $# -gt 0 ]; do
    case "$1" in
        --before) BEFORE=$2; shift ;;
        --after) AFTER=$2; shift ;;
        --out) OUT=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --chat-duration) CHAT_DURATION=$2; shift ;;
        --skip-chat) SKIP_CHAT=1 ;;
        --skip-alloc) SKIP_ALLOC=1 ;;
        --skip-idle) SKIP_IDLE=1 ;;
        --skip-restart) SKIP_RESTART=1 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
for side in "$BEFORE" "$AFTER"; do
    if [ -z "$side" ] || [ ! -x "$side/release/kefu" ] || [ ! -x "$side/release/kefu-bench" ]; then
        echo "--before and --after must name target dirs with release/kefu and release/kefu-bench" >&2
        exit 2
    fi
done
mkdir -p "$OUT/before" "$OUT/after"

run_side() { # name target_dir script args...
    local name=$1 target=$2
    shift 2
    echo "== $name: $*"
    CARGO_TARGET_DIR=$target "$@"
}

for r in $(seq 1 "$REPEAT"); do
    for side in before after; do
        target=$BEFORE
        [ "$side" = after ] && target=$AFTER
        if [ "$SKIP_CHAT" = 0 ]; then
            run_side "$side" "$target" "$REPO/tools/bench-chat.sh" --no-build --repeat 1 \
                --duration "$CHAT_DURATION" --quiet-wait 120 --out "$OUT/$side/chat-$r"
        fi
        if [ "$SKIP_ALLOC" = 0 ]; then
            run_side "$side" "$target" "$REPO/tools/bench-alloc.sh" --no-build --rate 5000 --window 60 \
                --out "$OUT/$side/alloc-$r" | tee "$OUT/$side/alloc-$r.txt"
        fi
        if [ "$SKIP_IDLE" = 0 ]; then
            run_side "$side" "$target" "$REPO/tools/bench-baselines.sh" --no-build --skip-echo \
                --servers kefu --idle-connections 15000 --out "$OUT/$side/idle-$r" | tee "$OUT/$side/idle-$r.txt"
        fi
    done
done
if [ "$SKIP_RESTART" = 0 ]; then
    for side in before after; do
        target=$BEFORE
        [ "$side" = after ] && target=$AFTER
        # The filler is built from the side's own tree into its target dir.
        tree=$(dirname "$target")
        run_side "$side" "$target" "$tree/tools/bench-restart.sh" --no-build --repeat 3 \
            | tee "$OUT/$side/restart.txt"
    done
fi

python3 - "$OUT" <<'EOF'
import glob, json, os, statistics, sys
out = sys.argv[1]
def chat(side):
    runs = []
    for f in sorted(glob.glob(os.path.join(out, side, "chat-*", "chat.jsonl"))):
        runs += [json.loads(l) for l in open(f) if l.strip()]
    clean = [r for r in runs if not r.get("contended")] or runs
    return clean
rows = [
    ("delivery p50 µs", lambda r: r["delivery_latency_us"]["p50"]),
    ("delivery p99 µs", lambda r: r["delivery_latency_us"]["p99"]),
    ("delivery p99.9 µs", lambda r: r["delivery_latency_us"]["p999"]),
    ("ack p50 µs", lambda r: r["ack_latency_us"]["p50"]),
    ("ack p99 µs", lambda r: r["ack_latency_us"]["p99"]),
]
b, a = chat("before"), chat("after")
if b and a:
    print(f"\n| chat, 5k msg/s | before (median of {len(b)}) | after (median of {len(a)}) | runs before | runs after |")
    print("| --- | ---: | ---: | --- | --- |")
    for name, f in rows:
        vb, va = [f(r) for r in b], [f(r) for r in a]
        print(f"| {name} | {statistics.median(vb):.0f} | {statistics.median(va):.0f} | "
              f"{', '.join(f'{v:.0f}' for v in vb)} | {', '.join(f'{v:.0f}' for v in va)} |")
EOF
echo "alloc, idle and restart reports: $OUT/{before,after}/*.txt"
