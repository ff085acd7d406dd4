#!/usr/bin/env bash
# Drives the failover story against a running docker-compose demo
# (docker compose -f deploy/docker-compose.yml up). Each step prints what it
# expects, waits for it with a deadline, and fails loudly when it does not see
# it; the script exits non-zero on the first failed step (after healing any
# partition it made).
#
#   1. meridianctl status: a serving primary and two streaming replicas; us-west
#      and eu-west reach the control plane (etcd, coordinators) only through
#      their WAN links, with the link's delay
#   2. write in eu-west through its proxy, read it back there (from the local replica)
#   3. docker kill the primary's node (us-east on a fresh demo): failover to
#      another node, load generators recover; their error counts are shown
#   4. docker start it again: it rejoins as a replica
#   5. partition the current primary's region (docker network disconnect from the
#      control and WAN networks): the cut-off node fences itself, the others elect
#      a new primary and keep writing
#   6. heal: the partitioned node rejoins as a replica, its region writes again
#
# Works with `docker compose` or `docker-compose` (override with COMPOSE="..."),
# whatever COMPOSE_PROJECT_NAME is. Needs python3 on the host (JSON parsing).
# Env: MERIDIAN_CLUSTER [demo], SCENARIO_TIMEOUT_SCALE [1] (multiplies every deadline).
set -uo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
COMPOSE_FILE="${COMPOSE_FILE_PATH:-$DEPLOY/docker-compose.yml}"
CLUSTER="${MERIDIAN_CLUSTER:-demo}"
ETCD="http://etcd-1:2379,http://etcd-2:2379,http://etcd-3:2379"
SCALE="${SCENARIO_TIMEOUT_SCALE:-1}"
REGIONS="us-east us-west eu-west"
declare -A PG_PORT=([us-east]=5432 [us-west]=5433 [eu-west]=5434)

if [ -z "${COMPOSE:-}" ]; then
  if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE="docker-compose"; fi
fi
compose() { $COMPOSE -f "$COMPOSE_FILE" "$@"; }

STEP=0
PARTITIONED=""          # region currently cut off by this script
declare -A SAVED_ALIASES  # "container network" -> aliases to restore

say()  { printf '%s\n' "$*"; }
ts()   { date -u +%H:%M:%S; }
step() { STEP=$((STEP + 1)); say ""; say "=== step $STEP [$(ts)]: $*"; }
expect() { say "  expect: $*"; }
ok()   { say "  ok [$(ts)]: $*"; }
fail() {
  say "  FAILED (step $STEP): $*" >&2
  say "  --- meridianctl events (last 15)" >&2
  ctl events 2>&1 | tail -15 | sed 's/^/  | /' >&2
  exit 1
}

# ---------------------------------------------------------------- helpers
cid() { compose ps -a -q "$1" 2>/dev/null | head -1; }
running() { local c; c="$(cid "$1")"; [ -n "$c" ] && [ "$(docker inspect -f '{{.State.Running}}' "$c" 2>/dev/null)" = true ]; }

coordinator_container() {
  local s
  for s in coordinator-1 coordinator-2; do
    if running "$s"; then cid "$s"; return 0; fi
  done
  return 1
}
ctl() {
  local c
  c="$(coordinator_container)" || { say "  (no coordinator container is running)" >&2; return 1; }
  docker exec "$c" meridianctl --etcd "$ETCD" --cluster "$CLUSTER" "$@"
}
status_json() { ctl status --json 2>/dev/null; }

# jq-like access with python3: `js FIELD_EXPR` on the JSON in $1.
js() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2" 2>/dev/null; }

# Waits until "$@" succeeds; $1 = seconds (scaled), $2 = description.
wait_until() {
  local secs="$1" what="$2"; shift 2
  local deadline=$(( $(date +%s) + secs * SCALE )) start; start=$(date +%s)
  expect "$what (within $((secs * SCALE)) s)"
  while true; do
    if "$@"; then ok "$what (after $(( $(date +%s) - start )) s)"; return 0; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then return 1; fi
    sleep 1
  done
}

