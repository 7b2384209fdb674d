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
#     if the storage bench is built (see bench-soak.sh).
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
        status=0
        if [ "$client" = kefu-bench ]; then
            line=$(taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" chat "${common[@]}" --visitor-tokens \
                --cpu "$CLIENT_CPU" --fsync-probe 0) || status=$?
        else
            line=$(taskset -c "$CLIENT_CPU" "$BIN/chat-tungstenite" "${common[@]}") || status=$?
        fi
        stop_server
        # Where the run's bytes on disk went, if the storage bench is built
        # (`cargo bench -p kefu-storage --bench storage --no-run`).
        if [ -n "$DISK_TOOL" ]; then
            "$DISK_TOOL" disk --analyze "$data" >"$OUT/disk-$client-$run.txt" 2>&1 ||
                echo "WARNING: the disk analysis of $client run $run failed" >&2
        fi
        rm -rf "$data"
        [ "$status" = 0 ] || echo "WARNING: $client run $run exited with $status" >&2
        [ -n "$line" ] || continue
        python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["bench_client"]=sys.argv[2]; r["run"]=int(sys.argv[3]); print(json.dumps(r))' \
            "$line" "$client" "$run" >>"$OUT/clients.jsonl"
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
