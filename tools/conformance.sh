#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn TestSuite cases (1-10; 12 and 13,
# permessage-deflate, are excluded: kefu does not negotiate compression)
# against an echo endpoint with `kosoku`, a native runner of the Autobahn case
# files from PyPI, and judges the report.
#
# A case passes when its `behavior` and its `behaviorClose` are each OK,
# NON-STRICT or INFORMATIONAL (Autobahn's own notion of passing). The script
# prints one summary line,
#
#   conformance: 296 OK, 2 NON-STRICT, 3 INFORMATIONAL, 0 UNIMPLEMENTED, 0 FAILED (301 cases, 5.1 s)
#
# lists every case that did not pass with what Autobahn said about it, and
# exits 1 if any did (or if kosoku hung, crashed, or wrote no report).
#
# By default it builds kefu and starts `kefu serve --echo` on 127.0.0.1 itself,
# and stops it at the end. Other servers:
#
#   tools/conformance.sh --target 127.0.0.1:9001/              # already running
#   tools/conformance.sh --server-cmd "target/release/echo-fastws --listen 127.0.0.1:9301" \
#                        --target 127.0.0.1:9301/
#
# Options (each also an environment variable):
#   --target HOST:PORT/PATH  server under test; skips starting kefu  (KEFU_CONFORMANCE_TARGET)
#   --server-cmd CMD         start CMD (bash) instead of kefu, then test --target or
#                            127.0.0.1:PORT/ws/echo                 (KEFU_CONFORMANCE_SERVER_CMD)
#   --port N                 port for the server the script starts  (KEFU_CONFORMANCE_PORT, 9301;
#                            kefu's admin listener takes N+1)
#   --out DIR                report directory     (KEFU_CONFORMANCE_OUT, $REPO/conformance-report)
#   --timeout S              bound on the kosoku run          (KEFU_CONFORMANCE_TIMEOUT, 300)
#   --parallel N             cases run in parallel                 (KEFU_CONFORMANCE_PARALLEL, 4)
#   --no-build               do not build kefu first
#   --venv DIR               Python venv holding kosoku           (KEFU_VENV, $REPO/.venv)
# Any arguments after `--` go to kosoku as they are (e.g. -- -i '9.*').
#
# Why a timeout: kosoku has none of its own, and it has been seen to hang on
# cases 9.1.5-9.1.6 (8 and 16 MiB messages) against an echo that starts
# writing before the whole message has arrived. A hang is a failure and is
# said loudly, not waited out forever.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${KEFU_CONFORMANCE_TARGET:-}
SERVER_CMD=${KEFU_CONFORMANCE_SERVER_CMD:-}
PORT=${KEFU_CONFORMANCE_PORT:-9301}
OUT=${KEFU_CONFORMANCE_OUT:-$REPO/conformance-report}
TIMEOUT=${KEFU_CONFORMANCE_TIMEOUT:-300}
PARALLEL=${KEFU_CONFORMANCE_PARALLEL:-4}
VENV=${KEFU_VENV:-$REPO/.venv}
KOSOKU_VERSION=${KOSOKU_VERSION:-0.1.0}
BUILD=1
EXTRA=()

while [ $# -gt 0 ]; do
    case "$1" in
        --target) TARGET=$2; shift ;;
        --server-cmd) SERVER_CMD=$2; shift ;;
        --port) PORT=$2; shift ;;
        --out) OUT=$2; shift ;;
        --timeout) TIMEOUT=$2; shift ;;
        --parallel) PARALLEL=$2; shift ;;
        --venv) VENV=$2; shift ;;
        --no-build) BUILD=0 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
        *) echo "conformance: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "conformance: $*" >&2; }
die() { echo "conformance: FAILED: $*" >&2; exit 1; }

# --- kosoku, in its own venv -------------------------------------------------
if [ ! -x "$VENV/bin/kosoku" ]; then
    say "installing kosoku $KOSOKU_VERSION into $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "cannot create a venv at $VENV"
    "$VENV/bin/pip" install --quiet "kosoku==$KOSOKU_VERSION" || die "pip install kosoku failed"
fi

# --- the server under test ---------------------------------------------------
SERVER_PID=
DATA_DIR=
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        # The server runs in a process group of its own (setsid below), so
        # this reaches it and anything it started, and nothing else.
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -n "$DATA_DIR" ]; then
        rm -rf "$DATA_DIR"
    fi
}
trap cleanup EXIT

