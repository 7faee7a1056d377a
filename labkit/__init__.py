"""labkit — the helper package behind the Local LLM Lab workbook.

Chapter map (where each helper is introduced):

Engine modules are named ``<engine>_lab`` (:mod:`labkit.llamacpp_lab`, :mod:`labkit.vllm_lab`,
:mod:`labkit.ollama_lab`); the old names ``labkit.llamacpp``, ``labkit.ollama_compat`` and
``labkit.eval`` remain aliases for one release.

* bottom layer, imported by everything and importing nothing of labkit: :mod:`labkit.env`
  (paths, :func:`data_path`, cache, ports, loopback, interpreters, threads, progress),
  :mod:`labkit.errors` and :mod:`labkit.wsl` (WSL detection, ``.wslconfig``, the WSL GPU driver).
* 00 setup: :mod:`labkit.models` (bundled models), :mod:`labkit.hardware` (probe),
  :func:`labkit.serve` (managed engine servers, :mod:`labkit.servers`), :mod:`labkit.runner`
  (notebook execution), :mod:`labkit.cli` (``labkit doctor|serve|run|bench``), :mod:`labkit.notebook`
  (``%%gpu`` cells, chapter timer), :mod:`labkit.check` (exercise feedback).
* 01 quantization: :mod:`labkit.quant` (ggml block formats), :mod:`labkit.gguf` (inspect, to_float,
  quantize, ladder), :mod:`labkit.quality` (perplexity, KL-divergence; formerly ``labkit.eval``), :mod:`labkit.memory` (estimator).
* 02 Ollama: :mod:`labkit.ollama_lab` (the Ollama-compatible server, a subpackage: store,
  scheduler, service, create planner, native handlers, OpenAI translator), :mod:`labkit.modelfile`,
  :mod:`labkit.cancellable` (generation stopped when its client goes away).
* 03 llama.cpp: :mod:`labkit.llamacpp_lab`, :mod:`labkit.llama_tools` (llama.cpp's own programs:
  ``llama-server``, ``llama-bench``, ...), :mod:`labkit.conformance` (the OpenAI requests real
  clients send, probed against a server).
* 04 vLLM: :mod:`labkit.vllm_lab` (offline engine, /metrics, compile logs), :mod:`labkit.paging` (simulators),
  :mod:`labkit.compile_cache` (torch.compile cold vs warm).
* 05 RAG: :mod:`labkit.rag`.
* 06 benchmarking: :mod:`labkit.bench`.
* 07 troubleshooting: :mod:`labkit.troubleshoot`, :mod:`labkit.doctor`, :mod:`labkit.repack`
  (weight repacking and the AMX crash), :mod:`labkit.wsl` (what doctor checks on WSL 2).
* 08 production: :mod:`labkit.proxy` (nginx in front of the engines, supervised like them: load
  balancing, rate limits, API key, buffering, body size, TLS; ``nginx -t`` on any config),
  :mod:`labkit.monitoring` (a managed Prometheus), :mod:`labkit.deploy` (systemd, Dockerfile, compose and
  Kubernetes files validated offline; HPA simulation); :class:`labkit.servers.FolderServer` (their handle).
* 05 (Japanese documents): :mod:`labkit.japanese` (tokenizer cost, 。-aware splitting, BM25 + dense hybrid).
* 09 integration: :mod:`labkit.mcp_server` (MCP server, ``labkit mcp``), :mod:`labkit.toolcall`,
  :mod:`labkit.router` (health checks, retries, circuit breaker, fallback, privacy), :mod:`labkit.fault_api`.
* 10 fine-tuning: :mod:`labkit.finetune` (LoRA data, training, memory estimate, merge, adapters).
"""
from . import repack
from .env import data_path
from .errors import (
    CorruptModelError,
    EngineNotInstalledError,
    GPURequiredError,
    LabkitError,
    ModelNotFoundError,
    PortInUseError,
    ServerStartError,
    UnsupportedModelError,
)
from .servers import Server, serve

# Before any Llama(...) in this process: llama.cpp's AMX weight buffer crashes on multi-token
# prompts (labkit.repack). Imports nothing on CPUs without AMX.
repack.install()

__version__ = "0.1.0"
__all__ = ["serve", "Server", "LabkitError", "ModelNotFoundError", "CorruptModelError",
           "EngineNotInstalledError", "PortInUseError", "ServerStartError", "GPURequiredError",
           "UnsupportedModelError", "data_path",
           "load_ipython_extension"]


def load_ipython_extension(ipython):
    """``%load_ext labkit`` registers the ``%%gpu`` cell magic (see :mod:`labkit.notebook`)."""
    from .notebook import register_magics
    register_magics(ipython)
