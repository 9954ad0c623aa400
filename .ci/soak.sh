#!/usr/bin/env bash
# A bounded soak (SOAK_SECS, default 60): streams + control calls + SIGTERM
# and SIGKILL restarts together; checks nothing is lost and nothing leaks.
# Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SECS="${SOAK_SECS:-60}"
timeout $(( SOAK_SECS + 300 )) cargo test --workspace --test it soak:: -- --ignored --nocapture
