#!/usr/bin/env bash
# Measures kefu's /ws/echo and the baseline echo servers (benches/:
# echo-tungstenite, echo-fastws) side by side in one run, with the same
# clients and the same pinning. Every server is driven by every client:
# kefu-bench (ours) and the independent load clients in benches/
# (load-tungstenite, load-fastws), so no figure rests on kefu's own client.
# The server's CPU per message is measured here from /proc for every pair.
#
# Servers: kefu (server.uring_taskrun = "defer", the default), kefu-coop,
# kefu-default (the other ring setups), kefu-epoll (server.io = "epoll"),
# kefu-thp (server.transparent_huge_pages = true, the heap on huge pages),
# kefu-ring (server.socket_io = "ring": the ring's Recv and Send where the
# default reads and writes a ready socket by system calls),
# kefu-oneshot and kefu-multishot (server.uring_poll: a poll for input per
# wait, or one per connection),
# kefu-before (the kefu binary named by $KEFU_BEFORE_BIN: another build, for
# a before/after comparison in one run),
# fastws, tungstenite, and the io_uring probes uring-poll and uring-multishot
# (benches/src/bin/echo-uring.rs: no runtime; kefu's operations per echo, and
# a multishot receive into a provided-buffer ring).
#
#   - throughput and latency: server pinned to one core, client to the other
#     (taskset), 100 connections x 512 B and 500 connections x 16 KiB, closed
#     loop (one message in flight per connection);
#   - memory: a fresh server, N idle connections (--idle-connections) over three source
#     addresses, server RSS before and after.
#
# The machine is shared (other people compile on it), so before each run the
# script waits until no compiler is running, and kefu-bench itself reports
# how busy each core was and how much CPU other processes took during the
# window ("other_cpu_cores"); a contended run says so on stderr.
#
# Results: one JSON line per run in $OUT/echo.jsonl and $OUT/idle.jsonl, and
# a table at the end.
#
# Usage: tools/bench-baselines.sh [--no-build] [--out DIR] [--servers "kefu kefu-coop fastws"]
#                                 [--clients "kefu-bench tungstenite fastws"]
#                                 [--scenarios "100x512 1000x64 500x16384"]
#                                 [--duration S] [--warmup S] [--idle-connections N]
#                                 [--client-cpu N] [--server-cpu N] [--quiet-wait S]
#                                 [--skip-echo] [--skip-idle] [--repeat N] [--interleave]
#
# Each echo scenario runs --repeat times (default 3); the table shows the
# run with the median rate among those that were not contended. By default
# a server runs all its cells before the next starts; --interleave runs
# --repeat rounds instead, each server in turn in every round, for a
# before/after comparison that host drift during the run cannot tilt.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
OUT=$REPO/target-bench/baselines
SERVERS="kefu fastws tungstenite"
CLIENTS="kefu-bench tungstenite fastws"
DURATION=10
WARMUP=2
IDLE_CONNECTIONS=10000
IDLE_HOLD=10
CLIENT_CPU=0
SERVER_CPU=1
QUIET_WAIT=900
PORT=9101
SKIP_ECHO=0
SKIP_IDLE=0
REPEAT=3
INTERLEAVE=0
# connections size pipeline
SCENARIOS=("100 512 1" "1000 64 1" "500 16384 1")

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --out) OUT=$2; shift ;;
        --servers) SERVERS=$2; shift ;;
        --clients) CLIENTS=$2; shift ;;
        --scenarios)
            SCENARIOS=()
            for sc in $2; do SCENARIOS+=("${sc%x*} ${sc#*x} 1"); done
            shift ;;
        --duration) DURATION=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --idle-connections) IDLE_CONNECTIONS=$2; shift ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        --quiet-wait) QUIET_WAIT=$2; shift ;;
        --skip-echo) SKIP_ECHO=1 ;;
        --skip-idle) SKIP_IDLE=1 ;;
        --repeat) REPEAT=$2; shift ;;
        --interleave) INTERLEAVE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

BIN=$TARGET_DIR/release
mkdir -p "$OUT"
if [ "$BUILD" = 1 ]; then
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -j2 -p kefu-benches -p kefu-bench -p kefu-gateway)
fi

# shellcheck source=tools/bench-lib.sh
source "$REPO/tools/bench-lib.sh"
trap stop_server EXIT

# kefu is measured exactly like the baselines: one shard on the server core,
# its diagnostic echo endpoint, a fresh data directory.
url_of() {
    case "$1" in
        kefu*) echo "ws://127.0.0.1:$PORT/ws/echo" ;;
        *) echo "ws://127.0.0.1:$PORT/" ;;
    esac
}