# A cluster with leader $1 (or any leader when empty), serving, epoch > $2, and
# every node in $3 (space-separated) a streaming replica on the leader's timeline.
LAST_STATUS=""
cluster_is() {
  local want_leader="$1" min_epoch="$2" replicas="$3" s
  s="$(status_json)" || return 1
  LAST_STATUS="$s"
  python3 - "$s" "$want_leader" "$min_epoch" "$replicas" <<'PY' || return 1
import json, sys
d = json.loads(sys.argv[1]); want, min_epoch, replicas = sys.argv[2], int(sys.argv[3]), sys.argv[4].split()
nodes = {n["name"]: n for n in d.get("nodes", [])}
leader = d.get("leader")
ok = d.get("state") == "serving" and leader and d.get("epoch", 0) > min_epoch
ok = ok and (not want or leader == want)
lead = nodes.get(leader or "", {})
ok = ok and lead.get("role") == "primary" and lead.get("pg_up")
for r in replicas:
    n = nodes.get(r, {})
    ok = ok and n.get("role") == "replica" and n.get("state") == "streaming" \
        and n.get("timeline") == lead.get("timeline")
sys.exit(0 if ok else 1)
PY
}
show_status() { say "  --- meridianctl status"; ctl status 2>&1 | sed 's/^/  | /'; }

leader_name()  { js "$1" 'd.get("leader") or ""'; }
leader_epoch() { js "$1" 'd.get("epoch", 0)'; }
region_of()    { echo "${1#node-}"; }
others_than()  { local r out=""; for r in $REGIONS; do [ "$r" = "$1" ] || out="$out node-$r"; done; echo "$out"; }

# The last `loadgen ...` line of a region's load generator (optionally since a unix time).
loadgen_line() {
  local c since="${2:-}"; c="$(cid "loadgen-$1")" || return 1
  if [ -n "$since" ]; then docker logs --since "$since" "$c" 2>&1; else docker logs --tail 20 "$c" 2>&1; fi \
    | grep '^loadgen ' | tail -1
}
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"; }
show_loadgens() {
  local r line
  for r in $REGIONS; do
    line="$(loadgen_line "$r")"
    say "  | $r: ${line:-<no output yet>}"
  done
}
# A line printed after unix time $2 with commits > 0 and errors = 0.
loadgen_healthy_since() {
  local line; line="$(loadgen_line "$1" "$2")"
  [ -n "$line" ] && [ "$(field "$line" commits)" -gt 0 ] 2>/dev/null && [ "$(field "$line" errors)" = 0 ]
}
all_loadgens_healthy_since() { local r; for r in $REGIONS; do loadgen_healthy_since "$r" "$1" || return 1; done; }
total_errors() { local line n; line="$(loadgen_line "$1")"; n="$(field "$line" total_errors)"; echo "${n:-0}"; }

lg_query() {  # region, sql → rows on stdout
  local c; c="$(cid "loadgen-$1")" || return 1
  docker exec "$c" meridian-loadgen query --retry-for 10s "$2"
}

# Is the node's own Postgres refusing writes (stopped, unreachable or in recovery)?
node_fenced() {
  local region="$1" c out
  c="$(cid "node-$region")"
  out="$(docker exec "$c" psql -h 127.0.0.1 -p "${PG_PORT[$region]}" -U postgres -d postgres -Atc 'select pg_is_in_recovery()' 2>&1)"
  [ "$out" != "f" ]
}

