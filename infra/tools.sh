#!/usr/bin/env bash
# Installs the tools the local stack and the tests need into .local/ (never system-wide):
# cargo-lambda from PyPI in a project venv. Prints the PATH entry to use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.local/venv"
if [ ! -x "$venv/bin/cargo-lambda" ]; then
  echo "[tools] installing cargo-lambda into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "cargo-lambda==1.9.2" >&2
fi
echo "$venv/bin"
