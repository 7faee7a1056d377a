"""The OpenAI translation labkit puts in front of llama-cpp-python's server (``labkit serve llama.cpp``).

llama-cpp-python's server (pinned 0.3.x) answers HTTP 500 to requests the OpenAI SDK and LangChain send
every day — any request its schema rejects is reported as the server's fault — and streams tool calls in
a shape OpenAI clients misread. :class:`TranslateOpenAI` is an ASGI middleware, applied where the lab
starts that server (:func:`install`, called by :func:`labkit.repack.main`), that translates the way
Ollama's own OpenAI layer translates for its routes:

* ``response_format: {"type": "json_schema", "json_schema": {"schema": S}}`` becomes llama-cpp-python's
  ``{"type": "json_object", "schema": S}`` (the same grammar-constrained decoding);
* an assistant turn with ``content: null`` (every tool loop's second turn) or a list of text parts gets its
  text as a string;
* ``tool_choice: "required"`` with one tool names that tool (the server's function-calling handler fails on
  "required" with a 500; with several tools it is a 400);
* ``max_completion_tokens`` (OpenAI's newer name, all ``ChatOpenAI`` sends) becomes ``max_tokens``, which the
  server would otherwise not see (it would generate up to the context size);
* streamed tool-call deltas carry the function's name (and id, type) in the first delta of each call only,
  as OpenAI's do: the server repeats them in every delta, and clients that concatenate deltas read
  ``JokeJoke``;
* a request its schema still rejects is answered 400 naming the field, never 500;
* what the server accepts and ignores (``n`` above 1, ``stream_options.include_usage``) is named in the
  response header ``X-Labkit-Ignored-Fields`` and a log line, as on labkit's Ollama-compatible server.

>>> translate_request({"messages": [{"role": "assistant", "content": None, "tool_calls": []}],
...                    "max_completion_tokens": 5, "response_format": {"type": "json_schema",
...                    "json_schema": {"name": "x", "schema": {"type": "object"}}}})[0]
{'messages': [{'role': 'assistant', 'content': '', 'tool_calls': []}], 'max_completion_tokens': 5, \
'response_format': {'type': 'json_object', 'schema': {'type': 'object'}}, 'max_tokens': 5}
"""
from __future__ import annotations

import json
import sys
from typing import Callable

from .vision import read_body  # the ASGI body reader RefuseMedia uses

CHAT_PATH = "/v1/chat/completions"
IGNORED_HEADER = "X-Labkit-Ignored-Fields"      # the name labkit's Ollama-compatible server uses


class Unsupported(ValueError):
    """A request field this server cannot serve; ``param`` names it (OpenAI's ``param``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _response_format(rf):
    """OpenAI's ``response_format`` as llama-cpp-python reads it (``text`` or ``json_object`` with an optional ``schema``)."""
    if not isinstance(rf, dict):
        return rf                         # the schema check below names it
    kind = rf.get("type")
    if kind == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        return {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}
    if kind not in ("text", "json_object"):
        raise Unsupported("response_format.type", f"response_format type {kind!r} is not supported by this server: "
                                                  "use \"text\", \"json_object\" or \"json_schema\"")
    return rf


def _text_of(content, where: str) -> str:
    """An assistant message's content as the string the server wants: null is "", text parts are joined."""
    if content is None:
        return ""
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part.get("text") or "")
        elif kind != "refusal":
            raise Unsupported(f"{where}.content[{j}]", f"an assistant message's content part of type {kind!r} is not "
                                                       "supported by this server: send text parts")
    return "".join(texts)


def _required_tool(tools) -> dict:
    """``tool_choice: "required"`` as the server can force it: its function-calling handler asserts on "required"
    (a 500), and forces a call only to a named function — so with exactly one tool, that tool."""
    names = [t.get("function", {}).get("name") for t in tools or [] if isinstance(t, dict)]
    if len(names) != 1:
        raise Unsupported("tool_choice", f"tool_choice \"required\" with {len(names)} tools is not supported by this "
                                         "server: it can force a call only to one named function "
                                         "({\"type\": \"function\", \"function\": {\"name\": ...}})")
    return {"type": "function", "function": {"name": names[0]}}


def translate_request(body: dict) -> tuple[dict, list[str]]:
    """The request as llama-cpp-python's server accepts it, and the fields it will ignore (see the module's list)."""
    out = dict(body)
    if "response_format" in out and out["response_format"] is not None:
        out["response_format"] = _response_format(out["response_format"])
    messages = out.get("messages")
    if isinstance(messages, list):
        out["messages"] = [dict(m, content=_text_of(m.get("content"), f"messages[{i}]"))
                           if isinstance(m, dict) and m.get("role") == "assistant" and not isinstance(m.get("content"), str)
                           else m for i, m in enumerate(messages)]
    if out.get("tool_choice") == "required":
        out["tool_choice"] = _required_tool(out.get("tools"))
    if out.get("max_tokens") is None and out.get("max_completion_tokens") is not None:
        out["max_tokens"] = out["max_completion_tokens"]
    ignored = []
    if isinstance(out.get("n"), int) and out["n"] > 1:
        ignored.append("n")
    if out.get("stream") and (out.get("stream_options") or {}).get("include_usage"):
        ignored.append("stream_options.include_usage")
    return out, ignored