# ---------------------------------------------------------------- partitions
project_label() { docker inspect -f '{{index .Config.Labels "com.docker.compose.project"}}' "$1"; }
region_containers() {
  local c p; c="$(coordinator_container)" || return 1; p="$(project_label "$c")"
  docker ps -q --filter "label=com.docker.compose.project=$p" --filter "label=meridian.region=$1"
}
# Networks of container $1 that are the demo's control or WAN network.
outside_networks() {
  local n kind
  for n in $(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$1"); do
    kind="$(docker network inspect -f '{{index .Labels "com.docker.compose.network"}}' "$n" 2>/dev/null)"
    case "$kind" in control|wan) echo "$n" ;; esac
  done
}
partition() {
  local region="$1" c n short
  for c in $(region_containers "$region"); do
    short="${c:0:12}"
    for n in $(outside_networks "$c"); do
      SAVED_ALIASES["$c $n"]="$(docker inspect -f "{{with index .NetworkSettings.Networks \"$n\"}}{{range .Aliases}}{{.}} {{end}}{{end}}" "$c" \
        | tr ' ' '\n' | grep -v -x -e '' -e "$short" | sort -u | tr '\n' ' ')"
      docker network disconnect "$n" "$c" || fail "docker network disconnect $n $c"
      say "  cut: $(docker inspect -f '{{.Name}}' "$c" | sed 's,^/,,') from $n"
    done
  done
  PARTITIONED="$region"
}
heal() {
  local key c n args a
  for key in "${!SAVED_ALIASES[@]}"; do
    c="${key% *}"; n="${key#* }"; args=()
    for a in ${SAVED_ALIASES[$key]}; do args+=(--alias "$a"); done
    docker network connect "${args[@]}" "$n" "$c" && say "  healed: $(docker inspect -f '{{.Name}}' "$c" | sed 's,^/,,') to $n"
    unset "SAVED_ALIASES[$key]"
  done
  PARTITIONED=""
}
on_exit() {
  local rc=$?
  if [ -n "$PARTITIONED" ]; then say "(healing the partition of $PARTITIONED before exiting)"; heal; fi
  if [ "$rc" = 0 ]; then say ""; say "demo-scenario: all $STEP steps passed"; else say "demo-scenario: FAILED at step $STEP" >&2; fi
}
trap on_exit EXIT

# ---------------------------------------------------------------- preconditions
command -v python3 >/dev/null || { echo "demo-scenario: python3 is needed" >&2; exit 2; }
for s in coordinator-1 coordinator-2 node-us-east node-us-west node-eu-west loadgen-us-east loadgen-us-west loadgen-eu-west; do
  running "$s" || { echo "demo-scenario: service $s is not running (start the demo: $COMPOSE -f $COMPOSE_FILE up -d)" >&2; exit 2; }
done

# ---------------------------------------------------------------- 1. status
step "cluster status (meridianctl status, inside a coordinator container)"
wait_until 120 "a serving primary and two streaming replicas" cluster_is "" 0 "" || fail "no serving leader: $LAST_STATUS"
PRIMARY="$(leader_name "$LAST_STATUS")"
wait_until 120 "the replicas of $PRIMARY streaming on its timeline" cluster_is "$PRIMARY" 0 "$(others_than "$(region_of "$PRIMARY")")" \
  || { show_status; fail "replicas not streaming"; }
EPOCH="$(leader_epoch "$LAST_STATUS")"
show_status
say "  primary: $PRIMARY (epoch $EPOCH)"

# ---------------------------------------------------------------- 1b. control plane over the WAN
step "us-west and eu-west reach the control plane only across the WAN (it lives in us-east)"
# One-way delay of a region's link to etcd-1, as its WAN link container was started with.
control_delay_ms() {
  local c links d; c="$(cid "wan-$1")" || return 1
  links="$(docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$c" | sed -n 's/^MERIDIAN_WANLINK_LINKS=//p')"
  d="$(tr ',' '\n' <<<"$links" | sed -n 's/^0\.0\.0\.0:23791=etcd-1:2379@\([0-9]*\)ms$/\1/p')"
  [ -n "$d" ] && echo "$d"
}
# "<ms> <status line>" of one etcd /health request from the region's proxy container.
control_round_trip() {
  local c; c="$(cid "pgproxy-$1")" || return 1
  docker exec "$c" bash -c 'exec 3<>/dev/tcp/control-plane/23791 || exit 1
    s=$(date +%s%N); printf "GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n" >&3
    IFS= read -r -t 5 line <&3 || exit 1; e=$(date +%s%N)
    echo "$(( (e - s) / 1000000 )) ${line%$'"'"'\r'"'"'}"'
}
for r in us-west eu-west; do
  expect "pgproxy-$r resolves control-plane but not etcd-1 (it is not on the control network)"
  docker exec "$(cid "pgproxy-$r")" getent hosts control-plane >/dev/null 2>&1 \
    || fail "pgproxy-$r cannot resolve control-plane (its WAN link container)"
  if docker exec "$(cid "pgproxy-$r")" getent hosts etcd-1 >/dev/null 2>&1; then
    fail "pgproxy-$r reaches etcd-1 directly: the control plane would not cross the WAN"
  fi
  ok "etcd-1 is not visible from $r"
  D="$(control_delay_ms "$r")" || fail "cannot read the etcd link delay of wan-$r"
  expect "an etcd /health round trip from $r through control-plane takes at least 2 x ${D} ms"
  RT="$(control_round_trip "$r")" || fail "no answer from etcd through wan-$r"
  MS="${RT%% *}"
  case "$RT" in *" 2"[0-9][0-9]*) ;; *) fail "etcd through wan-$r answered: $RT" ;; esac
  [ "$MS" -ge $((2 * D)) ] || fail "etcd round trip from $r took $MS ms, less than 2 x $D ms: not delayed"
  ok "$r -> etcd round trip $MS ms (${RT#* })"
