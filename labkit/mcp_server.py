"""An MCP server in front of the lab's engines (chapter 09).

The Model Context Protocol (MCP) lets an application — a desktop chat client, an IDE, an agent —
discover and call *tools* and read *resources* that a separate server offers, over JSON-RPC.
This server is built on the official MCP Python SDK (``mcp`` 1.x, ``FastMCP``): the SDK writes
the protocol (initialisation, capability negotiation, JSON schemas from type hints, input
validation, progress notifications, both transports); labkit only writes the tools.

Tools:

* ``search_docs``: chapter 05's retriever (all-MiniLM-L6-v2 + FAISS over 400-character chunks, built
  with :mod:`labkit.rag`) over a folder of documents — the lab's Kelvane Islands corpus unless
  ``--corpus`` names another (``none``: no retriever). Its text result is the passages with their
  source files, what a model reads; its structured result adds the scores;

and, served by the OpenAI-compatible engines that :func:`labkit.serve` starts (or any ``base_url``):

* ``generate`` (a prompt) and ``chat`` (a message list): streamed from the engine, with MCP
  progress notifications while tokens arrive;
* ``embed``: vectors from the lab's sentence-embedding model (all-MiniLM-L6-v2, in this process);
* ``list_models``, ``model_switch`` (the default backend/model, checked against what the
  engine serves), ``health_check`` (each backend: ok, latency, error);
* the resource ``models://catalogue``: the same catalogue as JSON.

Errors — an unknown backend or model, an engine that does not answer — are raised as
:class:`MCPBackendError`; the SDK returns them as tool errors (``isError``) whose text names the
problem, and the server keeps running. Arguments of the wrong type never reach a tool: the SDK
validates them against the tool's JSON schema first.

Transports: stdio (the client starts ``python -m labkit.mcp_server`` and talks over its
stdin/stdout — what desktop clients do, see :func:`desktop_config`) and Streamable HTTP on
127.0.0.1 with an optional bearer token (:func:`http_app`, :func:`start_http` runs it in the
background under labkit's server supervisor). Command line: ``labkit mcp`` (or ``python -m
labkit.mcp_server``); with no ``--backend`` it starts the bundled model on llama.cpp itself and
stops it on exit.

The SDK is imported inside the functions that need it, so that ``labkit``'s command line stays
quick to start.
"""
import argparse
import asyncio
import contextlib
import hmac
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field

from . import engines
from .env import free_port, is_loopback
from .errors import LabkitError, ServerStartError
from .rag import DOCS_DIR

# engines a backend can be started on: those that speak OpenAI's chat API (labkit.engines' chat_model) in labkit's
# own environment (vLLM runs in its own; pass --backend URL for a vLLM server)
OPENAI_ENGINES = [e.name for e in engines.all_engines()
                  if e.chat_model == "langchain_openai:ChatOpenAI" and not e.own_environment]

TOKEN_ENV = "LABKIT_MCP_TOKEN"          # the bearer token reaches a background server this way, not in argv
MCP_PATH = "/mcp"
HEALTH_PATH = "/health"
CATALOGUE_URI = "models://catalogue"
PROGRESS_EVERY = 4                      # tokens between two progress notifications
PROBE_TIMEOUT_S = 3.0
CHUNK_SIZE = 400                        # chapter 05's choice: about one chunk per document of its corpus


class MCPBackendError(LabkitError):
    """A tool could not do its work: its message is what the MCP client sees."""


class UnknownBackendError(MCPBackendError, ValueError):
    """A backend name that is not in the server's configuration."""


class UnknownModelError(MCPBackendError, ValueError):
    """A model that the chosen backend does not serve."""


class BackendDownError(MCPBackendError, ConnectionError):
    """The backend's engine does not answer."""


