#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer) and runs each
# for --runs executions (or --seconds), starting from the checked-in
# seeds (fuzz/corpus/TARGET/seed-*) and whatever the corpus gathered
# since. Exits non-zero on the first crash; the input that crashed is in
# fuzz/artifacts/TARGET/. docs/fuzzing.md has the figures of long runs.
#
# Usage: tools/fuzz.sh [--runs N | --seconds S] [--fork J] [TARGET...]
#   (no target: all of them; CI runs `--seconds 15`)
#   --fork J: libFuzzer's fork mode, J worker processes of one campaign
#   (their executions add up to --runs; the first crash stops it all).
#   --no-trace-compares: build without libFuzzer's comparison tracing,
#   which costs chat_machines 60% of its speed (3,300 exec/s against
#   1,370 on this host); coverage still guides it, edge by edge, but it no
#   longer learns the operands of failed comparisons. For long runs of a
#   target whose input is decoded into choices rather than matched.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
RUNS=
SECONDS_EACH=
FORK=
BUILD_FLAGS=(--sanitizer none -O)
TARGETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS=$2; shift ;;
        --seconds) SECONDS_EACH=$2; shift ;;
        --fork) FORK=$2; shift ;;
        --no-trace-compares) BUILD_FLAGS+=(--no-trace-compares) ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) TARGETS+=("$1") ;;
    esac
    shift
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(http_head ws_decoder json_command fb_command log_record wal_record index_run chat_machines)
if [ -z "$RUNS" ] && [ -z "$SECONDS_EACH" ]; then SECONDS_EACH=20; fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cd "$REPO/fuzz"
# The instrumentation flags cargo-fuzz passes are unstable options of
# rustc; this is the machine's one (stable) toolchain, so they are
# allowed here, for the fuzz build only. No sanitizer: the code under
# test has no unsafe of its own, and libFuzzer still finds panics.
export RUSTC_BOOTSTRAP=1
cargo fuzz build "${BUILD_FLAGS[@]}" 2>&1 | tail -3

for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t"
    if [ -n "$RUNS" ]; then limit=(-runs="$RUNS"); else limit=(-max_total_time="$SECONDS_EACH"); fi
    [ -z "$FORK" ] || limit+=(-fork="$FORK")
    # chat_machines reads at most 128 actions of at most 5 bytes: longer
    # inputs only dilute the mutations.
    case "$t" in chat_machines) max_len=700 ;; *) max_len=65536 ;; esac
    # Kept (target/fuzz-logs/) for the figures of a long run.
    mkdir -p "$REPO/target/fuzz-logs"
    log=$REPO/target/fuzz-logs/$t.log
    if ! cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "corpus/$t" -- "${limit[@]}" -max_len="$max_len" \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo "?")
    if [ -n "$FORK" ]; then
        # Fork mode's parent sums its workers' executions in its status lines.
        runs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || echo "?")
        secs=$(grep -o 'exiting: [0-9]* time: [0-9]*s' "$log" | grep -o '[0-9]*s$' | tr -d s || echo "?")
    fi
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
    echo "fuzz: $t ok: $runs runs in ${secs:-?} s, 0 crashes, coverage $cov edges, corpus $(ls "corpus/$t" | wc -l) inputs"
done