done

# ---------------------------------------------------------------- 2. write + read in eu-west
step "write in eu-west through its pgproxy and read it back there"
TOKEN="demo-$(date +%s)-$$"
expect "the INSERT commits (it goes to the primary, $PRIMARY)"
lg_query eu-west "CREATE TABLE IF NOT EXISTS demo_notes (id bigserial PRIMARY KEY, region text NOT NULL, msg text NOT NULL, at timestamptz NOT NULL DEFAULT now()); INSERT INTO demo_notes (region, msg) VALUES ('eu-west', '$TOKEN')" >/dev/null \
  || fail "INSERT through pgproxy-eu-west failed"
ok "inserted '$TOKEN'"
READBACK=""
read_back_locally() {
  READBACK="$(lg_query eu-west "SELECT msg, inet_server_port(), pg_is_in_recovery() FROM demo_notes WHERE msg = '$TOKEN'" 2>/dev/null)"
  [ "$(cut -f1 <<<"$READBACK")" = "$TOKEN" ] && [ "$(cut -f2 <<<"$READBACK")" = "${PG_PORT[eu-west]}" ] && [ "$(cut -f3 <<<"$READBACK")" = t ]
}
wait_until 30 "the row is read back through pgproxy-eu-west, served by the eu-west replica (port ${PG_PORT[eu-west]}, in recovery)" read_back_locally \
  || fail "read-back not served locally; last answer: ${READBACK:-<nothing>}"
say "  | $(tr '\t' ' ' <<<"$READBACK")"

