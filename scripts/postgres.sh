#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for tests and benchmarks: Debian's
# `postgresql` package, a fresh cluster in DIR, a free port, trust auth for the
# `herald` superuser on 127.0.0.1 only.
#
#   scripts/postgres.sh install      # apt-get install postgresql (once per machine)
#   scripts/postgres.sh start DIR    # initdb + start; writes DIR/url (postgres://herald@127.0.0.1:PORT/postgres)
#   scripts/postgres.sh stop DIR     # stop the server started in DIR
#   scripts/postgres.sh resume DIR   # start it again, same data and port (fault tests)
#
# PostgreSQL refuses to run as root: as root the server runs as the `postgres`
# user the package creates.
set -euo pipefail

log() { echo "postgres: $*" >&2; }
die() { echo "postgres: error: $*" >&2; exit 1; }

bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] && [ -x "$d/initdb" ] || return 1
  echo "$d"
}

install() {
  bindir >/dev/null && return 0
  local S=""
  if [ "$(id -u)" -ne 0 ]; then command -v sudo >/dev/null || die "need root (or sudo) to install postgresql"; S=sudo; fi
  log "installing postgresql"
  $S apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $S apt-get install -y -qq postgresql >/dev/null
  bindir >/dev/null || die "postgresql installed, but no initdb under /usr/lib/postgresql/*/bin"
}

# Runs a command as the server's user.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local dir="$1" bin port
  bin=$(bindir) || die "PostgreSQL is not installed (run: scripts/postgres.sh install)"
  mkdir -p "$dir/data" "$dir/socket"
  [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$dir"
  chmod 700 "$dir/data"
  as_owner "$bin/initdb" -D "$dir/data" -U herald --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  port=$(free_port)
  echo "$port" >"$dir/port"
  run_server "$dir" "$bin" "$port"
  echo "postgres://herald@127.0.0.1:$port/postgres" >"$dir/url"
  log "PostgreSQL on 127.0.0.1:$port ($dir)"
}

run_server() {
  local dir="$1" bin="$2" port="$3"
  # fsync off: a test server's data is thrown away; it makes writes several times faster.
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir/socket -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" start >/dev/null \
    || { cat "$dir/server.log" >&2; die "the server did not start"; }
}

resume() {
  local dir="$1" bin
  bin=$(bindir) || die "PostgreSQL is not installed"
  [ -f "$dir/port" ] || die "no server was started in $dir"
  run_server "$dir" "$bin" "$(cat "$dir/port")"
}

stop() {
  local dir="$1" bin
  bin=$(bindir) || return 0
  [ -d "$dir/data" ] || return 0
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

case "${1:-}" in
  install) install ;;
  start) [ -n "${2:-}" ] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [ -n "${2:-}" ] || die "usage: $0 stop DIR"; stop "$2" ;;
  resume) [ -n "${2:-}" ] || die "usage: $0 resume DIR"; resume "$2" ;;
  *) die "usage: $0 install | start DIR | stop DIR | resume DIR" ;;
esac