mkdir -p "$OUT"
# Only what kosoku writes, so a mistyped --out cannot cost anything else.
rm -f "$OUT"/index.json "$OUT"/*_case_*.json "$OUT"/*_case_*.html "$OUT"/kosoku.log "$OUT"/server.log

if [ -z "$TARGET" ] || [ -n "$SERVER_CMD" ]; then
    if [ -z "$SERVER_CMD" ]; then
        TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
        if [ "$BUILD" = 1 ]; then
            say "building kefu (cargo build --release -p kefu-gateway)"
            (cd "$REPO" && cargo build --release -p kefu-gateway) || die "kefu does not build"
        fi
        DATA_DIR=$(mktemp -d)
        # Cases 9.x send messages of up to 16 MiB: more than the largest
        # chat command, which is what kefu's default size limits fit.
        SERVER_CMD="KEFU_LIMITS_MAX_FRAME_BYTES=16777216 KEFU_LIMITS_MAX_MESSAGE_BYTES=16777216 exec \"$TARGET_DIR/release/kefu\" serve --echo --listen 127.0.0.1:$PORT"
        SERVER_CMD+=" --admin-listen 127.0.0.1:$((PORT + 1)) --data \"$DATA_DIR\""
    fi
    TARGET=${TARGET:-127.0.0.1:$PORT/ws/echo}
    say "starting: $SERVER_CMD"
    setsid bash -c "$SERVER_CMD" >"$OUT/server.log" 2>&1 &
    SERVER_PID=$!
fi

case "$TARGET" in
    127.*) ;;
    *) die "target $TARGET is not in 127.0.0.0/8; this script only tests local servers" ;;
esac
HOSTPORT=${TARGET%%/*}
HOST=${HOSTPORT%:*}
TPORT=${HOSTPORT##*:}

# Wait until the server accepts connections (10 s), or say why not.
for i in $(seq 100); do
    if (exec 3<>"/dev/tcp/$HOST/$TPORT") 2>/dev/null; then
        break
    fi
    if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
        tail -20 "$OUT/server.log" >&2 || true
        die "the server exited before listening on $HOSTPORT (log above)"
    fi
    [ "$i" = 100 ] && die "nothing listens on $HOSTPORT after 10 s"
    sleep 0.1
done

# --- the run -----------------------------------------------------------------
say "running kosoku against $TARGET (cases 1-10, $PARALLEL in parallel, bound ${TIMEOUT}s)"
START=$(date +%s.%N)
set +e
timeout --kill-after=5 "$TIMEOUT" "$VENV/bin/kosoku" "$TARGET" -o "$OUT" -x '12.*' -x '13.*' \
    -p "$PARALLEL" "${EXTRA[@]}" >"$OUT/kosoku.log" 2>&1
STATUS=$?
set -e
END=$(date +%s.%N)

if [ "$STATUS" = 124 ] || [ "$STATUS" = 137 ]; then
    echo "conformance: TIMED OUT: kosoku did not finish within ${TIMEOUT}s against $TARGET" >&2
    echo "conformance: (a known hang is cases 9.1.5-9.1.6 against an echo that writes before" >&2
    echo "conformance:  the whole message has arrived); last lines of $OUT/kosoku.log:" >&2
    tail -5 "$OUT/kosoku.log" >&2 || true
    exit 1
fi
if [ ! -s "$OUT/index.json" ]; then
    tail -20 "$OUT/kosoku.log" >&2 || true
    die "kosoku exited with $STATUS and wrote no $OUT/index.json (log above)"
fi

# --- the verdict -------------------------------------------------------------
# index.json: {"<agent>": {"<case id>": {"behavior": ..., "behaviorClose": ...,
# "duration": ms, "remoteCloseCode": ..., "reportfile": ...}, ...}}
python3 - "$OUT/index.json" "$START" "$END" <<'EOF'
import json
import sys

path, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
with open(path) as f:
    index = json.load(f)

PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")
# A case is reported under the worse of its two verdicts.
RANK = {"OK": 0, "INFORMATIONAL": 1, "NON-STRICT": 2, "UNIMPLEMENTED": 3}

def case_key(case_id):
    return tuple(int(p) if p.isdigit() else p for p in case_id.split("."))

counts = {"OK": 0, "NON-STRICT": 0, "INFORMATIONAL": 0, "UNIMPLEMENTED": 0, "FAILED": 0}
failed = []
for agent, cases in index.items():
    for case_id in sorted(cases, key=case_key):
        result = cases[case_id]
        verdicts = (result.get("behavior", "MISSING"), result.get("behaviorClose", "MISSING"))
        if all(v in PASSING for v in verdicts):
            counts[max(verdicts, key=RANK.__getitem__)] += 1
            continue
        kind = "UNIMPLEMENTED" if "UNIMPLEMENTED" in verdicts and all(
            v in PASSING or v == "UNIMPLEMENTED" for v in verdicts) else "FAILED"
        counts[kind] += 1
        name = case_id if len(index) == 1 else f"{agent} {case_id}"
        failed.append(f"{name} (behavior {verdicts[0]}, close {verdicts[1]})")

total = sum(counts.values())
print(
    f"conformance: {counts['OK']} OK, {counts['NON-STRICT']} NON-STRICT, "
    f"{counts['INFORMATIONAL']} INFORMATIONAL, {counts['UNIMPLEMENTED']} UNIMPLEMENTED, "
    f"{counts['FAILED']} FAILED ({total} cases, {end - start:.1f} s)"
)
for line in failed:
    print(f"  not passed: {line}")
if total == 0:
    print("conformance: FAILED: the report holds no cases")
    sys.exit(1)
sys.exit(1 if failed else 0)
EOF
