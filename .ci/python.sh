#!/usr/bin/env bash
# CI: the Python client (clients/python) against a live gpuwatch-server.
#
# Needs: python3 >= 3.9 with venv and pip (Debian: python3-venv, installed by
# this script when missing), PyPI for grpcio/grpcio-tools/protobuf/pytest/mypy (+ types-protobuf,
# types-grpcio), and
# target/release/gpuwatch-server (`cargo build --release`). Run from the repo
# root: .ci/python.sh
#
# 1. installs the package into a fresh venv (the build generates the stubs
#    from proto/, so they cannot drift);
# 2. runs the example CLI (gpuwatch-py) against a daemon on simulated GPUs:
#    lists devices, watches 20 frames checking the seq/stride/gap contract,
#    replays events until caught_up, and checks the output and exit codes;
# 3. type-checks the installed package with mypy;
# 4. runs the pytest suite (its fixtures start their own daemons, including
#    4-GPU daemons with lease tokens for the pick/lease tests).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/daemon.sh

bin="$(server_bin)"

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "python3 venv/ensurepip missing; installing python3-venv"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
fi

work="$(mktemp -d)"
trap 'stop_daemon || true; rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check "./clients/python[test]"

start_daemon
gw() { "$work/venv/bin/gpuwatch-py" --target "$DAEMON_ADDR" --timeout 20 "$@"; }
expect() { # expect FILE REGEX WHAT
    if ! grep -Eq "$2" "$1"; then
        echo "FAIL: $3; output was:" >&2
        cat "$1" >&2
        exit 1
    fi
}

gw devices | tee "$work/devices.out"
expect "$work/devices.out" '^host .*\(simulator, .*\): 4 GPUs' "devices lists the 4 simulated GPUs"
[ "$(grep -c '^[0-9] .*GPU-' "$work/devices.out")" -eq 4 ] || { echo "FAIL: not 4 device rows" >&2; exit 1; }

gw watch --frames 20 --interval-ms 200 | tee "$work/watch.out"
expect "$work/watch.out" '^watch: stride 2 ' "watch starts with stride 2 for 200 ms"
expect "$work/watch.out" '^watched 20 frames, .*seq contract held \(stride 2' "watch reads 20 frames within the contract"

gw events --since-seq 0 | tee "$work/events.out"
expect "$work/events.out" ' daemon_started ' "the event replay holds the daemon's start"
expect "$work/events.out" '^caught up at seq [0-9]+' "the event replay ends with caught_up"

# A refused request exits 1 and says why.
status=0
gw watch --interval-ms 1 2>"$work/refused.err" || status=$?
[ "$status" -eq 1 ] || { echo "FAIL: a too-short interval exited $status, not 1" >&2; exit 1; }
expect "$work/refused.err" 'INVALID_ARGUMENT.*minimum' "a too-short interval is refused naming the minimum"

stop_daemon
echo "example client: devices, watch, events and a refused request behaved as documented"

# Type hints: the installed package (generated stubs ship .pyi files),
# checked from outside the source tree so the installed copy is what is read.
(cd "$work" && "$py" -m mypy --config-file "$OLDPWD/clients/python/pyproject.toml" -p gpuwatch_client)

(cd clients/python && GPUWATCH_SERVER_BIN="$bin" timeout 600 "$py" -m pytest -q -p no:cacheprovider)