def llama_cpp_schema_check(body: dict) -> None:
    """Validate ``body`` with the server's own request model (its route reports a failure as a 500);
    raise :class:`Unsupported` naming the first field it rejects."""
    from llama_cpp.server.types import CreateChatCompletionRequest
    from pydantic import ValidationError
    try:
        CreateChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise Unsupported(*_first_error(exc.errors())) from None


def _first_error(errors: list[dict]) -> tuple[str, str]:
    """(param, message) for pydantic's first error; message-type names (the union's members) are left out of the path."""
    error = errors[0]
    param = ""
    for part in error["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not part[:1].isupper():          # "ChatCompletionRequestAssistantMessage": a union member, not a field
            param += ("." if param else "") + part
    return param, f"{param}: {error['msg']} (got {json.dumps(error.get('input'), default=str)[:80]})"


class ToolCallDeltas:
    """Rewrites streamed chat chunks so that each tool call's ``id``, ``type`` and ``function.name`` come only in its first delta."""

    def __init__(self):
        self.seen: set[tuple[int, int]] = set()

    def chunk(self, event: dict) -> dict:
        for choice in event.get("choices") or []:
            for call in (choice.get("delta") or {}).get("tool_calls") or []:
                key = (choice.get("index", 0), call.get("index", 0))
                if key in self.seen:
                    call.pop("id", None)
                    call.pop("type", None)
                    (call.get("function") or {}).pop("name", None)
                self.seen.add(key)
        return event

    def line(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line
        payload = line[5:].strip()
        try:
            event = json.loads(payload)
        except ValueError:                # "[DONE]", or not JSON: passed on as it came
            return line
        if not isinstance(event, dict):
            return line
        return b"data: " + json.dumps(self.chunk(event), ensure_ascii=False).encode()


def _error(status: int, param: str | None, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                 "code": "unsupported_field" if param else None}}).encode()


class TranslateOpenAI:
    """ASGI middleware: :func:`translate_request` and ``check`` (the server's own schema by default) on chat
    requests, :class:`ToolCallDeltas` on their event streams; anything else passes through untouched."""

    def __init__(self, app, check: Callable[[dict], None] | None = llama_cpp_schema_check, paths=(CHAT_PATH,)):
        self.app, self.check, self.paths = app, check, tuple(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:                               # the client left before sending its body
            return None
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        ignored: list[str] = []
        if isinstance(request, dict):
            try:
                request, ignored = translate_request(request)
                if self.check:
                    self.check(request)
            except Unsupported as exc:
                return await _respond(send, 400, _error(400, exc.param, str(exc)))
            body = json.dumps(request).encode()
            if ignored:
                print(f"labkit: llama-cpp-python's server ignores {', '.join(ignored)} (header {IGNORED_HEADER})",
                      file=sys.stderr, flush=True)
        return await self.app(scope, _replay(body, receive), _rewriting(send, ignored))


async def _respond(send, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _replay(body: bytes, receive):
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()                 # later reads wait for a disconnect, as the app expects
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


def _rewriting(send, ignored: list[str]):
    """``send`` that adds the ignored-fields header and, on an event stream, fixes tool-call deltas line by line."""
    state = {"sse": False, "rest": b""}
    deltas = ToolCallDeltas()

    async def wrapped(message):
        if message["type"] == "http.response.start":
            headers = list(message.get("headers") or [])
            state["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
            if ignored:
                headers.append((IGNORED_HEADER.lower().encode(), ", ".join(ignored).encode()))
            return await send({**message, "headers": headers})
        if message["type"] != "http.response.body" or not state["sse"]:
            return await send(message)
        data = state["rest"] + message.get("body", b"")
        more = message.get("more_body", False)
        lines = data.split(b"\n")
        state["rest"] = lines.pop() if more else b""       # an incomplete line waits for the next piece
        out = b"\n".join(deltas.line(line) for line in lines) + (b"\n" if more and lines else b"")
        return await send({**message, "body": out})
    return wrapped


def install() -> None:
    """Before ``python -m llama_cpp.server`` runs: make the app it builds translate (inside CORS, so that its
    400s carry the headers a browser needs, and inside :class:`labkit.vision.RefuseMedia` when installed after it)."""
    import llama_cpp.server.app as server_app
    from starlette.middleware import Middleware
    original = server_app.create_app

    def create_app(*a, **kw):
        app = original(*a, **kw)
        app.user_middleware.append(Middleware(TranslateOpenAI))
        return app
    server_app.create_app = create_app           # llama_cpp.server.__main__ imports it when it runs, after this