start_server() {
    local name=$1
    if [[ "$name" == kefu* ]]; then
        local data ring=() variant=${name#kefu} bin=$BIN/kefu
        data=$(mktemp -d)
        case "$variant" in
            "") ;;
            -before) bin=${KEFU_BEFORE_BIN:?kefu-before needs KEFU_BEFORE_BIN, the kefu binary of the other build} ;;
            -epoll) ring=(KEFU_SERVER_IO=epoll) ;;
            -coop | -default) ring=(KEFU_SERVER_URING_TASKRUN="${variant#-}") ;;
            -thp) ring=(KEFU_SERVER_TRANSPARENT_HUGE_PAGES=true) ;;
            -ring) ring=(KEFU_SERVER_SOCKET_IO=ring) ;;
            -oneshot | -multishot) ring=(KEFU_SERVER_URING_POLL="${variant#-}") ;;
            *) echo "unknown kefu variant: $name" >&2; exit 2 ;;
        esac
        env "${ring[@]}" taskset -c "$SERVER_CPU" "$bin" serve --echo --shards 1 --listen "127.0.0.1:$PORT" \
            --admin-listen "127.0.0.1:$((PORT + 1))" --data "$data" 2>>"$OUT/server-$name.log" &
    elif [[ "$name" == uring-* ]]; then
        taskset -c "$SERVER_CPU" "$BIN/echo-uring" --mode "${name#uring-}" --listen "127.0.0.1:$PORT" \
            2>>"$OUT/server-$name.log" &
    else
        taskset -c "$SERVER_CPU" "$BIN/echo-$name" --listen "127.0.0.1:$PORT" 2>>"$OUT/server-$name.log" &
    fi
    SERVER_PID=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "echo-$name did not start listening on 127.0.0.1:$PORT" >&2
    exit 1
}

# A closed-loop run of one of the independent clients (benches/load-*),
# with the server's CPU (from /proc) and everyone else's over the window.
independent_run() { # server client connections size
    local name=$1 client=$2 conns=$3 size=$4 result s0 s1 b0 t0 b1 t1
    result=$(mktemp)
    taskset -c "$CLIENT_CPU" "$BIN/load-$client" --url "$(url_of "$name")" --label "$name" \
        --connections "$conns" --size "$size" --duration "$DURATION" --warmup "$WARMUP" \
        --sources 127.0.0.1,127.0.0.2,127.0.0.3 >"$result" &
    local client_pid=$!
    sleep "$WARMUP"
    # The client times its own window (and reports its own CPU); these
    # samples bracket it to within a few ms.
    s0=$(proc_ticks "$SERVER_PID"); read -r b0 t0 < <(host_ticks)
    sleep "$DURATION"
    s1=$(proc_ticks "$SERVER_PID"); read -r b1 t1 < <(host_ticks)
    wait "$client_pid" || echo "WARNING: load-$client against $name failed" >&2
    python3 - "$result" "$((s1 - s0))" "$((b1 - b0))" "$((t1 - t0))" "$(nproc)" "$(getconf CLK_TCK)" "$DURATION" \
        >>"$OUT/echo.jsonl" <<'PY'
import json, sys
path, srv, busy, total, cores, hz, window = sys.argv[1:]
r = json.loads(open(path).read())
srv, busy, total, cores, hz, window = int(srv), int(busy), int(total), int(cores), int(hz), float(window)
# host ticks are summed over every core; a process's are its own.
host_busy_cores = busy / max(total, 1) * cores
server_cores = srv / hz / window
r["client"] = r.pop("client").replace("tokio-tungstenite", "tungstenite").replace("fastwebsockets", "fastws")
r["pipeline"] = 1
r["latency_us"] = {"p50": r["p50_us"], "p99": r["p99_us"], "p999": r["p999_us"]}
r["server_cores_busy"] = server_cores
r["client_cores_busy"] = r["client_cpu_cores"]
r["server_cpu_us_per_msg"] = server_cores * 1e6 / r["msgs_per_s"] if r["msgs_per_s"] else None
r["other_cpu_cores"] = max(0.0, host_busy_cores - server_cores - r["client_cores_busy"])
print(json.dumps(r))
PY
    rm -f "$result"
}

