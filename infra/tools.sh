#!/usr/bin/env bash
# Installs the tools the local stack, the tests and CI need into .local/venv (never system-wide),
# from PyPI, pinned: cargo-lambda (with its zig, for `cargo lambda build`), moto (the SQS API
# locally, for the SQS contract suite) and cfn-lint (validates infra/template.yaml offline).
# Prints the PATH entry to use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.local/venv"
packages=("cargo-lambda==1.9.2" "moto[server]==5.2.5" "cfn-lint==1.58.0")
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${packages[*]}" ]; then
  echo "[tools] installing ${packages[*]} into $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${packages[@]}" >&2
  echo "${packages[*]}" >"$stamp"
fi
echo "$venv/bin"