# ---------------------------------------------------------------- 2b. regional cache
step "regional cache: a cached read in eu-west, invalidated by a write through us-west"
proxy_metric() {  # region, series → value (0 when absent)
  local c v; c="$(cid "pgproxy-$1")" || return 1
  v="$(docker exec "$c" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9187; printf "GET /metrics HTTP/1.0\r\n\r\n" >&3; cat <&3' 2>/dev/null \
    | awk -v s="$2" 'index($0, s) == 1 || index($0, "_" s) { print $NF; exit }')"
  echo "${v:-0}"
}
HITS='cache_lookups_total{outcome="hit"}'
CACHED_Q="/* meridian:cache ttl=60s */ SELECT v FROM demo_cache WHERE k = 1"
upsert() { lg_query us-west "CREATE TABLE IF NOT EXISTS demo_cache (k int PRIMARY KEY, v text NOT NULL); INSERT INTO demo_cache VALUES (1, '$1') ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v" >/dev/null; }
upsert "$TOKEN-v1" || fail "upsert through pgproxy-us-west failed"
HITS_BEFORE="$(proxy_metric eu-west "$HITS")"
cached_is() {
  [ "$(lg_query eu-west "$CACHED_Q" 2>/dev/null)" = "$1" ] \
    && awk -v a="$(proxy_metric eu-west "$HITS")" -v b="$2" 'BEGIN { exit !(a > b) }'
}
expect "eu-west reads '$TOKEN-v1' and its proxy counts cache hits (the entry lives in redis-eu-west)"
# On failure, say why no entry was served: every lookup outcome of the proxy, the
# freshness lease keys in redis-eu-west (a lagging lookup means the lease of the
# proxy's epoch is missing) and what each agent last said about its lease.
cache_diagnosis() {
  local c r
  c="$(cid "pgproxy-eu-west")" && docker exec "$c" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9187; printf "GET /metrics HTTP/1.0\r\n\r\n" >&3; cat <&3' 2>/dev/null \
    | grep -E 'cache_lookups_total|epoch' | grep -v '^#' | sed 's/^/  | pgproxy-eu-west: /'
  c="$(cid "redis-eu-west")" && for k in $(docker exec "$c" redis-cli --scan --pattern '*fresh*' 2>/dev/null); do
    say "  | redis-eu-west: $k = $(docker exec "$c" redis-cli GET "$k" 2>&1), pttl $(docker exec "$c" redis-cli PTTL "$k" 2>&1) ms"
  done
  for r in $REGIONS; do
    c="$(cid "node-$r")" && docker logs "$c" 2>&1 | grep -E 'freshness lease|horizon' | tail -3 | sed "s/^/  | node-$r: /"
  done
}
wait_until 60 "a cache hit on '$TOKEN-v1' in eu-west" cached_is "$TOKEN-v1" "$HITS_BEFORE" \
  || { cache_diagnosis >&2; fail "no cache hit in eu-west (hits $(proxy_metric eu-west "$HITS"), was $HITS_BEFORE; lagging lookups $(proxy_metric eu-west 'cache_lookups_total{outcome="lagging"}'), misses $(proxy_metric eu-west 'cache_lookups_total{outcome="miss"}'))"; }
ok "cache hits in eu-west: $(proxy_metric eu-west "$HITS")"
upsert "$TOKEN-v2" || fail "second upsert failed"
new_value_in_eu() { [ "$(lg_query eu-west "$CACHED_Q" 2>/dev/null)" = "$TOKEN-v2" ]; }
expect "the update's invalidation reaches eu-west's Redis: the cached query returns '$TOKEN-v2'"
# On failure, say where the old value came from: the cache (hits counted) or the replica.
eu_replica_value() {
  docker exec "$(cid node-eu-west)" psql -h 127.0.0.1 -p "${PG_PORT[eu-west]}" -U postgres \
    -d postgres -Atc "SELECT v FROM demo_cache WHERE k = 1" 2>&1
}
wait_until 15 "eu-west reads '$TOKEN-v2'" new_value_in_eu \
  || fail "eu-west still reads $(lg_query eu-west "$CACHED_Q" 2>/dev/null) (eu-west's replica itself has: $(eu_replica_value); cache hits $(proxy_metric eu-west "$HITS"), stale lookups $(proxy_metric eu-west 'cache_lookups_total{outcome="stale"}'), lagging lookups $(proxy_metric eu-west 'cache_lookups_total{outcome="lagging"}'))"
ok "invalidated; eu-west stale lookups so far: $(proxy_metric eu-west 'cache_lookups_total{outcome="stale"}')"

# ---------------------------------------------------------------- 3. kill the primary
step "docker kill the primary's node container ($PRIMARY)"
OLD="$PRIMARY"
declare -A ERR_BEFORE
for r in $REGIONS; do ERR_BEFORE[$r]="$(total_errors "$r")"; done
say "  load generators before:"; show_loadgens
KILLED_AT="$(date +%s)"
docker kill "$(cid "$OLD")" >/dev/null || fail "docker kill $OLD"
ok "killed $OLD"
new_leader_after_kill() {
  cluster_is "" "$EPOCH" "" || return 1
  [ "$(leader_name "$LAST_STATUS")" != "$OLD" ]
}
wait_until 60 "a new primary other than $OLD, epoch > $EPOCH, serving" new_leader_after_kill || { show_status; fail "no failover"; }
FAILOVER_SECS=$(( $(date +%s) - KILLED_AT ))
PRIMARY="$(leader_name "$LAST_STATUS")"; EPOCH="$(leader_epoch "$LAST_STATUS")"
show_status
say "  failover: $OLD -> $PRIMARY (epoch $EPOCH), seen by this script's polling ${FAILOVER_SECS} s after the kill (the events carry the exact times)"
say "  --- meridianctl events (last 10)"; ctl events 2>&1 | tail -10 | sed 's/^/  | /'
SINCE="$(date +%s)"
wait_until 60 "every region's load generator commits again without errors" all_loadgens_healthy_since "$SINCE" \
  || { show_loadgens; fail "load generators did not recover"; }
