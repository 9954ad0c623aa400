#!/usr/bin/env bash
# A client that knows nothing but the address: tests/python/reflection_client.py
# discovers gpuwatch.v1.GpuWatch through server reflection (grpcio-reflection),
# lists devices, takes a snapshot and checks the Watch contract (full state
# first, sequence numbers by stride, intervals honoured, a too-short interval
# refused naming the minimum).
#
# Needs: target/release/gpuwatch-server, python3 with venv; installs grpcio,
# grpcio-reflection and protobuf from PyPI into a temporary venv.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER=target/release/gpuwatch-server
[ -x "$SERVER" ] || { echo "reflection.sh: build with 'cargo build --release' first" >&2; exit 1; }
WORK=$(mktemp -d)
cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q grpcio grpcio-reflection protobuf
"$SERVER" --simulate --listen 127.0.0.1:0 --http-listen off --state-dir "$WORK/state" --ready-file "$WORK/ready.json" 2>"$WORK/daemon.log" &
PID=$!
for _ in $(seq 100); do
    # The ready file (JSON, written once the daemon serves) names the address.
    ADDR=$(sed -n 's/.*"grpc":"\([^"]*\)".*/\1/p' "$WORK/ready.json" 2>/dev/null || true)
    [ -n "$ADDR" ] && break
    sleep 0.1
done
[ -n "$ADDR" ] || { cat "$WORK/daemon.log" >&2; echo "reflection.sh: daemon did not start" >&2; exit 1; }
"$WORK/venv/bin/python" tests/python/reflection_client.py "$ADDR" --frames 30
"$WORK/venv/bin/python" tests/python/reflection_client.py "$ADDR" --interval-ms 300 --frames 10
echo "reflection.sh: PASS"
