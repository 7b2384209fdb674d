#!/usr/bin/env bash
# One kefu-bench chat run with the means to say where its latency tail
# comes from (BENCHMARKS.md, "After the cid window: ... what the tail is"):
#
#   - a fresh gateway (--shards, pinned to --server-cpu with its storage
#     writer) and kefu-bench chat pinned to --client-cpu, limits lifted as
#     in bench-chat-clients.sh; any KEFU_* or MIMALLOC_* variable in the
#     environment reaches the gateway (an A/B of one knob);
#   - with --idle N, N more WebSockets held open and idle beside the load
#     (kefu-bench idle, same CPU as the client, other source addresses);
#   - with --perf-sched S, `perf sched record -a` for S seconds in the
#     middle of the window, then, per thread: scheduling delay of each
#     wake-up (p50 / p99 / max), the longest continuous run, and the runs
#     longer than 2 ms per CPU: a thread that never runs 2 ms seen
#     "running" 20 ms is a CPU the host took away; and each wait for the
#     CPU over 2 ms sorted by what held it: another task, or nothing (the
#     guest's CPU idle with the thread runnable: the host's);
#   - kefu-bench's own report: the delivery cut at the home's ts, and the
#     share of each CPU the hypervisor stole (steal_by_cpu).
#
# Usage: tools/bench-chat-diag.sh [--no-build] [--out DIR] [--visitors N]
#            [--agents N] [--rate R] [--duration S] [--shards N] [--idle N]
#            [--perf-sched S] [--client-cpu N] [--server-cpu N]
#
# Results: $OUT/client.json (kefu-bench's JSON line), client.log (its table),
# gateway.log, data-bytes (the data directory's size at the end),
# metrics.txt (/metrics at the end), timehist.txt and sched-summary.txt
# with --perf-sched.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
OUT=$REPO/target-bench/chat-diag
VISITORS=15000
AGENTS=150
RATE=5000
DURATION=60
SHARDS=2
IDLE=0
PERF_SCHED=0
CLIENT_CPU=0
SERVER_CPU=1
QUIET_WAIT=60
OPTIONS="OUT VISITORS AGENTS RATE DURATION SHARDS IDLE PERF_SCHED CLIENT_CPU SERVER_CPU QUIET_WAIT"
PORT=9261
ADMIN_PORT=9262

# shellcheck source=tools/bench-lib.sh
source "$REPO/tools/bench-lib.sh"
parse_options "$@"

BIN=$TARGET_DIR/release
mkdir -p "$OUT"
if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -j2 -p kefu-gateway -p kefu-bench \
        --bin kefu --bin kefu-bench)
fi
if [ "$PERF_SCHED" != 0 ] && ! command -v perf >/dev/null; then
    echo "--perf-sched needs perf" >&2
    exit 2
fi

IDLE_PID=
cleanup() {
    [ -n "$IDLE_PID" ] && kill "$IDLE_PID" 2>/dev/null
    stop_server
}
trap cleanup EXIT

wait_quiet
# Heartbeats every 600 s: idle sockets that never answer a ping stay open.
start_kefu "$OUT/data" "$OUT/gateway.log" "${LIFTED_LIMITS[@]}" KEFU_SERVER_HEARTBEAT_S=600
if [ "$IDLE" -gt 0 ]; then
    taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" idle --url "ws://127.0.0.1:$PORT/ws" --connections "$IDLE" \
        --hold $((DURATION + 120)) --sources 127.0.0.3,127.0.0.4 --server-pid "$SERVER_PID" \
        >"$OUT/idle.json" 2>"$OUT/idle.log" &
    IDLE_PID=$!
    for _ in $(seq 120); do
        up=$(ss -tnH state established "( sport = :$PORT )" | wc -l)
        [ "$up" -ge "$IDLE" ] && break
        sleep 1
    done
    echo "idle sockets up: $up" >&2
fi
taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" chat --url "ws://127.0.0.1:$PORT/ws" --data "$OUT/data" \
    --visitors "$VISITORS" --agents "$AGENTS" --rate "$RATE" --duration "$DURATION" --warmup 5 \
    --sources 127.0.0.1,127.0.0.2 --server-pid "$SERVER_PID" --visitor-tokens --cpu "$CLIENT_CPU" \
    --fsync-probe 0 >"$OUT/client.json" 2>"$OUT/client.log" &
