#!/usr/bin/env bash
# Runs the session fuzz target (pgproxy/src/fuzz.rs) over many generated inputs in a
# release build: client message streams (well-formed, malformed, mutated, not UTF-8)
# and backend answers (plausible, out of order, errors of every severity, backends that
# end) through the session engine, and random bytes through the frame and startup
# decoders. Fails on a panic (printing the seed), a broken invariant (unbounded output,
# bytes that are not frames) or a hang (the timeout).
#
#   integration/bench/fuzz-session.sh [INPUTS] [FIRST_SEED] [STEPS]
#   (defaults: 10000000 inputs from seed 0, 60 events each; about 25 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
inputs="${1:-10000000}"
first="${2:-0}"
steps="${3:-60}"
cargo build --release -p meridian-pgproxy --example fuzz_session
echo "command: integration/bench/fuzz-session.sh $inputs $first $steps (git $(git rev-parse --short HEAD))"
timeout 6h target/release/examples/fuzz_session "$inputs" "$first" "$steps"
