#!/usr/bin/env bash
# CPU per query of a proxy hop: how much CPU (utime + stime from /proc/PID/stat)
# the proxy process itself spends per `pgbench -S` query, for
#   one or more meridian-pgproxy binaries (--pgproxy NAME=PATH, repeatable),
#       each in --pool-mode session and in --pool-mode transaction, and
#   PgBouncer in pool_mode = session and in pool_mode = transaction (the yardstick),
# in the simple and extended protocol at 8 and 32 clients, over several
# interleaved rounds, and prints a markdown table (median CPU, user and system
# microseconds per query, and the ratio to PgBouncer's median in the same pooling
# mode, protocol and client count).
#
#   integration/bench/cpu-per-query.sh [--pgproxy NAME=PATH ...]
#       [--pgproxy-arg NAME=ARG ...] [--queries N]
#       [--rounds N] [--clients "8 32"] [--protocols "simple extended"]
#       [--pool-modes "session transaction"] [--pool-size N] [--worker-threads N]
#       [--warmup N] [--scale N] [--syscalls] [--out FILE] [--quick]
#
# Everything runs on 127.0.0.1 with free ports in a fresh temp dir: one
# PostgreSQL 15 primary (run as OS user postgres, fsync off; no replica, so
# meridian-pgproxy sends every statement to the primary like PgBouncer does),
# `pgbench -i -s SCALE`, then every target as its own process on its own port,
# all started up front and stopped (by pid) on exit together with the server;
# the temp dir is removed. Run as root (it switches to user postgres for
# PostgreSQL and PgBouncer).
#
# Each pgproxy binary is copied into the temp dir first, so a rebuild of the
# same path during the run does not change what is measured; the report names
# each binary by the sha256 of the copy.
#
# The numbers are only as good as the machine is quiet: the hop's own CPU time
# hardly depends on other load, but wake-ups, cache misses and frequency do, and
# a busy machine makes them noisy. The full run wants a quiet machine.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
orig_cmd="integration/bench/cpu-per-query.sh"
for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,+@-]+$ ]]; then orig_cmd+=" $a"; else orig_cmd+=" '${a//\'/\'\\\'\'}'"; fi
done
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- options
queries=80000
rounds=3
clients="8 32"
protocols="simple extended"
pool_modes="session transaction"
pool_size=""      # default: largest client count + 8 (no client waits for a backend)
worker_threads="" # default: the binary's own default
warmup=""         # default: a tenth of --queries
scale=10
syscalls=0
quick=0
out=""
pgproxy_specs=()
pgproxy_arg_names=() # --pgproxy-arg NAME=ARG, as two parallel arrays
pgproxy_arg_values=()
pg_bin="${MERIDIAN_PG_BIN_DIR:-/usr/lib/postgresql/15/bin}"
pgbouncer_bin="${PGBOUNCER_BIN:-/usr/sbin/pgbouncer}"

