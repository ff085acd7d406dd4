#!/usr/bin/env bash
# The README's main command: a local three-region Meridian cluster on loopback.
#
#   integration/local-up.sh [--dir DIR] [--regions us-east,us-west,eu-west] [...]
#
# Cross-region Postgres traffic is delayed like a real WAN by default
# (us-east:us-west=35ms,us-east:eu-west=40ms,us-west:eu-west=70ms, one-way, in
# each direction). Override with --wan-delay A:B=DELAY,... or the environment
# variable MERIDIAN_WAN_DELAY (empty: no delay); with other --regions the default
# is no delay. Each region also gets a Redis
# (--no-redis: none).
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
wan_given=""
regions_given=""
for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[$i]}" = "--dir" ] && [ $((i + 1)) -lt ${#args[@]} ]; then
        dir="${args[$((i + 1))]}"
    fi
    case "${args[$i]}" in
        --wan-delay | --wan-delay=*) wan_given=1 ;;
        --regions | --regions=*) regions_given=1 ;;
    esac
done
if [ -z "$wan_given" ]; then
    # Set but empty MERIDIAN_WAN_DELAY = no delay; unset = the realistic default,
    # which names the default regions (so none with other --regions).
    default_wan="us-east:us-west=35ms,us-east:eu-west=40ms,us-west:eu-west=70ms"
    if [ -n "$regions_given" ]; then
        default_wan=""
    fi
    wan="${MERIDIAN_WAN_DELAY-$default_wan}"
    if [ -n "$wan" ]; then
        args+=(--wan-delay "$wan")
    fi
fi
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
