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

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root (or sudo) for: $*" >&2
        return 1
    fi
}

packages=(
    postgresql-15 postgresql-client-15 pgbouncer etcd-server redis-server haproxy
    protobuf-compiler libprotobuf-dev
)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

if [ "${MERIDIAN_SKIP_APT:-0}" != 1 ]; then
    missing=()
    for p in "${packages[@]}"; do
        installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        as_root apt-get update
        as_root apt-get install -y --no-install-recommends "${missing[@]}"
    else
        say "Debian packages present"
    fi
fi

# PostgreSQL refuses to run as root: the tests run it as this user.
if [ "$(id -u)" -eq 0 ] && ! id -u postgres >/dev/null 2>&1; then
    say "creating the postgres OS user"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin postgres
fi

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
    say "cargo nextest run"
    exec cargo nextest run --workspace --no-fail-fast \
        --config-file integration/nextest.toml "$@"
else
    say "cargo-nextest not found; cargo test"
    exec cargo test --workspace --no-fail-fast "$@"
fi
