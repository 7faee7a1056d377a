"""A stand-in for a hosted ("cloud") OpenAI-compatible API that fails on purpose (chapter 09).

Hosted APIs fail in a handful of ways: **429** rate limits (with ``Retry-After``), **5xx** errors,
slow answers, and streams that break off. A router (:mod:`labkit.router`) has to be measured
against those failures, and waiting for a real provider to misbehave is not a method. So this
server sits on 127.0.0.1, forwards each request to a real local engine (``upstream``, e.g.
``labkit.serve("llama.cpp")``) — or, with no upstream, answers a short canned reply itself — and
injects faults on a schedule you control:

>>> with FaultAPI(upstream=None, faults=["ok", "503", "429:0.2", "slow:0.5", "drop:2"]) as api:  # doctest: +SKIP
...     api.base_url                           # an OpenAI client can point at api.base_url + "/v1"

Fault specs (strings or :class:`Fault`), one per chat request in arrival order:

* ``"ok"`` — forward (or answer) normally;
* ``"429"`` / ``"429:0.2"`` — rate limited; ``retry-after-ms`` says 200 ms, ``Retry-After`` the
  same rounded up to whole seconds (RFC 9110 allows only whole seconds there);
* ``"503"`` (any status 400–599) — that error, e.g. a server error, or ``"400"`` for a request
  the provider refuses;
* ``"slow:1.5"`` — wait 1.5 s before answering (then answer normally);
* ``"drop:N"`` — a stream is cut after N events (``drop:0``: after the headers, before any
  event); a non-streaming request gets its connection closed with no response at all.

:func:`seeded_faults` draws such a list from probabilities with a seeded RNG, so a schedule is
reproducible. ``set_faults`` changes it at run time (also ``POST /admin/faults``);
``outage(True)`` makes every chat request *and* ``/health`` answer 503 until ``outage(False)``.
The stand-in counts every request and keeps every chat prompt it received (``prompts``), which is
how a test proves that a prompt with personal data never reached it.

It runs in a thread of this process (the standard library's ``ThreadingHTTPServer``: full control
over the bytes on the wire, which a dropped stream needs) and is always stopped: by ``stop()``,
at the end of a ``with`` block, and at interpreter exit. ``stop()`` also cuts open keep-alive
connections, so a stopped stand-in is as dead to its clients as a killed process.
"""
from __future__ import annotations

import atexit
import json
import math
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .env import free_port, is_loopback, port_is_free
from .errors import PortInUseError
from .router import messages_text

_live: "set[FaultAPI]" = set()
_live_lock = threading.Lock()


# --------------------------------------------------------------------------- faults
@dataclass(frozen=True)
class Fault:
    """What the stand-in does to one chat request."""

    kind: str = "ok"                 # "ok", "status", "slow" or "drop"
    status: int = 200                # for kind "status": 429 or 5xx
    retry_after: float | None = None  # seconds, for 429
    delay: float = 0.0               # for kind "slow"
    after_events: int = 0            # for kind "drop": events sent before the cut

    @classmethod
    def parse(cls, spec: "str | Fault") -> "Fault":
        """``"ok"``, ``"429"``, ``"429:0.2"``, ``"503"``, ``"slow:1.5"``, ``"drop:3"`` → a Fault."""
        if isinstance(spec, Fault):
            return spec
        name, _, arg = str(spec).strip().lower().partition(":")
        try:
            if name == "ok" and not arg:
                return cls()
            if name == "429":
                return cls("status", 429, retry_after=float(arg) if arg else 1.0)
            if name.isdigit() and 400 <= int(name) <= 599 and not arg:
                return cls("status", int(name))
            if name == "slow" and arg:
                return cls("slow", delay=float(arg))
            if name == "drop":
                return cls("drop", after_events=int(arg or 0))
        except ValueError:
            pass
        raise ValueError(f"Unknown fault {spec!r}: use 'ok', '429' or '429:SECONDS', another HTTP error "
                         "status 400-599 (e.g. '503'), 'slow:SECONDS' or 'drop:EVENTS'.")

    def __str__(self) -> str:
        if self.kind == "status":
            return f"429:{self.retry_after:g}" if self.status == 429 else str(self.status)
        if self.kind == "slow":
            return f"slow:{self.delay:g}"
        return f"drop:{self.after_events}" if self.kind == "drop" else "ok"


def seeded_faults(n: int, rates: dict[str, float], seed: int = 0) -> list[Fault]:
    """``n`` faults drawn independently with probabilities ``rates`` (the rest ``"ok"``), reproducibly.

    >>> [str(f) for f in seeded_faults(6, {"503": 0.5}, seed=1)]
    ['503', 'ok', 'ok', '503', '503', '503']
    """
    total = sum(rates.values())
    if not 0 <= total <= 1 or any(p < 0 for p in rates.values()):
        raise ValueError(f"Fault rates must be non-negative and sum to at most 1; got {rates} (sum {total:g}).")
    kinds = [Fault.parse(k) for k in rates]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x, acc, chosen = rng.random(), 0.0, Fault()
        for kind, p in zip(kinds, rates.values()):
            acc += p
            if x < acc:
                chosen = kind
                break
        out.append(chosen)
    return out


