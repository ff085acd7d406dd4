#!/bin/bash
# Docker HEALTHCHECK without curl: `healthcheck.sh PORT [PATH]` sends an HTTP/1.0
# GET to 127.0.0.1:PORT and succeeds on a 2xx status line.
set -eu
port="${1:?usage: healthcheck.sh PORT [PATH]}"
path="${2:-/health}"
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$path" >&3
IFS= read -r -t 5 status <&3
case "$status" in
  "HTTP/1."?" 2"*) exit 0 ;;
  *) echo "unhealthy: $status" >&2; exit 1 ;;
esac
