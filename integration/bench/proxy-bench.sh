#!/usr/bin/env bash
# Proxy throughput/latency benchmark (issue 2): pgbench -S through
#   direct               straight to the primary
#   pgproxy-session      meridian-pgproxy, --pool-mode session
#   pgproxy-transaction  meridian-pgproxy, --pool-mode transaction
#   pgbouncer            PgBouncer (Debian package), pool_mode = transaction
#   haproxy              HAProxy (Debian package), mode tcp to the primary
#   pgbouncer-session    PgBouncer, pool_mode = session (opt-in via --targets)
#   pgproxy-session-1t, pgproxy-transaction-1t
#                        meridian-pgproxy with --worker-threads 1 (a single-
#                        threaded runtime instead of one thread per CPU; opt-in)
# in simple and extended protocol at 1/8/32/64 clients, several rounds, and
# prints a markdown table (median tps, best tps, median average latency, ratio
# of median tps to direct's median in the same mode and client count).
#
#   integration/bench/proxy-bench.sh [--duration S] [--clients "1 8 32 64"]
#       [--rounds N] [--modes "simple extended"] [--targets "direct ..."]
#       [--scale N] [--tx-pool-size N] [--bin-dir DIR] [--out FILE] [--quick]
#
# Everything runs on 127.0.0.1 with free ports in a fresh temp dir: a
# PostgreSQL 15 primary and one streaming replica (run as OS user postgres,
# fsync off), `pgbench -i -s SCALE`, then every target, all started up front
# and stopped (by pid) on exit together with the servers; the temp dir is
# removed. Run as root (it switches to user postgres for the servers).
#
# meridian-pgproxy sends the read-only pgbench -S statements to the replica
# (that is its job); every other target reads from the primary. Both servers
# share the same cores, so on one machine this is no extra capacity, but the
# report says so and shows where a probe read through pgproxy ran and
# pgproxy's routed-statement counters.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
orig_cmd="integration/bench/proxy-bench.sh"
for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,-]+$ ]]; then orig_cmd+=" $a"; else orig_cmd+=" '$a'"; fi
done
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- options
duration=10
clients="1 8 32 64"
rounds=3
modes="simple extended"
targets="direct pgproxy-session pgproxy-transaction pgbouncer haproxy"
all_targets="direct pgproxy-session pgproxy-transaction pgbouncer pgbouncer-session haproxy pgproxy-session-1t pgproxy-transaction-1t"
scale=10
tx_pool_size=20
bin_dir=""
out=""
pg_bin="${MERIDIAN_PG_BIN_DIR:-/usr/lib/postgresql/15/bin}"
pgbouncer_bin="${PGBOUNCER_BIN:-/usr/sbin/pgbouncer}"
haproxy_bin="${HAPROXY_BIN:-/usr/sbin/haproxy}"
warmup=2

usage() {
    cat <<EOF
Usage: $0 [options]

pgbench -S throughput and average latency: direct vs meridian-pgproxy vs
PgBouncer vs HAProxy, on a private PostgreSQL 15 primary + streaming replica.

Options (defaults in brackets):
  --duration SECONDS   length of each pgbench run [$duration]
  --clients "LIST"     client counts [$clients]; -j is min(clients, 2)
  --rounds N           rounds over the whole matrix; median and best reported [$rounds]
  --modes "LIST"       pgbench -M protocols: simple extended prepared [$modes]
                       (PgBouncer 1.18 in transaction mode cannot run -M prepared)
  --targets "LIST"     subset/order of: $all_targets
                       [$targets]
  --scale N            pgbench -i scale factor [$scale]
  --tx-pool-size N     backend pool size of the transaction-mode poolers
                       (pgproxy-transaction --pool-size, PgBouncer default_pool_size) [$tx_pool_size]
  --bin-dir DIR        directory holding meridian-pgproxy
                       [target/release, else target/debug]
  --out FILE           also write the report (markdown) to FILE
  --quick              --duration 3 --clients "1 8" --rounds 1 (a smoke run)
  -h, --help           this text

Environment: MERIDIAN_PG_BIN_DIR (PostgreSQL server programs)
[$pg_bin], PGBOUNCER_BIN [$pgbouncer_bin], HAPROXY_BIN [$haproxy_bin].
Per-run pgbench output and server logs go to the temp dir, which is removed
on exit unless KEEP_BENCH_DIR=1.
EOF
}

