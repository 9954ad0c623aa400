# shellcheck shell=bash
# Shared by the .ci scripts (source it): start gpuwatch-server on simulated
# GPUs on a free loopback port and stop it again.
#
#   start_daemon            # sets DAEMON_ADDR (HOST:PORT) and DAEMON_PID
#   DAEMON_HTTP=1 start_daemon   # also serves HTTP; sets DAEMON_HTTP_ADDR
#   stop_daemon             # SIGTERM; fails unless the daemon exits 0
#
# The binary is $GPUWATCH_SERVER_BIN, default target/release/gpuwatch-server
# (run `cargo build --release` first). The addresses come from the daemon's
# --ready-file (JSON); the wait for it is bounded.

DAEMON_START_TIMEOUT_S="${DAEMON_START_TIMEOUT_S:-60}"
DAEMON_STOP_TIMEOUT_S="${DAEMON_STOP_TIMEOUT_S:-30}"

server_bin() {
    local bin="${GPUWATCH_SERVER_BIN:-target/release/gpuwatch-server}"
    if [ ! -x "$bin" ]; then
        echo "error: $bin not found; run \`cargo build --release\` first (or set GPUWATCH_SERVER_BIN)" >&2
        return 1
    fi
    printf '%s\n' "$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
}

start_daemon() {
    local bin
    bin="$(server_bin)" || return 1
    DAEMON_DIR="$(mktemp -d)"
    local http=off
    [ -n "${DAEMON_HTTP:-}" ] && http=127.0.0.1:0
    "$bin" --simulate --listen 127.0.0.1:0 --http-listen "$http" \
        --state-dir "$DAEMON_DIR/state" --ready-file "$DAEMON_DIR/ready.json" \
        2>"$DAEMON_DIR/server.log" &
    DAEMON_PID=$!
    local deadline=$((SECONDS + DAEMON_START_TIMEOUT_S))
    # The daemon writes the ready file (atomically) once it serves:
    # {"pid":N,"grpc":"127.0.0.1:PORT","http":"127.0.0.1:PORT"|null}.
    while [ ! -s "$DAEMON_DIR/ready.json" ]; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            echo "error: gpuwatch-server exited before it was ready:" >&2
            cat "$DAEMON_DIR/server.log" >&2
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "error: gpuwatch-server was not ready in ${DAEMON_START_TIMEOUT_S}s" >&2
            cat "$DAEMON_DIR/server.log" >&2
            kill -KILL "$DAEMON_PID" 2>/dev/null
            return 1
        fi
        sleep 0.1
    done
    DAEMON_ADDR="$(sed -n 's/.*"grpc":"\([^"]*\)".*/\1/p' "$DAEMON_DIR/ready.json")"
    DAEMON_HTTP_ADDR="$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$DAEMON_DIR/ready.json")"
    [ -n "$DAEMON_ADDR" ] || { echo "error: no gRPC address in the ready file" >&2; return 1; }
    if [ -n "${DAEMON_HTTP:-}" ] && [ -z "$DAEMON_HTTP_ADDR" ]; then
        echo "error: no HTTP address in the ready file" >&2
        return 1
    fi
    echo "gpuwatch-server (pid $DAEMON_PID) listening on $DAEMON_ADDR${DAEMON_HTTP_ADDR:+, HTTP on $DAEMON_HTTP_ADDR}"
}

stop_daemon() {
    [ -n "${DAEMON_PID:-}" ] || return 0
    local pid="$DAEMON_PID" status=0
    DAEMON_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    # Bounded: SIGKILL once the stop timeout has passed.
    local deadline=$((SECONDS + DAEMON_STOP_TIMEOUT_S))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "error: gpuwatch-server did not stop in ${DAEMON_STOP_TIMEOUT_S}s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait "$pid" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "error: gpuwatch-server exited with status $status on SIGTERM:" >&2
        cat "$DAEMON_DIR/server.log" >&2
        return 1
    fi
    rm -rf "$DAEMON_DIR"
}
