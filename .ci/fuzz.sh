#!/usr/bin/env bash
# Bounded fuzzing (property tests) of request validation, configuration
# parsing and the governor: many more cases than the default test run, each
# suite capped in time. Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES="${PROPTEST_CASES:-20000}"
# `--workspace --test it` builds what the README's `cargo test --workspace`
# built (same features, nothing recompiled) and runs the daemon's suites.
for suite in fuzz_requests fuzz_config; do
    echo "fuzz: $suite with $CASES cases"
    PROPTEST_CASES=$CASES timeout 600 cargo test --workspace --test it "$suite::"
done
echo "fuzz: governor_stays_in_bounds_for_arbitrary_readings with $((CASES / 5)) cases"
PROPTEST_CASES=$((CASES / 5)) timeout 600 cargo test --workspace --test it governor_scenarios::governor_stays_in_bounds
