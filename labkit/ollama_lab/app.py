"""The application: :func:`make_service` (store, scheduler, the bundled models registered),
:func:`build_app` (the route table over the native and OpenAI handlers) and :func:`main`, which
``python -m labkit.ollama_lab`` runs.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..cancellable import ClientGone
from ..env import free_port, is_loopback, port_is_free
from .engine import EngineFactory
from .errors import APIError, error_response
from .names import normalize_name
from .scheduler import Scheduler
from .service import Service
from .settings import BUNDLED_NAMES, VERSION, build_parser, default_models_dir, listen_address, parse_duration, scheduler_settings
from .store import Manifest, Store
from .tools import SMOLLM2_TOOLS_TEMPLATE


def endpoint(service: Service, fn, openai: bool = False):
    """A Starlette endpoint for handler ``fn(service, request, t0)``: its :class:`APIError` (or any
    other exception, as a 500) becomes an error response, native or OpenAI-shaped."""
    from starlette.responses import Response

    async def handler(request):
        t0 = time.perf_counter_ns()
        try:
            return await fn(service, request, t0)
        except APIError as exc:
            return error_response(exc.status, exc.message, openai=openai)
        except ClientGone:        # nobody is listening; 499 as nginx logs it ("client closed request")
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001  (never let one request take the server down)
            import traceback
            traceback.print_exc()
            return error_response(500, f"{type(exc).__name__}: {exc}", openai=openai)
    return handler


def build_app(service: Service):
    """The Starlette app serving ``service``: Ollama's ``/api/*`` routes and the OpenAI-compatible ``/v1/*``."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from . import native, openai, responses

    def route(path: str, fn, methods: list[str], openai: bool = False) -> Route:
        return Route(path, endpoint(service, fn, openai=openai), methods=methods)

    routes = [
        route("/", native.root, ["GET", "HEAD"]),
        route("/api/version", native.version, ["GET", "HEAD"]),
        route("/api/generate", native.generate, ["POST"]),
        route("/api/chat", native.chat, ["POST"]),
        route("/api/embed", native.embed, ["POST"]),
        route("/api/embeddings", native.embeddings_legacy, ["POST"]),
        route("/api/tags", native.tags, ["GET", "HEAD"]),
        route("/api/show", native.show, ["POST"]),
        route("/api/ps", native.ps, ["GET"]),
        route("/api/create", native.create, ["POST"]),
        route("/api/copy", native.copy, ["POST"]),
        route("/api/delete", native.delete, ["DELETE"]),
        route("/api/pull", native.pull, ["POST"]),
        route("/api/push", native.push, ["POST"]),
        route("/api/blobs/{digest}", native.blob, ["HEAD", "POST"]),
        route("/v1/chat/completions", openai.v1_chat, ["POST"], openai=True),
        route("/v1/completions", openai.v1_completions, ["POST"], openai=True),
        route("/v1/embeddings", openai.v1_embeddings, ["POST"], openai=True),
        route("/v1/responses", responses.v1_responses, ["POST"], openai=True),
        route("/v1/models", openai.v1_models, ["GET"], openai=True),
        route("/v1/models/{model:path}", openai.v1_model_one, ["GET"], openai=True),
    ]
    return Starlette(routes=routes,
                     exception_handlers={404: native.page_not_found, 405: native.method_not_allowed})


def make_service(models_dir: Path, *, model: str | None = None, name: str | None = None,
                 keep_alive: float | None = None, num_parallel: int | None = None,
                 max_loaded: int | None = None, context_length: int | None = None,
                 max_queue: int | None = None, num_thread: int = 0, engine: EngineFactory | None = None) -> Service:
    """The service over the store in ``models_dir``, with the bundled models (and ``model``, as ``name``)
    registered. ``engine`` loads models (:mod:`.engine`; llama-cpp-python by default, a fake in tests)."""
    store = Store(models_dir)
    sched = Scheduler(**scheduler_settings(keep_alive=keep_alive, num_parallel=num_parallel,
                                           max_loaded=max_loaded, context_length=context_length,
                                           max_queue=max_queue),
                      num_thread=num_thread, engine=engine)
    service = Service(store, sched)
    from .. import models
    for key, registered in BUNDLED_NAMES.items():
        try:
            # overwrite: the bundled files live in the environment, whose path changes when it is rebuilt
            service.register(registered, models.get(key), overwrite=True)
        except Exception as exc:  # noqa: BLE001  (a missing optional package: say so, keep serving)
            print(f"note: bundled model {key!r} not registered ({exc})", flush=True)
    register_tools_variant(service)
    if model:
        service.register(name or Path(model).stem, Path(model), overwrite=True)
    return service


def register_tools_variant(service: Service) -> None:
    """``smollm2-tools:135m``: the bundled SmolLM2's weights with a ChatML template that has a tools
    section (:data:`labkit.ollama_lab.tools.SMOLLM2_TOOLS_TEMPLATE`), since its own template has
    none. A real Ollama gets the same model from ``ollama create smollm2-tools:135m`` with that TEMPLATE."""
    base = service.store.get(normalize_name(BUNDLED_NAMES.get("smollm2", "smollm2:135m")))
    if base is None:
        return
    name = "smollm2-tools:135m"
    existing = service.store.get(name)
    if existing is not None and existing.path == base.path and existing.template == SMOLLM2_TOOLS_TEMPLATE:
        return
    service.store.put(Manifest(name=name, kind="gguf", path=base.path, parent=base.name,
                               template=SMOLLM2_TOOLS_TEMPLATE, builtin=True))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    host, port = listen_address(args.host, args.port)
    if not port_is_free(port, host):
        if not args.any_port:
            print(f"Error: listen tcp {host}:{port}: bind: address already in use "
                  "(another Ollama? stop it, set OLLAMA_HOST to another port, or pass --any-port)", flush=True)
            return 1
        port = free_port(host)
    service = make_service(
        Path(args.models_dir).expanduser() if args.models_dir else default_models_dir(),
        model=args.model, name=args.name,
        keep_alive=parse_duration(args.keep_alive) if args.keep_alive else None,
        num_parallel=args.num_parallel, max_loaded=args.max_loaded_models,
        context_length=args.context_length, max_queue=args.max_queue, num_thread=args.num_thread)
    if not is_loopback(host):
        print(f"WARNING: listening on {host}: anyone who can reach this machine can use (and delete) your "
              "models — this API has no authentication. Put a reverse proxy with auth in front of it.", flush=True)
    print(f"labkit Ollama-compatible server {VERSION} listening on http://{host}:{port} "
          f"(models in {service.store.root})", flush=True)
    import uvicorn
    uvicorn.run(build_app(service), host=host, port=port, log_level="warning", access_log=False)
    return 0
