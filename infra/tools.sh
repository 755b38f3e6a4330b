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
# aws-sam-cli in its own venv (it pins its own cfn-lint); optional: `sam validate --lint` runs
# where it installs, cfn-lint above always does.
sam="$root/.local/sam"
if [ ! -x "$sam/bin/sam" ]; then
  echo "[tools] installing aws-sam-cli==1.170.0 into $sam" >&2
  if ! { python3 -m venv "$sam" && "$sam/bin/pip" install -q --disable-pip-version-check "aws-sam-cli==1.170.0" >&2; }; then
    echo "[tools] aws-sam-cli did not install; infra/lint.sh falls back to cfn-lint alone" >&2
    rm -rf "$sam"
  fi
fi
echo "$venv/bin"
