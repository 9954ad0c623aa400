#!/usr/bin/env bash
# /metrics checked by the reference tools: `promtool check metrics` lints a
# scrape, then a real Prometheus server scrapes the daemon every second and
# must answer queries for every GPU.
#
# Needs: target/release/gpuwatch-server (run `cargo build --release` first),
# curl, python3 (to pick a free port and read JSON), and Debian's
# `prometheus` package (the server and promtool). Whatever is missing is
# installed here with apt-get. Run from the repository root; bounded to well
# under 2 minutes.
#
# promtool's lint must be clean: no finding at all. (The labels are the
# snake_case forms of dcgm-exporter's: uuid, model_name, hostname; see
# docs/metrics.md for relabelling them to dcgm's spelling.)
set -euo pipefail

SERVER=${GPUWATCH_SERVER:-target/release/gpuwatch-server}
PY=${PYTHON:-python3}

say() { printf 'prometheus.sh: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

[ -x "$SERVER" ] || die "$SERVER not found; run 'cargo build --release' first"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v "$PY" >/dev/null || missing+=(python3)
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v "$PY" >/dev/null || PY=python3

WORK=$(mktemp -d)
DAEMON_PID=
PROM_PID=
cleanup() {
  for pid in $PROM_PID $DAEMON_PID; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $PROM_PID $DAEMON_PID; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# Three GPUs, one of which (the laptop) reports no power limit: that field
# must have no series for it, in the scrape and in Prometheus.
cat >"$WORK/gpuwatch.toml" <<'EOF'
[simulator]
speed = 5.0
[[simulator.gpus]]
preset = "h100-sxm"
demand = [ { at = "0s", watts = 600.0 } ]
[[simulator.gpus]]
preset = "a100-sxm"
demand = [ { at = "0s", watts = 300.0 } ]
# MIG instances, a pod in one and a notebook allocated the other (idle), a
# Slurm job: the workload and MIG series are linted and scraped too.
mig = { enabled = true, instances = ["3g.40gb", "2g.20gb"] }
processes = [
  { pid = 7100, name = "python3", memory_mib = 9000, mig_instance = 0, namespace = "ml", pod = "trainer-0", container = "main" },
  { pid = 7101, name = "train.py", memory_mib = 4000, mig_instance = 0, slurm_job = "4242", slurm_step = "0" },
]
allocations = [ { namespace = "research", pod = "notebook-1", container = "jupyter", mig_instance = 1 } ]
[[simulator.gpus]]
preset = "laptop"
demand = [ { at = "0s", watts = 80.0 } ]
EOF
GPUS=3

"$SERVER" --simulate --config "$WORK/gpuwatch.toml" --listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:0 --state-dir "$WORK/state" --ready-file "$WORK/ready.json" 2>"$WORK/daemon.log" &
DAEMON_PID=$!

ADDR=
for _ in $(seq 1 100); do
  # The ready file (JSON, written once the daemon serves) names the addresses.
  ADDR=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$WORK/ready.json" 2>/dev/null || true)
  [ -n "$ADDR" ] && break
  kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log" >&2; die "the daemon exited"; }
  sleep 0.2
done
[ -n "$ADDR" ] || { cat "$WORK/daemon.log" >&2; die "the daemon did not write its ready file within 20 s"; }
say "daemon HTTP on $ADDR"

# A scrape with every GPU's temperature in it.
for _ in $(seq 1 100); do
  curl -fsS "http://$ADDR/metrics" >"$WORK/metrics.txt" 2>/dev/null || true
  [ "$(grep -c '^gpuwatch_temperature_celsius{' "$WORK/metrics.txt" || true)" -eq "$GPUS" ] && break
  sleep 0.2
done
[ "$(grep -c '^gpuwatch_temperature_celsius{' "$WORK/metrics.txt" || true)" -eq "$GPUS" ] \
  || die "the scrape does not hold a temperature for each of the $GPUS GPUs"

# 1. promtool on the scrape as served: no findings.
if ! promtool check metrics <"$WORK/metrics.txt" >"$WORK/lint.txt" 2>&1 || [ -s "$WORK/lint.txt" ]; then
  cat "$WORK/lint.txt" >&2
  die "promtool check metrics found problems (above)"
fi
say "promtool check metrics: clean"

# 2. A real Prometheus scrapes the daemon every second.
PROM_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: gpuwatch
    static_configs:
      - targets: ['$ADDR']
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
API="http://127.0.0.1:$PROM_PORT/api/v1"

# How many series a PromQL query returns (0 on any error).
count() {
  curl -fsS --get "$API/query" --data-urlencode "query=$1" 2>/dev/null \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin); print(len(r["data"]["result"]) if r.get("status") == "success" else 0)' 2>/dev/null \
    || echo 0
}
# The value of a single-series query ("" when there is none).
scalar() {
  curl -fsS --get "$API/query" --data-urlencode "query=$1" 2>/dev/null \
    | "$PY" -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if len(r) == 1 else "")' 2>/dev/null \
    || true
}

