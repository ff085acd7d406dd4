#!/usr/bin/env bash
# The README's main command: a local three-region Meridian cluster on loopback.
#
#   integration/local-up.sh [--dir DIR] [--regions us-east,us-west,eu-west] [...]
#
# Installs PostgreSQL 15, etcd and Redis from Debian packages when missing,
# builds the programs (release), then runs `meridianctl local up`, which prints
# each region's connection string, writes DIR/cluster.json and runs until
# Ctrl-C / SIGTERM, then stops everything it started.
# Default DIR: ./.meridian-local (removed and recreated when it holds no
# running cluster).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n==> %s\n' "$*" >&2; }

source integration/install-deps.sh

args=("$@")
dir=""
for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[$i]}" = "--dir" ] && [ $((i + 1)) -lt ${#args[@]} ]; then
        dir="${args[$((i + 1))]}"
    fi
done
if [ -z "$dir" ]; then
    dir="$PWD/.meridian-local"
    if [ -d "$dir" ]; then
        if [ -f "$dir/cluster.json" ]; then
            echo "$dir/cluster.json exists: is a cluster still running? Stop it or remove $dir." >&2
            exit 1
        fi
        rm -rf "$dir"
    fi
    args+=(--dir "$dir")
fi

say "cargo build --release --bins"
cargo build --release --workspace --bins

exec target/release/meridianctl local up "${args[@]}"
