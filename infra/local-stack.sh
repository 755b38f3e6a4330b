#!/usr/bin/env bash
# Ensures PostgreSQL and Redis are reachable and exports DATABASE_URL and REDIS_URL.
#   source infra/local-stack.sh     # in another script: exports the URLs
#   infra/local-stack.sh            # prints the URLs it settled on
# Order of preference: the URLs already in the environment (if reachable), the local defaults
# (127.0.0.1:5432 as postgres, 127.0.0.1:6379), else a private instance under .local/ on a free
# port, installing the Debian packages (postgresql, redis-server) first when they are missing.
# WABCAST_PRIVATE_SERVICES=1 skips the first two (to exercise the fresh-machine path).

_ls_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_ls_state="$_ls_root/.local"
mkdir -p "$_ls_state"

_ls_log() { printf '[local-stack] %s\n' "$*" >&2; }

# A TCP port accepting connections?
_ls_port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

_ls_free_port() {
  local p=$1
  while _ls_port_open 127.0.0.1 "$p"; do p=$((p + 1)); done
  echo "$p"
}

_ls_pg_ok() {
  command -v psql >/dev/null 2>&1 || return 1
  psql "$1" -Atqc 'select 1' >/dev/null 2>&1
}

_ls_redis_ok() {
  # redis://host:port[/db]
  local hp="${1#redis://}"; hp="${hp%%/*}"; hp="${hp##*@}"
  local host="${hp%%:*}" port="${hp##*:}"
  [ "$host" = "$hp" ] && port=6379
  # Braces: a bare `exec 2>/dev/null` would silence the calling shell's stderr for good.
  { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || return 1
  printf 'PING\r\n' >&3
  local reply=""
  read -r -t 2 reply <&3 || true
  exec 3>&-
  [[ "$reply" == +PONG* ]]
}

_ls_apt_updated=""
_ls_apt_install() {
  if [ "$(id -u)" != 0 ]; then
    _ls_log "need root to install $* (apt-get); install them and re-run"
    return 1
  fi
  if [ -z "$_ls_apt_updated" ]; then
    _ls_log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
    _ls_apt_updated=1
  fi
  _ls_log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

_ls_pg_bin() {
  local b
  for b in /usr/lib/postgresql/*/bin /usr/local/bin /usr/bin; do
    [ -x "$b/initdb" ] && [ -x "$b/pg_ctl" ] && { echo "$b"; return 0; }
  done
  return 1
}

_ls_start_postgres() {
  local bin
  bin="$(_ls_pg_bin)" || { _ls_apt_install postgresql postgresql-client && bin="$(_ls_pg_bin)"; } || return 1
  local dir="$_ls_state/pg" port
  local run=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
    run=(runuser -u postgres --)
  fi
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown -R postgres "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    _ls_log "initdb into $dir/data"
    "${run[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null || return 1
  fi
  if [ -f "$dir/port" ] && _ls_pg_ok "postgres://postgres@127.0.0.1:$(cat "$dir/port")/postgres"; then
    echo "$(cat "$dir/port")"; return 0
  fi
  port="$(_ls_free_port 55432)"
  "${run[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null || return 1
  echo "$port" > "$dir/port"
  echo "$port"
}

_ls_start_redis() {
  command -v redis-server >/dev/null 2>&1 || _ls_apt_install redis-server || return 1
  local dir="$_ls_state/redis" port
  mkdir -p "$dir"
  if [ -f "$dir/port" ] && _ls_redis_ok "redis://127.0.0.1:$(cat "$dir/port")"; then
    echo "$(cat "$dir/port")"; return 0
  fi
  port="$(_ls_free_port 56379)"
  redis-server --bind 127.0.0.1 --port "$port" --daemonize yes --save "" --appendonly no \
    --dir "$dir" --logfile "$dir/server.log" >/dev/null || return 1
  for _ in $(seq 1 50); do _ls_redis_ok "redis://127.0.0.1:$port" && break; sleep 0.1; done
  echo "$port" > "$dir/port"
  echo "$port"
}

_ls_settle() {
  local default_pg="postgres://postgres@127.0.0.1:5432/postgres"
  local reuse=1
  [ "${WABCAST_PRIVATE_SERVICES:-0}" = 1 ] && reuse=0
  if [ "$reuse" = 1 ] && [ -n "${DATABASE_URL:-}" ] && _ls_pg_ok "$DATABASE_URL"; then :
  elif [ "$reuse" = 1 ] && _ls_pg_ok "$default_pg"; then DATABASE_URL="$default_pg"
  else
    _ls_log "no reachable PostgreSQL; starting a private one"
    local port; port="$(_ls_start_postgres)" || { _ls_log "could not start PostgreSQL"; return 1; }
    DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  fi
  local default_redis="redis://127.0.0.1:6379"
  if [ "$reuse" = 1 ] && [ -n "${REDIS_URL:-}" ] && _ls_redis_ok "$REDIS_URL"; then :
  elif [ "$reuse" = 1 ] && _ls_redis_ok "$default_redis"; then REDIS_URL="$default_redis"
  else
    _ls_log "no reachable Redis; starting a private one"
    local port; port="$(_ls_start_redis)" || { _ls_log "could not start Redis"; return 1; }
    REDIS_URL="redis://127.0.0.1:$port"
  fi
  export DATABASE_URL REDIS_URL
  _ls_log "PostgreSQL: $DATABASE_URL"
  _ls_log "Redis:      $REDIS_URL"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  _ls_settle
  echo "DATABASE_URL=$DATABASE_URL"
  echo "REDIS_URL=$REDIS_URL"
else
  _ls_settle || return 1
fi