class NoCorpusError(MCPBackendError):
    """``search_docs`` on a server started without documents, or with a folder that has none."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Backend:
    """One engine behind the MCP server: a name, its root URL (no ``/v1``), and the model to ask
    for (``None``: the first one it serves)."""

    name: str
    base_url: str
    model: str | None = None

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise ValueError(f"A backend name uses letters, digits, '_', '.', '-'; got {self.name!r}")
        if not re.match(r"https?://", self.base_url or ""):
            raise ValueError(f"Backend {self.name!r}: base_url must start with http:// or https://, got {self.base_url!r}")
        url = self.base_url.rstrip("/")
        object.__setattr__(self, "base_url", url[:-3] if url.endswith("/v1") else url)

    @classmethod
    def parse(cls, spec: str) -> "Backend":
        """``"NAME=URL[,MODEL]"``, as on the command line (``local=http://127.0.0.1:8080,smollm2``)."""
        name, sep, rest = spec.partition("=")
        if not sep or not rest:
            raise ValueError(f"--backend takes NAME=URL[,MODEL], e.g. local=http://127.0.0.1:8080,smollm2; got {spec!r}")
        url, _, model = rest.partition(",")
        return cls(name.strip(), url.strip(), model.strip() or None)

    @classmethod
    def from_server(cls, server, name: str | None = None) -> "Backend":
        """A backend for a running :class:`labkit.Server` (named after its engine by default)."""
        return cls(name or re.sub(r"[^A-Za-z0-9_.-]+", "-", server.engine), server.base_url, server.model)

    @property
    def spec(self) -> str:
        return f"{self.name}={self.base_url}" + (f",{self.model}" if self.model else "")


def as_backend(item, name: str | None = None) -> Backend:
    """A :class:`Backend` from a Backend, a ``"NAME=URL[,MODEL]"`` string or a labkit Server."""
    if isinstance(item, Backend):
        return item
    if isinstance(item, str):
        return Backend.parse(item)
    if hasattr(item, "base_url") and hasattr(item, "engine"):
        return Backend.from_server(item, name)
    raise TypeError(f"A backend is a Backend, 'NAME=URL[,MODEL]' or a labkit Server; got {item!r}")


@dataclass
class MCPConfig:
    """What the server fronts: ``backends`` (the first is the default unless ``default`` names
    another), the embedding model (a bundled name or a local folder), the engines' timeout, and
    the folder of documents ``search_docs`` searches (``None``: no retriever)."""

    backends: list = field(default_factory=list)
    default: str | None = None
    embedding_model: str = "minilm"
    timeout_s: float = 120.0
    corpus: str | None = str(DOCS_DIR)

    def __post_init__(self):
        self.backends = [as_backend(b) for b in self.backends]
        if not self.backends:
            raise ValueError("MCPConfig needs at least one backend (a labkit Server or 'NAME=URL[,MODEL]').")
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"Backend names must be unique; got {names}")
        self.default = self.default or names[0]
        if self.default not in names:
            raise ValueError(f"default={self.default!r} is not one of the backends {names}")
        if self.corpus and not os.path.isdir(self.corpus):
            raise ValueError(f"The corpus folder {self.corpus} does not exist: pass --corpus FOLDER with your "
                             "documents, or --corpus none for a server without search_docs.")


