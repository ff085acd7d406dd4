#!/usr/bin/env bash
# The README test command: installs what the tests need from Debian packages
# (only what is missing), makes sure the `postgres` OS user exists, then runs
# the formatting check, clippy and every test of the workspace.
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

if cargo nextest --version >/dev/null 2>&1; then
    say "cargo nextest run"
    exec cargo nextest run --workspace --no-fail-fast \
        --config-file integration/nextest.toml "$@"
else
    say "cargo-nextest not found; cargo test"
    exec cargo test --workspace --no-fail-fast "$@"
fi
