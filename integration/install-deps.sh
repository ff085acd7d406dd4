#!/usr/bin/env bash
# Installs what Meridian's tests and local cluster need from Debian packages
# (only what is missing) and creates the `postgres` OS user PostgreSQL runs as.
# Sourced by run-tests.sh and local-up.sh; expects a `say` function.
# MERIDIAN_SKIP_APT=1 skips the package step.

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
    debootstrap   # deploy/bootstrap-base-image.sh builds the containers' base image offline
    # tests/drivers.rs: pgjdbc and a JDK to compile its check program; a venv
    # for the Python drivers (psycopg, asyncpg: pinned, from the package index)
    default-jdk-headless libpostgresql-jdbc-java python3-venv
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

