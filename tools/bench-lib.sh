# Shared by the benchmark scripts: build the release binaries, wait for an
# idle host before a run, start a fresh kefu gateway, and stop the server
# under test (SERVER_PID) between runs and at exit.
#
# wait_quiet waits until the whole host has been idle (under 8% of one core
# busy, from /proc/stat) for 3 s in a row, bounded by $QUIET_WAIT seconds;
# anything busy between runs is someone else's build or benchmark.

# release_build PACKAGE...: the release build of the packages into
# $TARGET_DIR, unless the script was told --no-build (BUILD=0); sets BIN.
release_build() {
    BIN=$TARGET_DIR/release
    if [ "${BUILD:-1}" = 1 ]; then
        local package args=()
        for package in "$@"; do
            args+=(-p "$package")
        done
        (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -j2 "${args[@]}")
    fi
}

host_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }

wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) calm=0 b0 t0 b1 t1 cores
    cores=$(nproc)
    while [ "$calm" -lt 3 ]; do
        read -r b0 t0 < <(host_ticks)
        sleep 1
        read -r b1 t1 < <(host_ticks)
        if [ $(((b1 - b0) * 100 * cores / (t1 - t0 + 1))) -lt 8 ]; then
            calm=$((calm + 1))
        else
            calm=0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "WARNING: host still busy after ${QUIET_WAIT}s; measuring anyway" >&2
            return 0
        fi
    done
}

SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}

# The per-connection message rate and the per-address connection limits,
# lifted: a chat load client opens thousands of sessions from two
# addresses and sends faster than one person types. For start_kefu.
LIFTED_LIMITS=(KEFU_LIMITS_MESSAGES_PER_S=100000 KEFU_LIMITS_BURST=100000
    KEFU_LIMITS_NEW_CONNECTIONS_PER_S_PER_IP=1000000 KEFU_LIMITS_NEW_CONNECTIONS_BURST_PER_IP=1000000)

# start_kefu DATA LOG [VAR=value ...]: a fresh data directory DATA and
# `kefu serve` from $BIN on 127.0.0.1:$PORT (admin 127.0.0.1:$ADMIN_PORT,
# $SHARDS shards, default 1), pinned to $SERVER_CPU, with the given
# environment, stderr to LOG. Returns once it listens with its JWT secret
# written (SERVER_PID is set); exits the script if it does not start.
start_kefu() {
    local data=$1 log=$2
    shift 2
    rm -rf "$data"
    mkdir -p "$data"
    env "$@" taskset -c "$SERVER_CPU" "$BIN/kefu" serve --listen "127.0.0.1:$PORT" \
        --admin-listen "127.0.0.1:$ADMIN_PORT" --data "$data" --shards "${SHARDS:-1}" 2>"$log" &
    SERVER_PID=$!
    for _ in $(seq 400); do
        if [ -s "$data/jwt_secret" ] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "kefu exited at start; see $log" >&2
            exit 1
        fi
        sleep 0.05
    done
    echo "kefu did not start listening on 127.0.0.1:$PORT; see $log" >&2
    exit 1
}

# parse_options ARGS...: each --long-option sets the upper-case variable of
# its name (--client-cpu 0 sets CLIENT_CPU=0), which the script must list
# in OPTIONS (space-separated names) and have given a default; --no-build
# sets BUILD=0; -h/--help prints the script's header comment. Anything else
# is an error (exit 2): the list keeps an option from setting PATH, REPO or
# any other variable of the script's own.
parse_options() {
    local var
    while [ $# -gt 0 ]; do
        case "$1" in
            --no-build) BUILD=0 ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
            --*)
                var=$(printf '%s' "${1#--}" | tr 'a-z-' 'A-Z_')
                if [[ " $OPTIONS " != *" $var "* ]] || ! declare -p "$var" >/dev/null 2>&1 || [ $# -lt 2 ]; then
                    echo "unknown argument: $1" >&2
                    exit 2
                fi
                printf -v "$var" '%s' "$2"
                shift
                ;;
            *) echo "unknown argument: $1" >&2; exit 2 ;;
        esac
        shift
    done
}
