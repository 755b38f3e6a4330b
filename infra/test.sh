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
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries (the smoke test runs them through cargo lambda watch)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked -- --test-threads "${TEST_THREADS:-4}"
