#!/usr/bin/env bash
# Source me: starts moto (the SQS API) on a free loopback port for this shell's lifetime, unless
# WABCAST_MOTO_URL already answers, and exports WABCAST_MOTO_URL. The SQS contract suite and the
# SQS smoke test use it; `cargo test` alone starts its own when the variable is absent.
_moto_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${WABCAST_MOTO_URL:-}" ] && curl -fsS -o /dev/null "$WABCAST_MOTO_URL/moto-api/data.json" 2>/dev/null; then
  echo "[moto] using $WABCAST_MOTO_URL" >&2
else
  _moto_bin="$("$_moto_root/infra/tools.sh")/moto_server"
  _moto_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  mkdir -p "$_moto_root/target"
  "$_moto_bin" -H 127.0.0.1 -p "$_moto_port" >"$_moto_root/target/moto.log" 2>&1 &
  WABCAST_MOTO_PID=$!
  export WABCAST_MOTO_PID
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$_moto_port/moto-api/data.json" 2>/dev/null && break
    sleep 0.2
  done
  export WABCAST_MOTO_URL="http://127.0.0.1:$_moto_port"
  echo "[moto] started on $WABCAST_MOTO_URL (pid $WABCAST_MOTO_PID, log target/moto.log)" >&2
fi
