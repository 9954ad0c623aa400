#!/bin/bash
# Container health check for gpuwatch-server, with nothing but bash.
#
# Asks the daemon's HTTP listener for /healthz (GPUWATCH_SERVER__HTTP_LISTEN,
# default 127.0.0.1:9451) and succeeds on "200". When HTTP is turned off it
# checks that the gRPC port (GPUWATCH_SERVER__LISTEN) accepts connections.
# A wildcard listen address (0.0.0.0, [::]) is probed over 127.0.0.1.
# Exit status: 0 healthy, 1 unhealthy (Docker's HEALTHCHECK convention).
set -u

timeout_s="${GPUWATCH_HEALTHCHECK_TIMEOUT:-3}"
http="${GPUWATCH_SERVER__HTTP_LISTEN:-127.0.0.1:9451}"

probe_host() {
    local host="${1%:*}"
    host="${host#[}"
    host="${host%]}"
    case "$host" in
        "" | 0.0.0.0 | "::") echo 127.0.0.1 ;;
        *) echo "$host" ;;
    esac
}

case "$http" in
    off | none | "")
        grpc="${GPUWATCH_SERVER__LISTEN:-127.0.0.1:9450}"
        if timeout "$timeout_s" bash -c "exec 3<>/dev/tcp/$(probe_host "$grpc")/${grpc##*:}" 2>/dev/null; then
            exit 0
        fi
        echo "gpuwatch: gRPC port ${grpc} does not accept connections" >&2
        exit 1
        ;;
esac

host="$(probe_host "$http")"
port="${http##*:}"
# The inner script is single-quoted on purpose: host and port arrive as $1, $2.
# shellcheck disable=SC2016
status="$(timeout "$timeout_s" bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "GET /healthz HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3
    IFS= read -r line <&3 && printf "%s" "$line"
' healthcheck "$host" "$port" 2>/dev/null)"
case "$status" in
    "HTTP/1."?" 200"*) exit 0 ;;
esac
echo "gpuwatch: GET http://${host}:${port}/healthz answered '${status:-nothing}'" >&2
exit 1
