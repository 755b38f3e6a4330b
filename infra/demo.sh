#!/usr/bin/env bash
# The demo: on a fresh machine, sets up PostgreSQL and Redis, builds, migrates a fresh demo
# database, seeds 20 simulator devices (one offline) with 2,000 leads and a campaign with an
# image and spintax due now, runs the full local stack (device host, `cargo lambda watch`, the
# local emulator), shows a progress bar while it drains, and ends with a table per device.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=infra/local-stack.sh
source infra/local-stack.sh
PATH="$(infra/tools.sh):$PATH"
export PATH

work="$root/.local/demo"
rm -rf "$work"
mkdir -p "$work"
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do
    [ -n "$p" ] && kill -TERM -- "-$p" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

free_port() {
  local p=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
  echo "$p"
}
wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "timed out waiting for port $1" >&2
  return 1
}

echo "== building (debug)"
cargo build --workspace --bins --locked -q
bin="$root/target/debug"

echo "== fresh demo database"
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS wabcast_demo WITH (FORCE)" -c "CREATE DATABASE wabcast_demo" >/dev/null
DATABASE_URL="${DATABASE_URL%/*}/wabcast_demo"
host_port="$(free_port 8700)"
export DATABASE_URL
export QUEUE_PREFIX="demo:$(date +%s)"
export HOST_TOKEN="demo-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export HOST_URL="http://127.0.0.1:$host_port" HOST_BIND="127.0.0.1:$host_port" HOST_DATA_DIR="$work/host"
# A realistic simulator: some latency, 2% numbers not on WhatsApp, 2% transient errors.
export SIM_LATENCY_MS=40 SIM_LATENCY_JITTER_MS=120 SIM_NOT_ON_WHATSAPP_RATE=0.02 SIM_TRANSIENT_RATE=0.02
export OFFLINE_GRACE_S=15 LEASE_S=60 RETRY_BASE_S=2 RETRY_CAP_S=8 RUST_LOG="${RUST_LOG:-warn}"
"$bin/wabcast" migrate
seed="$("$bin/wabcast" demo seed)"
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$seed" "$1"; }
tenant="$(field tenant_id)" campaign="$(field campaign_id)" offline="$(field offline_device_id)"
echo "seeded tenant $tenant, campaign $campaign (20 devices, 2,000 leads)"

echo "== device host on $HOST_URL"
setsid "$bin/device-host" > "$work/host.log" 2>&1 &
pids+=($!)
wait_port "$host_port"
"$bin/wabcast" device simulate --tenant "$tenant" --device "$offline" --state offline

echo "== cargo lambda watch and the local emulator"
invoke_port="$(free_port 9000)"
env | grep -E '^(DATABASE_URL|REDIS_URL|QUEUE_PREFIX|HOST_URL|HOST_TOKEN|OFFLINE_GRACE_S|LEASE_S|RETRY_BASE_S|RETRY_CAP_S|RUST_LOG)=' > "$work/functions.env"
setsid cargo lambda watch --concurrency 4 --invoke-port "$invoke_port" --env-file "$work/functions.env" --ignore-changes > "$work/watch.log" 2>&1 &
pids+=($!)
wait_port "$invoke_port"
setsid "$bin/local-emulator" --invoke-url "http://127.0.0.1:$invoke_port" --processor-tick-ms 200 > "$work/emulator.log" 2>&1 &
pids+=($!)

echo "== draining (logs in $work)"
"$bin/wabcast" demo watch --tenant "$tenant" --campaign "$campaign" --timeout-s 600
echo "== who got what, one line per recipient (the database stays; the services stop here):"
echo "   DATABASE_URL=$DATABASE_URL target/debug/wabcast campaign messages --tenant $tenant --campaign $campaign --status skipped"
echo "   (--csv for a spreadsheet; history --tenant $tenant --message <id> for one message's story)"