need_arg() { [ $# -ge 2 ] || { echo "option $1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
    --duration) need_arg "$@"; duration="$2"; shift 2 ;;
    --clients) need_arg "$@"; clients="$2"; shift 2 ;;
    --rounds) need_arg "$@"; rounds="$2"; shift 2 ;;
    --modes) need_arg "$@"; modes="$2"; shift 2 ;;
    --targets) need_arg "$@"; targets="$2"; shift 2 ;;
    --scale) need_arg "$@"; scale="$2"; shift 2 ;;
    --tx-pool-size) need_arg "$@"; tx_pool_size="$2"; shift 2 ;;
    --bin-dir) need_arg "$@"; bin_dir="$2"; shift 2 ;;
    --out) need_arg "$@"; out="$2"; shift 2 ;;
    --quick) duration=3; clients="1 8"; rounds=1; warmup=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

is_uint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_uint "$duration" || { echo "--duration must be a positive integer, got '$duration'" >&2; exit 2; }
is_uint "$rounds" || { echo "--rounds must be a positive integer, got '$rounds'" >&2; exit 2; }
is_uint "$scale" || { echo "--scale must be a positive integer, got '$scale'" >&2; exit 2; }
is_uint "$tx_pool_size" || { echo "--tx-pool-size must be a positive integer, got '$tx_pool_size'" >&2; exit 2; }
max_clients=0
for c in $clients; do
    is_uint "$c" || { echo "--clients: '$c' is not a positive integer" >&2; exit 2; }
    if [ "$c" -gt "$max_clients" ]; then max_clients=$c; fi
done
[ "$max_clients" -gt 0 ] || { echo "--clients is empty" >&2; exit 2; }
for m in $modes; do
    case "$m" in simple | extended | prepared) ;; *) echo "--modes: unknown protocol '$m'" >&2; exit 2 ;; esac
done
for t in $targets; do
    [[ " $all_targets " == *" $t "* ]] || { echo "--targets: unknown target '$t' (known: $all_targets)" >&2; exit 2; }
done
has_target() { [[ " $targets " == *" $1 "* ]]; }

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'proxy-bench: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the servers run as OS user postgres via setpriv)"
id postgres >/dev/null 2>&1 || die "OS user 'postgres' does not exist"
[ -x "$pg_bin/postgres" ] || die "no PostgreSQL server in $pg_bin (set MERIDIAN_PG_BIN_DIR)"
command -v pgbench >/dev/null || [ -x "$pg_bin/pgbench" ] || die "pgbench not found"
pgbench_bin="$pg_bin/pgbench"
[ -x "$pgbench_bin" ] || pgbench_bin="$(command -v pgbench)"
psql_bin="$pg_bin/psql"
[ -x "$psql_bin" ] || psql_bin="$(command -v psql)"

pgproxy=""
pgproxy_targets="pgproxy-session pgproxy-transaction pgproxy-session-1t pgproxy-transaction-1t"
if [ -n "$(for t in $pgproxy_targets; do has_target "$t" && echo "$t"; done)" ]; then
    if [ -n "$bin_dir" ]; then
        pgproxy="$bin_dir/meridian-pgproxy"
    elif [ -x "$repo_root/target/release/meridian-pgproxy" ]; then
        pgproxy="$repo_root/target/release/meridian-pgproxy"
    else
        pgproxy="$repo_root/target/debug/meridian-pgproxy"
    fi
    [ -x "$pgproxy" ] || die "meridian-pgproxy not found at $pgproxy (cargo build --release -p meridian-pgproxy, or --bin-dir)"
fi
if has_target pgbouncer || has_target pgbouncer-session; then
    [ -x "$pgbouncer_bin" ] || die "PgBouncer not found at $pgbouncer_bin (apt-get install pgbouncer)"
fi
if has_target haproxy; then
    [ -x "$haproxy_bin" ] || die "HAProxy not found at $haproxy_bin (apt-get install haproxy)"
fi