usage() {
    cat <<EOF
Usage: $0 [options]

CPU per pgbench -S query of the proxy process (utime + stime from /proc/PID/stat):
meridian-pgproxy binaries vs PgBouncer, session and transaction pooling, on a
private PostgreSQL 15 primary.

Options (defaults in brackets):
  --pgproxy NAME=PATH  a meridian-pgproxy binary to measure, shown as NAME; repeat
                       for several (e.g. --pgproxy before=/tmp/pgproxy-old
                       --pgproxy after=target/release/meridian-pgproxy)
                       [pgproxy=target/release/meridian-pgproxy]
  --pgproxy-arg NAME=ARG  one more argument for pgproxy NAME only; repeat for
                       several (e.g. --pgproxy 1t=target/release/meridian-pgproxy
                       --pgproxy-arg 1t=--worker-threads=1)
  --queries N          queries per measured run, all clients together; each client
                       runs N / clients transactions (pgbench -t) [$queries]
  --rounds N           interleaved rounds over the whole matrix; medians reported [$rounds]
  --clients "LIST"     client counts [$clients]; pgbench -j min(clients, 2)
  --protocols "LIST"   pgbench -M protocols: simple extended prepared [$protocols]
                       (PgBouncer 1.18 in transaction mode cannot run -M prepared)
  --pool-modes "LIST"  pooling modes of every proxy: session transaction [$pool_modes]
  --pool-size N        backend pool size of every proxy (pgproxy --pool-size,
                       PgBouncer default_pool_size) [largest client count + 8]
  --worker-threads N   pass --worker-threads N to every pgproxy [binary's default]
  --warmup N           queries of the warm-up run before each measured run
                       [a tenth of --queries]
  --scale N            pgbench -i scale factor [$scale]
  --syscalls           also count system calls per query with strace -c -f -p PID, in
                       an extra run per cell after the rounds (strace slows the
                       traced process, so it never overlaps a CPU measurement)
  --out FILE           also write the report (markdown) to FILE
  --quick              smoke run: --rounds 1 --queries 8000 --clients 8 --protocols simple
  -h, --help           this text

Environment: MERIDIAN_PG_BIN_DIR (PostgreSQL server programs) [$pg_bin],
PGBOUNCER_BIN [$pgbouncer_bin]. Per-run pgbench output and server logs go to the
temp dir, which is removed on exit unless KEEP_BENCH_DIR=1.
EOF
}

need_arg() { [ $# -ge 2 ] || { echo "option $1 needs a value (see --help)" >&2; exit 2; }; }
# Options given explicitly win over --quick, wherever they stand.
explicit=" "
while [ $# -gt 0 ]; do
    case "$1" in
    --pgproxy) need_arg "$@"; pgproxy_specs+=("$2"); shift 2 ;;
    --pgproxy-arg)
        need_arg "$@"
        [[ "$2" == *=* ]] || { echo "--pgproxy-arg wants NAME=ARG, got '$2'" >&2; exit 2; }
        pgproxy_arg_names+=("${2%%=*}"); pgproxy_arg_values+=("${2#*=}"); shift 2 ;;
    --queries) need_arg "$@"; queries="$2"; explicit+="queries "; shift 2 ;;
    --rounds) need_arg "$@"; rounds="$2"; explicit+="rounds "; shift 2 ;;
    --clients) need_arg "$@"; clients="$2"; explicit+="clients "; shift 2 ;;
    --protocols) need_arg "$@"; protocols="$2"; explicit+="protocols "; shift 2 ;;
    --pool-modes) need_arg "$@"; pool_modes="$2"; shift 2 ;;
    --pool-size) need_arg "$@"; pool_size="$2"; shift 2 ;;
    --worker-threads) need_arg "$@"; worker_threads="$2"; shift 2 ;;
    --warmup) need_arg "$@"; warmup="$2"; shift 2 ;;
    --scale) need_arg "$@"; scale="$2"; shift 2 ;;
    --syscalls) syscalls=1; shift ;;
    --out) need_arg "$@"; out="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$quick" = 1 ]; then
    [[ "$explicit" == *" rounds "* ]] || rounds=1
    [[ "$explicit" == *" queries "* ]] || queries=8000
    [[ "$explicit" == *" clients "* ]] || clients=8
    [[ "$explicit" == *" protocols "* ]] || protocols=simple
fi

is_uint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_uint "$queries" || { echo "--queries must be a positive integer, got '$queries'" >&2; exit 2; }
is_uint "$rounds" || { echo "--rounds must be a positive integer, got '$rounds'" >&2; exit 2; }
is_uint "$scale" || { echo "--scale must be a positive integer, got '$scale'" >&2; exit 2; }
[ -z "$warmup" ] && warmup=$((queries / 10))
[[ "$warmup" =~ ^[0-9]+$ ]] || { echo "--warmup must be a non-negative integer, got '$warmup'" >&2; exit 2; }
[ -z "$worker_threads" ] || [[ "$worker_threads" =~ ^[0-9]+$ ]] ||
    { echo "--worker-threads must be a non-negative integer, got '$worker_threads'" >&2; exit 2; }
max_clients=0
for c in $clients; do
    is_uint "$c" || { echo "--clients: '$c' is not a positive integer" >&2; exit 2; }
    [ "$c" -le "$queries" ] || { echo "--clients: $c clients but only $queries queries" >&2; exit 2; }
    if [ "$c" -gt "$max_clients" ]; then max_clients=$c; fi
