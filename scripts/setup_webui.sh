#!/usr/bin/env bash
# Builds (or reuses) Open WebUI's own environment and links it as .venv-webui (chapter 02, `make webui`).
#
# Like scripts/setup.sh: built once per lock hash under $LABKIT_ENV_CACHE (default ~/.cache/labkit/envs),
# so a second run or another clone on the same machine takes a second. CPU torch is installed first and alone
# from the lock, so that open-webui's dependencies (sentence-transformers, ...) do not pull a CUDA build.
#   bash scripts/setup_webui.sh          build or reuse, then link .venv-webui
#   bash scripts/setup_webui.sh --lock   re-resolve requirements/webui.in into requirements/lock-webui.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=${LABKIT_ENV_CACHE:-$HOME/.cache/labkit/envs}
LOGS=$CACHE/logs
mkdir -p "$CACHE" "$LOGS"
RECIPE=1
TORCH=$(grep -i '^torch==' requirements/lock.txt)      # the same CPU torch as the main environment

if [ "${1:-}" = --lock ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  "$PY" -m venv "$tmp/env"
  "$tmp/env/bin/pip" install -q --upgrade pip wheel
  "$tmp/env/bin/pip" install -q "$TORCH"
  "$tmp/env/bin/pip" install -q -r requirements/webui.in "$TORCH"
  { echo "# Lock for Open WebUI's environment (.venv-webui), CPU torch. Regenerate: bash scripts/setup_webui.sh --lock"
    "$tmp/env/bin/pip" freeze | sed 's/+cpu$//'; } > requirements/lock-webui.txt
  echo "requirements/lock-webui.txt updated"; exit 0
fi

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "setup-webui: Open WebUI 0.12.4 needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=python3.11" >&2; exit 1; }
KEY=webui-$({ echo "recipe $RECIPE"; cat requirements/lock-webui.txt requirements/webui.in; } | sha256sum | cut -c1-16)
ENV=$CACHE/$KEY
LOG=$LOGS/$KEY.log
if [ ! -f "$ENV/.labkit-complete" ]; then
  rm -rf "$ENV"; : >"$LOG"
  echo "setup-webui: installing Open WebUI into $ENV (once; ~2 GB, a few minutes; log: $LOG)"
  t0=$SECONDS
  step() { "$@" >>"$LOG" 2>&1 || { echo "setup-webui: failed: $*" >&2; tail -n 40 "$LOG" >&2; exit 1; }; }
  step "$PY" -m venv "$ENV"
  step "$ENV/bin/pip" install --upgrade pip wheel
  step "$ENV/bin/pip" install -c requirements/lock-webui.txt torch
  step "$ENV/bin/pip" install -c requirements/lock-webui.txt -r requirements/webui.in
  touch "$ENV/.labkit-complete"
  echo "setup-webui: built in $((SECONDS - t0)) s, $(du -sh "$ENV" | cut -f1)"
fi
if [ -e .venv-webui ] && [ ! -L .venv-webui ]; then
  echo "setup-webui: .venv-webui is a real folder, not labkit's link; moving it to .venv-webui.old" >&2
  rm -rf .venv-webui.old; mv .venv-webui .venv-webui.old
fi
ln -sfn "$ENV" .venv-webui