# ---------------------------------------------------------------- cleanup
work=""
pids=()      # long-running processes we started (pgproxy, pgbouncer, haproxy)
pg_dirs=()   # data dirs of postmasters we started

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local i pid
    if [ -n "${current_pgbench:-}" ]; then
        kill -TERM "$current_pgbench" 2>/dev/null || true
        wait "$current_pgbench" 2>/dev/null || true
    fi
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid="${pids[$i]}"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    local postmasters=() d ppid
    for d in "${pg_dirs[@]}"; do
        ppid=""
        [ -f "$d/postmaster.pid" ] && ppid="$(head -n1 "$d/postmaster.pid" 2>/dev/null || true)"
        if [[ "$ppid" =~ ^[0-9]+$ ]]; then
            # SIGQUIT = immediate shutdown; the postmaster takes its children down.
            kill -QUIT "$ppid" 2>/dev/null || true
            postmasters+=("$ppid")
        fi
    done
    for ppid in "${postmasters[@]}"; do
        for _ in $(seq 100); do kill -0 "$ppid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$ppid" 2>/dev/null || true
    done
    if [ -n "$work" ] && [ -d "$work" ]; then
        if [ "${KEEP_BENCH_DIR:-0}" = 1 ]; then
            echo "kept $work" >&2
        else
            rm -rf "$work"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

work="$(mktemp -d /tmp/meridian-proxy-bench.XXXXXX)"
chmod 0755 "$work"

# ---------------------------------------------------------------- helpers
used_ports=" "
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 40000))
        [[ "$used_ports" == *" $p "* ]] && continue
        if [ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]; then
            used_ports+="$p "
            echo "$p"
            return 0
        fi
    done
    die "no free loopback port found"
}

as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

# Wait until `SELECT 1` answers on PORT (through whatever listens there).
# Fails early when the last spawned process has exited.
wait_sql() {
    local port="$1" what="$2" log="$3" deadline=$((SECONDS + 60)) pid="${pids[-1]}"
    until "$psql_bin" -X -q -h 127.0.0.1 -p "$port" -U postgres -d bench -tAc 'select 1' >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log" >&2
            die "$what exited before answering on port $port (log above: $log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$log" >&2
            die "$what on port $port did not answer SELECT 1 within 60 s (log above: $log)"
        fi
        sleep 0.2
    done
}

# Start a long-running process in the background, remember its pid.
spawn() {
    local log="$1"; shift
    "$@" >"$log" 2>&1 &
    pids+=($!)
}

sql() { "$psql_bin" -X -q -h 127.0.0.1 -p "$1" -U postgres -d "${3:-postgres}" -tAc "$2"; }

# ---------------------------------------------------------------- postgres
primary_port="$(free_port)"
replica_port="$(free_port)"
mkdir -p "$work/pg" "$work/sock"
chown postgres:postgres "$work/pg" "$work/sock"

say "initdb (primary on 127.0.0.1:$primary_port, replica on 127.0.0.1:$replica_port, dir $work)"
as_pg "$pg_bin/initdb" -D "$work/pg/primary" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$work/initdb.log" 2>&1 ||
    { cat "$work/initdb.log" >&2; die "initdb failed"; }
pg_conf() {
    cat <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work/sock'
max_connections = 300
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = replica
max_wal_senders = 5
hot_standby = on
logging_collector = off
EOF
}
{ pg_conf; echo "port = $primary_port"; } | as_pg tee -a "$work/pg/primary/postgresql.conf" >/dev/null
cat <<EOF | as_pg tee "$work/pg/primary/pg_hba.conf" >/dev/null
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
EOF
pg_dirs+=("$work/pg/primary")
as_pg "$pg_bin/pg_ctl" -D "$work/pg/primary" -l "$work/pg/primary.log" -w -t 60 start >/dev/null ||
    { tail -n 30 "$work/pg/primary.log" >&2; die "primary did not start"; }

as_pg "$pg_bin/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres -D "$work/pg/replica" -X stream -R -c fast \
    >"$work/basebackup.log" 2>&1 || { cat "$work/basebackup.log" >&2; die "pg_basebackup failed"; }
echo "port = $replica_port" | as_pg tee -a "$work/pg/replica/postgresql.conf" >/dev/null
pg_dirs+=("$work/pg/replica")
as_pg "$pg_bin/pg_ctl" -D "$work/pg/replica" -l "$work/pg/replica.log" -w -t 60 start >/dev/null ||
    { tail -n 30 "$work/pg/replica.log" >&2; die "replica did not start"; }

sql "$primary_port" "create database bench" >/dev/null
say "pgbench -i -s $scale"
"$pgbench_bin" -i -s "$scale" -q -h 127.0.0.1 -p "$primary_port" -U postgres bench >"$work/pgbench-init.log" 2>&1 ||
    { cat "$work/pgbench-init.log" >&2; die "pgbench -i failed"; }