# --------------------------------------------------------------------------- the work behind the tools
class Gateway:
    """The state and the engine calls behind the MCP tools (no MCP in here: testable on its own)."""

    def __init__(self, config: MCPConfig):
        self.config = config
        self.backends = {b.name: b for b in config.backends}
        self.default_backend = config.default
        self.default_model = {b.name: b.model for b in config.backends}
        self._clients: dict = {}
        self._embedder = None
        self._embedder_lock = threading.Lock()
        self._index = None
        self._index_lock = threading.Lock()

    def backend(self, name: str | None) -> Backend:
        name = name or self.default_backend
        if name not in self.backends:
            raise UnknownBackendError(f"Unknown backend {name!r}: this server has {sorted(self.backends)}. "
                                      "Call list_models to see them with their models.")
        return self.backends[name]

    def _client(self, backend: Backend):
        if backend.name not in self._clients:
            from openai import AsyncOpenAI
            # no retries: a backend that is down should say so now, not after three attempts
            self._clients[backend.name] = AsyncOpenAI(base_url=backend.base_url + "/v1", api_key="no-key-needed",
                                                      timeout=self.config.timeout_s, max_retries=0)
        return self._clients[backend.name]

    def _engine_error(self, backend: Backend, exc: Exception) -> MCPBackendError:
        import openai
        if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
            return BackendDownError(f"Backend {backend.name!r} at {backend.base_url} is not answering "
                                    f"({type(exc).__name__}: {exc}). Start its engine (labkit.serve) or fix its URL; "
                                    "health_check shows every backend's state.")
        if isinstance(exc, openai.APIStatusError):
            return MCPBackendError(f"Backend {backend.name!r} answered HTTP {exc.status_code}: {exc.message}")
        return MCPBackendError(f"Backend {backend.name!r} failed: {type(exc).__name__}: {exc}")

    async def served_models(self, backend: Backend, timeout: float | None = None) -> list[str]:
        """The model names the backend's ``/v1/models`` lists."""
        client = self._client(backend)
        try:
            page = await (client.with_options(timeout=timeout) if timeout else client).models.list()
        except Exception as exc:
            raise self._engine_error(backend, exc) from exc
        return [m.id for m in page.data]

    async def resolve(self, backend_name: str | None, model: str | None) -> tuple[Backend, str]:
        """The backend and model a request goes to; an explicit ``model`` must be served there."""
        backend = self.backend(backend_name)
        if model is None and self.default_model.get(backend.name):
            return backend, self.default_model[backend.name]
        served = await self.served_models(backend)
        if model is None:
            if not served:
                raise UnknownModelError(f"Backend {backend.name!r} serves no model at all.")
            self.default_model[backend.name] = served[0]
            return backend, served[0]
        if model not in served:
            raise UnknownModelError(f"Unknown model {model!r} on backend {backend.name!r}: it serves {served}. "
                                    "Call list_models, or pick another backend.")
        return backend, model

    async def complete(self, messages: list[dict], *, backend: str | None = None, model: str | None = None,
                       max_tokens: int = 128, temperature: float = 0.0, on_token=None) -> dict:
        """Stream a chat completion; ``await on_token(n)`` after each piece of text. Returns the
        text, where it came from, how many streamed pieces (≈ tokens), the finish reason, seconds."""
        target, name = await self.resolve(backend, model)
        t0, pieces, finish = time.perf_counter(), [], None
        try:
            stream = await self._client(target).chat.completions.create(
                model=name, messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True)
            async for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.delta and choice.delta.content:
                    pieces.append(choice.delta.content)
                    if on_token is not None:
                        await on_token(len(pieces))
                finish = choice.finish_reason or finish
        except Exception as exc:
            raise self._engine_error(target, exc) from exc
        return {"text": "".join(pieces), "backend": target.name, "model": name, "tokens": len(pieces),
                "finish_reason": finish, "seconds": round(time.perf_counter() - t0, 3)}

    async def catalogue(self) -> dict:
        """Every backend with its configured and served models (or the error reaching it)."""
        async def one(b: Backend) -> dict:
            row = {"name": b.name, "base_url": b.base_url, "model": self.default_model[b.name]}
            try:
                row["served"] = await self.served_models(b, timeout=PROBE_TIMEOUT_S)
            except MCPBackendError as exc:
                row["served"], row["error"] = None, str(exc)
            return row

        rows = await asyncio.gather(*(one(b) for b in self.backends.values()))
        return {"default": {"backend": self.default_backend, "model": self.default_model[self.default_backend]},
                "backends": list(rows), "embedding_model": self.config.embedding_model}

    async def switch(self, backend: str, model: str | None = None) -> dict:
        """Make ``backend`` (and ``model``, checked against what it serves) the default."""
        target, name = await self.resolve(backend, model)
        self.default_backend, self.default_model[target.name] = target.name, name
        return {"backend": target.name, "model": name, "base_url": target.base_url}

    async def health(self) -> dict:
        """Probe every backend's ``/v1/models``: ok, latency in ms, error; ``healthy`` when all are ok."""
        async def probe(b: Backend) -> dict:
            t0 = time.perf_counter()
            try:
                await self.served_models(b, timeout=PROBE_TIMEOUT_S)
                ok, error = True, None
            except MCPBackendError as exc:
                ok, error = False, str(exc)
            return {"backend": b.name, "base_url": b.base_url, "ok": ok,
                    "latency_ms": round((time.perf_counter() - t0) * 1000, 1), "error": error}

        rows = list(await asyncio.gather(*(probe(b) for b in self.backends.values())))
        return {"healthy": all(r["ok"] for r in rows), "backends": rows}

    def embed(self, texts: list[str]) -> dict:
        """Normalised vectors from the embedding model (loaded on first use, then kept)."""
        with self._embedder_lock:
            if self._embedder is None:
                from sentence_transformers import SentenceTransformer

                from . import models
                self._embedder = SentenceTransformer(str(models.get(self.config.embedding_model)), device="cpu")
        vectors = self._embedder.encode(list(texts), normalize_embeddings=True)
        return {"model": self.config.embedding_model, "dimensions": int(vectors.shape[1]),
                "vectors": [[round(float(x), 6) for x in v] for v in vectors]}

    def retriever(self):
        """The FAISS index over the corpus, built on first use (chapter 05's pipeline), then kept."""
        with self._index_lock:
            if self._index is None:
                from . import rag
                if not self.config.corpus:
                    raise NoCorpusError("This MCP server was started without documents (--corpus none): "
                                        "restart it with --corpus FOLDER to search a folder of .md/.txt/.html files.")
                try:
                    chunks = rag.split_documents(rag.load_corpus(self.config.corpus).documents, chunk_size=CHUNK_SIZE)
                except rag.EmptyCorpusError as exc:
                    raise NoCorpusError(f"search_docs has nothing to search: {exc}") from exc
                self._index = rag.build_index(chunks, rag.embedding_model(self.config.embedding_model))
        return self._index

    def search(self, query: str, k: int = 2) -> dict:
        """The ``k`` passages closest to ``query``, best first: source file, doc id, cosine similarity, text."""
        if not query.strip():
            raise ValueError("query is empty: send the words to search for.")
        found = self.retriever().similarity_search_with_score(query, k=k)
        return {"query": query, "passages": [
            {"source": d.metadata.get("source", "?"), "doc_id": d.metadata.get("doc_id"), "score": round(float(s), 4),
             "text": d.page_content.strip()} for d, s in found]}


