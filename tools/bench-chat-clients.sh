#!/usr/bin/env bash
# Chat delivery latency measured by two clients in one run: kefu's own
# (kefu-bench chat: kefu's codec on monoio) and one that shares no code
# with kefu (chat-tungstenite, benches/src/bin/chat-tungstenite.rs:
# tokio-tungstenite, serde_json and its own HS256 tokens), so that a chat
# latency figure is not a figure about kefu's client.
#
#   - release builds of kefu, kefu-bench and chat-tungstenite;
#   - per repetition and client, alternating, a fresh data directory and
#     a fresh gateway pinned to --server-cpu (1) with the per-connection
#     rate and per-address connection limits lifted;
#   - the client pinned to --client-cpu (0): --agents agents online, then
#     --visitors visitors with tokens, each assigned, --rate msg/s open
#     loop over the window (after --warmup);
#   - the medians per client at the end;
#   - where each run's bytes on disk went, in $OUT/disk-CLIENT-RUN.txt,
#     if the storage bench is built (see bench-soak.sh);
#   - the gateway's own view of each run: its /metrics at the end in
#     $OUT/metrics-CLIENT-RUN.txt, from which the summary takes the share
#     of deliveries the gateway queued more than 10 and 25 ms after their
#     ts (kefu_delivery_latency_seconds: the tail inside the server, apart
#     from the client's and the sockets'), and every thread's second in
#     $OUT/threads-CLIENT-RUN/ (tools/thread-sampler.py: running, waiting
#     for a CPU, blocked on the disk), with the worst seconds in
#     $OUT/stalls-CLIENT-RUN.jsonl.
#
# The two clients time differently at the edges: kefu-bench from each
# message's scheduled send (its timer is precise to tens of µs),
# chat-tungstenite from when it hands the message to the socket (tokio's
# timer wakes on whole milliseconds; it reports that lag apart).
#
# Both clients also time each --slice seconds of the window apart (60 by
# default); with more than one slice the summary sets the first beside the
# last, to show a latency that climbs as the log grows.
#
# Usage: tools/bench-chat-clients.sh [--no-build] [--out DIR] [--repeat N]
#            [--visitors N] [--agents N] [--rate R] [--duration S]
#            [--warmup S] [--shards N] [--client-cpu N] [--server-cpu N]
#            [--quiet-wait S] [--slice S] [--clients "kefu-bench tungstenite"]
#
# Results: one JSON line per run in $OUT/clients.jsonl (with "bench_client"
# naming the client), gateway logs in $OUT/gateway-CLIENT-N.log.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
OUT=$REPO/target-bench/chat-clients
REPEAT=3
VISITORS=2000
AGENTS=20
RATE=5000
DURATION=60
WARMUP=5
SHARDS=1
CLIENT_CPU=0
SERVER_CPU=1
QUIET_WAIT=600
SLICE=60
CLIENTS="kefu-bench tungstenite"
OPTIONS="OUT REPEAT VISITORS AGENTS RATE DURATION WARMUP SHARDS CLIENT_CPU SERVER_CPU QUIET_WAIT SLICE CLIENTS"
PORT=9261
ADMIN_PORT=9262

# shellcheck source=tools/bench-lib.sh
source "$REPO/tools/bench-lib.sh"
parse_options "$@"

BIN=$TARGET_DIR/release
mkdir -p "$OUT"
if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -j2 -p kefu-gateway -p kefu-bench \
        -p kefu-benches --bin kefu --bin kefu-bench --bin chat-tungstenite)
fi