client=$!
if [ "$PERF_SCHED" != 0 ]; then
    # The middle of the window: setup takes a few seconds, warm-up 5.
    sleep $((DURATION / 2 + 10))
    perf sched record -a -o "$OUT/sched.data" -- sleep "$PERF_SCHED" 2>"$OUT/perf.log"
fi
wait "$client"
curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/metrics.txt" || true
cleanup
# The store's size, for the bytes on disk per message of the run.
du -sb "$OUT/data" | cut -f1 >"$OUT/data-bytes" || true
rm -rf "$OUT/data"

if [ "$PERF_SCHED" != 0 ]; then
    perf sched timehist -i "$OUT/sched.data" >"$OUT/timehist.txt" 2>/dev/null
    python3 - "$OUT/timehist.txt" >"$OUT/sched-summary.txt" <<'EOF'
import collections, sys
runs = collections.defaultdict(list)
long_runs = collections.Counter()
by_cpu = collections.defaultdict(list)  # (switched out at s, thread, delay ms, run ms)
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) < 6 or not f[0][0].isdigit():
        continue
    try:
        at, delay, run = float(f[0]), float(f[-2]), float(f[-1])
    except ValueError:
        continue
    name = f[2].split("[")[0]
    runs[name].append((delay, run))
    by_cpu[f[1]].append((at, name, delay, run))
    if run > 2:
        long_runs[f[1]] += 1
print("thread: wake-ups, scheduling delay p50 / p99 / max ms, longest run ms, CPU ms")
for name, v in sorted(runs.items(), key=lambda kv: -sum(r for _, r in kv[1]))[:12]:
    d = sorted(x for x, _ in v)
    q = lambda p: d[min(len(d) - 1, int(p * len(d)))]
    print(f"{name:20s} {len(v):7d}  {q(.5):.3f} / {q(.99):.3f} / {d[-1]:.3f}  {max(r for _, r in v):7.3f}  {sum(r for _, r in v):7.0f}")
print("runs over 2 ms by CPU:", dict(sorted(long_runs.items())))
# A wait over 2 ms for the CPU: did another task hold it, or did it sit
# idle with the thread runnable? In a guest the latter is the virtual CPU
# itself not running (the host's scheduling, or its wake-up of a halted
# vCPU), which nothing in the guest can shorten.
waits = collections.defaultdict(lambda: [0, 0.0])
for cpu, events in by_cpu.items():
    for i, (at, name, delay, run) in enumerate(events):
        if name == "<idle>" or delay <= 2:
            continue
        start, end = at - (run + delay) / 1e3, at - run / 1e3
        held = {"idle": 0.0, "task": 0.0}
        j = i - 1
        while j >= 0 and events[j][0] > start:
            out_at, other, _, other_run = events[j]
            overlap = min(out_at, end) - max(out_at - other_run / 1e3, start)
            if overlap > 0:
                held["idle" if other == "<idle>" else "task"] += overlap
            j -= 1
        key = (cpu, name, "the CPU idle (the host's)" if held["idle"] > held["task"] else "another task ran")
        waits[key][0] += 1
        waits[key][1] = max(waits[key][1], delay)
print("waits over 2 ms: CPU, thread, what held the CPU, count, longest ms")
for (cpu, name, held), (n, longest) in sorted(waits.items()):
    print(f"{cpu} {name:20s} {held:26s} {n:4d} {longest:7.3f}")
EOF
    cat "$OUT/sched-summary.txt" >&2
fi
python3 - "$OUT/client.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
d, s = r["delivery_latency_us"], r["delivery_split_at_home_us"]
ms = lambda v: f"{v / 1e3:.2f}"
print(f"delivery p50 {ms(d['p50'])} p99 {ms(d['p99'])} p99.9 {ms(d['p999'])} ms; "
      f"p99 send → ts {ms(s['to_home']['p99'])}, ts → agent {ms(s['from_home']['p99'])} ms; "
      f"steal by CPU {', '.join(f'{100 * x:.1f}%' for x in r['steal_by_cpu'])}")
EOF
