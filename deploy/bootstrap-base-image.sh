#!/usr/bin/env bash
# Builds the base image `debian:bookworm-slim` locally when the Docker engine does
# not have it and cannot pull it (machines without registry access).
#
# It debootstraps a minimal Debian bookworm (variant minbase, documentation
# trimmed like the official slim images) with every package Meridian's images
# install (PostgreSQL 15, etcd, Redis, tini, CA certificates), from the Debian
# mirror that this machine's apt configuration names (/etc/apt/sources.list,
# /etc/apt/sources.list.d/*.list and *.sources; no host name is written here),
# and `docker import`s it under the tag. The Dockerfiles under deploy/docker then
# find their packages already installed and skip apt. Where a registry is
# reachable nothing of this is needed: the same Dockerfiles pull the real base
# image and install the packages with apt.
#
# Idempotent: exits at once when the engine already has the tag (pass --force to
# rebuild). Needs root, debootstrap and docker.
#
# Usage: deploy/bootstrap-base-image.sh [--force] [--tag debian:bookworm-slim]
# Env:   MERIDIAN_BASE_PACKAGES  extra packages to include (space-separated)
#        APT_SOURCES_DIR         apt configuration directory [/etc/apt] (for tests)
set -euo pipefail

TAG="debian:bookworm-slim"
FORCE=0
SUITE="bookworm"
APT_DIR="${APT_SOURCES_DIR:-/etc/apt}"
# What the images under deploy/docker need (keep in sync with their Dockerfiles).
PACKAGES="ca-certificates tini procps postgresql-15 etcd-server etcd-client redis-server ${MERIDIAN_BASE_PACKAGES:-}"

while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    --tag) TAG="$2"; shift ;;
    --print-sources) PRINT_ONLY=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "bootstrap-base-image: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "bootstrap-base-image: $*" >&2; }

# Prints "URI SUITE COMPONENTS..." for every enabled `deb` entry of the apt configuration.
apt_entries() {
  local f
  for f in "$APT_DIR/sources.list" "$APT_DIR"/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    # one-line format: deb [options] uri suite component...
    sed -e 's/#.*//' "$f" | awk '$1 == "deb" {
        i = 2
        if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
        line = $i " " $(i+1)
        for (j = i + 2; j <= NF; j++) line = line " " $j
        print line
      }'
  done
  for f in "$APT_DIR"/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822 format: paragraphs with Types/URIs/Suites/Components/Enabled fields.
    awk '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
          nu = split(uris, U, " "); ns = split(suites, S, " ")
          for (a = 1; a <= nu; a++) for (b = 1; b <= ns; b++) print U[a] " " S[b] " " comps
        }
        types = uris = suites = comps = ""; enabled = "yes"
      }
      BEGIN { enabled = "yes" }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      {
        key = $1; sub(/:$/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
        k = tolower(key)
        if (k == "types") types = val
        else if (k == "uris") uris = val
        else if (k == "suites") suites = val
        else if (k == "components") comps = val
        else if (k == "enabled") enabled = val
      }
      END { flush() }' "$f"
  done
}

# The mirror for SUITE: an entry for that suite, else the archive of the host's
# own release (a Debian mirror carries every current suite).
pick_mirror() {
  local entries="$1" want="$2" uri
  uri=$(awk -v s="$want" '$2 == s { print $1; exit }' <<<"$entries")
  if [ -z "$uri" ]; then
    uri=$(awk '$2 !~ /-(security|updates|backports)$/ && $2 !~ /\// && $1 ~ /debian\/?$/ { print $1; exit }' <<<"$entries")
  fi
  printf '%s' "${uri%/}"
}

ENTRIES="$(apt_entries)"
MIRROR="$(pick_mirror "$ENTRIES" "$SUITE")"
SECURITY="$(awk -v s="$SUITE-security" '$2 == s { print $1; exit }' <<<"$ENTRIES")"
SECURITY="${SECURITY%/}"
if [ "${PRINT_ONLY:-0}" = 1 ]; then
  echo "mirror=$MIRROR"
  echo "security=$SECURITY"
  exit 0
fi

if [ "$FORCE" = 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "$TAG is already present; nothing to do"
  exit 0
fi
if [ -z "$MIRROR" ]; then
  log "no Debian mirror found in $APT_DIR/sources.list or $APT_DIR/sources.list.d/*.{list,sources}"
  exit 1
fi
[ "$(id -u)" = 0 ] || { log "must run as root (debootstrap, chroot)"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }

# An apt proxy from the host configuration, if any, applies to debootstrap too.
eval "$(apt-config shell HTTP_PROXY_CONF Acquire::http::Proxy)"
if [ -n "${HTTP_PROXY_CONF:-}" ] && [ -z "${http_proxy:-}" ]; then export http_proxy="$HTTP_PROXY_CONF"; fi

WORK="$(mktemp -d /var/tmp/meridian-rootfs.XXXXXX)"
ROOT="$WORK/rootfs"
cleanup() {
  for m in "$ROOT/proc" "$ROOT/dev/pts"; do
    if mountpoint -q "$m" 2>/dev/null; then umount -l "$m" || true; fi
  done
  if ! grep -q " $WORK" /proc/mounts; then rm -rf --one-file-system "$WORK"; else log "leaving $WORK (still mounted)"; fi
}
trap cleanup EXIT

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
KEYOPT=()
[ -f "$KEYRING" ] && KEYOPT=(--keyring="$KEYRING")

log "debootstrap $SUITE (minbase) from the apt-configured mirror into $ROOT"
debootstrap --variant=minbase "${KEYOPT[@]}" "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
  tail -30 "$WORK/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }

# apt sources inside the image: the same mirrors (an image that runs apt later uses them).
{
  echo "deb $MIRROR $SUITE main"
  echo "deb $MIRROR $SUITE-updates main"
  [ -n "$SECURITY" ] && echo "deb $SECURITY $SUITE-security main"
} >"$ROOT/etc/apt/sources.list"

# Slim: no docs, man pages or translations (as the official -slim images).
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/docker-slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
SLIM
cat >"$ROOT/etc/apt/apt.conf.d/docker-clean" <<'CLEAN'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Install-Recommends "false";
Acquire::GzipIndexes "true";
CLEAN
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"

mount -t proc proc "$ROOT/proc"
in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 ${http_proxy:+http_proxy=$http_proxy} "$@"; }

log "installing: $PACKAGES"
{
  in_root apt-get update
  # As the official postgres images: no default cluster (the agent runs initdb itself).
  in_root apt-get install -y --no-install-recommends postgresql-common
  in_root sed -ri 's/^#?(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf
  # shellcheck disable=SC2086
  in_root apt-get install -y --no-install-recommends $PACKAGES
  in_root apt-get clean
} >"$WORK/install.log" 2>&1 || { tail -30 "$WORK/install.log" >&2; log "package installation failed"; exit 1; }
umount "$ROOT/proc"

rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/* "$ROOT"/var/log/*.log "$ROOT"/usr/share/doc/*/changelog* \
  "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/tmp/* "$ROOT"/var/tmp/*
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
: >"$ROOT/etc/hostname"
: >"$ROOT/etc/resolv.conf"

log "importing as $TAG"
tar --numeric-owner -C "$ROOT" -c . | docker import \
  --change 'CMD ["bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'LABEL org.meridian.base=debootstrap' \
  - "$TAG" >/dev/null
log "done: $(docker image inspect --format '{{.Id}} {{.Size}}' "$TAG")"