done
[ "$max_clients" -gt 0 ] || { echo "--clients is empty" >&2; exit 2; }
[ -z "$pool_size" ] && pool_size=$((max_clients + 8))
is_uint "$pool_size" || { echo "--pool-size must be a positive integer, got '$pool_size'" >&2; exit 2; }
[ -n "$protocols" ] || { echo "--protocols is empty" >&2; exit 2; }
for m in $protocols; do
    case "$m" in simple | extended | prepared) ;; *) echo "--protocols: unknown protocol '$m'" >&2; exit 2 ;; esac
done
[ -n "$pool_modes" ] || { echo "--pool-modes is empty" >&2; exit 2; }
for pm in $pool_modes; do
    case "$pm" in session | transaction) ;; *) echo "--pool-modes: unknown pooling mode '$pm'" >&2; exit 2 ;; esac
done

say() { printf '==> [%3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { printf 'cpu-per-query: %s\n' "$*" >&2; exit 1; }

# pgproxy binaries: NAME=PATH, names unique and not "pgbouncer".
if [ "${#pgproxy_specs[@]}" -eq 0 ]; then
    pgproxy_specs=("pgproxy=$repo_root/target/release/meridian-pgproxy")
fi
pgproxy_names=()
declare -A pgproxy_path
for spec in "${pgproxy_specs[@]}"; do
    [[ "$spec" == *=* ]] || die "--pgproxy wants NAME=PATH, got '$spec'"
    name="${spec%%=*}"
    path="${spec#*=}"
    [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--pgproxy: name '$name' may only use letters, digits, '_', '.', '-'"
    [ "$name" != pgbouncer ] || die "--pgproxy: the name 'pgbouncer' is taken by PgBouncer"
    [ -z "${pgproxy_path[$name]:-}" ] || die "--pgproxy: name '$name' given twice"
    [ -f "$path" ] && [ -x "$path" ] || die "--pgproxy $name: no executable at '$path' (cargo build --release -p meridian-pgproxy?)"
    pgproxy_path[$name]="$(cd "$(dirname "$path")" && pwd)/$(basename "$path")"
    pgproxy_names+=("$name")
done
for name in "${pgproxy_arg_names[@]}"; do
    [ -n "${pgproxy_path[$name]:-}" ] || die "--pgproxy-arg: no --pgproxy named '$name'"
done
# The extra arguments of pgproxy NAME, one per line of output.
extra_args_of() {
    local i
    for i in "${!pgproxy_arg_names[@]}"; do
        if [ "${pgproxy_arg_names[$i]}" = "$1" ]; then printf '%s\n' "${pgproxy_arg_values[$i]}"; fi
    done
}
hops=(pgbouncer "${pgproxy_names[@]}") # PgBouncer first: the yardstick

[ "$(id -u)" -eq 0 ] || die "run as root (PostgreSQL and PgBouncer run as OS user postgres via setpriv)"
id postgres >/dev/null 2>&1 || die "OS user 'postgres' does not exist"
[ -x "$pg_bin/postgres" ] || die "no PostgreSQL server in $pg_bin (set MERIDIAN_PG_BIN_DIR)"
[ -x "$pgbouncer_bin" ] || die "PgBouncer not found at $pgbouncer_bin (apt-get install pgbouncer, or PGBOUNCER_BIN)"
pgbench_bin="$pg_bin/pgbench"
[ -x "$pgbench_bin" ] || pgbench_bin="$(command -v pgbench)" || die "pgbench not found"
psql_bin="$pg_bin/psql"
[ -x "$psql_bin" ] || psql_bin="$(command -v psql)" || die "psql not found"
if [ "$syscalls" = 1 ]; then
    command -v strace >/dev/null || die "--syscalls needs strace (apt-get install strace)"
fi
hz="$(getconf CLK_TCK)"
is_uint "$hz" || die "getconf CLK_TCK gave '$hz'"

# ---------------------------------------------------------------- cleanup
work=""
pids=()            # long-running processes we started (pgproxy, pgbouncer)
pg_dirs=()         # data dirs of postmasters we started
current_pgbench="" # the pgbench being waited for, if any
current_strace=""  # the strace attached to a target, if any

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local i pid
    if [ -n "$current_strace" ]; then
        kill -INT "$current_strace" 2>/dev/null || true # detaches from the target
        wait "$current_strace" 2>/dev/null || true
    fi
    if [ -n "$current_pgbench" ]; then
        kill -TERM "$current_pgbench" 2>/dev/null || true
        wait "$current_pgbench" 2>/dev/null || true
    fi
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[$i]}" 2>/dev/null || true
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

work="$(mktemp -d /tmp/meridian-cpu-per-query.XXXXXX)"
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

# Start a long-running process in the background, remember its pid. The
# command must exec the measured program (env and setpriv do), so that $! is
# the pid whose /proc/PID/stat we read.
spawn() {
    local log="$1"; shift
    "$@" >"$log" 2>&1 &
    pids+=($!)
}

sql() { "$psql_bin" -X -q -h 127.0.0.1 -p "$1" -U postgres -d "${3:-postgres}" -tAc "$2"; }

# "utime stime" of a process (all its threads), in clock ticks.
proc_ticks() {
    local s
    s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    s="${s##*) }" # drop "pid (comm) "; comm may hold spaces and parentheses
    # shellcheck disable=SC2086
    set -- $s     # $1 is field 3 (state), so utime (14) is $12 and stime (15) $13
    echo "${12} ${13}"
}

# ---------------------------------------------------------------- postgres
primary_port="$(free_port)"
mkdir -p "$work/pg" "$work/sock" "$work/bin"
chown postgres:postgres "$work/pg" "$work/sock"
n_targets=$((${#hops[@]} * $(wc -w <<<"$pool_modes")))
max_connections=$((n_targets * pool_size + 20))
[ "$max_connections" -ge 100 ] || max_connections=100

say "initdb (primary on 127.0.0.1:$primary_port, max_connections $max_connections, dir $work)"
as_pg "$pg_bin/initdb" -D "$work/pg/primary" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$work/initdb.log" 2>&1 ||
    { cat "$work/initdb.log" >&2; die "initdb failed"; }
cat <<EOF | as_pg tee -a "$work/pg/primary/postgresql.conf" >/dev/null
listen_addresses = '127.0.0.1'
port = $primary_port
unix_socket_directories = '$work/sock'
max_connections = $max_connections
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
EOF
cat <<EOF | as_pg tee "$work/pg/primary/pg_hba.conf" >/dev/null
local all all trust
host all all 127.0.0.1/32 trust
EOF
pg_dirs+=("$work/pg/primary")
as_pg "$pg_bin/pg_ctl" -D "$work/pg/primary" -l "$work/pg/primary.log" -w -t 60 start >/dev/null ||
    { tail -n 30 "$work/pg/primary.log" >&2; die "primary did not start"; }

sql "$primary_port" "create database bench" >/dev/null
say "pgbench -i -s $scale"
"$pgbench_bin" -i -s "$scale" -q -h 127.0.0.1 -p "$primary_port" -U postgres bench >"$work/pgbench-init.log" 2>&1 ||
    { cat "$work/pgbench-init.log" >&2; die "pgbench -i failed"; }
sql "$primary_port" "checkpoint" bench >/dev/null
sql "$primary_port" "select count(*) from pgbench_accounts" bench >/dev/null # warm the buffer cache

# ---------------------------------------------------------------- targets
# A target is HOP:POOLMODE (e.g. pgbouncer:transaction, after:session).
declare -A port_of pid_of sha_of
targets=()

# Every MERIDIAN_PGPROXY_* variable of the caller's environment would override
# the defaults of the binaries under test; run them without any.
pgproxy_env_unset=()
for v in $(compgen -e); do
    if [[ "$v" == MERIDIAN_PGPROXY_* ]]; then pgproxy_env_unset+=(-u "$v"); fi
done

start_pgproxy() { # name, pool mode
    local name="$1" mode="$2" port bin="$work/bin/$1" args=() shown
    port="$(free_port)"
    args=(--listen "127.0.0.1:$port" --admin-listen '' --primary "127.0.0.1:$primary_port"
        --auth trust --pool-mode "$mode" --pool-size "$pool_size" --max-clients 1000)
    [ -n "$worker_threads" ] && args+=(--worker-threads "$worker_threads")
    local extra
    while IFS= read -r extra; do args+=("$extra"); done < <(extra_args_of "$name")
    printf -v shown '%q ' "${args[@]}"
    say "$name:$mode: $name ${shown% }"
    spawn "$work/$name-$mode.log" env "${pgproxy_env_unset[@]}" RUST_LOG="${RUST_LOG:-warn}" "$bin" "${args[@]}"
    port_of[$name:$mode]="$port"
    pid_of[$name:$mode]="${pids[-1]}"
    wait_sql "$port" "$name:$mode" "$work/$name-$mode.log"
}

start_pgbouncer() { # pool mode
    local mode="$1" port dir="$work/pgbouncer-$1"
    port="$(free_port)"
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
max_client_conn = 1000
default_pool_size = $pool_size
max_db_connections = 0
server_reset_query = DISCARD ALL
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
    chown -R postgres:postgres "$dir"
    say "pgbouncer:$mode: pool_mode=$mode default_pool_size=$pool_size on 127.0.0.1:$port"
    spawn "$dir/stdout.log" setpriv --reuid=postgres --regid=postgres --init-groups -- "$pgbouncer_bin" "$dir/pgbouncer.ini"
    port_of[pgbouncer:$mode]="$port"
    pid_of[pgbouncer:$mode]="${pids[-1]}"
    wait_sql "$port" "pgbouncer:$mode" "$dir/stdout.log"
}

# Copy the binaries first: the path given may be rebuilt while this runs.
for name in "${pgproxy_names[@]}"; do
    cp -- "${pgproxy_path[$name]}" "$work/bin/$name"
    sha_of[$name]="$(sha256sum "$work/bin/$name" | cut -c1-12)"
done

for pm in $pool_modes; do
    for h in "${hops[@]}"; do
        if [ "$h" = pgbouncer ]; then start_pgbouncer "$pm"; else start_pgproxy "$h" "$pm"; fi
        targets+=("$h:$pm")
    done
done

# The pid we read must be the proxy itself, not a wrapper (env and setpriv exec it).
for t in "${targets[@]}"; do
    h="${t%%:*}"
    want="$work/bin/$h"
    [ "$h" = pgbouncer ] && want="$(readlink -f "$pgbouncer_bin")"
    got="$(readlink -f "/proc/${pid_of[$t]}/exe" 2>/dev/null || true)"
    [ "$got" = "$want" ] || die "$t: pid ${pid_of[$t]} runs '$got', not '$want'"
done

# Where does a query through each target run? Only one server exists, but check.
for t in "${targets[@]}"; do
    p="$(sql "${port_of[$t]}" "select inet_server_port()" bench 2>/dev/null || echo '?')"
    [ "$p" = "$primary_port" ] || die "$t: a probe query ran on port '$p', not on the primary ($primary_port)"
done

# ---------------------------------------------------------------- runs
# Runs pgbench in the background and waits, so that a signal to this script
# interrupts the wait at once and cleanup() stops the pgbench too.
run_pgbench() { # target protocol clients transactions-per-client log
    local t="$1" m="$2" c="$3" n="$4" log="$5" j=$(($3 < 2 ? $3 : 2)) rc=0
    "$pgbench_bin" -n -S -M "$m" -c "$c" -j "$j" -t "$n" -h 127.0.0.1 -p "${port_of[$t]}" -U postgres bench >"$log" 2>&1 &
    current_pgbench=$!
    wait "$current_pgbench" || rc=$?
    current_pgbench=""
    return "$rc"
}
# "processed failed tps" from a pgbench log (processed is what pgbench counted).
pgbench_numbers() {
    local processed failed tps
    processed="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$1" | head -n1)"
    failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$1" | head -n1)"
    tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$1" | head -n1)"
    [ -n "$processed" ] && [ -n "$tps" ] || return 1
    echo "$processed ${failed:-0} $tps"
}
target_alive() { kill -0 "${pid_of[$1]}" 2>/dev/null || die "$1 (pid ${pid_of[$1]}) is gone; see its log in $work"; }

per_client() { echo $(($1 / $2)); } # transactions per client for a total of $1 over $2 clients

# results[target|protocol|clients] = space-separated "cpu_us:user_us:sys_us:tps:failed" per round
declare -A results
cells=$(($(wc -w <<<"$clients") * $(wc -w <<<"$protocols") * ${#targets[@]}))
runs_total=$((rounds * cells))
say "$runs_total measured runs of $queries queries, each after a warm-up of $warmup (${#targets[@]} targets, $rounds round(s))"

n=0
loads=() # 1-minute load average sampled before each measured run (the machine may be shared)
for r in $(seq "$rounds"); do
    for c in $clients; do
        for m in $protocols; do
            for t in "${targets[@]}"; do
                n=$((n + 1))
                target_alive "$t"
                tag="$r-${t/:/-}-$m-$c"
                wu=$((warmup / c))
                if [ "$wu" -gt 0 ]; then
                    run_pgbench "$t" "$m" "$c" "$wu" "$work/warmup-$tag.log" ||
                        { tail -n 5 "$work/warmup-$tag.log" >&2; die "warm-up through $t (-M $m -c $c) failed"; }
                fi
                per="$(per_client "$queries" "$c")"
                loads+=("$(cut -d' ' -f1 /proc/loadavg)")
                log="$work/run-$tag.log"
                before="$(proc_ticks "${pid_of[$t]}")" || die "$t: cannot read /proc/${pid_of[$t]}/stat"
                rc=0
                run_pgbench "$t" "$m" "$c" "$per" "$log" || rc=$?
                after="$(proc_ticks "${pid_of[$t]}")" || die "$t: cannot read /proc/${pid_of[$t]}/stat"
                if [ "$rc" -ne 0 ] || ! nums="$(pgbench_numbers "$log")"; then
                    say "round $r run $n/$runs_total: $t -M $m -c $c FAILED (pgbench exit code $rc):"
                    tail -n 5 "$log" >&2
                    results["$t|$m|$c"]+="fail "
                    continue
                fi
                read -r processed failed tps <<<"$nums"
                read -r u0 s0 <<<"$before"
                read -r u1 s1 <<<"$after"
                if [ "$processed" -eq 0 ]; then
                    say "round $r run $n/$runs_total: $t -M $m -c $c: no transaction processed"
                    results["$t|$m|$c"]+="fail "
                    continue
                fi
                vals="$(awk -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v hz="$hz" -v q="$processed" 'BEGIN {
                    u = du * 1e6 / hz / q; s = ds * 1e6 / hz / q
                    printf "%.3f:%.3f:%.3f", u + s, u, s }')"
                results["$t|$m|$c"]+="$vals:$tps:$failed "
                IFS=: read -r cpu usr sys <<<"$vals"
                say "round $r run $n/$runs_total: $t -M $m -c $c: $processed queries, $((u1 - u0 + s1 - s0)) ticks = $cpu µs/query (user $usr, system $sys), tps $tps, failed $failed"
            done
        done
    done
done
load_end="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- syscalls
# One extra run per cell with strace -c -f attached to the target (never during
# a CPU measurement): syscalls[target|protocol|clients] = "total_per_query" and
# syscall_detail[...] = "name per_query, ..." (the largest five).
declare -A syscalls_of syscall_detail
strace_version=""
if [ "$syscalls" = 1 ]; then
    strace_version="$(strace -V | head -n1)"
    say "counting system calls: one extra run per cell with strace -c -f"
    # Waits until every thread of PID is traced by TRACER (at most 10 s).
    wait_traced() {
        local pid="$1" tracer="$2" deadline=$((SECONDS + 10)) f all
        while :; do
            all=1
            for f in /proc/"$pid"/task/*/status; do
                grep -q "^TracerPid:[[:space:]]*$tracer\$" "$f" 2>/dev/null || { all=0; break; }
            done
            [ "$all" = 1 ] && return 0
            kill -0 "$tracer" 2>/dev/null || return 1
            [ "$SECONDS" -lt "$deadline" ] || return 1
            sleep 0.05
        done
    }
    for c in $clients; do
        for m in $protocols; do
            for t in "${targets[@]}"; do
                target_alive "$t"
                tag="${t/:/-}-$m-$c"
                out_st="$work/strace-$tag.txt"
                strace -c -f -p "${pid_of[$t]}" -o "$out_st" 2>"$out_st.err" &
                current_strace=$!
                if ! wait_traced "${pid_of[$t]}" "$current_strace"; then
                    kill -INT "$current_strace" 2>/dev/null || true
                    wait "$current_strace" 2>/dev/null || true
                    current_strace=""
                    say "$t: strace could not attach: $(tail -n 1 "$out_st.err")"
                    syscalls_of["$t|$m|$c"]="-"
                    continue
                fi
                rc=0
                run_pgbench "$t" "$m" "$c" "$(per_client "$queries" "$c")" "$work/strace-run-$tag.log" || rc=$?
                kill -INT "$current_strace" 2>/dev/null || true
                wait "$current_strace" 2>/dev/null || true
                current_strace=""
                if [ "$rc" -ne 0 ] || ! nums="$(pgbench_numbers "$work/strace-run-$tag.log")"; then
                    say "$t -M $m -c $c: pgbench under strace failed"
                    syscalls_of["$t|$m|$c"]="-"
                    continue
                fi
                read -r processed _ _ <<<"$nums"
                syscalls_of["$t|$m|$c"]="$(awk -v q="$processed" '
                    $NF == "total" && $1 ~ /^[0-9.]+$/ { printf "%.2f", $4 / q; found = 1 }
                    END { if (!found) printf "-" }' "$out_st")"
                syscall_detail["$t|$m|$c"]="$(awk -v q="$processed" '
                    $1 ~ /^[0-9.]+$/ && $NF != "total" && $4 ~ /^[0-9]+$/ { print $4, $NF }' "$out_st" |
                    sort -rn | head -n5 | awk -v q="$processed" '
                    { printf "%s%s %.2f", (NR > 1 ? ", " : ""), $2, $1 / q }')"
                say "$t -M $m -c $c: ${syscalls_of["$t|$m|$c"]} syscalls/query (${syscall_detail["$t|$m|$c"]})"
            done
        done
    done
fi

# ---------------------------------------------------------------- report
# stats "cpu:user:sys:tps:failed ..." -> "median_cpu median_user median_sys min_cpu max_cpu median_tps failed_total ok_rounds"
stats() {
    tr ' ' '\n' <<<"$1" | awk -F: '
        NF == 0 { next }
        $1 == "fail" { next }
        { n++; cpu[n] = $1; usr[n] = $2; sys[n] = $3; tps[n] = $4; failed += $5 }
        function median(a, k,    i, j, t, b) {
            for (i = 1; i <= k; i++) b[i] = a[i]
            for (i = 2; i <= k; i++) { t = b[i]; for (j = i - 1; j >= 1 && b[j] > t; j--) b[j + 1] = b[j]; b[j + 1] = t }
            return (k % 2) ? b[(k + 1) / 2] : (b[k / 2] + b[k / 2 + 1]) / 2
        }
        END {
            if (n == 0) { print "- - - - - - - 0"; exit }
            lo = cpu[1]; hi = cpu[1]
            for (i = 2; i <= n; i++) { if (cpu[i] < lo) lo = cpu[i]; if (cpu[i] > hi) hi = cpu[i] }
            printf "%.1f %.1f %.1f %.1f %.1f %.0f %d %d\n", median(cpu, n), median(usr, n), median(sys, n), lo, hi, median(tps, n), failed, n
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
    local m c pm h t s cpu usr sys lo hi tps f ok bcpu ratio tick_us name
    tick_us="$(awk -v hz="$hz" -v q="$queries" 'BEGIN { printf "%.2f", 1e6 / hz / q }')"
    echo "## CPU per query of the proxy hop: meridian-pgproxy vs PgBouncer"
    echo
    echo "Command: \`$orig_cmd\` ($(date -u '+%Y-%m-%d %H:%M UTC'); git $git_rev)"
    echo
    echo "- Each measured run: \`$pgbench_example\` against a fresh \`pgbench -i -s $scale\` database on one PostgreSQL primary (no replica: every target sends every query to the primary), after a warm-up run of $warmup queries of the same shape. $queries queries per run in all (a client count that does not divide it runs the largest multiple below)."
    echo "- CPU = utime + stime of the target's process (all its threads) from \`/proc/PID/stat\`, read right before and after the measured run, divided by the queries pgbench processed. It includes accepting and closing pgbench's client connections. Resolution: 1 clock tick (1/$hz s) = $tick_us µs per query at $queries queries."
    echo "- $rounds round(s), interleaved (every target back to back for each client count and protocol, then the next round). Per row: the medians over the rounds (user and system each on their own, so they need not add up to the total), the range of the total, and \"vs PgBouncer\" = median CPU / PgBouncer's median CPU in the same pooling mode, protocol and client count (below 1 = cheaper than PgBouncer)."
    echo "- Machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM; load average (1/5/15 min) before: $load_start, after the CPU runs: $load_end; 1-minute load before each measured run: $(load_summary)."
    echo "- PostgreSQL: $pg_version; fsync off, shared_buffers 256MB, max_connections $max_connections."
    echo "- $("$pgbouncer_bin" --version | head -n1): pool_mode ${pool_modes// / / }, default_pool_size $pool_size, auth_type trust, server_reset_query DISCARD ALL (run in session mode only), one process (single-threaded)."
    local extra shown
    for name in "${pgproxy_names[@]}"; do
        shown=""
        [ -n "$worker_threads" ] && shown+=" --worker-threads $worker_threads"
        while IFS= read -r extra; do shown+=" $(printf '%q' "$extra")"; done < <(extra_args_of "$name")
        echo "- meridian-pgproxy \`$name\`: \`${pgproxy_path[$name]}\` (sha256 ${sha_of[$name]}…, copied before the run); \`--pool-mode ${pool_modes// /|} --pool-size $pool_size --auth trust --admin-listen ''$shown\`$([[ "$shown" == *--worker-threads* ]] || echo " (runtime threads: the binary's default)")."
    done
    [ "$syscalls" = 1 ] && echo "- Syscalls per query: \`strace -c -f -p PID\` ($strace_version) attached to the target in one extra run per cell after all rounds (not during a CPU measurement); every call of every thread, divided by the queries processed."
    [ "$queries" -lt 40000 ] && echo "- **Warning: $queries queries per run (smoke test): a clock tick is $tick_us µs per query; the numbers are noise.**"
    [ "$rounds" -lt 3 ] && echo "- **Warning: $rounds round(s); medians over fewer than 3 rounds are not robust.**"
    echo
    if [ "$syscalls" = 1 ]; then
        echo "| target | mode | protocol | clients | CPU µs/query (median) | user µs | system µs | vs PgBouncer | CPU µs range | tps (median) | syscalls/query | failed tx |"
        echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    else
        echo "| target | mode | protocol | clients | CPU µs/query (median) | user µs | system µs | vs PgBouncer | CPU µs range | tps (median) | failed tx |"
        echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    fi
    for m in $protocols; do
        for c in $clients; do
            for pm in $pool_modes; do
                read -r bcpu _ <<<"$(stats "${results[pgbouncer:$pm|$m|$c]:-}")"
                for h in "${hops[@]}"; do
                    t="$h:$pm"
                    s="$(stats "${results[$t|$m|$c]:-}")"
                    read -r cpu usr sys lo hi tps f ok <<<"$s"
                    ratio="-"
                    if [[ "$bcpu" =~ ^[0-9.]+$ ]] && [[ "$cpu" =~ ^[0-9.]+$ ]]; then
                        ratio="$(awk -v a="$cpu" -v b="$bcpu" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }')"
                    fi
                    if [ "$ok" -lt "$rounds" ]; then f="$f ($((rounds - ok)) of $rounds run(s) failed)"; fi
                    if [ "$syscalls" = 1 ]; then
                        echo "| $h | $pm | $m | $c | $cpu | $usr | $sys | $ratio | $lo–$hi | $tps | ${syscalls_of[$t|$m|$c]:--} | $f |"
                    else
                        echo "| $h | $pm | $m | $c | $cpu | $usr | $sys | $ratio | $lo–$hi | $tps | $f |"
                    fi
                done
            done
        done
    done
    if [ "$syscalls" = 1 ]; then
        echo
        echo "Largest system calls per query (strace -c):"
        echo
        for m in $protocols; do
            for c in $clients; do
                for pm in $pool_modes; do
                    for h in "${hops[@]}"; do
                        echo "- $h, $pm, $m, $c clients: ${syscall_detail[$h:$pm|$m|$c]:--}"
                    done
                done
            done
        done
    fi
}

pg_version="$(sql "$primary_port" "select version()" | sed 's/, compiled by.*//')"
git_rev="$(git -C "$repo_root" rev-parse --short HEAD 2>/dev/null || echo '?')"
[ -n "$(git -C "$repo_root" status --porcelain 2>/dev/null | head -n1)" ] && git_rev+="+dirty"
pgbench_example="pgbench -n -S -M simple|extended -c C -j min(C,2) -t $queries/C -h 127.0.0.1 -p PORT -U postgres bench"

echo
if [ -n "$out" ]; then
    report | tee "$out"
else
    report
fi