def passages_text(result: dict) -> str:
    """``search_docs``' text for a model: each passage after its source file in brackets, as chapter 05 cites."""
    return "\n\n".join(f"[{p['source']}] {p['text']}" for p in result["passages"]) or "No passage found."


# --------------------------------------------------------------------------- the MCP server
def _add_retriever_tool(mcp, gateway: Gateway) -> None:
    from typing import Annotated

    from mcp.types import CallToolResult, TextContent
    from pydantic import Field

    @mcp.tool()
    async def search_docs(query: Annotated[str, Field(min_length=1, description="What to look for, in words")],
                          k: Annotated[int, Field(ge=1, le=10, description="How many passages")] = 2) -> CallToolResult:
        """Search the server's documents (the Kelvane Islands corpus by default): the k best passages, each after its source file."""
        import anyio
        result = await anyio.to_thread.run_sync(gateway.search, query, k)
        # the text is what a model reads; programs get the scores from the structured content
        return CallToolResult(content=[TextContent(type="text", text=passages_text(result))], structuredContent=result)


def _add_generation_tools(mcp, gateway: Gateway) -> None:
    from typing import Annotated, Any, Literal

    from mcp.server.fastmcp import Context
    from pydantic import BaseModel, Field

    class ChatMessage(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    MaxTokens = Annotated[int, Field(ge=1, le=4096, description="Most tokens to generate")]
    Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 = greedy (repeatable)")]
    BackendName = Annotated[str | None, Field(description="A backend name from list_models; default: the current one")]
    ModelName = Annotated[str | None, Field(description="A model that backend serves; default: the backend's current one")]

    async def run(messages: list[dict], ctx: Context, **options) -> dict:
        max_tokens = options["max_tokens"]

        async def progress(n: int) -> None:
            if n % PROGRESS_EVERY == 0:
                await ctx.report_progress(n, max_tokens, f"{n} tokens")

        result = await gateway.complete(messages, on_token=progress, **options)
        await ctx.report_progress(result["tokens"], max_tokens, f"done: {result['finish_reason']}")
        return result

    @mcp.tool()
    async def generate(prompt: str, ctx: Context, backend: BackendName = None, model: ModelName = None,
                       max_tokens: MaxTokens = 128, temperature: Temperature = 0.0) -> dict[str, Any]:
        """Generate a reply to one prompt with a local model (streamed: progress is reported as tokens arrive)."""
        return await run([{"role": "user", "content": prompt}], ctx, backend=backend, model=model,
                         max_tokens=max_tokens, temperature=temperature)

    @mcp.tool()
    async def chat(messages: list[ChatMessage], ctx: Context, backend: BackendName = None, model: ModelName = None,
                   max_tokens: MaxTokens = 128, temperature: Temperature = 0.0) -> dict[str, Any]:
        """Continue a conversation (system/user/assistant messages) with a local model."""
        if not messages:
            raise ValueError("messages is empty: send at least one {'role': 'user', 'content': ...}")
        return await run([m.model_dump() for m in messages], ctx, backend=backend, model=model,
                         max_tokens=max_tokens, temperature=temperature)

    @mcp.tool()
    async def embed(texts: Annotated[list[str], Field(min_length=1, max_length=256)]) -> dict[str, Any]:
        """Embed texts with the lab's sentence-embedding model: one normalised vector per text."""
        import anyio
        return await anyio.to_thread.run_sync(gateway.embed, texts)


def _add_catalogue_tools(mcp, gateway: Gateway) -> None:
    from typing import Any

    @mcp.tool()
    async def list_models() -> dict[str, Any]:
        """Every backend, the model each serves, and the current default."""
        return await gateway.catalogue()

    @mcp.tool()
    async def model_switch(backend: str, model: str | None = None) -> dict[str, Any]:
        """Make a backend (and optionally one of its models) the default for generate and chat."""
        return await gateway.switch(backend, model)

    @mcp.tool()
    async def health_check() -> dict[str, Any]:
        """Probe every backend: ok, latency in milliseconds, and the error when it is down."""
        return await gateway.health()

    @mcp.resource(CATALOGUE_URI, name="catalogue", mime_type="application/json",
                  description="The backends, their models and the default, as JSON")
    async def catalogue() -> str:
        return json.dumps(await gateway.catalogue(), indent=2)


def build_server(config: MCPConfig, *, host: str = "127.0.0.1", port: int = 8000):
    """A ``FastMCP`` server with labkit's tools and catalogue resource (run it with ``.run()``)."""
    from mcp.server.fastmcp import FastMCP
    from starlette.responses import JSONResponse

    gateway = Gateway(config)
    mcp = FastMCP("labkit", instructions="Local LLM Lab: search_docs searches the documents; generate, chat and "
                  "embed with local models; list_models and health_check say what is available.",
                  host=host, port=port, streamable_http_path=MCP_PATH, log_level="WARNING")
    _add_retriever_tool(mcp, gateway)
    _add_generation_tools(mcp, gateway)
    _add_catalogue_tools(mcp, gateway)

    @mcp.custom_route(HEALTH_PATH, methods=["GET"])
    async def health(request):          # readiness for labkit's supervisor; not part of MCP
        return JSONResponse({"status": "ok"})

    mcp.gateway = gateway               # for tests and notebooks that look inside
    return mcp


class BearerTokenMiddleware:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>``, else 401.

    A loopback simplification, not MCP's authorization: the specification (revision 2025-11-25,
    Base Protocol → Authorization, "Roles") makes a protected HTTP server an OAuth 2.1 resource
    server that accepts access tokens issued by an authorization server and publishes its OAuth 2.0
    Protected Resource Metadata (RFC 9728). The SDK's own ``auth=`` implements that side (token
    verifier, issuer URL, metadata routes); one shared secret on 127.0.0.1 needs only this comparison.
    """

    def __init__(self, app, token: str):
        if not token:
            raise ValueError("An empty token would let everyone in; pass None for no token.")
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):     # constant time: no timing hints
                body = json.dumps({"error": "missing or wrong bearer token: send the header "
                                            "'Authorization: Bearer <token>'"}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)       # lifespan and authorised requests pass through


def http_app(config: MCPConfig, *, token: str | None = None, host: str = "127.0.0.1", port: int = 8000):
    """The Streamable HTTP ASGI app (MCP at ``/mcp``, readiness at ``/health``), behind a token if given."""
    app = build_server(config, host=host, port=port).streamable_http_app()
    return BearerTokenMiddleware(app, token) if token else app


def run_http(config: MCPConfig, *, host: str = "127.0.0.1", port: int | None = None, token: str | None = None) -> None:
    """Serve Streamable HTTP in the foreground until interrupted."""
    import uvicorn
    if not is_loopback(host) and not token:
        print(f"WARNING: the MCP server will listen on {host}, reachable from your network, with no token. "
              "Pass --token (and use a firewall) unless this network is yours alone.", file=sys.stderr)
    port = port or free_port(host)
    print(f"labkit MCP server (Streamable HTTP) at http://{host}:{port}{MCP_PATH}"
          + (" (bearer token required)" if token else ""), file=sys.stderr, flush=True)
    # a short graceful shutdown: open SSE streams would otherwise hold a stop for the supervisor's grace period
    uvicorn.run(http_app(config, token=token, host=host, port=port), host=host, port=port,
                log_level="warning", timeout_graceful_shutdown=2)


# --------------------------------------------------------------------------- in the background
@dataclass(eq=False)
class MCPHttpServer:
    """A Streamable HTTP MCP server running in its own supervised process (see :func:`start_http`)."""

    server: object                 # the supervised process: labkit.servers.Server
    token: str | None = None

    @property
    def url(self) -> str:
        return self.server.base_url + MCP_PATH

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def headers(self) -> dict:
        """The HTTP headers a client sends (the bearer token, when there is one)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def pids(self) -> list[int]:
        """The supervisor, the MCP server, and any engine it started."""
        return self.server.pids()

    def alive(self) -> bool:
        return self.server.alive()

    def logs(self, n: int = 30) -> str:
        return self.server.logs(n)

    def stop(self) -> None:
        """Stop the server (and any engine it started). Safe to call twice."""
        self.server.stop()

    def __enter__(self) -> "MCPHttpServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<MCPHttpServer {self.url} pid={self.pid} {'running' if self.alive() else 'stopped'}>"


