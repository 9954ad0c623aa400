#!/usr/bin/env bash
# Independent load generators confirm gpuwatch-bench's fan-out, polling and
# scrape figures: nothing here uses the harness's own load code.
#
#   polling   h2load (nghttp2, C) sends raw gRPC GetSnapshot requests
#             (a 5-byte gRPC frame header + an empty message) over HTTP/2
#   fan-out   bench/crosscheck/fanout.py: Watch subscribers on grpcio's
#             asyncio API (Google's gRPC core, not tonic)
#   /metrics  wrk (back-to-back scrapes) and Python's http.client (one
#             scrape every 110 ms, each meeting a new frame)
#
# Needs: target/release/gpuwatch-server and target/release/gpuwatch-bench
# (cargo build --release; the harness only prints the daemon config, so the
# daemon runs exactly as in the figures), python3 with venv, and Debian's
# nghttp2-client (h2load) and wrk -- installed here with apt-get when
# missing; grpcio, grpcio-tools and grpcio-health-checking come from PyPI into
# target/crosscheck-venv.
# Run from the repository root. RUNS (default 3) repeats each check;
# WINDOW (default 15 s for polling and scrapes, 30 s for fan-out) sets
# their length; SUBSCRIBERS (1000) and PROCESSES (2) shape the fan-out;
# CHECKS (default "polling fanout metrics") picks which checks run.
set -euo pipefail

SERVER=${GPUWATCH_SERVER:-target/release/gpuwatch-server}
BENCH=${GPUWATCH_BENCH:-target/release/gpuwatch-bench}
RUNS=${RUNS:-3}
WINDOW=${WINDOW:-15}
FANOUT_WINDOW=${FANOUT_WINDOW:-30}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
PROCESSES=${PROCESSES:-2}
VENV=${CROSSCHECK_VENV:-target/crosscheck-venv}

CHECKS=${CHECKS:-polling fanout metrics}
say() { printf 'crosscheck: %s\n' "$*" >&2; }
want() { case " $CHECKS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
die() { say "FAIL: $*"; exit 1; }

[ -x "$SERVER" ] || die "$SERVER not found; run 'cargo build --release' first"
[ -x "$BENCH" ] || die "$BENCH not found; run 'cargo build --release' first"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v wrk >/dev/null || missing+=(wrk)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import grpc, grpc_tools, grpc_health' 2>/dev/null; then
  say "installing grpcio, grpcio-tools and grpcio-health-checking into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'grpcio==1.76.0' 'grpcio-tools==1.76.0' 'grpcio-health-checking==1.76.0'
fi
PY="$VENV/bin/python"

WORK=$(mktemp -d)
DAEMON_PID=
cleanup() {
  [ -n "$DAEMON_PID" ] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Python stubs from the contract.
mkdir -p "$WORK/stubs"
WKT=$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
"$PY" -m grpc_tools.protoc -I proto -I "$WKT" --python_out="$WORK/stubs" --grpc_python_out="$WORK/stubs" proto/gpuwatch/v1/*.proto
touch "$WORK/stubs/gpuwatch/__init__.py" "$WORK/stubs/gpuwatch/v1/__init__.py"

start_daemon() {
  "$BENCH" config >"$WORK/gpuwatch.toml"
  rm -rf "$WORK/state" "$WORK/daemon.log"
  "$SERVER" --simulate --config "$WORK/gpuwatch.toml" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
    --state-dir "$WORK/state" 2>"$WORK/daemon.log" &
  DAEMON_PID=$!
  GRPC='' HTTP=''
  for _ in $(seq 1 150); do
    GRPC=$(sed -n 's/.*gRPC listening on \([0-9.:]*\).*/\1/p' "$WORK/daemon.log" | head -n1)
    HTTP=$(sed -n 's/.*HTTP (metrics, dashboard, healthz) listening on \([0-9.:]*\).*/\1/p' "$WORK/daemon.log" | head -n1)
    [ -n "$GRPC" ] && [ -n "$HTTP" ] && return 0
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log" >&2; die "the daemon exited"; }
    sleep 0.2
  done
  die "the daemon did not log its addresses"
}
stop_daemon() {
  kill -TERM "$DAEMON_PID" 2>/dev/null || true
  wait "$DAEMON_PID" 2>/dev/null || true
  DAEMON_PID=
}
daemon_cpu_since() { # ticks at start, seconds -> percent of a core
  local now; now=$(cut -d')' -f2 "/proc/$DAEMON_PID/stat" | awk '{ print $12 + $13 }')
  awk -v a="$1" -v b="$now" -v s="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", 100 * (b - a) / hz / s }'
}
daemon_ticks() { cut -d')' -f2 "/proc/$DAEMON_PID/stat" | awk '{ print $12 + $13 }'; }

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"

