# syntax=docker/dockerfile:1
# llama-server with CUDA, built from the SAME llama.cpp commit as this lab's programs: the tree
# vendored in the pinned llama-cpp-python sdist (requirements/lock.txt; scripts/build_llama_tools.sh
# builds the lab's copy the same way), so what you measured in the notebooks is what this image runs.
# Why not the official image? ghcr.io/ggml-org/llama.cpp:server-cuda12-bNNNN (deploy/k8s uses it) is
# the simpler choice when that match does not matter. The stages follow llama.cpp's own
# .devops/cuda.Dockerfile: build in the CUDA devel image, run in the much smaller runtime image.
#   docker build -f docker/llama-server.Dockerfile -t local-llm-lab/llama-server:0.3.36 deploy/
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# "default" builds for every architecture CUDA supports; e.g. 90 (H100/H200) builds faster and smaller
ARG CUDA_DOCKER_ARCH=default
# Package versions come with the pinned base image's Ubuntu release; apt pins (DL3008) would break
# whenever Ubuntu's archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN pip3 download --no-cache-dir --no-binary :all: --no-deps "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" -d /tmp/sdist \
    && tar -xzf /tmp/sdist/llama_cpp_python-*.tar.gz -C /src --strip-components=1
WORKDIR /src/vendor/llama.cpp
# The sdist has no web-UI assets and the build must not download them (same flags as the lab's build).
RUN arch_flag=""; \
    if [ "${CUDA_DOCKER_ARCH}" != "default" ]; then arch_flag="-DCMAKE_CUDA_ARCHITECTURES=${CUDA_DOCKER_ARCH}"; fi; \
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_CUDA=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF ${arch_flag:+"$arch_flag"} \
    && cmake --build build --config Release -j"$(nproc)" --target llama-server

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS server
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llama \
    && useradd --system --uid 10001 --gid llama --no-create-home --shell /usr/sbin/nologin llama
COPY --from=build /src/vendor/llama.cpp/build/bin/llama-server /usr/local/bin/llama-server
# numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd
USER 10001:10001
# 0.0.0.0 inside the container's own network namespace, so that a published port can reach it; the
# HOST side stays on loopback (compose.yaml publishes 127.0.0.1:8080:8080). The key comes from the
# environment (LLAMA_API_KEY), never from the image.
ENV LLAMA_ARG_HOST=0.0.0.0 LLAMA_ARG_PORT=8080
EXPOSE 8080
# /health answers 503 while the model loads and 200 once it can serve (llama.cpp tools/server README).
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8080/health"]
ENTRYPOINT ["/usr/local/bin/llama-server"]
CMD ["--model", "/models/model.gguf", "--parallel", "2", "--metrics"]