# utime + stime of a process, in clock ticks.
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One echo run: server $1 (running) under client $2, $3 connections of $4
# bytes, pipeline $5, run $6.
echo_run() {
    local name=$1 client=$2 conns=$3 size=$4 pipeline=$5 run=$6
    wait_quiet
    echo "== echo-$name <- $client: $conns x $size B, pipeline $pipeline (run $run/$REPEAT)" >&2
    if [ "$client" = kefu-bench ]; then
        taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" echo --url "$(url_of "$name")" \
            --connections "$conns" --size "$size" --pipeline "$pipeline" \
            --duration "$DURATION" --warmup "$WARMUP" --cpu "$CLIENT_CPU" \
            --server-pid "$SERVER_PID" |
            python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["server"]=sys.argv[1]; r["client"]="kefu-bench"; print(json.dumps(r))' "$name" \
                >>"$OUT/echo.jsonl"
    else
        independent_run "$name" "$client" "$conns" "$size"
    fi
}

if [ "$SKIP_ECHO" = 0 ] && [ "$INTERLEAVE" = 1 ]; then
    # Rounds: every server takes its turn (a fresh process) in each, so a
    # host that drifts during the run weighs on every server alike.
    for run in $(seq "$REPEAT"); do
        for name in $SERVERS; do
            start_server "$name"
            for scenario in "${SCENARIOS[@]}"; do
                read -r conns size pipeline <<<"$scenario"
                for client in $CLIENTS; do echo_run "$name" "$client" "$conns" "$size" "$pipeline" "$run"; done
            done
            stop_server
        done
    done
fi

for name in $SERVERS; do
    if [ "$SKIP_ECHO" = 0 ] && [ "$INTERLEAVE" = 0 ]; then
        start_server "$name"
        for scenario in "${SCENARIOS[@]}"; do
            read -r conns size pipeline <<<"$scenario"
            for run in $(seq "$REPEAT"); do
                for client in $CLIENTS; do echo_run "$name" "$client" "$conns" "$size" "$pipeline" "$run"; done
            done
        done
        stop_server
    fi
    if [ "$SKIP_IDLE" = 0 ]; then
        # A fresh server, so its RSS before is a server that never held a
        # connection.
        start_server "$name"
        sleep 1
        wait_quiet
        echo "== echo-$name: $IDLE_CONNECTIONS idle connections" >&2
        "$BIN/kefu-bench" idle --url "$(url_of "$name")" --connections "$IDLE_CONNECTIONS" \
            --sources 127.0.0.1,127.0.0.2,127.0.0.3 --hold "$IDLE_HOLD" --server-pid "$SERVER_PID" |
            python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["server"]=sys.argv[1]; print(json.dumps(r))' "$name" \
                >>"$OUT/idle.jsonl" || echo "WARNING: idle run against echo-$name fell short (see above)" >&2
        stop_server
    fi
done

python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def rows(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip()]
echo = rows("echo.jsonl")
if echo:
    groups = {}
    for r in echo:
        groups.setdefault((r.get("server", "?"), r.get("client", "kefu-bench"), r["connections"], r["size"], r["pipeline"]), []).append(r)
    print(f"{'server':<12} {'client':<11} {'conns':>5} {'size':>6} {'K':>3} {'runs':>4} {'msg/s':>9} {'p50 µs':>8} {'p99 µs':>8} "
          f"{'cli core':>8} {'srv core':>8} {'cli µs/m':>8} {'srv µs/m':>8} {'other':>6} {'err':>4}")
    for (server, client, conns, size, k), runs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][1], kv[0][0])):
        clean = [r for r in runs if r.get("other_cpu_cores", 0) <= 0.1] or runs
        clean.sort(key=lambda r: r["msgs_per_s"])
        r = clean[len(clean) // 2]
        pct = lambda v: "-" if v is None else f"{100*v:.0f}%"
        num = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"{server:<12} {client:<11} {conns:>5} {size:>6} {k:>3} {len(clean):>2}/{len(runs):<1} {r['msgs_per_s']:>9.0f} "
              f"{r['latency_us']['p50']:>8.0f} {r['latency_us']['p99']:>8.0f} "
              f"{pct(r.get('client_cores_busy')):>8} {pct(r.get('server_cores_busy')):>8} "
              f"{num(r.get('client_cpu_us_per_msg')):>8} {num(r.get('server_cpu_us_per_msg')):>8} "
              f"{r.get('other_cpu_cores', 0):>6.2f} {r['errors']:>4}")
idle = rows("idle.jsonl")
if idle:
    print(f"{'server':<12} {'held':>6} {'B/conn':>8} {'KiB/conn':>8} {'settled B/conn':>14}")
    for r in idle:
        print(f"{r.get('server','?'):<12} {r['connected']:>6} {r['bytes_per_conn'] or 0:>8.0f} "
              f"{r['kb_per_conn'] or 0:>8.1f} {r['bytes_per_conn_settled'] or 0:>14.0f}")
EOF