say "  load generators after (errors during the failover: $(for r in $REGIONS; do printf '%s=%s ' "$r" "$(( $(total_errors "$r") - ${ERR_BEFORE[$r]:-0} ))"; done)):"
show_loadgens

# ---------------------------------------------------------------- 4. bring it back
step "docker start $OLD again"
docker start "$(cid "$OLD")" >/dev/null || fail "docker start $OLD"
rejoined() { # node $1 is a streaming replica of the serving leader, and so is every other non-leader
  cluster_is "" $((EPOCH - 1)) "" || return 1
  local leader; leader="$(leader_name "$LAST_STATUS")"
  [ "$leader" != "$1" ] && cluster_is "$leader" $((EPOCH - 1)) "$(others_than "$(region_of "$leader")")"
}
warn_if_leader_moved() {
  local now; now="$(leader_name "$LAST_STATUS")"
  if [ "$now" != "$PRIMARY" ]; then
    say "  WARNING: the leader moved again, $PRIMARY -> $now (epoch $(leader_epoch "$LAST_STATUS")), without a failure injected"
    PRIMARY="$now"; EPOCH="$(leader_epoch "$LAST_STATUS")"
  fi
}
wait_until 120 "$OLD rejoins as a streaming replica (of $PRIMARY)" rejoined "$OLD" \
  || { show_status; fail "$OLD did not rejoin"; }
warn_if_leader_moved
show_status

# ---------------------------------------------------------------- 5. partition
CUT_REGION="$(region_of "$PRIMARY")"; CUT_NODE="$PRIMARY"
step "partition region $CUT_REGION (the primary's) from the control and WAN networks"
partition "$CUT_REGION"
wait_until 30 "node-$CUT_REGION fences itself (its Postgres is stopped or read-only)" node_fenced "$CUT_REGION" \
  || fail "node-$CUT_REGION still accepts writes while cut off"
new_leader_after_cut() {
  cluster_is "" "$EPOCH" "" || return 1
  [ "$(leader_name "$LAST_STATUS")" != "$CUT_NODE" ]
}
wait_until 60 "a new primary outside $CUT_REGION, epoch > $EPOCH" new_leader_after_cut || { show_status; fail "no failover away from the partitioned region"; }
PRIMARY="$(leader_name "$LAST_STATUS")"; EPOCH="$(leader_epoch "$LAST_STATUS")"
show_status
SINCE="$(date +%s)"
others_healthy() { local r; for r in $REGIONS; do [ "$r" = "$CUT_REGION" ] || loadgen_healthy_since "$r" "$SINCE" || return 1; done; }
wait_until 60 "the load generators outside $CUT_REGION commit again without errors" others_healthy || { show_loadgens; fail "other regions did not recover"; }
still_fenced() { node_fenced "$CUT_REGION"; }
still_fenced || fail "node-$CUT_REGION accepts writes again while partitioned"
ok "node-$CUT_REGION is still fenced"
show_loadgens

# ---------------------------------------------------------------- 6. heal
step "heal the partition of $CUT_REGION"
heal
wait_until 120 "$CUT_NODE rejoins as a streaming replica (of $PRIMARY)" rejoined "$CUT_NODE" \
  || { show_status; fail "$CUT_NODE did not rejoin"; }
warn_if_leader_moved
SINCE="$(date +%s)"
wait_until 60 "every region's load generator commits again without errors" all_loadgens_healthy_since "$SINCE" \
  || { show_loadgens; fail "load generators did not recover after the heal"; }
show_status
show_loadgens
