#!/usr/bin/env bash
# End-to-end smoke test of the docker-compose demo:
#   build the images (given profile), `up -d`, wait for every service to be
#   healthy (with deadlines), run demo-scenario.sh, and always `down -v`.
# Exits with the scenario's status (or non-zero when the demo did not come up).
#
# Usage: deploy/smoke-test.sh [--profile release|debug] [--skip-build] [--keep]
# Env:   COMPOSE_PROJECT_NAME [meridian-smoke], COMPOSE (command override),
#        SMOKE_UP_TIMEOUT seconds for the demo to become healthy [240],
#        MERIDIAN_PORT_US_EAST/_US_WEST/_EU_WEST host ports (default: free ports).
set -uo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROFILE=release
BUILD=1
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="$2"; shift ;;
    --skip-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "smoke-test: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-meridian-smoke}"
if [ -z "${COMPOSE:-}" ]; then
  if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE="docker-compose"; fi
fi
export COMPOSE
compose() { $COMPOSE -f "$DEPLOY/docker-compose.yml" "$@"; }
log() { echo "smoke-test: $*" >&2; }
# Why it failed, repeated after the logs on exit: CI keeps only the ends of the output.
REASON=""
why() { REASON="$*"; log "$*"; }

# Host ports for the proxies: free ones unless given.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  local p
  for p in "$@" $(shuf -i 20000-40000 -n 50); do
    if port_free "$p" && [[ " $PICKED " != *" $p "* ]]; then PICKED="$PICKED $p"; echo "$p"; return 0; fi
  done
  return 1
}
PICKED=""
export MERIDIAN_PORT_US_EAST="${MERIDIAN_PORT_US_EAST:-$(pick_port 6432)}"
export MERIDIAN_PORT_US_WEST="${MERIDIAN_PORT_US_WEST:-$(pick_port 6433)}"
export MERIDIAN_PORT_EU_WEST="${MERIDIAN_PORT_EU_WEST:-$(pick_port 6434)}"

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    log "failed (status $rc); service states and recent logs:"
    compose ps >&2 || true
    compose logs --no-color --tail 40 >&2 2>&1 || true
    log "failed: ${REASON:-status $rc}"
  fi
  if [ "$KEEP" = 1 ]; then
    log "--keep: leaving project $COMPOSE_PROJECT_NAME running (down with: $COMPOSE -f $DEPLOY/docker-compose.yml down -v)"
  else
    log "down -v"
    compose down -v --remove-orphans >/dev/null 2>&1 || compose down -v --remove-orphans >&2
  fi
  exit "$rc"
}

if [ "$BUILD" = 1 ]; then
  "$DEPLOY/build-images.sh" --profile "$PROFILE" || { why "image build failed"; exit 1; }
fi
trap cleanup EXIT

log "up -d (project $COMPOSE_PROJECT_NAME, proxies on host ports $MERIDIAN_PORT_US_EAST/$MERIDIAN_PORT_US_WEST/$MERIDIAN_PORT_EU_WEST)"
compose up -d || { why "compose up failed"; exit 1; }

# Health: certs exited 0; every service with a healthcheck healthy; the rest running;
# and every load generator printing lines with commits.
HEALTHY_SERVICES="etcd-1 etcd-2 etcd-3 coordinator-1 coordinator-2 node-us-east node-us-west node-eu-west redis-us-east redis-us-west redis-eu-west pgproxy-us-east pgproxy-us-west pgproxy-eu-west"
RUNNING_SERVICES="wan-coordinators wan-us-east wan-us-west wan-eu-west loadgen-us-east loadgen-us-west loadgen-eu-west"
state_of() {
  local c; c="$(compose ps -a -q "$1" 2>/dev/null | head -1)"
  [ -n "$c" ] || { echo missing; return; }
  docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}/{{.State.ExitCode}}' "$c"
}
not_ready() {
  local s st out=""
  st="$(state_of certs)"; [[ "$st" == exited/*/0 ]] || out="$out certs($st)"
  for s in $HEALTHY_SERVICES; do st="$(state_of "$s")"; [[ "$st" == running/healthy/* ]] || out="$out $s($st)"; done
  for s in $RUNNING_SERVICES; do st="$(state_of "$s")"; [[ "$st" == running/* ]] || out="$out $s($st)"; done
  for s in loadgen-us-east loadgen-us-west loadgen-eu-west; do
    c="$(compose ps -a -q "$s" 2>/dev/null | head -1)"
    if [ -z "$c" ] || ! docker logs --tail 3 "$c" 2>&1 | grep -q '^loadgen .* commits=[1-9]'; then out="$out $s(no commits yet)"; fi
  done
  echo "$out"
}
DEADLINE=$(( $(date +%s) + ${SMOKE_UP_TIMEOUT:-240} ))
while true; do
  pending="$(not_ready)"
  [ -z "$pending" ] && break
  if [ "$(date +%s)" -ge "$DEADLINE" ]; then why "not healthy within ${SMOKE_UP_TIMEOUT:-240} s:$pending"; exit 1; fi
  sleep 2
done
log "all services healthy; running demo-scenario.sh"
SCENARIO_OUT="$(mktemp)"
"$DEPLOY/demo-scenario.sh" 2>&1 | tee "$SCENARIO_OUT"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || why "demo-scenario.sh status $rc; its last lines:
$(grep -v '^  |' "$SCENARIO_OUT" | tail -12)"
rm -f "$SCENARIO_OUT"
exit "$rc"
