#!/usr/bin/env bash
# The test command (README; .ci/run runs exactly this): services, tools, format, lints, tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=infra/local-stack.sh
source infra/local-stack.sh
PATH="$(infra/tools.sh):$PATH"
export PATH
# shellcheck source=infra/moto.sh
source infra/moto.sh
trap '[ -n "${WABCAST_MOTO_PID:-}" ] && kill "$WABCAST_MOTO_PID" 2>/dev/null || true' EXIT
# A run from a fresh clone peaks at about 6 GB in target/ (2026-12-02); say so up front rather
# than die of a linker's "No space left on device" ten minutes in.
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
  echo "warning: $((free_kb / 1024)) MB free here; a fresh build and test run needs about 6 GB" >&2
fi
# A clean CI build gains nothing from incremental state (2 GB of it in target/debug).
if [ "${CI:-}" = true ]; then
  export CARGO_INCREMENTAL=0
fi
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== lint the cloud template"
bash infra/lint.sh
echo "== build binaries and tests in one invocation (the smoke test runs the binaries through"
echo "   cargo lambda watch; built apart, the tests rebuilt the WhatsApp client a second time)"
cargo build --workspace --all-targets --locked
echo "== cargo test"
# Every test binary runs even after one fails, so that one run reports every failure.
cargo test --workspace --locked --no-fail-fast -- --test-threads "${TEST_THREADS:-4}"
echo "== release artifacts: every function's bootstrap (cargo lambda, x86_64 with zig), and the"
echo "   device host exactly as infra/device-host.Dockerfile builds it"
cargo lambda build --release --locked -p campaign-trigger -p broadcast-processor -p message-worker
cargo build --release --locked -p device-host
for f in campaign-trigger broadcast-processor message-worker; do
  test -x "target/lambda/$f/bootstrap" || { echo "missing target/lambda/$f/bootstrap" >&2; exit 1; }
done
echo "== disk: $(du -sh target | cut -f1) in target/ ($(df -h . | awk 'NR==2 {print $4}') left on the device)"
