#!/usr/bin/env bash
# Smoke run of the performance harness (BENCHMARKS.md): every gpuwatch-bench
# subcommand with --quick -- one run of a few seconds each, small loads -- so
# CI proves the harness still drives the daemon end to end. The numbers it
# prints mean nothing; the real figures come from `gpuwatch-bench all`.
#
# Needs: target/release/gpuwatch-server and target/release/gpuwatch-bench
# (cargo build --release), python3 with venv and pip for the Flask/Gunicorn
# baseline (Flask and Gunicorn themselves come from PyPI into
# target/bench-venv); python3 and python3-venv are installed with apt-get
# when missing. The nvml subcommand runs against the stand-in
# libnvidia-ml.so (built here with `cargo build --release -p fakenvml`).
# The client-snapshot/client-watch subcommands need
# target/release/gpuwatch-client and are skipped, with a note, without it.
# Run from the repository root; takes about 2 minutes.
set -euo pipefail

BENCH=${GPUWATCH_BENCH:-target/release/gpuwatch-bench}
say() { printf 'bench-smoke: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

[ -x "$BENCH" ] || die "$BENCH not found; run 'cargo build --release' first"
[ -x target/release/gpuwatch-server ] || die "target/release/gpuwatch-server not found; run 'cargo build --release' first"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

say "building the stand-in NVML library"
cargo build --release -q -p fakenvml
FAKE=target/release/libfakenvml.so
[ -f "$FAKE" ] || die "$FAKE was not built"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

skip=()
expected=(startup idle sampler scrape polling fanout fanout-10k slow-subscribers baseline nvml)
if [ -x target/release/gpuwatch-client ] && target/release/gpuwatch-client --help 2>/dev/null | grep -q snapshot; then
  expected+=(client-snapshot client-watch)
else
  say "target/release/gpuwatch-client is missing or not the fleet CLI yet: skipping client-snapshot and client-watch"
  skip+=(client-snapshot client-watch)
fi
skip_arg=()
if [ ${#skip[@]} -gt 0 ]; then
  skip_arg=(--skip "$(IFS=,; echo "${skip[*]}")")
fi

timeout 900 "$BENCH" all --quick --nvml-library "$FAKE" --out "$WORK/results.jsonl" "${skip_arg[@]}"

# Every figure came back with numbers.
python3 - "$WORK/results.jsonl" "${expected[@]}" <<'PY'
import json, math, sys
path, expected = sys.argv[1], sys.argv[2:]
figures = {}
for line in open(path):
    f = json.loads(line)
    figures[f["figure"]] = f
missing = [e for e in expected if e not in figures]
if missing:
    sys.exit("bench-smoke: FAIL: no results for " + ", ".join(missing))
for name, f in figures.items():
    values = [m["median"] for m in f["metrics"] if m["median"] is not None and math.isfinite(m["median"])]
    if not values:
        sys.exit(f"bench-smoke: FAIL: {name} has no measured value")
print(f"bench-smoke: PASS: {len(figures)} figures measured: {', '.join(sorted(figures))}")
PY
