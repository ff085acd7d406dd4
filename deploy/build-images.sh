#!/usr/bin/env bash
# Builds Meridian's container images locally (no registry involved):
#   1. cargo build --profile PROFILE --bins (skip with --skip-cargo),
#   2. stages the binaries into deploy/.bin (the build context; debug info stripped),
#   3. makes sure the base image debian:bookworm-slim exists (bootstrap-base-image.sh
#      when the engine lacks it; MERIDIAN_BASE_PULL=1 lets docker pull it instead),
#   4. docker build of meridian/{node,coordinator,pgproxy,tools,etcd,redis}:TAG.
#
# Usage: deploy/build-images.sh [--profile release|debug] [--tag TAG] [--skip-cargo] [--only IMAGE,...]
# Env:   MERIDIAN_TAG (default dev; the compose file uses the same variable)
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DEPLOY/.." && pwd)"
PROFILE=release
TAG="${MERIDIAN_TAG:-dev}"
SKIP_CARGO=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="$2"; shift ;;
    --tag) TAG="$2"; shift ;;
    --skip-cargo) SKIP_CARGO=1 ;;
    --only) ONLY="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build-images: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case "$PROFILE" in
  release) CARGO_PROFILE=release; TARGET_SUBDIR=release ;;
  debug|dev) CARGO_PROFILE=dev; TARGET_SUBDIR=debug ;;
  *) echo "build-images: --profile must be release or debug, not $PROFILE" >&2; exit 2 ;;
esac
log() { echo "build-images: $*" >&2; }

# image name → binaries it needs
declare -A BINS=(
  [node]="meridian-agent"
  [coordinator]="meridian-coordinator meridianctl"
  [pgproxy]="meridian-pgproxy"
  [tools]="meridian-loadgen meridian-wanlink"
  [etcd]=""
  [redis]=""
)
IMAGES="etcd redis node coordinator pgproxy tools"
if [ -n "$ONLY" ]; then IMAGES="${ONLY//,/ }"; fi
for img in $IMAGES; do
  [ -n "${BINS[$img]+x}" ] || { log "unknown image $img (known: ${!BINS[*]})"; exit 2; }
done

NEEDED=""
for img in $IMAGES; do NEEDED="$NEEDED ${BINS[$img]}"; done

if [ -n "${NEEDED// /}" ]; then
  if [ "$SKIP_CARGO" = 0 ]; then
    log "cargo build --profile $CARGO_PROFILE --bins"
    (cd "$ROOT" && cargo build --profile "$CARGO_PROFILE" --bins)
  fi
  TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/$TARGET_SUBDIR"
  mkdir -p "$DEPLOY/.bin"
  for b in $NEEDED; do
    src="$TARGET_DIR/$b"
    [ -x "$src" ] || { log "missing binary $src (did cargo build --profile $CARGO_PROFILE --bins succeed?)"; exit 1; }
    # Copy only when changed, so docker's layer cache holds across runs.
    tmp="$DEPLOY/.bin/.$b.tmp"
    if command -v objcopy >/dev/null; then objcopy --strip-debug "$src" "$tmp"; else cp "$src" "$tmp"; fi
    if cmp -s "$tmp" "$DEPLOY/.bin/$b"; then rm -f "$tmp"; else mv -f "$tmp" "$DEPLOY/.bin/$b"; fi
  done
fi

if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  if [ "${MERIDIAN_BASE_PULL:-0}" = 1 ]; then
    docker pull debian:bookworm-slim
  else
    "$DEPLOY/bootstrap-base-image.sh"
  fi
fi

for img in $IMAGES; do
  log "docker build meridian/$img:$TAG"
  logf="$(mktemp)"
  if ! docker build -f "$DEPLOY/docker/$img.Dockerfile" -t "meridian/$img:$TAG" "$DEPLOY" >"$logf" 2>&1; then
    tail -40 "$logf" >&2; rm -f "$logf"; log "docker build of meridian/$img:$TAG failed"; exit 1
  fi
  rm -f "$logf"
done
log "built: $(for i in $IMAGES; do printf 'meridian/%s:%s ' "$i" "$TAG"; done)"
