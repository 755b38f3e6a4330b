#!/usr/bin/env bash
# Validates the cloud template offline: cfn-lint (pinned, from PyPI) always, and `sam validate
# --lint` where aws-sam-cli installed (infra/tools.sh tries; it needs no AWS credentials). A lint
# failure fails the script, and CI with it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$("$root/infra/tools.sh")"
echo "[lint] cfn-lint infra/template.yaml"
"$bin/cfn-lint" "$root/infra/template.yaml"
if [ -x "$root/.local/sam/bin/sam" ]; then
  echo "[lint] sam validate --lint"
  SAM_CLI_TELEMETRY=0 AWS_REGION="${AWS_REGION:-us-east-1}" \
    "$root/.local/sam/bin/sam" validate --lint --template "$root/infra/template.yaml"
else
  echo "[lint] aws-sam-cli is not installed (infra/tools.sh could not install it): cfn-lint only" >&2
fi
