#!/usr/bin/env bash
# Visitor -> agent delivery latency at a fixed rate (issue 3, item 6):
# kefu-bench chat against a real kefu gateway.
#
#   - release builds of kefu and kefu-bench;
#   - per repetition, a fresh data directory and a fresh gateway pinned to
#     one core (taskset, --shards 1 unless --shards says otherwise: more
#     shards share that core; the storage writer thread shares it too) with
#     the per-connection rate limit lifted;
#   - kefu-bench chat pinned to the other core: 20 agents, 2000 visitors
#     over two source addresses, 5000 msg/s open loop, 2 s warmup, 10 s
#     measured, latency from each message's scheduled send time;
#   - the medians over the repetitions (each figure's own median).
#
# Targets (issue 3): delivery p50 <= 2 ms, p99 <= 10 ms.
#
# --hook runs the same thing with the OnMessage hook on: a business system
# that allows every message at once (the hook_allow example, pinned to
# --hook-cpu, the client's core by default) is started, and every visitor
# message waits for its verdict before it is stored. Comparing a run with
# and without --hook gives what a hook round trip adds (issue 8). The hook
# server's CPU is reported apart (helper_cpu_cores), not as contention.
#
# --attachment-share F (0..1) and --attachment-bytes N run the image mix
# (issue 11): that share of the sends also carries an N-byte attachment,
# and the delivery and ack latencies of each kind are reported apart. The
# gateway's per-connection attachment budget
# (limits.attachment_bytes_per_min) is lifted with the other limits, so the
# run measures the gateway, not its limiter. --target-p50-ms and
# --target-p99-ms set the delivery percentiles the summary checks (default
# 2 and 10 ms, issue 3's; the image mix's target is p99 200 ms). --html writes each run's report to $OUT/report-N.html.
#
# The machine is shared, so before each run the script waits until no one
# else is using the CPUs, and the report's other_cpu_cores says how much
# CPU others took during the window anyway: a run where others took more
# than --max-other cores (default 0.15) is kept in chat.jsonl but marked
# contended and run again, up to 2 x --repeat attempts; the medians are
# over the uncontended runs (over all of them if none was).
#
# Usage: tools/bench-chat.sh [--no-build] [--out DIR] [--repeat N]
#                            [--visitors N] [--agents N] [--rate R] [--size B]
#                            [--duration S] [--warmup S] [--subprotocol json|fb]
#                            [--client-cpu N] [--server-cpu N] [--quiet-wait S]
#                            [--max-other CORES] [--shards N]
#                            [--hook] [--hook-cpu N]
#                            [--attachment-share F] [--attachment-bytes N]
#                            [--target-p50-ms MS] [--target-p99-ms MS] [--html]
#
# Results: one JSON line per run in $OUT/chat.jsonl, gateway logs in
# $OUT/gateway-N.log, and a summary at the end.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
OUT=$REPO/target-bench/chat
REPEAT=3
VISITORS=2000
AGENTS=20
RATE=5000
SIZE=100
DURATION=10
WARMUP=2
SUBPROTOCOL=json
SOURCES=127.0.0.1,127.0.0.2
CLIENT_CPU=0
SERVER_CPU=1
QUIET_WAIT=900
MAX_OTHER=0.15
SHARDS=1
PORT=9201
ADMIN_PORT=9202
HOOK=0
HOOK_CPU=
HOOK_PORT=9203
ATTACHMENT_SHARE=0
ATTACHMENT_BYTES=200000
TARGET_P50_MS=2
TARGET_P99_MS=10
HTML=0

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --out) OUT=$2; shift ;;
        --repeat) REPEAT=$2; shift ;;
        --visitors) VISITORS=$2; shift ;;
        --agents) AGENTS=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --size) SIZE=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --subprotocol) SUBPROTOCOL=$2; shift ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        --quiet-wait) QUIET_WAIT=$2; shift ;;
        --max-other) MAX_OTHER=$2; shift ;;
        --shards) SHARDS=$2; shift ;;
        --hook) HOOK=1 ;;
        --hook-cpu) HOOK_CPU=$2; shift ;;
        --attachment-share) ATTACHMENT_SHARE=$2; shift ;;
        --attachment-bytes) ATTACHMENT_BYTES=$2; shift ;;
        --target-p50-ms) TARGET_P50_MS=$2; shift ;;
        --target-p99-ms) TARGET_P99_MS=$2; shift ;;
        --html) HTML=1 ;;
        -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

BIN=$TARGET_DIR/release
mkdir -p "$OUT"
if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -j2 -p kefu-gateway -p kefu-bench)
    if [ "$HOOK" = 1 ]; then
        (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -j2 -p kefu-gateway --example hook_allow)
    fi
fi

# shellcheck source=tools/bench-lib.sh
source "$REPO/tools/bench-lib.sh"

HOOK_PID=
HOOK_ENV=()
HELPER=()
stop_hook() {
    if [ -n "$HOOK_PID" ]; then
        kill "$HOOK_PID" 2>/dev/null || true
        wait "$HOOK_PID" 2>/dev/null || true
        HOOK_PID=
    fi
}
trap 'stop_server; stop_hook' EXIT