def start_http(backends=(), *, token: str | None = None, default: str | None = None, model: str | None = None,
               corpus: str | None = str(DOCS_DIR), ready_timeout: float = 90.0) -> MCPHttpServer:
    """Start ``python -m labkit.mcp_server --transport http`` on a free loopback port, under the
    same supervisor as labkit's engines (stopped by ``stop()``, at exit, or when this process dies),
    and wait until it answers. ``backends``: labkit Servers, :class:`Backend` or ``NAME=URL[,MODEL]``;
    none: the child starts ``model`` (default: the bundled one) on llama.cpp itself. ``corpus``: the folder
    ``search_docs`` searches (``None``: no retriever)."""
    from .servers import _start  # labkit.serve's start step: supervisor, readiness wait, log, clean-up
    specs = [as_backend(b).spec for b in backends]
    args = [a for s in specs for a in ("--backend", s)]
    args += ["--default", default] if default else []
    args += ["--model", str(model)] if model and not specs else []
    args += ["--corpus", str(corpus) if corpus else "none"]
    env = {TOKEN_ENV: token} if token else {}
    last_error: Exception | None = None
    for _ in range(3):                 # a free port can be taken by someone else before uvicorn binds it
        port = free_port()
        argv = [sys.executable, "-m", "labkit.mcp_server", "--transport", "http", "--port", str(port), *args]
        try:
            return MCPHttpServer(_start("mcp", "labkit-mcp", "127.0.0.1", port, token, argv, env, HEALTH_PATH,
                                        ready_timeout), token)
        except ServerStartError as exc:
            last_error = exc
            if "address already in use" not in str(exc).lower():
                raise
    raise last_error


