#!/usr/bin/env bash
# Builds llama.cpp's own programs (llama-server, llama-bench, llama-quantize, llama-perplexity,
# llama-imatrix, llama-gguf-split, llama-cli, llama-completion, llama-fit-params and the RPC
# device ggml-rpc-server) from the llama.cpp tree vendored in the pinned llama-cpp-python sdist,
# so the programs and the Python bindings share one commit: same file formats, same kernels,
# comparable numbers. GGML_RPC=ON: the programs take --rpc HOST:PORT and treat an rpc-server as a
# GPU (labkit.rpc: the GPU lessons on a CPU). The bindings are built without it.
#
#   build_llama_tools.sh DEST     builds into DEST/bin and keeps the converter scripts in DEST/src
#
# Called by scripts/setup.sh (cached by lock hash like the environments). GPU=1 adds CUDA.
# Set-up on 2 cores: ~7-8 min for these targets.
set -euo pipefail
DEST=$1
PY=${PYTHON:-python3}
GPU=${GPU:-0}
JOBS=${JOBS:-$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)}
cd "$(dirname "$0")/.."
version=$(sed -n 's/^llama[-_]cpp[-_]python==//Ip' requirements/lock.txt)
[ -n "$version" ] || { echo "build_llama_tools: no llama-cpp-python pin in requirements/lock.txt" >&2; exit 1; }
command -v cmake >/dev/null || { echo "build_llama_tools: cmake is needed (apt-get install cmake / brew install cmake)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
tree=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)

flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       # The sdist carries no web-UI assets and the build may not download them.
       -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
       -DGGML_RPC=ON)
[ "$GPU" = 1 ] && flags+=(-DGGML_CUDA=ON)
# Extra cmake flags, e.g. a build without AMX kernels: LLAMA_TOOLS_CMAKE_ARGS="-DGGML_NATIVE=OFF ..."
read -r -a extra <<<"${LLAMA_TOOLS_CMAKE_ARGS:-}"
cmake -S "$tree" -B "$work/build" "${flags[@]}" "${extra[@]}" >/dev/null
targets=(${LLAMA_TOOLS_TARGETS:-llama-server llama-bench llama-quantize llama-perplexity llama-imatrix llama-gguf-split
          llama-cli llama-completion llama-fit-params ggml-rpc-server})
cmake --build "$work/build" -j"$JOBS" --target "${targets[@]}" >/dev/null

rm -rf "$DEST"; mkdir -p "$DEST/bin" "$DEST/src"
for t in "${targets[@]}"; do cp "$work/build/bin/$t" "$DEST/bin/"; done
# The converters (HF -> GGUF, LoRA -> GGUF) with the gguf-py of the same commit.
cp -r "$tree"/convert_hf_to_gguf.py "$tree"/convert_lora_to_gguf.py "$tree"/gguf-py "$DEST/src/"
[ -d "$tree/conversion" ] && cp -r "$tree/conversion" "$DEST/src/"
echo "$version" >"$DEST/LLAMA_CPP_PYTHON_VERSION"
"$DEST/bin/llama-server" --version >"$DEST/VERSION" 2>&1 || true