if [ "$HOOK" = 1 ]; then
    taskset -c "${HOOK_CPU:-$CLIENT_CPU}" "$BIN/examples/hook_allow" "127.0.0.1:$HOOK_PORT" 2>"$OUT/hook.log" &
    HOOK_PID=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$HOOK_PORT") 2>/dev/null && break
        if ! kill -0 "$HOOK_PID" 2>/dev/null; then
            echo "hook_allow exited at start; see $OUT/hook.log" >&2
            exit 1
        fi
        sleep 0.05
    done
    HOOK_ENV=(KEFU_HOOKS_ENDPOINT="http://127.0.0.1:$HOOK_PORT" KEFU_HOOKS_ON_MESSAGE=true)
    HELPER=(--helper-pid "$HOOK_PID")
fi

start_server() {
    # The limit is per connection; each visitor sends RATE / VISITORS msg/s.
    # Thousands of visitors connect anonymously from a few addresses: the
    # per-address limits are lifted too.
    start_kefu "$1" "$2" KEFU_LIMITS_MESSAGES_PER_S=100000 KEFU_LIMITS_BURST=100000 "${HOOK_ENV[@]}" \
        KEFU_LIMITS_NEW_CONNECTIONS_BURST_PER_IP=1000000 KEFU_LIMITS_ANONYMOUS_PER_MIN_PER_IP=1000000 \
        KEFU_LIMITS_ATTACHMENT_BYTES_PER_MIN=$((64 << 30))
}


: >"$OUT/chat.jsonl"
clean=0
for run in $(seq $((2 * REPEAT))); do
    [ "$clean" -lt "$REPEAT" ] || break
    wait_quiet
    start_server "$OUT/data-$run" "$OUT/gateway-$run.log"
    echo "== chat run $run ($clean/$REPEAT clean so far): $VISITORS visitors, $AGENTS agents, $RATE msg/s, $SIZE B $SUBPROTOCOL, $SHARDS shard(s), hook $([ "$HOOK" = 1 ] && echo on || echo off)" >&2
    status=0
    MIX=()
    if [ "$ATTACHMENT_SHARE" != 0 ]; then
        MIX=(--attachment-share "$ATTACHMENT_SHARE" --attachment-bytes "$ATTACHMENT_BYTES")
    fi
    REPORT=()
    if [ "$HTML" = 1 ]; then
        REPORT=(--html "$OUT/report-$run.html")
    fi
    line=$(taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" chat --url "ws://127.0.0.1:$PORT/ws" --data "$OUT/data-$run" \
        --visitors "$VISITORS" --agents "$AGENTS" --rate "$RATE" --size "$SIZE" \
        --duration "$DURATION" --warmup "$WARMUP" --subprotocol "$SUBPROTOCOL" \
        --sources "$SOURCES" --cpu "$CLIENT_CPU" --server-pid "$SERVER_PID" "${HELPER[@]}" "${MIX[@]}" \
        "${REPORT[@]}") || status=$?
    stop_server
    rm -rf "$OUT/data-$run"
    if [ "$status" != 0 ]; then
        echo "WARNING: run $run exited with $status (see above)" >&2
    fi
    [ -n "$line" ] || continue
    if python3 -c 'import json,sys; sys.exit(0 if json.loads(sys.argv[1])["other_cpu_cores"] <= float(sys.argv[2]) else 1)' \
        "$line" "$MAX_OTHER"; then
        clean=$((clean + 1))
        contended=false
    else
        echo "WARNING: run $run was contended (other processes used CPU); it does not count" >&2
        contended=true
    fi
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["run"]=int(sys.argv[2]); r["contended"]=sys.argv[3]=="true"; print(json.dumps(r))' \
        "$line" "$run" "$contended" >>"$OUT/chat.jsonl"
done

python3 - "$OUT/chat.jsonl" "$TARGET_P50_MS" "$TARGET_P99_MS" <<'EOF'
import json, statistics, sys
all_runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
if not all_runs:
    sys.exit("no runs completed")
runs = [r for r in all_runs if not r["contended"]] or all_runs
if len(runs) < len(all_runs):
    print(f"({len(all_runs) - len(runs)} contended run(s) left out)")
def med(f):
    vals = [f(r) for r in runs]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
def threads(r, which, *kinds):
    t = r.get("server_threads_cores")
    return t and sum(v[k] for name, v in t.items() if which(name) for k in kinds)
def fmt(v, spec=".0f"):
    return "-" if v is None else format(v, spec)
