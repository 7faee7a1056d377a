"""Settings of the Ollama-compatible server: defaults, ``OLLAMA_*`` environment variables and the
command line (the one place its flags are defined).

As with Ollama, every setting comes from a flag, else from its environment variable, else from a
default: ``OLLAMA_HOST`` (127.0.0.1:11434), ``OLLAMA_MODELS`` (the model store),
``OLLAMA_KEEP_ALIVE`` (5m), ``OLLAMA_NUM_PARALLEL`` (1), ``OLLAMA_MAX_LOADED_MODELS`` (3) and
``OLLAMA_CONTEXT_LENGTH`` (4096).
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any

from ..env import OLLAMA_DEFAULT_PORT, cache_dir
from ..models import OLLAMA_NAMES
from .errors import APIError

VERSION = "0.0.0-labkit"          # semver-shaped, and plainly not a real Ollama release
DEFAULT_PORT = OLLAMA_DEFAULT_PORT  # 11434
DEFAULT_KEEP_ALIVE = 300.0        # seconds (Ollama: 5m)
# The names the bundled models are registered under: labkit.models key -> Ollama library name
# (`ollama pull smollm2:135m` / `ollama pull all-minilm` on a real Ollama).
BUNDLED_NAMES = OLLAMA_NAMES    # Ollama library names of the bundled models (labkit.models)


def parse_host(value: str | None) -> tuple[str, int]:
    """``OLLAMA_HOST`` the way Ollama reads it: ``[scheme://]host[:port][/path]``.

    No scheme: port 11434; ``http://`` without a port: 80; ``https://``: 443; an empty host means
    127.0.0.1. ``0.0.0.0`` binds every interface (reachable from your network!).

    >>> parse_host(None), parse_host("0.0.0.0"), parse_host(":8080"), parse_host("http://example.org")
    (('127.0.0.1', 11434), ('0.0.0.0', 11434), ('127.0.0.1', 8080), ('example.org', 80))
    >>> parse_host("[::1]:9000"), parse_host("https://ollama.local/x")
    (('::1', 9000), ('ollama.local', 443))
    """
    s = (value or "").strip()
    default_port = DEFAULT_PORT
    if "://" in s:
        scheme, s = s.split("://", 1)
        default_port = {"http": 80, "https": 443}.get(scheme.lower(), DEFAULT_PORT)
    s = s.split("/", 1)[0]
    host, port = s, ""
    if s.startswith("["):                                  # [v6]:port
        host, _, rest = s[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif s.count(":") == 1:
        host, port = s.split(":")
    try:
        port_n = int(port) if port else default_port
        if not 0 <= port_n <= 65535:
            raise ValueError
    except ValueError:
        port_n = default_port
    return (host or "127.0.0.1"), port_n


def parse_duration(value: Any, *, default: float = DEFAULT_KEEP_ALIVE) -> float:
    """A keep-alive as seconds: numbers are seconds, strings are Go durations ("5m", "1h30m",
    "300ms") or bare numbers; negative means forever (``math.inf``), 0 means unload now.

    >>> parse_duration("5m"), parse_duration(0), parse_duration("-1"), parse_duration("1h30m"), parse_duration(None)
    (300.0, 0.0, inf, 5400.0, 300.0)
    """
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise APIError(400, f"invalid keep_alive {value!r}: use a duration such as \"5m\", seconds, 0 or -1")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", body)
            if not parts or "".join(a + b for a, b in parts) != body:
                raise APIError(400, f"invalid keep_alive {value!r}: use a duration such as \"5m\", \"30s\", "
                                    "\"1h\", a number of seconds, 0 (unload now) or -1 (keep loaded)") from None
            seconds = sign * sum(float(a) * units[b] for a, b in parts)
    return math.inf if seconds < 0 else seconds


def default_models_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return Path(env).expanduser()
    return cache_dir() / "ollama" / "models"


def scheduler_settings(*, keep_alive: float | None = None, num_parallel: int | None = None,
                       max_loaded: int | None = None, context_length: int | None = None,
                       max_queue: int | None = None) -> dict:
    """The scheduler's settings: the values given, else their ``OLLAMA_*`` variables, else Ollama's defaults."""
    env = os.environ
    return {
        "max_loaded": max_loaded or int(env.get("OLLAMA_MAX_LOADED_MODELS") or 0) or 3,
        "num_parallel": num_parallel or int(env.get("OLLAMA_NUM_PARALLEL") or 0) or 1,
        "max_queue": max_queue or int(env.get("OLLAMA_MAX_QUEUE") or 0) or 512,
        "keep_alive": keep_alive if keep_alive is not None else parse_duration(env.get("OLLAMA_KEEP_ALIVE")),
        "context_length": context_length or int(env.get("OLLAMA_CONTEXT_LENGTH") or 0) or 4096,
    }


def listen_address(host: str | None, port: int | None) -> tuple[str, int]:
    """Where to listen: ``--host``/``--port``, else ``$OLLAMA_HOST`` (:func:`parse_host`)."""
    env_host, env_port = parse_host(os.environ.get("OLLAMA_HOST"))
    return host or env_host, (port if port is not None else env_port)


def build_parser() -> argparse.ArgumentParser:
    """``python -m labkit.ollama_lab``'s flags."""
    ap = argparse.ArgumentParser(prog="python -m labkit.ollama_lab",
                                 description="labkit's Ollama-compatible server (llama-cpp-python inside).")
    ap.add_argument("--model", help="a GGUF file to register under --name (the bundled models are always registered)")
    ap.add_argument("--name", help="name:tag for --model (default: the file name)")
    ap.add_argument("--host", help="bind address (default: from $OLLAMA_HOST, else 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default: from $OLLAMA_HOST, else 11434)")
    ap.add_argument("--any-port", action="store_true", help="if the port is busy, take a free one instead of failing")
    ap.add_argument("--models-dir", help="model store (default: $OLLAMA_MODELS, else ~/.cache/labkit/ollama/models)")
    ap.add_argument("--keep-alive", help="default keep-alive (default: $OLLAMA_KEEP_ALIVE, else 5m)")
    ap.add_argument("--num-parallel", type=int, help="parallel requests per model ($OLLAMA_NUM_PARALLEL, 1)")
    ap.add_argument("--max-loaded-models", type=int, help="models loaded at once ($OLLAMA_MAX_LOADED_MODELS, 3)")
    ap.add_argument("--max-queue", type=int, help="requests waiting before a 503 ($OLLAMA_MAX_QUEUE, 512)")
    ap.add_argument("--context-length", type=int, help="default num_ctx ($OLLAMA_CONTEXT_LENGTH, 4096)")
    ap.add_argument("--num-thread", type=int, default=0, help="llama.cpp threads (0: one per physical core, labkit.env.default_threads)")
    return ap
