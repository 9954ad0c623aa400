#!/usr/bin/env bash
# Client performance: `snapshot` across 256 endpoints (target <= 1 s wall)
# and `watch` of 256 hosts at a 1 s interval (target <= 10 % of one core),
# as NDJSON and, with tmux, as the live terminal view. Each endpoint is a
# real gpuwatch-server daemon (one simulated GPU, 1 s sampler) on loopback.
#
# Needs: tmux for the terminal-view figure (installed here with apt-get when
# missing; needs root or sudo), about 4 GiB of memory and 600 free file
# descriptors, the Rust toolchain. Run from the repository root after
# `cargo build --release`. GPUWATCH_BENCH_HOSTS=N changes the fleet size.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v tmux >/dev/null 2>&1; then
    echo "client-bench.sh: installing tmux"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends tmux
fi
# 256 daemons and 256 client connections.
ulimit -n 4096 2>/dev/null || true

cargo test --release --workspace --test it fleet_bench:: -- --ignored --nocapture --test-threads 1
