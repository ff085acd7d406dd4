#!/usr/bin/env bash
# The README test command: installs what the tests need from Debian packages
# (only what is missing), makes sure the `postgres` OS user exists, then runs
# the formatting check, clippy and every test of the workspace; with a Docker
# engine also the container images (deploy/build-images.sh --profile debug),
# the testcontainers tests (part of the test run) and the compose smoke test.
#
#   integration/run-tests.sh [extra args for cargo nextest run]
#   e.g. integration/run-tests.sh -E 'package(meridian-integration)'
#
# Idempotent: a second run installs nothing. Environment:
#   MERIDIAN_SKIP_APT=1   do not install packages (fail later if one is missing)
#   MERIDIAN_PG_BIN_DIR   PostgreSQL server programs (default: pg_config --bindir,
#                         else /usr/lib/postgresql/15/bin)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n==> %s\n' "$*"; }
# Free disk space, printed after each step: a clean run needs several GB
# (target/ and the images); when a CI machine runs out, the log shows where.
disk() { df -h --output=avail . | tail -1 | tr -d ' '; }

# A clean checkout gains nothing from incremental compilation, and its caches
# roughly double target/ (export CARGO_INCREMENTAL=1 to keep them).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
say "free disk: $(disk)"

# Debian packages and the postgres OS user (shared with local-up.sh).
source integration/install-deps.sh

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# The end-to-end tests run the programs themselves (agent, coordinator,
# pgproxy, meridianctl), found next to the test binaries.
say "cargo build --workspace --bins"
cargo build --workspace --bins
say "built; free disk: $(disk)"

# Container images, then the tests (the testcontainers tests in
# integration/tests/containers.rs run inside the normal test run and need the
# images), then the compose smoke test. Every step runs; the script's status is
# non-zero if any failed.
FAILED=()
step() { # name, command...
    local name="$1"; shift
    say "$name"
    local start=$SECONDS
    if "$@"; then
        printf '==> %s: ok (%d s, %s free)\n' "$name" $((SECONDS - start)) "$(disk)"
    else
        printf '==> %s: FAILED (status %d, %d s, %s free)\n' "$name" "$?" $((SECONDS - start)) "$(disk)" >&2
        FAILED+=("$name")
    fi
}

DOCKER=0
if command -v docker >/dev/null 2>&1 && timeout 30 docker info >/dev/null 2>&1; then
    DOCKER=1
else
    say "Docker not reachable: skipping image build, container tests and compose smoke test"
fi

if [ "$DOCKER" = 1 ]; then
    # The images pack the debug binaries just built (cargo has nothing to redo).
    step "base image (deploy/bootstrap-base-image.sh)" bash deploy/bootstrap-base-image.sh
    step "container images (deploy/build-images.sh --profile debug)" \
        bash deploy/build-images.sh --profile debug
fi

# Without Docker the container tests (tests/containers.rs) cannot run: they are left
# out, loudly, rather than counted as passed.
NO_CONTAINERS=()
if [ "$DOCKER" = 0 ]; then
    say "Docker not reachable: the container tests (integration/tests/containers.rs) are NOT run"
    NO_CONTAINERS=(-E 'not binary(containers)')
fi
if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run" cargo nextest run --workspace --no-fail-fast \
        --config-file integration/nextest.toml "${NO_CONTAINERS[@]}" "$@"
else
    step "cargo test (cargo-nextest not found)" cargo test --workspace --no-fail-fast "$@"
fi

if [ "$DOCKER" = 1 ]; then
    step "compose smoke test (deploy/smoke-test.sh --skip-build)" \
        bash deploy/smoke-test.sh --profile debug --skip-build
fi

if [ "${#FAILED[@]}" -gt 0 ]; then
    say "FAILED: ${FAILED[*]}"
    exit 1
fi
say "all steps passed"
