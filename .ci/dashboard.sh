#!/usr/bin/env bash
# The dashboard in a real browser: headless Chromium loads http://.../ from a
# daemon on simulated GPUs, and .ci/dashboard_check.py proves over the
# DevTools protocol that the page went live, drew every GPU's charts, kept
# updating without a reload, fetched nothing from elsewhere and threw no
# error. It saves a screenshot to target/dashboard.png (or $SCREENSHOT; the
# README's picture is refreshed with SCREENSHOT=docs/dashboard.png), so a CI
# run leaves the work tree as it found it.
#
# Needs: target/release/gpuwatch-server (run `cargo build --release` first),
# curl, Debian's `chromium` (+ a font), python3 with the `websocket-client`
# package. Whatever is missing is installed here: apt-get for chromium,
# fonts-dejavu-core and curl; pip (or Debian's python3-websocket) for
# websocket-client. Run from the repository root; takes well under 2 minutes.
set -euo pipefail

SERVER=${GPUWATCH_SERVER:-target/release/gpuwatch-server}
SCREENSHOT=${SCREENSHOT:-target/dashboard.png}
CHROMIUM=${CHROMIUM:-chromium}
PY=${PYTHON:-python3}

say() { printf 'dashboard.sh: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

[ -x "$SERVER" ] || die "$SERVER not found; run 'cargo build --release' first"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  say "installing $* with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v "$CHROMIUM" >/dev/null || missing+=(chromium fonts-dejavu-core)
command -v "$PY" >/dev/null || missing+=(python3)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
command -v "$CHROMIUM" >/dev/null || CHROMIUM=chromium

if ! "$PY" -c 'import websocket' 2>/dev/null; then
  say "installing websocket-client with pip"
  "$PY" -m pip install --quiet --disable-pip-version-check websocket-client 2>/dev/null || true
  if ! "$PY" -c 'import websocket' 2>/dev/null; then
    # Debian's own python refuses pip installs (PEP 668): use its package.
    apt_install python3-websocket
    PY=/usr/bin/python3
  fi
fi
"$PY" -c 'import websocket' || die "python3 cannot import websocket (websocket-client)"

WORK=$(mktemp -d)
DAEMON_PID=
BROWSER_PID=
cleanup() {
  [ -n "$BROWSER_PID" ] && kill "$BROWSER_PID" 2>/dev/null || true
  if [ -n "$DAEMON_PID" ]; then
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
  fi
  [ -n "$BROWSER_PID" ] && wait "$BROWSER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Four GPUs at ten times real speed, so the charts move and the hot one
# meets the governor's threshold within seconds; the laptop GPU reports no
# power limit (an absent field the page must cope with).
cat >"$WORK/gpuwatch.toml" <<'EOF'
[simulator]
speed = 10.0

[[simulator.gpus]]
preset = "h100-sxm"
ambient_c = 42.0
demand = [ { at = "1s", watts = 690.0 }, { at = "100s", watts = 150.0 } ]
repeat = "130s"
processes = [ { pid = 41000, name = "python3", user = "alice", uid = 1000, memory_mib = 61440, namespace = "ml", pod = "trainer-0", container = "main" } ]

[[simulator.gpus]]
preset = "h100-sxm"
demand = [ { at = "1s", watts = 560.0, ramp = true }, { at = "60s", watts = 300.0, ramp = true } ]
repeat = "90s"

[[simulator.gpus]]
preset = "a100-sxm"
demand = [ { at = "0s", watts = 320.0 }, { at = "15s", watts = 90.0 } ]
repeat = "30s"
mig = { enabled = true, instances = ["3g.40gb", "2g.20gb"] }
processes = [ { pid = 41002, name = "tritonserver", memory_mib = 30000, mig_instance = 0, namespace = "serving", pod = "triton-0", container = "triton" } ]
allocations = [ { namespace = "research", pod = "notebook-5", container = "jupyter", mig_instance = 1 } ]

[[simulator.gpus]]
preset = "laptop"
demand = [ { at = "0s", watts = 40.0 }, { at = "20s", watts = 110.0, ramp = true } ]
repeat = "60s"
EOF

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

for _ in $(seq 1 100); do
  curl -fsS "http://$ADDR/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS "http://$ADDR/healthz" >/dev/null || die "/healthz did not answer 200"
sleep 3 # a few seconds of history, so the first picture has lines

# Chromium's first start on a fresh machine can stall (font caches, a slow
# disk while other jobs finish): wait up to 60 s for its DevTools port, and
# if it never opens, kill that browser and start one more on a new profile.
start_browser() {
  PROFILE="$WORK/profile$1"
  mkdir -p "$PROFILE"
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
    --disable-background-networking --disable-component-update --disable-sync \
    --no-first-run --no-default-browser-check --hide-scrollbars \
    --user-data-dir="$PROFILE" --remote-debugging-address=127.0.0.1 \
    --remote-debugging-port=0 --window-size=1400,1050 about:blank \
    >"$WORK/chromium$1.log" 2>&1 &
  BROWSER_PID=$!
  PORT=
  for _ in $(seq 1 300); do
    [ -s "$PROFILE/DevToolsActivePort" ] && PORT=$(head -n1 "$PROFILE/DevToolsActivePort") && return 0
    kill -0 "$BROWSER_PID" 2>/dev/null || { tail -n 20 "$WORK/chromium$1.log" >&2; say "chromium (try $1) exited"; return 1; }
    sleep 0.2
  done
  tail -n 20 "$WORK/chromium$1.log" >&2
  say "chromium (try $1) did not open its DevTools port within 60 s"
  kill -KILL "$BROWSER_PID" 2>/dev/null || true
  wait "$BROWSER_PID" 2>/dev/null || true
  BROWSER_PID=
  return 1
}
start_browser 1 || start_browser 2 || die "chromium would not start (two tries)"
say "chromium DevTools on 127.0.0.1:$PORT"

mkdir -p "$(dirname "$SCREENSHOT")"
# Who each card must name, from the workloads declared above.
export EXPECT_USERS='{"0": {"owners": ["ml/trainer-0/main"]}, "2": {"mig_owners": ["serving/triton-0/triton"], "idle": ["research/notebook-5/jupyter"]}}'
timeout 100 "$PY" .ci/dashboard_check.py "$PORT" "http://$ADDR/" 4 "$SCREENSHOT"
