"""An Ollama-compatible server backed by llama-cpp-python (chapter 02's stand-in for Ollama).

Real Ollama cannot be installed on CI machines or Binder, so chapter 02 talks to this server
there, and to a real Ollama wherever one runs (``labkit.serve("ollama")`` prefers it). The
wire contract is Ollama's ``docs/api.md``, followed field for field:

* ``GET|HEAD /`` → ``Ollama is running``; ``GET /api/version``;
* ``POST /api/generate`` and ``POST /api/chat``: NDJSON streaming by default, one JSON object
  with ``"stream": false``; ``options``, ``format`` (``"json"`` or a JSON schema), ``system``,
  ``template``, ``raw``, ``keep_alive`` (``0`` unloads); the last object carries
  ``done_reason`` and ``total_duration``/``load_duration``/``prompt_eval_duration``/
  ``eval_duration`` in **nanoseconds**, ``prompt_eval_count`` and ``eval_count``; ``logprobs``/
  ``top_logprobs`` (per-token ``{token, logprob, bytes, top_logprobs}``); ``tools`` for models whose
  template uses ``.Tools`` (calls parsed into ``message.tool_calls``), tool calls and ``role: "tool"``
  results in the history;
* ``POST /api/embed`` (string or list ``input``, L2-normalised) and the legacy ``/api/embeddings``;
* ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``, ``POST /api/create`` (documented JSON
  fields, or the legacy ``modelfile`` text; ``quantize`` through llama.cpp's quantizer),
  ``POST /api/copy``, ``DELETE /api/delete``, ``POST /api/pull`` (offline: only models that are
  already local), ``HEAD|POST /api/blobs/sha256:…``;
* OpenAI-compatible ``/v1/chat/completions`` (tools, logprobs, ``reasoning_effort``),
  ``/v1/completions`` (legacy logprobs), ``/v1/responses`` (stateless, text and function tools),
  ``/v1/embeddings``, ``/v1/models`` and ``/v1/models/{model}``.

Nothing documented is silently ignored: a field this server cannot honour (``suffix``, ``images``,
``think``/``reasoning_effort`` other than none, ``tools`` on a model without them, ``n``, ``logit_bias``,
``previous_response_id``, ...) is a 400 naming it, with the same message on both APIs.

Errors are ``{"error": "..."}`` with 400 (bad input), 404 (unknown model) or 500; an error after a
stream has started arrives as a last ``{"error": ...}`` line. Model names are ``name:tag``
(``latest`` by default). Models live in a store directory (``--models-dir``, else
``$OLLAMA_MODELS``, else ``~/.cache/labkit/ollama/models``); the bundled SmolLM2 is registered as
``smollm2:135m`` and MiniLM as the embedding model ``all-minilm:latest``. Several models stay
loaded at once (``OLLAMA_MAX_LOADED_MODELS``, default 3) until their keep-alive expires
(``OLLAMA_KEEP_ALIVE``, default 5m); ``OLLAMA_NUM_PARALLEL`` requests run per model (as that many
llama.cpp instances sharing the memory-mapped weights, where Ollama batches N slots of one runner);
requests waiting for the scheduler beyond ``OLLAMA_MAX_QUEUE`` get Ollama's 503.

Run it with ``python -m labkit.ollama_lab`` (binds ``$OLLAMA_HOST``, default 127.0.0.1:11434).
What differs from real Ollama: templates are the GGUF's Jinja chat template unless a Modelfile
``TEMPLATE`` (Go templates: if/range/with, variables, built-in functions) replaces it; the bundled
SmolLM2 has no tools in its template, so ``smollm2-tools:135m`` (same weights, a ChatML template with
tools) is registered too; no GPU scheduling, images, thinking, registry pulls or pushes;
safetensors imports are not converted.

The package, one job per module (after llama-cpp-python's ``llama_cpp/server``, and Ollama's
server, whose OpenAI compatibility is a translator around its native handlers):

* :mod:`.settings` — defaults, ``OLLAMA_*`` variables, the command line; :mod:`.errors` — APIError
  and the one mapper to native or OpenAI-shaped error JSON; :mod:`.names` — ``name:tag``, times;
* :mod:`.template` — the Go-template subset; :mod:`.store` — manifests and blobs;
  :mod:`.scheduler` — loading, sharing and unloading models; :mod:`.engine` — what the server
  asks of a loaded model and the factory that loads one (:mod:`.llama_engine`: llama-cpp-python's
  ``Llama`` as that engine; tests put a fake one there); :mod:`.service` — model facts,
  options, prompts and the token loop; :mod:`.create` — the ``/api/create`` planner;
  :mod:`.inference` — one generation or embedding request;
* :mod:`.tools` — tool capability, the tool-call tag and parser, the SmolLM2 tools template;
* :mod:`.native` — the ``/api/*`` handlers; :mod:`.openai` — the ``/v1/*`` translator;
  :mod:`.responses` — ``/v1/responses`` over the native chat;
  :mod:`.app` — ``make_service``, ``build_app`` (the route table) and ``main``.
"""
from __future__ import annotations

from .app import build_app, main, make_service
from .create import CREATE_QUANTIZE_PRESETS, CreatePlan, check_gguf, execute_create, plan_create
from .engine import EngineFactory, GGUFEmbedder, SentenceEmbedder, TextEngine, llama_cpp_engine
from .errors import APIError, error_body, not_found
from .names import normalize_name, now_rfc3339
from .scheduler import RUNNER_OPTIONS, Loaded, Scheduler
from .service import Service
from .settings import BUNDLED_NAMES, DEFAULT_KEEP_ALIVE, DEFAULT_PORT, VERSION, default_models_dir, parse_duration, parse_host
from .store import Manifest, Store
from .template import render_go_template

__all__ = [
    "BUNDLED_NAMES", "DEFAULT_KEEP_ALIVE", "DEFAULT_PORT", "CREATE_QUANTIZE_PRESETS", "RUNNER_OPTIONS", "VERSION",
    "APIError", "CreatePlan", "EngineFactory", "GGUFEmbedder", "Loaded", "Manifest", "Scheduler", "SentenceEmbedder",
    "Service", "Store", "TextEngine",
    "build_app", "check_gguf", "default_models_dir", "error_body", "execute_create", "llama_cpp_engine", "main",
    "make_service",
    "normalize_name", "not_found", "now_rfc3339", "parse_duration", "parse_host", "plan_create",
    "render_go_template",
]