# ---- 1. GetSnapshot polling with h2load --------------------------------
printf '\x00\x00\x00\x00\x00' >"$WORK/empty.grpc"
want polling && echo "polling (h2load -c 4 -m 8, ${WINDOW}s each): req/s, p50 ms, p99 ms, daemon CPU %; GetSnapshot of 8 GPUs against the daemon's own grpc.health.v1.Health/Check, same daemon, same load"
# h2load against one gRPC method of the running daemon: prints
# "RPS P50 P99 CPU", the same empty request either way.
h2load_method() {
  local t0 out ok
  t0=$(daemon_ticks)
  h2load -c 4 -m 8 -D "$WINDOW" --warm-up-time 2 \
    -H 'content-type: application/grpc' -H 'te: trailers' -d "$WORK/empty.grpc" \
    --log-file "$WORK/h2load.log" "http://$GRPC/$1" >"$WORK/h2load.out" 2>&1 \
    || { cat "$WORK/h2load.out" >&2; die "h2load failed on $1"; }
  out="$(sed -n 's/.*finished in .*, \([0-9.]*\) req\/s.*/\1/p' "$WORK/h2load.out")"
  ok=$(sed -n 's/.*status codes: \([0-9]*\) 2xx.*/\1/p' "$WORK/h2load.out")
  [ "${ok:-0}" -gt 0 ] || { cat "$WORK/h2load.out" >&2; die "no 2xx answers from $1"; }
  # gRPC answers 200 with grpc-status in trailers: a refused call would
  # still count as 2xx, so the method's answer was checked once before.
  printf '%s %s %s\n' "$out" \
    "$(awk -F'\t' '$2 == 200 { print $3 }' "$WORK/h2load.log" | sort -n \
      | awk '{ v[NR] = $1 } END { printf "%.3f %.3f", v[int(NR*0.5)]/1000, v[int(NR*0.99)]/1000 }')" \
    "$(daemon_cpu_since "$t0" "$((WINDOW + 2))")"
}
want polling && for run in $(seq 1 "$RUNS"); do
  start_daemon
  "$PY" - "$GRPC" "$WORK/stubs" <<'PYEOF' || die "GetSnapshot or Health/Check over grpcio failed"
import sys; sys.path.insert(0, sys.argv[2])
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from gpuwatch.v1 import gpuwatch_pb2 as pb, gpuwatch_pb2_grpc as rpc
channel = grpc.insecure_channel(sys.argv[1])
snap = rpc.GpuWatchStub(channel).GetSnapshot(pb.GetSnapshotRequest(), timeout=5)
assert len(snap.samples) == 8, snap
health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
assert health.status == health_pb2.HealthCheckResponse.SERVING, health
PYEOF
  # Which goes first alternates from run to run, so that a drift in the
  # machine's load falls on both.
  if [ $((run % 2)) -eq 1 ]; then
    read -r h_rps h_p50 h_p99 h_cpu < <(h2load_method grpc.health.v1.Health/Check)
    read -r s_rps s_p50 s_p99 s_cpu < <(h2load_method gpuwatch.v1.GpuWatch/GetSnapshot)
  else
    read -r s_rps s_p50 s_p99 s_cpu < <(h2load_method gpuwatch.v1.GpuWatch/GetSnapshot)
    read -r h_rps h_p50 h_p99 h_cpu < <(h2load_method grpc.health.v1.Health/Check)
  fi
  ratio=$(awk -v s="$s_rps" -v h="$h_rps" 'BEGIN { printf "%.2f", s / h }')
  echo "  run $run: Health/Check $h_rps req/s, p50/p99 ms $h_p50/$h_p99, daemon CPU $h_cpu %"
  echo "  run $run: GetSnapshot  $s_rps req/s, p50/p99 ms $s_p50/$s_p99, daemon CPU $s_cpu % -> $ratio x the health check"
  stop_daemon
done

# ---- 2. Fan-out with grpcio ---------------------------------------------
want fanout && echo "fan-out (grpcio asyncio, $SUBSCRIBERS subscribers at 100 ms, ${FANOUT_WINDOW}s)"
want fanout && for run in $(seq 1 "$RUNS"); do
  start_daemon
  t0=$(daemon_ticks)
  start=$(date +%s.%N)
  result=$("$PY" bench/crosscheck/fanout.py --target "$GRPC" --stubs "$WORK/stubs" \
    --subscribers "$SUBSCRIBERS" --connections 2 --processes "$PROCESSES" --interval-ms 100 \
    --warmup 5 --window "$FANOUT_WINDOW")
  secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { print e - s }')
  echo "  run $run: $result (daemon CPU over the whole check incl. subscribe/warm-up: $(daemon_cpu_since "$t0" "$secs") %)"
  stop_daemon
done

# ---- 3. /metrics with wrk and http.client -------------------------------
ACCEPT='application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1'
want metrics && echo "/metrics: back-to-back (wrk -t1 -c1 --latency) and new-frame scrapes every 110 ms (http.client)"
want metrics && for run in $(seq 1 "$RUNS"); do
  start_daemon
  sleep 1
  wrk -t1 -c1 -d"${WINDOW}s" --latency -H "Accept: $ACCEPT" "http://$HTTP/metrics" >"$WORK/wrk.out"
  b2b=$(awk '/Latency Distribution/ { d = 1 } d && $1 == "50%" { p50 = $2 } d && $1 == "99%" { p99 = $2 } END { print "p50 " p50 ", p99 " p99 }' "$WORK/wrk.out")
  fresh=$("$PY" - "$HTTP" "$ACCEPT" <<'PYEOF'
import http.client, sys, time
host, port = sys.argv[1].rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port))
lat = []
for i in range(105):
    time.sleep(0.11)
    t = time.perf_counter()
    c.request("GET", "/metrics", headers={"Accept": sys.argv[2]})
    r = c.getresponse(); r.read()
    assert r.status == 200
    if i >= 5:
        lat.append((time.perf_counter() - t) * 1000)
lat.sort()
print("p50 %.3f ms, p99 %.3f ms" % (lat[len(lat) // 2], lat[int(len(lat) * 0.99)]))
PYEOF
)
  echo "  run $run: back-to-back $b2b; new frame $fresh"
  stop_daemon
done
exit 0
