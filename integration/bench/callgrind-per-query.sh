#!/usr/bin/env bash
# Instructions the proxy spends per pgbench -S query, counted by valgrind's callgrind
# (deterministic: the same binary and workload give the same count whatever else the
# machine is doing, unlike CPU time). Each pgproxy binary runs single-threaded
# (--worker-threads 1) under callgrind in front of a PostgreSQL primary; after a
# warm-up the counters are zeroed, QUERIES queries run, and the total is divided by
# them. Prints a markdown table per binary, pooling mode and protocol.
#
#   integration/bench/callgrind-per-query.sh --primary HOST:PORT --db DB \
#       --pgproxy NAME=PATH [--pgproxy NAME=PATH ...] [--queries N] [--clients C]
#
# The database must have pgbench's tables (pgbench -i). Needs valgrind.
set -euo pipefail
orig_args="$*"
primary=""; db=""; queries=4000; clients=4; bins=()
pg_bin="${MERIDIAN_PG_BIN_DIR:-/usr/lib/postgresql/15/bin}"
while [ $# -gt 0 ]; do
    case "$1" in
        --primary) primary="$2"; shift 2 ;;
        --db) db="$2"; shift 2 ;;
        --pgproxy) bins+=("$2"); shift 2 ;;
        --queries) queries="$2"; shift 2 ;;
        --clients) clients="$2"; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ -n "$primary" ] && [ -n "$db" ] && [ "${#bins[@]}" -gt 0 ] || { echo "usage: see the header" >&2; exit 2; }
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
echo "command: integration/bench/callgrind-per-query.sh ${orig_args} (queries $queries, clients $clients, git $(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo ?))"
echo
echo "| binary | pool mode | protocol | instructions per query |"
echo "|---|---|---:|---:|"
for spec in "${bins[@]}"; do
    name="${spec%%=*}"; path="${spec#*=}"
    cp "$path" "$work/$name"
    for mode in session transaction; do
        for proto in simple extended; do
            port=$((port + 1))
            out="$work/cg.$name.$mode.$proto"
            valgrind --tool=callgrind --callgrind-out-file="$out.%p" --dump-instr=no \
                "$work/$name" --listen "127.0.0.1:$port" --admin-listen "" --primary "$primary" \
                --auth trust --pool-mode "$mode" --pool-size $((clients + 4)) --worker-threads 1 \
                > "$work/log.$name.$mode.$proto" 2>&1 &
            pid=$!; pids+=("$pid")
            for _ in $(seq 200); do
                "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$port" && break
                sleep 0.2
            done
            "$pg_bin/pgbench" -n -S -M "$proto" -c "$clients" -j 1 -t 200 -h 127.0.0.1 -p "$port" -U postgres "$db" > /dev/null
            callgrind_control -z "$pid" > /dev/null 2>&1
            "$pg_bin/pgbench" -n -S -M "$proto" -c "$clients" -j 1 -t $((queries / clients)) -h 127.0.0.1 -p "$port" -U postgres "$db" > /dev/null
            callgrind_control -d "$pid" > /dev/null 2>&1
            kill "$pid"; wait "$pid" 2>/dev/null || true
            # The dump requested after the measured queries: part 1 of the profile
            # (the file written at exit holds only what came after it).
            last="$out.$pid.1"
            total=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$last" | head -1)
            [ -n "$total" ] || total=$(sed -n 's/^totals: \([0-9]*\).*/\1/p' "$last" | head -1)
            echo "| $name | $mode | $proto | $((total / queries)) |"
        done
    done
done