# --------------------------------------------------------------------------- the stand-in
class FaultAPI:
    """An OpenAI-compatible server on 127.0.0.1 that forwards to ``upstream`` and injects faults.

    ``upstream``: a :class:`labkit.Server` (or anything with ``base_url`` and ``model``), a base URL
    string, or None to answer a canned reply. ``faults``: the schedule (see the module docstring);
    after its end requests are ``"ok"`` unless ``cycle=True``.
    """

    engine = "fault-api"
    health_path = "/health"

    def __init__(self, upstream=None, *, faults=(), cycle: bool = False, model: str | None = None,
                 name: str = "cloud", host: str = "127.0.0.1", port: int | None = None, start: bool = True):
        if not is_loopback(host):
            raise ValueError(f"FaultAPI is a test stand-in and binds loopback only; got host={host!r}. Use 127.0.0.1.")
        if isinstance(upstream, str):
            self.upstream_url, upstream_model = upstream.rstrip("/").removesuffix("/v1"), None
        else:
            self.upstream_url = upstream.base_url if upstream is not None else None
            upstream_model = getattr(upstream, "model", None)
        self.upstream_model = upstream_model
        self.model = model or upstream_model or "cloud-model"
        self.name, self.host = name, host
        self.port = port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._down = False
        self.requests: dict[str, int] = {}       # path -> count, every request received
        self.log: list[dict] = []                # one entry per chat request: index, fault, stream, status
        self.prompts: list[str] = []             # every chat request's message text, in arrival order
        self.set_faults(faults, cycle=cycle)
        if start:
            self.start()

    # ------------------------------------------------------------------ control
    def set_faults(self, faults, cycle: bool = False, reset: bool = True) -> None:
        """Replace the schedule; ``reset`` starts it again from chat request 0 (counts are kept)."""
        parsed = [Fault.parse(f) for f in faults]
        if cycle and not parsed:
            raise ValueError("cycle=True needs at least one fault in the schedule.")
        with self._lock:
            self._faults, self._cycle = parsed, cycle
            if reset:
                self._next_index = 0

    def outage(self, down: bool = True) -> None:
        """While down, every chat request and ``/health`` answer 503 (a provider outage)."""
        self._down = down

    def _next_fault(self) -> tuple[int, Fault]:
        with self._lock:
            i = self._next_index
            self._next_index += 1
            if self._down:
                return i, Fault("status", 503)
            if i < len(self._faults):
                return i, self._faults[i]
            return i, (self._faults[i % len(self._faults)] if self._cycle else Fault())

    @property
    def chat_requests(self) -> int:
        """Chat requests received (every attempt of every client, retries included)."""
        with self._lock:
            return len(self.log)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def openai(self, **kwargs):
        """An ``openai.OpenAI`` client pointed at this stand-in's ``/v1``."""
        from openai import OpenAI
        kwargs.setdefault("base_url", self.base_url + "/v1")
        kwargs.setdefault("api_key", "no-key-needed")
        return OpenAI(**kwargs)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FaultAPI":
        if self._server is not None:
            return self
        if self.port is not None and not port_is_free(self.port, self.host):
            raise PortInUseError(f"Port {self.port} on {self.host} is already in use. Pick another port, "
                                 "or leave port=None to let labkit choose a free one.")
        self.port = self.port or free_port(self.host)
        self._stopping.clear()
        self._server = _QuietServer((self.host, self.port), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"FaultAPI {self.name}:{self.port}", daemon=True)
        self._thread.start()
        with _live_lock:
            _live.add(self)
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (safe to call twice)."""
        with _live_lock:
            _live.discard(self)
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()                     # ends "slow" waits at once
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:                 # keep-alive connections would otherwise still answer
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def alive(self) -> bool:
        return self._server is not None

    def pids(self) -> list[int]:
        """No processes of its own: it is a thread of this one (for clean-up code that collects pids)."""
        return []

    def __enter__(self) -> "FaultAPI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        upstream = self.upstream_url or "canned replies"
        state = "running" if self.alive() else "stopped"
        return f"<FaultAPI {self.name} {self.base_url} -> {upstream}, {self.chat_requests} chat requests, {state}>"


@atexit.register
def stop_all() -> None:
    """Stop every stand-in this process started (also run at exit)."""
    with _live_lock:
        apis = list(_live)
    for api in apis:
        api.stop()


# --------------------------------------------------------------------------- HTTP
class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True                        # a "slow" request must not hold up stop()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):
            return                               # a client that hung up (its timeout, a drop): expected here
        super().handle_error(request, client_address)


def _handler_for(api: FaultAPI):
    class Handler(_FaultHandler):
        pass
    Handler.api = api
    return Handler


class _FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"                # keep-alive, chunked streams
    api: FaultAPI

    def setup(self):
        super().setup()
        # headers and body leave in separate writes: without TCP_NODELAY, Nagle's algorithm meets the
        # client's delayed ACK and every reply waits ~40 ms (measured: p50 44 ms for a canned reply)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.api._lock:
            self.api._connections.add(self.connection)

    def finish(self):
        with self.api._lock:
            self.api._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):        # quiet: the notebook shows api.log instead
        pass

    def _count(self) -> str:
        path = self.path.split("?", 1)[0]
        with self.api._lock:
            self.api.requests[path] = self.api.requests.get(path, 0) + 1
        return path

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self._count()
        if path == "/health":
            down = self.api._down
            self._send_json(503 if down else 200, {"status": "unavailable" if down else "ok"})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": self.api.model, "object": "model",
                                                               "owned_by": self.api.name}]})
        elif path == "/admin/stats":
            self._send_json(200, {"requests": self.api.requests, "chat_requests": self.api.chat_requests})
        else:
            self._send_json(404, {"error": {"message": f"no route {path}"}})

    def do_POST(self):
        path = self._count()
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except ValueError:
            return self._send_json(400, {"error": {"message": "the body is not JSON"}})
        if path == "/admin/faults":
            self.api.set_faults(body.get("faults", []), cycle=bool(body.get("cycle", False)))
            return self._send_json(200, {"faults": [str(f) for f in self.api._faults]})
        if path != "/v1/chat/completions":
            return self._send_json(404, {"error": {"message": f"no route {path}"}})
        self._chat(body)

    def _chat(self, body: dict) -> None:
        stream = bool(body.get("stream"))
        index, fault = self.api._next_fault()
        entry = {"index": index, "fault": str(fault), "stream": stream, "status": None}
        with self.api._lock:
            self.api.log.append(entry)
            self.api.prompts.append(messages_text(body.get("messages")))
        if fault.kind == "status":
            entry["status"] = fault.status
            headers = {}
            if fault.status == 429:
                headers = {"retry-after-ms": str(round(fault.retry_after * 1000)),
                           "Retry-After": str(math.ceil(fault.retry_after))}
            return self._send_json(fault.status, {"error": {"message": f"injected {fault.status}",
                                                            "type": "injected_fault"}}, headers)
        if fault.kind == "slow" and self.api._stopping.wait(fault.delay):
            return self._drop()                  # stopped while waiting
        if fault.kind == "drop" and not stream:
            entry["status"] = "dropped"
            return self._drop()
        entry["status"] = 200
        events = self._events(body, stream)
        if not stream or isinstance(events, tuple):
            entry["status"] = events[0]
            return self._send_json(*events)
        self._stream(events, fault.after_events if fault.kind == "drop" else None, entry)

    def _drop(self) -> None:
        """Close the connection abruptly: the client sees a broken response, not an answer."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _events(self, body: dict, stream: bool):
        """(status, json) for a plain request; an iterator of SSE payload lines for a stream."""
        if self.api.upstream_url is None:
            return _canned(self.api.model, body, stream)
        return _forward(self.api, body, stream)

    def _stream(self, events, drop_after: int | None, entry: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            for payload in events:
                if drop_after is not None and sent >= drop_after:
                    entry["status"] = f"dropped after {sent}"
                    return self._drop()
                data = f"data: {payload}\n\n".encode()
                self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                sent += payload != "[DONE]"
            self.wfile.write(b"0\r\n\r\n")
        except OSError:                          # the client went away
            self.close_connection = True


def _canned(model: str, body: dict, stream: bool):
    limit = body.get("max_tokens") or 4
    if not isinstance(limit, int):               # what a hosted API does with a bad parameter
        return 400, {"error": {"message": f"max_tokens must be an integer, got {limit!r}", "type": "invalid_request_error"}}
    words = ["OK", " from", " the", " stand-in."][: max(1, limit)]
    created, ident = int(time.time()), f"chatcmpl-fault-{time.monotonic_ns()}"
    if not stream:
        return 200, {"id": ident, "object": "chat.completion", "created": created, "model": model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                                  "finish_reason": "length"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)}}

    def chunk(delta, finish=None):
        return json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    return iter([chunk({"role": "assistant", "content": ""}), *(chunk({"content": w}) for w in words),
                 chunk({}, "length"), "[DONE]"])


def _forward(api: FaultAPI, body: dict, stream: bool):
    import httpx

    from .streams import sse_payloads
    url = api.upstream_url + "/v1/chat/completions"
    body = {**body, "model": api.upstream_model or body.get("model")}
    if not stream:
        try:
            r = httpx.post(url, json=body, timeout=120)
            return r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as exc:
            return 502, {"error": {"message": f"upstream {api.upstream_url} failed: {exc}"}}

    def lines():
        try:
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                yield from sse_payloads(r.iter_lines())
        except httpx.HTTPError:
            return                               # the stream ends without [DONE]: a broken stream
    return lines()