sql "$primary_port" "checkpoint" bench >/dev/null
target_lsn="$(sql "$primary_port" "select pg_current_wal_lsn()")"
deadline=$((SECONDS + 120))
until [ "$(sql "$replica_port" "select coalesce(pg_last_wal_replay_lsn() >= '$target_lsn', false)" 2>/dev/null)" = t ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "replica did not replay up to $target_lsn in 120 s"
    sleep 0.2
done
[ "$(sql "$replica_port" "select pg_is_in_recovery()")" = t ] || die "replica is not in recovery"
# Warm both buffer caches with the table pgbench -S reads.
for p in "$primary_port" "$replica_port"; do
    sql "$p" "select count(*) from pgbench_accounts" bench >/dev/null
done

# ---------------------------------------------------------------- targets
declare -A port_of admin_of read_port_of
port_of[direct]="$primary_port"
session_pool=$((max_clients + 8))

start_pgproxy() { # name, pool mode, pool size, worker threads
    local name="$1" mode="$2" pool="$3" threads="$4" port admin
    port="$(free_port)"
    admin="$(free_port)"
    say "$name: $pgproxy --pool-mode $mode --pool-size $pool --worker-threads $threads on 127.0.0.1:$port"
    spawn "$work/$name.log" env RUST_LOG="${RUST_LOG:-warn}" "$pgproxy" \
        --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --primary "127.0.0.1:$primary_port" --replica "127.0.0.1:$replica_port" \
        --auth trust --pool-mode "$mode" --pool-size "$pool" --max-clients 300 \
        --worker-threads "$threads"
    port_of[$name]="$port"
    admin_of[$name]="$admin"
    wait_sql "$port" "$name" "$work/$name.log"
}

start_pgbouncer() {
    local name="$1" mode="$2" pool="$3" port dir
    port="$(free_port)"
    dir="$work/$name"
    mkdir -p "$dir"
    echo '"postgres" ""' >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$primary_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = $mode
max_client_conn = 300
default_pool_size = $pool
max_db_connections = 0
server_reset_query = DISCARD ALL
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
    chown -R postgres:postgres "$dir"
    say "$name: PgBouncer pool_mode=$mode default_pool_size=$pool on 127.0.0.1:$port"
    spawn "$dir/stdout.log" setpriv --reuid=postgres --regid=postgres --init-groups -- "$pgbouncer_bin" "$dir/pgbouncer.ini"
    port_of[$name]="$port"
    wait_sql "$port" "$name" "$dir/stdout.log"
}

start_haproxy() {
    local port
    port="$(free_port)"
    mkdir -p "$work/haproxy"
    cat >"$work/haproxy/haproxy.cfg" <<EOF
global
    maxconn 1000

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend pg
    bind 127.0.0.1:$port
    default_backend primary

backend primary
    server primary 127.0.0.1:$primary_port
EOF
    chown -R postgres:postgres "$work/haproxy"
    say "haproxy: tcp mode on 127.0.0.1:$port -> $primary_port"
    spawn "$work/haproxy/haproxy.log" setpriv --reuid=postgres --regid=postgres --init-groups -- \
        "$haproxy_bin" -db -f "$work/haproxy/haproxy.cfg"
    port_of[haproxy]="$port"
    wait_sql "$port" haproxy "$work/haproxy/haproxy.log"
}

for t in $targets; do
    case "$t" in
    direct) ;;
    pgproxy-session) start_pgproxy "$t" session "$session_pool" 0 ;;
    pgproxy-transaction) start_pgproxy "$t" transaction "$tx_pool_size" 0 ;;
    pgproxy-session-1t) start_pgproxy "$t" session "$session_pool" 1 ;;
    pgproxy-transaction-1t) start_pgproxy "$t" transaction "$tx_pool_size" 1 ;;
    pgbouncer) start_pgbouncer "$t" transaction "$tx_pool_size" ;;
    pgbouncer-session) start_pgbouncer "$t" session "$session_pool" ;;
    haproxy) start_haproxy ;;
    esac
done

# Where does a read through pgproxy run? (stated in the report)
for t in $pgproxy_targets; do
    if has_target "$t"; then
        read_port_of[$t]="$(sql "${port_of[$t]}" "select inet_server_port()" bench 2>/dev/null || echo '?')"
    fi
done

