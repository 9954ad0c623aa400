#!/usr/bin/env bash
# Client checks that need more than the Rust toolchain: the live `watch`
# view, run in a real terminal (tmux) against real daemons.
#
# Needs: tmux (installed here with apt-get when missing; needs root or sudo),
# the Rust toolchain. Run from the repository root after
# `cargo build --release`; the test uses target/release binaries.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v tmux >/dev/null 2>&1; then
    echo "client.sh: installing tmux"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends tmux
fi
tmux -V

# GPUWATCH_REQUIRE_TMUX turns "tmux missing, skipped" into a failure.
GPUWATCH_REQUIRE_TMUX=1 cargo test --release --workspace --test it tui:: -- --nocapture