rows = [
    ("sent msg/s", lambda r: r["send_rate"], ".0f"),
    ("delivered msg/s", lambda r: r["delivered_per_s"], ".0f"),
    ("delivery p50 µs", lambda r: r["delivery_latency_us"]["p50"], ".0f"),
    ("delivery p90 µs", lambda r: r["delivery_latency_us"]["p90"], ".0f"),
    ("delivery p99 µs", lambda r: r["delivery_latency_us"]["p99"], ".0f"),
    ("delivery p99.9 µs", lambda r: r["delivery_latency_us"]["p999"], ".0f"),
    ("delivery max µs", lambda r: r["delivery_latency_us"]["max"], ".0f"),
    ("ack p50 µs", lambda r: r["ack_latency_us"]["p50"], ".0f"),
    ("ack p90 µs", lambda r: r["ack_latency_us"]["p90"], ".0f"),
    ("ack p99 µs", lambda r: r["ack_latency_us"]["p99"], ".0f"),
    ("ack p99.9 µs", lambda r: r["ack_latency_us"]["p999"], ".0f"),
    ("ack max µs", lambda r: r["ack_latency_us"]["max"], ".0f"),
    ("sent with attachment", lambda r: r.get("with_attachment") and r["with_attachment"]["sent"], ".0f"),
    ("delivery p50 µs, with attachment", lambda r: r.get("with_attachment") and r["with_attachment"]["delivery_latency_us"]["p50"], ".0f"),
    ("delivery p99 µs, with attachment", lambda r: r.get("with_attachment") and r["with_attachment"]["delivery_latency_us"]["p99"], ".0f"),
    ("delivery p50 µs, text only", lambda r: r.get("text_only") and r["text_only"]["delivery_latency_us"]["p50"], ".0f"),
    ("delivery p99 µs, text only", lambda r: r.get("text_only") and r["text_only"]["delivery_latency_us"]["p99"], ".0f"),
    ("ack p99 µs, with attachment", lambda r: r.get("with_attachment") and r["with_attachment"]["ack_latency_us"]["p99"], ".0f"),
    ("ack p99 µs, text only", lambda r: r.get("text_only") and r["text_only"]["ack_latency_us"]["p99"], ".0f"),
    ("rate_limited", lambda r: r["rate_limited"], ".0f"),
    ("ack min µs", lambda r: r["ack_latency_us"]["min"], ".0f"),
    ("ack bursts/s (≈ group commits/s)", lambda r: r["ack_bursts_per_s"], ".0f"),
    ("acks per burst", lambda r: r["acks_per_burst"], ".1f"),
    ("send lag p99 µs", lambda r: r["send_lag_us"]["p99"], ".0f"),
    ("undelivered", lambda r: r["undelivered"], ".0f"),
    ("unacked", lambda r: r["unacked"], ".0f"),
    ("errors (frames + connections)", lambda r: sum(r["error_codes"].values()) + sum(r["connection_errors"].values()), ".0f"),
    ("client CPU cores", lambda r: r["client_cpu_cores"], ".2f"),
    ("client CPU µs/msg", lambda r: r["client_cpu_us_per_msg"], ".1f"),
    ("server CPU cores", lambda r: r["server_cpu_cores"], ".2f"),
    ("server core busy", lambda r: r["server_cores_busy"], ".2f"),
    ("server CPU µs/msg", lambda r: r["server_cpu_us_per_msg"], ".1f"),
    ("server shard thread cores", lambda r: threads(r, lambda k: "shard" in k, "user", "system"), ".2f"),
    ("  of which user", lambda r: threads(r, lambda k: "shard" in k, "user"), ".2f"),
    ("server storage thread cores", lambda r: threads(r, lambda k: "storage" in k, "user", "system"), ".2f"),
    ("  of which user", lambda r: threads(r, lambda k: "storage" in k, "user"), ".2f"),
    ("server RSS MiB", lambda r: r["server_rss_bytes"] and r["server_rss_bytes"] / 2**20, ".1f"),
    ("hook server CPU cores", lambda r: r.get("helper_cpu_cores"), ".2f"),
    ("other CPU cores", lambda r: r["other_cpu_cores"], ".2f"),
    ("fsync probe p50 µs", lambda r: r["fsync_probe_us"] and r["fsync_probe_us"]["p50"], ".0f"),
    ("fsync probe p99 µs", lambda r: r["fsync_probe_us"] and r["fsync_probe_us"]["p99"], ".0f"),
    ("setup s", lambda r: r["setup_s"], ".1f"),
]
for r in runs:
    if r.get("server_threads_cores"):
        busy = ", ".join(f"{k} {v['user'] + v['system']:.2f} ({v['user']:.2f} user)"
                         for k, v in sorted(r["server_threads_cores"].items()) if v["user"] + v["system"] >= 0.005)
        print(f"run {r.get('run')}: server threads (cores): {busy}")
print(f"\n| figure | median of {len(runs)} | runs |")
print("| --- | ---: | --- |")
for name, f, spec in rows:
    print(f"| {name} | {fmt(med(f), spec)} | {' / '.join(fmt(f(r), spec) for r in runs)} |")
p50 = med(lambda r: r["delivery_latency_us"]["p50"])
p99 = med(lambda r: r["delivery_latency_us"]["p99"])
target_p50, target_p99 = float(sys.argv[2]) * 1000, float(sys.argv[3]) * 1000
ok = p50 <= target_p50 and p99 <= target_p99
print(f"\ntarget delivery p50 <= {target_p50:.0f} µs, p99 <= {target_p99:.0f} µs: median p50 {p50:.0f} µs, p99 {p99:.0f} µs -> "
      + ("MET" if ok else "MISSED"))
EOF