trap stop_server EXIT
DISK_TOOL=$(ls -t "$TARGET_DIR"/release/deps/storage-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
[ -n "$DISK_TOOL" ] || echo "NOTE: the storage bench is not built: no disk-CLIENT-RUN.txt" >&2

: >"$OUT/clients.jsonl"
for run in $(seq "$REPEAT"); do
    for client in $CLIENTS; do
        wait_quiet
        data=$OUT/data-$client-$run
        start_kefu "$data" "$OUT/gateway-$client-$run.log" "${LIFTED_LIMITS[@]}"
        echo "== run $run/$REPEAT, $client: $VISITORS visitors, $AGENTS agents, $RATE msg/s, ${DURATION} s" >&2
        common=(--url "ws://127.0.0.1:$PORT/ws" --data "$data" --visitors "$VISITORS" --agents "$AGENTS"
            --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" --slice "$SLICE" --sources 127.0.0.1,127.0.0.2
            --server-pid "$SERVER_PID")
        python3 "$REPO/tools/thread-sampler.py" --pid "$SERVER_PID" --name kefu-bench --name chat-tungstenite \
            --out "$OUT/threads-$client-$run" >"$OUT/stalls-$client-$run.jsonl" &
        sampler=$!
        status=0
        if [ "$client" = kefu-bench ]; then
            line=$(taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" chat "${common[@]}" --visitor-tokens \
                --cpu "$CLIENT_CPU" --fsync-probe 0) || status=$?
        else
            line=$(taskset -c "$CLIENT_CPU" "$BIN/chat-tungstenite" "${common[@]}") || status=$?
        fi
        curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/metrics-$client-$run.txt" ||
            echo "WARNING: no /metrics from the gateway after $client run $run" >&2
        stop_server
        # It ends by itself with the gateway.
        wait "$sampler" || echo "WARNING: the thread sampler of $client run $run failed" >&2
        # Where the run's bytes on disk went, if the storage bench is built
        # (`cargo bench -p kefu-storage --bench storage --no-run`).
        if [ -n "$DISK_TOOL" ]; then
            "$DISK_TOOL" disk --analyze "$data" >"$OUT/disk-$client-$run.txt" 2>&1 ||
                echo "WARNING: the disk analysis of $client run $run failed" >&2
        fi
        rm -rf "$data"
        [ "$status" = 0 ] || echo "WARNING: $client run $run exited with $status" >&2
        [ -n "$line" ] || continue
        python3 - "$line" "$client" "$run" "$OUT/metrics-$client-$run.txt" >>"$OUT/clients.jsonl" <<'EOF'
import json, re, sys
r = json.loads(sys.argv[1])
r["bench_client"], r["run"] = sys.argv[2], int(sys.argv[3])
# The gateway's histogram of ts -> msg queued on the agent's connection
# (cumulative buckets): the share of deliveries past 10 and 25 ms.
buckets = {}
try:
    for line in open(sys.argv[4]):
        m = re.match(r'kefu_delivery_latency_seconds_bucket\{le="([^"]+)"\} (\d+)', line)
        if m:
            buckets[m[1]] = int(m[2])
except OSError:
    pass
total = buckets.get("+Inf")
if total:
    for ms, le in ((10, "0.01"), (25, "0.025")):
        if le in buckets:
            r[f"server_queued_over_{ms}ms_share"] = (total - buckets[le]) / total
print(json.dumps(r))
EOF
    done
done

python3 - "$OUT/clients.jsonl" "$CLIENT_CPU" "$SERVER_CPU" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
def first_last(r, i):
    slices = r.get("delivery_by_slice") or []
    return slices[i]["delivery_latency_us"]["p99"] / 1e3 if len(slices) > 1 else None
def fmt(v, spec):
    return "-" if v is None else format(v, spec)
rows = [
    ("delivery p50 ms", lambda r: r["delivery_latency_us"]["p50"] / 1e3, ".2f"),
    ("delivery p99 ms", lambda r: r["delivery_latency_us"]["p99"] / 1e3, ".2f"),
    ("delivery p99.9 ms", lambda r: r["delivery_latency_us"]["p999"] / 1e3, ".2f"),
    # With more than one --slice in the window: its first and last slices.
    ("delivery p99 ms, first slice", lambda r: first_last(r, 0), ".2f"),
    ("delivery p99 ms, last slice", lambda r: first_last(r, -1), ".2f"),
    # kefu-bench only: the delivery cut at the home's ts (±0.5 ms).
    ("delivery p99 ms, send → ts", lambda r: r["delivery_split_at_home_us"]["to_home"]["p99"] / 1e3, ".2f"),
    ("delivery p99 ms, ts → agent", lambda r: r["delivery_split_at_home_us"]["from_home"]["p99"] / 1e3, ".2f"),
    ("ack p99 ms", lambda r: r["ack_latency_us"]["p99"] / 1e3, ".2f"),
    # The gateway's own clock, ts -> queued on the agent's connection: the
    # share of deliveries past 10 and 25 ms, per thousand (≤ 1 at 25 ms is
    # a p99.9 within 25 ms inside the server).
    ("gateway: queued > 10 ms after ts, ‰", lambda r: 1e3 * r["server_queued_over_10ms_share"], ".2f"),
    ("gateway: queued > 25 ms after ts, ‰", lambda r: 1e3 * r["server_queued_over_25ms_share"], ".2f"),
    ("sent per s", lambda r: r["send_rate"], ".0f"),
    ("undelivered + unacked", lambda r: r["undelivered"] + r["unacked"], ".0f"),
    ("server CPU cores", lambda r: r.get("server_cpu_cores"), ".2f"),
    ("client CPU cores", lambda r: r.get("client_cpu_cores"), ".2f"),
    ("other CPU cores", lambda r: r.get("other_cpu_cores"), ".2f"),
    # kefu-bench only: the share of each CPU the hypervisor took (steal).
    ("host steal %, client CPU", lambda r: 100 * r["steal_by_cpu"][int(sys.argv[2])], ".1f"),
    ("host steal %, server CPU", lambda r: 100 * r["steal_by_cpu"][int(sys.argv[3])], ".1f"),
]
clients = ["kefu-bench", "tungstenite"]
print("\n| figure | " + " | ".join(f"{c} (median; runs)" for c in clients) + " |")
print("| --- |" + " ---: |" * len(clients))
for name, f, spec in rows:
    cells = []
    for c in clients:
        vals = []
        for r in runs:
            if r["bench_client"] != c:
                continue
            try:
                vals.append(f(r))
            except (KeyError, TypeError, IndexError):
                vals.append(None)
        cells.append(f"{fmt(med(vals), spec)} ({' / '.join(fmt(v, spec) for v in vals)})")
    print(f"| {name} | " + " | ".join(cells) + " |")
EOF