# pgproxy's own counters (statements routed by target, parse fallbacks, errors).
pgproxy_metrics() {
    curl -fsS --max-time 5 "http://127.0.0.1:${admin_of[$1]}/metrics" 2>/dev/null |
        grep -E '^meridian_pgproxy_(queries_routed|parse_fallbacks|errors)' |
        sed 's/_total{/{/; s/^meridian_pgproxy_//' | tr '\n' ' ' | sed 's/ $//' || true
}

# ---------------------------------------------------------------- runs
# results[target|mode|clients] = space-separated "tps:latency_ms:failed" per round
declare -A results
current_pgbench=""
# Runs pgbench in the background and waits, so that a signal to this script
# interrupts the wait at once and cleanup() stops the pgbench too.
run_pgbench() { # target mode clients duration log
    local t="$1" m="$2" c="$3" d="$4" log="$5" j=$(($3 < 2 ? $3 : 2)) rc=0
    "$pgbench_bin" -n -S -T "$d" -c "$c" -j "$j" -M "$m" -h 127.0.0.1 -p "${port_of[$t]}" -U postgres bench >"$log" 2>&1 &
    current_pgbench=$!
    wait "$current_pgbench" || rc=$?
    current_pgbench=""
    return "$rc"
}
pgbench_cmd_example() {
    echo "pgbench -n -S -T $duration -c C -j min(C,2) -M simple|extended -h 127.0.0.1 -p PORT -U postgres bench"
}

for t in $targets; do
    say "warm-up $t (${warmup}s, 8 clients, extended)"
    run_pgbench "$t" extended 8 "$warmup" "$work/warmup-$t.log" ||
        { cat "$work/warmup-$t.log" >&2; die "warm-up pgbench through $t failed"; }
done

runs_total=0
for _ in $(seq "$rounds"); do for _ in $clients; do for _ in $modes; do for _ in $targets; do
    runs_total=$((runs_total + 1))
done; done; done; done
say "$runs_total pgbench runs of ${duration}s (about $((runs_total * (duration + 1) / 60 + 1)) min)"

n=0
loads=() # 1-minute load average sampled before each run (the machine may be shared)
for r in $(seq "$rounds"); do
    for c in $clients; do
        for m in $modes; do
            for t in $targets; do
                n=$((n + 1))
                loads+=("$(cut -d' ' -f1 /proc/loadavg)")
                log="$work/run-$r-$t-$m-$c.log"
                if ! run_pgbench "$t" "$m" "$c" "$duration" "$log"; then
                    say "run $n/$runs_total: $t -M $m -c $c FAILED (pgbench exit code != 0):"
                    tail -n 5 "$log" >&2
                    results["$t|$m|$c"]+="fail "
                    continue
                fi
                tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$log" | head -n1)"
                lat="$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$log" | head -n1)"
                failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$log" | head -n1)"
                if [ -z "$tps" ] || [ -z "$lat" ]; then
                    say "run $n/$runs_total: $t -M $m -c $c: could not parse pgbench output:"
                    tail -n 5 "$log" >&2
                    results["$t|$m|$c"]+="fail "
                    continue
                fi
                results["$t|$m|$c"]+="$tps:$lat:${failed:-0} "
                say "round $r run $n/$runs_total: $t -M $m -c $c: tps $tps, latency $lat ms, failed ${failed:-0}"
            done
        done
    done
done

# ---------------------------------------------------------------- report
# stats "tps:lat:failed ..." -> "median_tps best_tps median_lat failed_total ok_rounds"
stats() {
    tr ' ' '\n' <<<"$1" | awk -F: '
        NF == 0 { next }
        $1 == "fail" { bad++; next }
        { n++; tps[n] = $1; lat[n] = $2; failed += $3 }
        function median(a, k,    i, j, t, b) {
            for (i = 1; i <= k; i++) b[i] = a[i]
            for (i = 2; i <= k; i++) { t = b[i]; for (j = i - 1; j >= 1 && b[j] > t; j--) b[j + 1] = b[j]; b[j + 1] = t }
            return (k % 2) ? b[(k + 1) / 2] : (b[k / 2] + b[k / 2 + 1]) / 2
        }
        END {
            if (n == 0) { printf "- - - - 0\n"; exit }
            best = tps[1]; for (i = 2; i <= n; i++) if (tps[i] > best) best = tps[i]
            printf "%.0f %.0f %.3f %d %d\n", median(tps, n), best, median(lat, n), failed, n
        }'
}

