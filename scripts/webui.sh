#!/usr/bin/env bash
# `make webui`: install Open WebUI on first use, then run it with the lab's servers behind it until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_webui.sh
exec .venv/bin/python -m labkit.webui "$@"
