#!/usr/bin/env bash
# The fault-injection suite (FAULT_ROUNDS, default 6; FAULT_SECS, default
# 120; FAULT_SEED to replay a run): random GPU loss, driver limit resets,
# NVML hangs and failures, a full or read-only state directory and SIGKILL
# under load, on simulated GPUs and the stand-in NVML library; then each
# listener flooded while the other answers. Prints what it covered. The
# full/read-only faults mount a small tmpfs and need root (skipped, saying
# why, otherwise). Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
export FAULT_ROUNDS="${FAULT_ROUNDS:-6}"
export FAULT_SECS="${FAULT_SECS:-120}"
timeout $(( FAULT_SECS + 300 )) cargo test --workspace --test it fault_injection:: -- --ignored --nocapture --test-threads 1