# "min X, median Y, max Z" of the load samples taken before the runs.
load_summary() {
    [ "${#loads[@]}" -gt 0 ] || { echo "none sampled"; return; }
    printf '%s\n' "${loads[@]}" | sort -g | awk '
        { v[NR] = $1 }
        END { printf "min %s, median %s, max %s", v[1], v[int((NR + 1) / 2)], v[NR] }'
}

report() {
    local t m c s mt bt ml f ok dm ratio
    echo "## pgbench -S: direct vs meridian-pgproxy vs PgBouncer vs HAProxy"
    echo
    echo "Command: \`$orig_cmd\` ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "- Each run: \`$(pgbench_cmd_example)\` against a fresh \`pgbench -i -s $scale\` database."
    echo "- $rounds round(s) over the whole matrix, interleaved (every target runs back to back for each client count and protocol); tps is the median over rounds (best also shown), latency is the median of the rounds' average latencies; \"vs direct\" = median tps / direct's median tps for the same protocol and clients."
    echo "- Machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM; load average at start: $load_start, at end: $(cut -d' ' -f1-3 /proc/loadavg); 1-minute load before each run: $(load_summary)."
    echo "- PostgreSQL: $pg_version; primary + 1 streaming replica on the same machine, fsync off, shared_buffers 256MB, max_connections 300."
    [ -n "$pgproxy" ] && echo "- meridian-pgproxy: \`$pgproxy\` ($pgproxy_build build; git $git_rev); session mode --pool-size $session_pool, transaction mode --pool-size $tx_pool_size; one runtime thread per CPU (\`--worker-threads 0\`, the default), the \`-1t\` targets a single-threaded runtime (\`--worker-threads 1\`). **pgproxy routes the read-only pgbench -S queries to the replica** (primary port $primary_port, replica port $replica_port); every other target reads from the primary."
    for t in $pgproxy_targets; do
        has_target "$t" || continue
        echo "  - $t: a probe \`select inet_server_port()\` ran on port ${read_port_of[$t]}; counters after the runs: \`$(pgproxy_metrics "$t")\`"
    done
    { has_target pgbouncer || has_target pgbouncer-session; } &&
        echo "- $("$pgbouncer_bin" --version | head -n1): transaction mode default_pool_size $tx_pool_size (session mode, when run: $session_pool), auth_type trust."
    has_target haproxy && echo "- $("$haproxy_bin" -v | head -n1 | sed 's/ - https.*//'): mode tcp to the primary (one bare forwarding hop)."
    [ "$pgproxy_build" = debug ] && echo "- **Warning: debug build of meridian-pgproxy; its numbers are not representative.**"
    [ "$duration" -lt 10 ] && echo "- **Warning: ${duration}s runs (smoke test); numbers are noise.**"
    echo
    echo "| target | protocol | clients | tps (median) | tps (best) | avg latency ms | vs direct | failed tx |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    for m in $modes; do
        for c in $clients; do
            dm=""
            if has_target direct; then
                read -r dm _ <<<"$(stats "${results[direct|$m|$c]:-}")"
            fi
            for t in $targets; do
                s="$(stats "${results[$t|$m|$c]:-}")"
                read -r mt bt ml f ok <<<"$s"
                ratio="-"
                if [[ "$dm" =~ ^[0-9]+$ ]] && [ "$dm" -gt 0 ] && [[ "$mt" =~ ^[0-9]+$ ]]; then
                    ratio="$(awk -v a="$mt" -v b="$dm" 'BEGIN { printf "%.2f", a / b }')"
                fi
                if [ "$ok" -lt "$rounds" ]; then f="$f ($((rounds - ok)) run(s) failed)"; fi
                echo "| $t | $m | $c | $mt | $bt | $ml | $ratio | $f |"
            done
        done
    done
}

pg_version="$(sql "$primary_port" "select version()" | sed 's/, compiled by.*//')"
git_rev="$(git -C "$repo_root" rev-parse --short HEAD 2>/dev/null || echo '?')"
[ -n "$(git -C "$repo_root" status --porcelain 2>/dev/null | head -n1)" ] && git_rev+="+dirty"
case "$pgproxy" in
*/debug/*) pgproxy_build=debug ;;
*/release/*) pgproxy_build=release ;;
*) pgproxy_build="unknown (--bin-dir)" ;;
esac

echo
if [ -n "$out" ]; then
    report | tee "$out"
else
    report
fi