# --------------------------------------------------------------------------- desktop clients
def desktop_config(backends=(), *, name: str = "labkit", python: str | None = None, model: str | None = None) -> dict:
    """The ``mcpServers`` entry a desktop MCP client (Claude Desktop's ``claude_desktop_config.json``
    and others using the same format) needs to start this server over stdio."""
    args = ["-m", "labkit.mcp_server", "--transport", "stdio"]
    args += [a for b in backends for a in ("--backend", as_backend(b).spec)]
    args += ["--model", str(model)] if model and not backends else []
    return {"mcpServers": {name: {"command": python or sys.executable, "args": args,
                                  "env": {"HF_HUB_OFFLINE": "1"}}}}


def print_desktop_config(backends=(), **kwargs) -> None:
    """Print :func:`desktop_config` as the JSON to paste into the client's configuration file."""
    print(json.dumps(desktop_config(backends, **kwargs), indent=2))


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``labkit mcp`` / ``python -m labkit.mcp_server``."""
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                        help="stdio (a client starts this process) or Streamable HTTP on --host:--port")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: a free one)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"HTTP bearer token clients must send (default: ${TOKEN_ENV})")
    parser.add_argument("--backend", action="append", metavar="NAME=URL[,MODEL]",
                        help="an OpenAI-compatible engine to front (repeatable); none: start --model on --engine")
    parser.add_argument("--default", default=None, help="the default backend's name (default: the first)")
    parser.add_argument("--model", default=None, help="model to start when no --backend is given (default: $LABKIT_MODEL or smollm2)")
    parser.add_argument("--engine", default="llama.cpp", choices=OPENAI_ENGINES,
                        help="engine to start when no --backend is given")
    parser.add_argument("--corpus", default=str(DOCS_DIR), metavar="FOLDER",
                        help="documents search_docs searches (default: the lab's Kelvane Islands corpus; 'none': no retriever)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the server as the command line asked; engines it started are stopped on the way out."""
    backends = [Backend.parse(s) for s in args.backend or []]
    with contextlib.ExitStack() as stack:
        if not backends:
            from .servers import serve
            with contextlib.redirect_stdout(sys.stderr):      # under stdio, stdout carries the protocol only
                engine = stack.enter_context(serve(args.engine, args.model))
            print(f"started {engine.engine} serving {engine.model!r} at {engine.base_url}", file=sys.stderr, flush=True)
            backends = [Backend.from_server(engine, "local")]
        corpus = None if str(args.corpus).lower() == "none" else args.corpus
        config = MCPConfig(backends, default=args.default, corpus=corpus)
        if args.transport == "stdio":
            build_server(config).run("stdio")
        else:
            try:
                run_http(config, host=args.host, port=args.port, token=args.token)
            except KeyboardInterrupt:
                pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.mcp_server", description="labkit's MCP server")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (LabkitError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # run the importable labkit.mcp_server, not this __main__ copy of it: one Gateway class in the server process, the
    # one a patch (a test's mutation) sees
    from labkit import mcp_server as _module
    sys.exit(_module.main())
