#!/usr/bin/env bash
# The dashboards operators use keep working against gpuwatch, checked with a
# real Prometheus scraping simulated daemons:
#   1. a daemon with `[metrics] profile = "dcgm-exporter"`: every query of
#      NVIDIA's published dcgm-exporter Grafana dashboard
#      (tests/data/dcgm-exporter-dashboard-queries.txt, its source noted
#      there) returns series; its scrape passes `promtool check metrics`
#      apart from the two lint findings dcgm-exporter's own names cause;
#      no native names leak into it, an unsupported counter is absent and a
#      pod's GPU carries its pod labels;
#   2. a daemon with the native profile, a governor that acts and XIDs
#      injected: every panel query and template variable of
#      deploy/grafana/gpuwatch.json returns series.
#
# Needs: target/release/gpuwatch-server (run `cargo build --release` first),
# curl, python3, and Debian's `prometheus` package (server and promtool);
# whatever is missing is installed with apt-get. Run from the repository
# root; bounded to about 2 minutes.
set -euo pipefail

SERVER=${GPUWATCH_SERVER:-target/release/gpuwatch-server}

say() { printf 'dashboards.sh: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

[ -x "$SERVER" ] || die "$SERVER not found; run 'cargo build --release' first"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# The dcgm-exporter daemon: an H100 allocated whole to a pod, an A100, and
# a laptop GPU without memory temperature or power limit.
cat >"$WORK/dcgm.toml" <<'TOML'
[metrics]
profile = "dcgm-exporter"
[simulator]
speed = 5.0
[[simulator.gpus]]
preset = "h100-sxm"
demand = [ { at = "0s", watts = 500.0 } ]
allocations = [ { namespace = "ml", pod = "trainer-0", container = "main" } ]
[[simulator.gpus]]
preset = "a100-sxm"
demand = [ { at = "0s", watts = 300.0 } ]
[[simulator.gpus]]
preset = "laptop"
demand = [ { at = "0s", watts = 80.0 } ]
TOML
# The native daemon: a low threshold so the governor acts, and XIDs of
# three classes.
cat >"$WORK/native.toml" <<'TOML'
[controller]
threshold_c = 50
[simulator]
speed = 5.0
[[simulator.gpus]]
preset = "h100-sxm"
demand = [ { at = "0s", watts = 700.0 } ]
xid = [ { at = "1s", code = 48 }, { at = "2s", code = 13 } ]
[[simulator.gpus]]
preset = "a100-sxm"
demand = [ { at = "0s", watts = 400.0 } ]
xid = [ { at = "1s", code = 79 } ]
TOML

# start NAME: runs a daemon with $WORK/NAME.toml; prints its HTTP address.
start() {
  "$SERVER" --simulate --config "$WORK/$1.toml" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
    --state-dir "$WORK/$1-state" --ready-file "$WORK/$1.ready" 2>"$WORK/$1.log" &
  PIDS+=($!)
}
addr_of() {
  local addr=
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$WORK/$1.ready" 2>/dev/null || true)
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.2
  done
  cat "$WORK/$1.log" >&2
  die "the $1 daemon did not write its ready file within 20 s"
}
start dcgm
start native
DCGM=$(addr_of dcgm)
NATIVE=$(addr_of native)
say "dcgm-exporter profile on $DCGM, native on $NATIVE"

# 1a. The dcgm-exporter scrape under promtool: no parse error, and no lint
# finding but the two that dcgm-exporter's own names cause (its label
# modelName is camelCase; its energy counter has no _total).
for _ in $(seq 1 100); do
  curl -fsS "http://$DCGM/metrics" >"$WORK/dcgm.txt" 2>/dev/null || true
  [ "$(grep -c '^DCGM_FI_DEV_GPU_TEMP{' "$WORK/dcgm.txt" || true)" -eq 3 ] && break
  sleep 0.2
done
[ "$(grep -c '^DCGM_FI_DEV_GPU_TEMP{' "$WORK/dcgm.txt" || true)" -eq 3 ] || die "the dcgm-exporter scrape has no temperature for each of 3 GPUs"
rc=0
promtool check metrics <"$WORK/dcgm.txt" >"$WORK/lint.txt" 2>&1 || rc=$?
other=$(grep -v -e "label names should be written in 'snake_case' not 'camelCase'" \
  -e '^DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter metrics should have "_total" suffix$' "$WORK/lint.txt" || true)
if [ -n "$other" ] || [ "$rc" -gt 3 ]; then
  printf '%s\n' "$other" >&2
  die "promtool check metrics: findings beyond dcgm-exporter's own naming (above), exit $rc"
fi
grep -q '^DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{' "$WORK/dcgm.txt" || die "the energy counter is missing"
if grep -q '^gpuwatch_' "$WORK/dcgm.txt"; then die "native gpuwatch_ names in the dcgm-exporter profile"; fi
if grep -q -e '^DCGM_FI_DEV_ENC_UTIL' -e '^DCGM_FI_DEV_PCIE_REPLAY_COUNTER' -e '9223372036854775794' "$WORK/dcgm.txt"; then
  die "a counter gpuwatch cannot read has a series (or a sentinel value)"
fi
say "promtool check metrics: only the findings of dcgm-exporter's own names"

# 2. A real Prometheus scrapes both every second.
PROM_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$WORK/prometheus.yml" <<EOF2
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: dcgm
    static_configs:
      - targets: ['$DCGM']
  - job_name: gpuwatch
    static_configs:
      - targets: ['$NATIVE']
EOF2
promtool check config "$WORK/prometheus.yml" >/dev/null
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
PROM="http://127.0.0.1:$PROM_PORT"
count() {
  curl -fsS --get "$PROM/api/v1/query" --data-urlencode "query=$1" 2>/dev/null \
    | python3 -c 'import json, sys; r = json.load(sys.stdin); print(len(r["data"]["result"]) if r.get("status") == "success" else 0)' 2>/dev/null \
    || echo 0
}
# Enough history for the rate windows ($__rate_interval is 15s here), the
# governor's first action and every injected XID.
deadline=$((SECONDS + 90))
started=$SECONDS
until [ "$(count DCGM_FI_DEV_GPU_TEMP)" -eq 3 ] && [ "$(count gpuwatch_xid_errors_total)" -eq 3 ] \
  && [ "$(count gpuwatch_governor_last_action_timestamp_seconds)" -ge 1 ] && [ $((SECONDS - started)) -ge 25 ]; do
  [ "$SECONDS" -lt "$deadline" ] || {
    tail -n 20 "$WORK/prometheus.log" >&2
    die "after 90 s Prometheus still lacks the GPUs, the XIDs or a governor action"
  }
  sleep 1
done
say "Prometheus has both daemons' series"

[ "$(count 'DCGM_FI_DEV_MEMORY_TEMP')" -eq 2 ] || die "DCGM_FI_DEV_MEMORY_TEMP should be absent for the laptop GPU only"
[ "$(count 'DCGM_FI_DEV_GPU_TEMP{pod="trainer-0",namespace="ml",container="main",UUID=~"GPU-.+",modelName!="",Hostname!="",device="nvidia0"}')" -eq 1 ] \
  || die "the pod's GPU lacks its pod labels or dcgm-exporter's label names"
[ "$(count '{job="dcgm",__name__=~"gpuwatch_.+"}')" -eq 0 ] || die "native names in the dcgm-exporter job"
[ "$(count 'gpuwatch_xid_errors_total{xid="79",action="reboot_node"}')" -eq 1 ] || die "XID 79 is not counted as reboot_node"

# 1b and 2: every query of both dashboards returns series.
python3 .ci/dashboard_queries.py --prometheus "$PROM" --rate-interval 15s --range 1m \
  tests/data/dcgm-exporter-dashboard-queries.txt deploy/grafana/gpuwatch.json >"$WORK/queries.txt" \
  || { cat "$WORK/queries.txt"; die "dashboard queries without series (above)"; }
cat "$WORK/queries.txt"
say "PASS: NVIDIA's dcgm-exporter dashboard and gpuwatch's dashboard answer from a real Prometheus"