deadline=$((SECONDS + 60))
until [ "$(count gpuwatch_temperature_celsius)" -eq "$GPUS" ]; do
  kill -0 "$PROM_PID" 2>/dev/null || { cat "$WORK/prometheus.log" >&2; die "prometheus exited"; }
  [ "$SECONDS" -lt "$deadline" ] || {
    tail -n 20 "$WORK/prometheus.log" >&2
    curl -fsS "$API/targets" >&2 || true
    die "Prometheus has no temperature for every GPU after 60 s"
  }
  sleep 1
done
say "Prometheus answers gpuwatch_temperature_celsius for all $GPUS GPUs"

[ "$(scalar 'up{job="gpuwatch"}')" = "1" ] || die "the gpuwatch target is not up"
n=$(count 'gpuwatch_power_limit_watts')
[ "$n" -eq 2 ] || die "gpuwatch_power_limit_watts has $n series; expected 2 (the laptop GPU reports none)"
[ "$(count 'gpuwatch_temperature_celsius{model_name="NVIDIA H100 80GB HBM3",uuid=~"GPU-.+",hostname!=""}')" -eq 1 ] \
  || die "the gpu/uuid/model_name/hostname labels did not survive the scrape"
[ "$(scalar 'gpuwatch_events_total{kind="daemon_started"}')" = "1" ] || die "the event counter is not 1 for daemon_started"
[ "$(count 'gpuwatch_sample_duration_seconds_bucket{le="+Inf"}')" -eq 1 ] || die "the sample-duration histogram is missing"
[ "$(count 'gpuwatch_governor_state == 1')" -eq "$GPUS" ] || die "not every GPU has exactly one governor state"
# The joins docs/metrics.md shows: per-instance memory by pod (the MIG
# instance's uuid is the allocation's device), and who is allocated idle.
# "$1" is PromQL's regex group, not a shell expansion:
# shellcheck disable=SC2016
JOIN='gpuwatch_mig_instance_memory_used_bytes * on(mig_uuid) group_left(namespace, pod, container) label_replace(gpuwatch_gpu_allocation_info, "mig_uuid", "$1", "device", "(.*)")'
deadline=$((SECONDS + 30))
until [ "$(count "$JOIN")" -eq 2 ] && [ "$(count 'gpuwatch_gpu_allocated_idle{pod="notebook-1"} == 1')" -eq 1 ]; do
  [ "$SECONDS" -lt "$deadline" ] || die "the allocation join did not give both MIG instances' pods, or the idle notebook is missing"
  sleep 1
done
[ "$(count 'gpuwatch_gpu_process_owner_info{owner_kind="slurm",owner="4242"}')" -eq 1 ] || die "the Slurm job's owner series is missing"
say "Prometheus joins MIG memory to pods and sees the allocated-but-idle notebook"
say "PASS: promtool and a real Prometheus accept gpuwatch's /metrics"
