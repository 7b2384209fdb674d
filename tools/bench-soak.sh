#!/usr/bin/env bash
# Memory and disk in steady state (issue 11, item 6): one long
# `kefu-bench chat` run against a fresh gateway, with the gateway's RSS
# and its database's size sampled every --sample seconds, then the same
# while it holds no connection at all (--idle seconds), then where the
# RSS sits (/proc/PID/smaps: the slab's mappings, the allocator's heap,
# the binary), every thread's second (tools/thread-sampler.py: running,
# waiting for a CPU, waiting on the disk, for the gateway and the client,
# so that a stall in the run can be told apart: the host's, the disk's,
# or the program's) and where the bytes on disk go (`cargo bench -p kefu-storage
# --bench storage -- disk --analyze DIR`, if built).
#
# Usage: tools/bench-soak.sh [--no-build] [--out DIR] [--visitors N] [--agents N]
#                            [--rate R] [--size B] [--duration S] [--warmup S]
#                            [--sample S] [--idle S] [--client-cpu N] [--server-cpu N]
#                            [--shards N] [-- VAR=value ...]
#
# Anything after `--` is passed to the gateway's environment (e.g.
# KEFU_STORAGE_CACHE_BYTES=67108864). Results in $OUT: rss.tsv (elapsed s,
# RSS KiB, database bytes, writes stored, dedupe slots held by the writer
# and by the readers), chat.json (kefu-bench's
# report), smaps.txt, disk.txt, gateway.log, threads.tsv and system.tsv
# (per second), stalls.jsonl (the seconds with the longest waits for a
# CPU) and
# load-start.txt (the Unix time kefu-bench started: its window begins
# setup_s + warmup_s later).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
OUT=$REPO/target-bench/soak
VISITORS=2000
AGENTS=20
RATE=2000
SIZE=100
DURATION=300
WARMUP=2
SAMPLE=10
IDLE=30
CLIENT_CPU=0
SERVER_CPU=1
SHARDS=1
PORT=9431
ADMIN_PORT=9432
QUIET_WAIT=0
EXTRA_ENV=()

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --out) OUT=$2; shift ;;
        --visitors) VISITORS=$2; shift ;;
        --agents) AGENTS=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --size) SIZE=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --sample) SAMPLE=$2; shift ;;
        --idle) IDLE=$2; shift ;;
        --client-cpu) CLIENT_CPU=$2; shift ;;
        --server-cpu) SERVER_CPU=$2; shift ;;
        --shards) SHARDS=$2; shift ;;
        --) shift; EXTRA_ENV=("$@"); break ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=tools/bench-lib.sh
source "$REPO/tools/bench-lib.sh"
mkdir -p "$OUT"
release_build kefu-gateway kefu-bench
SAMPLER_PID=
trap 'stop_server; [ -z "$SAMPLER_PID" ] || kill "$SAMPLER_PID" 2>/dev/null || true' EXIT

DATA=$OUT/data
start_kefu "$DATA" "$OUT/gateway.log" KEFU_LIMITS_MESSAGES_PER_S=100000 KEFU_LIMITS_BURST=100000 \
    KEFU_LIMITS_NEW_CONNECTIONS_BURST_PER_IP=1000000 KEFU_LIMITS_ANONYMOUS_PER_MIN_PER_IP=1000000 \
    "${EXTRA_ENV[@]}"

# Writes stored so far and the dedupe slots held in memory (writer,
# readers), from /metrics (0 where it does not answer).
counters() {
    curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null | awk '
        /^kefu_storage_writes_total /{w=$2} /^kefu_storage_writer_dedupe_entries /{dw=$2}
        /^kefu_storage_reader_dedupe_entries /{dr=$2}
        END{printf "%d\t%d\t%d", w, dw, dr}'
}

sample() {
    local t0=$SECONDS
    printf 'elapsed_s\trss_kib\tdb_bytes\tstorage_writes\twriter_dedupe_entries\treader_dedupe_entries\n' >"$OUT/rss.tsv"
    while kill -0 "$SERVER_PID" 2>/dev/null; do
        printf '%s\t%s\t%s\t%s\n' $((SECONDS - t0)) \
            "$(awk '/^VmRSS/{print $2}' "/proc/$SERVER_PID/status" 2>/dev/null || echo 0)" \
            "$(stat -c %s "$DATA/kefu.redb" 2>/dev/null || echo 0)" "$(counters)" >>"$OUT/rss.tsv"
        sleep "$SAMPLE"
    done
}
sample &
SAMPLER_PID=$!
python3 "$REPO/tools/thread-sampler.py" --pid "$SERVER_PID" --name kefu-bench --out "$OUT" >"$OUT/stalls.jsonl" &
THREADS_PID=$!

echo "== soak: $VISITORS visitors, $AGENTS agents, $RATE msg/s × $SIZE B for ${DURATION}s (+${WARMUP}s warm-up)" >&2
status=0
date +%s.%N >"$OUT/load-start.txt"
taskset -c "$CLIENT_CPU" "$BIN/kefu-bench" chat --url "ws://127.0.0.1:$PORT/ws" --data "$DATA" \
    --visitors "$VISITORS" --agents "$AGENTS" --rate "$RATE" --size "$SIZE" \
    --duration "$DURATION" --warmup "$WARMUP" --subprotocol json \
    --sources 127.0.0.1,127.0.0.2 --cpu "$CLIENT_CPU" --server-pid "$SERVER_PID" >"$OUT/chat.json" || status=$?
[ "$status" = 0 ] || echo "WARNING: kefu-bench exited with $status" >&2

echo "== no connections for ${IDLE}s" >&2
sleep "$IDLE"

python3 - "/proc/$SERVER_PID/smaps" >"$OUT/smaps.txt" <<'EOF'
import re, sys
maps, cur = [], None
for line in open(sys.argv[1]):
    m = re.match(r'^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$', line)
    if m:
        cur = {"size": int(m[2], 16) - int(m[1], 16), "name": m[3] or "[anon]", "rss": 0}
        maps.append(cur)
    elif line.startswith("Rss:"):
        cur["rss"] = int(line.split()[1]) * 1024
total = sum(m["rss"] for m in maps)
print(f"total RSS {total / 2**20:.1f} MiB over {len(maps)} mappings; the largest:")
for m in sorted(maps, key=lambda m: -m["rss"])[:25]:
    print(f"{m['rss'] / 2**20:9.1f} MiB resident of {m['size'] / 2**20:9.1f} MiB  {m['name']}")
EOF
cat "$OUT/smaps.txt" >&2
curl -s --max-time 2 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/metrics.txt" || true
stop_server
kill "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=
# It ends by itself once the gateway is gone, and then prints the worst seconds.
wait "$THREADS_PID" || echo "WARNING: the thread sampler failed" >&2
echo "== the seconds with the longest waits for a CPU, by thread:" >&2
cat "$OUT/stalls.jsonl" >&2

DISK_TOOL=$(ls -t "$TARGET_DIR"/release/deps/storage-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
if [ -n "$DISK_TOOL" ]; then
    "$DISK_TOOL" disk --analyze "$DATA" | tee "$OUT/disk.txt" >&2
fi
awk -F'\t' 'NR==2{first=$2} NR>1{last=$2; n=$4; db=$3} END{printf "RSS first sample %.1f MiB, last %.1f MiB; %d messages, %.0f bytes of database per message\n", first/1024, last/1024, n, (n>0? db/n : 0)}' "$OUT/rss.tsv" >&2
